"""HL7 v2 acknowledgements: read the ACK a destination sends back, build one for a message.

Only MSH, MSA and ERR matter here, so this is a few string splits rather than a full parser:
it must stay tolerant of what real systems send (LF or CRLF segment endings, custom
delimiters, v2.3 and v2.5 ERR layouts) and cheap enough to run on every delivery.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime

from medcourier.engine.errors import MedcourierError

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
"""MSA-1 values (HL7 table 0008): original mode A*, enhanced mode (commit) C*."""

_DEFAULT_ENCODING_CHARS = "^~\\&"
_SEGMENT_END = "\r"

_ACK_ID_PREFIX = os.urandom(6).hex()
"""MSH-10 of the ACKs this process builds: 12 random hex digits, then an 8-digit counter (20
characters, the most v2.5 allows). Unique without drawing a UUID per ACK, which with the time
below was half of building one."""
_ack_ids = itertools.count()


def _new_ack_ids() -> None:
    """A forked process draws a prefix of its own, or it would repeat its parent's ids."""
    global _ACK_ID_PREFIX
    _ACK_ID_PREFIX = os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_ack_ids)
_stamp: tuple[int, str] = (-1, "")  # MSH-7 of the ACKs built in the current second

HL7_CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    **{f"8859/{n}": f"iso8859-{n}" for n in range(1, 10)},
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    # Not HL7 table 0211 names, but what some senders put in MSH-18 anyway.
    "UTF-8": "utf-8",
    "ISO-8859-1": "iso8859-1",
    "ISO-8859-15": "iso8859-15",
}
"""MSH-18 values (HL7 table 0211) → Python codecs.

Only character sets that keep the MLLP block characters and ``\\r`` single bytes are listed:
UTF-16/32 would put 0x0B, 0x1C or 0x0D inside ordinary characters and cannot travel in a frame;
the ISO 2022 sets (ISO IR87, IR159) switch by escape sequences, which no codec here follows.
"""


class AckParseError(MedcourierError, ValueError):
    """The bytes are not an HL7 v2 message, or not an acknowledgement."""


@dataclass(frozen=True)
class AckInfo:
    """What an ACK says. ``text`` and ``errors`` are unescaped (``\\F\\`` is back to ``|``)."""

    code: str
    control_id: str
    text: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def positive(self) -> bool:
        """True for AA and CA: the receiver took the message."""
        return self.code in ("AA", "CA")


