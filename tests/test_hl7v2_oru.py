"""The ``hl7v2-oru`` format, judged by libraries that did not write the message.

hl7apy (strict) checks the structure and data types of a v2.5 ORU_R01 or MDM_T02; python-hl7
does the unescaping, so a mistake in our escape() cannot be hidden by the same mistake in the
check.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import hl7
import pydantic
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import MaxChildLimitReached
from hl7apy.parser import parse_message

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document
from medcourier.engine.plugins import load_plugins
from medcourier.transforms.hl7v2 import oru
from medcourier.transforms.hl7v2.escape import escape
from medcourier.transforms.hl7v2.oru import OruOptions, render, validate

TRICKY_FAMILY = "Dupont|O'Brien^&~\\"
TRICKY_GIVEN = "Zoé\nMarie"
PDF_PAYLOAD = (b"%PDF-1.4\n" + bytes(range(256)) * 4)[:1024]


def make_patient(**overrides: Any) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [
            {
                "system": "urn:oid:1.2.250.1.999.1",
                "value": "IPP-0042",
                "assigner": {"display": "CHU Sud"},
                "type": {"coding": [{"code": "MR"}]},
            },
            {"system": "https://hospital.example/ipp", "value": "77"},
        ],
        "name": [
            {
                "use": "official",
                "family": TRICKY_FAMILY,
                "given": [TRICKY_GIVEN, "Anne", "Lise"],
                "prefix": ["Mme"],
            },
            {"use": "maiden", "family": "Martin"},
        ],
        "birthDate": "1980-05-12",
        "gender": "female",
        "address": [
            {
                "line": ["1 rue de la Paix", "Bâtiment B"],
                "city": "Paris",
                "postalCode": "75001",
                "country": "FRA",
            }
        ],
        "telecom": [
            {"system": "phone", "value": "+33612345678", "use": "mobile"},
            {"system": "email", "value": "zoe@example.org"},
            {"system": "phone", "value": "+33140000000", "use": "work"},
        ],
    }
    patient.update(overrides)
    return patient


ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
    "identifier": [{"system": "urn:oid:1.2.250.1.999.2", "value": "V-2024-0001"}],
    "location": [{"location": {"display": "Cardiologie, chambre 12"}}],
    "period": {"start": "2024-01-15T10:30:00+01:00", "end": "2024-01-20T09:05:00+01:00"},
}


def make_document(**overrides: Any) -> Document:
    fields: dict[str, Any] = {
        "transaction_id": "TX-20240121-0001",
        "created_at": datetime(2024, 1, 21, 8, 30, 15, tzinfo=UTC),
        "content_type": "application/pdf",
        "document_type": "11488-4",
        "title": "Compte-rendu de consultation",
        "payload": PDF_PAYLOAD,
        "patient": make_patient(),
        "encounter": ENCOUNTER,
    }
    fields.update(overrides)
    return Document(**fields)


def ascii_document(**overrides: Any) -> Document:
    patient = make_patient(
        name=[{"family": "Smith", "given": ["John"]}],
        address=[],
        identifier=[{"system": "urn:oid:1.2.250.1.999.1", "value": "42"}],
    )
    return make_document(patient=patient, title="Consultation", **overrides)


def segments(data: bytes) -> dict[str, list[str]]:
    """Split a message by hand (independently of both libraries) into fields per segment."""
    text = data.decode("utf-8")
    assert text.endswith("\r"), "the last segment must be terminated like the others"
    found: dict[str, list[str]] = {}
    for segment in text[:-1].split("\r"):
        fields = segment.split("|")
        assert fields[0] not in found, f"unexpected repeated segment {fields[0]}"
        found[fields[0]] = fields
    return found


def strict_parse(data: bytes) -> Message:
    """Parse with hl7apy strict, with OBX-5 data shortened: hl7apy caps ED data at 199 characters
    (crs4/hl7apy#45), a limit the standard's ED does not have."""
    text = data.decode("utf-8")
    head, _, rest = text.partition("^Base64^")
    _, _, tail = rest.partition("|")
    message = parse_message(
        f"{head}^Base64^QUJD|{tail}",
        validation_level=VALIDATION_LEVEL.STRICT,
        find_groups=True,
    )
    assert isinstance(message, Message)
    return message


def obx5(data: bytes) -> list[str]:
    return segments(data)["OBX"][5].split("^")


# --- the whole message, judged by hl7apy strict --------------------------------------------


def test_message_with_delimiters_accents_and_encounter_is_a_valid_v25_oru_r01() -> None:
    message = strict_parse(render(make_document()).data)

    assert message.name == "ORU_R01"
    assert message.version == "2.5"
    assert message.validate() is True
    result = message.oru_r01_patient_result
    assert result.oru_r01_patient.pid.pid_3[0].cx_1.value == "IPP-0042"
    visit = result.oru_r01_patient.oru_r01_visit.pv1
    assert visit.pv1_2.value == "I"
    assert visit.pv1_19.cx_1.value == "V-2024-0001"
    observation = result.oru_r01_order_observation
    assert observation.obr.obr_4.ce_1.value == "11488-4"
    assert observation.oru_r01_observation.obx.obx_2.value == "ED"


def test_message_without_encounter_is_valid_and_says_no_visit() -> None:
    rendered = render(make_document(encounter=None))

    assert strict_parse(rendered.data).validate() is True
    assert segments(rendered.data)["PV1"] == ["PV1", "1", "N"]


def test_obx5_carries_the_payload_bytes_exactly() -> None:
    rendered = render(make_document())

    encoded = obx5(rendered.data)
    assert encoded[:4] == ["", "AP", "PDF", "Base64"]
    assert base64.b64decode(encoded[4], validate=True) == PDF_PAYLOAD


def test_large_payload_survives_and_is_not_escaped() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, every byte value, many '/' and '+'
    rendered = render(make_document(payload=payload))

    assert base64.b64decode(obx5(rendered.data)[4], validate=True) == payload


# --- escaping, judged by python-hl7 ----------------------------------------------------------


def test_pid5_special_characters_come_back_through_python_hl7() -> None:
    data = render(make_document()).data
    message = hl7.parse(data.decode("utf-8"))

    official = message.segment("PID")[5][0]
    assert message.unescape(str(official[0])) == TRICKY_FAMILY
    # python-hl7 0.4.5 turns \.br\ back into a CR: the LF we were given comes back as "\r".
    assert message.unescape(str(official[1])) == TRICKY_GIVEN.replace("\n", "\r")
    assert message.unescape(str(official[2])) == "Anne Lise"
    assert str(official[4]) == "Mme"
    assert str(official[6]) == "L"
    maiden = message.segment("PID")[5][1]
    assert (str(maiden[0]), str(maiden[6])) == ("Martin", "M")


def test_accents_are_raw_utf8_and_declared_in_msh18() -> None:
    data = render(make_document()).data

    assert "Zoé".encode() in data
    assert "Bâtiment B".encode() in data
    assert b"\\X" not in data
    assert hl7.parse(data.decode("utf-8")).segment("MSH")[18] == ["UNICODE UTF-8"]
    assert strict_parse(data).msh.msh_18.value == "UNICODE UTF-8"


def test_all_ascii_message_leaves_msh18_out() -> None:
    data = render(ascii_document()).data

    assert data.isascii()
    msh = segments(data)["MSH"]
    assert len(msh) == 12  # "MSH" + MSH-1 (the "|" itself is not a split item) .. MSH-12
    assert msh[-1] == "2.5"


def test_non_ascii_in_options_alone_still_declares_utf8() -> None:
    options = OruOptions(receiving_facility="Hôpital Nord")
    data = render(ascii_document(), options).data

    assert segments(data)["MSH"][17] == "UNICODE UTF-8"  # MSH-18: MSH-1 is the "|" itself


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("a|b^c~d\\e&f", "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f"),
        ("one\r\ntwo\rthree\nfour", "one\\.br\\two\\.br\\three\\.br\\four"),
        ("bell\x07 vt\x0b fs\x1c del\x7f c1\x85 end", "bell vt fs del c1 end"),
        ("tab\tseparated", "tab separated"),
        ("Zoé Ørsted 山田 🙂", "Zoé Ørsted 山田 🙂"),
        ("lone \ud800 surrogate", "lone  surrogate"),
        ("", ""),
    ],
)
def test_escape(text: str, expected: str) -> None:
    assert escape(text) == expected


