"""The ``hl7v2-oru`` format: a document as an HL7 v2.5 ORU^R01 with the file embedded in OBX-5.

This is the message most hospital information systems accept for external documents (letters,
reports, images): the patient in PID, the visit in PV1 when the hospital gave one, one OBR
naming the kind of document by its LOINC code, and one OBX of type ED carrying the file in
Base64.

A route may ask for MDM^T02 instead ("original document notification and content", chapter 9),
which document management systems expect: EVN and a TXA describing the document take the place
of the OBR, and the same OBX carries the file. See :func:`txa_segment` for the TXA choices.

The message is built with plain string formatting. An HL7 object model costs at least a hundred
times more per message, which matters when every delivery renders; the tests parse and validate
our output with hl7apy and python-hl7 instead, so correctness is still checked by a library that
did not write the message.

Values taken from FHIR resources are free text and go through :func:`escape`; the Base64 payload
does not, since its alphabet holds no HL7 delimiter and it may weigh tens of megabytes.

A payload above :data:`STREAM_ABOVE` is not encoded at render time: the rendering carries the
message up to OBX-5's data, the payload itself (as a :class:`Base64Part`) and the rest, and the
Base64 is produced slice by slice while the MLLP client sends it. The bytes are the same as the
whole rendering's (``Rendered.data`` builds them on demand for connectors that need them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Base64Part, Document, Issue, Rendered
from medcourier.engine.plugins import FormatType, hookimpl
from medcourier.transforms.fhir_json import as_dict, as_dicts, as_str, as_strs, first_of
from medcourier.transforms.hl7v2.escape import escape
from medcourier.transforms.payload import splice_base64

FORMAT_NAME = "hl7v2-oru"
MEDIA_TYPE = "application/hl7-v2"

# HD delimiters a route may legitimately configure in MSH-3..6 are the components (^) only:
# "CHU^1.2.250.1.71.4.2.2^ISO" is common. Any other delimiter or a control character would
# corrupt the header, so such values are refused when the configuration is loaded.
_BAD_HD_CHARS = re.compile("[|~\\\\&\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# (OBX-5.2 type of data, OBX-5.3 data subtype) for each content type a receiver can display.
_ED_TYPES: dict[str, tuple[str, str]] = {
    "application/pdf": ("AP", "PDF"),
    "image/jpeg": ("IM", "JPEG"),
    "image/png": ("IM", "PNG"),
    "application/txt": ("TEXT", "PLAIN"),
    "text/plain": ("TEXT", "PLAIN"),
}

# Display names for the document LOINC codes seen most, so OBR-4 carries the code's own label
# rather than whatever title the sender typed.
LOINC_DISPLAY: dict[str, str] = {
    "11488-4": "Consultation note",
    "11506-3": "Progress note",
    "18842-5": "Discharge summary",
    "34133-9": "Summary of episode note",
    "11490-0": "Physician Discharge summary",
    "18748-4": "Diagnostic imaging study",
    "11502-2": "Laboratory report",
    "57133-1": "Referral note",
    "28570-0": "Procedure note",
    "11526-1": "Pathology study",
}

# FHIR HumanName.use -> HL7 table 0200 name type.
_NAME_TYPE = {"official": "L", "usual": "D", "maiden": "M", "nickname": "N", "anonymous": "S"}

# FHIR Patient.gender -> HL7 table 0001.
_SEX = {"male": "M", "female": "F", "other": "O", "unknown": "U"}

# Encounter.class code (v3 ActCode) -> HL7 table 0004 patient class.
_PATIENT_CLASS = {
    "IMP": "I",
    "ACUTE": "I",
    "NONAC": "I",
    "AMB": "O",
    "EMER": "E",
    "PRENC": "P",
}

# The RPPS is the French national identifier of health professionals; its assigning authority
# is fixed by the ANS, so the XCN for it is a constant around the number.
_RPPS = re.compile(r"\d{11}")
_RPPS_AUTHORITY = "RPPS&1.2.250.1.71.4.2.1&ISO"

_FHIR_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_FHIR_DATETIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)

# MSH-9.3, the abstract message structure of each message type this format writes.
_MESSAGE_STRUCTURE: dict[str, str] = {"ORU^R01": "ORU_R01", "MDM^T02": "MDM_T02"}

# TXA-17 (table 0271) and TXA-19 (table 0273) of an MDM^T02; see txa_segment() for the reasons.
_TXA_COMPLETION_STATUS = "AU"
_TXA_AVAILABILITY_STATUS = "AV"

# Above this payload size the rendering is given as parts (head, the payload's Base64 made slice
# by slice as it is sent, tail) instead of whole: a 50 MB PDF would otherwise be held twice, as
# bytes and as 67 MB of Base64. Below it, building the message whole is cheaper and lets the MLLP
# client send it with one write; most documents are a few kilobytes.
STREAM_ABOVE = 1024 * 1024

# MSH-10 must come back verbatim in the receiver's ACK (MSA-2) to be matched with the delivery,
# so it is never escaped: one that would need escaping is refused instead.
_MAX_CONTROL_ID = 20


class OruOptions(BaseModel):
    """A route's ``format_options`` for ``hl7v2-oru``.

    The application and facility values are HD fields: they may carry components
    (``NAME^OID^ISO``) but no other delimiter.
    """

    model_config = ConfigDict(extra="forbid")

    sending_application: str = "MEDCOURIER"
    sending_facility: str = "MEDCOURIER"
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: Literal["P", "T", "D"] = Field(
        default="P", description="MSH-11: P production, T training, D debugging (HL7 table 0103)"
    )
    version: Literal["2.5"] = "2.5"
    message_type: Literal["ORU^R01", "MDM^T02"] = Field(
        default="ORU^R01",
        description="MSH-9: ORU^R01 (observation result, the document under an OBR) or MDM^T02 "
        "(original document notification and content, the document under a TXA)",
    )

    @field_validator(
        "sending_application", "sending_facility", "receiving_application", "receiving_facility"
    )
    @classmethod
    def _hd_without_stray_delimiters(cls, value: str) -> str:
        if _BAD_HD_CHARS.search(value):
            raise ValueError(
                "may use '^' between HD components but no '|', '~', '\\', '&' or control character"
            )
        if value.count("^") > 2:
            raise ValueError("an HD has at most three components (namespace^universal id^type)")
        return value


_DEFAULT_OPTIONS = OruOptions()


@hookimpl
def medcourier_formats() -> list[FormatType]:
    """Register ``hl7v2-oru``."""
    return [
        FormatType(
            name=FORMAT_NAME,
            options_model=OruOptions,
            render=render,
            validate=validate,
            description="HL7 v2.5 ORU^R01 (or MDM^T02) carrying the document Base64-encoded "
            "in OBX-5 (ED)",
        )
    ]


def validate(document: Document, options: OruOptions | None = None) -> list[Issue]:
    """Find what would make the message unrenderable or unusable by the receiver.

    Everything :func:`render` refuses is reported here first, so the engine can answer the
    sender (422) instead of failing later in a worker.
    """
    issues: list[Issue] = []
    if _content_key(document.content_type) not in _ED_TYPES:
        issues.append(
            Issue(
                f"content type {document.content_type!r} cannot be sent in an HL7 v2 ED; "
                f"supported: {', '.join(sorted(_ED_TYPES))}",
                location="content_type",
            )
        )
    problem = control_id_problem(document.transaction_id)
    if problem:
        issues.append(Issue(problem, location="transaction_id"))
    if not document.document_type.strip():
        issues.append(Issue("the document type (a LOINC code) is required", location="type"))
    if document.sender_identifier is not None and not _RPPS.fullmatch(document.sender_identifier):
        issues.append(
            Issue(
                f"sender identifier {document.sender_identifier!r} is not an 11-digit RPPS",
                location="sender_identifier",
            )
        )

    patient = document.patient
    if not _patient_identifiers(patient):
        issues.append(
            Issue("the patient has neither an identifier nor a resource id", location="Patient")
        )
    if not _patient_names(patient):
        issues.append(
            Issue(
                "the patient has no name with a family or given part (PID-5 is required)",
                location="Patient.name",
            )
        )
    birth_date = patient.get("birthDate")
    if birth_date is not None and not _hl7_date(birth_date):
        issues.append(
            Issue(
                f"birthDate {birth_date!r} is not a FHIR date; PID-7 will be left empty",
                severity="warning",
                location="Patient.birthDate",
            )
        )
    if document.encounter is not None:
        period = as_dict(document.encounter.get("period"))
        for key in ("start", "end"):
            value = period.get(key)
            if value is not None and not _hl7_datetime(value):
                issues.append(
                    Issue(
                        f"Encounter.period.{key} {value!r} is not a FHIR dateTime; it is left out",
                        severity="warning",
                        location=f"Encounter.period.{key}",
                    )
                )
    return issues


def render(document: Document, options: OruOptions | None = None) -> Rendered:
    """Render ``document`` as one ORU^R01 or MDM^T02 message (``options.message_type``), UTF-8
    encoded; in parts, its Base64 not yet made, when the payload is above :data:`STREAM_ABOVE`.

    :raises RenderError: the content type has no ED type, MSH-10 would be invalid, or the
        sender identifier is not an RPPS.
    """
    opts = options if options is not None else _DEFAULT_OPTIONS
    ed_type = _ED_TYPES.get(_content_key(document.content_type))
    if ed_type is None:
        raise RenderError(
            f"content type {document.content_type!r} cannot be sent in an HL7 v2 ED segment"
        )
    control_id = document.transaction_id
    problem = control_id_problem(control_id)
    if problem:
        raise RenderError(problem)

    created = hl7_timestamp(document.created_at)
    doc_type = escape(document.document_type)
    title = escape(document.title)
    observer = _observer(document)

    pid = pid_segment(document.patient)
    pv1 = pv1_segment(document.encounter)
    if opts.message_type == "MDM^T02":
        # EVN-1 repeats the trigger event (kept in v2.5 for backward compatibility only; receivers
        # written for v2.3 still read it), EVN-2 is when the event was recorded.
        evn = f"EVN|T02|{created}"
        txa = txa_segment(document, opts, presentation=ed_type[0], provider=observer)
        head: tuple[str, ...] = (evn, pid, pv1, txa)
    else:
        obr_display = escape(LOINC_DISPLAY.get(document.document_type, document.title))
        head = (pid, pv1, f"OBR|1|||{doc_type}^{obr_display}^LN|||{created}{'|' * 18}F")
    # OBX up to the Base64 data, then from the end of OBX-5 to the end of the message: the
    # payload is inserted between the two as bytes, so it is never decoded or copied as text.
    obx_head = f"OBX|1|ED|{doc_type}^{title}^LN||^{ed_type[0]}^{ed_type[1]}^Base64^"
    obx_tail = f"||||||F|||{created}||{observer}"
    body = "\r".join((*head, obx_head))
    structure = _MESSAGE_STRUCTURE[opts.message_type]
    msh = (
        f"MSH|^~\\&|{opts.sending_application}|{opts.sending_facility}"
        f"|{opts.receiving_application}|{opts.receiving_facility}|{created}"
        f"||{opts.message_type}^{structure}|{control_id}|{opts.processing_id}|{opts.version}"
    )
    # str.isascii() is O(1) in CPython (the string's kind is known), so this costs nothing.
    if not (msh.isascii() and body.isascii() and obx_tail.isascii()):
        msh += "||||||UNICODE UTF-8"

    head_bytes, tail_bytes = f"{msh}\r{body}".encode(), f"{obx_tail}\r".encode()
    if len(document.payload) > STREAM_ABOVE:
        return Rendered.from_parts(
            (head_bytes, Base64Part(document.payload), tail_bytes),
            MEDIA_TYPE,
            f"{control_id}.hl7",
            control_id,
        )
    return Rendered(
        data=splice_base64(head_bytes, document.payload, tail_bytes),
        media_type=MEDIA_TYPE,
        filename_hint=f"{control_id}.hl7",
        message_id=control_id,
    )


# --- segments -------------------------------------------------------------------------------


def pid_segment(patient: Mapping[str, Any]) -> str:
    home_phones: list[str] = []
    work_phones: list[str] = []
    for contact in as_dicts(patient.get("telecom")):
        xtn = _xtn(contact)
        if xtn:
            (work_phones if contact.get("use") == "work" else home_phones).append(xtn)
    fields = [
        "PID",
        "1",
        "",
        "~".join(_patient_identifiers(patient)),
        "",
        "~".join(_patient_names(patient)),
        "",
        _hl7_date(patient.get("birthDate")),
        _SEX.get(as_str(patient.get("gender")), ""),
        "",
        "",
        "~".join(filter(None, map(_xad, as_dicts(patient.get("address"))))),
        "",
        "~".join(home_phones),
        "~".join(work_phones),
    ]
    return "|".join(fields).rstrip("|")


def pv1_segment(encounter: Mapping[str, Any] | None) -> str:
    if encounter is None:
        # PV1-2 is required; N (not applicable) says there is no visit rather than an unknown one.
        return "PV1|1|N"
    fields = [""] * 46
    fields[0] = "PV1"
    fields[1] = "1"
    fields[2] = _PATIENT_CLASS.get(as_str(as_dict(encounter.get("class")).get("code")), "U")
    location = as_dict(as_dict(first_of(encounter.get("location"))).get("location"))
    if location:
        # PL-1 (point of care) is a coded value; the human-readable display goes to PL-9.
        code = escape(as_str(as_dict(location.get("identifier")).get("value")))
        display = escape(as_str(location.get("display")))
        fields[3] = f"{code}^^^^^^^^{display}".rstrip("^") if display else code
    visit = _cx(as_dict(first_of(encounter.get("identifier"))), "VN")
    if visit:
        fields[19] = visit
    period = as_dict(encounter.get("period"))
    fields[44] = _hl7_datetime(period.get("start"))
    fields[45] = _hl7_datetime(period.get("end"))
    return "|".join(fields).rstrip("|")


def txa_segment(
    document: Document, options: OruOptions, *, presentation: str, provider: str
) -> str:
    """The TXA of an MDM^T02 (HL7 v2.5 chapter 9, "TXA - transcription document header").

    - TXA-1 set id 1: the message carries one document.
    - TXA-2 the LOINC code alone. In v2.5 TXA-2 is an IS (user-defined table 0270), a single
      component: ``code^display^LN`` would be an invalid IS (it became a CWE only in v2.6), so
      the coded form with its display stays in OBX-3, as in the ORU.
    - TXA-3 the OBX-5.2 type of data (``presentation``): both fields use table 0191, so a PDF is
      AP, an image IM and text TEXT (TX is the v2.2 code that TEXT replaced).
    - TXA-4 activity and TXA-6 origination date/time: when the document was made, the time the
      ORU puts in OBR-7 and OBX-14; medcourier knows no separate time for the activity.
    - TXA-5 primary activity provider: the author as OBX-16 names it (``provider``).
    - TXA-12 unique document number, an EI: the transaction id, "assigned by the sending
      system" as chapter 9 puts it, so its assigning authority (EI-2..4, which are exactly the
      HD components) is the sending application of MSH-3: ``txid^NAME^OID^ISO`` with a route
      configured as ``NAME^OID^ISO``, the bare id when MSH-3 is empty. Retries render the same
      number, so a receiver that already filed the document recognises it.
    - TXA-13 parent document number: empty, a T02 is an original document, not an addendum or
      a replacement.
    - TXA-17 completion status AU (authenticated): the sender hands over a finished document,
      the one the ORU marks final (OBX-11 F). DO would be wrong: table 0271 means by it content
      not yet in its final electronic form (paper, voice to text); DI, IP, IN and PA are
      transcription workflow states that announce a later status change medcourier never
      sends; LA asserts a signature by the legally responsible person, which medcourier cannot
      vouch for. AU is also what the ANS profile's MDM writes.
    - TXA-19 availability status AV (available for patient care): the document is delivered to
      be read, not held back.
    """
    unique_number = f"{escape(document.transaction_id)}^{options.sending_application}".rstrip("^")
    fields = [""] * 20
    fields[0] = "TXA"
    fields[1] = "1"
    fields[2] = escape(document.document_type)
    fields[3] = presentation
    fields[4] = hl7_timestamp(document.created_at)
    fields[5] = provider
    fields[6] = fields[4]
    fields[12] = unique_number
    fields[17] = _TXA_COMPLETION_STATUS
    fields[19] = _TXA_AVAILABILITY_STATUS
    return "|".join(fields)


def _observer(document: Document) -> str:
    """OBX-16: the RPPS of the author when known, else the sending application by name."""
    rpps = document.sender_identifier
    if rpps is not None:
        if not _RPPS.fullmatch(rpps):
            raise RenderError(f"sender identifier {rpps!r} is not an 11-digit RPPS")
        return f"{rpps}^^^^^^^^{_RPPS_AUTHORITY}^^^^RPPS"
    return f"^{escape(document.sender_application)}"


# --- data types -----------------------------------------------------------------------------


def _patient_identifiers(patient: Mapping[str, Any]) -> list[str]:
    """PID-3 repetitions; the resource id stands in when there is no identifier, PID-3 being
    required and the only thing a receiver can match the patient on."""
    found = [cx for cx in map(_cx_pi, as_dicts(patient.get("identifier"))) if cx]
    if not found:
        resource_id = as_str(patient.get("id"))
        if resource_id:
            found.append(f"{escape(resource_id)}^^^MEDCOURIER^PI")
    return found


def _cx_pi(identifier: Mapping[str, Any]) -> str:
    return _cx(identifier, "PI")


def _cx(identifier: Mapping[str, Any], default_type: str) -> str:
    """A CX ``value^^^namespace&universal id&type^type code``, or "" without a value."""
    value = as_str(identifier.get("value"))
    if not value:
        return ""
    namespace = escape(as_str(as_dict(identifier.get("assigner")).get("display")))
    system = as_str(identifier.get("system"))
    if system.startswith("urn:oid:"):
        authority = f"{namespace}&{escape(system[8:])}&ISO"
    elif system:
        authority = f"{namespace}&{escape(system)}&URI"
    else:
        authority = namespace
    type_code = as_str(as_dict(first_of(as_dict(identifier.get("type")).get("coding"))).get("code"))
    return f"{escape(value)}^^^{authority}^{escape(type_code) if type_code else default_type}"


def _patient_names(patient: Mapping[str, Any]) -> list[str]:
    return [xpn for xpn in map(_xpn, as_dicts(patient.get("name"))) if xpn]


def _xpn(name: Mapping[str, Any]) -> str:
    """An XPN ``family^given^further given names^suffix^prefix^^name type``.

    A name with neither family nor given part (only ``text``) is not representable: putting a
    whole formatted name in the family component would mislead patient matching.
    """
    family = escape(as_str(name.get("family")))
    given = as_strs(name.get("given"))
    if not family and not given:
        return ""
    first = escape(given[0]) if given else ""
    further = escape(" ".join(given[1:]))
    suffix = escape(" ".join(as_strs(name.get("suffix"))))
    prefix = escape(" ".join(as_strs(name.get("prefix"))))
    name_type = _NAME_TYPE.get(as_str(name.get("use")), "")
    return f"{family}^{first}^{further}^{suffix}^{prefix}^^{name_type}".rstrip("^")


def _xad(address: Mapping[str, Any]) -> str:
    """An XAD ``line 1^other lines^city^state^postal code^country``.

    The second and later lines go to XAD-2 (other designation), as the HL7 v2-to-FHIR mapping
    does, so that line 1 stays the street a receiver can geocode.
    """
    lines = as_strs(address.get("line"))
    parts = (
        escape(lines[0]) if lines else "",
        escape(", ".join(lines[1:])),
        escape(as_str(address.get("city"))),
        escape(as_str(address.get("state"))),
        escape(as_str(address.get("postalCode"))),
        escape(as_str(address.get("country"))),
    )
    return "^".join(parts).rstrip("^")


def _xtn(contact: Mapping[str, Any]) -> str:
    """An XTN for a phone, fax or e-mail ContactPoint; "" for other systems (url, pager...)."""
    value = escape(as_str(contact.get("value")))
    if not value:
        return ""
    system = contact.get("system")
    use = "WPN" if contact.get("use") == "work" else "PRN"
    if system == "email":
        return f"^NET^Internet^{value}"
    if system == "phone":
        return f"{value}^{use}^{'CP' if contact.get('use') == 'mobile' else 'PH'}"
    if system == "fax":
        return f"{value}^{use}^FX"
    return ""


def hl7_timestamp(moment: datetime) -> str:
    """HL7 TS in UTC with an explicit offset; a naive datetime is taken as UTC already."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return (
        f"{moment.year:04d}{moment.month:02d}{moment.day:02d}"
        f"{moment.hour:02d}{moment.minute:02d}{moment.second:02d}+0000"
    )