@dataclass(frozen=True)
class _Delimiters:
    """The separators a message declares in MSH-1 and MSH-2."""

    field: str
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_chars(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


def parse_ack(data: bytes) -> AckInfo:
    """Read MSA (and any ERR) out of an acknowledgement.

    :raises AckParseError: not an HL7 v2 message, or no usable MSA segment.
    """
    text, _ = _decode(data)
    segments = _segments(text)
    delimiters = _delimiters(segments)
    msa = _first_segment(segments, "MSA", delimiters)
    if msa is None:
        raise AckParseError("HL7 message has no MSA segment: not an acknowledgement")
    code = _field(msa, 1).strip().upper()
    if code not in ACK_CODES:
        raise AckParseError(f"MSA-1 is not an acknowledgement code: {code[:10]!r}")
    errors = [
        error
        for segment in _all_segments(segments, "ERR", delimiters)
        if (error := _err_text(segment, delimiters))
    ]
    return AckInfo(
        code=code,
        control_id=_field(msa, 2),
        text=_unescape(_field(msa, 3), delimiters),
        errors=errors,
    )


def build_ack(
    message: bytes,
    code: str,
    text: str = "",
    error: str | None = None,
    *,
    location: str | None = None,
    charset: str | None = None,
) -> bytes:
    """Build the acknowledgement of a received HL7 v2 message.

    The ACK reuses the message's delimiters and character set (so copied fields stay valid),
    swaps sender and receiver, echoes MSH-10 in MSA-2 and adds an ERR segment when ``error``
    or ``location`` is given. ``text`` and ``error`` are plain text: they are escaped here.
    Only the first segment of ``message`` is read, so passing just the MSH is enough.

    :param location: where the error is, ERR-2 style with ``^`` between components (e.g.
        ``"PID^1^3"``); written with the message's own component separator.
    :param charset: the Python codec to read the message and write the ACK with. By default the
        one MSH-18 declares, else UTF-8 if the bytes are valid UTF-8, else Latin-1.
    :raises ValueError: ``code`` is not an HL7 acknowledgement code.
    :raises AckParseError: ``message`` does not start with an MSH segment.
    """
    if code not in ACK_CODES:
        raise ValueError(f"not an HL7 acknowledgement code: {code!r}")
    msh, delimiters, codec = _header(message, charset)
    lines = [
        _ack_msh(msh, delimiters),
        delimiters.field.join(["MSA", code, _field(msh, 9), _escape(text, delimiters)]),
    ]
    if error is not None or location is not None:
        lines.append(_err_segment(error or "", delimiters, location))
    return (_SEGMENT_END.join(lines) + _SEGMENT_END).encode(codec, errors="replace")


def declared_charset(message: bytes) -> str:
    """MSH-18 as sent (its first repetition, stripped), read from the raw bytes; ``""`` if absent.

    HL7 keeps the MSH up to MSH-18 in plain ASCII, which is how a receiver learns the character
    set before decoding anything; only the ASCII separators are looked for here.

    :raises AckParseError: ``message`` does not start with an MSH segment.
    """
    first = header_segment(message).decode("latin-1")
    delimiters = _delimiters([first])
    value = _field(first.split(delimiters.field), 17)
    return value.split(delimiters.repetition, 1)[0].strip()


def header_segment(message: bytes) -> bytes:
    """The first segment of a message as raw bytes (normally the MSH), leading line breaks
    skipped, whatever ends it (CR, LF or nothing). Reads only as far as that segment's end."""
    start = 0
    while message[start : start + 1] in (b"\r", b"\n"):
        start += 1
    end = message.find(b"\r", start)
    end = len(message) if end < 0 else end
    newline = message.find(b"\n", start, end)  # bounded: a large message is not scanned twice
    return message[start : end if newline < 0 else newline]


def python_codec(hl7_charset: str) -> str | None:
    """The Python codec for an MSH-18 value (see :data:`HL7_CHARSETS`), None if unsupported."""
    return HL7_CHARSETS.get(" ".join(hl7_charset.upper().split()))


def message_control_id(message: bytes) -> str:
    """MSH-10 of an HL7 v2 message, as sent (the id its ACK must echo in MSA-2).

    :raises AckParseError: ``message`` does not start with an MSH segment.
    """
    msh, _, _ = _header(message)
    return _field(msh, 9)


def _ack_msh(msh: list[str], d: _Delimiters) -> str:
    """MSH of the ACK. ``msh`` is the original split on the field separator, so ``msh[n]`` is
    MSH-(n+1): MSH-1 is the separator itself and is not a list item."""
    trigger = _field(msh, 8).split(d.component)[1:2]
    message_type = d.component.join(["ACK", trigger[0], "ACK"]) if trigger else "ACK"
    fields = [
        "MSH",
        d.encoding_chars,
        _field(msh, 4),  # sending application <- original receiving application
        _field(msh, 5),
        _field(msh, 2),  # receiving application <- original sending application
        _field(msh, 3),
        _now_stamp(),
        "",
        message_type,
        f"{_ACK_ID_PREFIX}{next(_ack_ids) & 0xFFFFFFFF:08x}",
        _field(msh, 10) or "P",
        _field(msh, 11),
    ]
    charset = _field(msh, 17)
    if charset:
        # The ACK is encoded in the sender's character set: say so, or a reason with accents
        # would be read as ASCII (HL7's default when MSH-18 is empty).
        fields += ["", "", "", "", "", charset]
    return d.field.join(fields)


def _now_stamp() -> str:
    """The local time to the second with its offset (MSH-7), formatted once per second."""
    global _stamp
    second = int(time.time())
    if _stamp[0] != second:
        _stamp = (second, datetime.fromtimestamp(second).astimezone().strftime("%Y%m%d%H%M%S%z"))
    return _stamp[1]


def _err_segment(error: str, d: _Delimiters, location: str | None = None) -> str:
    """A v2.5 ERR: ERR-2 the location if known, ERR-3 'application internal error', ERR-4
    severity E, the text in ERR-8."""
    where = d.component.join(_escape(part, d) for part in (location or "").split("^"))
    code = d.component.join(["207", "Application internal error", "HL70357"])
    return d.field.join(["ERR", "", where, code, "E", "", "", "", _escape(error, d)])


def _err_text(segment: list[str], d: _Delimiters) -> str:
    """The most human-readable text of an ERR, whichever version's layout it follows.

    v2.5+: ERR-8 user message, ERR-7 diagnostics, ERR-3 coded error (text, then code);
    v2.3/2.4: everything is in ERR-1 (location^...^code^text).
    """
    for index in (8, 7):
        if value := _field(segment, index):
            return _unescape(value, d)
    coded = _field(segment, 3).split(d.component)
    label = coded[1] if len(coded) > 1 and coded[1] else coded[0]
    if label:
        return _unescape(label, d)
    legacy = _field(segment, 1).replace(d.subcomponent, d.component).split(d.component)
    return " ".join(_unescape(part, d) for part in legacy if part)


def _header(message: bytes, charset: str | None = None) -> tuple[list[str], _Delimiters, str]:
    """The MSH fields (index n is MSH-(n+1)), delimiters and character set of a message.

    Only the first segment is split: the message may carry a large base64 attachment. The
    character set is ``charset``, else MSH-18's, else guessed from the whole message.
    """
    if charset is None:
        charset = python_codec(declared_charset(message))
    if charset is None:
        decoded, charset = _decode(message)
        first = decoded.lstrip("\r\n").split("\r", 1)[0].split("\n", 1)[0]
    else:
        first = header_segment(message).decode(charset, errors="replace")
    delimiters = _delimiters([first])
    return first.split(delimiters.field), delimiters, charset


def _decode(data: bytes) -> tuple[str, str]:
    """Decode as UTF-8 when valid, else Latin-1 (which never fails), and say which was used.

    HL7 v2 feeds in the wild are one or the other, often without MSH-18 saying so.
    """
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _segments(text: str) -> list[str]:
    """Split into segments whatever the line ending (CR per the standard, LF or CRLF in files)."""
    normalized = text.replace("\r\n", "\r").replace("\n", "\r")
    return [segment for segment in normalized.split("\r") if segment.strip()]


def _delimiters(segments: list[str]) -> _Delimiters:
    """Read the field separator (MSH's 4th character) and the encoding characters (MSH-2)."""
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 4:
        raise AckParseError("not an HL7 v2 message: it does not start with an MSH segment")
    header = segments[0]
    separator = header[3]
    if separator.isalnum() or separator.isspace():
        raise AckParseError("not an HL7 v2 message: invalid field separator")
    encoding = header[4:].split(separator, 1)[0]
    chars = (encoding + _DEFAULT_ENCODING_CHARS[len(encoding) :])[:4]
    return _Delimiters(separator, *chars)


def _all_segments(segments: list[str], name: str, d: _Delimiters) -> list[list[str]]:
    """The segments called ``name``, each split into fields (index n is field n)."""
    return [s.split(d.field) for s in segments if s.split(d.field, 1)[0].strip() == name]


def _first_segment(segments: list[str], name: str, d: _Delimiters) -> list[str] | None:
    found = _all_segments(segments, name, d)
    return found[0] if found else None


def _field(fields: list[str], index: int) -> str:
    return fields[index] if index < len(fields) else ""


def _escape(text: str, d: _Delimiters) -> str:
    """HL7 escaping of free text, with the message's own delimiters.

    One pass over the characters, so the escape sequences added are never escaped again. Line
    breaks become ``\\.br\\`` (a raw CR would end the segment), a tab becomes a space, and other
    control characters are dropped: 0x0B and 0x1C would break the MLLP frame.
    """
    if not text:
        return text
    e = d.escape
    table = {
        e: f"{e}E{e}",
        d.field: f"{e}F{e}",
        d.component: f"{e}S{e}",
        d.subcomponent: f"{e}T{e}",
        d.repetition: f"{e}R{e}",
        "\n": f"{e}.br{e}",
        "\t": " ",
    }
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(
        table.get(char, char) for char in lines if char in table or not _is_control(char)
    )


def _is_control(char: str) -> bool:
    return char < " " or "\x7f" <= char <= "\x9f"


def _unescape(text: str, d: _Delimiters) -> str:
    """Undo HL7 escaping: delimiters, line breaks and ``\\Xhh\\`` hex; other sequences stay."""
    if d.escape not in text:
        return text
    simple = {
        "F": d.field,
        "S": d.component,
        "T": d.subcomponent,
        "R": d.repetition,
        "E": d.escape,
        ".br": "\n",
    }
    e = re.escape(d.escape)
    pattern = re.compile(f"{e}([^{e}]*){e}")

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        if body in simple:
            return simple[body]
        if body.startswith("X") and len(body) > 1 and len(body) % 2 == 1:
            try:
                return bytes.fromhex(body[1:]).decode("latin-1")
            except ValueError:
                pass
        return match.group(0)

    return pattern.sub(replace, text)
