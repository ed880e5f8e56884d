"""Putting a document's bytes into a rendering without extra copies of a large payload."""

from __future__ import annotations

import binascii
import io

# A multiple of 3, so every chunk encodes to whole Base64 quads with no padding in between.
B64_CHUNK = 3 * 1024 * 1024


def splice_base64(head: bytes, payload: bytes, tail: bytes) -> bytes:
    """``head + base64(payload) + tail`` without ever holding the whole Base64 text apart.

    A 50 MB PDF becomes ~67 MB of Base64: encoding it whole and then joining would hold both
    the encoded text and the result at once; writing chunk by chunk holds only the result.
    """
    out = io.BytesIO()
    out.write(head)
    view = memoryview(payload)
    for start in range(0, len(payload), B64_CHUNK):
        out.write(binascii.b2a_base64(view[start : start + B64_CHUNK], newline=False))
    out.write(tail)
    return out.getvalue()
