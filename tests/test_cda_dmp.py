"""The ``cda-dmp`` format, judged by the rules the DMP applies.

Every CDA rendered here goes through ``../shared/validators/cda/cda_check.py``: the CI-SIS XML
schema (CDA_extended.xsd) and the StrucMin schematron. The judge is imported in place, never
copied, and its absence fails the run: a CDA test that cannot be judged proves nothing. The
schematron is compiled once per session (the judge caches it), so each further check costs
tens of milliseconds.

The patient is shaped as FR Core carries an INS identity: INS-NIR identifier, official name as
the birth name, ``patient-birthPlace`` with the INSEE code in ``fr-core-address-insee-code``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest
from lxml import etree
from PIL import Image
from stdnum.fr import nir

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document
from medcourier.engine.plugins import load_plugins
from medcourier.transforms.cda import dmp
from medcourier.transforms.cda.dmp import (
    CdaDmpOptions,
    Replacement,
    patient_identity,
    png_to_tiff,
    render,
    render_cda,
    validate,
)
from medcourier.transforms.cda.xds import XdsOptions, xds_metadata
from tests.cda_judge import REFERENCE

V3 = "urn:hl7-org:v3"
NS = {"v3": V3}
SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)

NIR_BASE = "1840675123456"  # sex, year, month, department 75, commune 123, order 456
INS_NIR = NIR_BASE + nir.calc_check_digits(NIR_BASE)
IPP_OID = "1.2.250.1.999.1.2"
RPPS = "10101010101"
PDF = (b"%PDF-1.4\n" + bytes(range(256)) * 8)[:2048]
CREATED = datetime(2024, 5, 1, 10, 30, 15, tzinfo=timezone(timedelta(hours=2)))


# --- the judge -------------------------------------------------------------------------------


@pytest.fixture()
def assert_valid(judge: Callable[[bytes], list[str]]) -> Callable[[bytes], etree._Element]:
    """Check a CDA with the judge and return its parsed root (with the safe parser)."""

    def _assert_valid(xml: bytes) -> etree._Element:
        assert judge(xml) == []
        return etree.fromstring(xml, SAFE_PARSER)

    return _assert_valid


# --- inputs ----------------------------------------------------------------------------------


def fr_core_patient(**overrides: Any) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "pat-1",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                "valueAddress": {
                    "extension": [
                        {
                            "url": dmp.INSEE_CODE_URL,
                            "valueCoding": {"code": "75056"},
                        }
                    ],
                    "city": "Paris",
                },
            }
        ],
        "identifier": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                            "code": "INS-NIR",
                        }
                    ]
                },
                "system": "urn:oid:1.2.250.1.213.1.4.8",
                "value": INS_NIR,
            },
            {"system": f"urn:oid:{IPP_OID}", "value": "IPP-0042"},
            {"system": "https://hospital.example/ipp", "value": "not-an-oid"},
        ],
        "name": [
            {"use": "official", "family": "DUPONT", "given": ["JEAN", "PIERRE"]},
            {"use": "usual", "family": "DUPONT-MARTIN", "given": ["Jeannot"]},
        ],
        "gender": "male",
        "birthDate": "1984-06-12",
        "address": [
            {
                "use": "home",
                "line": ["28 avenue de Breteuil", "Escalier A"],
                "city": "Paris",
                "postalCode": "75007",
                "country": "FRA",
            }
        ],
        "telecom": [
            {"system": "phone", "value": "01 44 53 45 51", "use": "home"},
            {"system": "phone", "value": "+33 6 47 15 10 10", "use": "mobile"},
            {"system": "email", "value": "jean.dupont@example.org"},
        ],
    }
    patient.update(overrides)
    return patient


ENCOUNTER: dict[str, Any] = {
    "resourceType": "Encounter",
    "status": "finished",
    "identifier": [{"system": "urn:oid:1.2.250.1.999.1.3", "value": "V-2024-0001"}],
    "period": {"start": "2024-04-28T08:15:00+02:00", "end": "2024-05-01T09:00:00+02:00"},
}


def make_document(**overrides: Any) -> Document:
    fields: dict[str, Any] = {
        "transaction_id": "018f2b3c4d5e6f708192",
        "created_at": CREATED,
        "content_type": "application/pdf",
        "document_type": "11490-0",
        "title": "Lettre de liaison",
        "payload": PDF,
        "patient": fr_core_patient(),
        "encounter": ENCOUNTER,
        "sender_identifier": RPPS,
    }
    fields.update(overrides)
    return Document(**fields)


@pytest.fixture()
def options() -> CdaDmpOptions:
    return CdaDmpOptions(
        document_id_root="1.2.250.1.999.1.1.1",
        custodian={"name": "CH de Test", "id_extension": "1750000000"},
        author_organization={"name": "Service de cardiologie", "id_extension": "1750000018"},
    )


def image_bytes(fmt: str, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (40, 30))
    for x in range(40):
        for y in range(30):
            if mode == "RGBA":
                image.putpixel((x, y), (x * 6, y * 8, (x * y) % 256, 255 if x < 20 else 128))
            else:
                image.putpixel((x, y), (x * 6, y * 8, (x * y) % 256))
    out = io.BytesIO()
    image.save(out, format=fmt, dpi=(150, 150))
    return out.getvalue()


def body(root: etree._Element) -> tuple[str, bytes]:
    text = root.find("v3:component/v3:nonXMLBody/v3:text", NS)
    assert text is not None and text.get("representation") == "B64"
    return text.get("mediaType") or "", base64.b64decode(text.text or "", validate=True)


# --- the judge itself ------------------------------------------------------------------------


def test_the_reference_document_passes_the_judge(judge: Callable[[Any], list[str]]) -> None:
    assert judge(REFERENCE) == []


def test_the_judge_catches_a_broken_header(judge: Callable[[bytes], list[str]]) -> None:
    tree = etree.parse(str(REFERENCE), SAFE_PARSER)
    realm = tree.getroot().find("v3:realmCode", NS)
    assert realm is not None
    realm.getparent().remove(realm)
    assert judge(etree.tostring(tree)) != []


# --- a PDF, end to end -----------------------------------------------------------------------


def test_pdf_passes_the_judge_and_round_trips(
    options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]
) -> None:
    document = make_document()
    assert validate(document, options) == []
    rendered = render(document, options)
    assert rendered.media_type == "text/xml"
    assert rendered.filename_hint == "018f2b3c4d5e6f708192.xml"
    assert rendered.message_id == document.transaction_id
    assert rendered.data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    root = assert_valid(rendered.data)

    assert body(root) == ("application/pdf", PDF)
    assert [t.get("root") for t in root.findall("v3:templateId", NS)] == list(dmp.TEMPLATE_IDS)
    doc_id = root.find("v3:id", NS)
    assert doc_id is not None
    assert (doc_id.get("root"), doc_id.get("extension")) == (
        "1.2.250.1.999.1.1.1",
        "018f2b3c4d5e6f708192",
    )
    code = root.find("v3:code", NS)
    assert code is not None
    assert code.attrib == {
        "code": "11490-0",
        "displayName": "Lettre de liaison à la sortie d'un établissement de soins",
        "codeSystem": "2.16.840.1.113883.6.1",
        "codeSystemName": "LOINC",
    }
    assert root.findtext("v3:title", namespaces=NS) == "Lettre de liaison"
    assert root.find("v3:effectiveTime", NS).get("value") == "20240501103015+0200"
    assert root.find("v3:languageCode", NS).get("code") == "fr-FR"
    assert root.find("v3:versionNumber", NS).get("value") == "1"

    role = root.find("v3:recordTarget/v3:patientRole", NS)
    assert role is not None
    ids = [(i.get("root"), i.get("extension")) for i in role.findall("v3:id", NS)]
    assert ids == [("1.2.250.1.213.1.4.8", INS_NIR), (IPP_OID, "IPP-0042")]
    name = role.find("v3:patient/v3:name", NS)
    assert name is not None
    parts = [(child.tag.split("}")[1], child.get("qualifier"), child.text) for child in name]
    assert parts == [
        ("family", "BR", "DUPONT"),
        ("given", None, "JEAN PIERRE"),
        ("given", "BR", "JEAN"),
        ("family", "CL", "DUPONT-MARTIN"),
        ("given", "CL", "Jeannot"),
    ]
    patient = role.find("v3:patient", NS)
    assert patient.find("v3:administrativeGenderCode", NS).get("code") == "M"
    assert patient.find("v3:birthTime", NS).get("value") == "19840612"
    assert patient.findtext("v3:birthplace/v3:place/v3:addr/v3:county", namespaces=NS) == "75056"
    telecoms = [(t.get("value"), t.get("use")) for t in role.findall("v3:telecom", NS)]
    assert telecoms == [
        ("tel:0144534551", "H"),
        ("tel:+33647151010", "MC"),
        ("mailto:jean.dupont@example.org", None),
    ]

    author_id = root.find("v3:author/v3:assignedAuthor/v3:id", NS)
    assert (author_id.get("root"), author_id.get("extension")) == ("1.2.250.1.71.4.2.1", "8" + RPPS)
    legal_id = root.find("v3:legalAuthenticator/v3:assignedEntity/v3:id", NS)
    assert legal_id.get("extension") == "8" + RPPS
    assert root.find("v3:legalAuthenticator/v3:signatureCode", NS).get("code") == "S"
    custodian = root.find(
        "v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization/v3:id", NS
    )
    assert custodian.get("extension") == "1750000000"
    setting = root.find(".//v3:performer//v3:standardIndustryClassCode", NS)
    assert setting.get("code") == "ETABLISSEMENT"
    encounter = root.find("v3:componentOf/v3:encompassingEncounter", NS)
    assert encounter.find("v3:id", NS).get("extension") == "V-2024-0001"
    assert encounter.find("v3:effectiveTime/v3:low", NS).get("value") == "20240428081500+0200"
    assert encounter.find("v3:effectiveTime/v3:high", NS).get("value") == "20240501090000+0200"
    facility = encounter.find("v3:location/v3:healthCareFacility/v3:code", NS)
    assert (facility.get("code"), facility.get("codeSystem")) == ("SA01", "1.2.250.1.71.4.2.4")
    assert root.find("v3:relatedDocument", NS) is None


def test_plugin_registers_cda_dmp_with_its_options_model(options: CdaDmpOptions) -> None:
    fmt = load_plugins(extra=[dmp]).formats["cda-dmp"]
    assert fmt.options_model is CdaDmpOptions
    assert fmt.validate is not None
    assert fmt.validate(make_document(), options) == []


# --- other bodies ----------------------------------------------------------------------------


def test_plain_text_body(
    options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]
) -> None:
    text = "Compte rendu : pas d'anomalie, fièvre résolue. <OK> & fin\n".encode()
    document = make_document(content_type="text/plain; charset=utf-8", payload=text)
    assert validate(document, options) == []
    root = assert_valid(render_cda(document, options))
    assert body(root) == ("text/plain", text)


def test_latin1_text_is_re_encoded_as_utf8(options: CdaDmpOptions) -> None:
    text = "Fièvre à 39°C"
    document = make_document(
        content_type="text/plain; charset=ISO-8859-1", payload=text.encode("latin-1")
    )
    root = etree.fromstring(render_cda(document, options), SAFE_PARSER)
    assert body(root) == ("text/plain", text.encode("utf-8"))


def test_jpeg_body(options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]) -> None:
    jpeg = image_bytes("JPEG")
    document = make_document(content_type="image/jpg", payload=jpeg, document_type="52040-3")
    assert validate(document, options) == []
    root = assert_valid(render_cda(document, options))
    assert body(root) == ("image/jpeg", jpeg)
    meta = xds_metadata(document, options)
    assert meta.format_code.code == "urn:ihe:iti-fr:xds-sd:jpeg:2010"
    assert meta.class_code is not None and meta.class_code.code == "31"


def test_png_is_converted_to_lossless_tiff(
    options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]
) -> None:
    png = image_bytes("PNG", mode="RGBA")
    document = make_document(content_type="image/png", payload=png, document_type="52040-3")
    assert validate(document, options) == []
    root = assert_valid(render_cda(document, options))
    media_type, data = body(root)
    assert media_type == "image/tiff"
    assert xds_metadata(document, options).format_code.code == "urn:ihe:iti-fr:xds-sd:tiff:2010"
    with Image.open(io.BytesIO(data)) as tiff, Image.open(io.BytesIO(png)) as original:
        assert tiff.format == "TIFF"
        assert tiff.mode == original.mode == "RGBA"
        assert tiff.tobytes() == original.tobytes()
        assert tuple(round(v) for v in tiff.info["dpi"]) == (150, 150)


def test_palette_png_with_transparency_keeps_it() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=0)
    with Image.open(io.BytesIO(png_to_tiff(out.getvalue()))) as tiff:
        assert tiff.mode == "RGBA"
        assert tiff.getpixel((0, 0)) == (255, 0, 0, 255)


def test_png_refused_when_conversion_is_off(options: CdaDmpOptions) -> None:
    strict = options.model_copy(update={"allow_png_conversion": False})
    document = make_document(content_type="image/png", payload=image_bytes("PNG"))
    issues = validate(document, strict)
    assert [i.location for i in issues] == ["content_type"]
    assert "allow_png_conversion" in issues[0].message
    with pytest.raises(RenderError, match="PNG"):
        render_cda(document, strict)


def test_a_broken_png_is_a_render_error(options: CdaDmpOptions) -> None:
    document = make_document(content_type="image/png", payload=b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(RenderError, match="PNG"):
        render_cda(document, options)


def test_unsupported_media_type(options: CdaDmpOptions) -> None:
    document = make_document(content_type="application/msword", payload=b"\xd0\xcf\x11\xe0")
    issues = validate(document, options)
    assert [i.location for i in issues] == ["content_type"]
    assert "JDV_J10" in issues[0].message
    with pytest.raises(RenderError, match="formatCode"):
        render(document, options)


def test_payload_that_is_not_what_it_claims_is_a_warning(options: CdaDmpOptions) -> None:
    issues = validate(make_document(payload=b"<html>"), options)
    assert [(i.severity, i.location) for i in issues] == [("warning", "payload")]


# --- replacement -----------------------------------------------------------------------------


def test_replacement_by_transaction_id(
    options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]
) -> None:
    document = make_document(transaction_id="018f2b3c4d5e6f709999")
    root = assert_valid(render_cda(document, options, replaces="018f2b3c4d5e6f708192"))
    related = root.find("v3:relatedDocument", NS)
    assert related is not None and related.get("typeCode") == "RPLC"
    parent_id = related.find("v3:parentDocument/v3:id", NS)
    assert (parent_id.get("root"), parent_id.get("extension")) == (
        "1.2.250.1.999.1.1.1",
        "018f2b3c4d5e6f708192",
    )
    # Same series as the replaced first version, next version number.
    assert root.find("v3:setId", NS).get("extension") == "018f2b3c4d5e6f708192"
    assert root.find("v3:versionNumber", NS).get("value") == "2"
    assert root.find("v3:id", NS).get("extension") == "018f2b3c4d5e6f709999"
    assert body(root) == ("application/pdf", PDF)


def test_replacement_of_a_later_version(
    options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]
) -> None:
    replaces = Replacement(
        document_id="v3-of-the-series", set_id="first-of-the-series", version_number=3
    )
    root = assert_valid(render_cda(make_document(), options, replaces=replaces))
    assert root.find("v3:setId", NS).get("extension") == "first-of-the-series"
    assert root.find("v3:versionNumber", NS).get("value") == "4"
    parent = root.find("v3:relatedDocument/v3:parentDocument", NS)
    assert parent.find("v3:id", NS).get("extension") == "v3-of-the-series"
    assert parent.find("v3:versionNumber", NS).get("value") == "3"


# --- missing traits and refused types --------------------------------------------------------


def test_each_missing_ins_trait_is_named(options: CdaDmpOptions) -> None:
    # A used name only: the birth name (official, or the name without use) is missing.
    bare = {
        "resourceType": "Patient",
        "name": [{"use": "usual", "family": "DUPONT", "given": ["JEAN"]}],
    }
    issues = validate(make_document(patient=bare, sender_identifier=None), options)
    messages = {issue.location: issue.message for issue in issues}
    assert set(messages) == {
        "Patient.identifier",
        "Patient.name.family",
        "Patient.name.given",
        "Patient.gender",
        "Patient.birthDate",
        "Patient.extension:birthPlace",
        "sender_identifier",
    }
    text = " | ".join(issue.message for issue in issues)
    for trait in (
        "INS",
        "birth name",
        "first given name",
        "given names",
        "gender",
        "birth date",
        "birth place",
        "RPPS",
    ):
        assert trait in text
    assert all(issue.severity == "error" for issue in issues)
    with pytest.raises(RenderError, match="birth name"):
        render_cda(make_document(patient=bare), options)


def test_a_name_without_use_is_the_birth_name(options: CdaDmpOptions) -> None:
    """The seed's Patient has one name and no ``use``: it is the official name."""
    patient = fr_core_patient()
    patient["name"] = [{"family": "MARTIN", "given": ["ALICE", "JEANNE"]}]
    identity = patient_identity(patient)
    assert (identity.birth_family, identity.first_given) == ("MARTIN", "ALICE")
    assert identity.given_list == "ALICE JEANNE"
    assert validate(make_document(patient=patient), options) == []


