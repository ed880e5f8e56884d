"""The ``hprim-sante`` format: a document as an HPRIM Santé 2.2 / 2.4 ORU file.

HPRIM Santé is the French ASTM-derived flat file for results and reports (Cloverleaf's HPRIM
configurator documentation traces its message structure to ASTM E1238, v4.2 of 1991). The
recommendation itself is not public, so every rule written here comes from public
implementations and samples, listed with links in ``docs/hprim.md``; where they disagree the
choice is an option of :class:`HprimOptions`. The file written is::

    H|~^\\&|<file>||<sender id>~<name>||ORU|||<receiver id>~<name>||P|H2.4~C|<date>
    P|1|<IPP>||<visit number>|<family>~<given>~<other given>|<birth name>|<birth date>|<sex>...
    OBR|1||~<transaction id>|<type code>~<title>~L|...|<date of results>|...|F
    OBX|1|FIC|<type code>~<title>~L||MEDCOURIER~<file>.pdf~PDF||||||F|||<date>
    L|1||1|5

with, in ``text`` mode, the document's lines in TX OBX (or C) records instead of the FIC OBX.

Rules every record follows, and why:

* **No trailing empty field, component or repetition** (the SEGHO module cites §5.1 of the
  recommendation for this); readers must still accept them, real labs send them (the lab lines
  quoted in MedinTux's reader end in ``|``).
* **Lines of at most 220 characters**, the rest continued on ``A|`` lines (SEGHO cites §5.8;
  Mediboard's writer comments that 220 is the normal limit). A cut never falls inside an escape
  sequence, nor right after a delimiter or a blank: a physical line ending in ``|`` or ``~``
  looks like a trailing empty field, and readers that trim lines (MedinTux does) eat a blank.
* **One codec, chosen per route**: ISO-8859-1 by default (SEGHO cites §7.1; libHprim, MedinTux
  read it), UTF-8 or windows-1252 when the receiver says so (Mediboard offers ISO-8859-1 and
  UTF-8). A character the codec cannot represent is replaced (typographic quotes and dashes by
  their ASCII look-alikes, accented letters outside the codec by the bare letter, anything else
  by ``?``), never an exception: a report must not bounce because of a curly apostrophe.
* **Local time, no offset**: HPRIM dates are bare digits (libHprim's H-14 pattern accepts 6, 8,
  12 or 14 of them), which French receivers read as local time.

The document travels in one of two ways (``document_mode``): its text in TX OBX or C records,
only for text documents, or (default) a FIC OBX naming a companion file delivered beside the
HPRIM file. :func:`render` returns the HPRIM file alone (the engine's ``Rendered`` has room for
one file); :func:`render_bundle` returns both files, companion first.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import accumulate
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document, Issue, Rendered
from medcourier.transforms.fhir_json import as_dict, as_dicts, first_of
from medcourier.transforms.hprim.reader import HPRIM_DELIMITERS, EscapeStyle

FORMAT_NAME = "hprim-sante"

_D = HPRIM_DELIMITERS
_CONTINUATION = "A" + _D.field
_DELIMITER_CHARS = frozenset("|~^\\&")

# Content types that are text a receiver can show line by line (text mode).
_TEXT_TYPES = frozenset({"text/plain", "application/txt"})

# Companion file extension and the OBX-6 type component for each content type (FIC mode).
# libHprim's sample types its companion "TXT", the RIS bridge's "PDF": the extension, upper case.
_FIC_TYPES: dict[str, tuple[str, str]] = {
    "application/pdf": ("pdf", "PDF"),
    "text/plain": ("txt", "TXT"),
    "application/txt": ("txt", "TXT"),
    "text/rtf": ("rtf", "RTF"),
    "application/rtf": ("rtf", "RTF"),
    "image/jpeg": ("jpg", "JPG"),
    "image/png": ("png", "PNG"),
    "image/tiff": ("tif", "TIF"),
}

# FHIR Patient.gender -> P-9; libHprim accepts only M, F and U.
_SEX = {"male": "M", "female": "F", "other": "U", "unknown": "U"}

# Encounter.class (v3 ActCode) -> P-25 admission status (libHprim: OP, IP, ER, PA, MP).
_ADMISSION = {"IMP": "IP", "ACUTE": "IP", "NONAC": "IP", "AMB": "OP", "EMER": "ER"}

_BAD_OPTION_CHARS = re.compile("[|~^\\\\&\x00-\x1f\x7f-\x9f]")
_FHIR_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_FHIR_DATETIME = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_TXID = re.compile(r"[0-9a-f]{20}")
_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class HprimOptions(BaseModel):
    """A route's ``format_options`` for ``hprim-sante``; the defaults are the choices most
    public sources agree on (see ``docs/hprim.md`` for each)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal["2.2", "2.4"] = Field(
        default="2.4",
        description="H-13.1 H2.2 or H2.4. 2.4 is the revision that carries files (PDF, images) "
        "between establishments (French Wikipedia, 'HPRIM'), which the default FIC mode needs; "
        "2.2 for receivers that refuse 2.4",
    )
    link_type: Literal["C", "L", "R"] = Field(
        default="C",
        description="H-13.2 (Mediboard): C lab <-> clinic/hospital, L lab <-> lab, "
        "R radiology practice <-> clinic/hospital",
    )
    sender_id: str = Field(default="MEDCOURIER", min_length=1)
    sender_name: str = Field(default="MEDCOURIER", min_length=1)
    receiver_id: str = Field(min_length=1, description="H-10.1, the receiver's code (required)")
    receiver_name: str = Field(default="", description="H-10.2; the code again when empty")
    processing_id: Literal["P", "D", "T"] = Field(
        default="P", description="H-12: P production, D debugging, T training (libHprim)"
    )
    encoding: Literal["iso-8859-1", "utf-8", "windows-1252"] = "iso-8859-1"
    line_ending: Literal["\r\n", "\r", "\n"] = Field(
        default="\r\n",
        description="CRLF (SEGHO cites §7.1; libHprim's and Mediboard's samples, files on "
        "Windows servers); CR or LF for receivers configured so (Mediboard offers all three)",
    )
    max_line: int = Field(default=220, ge=16, le=100_000)
    max_line_includes_terminator: bool = Field(
        default=True,
        description="count CR/LF in max_line, as the SEGHO module does and as a real lab file "
        "(219 characters + CR) suggests; satisfies readers of either reading",
    )
    document_mode: Literal["fic", "text"] = "fic"
    text_layout: Literal["obx_lines", "comments", "tx_components"] = Field(
        default="obx_lines",
        description="text mode: one TX OBX per line (MedinTux's lab sample), one empty TX OBX "
        "followed by one C record per line, or one TX OBX whose components are the lines "
        "(libHprim reads the component separator in TX as a line break)",
    )
    fic_value: Literal["application_file_type", "file_type"] = Field(
        default="application_file_type",
        description="FIC OBX-6: application~file~type (libHprim's sample) or file~type "
        "(a public RIS bridge)",
    )
    fic_application: str = Field(default="MEDCOURIER", max_length=10)
    escape_style: EscapeStyle = Field(
        default="sequences",
        description="sequences: \\F\\ \\S\\ \\R\\ \\E\\ \\T\\ by role (Mediboard); prefix: "
        "escape before the literal delimiter (libHprim); replace: delimiters swapped for "
        "look-alikes, for receivers that unescape nothing",
    )
    timestamp_precision: Literal["minute", "second"] = Field(
        default="minute",
        description="YYYYMMDDHHMM as in every public sample (MedinTux reads H-14's time as its "
        "last four characters), or YYYYMMDDHHMMSS",
    )
    timezone: str = "Europe/Paris"
    code_table: str = Field(
        default="L",
        max_length=10,
        description="third component of OBR-5 / OBX-4 (every public sample uses L)",
    )
    file_extension: str = Field(default=".HPR", pattern=r"^\.[A-Za-z0-9]{1,3}$")
    record_count: Literal["records", "records_before_l", "lines"] = Field(
        default="records",
        description="L-5: logical records H to L included (SEGHO), all but L (a public RIS "
        "bridge), or physical lines including A| continuations",
    )
    ipp_system: str | None = Field(
        default=None, description="Patient.identifier.system of the IPP put in P-3"
    )

    @field_validator(
        "sender_id", "sender_name", "receiver_id", "receiver_name", "code_table", "fic_application"
    )
    @classmethod
    def _no_delimiters(cls, value: str) -> str:
        if _BAD_OPTION_CHARS.search(value):
            raise ValueError("must not contain '|', '~', '^', '\\', '&' or control characters")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _identities_fit(self) -> HprimOptions:
        # H-5 and H-10 hold at most 40 characters, component separator included (Mediboard's
        # H.4/H.9 length, libHprim's first grammar).
        for name, ident, label in (
            ("sender", self.sender_id, self.sender_name),
            ("receiver", self.receiver_id, self.receiver_name or self.receiver_id),
        ):
            if len(ident) + 1 + len(label) > 40:
                raise ValueError(f"{name} id~name is longer than the 40 characters of H-5/H-10")
        return self