def test_escape_round_trips_through_python_hl7() -> None:
    container = hl7.parse("MSH|^~\\&|A|B\r")
    text = "x\\y|z^w~v&u \\F\\ literal, é"

    assert container.unescape(escape(text)) == text


# --- header, identifiers, segments -----------------------------------------------------------


def test_rendered_envelope_and_msh() -> None:
    document = make_document()
    rendered = render(document)
    msh = segments(rendered.data)["MSH"]

    assert rendered.message_id == document.transaction_id
    assert rendered.filename_hint == "TX-20240121-0001.hl7"
    assert rendered.media_type == "application/hl7-v2"
    assert msh[1] == "^~\\&"
    assert msh[2:6] == ["MEDCOURIER", "MEDCOURIER", "", ""]
    assert msh[6] == "20240121083015+0000"
    assert msh[8] == "ORU^R01^ORU_R01"
    assert msh[9] == document.transaction_id  # MSH-10
    assert msh[10:12] == ["P", "2.5"]
    python_hl7_msh = hl7.parse(rendered.data.decode("utf-8")).segment("MSH")
    assert str(python_hl7_msh[10]) == document.transaction_id


def test_options_fill_msh() -> None:
    options = OruOptions(
        sending_application="MC",
        sending_facility="CH X^1.2.250.1.71.4.2.2^ISO",
        receiving_application="DPI",
        receiving_facility="CHU",
        processing_id="T",
    )
    data = render(make_document(), options).data
    msh = segments(data)["MSH"]

    assert msh[2:6] == ["MC", "CH X^1.2.250.1.71.4.2.2^ISO", "DPI", "CHU"]
    assert msh[10] == "T"
    parsed = strict_parse(data)
    assert parsed.msh.msh_4.hd_2.value == "1.2.250.1.71.4.2.2"
    assert parsed.validate() is True


