"""HPRIM Santé files coming in: what they mean to the engine, and how they travel to it.

Entry point (pyproject, group ``medcourier``): ``hprim-inbound =
"medcourier.transforms.hprim.interpret"``. It registers ``medcourier_interpret_message`` for
messages whose type starts with ``HPRIM`` (``HPRIM^ORU``), the way
:mod:`medcourier.transforms.hl7v2.interpret` does for HL7 v2.

**One road for every HPRIM file.** A drop folder hands each HPRIM file to the engine through
``InboundSink.hl7_message``, as one :class:`HprimInboundMessage` per patient, and this hook
turns it into ``MessageDocuments``; text documents (TX/C) and companion files (FIC) alike. The
other possible road, the drop folder building ``InboundDocument`` s itself and calling
``InboundSink.document``, was rejected: that door only attaches documents to patients the
directory already knows, whereas a result message names its patient in full (the P record) and
the engine creates it when missing, exactly as for an HL7 ORU. Two roads would also mean two
deduplications and two sets of rules for the same file.

**Companion files ride on the message.** ``InboundMessage`` (engine) has no room for the bytes of
the files a FIC OBX names, and it must not grow HPRIM-specific fields. :class:`HprimInboundMessage`
is a subclass, defined here, that adds them (with the file's character set and the reading
options); the engine passes the message object untouched to the hook, which reads them back. No
registry keyed by control id: nothing to clean up, nothing shared between two engines, and the
bytes cannot outlive or miss their message.

**One patient per message.** The hook returns one ``MessageDocuments``, which holds one patient,
while a lab's HPRIM file may hold many (H, then P/OBR/OBX per patient, then L). The drop folder
therefore splits a file by patient (:func:`read_hprim_file`: the H record, one patient's records
and the L record, verbatim), like an HL7 file with several messages: each patient is accepted or
refused on its own, and the file's ``.error.txt`` says which. A message with several patients
that reaches the hook some other way is refused with that explanation.

**Deduplication.** The control id of each part is the SHA-256 of that patient's records and of
its companion files (names and bytes): the same file processed again after a crash, or resent
with one fixed patient, is recognised patient by patient, whatever its H-14 date. No file name
goes into it: control ids are logged, and hospital file names may carry a patient's name.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from itertools import pairwise
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from medcourier.engine.content import CONTENT_TYPES, sniff
from medcourier.engine.inbound import (
    InboundDocument,
    InboundError,
    InboundMessage,
    InboundRejected,
    Interpretation,
    MessageDocuments,
)
from medcourier.engine.plugins import hookimpl
from medcourier.transforms.hl7v2.inbound import AUTHORITY_URN, DEFAULT_DOCUMENT_TYPE, V2_0203
from medcourier.transforms.hl7v2.interpret import organization_of
from medcourier.transforms.hprim.reader import (
    EscapeStyle,
    HprimMessage,
    HprimParseError,
    HprimPatient,
    HprimRecord,
    HprimRequest,
    HprimResult,
    parse_hprim,
)

__all__ = [
    "HPRIM_CHARSET",
    "HPRIM_MESSAGE_TYPE",
    "HprimFileError",
    "HprimInboundMessage",
    "companion_file_name",
    "companion_names",
    "file_charset",
    "looks_like_hprim",
    "medcourier_interpret_message",
    "read_hprim_file",
]

HPRIM_MESSAGE_TYPE = "HPRIM"
"""``InboundMessage.message_type`` of an HPRIM file: ``HPRIM^<H-7>`` (``HPRIM^ORU``)."""
HPRIM_CHARSET = "iso-8859-1"
"""What the recommendation and most senders use (docs/hprim.md, F19)."""

_TERMINATORS = re.compile(r"\r\n|\r|\n")  # the reader's, so that its line numbers index ours
_UTF8_BOM = b"\xef\xbb\xbf"
_LOINC = re.compile(r"(\d{1,7})-(\d)")
_RPPS = re.compile(r"\d{11}")
_HPRIM_DATE = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:\d{2}){0,3})?)?")

# OBX-6 type component (libHprim's "TXT", a RIS bridge's "PDF") or file extension -> the
# engine's content types (application/txt is its name for plain text).
_FIC_CONTENT_TYPES = {
    "PDF": "application/pdf",
    "JPG": "image/jpeg",
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "TXT": "application/txt",
}
_GENDER = {"M": "male", "F": "female", "U": "unknown"}


@dataclass(frozen=True)
class HprimInboundMessage(InboundMessage):
    """One patient of an HPRIM file, as a drop folder hands it to the engine.

    ``text`` is the decoded HPRIM text (H record, the patient's records, L record; CR between
    records). ``charset`` is the one it was decoded with: ``\\Xhh\\`` escapes stand for bytes of
    that character set, so the hook re-reads the text in it. ``companions`` holds the files the
    FIC OBX name, as (name written in OBX-6, bytes). ``source`` says where the part was in its
    file, for the ``.error.txt``.
    """

    charset: str = "utf-8"
    escape_style: EscapeStyle = "sequences"
    ipp_system: str | None = None
    companions: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)  # megabytes
    source: str = ""


class HprimFileError(ValueError):
    """An HPRIM file that cannot be split into messages: ``code`` for logs, ``text`` for the
    operator (it may name the file)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# --------------------------------------------------------------------------- files


