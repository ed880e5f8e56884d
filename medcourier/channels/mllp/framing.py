"""MLLP framing: ``<VT> message <FS><CR>``, and nothing about HL7.

TCP delivers a byte stream, not messages: one ``recv`` may hold half a message or three of them,
and a confused peer may send bytes between frames. This module turns that stream back into
messages, once, so the client, the simulator and any future listener share the same rules:

- bytes outside a frame are dropped (and counted, so a listener can log that a peer misbehaves);
- a ``<VT>`` inside an unfinished frame restarts the frame: HL7 never contains ``<VT>``, so the
  earlier bytes can only be the remains of an abandoned frame;
- a frame larger than ``max_size`` is a :class:`FramingError`, so a peer that never sends
  ``<FS><CR>`` cannot make us buffer without bound.
"""

from __future__ import annotations

import asyncio

from medcourier.engine.errors import MedcourierError

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\r"
END_SEQUENCE = END_BLOCK + CARRIAGE_RETURN

DEFAULT_MAX_SIZE = 64 * 1024 * 1024
"""Largest message accepted by default: big enough for an ORU with an embedded PDF."""

_OVERHEAD = len(START_BLOCK) + len(END_SEQUENCE)


class FramingError(MedcourierError):
    """The byte stream does not hold a well-formed MLLP frame (too big, cut short...)."""


class PeerClosed(FramingError):
    """The peer closed the connection between two frames.

    A listener treats this as a normal end of conversation; a client waiting for an ACK treats it
    like any other framing failure, which is why it is a :class:`FramingError`.
    """


def frame(message: bytes) -> bytes:
    """Wrap one message in an MLLP frame.

    The block characters may not appear in the message: the receiver would cut it there.
    """
    if START_BLOCK in message or END_BLOCK in message:
        raise FramingError("message contains an MLLP block character (0x0b or 0x1c)")
    return START_BLOCK + message + END_SEQUENCE


def stream_limit(max_size: int = DEFAULT_MAX_SIZE) -> int:
    """The ``limit`` to give an :class:`asyncio.StreamReader` read with :func:`read_frame`.

    ``readuntil`` refuses to buffer more than the stream's limit before it finds the separator,
    and asyncio's default (64 KiB) is far below a message with an attachment.
    """
    return max_size + _OVERHEAD


class FrameReader:
    """Incremental MLLP decoder: feed it TCP chunks as they come, get whole messages back.

    Used where the caller owns the reads (a protocol's ``data_received``, a blocking socket);
    with an :class:`asyncio.StreamReader`, :func:`read_frame` is simpler.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self.max_size = max_size
        self.discarded = 0
        """Bytes dropped because they were outside any frame (or in an abandoned one)."""
        self._buffer = bytearray()
        self._in_frame = False
        self._scanned = 0  # bytes of the open frame already searched for the end sequence

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not ended: EOF now would cut a message."""
        return self._in_frame

    @property
    def pending(self) -> int:
        """Bytes of the unfinished frame held in memory."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add a chunk; return the messages it completed, in order (often none, sometimes many).

        :raises FramingError: the open frame grew past ``max_size``; the reader is reset.
        """
        self._buffer += data
        messages: list[bytes] = []
        while self._buffer:
            if not self._in_frame and not self._open_frame():
                break
            message = self._close_frame()
            if message is None:
                break
            messages.append(message)
        return messages

    def eof(self) -> None:
        """Tell the reader the stream ended.

        :raises FramingError: a frame was open, so a message was cut short.
        """
        if self._in_frame:
            cut = len(self._buffer)
            self.reset()
            raise FramingError(f"stream ended in the middle of a frame ({cut} bytes received)")

    def reset(self) -> None:
        """Forget any partial frame (its bytes count as discarded)."""
        self.discarded += len(self._buffer) + (1 if self._in_frame else 0)
        self._buffer.clear()
        self._in_frame = False
        self._scanned = 0

    def _open_frame(self) -> bool:
        """Drop bytes up to the next start block; return whether a frame is now open."""
        start = self._buffer.find(START_BLOCK)
        if start < 0:
            self.discarded += len(self._buffer)
            self._buffer.clear()
            return False
        self.discarded += start
        del self._buffer[: start + 1]
        self._in_frame = True
        self._scanned = 0
        return True

    def _close_frame(self) -> bytes | None:
        """Return the open frame's message if its end sequence arrived, else None."""
        # Search only the new bytes (minus one, in case <FS> came last and <CR> comes next), so
        # a large message fed in small chunks is not scanned again and again.
        end = self._buffer.find(END_SEQUENCE, self._scanned)
        if end < 0:
            self._scanned = max(0, len(self._buffer) - len(END_SEQUENCE) + 1)
            if len(self._buffer) > self.max_size + len(END_SEQUENCE) - 1:
                self._too_big()
            return None
        restart = self._buffer.rfind(START_BLOCK, 0, end)
        if restart >= 0:
            self.discarded += restart + 1
            del self._buffer[: restart + 1]
            end -= restart + 1
        if end > self.max_size:
            self._too_big()
        message = bytes(self._buffer[:end])
        del self._buffer[: end + len(END_SEQUENCE)]
        self._in_frame = False
        self._scanned = 0
        return message

    def _too_big(self) -> None:
        self.reset()
        raise FramingError(f"MLLP frame larger than the {self.max_size}-byte limit")


async def read_frame(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Read the next message from a stream, skipping bytes outside frames.

    The stream must have been opened with ``limit=stream_limit(max_size)`` (or more), otherwise
    asyncio refuses frames above its own limit (64 KiB by default).

    :raises PeerClosed: the stream ended between frames.
    :raises FramingError: the stream ended inside a frame, or the frame is over ``max_size``.
    """
    while True:
        try:
            chunk = await reader.readuntil(END_SEQUENCE)
        except asyncio.IncompleteReadError as exc:
            if START_BLOCK in exc.partial:
                received = len(exc.partial)
                raise FramingError(
                    f"connection closed in the middle of a frame ({received} bytes received)"
                ) from None
            raise PeerClosed("connection closed by the peer") from None
        except asyncio.LimitOverrunError:
            raise FramingError(f"no MLLP frame end within {max_size} bytes") from None
        start = chunk.rfind(START_BLOCK)
        if start < 0:
            continue  # an <FS><CR> with no frame around it: junk between frames
        message = chunk[start + 1 : -len(END_SEQUENCE)]
        if len(message) > max_size:
            raise FramingError(f"MLLP frame larger than the {max_size}-byte limit")
        return message
