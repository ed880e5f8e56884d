"""Inbound HL7 v2: ADT into FHIR Patient/Encounter, ORU/MDM into documents.

The FHIR output is judged by fhir.resources (R4B models), which did not write it; the document
side is checked by a round trip through our own ORU writer, whose output hl7apy validates in
test_hl7v2_oru.py.
"""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.patient import Patient

from medcourier.engine.inbound import InboundError, PatientIdentifier
from medcourier.transforms.hl7v2.inbound import (
    AUTHORITY_URN,
    FR_CORE_0203,
    V2_0203,
    MessageError,
    UnsupportedMessageError,
    parse_adt,
    parse_document_message,
)
from medcourier.transforms.hl7v2.oru import render
from tests.test_hl7v2_oru import PDF_PAYLOAD, TRICKY_FAMILY, TRICKY_GIVEN, make_document

# A NIR with its key: 97 - (the 13 digits mod 97).
NIR_BODY = "2750599999999"
NIR = NIR_BODY + f"{97 - int(NIR_BODY) % 97:02d}"
BAD_NIR = NIR_BODY + f"{(97 - int(NIR_BODY) % 97 + 1) % 97:02d}"

PID3 = (
    f"IPP-1^^^HOSPA&1.2.250.1.999.1&ISO^PI~{NIR}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
)
# Family name with every escaped delimiter: D|UPONT^X&Y\Z; given names with accents, the French
# way: XPN-3 lists every birth given name, the first one included.
PID5 = r"D\F\UPONT\S\X\T\Y\E\Z^Zoé^Zoé Anaïs Hélène^^Mme^^L~MARTIN-LÉGER^Zoé^^^^^D"
PID = (
    f"PID|1||{PID3}||{PID5}||19750512|F|||12 rue de l'Église^Bât. B^Paris^^75001^FRA^H"
    "~^^Lyon^^^FRA^BDL||0612345678^PRN^CP~^NET^Internet^zoe@example.org|0140000000^WPN^PH"
)
PV1 = (
    "PV1|1|I|CARDIO^101^A^HOSPA||||||||||||||||V-2024-1^^^HOSPA&1.2.250.1.999.2&ISO^VN"
    + "|" * 25
    + "20240115103000"
)
PV1_DISCHARGED = PV1 + "|20240120090500"


def message(
    trigger: str,
    *segments: str,
    facility: str = "HOSPA",
    msh7: str = "20240115103000",
    evn6: str = "",
) -> str:
    structure = {"A40": "ADT_A39", "A28": "ADT_A05", "A31": "ADT_A05"}.get(trigger, "ADT_A01")
    return "\r".join(
        (
            f"MSH|^~\\&|PAM|{facility}|MEDCOURIER|MEDCOURIER|{msh7}||ADT^{trigger}^{structure}"
            "|MSG-1|P|2.5|||||FRA|UNICODE UTF-8",
            f"EVN||20240115103500||||{evn6}|HOSPA",
            *segments,
        )
    )


def validated_patient(patient: dict[str, Any]) -> Patient:
    return Patient.model_validate({**patient, "resourceType": "Patient"})


def validated_encounter(encounter: dict[str, Any]) -> Encounter:
    return Encounter.model_validate(
        {**encounter, "resourceType": "Encounter", "subject": {"reference": "Patient/p1"}}
    )


# --- ADT^A01: the whole patient and the visit ------------------------------------------------