def looks_like_hprim(head: bytes) -> bool:
    """True when the first non-blank line of ``head`` is an H line with delimiters (``H|~^\\&``).

    Stricter than the reader, which skips junk before the first H line: this only decides, in a
    folder of HPRIM files and their companions, which files are HPRIM files without reading them
    whole, and a companion (a PDF, a text report) never starts with an H line.
    """
    line = head.removeprefix(_UTF8_BOM).lstrip(b"\x00 \t\r\n").split(b"\n", 1)[0]
    line = line.split(b"\r", 1)[0]
    return (
        len(line) >= 3
        and line[:1] == b"H"
        and not line[1:2].isalnum()
        and not line[1:2].isspace()
        and line[1] < 0x80
    )


def file_charset(data: bytes, default: str = HPRIM_CHARSET) -> str:
    """The character set to read a file in: UTF-8 when it starts with a UTF-8 byte order mark
    (the only declaration an HPRIM file can carry: no field of the H record names a character
    set in any public source), else ``default``."""
    return "utf-8" if data.startswith(_UTF8_BOM) else default


def companion_file_name(name: str) -> str | None:
    """The file to look for beside the HPRIM file, for a name written in a FIC OBX.

    Senders on Windows sometimes write a path: only its last part is kept, and the file is only
    ever looked for beside the HPRIM file. None for names that cannot be a file there (empty,
    ``.``/``..``, hidden files, which drop folders never take).
    """
    base = re.split(r"[\\/]", name.strip())[-1].strip()
    if not base or base.startswith(".") or any(ord(ch) < 32 for ch in base):
        return None
    return base


def companion_names(
    data: bytes, default_charset: str = HPRIM_CHARSET, escape_style: EscapeStyle = "sequences"
) -> list[str]:
    """The files the FIC OBX of a whole HPRIM file name, as written, in order, once each.

    :raises HprimFileError: the file cannot be read (the caller keeps it for its error report).
    """
    parsed = _parse(data, file_charset(data, default_charset), escape_style)
    names: list[str] = []
    for patient in parsed.patients:
        for request in patient.requests:
            for file in request.files:
                if file.name not in names:
                    names.append(file.name)
    return names


def read_hprim_file(
    data: bytes,
    *,
    channel: str,
    companion: Callable[[str], bytes],
    default_charset: str = HPRIM_CHARSET,
    escape_style: EscapeStyle = "sequences",
    ipp_system: str | None = None,
) -> tuple[HprimInboundMessage, ...]:
    """Split an HPRIM file into one message per patient, with its companion files.

    :param companion: returns the bytes of a file a FIC OBX names (the name as written in
        OBX-6); it raises what the caller wants to report when the file is missing.
    :raises HprimFileError: not an HPRIM file, a file without a P record, results before the
        first P record, or a FIC OBX naming something that cannot be a file.
    """
    charset = file_charset(data, default_charset)
    parsed = _parse(data, charset, escape_style)
    text = data.decode("utf-8-sig" if charset == "utf-8" else charset)
    lines = _TERMINATORS.split(text)
    records = parsed.records
    p_records = [r for r in records if r.type == "P"]
    first_p = p_records[0].line if p_records else None
    stray = next(
        (r for r in records if r.type in ("OBR", "OBX") and (first_p is None or r.line < first_p)),
        None,
    )
    if stray is not None:
        raise HprimFileError(
            "no_patient",
            f"line {stray.line}: {stray.type} record before any P record: the results of an "
            "HPRIM file follow the P record of their patient",
        )
    if first_p is None:
        raise HprimFileError("no_patient", "the HPRIM file has no P record (patient)")
    last_p = p_records[-1].line
    trailer = next((r.line for r in records if r.type == "L" and r.line > last_p), None)
    end = trailer if trailer is not None else len(lines) + 1
    header = _kept(lines[records[0].line - 1 : first_p - 1])
    tail = _kept(lines[trailer - 1 :]) if trailer is not None else []
    sender = parsed.header.sender_id
    kind = parsed.header.message_type.strip().upper()
    message_type = f"{HPRIM_MESSAGE_TYPE}^{kind}" if kind else HPRIM_MESSAGE_TYPE
    messages = []
    bounds = [r.line for r in p_records] + [end]
    for rank, (patient, (start, stop)) in enumerate(
        zip(parsed.patients, pairwise(bounds), strict=True), start=1
    ):
        block = _kept(lines[start - 1 : stop - 1])
        files = _companions(patient, companion, start)
        digest = hashlib.sha256("\n".join(block).encode("utf-8"))
        for name, payload in files:
            digest.update(b"\x00" + name.encode("utf-8") + b"\x00" + payload)
        messages.append(
            HprimInboundMessage(
                text="\r".join([*header, *block, *tail]) + "\r",
                channel=channel,
                sending_application=sender,
                sending_facility=sender,
                control_id=digest.hexdigest(),
                message_type=message_type,
                charset=charset,
                escape_style=escape_style,
                ipp_system=ipp_system,
                companions=files,
                source=f"patient {rank} (P-3 {patient.patient_id!r}, line {start})",
            )
        )
    return tuple(messages)


