"""Reading HL7 v2.5 messages that come in: ADT for the directory, ORU and MDM for documents.

Pure functions: a decoded message (``str``) in, frozen dataclasses carrying FHIR R4 JSON out. No
store, no I/O: the engine decides what an event means for the directory and where documents go.

:class:`_Message` splits a message as python-hl7 (``hl7.parse``) does, with the same segments,
fields, repetitions, components and subcomponents (MSH-1 is the field separator, MSH-2 the
encoding characters), but only ``str.split`` calls: the segments into fields up front, a field
into its parts the first time it is read. Building python-hl7's tree of containers for every
field was half of an ADT's cost on the listener's event loop, for a dozen fields read. A large
OBX-5 is never copied before it is read, so it needs no special path. python-hl7 still splits a
message whose delimiters are not all distinct (its results then depend on their order), and
tests compare both splits (tests/test_hl7_split.py). :class:`_Message` is the only code
touching python-hl7.

Every text value goes through python-hl7's ``unescape`` (HL7 v2.5 ch. 2, "escape sequences in
text fields"), after :meth:`_Message.unescape` has neutralised what that function gets wrong:

* an empty sequence (``\\\\``) or an unknown one would be logged through the deprecated
  ``logger.warn`` (or ``logger.exception``), so it is dropped beforehand;
* a lone escape character would swallow the rest of the value, so it is kept as a literal;
* ``\\Xhh..\\`` would become one character per byte (Latin-1); the bytes are decoded as UTF-8
  when they are valid UTF-8 (our messages are UTF-8, MSH-18), as Latin-1 otherwise;
* highlighting (``\\H\\``, ``\\N\\``) would become ``_``; it is dropped, and line breaks
  (``\\.br\\``, ``\\.sp\\``, ``\\.ce\\``) become ``\\n`` rather than ``\\r``.

Base64 data is not unescaped (its alphabet holds no delimiter), unless a sender escaped line
breaks into it, which a single ``str.find`` detects.

Time stamps without a UTC offset are local time at the sender; FHIR requires an offset on every
dateTime with a time, so the offset of ``assume_tz`` (default Europe/Paris, DST-aware) at that
moment is used.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal, cast
from urllib.parse import quote
from zoneinfo import ZoneInfo

import hl7

from medcourier.engine.inbound import InboundError, PatientIdentifier

__all__ = [
    "AdtEvent",
    "AdtKind",
    "DocumentMessage",
    "ExtractedDocument",
    "MessageError",
    "UnsupportedMessageError",
    "parse_adt",
    "parse_document_message",
]

DEFAULT_TZ = "Europe/Paris"
DEFAULT_DOCUMENT_TYPE = "11488-4"  # LOINC "Consultation note", the engine-wide default

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
FR_CORE_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
AUTHORITY_URN = "urn:medcourier:authority:"
VISIT_URN = "urn:medcourier:visit:"

# INS (Identifiant National de Santé): the OID of the assigning authority tells NIR from NIA and
# production from test; FR Core (fr-core-patient-ins) slices the identifiers by these systems and
# fixes the type code of each slice.
INS_TYPES = {
    "1.2.250.1.213.1.4.8": "INS-NIR",
    "1.2.250.1.213.1.4.9": "INS-NIA",
    "1.2.250.1.213.1.4.10": "INS-NIR-TEST",
    "1.2.250.1.213.1.4.11": "INS-NIR-DEMO",
}
# Identifier type codes FR Core defines itself (they are not in HL7 table 0203).
_FR_CORE_TYPES = frozenset(
    {"INS-NIR", "INS-NIA", "INS-NIR-TEST", "INS-NIR-DEMO", "INS-C", "NDP", "NNFRA", "ADELI"}
    | {"RPPS", "IDNPS"}
)

# ANS OID of the national health-professional identifiers (IDNPS = "8" + RPPS for the RPPS).
RPPS_OID = "1.2.250.1.71.4.2.1"
_RPPS = re.compile(r"\d{11}")

_OID = re.compile(r"[0-2](?:\.(?:0|[1-9]\d*))+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_NIR = re.compile(r"([1-8]\d{4}(?:\d{2}|2A|2B)\d{6})(\d{2})")

AdtKind = Literal["upsert", "discharge", "cancel-admit", "cancel-discharge", "merge"]

# HL7 v2.5 ch. 3 trigger events -> what they do to the directory.
_ADT_KINDS: dict[str, AdtKind] = {
    "A01": "upsert",  # admit/visit notification
    "A04": "upsert",  # register a patient (outpatient, emergency)
    "A05": "upsert",  # pre-admit
    "A08": "upsert",  # update patient information
    "A28": "upsert",  # add person information (identity feed, no visit)
    "A31": "upsert",  # update person information (identity feed, no visit)
    "A03": "discharge",
    "A11": "cancel-admit",
    "A13": "cancel-discharge",
    "A40": "merge",  # merge patient - patient identifier list
}
# Movements of a visit: PV1 with a visit number (PV1-19) is required, the event is about it.
_VISIT_TRIGGERS = frozenset({"A01", "A03", "A04", "A05", "A11", "A13"})

_DOCUMENT_MESSAGES = frozenset({("ORU", "R01"), ("MDM", "T02")})

# HL7 table 0004 (patient class) -> v3 ActCode. R (recurring patient: dialysis, chemotherapy,
# the French "séances") is a series of day sessions, hence ambulatory; B (obstetrics) is a
# stay. The v2-to-FHIR IG keeps R and B as v2-0004 codes instead, but Encounter.class is bound
# to ActCode and our ORU writer only maps ActCode back to PV1-2.
_PATIENT_CLASS: dict[str, tuple[str, str]] = {
    "I": ("IMP", "inpatient encounter"),
    "B": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"),
    "R": ("AMB", "ambulatory"),
    "E": ("EMER", "emergency"),
    "P": ("PRENC", "pre-admission"),
}
_AMBULATORY = ("AMB", "ambulatory")

# HL7 table 0200 (name type) -> HumanName.use. In French practice (IHE PAM France) L is the
# birth name ("nom de naissance", the INS one) and D the used name ("nom utilisé").
_NAME_USE = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname", "S": "anonymous"}

# HL7 table 0001 (administrative sex) -> Patient.gender.
_GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}

# HL7 table 0190 (address type) -> Address.use; birth places are not contact addresses.
_ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "old"}
_BIRTH_ADDRESS = frozenset({"BDL", "BR", "N"})

# HL7 table 0201 (telecommunication use) -> ContactPoint.use.
_TELECOM_USE = {"PRN": "home", "ORN": "home", "VHN": "home", "WPN": "work"}

# HL7 tables 0191 (type of data) and 0291 (subtype) -> content type. application/txt is the
# engine's name for plain text (medcourier.engine.content.CONTENT_TYPES).
_SUBTYPES = {
    "PDF": "application/pdf",
    "JPEG": "image/jpeg",
    "JPG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
    "PLAIN": "application/txt",
    "XML": "application/xml",
    "X-HL7-CDA-LEVEL-ONE": "application/xml",
    "HTML": "text/html",
    "RTF": "application/rtf",
    "OCTET-STREAM": "application/octet-stream",
}
_TEXT_TYPES = frozenset({"TEXT", "TX", "FT"})
_OCTET_STREAM = "application/octet-stream"

# python-hl7's unescape, given this app_map, drops highlighting and writes line breaks as "\n".
_APP_MAP = {"H": "", "N": "", ".br": "\n", ".sp": "\n", ".ce": "\n"}
_KNOWN_ESCAPE = re.compile(r"[FRSTEHN]|\.(?:br|sp|fi|nf|in|ti|sk|ce)(?:[+-]?\d+)?")
_HEX_ESCAPE = re.compile(r"X((?:[0-9A-Fa-f]{2})+)")

# HL7 v2.5 DTM: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ].
_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)


# --- results --------------------------------------------------------------------------------


class MessageError(InboundError, ValueError):
    """The message is wrong or incomplete; the sender must fix it (answered AE).

    ``location`` follows HL7 ERR-2, ``segment^sequence^field`` (``PID^1^3``), when known.
    """

    def __init__(self, message: str, location: str | None = None) -> None:
        super().__init__(message, location)


class UnsupportedMessageError(MessageError):
    """A well-formed message of a type or trigger these parsers do not read (answered AR)."""


@dataclass(frozen=True)
class AdtEvent:
    """What an ADT message says about a patient and, for movements, a visit.

    ``patient`` and ``encounter`` are FHIR R4 resources as JSON without ``id`` and ``meta``
    (the encounter has no ``subject`` either); the engine finds the existing ones by identifier.
    ``facility`` (MSH-4) is the hospital the message comes from, which the engine turns into
    ``managingOrganization`` / ``serviceProvider``.
    """

    trigger: str
    kind: AdtKind
    facility: str
    patient: dict[str, Any]
    patient_identifiers: tuple[PatientIdentifier, ...]
    encounter: dict[str, Any] | None = None
    merge_from: tuple[PatientIdentifier, ...] = ()
    message_datetime: datetime | None = None
    event_datetime: datetime | None = None
    control_id: str = ""
    sending_application: str = ""
    notes: tuple[str, ...] = ()

    @property
    def event(self) -> str:
        """``ADT^A01``: the message type and trigger, for logs and the audit trail."""
        return f"ADT^{self.trigger}"


@dataclass(frozen=True)
class ExtractedDocument:
    """One document found in an OBX: embedded (ED, ``payload``) or referenced (RP).

    ``obx`` is the position of its OBX among the message's OBX segments, for ERR-2 locations
    (``OBX^<obx>^5``).
    """

    obx: int
    document_type: str
    content_type: str | None = None
    payload: bytes | None = None
    reference: str | None = None
    title: str | None = None
    sender_identifier: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DocumentMessage:
    """An ORU^R01 or MDM^T02 carrying documents, and the patient (and visit) they are about."""

    message_type: str  # "ORU^R01" or "MDM^T02"
    facility: str
    patient: dict[str, Any]
    patient_identifiers: tuple[PatientIdentifier, ...]
    documents: tuple[ExtractedDocument, ...]
    visit_number: str | None = None
    visit_system: str | None = None
    encounter: dict[str, Any] | None = None
    message_datetime: datetime | None = None
    control_id: str = ""
    sending_application: str = ""
    notes: tuple[str, ...] = ()


# --- entry points ---------------------------------------------------------------------------


def parse_adt(text: str, *, assume_tz: str | tzinfo = DEFAULT_TZ) -> AdtEvent:
    """Read an ADT message (A01, A03, A04, A05, A08, A11, A13, A28, A31, A40).

    :param assume_tz: the sender's time zone, for time stamps without a UTC offset.
    :raises UnsupportedMessageError: not ADT, or a trigger outside the list above.
    :raises MessageError: a required segment or field is missing or malformed.
    """
    message = _Message(text)
    ctx = _Context(message, _zone(assume_tz))
    msh = message.msh
    msg_type, trigger = msh.value(9, 1, 1).upper(), msh.value(9, 1, 2).upper()
    if msg_type != "ADT":
        raise UnsupportedMessageError(
            f"{msg_type or '?'}^{trigger or '?'} is not an ADT message", "MSH^1^9"
        )
    kind = _ADT_KINDS.get(trigger)
    if kind is None:
        raise UnsupportedMessageError(
            f"ADT^{trigger or '?'} is not supported (supported: {', '.join(sorted(_ADT_KINDS))})",
            "MSH^1^9",
        )

    pid = _single(message, "PID", "the patient")
    patient = _patient(pid, ctx)

    evn = message.first("EVN")
    event_moment = None
    if evn is not None:
        # EVN-6 (event occurred) is when it happened; EVN-2 (recorded) when it was typed in.
        event_moment = _ts(evn, 6, "EVN-6 (event occurred)") or _ts(
            evn, 2, "EVN-2 (recorded date/time)"
        )

    encounter = None
    merge_from: tuple[PatientIdentifier, ...] = ()
    if kind == "merge":
        mrg = _single(message, "MRG", "the merged patient")
        merge_from = _identifiers_of(
            {"identifier": _identifier_list(mrg, 1, "MRG-1 (prior patient identifier list)", ctx)}
        )
    else:
        pv1 = message.first("PV1")
        if trigger in _VISIT_TRIGGERS:
            if pv1 is None:
                raise MessageError(f"ADT^{trigger} needs a PV1 segment (the visit)", "PV1^1")
            if not pv1.value(19):
                raise MessageError(
                    f"PV1-19 (visit number) is empty; ADT^{trigger} is about a visit",
                    pv1.location(19),
                )
        if pv1 is not None and pv1.value(19):
            encounter = _encounter(pv1, ctx, trigger, event_moment)

    moment = _ts(msh, 7, "MSH-7 (date/time of message)")
    return AdtEvent(
        trigger=trigger,
        kind=kind,
        facility=ctx.facility,
        patient=patient,
        patient_identifiers=_identifiers_of(patient),
        encounter=encounter,
        merge_from=merge_from,
        message_datetime=moment.datetime(ctx.tz) if moment else None,
        event_datetime=event_moment.datetime(ctx.tz) if event_moment else None,
        control_id=msh.value(10),
        sending_application=msh.value(3) or msh.value(3, 1, 2),
        notes=tuple(ctx.notes),
    )


def parse_document_message(text: str, *, assume_tz: str | tzinfo = DEFAULT_TZ) -> DocumentMessage:
    """Read the documents of an ORU^R01 or MDM^T02: every OBX of type ED (embedded) or RP
    (reference pointer), with the patient of its PID and the visit of its PV1.

    :raises UnsupportedMessageError: another message type.
    :raises MessageError: no PID, no document, undecodable data...
    """
    message = _Message(text)
    ctx = _Context(message, _zone(assume_tz))
    msh = message.msh
    msg_type, trigger = msh.value(9, 1, 1).upper(), msh.value(9, 1, 2).upper()
    if (msg_type, trigger) not in _DOCUMENT_MESSAGES:
        raise UnsupportedMessageError(
            f"{msg_type or '?'}^{trigger or '?'} does not carry documents we read "
            "(supported: ORU^R01, MDM^T02)",
            "MSH^1^9",
        )

    pid = _single(message, "PID", "the patient")
    patient = _patient(pid, ctx)

    visit: dict[str, Any] | None = None
    encounter = None
    pv1 = message.first("PV1")
    if pv1 is not None and pv1.value(19):
        encounter = _encounter(pv1, ctx, None, None)
        visit = encounter["identifier"][0]

    txa = message.first("TXA") if msg_type == "MDM" else None
    documents: list[ExtractedDocument] = []
    obr: _Segment | None = None
    obx_count = 0
    for segment in message.segments:
        if segment.name == "OBR":
            obr = segment
        elif segment.name == "OBX":
            obx_count += 1
            value_type = segment.value(2).upper()
            if value_type in ("ED", "RP"):
                documents.append(_document(segment, value_type, obr, txa, ctx))
    if not documents:
        raise MessageError(
            "no document in the message (OBX of type ED)", "OBX^1^2" if obx_count else "OBX^1"
        )

    moment = _ts(msh, 7, "MSH-7 (date/time of message)")
    return DocumentMessage(
        message_type=f"{msg_type}^{trigger}",
        facility=ctx.facility,
        patient=patient,
        patient_identifiers=_identifiers_of(patient),
        documents=tuple(documents),
        visit_number=visit["value"] if visit else None,
        visit_system=visit["system"] if visit else None,
        encounter=encounter,
        message_datetime=moment.datetime(ctx.tz) if moment else None,
        control_id=msh.value(10),
        sending_application=msh.value(3) or msh.value(3, 1, 2),
        notes=tuple(ctx.notes),
    )


# --- the message: split here, unescaped by python-hl7 ---------------------------------------

# A field as repetitions -> components -> subcomponents, still escaped.
_Tree = list[list[list[str]]]

# Segments whose first fields python-hl7 reads as MSH does: name, field separator, encoding
# characters (not split).
_HEADER_SEGMENTS = ("MSH", "BHS", "FHS")


def _encoding(text: str) -> tuple[str, str]:
    """The delimiters of a message starting with ``MSH``, read as ``hl7.parse`` reads them:
    ``("\\r" + field + repetition + component + subcomponent separators, escape character)``.

    MSH-1 is the character after ``MSH``; MSH-2 runs from it to its next occurrence, which
    python-hl7 looks for in the whole text (past the MSH segment when MSH-2 is its last field),
    and whose missing characters default to ``^~\\&``.
    """
    field_sep = text[3]
    encoding = text[3 : text.find(field_sep, 4)]
    repetition = encoding[2] if len(encoding) > 2 else "~"
    component = encoding[1] if len(encoding) > 1 else "^"
    subcomponent = encoding[4] if len(encoding) > 4 else "&"
    escape = encoding[3] if len(encoding) > 3 else "\\"
    return f"\r{field_sep}{repetition}{component}{subcomponent}", escape


# A segment as its name and fields; a field is its text still to split, or already split.
_RawSegment = tuple[str, list[str | _Tree]]


def _split_segments(text: str, separators: str) -> list[_RawSegment]:
    """Segments and fields as ``hl7.parse`` finds them, given five distinct delimiters.

    python-hl7 splits a line on the field separator, a field on the repetition separator, and
    so on down, stopping where a piece holds none of the delimiters still to come: the result
    is the plain nested ``str.split``, which :meth:`_Message.split_field` does when a field is
    first read. Its two particular cases are kept: a line holding no delimiter at all is not a
    segment, and a header segment (MSH, BHS, FHS) has its field separator as field 1 and its
    encoding characters, unsplit, as field 2.
    """
    field_sep, repetition = separators[1], separators[2]
    component, subcomponent = separators[3], separators[4]
    segments: list[_RawSegment] = []
    for line in text.split("\r"):
        if (
            field_sep not in line
            and repetition not in line
            and component not in line
            and subcomponent not in line
        ):
            continue  # an empty line between segments
        fields: list[str | _Tree]
        if line[:3] in _HEADER_SEGMENTS:
            own = line[3]
            end = line.find(own, 4)
            fields = [[[[line[:3]]]], [[[own]]], [[[line[4:end]]]]]
            rest = line[end + 1 :]
            if rest:
                fields.extend(rest.split(field_sep))
            name = line[:3]
        else:
            texts = line.split(field_sep)
            fields = cast("list[str | _Tree]", texts)
            name = texts[0].split(repetition, 1)[0]
        segments.append((name.strip().upper(), fields))
    return segments


def _python_hl7_segments(text: str) -> list[_RawSegment]:
    """The same through ``hl7.parse``, for delimiters that are not all distinct (python-hl7's
    splitting then depends on their order in its own ways) and for comparison in tests."""
    parsed: Any = hl7.parse(text)
    segments: list[_RawSegment] = []
    for raw_segment in parsed:
        if isinstance(raw_segment[0], str):
            continue  # an empty line between segments
        name = str(raw_segment[0][0]).strip().upper()
        segments.append((name, [_flatten(raw_field) for raw_field in raw_segment]))
    return segments


class _Message:
    """A parsed message: its segments in order, and the unescaping of its delimiters.

    ``python_hl7`` splits the message with ``hl7.parse`` rather than :func:`_split_segments`
    (which gives the same segments, faster); delimiters that are not all distinct always do.
    """

    def __init__(self, text: str, *, python_hl7: bool = False) -> None:
        text = text.lstrip("\ufeff").strip()
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
        if not text.startswith("MSH") or len(text) < 8:
            raise MessageError("not an HL7 v2 message: it must start with an MSH segment", "MSH^1")
        separators, self.esc = _encoding(text)
        self.separators = separators
        self.sub_separator = separators[4]
        self._repetition = separators[2]
        self._component = separators[3]
        try:
            if python_hl7 or len(set(separators)) < len(separators):
                raw_segments = _python_hl7_segments(text)
            else:
                raw_segments = _split_segments(text, separators)
        except Exception as exc:  # python-hl7 raises ParseException, IndexError...
            raise MessageError(f"not a parsable HL7 v2 message: {exc}", "MSH^1") from exc
        seen: dict[str, int] = {}
        self.segments: list[_Segment] = []
        for name, fields in raw_segments:
            seen[name] = seen.get(name, 0) + 1
            self.segments.append(_Segment(self, name, seen[name], fields))
        self.msh = self.segments[0]
        self._unescaper: Any = None

    def first(self, name: str) -> _Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def all(self, name: str) -> list[_Segment]:
        return [s for s in self.segments if s.name == name]

    def split_field(self, text: str) -> _Tree:
        """A field's text -> repetitions -> components -> subcomponents."""
        repetition, component, subcomponent = self._repetition, self._component, self.sub_separator
        if repetition not in text and component not in text and subcomponent not in text:
            return [[[text]]]
        return [
            [part.split(subcomponent) for part in rep.split(component)]
            for rep in text.split(repetition)
        ]

    def unescape(self, raw: str) -> str:
        """HL7 escape sequences -> text, through python-hl7 (see the module docstring)."""
        if self.esc not in raw:
            return raw
        if self._unescaper is None:
            # python-hl7's unescape reads only the delimiters of the message it is called on.
            self._unescaper = hl7.Message(separators=self.separators, esc=self.esc)
        parts: list[str] = []
        position = 0
        for match in _escape_sequence(self.esc).finditer(raw):
            parts.append(raw[position : match.start()])
            sequence = match.group(1)
            hex_digits = _HEX_ESCAPE.fullmatch(sequence)
            if hex_digits:
                parts.append(self._reescape(_decode_hex_text(hex_digits.group(1))))
            elif _KNOWN_ESCAPE.fullmatch(sequence):
                parts.append(match.group(0))
            # anything else (empty, \Cxxyy\, \Mxxyyzz\, \Zxx\) is dropped
            position = match.end()
        # An escape character left without its closing one is a literal.
        parts.append(raw[position:].replace(self.esc, f"{self.esc}E{self.esc}"))
        return str(self._unescaper.unescape("".join(parts), _APP_MAP))

    def _reescape(self, text: str) -> str:
        """Text decoded from ``\\X..\\``, escaped again so python-hl7 passes it through."""
        table = {ord(self.esc): f"{self.esc}E{self.esc}"}
        for char, code in zip(self.separators[1:5], "FRST", strict=True):
            table[ord(char)] = f"{self.esc}{code}{self.esc}"
        table[ord("\r")] = table[ord("\n")] = f"{self.esc}.br{self.esc}"
        return text.translate(table)