def _hl7_date(value: object) -> str:
    """FHIR date (possibly partial) -> HL7 DT at the same precision; "" when not a date."""
    if not isinstance(value, str):
        return ""
    match = _FHIR_DATE.fullmatch(value)
    return "".join(part for part in match.groups() if part) if match else ""


def _hl7_datetime(value: object) -> str:
    """FHIR dateTime -> HL7 TS keeping the original precision and UTC offset.

    The offset is kept rather than converted: admission times are read as local hospital time.
    """
    if not isinstance(value, str):
        return ""
    match = _FHIR_DATETIME.fullmatch(value)
    if not match:
        return ""
    *parts, zone = match.groups()
    text = "".join(part for part in parts if part)
    if zone and len(text) > 8:
        text += "+0000" if zone == "Z" else zone.replace(":", "")
    return text


def control_id_problem(control_id: str) -> str | None:
    if not control_id:
        return "the transaction id (MSH-10) is empty"
    if len(control_id) > _MAX_CONTROL_ID:
        return f"the transaction id {control_id!r} is longer than {_MAX_CONTROL_ID} characters"
    if escape(control_id) != control_id:
        return f"the transaction id {control_id!r} contains an HL7 delimiter or control character"
    return None


def _content_key(content_type: str) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``: parameters do not change the ED type."""
    return content_type.split(";", 1)[0].strip().lower()


# --- tolerant JSON access: a malformed element is skipped, never a crash mid-render ----------