def test_a01_gives_a_valid_patient_with_ipp_and_ins() -> None:
    event = parse_adt(message("A01", PID, PV1))

    assert (event.trigger, event.kind, event.event, event.facility) == (
        "A01",
        "upsert",
        "ADT^A01",
        "HOSPA",
    )
    assert event.control_id == "MSG-1"
    ipp, ins = event.patient["identifier"]
    assert ipp == {
        "system": "urn:oid:1.2.250.1.999.1",
        "value": "IPP-1",
        "type": {"coding": [{"system": V2_0203, "code": "PI"}]},
        "assigner": {"display": "HOSPA"},
    }
    # The INS keeps its OID as system; FR Core fixes its type code and use.
    assert ins == {
        "system": "urn:oid:1.2.250.1.213.1.4.8",
        "value": NIR,
        "use": "official",
        "type": {"coding": [{"system": FR_CORE_0203, "code": "INS-NIR"}]},
        "assigner": {"display": "ASIP-SANTE-INS-NIR"},
    }
    assert event.patient_identifiers == (
        PatientIdentifier("urn:oid:1.2.250.1.999.1", "IPP-1"),
        PatientIdentifier("urn:oid:1.2.250.1.213.1.4.8", NIR),
    )
    assert "id" not in event.patient and "meta" not in event.patient
    assert "managingOrganization" not in event.patient
    resource = validated_patient(event.patient)
    assert resource.gender == "female"
    assert str(resource.birthDate) == "1975-05-12"


def test_a01_names_are_unescaped_and_keep_their_accents() -> None:
    event = parse_adt(message("A01", PID, PV1))

    birth, used = event.patient["name"]
    assert birth == {
        "use": "official",
        "family": "D|UPONT^X&Y\\Z",
        "given": ["Zoé", "Anaïs", "Hélène"],  # the repeated first given name is not doubled
        "prefix": ["Mme"],
    }
    assert used == {"use": "usual", "family": "MARTIN-LÉGER", "given": ["Zoé"]}


def test_a01_addresses_and_contacts() -> None:
    patient = parse_adt(message("A01", PID, PV1)).patient

    assert patient["address"] == [
        {
            "line": ["12 rue de l'Église", "Bât. B"],
            "city": "Paris",
            "postalCode": "75001",
            "country": "FRA",
            "use": "home",
        }
    ]
    # The birth place (PAM France: PID-11 of type BDL) is not a contact address.
    assert patient["extension"] == [
        {
            "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
            "valueAddress": {"city": "Lyon", "country": "FRA"},
        }
    ]
    assert patient["telecom"] == [
        {"system": "phone", "value": "0612345678", "use": "mobile"},
        {"system": "email", "value": "zoe@example.org", "use": "home"},
        {"system": "phone", "value": "0140000000", "use": "work"},
    ]


def test_a01_gives_a_valid_encounter() -> None:
    event = parse_adt(message("A01", PID, PV1))

    assert event.encounter == {
        "identifier": [
            {
                "system": "urn:oid:1.2.250.1.999.2",
                "value": "V-2024-1",
                "type": {"coding": [{"system": V2_0203, "code": "VN"}]},
                "assigner": {"display": "HOSPA"},
            }
        ],
        "status": "in-progress",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "IMP",
            "display": "inpatient encounter",
        },
        "location": [{"location": {"display": "CARDIO/101/A"}}],
        # No offset in PV1-44: local time in Paris, winter.
        "period": {"start": "2024-01-15T10:30:00+01:00"},
    }
    validated_encounter(event.encounter)
    assert event.message_datetime == datetime(2024, 1, 15, 9, 30, tzinfo=UTC)
    assert event.event_datetime == datetime(2024, 1, 15, 9, 35, tzinfo=UTC)  # EVN-2
    assert event.notes == ()


# --- the other triggers ----------------------------------------------------------------------


def test_a03_discharge_finishes_the_visit() -> None:
    event = parse_adt(message("A03", PID, PV1_DISCHARGED))

    assert event.kind == "discharge"
    assert event.encounter is not None
    assert event.encounter["status"] == "finished"
    assert event.encounter["period"] == {
        "start": "2024-01-15T10:30:00+01:00",
        "end": "2024-01-20T09:05:00+01:00",
    }
    validated_encounter(event.encounter)


def test_a03_without_discharge_time_takes_the_event_time() -> None:
    event = parse_adt(message("A03", PID, PV1, evn6="20240720180000+0200"))

    assert event.encounter is not None
    assert event.encounter["period"]["end"] == "2024-07-20T18:00:00+02:00"
    assert event.event_datetime == datetime(2024, 7, 20, 16, 0, tzinfo=UTC)  # EVN-6 first