def test_the_seed_nir_identifier_is_read_as_the_ins_nir() -> None:
    patient = fr_core_patient()
    patient["identifier"] = [
        {
            "use": "usual",
            "type": {
                "coding": [
                    {
                        "system": "http://lifen.fr/fhir/ValueSet/patient-identifier-type",
                        "code": "NIR-OD",
                    }
                ]
            },
            "system": "http://lifen.fr/fhir/Identifier/patient-nir-od",
            "value": INS_NIR,
        }
    ]
    assert patient_identity(patient).ins == ("1.2.250.1.213.1.4.8", INS_NIR)


def test_a_single_missing_trait_is_the_only_issue(options: CdaDmpOptions) -> None:
    patient = fr_core_patient()
    patient["extension"] = []
    issues = validate(make_document(patient=patient), options)
    assert [i.location for i in issues] == ["Patient.extension:birthPlace"]
    assert "INSEE" in issues[0].message


def test_invalid_values_are_reported(options: CdaDmpOptions) -> None:
    patient = fr_core_patient(birthDate="12/06/1984")
    patient["identifier"][0]["value"] = INS_NIR[:-2] + "00"
    patient["extension"][0]["valueAddress"]["extension"][0]["valueCoding"]["code"] = "Paris"
    issues = validate(make_document(patient=patient, sender_identifier="123"), options)
    assert {i.location for i in issues} == {
        "Patient.identifier",
        "Patient.birthDate",
        "Patient.extension:birthPlace",
        "sender_identifier",
    }
    assert any("is not a valid NIR" in i.message for i in issues)
    # reasons are stored and shown in tracking: the patient's values are named, not quoted
    text = " ".join(i.message for i in issues)
    assert INS_NIR[:-2] not in text and "12/06/1984" not in text and "Paris" not in text


