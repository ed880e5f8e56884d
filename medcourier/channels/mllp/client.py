"""The outbound MLLP connector: send a rendered HL7 v2 message, wait for its ACK.

One persistent connection per sender: opening a TCP connection per message costs a round trip
or two and, on many EHR interfaces, a log line and a thread on their side. The connection is
opened on the first delivery, reused while it behaves, and dropped at the first sign of
trouble (timeout, broken frame, unexpected ACK) so the next delivery starts from a clean state.

Network trouble is never raised: it is a :meth:`DeliveryResult.retry`, since the same message
may well go through later. Only the destination's own refusal (AE/AR/CE/CR) is final.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medcourier.channels.mllp.ack import AckInfo, AckParseError, parse_ack
from medcourier.channels.mllp.framing import (
    END_BLOCK,
    END_SEQUENCE,
    START_BLOCK,
    FramingError,
    read_frame,
    stream_limit,
)
from medcourier.engine.model import DeliveryResult, Part, Rendered

MAX_ACK_SIZE = 1024 * 1024
"""An ACK is a few hundred bytes; anything past 1 MiB is not one and is not worth buffering."""

_CLOSE_TIMEOUT = 2.0

_ACK_MEANINGS = {
    "AE": "application error",
    "AR": "application reject",
    "CE": "commit error",
    "CR": "commit reject",
}


class MllpOptions(BaseModel):
    """The ``deliver:`` block of a route using ``connector: mllp``.

    The destination is either ``address: host:port`` (handy with ``${VAR:-default}``
    substitution) or ``host`` and ``port``, never both.
    """

    model_config = ConfigDict(extra="forbid")

    connector: Literal["mllp"] = "mllp"
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    address: str | None = None
    ack_timeout: float = Field(30.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _split_address(cls, data: Any) -> Any:
        """Turn ``address`` into ``host``/``port`` and insist on exactly one way of saying it."""
        if not isinstance(data, dict):
            return data
        has_address = data.get("address") is not None
        has_host_port = data.get("host") is not None or data.get("port") is not None
        if has_address and has_host_port:
            raise ValueError("give either address (host:port) or host and port, not both")
        if not has_address:
            if data.get("host") is None or data.get("port") is None:
                raise ValueError("the destination needs address (host:port) or host and port")
            return data
        host, port = _split_host_port(str(data["address"]))
        return {**data, "host": host, "port": port}


def _split_host_port(address: str) -> tuple[str, str]:
    """``"ehr.local:6661"`` → ``("ehr.local", "6661")``; ``"[::1]:6661"`` → ``("::1", "6661")``.

    The port stays a string: the field's own validation reports a bad one.
    """
    host, colon, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port:
        raise ValueError(f"address must look like host:port, got {address!r}")
    return host, port


class MllpSender:
    """Delivers rendered HL7 v2 messages over one lazily opened, reused MLLP connection.

    Deliveries on one sender are serialized by a lock: MLLP has no correlation beyond MSA-2,
    so two frames in flight on one connection could not be told apart reliably.

    It writes a streamed rendering as its chunks come (``streams_renderings``, read by the
    worker): a large ORU's Base64 is made a slice at a time into the socket, never whole.
    """

    streams_renderings = True

    def __init__(self, options: MllpOptions) -> None:
        self.options = options
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def destination(self) -> str:
        return f"{self.options.host}:{self.options.port}"

    async def deliver(self, rendered: Rendered) -> DeliveryResult:
        """Send one message and turn the ACK (or its absence) into a delivery result."""
        if rendered.companions:
            return DeliveryResult.rejected(
                "this format delivers companion files, which MLLP cannot carry: use the file "
                "connector"
            )
        async with self._lock:
            try:
                return await self._exchange(rendered)
            except asyncio.CancelledError:
                # Cancelled mid-exchange: an ACK may still arrive and would be read as the
                # answer to the next message.
                await self._drop()
                raise

    async def aclose(self) -> None:
        """Close the connection (the sender can still be used: it would reconnect)."""
        async with self._lock:
            await self._drop()

    async def _exchange(self, rendered: Rendered) -> DeliveryResult:
        parts = rendered.parts
        if _holds_block_character(parts):
            # The rendering itself is unsendable: retrying the same bytes cannot help.
            return DeliveryResult.rejected(
                "cannot send over MLLP: message contains an MLLP block character (0x0b or 0x1c)"
            )
        try:
            reader, writer = await self._connection()
        except (OSError, TimeoutError) as exc:
            return DeliveryResult.retry(f"cannot connect to {self.destination}: {_describe(exc)}")
        try:
            # The timeout covers the write too: a peer that stops reading blocks drain().
            async with asyncio.timeout(self.options.ack_timeout):
                if len(parts) == 1 and isinstance(parts[0], bytes):  # built whole: most messages
                    await _write_frame(writer, parts[0])
                else:
                    await _write_chunks(writer, rendered.chunks())
                answer = await read_frame(reader, MAX_ACK_SIZE)
            ack = parse_ack(answer)
        except TimeoutError:
            return await self._fail(f"no ACK within {self.options.ack_timeout:g} s")
        except (OSError, FramingError) as exc:
            return await self._fail(f"connection failed: {_describe(exc)}")
        except AckParseError as exc:
            return await self._fail(f"the answer is not a valid HL7 ACK: {exc}")
        if ack.control_id != rendered.message_id:
            return await self._fail(
                f"ACK for control id {ack.control_id[:40]!r}, expected {rendered.message_id!r}"
            )
        return _result(ack)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The open connection, or a new one if there is none or the peer has closed it."""
        if self._reader is not None and self._writer is not None:
            if not self._reader.at_eof() and not self._writer.is_closing():
                return self._reader, self._writer
            await self._drop()
        async with asyncio.timeout(self.options.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.options.host, self.options.port, limit=stream_limit(MAX_ACK_SIZE)
            )
        self._reader, self._writer = reader, writer
        return reader, writer

    async def _fail(self, reason: str) -> DeliveryResult:
        """Drop the connection (its state is unknown) and ask for a retry."""
        await self._drop()
        return DeliveryResult.retry(f"{self.destination}: {reason}")

    async def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await writer.wait_closed()


