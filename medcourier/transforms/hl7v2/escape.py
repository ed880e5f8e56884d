"""Escaping of free text for HL7 v2 fields written with the default delimiters ``|^~\\&``.

Only the writer side lives here: whatever reads our messages (the destination, or the tests'
independent parsers) does the unescaping.

Choices worth knowing:

* Line breaks (CRLF, CR or LF) become ``\\.br\\``: a raw CR would end the segment, and a raw LF
  is read as a segment break by many receivers.
* Other control characters are dropped, because VT (0x0B) and FS (0x1C) frame MLLP messages and
  the rest has no meaning in an HL7 field. TAB is the exception: it becomes a space so that two
  words it separated do not run together.
* Non-ASCII text is left as it is: the message is sent as UTF-8 and declares it in MSH-18,
  which every receiver we target reads more reliably than ``\\Xhh\\`` sequences.
* Lone surrogates (possible in JSON-decoded text) are dropped, since they cannot be encoded
  to UTF-8 and would otherwise fail the whole message at encoding time.
"""

from __future__ import annotations

import re

# Anything escape() must change. Most values (names, codes, identifiers) contain none of these,
# so one regex search lets them through untouched without building a new string.
_NEEDS_WORK = re.compile("[\\\\|^&~\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_TABLE: dict[int, str | None] = {
    **{code: None for code in range(0x00, 0x20)},
    **{code: None for code in range(0x7F, 0xA0)},
    **{code: None for code in range(0xD800, 0xE000)},
    ord("\\"): "\\E\\",
    ord("|"): "\\F\\",
    ord("^"): "\\S\\",
    ord("&"): "\\T\\",
    ord("~"): "\\R\\",
    ord("\r"): "\\.br\\",
    ord("\n"): "\\.br\\",
    ord("\t"): " ",
}


def escape(text: str) -> str:
    """Return ``text`` safe to place in one HL7 v2 field, component or subcomponent."""
    if _NEEDS_WORK.search(text) is None:
        return text
    if "\r\n" in text:
        # One break, not two: CRLF must not become \.br\\.br\.
        text = text.replace("\r\n", "\n")
    return text.translate(_TABLE)