@functools.cache
def _escape_sequence(esc: str) -> re.Pattern[str]:
    """An escape sequence: the escape character, what is not one, the escape character."""
    escape = re.escape(esc)
    return re.compile(f"{escape}([^{escape}]*){escape}")


def _flatten(raw_field: Any) -> _Tree:
    """python-hl7 nests a field only as deep as its delimiters go; make it always three deep."""
    if len(raw_field) == 1 and isinstance(raw_field[0], str):
        return [[[raw_field[0]]]]
    tree: _Tree = []
    for repetition in raw_field:
        if isinstance(repetition, str):
            tree.append([[repetition]])
        elif len(repetition) == 1 and isinstance(repetition[0], str):
            tree.append([[repetition[0]]])
        else:
            tree.append(
                [[part] if isinstance(part, str) else [str(s) for s in part] for part in repetition]
            )
    return tree


class _Segment:
    """One segment; ``value(field, repetition, component, subcomponent)`` counts from 1, as HL7
    does, so ``value(3, 1, 4, 2)`` reads PID-3.4.2 of the first repetition."""

    def __init__(
        self, message: _Message, name: str, sequence: int, fields: list[str | _Tree]
    ) -> None:
        self.message = message
        self.name = name
        self.sequence = sequence
        # A field is split the first time it is read: most fields of a segment never are.
        self._fields = fields

    def location(self, field_number: int | None = None) -> str:
        base = f"{self.name}^{self.sequence}"
        return base if field_number is None else f"{base}^{field_number}"

    def field_count(self) -> int:
        return len(self._fields)

    def field(self, field_number: int) -> _Tree:
        """The field split (``IndexError`` past the last one)."""
        found = self._fields[field_number]
        if isinstance(found, str):
            found = self._fields[field_number] = self.message.split_field(found)
        return found

    def repetitions(self, field_number: int) -> list[_Repetition]:
        if field_number >= len(self._fields):
            return []
        return [_Repetition(self, rep) for rep in self.field(field_number)]

    def raw(self, field_number: int, repetition: int = 1, component: int = 1, sub: int = 1) -> str:
        try:
            return self.field(field_number)[repetition - 1][component - 1][sub - 1]
        except IndexError:
            return ""

    def value(
        self, field_number: int, repetition: int = 1, component: int = 1, sub: int = 1
    ) -> str:
        """The unescaped value, stripped; HL7's explicit null ``""`` reads as empty."""
        return _text(self.message, self.raw(field_number, repetition, component, sub))