def test_document_type_outside_j07_is_refused(options: CdaDmpOptions) -> None:
    document = make_document(document_type="18842-5")  # discharge summary: not in JDV_J07
    issues = validate(document, options)
    assert [i.location for i in issues] == ["type"]
    assert "JDV_J07" in issues[0].message
    with pytest.raises(RenderError, match="JDV_J07"):
        render_cda(document, options)


def test_outside_j07_can_be_allowed_but_the_dmp_would_refuse_it(
    options: CdaDmpOptions, judge: Callable[[bytes], list[str]]
) -> None:
    lenient = options.model_copy(update={"allow_types_outside_j07": True})
    document = make_document(document_type="18842-5", title="Discharge summary")
    assert validate(document, lenient) == []
    meta = xds_metadata(document, lenient)
    assert meta.type_code.display == "Discharge summary"
    assert meta.class_code is None
    problems = judge(render_cda(document, lenient))
    assert problems and all("JDV_J07" in problem for problem in problems)


# --- the patient as FR Core carries it -------------------------------------------------------


def test_fr_core_birth_list_given_name_extension() -> None:
    patient = fr_core_patient()
    patient["name"][0] = {
        "use": "official",
        "family": "PAT-TROIS",
        "given": ["DOMINIQUE"],
        "extension": [
            {"url": dmp.BIRTH_LIST_GIVEN_NAME_URL, "valueString": "DOMINIQUE MARIE-LOUISE"}
        ],
    }
    identity = patient_identity(patient)
    assert identity.problems == []
    assert (identity.birth_family, identity.first_given, identity.given_list) == (
        "PAT-TROIS",
        "DOMINIQUE",
        "DOMINIQUE MARIE-LOUISE",
    )


