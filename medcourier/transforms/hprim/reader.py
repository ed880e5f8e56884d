"""Reading HPRIM Santé files, so that they can come in through drop folders.

The reader is deliberately tolerant of what real senders do, and strict only where guessing would
corrupt data. Each behaviour rests on a public source (details and links in ``docs/hprim.md``):

* **Delimiters are read from the H line, never assumed.** The recommendation's set is ``|~^\\&``
  (field, component, repetition, escape, subcomponent; libHprim's tokenizer, the SEGHO module's
  ``Separators``), but files in the wild use others: a lab file quoted in MedinTux's biogest
  reader starts ``H|\\^&~|`` (component ``\\``), a RIS bridge writes HL7's ``H|^~\\&|``.
* **Records end with CR, LF or CRLF.** libHprim reads CR and skips non-printables after it;
  Mediboard offers CR, CRLF and LF as the segment terminator setting. Blank lines are skipped and
  anything before the first ``H`` is ignored (Mediboard strips it the same way).
* **A line starting ``A|`` continues the previous record**, its content after the two characters
  appended as is: libHprim, Mediboard, MedinTux and the SEGHO module all join this way, and the
  MedinTux sample shows labs cutting mid-word, so nothing may be inserted at the join.
* **Fields are numbered from the record letter**: H-1 is ``H``, H-3 the file name, H-5 the
  sender, H-10 the receiver, H-13 ``version~type``, H-14 the date, as the HPRIM chapters number
  them (libHprim ``H.3``...``H.14``; the SEGHO module's ``7.7``, ``9.26``, ``10.3``).
* **Escapes**: by default the HL7-style sequences ``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\ \\Xhh\\`` named
  after the delimiter's *role* (Mediboard's HPRIM parser); libHprim instead reads the escape
  character as "the next character is literal" (``escape_style="prefix"``).
* **TX values**: the component separator inside a TX value is a line break (libHprim turns it into
  ``\\n``), so a text split over components or repetitions is joined back with newlines.

The result keeps every logical record (``HprimMessage.records``) next to the structured view,
so a route can map a field this module does not interpret.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

EscapeStyle = Literal["sequences", "prefix", "replace"]

_TERMINATORS = re.compile(r"\r\n|\r|\n")


class HprimParseError(ValueError):
    """The bytes are not an HPRIM Santé file (no H line, no delimiters, bad encoding...)."""


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The five characters declared after ``H`` on the header line, in the recommendation's
    order: field, component, repetition, escape, subcomponent (HPRIM: ``|~^\\&``)."""

    field: str = "|"
    component: str = "~"
    repetition: str = "^"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        """H-2 as written after the first field separator: ``~^\\&`` for the standard set."""
        return self.component + self.repetition + self.escape + self.subcomponent


HPRIM_DELIMITERS = Delimiters()


@dataclass(slots=True)
class HprimRecord:
    """One logical record (continuations joined), its fields still escaped.

    ``fields[0]`` is the record type, so ``fields[n - 1]`` is field *n* in HPRIM numbering.
    """

    type: str
    fields: list[str]
    line: int


@dataclass(slots=True)
class HprimHeader:
    """The H record."""

    file_name: str
    sender_id: str
    sender_name: str
    message_type: str
    receiver_id: str
    receiver_name: str
    processing_id: str
    version: str
    link_type: str
    timestamp: str


@dataclass(slots=True)
class HprimFile:
    """A file an OBX of type FIC names; it is delivered beside the HPRIM file."""

    name: str
    type: str = ""
    application: str = ""


@dataclass(slots=True)
class HprimResult:
    """An OBX record, with the C records that follow it."""

    sequence: str
    value_type: str
    code: str
    label: str
    table: str
    values: list[list[str]]
    unit: str
    status: str
    observed_at: str
    comments: list[str] = field(default_factory=list)

    @property
    def value(self) -> str:
        """TX: the text, components and repetitions as lines; otherwise the first component."""
        if self.value_type == "TX":
            return "\n".join(part for repetition in self.values for part in repetition)
        return self.values[0][0] if self.values and self.values[0] else ""

    @property
    def text_lines(self) -> list[str]:
        """The lines of text this result carries: its TX value, then its comments.

        A TX result whose value is empty but which has comments is a title for them (the
        writer's ``comments`` layout), so it contributes only the comments; an empty TX value
        with no comment is a blank line of the text.
        """
        own = [] if (self.value == "" and self.comments) else self.value.split("\n")
        return own + self.comments

    @property
    def file(self) -> HprimFile | None:
        """The companion file of a FIC result.

        Implementations disagree on OBX-6 of a FIC: libHprim's sample has three components
        ``application~file~type`` (``GALAXIE~AL213202.j1~TXT``), a public RIS bridge writes two,
        ``file~type`` (``14545486.pdf^PDF``). Two components are read as ``file~type`` when the
        second looks like a type code (short, no dot), else as ``application~file``.
        """
        if self.value_type != "FIC" or not self.values:
            return None
        parts = self.values[0]
        if len(parts) >= 3:
            return HprimFile(name=parts[1], type=parts[2], application=parts[0])
        if len(parts) == 2:
            first, second = parts
            if len(second) <= 5 and "." not in second:
                return HprimFile(name=first, type=second)
            return HprimFile(name=second, application=first)
        return HprimFile(name=parts[0]) if parts and parts[0] else None