class _Repetition:
    """One repetition of a field: components and subcomponents counted from 1."""

    def __init__(self, segment: _Segment, components: list[list[str]]) -> None:
        self.segment = segment
        self.components = components

    def raw(self, component: int = 1, sub: int = 1) -> str:
        try:
            return self.components[component - 1][sub - 1]
        except IndexError:
            return ""

    def value(self, component: int = 1, sub: int = 1) -> str:
        return _text(self.segment.message, self.raw(component, sub))

    def raw_component(self, component: int) -> str:
        """A whole component, its subcomponents joined back (for data that is not structured)."""
        if component > len(self.components):
            return ""
        return self.segment.message.sub_separator.join(self.components[component - 1])

    def is_empty(self) -> bool:
        return not any(part.strip() for component in self.components for part in component)


def _text(message: _Message, raw: str) -> str:
    if not raw or raw == '""':
        return ""
    return message.unescape(raw).strip()


@dataclass
class _Context:
    message: _Message
    tz: tzinfo
    notes: list[str] = field(default_factory=list)

    @property
    def facility(self) -> str:
        """MSH-4 namespace (or its universal id when there is no namespace)."""
        msh = self.message.msh
        return msh.value(4) or msh.value(4, 1, 2)

    def facility_authority(self) -> tuple[str, str, str]:
        msh = self.message.msh
        return msh.value(4), msh.value(4, 1, 2), msh.value(4, 1, 3)