def test_birth_place_in_district_and_ins_preference() -> None:
    patient = fr_core_patient()
    patient["extension"] = [
        {
            "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-birth-place",
            "valueAddress": {"district": "2A004", "city": "Ajaccio"},
        }
    ]
    nia_base = "1840699123456"
    patient["identifier"].insert(
        0,
        {
            "system": "urn:oid:1.2.250.1.213.1.4.9",
            "value": nia_base + nir.calc_check_digits(nia_base),
        },
    )
    identity = patient_identity(patient)
    assert identity.problems == []
    assert (identity.birth_place_code, identity.birth_place_city) == ("2A004", "Ajaccio")
    assert identity.ins == ("1.2.250.1.213.1.4.8", INS_NIR)  # INS-NIR preferred to INS-NIA


def test_markup_in_patient_data_is_escaped(
    options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]
) -> None:
    patient = fr_core_patient()
    patient["name"][0]["family"] = 'O\'BRIEN <&> "D"'
    document = make_document(patient=patient, title="CR <urgent> & confidentiel", encounter=None)
    root = assert_valid(render_cda(document, options))
    assert root.findtext("v3:title", namespaces=NS) == "CR <urgent> & confidentiel"
    family = root.find(".//v3:patient/v3:name/v3:family", NS)
    assert family.text == 'O\'BRIEN <&> "D"'
    # Without an Encounter the visit and the act are dated by the document.
    low = root.find("v3:componentOf/v3:encompassingEncounter/v3:effectiveTime/v3:low", NS)
    assert low.get("value") == "20240501103015+0200"