def _parse(data: bytes, charset: str, escape_style: EscapeStyle) -> HprimMessage:
    try:
        codecs.lookup(charset)
        return parse_hprim(data, encoding=charset, escape_style=escape_style)
    except LookupError:
        raise HprimFileError("bad_charset", f"unknown character set {charset!r}") from None
    except HprimParseError as exc:
        code = "bad_charset" if "is not valid" in str(exc) else "bad_hprim"
        raise HprimFileError(code, f"not a readable HPRIM file: {exc}") from None


def _kept(lines: list[str]) -> list[str]:
    """Physical lines worth carrying: blank ones are skipped by every reader."""
    return [line for line in lines if line.strip()]


def _companions(
    patient: HprimPatient, read: Callable[[str], bytes], line: int
) -> tuple[tuple[str, bytes], ...]:
    files: list[tuple[str, bytes]] = []
    for request in patient.requests:
        for file in request.files:
            if any(name == file.name for name, _ in files):
                continue
            if companion_file_name(file.name) is None:
                raise HprimFileError(
                    "bad_companion",
                    f"patient at line {line}: the FIC OBX names {file.name!r}, which cannot be "
                    "a file beside the HPRIM file",
                )
            files.append((file.name, read(file.name)))
    return tuple(files)


# --------------------------------------------------------------------------- the hook


@hookimpl
def medcourier_interpret_message(message: InboundMessage) -> Interpretation | None:
    """An HPRIM ORU (one patient) -> the patient, and one document per text or companion file."""
    if not message.message_type.upper().startswith(HPRIM_MESSAGE_TYPE):
        return None
    return _documents(message)


def _documents(message: InboundMessage) -> MessageDocuments:
    extra = message if isinstance(message, HprimInboundMessage) else HprimInboundMessage("", "")
    try:
        data = message.text.encode(extra.charset)
    except (LookupError, UnicodeEncodeError) as exc:
        raise InboundError(f"the HPRIM text cannot be read as {extra.charset}: {exc}") from None
    try:
        parsed = parse_hprim(data, encoding=extra.charset, escape_style=extra.escape_style)
    except HprimParseError as exc:
        raise InboundError(f"not a readable HPRIM file: {exc}", "H^1") from None
    kind = parsed.header.message_type.strip().upper()
    if kind not in ("", "ORU"):
        raise InboundRejected(
            f"HPRIM {kind} files are not read: only ORU files (results, reports) carry documents",
            "H^1^7",
        )
    if not parsed.patients:
        raise InboundError("the HPRIM message has no P record (patient)", "P^1")
    if len(parsed.patients) > 1:
        raise InboundError(
            f"an HPRIM message with {len(parsed.patients)} patients: send one patient per "
            "message (drop folders split files by patient)",
            "P^2",
        )
    patient = parsed.patients[0]
    sender = parsed.header.sender_id
    organization = organization_of(sender)
    resource = _patient(patient, sender, extra.ipp_system)
    if organization:
        resource["managingOrganization"] = {"reference": organization}
    companions = dict(extra.companions)
    authors = _authors(parsed, patient)
    documents: list[InboundDocument] = []
    for request, author in zip(patient.requests, authors, strict=True):
        documents += _request_documents(request, author, message, extra.charset, companions)
    if not documents:
        raise InboundError(
            "no document for this patient: no TX text and no FIC file among its results "
            "(numeric results are not routed)",
            f"P^{patient.sequence or 1}",
        )
    return MessageDocuments(
        patient=resource,
        documents=tuple(documents),
        organization=organization,
        event=message.message_type,
    )