def test_a11_cancels_the_admission() -> None:
    event = parse_adt(message("A11", PID, PV1))

    assert event.kind == "cancel-admit"
    assert event.encounter is not None
    assert event.encounter["status"] == "cancelled"
    validated_encounter(event.encounter)


def test_a13_reopens_the_visit_without_its_end() -> None:
    event = parse_adt(message("A13", PID, PV1_DISCHARGED))

    assert event.kind == "cancel-discharge"
    assert event.encounter is not None
    assert event.encounter["status"] == "in-progress"
    assert "end" not in event.encounter["period"]


@pytest.mark.parametrize(
    ("trigger", "pv1", "status"),
    [
        ("A04", PV1, "in-progress"),
        ("A05", PV1, "planned"),
        ("A08", PV1, "in-progress"),
        ("A08", PV1_DISCHARGED, "finished"),
    ],
)
def test_encounter_status_by_trigger(trigger: str, pv1: str, status: str) -> None:
    event = parse_adt(message(trigger, PID, pv1))

    assert event.kind == "upsert"
    assert event.encounter is not None
    assert event.encounter["status"] == status


def test_a40_merge_names_the_absorbed_patient() -> None:
    mrg = "MRG|IPP-OLD^^^HOSPA&1.2.250.1.999.1&ISO^PI~77^^^^PI"
    event = parse_adt(message("A40", PID, mrg, "PV1|1|N"))

    assert event.kind == "merge"
    assert event.merge_from == (
        PatientIdentifier("urn:oid:1.2.250.1.999.1", "IPP-OLD"),
        PatientIdentifier(AUTHORITY_URN + "HOSPA", "77"),
    )
    assert event.encounter is None
    assert event.patient_identifiers[0].value == "IPP-1"


def test_a28_without_pv1_is_patient_only() -> None:
    event = parse_adt(message("A28", "PID|1||42^^^^PI||DOE^JOHN||1980|M"))

    assert event.kind == "upsert"
    assert event.encounter is None
    # No assigning authority: the IPP belongs to the sending facility.
    assert event.patient["identifier"] == [
        {
            "system": AUTHORITY_URN + "HOSPA",
            "value": "42",
            "type": {"coding": [{"system": V2_0203, "code": "PI"}]},
            "assigner": {"display": "HOSPA"},
        }
    ]
    assert event.patient["birthDate"] == "1980"  # partial dates stay partial
    validated_patient(event.patient)


def test_facility_with_an_oid_and_a_visit_without_authority() -> None:
    pv1 = "PV1|1|O|||||||||||||||||V9"
    event = parse_adt(
        message("A04", "PID|1||42||DOE", pv1, facility="CHU Sud^1.2.250.1.71.4.2.2^ISO")
    )

    assert event.facility == "CHU Sud"
    assert event.patient["identifier"][0]["system"] == "urn:oid:1.2.250.1.71.4.2.2"
    assert event.encounter is not None
    assert event.encounter["identifier"][0]["system"] == "urn:medcourier:visit:CHU%20Sud"
    assert event.encounter["class"]["code"] == "AMB"


def test_unknown_patient_class_is_ambulatory_with_a_note() -> None:
    pv1 = "PV1|1|Z|||||||||||||||||V9"
    event = parse_adt(message("A04", "PID|1||42||DOE", pv1))

    assert event.encounter is not None
    assert event.encounter["class"]["code"] == "AMB"
    assert len(event.notes) == 1 and "PV1-2" in event.notes[0]


def test_deceased_patient() -> None:
    pid = "PID|1||42||DOE|||M" + "|" * 21 + "20240301083000+0100|Y"
    patient = parse_adt(message("A08", pid)).patient

    assert patient["deceasedDateTime"] == "2024-03-01T08:30:00+01:00"
    validated_patient(patient)