@dataclass(frozen=True, slots=True)
class _Built:
    name: str
    data: bytes
    companion: tuple[str, bytes] | None


def validate(document: Document, options: HprimOptions) -> list[Issue]:
    """What :func:`render` would refuse, and what a receiver would likely reject, found early
    so the sender gets a 422 instead of a failed delivery."""
    issues: list[Issue] = []
    key = _content_key(document.content_type)
    if options.document_mode == "text":
        if key not in _TEXT_TYPES:
            issues.append(
                Issue(
                    f"content type {document.content_type!r} cannot be sent in HPRIM text mode "
                    f"(only {', '.join(sorted(_TEXT_TYPES))}); use document_mode 'fic'",
                    location="content_type",
                )
            )
        else:
            try:
                _decode_text(document)
            except RenderError as exc:
                issues.append(Issue(str(exc), location="content"))
    elif key not in _FIC_TYPES:
        issues.append(
            Issue(
                f"content type {document.content_type!r} has no companion file type; "
                f"supported: {', '.join(sorted(_FIC_TYPES))}",
                location="content_type",
            )
        )
    if not document.document_type.strip():
        issues.append(Issue("the document type (a LOINC code) is required", location="type"))
    patient = document.patient
    family, given, _ = _used_name(patient)
    if not family and not given:
        issues.append(
            Issue("the patient has no name with a family or given part (P-6)", location="Patient")
        )
    ipp = _ipp(patient, options.ipp_system)
    if not ipp:
        issues.append(Issue("the patient has no identifier for P-3", location="Patient"))
    elif len(ipp) > 16:
        issues.append(
            Issue(
                f"IPP {ipp!r} is longer than the 16 characters of P-3 (libHprim); "
                "some receivers will refuse it",
                severity="warning",
                location="Patient.identifier",
            )
        )
    birth = patient.get("birthDate")
    if birth is not None and not _hprim_date(birth):
        issues.append(
            Issue(
                f"birthDate {birth!r} is not a FHIR date; P-8 is left empty",
                severity="warning",
                location="Patient.birthDate",
            )
        )
    return issues