def _single(message: _Message, name: str, what: str) -> _Segment:
    found = message.all(name)
    if not found:
        raise MessageError(f"the message has no {name} segment ({what})", f"{name}^1")
    if len(found) > 1:
        raise MessageError(
            f"the message has {len(found)} {name} segments; one per message is supported",
            f"{name}^2",
        )
    return found[0]


# --- patient (PID, HL7 v2.5 ch. 3) ----------------------------------------------------------


def _patient(pid: _Segment, ctx: _Context) -> dict[str, Any]:
    """PID -> FHIR Patient without id/meta/managingOrganization (the engine sets those)."""
    patient: dict[str, Any] = {
        "identifier": _identifier_list(pid, 3, "PID-3 (patient identifier list)", ctx)
    }
    names = [name for rep in pid.repetitions(5) if (name := _human_name(rep))]
    if names:
        patient["name"] = names
    telecom = [
        contact
        for number, default_use in ((13, "home"), (14, "work"))
        for rep in pid.repetitions(number)
        if (contact := _contact_point(rep, default_use))
    ]
    if telecom:
        patient["telecom"] = telecom
    sex = pid.value(8).upper()
    if sex in _GENDER:
        patient["gender"] = _GENDER[sex]
    elif sex:
        ctx.notes.append(f"PID-8 sex {sex!r} is not in HL7 table 0001; gender left out")
    birth = _ts(pid, 7, "PID-7 (date/time of birth)")
    if birth:
        patient["birthDate"] = birth.fhir_date()
    death = _ts(pid, 29, "PID-29 (patient death date and time)")
    if death:
        patient["deceasedDateTime"] = death.fhir_datetime(ctx.tz)
    elif pid.value(30).upper() in ("Y", "N"):
        patient["deceasedBoolean"] = pid.value(30).upper() == "Y"
    addresses: list[dict[str, Any]] = []
    for rep in pid.repetitions(11):
        address, address_type = _address(rep)
        if not address:
            continue
        if address_type in _BIRTH_ADDRESS:
            # IHE PAM France sends the birth place as a PID-11 of type BDL.
            if "extension" not in patient:
                patient["extension"] = [{"url": BIRTH_PLACE, "valueAddress": address}]
        else:
            addresses.append(address)
    if addresses:
        patient["address"] = addresses
    return patient


