"""HPRIM Santé files coming in: the interpreter on hand-written files, the drop folder with its
companion files (fake sink, real filesystem), and the whole engine from a dropped file to the
simulated EHR."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from medcourier.channels.filedrop.watcher import FileDropOptions, FileDropWatcher
from medcourier.engine.inbound import (
    InboundDocument,
    InboundError,
    InboundMessage,
    InboundRejected,
    InboundResult,
    MessageDocuments,
    Verdict,
)
from medcourier.engine.model import Document
from medcourier.transforms.hprim import HprimOptions, interpret, render
from medcourier.transforms.hprim.interpret import (
    HprimFileError,
    HprimInboundMessage,
    looks_like_hprim,
    medcourier_interpret_message,
    read_hprim_file,
)
from tests.harness import LoopThread, eventually, pdf_bytes, running_engine

STABLE = 0.1
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"

HEADER = (
    "H|~^\\&|CR0001.HPR||LABO77~Laboratoire des Tilleuls||ORU|||MC~Medcourier||P|H2.2~C"
    "|202403141012"
)
PATIENT = (
    "P|1|IPP-9||V-12|Lefèvre-Dupré~Zoé~Hélène|Müller|19520214|F||"
    "12 allée des Tilleuls~Bât. C~Melun~~77000||0160000000"
)
REPORT = [
    "OBR|1||~R-1|11506-3~Note de suivi~L||||||||||||||||||202403141012|||F|||||||10003123456",
    "OBX|1|TX|11506-3~Note de suivi~L||Échographie abdominale : foie normal.||||||F",
    "OBX|2|TX|11506-3~Note de suivi~L||||||||F",
    "OBX|3|TX|11506-3~Note de suivi~L||Conclusion \\XE0\\ revoir dans 6 mois \\F\\ Dr Noël.||||||F",
]
TEXT = "Échographie abdominale : foie normal.\n\nConclusion à revoir dans 6 mois | Dr Noël.\n"


def hprim_file(*records: str, encoding: str = "latin-1", newline: str = "\r\n") -> bytes:
    return "".join(record + newline for record in records).encode(encoding)


def text_file() -> bytes:
    return hprim_file(HEADER, PATIENT, *REPORT, "L|1||1|7")


def fic_records(name: str = "CR0001.pdf", code: str = "11506-3") -> list[str]:
    return [
        f"OBR|1||~R-2|{code}~Compte rendu~L||||||||||||||||||202403141012|||F",
        f"OBX|1|FIC|{code}~Compte rendu~L||LABO~{name}~PDF||||||F",
    ]


def no_companion(name: str) -> bytes:
    raise AssertionError(f"no companion expected, asked for {name}")


def interpreted(message: InboundMessage) -> MessageDocuments:
    result = medcourier_interpret_message(message)
    assert isinstance(result, MessageDocuments)
    return result


# --------------------------------------------------------------------------- (a) interpreter


def test_a_text_report_becomes_one_utf8_text_document_with_its_patient() -> None:
    (message,) = read_hprim_file(text_file(), channel="inbox", companion=no_companion)

    assert message.message_type == "HPRIM^ORU"
    assert (message.sending_application, message.sending_facility) == ("LABO77", "LABO77")
    assert message.charset == "iso-8859-1"
    meaning = interpreted(message)

    assert meaning.patient == {
        "resourceType": "Patient",
        "identifier": [
            {
                "system": "urn:medcourier:authority:LABO77",
                "value": "IPP-9",
                "type": {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PI"}
                    ]
                },
                "assigner": {"display": "LABO77"},
            }
        ],
        "name": [
            {"use": "usual", "family": "Lefèvre-Dupré", "given": ["Zoé", "Hélène"]},
            {"use": "official", "family": "Müller", "given": ["Zoé", "Hélène"]},
        ],
        "birthDate": "1952-02-14",
        "gender": "female",
        "address": [
            {"line": ["12 allée des Tilleuls", "Bât. C"], "city": "Melun", "postalCode": "77000"}
        ],
        "telecom": [{"system": "phone", "value": "0160000000"}],
        "managingOrganization": {"reference": "Organization/LABO77"},
    }
    assert meaning.organization == "Organization/LABO77"
    assert meaning.event == "HPRIM^ORU"
    (document,) = meaning.documents
    assert document.payload == TEXT.encode("utf-8")
    assert document.content_type == "application/txt"
    assert document.document_type == "11506-3"
    assert document.title == "Note de suivi"
    assert document.sender_identifier == "10003123456"  # OBR-33, an RPPS
    assert document.sender_application == "LABO77"
    assert document.channel == "inbox"


def test_comment_layout_and_utf8_files_read_the_same() -> None:
    records = [
        HEADER,
        PATIENT,
        REPORT[0],
        "OBX|1|TX|11506-3~Note de suivi~L||||||||F",
        "C|1|L|Échographie abdominale : foie normal.",
        "C|2|L|",
        "C|3|L|Conclusion à revoir dans 6 mois \\F\\ Dr Noël.",
        "L|1||1|8",
    ]
    data = b"\xef\xbb\xbf" + hprim_file(*records, encoding="utf-8", newline="\n")

    (message,) = read_hprim_file(data, channel="c", companion=no_companion)

    assert message.charset == "utf-8"  # the byte order mark outranks the default
    assert interpreted(message).documents[0].payload == TEXT.encode("utf-8")


def test_the_sender_authority_is_the_hl7_one_unless_an_option_names_the_ipp_system() -> None:
    header = HEADER.replace("LABO77~", "CH Saint-Éloi~")
    (message,) = read_hprim_file(
        hprim_file(header, PATIENT, *REPORT), channel="c", companion=no_companion
    )
    meaning = interpreted(message)
    identifier = meaning.patient["identifier"][0]
    assert identifier["system"] == "urn:medcourier:authority:CH%20Saint-%C3%89loi"
    assert meaning.organization == "Organization/CH-Saint--loi"  # hl7v2's organization_of

    (message,) = read_hprim_file(
        hprim_file(header, PATIENT, *REPORT),
        channel="c",
        companion=no_companion,
        ipp_system="urn:oid:1.2.250.1.999.1",
    )
    assert interpreted(message).patient["identifier"][0]["system"] == "urn:oid:1.2.250.1.999.1"


def test_companion_files_travel_on_the_message_and_become_documents() -> None:
    asked: list[str] = []
    text_companion = "Résultat joint.\n".encode("latin-1")

    def companion(name: str) -> bytes:
        asked.append(name)
        return PDF if name.endswith(".pdf") else text_companion

    data = hprim_file(
        HEADER,
        PATIENT,
        *fic_records(),
        "OBX|2|FIC|11502-2~CR biologie~L||GALAXIE~AL213202.j1~TXT||||||F",
        "L|1||1|6",
    )
    (message,) = read_hprim_file(data, channel="c", companion=companion)

    assert asked == ["CR0001.pdf", "AL213202.j1"]
    assert dict(message.companions) == {"CR0001.pdf": PDF, "AL213202.j1": text_companion}
    assert "PDF-1.4" not in repr(message)  # megabytes stay out of logs and reprs
    pdf, txt = interpreted(message).documents
    assert (pdf.payload, pdf.content_type, pdf.title) == (PDF, "application/pdf", "Compte rendu")
    assert pdf.document_type == "11506-3"
    # a text companion comes in the file's character set and goes on in UTF-8
    assert (txt.payload, txt.content_type) == ("Résultat joint.\n".encode(), "application/txt")
    assert (txt.document_type, txt.title) == ("11502-2", "CR biologie")


def test_a_code_without_the_loinc_check_digit_is_not_taken_for_loinc() -> None:
    data = hprim_file(HEADER, PATIENT, *fic_records(code="11506-4"))
    (message,) = read_hprim_file(data, channel="c", companion=lambda _: PDF)
    assert interpreted(message).documents[0].document_type == "11488-4"  # the engine default


def test_a_file_with_several_patients_becomes_one_message_per_patient() -> None:
    second = "P|2|IPP-10||V-13|Martin~Paul||19800101|M"
    data = hprim_file(HEADER, "C|1|L|lot du jour", PATIENT, *REPORT, second, *fic_records(), "L|1")

    first, other = read_hprim_file(data, channel="c", companion=lambda _: PDF)

    assert first.text.startswith("H|~^\\&|CR0001.HPR|")
    assert "IPP-10" not in first.text and "IPP-9" not in other.text
    assert first.text.endswith("L|1\r") and other.text.endswith("L|1\r")
    assert "C|1|L|lot du jour" in other.text  # the header's comments go with every part
    assert first.control_id != other.control_id
    assert (first.source, other.source) == (
        "patient 1 (P-3 'IPP-9', line 3)",
        "patient 2 (P-3 'IPP-10', line 8)",
    )
    assert first.companions == () and dict(other.companions) == {"CR0001.pdf": PDF}
    assert interpreted(first).documents[0].payload == TEXT.encode()
    paul = interpreted(other).patient
    assert (paul["name"], paul["gender"]) == ([{"family": "Martin", "given": ["Paul"]}], "male")

    # the same patient again, in a file with another date: the same control id
    again = hprim_file(HEADER.replace("202403141012", "202403151200"), PATIENT, *REPORT, "L|1")
    assert read_hprim_file(again, channel="c", companion=no_companion)[0].control_id == (
        first.control_id
    )


@pytest.mark.parametrize(
    ("records", "code", "reason"),
    [
        ([HEADER, "L|1||0|2"], "no_patient", "no P record"),
        ([HEADER, *REPORT], "no_patient", "line 2: OBR record before any P record"),
        (["OBX|1|TX|x"], "bad_hprim", "no H line"),
    ],
)
def test_files_that_cannot_be_split_say_why(records: list[str], code: str, reason: str) -> None:
    with pytest.raises(HprimFileError, match=reason) as caught:
        read_hprim_file(hprim_file(*records), channel="c", companion=no_companion)
    assert caught.value.code == code


def _message(*records: str, **fields: Any) -> HprimInboundMessage:
    return HprimInboundMessage(
        text="\r".join(records) + "\r",
        channel="c",
        message_type="HPRIM^ORU",
        charset="iso-8859-1",
        **fields,
    )


@pytest.mark.parametrize(
    ("records", "error", "location"),
    [
        ([HEADER, PATIENT, "OBR|1||~R|1-8~x~L", "OBX|1|NM|1-8~x~L||12"], "no document", "P^1"),
        (
            [HEADER, PATIENT, *fic_records()],
            "'CR0001.pdf' named by this FIC OBX did not",
            "OBX^1^6",
        ),
        ([HEADER, PATIENT.replace("IPP-9", ""), *REPORT], "P-3", "P^1^3"),
        ([HEADER, PATIENT.replace("19520214", "19521314"), *REPORT], "P-8", "P^1^8"),
        ([HEADER, PATIENT, *REPORT, PATIENT.replace("P|1", "P|2"), *REPORT], "2 patients", "P^2"),
        ([HEADER.replace("LABO77~", "~"), PATIENT, *REPORT], "set the channel's", "H^1^5"),
        (
            [HEADER, PATIENT, "OBR|1||~R|1-8~x~L", "OBX|1|FIC|1-8~x~L||A~x.rtf~RTF"],
            "type RTF, which is not accepted (accepted: JPG, PDF, PNG, TXT)",
            "OBX^1^6",
        ),
    ],
)
def test_wrong_content_is_an_inbound_error_with_its_location(
    records: list[str], error: str, location: str
) -> None:
    companions = (("x.rtf", b"{\\rtf1}"),)
    with pytest.raises(InboundError, match=re.escape(error)) as exc:
        medcourier_interpret_message(_message(*records, companions=companions))
    assert exc.value.location == location
    assert not isinstance(exc.value, InboundRejected)


def test_other_hprim_contexts_are_rejected_and_other_messages_left_alone() -> None:
    adm = _message(HEADER.replace("|ORU|", "|ADM|"), PATIENT)
    with pytest.raises(InboundRejected, match="HPRIM ADM files are not read"):
        medcourier_interpret_message(adm)
    assert medcourier_interpret_message(InboundMessage("MSH|...", "c", message_type="ORU^R01")) is (
        None
    )
    # a plain InboundMessage (another channel) is read as UTF-8 text
    plain = InboundMessage("\r".join([HEADER, PATIENT, *REPORT]), "c", message_type="HPRIM")
    assert interpreted(plain).documents[0].payload.startswith("Échographie".encode())


def test_looks_like_hprim_reads_only_the_first_line() -> None:
    assert looks_like_hprim(b"\xef\xbb\xbf\r\nH|~^\\&|X.HPR")
    assert looks_like_hprim(b"H|\\^&~|")
    assert not looks_like_hprim(PDF)
    assert not looks_like_hprim(b"Hello|world")
    assert not looks_like_hprim(b"")


def _document(content_type: str, payload: bytes) -> Document:
    return Document(
        transaction_id="018f2c3a4b5c1a2b3c4d",
        created_at=datetime(2024, 3, 14, 9, 12, tzinfo=UTC),
        content_type=content_type,
        document_type="18748-4",
        title="Compte rendu d'échographie",
        payload=payload,
        patient={
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-77"}],
            "name": [
                {"use": "usual", "family": "Lefèvre", "given": ["Zoé"]},
                {"use": "official", "family": "Müller", "given": ["Zoé"]},
            ],
            "birthDate": "1952-02-14",
            "gender": "female",
        },
        sender_identifier="10003123456",
    )


@pytest.mark.parametrize("mode", ["fic", "text"])
def test_what_our_writer_writes_reads_back(mode: str) -> None:
    """Writer -> file -> interpreter gives back the document, its type, title and author."""
    text = "Compte rendu : « normal ».\nÀ revoir.\n".encode()
    payload, content_type = (PDF, "application/pdf") if mode == "fic" else (text, "text/plain")
    options = HprimOptions(receiver_id="MC", sender_id="HOSPA", document_mode=mode)
    rendered = render(_document(content_type, payload), options)
    companions = dict(rendered.companions)

    (message,) = read_hprim_file(
        rendered.data, channel="c", companion=lambda name: companions[name]
    )
    meaning = interpreted(message)

    (document,) = meaning.documents
    assert document.payload == payload
    assert (document.document_type, document.title) == ("18748-4", "Compte rendu d'échographie")
    assert document.sender_identifier == "10003123456"
    assert meaning.patient["identifier"][0]["value"] == "IPP-77"
    assert meaning.patient["name"][0] == {"use": "usual", "family": "Lefèvre", "given": ["Zoé"]}
    assert meaning.organization == "Organization/HOSPA"


# --------------------------------------------------------------------------- drop folder


class FakeSink:
    """Records what it receives; answers chosen control ids with chosen results."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.documents: list[InboundDocument] = []
        self.answers: dict[str, InboundResult] = {}

    async def hl7_message(self, message: InboundMessage) -> InboundResult:
        self.messages.append(message)
        return self.answers.get(message.control_id, InboundResult(Verdict.ACCEPT))

    async def document(self, document: InboundDocument) -> InboundResult:
        self.documents.append(document)
        return InboundResult(Verdict.ACCEPT)

    def hprim(self) -> list[HprimInboundMessage]:
        """The messages received, which must all be HPRIM ones."""
        assert all(isinstance(m, HprimInboundMessage) for m in self.messages)
        return [m for m in self.messages if isinstance(m, HprimInboundMessage)]