def _patient(p: HprimPatient, sender: str, ipp_system: str | None) -> dict[str, Any]:
    """The P record -> FHIR Patient without id (the directory finds or creates it by the IPP).

    P-3 is the IPP as the sender knows it. Its authority is the sender (H-5), written
    ``urn:medcourier:authority:<H-5 id>`` exactly as the HL7 reader writes a facility
    (MSH-4) without assigning authority, so that a patient fed by ADT from ``X`` and one named
    in an HPRIM file from ``X`` are the same; ``ipp_system`` (an option) overrides it when the
    IPP belongs to someone else (a lab sending back the hospital's IPP).
    """
    where = f"P^{p.sequence or 1}"
    if not p.patient_id.strip():
        raise InboundError("P-3 (patient id, the IPP) is empty", f"{where}^3")
    if ipp_system is None and not sender:
        raise InboundError(
            "H-5 (sender) is empty, so the authority of the IPP (P-3) is unknown: set the "
            "channel's hprim_ipp_system",
            "H^1^5",
        )
    identifier: dict[str, Any] = {
        "system": ipp_system or AUTHORITY_URN + quote(sender, safe="-._~!$'()*+,;=:@"),
        "value": p.patient_id.strip(),
        "type": {"coding": [{"system": V2_0203, "code": "PI"}]},
    }
    if sender:
        identifier["assigner"] = {"display": sender}
    resource: dict[str, Any] = {"resourceType": "Patient", "identifier": [identifier]}
    names = _names(p)
    if names:
        resource["name"] = names
    birth = _birth_date(p.birth_date, f"{where}^8")
    if birth:
        resource["birthDate"] = birth
    gender = _GENDER.get(p.sex.strip().upper())
    if gender:
        resource["gender"] = gender
    address = _address(p.address)
    if address:
        resource["address"] = [address]
    phones = [phone.strip() for phone in p.phones if phone.strip()]
    if phones:
        resource["telecom"] = [{"system": "phone", "value": phone} for phone in phones]
    return resource


def _names(p: HprimPatient) -> list[dict[str, Any]]:
    """P-6 ``family~given~further given`` is the name in use, P-7 the birth name (the writer's
    reading: FR Core ``usual`` and ``official``). Further given names are words, and a leading
    repeat of the first given name is not added twice (as the HL7 reader does with XPN-3)."""
    family = p.family.strip()
    first = p.given.strip()
    further = p.further_given.split()
    if first and further[: len(first.split())] == first.split():
        further = further[len(first.split()) :]
    given = ([first] if first else []) + further
    birth_name = p.birth_name.strip()
    used: dict[str, Any] = {}
    if family:
        used["family"] = family
    if given:
        used["given"] = given
    if birth_name and birth_name != family:
        official: dict[str, Any] = {"use": "official", "family": birth_name}
        if given:
            official["given"] = given
        return [{"use": "usual", **used}, official] if used else [official]
    return [used] if used else []


def _birth_date(value: str, where: str) -> str | None:
    """P-8 at its own precision (YYYY, YYYYMM, YYYYMMDD; a time after it is dropped)."""
    value = value.strip()
    if not value:
        return None
    match = _HPRIM_DATE.fullmatch(value)
    problem = f"P-8 (birth date) {value!r} is not a date (YYYYMMDD)"
    if not match:
        raise InboundError(problem, where)
    year, month, day = match.groups()
    try:
        date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        raise InboundError(problem, where) from None
    return "-".join(part for part in (year, month, day) if part)


def _address(parts: list[str]) -> dict[str, Any]:
    """P-11 ``street~other~city~state~postal code~country``."""
    padded = [part.strip() for part in parts] + [""] * (6 - len(parts))
    address: dict[str, Any] = {}
    lines = [line for line in padded[:2] if line]
    if lines:
        address["line"] = lines
    for value, key in zip(padded[2:6], ("city", "state", "postalCode", "country"), strict=True):
        if value:
            address[key] = value
    return address


def _authors(parsed: HprimMessage, patient: HprimPatient) -> list[str | None]:
    """The RPPS in OBR-33 (principal interpreter, where the writer puts the author) of each of
    the patient's requests; the reader's model does not keep OBR-33, so it comes from the raw
    OBR records of the patient (the one P record: the message holds one patient)."""
    obr = [r for r in parsed.records if r.type == "OBR"]
    found = [_rpps(record, parsed) for record in obr]
    # An OBX before any OBR gets a request without OBR record: it comes first.
    missing = max(0, len(patient.requests) - len(found))
    return [None] * missing + found[: len(patient.requests) - missing]


