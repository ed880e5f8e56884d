"""The ``cda-dmp`` format: a document as a CDA R2 level 1 the French DMP accepts.

The header follows the CI-SIS "Volet Structuration Minimale des Documents de Santé" for a
non-structured document (the StrucMin schematron, template 1.2.250.1.213.1.1.1.1, is the judge
in the tests), and the ANS example ``DOC_NON_STRUCTURE_CDA-R2-N1.xml`` for everything the
schematron leaves open (element order, where the INSEE code of the birth place goes...):

- exactly three templateIds: HL7 France (2.16.840.1.113883.2.8.2.1), CI-SIS
  (1.2.250.1.213.1.1.1.1) and IHE XDS-SD (1.3.6.1.4.1.19376.1.2.20). The schematron refuses
  any other for a document with a ``nonXMLBody``;
- ``recordTarget``: the INS first (root = the INS authority OID, extension = the NIR/NIA), then
  the local identifiers whose system is an OID (the IPP), then the identity traits the INS
  requires, read from the FHIR Patient the way FR Core carries them (see :func:`patient_identity`);
- ``author``, ``legalAuthenticator`` and the ``documentationOf/serviceEvent`` performer: the
  sending professional by RPPS (root 1.2.250.1.71.4.2.1, extension "8" + RPPS, the national
  identifier of a person in the RPPS);
- ``custodian`` and the organizations: root 1.2.250.1.71.4.2.2 (national structure identifier),
  extension "1" + FINESS or "3" + SIRET (TRE_G07-TypeIdentifiantStructure);
- ``componentOf/encompassingEncounter``: the visit period (or the document date) and the
  healthcare facility type (JDV_J02);
- ``relatedDocument`` RPLC when the document replaces an earlier version;
- ``component/nonXMLBody/text``: the file in Base64 with its media type. PNG has no XDS
  formatCode, so it is converted to TIFF first (see :func:`png_to_tiff`).

The tree is built with lxml, so every value from the FHIR resources is escaped by the
serializer. The Base64 body alone is spliced in after serialization: its alphabet
(``A-Z a-z 0-9 + / =``) contains no XML markup character, and writing it straight into the
output keeps a 50 MB PDF from being copied through libxml2 as a 67 MB text node (see
:func:`render_cda`).
"""

from __future__ import annotations

import io
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lxml import etree
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from stdnum.fr import siret

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document, Issue, Rendered
from medcourier.engine.nir import INS_OIDS, ins_authority, nir_problem
from medcourier.engine.nir import compact as compact_nir
from medcourier.engine.plugins import FormatType, hookimpl
from medcourier.transforms.cda.xds import (
    PNG_MEDIA_TYPE,
    XdsMetadata,
    XdsOptions,
    body_media_type,
    document_type,
    media_type_key,
    xds_metadata,
)
from medcourier.transforms.fhir_json import as_dict, as_dicts, as_str, as_strs
from medcourier.transforms.payload import splice_base64

FORMAT_NAME = "cda-dmp"
# The XDS mimeType of a CDA document; "application/hl7-cda+xml" is not a registered type.
MEDIA_TYPE = "text/xml"

HL7_NS = "urn:hl7-org:v3"
TYPE_ID = ("2.16.840.1.113883.1.3", "POCD_HD000040")
TEMPLATE_IDS = (
    "2.16.840.1.113883.2.8.2.1",  # HL7 France
    "1.2.250.1.213.1.1.1.1",  # CI-SIS (structuration minimale)
    "1.3.6.1.4.1.19376.1.2.20",  # IHE XDS-SD (scanned / non-structured document)
)

RPPS_ROOT = "1.2.250.1.71.4.2.1"  # identifiant national des personnes physiques
RPPS_PREFIX = "8"  # TRE_G08-TypeIdentifiantPersonne: 8 = RPPS
STRUCTURE_ROOT = "1.2.250.1.71.4.2.2"  # identifiant national de structure
GENDER_SYSTEM = "2.16.840.1.113883.5.1"  # HL7 v3 AdministrativeGender

# FHIR extensions of FR Core (https://hl7.fr/ig/fhir/core).
BIRTH_PLACE_URLS = (
    "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
    # FR Core 2.0.0-ballot's own extension, same Address value
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-birth-place",
)
INSEE_CODE_URL = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code"
BIRTH_LIST_GIVEN_NAME_URL = (
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-birth-list-given-name"
)

# FHIR Patient.gender -> JDV_J143-AdministrativeGender-CISIS (code, displayName).
GENDER: dict[str, tuple[str, str]] = {
    "male": ("M", "Masculin"),
    "female": ("F", "Féminin"),
    "other": ("UN", "Inconnu"),
    "unknown": ("UN", "Inconnu"),
}

