"""A JSON body's one large base64 string, decoded where it lies, in the body's own buffer.

The plain way from a request body to the document it carries holds the document several times
over: the body (``bytes``, 4/3 of the document as base64), the text ``json.loads`` decodes it
to (a ``str`` as long), the string value parsed from that text (as long again), then the decoded
``bytes``: some 200 MiB at once for a 50 MiB PDF.

:func:`decode_in_place` parses the body without its largest string: the string's content is
replaced by a short marker in a copy of the rest of the body (a few hundred bytes), which is
parsed. The string is then decoded from base64 a window at a time, from the body's buffer into
the same buffer (the decoded bytes are written from its start, always behind the window being
read), and the buffer, cut to the decoded size, becomes the document's ``bytes`` without a
copy. No more than the body itself is ever held, plus a window.

The answer must be the plain path's, for every body: the same document, the same parse, the
same refusal with the same words. So this path is taken only when that is certain, and the
caller takes the plain path whenever it returns None, with the body left untouched:

- the body is UTF-8 (``json.loads`` would detect it so) and the string is the largest run between
  two consecutive double quotes, at least :data:`MIN_SIZE` bytes;
- its content is only the base64 alphabet, spaces and the escapes ``\\/``, ``\\n``, ``\\r``,
  ``\\t`` (JSON writers escape slashes; line breaks in the base64 arrive as escapes): no other
  escape, no raw control character, no non-ASCII byte. Such content is a valid JSON string
  body whatever surrounds it, decodes to that alphabet with whitespace in it, and holds no
  quote, so the quotes on either side are where the string starts and ends if the body is
  valid JSON at all (between two strings that are not one, JSON needs a ``:`` ``,`` ``]`` or
  ``}``, none of which are in it);
- the rest of the body, with the marker in the string's place, is valid JSON (else the body is
  not: the marker takes the content's place as a string body of the same lexical kind) in which
  the marker appears exactly once, as a whole string, where the caller expects the base64 (its
  ``at``): so the parse is the plain one with the document's string replaced, nothing else;
- the string without its whitespace decodes as ``binascii.a2b_base64(..., strict_mode=True)``
  decodes it (``base64.b64decode(validate=True)``, which the plain path uses), and the caller's
  ``accept`` takes the sizes: the plain path would have refused with words of its own.

Decoding a window at a time gives the bytes decoding the whole gives: windows are cut at a
multiple of four base64 characters, with no padding before the last one, where the strict
decoder has no state to carry; any error in any window, or in the last one, sends the body to
the plain path, which then words it. The whole string is decoded once (into a scratch window)
to check it before the body's buffer is written: a body that cannot take this path leaves it
unchanged.
"""

from __future__ import annotations

import binascii
import io
import json
import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

MIN_SIZE = 1024 * 1024
"""Strings shorter than this are left to the plain path (which is as good for them)."""

WINDOW = 256 * 1024
"""Bytes of the string read, checked and decoded at a time."""

MAX_QUOTES = 10_000
"""A body with more double quotes than this is left to the plain path (a Parameters resource has
a few dozen; this only bounds the search for the largest string)."""

MAX_TAIL = 64
"""Characters kept from the first padding on: a valid end has a handful."""

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_CONTENT = _ALPHABET + b"= \\"
"""Bytes the string's content may hold; a backslash only as one of the escapes below."""
_OTHER_ESCAPE = re.compile(rb"\\[^/nrt]")
_BREAK = re.compile(rb"\\[nrt]")
_UTF8 = ("utf-8", "utf-8-sig")


class _Unsure(Exception):
    """This body is for the plain path."""


def decode_in_place(
    buffer: io.BytesIO,
    at: Callable[[Any, str], bool],
    accept: Callable[[int, int], bool],
) -> tuple[Any, bytes] | None:
    """The body in ``buffer`` parsed with its large base64 string replaced by a marker, and that
    string decoded; None when that cannot be done with certainty (the module's doc), the
    buffer then untouched.

    :param at: ``at(parsed, marker)``: whether the marker is where the base64 is expected.
    :param accept: ``accept(characters, size)``: whether the plain path would take base64 of
        that many characters (without whitespace) that decodes to ``size`` bytes.
    :return: the parse and the decoded bytes. On success the buffer is consumed: its memory
        became the bytes (the caller must drop it).
    """
    body = buffer.getvalue()
    span = _largest_string(body, MIN_SIZE)
    if span is None:
        return None
    start, end = span
    encoding = json.detect_encoding(body[:4])
    if encoding not in _UTF8:
        return None
    try:
        characters, size = _check(body, start, end)
    except _Unsure:
        return None
    if not accept(characters, size):
        return None
    marker = f"medcourier-base64-{secrets.token_hex(16)}"
    shell = body[:start] + marker.encode("ascii") + body[end:]
    del body  # the buffer is written below: it must not be shared (or it would be copied)
    if json.detect_encoding(shell[:4]) != encoding:
        return None
    try:
        parsed = json.loads(shell)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    del shell
    if _occurrences(parsed, marker) != 1 or not at(parsed, marker):
        return None
    return parsed, _decode_into(buffer, start, end, size)


