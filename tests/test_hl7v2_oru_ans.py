"""The ``hl7v2-ans-cda`` format (ANS "Transmission de documents CDA en HL7v2"), judged by
libraries and rules that did not write the message.

- hl7apy (strict) checks the structure and data types: ORU_R01 in v2.5, MDM_T02 in v2.6. PRT is
  not a segment of either version (the guide pre-adopts it from v2.9). hl7apy does not skip it:
  the OBSERVATION group closes on it, the metadata OBX fall into a new PATIENT_RESULT without
  OBR, and validation fails. So the structure is validated without the PRT segments, the way a
  v2.5 receiver skips a segment it does not know, and each PRT is validated on its own against
  hl7apy's v2.8.2 definition, where PRT exists.
- Base64 data (the CDA, the mail bodies) is replaced by a short placeholder before hl7apy sees it:
  hl7apy caps ED data at 199 characters (crs4/hl7apy#45), a limit the standard does not have.
- The embedded CDA goes through ``../shared/validators/cda/cda_check.py`` (CI-SIS XML schema and
  StrucMin schematron). Its absence fails the run.
- Field checks split the message by hand, so no library's unescaping hides a mistake.
"""

from __future__ import annotations

import base64
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.exceptions import ValidationError as HL7apyValidationError
from hl7apy.parser import parse_message, parse_segment
from lxml import etree
from stdnum.fr import nir

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document
from medcourier.engine.plugins import load_plugins
from medcourier.transforms.cda import dmp
from medcourier.transforms.cda.dmp import Replacement
from medcourier.transforms.hl7v2 import oru_ans
from medcourier.transforms.hl7v2.oru_ans import (
    META_ORDER,
    AnsCdaOptions,
    render,
    render_message,
    validate,
)

V3 = {"v3": "urn:hl7-org:v3"}
SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)

NIR_BASE = "2790351215189"
INS = NIR_BASE + nir.calc_check_digits(NIR_BASE)
IPP_OID = "1.2.250.1.999.1.2"
RPPS = "10101010101"
RECIPIENT_RPPS = "10000000001"
DOC_ROOT = "1.2.250.1.999.1.1.1"
PDF = (b"%PDF-1.4\n" + bytes(range(256)) * 8)[:2048]
FLAGS = META_ORDER[:10]  # the ten Y/N metadata, before the two optional mail bodies


# --- the CDA judge ---------------------------------------------------------------------------


# --- inputs ----------------------------------------------------------------------------------


def fr_core_patient(**overrides: Any) -> dict[str, Any]:
    """A patient shaped as FR Core carries a qualified INS identity."""
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "pat-1",
        "extension": [
            {
                "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability",
                "extension": [
                    {
                        "url": "identityStatus",
                        "valueCoding": {
                            "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445",
                            "code": "VALI",
                        },
                    }
                ],
            },
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                "valueAddress": {
                    "extension": [{"url": dmp.INSEE_CODE_URL, "valueCoding": {"code": "63220"}}],
                    "city": "Thiers",
                },
            },
        ],
        "identifier": [
            {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": INS},
            {
                "system": f"urn:oid:{IPP_OID}",
                "value": "IPP-0042",
                "assigner": {"display": "CH Test"},
            },
        ],
        "name": [
            {"use": "official", "family": "PAT-TROIS", "given": ["DOMINIQUE", "MARIE"]},
            {"use": "usual", "family": "MARTIN", "given": ["Domi"]},
        ],
        "gender": "female",
        "birthDate": "1979-03-28",
        "address": [
            {"line": ["28 avenue de Breteuil"], "city": "Paris", "postalCode": "75007"},
        ],
    }
    patient.update(overrides)
    return patient


ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "status": "finished",
    "class": {"code": "IMP"},
    "identifier": [{"system": "urn:oid:1.2.250.1.999.1.3", "value": "V-2024-0001"}],
    "period": {"start": "2024-04-28T08:15:00+02:00", "end": "2024-05-01T09:00:00+02:00"},
}