# FHIR ContactPoint.use -> CDA TEL use, limited to the values the CI-SIS telecom rule allows
# (H, HP, HV, WP, DIR, PUB, EC, MC, PG).
_TELECOM_USE = {"home": "H", "work": "WP", "mobile": "MC"}
# FHIR Address.use -> CDA AD use, limited to the CI-SIS address rule (H, HP, HV, WP, TMP).
_ADDRESS_USE = {"home": "H", "work": "WP", "temp": "TMP"}
_TELECOM_SCHEME = {"phone": "tel", "fax": "fax", "email": "mailto"}

_OID = re.compile(r"[0-2](?:\.(?:0|[1-9]\d*))+")
_RPPS = re.compile(r"\d{11}")
# COG code of a commune (5 digits, Corsica 2A/2B) or of a country for people born abroad (99xxx).
_INSEE = re.compile(r"\d{5}|2[AB]\d{3}")
_FINESS_ID = re.compile(r"1(?:\d{9}|2[AB]\d{7})")
_SIREN_ID = re.compile(r"2\d{9}")
_FHIR_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_FHIR_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})"
)
_PHONE_NOISE = re.compile(r"[\s.()\-]")


def _oid(value: str) -> str:
    if not _OID.fullmatch(value) or len(value) > 64:
        raise ValueError(f"{value!r} is not an OID (digits and dots, at most 64 characters)")
    return value


class CodedValue(BaseModel):
    """A code with its display name and code system OID, as a CDA ``CE`` needs it."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1)
    display: str = Field(min_length=1)
    system: str

    @field_validator("system")
    @classmethod
    def _system_is_oid(cls, value: str) -> str:
        return _oid(value)


class OrganizationOptions(BaseModel):
    """An organization as the CI-SIS identifies it.

    ``id_extension`` is the national structure identifier: the TRE_G07 type digit followed by
    the number, e.g. ``"1" + FINESS`` (``1750000000``-like, 10 characters) or ``"3" + SIRET``
    (15 characters), under ``id_root`` 1.2.250.1.71.4.2.2.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    id_extension: str = Field(min_length=1)
    id_root: str = STRUCTURE_ROOT

    @field_validator("id_root")
    @classmethod
    def _root_is_oid(cls, value: str) -> str:
        return _oid(value)

    @model_validator(mode="after")
    def _national_identifier_shape(self) -> OrganizationOptions:
        if self.id_root != STRUCTURE_ROOT:
            return self
        ext = self.id_extension
        if ext[0] == "1" and not _FINESS_ID.fullmatch(ext):
            raise ValueError(f"{ext!r}: '1' + FINESS must be '1' and 9 characters")
        if ext[0] == "2" and not _SIREN_ID.fullmatch(ext):
            raise ValueError(f"{ext!r}: '2' + SIREN must be '2' and 9 digits")
        if ext[0] == "3" and not siret.is_valid(ext[1:]):
            raise ValueError(f"{ext!r}: '3' + SIRET must be '3' and a valid 14-digit SIRET")
        if ext[0] not in "01234":
            raise ValueError(
                f"{ext!r} does not start with a TRE_G07 identifier type "
                "(0 ADELI, 1 FINESS, 2 SIREN, 3 SIRET, 4 RPPS)"
            )
        return self


class CdaDmpOptions(XdsOptions):
    """A route's ``format_options`` for ``cda-dmp``.

    ``document_id_root`` and ``custodian`` have no default: the first is an OID your
    organization owns (every document id is minted under it, e.g. ``1.2.250.1.999.1.1.1`` for
    an OID arc 1.2.250.1.999 registered with AFNOR), the second the establishment that keeps
    the documents. Both are checked when the configuration is loaded.
    """

    document_id_root: str = Field(
        description="OID under which document ids are minted (root = OID, extension = "
        "transaction id), e.g. 1.2.250.1.999.1.1.1"
    )
    custodian: OrganizationOptions = Field(
        description="representedCustodianOrganization: the organization keeping the document"
    )
    author_organization: OrganizationOptions | None = Field(
        default=None, description="the author's organization; defaults to the custodian"
    )
    author_role: CodedValue = Field(
        default=CodedValue(code="G15_10", display="Médecin", system="1.2.250.1.213.1.1.4.5"),
        description="assignedAuthor/code from JDV_J01-XdsAuthorSpecialty-CISIS: a profession "
        "of TRE_G15 (G15_10 Médecin) or a profession/specialty pair (G15_10/SM54 Médecine "
        "générale); the DMP schematron checks it against that value set",
    )

    @field_validator("document_id_root")
    @classmethod
    def _document_root_is_oid(cls, value: str) -> str:
        return _oid(value)

    @property
    def author_org(self) -> OrganizationOptions:
        return self.author_organization or self.custodian