@dataclass(slots=True)
class HprimRequest:
    """An OBR record and its results."""

    sequence: str
    requester_sample_id: str
    requester_request_id: str
    executor_sample_id: str
    executor_request_id: str
    code: str
    label: str
    table: str
    status: str
    reported_at: str
    results: list[HprimResult] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def text(self) -> str | None:
        """The text documents of this request joined back, or None without any TX result."""
        lines = [line for r in self.results if r.value_type == "TX" for line in r.text_lines]
        if not any(r.value_type == "TX" for r in self.results):
            return None
        return "\n".join(lines)

    @property
    def files(self) -> list[HprimFile]:
        return [f for f in (r.file for r in self.results) if f is not None]


@dataclass(slots=True)
class HprimPatient:
    """A P record and everything up to the next P (or L)."""

    sequence: str
    patient_id: str
    executor_patient_id: str
    visit_number: str
    family: str
    given: str
    further_given: str
    birth_name: str
    birth_date: str
    sex: str
    address: list[str]
    phones: list[str]
    requests: list[HprimRequest] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class HprimTrailer:
    """The L record: L-4 counts P records, L-5 the records of the message (as the sender
    counted them: implementations differ, so nothing is checked here)."""

    patient_count: str
    record_count: str
    batch: str


@dataclass(slots=True)
class HprimMessage:
    delimiters: Delimiters
    header: HprimHeader
    patients: list[HprimPatient]
    trailer: HprimTrailer | None
    records: list[HprimRecord]
    line_count: int
    comments: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.header.version


def parse_hprim(
    data: bytes, encoding: str = "iso-8859-1", escape_style: EscapeStyle = "sequences"
) -> HprimMessage:
    """Parse an HPRIM Santé file (ORU and the records of other contexts it shares).

    :param encoding: ISO-8859-1 by default, what the recommendation and most senders use;
        ``"auto"`` tries strict UTF-8 first and falls back to windows-1252, as the hprimtool
        viewer does for French lab files.
    :param escape_style: how the sender escaped delimiters (see the module docstring);
        ``"replace"`` means it did not, so nothing is unescaped.
    :raises HprimParseError: no H line, an H line without delimiters, or undecodable bytes.
    """
    text, codec = _decode(data, encoding)
    lines = _TERMINATORS.split(text)
    start = next((i for i, line in enumerate(lines) if _header_like(line)), None)
    if start is None:
        raise HprimParseError("no H line with delimiters (H|~^\\&|...) was found")
    delimiters = _delimiters(lines[start].lstrip("\ufeff\x00 \t"))
    decoder = _Decoder(delimiters, escape_style, codec)
    joined, physical = _join_continuations(lines, start, delimiters)
    records = [_make_record(text, decoder, line) for text, line in joined]
    return _Builder(decoder).build(records, physical)


def _decode(data: bytes, encoding: str) -> tuple[str, str]:
    """The text, and the codec it was decoded with (``\\Xhh\\`` escapes decode with it)."""
    if encoding == "auto":
        try:
            return data.decode("utf-8-sig"), "utf-8"
        except UnicodeDecodeError:
            return data.decode("windows-1252", errors="replace"), "windows-1252"
    name = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(name), encoding
    except LookupError as exc:
        raise HprimParseError(f"unknown encoding {encoding!r}") from exc
    except UnicodeDecodeError as exc:
        raise HprimParseError(
            f"the file is not valid {encoding} (byte {exc.start}); "
            "HPRIM files are usually ISO-8859-1"
        ) from exc


def _header_like(line: str) -> bool:
    line = line.lstrip("\ufeff\x00 \t")
    return len(line) >= 3 and line[0] == "H" and not line[1].isalnum() and not line[1].isspace()


def _delimiters(line: str) -> Delimiters:
    """H, then the field separator, then up to four encoding characters up to the next field
    separator. Missing ones fall back to the HPRIM defaults (Mediboard does the same)."""
    fs = line[1]
    end = line.find(fs, 2)
    declared = line[2:end] if end != -1 else line[2:6]
    if not declared:
        raise HprimParseError("the H line declares no component/repetition/escape characters")
    chars = list(declared[:4]) + [""] * (4 - len(declared[:4]))
    defaults = HPRIM_DELIMITERS
    return Delimiters(
        field=fs,
        component=chars[0] or defaults.component,
        repetition=chars[1] or defaults.repetition,
        escape=chars[2] or defaults.escape,
        subcomponent=chars[3] or defaults.subcomponent,
    )