def render(document: Document, options: HprimOptions) -> Rendered:
    """The HPRIM file; in FIC mode the document travels as a companion file (``companions``)
    that its OBX names, which the delivering connector writes before it.

    :raises RenderError: text mode with a non-text document or undecodable text, or FIC mode
        with a content type that has no companion file type.
    """
    built = _build(document, options)
    return Rendered(
        data=built.data,
        media_type=f"text/x-hprim; charset={options.encoding.upper()}",
        filename_hint=built.name,
        message_id=document.transaction_id,
        companions=(built.companion,) if built.companion is not None else (),
    )


def render_bundle(document: Document, options: HprimOptions) -> list[tuple[str, bytes]]:
    """Every file to deliver, as (file name, bytes), in the order to write them.

    In FIC mode the companion comes first: a receiver that picks up HPRIM files as soon as they
    appear must never find one whose companion is not there yet.
    """
    built = _build(document, options)
    if built.companion is None:
        return [(built.name, built.data)]
    return [built.companion, (built.name, built.data)]


# --- building --------------------------------------------------------------------------------


def _build(document: Document, opts: HprimOptions) -> _Built:
    key = _content_key(document.content_type)
    text: str | None = None
    fic: tuple[str, str] | None = None
    if opts.document_mode == "text":
        if key not in _TEXT_TYPES:
            raise RenderError(
                f"a {document.content_type!r} document cannot be sent in HPRIM text mode: "
                "only plain text can be written in TX/C records (use document_mode 'fic')"
            )
        text = _decode_text(document)
    else:
        fic = _FIC_TYPES.get(key)
        if fic is None:
            raise RenderError(
                f"content type {document.content_type!r} has no companion file type for a FIC OBX"
            )

    base = _base_name(document.transaction_id)
    name = base + opts.file_extension
    companion_name = f"{base}.{fic[0]}" if fic else ""
    w = _FieldWriter(opts)
    zone = ZoneInfo(opts.timezone)
    stamp = _stamp(document.created_at, zone, opts.timestamp_precision == "second")
    code = w.components(document.document_type.strip(), document.title.strip(), opts.code_table)

    records: list[str] = [
        _header(w, opts, name, stamp),
        _patient(w, opts, document.patient, document.encounter, zone),
        _request(w, document, code, stamp),
    ]
    if fic is not None:
        value = (
            w.components(opts.fic_application, companion_name, fic[1])
            if opts.fic_value == "application_file_type"
            else w.components(companion_name, fic[1])
        )
        records.append(_record("OBX", "1", "FIC", code, "", value, *[""] * 5, "F", "", "", stamp))
    else:
        assert text is not None
        records.extend(_text_records(w, opts.text_layout, code, text))

    split = _Splitter(opts)
    lines: list[str] = []
    for record in records:
        lines.extend(split(record))
    count = {
        "records": len(records) + 1,
        "records_before_l": len(records),
        "lines": len(lines) + 1,
    }[opts.record_count]
    lines.append(_record("L", "1", "", "1", str(count)))
    data = (opts.line_ending.join(lines) + opts.line_ending).encode(opts.encoding)
    companion = (companion_name, document.payload) if fic else None
    return _Built(name=name, data=data, companion=companion)