@dataclass(frozen=True)
class Replacement:
    """The earlier version a document replaces (``relatedDocument`` typeCode RPLC).

    ``document_id`` is the replaced version's id extension, i.e. its transaction id when
    medcourier rendered it. The replacement joins the same series: it keeps the series'
    ``setId`` (that of the first version, which for a first version equals its own id) and
    takes the next ``versionNumber``, as CDA R2 defines document versioning.
    """

    document_id: str
    root: str | None = None  # the replaced id's root; default: the route's document_id_root
    set_id: str | None = None  # the series' setId extension; default: document_id
    version_number: int = 1  # the replaced version's versionNumber


@dataclass
class PatientIdentity:
    """The patient as the CDA header needs it; None marks a missing trait."""

    ins: tuple[str, str] | None = None  # (authority OID, NIR/NIA)
    local_ids: list[tuple[str, str]] = field(default_factory=list)
    birth_family: str | None = None
    first_given: str | None = None
    given_list: str | None = None
    used_family: str | None = None
    used_given: str | None = None
    gender: tuple[str, str] | None = None
    birth_time: str | None = None
    birth_place_code: str | None = None
    birth_place_city: str | None = None
    addresses: list[Mapping[str, Any]] = field(default_factory=list)
    telecoms: list[tuple[str, str | None]] = field(default_factory=list)
    problems: list[Issue] = field(default_factory=list)


@hookimpl
def medcourier_formats() -> list[FormatType]:
    """Register ``cda-dmp``."""
    return [
        FormatType(
            name=FORMAT_NAME,
            options_model=CdaDmpOptions,
            render=render,
            validate=validate,
            description="CDA R2 level 1 for the DMP (CI-SIS structuration minimale), the "
            "document Base64-encoded in nonXMLBody",
        )
    ]


# --- validate --------------------------------------------------------------------------------


def validate(document: Document, options: CdaDmpOptions) -> list[Issue]:
    """Everything that would make the DMP refuse the document, one Issue per missing fact.

    Each missing INS trait is reported on its own, by name, so the text the engine stores on
    an entered-in-error delivery tells the sender exactly what to complete.
    """
    issues: list[Issue] = []
    try:
        document_type(
            document.document_type,
            allow_outside_j07=options.allow_types_outside_j07,
            fallback_display=document.title,
        )
    except RenderError as exc:
        issues.append(Issue(str(exc), location="type"))
    try:
        body_media_type(document.content_type, allow_png_conversion=options.allow_png_conversion)
    except RenderError as exc:
        issues.append(Issue(str(exc), location="content_type"))
    else:
        issues.extend(_payload_issues(document))
    id_problem = _transaction_id_problem(document.transaction_id)
    if id_problem:
        issues.append(Issue(id_problem, location="transaction_id"))
    rpps_problem = _rpps_problem(document.sender_identifier)
    if rpps_problem:
        issues.append(Issue(rpps_problem, location="sender_identifier"))
    issues.extend(patient_identity(document.patient).problems)
    return issues


def _payload_issues(document: Document) -> list[Issue]:
    if not document.payload:
        return [Issue("the document is empty", location="payload")]
    magic = _MAGIC.get(media_type_key(document.content_type))
    if magic and not document.payload.startswith(magic):
        return [
            Issue(
                f"the payload does not look like {document.content_type}",
                severity="warning",
                location="payload",
            )
        ]
    return []


