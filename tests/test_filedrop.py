"""The drop-folder channel on real files: completeness, formats, outcomes and crash recovery.

The sink is a fake (it is the far side of the contract); the filesystem is real. Crashes are
simulated by leaving the folders in the state a dead process would leave them in, or by a
watcher subclass that stops at the worst moment.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

import medcourier.channels.filedrop.plugin as filedrop_plugin
from medcourier.channels.filedrop.watcher import (
    FileDropOptions,
    FileDropWatcher,
    FolderBusyError,
)
from medcourier.engine.inbound import (
    InboundDocument,
    InboundMessage,
    InboundResult,
    PatientIdentifier,
    SinkUnavailable,
    Verdict,
)
from medcourier.engine.plugins import load_plugins

STABLE = 0.1
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


class FakeSink:
    """Records what it receives; refuses chosen control ids; raises while ``failures`` > 0."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.documents: list[InboundDocument] = []
        self.refuse: dict[str, InboundResult] = {}
        self.document_result = InboundResult(Verdict.ACCEPT)
        self.failures = 0

    def _maybe_fail(self) -> None:
        if self.failures:
            self.failures -= 1
            raise SinkUnavailable("engine down")

    async def hl7_message(self, message: InboundMessage) -> InboundResult:
        self._maybe_fail()
        self.messages.append(message)
        return self.refuse.get(message.control_id, InboundResult(Verdict.ACCEPT))

    async def document(self, document: InboundDocument) -> InboundResult:
        self._maybe_fail()
        self.documents.append(document)
        return self.document_result


def hl7(control_id: str, *, charset: str = "", name: str = "DOE^JOHN") -> list[str]:
    """The segments of a small ADT^A01 (MSH-18 = ``charset``)."""
    return [
        f"MSH|^~\\&|LAB|HOSP|MEDC|DEST|20250101120000||ADT^A01^ADT_A01|{control_id}|P|2.5"
        f"|||||FRA|{charset}",
        "EVN|A01|20250101120000",
        f"PID|1||123^^^HOSP^PI||{name}",
    ]


def hl7_file(*messages: list[str], newline: str = "\r") -> bytes:
    return "".join(segment + newline for message in messages for segment in message).encode()


def make(tmp_path: Path, fmt: str = "hl7v2", **overrides: Any) -> tuple[FileDropWatcher, FakeSink]:
    settings: dict[str, Any] = {
        "path": tmp_path / "drop",
        "format": fmt,
        "stable_for": STABLE,
        "poll_interval": 0.05,
    }
    settings.update(overrides)
    sink = FakeSink()
    return FileDropWatcher(FileDropOptions(**settings), sink, "lab"), sink


def drop(watcher: FileDropWatcher, name: str, data: bytes) -> Path:
    watcher.folder.mkdir(parents=True, exist_ok=True)
    path = watcher.folder / name
    path.write_bytes(data)
    return path


async def settle(watcher: FileDropWatcher, passes: int = 2) -> None:
    """Enough passes, ``stable_for`` apart, for a file that no longer changes to be taken."""
    for index in range(passes):
        if index:
            await asyncio.sleep(STABLE * 1.5)
        await watcher.scan_once()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def work_files(watcher: FileDropWatcher) -> list[str]:
    return sorted(p.name for p in watcher.work_dir.rglob("*") if p.is_file() and p.name[0] != ".")


def error_text(watcher: FileDropWatcher, name: str) -> str:
    return (watcher.error_dir / f"{name}.error.txt").read_text("utf-8")


# --------------------------------------------------------------------------- HL7 v2 files