def _header(w: _FieldWriter, opts: HprimOptions, name: str, stamp: str) -> str:
    return _record(
        "H",
        _D.encoding_characters,
        w.value(name),
        "",
        w.components(opts.sender_id, opts.sender_name),
        "",
        "ORU",
        "",
        "",
        w.components(opts.receiver_id, opts.receiver_name or opts.receiver_id),
        "",
        opts.processing_id,
        w.components(f"H{opts.version}", opts.link_type),
        stamp,
    )


def _patient(
    w: _FieldWriter,
    opts: HprimOptions,
    patient: Mapping[str, Any],
    encounter: Mapping[str, Any] | None,
    zone: ZoneInfo,
) -> str:
    family, given, further = _used_name(patient)
    birth_name = _birth_name(patient)
    address = as_dict(first_of(patient.get("address")))
    lines = _strs(address.get("line"))
    phones = [
        w.value(_str(t.get("value")))
        for t in as_dicts(patient.get("telecom"))
        if t.get("system") == "phone" and _str(t.get("value"))
    ]
    visit = ""
    movement = ""
    admission = ""
    location = ""
    if encounter is not None:
        visit = _str(as_dict(first_of(encounter.get("identifier"))).get("value"))
        period = as_dict(encounter.get("period"))
        movement = _join(
            _D.repetition,
            [_hprim_datetime(period.get(k), zone, opts) for k in ("start", "end")],
        )
        admission = _ADMISSION.get(_str(as_dict(encounter.get("class")).get("code")), "")
        place = as_dict(as_dict(first_of(encounter.get("location"))).get("location"))
        location = _str(place.get("display"))
    return _record(
        "P",
        "1",
        w.value(_ipp(patient, opts.ipp_system)),
        "",
        w.value(visit),
        w.components(family, given, further),
        w.value(birth_name if birth_name != family else ""),
        _hprim_date(patient.get("birthDate")),
        _SEX.get(_str(patient.get("gender")), ""),
        "",
        w.components(
            lines[0] if lines else "",
            ", ".join(lines[1:]),
            _str(address.get("city")),
            _str(address.get("state")),
            _str(address.get("postalCode")),
            _str(address.get("country")),
        ),
        "",
        _join(_D.repetition, phones),
        *[""] * 10,
        movement,
        admission,
        w.value(location),
    )