def test_naive_creation_time_is_utc(options: CdaDmpOptions) -> None:
    document = make_document(created_at=datetime(2024, 5, 1, 8, 30))
    root = etree.fromstring(render_cda(document, options), SAFE_PARSER)
    assert root.find("v3:effectiveTime", NS).get("value") == "20240501083000+0000"
    utc = replace(document, created_at=datetime(2024, 5, 1, 8, 30, tzinfo=UTC))
    assert render_cda(utc, options).count(b"20240501083000+0000") >= 3


# --- XDS metadata and options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("loinc", "class_code", "class_display"),
    [
        ("11488-4", "10", "Compte rendu"),
        ("34133-9", "11", "Synthèse"),
        ("18748-4", "31", "Imagerie médicale"),
        ("57833-6", "42", "Prescription"),
        ("89601-9", "52", "Certificat, déclaration"),
    ],
)
def test_class_code_follows_ass_x04(loinc: str, class_code: str, class_display: str) -> None:
    meta = xds_metadata(make_document(document_type=loinc), XdsOptions())
    assert meta.class_code is not None
    assert (meta.class_code.code, meta.class_code.display, meta.class_code.system) == (
        class_code,
        class_display,
        "1.2.250.1.213.1.1.4.1",
    )


@pytest.mark.parametrize(
    ("content_type", "format_code"),
    [
        ("application/pdf", "urn:ihe:iti:xds-sd:pdf:2008"),
        ("text/plain", "urn:ihe:iti:xds-sd:text:2008"),
        ("application/rtf", "urn:ihe:iti-fr:xds-sd:rtf:2010"),
        ("image/jpeg", "urn:ihe:iti-fr:xds-sd:jpeg:2010"),
        ("image/tiff", "urn:ihe:iti-fr:xds-sd:tiff:2010"),
        ("image/png", "urn:ihe:iti-fr:xds-sd:tiff:2010"),
    ],
)
def test_format_code_follows_ass_a12(content_type: str, format_code: str) -> None:
    meta = xds_metadata(make_document(content_type=content_type), XdsOptions())
    assert meta.format_code.code == format_code
    assert meta.format_code.system == "1.3.6.1.4.1.19376.1.2.3"