def make_document(**overrides: Any) -> Document:
    fields: dict[str, Any] = {
        "transaction_id": "TX-20240501-0001",
        "created_at": datetime(2024, 5, 1, 8, 30, 15, tzinfo=UTC),
        "content_type": "application/pdf",
        "document_type": "18748-4",
        "title": "CR d'imagerie",
        "payload": PDF,
        "patient": fr_core_patient(),
        "encounter": ENCOUNTER,
        "sender_identifier": RPPS,
    }
    fields.update(overrides)
    return Document(**fields)


def make_options(**overrides: Any) -> AnsCdaOptions:
    raw: dict[str, Any] = {
        "receiving_application": "PFI",
        "receiving_facility": "CHU_X",
        "sending_application": "RIS",
        "sending_facility": "CHU_X",
        "cda": {
            "document_id_root": DOC_ROOT,
            "custodian": {"name": "CH de Test", "id_extension": "1750000000"},
        },
        "sender_names": {RPPS: {"family": "DUPONT", "given": "Jean"}},
    }
    raw.update(overrides)
    return AnsCdaOptions.model_validate(raw)


RECIPIENT = {
    "rpps": RECIPIENT_RPPS,
    "family": "HODA",
    "given": "Adam",
    "mssante": "adam.hoda@test-ci-sis.mssante.fr",
}


# --- reading the message ---------------------------------------------------------------------


def segment_list(data: bytes) -> list[list[str]]:
    """The message split by hand into segments of fields (MSH-1 is not a split item)."""
    text = data.decode("utf-8")
    assert text.endswith("\r"), "the last segment must be terminated like the others"
    return [segment.split("|") for segment in text[:-1].split("\r")]


def only(data: bytes, name: str) -> list[str]:
    (found,) = [fields for fields in segment_list(data) if fields[0] == name]
    return found


def every(data: bytes, name: str) -> list[list[str]]:
    return [fields for fields in segment_list(data) if fields[0] == name]


def placeholder(text: str) -> str:
    """Every Base64 ED payload shortened to a placeholder hl7apy accepts."""
    return re.sub(r"\^Base64\^[A-Za-z0-9+/=]*", "^Base64^QUJD", text)


def strict_structure(data: bytes) -> Message:
    """hl7apy strict on the message without its (v2.9) PRT segments."""
    kept = [s for s in data.decode("utf-8").split("\r") if s and not s.startswith("PRT|")]
    message = parse_message(
        placeholder("\r".join(kept) + "\r"),
        validation_level=VALIDATION_LEVEL.STRICT,
        find_groups=True,
    )
    assert isinstance(message, Message)
    assert message.validate() is True
    return message


def strict_prt(fields: list[str]) -> Segment:
    """One PRT segment, validated strictly against the v2.8.2 definition (PRT exists from 2.7)."""
    segment = parse_segment(
        "|".join(fields), version="2.8.2", validation_level=VALIDATION_LEVEL.STRICT
    )
    assert isinstance(segment, Segment)
    assert segment.validate() is True
    return segment


def embedded_cda(data: bytes) -> bytes:
    obx5 = every(data, "OBX")[0][5].split("^")
    assert obx5[2:4] == ["XML", "Base64"]
    return base64.b64decode(obx5[4], validate=True)


def metadata(data: bytes) -> list[tuple[str, str]]:
    """(OBX-3.1, OBX-5.1) of every OBX after the document's, in message order."""
    return [(obx[3].split("^")[0], obx[5].split("^")[0]) for obx in every(data, "OBX")[1:]]


# --- ORU^R01: the structure, judged by hl7apy -----------------------------------------------


def test_oru_is_a_strictly_valid_v25_oru_r01_without_its_prt_segments() -> None:
    options = make_options(recipients=[RECIPIENT], mssante_patient=True, reply_to="dr@x.mssante.fr")
    message = strict_structure(render(make_document(), options).data)

    assert message.name == "ORU_R01"
    assert message.msh.msh_12.to_er7() == "2.5"
    result = message.oru_r01_patient_result
    assert result.oru_r01_patient.pid.pid_3[0].cx_1.value == INS
    order = result.oru_r01_order_observation
    assert order.orc.orc_1.value == "NW"
    observations = order.children.get("ORU_R01_OBSERVATION")
    assert [obs.obx.obx_3.ce_1.value for obs in observations] == ["18748-4", *FLAGS]