_MAGIC: dict[str, tuple[bytes, ...]] = {
    "application/pdf": (b"%PDF-",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/tiff": (b"II*\x00", b"MM\x00*"),
    "text/rtf": (b"{\\rtf",),
}


def _transaction_id_problem(transaction_id: str) -> str | None:
    # The id extension is an ST: any text, but blank or padded ids make unmatchable documents.
    if not transaction_id.strip() or transaction_id != transaction_id.strip():
        return f"the transaction id {transaction_id!r} cannot be a CDA id extension"
    return None


def _rpps_problem(rpps: str | None) -> str | None:
    if rpps is None or not rpps.strip():
        return (
            "the sender's RPPS is missing: the DMP requires the author, legal authenticator "
            "and performer to be identified by RPPS"
        )
    if not _RPPS.fullmatch(rpps):
        return f"sender identifier {rpps!r} is not an 11-digit RPPS"
    return None


# --- render ----------------------------------------------------------------------------------


def render(document: Document, options: CdaDmpOptions) -> Rendered:
    """Render ``document`` as a CDA R2 level 1, UTF-8 with an XML declaration.

    :raises RenderError: an INS trait or the RPPS is missing, the type is outside JDV_J07, or
        the media type cannot be shared (see :func:`validate`, which reports the same problems).
    """
    return Rendered(
        data=render_cda(document, options),
        media_type=MEDIA_TYPE,
        filename_hint=f"{document.transaction_id}.xml",
        message_id=document.transaction_id,
    )


def render_cda(
    document: Document,
    options: CdaDmpOptions,
    replaces: str | Replacement | None = None,
) -> bytes:
    """The CDA R2 bytes of ``document``, for this format and for profiles that embed a CDA.

    ``replaces`` names the version this document replaces: a transaction id (shorthand for
    ``Replacement(document_id=...)``) or a :class:`Replacement`.

    The header is an lxml tree serialized once; the body's text node holds a random marker
    that is then replaced, in the output bytes, by the Base64 payload encoded slice by slice
    into the output buffer. Peak memory is then about the size of the output (4/3 of the
    payload) instead of three to four times it when the Base64 text goes through libxml2.

    :raises RenderError: see :func:`render`.
    """
    identity = patient_identity(document.patient)
    if identity.problems:
        raise RenderError("; ".join(issue.message for issue in identity.problems))
    rpps_problem = _rpps_problem(document.sender_identifier)
    if rpps_problem:
        raise RenderError(rpps_problem)
    rpps = document.sender_identifier or ""
    id_problem = _transaction_id_problem(document.transaction_id)
    if id_problem:
        raise RenderError(id_problem)
    metadata = xds_metadata(document, options)
    payload = _body_payload(document, metadata.media_type)
    replacement = Replacement(document_id=replaces) if isinstance(replaces, str) else replaces
    if replacement is not None:
        _check_replacement(replacement)

    marker = f"medcourier-body-{uuid.uuid4().hex}"
    root = _clinical_document(document, options, metadata, identity, rpps, replacement, marker)
    head, found, tail = etree.tostring(root, xml_declaration=True, encoding="UTF-8").partition(
        marker.encode("ascii")
    )
    if not found or marker.encode("ascii") in tail:
        raise RenderError("internal error: the body marker is not unique in the CDA header")
    return splice_base64(head, payload, tail)


def _check_replacement(replacement: Replacement) -> None:
    if _transaction_id_problem(replacement.document_id):
        raise RenderError(f"the replaced document id {replacement.document_id!r} is not usable")
    if replacement.root is not None and not _OID.fullmatch(replacement.root):
        raise RenderError(f"the replaced document root {replacement.root!r} is not an OID")
    if replacement.version_number < 1:
        raise RenderError("the replaced document's versionNumber must be 1 or more")


def _body_payload(document: Document, media_type: str) -> bytes:
    """The bytes the body carries: the payload, a PNG converted, or text re-encoded as UTF-8."""
    source = media_type_key(document.content_type)
    if source == PNG_MEDIA_TYPE:
        return png_to_tiff(document.payload)
    if media_type == "text/plain":
        charset = _charset(document.content_type)
        if charset and charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
            try:
                return document.payload.decode(charset).encode("utf-8")
            except (LookupError, UnicodeDecodeError) as exc:
                raise RenderError(f"the text is not valid {charset}: {exc}") from exc
    return document.payload


def _charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower() or None
    return None


def png_to_tiff(data: bytes) -> bytes:
    """Convert a PNG to a TIFF, losslessly (Deflate compression), keeping its resolution.

    The DMP has formatCodes for JPEG and TIFF images but none for PNG (ASS_A12). JPEG would
    re-compress the image with loss, which is not acceptable for a clinical picture or a scan
    whose small print must stay legible; TIFF with Deflate keeps every pixel and the alpha
    channel. A palette image becomes RGB (RGBA when it has a transparent colour), since a TIFF
    palette cannot carry transparency.

    :raises RenderError: the bytes are not a PNG Pillow can decode.
    """
    try:
        # Pillow refuses decompression bombs (over twice Image.MAX_IMAGE_PIXELS) on open.
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            converted = _tiff_compatible(image)
            out = io.BytesIO()
            save_args: dict[str, Any] = {"format": "TIFF", "compression": "tiff_adobe_deflate"}
            dpi = image.info.get("dpi")
            if dpi:
                save_args["dpi"] = dpi
            converted.save(out, **save_args)
    except _IMAGE_ERRORS as exc:
        raise RenderError(f"the PNG image cannot be converted to TIFF: {exc}") from exc
    return out.getvalue()


# What Pillow raises on a file that is not a decodable PNG (SyntaxError for broken chunks), or
# on a decompression bomb.
_IMAGE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
)