def _identifier_list(
    segment: _Segment, number: int, label: str, ctx: _Context
) -> list[dict[str, Any]]:
    """Every CX repetition of a field as FHIR Identifiers, duplicates dropped; one is required."""
    location = segment.location(number)
    identifiers: list[dict[str, Any]] = []
    name = label.split(" ", 1)[0]
    for index, rep in enumerate(segment.repetitions(number), start=1):
        identifier = _identifier(rep, ctx, location, f"{name} repetition {index}")
        if identifier and not any(
            (i["system"], i["value"]) == (identifier["system"], identifier["value"])
            for i in identifiers
        ):
            identifiers.append(identifier)
    if not identifiers:
        raise MessageError(f"{label} is empty", location)
    return identifiers


def _identifier(
    rep: _Repetition, ctx: _Context, location: str, label: str, *, visit: bool = False
) -> dict[str, Any] | None:
    """A CX (HL7 v2.5 ch. 2A) -> FHIR Identifier; None without a value (CX-1).

    The system comes from the assigning authority, CX-4 (HD: namespace & universal id & type,
    table 0301): an ISO OID gives ``urn:oid:``, a URI itself, a UUID ``urn:uuid:``, and a bare
    namespace ``urn:medcourier:authority:<namespace>``. Without CX-4 the sending facility
    (MSH-4) is the authority: an IPP is assigned by the hospital sending it. A visit number
    without CX-4 gets ``urn:medcourier:visit:<facility>``, visit numbers being a separate
    numbering from the IPP's.
    """
    value = rep.value(1)
    if not value:
        return None
    namespace, universal_id, id_type = rep.value(4, 1), rep.value(4, 2), rep.value(4, 3)
    if namespace or universal_id:
        system = _authority_system(namespace, universal_id, id_type)
    elif visit:
        namespace = ctx.facility
        system = VISIT_URN + _urn_part(namespace) if namespace else None
    else:
        namespace, universal_id, id_type = ctx.facility_authority()
        system = _authority_system(namespace, universal_id, id_type)
    if system is None:
        raise MessageError(
            f"{label} has no assigning authority (CX-4) and MSH-4 (sending facility) is empty",
            location,
        )
    identifier: dict[str, Any] = {"system": system, "value": value}
    type_code = rep.value(5)
    ins_type = INS_TYPES.get(universal_id) if id_type.upper() == "ISO" else None
    if ins_type:
        if not _nir_is_valid(value):
            raise MessageError(
                f"{label}: INS {value!r} is not a valid NIR/NIA (13 characters and a 2-digit key)",
                location,
            )
        identifier["use"] = "official"
        type_code = ins_type
    elif not type_code and visit:
        type_code = "VN"
    if type_code:
        type_system = FR_CORE_0203 if type_code.upper() in _FR_CORE_TYPES else V2_0203
        identifier["type"] = {"coding": [{"system": type_system, "code": type_code}]}
    if namespace:
        identifier["assigner"] = {"display": namespace}
    return identifier