def _join_continuations(
    lines: list[str], start: int, d: Delimiters
) -> tuple[list[tuple[str, int]], int]:
    """Logical records with their first line number, ``A|`` lines appended to the record
    before them, blank lines skipped; also the number of physical lines read."""
    continuation = "A" + d.field
    records: list[tuple[str, int]] = []
    parts: list[str] = []
    first_line = 0
    physical = 0
    for number, raw in enumerate(lines[start:], start=start + 1):
        line = raw.rstrip("\x1a\x00")  # DOS end-of-file marks, NUL padding
        if number == start + 1:
            line = line.lstrip("\ufeff\x00 \t")
        if not line.strip():
            continue
        physical += 1
        if line.startswith(continuation):
            if not parts:
                raise HprimParseError(f"line {number}: continuation (A) line before any record")
            parts.append(line[2:])
            continue
        if parts:
            records.append(("".join(parts), first_line))
        parts = [line]
        first_line = number
    if parts:
        records.append(("".join(parts), first_line))
    return records, physical


def _make_record(text: str, dec: _Decoder, line: int) -> HprimRecord:
    fs = dec.d.field
    if text.startswith("H" + fs):
        # H-2 holds the escape character itself: keep it verbatim, split the rest.
        end = text.find(fs, 2)
        head = ["H", text[2:end] if end != -1 else text[2:]]
        rest = text[end + 1 :] if end != -1 else ""
        return HprimRecord("H", head + (dec.split(rest, fs) if rest else []), line)
    fields = dec.split(text, fs)
    return HprimRecord(fields[0].strip(), fields, line)


class _Decoder:
    """Splits fields into repetitions and components and unescapes leaf values."""

    def __init__(self, d: Delimiters, style: EscapeStyle, codec: str) -> None:
        self.d = d
        self.style = style
        self.codec = codec
        esc = re.escape(d.escape)
        roles = {
            "F": d.field,
            "S": d.component,
            "R": d.repetition,
            "E": d.escape,
            "T": d.subcomponent,
            ".br": "\n",
        }
        self._roles = roles
        self._sequence = re.compile(esc + r"(F|S|R|E|T|\.br|X[0-9A-Fa-f]+)" + esc)
        self._prefixed = re.compile(esc + "(.)", re.DOTALL)
        self.unescape: Callable[[str], str]
        if style == "sequences":
            self.unescape = self._unescape_sequences
        elif style == "prefix":
            self.unescape = self._unescape_prefix
        else:
            self.unescape = _identity

    def _unescape_sequences(self, value: str) -> str:
        if self.d.escape not in value:
            return value
        return self._sequence.sub(self._one_sequence, value)

    def _one_sequence(self, match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] in "Xx" and len(code) > 1:
            hex_digits = code[1:]
            if len(hex_digits) % 2:
                return match.group(0)
            return bytes.fromhex(hex_digits).decode(self.codec, errors="replace")
        return self._roles[code]

    def _unescape_prefix(self, value: str) -> str:
        if self.d.escape not in value:
            return value
        return self._prefixed.sub(r"\1", value)

    def split(self, value: str, sep: str) -> list[str]:
        """Split on ``sep``; in prefix style a separator right after an escape is data."""
        if self.style != "prefix" or self.d.escape not in value:
            return value.split(sep)
        out: list[str] = []
        current: list[str] = []
        chars = iter(value)
        for ch in chars:
            if ch == self.d.escape:
                current.append(ch)
                current.append(next(chars, ""))
            elif ch == sep:
                out.append("".join(current))
                current = []
            else:
                current.append(ch)
        out.append("".join(current))
        return out

    def components(self, value: str) -> list[str]:
        """Unescaped components of the first repetition of a field."""
        first = self.split(value, self.d.repetition)[0]
        return [self.unescape(part) for part in self.split(first, self.d.component)]

    def repetitions(self, value: str) -> list[list[str]]:
        if value == "":
            return []
        return [
            [self.unescape(part) for part in self.split(rep, self.d.component)]
            for rep in self.split(value, self.d.repetition)
        ]

    def text(self, value: str) -> str:
        """A whole field as plain text (no structure expected)."""
        return self.unescape(value)


def _identity(value: str) -> str:
    return value