# --- text handling ---------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["\n", "\r\n", "\r\r"])
def test_segment_separators_are_tolerated(separator: str) -> None:
    text = message("A01", PID, PV1).replace("\r", separator) + separator

    event = parse_adt(text)

    assert event.encounter is not None
    assert event.patient["name"][0]["family"] == "D|UPONT^X&Y\\Z"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"A\\B", "AB"),  # empty escape sequence: dropped, without python-hl7's deprecated warn
        (r"O\Q\NEIL", "ONEIL"),  # unknown sequence: dropped
        ("BACK\\", "BACK\\"),  # an escape character that never closes is a literal
        ("Andr\\XC3A9\\", "André"),  # \X..\ bytes are UTF-8 when they can be
        ("Andr\\XE9\\", "André"),  # ... and Latin-1 otherwise
        (r"\H\Dupont\N\ Line\.br\Two", "Dupont Line\nTwo"),
        ("Caf\\X5C\\", "Caf\\"),  # a decoded escape character stays itself
    ],
)
def test_escape_sequences(raw: str, expected: str) -> None:
    patient = parse_adt(message("A28", f"PID|1||42||{raw}")).patient

    assert patient["name"][0]["family"] == expected


def test_delimiters_declared_in_msh_are_used() -> None:
    text = (
        "MSH|*!/%|PAM|HOSPA|||20240115103000||ADT*A28|1|P|2.5\r"
        "PID|1||42***HOSPA%1.2.3%ISO*PI!43***X*PI||O/S/BRIEN/E/*ANNE/T/X"
    )

    patient = parse_adt(text).patient

    assert [(i["system"], i["value"]) for i in patient["identifier"]] == [
        ("urn:oid:1.2.3", "42"),
        (AUTHORITY_URN + "X", "43"),
    ]
    assert patient["name"] == [{"family": "O*BRIEN/", "given": ["ANNE%X"]}]


@pytest.mark.parametrize(
    ("ts", "assume_tz", "expected"),
    [
        ("20240715103000", "Europe/Paris", "2024-07-15T10:30:00+02:00"),  # summer time
        ("202407151030", "Europe/Paris", "2024-07-15T10:30:00+02:00"),
        ("2024071510", "UTC", "2024-07-15T10:00:00+00:00"),
        ("20240715103000.25-0500", "Europe/Paris", "2024-07-15T10:30:00.25-05:00"),
        ("20240715", "Europe/Paris", "2024-07-15"),
    ],
)
def test_time_stamps_become_fhir_datetimes(ts: str, assume_tz: str, expected: str) -> None:
    pv1 = "PV1|1|I|||||||||||||||||V9" + "|" * 25 + ts
    event = parse_adt(message("A01", "PID|1||42||DOE", pv1), assume_tz=assume_tz)

    assert event.encounter is not None
    assert event.encounter["period"]["start"] == expected
    validated_encounter(event.encounter)


def test_assume_tz_also_takes_a_tzinfo() -> None:
    tz = timezone(timedelta(hours=4))  # La Réunion
    event = parse_adt(message("A01", "PID|1||42||DOE", PV1), assume_tz=tz)

    assert event.encounter is not None
    assert event.encounter["period"]["start"] == "2024-01-15T10:30:00+04:00"
    assert event.message_datetime == datetime(2024, 1, 15, 6, 30, tzinfo=UTC)