@pytest.mark.parametrize(
    ("newline", "batch"),
    [("\n", False), ("\r\n", False), ("\r", False), ("\r\n", True)],
    ids=["lf", "crlf", "cr", "batch"],
)
def test_multi_message_file_submits_each_message_in_order(
    tmp_path: Path, newline: str, batch: bool
) -> None:
    watcher, sink = make(tmp_path)
    messages = [hl7("M1"), hl7("M2"), hl7("M3")]
    if batch:
        messages = [["FHS|^~\\&|LAB", "BHS|^~\\&|LAB", ""], *messages, ["BTS|3", "FTS|1"]]
    drop(watcher, "adt.hl7", hl7_file(*messages, newline=newline))

    asyncio.run(settle(watcher))

    assert [m.control_id for m in sink.messages] == ["M1", "M2", "M3"]
    first = sink.messages[0]
    assert first.text == "\r".join(hl7("M1")) + "\r"
    assert (first.channel, first.sending_application, first.sending_facility) == (
        "lab",
        "LAB",
        "HOSP",
    )
    assert first.message_type == "ADT^A01"
    assert names(watcher.processed_dir) == ["adt.hl7"]
    assert names(watcher.folder) == [".work", "error", "processed"]
    assert work_files(watcher) == []
    assert watcher.counters.files_processed == 1
    assert watcher.counters.messages_accepted == 3