def test_hl7apy_refuses_prt_inside_a_v25_oru_which_is_why_it_is_checked_apart() -> None:
    """If this starts failing, hl7apy learned to skip unknown segments: check the whole message."""
    options = make_options(recipients=[RECIPIENT])
    text = placeholder(render(make_document(), options).data.decode("utf-8"))

    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)

    # The OBSERVATION group ends at the PRT: the metadata OBX land in a new PATIENT_RESULT
    # whose ORDER_OBSERVATION has no OBR.
    assert len(message.children.get("ORU_R01_PATIENT_RESULT")) == 2
    with pytest.raises(HL7apyValidationError, match="OBR"):
        message.validate()


def test_prt_segments_follow_the_document_obx_and_validate_as_v29_prt() -> None:
    options = make_options(recipients=[RECIPIENT], mssante_patient=True, reply_to="dr@x.mssante.fr")
    data = render(make_document(), options).data
    names = [fields[0] for fields in segment_list(data)]

    first_obx = names.index("OBX")
    assert names[first_obx + 1 : first_obx + 5] == ["PRT"] * 4
    assert names[first_obx + 5] == "OBX"
    participations = [strict_prt(fields).prt_4.to_er7() for fields in every(data, "PRT")]
    assert participations == [
        "SB^Send by^participation",
        "RCT^Result Copies To^participation",
        "RCT^Result Copies To^participation",
        "REPLY^Reply To^participation",
    ]


def test_prt_sb_names_the_sender_by_rpps_and_its_organization() -> None:
    sender = strict_prt(every(render(make_document(), make_options()).data, "PRT")[0])

    assert sender.prt_2.to_er7() == "UC"
    person = sender.prt_5
    assert person.xcn_1.to_er7() == "8" + RPPS
    assert (person.xcn_2.to_er7(), person.xcn_3.to_er7()) == ("DUPONT", "Jean")
    assert person.xcn_9.to_er7() == "ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO"
    assert person.xcn_13.to_er7() == "RPPS"
    organization = sender.prt_8
    assert organization.xon_1.to_er7() == "CH de Test"
    assert organization.xon_6.to_er7() == "ASIP-SANTE-ST&1.2.250.1.71.4.2.2&ISO"
    assert organization.xon_7.to_er7() == "FINEG"
    assert organization.xon_10.to_er7() == "1750000000"


def test_prt_rct_carries_each_recipient_and_the_patient_mailbox() -> None:
    options = make_options(recipients=[RECIPIENT], mssante_patient=True)
    professional, patient = every(render(make_document(), options).data, "PRT")[1:]

    doctor = strict_prt(professional)
    assert doctor.prt_5.xcn_1.to_er7() == "8" + RECIPIENT_RPPS
    assert doctor.prt_5.xcn_13.to_er7() == "RPPS"
    assert doctor.prt_15.to_er7() == "^^X.400^adam.hoda@test-ci-sis.mssante.fr"
    person = strict_prt(patient)
    assert person.prt_5.xcn_1.to_er7() == INS
    assert person.prt_5.xcn_9.to_er7() == "ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO"
    assert person.prt_5.xcn_13.to_er7() == "INS"
    assert person.prt_15.to_er7() == f"^^X.400^{INS}@patient.mssante.fr"


def test_without_recipients_only_the_sender_prt_is_written() -> None:
    prts = every(render(make_document(), make_options()).data, "PRT")

    assert [prt[4].split("^")[0] for prt in prts] == ["SB"]


# --- the embedded CDA ------------------------------------------------------------------------