# --- ADT errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "location", "words"),
    [
        (message("A01", PV1), "PID^1", "no PID segment"),
        (message("A28", "PID|1||||DOE"), "PID^1^3", "PID-3 (patient identifier list) is empty"),
        (message("A28", "PID|1||^^^HOSPA^PI||DOE"), "PID^1^3", "PID-3"),
        (message("A40", PID), "MRG^1", "no MRG segment"),
        (message("A40", PID, "MRG|"), "MRG^1^1", "MRG-1"),
        (message("A28", "PID|1||42||DOE||19751312"), "PID^1^7", "PID-7"),
        (message("A28", "PID|1||42||DOE||1975-05-12"), "PID^1^7", "PID-7"),
        (message("A01", PID), "PV1^1", "PV1"),
        (message("A03", PID, "PV1|1|I"), "PV1^1^19", "PV1-19 (visit number) is empty"),
        (message("A01", PID, PV1 + "|2024013"), "PV1^1^45", "PV1-45"),
        (message("A01", PID, PV1, msh7="yesterday"), "MSH^1^7", "MSH-7"),
        (message("A01", PID, PV1, evn6="2024011525"), "EVN^1^6", "EVN-6"),
        (
            message("A28", f"PID|1||{BAD_NIR}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"),
            "PID^1^3",
            "not a valid NIR",
        ),
        (message("A28", "PID|1||42||DOE", facility=""), "PID^1^3", "MSH-4"),
        (message("A28", PID, "PID|2||43||DOE"), "PID^2", "one per message"),
        ("PID|1||42", "MSH^1", "MSH"),
        ("", "MSH^1", "MSH"),
    ],
)
def test_adt_errors_name_their_location(text: str, location: str, words: str) -> None:
    with pytest.raises(MessageError) as caught:
        parse_adt(text)

    assert caught.value.location == location
    assert words in str(caught.value)
    assert not isinstance(caught.value, UnsupportedMessageError)
    assert isinstance(caught.value, InboundError)  # what the engine answers AE with


@pytest.mark.parametrize("trigger", ["A02", "A47"])
def test_unsupported_triggers_are_rejected_as_such(trigger: str) -> None:
    with pytest.raises(UnsupportedMessageError) as caught:
        parse_adt(message(trigger, PID, PV1))

    assert caught.value.location == "MSH^1^9"


def test_a_result_is_not_an_adt() -> None:
    with pytest.raises(UnsupportedMessageError):
        parse_adt(render(make_document()).data.decode())


# --- documents: ORU round trip ---------------------------------------------------------------

RPPS = "10003456789"


def test_our_oru_reads_back_identically() -> None:
    document = make_document(sender_identifier=RPPS)

    parsed = parse_document_message(render(document).data.decode("utf-8"))

    assert parsed.message_type == "ORU^R01"
    assert parsed.control_id == document.transaction_id
    assert parsed.facility == "MEDCOURIER"
    assert parsed.message_datetime == document.created_at
    (extracted,) = parsed.documents
    assert extracted.payload == PDF_PAYLOAD
    assert extracted.content_type == "application/pdf"
    assert extracted.document_type == document.document_type
    assert extracted.title == document.title
    assert extracted.sender_identifier == RPPS
    assert extracted.reference is None
    assert extracted.extra == {"result_status": "F"}
    assert parsed.patient_identifiers == (
        PatientIdentifier("urn:oid:1.2.250.1.999.1", "IPP-0042"),
        PatientIdentifier("https://hospital.example/ipp", "77"),
    )
    official = parsed.patient["name"][0]
    assert official["family"] == TRICKY_FAMILY
    assert official["given"] == [TRICKY_GIVEN, "Anne", "Lise"]
    assert parsed.patient["birthDate"] == document.patient["birthDate"]
    assert (parsed.visit_number, parsed.visit_system) == ("V-2024-0001", "urn:oid:1.2.250.1.999.2")
    assert parsed.encounter is not None
    assert parsed.encounter["period"] == document.encounter["period"]  # type: ignore[index]
    validated_patient(parsed.patient)
    validated_encounter(parsed.encounter)


def test_oru_without_visit() -> None:
    parsed = parse_document_message(render(make_document(encounter=None)).data.decode())

    assert parsed.visit_number is None and parsed.encounter is None
    assert parsed.documents[0].sender_identifier is None


ORU_HEAD = (
    "MSH|^~\\&|LAB|HOSPA|||20240115103000||ORU^R01^ORU_R01|R-1|P|2.5\r"
    "PID|1||42^^^HOSPA^PI||DOE^JANE\r"
    "OBR|1||F-77|11502-2^Laboratory report^LN" + "|" * 28 + "10003456789&DR&HOUSE&&&&&&RPPS\r"
)