class _Builder:
    """Walks the records in order and hangs each on the last P / OBR / OBX before it."""

    def __init__(self, decoder: _Decoder) -> None:
        self.dec = decoder

    def build(self, records: list[HprimRecord], physical: int) -> HprimMessage:
        if not records or records[0].type != "H":
            raise HprimParseError("the file does not start with an H record")
        header = self._header(records[0])
        patients: list[HprimPatient] = []
        comments: list[str] = []
        trailer: HprimTrailer | None = None
        patient: HprimPatient | None = None
        request: HprimRequest | None = None
        result: HprimResult | None = None
        for record in records[1:]:
            kind = record.type
            if kind == "P":
                patient = self._patient(record)
                patients.append(patient)
                request = result = None
            elif kind == "OBR":
                if patient is None:
                    patient = self._patient(HprimRecord("P", ["P"], record.line))
                    patients.append(patient)
                request = self._request(record)
                patient.requests.append(request)
                result = None
            elif kind == "OBX":
                if request is None:
                    request = self._request(HprimRecord("OBR", ["OBR"], record.line))
                    if patient is None:
                        patient = self._patient(HprimRecord("P", ["P"], record.line))
                        patients.append(patient)
                    patient.requests.append(request)
                result = self._result(record)
                request.results.append(result)
            elif kind == "C":
                text = self.dec.text(_get(record.fields, 4))
                holder = (
                    result.comments
                    if result is not None
                    else request.comments
                    if request is not None
                    else patient.comments
                    if patient is not None
                    else comments
                )
                holder.append(text)
            elif kind == "L":
                fields = record.fields
                trailer = HprimTrailer(
                    patient_count=_get(fields, 4),
                    record_count=_get(fields, 5),
                    batch=self.dec.text(_get(fields, 6)),
                )
        return HprimMessage(
            delimiters=self.dec.d,
            header=header,
            patients=patients,
            trailer=trailer,
            records=records,
            line_count=physical,
            comments=comments,
        )

    def _header(self, record: HprimRecord) -> HprimHeader:
        f = record.fields
        sender = self.dec.components(_get(f, 5))
        receiver = self.dec.components(_get(f, 10))
        version = self.dec.components(_get(f, 13))
        return HprimHeader(
            file_name=self.dec.text(_get(f, 3)),
            sender_id=_at(sender, 0),
            sender_name=_at(sender, 1),
            message_type=_at(self.dec.components(_get(f, 7)), 0),
            receiver_id=_at(receiver, 0),
            receiver_name=_at(receiver, 1),
            processing_id=_get(f, 12),
            version=_at(version, 0),
            link_type=_at(version, 1),
            timestamp=_get(f, 14),
        )

    def _patient(self, record: HprimRecord) -> HprimPatient:
        f = record.fields
        name = self.dec.components(_get(f, 6))
        return HprimPatient(
            sequence=_get(f, 2),
            patient_id=_at(self.dec.components(_get(f, 3)), 0),
            executor_patient_id=_at(self.dec.components(_get(f, 4)), 0),
            visit_number=_at(self.dec.components(_get(f, 5)), 0),
            family=_at(name, 0),
            given=_at(name, 1),
            further_given=_at(name, 2),
            birth_name=self.dec.text(_get(f, 7)),
            birth_date=_get(f, 8),
            sex=_get(f, 9),
            address=self.dec.components(_get(f, 11)) if _get(f, 11) else [],
            phones=[_at(rep, 0) for rep in self.dec.repetitions(_get(f, 13))],
        )

    def _request(self, record: HprimRecord) -> HprimRequest:
        f = record.fields
        requester = self.dec.components(_get(f, 3))
        executor = self.dec.components(_get(f, 4))
        analysis = self.dec.components(_get(f, 5))
        return HprimRequest(
            sequence=_get(f, 2),
            requester_sample_id=_at(requester, 0),
            requester_request_id=_at(requester, 1),
            executor_sample_id=_at(executor, 0),
            executor_request_id=_at(executor, 1),
            code=_at(analysis, 0),
            label=_at(analysis, 1),
            table=_at(analysis, 2),
            status=_get(f, 26),
            reported_at=_get(f, 23),
        )

    def _result(self, record: HprimRecord) -> HprimResult:
        f = record.fields
        test = self.dec.components(_get(f, 4))
        return HprimResult(
            sequence=_get(f, 2),
            value_type=_get(f, 3).strip().upper(),
            code=_at(test, 0),
            label=_at(test, 1),
            table=_at(test, 2),
            values=self.dec.repetitions(_get(f, 6)),
            unit=_at(self.dec.components(_get(f, 7)), 0),
            status=_get(f, 12),
            observed_at=_get(f, 15),
        )


def _get(fields: list[str], number: int) -> str:
    """Field ``number`` in HPRIM numbering (the record letter is field 1), "" when absent."""
    return fields[number - 1] if len(fields) >= number else ""


def _at(parts: list[str], index: int) -> str:
    return parts[index] if len(parts) > index else ""