def make(tmp_path: Path, fmt: str = "hprim", **overrides: Any) -> tuple[FileDropWatcher, FakeSink]:
    settings: dict[str, Any] = {
        "path": tmp_path / "drop",
        "format": fmt,
        "stable_for": STABLE,
        "poll_interval": 0.05,
        "sidecar_timeout": 0.5,
    }
    settings.update(overrides)
    sink = FakeSink()
    watcher = FileDropWatcher(FileDropOptions(**settings), sink, "lab")
    watcher.folder.mkdir(parents=True, exist_ok=True)
    return watcher, sink


def drop(watcher: FileDropWatcher, name: str, data: bytes) -> None:
    (watcher.folder / name).write_bytes(data)


async def settle(watcher: FileDropWatcher, passes: int = 2) -> None:
    for index in range(passes):
        if index:
            await asyncio.sleep(STABLE * 1.5)
        await watcher.scan_once()


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def error_text(watcher: FileDropWatcher, name: str) -> str:
    return (watcher.error_dir / f"{name}.error.txt").read_text()


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(scenario())


def fic_file(name: str = "CR0001.pdf") -> bytes:
    return hprim_file(HEADER, PATIENT, *fic_records(name), "L|1||1|5")


def test_an_hprim_file_and_its_companion_are_taken_together(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    drop(watcher, "CR0001.pdf", PDF)  # companions first, as our writer delivers them
    drop(watcher, "CR0001.HPR", fic_file())

    run(lambda: settle(watcher))

    (message,) = sink.messages
    assert isinstance(message, HprimInboundMessage)
    assert dict(message.companions) == {"CR0001.pdf": PDF}
    assert names(watcher.processed_dir) == ["CR0001.HPR", "CR0001.pdf"]
    assert names(watcher.folder) == [".work", "error", "processed"]
    assert watcher.counters.messages_accepted == 1
    assert watcher.counters.files_processed == 1


def test_an_hprim_file_waits_for_a_late_companion(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, sidecar_timeout=30)

    async def scenario() -> None:
        drop(watcher, "CR0001.HPR", fic_file())
        await settle(watcher)
        assert sink.messages == []  # complete, but what it names is not there yet
        drop(watcher, "cr0001.PDF", PDF)  # another case: DOS-era names on a share
        await settle(watcher)

    run(scenario)
    assert dict(sink.hprim()[0].companions) == {"CR0001.pdf": PDF}
    assert names(watcher.processed_dir) == ["CR0001.HPR", "cr0001.PDF"]


def test_a_companion_that_never_comes_sends_the_file_to_error(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)

    async def scenario() -> None:
        drop(watcher, "CR0001.HPR", fic_file())
        await settle(watcher)
        await asyncio.sleep(0.6)
        await watcher.scan_once()

    run(scenario)
    assert sink.messages == []
    assert names(watcher.error_dir) == ["CR0001.HPR", "CR0001.HPR.error.txt"]
    report = error_text(watcher, "CR0001.HPR")
    assert "reason code: missing_companion" in report
    assert "'CR0001.pdf' that the HPRIM file names (FIC OBX) did not arrive" in report


def test_in_hprim_format_a_file_no_hprim_file_names_goes_to_error(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)

    async def scenario() -> None:
        drop(watcher, "lost.pdf", PDF)
        await settle(watcher)
        assert names(watcher.folder) == [".work", "error", "lost.pdf", "processed"]  # waits
        await asyncio.sleep(0.6)
        await watcher.scan_once()

    run(scenario)
    assert sink.messages == []
    assert "reason code: not_hprim" in error_text(watcher, "lost.pdf")


def test_auto_takes_hpr_names_as_hprim_and_their_companions_are_no_documents(
    tmp_path: Path,
) -> None:
    watcher, sink = make(tmp_path, "auto", sidecar_timeout=30)
    drop(watcher, "CR0001.pdf", PDF)
    drop(watcher, "cr0001.hpr", fic_file())
    drop(watcher, "other.pdf", PDF)
    drop(watcher, "other.pdf.json", json.dumps({"patient": "Patient/p1"}).encode())

    run(lambda: settle(watcher))

    assert [m.message_type for m in sink.messages] == ["HPRIM^ORU"]
    assert [d.patient_reference for d in sink.documents] == ["Patient/p1"]
    assert names(watcher.processed_dir) == [
        "CR0001.pdf",
        "cr0001.hpr",
        "other.pdf",
        "other.pdf.json",
    ]


def test_a_pattern_on_hprim_names_still_takes_the_companions(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, pattern="*.HPR")
    drop(watcher, "CR0001.pdf", PDF)
    drop(watcher, "CR0001.HPR", fic_file())

    run(lambda: settle(watcher))

    assert len(sink.messages) == 1
    assert names(watcher.processed_dir) == ["CR0001.HPR", "CR0001.pdf"]


def test_ok_file_mode_takes_the_file_its_ok_and_its_companion(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, ok_file=True)

    async def scenario() -> None:
        drop(watcher, "CR0001.pdf", PDF)
        drop(watcher, "CR0001.HPR", fic_file())
        await watcher.scan_once()
        assert sink.messages == []
        drop(watcher, "CR0001.HPR.ok", b"")
        await watcher.scan_once()

    run(scenario)
    assert len(sink.messages) == 1
    assert names(watcher.processed_dir) == ["CR0001.HPR", "CR0001.HPR.ok", "CR0001.pdf"]


def test_a_refused_patient_is_named_in_the_error_report(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, stable_for=0)
    second = "P|2|IPP-10||V-13|Martin~Paul||19800101|M"
    data = hprim_file(HEADER, PATIENT, *REPORT, second, *fic_records(), "L|1||2|12")
    drop(watcher, "CR0001.pdf", PDF)
    drop(watcher, "CR0001.HPR", data)
    parts = read_hprim_file(data, channel="lab", companion=lambda _: PDF)
    sink.answers[parts[1].control_id] = InboundResult(Verdict.ERROR, "unknown LOINC", "OBX^1^4")

    run(lambda: settle(watcher, 1))

    assert [m.control_id for m in sink.messages] == [p.control_id for p in parts]
    assert sink.messages == list(parts)
    report = error_text(watcher, "CR0001.HPR")
    assert "reason code: partially_refused" in report
    assert "1 of 2 patient(s) refused by the engine:" in report
    assert "- patient 2 (P-3 'IPP-10', line 7): error: unknown LOINC [at OBX^1^4]" in report
    assert "accepted and kept, do not send them again: patient(s) 1" in report
    assert names(watcher.error_dir) == ["CR0001.HPR", "CR0001.HPR.error.txt", "CR0001.pdf"]


def test_a_broken_file_goes_to_error_with_the_readers_reason(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, stable_for=0)
    drop(watcher, "bad.hpr", hprim_file(HEADER, *REPORT))

    run(watcher.scan_once)

    assert sink.messages == []
    assert "OBR record before any P record" in error_text(watcher, "bad.hpr")


def test_the_charset_is_the_configured_one_or_a_byte_order_mark(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, stable_for=0, default_charset="windows-1252")
    drop(watcher, "a.hpr", text_file().replace(b"Dr No", "Dr \u2019 No".encode("cp1252")))
    drop(watcher, "b.hpr", b"\xef\xbb\xbf" + hprim_file(HEADER, PATIENT, *REPORT, encoding="utf-8"))

    run(watcher.scan_once)

    assert [m.charset for m in sink.hprim()] == ["windows-1252", "utf-8"]
    assert "Dr \u2019 Noël" in sink.messages[0].text
    assert "Zoé" in sink.messages[1].text


def test_a_claim_cut_short_by_a_crash_is_finished(tmp_path: Path) -> None:
    """The claim record names the companion: the restarted watcher takes it before submitting."""
    watcher, sink = make(tmp_path)
    unit = watcher.work_dir / "00000000000000000001-abcdef"
    unit.mkdir(parents=True)
    (unit / "CR0001.HPR").write_bytes(fic_file("A.pdf"))
    (unit / ".claim.json").write_text(json.dumps({"main": "CR0001.HPR", "companions": ["A.pdf"]}))
    drop(watcher, "A.pdf", PDF)  # the crash came before its rename

    run(watcher.scan_once)

    assert dict(sink.hprim()[0].companions) == {"A.pdf": PDF}
    assert names(watcher.processed_dir) == ["A.pdf", "CR0001.HPR"]
    assert list(watcher.work_dir.iterdir()) == []


def test_logs_never_carry_hprim_file_names(tmp_path: Path) -> None:
    watcher, _ = make(tmp_path, stable_for=0)
    drop(watcher, "DUPONT_Jean.pdf", PDF)
    drop(watcher, "DUPONT_Jean.HPR", fic_file("DUPONT_Jean.pdf"))

    with capture_logs() as events:
        run(watcher.scan_once)

    assert events and "DUPONT" not in repr(events)
    assert names(watcher.processed_dir) == ["DUPONT_Jean.HPR", "DUPONT_Jean.pdf"]


def test_hl7_files_keep_utf8_as_their_default_charset(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, "auto", stable_for=0)
    drop(watcher, "a.hl7", "MSH|^~\\&|A|B|C|D|20250101||ADT^A01|X1|P|2.5\rPID|1||1||Zoé\r".encode())

    run(watcher.scan_once)

    assert "Zoé" in sink.messages[0].text


# --------------------------------------------------------------------------- whole engine


def _inbox(tmp: Path, fmt: str = "hprim") -> dict[str, object]:
    return {
        "name": "inbox-hprim",
        "channel": "filedrop",
        "path": str(tmp / "inbox-hprim"),
        "format": fmt,
        "poll_interval": 0.1,
        "stable_for": 0.1,
        "sidecar_timeout": 5,
    }


def _obx5(message: str) -> list[str]:
    obx = next(seg for seg in message.split("\r") if seg.startswith("OBX|"))
    return obx.split("|")[5].split("^")


def test_a_dropped_hprim_file_reaches_the_ehr_with_its_pdf(lt: LoopThread, tmp_path: Path) -> None:
    payload = pdf_bytes(6000)
    options = HprimOptions(receiver_id="MC", sender_id="HOSPA", sender_name="Hôpital A")
    rendered = render(_document("application/pdf", payload), options)
    ((companion, companion_bytes),) = rendered.companions
    with running_engine(
        lt, tmp_path, inbound=[_inbox(tmp_path, "auto")], extra_plugins=(interpret,)
    ) as eng:
        inbox = tmp_path / "inbox-hprim"
        (inbox / companion).write_bytes(companion_bytes)
        (inbox / rendered.filename_hint).write_bytes(rendered.data)

        eventually(lambda: len(eng.ehr.received) == 1, 20, "delivery to the EHR")
        message = eng.ehr.received[0].decode()
        obx5 = _obx5(message)
        assert obx5[1:4] == ["AP", "PDF", "Base64"]
        assert base64.b64decode(obx5[4]) == payload
        pid = next(seg for seg in message.split("\r") if seg.startswith("PID|"))
        assert "IPP-77" in pid
        eventually(
            lambda: names(inbox / "processed") == sorted([companion, rendered.filename_hint]),
            10,
            "both files in processed/",
        )
        found = eng.engine.store.sync.find_patient([("urn:medcourier:authority:HOSPA", "IPP-77")])
        assert found is not None
        assert found["managingOrganization"] == {"reference": "Organization/HOSPA"}
        assert names(inbox) == [".work", "error", "processed"]


def test_an_hprim_text_report_reaches_the_ehr_for_a_known_patient(
    lt: LoopThread, tmp_path: Path
) -> None:
    """The patient exists (created by the API with the sender's authority): it is reused."""
    with running_engine(
        lt, tmp_path, inbound=[_inbox(tmp_path)], extra_plugins=(interpret,)
    ) as eng:
        pid = eng.patient(
            identifier=[{"system": "urn:medcourier:authority:LABO77", "value": "IPP-9"}],
            name=[{"family": "Connue", "given": ["Déjà"]}],
        )
        (tmp_path / "inbox-hprim" / "CR0001.HPR").write_bytes(text_file())

        eventually(lambda: len(eng.ehr.received) == 1, 20, "delivery to the EHR")
        obx5 = _obx5(eng.ehr.received[0].decode())
        assert base64.b64decode(obx5[4]) == TEXT.encode()
        assert eng.document_count() == 1
        patient = eng.engine.store.sync.get_patient(pid)
        assert patient is not None and patient["name"][0]["family"] == "Connue"  # not rewritten


def test_a_broken_hprim_file_goes_to_error_with_a_reason(lt: LoopThread, tmp_path: Path) -> None:
    with running_engine(
        lt, tmp_path, inbound=[_inbox(tmp_path)], extra_plugins=(interpret,)
    ) as eng:
        inbox = tmp_path / "inbox-hprim"
        (inbox / "NOPAT.HPR").write_bytes(hprim_file(HEADER, "L|1||0|2"))
        reason = inbox / "error" / "NOPAT.HPR.error.txt"
        eventually(reason.exists, 20, "error file")
        text = reason.read_text()
        assert "reason code: no_patient" in text
        assert "the HPRIM file has no P record (patient)" in text
        assert eng.document_count() == 0


def test_duplicates_are_recognised_patient_by_patient(lt: LoopThread, tmp_path: Path) -> None:
    """The same file dropped twice is delivered once (the control id is its content digest)."""
    with running_engine(
        lt, tmp_path, inbound=[_inbox(tmp_path)], extra_plugins=(interpret,)
    ) as eng:
        inbox = tmp_path / "inbox-hprim"
        (inbox / "CR0001.HPR").write_bytes(text_file())
        eventually(lambda: (inbox / "processed" / "CR0001.HPR").exists(), 20, "first file")
        (inbox / "CR0002.HPR").write_bytes(text_file())
        eventually(lambda: (inbox / "processed" / "CR0002.HPR").exists(), 20, "second file")
        eventually(lambda: len(eng.ehr.received) == 1, 20, "delivery")
        assert eng.document_count() == 1


def test_the_message_subclass_survives_replace() -> None:
    """Engines and tests may copy messages with dataclasses.replace: the companions stay."""
    (message,) = read_hprim_file(fic_file(), channel="c", companion=lambda _: PDF)
    copied = replace(message, peer="x")
    assert isinstance(copied, HprimInboundMessage) and copied.companions == message.companions