def test_oru_with_two_documents_and_text_encodings() -> None:
    text_body = r"Résultat\.br\Ligne 2 \T\ fin"
    hex_body = b"\xff\xd8\xff\xe0JFIF".hex().upper()
    text = (
        ORU_HEAD
        + "OBX|1|ED|11502-2^Bilan^LN||^AP^PDF^Base64^"
        + base64.b64encode(PDF_PAYLOAD).decode()
        + "||||||F\r"
        + "OBX|2|TX|NOTE||a comment||||||F\r"
        + f"OBX|3|ED|18748-4^Image^LN||^IM^JPEG^Hex^{hex_body}||||||F\r"
        + f"OBX|4|ED|^Résumé||^TEXT^PLAIN^A^{text_body}||||||C\r"
    )

    parsed = parse_document_message(text)

    pdf, jpeg, plain = parsed.documents
    assert (pdf.obx, pdf.payload, pdf.content_type) == (1, PDF_PAYLOAD, "application/pdf")
    assert (pdf.document_type, pdf.title) == ("11502-2", "Bilan")
    # OBX-16 is empty: the RPPS comes from OBR-32, the principal result interpreter.
    assert pdf.sender_identifier == RPPS
    assert pdf.extra == {"result_status": "F", "filler_order_number": "F-77"}
    assert (jpeg.obx, jpeg.content_type, jpeg.payload) == (3, "image/jpeg", b"\xff\xd8\xff\xe0JFIF")
    assert plain.payload == "Résultat\nLigne 2 & fin".encode()
    assert plain.content_type == "application/txt"
    # Not coded in LOINC: OBR-4 gives the type, OBX-3 still the title.
    assert (plain.document_type, plain.title) == ("11502-2", "Résumé")
    assert plain.extra["result_status"] == "C"


def test_oru_reference_pointer() -> None:
    text = ORU_HEAD + "OBX|1|RP|11502-2^Bilan^LN||https://pacs.example/doc/1^PACS^AP^PDF||||||F\r"

    (reference,) = parse_document_message(text).documents

    assert reference.reference == "https://pacs.example/doc/1"
    assert reference.payload is None
    assert reference.content_type == "application/pdf"


def test_base64_broken_into_escaped_lines_is_decoded() -> None:
    encoded = base64.b64encode(PDF_PAYLOAD).decode()
    wrapped = r"\.br\ ".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    text = ORU_HEAD + f"OBX|1|ED|11502-2^Bilan^LN||^AP^PDF^Base64^{wrapped}||||||F\r"

    assert parse_document_message(text).documents[0].payload == PDF_PAYLOAD


@pytest.mark.parametrize(
    ("ed_type", "subtype", "expected"),
    [
        ("AP", "PDF", "application/pdf"),
        ("application", "pdf", "application/pdf"),
        ("IM", "JPEG", "image/jpeg"),
        ("IMAGE", "JPEG", "image/jpeg"),
        ("IM", "PNG", "image/png"),
        ("TEXT", "PLAIN", "application/txt"),
        ("TX", "", "application/txt"),
        ("TEXT", "XML", "application/xml"),
        ("AP", "x-hl7-cda-level-one", "application/xml"),
        ("AP", "ZIP", "application/octet-stream"),
    ],
)
def test_content_type_from_ed_type_and_subtype(ed_type: str, subtype: str, expected: str) -> None:
    text = ORU_HEAD + f"OBX|1|ED|11502-2^Bilan^LN||^{ed_type}^{subtype}^Base64^QUJD||||||F\r"

    parsed = parse_document_message(text)

    assert parsed.documents[0].content_type == expected
    assert bool(parsed.notes) == (expected == "application/octet-stream")


# --- documents: MDM --------------------------------------------------------------------------