def _request(w: _FieldWriter, document: Document, code: str, stamp: str) -> str:
    # OBR-4.2 is the executor's request number, the one corrections are matched on (MedinTux's
    # reader); the transaction id (20 characters) fits its 23-character field.
    author = document.sender_identifier or ""
    fields = ["", w.components("", document.transaction_id), code, *[""] * 17, stamp]
    fields += ["", "", "F", *[""] * 6, w.value(author)]
    return _record("OBR", "1", *fields)


def _text_records(w: _FieldWriter, layout: str, code: str, text: str) -> Iterable[str]:
    # Trailing blanks are dropped: readers that trim lines (MedinTux) would drop them anyway.
    lines = [line.rstrip() for line in text.splitlines()] or [""]
    if layout == "obx_lines":
        for number, line in enumerate(lines, start=1):
            yield _record("OBX", str(number), "TX", code, "", w.value(line), *[""] * 5, "F")
    elif layout == "comments":
        yield _record("OBX", "1", "TX", code, "", "", *[""] * 5, "F")
        for number, line in enumerate(lines, start=1):
            yield _record("C", str(number), "L", w.value(line))
    else:
        # Components are the lines; empty trailing lines cannot be told from no component.
        joined = _D.component.join(w.value(line) for line in lines)
        yield _record("OBX", "1", "TX", code, "", joined, *[""] * 5, "F")


def _record(*fields: str) -> str:
    """Fields joined by the field separator, trailing empty fields dropped (§5.1)."""
    return _join(_D.field, fields)


def _join(sep: str, parts: Iterable[str]) -> str:
    items = list(parts)
    while items and not items[-1]:
        items.pop()
    return sep.join(items)


# --- values: representable characters, then escapes ----------------------------------------

# Typographic characters with an unambiguous ASCII stand-in, for codecs that lack them.
_FALLBACK: dict[str, str] = {
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u02bc", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
    **dict.fromkeys("\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a", " "),
    **dict.fromkeys("\u202f\u205f\u3000", " "),
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff", ""),
    "\u2026": "...",
    "\u0153": "oe",
    "\u0152": "OE",
    "\u20ac": "EUR",
    "\u2022": "*",
    "\u2122": "TM",
}

# Control characters: none may appear raw in a record (CR/LF end it). TAB is kept.
_SPECIAL = re.compile("[|~^\\\\&\x00-\x08\x0a-\x1f\x7f-\x9f]")

_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

# Escape pairs per style, the escape character first so that its own escapes stay intact.
# Chained str.replace beats both str.translate (slow with multi-character values) and a regex
# with a callback; only values that contain something special get here at all.
# sequences: by the delimiter's role, HL7-style (Mediboard); prefix: the escape character before
# the literal delimiter (libHprim); replace: look-alikes for receivers that unescape nothing.
_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "sequences": (
        ("\\", "\\E\\"),
        ("|", "\\F\\"),
        ("~", "\\S\\"),
        ("^", "\\R\\"),
        ("&", "\\T\\"),
    ),
    "prefix": (("\\", "\\\\"), ("|", "\\|"), ("~", "\\~"), ("^", "\\^"), ("&", "\\&")),
    "replace": (("\\", "/"), ("|", "/"), ("~", "-"), ("^", "'"), ("&", "+")),
}