@pytest.mark.parametrize(
    "bad",
    [
        {"sending_application": "A|B"},
        {"receiving_facility": "A&B"},
        {"sending_facility": "A^B^C^D"},
        {"processing_id": "X"},
        {"version": "2.3"},
        {"message_type": "MDM^T10"},
        {"unknown_option": 1},
    ],
)
def test_options_refuse_what_would_corrupt_the_header(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        OruOptions(**bad)


def test_created_at_is_written_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    data = render(make_document(created_at=datetime(2024, 1, 21, 9, 30, 15, tzinfo=paris))).data
    found = segments(data)

    assert found["MSH"][6] == "20240121083015+0000"
    assert found["OBR"][7] == "20240121083015+0000"
    assert found["OBX"][14] == "20240121083015+0000"


def test_pid3_identifiers_and_authorities() -> None:
    data = render(make_document()).data
    repetitions = segments(data)["PID"][3].split("~")

    assert repetitions == [
        "IPP-0042^^^CHU Sud&1.2.250.1.999.1&ISO^MR",
        "77^^^&https://hospital.example/ipp&URI^PI",
    ]
    assert "&1.2.250.1.999.1&ISO" in repetitions[0]
    message = hl7.parse(data.decode("utf-8"))
    assert message["PID.F3.R1.C4.S2"] == "1.2.250.1.999.1"
    assert message["PID.F3.R1.C4.S3"] == "ISO"
    assert message["PID.F3.R2.C5"] == "PI"


def test_pid3_falls_back_to_the_resource_id() -> None:
    document = make_document(patient=make_patient(identifier=[]))
    data = render(document).data

    assert segments(data)["PID"][3] == "pat-1^^^MEDCOURIER^PI"
    assert strict_parse(data).validate() is True


def test_pid_demographics() -> None:
    pid = segments(render(make_document()).data)["PID"]

    assert pid[1] == "1"
    assert pid[7] == "19800512"
    assert pid[8] == "F"
    assert pid[11] == "1 rue de la Paix^Bâtiment B^Paris^^75001^FRA"
    assert pid[13] == "+33612345678^PRN^CP~^NET^Internet^zoe@example.org"
    assert pid[14] == "+33140000000^WPN^PH"


@pytest.mark.parametrize(
    ("birth_date", "expected"),
    [("1980-05-12", "19800512"), ("1980-05", "198005"), ("1980", "1980")],
)
def test_partial_birth_dates_keep_their_precision(birth_date: str, expected: str) -> None:
    data = render(make_document(patient=make_patient(birthDate=birth_date))).data

    assert segments(data)["PID"][7] == expected
    assert strict_parse(data).validate() is True


def test_pv1_from_encounter() -> None:
    pv1 = segments(render(make_document()).data)["PV1"]

    assert pv1[2] == "I"
    assert pv1[3] == "^^^^^^^^Cardiologie, chambre 12"
    assert pv1[19] == "V-2024-0001^^^&1.2.250.1.999.2&ISO^VN"
    assert pv1[44] == "20240115103000+0100"
    assert pv1[45] == "20240120090500+0100"
    assert len(pv1) == 46


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("IMP", "I"),
        ("ACUTE", "I"),
        ("NONAC", "I"),
        ("AMB", "O"),
        ("EMER", "E"),
        ("PRENC", "P"),
        ("HH", "U"),
        ("VR", "U"),
    ],
)
def test_patient_class(code: str, expected: str) -> None:
    encounter = {**ENCOUNTER, "class": {"code": code}}
    data = render(make_document(encounter=encounter)).data

    assert segments(data)["PV1"][2] == expected


