"""The inbound MLLP listener: HL7 v2 messages in, acknowledgements out.

A hospital system (ADT feed, lab, document system) connects, sends framed messages and waits for
an ACK after each one. This module owns everything about that wire: TCP or TLS, framing, the
character set (MSH-18), which message types the listener takes, and the acknowledgement. What a
message *means* is the engine's business: the listener hands it to an
:class:`~medcourier.engine.inbound.InboundSink` and ACKs according to the verdict.

The one rule that matters most: **the ACK goes out only after the sink's coroutine returned**,
i.e. after the engine made the message durable. A sender that got AA/CA may forget the message;
if the listener dies before the ACK, the sender resends and the engine dedupes.

Acknowledgement modes (HL7 v2.5 §2.9):

- original mode (MSH-15 and MSH-16 empty): AA, AE or AR from the sink's verdict;
- enhanced mode (MSH-15 or MSH-16 set): the *commit* acknowledgement CA, CE or CR, sent or not as
  MSH-15 asks (AL always, NE never, ER only on error, SU only on success; empty or unknown is
  taken as AL, so a sender waiting for an answer is never left hanging). The *application*
  acknowledgement of enhanced mode (a separate message, on a connection back to the sender, as
  MSH-16 asks) is not sent: that needs an outbound link per sender and is out of scope here.

Nothing here logs message content: events carry the listener's name, the peer, control ids
(MSH-10) and exception types.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re
import ssl
from dataclasses import dataclass
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, FilePath, field_validator, model_validator

from medcourier.channels.mllp.ack import (
    AckParseError,
    build_ack,
    declared_charset,
    header_segment,
    python_codec,
)
from medcourier.channels.mllp.framing import START_BLOCK, FrameReader, FramingError, frame
from medcourier.engine.inbound import (
    InboundMessage,
    InboundResult,
    InboundSink,
    SinkUnavailable,
    Verdict,
)

log = structlog.get_logger("medcourier.mllp.listener")

_READ_SIZE = 64 * 1024
"""Bytes asked of the socket per read; frames are reassembled by :class:`FrameReader`."""

_STREAM_LIMIT = 256 * 1024
"""Buffer of each connection's StreamReader. Frames are reassembled by :class:`FrameReader`
(which enforces ``max_message_bytes``), so this only sets flow control: a peer that pipelines
messages while the sink works is paused by TCP after ~2x this, rather than after 2x the largest
message allowed."""

_HEAD_SIZE = 4096
"""How much of a frame's start is kept to answer it should it turn out oversize (its MSH)."""

_BACKLOG = 1024
"""Pending connections the kernel may queue: a whole ward's devices reconnecting at once after a
network blip must not be refused (asyncio's default is 100)."""

_STOP_TIMEOUT = 10.0
"""How long :meth:`MllpListener.stop` lets messages in the sink finish (and be ACKed)."""

_CLOSE_TIMEOUT = 2.0
_NOT_HL7 = b"MSH|^~\\&|||||||ACK||P|2.5"  # header to answer bytes that are not HL7 at all
_MESSAGE_TYPE = re.compile(r"[A-Z0-9]{3}\^(\*|[A-Z0-9]{3})")
_MAX_LOGGED_ID = 64


class TlsOptions(BaseModel):
    """The ``tls:`` block of an MLLP listener: a server certificate, optionally client ones.

    With ``cafile``, client certificates are checked against it when presented; with
    ``require_client_certificate`` too, a client without a valid one is refused at handshake.
    """

    model_config = ConfigDict(extra="forbid")

    certfile: FilePath
    keyfile: FilePath
    cafile: FilePath | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _ca_to_check_clients(self) -> TlsOptions:
        if self.require_client_certificate and self.cafile is None:
            raise ValueError("require_client_certificate needs a cafile to check clients against")
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context, TLS 1.2 at least (older versions are broken or deprecated)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.certfile, self.keyfile)
        if self.cafile is not None:
            context.load_verify_locations(cafile=self.cafile)
            context.verify_mode = (
                ssl.CERT_REQUIRED if self.require_client_certificate else ssl.CERT_OPTIONAL
            )
        return context