def _authority_system(namespace: str, universal_id: str, id_type: str) -> str | None:
    kind = id_type.upper()
    if universal_id and kind == "ISO" and _OID.fullmatch(universal_id):
        return f"urn:oid:{universal_id}"
    if universal_id and kind == "URI":
        return universal_id
    if universal_id and kind == "UUID" and _UUID.fullmatch(universal_id):
        return f"urn:uuid:{universal_id.lower()}"
    if namespace or universal_id:
        return AUTHORITY_URN + _urn_part(namespace or universal_id)
    return None


def _urn_part(name: str) -> str:
    """A namespace inside a URN: characters a URI cannot hold (spaces, accents) %-encoded."""
    return quote(name, safe="-._~!$'()*+,;=:@")


def _nir_is_valid(value: str) -> bool:
    """NIR / NIA: 13 characters then the key, 97 - (number mod 97); Corsica (2A, 2B) counts as
    19 and 18 in the number."""
    match = _NIR.fullmatch(value.upper())
    if not match:
        return False
    body = match.group(1)
    digits = body[:5] + {"2A": "19", "2B": "18"}.get(body[5:7], body[5:7]) + body[7:]
    return 97 - int(digits) % 97 == int(match.group(2))


def _identifiers_of(patient: dict[str, Any]) -> tuple[PatientIdentifier, ...]:
    return tuple(PatientIdentifier(i["system"], i["value"]) for i in patient["identifier"])


def _human_name(rep: _Repetition) -> dict[str, Any] | None:
    """An XPN -> HumanName: family XPN-1.1, given XPN-2 then the words of XPN-3.

    French senders (IHE PAM France, INS) put the whole list of birth given names in XPN-3,
    first one included; a leading repeat of XPN-2 is therefore not added twice.
    """
    family = rep.value(1, 1)
    first = rep.value(2)
    further = rep.value(3).split()
    first_words = first.split()
    if first_words and further[: len(first_words)] == first_words:
        further = further[len(first_words) :]
    given = ([first] if first else []) + further
    if not family and not given:
        return None
    name: dict[str, Any] = {}
    use = _NAME_USE.get(rep.value(7).upper())
    if use:
        name["use"] = use
    if family:
        name["family"] = family
    if given:
        name["given"] = given
    if rep.value(5):
        name["prefix"] = [rep.value(5)]
    if rep.value(4):
        name["suffix"] = [rep.value(4)]
    return name


def _address(rep: _Repetition) -> tuple[dict[str, Any], str]:
    """An XAD -> (Address, XAD-7 address type): lines from XAD-1.1 and XAD-2, then city,
    state, postal code and country (XAD-3..6)."""
    address: dict[str, Any] = {}
    lines = [line for line in (rep.value(1, 1), rep.value(2)) if line]
    if lines:
        address["line"] = lines
    for component, key in ((3, "city"), (4, "state"), (5, "postalCode"), (6, "country")):
        if rep.value(component):
            address[key] = rep.value(component)
    address_type = rep.value(7).upper()
    if address and address_type in _ADDRESS_USE:
        address["use"] = _ADDRESS_USE[address_type]
    return address, address_type


def _contact_point(rep: _Repetition, default_use: str) -> dict[str, Any] | None:
    """An XTN -> ContactPoint. The system follows XTN-3 (table 0202: Internet e-mail, FX fax,
    BP beeper, CP cell phone, else phone); the use XTN-2 (table 0201), CP meaning mobile, and
    otherwise the field: PID-13 is the home number, PID-14 the business one."""
    use_code, equipment = rep.value(2).upper(), rep.value(3).upper()
    if equipment in ("INTERNET", "X.400") or use_code == "NET":
        system, value = "email", rep.value(4) or rep.value(1)
    else:
        value = rep.value(1) or rep.value(12) or _assembled_number(rep)
        system = {"FX": "fax", "BP": "pager"}.get(equipment, "phone")
        if not value and rep.value(4):
            system, value = "email", rep.value(4)
    if not value:
        return None
    use = "mobile" if equipment == "CP" else _TELECOM_USE.get(use_code, default_use)
    return {"system": system, "value": value, "use": use}


def _assembled_number(rep: _Repetition) -> str:
    """XTN-5 country code, XTN-6 area code, XTN-7 local number, XTN-8 extension."""
    country, area, local, extension = (rep.value(n) for n in (5, 6, 7, 8))
    if not local:
        return ""
    number = " ".join(part for part in (f"+{country}" if country else "", area, local) if part)
    return f"{number} ext. {extension}" if extension else number


# --- visit (PV1, HL7 v2.5 ch. 3) ------------------------------------------------------------