def test_embedded_cda_passes_the_ci_sis_judge_and_shares_the_pid_identifiers(
    judge: Callable[[bytes], list[str]],
) -> None:
    data = render(make_document(), make_options()).data
    cda = embedded_cda(data)

    assert judge(cda) == []
    root = etree.fromstring(cda, SAFE_PARSER)
    cda_ids = [
        (element.get("root"), element.get("extension"))
        for element in root.findall("v3:recordTarget/v3:patientRole/v3:id", V3)
    ]
    pid_ids = [
        (cx.split("^")[3].split("&")[1], cx.split("^")[0]) for cx in only(data, "PID")[3].split("~")
    ]
    assert pid_ids == cda_ids
    assert every(data, "OBX")[0][5].split("^")[:2] == ["", "TEXT"]


def test_replacement_embeds_a_cda_with_rplc_that_passes_the_judge(
    judge: Callable[[bytes], list[str]],
) -> None:
    data = render_message(
        make_document(),
        make_options(),
        action="replace",
        replaces=Replacement(document_id="TX-OLD-1"),
    ).data
    cda = embedded_cda(data)

    assert judge(cda) == []
    parent = etree.fromstring(cda, SAFE_PARSER).find(
        "v3:relatedDocument[@typeCode='RPLC']/v3:parentDocument/v3:id", V3
    )
    assert parent is not None and parent.get("extension") == "TX-OLD-1"


# --- header, patient, order ------------------------------------------------------------------


def test_msh_carries_country_charset_and_profile() -> None:
    msh = only(render(make_document(), make_options()).data, "MSH")

    assert msh[2:6] == ["RIS", "CHU_X", "PFI", "CHU_X"]
    assert msh[8] == "ORU^R01^ORU_R01"
    assert msh[9] == "TX-20240501-0001"
    assert msh[11] == "2.5"
    assert msh[16] == "FRA"  # MSH-17 (MSH-1 is the "|" itself)
    assert msh[17] == "UNICODE UTF-8"  # MSH-18
    assert msh[20] == "2.1^CISIS_CDA_HL7_V2"  # MSH-21


def test_pid3_carries_the_ins_then_the_ipp() -> None:
    pid = only(render(make_document(), make_options()).data, "PID")

    ins, ipp = pid[3].split("~")
    assert ins == f"{INS}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
    assert ipp == f"IPP-0042^^^CH Test&{IPP_OID}&ISO^PI"


def test_pid_carries_the_ins_identity_traits() -> None:
    pid = only(render(make_document(), make_options()).data, "PID")

    assert pid[5].split("~") == [
        "PAT-TROIS^DOMINIQUE^DOMINIQUE MARIE^^^^L",
        "MARTIN^Domi^^^^^D",
    ]
    assert (pid[7], pid[8]) == ("19790328", "F")
    assert pid[11].split("~")[-1] == "^^Thiers^^^^BDL^^63220"
    assert pid[32] == "VALI"


def test_nia_and_test_ins_get_their_own_assigning_authority() -> None:
    patient = fr_core_patient(identifier=[{"system": "urn:oid:1.2.250.1.213.1.4.10", "value": INS}])
    pid = only(render(make_document(patient=patient), make_options()).data, "PID")

    assert pid[3] == f"{INS}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS"


def test_every_ins_authority_has_a_namespace() -> None:
    assert set(oru_ans.INS_NAMESPACES) == set(dmp.INS_OIDS)


def test_pv1_carries_the_visit() -> None:
    pv1 = only(render(make_document(), make_options()).data, "PV1")

    assert pv1[2] == "I"
    assert pv1[19].split("^")[0] == "V-2024-0001"


def test_obr4_is_obx3_the_j07_document_type() -> None:
    data = render(make_document(), make_options()).data

    obr4 = only(data, "OBR")[4]
    assert obr4 == "18748-4^CR d'imagerie médicale^LN"
    assert every(data, "OBX")[0][3] == obr4


@pytest.mark.parametrize(
    ("action", "order_control", "result_status"),
    [("new", "NW", "F"), ("replace", "RO", "C"), ("delete", "CA", "D")],
)
def test_orc1_and_obx11_agree_for_each_action(
    action: str, order_control: str, result_status: str
) -> None:
    replaces = "TX-OLD-1" if action == "replace" else None
    data = render_message(make_document(), make_options(), action=action, replaces=replaces).data

    assert only(data, "ORC")[1] == order_control
    assert every(data, "OBX")[0][11] == result_status
    assert {obx[11] for obx in every(data, "OBX")[1:]} == {"F"}  # metadata are always F
    strict_structure(data)