def _tiff_compatible(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "PA":
        return image.convert("RGBA")
    if image.mode == "L" and "transparency" in image.info:
        return image.convert("LA")
    if image.mode == "RGB" and "transparency" in image.info:
        return image.convert("RGBA")
    return image


# --- the patient -----------------------------------------------------------------------------


def patient_identity(patient: Mapping[str, Any]) -> PatientIdentity:
    """Read the INS and its traits from a FHIR R4 Patient shaped by FR Core.

    - INS: the identifier whose system is ``urn:oid:`` + an INS authority (1.2.250.1.213.1.4.8
      INS-NIR, .9 INS-NIA, .10 / .11 their test counterparts), value checked as a NIR (15
      characters, key mod 97). Other ``urn:oid:`` identifiers are the local ones (IPP).
    - birth name: ``family`` of the ``official`` HumanName (FR Core: the official name is the
      birth name).
    - first given name: the first ``given`` of the official name (FR Core puts the "premier
      prénom" there).
    - given names: the FR Core extension ``fr-core-patient-birth-list-given-name`` on the
      official name (the list of birth-certificate first names, space-separated); without it,
      the official ``given`` values joined by spaces.
    - used name and first name (nom / prénom utilisés): the ``usual`` HumanName, when present.
    - birth date and gender: ``birthDate`` and ``gender``.
    - birth place: the ``patient-birthPlace`` extension (FR Core's ``birthPlace`` slice); its
      Address carries the INSEE (COG) code in the ``fr-core-address-insee-code`` extension
      (valueCoding.code), as FR Core 2.x profiles it; ``Address.district`` is read as a
      fallback, where FR Core 2.0.0-ballot put the COG code.
    """
    identity = PatientIdentity()
    problems = identity.problems

    invalid_ins: list[str] = []
    for identifier in as_dicts(patient.get("identifier")):
        if identifier.get("use") == "old":
            continue
        system = as_str(identifier.get("system"))
        value = compact_nir(as_str(identifier.get("value")))
        if not value:
            continue
        authority = ins_authority(identifier)
        if authority is not None:
            if nir_problem(value) is not None:
                invalid_ins.append(value)
            elif identity.ins is None or INS_OIDS.index(authority) < INS_OIDS.index(
                identity.ins[0]
            ):
                identity.ins = (authority, value.upper())
        elif system.startswith("urn:oid:") and _OID.fullmatch(system[len("urn:oid:") :]):
            identity.local_ids.append((system[len("urn:oid:") :], value))
    if identity.ins is None:
        if invalid_ins:
            message = (
                # The value is not quoted: reasons are stored and shown in tracking.
                "the patient's INS is not a valid NIR (15 characters ending with its key)"
            )
        else:
            message = (
                "the patient's INS is missing: an identifier with system "
                "urn:oid:1.2.250.1.213.1.4.8 (INS-NIR) or .9 (INS-NIA), or the NIR identifier "
                "http://lifen.fr/fhir/Identifier/patient-nir-od, is required by the DMP"
            )
        problems.append(Issue(message, location="Patient.identifier"))

    names = list(as_dicts(patient.get("name")))
    # A name without ``use`` is the default name (the seed's Patient has only that one): it is
    # read as the official (birth) name when the patient has no name marked official.
    official = next((n for n in names if n.get("use") == "official"), None) or next(
        (n for n in names if not n.get("use")), None
    )
    usual = next((n for n in names if n.get("use") == "usual"), None)
    if official is not None:
        identity.birth_family = as_str(official.get("family")).strip() or None
        given = [g.strip() for g in as_strs(official.get("given")) if g.strip()]
        identity.first_given = given[0] if given else None
        listed = _extension_value(official, BIRTH_LIST_GIVEN_NAME_URL, "valueString")
        identity.given_list = listed.strip() if listed and listed.strip() else None
        if identity.given_list is None and given:
            identity.given_list = " ".join(given)
        if identity.first_given is None and identity.given_list:
            identity.first_given = identity.given_list.split()[0]
    if usual is not None:
        identity.used_family = as_str(usual.get("family")).strip() or None
        used_given = [g.strip() for g in as_strs(usual.get("given")) if g.strip()]
        identity.used_given = used_given[0] if used_given else None
    if identity.birth_family is None:
        problems.append(
            Issue(
                "the patient's birth name is missing (family of the official HumanName)",
                location="Patient.name.family",
            )
        )
    if identity.first_given is None:
        problems.append(
            Issue(
                "the patient's first given name is missing (first given of the official HumanName)",
                location="Patient.name.given",
            )
        )
    if identity.given_list is None:
        problems.append(
            Issue(
                "the patient's given names are missing (birth-list-given-name extension or "
                "given of the official HumanName)",
                location="Patient.name.given",
            )
        )

    gender = as_str(patient.get("gender"))
    identity.gender = GENDER.get(gender)
    if identity.gender is None:
        problems.append(Issue("the patient's gender is missing", location="Patient.gender"))

    birth_date = patient.get("birthDate")
    identity.birth_time = _cda_date(birth_date)
    if identity.birth_time is None:
        what = "missing" if birth_date is None else "not a FHIR date (YYYY-MM-DD)"
        problems.append(Issue(f"the patient's birth date is {what}", location="Patient.birthDate"))

    code, city = _birth_place(patient)
    identity.birth_place_city = city
    if code is not None and _INSEE.fullmatch(code):
        identity.birth_place_code = code
    else:
        detail = "missing" if code is None else "not an INSEE code (5 characters)"
        problems.append(
            Issue(
                f"the patient's birth place is {detail}: the patient-birthPlace extension must "
                "carry the INSEE (COG) code of the commune, or of the country for people born "
                "abroad",
                location="Patient.extension:birthPlace",
            )
        )

    identity.addresses = [a for a in as_dicts(patient.get("address")) if _has_address_parts(a)]
    for contact in as_dicts(patient.get("telecom")):
        telecom = _telecom(contact)
        if telecom is not None:
            identity.telecoms.append(telecom)
    return identity


def _birth_place(patient: Mapping[str, Any]) -> tuple[str | None, str | None]:
    for extension in as_dicts(patient.get("extension")):
        if extension.get("url") not in BIRTH_PLACE_URLS:
            continue
        address = as_dict(extension.get("valueAddress"))
        code = None
        for inner in as_dicts(address.get("extension")):
            if inner.get("url") == INSEE_CODE_URL:
                code = as_str(as_dict(inner.get("valueCoding")).get("code")).strip() or None
        if code is None:
            code = as_str(address.get("district")).strip() or None
        return code, as_str(address.get("city")).strip() or None
    return None, None


def _extension_value(element: Mapping[str, Any], url: str, key: str) -> str | None:
    for extension in as_dicts(element.get("extension")):
        if extension.get("url") == url:
            value = extension.get(key)
            return value if isinstance(value, str) else None
    return None


def _has_address_parts(address: Mapping[str, Any]) -> bool:
    return bool(
        as_strs(address.get("line"))
        or any(as_str(address.get(k)).strip() for k in ("city", "postalCode", "country"))
    )


def _telecom(contact: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """A ContactPoint as a TEL URL (``tel:``, ``fax:``, ``mailto:``) and its CDA use."""
    scheme = _TELECOM_SCHEME.get(as_str(contact.get("system")))
    value = as_str(contact.get("value")).strip()
    if scheme is None or not value:
        return None
    if scheme != "mailto":
        value = _PHONE_NOISE.sub("", value)
        if not re.fullmatch(r"\+?\d+", value):
            return None
    else:
        # The CDA's TEL is a URL: an address with blanks, accents or '%' must be encoded, or the
        # schema and the schematron refuse the whole document.
        value = urllib.parse.quote(value, safe="@!$&'()*+,;=-._~")
    return f"{scheme}:{value}", _TELECOM_USE.get(as_str(contact.get("use")))


# --- the tree --------------------------------------------------------------------------------


def _clinical_document(
    document: Document,
    options: CdaDmpOptions,
    metadata: XdsMetadata,
    identity: PatientIdentity,
    rpps: str,
    replacement: Replacement | None,
    body_marker: str,
) -> Any:
    root = etree.Element(_q("ClinicalDocument"), nsmap={None: HL7_NS})
    _el(root, "realmCode", code="FR")
    _el(root, "typeId", root=TYPE_ID[0], extension=TYPE_ID[1])
    for template_id in TEMPLATE_IDS:
        _el(root, "templateId", root=template_id)
    _el(root, "id", root=options.document_id_root, extension=document.transaction_id)
    type_code = metadata.type_code
    _el(
        root,
        "code",
        code=type_code.code,
        displayName=type_code.display,
        codeSystem=type_code.system,
        codeSystemName=type_code.system_name,
    )
    _el(root, "title", text=document.title.strip() or type_code.display)
    created = _cda_ts(document.created_at)
    _el(root, "effectiveTime", value=created)
    conf = metadata.confidentiality
    _el(
        root,
        "confidentialityCode",
        code=conf.code,
        displayName=conf.display,
        codeSystem=conf.system,
        codeSystemName=conf.system_name,
    )
    _el(root, "languageCode", code=metadata.language)
    if replacement is None:
        _el(root, "setId", root=options.document_id_root, extension=document.transaction_id)
        _el(root, "versionNumber", value="1")
    else:
        parent_root = replacement.root or options.document_id_root
        _el(
            root, "setId", root=parent_root, extension=replacement.set_id or replacement.document_id
        )
        _el(root, "versionNumber", value=str(replacement.version_number + 1))

    _record_target(root, identity)
    _author(root, options, created, rpps)
    custodian = _el(
        _el(_el(root, "custodian"), "assignedCustodian"), "representedCustodianOrganization"
    )
    _el(custodian, "id", root=options.custodian.id_root, extension=options.custodian.id_extension)
    _el(custodian, "name", text=options.custodian.name)
    legal = _el(root, "legalAuthenticator")
    _el(legal, "time", value=created)
    _el(legal, "signatureCode", code="S")
    _el(_el(legal, "assignedEntity"), "id", root=RPPS_ROOT, extension=RPPS_PREFIX + rpps)

    low, high = _encounter_period(document)
    _service_event(root, options, metadata, rpps, low or created, high)
    if replacement is not None:
        parent = _el(_el(root, "relatedDocument", typeCode="RPLC"), "parentDocument")
        parent_root = replacement.root or options.document_id_root
        _el(parent, "id", root=parent_root, extension=replacement.document_id)
        _el(parent, "versionNumber", value=str(replacement.version_number))
    _encompassing_encounter(root, document, metadata, low or created, high)

    body = _el(_el(root, "component"), "nonXMLBody")
    _el(body, "text", mediaType=metadata.media_type, representation="B64", text=body_marker)
    return root


def _record_target(root: Any, identity: PatientIdentity) -> None:
    role = _el(_el(root, "recordTarget"), "patientRole")
    assert identity.ins is not None
    _el(role, "id", root=identity.ins[0], extension=identity.ins[1])
    for oid, value in identity.local_ids:
        _el(role, "id", root=oid, extension=value)
    for address in identity.addresses:
        _address(role, address)
    for url, use in identity.telecoms:
        _el(role, "telecom", value=url, use=use)
    patient = _el(role, "patient", classCode="PSN")
    name = _el(patient, "name")
    # The order and qualifiers of the ANS example: birth name (BR), the list of birth first
    # names (no qualifier), the first of them (BR), then the used name and first name (CL).
    _el(name, "family", qualifier="BR", text=identity.birth_family)
    _el(name, "given", text=identity.given_list)
    _el(name, "given", qualifier="BR", text=identity.first_given)
    if identity.used_family:
        _el(name, "family", qualifier="CL", text=identity.used_family)
    if identity.used_given:
        _el(name, "given", qualifier="CL", text=identity.used_given)
    assert identity.gender is not None
    _el(
        patient,
        "administrativeGenderCode",
        code=identity.gender[0],
        displayName=identity.gender[1],
        codeSystem=GENDER_SYSTEM,
    )
    _el(patient, "birthTime", value=identity.birth_time)
    addr = _el(_el(_el(patient, "birthplace"), "place"), "addr")
    _el(addr, "county", text=identity.birth_place_code)
    if identity.birth_place_city:
        _el(addr, "city", text=identity.birth_place_city)


def _address(parent: Any, address: Mapping[str, Any]) -> None:
    """A FHIR Address as a CI-SIS address with parts.

    The CI-SIS address template is closed: either only ``streetAddressLine`` elements, or named
    parts (``streetName``, ``postalCode``, ``city``...) but not both. Named parts keep the postal
    code and city searchable, so the free-text FHIR lines go to ``streetName`` (the first, which
    holds the number and street as written) and ``additionalLocator`` (the others).
    """
    addr = _el(parent, "addr", use=_ADDRESS_USE.get(as_str(address.get("use"))))
    lines = [line.strip() for line in as_strs(address.get("line")) if line.strip()]
    if lines:
        _el(addr, "streetName", text=lines[0])
    if len(lines) > 1:
        _el(addr, "additionalLocator", text=", ".join(lines[1:]))
    for key in ("postalCode", "city", "country"):
        value = as_str(address.get(key)).strip()
        if value:
            _el(addr, key, text=value)


def _author(root: Any, options: CdaDmpOptions, created: str, rpps: str) -> None:
    author = _el(root, "author")
    _el(author, "time", value=created)
    assigned = _el(author, "assignedAuthor")
    _el(assigned, "id", root=RPPS_ROOT, extension=RPPS_PREFIX + rpps)
    role = options.author_role
    _el(assigned, "code", code=role.code, displayName=role.display, codeSystem=role.system)
    _organization(assigned, "representedOrganization", options.author_org)


def _organization(parent: Any, tag: str, org: OrganizationOptions) -> Any:
    element = _el(parent, tag)
    _el(element, "id", root=org.id_root, extension=org.id_extension)
    _el(element, "name", text=org.name)
    return element


def _service_event(
    root: Any,
    options: CdaDmpOptions,
    metadata: XdsMetadata,
    rpps: str,
    low: str,
    high: str | None,
) -> None:
    event = _el(_el(root, "documentationOf"), "serviceEvent")
    _period(event, low, high)
    entity = _el(_el(event, "performer", typeCode="PRF"), "assignedEntity")
    _el(entity, "id", root=RPPS_ROOT, extension=RPPS_PREFIX + rpps)
    role = options.author_role
    _el(entity, "code", code=role.code, displayName=role.display, codeSystem=role.system)
    org = _organization(entity, "representedOrganization", options.author_org)
    # The practice setting (JDV_J04) goes on the performer's organization, as in the ANS example.
    setting = metadata.practice_setting
    _el(
        org,
        "standardIndustryClassCode",
        code=setting.code,
        displayName=setting.display,
        codeSystem=setting.system,
    )


def _encompassing_encounter(
    root: Any, document: Document, metadata: XdsMetadata, low: str, high: str | None
) -> None:
    encounter = _el(_el(root, "componentOf"), "encompassingEncounter")
    for identifier in as_dicts((document.encounter or {}).get("identifier")):
        system = as_str(identifier.get("system"))
        value = as_str(identifier.get("value")).strip()
        if system.startswith("urn:oid:") and _OID.fullmatch(system[8:]) and value:
            _el(encounter, "id", root=system[8:], extension=value)
            break
    _period(encounter, low, high)
    facility = _el(_el(encounter, "location"), "healthCareFacility")
    facility_type = metadata.healthcare_facility_type
    _el(
        facility,
        "code",
        code=facility_type.code,
        displayName=facility_type.display,
        codeSystem=facility_type.system,
    )


def _period(parent: Any, low: str, high: str | None) -> None:
    time = _el(parent, "effectiveTime")
    _el(time, "low", value=low)
    if high:
        _el(time, "high", value=high)


def _encounter_period(document: Document) -> tuple[str | None, str | None]:
    period = as_dict((document.encounter or {}).get("period"))
    low = _cda_datetime(period.get("start"))
    high = _cda_datetime(period.get("end")) if low else None
    return low, high


def _q(tag: str) -> str:
    return f"{{{HL7_NS}}}{tag}"


# Characters XML 1.0 cannot hold: C0 controls but tab/LF/CR, lone surrogates, U+FFFE/U+FFFF.
# Word pastes VT (0x0B) as a manual line break, so they do reach titles and addresses.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(value: str) -> str:
    """A value lxml accepts: characters XML cannot carry become a space."""
    return _NOT_XML.sub(" ", value)


def _el(parent: Any, tag: str, text: str | None = None, **attributes: str | None) -> Any:
    """A child element in the HL7 namespace; attributes whose value is None are left out."""
    element = etree.SubElement(parent, _q(tag))
    for name, value in attributes.items():
        if value is not None:
            element.set(name, _xml_text(value))
    if text is not None:
        element.text = _xml_text(text)
    return element


# --- dates -----------------------------------------------------------------------------------


def _cda_ts(moment: datetime) -> str:
    """A TS with seconds and the UTC offset the datetime carries (naive is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.strftime("%Y%m%d%H%M%S%z")


def _cda_date(value: object) -> str | None:
    """FHIR date (possibly partial) -> TS date at the same precision; None when not a date."""
    if not isinstance(value, str):
        return None
    match = _FHIR_DATE.fullmatch(value)
    if not match:
        return None
    return "".join(part for part in match.groups() if part)


def _cda_datetime(value: object) -> str | None:
    """FHIR dateTime (with time and zone) or date -> TS, keeping the original UTC offset."""
    if not isinstance(value, str):
        return None
    match = _FHIR_DATETIME.fullmatch(value)
    if match:
        year, month, day, hour, minute, second, zone = match.groups()
        offset = "+0000" if zone == "Z" else zone.replace(":", "")
        return f"{year}{month}{day}{hour}{minute}{second or '00'}{offset}"
    return _cda_date(value)


# --- tolerant JSON access --------------------------------------------------------------------
