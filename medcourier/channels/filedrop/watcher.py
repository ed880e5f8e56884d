"""A watched drop folder: take complete files, hand them to the engine, move them on.

The life of a file, and why each step is there:

1. **Complete.** A file is taken only once its writer is done with it: either its size and
   modification time have not changed for ``stable_for`` seconds, or (``ok_file``) a
   ``<name>.ok`` marker exists. Hidden files, ``*.ok``, ``*.json`` sidecars and ``*.tmp`` /
   ``*.part`` files are never taken on their own, so writers may use them as scratch names.
2. **Claim.** The file is renamed into a fresh unit directory ``<folder>/.work/<unit>/``, then
   its companions (``.json`` sidecar, ``.ok``) follow. A rename is atomic on one filesystem: the
   file is either still in the drop folder or in ``.work``, never half here, half there. Units,
   not a flat ``.work``, so that a second file with the same name never overwrites the first
   while it waits for a retry.
3. **Submit.** The content goes to the :class:`~medcourier.engine.inbound.InboundSink`. Every
   submission can be deduplicated by the engine (MSH-10 and the sender for HL7 v2, the
   ``idempotency_key`` extra for documents), so submitting a unit again after a crash is
   harmless: at start-up, and on every pass, whatever is in ``.work`` is processed first.
4. **Decide.** Once the sink has answered for everything in the file, the decision (processed or
   error, the final name, the reason) is written durably into the unit as ``.outcome.json``.
   From then on the unit is only ever moved, never submitted again.
5. **Move.** The files are renamed into ``processed/`` or ``error/`` (never overwriting: a
   timestamp goes into the name on a collision), with ``<name>.error.txt`` next to a file in
   error. Directories are fsynced after each rename, so a power loss cannot bring a file back
   to where it was taken from.

If the sink *raises* (the engine is down), the unit stays in ``.work`` and the pass stops, so
files keep their order; the next pass comes after an exponential backoff.

HPRIM Santé files (``format: hprim``, or ``.hpr`` names in ``auto``) may name companion files
(FIC OBX, e.g. the PDF of a report) delivered beside them. Those are part of the file, so:

* an HPRIM file is taken once it and every file it names are complete (or, as a document waits
  for its sidecar, after ``sidecar_timeout``: it then goes to error/ saying which is missing);
  a file an HPRIM file names is never taken on its own;
* the companions are claimed into the HPRIM file's unit, so they go to processed/ or error/ with
  it; a ``.claim.json`` in the unit names the main file and its companions, so that a claim cut
  short by a crash is finished, and the main file is known among several;
* the file goes to the engine through ``sink.hl7_message``, one
  :class:`~medcourier.transforms.hprim.interpret.HprimInboundMessage` per patient carrying its
  companions' bytes (why: that module's docstring), and is accepted when every patient is;
* in ``format: hprim`` a file that is not HPRIM (no H line at its start) and that no HPRIM file
  names within ``sidecar_timeout`` goes to error/: it is a companion whose HPRIM file never came.

The folder is polled rather than watched with inotify: inotify is Linux-only and sees nothing of
what another machine writes to an NFS or SMB share, which is exactly how hospital systems drop
their files. Listing a folder every second costs nothing next to that. The blocking filesystem
work runs in :func:`asyncio.to_thread`, so a slow share never stalls the event loop.

Logs carry the channel name, the unit id, content digests, counts and reason codes, never file
names: hospital file names often contain a patient's name. The full reason, with the name, goes
only into the ``.error.txt``, whose header repeats the unit id to match the logs.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from medcourier.engine.errors import ConfigError, MedcourierError
from medcourier.engine.inbound import (
    InboundDocument,
    InboundMessage,
    InboundResult,
    InboundSink,
    PatientIdentifier,
    SinkUnavailable,
    Verdict,
)
from medcourier.transforms.hprim.interpret import (
    HPRIM_CHARSET,
    HprimFileError,
    HprimInboundMessage,
    companion_file_name,
    companion_names,
    looks_like_hprim,
    read_hprim_file,
)
from medcourier.transforms.hprim.reader import EscapeStyle

if sys.platform != "win32":
    import fcntl

MIB = 1024 * 1024
WORK_DIR = ".work"
"""Claimed files wait here (one sub-directory per file) until the engine has answered."""
OUTCOME_FILE = ".outcome.json"
"""Written into a unit once decided: the unit is then only moved, never submitted again."""
CLAIM_FILE = ".claim.json"
"""Written into a unit before an HPRIM file's companions are claimed: the main file's name and
the companions to take, so that a claim cut short by a crash is finished."""
HL7_CHARSET = "utf-8"
"""Character set of HL7 messages without MSH-18 unless ``default_charset`` says otherwise."""
HPRIM_SNIFF_BYTES = 4096
"""How much of a file is read to tell an HPRIM file from a companion (``format: hprim``)."""
LOCK_FILE = ".lock"
MAX_BACKOFF = 60.0
"""Longest wait between two passes while the sink keeps failing."""
STOP_GRACE = 10.0
"""How long ``stop()`` lets the file in hand finish before cancelling (it is then redone)."""
MAX_SIDECAR_BYTES = MIB

_IGNORED_SUFFIXES = (".ok", ".json", ".tmp", ".part")
_COMPANION_SUFFIXES = (".json", ".ok")
_DEST_SUFFIXES = ("", ".json", ".ok", ".error.txt")

CONTENT_TYPES = {
    ".pdf": "application/pdf",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".txt": "application/txt",
}
"""Content type of a document by extension, when its sidecar does not give one."""

HL7_CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",  # not in HL7 table 0211, but what many senders write
}
"""MSH-18 values (HL7 table 0211) to Python codecs; only ASCII-compatible sets make sense in a
file whose MSH segment must be readable before its character set is known."""


# --------------------------------------------------------------------------- options


# File names the ``auto`` format reads as HL7 v2 or HPRIM (the rest: documents with a sidecar).
_HL7_SUFFIXES = (".hl7", ".hl7v2", ".er7", ".msg")
_HPRIM_SUFFIXES = (".hpr",)

Format = Literal["hl7v2", "document", "hprim"]


class FileDropOptions(BaseModel):
    """Options of one ``filedrop`` inbound channel (the ``inbound[]`` entry in the YAML)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    channel: Literal["filedrop"] = "filedrop"
    path: Path
    """The drop folder (created if missing); ``.work/`` inside it holds claimed files."""
    pattern: str = "*"
    """Glob on file names. Hidden, ``*.ok``, ``*.json``, ``*.tmp`` and ``*.part`` never match."""
    format: Literal["hl7v2", "document", "hprim", "auto"] = "auto"
    """``hl7v2``: one or more messages per file; ``document``: a file plus ``<name>.json``;
    ``hprim``: HPRIM Santé files and the companion files they name; ``auto``: HL7 v2 for names
    ending in .hl7, .hl7v2, .er7 or .msg, HPRIM for .hpr, a document otherwise (one inbox for
    all, as hospitals often have)."""
    poll_interval: float = Field(1.0, gt=0)
    """Seconds between two looks at the folder (doubled on each sink failure, up to 60)."""
    stable_for: float = Field(2.0, ge=0)
    """A file is complete when its size and mtime have not changed for this long."""
    ok_file: bool = False
    """Instead: a file is complete when ``<name>.ok`` exists (then ``stable_for`` is unused)."""
    processed_dir: Path | None = None
    """Where accepted files go; default ``<path>/processed``. Same filesystem as ``path``."""
    error_dir: Path | None = None
    """Where refused files go, with ``<name>.error.txt``; default ``<path>/error``."""
    max_file_bytes: int = Field(64 * MIB, gt=0)
    """Larger files go to error/ unread."""
    default_charset: str | None = None
    """Character set of HL7 messages whose MSH-18 is empty (default utf-8), and of HPRIM files
    (default iso-8859-1, the recommendation's; a file starting with a UTF-8 byte order mark is
    read as UTF-8, the only declaration an HPRIM file can carry)."""
    sidecar_timeout: float = Field(60.0, gt=0)
    """Seconds a complete document waits for its JSON sidecar, or an HPRIM file for the files
    it names, before going to error/."""
    hprim_escape_style: EscapeStyle = "sequences"
    """How HPRIM senders escape delimiters: ``sequences`` (``\\F\\``..., Mediboard),
    ``prefix`` (escape + character, libHprim), ``replace`` (not at all); docs/hprim.md."""
    hprim_ipp_system: str | None = Field(None, min_length=1)
    """System of the IPP of HPRIM files (P-3); default ``urn:medcourier:authority:<H-5 sender
    id>``, what the HL7 reader gives an IPP from that sending facility."""

    @field_validator("pattern")
    @classmethod
    def _name_pattern(cls, value: str) -> str:
        if not value or "/" in value or os.sep in value:
            raise ValueError("pattern is a glob on file names: not empty, no path separator")
        return value

    @field_validator("default_charset")
    @classmethod
    def _known_charset(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown character set {value!r}") from None
        return value

    @model_validator(mode="after")
    def _distinct_folders(self) -> FileDropOptions:
        folder = _absolute(self.path)
        processed, error = _absolute(self.processed_path), _absolute(self.error_path)
        if folder in (processed, error):
            raise ValueError("processed_dir and error_dir must differ from path")
        if processed == error:
            raise ValueError("processed_dir and error_dir must differ")
        return self

    @property
    def processed_path(self) -> Path:
        return self.processed_dir or self.path / "processed"

    @property
    def error_path(self) -> Path:
        return self.error_dir or self.path / "error"


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


@dataclass
class FileDropCounters:
    """What a watcher did since it was created, for metrics and tests."""

    scans: int = 0
    files_claimed: int = 0
    files_processed: int = 0
    files_error: int = 0
    messages_accepted: int = 0
    messages_refused: int = 0
    documents_accepted: int = 0
    documents_refused: int = 0
    sink_failures: int = 0


class FolderBusyError(MedcourierError):
    """Another watcher already holds the drop folder: two would share (and redo) its ``.work``."""


class _ContentError(Exception):
    """The file cannot be submitted as it is: ``code`` goes to the logs, ``text`` to .error.txt."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _SinkUnavailable(Exception):
    """The sink raised: the unit stays in ``.work`` and the pass stops."""


# --------------------------------------------------------------------------- HL7 v2 files

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BATCH_SEGMENTS = (b"FHS", b"BHS", b"BTS", b"FTS")
_UTF8_BOM = b"\xef\xbb\xbf"

Line = tuple[int, bytes]
"""A line of a file: its 1-based number (for error reports) and its bytes."""


def split_hl7_file(data: bytes) -> list[list[Line]]:
    """Group a file's lines into messages: a message starts at each line beginning with ``MSH``.

    Files end their segments with CR, LF or CRLF depending on who wrote them, so all three are
    line breaks. Batch wrappers (FHS/BHS/BTS/FTS) and blank lines carry nothing to submit.
    Anything else before the first MSH is refused rather than dropped: it may be the tail of a
    message that lost its header.
    """
    lines = [
        (number, line)
        for number, line in enumerate(_LINE_BREAK.split(data.removeprefix(_UTF8_BOM)), start=1)
        if line.strip() and not line.startswith(_BATCH_SEGMENTS)
    ]
    if not any(line.startswith(b"MSH") for _, line in lines):
        raise _ContentError("no_message", "no HL7 message found (no line starts with MSH)")
    messages: list[list[Line]] = []
    for number, line in lines:
        if line.startswith(b"MSH"):
            messages.append([])
        elif not messages:
            raise _ContentError("bad_hl7", f"line {number}: data before the first MSH segment")
        messages[-1].append((number, line))
    return messages


def decode_hl7_message(
    lines: list[Line], index: int, channel: str, default_charset: str
) -> InboundMessage:
    """Decode one message with its own MSH-18 and build what the sink receives.

    Each message is decoded on its own because a file may gather messages from senders with
    different character sets; the MSH line is ASCII up to MSH-18, so it can be read as bytes.
    """
    label = f"message {index} (line {lines[0][0]})"
    charset = _message_charset(lines[0][1], default_charset, label)
    raw = b"\r".join(line for _, line in lines)
    try:
        text = raw.decode(charset)
    except UnicodeDecodeError as exc:
        where = lines[raw.count(b"\r", 0, exc.start)][0]
        raise _ContentError(
            "bad_charset", f"{label}: line {where} is not valid {charset}: {exc.reason}"
        ) from None
    return _message_from_text(text + "\r", channel, label)


def _message_charset(msh: bytes, default_charset: str, label: str) -> str:
    declared = _msh18(msh)
    if not declared:
        return default_charset
    charset = HL7_CHARSETS.get(declared.upper())
    if charset is None:
        raise _ContentError("bad_charset", f"{label}: unknown MSH-18 character set {declared!r}")
    return charset


def _msh18(msh: bytes) -> str:
    """MSH-18 read from the raw MSH line (its first repetition: the message's default set)."""
    separator = msh[3:4]
    if not separator or separator.isalnum() or separator.isspace():
        return ""
    fields = msh.split(separator)
    if len(fields) < 18:
        return ""
    repetition = fields[1][1:2] or b"~"
    return fields[17].split(repetition, 1)[0].decode("ascii", "replace").strip()


def _message_from_text(text: str, channel: str, label: str) -> InboundMessage:
    header = text.split("\r", 1)[0]
    if len(header) < 8 or header[3].isalnum() or header[3].isspace():
        raise _ContentError("bad_hl7", f"{label}: invalid MSH segment")
    fields = header.split(header[3])

    def msh(number: int) -> str:
        return fields[number - 1] if number - 1 < len(fields) else ""

    control_id = msh(10).strip()
    if not control_id:
        raise _ContentError(
            "bad_hl7",
            f"{label}: MSH-10 (message control id) is empty; the engine needs it to recognise "
            "the message if the file is processed again",
        )
    component = (msh(2) or "^")[0]
    message_type = "^".join(part for part in msh(9).split(component)[:2] if part)
    return InboundMessage(
        text=text,
        channel=channel,
        sending_application=msh(3),
        sending_facility=msh(4),
        control_id=control_id,
        message_type=message_type,
    )


# --------------------------------------------------------------------------- documents


class SidecarIdentifier(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    system: str = Field(min_length=1)
    value: str = Field(min_length=1)


class DocumentSidecar(BaseModel):
    """The ``<name>.json`` that says whose a dropped document is and what it is."""

    model_config = ConfigDict(extra="forbid", strict=True)

    patient: str | None = Field(None, pattern=r"^Patient/[A-Za-z0-9\-.]{1,64}$")
    patient_identifiers: list[SidecarIdentifier] = Field(default_factory=list)
    encounter: str | None = Field(None, pattern=r"^Encounter/[A-Za-z0-9\-.]{1,64}$")
    visit_number: str | None = Field(None, min_length=1)
    type: str = Field("11488-4", pattern=r"^\d{1,7}-\d$")
    title: str | None = None
    sender: str | None = Field(None, min_length=1)
    sender_application: str | None = Field(None, min_length=1)
    content_type: str | None = Field(None, pattern=r"^[^/\s]+/[^/]+$")


def parse_sidecar(data: bytes) -> DocumentSidecar:
    """Read a sidecar; every problem becomes a reason an operator can act on."""
    if len(data) > MAX_SIDECAR_BYTES:
        raise _ContentError("bad_sidecar", f"the JSON sidecar is larger than {MAX_SIDECAR_BYTES}")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise _ContentError("bad_sidecar", f"the JSON sidecar is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _ContentError("bad_sidecar", "the JSON sidecar must be an object")
    unknown = sorted(set(raw) - set(DocumentSidecar.model_fields))
    if unknown:
        allowed = ", ".join(DocumentSidecar.model_fields)
        raise _ContentError(
            "bad_sidecar",
            f"unknown keys in the JSON sidecar: {', '.join(unknown)} (allowed: {allowed})",
        )
    try:
        sidecar = DocumentSidecar.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise _ContentError("bad_sidecar", f"the JSON sidecar is invalid: {problems}") from None
    if sidecar.patient is None and not sidecar.patient_identifiers:
        raise _ContentError(
            "bad_sidecar",
            "the JSON sidecar names no patient: give 'patient' (\"Patient/<id>\") "
            'or \'patient_identifiers\' ([{"system": ..., "value": ...}])',
        )
    return sidecar


def _describe(error: ErrorDetails) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "sidecar"
    if error["type"] == "extra_forbidden":
        return f"unknown key {where}"
    return f"{where}: {error['msg']}"


def build_document(
    name: str, payload: bytes, sidecar: DocumentSidecar, channel: str
) -> InboundDocument:
    """The InboundDocument for a file and its sidecar.

    ``extra["idempotency_key"]`` is the file name and the SHA-256 of its content: the same
    file processed again after a crash carries the same key, and the engine keeps one copy.
    """
    content_type = sidecar.content_type or CONTENT_TYPES.get(Path(name).suffix.lower())
    if content_type is None:
        known = ", ".join(CONTENT_TYPES)
        raise _ContentError(
            "unknown_content_type",
            f"no content type for this extension (known: {known}): set content_type "
            "in the JSON sidecar",
        )
    digest = hashlib.sha256(payload).hexdigest()
    return InboundDocument(
        channel=channel,
        payload=payload,
        content_type=content_type,
        patient_reference=sidecar.patient,
        patient_identifiers=tuple(
            PatientIdentifier(system=i.system, value=i.value) for i in sidecar.patient_identifiers
        ),
        encounter_reference=sidecar.encounter,
        visit_number=sidecar.visit_number,
        document_type=sidecar.type,
        title=sidecar.title,
        sender_identifier=sidecar.sender,
        sender_application=sidecar.sender_application,
        extra={"idempotency_key": f"{name}:{digest}"},
    )


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class _Hl7Plan:
    messages: tuple[InboundMessage, ...]
    digest: str


@dataclass(frozen=True)
class _DocumentPlan:
    document: InboundDocument
    digest: str


@dataclass(frozen=True)
class _HprimPlan:
    """An HPRIM file: one message per patient, each carrying its companion files."""

    messages: tuple[HprimInboundMessage, ...]
    digest: str


_Plan = _Hl7Plan | _DocumentPlan | _HprimPlan


@dataclass(frozen=True)
class _Outcome:
    """What became of a file: accepted in full, or why not (``code`` for logs, ``text`` for
    the operator)."""

    accepted: bool
    code: str
    text: str = ""
    items: int = 0
    digest: str = ""


@dataclass(frozen=True)
class _Decision:
    """The durable record of an outcome (``.outcome.json``): enough to finish the move."""

    accepted: bool
    main: str
    base: str
    code: str
    text: str
    at: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> _Decision:
        raw = json.loads(data)
        return cls(
            accepted=bool(raw["accepted"]),
            main=str(raw["main"]),
            base=str(raw["base"]),
            code=str(raw["code"]),
            text=str(raw["text"]),
            at=str(raw["at"]),
        )


def hl7_outcome(messages: Iterable[InboundMessage], results: Iterable[InboundResult]) -> _Outcome:
    """Accepted when every message was; else the refused ones with the sink's reasons, and which
    were accepted (they stay accepted: the operator must not send them again)."""
    labels = [
        f"message {i} (MSH-10 {m.control_id!r}, {m.message_type or '?'})"
        for i, m in enumerate(messages, 1)
    ]
    return _parts_outcome("message", labels, list(results))


def hprim_outcome(
    messages: Iterable[HprimInboundMessage], results: Iterable[InboundResult]
) -> _Outcome:
    """As :func:`hl7_outcome`, patient by patient (an HPRIM file is split by patient)."""
    labels = [m.source or f"patient {i}" for i, m in enumerate(messages, 1)]
    return _parts_outcome("patient", labels, list(results))


def _parts_outcome(noun: str, labels: list[str], results: list[InboundResult]) -> _Outcome:
    pairs = list(zip(labels, results, strict=True))
    accepted = [i for i, (_, r) in enumerate(pairs, 1) if r.verdict is Verdict.ACCEPT]
    if len(accepted) == len(pairs):
        return _Outcome(True, "accepted", items=len(pairs))
    lines = [f"{len(pairs) - len(accepted)} of {len(pairs)} {noun}(s) refused by the engine:"]
    lines += [_refusal_line(label, r) for label, r in pairs if r.verdict is not Verdict.ACCEPT]
    if accepted:
        numbers = ", ".join(str(i) for i in accepted)
        lines.append(f"accepted and kept, do not send them again: {noun}(s) {numbers}")
    else:
        lines.append(f"no {noun} of this file was accepted")
    code = "partially_refused" if accepted else "refused"
    return _Outcome(False, code, "\n".join(lines), items=len(pairs))


def document_outcome(result: InboundResult) -> _Outcome:
    if result.verdict is Verdict.ACCEPT:
        return _Outcome(True, "accepted", items=1)
    return _Outcome(False, "refused", _refusal_line("the document", result), items=1)


def _refusal_line(label: str, result: InboundResult) -> str:
    line = f"- {label}: {result.verdict.value}: {result.text or 'no reason given'}"
    return f"{line} [at {result.error_location}]" if result.error_location else line


# --------------------------------------------------------------------------- filesystem


def fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable.

    A rename is atomic but lives in the directory's metadata: until the directory is flushed, a
    power loss can undo it, and a file already submitted would reappear in the drop folder.
    Windows cannot open a directory; NTFS journals renames itself.
    """
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a few network filesystems do not support it on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file, fsynced, renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def free_name(directory: Path, name: str, suffixes: Iterable[str], now: datetime) -> str:
    """``name`` if neither it nor its companions (``name + suffix``) exist in ``directory``;
    else the name with a UTC timestamp before its extension (``lab.20250102T101112123456Z.hl7``),
    then a counter. A file already there is never overwritten."""
    wanted = tuple(suffixes)
    extension = Path(name).suffix
    stem = name[: len(name) - len(extension)]
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    candidates = [name, f"{stem}.{stamp}{extension}"]
    candidates += (f"{stem}.{stamp}-{n}{extension}" for n in range(1, 10_000))
    for candidate in candidates:
        if not any(os.path.lexists(directory / f"{candidate}{s}") for s in wanted):
            return candidate
    raise FileExistsError(f"no free name in {directory}")


def _is_companion(name: str) -> bool:
    return name.lower().endswith(_COMPANION_SUFFIXES)


def _visible_files(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(
            e.name
            for e in entries
            if not e.name.startswith(".") and e.is_file(follow_symlinks=False)
        )


class _FolderLock:
    """An exclusive advisory lock on a drop folder, so that two watchers (two engine instances
    on one share) never process each other's ``.work``. ``flock`` works over NFS on Linux."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if sys.platform == "win32" or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FolderBusyError(f"another watcher holds {self.path.parent.parent}") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- the watcher


class FileDropWatcher:
    """Polls one drop folder and hands its complete files to ``sink`` (see the module doc).

    ``start()`` runs passes in the background until ``stop()``; ``scan_once()`` runs one pass
    and is what tests and tools call. Only one watcher may run on a folder (``start()`` locks
    it); ``scan_once()`` alone does not lock.
    """

    def __init__(self, options: FileDropOptions, sink: InboundSink, name: str) -> None:
        self.options = options
        self.sink = sink
        self.name = name
        self.counters = FileDropCounters()
        self.folder = options.path
        self.work_dir = options.path / WORK_DIR
        self.processed_dir = options.processed_path
        self.error_dir = options.error_path
        self._log = structlog.get_logger("medcourier.filedrop", channel=name)
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> size, mtime, since
        self._sidecar_wait: dict[str, float] = {}  # complete document -> since
        self._hprim_scan: dict[str, _HprimScan] = {}  # what a look into a file found
        self._hprim_claims: dict[str, tuple[str, ...]] = {}  # HPRIM file -> companions to take
        self._pass_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = _FolderLock(self.work_dir / LOCK_FILE)
        self._prepared = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the folders, lock the drop folder and start polling; the first pass processes
        what a previous run left in ``.work`` before taking new files."""
        if self._task is not None:
            return
        await asyncio.to_thread(self._prepare_folders)
        await asyncio.to_thread(self._lock.acquire)
        pending = await asyncio.to_thread(self._count_pending)
        self._stopping.clear()
        self._log.info("filedrop.started", format=self.options.format, pending=pending)
        self._task = asyncio.create_task(self._run(), name=f"filedrop:{self.name}")

    async def stop(self) -> None:
        """Stop after the file in hand (cancelled after ``STOP_GRACE``: it is redone next
        start, which the engine's deduplication makes harmless)."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), STOP_GRACE)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._lock.release()
        self._log.info("filedrop.stopped", **asdict(self.counters))

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                complete = await self.scan_once()
            except Exception as exc:  # a broken share must not kill the channel: retry later
                self._log.error(
                    "filedrop.pass_failed",
                    error=type(exc).__name__,
                    errno=getattr(exc, "errno", None),
                    at=_raised_at(exc),
                )
                complete = False
            failures = 0 if complete else failures + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._delay(failures))

    def _delay(self, failures: int) -> float:
        interval = self.options.poll_interval
        if failures == 0:
            return interval
        return min(MAX_BACKOFF, interval * 2.0 ** min(failures, 16))

    # ------------------------------------------------------------------ one pass

    async def scan_once(self) -> bool:
        """One pass: finish or retry what is in ``.work``, then take every complete file.

        :return: False when the sink raised and the pass stopped early (the file stays in
            ``.work`` for the next pass), True otherwise.
        """
        async with self._pass_lock:
            self.counters.scans += 1
            await asyncio.to_thread(self._prepare_folders)
            try:
                for unit in await asyncio.to_thread(self._pending_units):
                    if self._stopping.is_set():
                        return True
                    await self._process_unit(unit)
                for name in await asyncio.to_thread(self._ready_names):
                    if self._stopping.is_set():
                        return True
                    claimed = await asyncio.to_thread(self._claim, name)
                    if claimed is not None:
                        await self._process_unit(claimed)
            except _SinkUnavailable:
                return False
            return True

    async def _process_unit(self, unit: Path) -> None:
        opened = await asyncio.to_thread(self._open_unit, unit)
        if opened is None:
            return
        main, plan = opened
        outcome = plan if isinstance(plan, _Outcome) else await self._submit(unit, plan)
        await asyncio.to_thread(self._conclude, unit, main, outcome)
        self._log.info(
            "filedrop.done",
            unit=unit.name,
            result="processed" if outcome.accepted else "error",
            code=outcome.code,
            items=outcome.items,
            sha256=outcome.digest[:16] or None,
        )

    async def _submit(self, unit: Path, plan: _Plan) -> _Outcome:
        try:
            if isinstance(plan, _Hl7Plan | _HprimPlan):
                return await self._submit_messages(plan)
            return await self._submit_document(plan)
        except SinkUnavailable as exc:
            self.counters.sink_failures += 1
            self._log.warning("filedrop.sink_unavailable", unit=unit.name, error=type(exc).__name__)
            raise _SinkUnavailable from exc
        except Exception as exc:
            # Not the engine being away: something in this file makes it fail. It goes to
            # error/ so that the files behind it are not held up.
            self._log.error("filedrop.sink_failed", unit=unit.name, error=type(exc).__name__)
            return _Outcome(
                False,
                "sink_error",
                f"the engine could not process this file ({type(exc).__name__}); see its log",
                0,
                plan.digest,
            )

    async def _submit_messages(self, plan: _Hl7Plan | _HprimPlan) -> _Outcome:
        results = [await self.sink.hl7_message(message) for message in plan.messages]
        accepted = sum(result.verdict is Verdict.ACCEPT for result in results)
        self.counters.messages_accepted += accepted
        self.counters.messages_refused += len(results) - accepted
        if isinstance(plan, _HprimPlan):
            outcome = hprim_outcome(plan.messages, results)
        else:
            outcome = hl7_outcome(plan.messages, results)
        return _Outcome(outcome.accepted, outcome.code, outcome.text, outcome.items, plan.digest)

    async def _submit_document(self, plan: _DocumentPlan) -> _Outcome:
        outcome = document_outcome(await self.sink.document(plan.document))
        if outcome.accepted:
            self.counters.documents_accepted += 1
        else:
            self.counters.documents_refused += 1
        return _Outcome(outcome.accepted, outcome.code, outcome.text, outcome.items, plan.digest)

    # ------------------------------------------------------------------ folders (threads)

    def _prepare_folders(self) -> None:
        """Create the folders and check that moves between them are renames, hence atomic."""
        if self._prepared:
            return
        for directory in (self.folder, self.work_dir, self.processed_dir, self.error_dir):
            directory.mkdir(parents=True, exist_ok=True)
        device = os.stat(self.folder).st_dev
        for directory in (self.processed_dir, self.error_dir):
            if os.stat(directory).st_dev != device:
                raise ConfigError(
                    [
                        f"{directory} is not on the filesystem of {self.folder}: files are moved "
                        "there by rename, which is atomic only within one filesystem"
                    ],
                    source=f"inbound {self.name}",
                )
        self._prepared = True

    def _count_pending(self) -> int:
        with os.scandir(self.work_dir) as entries:
            return sum(1 for e in entries if not e.name.startswith("."))

    def _pending_units(self) -> list[Path]:
        """The units in ``.work``, oldest claim first (their names start with the claim time)."""
        self._adopt_loose_files()
        with os.scandir(self.work_dir) as entries:
            units = [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]
        return sorted(units, key=lambda unit: unit.name)

    def _adopt_loose_files(self) -> None:
        """Wrap files lying directly in ``.work`` (put there by hand) into units of their own."""
        loose = _visible_files(self.work_dir)
        for name in sorted(loose, key=_is_companion):  # files first, companions follow them
            if not os.path.lexists(self.work_dir / name):
                continue
            unit = self._new_unit()
            os.rename(self.work_dir / name, unit / name)
            if not _is_companion(name):
                self._move_companions(self.work_dir, unit, name)
            fsync_dir(unit)
        if loose:
            fsync_dir(self.work_dir)

    def _new_unit(self) -> Path:
        unit = self.work_dir / f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        unit.mkdir()
        return unit

    def _ready_names(self) -> list[str]:
        """The files of the drop folder that are complete, oldest first (arrival order).

        A file that a complete HPRIM file names (FIC) is left out: it is taken with that file.
        """
        now = time.monotonic()
        files = self._drop_folder_files()
        tables: tuple[dict[str, Any], ...] = (
            self._seen,
            self._sidecar_wait,
            self._hprim_scan,
            self._hprim_claims,
        )
        for table in tables:
            for gone in [name for name in table if name not in files]:
                del table[gone]
        names = sorted(
            (name for name in files if self._is_candidate(name)),
            key=lambda name: (files[name][1], name),
        )
        if self.options.format in ("hprim", "auto"):
            # Time every file, candidate or not: one an HPRIM file names may be outside
            # ``pattern`` (``*.HPR``), and must not start its stability wait only once named.
            for name in files:
                if not name.startswith(".") and name not in self._seen:
                    self._is_complete(name, files, now)
        hprim = {
            name: self._hprim_companions(name, files, now)
            for name in names
            if self._is_hprim_main(name, files)
        }
        named = {
            found
            for main, wanted in hprim.items()
            for written in wanted or ()
            if (found := resolve_companion(written, files, main)) is not None
        }
        ready = []
        for name in names:
            if name in named:
                self._sidecar_wait.pop(name, None)  # neither a document nor an orphan: wait over
            elif name in hprim:
                if self._is_hprim_ready(name, hprim[name], files, now):
                    ready.append(name)
            elif self._is_ready(name, files, now):
                ready.append(name)
        return ready

    def _drop_folder_files(self) -> dict[str, tuple[int, int]]:
        files: dict[str, tuple[int, int]] = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        files[entry.name] = (stat.st_size, stat.st_mtime_ns)
                except FileNotFoundError:  # taken away while we looked
                    continue
        return files

    def _is_candidate(self, name: str) -> bool:
        return (
            not name.startswith(".")
            and not name.lower().endswith(_IGNORED_SUFFIXES)
            and fnmatch.fnmatch(name, self.options.pattern)
        )

    def _is_ready(self, name: str, files: dict[str, tuple[int, int]], now: float) -> bool:
        complete = self._is_complete(name, files, now)
        fmt = self._format_of(name)
        if fmt == "hl7v2":
            return complete
        if fmt == "hprim":
            # Not an HPRIM file, and no HPRIM file names it (yet): a companion whose HPRIM
            # file may still come (senders write companions first). Taken after the wait, to
            # go to error/.
            if not complete:
                return False
            since = self._sidecar_wait.setdefault(name, now)
            return now - since >= self.options.sidecar_timeout
        sidecar = f"{name}.json"
        if sidecar in files:
            self._sidecar_wait.pop(name, None)
            sidecar_complete = self._is_complete(sidecar, files, now, companion=True)
            return complete and sidecar_complete
        if not complete:
            return False
        since = self._sidecar_wait.setdefault(name, now)
        return now - since >= self.options.sidecar_timeout  # taken, to go to error/

    def _format_of(self, name: str) -> Format:
        if self.options.format != "auto":
            return self.options.format
        lowered = name.lower()
        if lowered.endswith(_HL7_SUFFIXES):
            return "hl7v2"
        if lowered.endswith(_HPRIM_SUFFIXES):
            return "hprim"
        return "document"

    @property
    def _hprim_charset(self) -> str:
        return self.options.default_charset or HPRIM_CHARSET

    def _hprim_scan_of(self, name: str, files: dict[str, tuple[int, int]]) -> _HprimScan:
        """What was found in a file, forgotten as soon as its size or mtime changes."""
        size, mtime = files[name]
        scan = self._hprim_scan.get(name)
        if scan is None or (scan.size, scan.mtime) != (size, mtime):
            scan = self._hprim_scan[name] = _HprimScan(size, mtime)
        return scan

    def _is_hprim_main(self, name: str, files: dict[str, tuple[int, int]]) -> bool:
        """An HPRIM file, as opposed to a companion: by its name (``.hpr``, and always in
        ``auto``), else, in ``format: hprim``, by its first line (``H|~^\\&|...``)."""
        if self._format_of(name) != "hprim":
            return False
        if self.options.format == "auto" or name.lower().endswith(_HPRIM_SUFFIXES):
            return True
        scan = self._hprim_scan_of(name, files)
        if scan.is_main is None:
            scan.is_main = looks_like_hprim(_peek(self.folder / name, HPRIM_SNIFF_BYTES))
        return scan.is_main

    def _hprim_companions(
        self, name: str, files: dict[str, tuple[int, int]], now: float
    ) -> tuple[str, ...] | None:
        """The files a complete HPRIM file names (as written); None while it is incomplete.

        A file that cannot be read names nothing: it is taken at once, and its reading fails
        again, with the reason, when it is processed.
        """
        if not self._is_complete(name, files, now):
            return None
        scan = self._hprim_scan_of(name, files)
        if scan.companions is None:
            scan.companions = ()
            with contextlib.suppress(OSError, HprimFileError):
                if scan.size <= self.options.max_file_bytes:
                    data = (self.folder / name).read_bytes()
                    escape = self.options.hprim_escape_style
                    scan.companions = tuple(companion_names(data, self._hprim_charset, escape))
        return scan.companions

    def _is_hprim_ready(
        self,
        name: str,
        companions: tuple[str, ...] | None,
        files: dict[str, tuple[int, int]],
        now: float,
    ) -> bool:
        """Complete, and so is every file it names; or the wait for them is over (the file then
        goes to error/ naming the missing ones). Notes the companions to claim with it."""
        if companions is None:
            return False
        found = {written: resolve_companion(written, files, name) for written in companions}
        complete = tuple(
            sorted(
                {
                    companion
                    for companion in found.values()
                    if companion is not None
                    and self._is_complete(companion, files, now, companion=True)
                }
            )
        )
        self._hprim_claims[name] = complete
        if all(found.values()) and len(complete) == len(set(found.values())):
            self._sidecar_wait.pop(name, None)
            return True
        since = self._sidecar_wait.setdefault(name, now)
        return now - since >= self.options.sidecar_timeout

    def _is_complete(
        self, name: str, files: dict[str, tuple[int, int]], now: float, companion: bool = False
    ) -> bool:
        """Complete: its ``.ok`` exists (a sidecar is written before it), or its size and mtime
        have not moved for ``stable_for`` seconds of our own clock (a share's clock may be
        off, so the file's mtime is compared only with itself)."""
        if self.options.ok_file:
            return companion or f"{name}.ok" in files
        size, mtime = files[name]
        seen = self._seen.get(name)
        if seen is None or (seen[0], seen[1]) != (size, mtime):
            seen = self._seen[name] = (size, mtime, now)
        return now - seen[2] >= self.options.stable_for

    def _claim(self, name: str) -> Path | None:
        """Take a file out of the drop folder by renaming it into a new unit.

        An HPRIM file's companions follow it; the claim record is written first, so that a
        crash at any point leaves either an empty unit (removed, the file taken again) or one
        that names its main file and the companions still to take.
        """
        unit = self._new_unit()
        companions = self._hprim_claims.pop(name, ())
        if companions:
            claim = {"main": name, "companions": list(companions)}
            write_durably(unit / CLAIM_FILE, json.dumps(claim).encode("utf-8"))
        try:
            os.rename(self.folder / name, unit / name)
        except OSError as exc:  # gone, or still held open by its writer on some shares
            with contextlib.suppress(FileNotFoundError):
                (unit / CLAIM_FILE).unlink()
            unit.rmdir()
            if not isinstance(exc, FileNotFoundError):
                self._log.warning("filedrop.claim_failed", errno=exc.errno)
            return None
        fsync_dir(self.work_dir)
        fsync_dir(unit)
        fsync_dir(self.folder)
        self._seen.pop(name, None)
        self._sidecar_wait.pop(name, None)
        self._move_companions(self.folder, unit, name)
        self._claim_hprim_companions(unit, companions)
        self.counters.files_claimed += 1
        self._log.info("filedrop.claimed", unit=unit.name, companions=len(companions) or None)
        return unit

    def _claim_hprim_companions(self, unit: Path, companions: Iterable[str]) -> None:
        """Rename the files an HPRIM file names into its unit (those still in the folder)."""
        moved = False
        for companion in companions:
            self._seen.pop(companion, None)
            self._sidecar_wait.pop(companion, None)
            source, target = self.folder / companion, unit / companion
            if os.path.lexists(source) and not os.path.lexists(target):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(source, target)
                    moved = True
            self._move_companions(self.folder, unit, companion)  # its own .ok, if any
        if moved:
            fsync_dir(unit)
            fsync_dir(self.folder)

    def _move_companions(self, source: Path, unit: Path, name: str) -> None:
        moved = False
        for suffix in _COMPANION_SUFFIXES:
            companion = f"{name}{suffix}"
            if os.path.lexists(source / companion) and not os.path.lexists(unit / companion):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(source / companion, unit / companion)
                    moved = True
        if moved:
            fsync_dir(unit)
            fsync_dir(source)

    # ------------------------------------------------------------------ units (threads)

    def _open_unit(self, unit: Path) -> tuple[str, _Plan | _Outcome] | None:
        """Finish a decided unit, or read an undecided one into what to submit."""
        if (unit / OUTCOME_FILE).exists():
            self._finish(unit)
            return None
        files = _visible_files(unit)
        if not files:  # the process stopped between creating the unit and the claim
            self._remove_unit(unit)
            return None
        claim = _read_claim(unit)
        if claim is not None and claim[0] in files:  # an HPRIM file and its companions
            main = claim[0]
            self._claim_hprim_companions(unit, claim[1])  # a claim cut short by a crash
        else:
            mains = [name for name in files if not _is_companion(name)]
            main = mains[0] if mains else _strip_companion_suffix(files[0])
        self._move_companions(self.folder, unit, main)  # a claim cut short by a crash
        return main, self._load(unit / main)

    def _load(self, path: Path) -> _Plan | _Outcome:
        try:
            data = self._read(path)
            digest = hashlib.sha256(data).hexdigest()
            fmt = self._format_of(path.name)
            if fmt == "hl7v2":
                return _Hl7Plan(self._messages(data), digest)
            if fmt == "hprim":
                return _HprimPlan(self._hprim_messages(path, data), digest)
            return _DocumentPlan(self._document(path, data), digest)
        except _ContentError as exc:
            return _Outcome(False, exc.code, exc.text)

    def _read(self, path: Path) -> bytes:
        limit = self.options.max_file_bytes
        try:
            size = path.stat().st_size
            if size > limit:
                raise _ContentError(
                    "too_large", f"the file is {size} bytes, more than max_file_bytes ({limit})"
                )
            data = path.read_bytes()
        except FileNotFoundError:
            raise _ContentError(
                "missing", "the file itself is missing: only its .ok or .json companion was found"
            ) from None
        except OSError as exc:
            raise _ContentError("unreadable", f"cannot read the file: {exc.strerror}") from None
        if len(data) > limit:
            raise _ContentError("too_large", f"the file grew past max_file_bytes ({limit})")
        if not data:
            raise _ContentError("empty", "the file is empty")
        return data

    def _messages(self, data: bytes) -> tuple[InboundMessage, ...]:
        charset = self.options.default_charset or HL7_CHARSET
        return tuple(
            decode_hl7_message(lines, index, self.name, charset)
            for index, lines in enumerate(split_hl7_file(data), start=1)
        )

    def _hprim_messages(self, path: Path, data: bytes) -> tuple[HprimInboundMessage, ...]:
        """One message per patient of an HPRIM file, with the companions from its unit."""
        wait = f"{self.options.sidecar_timeout:g} s"
        if (
            self.options.format == "hprim"
            and not path.name.lower().endswith(_HPRIM_SUFFIXES)
            and not looks_like_hprim(data[:HPRIM_SNIFF_BYTES])
        ):
            raise _ContentError(
                "not_hprim",
                "not an HPRIM file (its first line is not an H line like H|~^\\&|...), and no "
                f"HPRIM file named it as a companion (FIC OBX) within {wait}",
            )

        def companion(written: str) -> bytes:
            others = [name for name in _visible_files(path.parent) if name != path.name]
            found = resolve_companion(written, others, path.name)
            if found is None:
                raise _ContentError(
                    "missing_companion",
                    f"the file {written!r} that the HPRIM file names (FIC OBX) did not arrive "
                    f"beside it within {wait}",
                )
            try:
                return self._read(path.parent / found)
            except _ContentError as exc:
                raise _ContentError(exc.code, f"companion {found!r}: {exc.text}") from None

        try:
            return read_hprim_file(
                data,
                channel=self.name,
                companion=companion,
                default_charset=self._hprim_charset,
                escape_style=self.options.hprim_escape_style,
                ipp_system=self.options.hprim_ipp_system,
            )
        except HprimFileError as exc:
            raise _ContentError(exc.code, exc.text) from None

    def _document(self, path: Path, data: bytes) -> InboundDocument:
        sidecar_path = path.with_name(f"{path.name}.json")
        try:
            raw = sidecar_path.read_bytes()
        except FileNotFoundError:
            raise _ContentError(
                "no_sidecar",
                f"no JSON sidecar ({path.name}.json) arrived within "
                f"{self.options.sidecar_timeout:g} s",
            ) from None
        except OSError as exc:
            raise _ContentError("bad_sidecar", f"cannot read the sidecar: {exc.strerror}") from None
        return build_document(path.name, data, parse_sidecar(raw), self.name)

    def _conclude(self, unit: Path, main: str, outcome: _Outcome) -> None:
        """Record the decision durably in the unit, then move its files."""
        now = datetime.now(UTC)
        destination = self.processed_dir if outcome.accepted else self.error_dir
        decision = _Decision(
            accepted=outcome.accepted,
            main=main,
            base=free_name(destination, main, _DEST_SUFFIXES, now),
            code=outcome.code,
            text=outcome.text,
            at=now.isoformat(timespec="seconds"),
        )
        write_durably(unit / OUTCOME_FILE, decision.to_bytes())
        self._finish(unit)

    def _finish(self, unit: Path) -> None:
        """Carry out a recorded decision; safe to repeat after a crash at any point."""
        decision = _Decision.from_bytes((unit / OUTCOME_FILE).read_bytes())
        destination = self.processed_dir if decision.accepted else self.error_dir
        if not decision.accepted:
            report = self._error_report(unit, decision)
            write_durably(destination / f"{decision.base}.error.txt", report.encode("utf-8"))
        now = datetime.now(UTC)
        for name in _visible_files(unit):
            target = name
            if name.startswith(decision.main):
                target = decision.base + name[len(decision.main) :]
            if os.path.lexists(destination / target):  # only if someone wrote there meanwhile
                target = free_name(destination, target, ("",), now)
            os.replace(unit / name, destination / target)
        fsync_dir(destination)
        self._remove_unit(unit)
        if decision.accepted:
            self.counters.files_processed += 1
        else:
            self.counters.files_error += 1

    def _remove_unit(self, unit: Path) -> None:
        """Delete a unit whose files have all been moved out (our own hidden files remain: the
        decision, perhaps a temporary). ``rmdir`` refuses if anything else is left."""
        with os.scandir(unit) as entries:
            ours = [Path(e.path) for e in entries if e.name.startswith(".") and e.is_file()]
        for leftover in ours:
            leftover.unlink()
        unit.rmdir()
        fsync_dir(self.work_dir)

    def _error_report(self, unit: Path, decision: _Decision) -> str:
        kept_as = "" if decision.base == decision.main else f" (kept here as {decision.base})"
        return (
            f"channel: {self.name}\n"
            f"file: {decision.main}{kept_as}\n"
            f"unit: {unit.name} (the 'unit' field of the channel's log lines)\n"
            f"decided at: {decision.at}\n"
            f"reason code: {decision.code}\n"
            f"\n{decision.text}\n"
        )


def _raised_at(exc: BaseException) -> str | None:
    """``function:line`` where an exception was raised: its message may hold a file name."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].name}:{frames[-1].lineno}" if frames else None


@dataclass
class _HprimScan:
    """What a look into a drop-folder file found, for one size and mtime: whether it is an HPRIM
    file (``format: hprim``), and once complete, the files it names."""

    size: int
    mtime: int
    is_main: bool | None = None
    companions: tuple[str, ...] | None = None


def resolve_companion(written: str, names: Iterable[str], main: str) -> str | None:
    """The file among ``names`` that a FIC OBX means by ``written``: that name (its last path
    part), else the one name equal to it but for case (8.3 names written by DOS-era software
    meet case-preserving shares). Never the HPRIM file itself."""
    base = companion_file_name(written)
    if base is None:
        return None
    candidates = [name for name in names if name != main]
    if base in candidates:
        return base
    folded = [name for name in candidates if name.casefold() == base.casefold()]
    return folded[0] if len(folded) == 1 else None


def _read_claim(unit: Path) -> tuple[str, tuple[str, ...]] | None:
    """The claim record of a unit (an HPRIM file and its companions), None without one."""
    try:
        raw = json.loads((unit / CLAIM_FILE).read_bytes())
        return str(raw["main"]), tuple(str(name) for name in raw["companions"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _peek(path: Path, size: int) -> bytes:
    """The first bytes of a file; nothing when it cannot be read (it is then not taken for an
    HPRIM file, and its reading fails with a reason when it is processed)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def _strip_companion_suffix(name: str) -> str:
    for suffix in _COMPANION_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