def _largest_string(body: bytes, min_size: int) -> tuple[int, int] | None:
    """``(start, end)`` of the largest run between two consecutive double quotes (the quotes at
    ``start - 1`` and ``end``), if it has at least ``min_size`` bytes."""
    if not 2 <= body.count(b'"') <= MAX_QUOTES:
        return None
    best = (0, 0)
    previous = body.find(b'"')
    while (following := body.find(b'"', previous + 1)) >= 0:
        if following - previous - 1 > best[1] - best[0]:
            best = (previous + 1, following)
        previous = following
    return best if best[1] - best[0] >= min_size else None


def _check(body: bytes, start: int, end: int) -> tuple[int, int]:
    """The base64 characters in ``body[start:end]`` and the bytes they decode to; raises
    :class:`_Unsure` unless all of it decodes. Only the end is decoded here (into a scratch
    window): whole quanta of the base64 alphabet before any padding decode, to three bytes
    each."""
    counted = [0]
    size = 0
    for characters, whole in _quanta(lambda a, b: body[a:b], start, end, counted):
        size += len(characters) // 4 * 3 if whole else len(_a2b(characters))
    return counted[0], size


def _decode_into(buffer: io.BytesIO, start: int, end: int, size: int) -> bytes:
    """Decode ``[start, end)`` of the buffer into its first ``size`` bytes, and hand those over.

    The window being read lies after everything written: ``w`` decoded bytes come from at least
    ``4 * w / 3`` bytes of the string, which starts after the opening quote.
    """
    written = 0
    with buffer.getbuffer() as view:
        try:
            for characters, _ in _quanta(lambda a, b: view[a:b].tobytes(), start, end, [0]):
                decoded = _a2b(characters)
                del characters
                view[written : written + len(decoded)] = decoded
                written += len(decoded)
                del decoded
        except _Unsure as exc:  # the same bytes were checked a moment ago
            raise RuntimeError("the body changed while its base64 was decoded") from exc
    if written != size:
        raise RuntimeError("the body changed while its base64 was decoded")
    buffer.truncate(size)
    data = buffer.getvalue()  # the buffer itself, shrunk in place
    buffer.close()
    return data


def _quanta(
    read: Callable[[int, int], bytes], start: int, end: int, counted: list[int]
) -> Iterator[tuple[bytes, bool]]:
    """The string's base64 characters in order, a window at a time, cut where the strict decoder
    keeps no state: whole quanta (four characters) before any padding (``True``), then the
    rest (``False``), which is decoded alone. ``counted[0]`` adds up the characters. Raises
    :class:`_Unsure` as soon as anything is not certain.

    The rest starts at the first padding's quantum, with the whole quantum before it: the strict
    decoder then reads the end of the string exactly as within the whole (it keeps no state
    across a quantum of data, and treats padding at the very start of its input apart).
    """
    carry = b""  # not handed on yet: from a quantum boundary, the last whole quantum kept
    padded = False
    for characters in _characters(read, start, end):
        counted[0] += len(characters)
        pending = carry + characters
        del characters
        if padded:
            cut = 0
        elif (pad := pending.find(b"=")) >= 0:
            padded = True
            cut = pad - pad % 4 - 4
        else:
            cut = len(pending) - len(pending) % 4 - 4
        if cut > 0:
            carry = pending[cut:]
            whole = pending[:cut]
            del pending
            yield whole, True
            del whole
        else:
            carry = pending
        if padded and len(carry) > MAX_TAIL:  # data after the padding: refused, in its words
            raise _Unsure
    yield carry, False


def _a2b(characters: bytes | memoryview) -> bytes:
    try:
        return binascii.a2b_base64(characters, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise _Unsure from exc


def _characters(read: Callable[[int, int], bytes], start: int, end: int) -> Iterator[bytes]:
    """The base64 characters of the string's content, a window at a time: its JSON escapes
    ``\\/`` read as ``/``, its whitespace (spaces, ``\\n``, ``\\r``, ``\\t``) left out."""
    a = start
    while a < end:
        b = min(a + WINDOW, end)
        raw = read(a, b)
        if raw.endswith(b"\\") and b < end:  # keep an escape whole
            b += 1
            raw += read(b - 1, b)
        raw = _plain(raw)
        yield raw
        del raw
        a = b


def _plain(raw: bytes) -> bytes:
    if raw.translate(None, _CONTENT):
        raise _Unsure  # another byte: a control character, non-ASCII, a quote...
    if b"\\" in raw:
        if raw.endswith(b"\\") or _OTHER_ESCAPE.search(raw):
            raise _Unsure  # \u0041, \b, \\..., or a backslash escaping the closing quote
        # Every backslash starts one of the four escapes, so they cannot overlap: the breaks go,
        # then the backslashes left are those of "\/".
        raw = _BREAK.sub(b"", raw).translate(None, b"\\")
    if b" " in raw:
        raw = raw.translate(None, b" ")
    return raw


def _occurrences(value: Any, marker: str) -> int:
    """How many times ``marker`` is a string (key or value) in a parsed JSON value."""
    count = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            count += item == marker
        elif isinstance(item, dict):
            count += sum(key == marker for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count