def _hex_control(match: re.Match[str]) -> str:
    return f"\\X{ord(match.group(0)):02X}\\"


@lru_cache(maxsize=4096)
def _fallback(ch: str, codec: str) -> str:
    """A stand-in for a character ``codec`` cannot encode: the table above, else the character
    without its accents (NFKD, combining marks dropped: "ő" -> "o", "ﬁ" -> "fi"), else "?"."""
    if ch in _FALLBACK:
        return _FALLBACK[ch]
    bare = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    if bare and bare.isprintable():
        try:
            bare.encode(codec)
        except UnicodeEncodeError:
            return "?"
        return bare
    return "?"


def representable(value: str, codec: str) -> str:
    """``value`` with every character ``codec`` cannot encode replaced (see :func:`_fallback`).

    Lone surrogates (possible in JSON-decoded text) fail every codec and become "?".
    """
    if value.isascii():
        return value
    try:
        value.encode(codec)
    except UnicodeEncodeError:
        return "".join(ch if _encodes(ch, codec) else _fallback(ch, codec) for ch in value)
    return value


@lru_cache(maxsize=8192)
def _encodes(ch: str, codec: str) -> bool:
    try:
        ch.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


class _FieldWriter:
    """Turns free text into a leaf value: representable in the codec, delimiters escaped.

    Control characters cannot stay raw (CR and LF end a record): with sequences they become
    ``\\Xhh\\`` so nothing is lost, otherwise a blank. TAB is kept.
    """

    def __init__(self, opts: HprimOptions) -> None:
        self.codec = codecs.lookup(opts.encoding).name
        self.pairs = _PAIRS[opts.escape_style]
        self.hex_controls = opts.escape_style == "sequences"

    def value(self, text: str) -> str:
        if not text:
            return ""
        text = representable(text, self.codec)
        if _SPECIAL.search(text) is None:
            return text
        for raw, escaped in self.pairs:
            if raw in text:
                text = text.replace(raw, escaped)
        if _CONTROL.search(text) is not None:
            text = _CONTROL.sub(_hex_control if self.hex_controls else " ", text)
        return text

    def components(self, *parts: str) -> str:
        return _join(_D.component, (self.value(p) for p in parts))


# --- line length -------------------------------------------------------------------------------