def test_route_action_is_used_by_render() -> None:
    data = render(make_document(), make_options(action="delete")).data

    assert (only(data, "ORC")[1], every(data, "OBX")[0][11]) == ("CA", "D")


# --- MetaDMPMSS ------------------------------------------------------------------------------


def test_metadata_defaults_in_the_guides_order() -> None:
    data = render(make_document(), make_options()).data

    assert metadata(data) == [
        ("MASQUE_PS", "N"),
        ("INVISIBLE_PATIENT", "N"),
        ("INVISIBLE_REP_LEGAUX", "N"),
        ("CONNEXION_SECRETE", "N"),
        ("MODIF_CONF_CODE", "N"),
        ("DESTDMP", "Y"),
        ("DESTMSSANTEPS", "N"),
        ("DESTMSSANTEPAT", "N"),
        ("ACK_RECEPTION", "N"),
        ("ACK_LECTURE_MSS", "N"),
    ]
    for set_id, obx in enumerate(every(data, "OBX")[1:], start=2):
        assert obx[1] == str(set_id)
        assert obx[2] == "CE"
        assert obx[3].split("^")[2] == "MetaDMPMSS"
        assert obx[5].split("^")[1:] == ["", "expandedYes-NoIndicator"]
    assert every(data, "OBX")[1][3] == "MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS"


def test_metadata_follow_the_options() -> None:
    options = make_options(
        dmp=False,
        visibility={"professionals": False, "patient": True, "legal_representatives": False},
        secret_connection=True,
        confidentiality_change=True,
        recipients=[RECIPIENT],
        mssante_patient=True,
        patient_may_reply=False,
        acknowledge_reception=True,
        acknowledge_reading=True,
        mail_body_professionals="Cher confrère, voici le CR.",
        mail_body_patient="Bonjour, voici votre CR.",
    )
    data = render(make_document(), options).data

    assert metadata(data) == [
        ("MASQUE_PS", "Y"),
        ("INVISIBLE_PATIENT", "N"),
        ("INVISIBLE_REP_LEGAUX", "Y"),
        ("CONNEXION_SECRETE", "Y"),
        ("MODIF_CONF_CODE", "Y"),
        ("DESTDMP", "N"),
        ("DESTMSSANTEPS", "Y"),
        ("DESTMSSANTEPAT", "Y"),
        ("ACK_RECEPTION", "Y"),
        ("ACK_LECTURE_MSS", "Y"),
        ("CORPSMAIL_PS", ""),
        ("CORPSMAIL_PATIENT", ""),
    ]
    names = [fields[0] for fields in segment_list(data)]
    patient_flag = next(
        i
        for i, f in enumerate(segment_list(data))
        if f[0] == "OBX" and f[3].startswith("DESTMSSANTEPAT")
    )
    assert names[patient_flag + 1] == "NTE"
    assert segment_list(data)[patient_flag + 1] == ["NTE", "1", "", "", "FIN"]
    bodies = [obx[5].split("^") for obx in every(data, "OBX")[-2:]]
    assert [body[:4] for body in bodies] == [["", "TEXT", "", "Base64"]] * 2
    assert base64.b64decode(bodies[0][4]).decode() == "Cher confrère, voici le CR."
    assert base64.b64decode(bodies[1][4]).decode() == "Bonjour, voici votre CR."
    strict_structure(data)


def test_no_nte_when_the_patient_may_reply() -> None:
    data = render(make_document(), make_options(mssante_patient=True)).data

    assert every(data, "NTE") == []