class ListenerOptions(BaseModel):
    """An ``inbound[]`` entry with ``channel: mllp``.

    ``message_types`` are ``MSG^EVT`` patterns matched against MSH-9's first two components;
    ``*`` as the trigger event takes any event of that message type (``ADT^*``).
    ``default_charset`` (an HL7 MSH-18 name or a Python codec) applies when MSH-18 is empty.
    """

    model_config = ConfigDict(extra="forbid")

    channel: Literal["mllp"] = "mllp"
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(ge=0, le=65535)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=256)
    idle_timeout: float = Field(300.0, gt=0)
    tls: TlsOptions | None = None
    message_types: list[str] = Field(
        default_factory=lambda: ["ADT^*", "ORU^R01", "MDM^T02"], min_length=1
    )
    default_charset: str = "ascii"

    @field_validator("message_types")
    @classmethod
    def _check_message_types(cls, patterns: list[str]) -> list[str]:
        normalized = [pattern.strip().upper() for pattern in patterns]
        for pattern in normalized:
            if not _MESSAGE_TYPE.fullmatch(pattern):
                raise ValueError(
                    f"message type pattern {pattern!r} is not like ADT^A01 or ADT^* "
                    "(MSH-9 message code ^ trigger event)"
                )
        return normalized

    @field_validator("default_charset")
    @classmethod
    def _check_charset(cls, name: str) -> str:
        """Store a Python codec, and only one that keeps ASCII (hence MSH and MLLP) as is."""
        codec = python_codec(name)
        if codec is None:
            try:
                codec = codecs.lookup(name.strip()).name
            except LookupError:
                raise ValueError(f"unknown character set {name!r}") from None
        probe = "MSH|^~\\&\r"
        try:
            compatible = probe.encode(codec) == probe.encode("ascii")
        except (UnicodeError, LookupError):
            compatible = False
        if not compatible:
            raise ValueError(f"character set {name!r} is not ASCII-compatible")
        return codec


@dataclass(frozen=True)
class _Header:
    """What the listener reads of a message before deciding anything: the raw MSH and the
    fields that do not need the character set (MSH-15, MSH-16, MSH-18 are plain codes)."""

    msh: bytes
    separator: str
    charset: str  # MSH-18 as sent, "" when empty
    accept_ack: str  # MSH-15, upper case
    enhanced: bool

    @classmethod
    def read(cls, message: bytes) -> _Header:
        """:raises AckParseError: the message does not start with an MSH segment."""
        msh = header_segment(message)
        charset = declared_charset(msh)  # checks it is an MSH with a sane separator
        text = msh.decode("latin-1")
        separator = text[3]
        fields = text.split(separator)
        accept_ack = _field(fields, 14).strip().upper()
        application_ack = _field(fields, 15).strip()
        return cls(msh, separator, charset, accept_ack, bool(accept_ack or application_ack))

    def wants_ack(self, success: bool) -> bool:
        """Whether this message gets an answer: always in original mode, as MSH-15 says else."""
        if not self.enhanced:
            return True
        if self.accept_ack == "NE":
            return False
        if self.accept_ack == "ER":
            return not success
        if self.accept_ack == "SU":
            return success
        return True  # AL, or empty/unknown: answering is the safe side

    def code(self, verdict: Verdict) -> str:
        original = {Verdict.ACCEPT: "AA", Verdict.ERROR: "AE", Verdict.REJECT: "AR"}[verdict]
        return original.replace("A", "C", 1) if self.enhanced else original