def test_mdm_t02_with_txa() -> None:
    txa = (
        "TXA|1|DS|AP|20240120090000||20240120085000|||"
        f"8{RPPS}^HOUSE^GREGORY^^^DR^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^IDNPS"
        "|||DOC-123^HOSPA|||||AU"
    )
    text = "\r".join(
        (
            "MSH|^~\\&|DPI|HOSPA|||20240120090000||MDM^T02^MDM_T02|M-1|P|2.5",
            "EVN|T02|20240120090000",
            "PID|1||42^^^HOSPA^PI||DOE^JANE",
            "PV1|1|I|||||||||||||||||V-9",
            txa,
            "OBX|1|ED|LETTRE^Lettre de sortie^L||^AP^PDF^Base64^"
            + base64.b64encode(PDF_PAYLOAD).decode()
            + "||||||F",
        )
    )

    parsed = parse_document_message(text)

    assert parsed.message_type == "MDM^T02"
    (document,) = parsed.documents
    assert document.payload == PDF_PAYLOAD
    assert document.document_type == "11488-4"  # nothing coded in LOINC
    assert document.title == "Lettre de sortie"
    assert document.sender_identifier == RPPS  # TXA-9, the IDNPS reduced to the RPPS
    assert document.extra == {
        "result_status": "F",
        "document_type_code": "DS",
        "unique_document_number": "DOC-123",
        "completion_status": "AU",
    }
    assert parsed.visit_number == "V-9"
    assert parsed.visit_system == "urn:medcourier:visit:HOSPA"


# --- document errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obx", "location", "words"),
    [
        ("OBX|1|TX|NOTE||hello", "OBX^1^2", "no document in the message (OBX of type ED)"),
        ("OBX|1|TX|NOTE||x\rOBX|2|ED|X||^AP^PDF^Base64^QUJD!||||||F", "OBX^2^5", "Base64"),
        ("OBX|1|ED|X||^AP^PDF^Base64^QUJ||||||F", "OBX^1^5", "Base64"),
        ("OBX|1|ED|X||^IM^JPEG^Hex^FFD8F||||||F", "OBX^1^5", "hexadecimal"),
        ("OBX|1|ED|X||^AP^PDF^Base64^||||||F", "OBX^1^5", "no data"),
        ("OBX|1|ED|X||||||||F", "OBX^1^5", "empty"),
        ("OBX|1|ED|X||^AP^PDF^UU^QUJD||||||F", "OBX^1^5", "UU"),
        ("OBX|1|RP|X||^PACS||||||F", "OBX^1^5", "RP-1"),
    ],
)
def test_document_errors_name_their_location(obx: str, location: str, words: str) -> None:
    with pytest.raises(MessageError) as caught:
        parse_document_message(ORU_HEAD + obx)

    assert caught.value.location == location
    assert words in str(caught.value)


def test_result_without_obx_or_pid() -> None:
    with pytest.raises(MessageError) as no_obx:
        parse_document_message(ORU_HEAD)
    head_without_pid = "\r".join(s for s in ORU_HEAD.split("\r") if not s.startswith("PID"))
    with pytest.raises(MessageError) as no_pid:
        parse_document_message(head_without_pid + "OBX|1|ED|X||^AP^PDF^Base64^QUJD")

    assert no_obx.value.location == "OBX^1"
    assert no_pid.value.location == "PID^1"


def test_an_adt_carries_no_documents() -> None:
    with pytest.raises(UnsupportedMessageError) as caught:
        parse_document_message(message("A01", PID, PV1))

    assert caught.value.location == "MSH^1^9"


# --- size ------------------------------------------------------------------------------------


def test_five_megabyte_payload(capsys: pytest.CaptureFixture[str]) -> None:
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    text = render(make_document(payload=payload)).data.decode("utf-8")

    started = time.perf_counter()
    parsed = parse_document_message(text)
    elapsed = time.perf_counter() - started

    assert parsed.documents[0].payload == payload
    with capsys.disabled():
        print(f"\n5 MiB ORU ({len(text) / 1e6:.1f} MB of text) parsed in {elapsed * 1000:.0f} ms")