# --- MDM -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_type", "action", "order_control", "result_status"),
    [
        ("MDM^T02", "new", "NW", "F"),
        ("MDM^T10", "replace", "RO", "C"),
        ("MDM^T04", "delete", "CA", "D"),
    ],
)
def test_mdm_is_a_strictly_valid_v26_mdm_t02_structure(
    message_type: str, action: str, order_control: str, result_status: str
) -> None:
    options = make_options(message_type=message_type, action=action, recipients=[RECIPIENT])
    replaces = "TX-OLD-1" if action == "replace" else None
    data = render_message(make_document(), options, replaces=replaces).data
    message = strict_structure(data)

    assert message.name == "MDM_T02"
    msh = only(data, "MSH")
    assert msh[8] == f"{message_type}^MDM_T02"
    assert msh[11] == "2.6"
    assert [fields[0] for fields in segment_list(data)[:7]] == [
        "MSH", "EVN", "PID", "PV1", "ORC", "OBR", "TXA",
    ]  # fmt: skip
    assert only(data, "ORC")[1] == order_control
    obx = every(data, "OBX")
    assert obx[0][11] == result_status
    assert obx[0][5].split("^")[1:4] == ["text", "XML", "Base64"]
    assert {o[2] for o in obx[1:]} == {"CWE"}
    txa = only(data, "TXA")
    assert txa[1:4] == ["1", "18748-4", "TEXT"]
    assert txa[12] == f"TX-20240501-0001^^{DOC_ROOT}^ISO"
    assert txa[13] == (f"TX-OLD-1^^{DOC_ROOT}^ISO" if action == "replace" else "")
    assert txa[17] == "AU"
    for prt in every(data, "PRT"):
        strict_prt(prt)


def test_mdm_embedded_cda_passes_the_judge(judge: Callable[[bytes], list[str]]) -> None:
    data = render(make_document(), make_options(message_type="MDM^T02")).data

    assert judge(embedded_cda(data)) == []


