"""The ``hprim-sante`` format: writer -> reader round trips, line rules, codecs, and the reader on
hand-written files shaped like the public samples quoted in docs/hprim.md."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document
from medcourier.engine.plugins import load_plugins
from medcourier.transforms.hprim import (
    EscapeStyle,
    HprimOptions,
    HprimParseError,
    parse_hprim,
    plugin,
    render,
    render_bundle,
    representable,
    validate,
)

TX_ID = "018f2c3a4b5c1a2b3c4d"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 3 + b"\n%%EOF\n"
NASTY = "Résultat |~^\\& « fin »"  # every HPRIM delimiter, and Latin-1 accents


def make_patient(**overrides: Any) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [
            {"system": "urn:oid:1.2.250.1.999.1", "value": "000123456"},
            {
                "system": "urn:oid:1.2.250.1.999.9",
                "value": "IPP-77",
                "type": {"coding": [{"code": "PI"}]},
            },
        ],
        "name": [
            {"use": "usual", "family": "Lefèvre-Dupré", "given": ["Zoé", "Hélène"]},
            {"use": "official", "family": "Müller", "given": ["Zoé"]},
        ],
        "birthDate": "1952-02-14",
        "gender": "female",
        "address": [
            {"line": ["12 allée des Tilleuls", "Bât. C"], "city": "Melun", "postalCode": "77000"}
        ],
        "telecom": [{"system": "phone", "value": "0160000000"}],
    }
    patient.update(overrides)
    return patient


def make_document(
    payload: bytes = PDF,
    content_type: str = "application/pdf",
    title: str = "Compte rendu d'échographie",
    **overrides: Any,
) -> Document:
    fields: dict[str, Any] = {
        "transaction_id": TX_ID,
        "created_at": datetime(2024, 3, 14, 9, 12, 33, tzinfo=UTC),
        "content_type": content_type,
        "document_type": "18748-4",
        "title": title,
        "payload": payload,
        "patient": make_patient(),
        "encounter": {
            "resourceType": "Encounter",
            "class": {"code": "AMB"},
            "identifier": [{"value": "S24-0871"}],
            "period": {"start": "2024-03-14T07:45:00+01:00"},
        },
        "sender_identifier": "10003123456",
    }
    fields.update(overrides)
    return Document(**fields)


def text_document(text: str, charset: str = "utf-8", **overrides: Any) -> Document:
    return make_document(
        payload=text.encode(charset), content_type=f"text/plain; charset={charset}", **overrides
    )


def options(**overrides: Any) -> HprimOptions:
    return HprimOptions(receiver_id="CHG77", receiver_name="Centre hospitalier", **overrides)


def physical_lines(data: bytes, ending: str = "\r\n", encoding: str = "latin-1") -> list[str]:
    text = data.decode(encoding)
    assert text.endswith(ending)
    return text[: -len(ending)].split(ending)


def assert_well_formed(data: bytes, opts: HprimOptions) -> list[str]:
    """The rules every file must follow, whatever the options."""
    lines = physical_lines(data, opts.line_ending, opts.encoding)
    terminator = len(opts.line_ending) if opts.max_line_includes_terminator else 0
    for line in lines:  # the limit is in bytes: readers have fixed byte buffers
        assert len(line.encode(opts.encoding)) + terminator <= opts.max_line, line
        assert not line.endswith(("|", "~", "^", "&")), f"trailing empty field: {line!r}"
        assert not line[-1].isspace(), line
        assert "\r" not in line and "\n" not in line
    assert lines[0].startswith("H|~^\\&|")
    assert lines[-1].startswith("L|")
    return lines


# --- plugin ---------------------------------------------------------------------------------


def test_plugin_registers_the_format_with_its_options_schema() -> None:
    formats = load_plugins().formats
    if "hprim-sante" not in formats:  # until pyproject names the entry point
        formats = load_plugins(extra=[plugin]).formats
    fmt = formats["hprim-sante"]
    assert fmt.options_model is HprimOptions
    assert fmt.render is render and fmt.validate is validate
    with pytest.raises(pydantic.ValidationError):
        HprimOptions.model_validate({"receiver_id": "X", "bogus": 1})  # extra="forbid"
    with pytest.raises(pydantic.ValidationError):
        HprimOptions.model_validate({})  # the receiver is required


@pytest.mark.parametrize(
    "bad",
    [
        {"receiver_id": "A|B"},
        {"receiver_id": "X", "sender_name": "caf~é"},
        {"receiver_id": "X", "timezone": "Mars/Olympus"},
        {"receiver_id": "R" * 30, "receiver_name": "N" * 10},
        {"receiver_id": "X", "file_extension": ".hprim"},
        {"receiver_id": "X", "fic_application": "MEDCOURIER-LONG"},
    ],
)
def test_options_refuse_values_that_would_corrupt_the_header(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        HprimOptions.model_validate(bad)


# --- FIC mode -----------------------------------------------------------------------------------


def test_fic_mode_names_the_companion_and_the_bundle_carries_the_exact_pdf() -> None:
    opts = options()
    document = make_document()
    bundle = render_bundle(document, opts)
    assert [name for name, _ in bundle] == ["SZUB72SH.pdf", "SZUB72SH.HPR"]  # companion first
    (companion_name, companion), (hprim_name, hprim) = bundle
    assert companion == PDF
    rendered = render(document, opts)
    assert rendered.data == hprim
    assert rendered.filename_hint == hprim_name
    assert rendered.message_id == TX_ID
    assert rendered.media_type == "text/x-hprim; charset=ISO-8859-1"
    assert re.fullmatch(r"[0-9A-Z]{8}\.HPR", hprim_name)  # 8.3, fits the 12 characters of H-3

    lines = assert_well_formed(hprim, opts)
    assert lines[0] == (
        "H|~^\\&|SZUB72SH.HPR||MEDCOURIER~MEDCOURIER||ORU|||CHG77~Centre hospitalier"
        "||P|H2.4~C|202403141012"
    )
    assert f"|FIC|18748-4~Compte rendu d'échographie~L||MEDCOURIER~{companion_name}~PDF|" in (
        hprim.decode("latin-1")
    )
    assert b"Lef\xe8vre-Dupr\xe9~Zo\xe9~H\xe9l\xe8ne|M\xfcller|" in hprim  # Latin-1 bytes

    message = parse_hprim(hprim)
    assert message.header.file_name == hprim_name
    assert (message.header.sender_id, message.header.receiver_name) == (
        "MEDCOURIER",
        "Centre hospitalier",
    )
    assert (message.header.version, message.header.link_type) == ("H2.4", "C")
    assert message.header.timestamp == "202403141012"  # Europe/Paris, minutes
    patient = message.patients[0]
    assert (patient.patient_id, patient.visit_number) == ("IPP-77", "S24-0871")
    assert (patient.family, patient.given, patient.further_given) == (
        "Lefèvre-Dupré",
        "Zoé",
        "Hélène",
    )
    assert (patient.birth_name, patient.birth_date, patient.sex) == ("Müller", "19520214", "F")
    assert patient.address == ["12 allée des Tilleuls", "Bât. C", "Melun", "", "77000"]
    request = patient.requests[0]
    assert request.executor_request_id == TX_ID
    assert (request.code, request.status) == ("18748-4", "F")
    assert request.text is None
    [file] = request.files
    assert (file.name, file.type, file.application) == (companion_name, "PDF", "MEDCOURIER")
    assert message.trailer is not None
    assert (message.trailer.patient_count, message.trailer.record_count) == ("1", "5")


def test_fic_value_without_application_is_read_back() -> None:
    opts = options(fic_value="file_type", version="2.2", link_type="R")
    data = render(make_document(), opts).data
    assert "|FIC|18748-4~Compte rendu d'échographie~L||SZUB72SH.pdf~PDF|" in data.decode("latin-1")
    message = parse_hprim(data)
    assert message.header.version == "H2.2" and message.header.link_type == "R"
    [file] = message.patients[0].requests[0].files
    assert (file.name, file.type, file.application) == ("SZUB72SH.pdf", "PDF", "")


def test_text_mode_refuses_a_pdf_and_validate_says_so_first() -> None:
    opts = options(document_mode="text")
    document = make_document()
    with pytest.raises(RenderError, match="text mode"):
        render(document, opts)
    with pytest.raises(RenderError):
        render_bundle(document, opts)
    assert any(i.location == "content_type" for i in validate(document, opts))
    assert validate(make_document(), options()) == []


def test_fic_mode_refuses_a_type_without_companion_extension() -> None:
    document = make_document(content_type="application/x-unknown")
    with pytest.raises(RenderError, match="companion"):
        render(document, options())
    assert validate(document, options())[0].location == "content_type"


# --- text mode ----------------------------------------------------------------------------------


REPORT = (
    "Échographie abdominale\n"
    "\n"
    f"Conclusion : {NASTY}\n"
    "  Indentation gardée, tabulation\tgardée\n"
    "Foie ~ rate ^ reins & vessie \\ fin"
)


@pytest.mark.parametrize("layout", ["obx_lines", "comments", "tx_components"])
def test_text_round_trip_restores_delimiters_accents_and_blank_lines(layout: str) -> None:
    opts = options(document_mode="text", text_layout=layout)
    data = render(text_document(REPORT), opts).data
    lines = assert_well_formed(data, opts)
    assert b"\\F\\\\S\\\\R\\\\E\\\\T\\" in data  # |~^\& escaped by role (Mediboard)
    assert not any(name.endswith(".txt") for name, _ in render_bundle(text_document(REPORT), opts))
    message = parse_hprim(data)
    assert message.patients[0].requests[0].text == REPORT
    assert message.trailer is not None
    assert message.trailer.record_count == str(len([ln for ln in lines if ln[:2] != "A|"]))


def test_long_text_is_continued_on_a_lines_at_exactly_the_limit() -> None:
    text = "x" * 1000  # no blank or delimiter: every cut falls exactly on the limit
    for includes_terminator in (True, False):
        opts = options(document_mode="text", max_line_includes_terminator=includes_terminator)
        data = render(text_document(text), opts).data
        lines = assert_well_formed(data, opts)
        obx = [i for i, line in enumerate(lines) if line.startswith("OBX|")]
        continued = lines[obx[0] : obx[0] + 5]
        assert [line[:2] for line in continued[1:]] == ["A|"] * 4
        full = 220 - (2 if includes_terminator else 0)
        assert [len(line) for line in continued[:4]] == [full] * 4
        assert parse_hprim(data).patients[0].requests[0].text == text


def test_cuts_never_split_an_escape_sequence_nor_follow_a_delimiter() -> None:
    text = ("a|b~c^d\\e&f " * 60).strip()  # escapes everywhere, blanks between them
    for layout in ("obx_lines", "tx_components"):
        opts = options(document_mode="text", text_layout=layout)
        data = render(text_document(text), opts).data
        lines = assert_well_formed(data, opts)
        for line in lines[1:]:  # the H line holds a literal escape character in H-2
            body = line[2:] if line.startswith("A|") else line
            assert body.count("\\") % 2 == 0, line
        assert sum(line.startswith("A|") for line in lines) >= 3
        assert parse_hprim(data).patients[0].requests[0].text == text


def test_utf8_limit_counts_bytes_not_characters() -> None:
    text = "é" * 600  # two bytes each in UTF-8
    for includes_terminator in (True, False):
        opts = options(
            document_mode="text",
            encoding="utf-8",
            max_line_includes_terminator=includes_terminator,
        )
        data = render(text_document(text), opts).data
        lines = assert_well_formed(data, opts)
        terminator = 2 if includes_terminator else 0
        sizes = [len(raw) + terminator for raw in data.split(b"\r\n")[:-1]]
        assert max(sizes) <= 220 and max(sizes) >= 219, sizes
        assert sum(line.startswith("A|") for line in lines) >= 5
        assert parse_hprim(data, encoding="utf-8").patients[0].requests[0].text == text


def test_a_run_of_blanks_never_ends_a_line() -> None:
    aligned = "Hemoglobine" + " " * 250 + "13.5 g/dL"  # longer than a whole line
    shorter = "Hemoglobine" + " " * 180 + "13.5 g/dL"  # longer than the search window only
    for text in (aligned, shorter, aligned + "\n" + "x" * 300 + " " * 100 + "y"):
        for encoding in ("iso-8859-1", "utf-8"):
            opts = options(document_mode="text", encoding=encoding)
            data = render(text_document(text), opts).data
            lines = assert_well_formed(data, opts)
            assert not any(line.endswith(" ") for line in lines)
            message = parse_hprim(data, encoding=encoding)
            assert message.patients[0].requests[0].text == text
    # A run that fits on a line starts the next one: no escape needed.
    data = render(text_document(shorter), options(document_mode="text")).data
    assert b"\\X20\\" not in data
    assert b"Hemoglobine\r\nA|" + b" " * 180 + b"13.5 g/dL" in data
    # Longer than a line, the blank ending it is escaped (sequences only).
    data = render(text_document(aligned), options(document_mode="text")).data
    assert data.count(b"\\X20\\") == 1


def test_seeded_random_texts_round_trip_under_every_option() -> None:
    rnd = random.Random(20240314)
    alphabet = "ab |~^\\&é€’\t" + "xyz" * 3
    for _ in range(120):
        text = "\n".join(
            "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 500))).rstrip()
            for _ in range(rnd.randint(1, 4))
        )
        encoding = rnd.choice(["iso-8859-1", "utf-8", "windows-1252"])
        style: EscapeStyle = rnd.choice(["sequences", "prefix"])
        opts = options(
            document_mode="text",
            text_layout=rnd.choice(["obx_lines", "comments"]),
            escape_style=style,
            encoding=encoding,
            line_ending=rnd.choice(["\r\n", "\r", "\n"]),
            max_line_includes_terminator=rnd.choice([True, False]),
            max_line=rnd.choice([220, 64, 30]),
        )
        data = render(text_document(text), opts).data
        terminator = len(opts.line_ending) if opts.max_line_includes_terminator else 0
        for line in physical_lines(data, opts.line_ending, encoding):
            assert len(line.encode(encoding)) + terminator <= opts.max_line
            if line.endswith(("|", "~", "^", "&")):  # only an escaped one, ending a value
                assert style == "prefix" and line[-2] == "\\", line
        expected = text if encoding != "iso-8859-1" else text.replace("€", "EUR").replace("’", "'")
        message = parse_hprim(data, encoding=encoding, escape_style=style)
        assert message.patients[0].requests[0].text == expected


@pytest.mark.parametrize("ending", ["\r\n", "\r", "\n"])
def test_line_endings_and_prefix_escapes_round_trip(ending: str) -> None:
    opts = options(document_mode="text", line_ending=ending, escape_style="prefix")
    data = render(text_document(REPORT + "\n" + "y" * 500), opts).data
    assert_well_formed(data, opts)
    assert b"\\|\\~\\^\\\\\\&" in data  # libHprim: the escape makes the next character literal
    message = parse_hprim(data, escape_style="prefix")
    assert message.patients[0].requests[0].text == REPORT + "\n" + "y" * 500


def test_replace_style_swaps_delimiters_for_look_alikes() -> None:
    opts = options(document_mode="text", escape_style="replace")
    data = render(text_document("a|b~c^d\\e&f"), opts).data
    assert_well_formed(data, opts)
    assert parse_hprim(data, escape_style="replace").patients[0].requests[0].text == "a/b-c'd/e+f"


def test_utf8_option_writes_utf8_and_keeps_what_latin1_cannot() -> None:
    text = "Zoé Łukasz → ok 😀"
    opts = options(document_mode="text", encoding="utf-8")
    document = text_document(text, title="Lettre – sortie")
    rendered = render(document, opts)
    assert rendered.media_type.endswith("charset=UTF-8")
    assert "Łukasz → ok 😀".encode() in rendered.data
    assert parse_hprim(rendered.data, encoding="utf-8").patients[0].requests[0].text == text

    latin = render(document, options(document_mode="text")).data  # never an exception
    message = parse_hprim(latin)
    assert message.patients[0].requests[0].text == "Zoé ?ukasz ? ok ?"
    assert message.patients[0].requests[0].label == "Lettre - sortie"


def test_characters_outside_the_codec_are_replaced_never_raised() -> None:
    assert representable("l’œuf — 5 €…", "iso8859-1") == "l'oeuf - 5 EUR..."
    assert representable("l’œuf — 5 €", "cp1252") == "l’œuf — 5 €"
    assert representable("Ångström őz ﬁn", "ascii") == "Angstrom oz fin"
    assert representable("bad \ud800 surrogate", "utf-8") == "bad ? surrogate"
    document = text_document("ok", title="bad \ud800 title")
    for encoding in ("iso-8859-1", "utf-8", "windows-1252"):
        opts = options(document_mode="text", encoding=encoding)
        message = parse_hprim(render(document, opts).data, encoding=encoding)
        assert message.patients[0].requests[0].label == "bad ? title"


def test_control_characters_in_names_become_hex_escapes() -> None:
    patient = make_patient(name=[{"family": "Ligne1\nLigne2", "given": ["A\x07B"]}])
    data = render(make_document(patient=patient), options()).data
    assert b"Ligne1\\X0A\\Ligne2~A\\X07\\B" in data
    assert parse_hprim(data).patients[0].family == "Ligne1\nLigne2"


def test_text_in_a_declared_latin1_charset_and_bad_bytes() -> None:
    opts = options(document_mode="text")
    latin = text_document("Crème brûlée", charset="iso-8859-1")
    assert parse_hprim(render(latin, opts).data).patients[0].requests[0].text == "Crème brûlée"
    broken = make_document(payload=b"\xff\xfe bad", content_type="text/plain")
    with pytest.raises(RenderError, match="not valid utf-8"):
        render(broken, opts)
    assert validate(broken, opts)[0].location == "content"


def test_counts_precision_and_options_that_vary_between_implementations() -> None:
    document = text_document("z" * 700)
    opts = options(
        document_mode="text", record_count="lines", timestamp_precision="second", processing_id="T"
    )
    data = render(document, opts).data
    lines = physical_lines(data)
    assert lines[-1] == f"L|1||1|{len(lines)}"
    message = parse_hprim(data)
    assert message.header.timestamp == "20240314101233"
    assert message.header.processing_id == "T"
    assert message.line_count == len(lines)
    before_l = render(document, options(document_mode="text", record_count="records_before_l"))
    assert physical_lines(before_l.data)[-1] == "L|1||1|4"


def test_validate_reports_missing_name_and_long_ipp() -> None:
    patient = make_patient(name=[], identifier=[{"value": "X" * 20}], birthDate="14/02/1952")
    issues = validate(make_document(patient=patient), options())
    assert {(i.location, i.severity) for i in issues} == {
        ("Patient", "error"),
        ("Patient.identifier", "warning"),
        ("Patient.birthDate", "warning"),
    }


# --- reader on hand-written files shaped like the public samples --------------------------------

# A lab result file in the shape of libHprim's test file and the SEGHO module's ORU: standard
# delimiters, CRLF, an OBR cut mid-word onto an A| line, trailing empty fields (real labs send
# them), NM results with units, a C comment, a TX comment whose component separator is a line
# break, and a FIC result naming the PDF delivered beside the file. Written for this test.
LAB_FILE = "\r\n".join(
    [
        "H|~^\\&|LAB00042.HPR||LABO01~LABORATOIRE DES ÉTANGS||ORU|||CHG77~CENTRE HOSPITALIER"
        "||P|H2.2~C|202403141012",
        "P|1|000123456||S24-0871|BÉRANGER~HÉLÈNE~MARIE|COURTOIS|19520214|F||12 ALLÉE DES "
        "TILLEULS~~MELUN~~77000|||",
        "OBR|1|~D2403140077|240314-118~0077|GLY~Glycémie à jeun~L^CREA~Créatinine~L^NFS~Numé",
        "A|ration formule sanguine~L|R||202403140745|||||||202403140830||MRT~MARTIN PAUL~L|"
        "0160000000|||||202403141005|||F|",
        "OBX|1|NM|GLY~Glycémie à jeun~L||5.4|mmol/l|3.9-5.8|N|||F|||202403140950",
        "OBX|2|NM|CREA~Créatinine~L||112|µmol/l|45-90|H|||F|||202403140951|",
        "C|1|L|Contrôle conseillé sous 8 jours \\F\\ à jeun.",
        "OBX|3|TX|COMM~Commentaire~L||Prélèvement hémolysé~à interpréter avec prudence||||||F",
        "OBX|4|FIC|CR~Compte rendu complet~L||SIL~LAB00042.pdf~PDF||||||F",
        "L|1||1|9",
        "",
    ]
).encode("latin-1")


def test_reader_reads_a_lab_file_shaped_like_the_public_samples() -> None:
    message = parse_hprim(LAB_FILE)
    assert message.delimiters.encoding_characters == "~^\\&"
    header = message.header
    assert (header.file_name, header.sender_id, header.sender_name) == (
        "LAB00042.HPR",
        "LABO01",
        "LABORATOIRE DES ÉTANGS",
    )
    assert (header.message_type, header.version, header.link_type) == ("ORU", "H2.2", "C")
    [patient] = message.patients
    assert (patient.patient_id, patient.family, patient.given, patient.birth_name) == (
        "000123456",
        "BÉRANGER",
        "HÉLÈNE",
        "COURTOIS",
    )
    [request] = patient.requests
    assert (request.requester_request_id, request.executor_sample_id) == (
        "D2403140077",
        "240314-118",
    )
    assert request.status == "F" and request.reported_at == "202403141005"
    obr = next(r for r in message.records if r.type == "OBR")
    assert "NFS~Numération formule sanguine~L" in obr.fields[4]  # A| joined without separator
    glucose, creatinine, comment, report = request.results
    assert (glucose.value, glucose.unit, glucose.status) == ("5.4", "mmol/l", "F")
    assert (creatinine.value, creatinine.unit) == ("112", "µmol/l")
    assert creatinine.comments == ["Contrôle conseillé sous 8 jours | à jeun."]
    assert comment.value == "Prélèvement hémolysé\nà interpréter avec prudence"
    assert request.text == "Prélèvement hémolysé\nà interpréter avec prudence"
    assert report.file is not None and report.file.name == "LAB00042.pdf"
    assert message.trailer is not None and message.trailer.record_count == "9"
    assert message.line_count == 10


# A radiology file with other delimiters (field |, component \, repetition ^, escape &,
# subcomponent ~, as in the lab header quoted by MedinTux's reader) and CR-only line ends.
RADIO_FILE = "\r".join(
    [
        "H|\\^&~|RAD0001.hpr||CAB12\\CABINET DE RADIOLOGIE||ORU|||HOP01\\HOPITAL||P|H2.4\\R"
        "|202405021500",
        "P|1|998877|||DURAND\\LÉA||20010930|F",
        "OBR|1||\\R2405-12|ECHO\\Échographie abdominale\\L||||||||||||||||||202405021455|||F",
        "OBX|1|TX|CR\\Compte rendu\\L||Foie normal.\\Vésicule &F& voies biliaires fines.||||||F",
        "L|1||1|5",
    ]
).encode("latin-1")


def test_reader_takes_delimiters_from_the_h_line() -> None:
    message = parse_hprim(RADIO_FILE)
    d = message.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == (
        "|",
        "\\",
        "^",
        "&",
        "~",
    )
    assert (message.header.sender_name, message.header.link_type) == (
        "CABINET DE RADIOLOGIE",
        "R",
    )
    patient = message.patients[0]
    assert (patient.family, patient.given) == ("DURAND", "LÉA")
    request = patient.requests[0]
    assert request.executor_request_id == "R2405-12"
    assert request.text == "Foie normal.\nVésicule | voies biliaires fines."


def test_reader_rejects_what_is_not_hprim() -> None:
    with pytest.raises(HprimParseError, match="no H line"):
        parse_hprim(b"MSH-like nonsense\r\nP|1\r\n")
    with pytest.raises(HprimParseError, match="not valid utf-8"):
        parse_hprim(b"H|~^\\&|\xff\r\n", encoding="utf-8")
    # Junk before the header is skipped; "auto" falls back to windows-1252.
    message = parse_hprim(b"\x1a\r\nH|~^\\&|F.HPR||S~\x80 caf\xe9||ORU\r\nL|1\r\n", encoding="auto")
    assert message.header.sender_name == "€ café"