def _rpps(record: HprimRecord, parsed: HprimMessage) -> str | None:
    raw = record.fields[32] if len(record.fields) > 32 else ""
    value = raw.split(parsed.delimiters.repetition)[0].split(parsed.delimiters.component)[0]
    return value if _RPPS.fullmatch(value) else None


def _request_documents(
    request: HprimRequest,
    author: str | None,
    message: InboundMessage,
    charset: str,
    companions: dict[str, bytes],
) -> list[InboundDocument]:
    """The request's text (its TX results and their C records), then each companion file."""
    documents: list[InboundDocument] = []
    text = request.text
    if text is not None:
        tx = next(r for r in request.results if r.value_type == "TX")
        if not text.strip():
            raise InboundError(
                "the text of this request is empty (TX results without text)",
                f"OBX^{tx.sequence or 1}^6",
            )
        # A text file ends with a line break; the writer's splitlines() drops the last one, so
        # adding it back makes a newline-terminated document come back byte for byte.
        documents.append(_document(request, tx, author, message, text + "\n", "application/txt"))
    for result in request.results:
        file = result.file
        if file is None:
            continue
        where = f"OBX^{result.sequence or 1}^6"
        payload = companions.get(file.name)
        if payload is None:
            raise InboundError(
                f"the file {file.name!r} named by this FIC OBX did not come with the message",
                where,
            )
        if not payload:
            raise InboundError(f"the file {file.name!r} is empty", where)
        extension = PurePosixPath(file.name.replace("\\", "/")).suffix[1:]
        content_type = _companion_type(file.type.strip().upper(), extension.upper(), payload)
        if content_type not in CONTENT_TYPES:
            declared = file.type or extension or "unknown"
            raise InboundError(
                f"the file {file.name!r} is of type {declared}, which is not accepted "
                f"(accepted: {', '.join(sorted(set(_FIC_CONTENT_TYPES) - {'JPEG'}))})",
                where,
            )
        if content_type == "application/txt":
            payload = _utf8(payload, charset)
        documents.append(_document(request, result, author, message, payload, content_type))
    return documents


def _companion_type(declared: str, extension: str, payload: bytes) -> str | None:
    """The OBX-6 type component decides when there is one (libHprim's ``AL213202.j1~TXT``:
    the extension says nothing); else the extension; else the bytes, but only for the formats
    with a signature (PDF, JPEG, PNG): any UTF-8 looks like text, an RTF or HTML file too."""
    if declared:
        return _FIC_CONTENT_TYPES.get(declared)
    if extension:
        return _FIC_CONTENT_TYPES.get(extension)
    found = sniff(payload)
    return found if found != "application/txt" else None


def _document(
    request: HprimRequest,
    result: HprimResult,
    author: str | None,
    message: InboundMessage,
    payload: str | bytes,
    content_type: str,
) -> InboundDocument:
    """Type: the LOINC of OBX-4, else of OBR-5, else the engine's default (HPRIM code tables are
    labelled ``L`` whatever they hold, so a code counts as LOINC only when it has the LOINC
    shape and check digit). Title: OBX-4's label, else OBR-5's."""
    document_type = _loinc(result.code) or _loinc(request.code) or DEFAULT_DOCUMENT_TYPE
    title = result.label.strip() or request.label.strip() or None
    return InboundDocument(
        channel=message.channel,
        payload=payload.encode("utf-8") if isinstance(payload, str) else payload,
        content_type=content_type,
        document_type=document_type,
        title=title,
        sender_identifier=author,
        sender_application=message.sending_application or None,
    )


def _loinc(code: str) -> str | None:
    """``code`` when it is a LOINC code: digits, dash, and the mod-10 check digit LOINC uses
    (Luhn: every second digit from the right doubled)."""
    code = code.strip()
    match = _LOINC.fullmatch(code)
    if not match:
        return None
    total = 0
    for index, digit in enumerate(reversed(match.group(1))):
        value = int(digit) * (2 if index % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return code if (10 - total % 10) % 10 == int(match.group(2)) else None


def _utf8(payload: bytes, charset: str) -> bytes:
    """A text companion as UTF-8, the engine's text encoding. French labs write them in the
    HPRIM file's character set (ISO-8859-1), so text that is not UTF-8 is read in that one."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return payload.decode(charset).encode("utf-8")
        except (LookupError, UnicodeDecodeError):
            return payload  # refused by the engine's content check, with its reason
    return payload