def test_obr_uses_the_loinc_display_and_falls_back_to_the_title() -> None:
    known = segments(render(make_document()).data)["OBR"]
    unknown = segments(
        render(make_document(document_type="99999-9", title="Lettre & annexe")).data
    )["OBR"]

    assert known[4] == "11488-4^Consultation note^LN"
    assert known[7] == "20240121083015+0000"
    assert known[25] == "F"
    assert unknown[4] == "99999-9^Lettre \\T\\ annexe^LN"


def test_obx_fields() -> None:
    obx = segments(render(make_document(title="CR | urgent")).data)["OBX"]

    assert obx[1:4] == ["1", "ED", "11488-4^CR \\F\\ urgent^LN"]
    assert obx[11] == "F"


@pytest.mark.parametrize(
    ("content_type", "type_and_subtype"),
    [
        ("application/pdf", ["AP", "PDF"]),
        ("image/jpeg", ["IM", "JPEG"]),
        ("image/png", ["IM", "PNG"]),
        ("text/plain", ["TEXT", "PLAIN"]),
        ("application/txt", ["TEXT", "PLAIN"]),
        ("Text/Plain; charset=utf-8", ["TEXT", "PLAIN"]),
    ],
)
def test_obx5_type_and_subtype(content_type: str, type_and_subtype: list[str]) -> None:
    payload = b"\xff\xd8\xff\xe0 not really an image, bytes are bytes"
    data = render(make_document(content_type=content_type, payload=payload)).data

    component = obx5(data)
    assert component[1:4] == [*type_and_subtype, "Base64"]
    assert base64.b64decode(component[4]) == payload
    assert strict_parse(data).validate() is True


def test_unsupported_content_type_is_refused() -> None:
    document = make_document(content_type="application/msword")

    with pytest.raises(RenderError, match="application/msword"):
        render(document)
    assert [issue.location for issue in validate(document)] == ["content_type"]


