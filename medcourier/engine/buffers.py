"""Assembling one large ``bytes`` from pieces with a single allocation of the final size.

Joining a list of pieces holds the pieces and the result at once (twice the size). Writing them
into an ``io.BytesIO`` holds only the buffer, and ``getvalue()`` hands that buffer over as the
result without copying it (CPython, when the buffer is not shared). But a ``BytesIO`` that grows
write after write reallocates: once past glibc's mmap threshold (raised up to 32 MiB by earlier
frees) a reallocation may copy, briefly holding the buffer twice; 78 MiB measured for a 50 MiB
result against 52 MiB when the buffer is made at its final size first.
"""

from __future__ import annotations

import io


def presized_buffer(size: int) -> io.BytesIO:
    """An empty-looking ``BytesIO`` whose buffer already has room for ``size`` bytes.

    Write the pieces from position 0, then call ``truncate()`` (at the position reached, so a
    ``size`` that was too large leaves no zeros behind; one too small just means the buffer
    grows) and ``getvalue()``.
    """
    out = io.BytesIO()
    if size > 0:
        out.seek(size - 1)
        out.write(b"\0")  # one allocation of the final size (zero-filled up to here)
        out.seek(0)
    return out