def test_each_message_is_decoded_with_its_own_msh18(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    latin = "\r".join(hl7("L1", charset="8859/1", name="MÜLLER^Zoé")).encode("latin-1")
    utf8 = "\r".join(hl7("U1", charset="UNICODE UTF-8", name="GARÇON^Léa")).encode("utf-8")
    plain = "\r".join(hl7("D1", name="ÉLODIE^Anaïs")).encode("utf-8")  # default_charset
    drop(watcher, "mixed.hl7", latin + b"\r" + utf8 + b"\r" + plain + b"\r")

    asyncio.run(settle(watcher))

    assert [m.control_id for m in sink.messages] == ["L1", "U1", "D1"]
    assert "MÜLLER^Zoé" in sink.messages[0].text
    assert "GARÇON^Léa" in sink.messages[1].text
    assert "ÉLODIE^Anaïs" in sink.messages[2].text


def test_bytes_invalid_in_the_declared_charset_go_to_error(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    drop(watcher, "bad.hl7", "\r".join(hl7("A1", charset="ASCII", name="ZOË")).encode("latin-1"))

    asyncio.run(settle(watcher))

    assert sink.messages == []
    assert names(watcher.error_dir) == ["bad.hl7", "bad.hl7.error.txt"]
    assert "message 1" in error_text(watcher, "bad.hl7")
    assert "not valid ascii" in error_text(watcher, "bad.hl7")


def test_a_file_still_being_written_is_not_taken_until_stable(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    path = drop(watcher, "slow.hl7", hl7_file(hl7("S1"))[:40])

    async def scenario() -> None:
        await watcher.scan_once()
        with path.open("ab") as handle:  # the writer is still at it
            handle.write(hl7_file(hl7("S1"))[40:])
        await asyncio.sleep(STABLE * 1.5)
        await watcher.scan_once()  # the size changed since the last look: not yet
        assert sink.messages == []
        assert path.exists()
        await asyncio.sleep(STABLE * 1.5)
        await watcher.scan_once()

    asyncio.run(scenario())
    assert [m.control_id for m in sink.messages] == ["S1"]
    assert names(watcher.processed_dir) == ["slow.hl7"]


def test_ok_file_mode_waits_for_the_ok_marker(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, ok_file=True, stable_for=60)
    drop(watcher, "adt.hl7", hl7_file(hl7("K1")))

    async def scenario() -> None:
        await settle(watcher)
        assert sink.messages == []
        drop(watcher, "adt.hl7.ok", b"")
        await watcher.scan_once()  # no stability wait in this mode

    asyncio.run(scenario())
    assert [m.control_id for m in sink.messages] == ["K1"]
    assert names(watcher.processed_dir) == ["adt.hl7", "adt.hl7.ok"]


def test_pattern_and_scratch_names_are_not_taken(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, pattern="*.hl7")
    for name in ("a.txt", ".hidden.hl7", "b.hl7.tmp", "c.hl7.part", "d.hl7.json", "e.hl7.ok"):
        drop(watcher, name, hl7_file(hl7("X")))
    drop(watcher, "f.hl7", hl7_file(hl7("F1")))

    asyncio.run(settle(watcher))

    assert [m.control_id for m in sink.messages] == ["F1"]
    assert "a.txt" in names(watcher.folder)


def test_a_file_without_msh_goes_to_error(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    drop(watcher, "notes.hl7", b"hello\nworld\n")

    asyncio.run(settle(watcher))

    assert sink.messages == []
    assert names(watcher.error_dir) == ["notes.hl7", "notes.hl7.error.txt"]
    assert "no HL7 message found" in error_text(watcher, "notes.hl7")


def test_refusal_of_message_2_of_3_names_it_and_the_accepted_ones(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    sink.refuse["M2"] = InboundResult(Verdict.ERROR, "unknown patient", "PID^1^3")
    drop(watcher, "adt.hl7", hl7_file(hl7("M1"), hl7("M2"), hl7("M3")))

    asyncio.run(settle(watcher))

    assert [m.control_id for m in sink.messages] == ["M1", "M2", "M3"]
    assert names(watcher.error_dir) == ["adt.hl7", "adt.hl7.error.txt"]
    report = error_text(watcher, "adt.hl7")
    assert "message 2 (MSH-10 'M2', ADT^A01): error: unknown patient [at PID^1^3]" in report
    assert "do not send them again: message(s) 1, 3" in report
    assert "reason code: partially_refused" in report
    assert "message 1 (" not in report and "message 3 (" not in report
    assert (watcher.counters.messages_accepted, watcher.counters.messages_refused) == (2, 1)


def test_an_oversize_file_goes_to_error_unread(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, max_file_bytes=100)
    drop(watcher, "big.hl7", hl7_file(hl7("B1"), hl7("B2")))

    asyncio.run(settle(watcher))

    assert sink.messages == []
    assert names(watcher.error_dir) == ["big.hl7", "big.hl7.error.txt"]
    assert "more than max_file_bytes (100)" in error_text(watcher, "big.hl7")


def test_a_name_collision_in_processed_keeps_both_files(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    assert sink.messages == []

    async def scenario() -> None:
        drop(watcher, "adt.hl7", hl7_file(hl7("C1")))
        await settle(watcher)
        drop(watcher, "adt.hl7", hl7_file(hl7("C2")))
        await settle(watcher)

    asyncio.run(scenario())
    kept = names(watcher.processed_dir)
    assert len(kept) == 2 and "adt.hl7" in kept
    assert kept[1].startswith("adt.") and kept[1].endswith(".hl7")  # adt.<UTC stamp>.hl7
    contents = {(watcher.processed_dir / name).read_bytes() for name in kept}
    assert contents == {hl7_file(hl7("C1")), hl7_file(hl7("C2"))}


# --------------------------------------------------------------------------- documents


def test_document_with_sidecar_becomes_one_inbound_document(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, "document")
    sidecar = {
        "patient_identifiers": [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "1234"}],
        "encounter": "Encounter/e-42",
        "type": "34133-9",
        "title": "Compte rendu",
        "sender": "10001234567",
        "sender_application": "RIS",
    }
    drop(watcher, "cr.pdf", PDF)
    drop(watcher, "cr.pdf.json", json.dumps(sidecar).encode())

    asyncio.run(settle(watcher))

    [document] = sink.documents
    assert document.channel == "lab"
    assert document.payload == PDF
    assert document.content_type == "application/pdf"
    assert document.patient_reference is None
    assert document.patient_identifiers == (
        PatientIdentifier("urn:oid:1.2.250.1.213.1.4.8", "1234"),
    )
    assert document.encounter_reference == "Encounter/e-42"
    assert (document.document_type, document.title) == ("34133-9", "Compte rendu")
    assert (document.sender_identifier, document.sender_application) == ("10001234567", "RIS")
    assert document.extra["idempotency_key"].startswith("cr.pdf:")
    assert len(document.extra["idempotency_key"]) == len("cr.pdf:") + 64
    assert names(watcher.processed_dir) == ["cr.pdf", "cr.pdf.json"]


def test_document_defaults_and_content_type_from_extension(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, "document")
    drop(watcher, "scan.JPG", b"\xff\xd8\xff\xe0jpeg")
    drop(watcher, "scan.JPG.json", b'{"patient": "Patient/p1", "visit_number": "V9"}')

    asyncio.run(settle(watcher))

    [document] = sink.documents
    assert (document.content_type, document.document_type) == ("image/jpeg", "11488-4")
    assert (document.patient_reference, document.visit_number) == ("Patient/p1", "V9")


@pytest.mark.parametrize(
    ("sidecar", "reason"),
    [
        (b'{"patient": "Patient/p1", "colour": "red", "size": 3}', "unknown keys in the JSON "),
        (b'{"patient": "Patient/p1",', "not valid JSON"),
        (b'{"title": "no one"}', "names no patient"),
        (b'{"patient": "p1"}', "patient: String should match pattern"),
        (b'{"patient": "Patient/p1", "type": "CR"}', "type: String should match pattern"),
    ],
    ids=["unknown-keys", "invalid-json", "no-patient", "bad-reference", "bad-loinc"],
)
def test_a_bad_sidecar_sends_both_files_to_error(
    tmp_path: Path, sidecar: bytes, reason: str
) -> None:
    watcher, sink = make(tmp_path, "document")
    drop(watcher, "cr.pdf", PDF)
    drop(watcher, "cr.pdf.json", sidecar)

    asyncio.run(settle(watcher))

    assert sink.documents == []
    assert names(watcher.error_dir) == ["cr.pdf", "cr.pdf.error.txt", "cr.pdf.json"]
    report = error_text(watcher, "cr.pdf")
    assert reason in report
    if reason.startswith("unknown"):
        assert "colour, size" in report


def test_a_document_without_sidecar_goes_to_error_after_the_timeout(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, "document", sidecar_timeout=0.3)
    drop(watcher, "cr.pdf", PDF)

    async def scenario() -> None:
        await settle(watcher)
        assert names(watcher.error_dir) == []  # still waiting for its sidecar
        await asyncio.sleep(0.35)
        await watcher.scan_once()

    asyncio.run(scenario())
    assert sink.documents == []
    assert names(watcher.error_dir) == ["cr.pdf", "cr.pdf.error.txt"]
    assert "no JSON sidecar" in error_text(watcher, "cr.pdf")


def test_a_refused_document_goes_to_error_with_the_sinks_reason(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, "document", ok_file=True)
    sink.document_result = InboundResult(Verdict.REJECT, "patient unknown")
    drop(watcher, "cr.pdf", PDF)
    drop(watcher, "cr.pdf.json", b'{"patient": "Patient/p1"}')
    drop(watcher, "cr.pdf.ok", b"")

    asyncio.run(watcher.scan_once())

    assert len(sink.documents) == 1
    assert names(watcher.error_dir) == ["cr.pdf", "cr.pdf.error.txt", "cr.pdf.json", "cr.pdf.ok"]
    assert "the document: reject: patient unknown" in error_text(watcher, "cr.pdf")


# --------------------------------------------------------------------------- crashes


def test_start_processes_what_a_dead_process_left_in_work_first(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path)
    watcher.work_dir.mkdir(parents=True)
    (watcher.work_dir / "old.hl7").write_bytes(hl7_file(hl7("W1")))  # claimed, then the crash
    drop(watcher, "new.hl7", hl7_file(hl7("N1")))

    async def scenario() -> None:
        await watcher.start()
        try:
            await wait_until(lambda: len(names(watcher.processed_dir)) == 2)
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert [m.control_id for m in sink.messages] == ["W1", "N1"]
    assert names(watcher.processed_dir) == ["new.hl7", "old.hl7"]
    assert work_files(watcher) == []


def test_recovery_finishes_a_claim_cut_short_before_the_sidecar(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, "document")
    watcher.work_dir.mkdir(parents=True)
    (watcher.work_dir / "cr.pdf").write_bytes(PDF)  # the sidecar was still to follow
    drop(watcher, "cr.pdf.json", b'{"patient": "Patient/p1"}')

    asyncio.run(watcher.scan_once())

    assert len(sink.documents) == 1
    assert names(watcher.processed_dir) == ["cr.pdf", "cr.pdf.json"]
    assert names(watcher.folder) == [".work", "error", "processed"]


class _Crash(Exception):
    pass


class CrashAfterDecision(FileDropWatcher):
    """Dies once the decision is on disk, before any file is moved."""

    def _finish(self, unit: Path) -> None:
        raise _Crash


def test_a_decided_file_is_moved_after_a_crash_not_submitted_again(tmp_path: Path) -> None:
    options = FileDropOptions(path=tmp_path / "drop", format="hl7v2", stable_for=0)
    sink = FakeSink()
    sink.refuse["R2"] = InboundResult(Verdict.REJECT, "not for us")
    crashing = CrashAfterDecision(options, sink, "lab")
    drop(crashing, "adt.hl7", hl7_file(hl7("R1"), hl7("R2")))

    with pytest.raises(_Crash):
        asyncio.run(crashing.scan_once())
    assert work_files(crashing) == ["adt.hl7"]

    restarted = FileDropWatcher(options, sink, "lab")
    asyncio.run(restarted.scan_once())

    assert [m.control_id for m in sink.messages] == ["R1", "R2"]  # once each
    assert names(restarted.error_dir) == ["adt.hl7", "adt.hl7.error.txt"]
    assert "message 2 (MSH-10 'R2', ADT^A01): reject: not for us" in error_text(
        restarted, "adt.hl7"
    )
    assert list(restarted.work_dir.iterdir()) == []


def test_a_failing_sink_leaves_the_file_in_work_until_it_recovers(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, stable_for=0)
    drop(watcher, "adt.hl7", hl7_file(hl7("F1"), hl7("F2")))
    drop(watcher, "later.hl7", hl7_file(hl7("F3")))
    sink.failures = 1

    async def scenario() -> None:
        assert await watcher.scan_once() is False
        assert work_files(watcher) == ["adt.hl7"]  # not error/: the engine was down
        assert "later.hl7" in names(watcher.folder)  # the pass stopped: order is kept
        assert names(watcher.error_dir) == names(watcher.processed_dir) == []
        assert await watcher.scan_once() is True

    asyncio.run(scenario())
    assert [m.control_id for m in sink.messages] == ["F1", "F2", "F3"]
    assert names(watcher.processed_dir) == ["adt.hl7", "later.hl7"]
    assert watcher.counters.sink_failures == 1


def test_the_running_watcher_backs_off_and_retries_a_failing_sink(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, stable_for=0, poll_interval=0.02)
    drop(watcher, "adt.hl7", hl7_file(hl7("B1")))
    sink.failures = 3

    async def scenario() -> None:
        await watcher.start()
        try:
            await wait_until(lambda: names(watcher.processed_dir) == ["adt.hl7"])
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert [m.control_id for m in sink.messages] == ["B1"]
    assert watcher.counters.sink_failures == 3


def test_two_watchers_cannot_run_on_one_folder(tmp_path: Path) -> None:
    first, _ = make(tmp_path)
    second, _ = make(tmp_path)

    async def scenario() -> None:
        await first.start()
        try:
            with pytest.raises(FolderBusyError):
                await second.start()
        finally:
            await first.stop()
        await second.start()  # free again
        await second.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- logs, options


def test_logs_never_carry_file_names(tmp_path: Path) -> None:
    watcher, sink = make(tmp_path, stable_for=0)
    sink.refuse["P2"] = InboundResult(Verdict.ERROR, "bad")
    drop(watcher, "DUPONT_Jean_1970.hl7", hl7_file(hl7("P1"), hl7("P2")))

    with capture_logs() as events:
        asyncio.run(watcher.scan_once())

    assert events, "expected log events"
    assert "DUPONT" not in repr(events)
    done = next(e for e in events if e["event"] == "filedrop.done")
    assert (done["channel"], done["result"], done["code"]) == ("lab", "error", "partially_refused")
    assert "DUPONT_Jean_1970.hl7" in error_text(watcher, "DUPONT_Jean_1970.hl7")


def test_options_are_strict(tmp_path: Path) -> None:
    options = FileDropOptions(path=tmp_path, format="document")
    assert options.processed_path == tmp_path / "processed"
    assert options.error_path == tmp_path / "error"
    assert options.max_file_bytes == 64 * 1024 * 1024
    with pytest.raises(ValidationError, match="extra"):
        FileDropOptions(path=tmp_path, format="hl7v2", colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="must differ from path"):
        FileDropOptions(path=tmp_path, format="hl7v2", processed_dir=tmp_path)
    with pytest.raises(ValidationError, match="unknown character set"):
        FileDropOptions(path=tmp_path, format="hl7v2", default_charset="klingon")
    with pytest.raises(ValidationError):
        FileDropOptions(path=tmp_path, format="csv")


def test_the_plugin_registers_the_filedrop_channel(tmp_path: Path) -> None:
    plugins = load_plugins()
    if "filedrop" not in plugins.inbound:  # before pyproject lists the entry point
        plugins = load_plugins(extra=[filedrop_plugin])
    inbound = plugins.inbound["filedrop"]
    options = inbound.options_model.model_validate({"path": str(tmp_path), "format": "hl7v2"})
    channel = inbound.open(options, FakeSink(), "lab")
    assert isinstance(channel, FileDropWatcher)
    assert channel.name == "lab"


def test_auto_format_takes_hl7_files_and_documents_from_one_inbox(tmp_path: Path) -> None:
    """One inbox for both kinds: .hl7 files are HL7 v2, the rest documents with sidecars."""
    watcher, sink = make(tmp_path, "auto")
    sidecar = json.dumps({"patient": "Patient/p1"}).encode()

    async def scenario() -> None:
        drop(watcher, "feed.HL7", hl7_file(hl7("M1"), hl7("M2")))
        drop(watcher, "cr.pdf.json", sidecar)
        drop(watcher, "cr.pdf", b"%PDF-1.4 x")
        await settle(watcher)

    asyncio.run(scenario())
    assert [m.control_id for m in sink.messages] == ["M1", "M2"]
    assert [d.patient_reference for d in sink.documents] == ["Patient/p1"]
    assert names(watcher.options.processed_path) == ["cr.pdf", "cr.pdf.json", "feed.HL7"]


def test_a_file_that_makes_the_sink_fail_goes_to_error_and_does_not_block_others(
    tmp_path: Path,
) -> None:
    """Only SinkUnavailable holds a file back; any other failure is this file's problem."""
    watcher, sink = make(tmp_path)

    async def failing(message: InboundMessage) -> InboundResult:
        if message.control_id == "BAD":
            raise ValueError("something in this message breaks the engine")
        sink.messages.append(message)
        return InboundResult(Verdict.ACCEPT)

    sink.hl7_message = failing  # type: ignore[method-assign]

    async def scenario() -> None:
        drop(watcher, "a.hl7", hl7_file(hl7("BAD")))
        drop(watcher, "b.hl7", hl7_file(hl7("GOOD")))
        await settle(watcher, passes=3)

    asyncio.run(scenario())
    assert [m.control_id for m in sink.messages] == ["GOOD"]
    assert "a.hl7" in names(watcher.options.error_path)
    assert "ValueError" in (watcher.options.error_path / "a.hl7.error.txt").read_text()
    assert names(watcher.options.processed_path) == ["b.hl7"]