def _result(ack: AckInfo) -> DeliveryResult:
    """AA/CA accept; the other codes are the destination's final word."""
    if ack.positive:
        return DeliveryResult.accepted(ack.text or None, ack_code=ack.code)
    details = [ack.text] if ack.text else []
    details += [error for error in ack.errors if error not in details]
    explanation = "; ".join(details) or "no reason given"
    reason = f"{ack.code} ({_ACK_MEANINGS[ack.code]}): {explanation}"
    return DeliveryResult.rejected(reason, ack_code=ack.code)


def _describe(exc: BaseException) -> str:
    """A short reason for a log line, even for exceptions whose message is empty."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# Above this size a message is written in slices of it, each drained before the next, instead of
# framed in one piece: framing copies the message, and a socket that does not take it at once
# copies the rest into the transport's buffer (Python 3.11), which for a 50 MB document would be
# two more copies of it in memory.
WRITE_SLICE = 1024 * 1024


def _holds_block_character(parts: tuple[Part, ...]) -> bool:
    """Whether the message holds 0x0b or 0x1c, which would break its frame.

    A streamed rendering is checked part by part without being built: its Base64 parts cannot
    hold either byte (their alphabet is ``A-Z a-z 0-9 + / =``), only its fixed parts can.
    """
    for part in parts:
        if isinstance(part, bytes) and (START_BLOCK in part or END_BLOCK in part):
            return True
    return False


async def _write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    if len(data) <= WRITE_SLICE:
        writer.write(START_BLOCK + data + END_SEQUENCE)  # one send for the usual small message
        await writer.drain()
        return
    writer.write(START_BLOCK)
    await _write_slices(writer, data)
    writer.write(END_SEQUENCE)
    await writer.drain()


async def _write_chunks(writer: asyncio.StreamWriter, chunks: Iterator[bytes]) -> None:
    """Send a streamed rendering, drained chunk by chunk, so that at most a chunk of it (1 MiB
    of Base64, encoded here on the event loop in about a millisecond) is in memory beside the
    payload. Small neighbours are joined before they go (the block start with the message
    head, the tail with the block end) rather than sent as packets of their own."""
    pending = START_BLOCK
    for chunk in itertools.chain(chunks, (END_SEQUENCE,)):
        if len(pending) + len(chunk) <= WRITE_SLICE:
            pending += chunk
            continue
        await _write_slices(writer, pending)
        pending = chunk
    await _write_slices(writer, pending)


async def _write_slices(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data`` in drained slices of at most :data:`WRITE_SLICE` (views, not copies)."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_SLICE):
        writer.write(view[start : start + WRITE_SLICE])
        await writer.drain()