def test_mdm_event_follows_an_action_override() -> None:
    data = render_message(
        make_document(), make_options(message_type="MDM^T02"), action="delete"
    ).data

    assert only(data, "MSH")[8] == "MDM^T04^MDM_T02"


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"message_type": "MDM^T02", "action": "replace"}, "MDM^T10"),
        ({"message_type": "MDM^T10"}, "MDM^T02"),
        ({"version": "2.6"}, "MSH-12"),
        ({"message_type": "MDM^T02", "version": "2.5"}, "MSH-12"),
        ({"mssante_patient": True, "visibility": {"patient": False}}, "hidden from the patient"),
        ({"dmp": False}, "ask for nothing"),
        ({"mail_body_professionals": "x"}, "no recipients"),
        ({"mail_body_patient": "x"}, "mssante_patient"),
        ({"reply_to": "not an address"}, "e-mail"),
        ({"recipients": [{**RECIPIENT, "rpps": "123"}]}, "RPPS"),
        ({"recipients": [{**RECIPIENT, "mssante": "a|b@c.fr"}]}, "e-mail"),
        ({"sender_names": {"abc": {"family": "X"}}}, "RPPS"),
        ({"sending_facility": "CHU|X"}, "'|'"),
        ({"receiving_application": ""}, "at least 1"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_inconsistent_options_are_refused_at_load(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=re.escape(fragment)):
        make_options(**overrides)


def test_finess_type_needs_a_finess_organization() -> None:
    cda = {
        "document_id_root": DOC_ROOT,
        "custodian": {"name": "Cabinet", "id_extension": "373282932000074"},
    }
    with pytest.raises(pydantic.ValidationError, match="IDNST"):
        make_options(cda=cda)
    options = make_options(cda=cda, sender_organization_id_type="IDNST")

    sender = every(render(make_document(), options).data, "PRT")[0]
    assert sender[8].split("^")[6:] == ["IDNST", "", "", "373282932000074"]


def test_receiving_application_and_facility_are_required() -> None:
    with pytest.raises(pydantic.ValidationError, match="receiving_application"):
        AnsCdaOptions.model_validate({"receiving_facility": "X", "cda": make_options().cda})


# --- validate and render refusals ------------------------------------------------------------


def test_a_complete_document_has_no_issue() -> None:
    assert validate(make_document(), make_options()) == []


def test_missing_ins_is_reported_by_the_cda_rules_and_refused_by_render() -> None:
    patient = fr_core_patient(identifier=[{"system": f"urn:oid:{IPP_OID}", "value": "IPP-1"}])
    document = make_document(patient=patient)

    issues = validate(document, make_options())
    assert any("INS" in issue.message and issue.severity == "error" for issue in issues)
    with pytest.raises(RenderError, match="INS"):
        render(document, make_options())


def test_replace_without_the_replaced_id_is_reported_and_refused() -> None:
    options = make_options(action="replace")

    (issue,) = validate(make_document(), options)
    assert issue.severity == "error" and "replaces" in issue.message
    assert validate(make_document(), options, replaces="TX-OLD") == []
    with pytest.raises(RenderError, match="replaces"):
        render(make_document(), options)


def test_unqualified_identity_cannot_carry_its_ins() -> None:
    patient = fr_core_patient()
    patient["extension"][0]["extension"][0]["valueCoding"]["code"] = "PROV"

    (issue,) = validate(make_document(patient=patient), make_options())
    assert issue.severity == "error" and "PROV" in issue.message
    with pytest.raises(RenderError, match="PROV"):
        render(make_document(patient=patient), make_options())


def test_visit_number_is_required_for_an_inpatient() -> None:
    encounter = {**ENCOUNTER, "identifier": []}

    (issue,) = validate(make_document(encounter=encounter), make_options())
    assert "PV1-19" in issue.message
    with pytest.raises(RenderError, match="PV1-19"):
        render(make_document(encounter=encounter), make_options())
    assert validate(make_document(encounter=None), make_options()) == []


def test_unknown_sender_name_and_restricted_sharing_are_warnings() -> None:
    options = make_options(
        sender_names={}, cda={**make_options().cda.model_dump(), "confidentiality": "R"}
    )

    issues = validate(make_document(), options)
    assert {issue.severity for issue in issues} == {"warning"}
    assert len(issues) == 2
    sender = strict_prt(every(render(make_document(), options).data, "PRT")[0])
    assert sender.prt_5.xcn_1.to_er7() == "8" + RPPS
    assert sender.prt_5.xcn_2.to_er7() == ""


def test_bad_control_id_is_reported_and_refused() -> None:
    document = make_document(transaction_id="TX|" + "9" * 30)

    assert any(issue.location == "transaction_id" for issue in validate(document, make_options()))
    with pytest.raises(RenderError):
        render(document, make_options())


# --- free text and determinism ---------------------------------------------------------------


def test_delimiters_in_names_are_escaped() -> None:
    patient = fr_core_patient()
    patient["name"][1] = {"use": "usual", "family": "O'Brien|Smith", "given": ["A^B"]}
    options = make_options(sender_names={RPPS: {"family": "Du&Pont", "given": "J~P"}})
    data = render(make_document(patient=patient), options).data

    assert only(data, "PID")[5].split("~")[1] == "O'Brien\\F\\Smith^A\\S\\B^^^^^D"
    assert every(data, "PRT")[0][5].split("^")[1:3] == ["Du\\T\\Pont", "J\\R\\P"]
    strict_structure(data)


def test_rendering_is_deterministic_for_retries() -> None:
    document = make_document()
    copy = replace(document, patient=fr_core_patient())

    assert render(document, make_options()).data == render(copy, make_options()).data


# --- the plugin ------------------------------------------------------------------------------


def test_format_is_registered_with_its_options_model() -> None:
    installed = importlib.metadata.entry_points(group="medcourier", name="hl7v2-ans-cda")
    plugins = load_plugins() if installed else load_plugins(extra=[oru_ans])
    fmt = plugins.formats["hl7v2-ans-cda"]

    assert fmt.options_model is AnsCdaOptions
    assert fmt.validate is not None
    options = fmt.options_model.model_validate(make_options().model_dump())
    assert fmt.validate(make_document(), options) == []
    rendered = fmt.render(make_document(), options)
    assert rendered.message_id == "TX-20240501-0001"
    assert rendered.media_type == "application/hl7-v2"