def test_xds_metadata_from_options() -> None:
    opts = XdsOptions(healthcare_facility_type="SA07", practice_setting="AMBULATOIRE")
    opts = opts.model_copy(update={"confidentiality": "R"})
    meta = xds_metadata(make_document(), opts)
    assert (meta.healthcare_facility_type.code, meta.healthcare_facility_type.display) == (
        "SA07",
        "Cabinet individuel",
    )
    assert meta.practice_setting.system == "1.2.250.1.213.1.1.4.9"
    assert (meta.confidentiality.code, meta.confidentiality.system) == (
        "R",
        "2.16.840.1.113883.5.25",
    )
    assert meta.language == "fr-FR"


@pytest.mark.parametrize(
    "bad",
    [
        {"unknown_option": 1},
        {"healthcare_facility_type": "SA99"},
        {"practice_setting": "HOPITAL"},
        {"confidentiality": "X"},
        {"document_id_root": "not.an.oid"},
        {"custodian": {"name": "CH", "id_extension": "1123"}},
        {"custodian": {"name": "CH", "id_extension": "312345678901234"}},
        {"author_role": {"code": "G15_10", "display": "Médecin", "system": "TRE_G15"}},
    ],
)
def test_options_are_checked_at_start_up(bad: dict[str, Any]) -> None:
    config: dict[str, Any] = {
        "document_id_root": "1.2.250.1.999.1.1.1",
        "custodian": {"name": "CH de Test", "id_extension": "1750000000"},
    }
    config.update(bad)
    with pytest.raises(pydantic.ValidationError):
        CdaDmpOptions.model_validate(config)