def test_obx16_is_the_rpps_when_known() -> None:
    data = render(make_document(sender_identifier="10001234567")).data
    xcn = strict_parse(data).oru_r01_patient_result.oru_r01_order_observation.oru_r01_observation
    observer = xcn.obx.obx_16

    assert segments(data)["OBX"][16] == "10001234567^^^^^^^^RPPS&1.2.250.1.71.4.2.1&ISO^^^^RPPS"
    assert observer.xcn_1.value == "10001234567"
    assert observer.xcn_9.hd_2.to_er7() == "1.2.250.1.71.4.2.1"
    assert observer.xcn_13.value == "RPPS"


def test_obx16_names_the_sending_application_otherwise() -> None:
    data = render(make_document(sender_application="Cabinet^Dr|X")).data

    assert segments(data)["OBX"][16] == "^Cabinet\\S\\Dr\\F\\X"


def test_malformed_rpps_is_refused() -> None:
    document = make_document(sender_identifier="12345")

    with pytest.raises(RenderError, match="RPPS"):
        render(document)
    assert [issue.location for issue in validate(document)] == ["sender_identifier"]


@pytest.mark.parametrize("transaction_id", ["", "X" * 21, "TX|1", "TX^1"])
def test_unusable_control_id_is_refused(transaction_id: str) -> None:
    document = make_document(transaction_id=transaction_id)

    with pytest.raises(RenderError):
        render(document)
    assert [issue.location for issue in validate(document)] == ["transaction_id"]


# --- validate --------------------------------------------------------------------------------


def test_valid_document_has_no_issue() -> None:
    assert validate(make_document(), OruOptions()) == []


def test_patient_without_name_or_identifier_is_an_issue() -> None:
    patient = {"resourceType": "Patient", "name": [{"text": "only a text"}]}
    issues = validate(make_document(patient=patient))

    assert {issue.location for issue in issues} == {"Patient", "Patient.name"}
    assert all(issue.severity == "error" and issue.http_status == 422 for issue in issues)


def test_unreadable_dates_are_warnings() -> None:
    encounter = {**ENCOUNTER, "period": {"start": "yesterday"}}
    document = make_document(patient=make_patient(birthDate="12/05/1980"), encounter=encounter)
    issues = validate(document)

    assert [(issue.location, issue.severity) for issue in issues] == [
        ("Patient.birthDate", "warning"),
        ("Encounter.period.start", "warning"),
    ]
    pid = segments(render(document).data)["PID"]
    assert pid[7] == ""


# --- plugin ----------------------------------------------------------------------------------


def test_entry_point_names_this_module() -> None:
    (entry_point,) = importlib.metadata.entry_points(group="medcourier", name="hl7v2-oru")

    assert entry_point.load() is oru


def test_format_is_found_through_the_plugin_manager() -> None:
    fmt = load_plugins().formats["hl7v2-oru"]

    assert fmt.options_model is OruOptions
    options = fmt.options_model.model_validate({"receiving_application": "DPI"})
    assert fmt.validate is not None
    document = make_document()
    assert fmt.validate(document, options) == []
    assert segments(fmt.render(document, options).data)["MSH"][4] == "DPI"


def test_rendering_is_deterministic_for_retries() -> None:
    document = make_document()
    copy = dataclasses.replace(document, patient=make_patient())

    assert render(document).data == render(copy).data


# --- MDM^T02 ---------------------------------------------------------------------------------

MDM = OruOptions(message_type="MDM^T02")
RPPS_XCN = "10001234567^^^^^^^^RPPS&1.2.250.1.71.4.2.1&ISO^^^^RPPS"


def segment_ids(data: bytes) -> list[str]:
    return [segment.split("|", 1)[0] for segment in data.decode("utf-8")[:-1].split("\r")]