def _encounter(
    pv1: _Segment, ctx: _Context, trigger: str | None, event_moment: _Moment | None
) -> dict[str, Any]:
    """PV1 -> FHIR Encounter without id/subject; PV1-19 (visit number) must be valued.

    Status by trigger: A01/A04 in-progress, A05 (pre-admit) planned, A03 finished, A11
    cancelled (the admission is voided), A13 in-progress again (the discharge time dropped);
    A08/A28/A31 and document messages (``trigger`` None): finished when PV1-45 (discharge
    date/time) is valued, else in-progress. Admission and discharge times default to EVN-6
    (event occurred) for A01/A04 and A03, where it is the same moment.
    """
    location = pv1.location(19)
    visit = _identifier(pv1.repetitions(19)[0], ctx, location, "PV1-19 (visit number)", visit=True)
    assert visit is not None  # the callers checked PV1-19.1
    start = _ts(pv1, 44, "PV1-44 (admit date/time)")
    end = _ts(pv1, 45, "PV1-45 (discharge date/time)")
    if start is None and trigger in ("A01", "A04"):
        start = event_moment
    if end is None and trigger == "A03":
        end = event_moment
    if trigger == "A13":
        end = None

    if trigger in ("A01", "A04", "A13"):
        status = "in-progress"
    elif trigger == "A05":
        status = "planned"
    elif trigger == "A03":
        status = "finished"
    elif trigger == "A11":
        status = "cancelled"
    else:
        status = "finished" if end else "in-progress"

    patient_class = pv1.value(2).upper()
    code, display = _PATIENT_CLASS.get(patient_class, _AMBULATORY)
    if patient_class not in _PATIENT_CLASS:
        ctx.notes.append(
            f"PV1-2 patient class {patient_class or '(empty)'!r} has no ActCode equivalent; "
            "Encounter.class set to AMB"
        )
    encounter: dict[str, Any] = {
        "identifier": [visit],
        "status": status,
        "class": {"system": ACT_CODE, "code": code, "display": display},
    }
    where = _location_display(pv1)
    if where:
        encounter["location"] = [{"location": {"display": where}}]
    period = {}
    if start:
        period["start"] = start.fhir_datetime(ctx.tz)
    if end:
        period["end"] = end.fhir_datetime(ctx.tz)
    if period:
        encounter["period"] = period
    return encounter


def _location_display(pv1: _Segment) -> str:
    """PV1-3 (PL): "point of care/room/bed" from PL-1..3, else PL-9 (location description)."""
    parts = [pv1.value(3, 1, n) for n in (1, 2, 3)]
    return "/".join(part for part in parts if part) or pv1.value(3, 1, 9)


# --- documents (OBX, HL7 v2.5 ch. 7; TXA, ch. 9) --------------------------------------------


def _document(
    obx: _Segment, value_type: str, obr: _Segment | None, txa: _Segment | None, ctx: _Context
) -> ExtractedDocument:
    location = obx.location(5)
    repetitions = obx.repetitions(5)
    if not repetitions or repetitions[0].is_empty():
        raise MessageError(f"OBX-5 (observation value) of an {value_type} OBX is empty", location)
    if len(repetitions) > 1 and not all(rep.is_empty() for rep in repetitions[1:]):
        ctx.notes.append(f"{location}: only the first repetition of OBX-5 is read")
    rep = repetitions[0]
    document_type = _document_type(obx, obr, txa)
    title = obx.value(3, 1, 2) or (obr.value(4, 1, 2) if obr else "") or _txa_title(txa)
    sender = _sender_rpps(obx, obr, txa)
    extra = _extra(obx, obr, txa)
    if value_type == "RP":
        # RP: pointer ^ application id ^ type of data ^ subtype.
        pointer = rep.value(1)
        if not pointer:
            raise MessageError("OBX-5 reference pointer (RP-1) is empty", location)
        data_type, subtype = rep.value(3), rep.value(4)
        return ExtractedDocument(
            obx=obx.sequence,
            document_type=document_type,
            content_type=_content_type(data_type, subtype) if data_type or subtype else None,
            reference=pointer,
            title=title or None,
            sender_identifier=sender,
            extra=extra,
        )

    # ED: source application ^ type of data ^ subtype ^ encoding ^ data.
    data_type, subtype, encoding = rep.value(2), rep.value(3), rep.value(4)
    payload = _ed_payload(obx.message, rep.raw_component(5), encoding, location)
    content_type = _content_type(data_type, subtype)
    if content_type == _OCTET_STREAM and subtype.upper() != "OCTET-STREAM":
        ctx.notes.append(
            f"{location}: ED type {data_type!r} subtype {subtype!r} has no known content type"
        )
    return ExtractedDocument(
        obx=obx.sequence,
        document_type=document_type,
        content_type=content_type,
        payload=payload,
        title=title or None,
        sender_identifier=sender,
        extra=extra,
    )


def _ed_payload(message: _Message, data: str, encoding: str, location: str) -> bytes:
    """ED-5 data decoded by ED-4 (table 0299): Base64, Hex, or A / none for plain text.

    Base64 is decoded strictly (a wrong character or padding is an error, not silently
    skipped). Its alphabet needs no escaping, so it is only unescaped when it contains the
    escape character: some senders break long lines with ``\\.br\\`` or ``\\X0D0A\\``.
    """
    kind = encoding.upper()
    if kind == "BASE64":
        if message.esc in data:
            data = "".join(message.unescape(data).split())
        try:
            payload = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MessageError(f"OBX-5 data is not valid Base64: {exc}", location) from exc
    elif kind == "HEX":
        try:
            payload = bytes.fromhex(message.unescape(data))
        except ValueError as exc:
            raise MessageError(f"OBX-5 data is not valid hexadecimal: {exc}", location) from exc
    elif kind in ("", "A"):
        payload = message.unescape(data).encode("utf-8")
    else:
        raise MessageError(
            f"OBX-5 encoding (ED-4) {encoding!r} is not one of Base64, Hex, A", location
        )
    if not payload:
        raise MessageError("OBX-5 carries no data (ED-5 is empty)", location)
    return payload


def _content_type(data_type: str, subtype: str) -> str:
    """ED-2 type of data (table 0191) and ED-3 subtype (table 0291) -> content type.

    The subtype decides when known (``AP^PDF``, ``IM^JPEG``, ``TEXT^XML``...); senders writing
    MIME types (``application^pdf``) land there too. Text types without a subtype are plain
    text; the rest is application/octet-stream, for the engine to refuse.
    """
    known = _SUBTYPES.get(subtype.upper())
    if known:
        return known
    if data_type.upper() in _TEXT_TYPES and not subtype:
        return "application/txt"
    return _OCTET_STREAM


def _loinc(segment: _Segment, number: int) -> str:
    """A CE/CWE's LOINC code: the identifier (1) when its coding system (3) is LN, else the
    alternate identifier (4) when the alternate coding system (6) is."""
    if segment.value(number, 1, 3).upper() == "LN" and segment.value(number):
        return segment.value(number)
    if segment.value(number, 1, 6).upper() == "LN" and segment.value(number, 1, 4):
        return segment.value(number, 1, 4)
    return ""