def test_document_id_root_and_custodian_are_required() -> None:
    with pytest.raises(pydantic.ValidationError) as excinfo:
        CdaDmpOptions.model_validate({})
    assert {e["loc"][0] for e in excinfo.value.errors()} == {"document_id_root", "custodian"}


def test_siret_and_corsican_finess_are_accepted() -> None:
    opts = CdaDmpOptions.model_validate(
        {
            "document_id_root": "1.2.250.1.999.1.1.1",
            "custodian": {"name": "Clinique", "id_extension": "12A0000012"},
            "author_organization": {"name": "Cabinet", "id_extension": "373282932000074"},
        }
    )
    assert opts.author_org.id_extension == "373282932000074"


@pytest.mark.parametrize(
    "replaces",
    [" ", Replacement(document_id="x", root="not an oid"), Replacement("x", version_number=0)],
)
def test_unusable_replacement_is_a_render_error(
    options: CdaDmpOptions, replaces: str | Replacement
) -> None:
    with pytest.raises(RenderError, match="replaced"):
        render_cda(make_document(), options, replaces=replaces)


@pytest.mark.parametrize(
    ("mode", "pixel"), [("1", 1), ("L", 77), ("LA", (77, 200)), ("I;16", 4000)]
)
def test_png_modes_convert_without_loss(mode: str, pixel: Any) -> None:
    image = Image.new(mode, (5, 3))
    image.putpixel((2, 1), pixel)
    out = io.BytesIO()
    image.save(out, format="PNG")
    with Image.open(io.BytesIO(png_to_tiff(out.getvalue()))) as tiff:
        assert tiff.mode == mode
        assert tiff.tobytes() == image.tobytes()


def test_pasted_control_characters_and_odd_emails_still_give_a_valid_cda(
    options: CdaDmpOptions, assert_valid: Callable[[bytes], etree._Element]
) -> None:
    """A title pasted from Word (VT line break), an address with a form feed, and e-mails that
    need URL encoding: the document is still one the DMP accepts."""
    patient = fr_core_patient(
        telecom=[
            {"system": "email", "value": "jean dupont@example.org"},
            {"system": "email", "value": "élodie.brûlé@exemple.fr"},
            {"system": "email", "value": "50%off@exemple.fr"},
        ],
        address=[{"line": ["12 rue\x0cdes Lilas"], "city": "Paris", "postalCode": "75011"}],
    )
    document = make_document(title="Compte\x0brendu", patient=patient)
    root = assert_valid(render_cda(document, options))
    text = etree.tostring(root, encoding="unicode")
    assert "<title>Compte rendu</title>" in text.replace(' xmlns="urn:hl7-org:v3"', "")
    assert "mailto:jean%20dupont@example.org" in text