class _FrameHead:
    """The first bytes of the frame being received.

    :class:`FrameReader` drops an oversize frame whole, but its MSH is what lets the AR echo
    MSH-10 in MSA-2 (without it, a careful sender cannot tell which message was refused). Best
    effort: when the MSH cannot be recovered, the AR goes out with a minimal header.
    """

    def __init__(self) -> None:
        self.data = b""

    def after_feed(self, chunk: bytes, frames: FrameReader) -> None:
        """Follow the reader after it took ``chunk`` without error."""
        if not frames.in_frame:
            self.data = b""
        elif frames.pending <= len(chunk):  # the open frame started in this chunk
            self.data = chunk[len(chunk) - frames.pending :][:_HEAD_SIZE]
        elif len(self.data) < _HEAD_SIZE:
            self.data += chunk[: _HEAD_SIZE - len(self.data)]

    def of_oversize(self, chunk: bytes) -> bytes:
        """The head of the frame that ``chunk`` pushed over the limit."""
        start = chunk.rfind(START_BLOCK)
        if start >= 0:  # it started in this very chunk (after any frames completed before it)
            return chunk[start + 1 : start + 1 + _HEAD_SIZE]
        return (self.data + chunk[:_HEAD_SIZE])[:_HEAD_SIZE]


class _IdleWatch:
    """Hangs up a connection that completed no frame for ``idle_timeout`` seconds.

    Time spent in the sink does not count, and bytes that never complete a frame do not keep
    the connection open. One timer per idle period rather than a timeout around every read:
    those timers (made, cancelled, swept from the loop's heap) were several percent of a busy
    listener's time. When it expires, the transport is closed, so the read waiting on it ends;
    should the close wait on ACKs the peer never read (or on a TLS peer's close_notify), the
    connection is aborted after ``_CLOSE_TIMEOUT``.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, idle: float, writer: asyncio.StreamWriter
    ) -> None:
        self._loop = loop
        self._idle = idle
        self._writer = writer
        self.busy = False  # a message is in the sink or its ACK going out
        self.expired = False
        self._deadline = loop.time() + idle
        self._timer = loop.call_at(self._deadline, self._check)

    def restart(self) -> None:
        """A frame was completed and answered: the idle period starts again."""
        self._deadline = self._loop.time() + self._idle

    def cancel(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        if self.busy or now < self._deadline:  # look again when it could have expired
            again = now + self._idle if self.busy else self._deadline
            self._timer = self._loop.call_at(again, self._check)
            return
        self.expired = True
        self._writer.close()
        self._timer = self._loop.call_later(_CLOSE_TIMEOUT, self._writer.transport.abort)


class MllpListener:
    """Listens for HL7 v2 over MLLP (optionally TLS) and hands each message to an engine sink.

    Many connections at once, many messages per connection, one message at a time per
    connection: MLLP has no correlation beyond MSA-2, so a sender waits for each ACK (frames
    pipelined anyway are answered in order). Counters: ``connections`` accepted, ``messages``
    (frames) received, ``discarded_bytes`` seen outside any frame or in an abandoned one (an
    oversize frame counts there too).
    """

    def __init__(self, options: ListenerOptions, sink: InboundSink, name: str) -> None:
        self.options = options
        self.sink = sink
        self.name = name
        self.connections = 0
        self.messages = 0
        self.discarded_bytes = 0
        self._accepted = frozenset(t for t in options.message_types if not t.endswith("^*"))
        self._any_event = frozenset(t[:-2] for t in options.message_types if t.endswith("^*"))
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._handlers: set[asyncio.Task[object]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._busy: set[asyncio.StreamWriter] = set()  # connections with a message in the sink

    @property
    def port(self) -> int:
        """The bound port once started (the real one when the options said 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self.options.port

    async def start(self) -> None:
        """Bind and start accepting connections (returns once the socket listens).

        :raises OSError: the address cannot be bound.
        :raises ssl.SSLError: the certificate or key cannot be loaded.
        """
        if self._server is not None:
            raise RuntimeError(f"listener {self.name} already started")
        context = self.options.tls.ssl_context() if self.options.tls is not None else None
        self._stopping = False
        self._server = await asyncio.start_server(
            self._serve,
            self.options.host,
            self.options.port,
            limit=_STREAM_LIMIT,
            backlog=_BACKLOG,
            ssl=context,
            # A client that connects and never completes the handshake must not hold a slot.
            ssl_handshake_timeout=min(self.options.idle_timeout, 60.0) if context else None,
        )
        log.info(
            "mllp.listener.started",
            channel=self.name,
            host=self.options.host,
            port=self.port,
            tls=context is not None,
        )

    async def stop(self) -> None:
        """Stop accepting, let messages already in the sink finish and be ACKed, then close.

        Idle connections are closed at once; a message still in the sink after a grace period
        is abandoned unacknowledged (the sender will resend it, the engine dedupes).
        """
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.close()
        # Close rather than cancel: a cancelled handler could cut a message between the sink's
        # commit and its ACK, and asyncio logs spurious tracebacks for cancelled stream handlers.
        for writer in self._writers - self._busy:
            writer.close()
        handlers = list(self._handlers)
        if handlers:
            _done, pending = await asyncio.wait(handlers, timeout=_STOP_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()
        log.info("mllp.listener.stopped", channel=self.name, messages=self.messages)

    # --- one connection ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: reassemble frames, answer each, until the peer leaves or misbehaves."""
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        peer = _peer(writer)
        frames = FrameReader(self.options.max_message_bytes)
        try:
            await self._converse(reader, writer, frames, peer)
        except (OSError, FramingError) as exc:
            log.info(
                "mllp.listener.connection_failed",
                channel=self.name,
                peer=peer,
                error=type(exc).__name__,
            )
        finally:
            if task is not None:
                self._handlers.discard(task)
            self._writers.discard(writer)
            self._busy.discard(writer)
            if frames.discarded:
                log.warning(
                    "mllp.listener.bytes_discarded",
                    channel=self.name,
                    peer=peer,
                    count=frames.discarded,
                )
            await _close(writer)

    async def _converse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: FrameReader,
        peer: str,
    ) -> None:
        idle = self.options.idle_timeout
        head = _FrameHead()
        watch = _IdleWatch(asyncio.get_running_loop(), idle, writer)
        try:
            while not self._stopping:
                chunk = await reader.read(_READ_SIZE)
                if watch.expired:
                    log.info("mllp.listener.idle_timeout", channel=self.name, peer=peer)
                    return
                if not chunk:
                    frames.eof()  # FramingError if the peer left in the middle of a frame
                    return
                discarded = frames.discarded
                try:
                    messages = frames.feed(chunk)
                except FramingError:
                    # The rest of the oversize frame is still coming: the stream is out of
                    # step, so answer what can be answered and hang up.
                    self.discarded_bytes += frames.discarded - discarded
                    await self._refuse_oversize(writer, head.of_oversize(chunk), peer)
                    return
                self.discarded_bytes += frames.discarded - discarded
                head.after_feed(chunk, frames)
                for message in messages:
                    if self._stopping:
                        return  # not handed to the sink, so not ACKed: the sender will resend
                    self._busy.add(writer)
                    watch.busy = True
                    try:
                        try:
                            ack = await self._answer(message, peer)
                        except SinkUnavailable:
                            # The engine cannot commit now: no ACK at all, and the connection
                            # is closed, so the sender keeps the message and sends it again.
                            log.warning(
                                "mllp.listener.engine_unavailable", channel=self.name, peer=peer
                            )
                            return
                        if ack is not None:
                            writer.write(frame(ack))
                            # Sent whole already, as an ACK nearly always is: nothing to wait
                            # for. Else wait, but not forever for a peer that stops reading.
                            if writer.transport.get_write_buffer_size():
                                async with asyncio.timeout(idle):
                                    await writer.drain()
                    finally:
                        self._busy.discard(writer)
                        watch.busy = False
                if messages:
                    watch.restart()
        finally:
            watch.cancel()

    async def _refuse_oversize(self, writer: asyncio.StreamWriter, head: bytes, peer: str) -> None:
        limit = self.options.max_message_bytes
        log.warning("mllp.listener.oversize", channel=self.name, peer=peer, limit=limit)
        reason = f"message larger than {limit} bytes"
        header: _Header | None = None
        received = head.lstrip(b"\r\n")
        if b"\r" in received or b"\n" in received:  # the first segment arrived whole
            with contextlib.suppress(AckParseError):
                header = _Header.read(received)
        ack = (
            self._refusal(header, reason)
            if header is not None
            else build_ack(_NOT_HL7, "AR", reason, error=reason)
        )
        if ack is not None:
            writer.write(frame(ack))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await writer.drain()

    # --- one message -------------------------------------------------------------------------

    async def _answer(self, data: bytes, peer: str) -> bytes | None:
        """Check one message, hand it to the sink, and return its ACK (None: none is wanted)."""
        self.messages += 1
        try:
            header = _Header.read(data)
        except AckParseError:
            reason = "not an HL7 v2 message: it does not start with an MSH segment"
            return build_ack(_NOT_HL7, "AR", reason, error=reason)
        codec = python_codec(header.charset) if header.charset else self.options.default_charset
        if codec is None:
            return self._refusal(header, f"character set {header.charset!r} is not supported")
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            named = header.charset or f"{codec} (the listener's default)"
            return self._refusal(header, f"message is not valid {named}", codec)
        fields = header.msh.decode(codec).split(header.separator)
        control_id = _field(fields, 9).strip()
        if not control_id:
            return self._refusal(header, "MSH-10 (message control id) is empty", codec)
        message_type = self._message_type(_field(fields, 8), _field(fields, 1)[:1] or "^")
        if not self._accepts(message_type):
            reason = f"message type {message_type or '(empty)'} is not accepted by listener"
            return self._refusal(header, f"{reason} {self.name}", codec)
        inbound = InboundMessage(
            text=_normalize_segments(text),
            channel=self.name,
            sending_application=_field(fields, 2),
            sending_facility=_field(fields, 3),
            control_id=control_id,
            message_type=message_type,
            peer=peer,
        )
        try:
            result = await self.sink.hl7_message(inbound)
        except SinkUnavailable:
            raise
        except Exception as exc:  # the sender gets AE; the connection stays usable
            log.error(
                "mllp.listener.sink_failed",
                channel=self.name,
                control_id=control_id[:_MAX_LOGGED_ID],
                error=type(exc).__name__,
            )
            result = InboundResult(Verdict.ERROR, "internal error")
        return self._ack(header, result, codec)

    def _ack(self, header: _Header, result: InboundResult, codec: str) -> bytes | None:
        accepted = result.verdict is Verdict.ACCEPT
        if not header.wants_ack(accepted):
            return None
        code = header.code(result.verdict)
        if accepted:
            return build_ack(header.msh, code, result.text, charset=codec)
        error = result.text or ("rejected" if result.verdict is Verdict.REJECT else "error")
        return build_ack(
            header.msh,
            code,
            result.text,
            error=error,
            location=result.error_location,
            charset=codec,
        )

    def _refusal(self, header: _Header, reason: str, codec: str | None = None) -> bytes | None:
        """AR (CR in enhanced mode) for a message the sink never sees, in its character set when
        that is known and supported, else in the listener's default."""
        if codec is None:
            codec = python_codec(header.charset) if header.charset else None
        log.info("mllp.listener.refused", channel=self.name, reason=reason[:200])
        result = InboundResult(Verdict.REJECT, reason)
        return self._ack(header, result, codec or self.options.default_charset)

    @staticmethod
    def _message_type(msh9: str, component: str) -> str:
        """``MSG^EVT`` from MSH-9 (the message structure, MSH-9.3, is left out)."""
        parts = [part.strip().upper() for part in msh9.split(component)[:2]]
        return "^".join(part for part in parts if part)

    def _accepts(self, message_type: str) -> bool:
        if message_type in self._accepted:
            return True
        return message_type.partition("^")[0] in self._any_event


def _normalize_segments(text: str) -> str:
    """Segments separated by ``\\r`` as the standard says, whatever the sender used.

    A line feed cannot be data inside an HL7 v2 field (it would be escaped), so turning LF and
    CRLF into CR only repairs senders that write files rather than HL7.
    """
    text = text.lstrip("\r\n")
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text


def _field(fields: list[str], index: int) -> str:
    return fields[index] if index < len(fields) else ""


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) if address else "unknown"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