class _Splitter:
    """Cuts a record into physical lines of at most ``max_line`` bytes in the file's codec, the
    first as is, the others prefixed ``A|`` (the reader appends them back without separator).

    The limit is in encoded bytes (readers have fixed byte buffers): in UTF-8 an accented
    letter takes two of them; in the single-byte codecs bytes and characters are the same.

    A cut must not leave a line ending in a delimiter or a blank, nor fall inside an escape:
    with sequences every escape character opens or closes one, so a cut is inside a sequence
    when an odd number of them precede it; with prefix escapes, when the run of escape
    characters just before it is odd. A cut near the limit is looked for first; failing that,
    anywhere on the line (so a long run of blanks starts the next ``A|`` line instead of ending
    this one); then one after a delimiter. A run of blanks longer than a whole line cannot fit
    on one: with sequences the blank ending the line is written ``\\X20\\`` (its bytes in the
    codec), which every sequences reader decodes back; with prefix or replace escapes there is
    no such escape and that line ends in a blank, unavoidably.
    """

    _WINDOW = 64

    def __init__(self, opts: HprimOptions) -> None:
        terminator = len(opts.line_ending) if opts.max_line_includes_terminator else 0
        self.first = opts.max_line - terminator
        self.next = self.first - 2
        self.style = opts.escape_style
        self.codec = codecs.lookup(opts.encoding).name
        self.wide = self.codec not in ("iso8859-1", "latin-1", "cp1252")

    def __call__(self, record: str) -> list[str]:
        # ends[i]: the bytes record[:i] takes once encoded (None: one byte per character).
        ends = self._ends(record)
        if (len(record) if ends is None else ends[-1]) <= self.first:
            return [record]
        # The H record's H-2 holds a literal escape character: never count it.
        protect = 6 if record.startswith("H|") else 0
        lines: list[str] = []
        start = 0
        parity = 0
        while True:
            lead = "" if not lines else _CONTINUATION
            room = self.first if not lines else self.next
            high = self._reach(ends, start, room, len(record))
            if high >= len(record):
                lines.append(lead + record[start:])
                return lines
            cut = self._cut(record, start, high, parity, protect)
            if record[cut - 1].isspace() and self.style == "sequences":
                escaped = self._escape_blank(record, ends, start, room, parity, protect)
                if escaped is not None:
                    blank, text = escaped
                    lines.append(lead + record[start:blank] + text)
                    parity = (parity + _count(record, "\\", max(start, protect), blank)) % 2
                    start = blank + 1
                    continue
            lines.append(lead + record[start:cut])
            parity = (parity + _count(record, "\\", max(start, protect), max(cut, protect))) % 2
            start = cut

    def _ends(self, record: str) -> list[int] | None:
        if not self.wide or record.isascii():
            return None
        return list(accumulate((_width(ch, self.codec) for ch in record), initial=0))

    @staticmethod
    def _reach(ends: list[int] | None, start: int, room: int, size: int) -> int:
        """The furthest end of a line from ``start`` that takes at most ``room`` bytes."""
        if ends is None:
            return min(start + room, size)
        return bisect_right(ends, ends[start] + room, lo=start) - 1

    def _cut(self, record: str, start: int, high: int, parity: int, protect: int) -> int:
        for level in (0, 1, 2, 3):
            low = max(start + 1, high - self._WINDOW) if level == 0 else start + 1
            for cut in range(high, low - 1, -1):
                if self._allowed(record, start, cut, parity, protect, level):
                    return cut
        return high

    def _allowed(
        self, record: str, start: int, cut: int, parity: int, protect: int, level: int
    ) -> bool:
        last = record[cut - 1]
        if self.style == "sequences" and cut > protect:
            if (parity + _count(record, "\\", max(start, protect), cut)) % 2:
                return False
        elif self.style == "prefix" and cut > protect:
            run = 0
            while cut - 1 - run >= max(start, protect) and record[cut - 1 - run] == "\\":
                run += 1
            if run % 2:
                return False
        if level < 2 and last in _DELIMITER_CHARS and last != "\\":
            return False
        return not (level < 3 and last.isspace())

    def _escape_blank(
        self,
        record: str,
        ends: list[int] | None,
        start: int,
        room: int,
        parity: int,
        protect: int,
    ) -> tuple[int, str] | None:
        """Where a line made only of blanks (and delimiters) can end on an escaped blank: the
        blank's index and its ``\\Xhh\\`` sequence, the line then fitting ``room``."""
        for blank in range(self._reach(ends, start, room, len(record)) - 1, start - 1, -1):
            ch = record[blank]
            if not ch.isspace() or blank < protect:
                continue
            text = "\\X" + ch.encode(self.codec, errors="replace").hex().upper() + "\\"
            used = blank - start if ends is None else ends[blank] - ends[start]
            if used + len(text) <= room and self._allowed(record, start, blank, parity, protect, 3):
                return blank, text
        return None


@lru_cache(maxsize=4096)
def _width(ch: str, codec: str) -> int:
    """The bytes ``ch`` takes in ``codec`` (a character it cannot encode is written "?")."""
    try:
        return len(ch.encode(codec))
    except UnicodeEncodeError:
        return 1


def _count(text: str, ch: str, start: int, end: int) -> int:
    return text.count(ch, start, end) if end > start else 0


# --- FHIR reading (tolerant: a malformed element is skipped, never a crash) -------------------