def test_mdm_t02_is_a_valid_v25_mdm_t02() -> None:
    data = render(make_document(sender_identifier="10001234567"), MDM).data
    message = strict_parse(data)

    assert segment_ids(data) == ["MSH", "EVN", "PID", "PV1", "TXA", "OBX"]
    assert message.name == "MDM_T02"
    assert message.version == "2.5"
    assert message.validate() is True
    assert message.pid.pid_3[0].cx_1.value == "IPP-0042"
    assert message.pv1.pv1_19.cx_1.value == "V-2024-0001"
    assert message.txa.txa_2.value == "11488-4"
    assert message.txa.txa_5.xcn_1.value == "10001234567"
    assert message.txa.txa_12.ei_1.value == "TX-20240121-0001"
    assert message.mdm_t02_observation.obx.obx_2.value == "ED"


def test_mdm_without_encounter_or_rpps_is_valid() -> None:
    data = render(make_document(encounter=None), MDM).data

    assert strict_parse(data).validate() is True
    assert segments(data)["PV1"] == ["PV1", "1", "N"]


def test_mdm_msh_and_evn() -> None:
    document = make_document()
    rendered = render(document, MDM)
    found = segments(rendered.data)

    assert found["MSH"][8] == "MDM^T02^MDM_T02"
    assert found["MSH"][9] == document.transaction_id  # MSH-10
    assert found["MSH"][10:12] == ["P", "2.5"]
    assert rendered.message_id == document.transaction_id
    assert rendered.filename_hint == "TX-20240121-0001.hl7"
    assert rendered.media_type == "application/hl7-v2"
    assert found["EVN"] == ["EVN", "T02", "20240121083015+0000"]
    python_hl7 = hl7.parse(rendered.data.decode("utf-8"))
    assert str(python_hl7.segment("MSH")[10]) == document.transaction_id
    assert str(python_hl7.segment("MSH")[9]) == "MDM^T02^MDM_T02"


def test_mdm_txa_fields() -> None:
    paris = timezone(timedelta(hours=1))
    created = datetime(2024, 1, 21, 9, 30, 15, tzinfo=paris)
    document = make_document(sender_identifier="10001234567", created_at=created)
    txa = segments(render(document, MDM).data)["TXA"]

    assert len(txa) == 20  # "TXA" + TXA-1 .. TXA-19
    assert txa[1] == "1"
    assert txa[2] == "11488-4"
    assert txa[3] == "AP"
    assert txa[4] == "20240121083015+0000"  # activity date/time, in UTC
    assert txa[5] == RPPS_XCN
    assert txa[6] == "20240121083015+0000"  # origination date/time
    assert txa[7:12] == [""] * 5
    assert txa[12] == "TX-20240121-0001^MEDCOURIER"
    assert txa[13] == ""  # an original document has no parent
    assert txa[14:17] == [""] * 3
    assert txa[17] == "AU"
    assert txa[18] == ""
    assert txa[19] == "AV"


def test_mdm_txa12_takes_the_sending_application_as_assigning_authority() -> None:
    options = OruOptions(message_type="MDM^T02", sending_application="MC^1.2.250.1.71.4.2.2^ISO")
    data = render(make_document(), options).data
    message = strict_parse(data)

    assert segments(data)["TXA"][12] == "TX-20240121-0001^MC^1.2.250.1.71.4.2.2^ISO"
    unique = message.txa.txa_12
    assert unique.ei_1.value == "TX-20240121-0001"
    assert unique.ei_2.value == "MC"
    assert unique.ei_3.value == "1.2.250.1.71.4.2.2"
    assert unique.ei_4.value == "ISO"
    assert message.validate() is True


def test_mdm_txa12_is_the_bare_id_without_sending_application() -> None:
    options = OruOptions(message_type="MDM^T02", sending_application="")
    data = render(make_document(), options).data

    assert segments(data)["TXA"][12] == "TX-20240121-0001"
    assert strict_parse(data).validate() is True


def test_mdm_txa2_cannot_be_a_ce_in_v25() -> None:
    """Why TXA-2 holds the bare code: it is an IS in v2.5, and hl7apy refuses components."""
    data = render(make_document(), MDM).data
    as_ce = data.replace(b"TXA|1|11488-4|", b"TXA|1|11488-4^Consultation note^LN|")

    assert as_ce != data
    with pytest.raises(MaxChildLimitReached, match="TXA_2"):
        strict_parse(as_ce)