def _document_type(obx: _Segment, obr: _Segment | None, txa: _Segment | None) -> str:
    """LOINC from OBX-3, else OBR-4 (universal service id), else TXA-2 when coded in LOINC
    (a CWE from v2.6 on), else 11488-4."""
    for segment, number in ((obx, 3), (obr, 4), (txa, 2)):
        if segment is not None:
            code = _loinc(segment, number)
            if code:
                return code
    return DEFAULT_DOCUMENT_TYPE


def _txa_title(txa: _Segment | None) -> str:
    return txa.value(2, 1, 2) if txa is not None else ""


def _sender_rpps(obx: _Segment, obr: _Segment | None, txa: _Segment | None) -> str | None:
    """The author's RPPS, from the first of OBX-16 (responsible observer, XCN), OBR-32
    (principal result interpreter, NDL), TXA-9 (originator, XCN) and TXA-22 (authenticator,
    PPN) that carries one.

    An id is an RPPS when its assigning authority is the ANS OID 1.2.250.1.71.4.2.1 or is named
    RPPS, or its identifier type code is RPPS. Under that OID the id may be the IDNPS, "8"
    followed by the RPPS (CI-SIS), which is reduced to the 11-digit RPPS.
    """
    candidates = [_xcn_id(rep) for rep in obx.repetitions(16)]
    if obr is not None:
        # NDL-1 is a CNN: id & family & given & ... & namespace (9) & universal id (10) & type.
        candidates += [
            (rep.value(1, 1), rep.value(1, 9), rep.value(1, 10), "") for rep in obr.repetitions(32)
        ]
    if txa is not None:
        candidates += [_xcn_id(rep) for number in (9, 22) for rep in txa.repetitions(number)]
    for value, namespace, universal_id, type_code in candidates:
        if not (
            universal_id == RPPS_OID or "RPPS" in namespace.upper() or type_code.upper() == "RPPS"
        ):
            continue
        if universal_id == RPPS_OID and len(value) == 12 and value.startswith("8"):
            value = value[1:]
        if _RPPS.fullmatch(value):
            return value
    return None


def _xcn_id(rep: _Repetition) -> tuple[str, str, str, str]:
    """XCN-1 id number, XCN-9 assigning authority (namespace, universal id), XCN-13 type."""
    return rep.value(1), rep.value(9, 1), rep.value(9, 2), rep.value(13)


def _extra(obx: _Segment, obr: _Segment | None, txa: _Segment | None) -> dict[str, str]:
    """Fields the engine may want for replacement or deduplication, when valued."""
    pairs = [("result_status", obx.value(11))]  # OBX-11, table 0085: F final, C corrected...
    if obr is not None:
        pairs += [
            ("placer_order_number", obr.value(2)),
            ("filler_order_number", obr.value(3)),
        ]
    if txa is not None:
        pairs += [
            ("document_type_code", txa.value(2)),  # TXA-2, table 0270 (CN, DS, PN...)
            ("unique_document_number", txa.value(12)),
            ("parent_document_number", txa.value(13)),
            ("completion_status", txa.value(17)),  # TXA-17, table 0271 (AU, LA, DI...)
        ]
    return {key: value for key, value in pairs if value}


# --- time stamps (TS / DTM, HL7 v2.5 ch. 2A) ------------------------------------------------


@dataclass(frozen=True)
class _Moment:
    """An HL7 DTM at its own precision: the parts it has, the offset if it gave one."""

    year: int
    month: int | None
    day: int | None
    hour: int | None
    minute: int | None
    second: int | None
    fraction: str | None
    offset: timedelta | None

    def fhir_date(self) -> str:
        text = f"{self.year:04d}"
        if self.month is not None:
            text += f"-{self.month:02d}"
            if self.day is not None:
                text += f"-{self.day:02d}"
        return text

    def datetime(self, tz: tzinfo) -> datetime:
        zone = timezone(self.offset) if self.offset is not None else tz
        micro = int((self.fraction or "0").ljust(6, "0")[:6])
        return datetime(
            self.year,
            self.month or 1,
            self.day or 1,
            self.hour or 0,
            self.minute or 0,
            self.second or 0,
            micro,
            tzinfo=zone,
        )

    def fhir_datetime(self, tz: tzinfo) -> str:
        """FHIR dateTime: date precision as is; with a time, seconds and an offset are
        required, so missing seconds are 00 and a missing offset is ``tz``'s at that moment."""
        if self.hour is None:
            return self.fhir_date()
        moment = self.datetime(tz)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S")
        if self.fraction:
            text += f".{self.fraction}"
        offset = moment.utcoffset() or timedelta(0)
        minutes = int(offset.total_seconds()) // 60
        sign = "-" if minutes < 0 else "+"
        hours, minutes = divmod(abs(minutes), 60)
        return f"{text}{sign}{hours:02d}:{minutes:02d}"


def _ts(segment: _Segment, number: int, label: str) -> _Moment | None:
    """The TS of a field (its first component, TS-1), None when empty."""
    value = segment.value(number)
    if not value:
        return None
    problem = f"{label} {value!r} is not an HL7 date/time (YYYY[MM[DD[HHMM[SS]]]][+/-ZZZZ])"
    match = _DTM.fullmatch(value)
    if not match:
        raise MessageError(problem, segment.location(number))
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = match.groups()
    month_n, day_n, hour_n, minute_n, second_n = (
        int(part) if part is not None else None for part in (month, day, hour, minute, second)
    )
    offset = None
    if sign:
        if int(off_h) > 14 or int(off_m) > 59:
            raise MessageError(problem, segment.location(number))
        offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
    moment = _Moment(int(year), month_n, day_n, hour_n, minute_n, second_n, fraction, offset)
    try:
        moment.datetime(UTC)
    except ValueError as exc:
        raise MessageError(problem, segment.location(number)) from exc
    return moment


def _zone(assume_tz: str | tzinfo) -> tzinfo:
    return ZoneInfo(assume_tz) if isinstance(assume_tz, str) else assume_tz


def _decode_hex_text(digits: str) -> str:
    data = bytes.fromhex(digits)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