def _used_name(patient: Mapping[str, Any]) -> tuple[str, str, str]:
    """P-6 family~given~further given: the name in use (``usual``), else the ``official`` one,
    else the first with a family or given part."""
    names = [n for n in as_dicts(patient.get("name")) if _str(n.get("family")) or n.get("given")]
    chosen = next((n for n in names if n.get("use") == "usual"), None)
    chosen = chosen or next((n for n in names if n.get("use") == "official"), None)
    chosen = chosen or (names[0] if names else {})
    given = _strs(chosen.get("given"))
    return _str(chosen.get("family")), given[0] if given else "", " ".join(given[1:])


def _birth_name(patient: Mapping[str, Any]) -> str:
    """P-7: the birth name. FR Core carries it as the ``official`` name; ``maiden`` is the
    older way to say the same."""
    for use in ("official", "maiden"):
        for name in as_dicts(patient.get("name")):
            if name.get("use") == use and _str(name.get("family")):
                return _str(name.get("family"))
    return ""


def _ipp(patient: Mapping[str, Any], system: str | None) -> str:
    identifiers = [i for i in as_dicts(patient.get("identifier")) if _str(i.get("value"))]
    if system is not None:
        identifiers = [i for i in identifiers if i.get("system") == system]
    else:
        typed = [
            i
            for i in identifiers
            if _str(as_dict(first_of(as_dict(i.get("type")).get("coding"))).get("code"))
            in ("PI", "MR")
        ]
        identifiers = typed or identifiers
    if identifiers:
        return _str(identifiers[0].get("value"))
    return _str(patient.get("id")) if system is None else ""


def _stamp(moment: datetime, zone: ZoneInfo, seconds: bool) -> str:
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    local = aware.astimezone(zone)
    return local.strftime("%Y%m%d%H%M%S" if seconds else "%Y%m%d%H%M")


def _hprim_date(value: object) -> str:
    if not isinstance(value, str):
        return ""
    match = _FHIR_DATE.fullmatch(value)
    return "".join(part for part in match.groups() if part) if match else ""


def _hprim_datetime(value: object, zone: ZoneInfo, opts: HprimOptions) -> str:
    """A FHIR dateTime in local time at its own precision; an offset is converted away."""
    if not isinstance(value, str):
        return ""
    match = _FHIR_DATETIME.fullmatch(value)
    if not match:
        return ""
    year, month, day, hour, minute, second, offset = match.groups()
    if hour is None or offset is None:
        return "".join(p for p in (year, month, day, hour, minute, second) if p)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:  # matches the pattern but is no calendar time (24:00, Feb 30)
        raise RenderError(f"{value!r} is not a valid date and time: {exc}") from exc
    return _stamp(moment, zone, opts.timestamp_precision == "second" and second is not None)


def _decode_text(document: Document) -> str:
    charset = "utf-8"
    for param in document.content_type.split(";")[1:]:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip():
            charset = val.strip().strip('"')
    name = "utf-8-sig" if charset.lower().replace("_", "-") in ("utf-8", "utf8") else charset
    try:
        return document.payload.decode(name)
    except LookupError as exc:
        raise RenderError(f"unknown charset {charset!r} in {document.content_type!r}") from exc
    except UnicodeDecodeError as exc:
        raise RenderError(f"the text document is not valid {charset} (byte {exc.start})") from exc


def _base_name(transaction_id: str) -> str:
    """Eight characters from [0-9A-Z] derived from the transaction id.

    H-3 holds at most 12 characters (libHprim, Mediboard) and the SEGHO module cites §7.2 for
    an 8-character A-Z/0-9 name plus ``.HPR``: 8.3 it is. The same transaction always gets the
    same name; 36**8 (41 bits) names keep collisions out of a drop folder.
    """
    digest = int.from_bytes(hashlib.sha256(transaction_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(8):
        digest, rest = divmod(digest, 36)
        chars.append(_BASE36[rest])
    return "".join(chars)


def _content_key(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _str(value: object) -> str:
    """A FHIR string without surrounding blanks (noise in identities, and a blank ending a
    physical line is lost by readers that trim lines)."""
    return value.strip() if isinstance(value, str) else ""


def _strs(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [item.strip() for item in value if isinstance(item, str) and item.strip()]