def test_mdm_txa5_names_the_sending_application_without_rpps() -> None:
    data = render(make_document(sender_application="Cabinet^Dr|X"), MDM).data

    assert segments(data)["TXA"][5] == "^Cabinet\\S\\Dr\\F\\X"
    message = hl7.parse(data.decode("utf-8"))
    assert message.unescape(str(message.segment("TXA")[5][0][1])) == "Cabinet^Dr|X"


@pytest.mark.parametrize(
    ("content_type", "presentation"),
    [
        ("application/pdf", "AP"),
        ("image/jpeg", "IM"),
        ("image/png", "IM"),
        ("text/plain", "TEXT"),
        ("application/txt", "TEXT"),
    ],
)
def test_mdm_txa3_is_the_ed_type_of_data(content_type: str, presentation: str) -> None:
    data = render(make_document(content_type=content_type), MDM).data

    assert segments(data)["TXA"][3] == presentation
    assert obx5(data)[1] == presentation  # both fields use HL7 table 0191
    assert strict_parse(data).validate() is True


def test_mdm_obx_is_the_orus_and_carries_the_payload_exactly() -> None:
    document = make_document(sender_identifier="10001234567")
    mdm = segments(render(document, MDM).data)
    oru_segments = segments(render(document).data)

    assert mdm["OBX"] == oru_segments["OBX"]
    encoded = mdm["OBX"][5].split("^")
    assert encoded[:4] == ["", "AP", "PDF", "Base64"]
    assert base64.b64decode(encoded[4], validate=True) == PDF_PAYLOAD
    assert "OBR" not in mdm


def test_mdm_large_payload_survives() -> None:
    payload = bytes(range(256)) * 8192
    data = render(make_document(payload=payload), MDM).data

    assert base64.b64decode(obx5(data)[4], validate=True) == payload


def test_mdm_msh18_only_when_not_ascii() -> None:
    ascii_data = render(ascii_document(), MDM).data
    accented_author = render(ascii_document(sender_application="Clinique Hôpital"), MDM).data
    accented_patient = render(make_document(), MDM).data

    assert ascii_data.isascii()
    assert len(segments(ascii_data)["MSH"]) == 12
    assert segments(accented_author)["MSH"][17] == "UNICODE UTF-8"
    assert segments(accented_author)["TXA"][5] == "^Clinique Hôpital"
    assert segments(accented_patient)["MSH"][17] == "UNICODE UTF-8"
    assert strict_parse(accented_patient).msh.msh_18.value == "UNICODE UTF-8"


def test_mdm_refuses_what_the_oru_refuses() -> None:
    with pytest.raises(RenderError, match="RPPS"):
        render(make_document(sender_identifier="12345"), MDM)
    with pytest.raises(RenderError, match="application/msword"):
        render(make_document(content_type="application/msword"), MDM)
    with pytest.raises(RenderError):
        render(make_document(transaction_id="TX|1"), MDM)
    assert validate(make_document(), MDM) == []


@pytest.mark.parametrize(
    "message_type",
    ["MDM^T10", "MDM^T01", "ORU^R30", "ADT^A01", "mdm^t02", "MDM^T02^MDM_T02", "MDM", ""],
)
def test_other_message_types_are_refused_clearly(message_type: str) -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        OruOptions(message_type=message_type)

    (error,) = refused.value.errors()
    assert error["loc"] == ("message_type",)
    assert "'ORU^R01' or 'MDM^T02'" in error["msg"]


def test_message_type_defaults_to_oru_and_is_chosen_through_the_plugin_manager() -> None:
    fmt = load_plugins().formats["hl7v2-oru"]
    options = fmt.options_model.model_validate({"message_type": "MDM^T02"})
    assert isinstance(options, OruOptions)
    data = fmt.render(make_document(), options).data

    assert OruOptions().message_type == "ORU^R01"
    assert segments(data)["MSH"][8] == "MDM^T02^MDM_T02"
    assert render(make_document(), MDM).data == render(make_document(), options).data
