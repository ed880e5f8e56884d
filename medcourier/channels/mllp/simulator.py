"""A stand-in EHR that listens for MLLP, keeps what it receives and ACKs it.

Tests and demos need a destination that behaves like a hospital interface without one: it takes
many connections and many messages per connection, writes each message to a file so a demo can
show what arrived, and answers with the ACK code the test wants (AA, or AE/AR to exercise
rejections), which can be changed while it runs.

Nothing here logs message content: the command line prints control ids (MSH-10) only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from medcourier.channels.mllp.ack import ACK_CODES, AckParseError, build_ack, message_control_id
from medcourier.channels.mllp.framing import (
    DEFAULT_MAX_SIZE,
    FramingError,
    PeerClosed,
    frame,
    read_frame,
    stream_limit,
)
from medcourier.engine.signals import until_signalled

_UNKNOWN_ID = "unknown"
_NOT_HL7 = b"MSH|^~\\&|||||||ACK||P|2.5"  # header to NAK bytes that are not HL7 at all
_CLOSE_TIMEOUT = 2.0

MessageCallback = Callable[[int, str], None]
"""Called with the message's sequence number (from 1) and its file-safe control id."""


class EhrSimulator:
    """An MLLP listener that records messages and answers with a configurable ACK.

    ``ack_code`` and ``ack_text`` may be changed at any time; the next message gets the new
    answer. ``received`` holds every message in arrival order, ``connections`` counts accepted
    connections (so tests can check that a sender reuses its connection).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        out_dir: Path | None = None,
        ack_code: str = "AA",
        ack_text: str = "",
        max_size: int = DEFAULT_MAX_SIZE,
        on_message: MessageCallback | None = None,
    ) -> None:
        self.host = host
        self.out_dir = out_dir
        self.ack_code = ack_code
        self.ack_text = ack_text
        self.max_size = max_size
        self.on_message = on_message
        self.received: list[bytes] = []
        self.connections = 0
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[object]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def ack_code(self) -> str:
        return self._ack_code

    @ack_code.setter
    def ack_code(self, code: str) -> None:
        # Checked here so a typo fails in the test that sets it, not in a connection handler.
        if code not in ACK_CODES:
            raise ValueError(f"not an HL7 acknowledgement code: {code!r}")
        self._ack_code = code

    @property
    def port(self) -> int:
        """The listening port: the real one once started (useful with port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        """Start listening (returns once the socket is bound)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, limit=stream_limit(self.max_size)
        )

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Close the connections rather than cancel their handlers: a cancelled handler task makes
        # asyncio's stream callback log a spurious CancelledError traceback (Python 3.11).
        for writer in list(self._writers):
            writer.close()
        handlers = list(self._handlers)
        if handlers:
            _done, pending = await asyncio.wait(handlers, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> EhrSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: read frames and answer each until the peer leaves or breaks framing."""
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                message = await read_frame(reader, self.max_size)
                writer.write(frame(self._accept(message)))
                await writer.drain()
        except (PeerClosed, FramingError, OSError):
            pass  # a real EHR would log it; for a simulator the connection is simply over
        finally:
            if task is not None:
                self._handlers.discard(task)
            self._writers.discard(writer)
            await _close(writer)

    def _accept(self, message: bytes) -> bytes:
        """Record one message and return its ACK."""
        self.received.append(message)
        number = len(self.received)
        control_id = _safe_id(message)
        if self.out_dir is not None:
            # Synchronous on purpose: small files, a test tool, and it keeps arrival order.
            (self.out_dir / f"{number:06d}-{control_id}.hl7").write_bytes(message)
        if self.on_message is not None:
            self.on_message(number, control_id)
        return self._ack(message)

    def _ack(self, message: bytes) -> bytes:
        code, text = self.ack_code, self.ack_text
        error = (text or f"simulated {code}") if code in ("AE", "AR", "CE", "CR") else None
        try:
            return build_ack(message, code, text, error=error)
        except AckParseError:
            return build_ack(_NOT_HL7, "AR", "not an HL7 v2 message", error="no MSH segment")


def _safe_id(message: bytes) -> str:
    """The message's control id reduced to characters safe in a file name and a terminal."""
    try:
        control_id = message_control_id(message)
    except AckParseError:
        return _UNKNOWN_ID
    return re.sub(r"[^A-Za-z0-9_.-]", "_", control_id)[:64].lstrip(".") or _UNKNOWN_ID


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()


# --- the ``medcourier simulate-ehr`` command ------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medcourier simulate-ehr``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=6661, help="port to listen on (0: any)")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="write each message to DIR"
    )
    parser.add_argument("--ack", choices=["AA", "AE", "AR"], default="AA", help="ACK code")
    parser.add_argument("--ack-text", default="", help="MSA-3 text (and ERR text for AE/AR)")


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, printing one line (the control id) per message."""
    simulator = EhrSimulator(
        host=args.host,
        port=args.port,
        out_dir=args.out,
        ack_code=args.ack,
        ack_text=args.ack_text,
        on_message=_print_received,
    )
    try:
        await simulator.start()
    except OSError as exc:
        print(f"simulate-ehr: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"simulate-ehr: listening on {args.host}:{simulator.port}, answering {args.ack}")
    sys.stdout.flush()
    try:
        await until_signalled()
    finally:
        await simulator.stop()
    print(f"simulate-ehr: stopped after {len(simulator.received)} messages", flush=True)
    return 0


def _print_received(number: int, control_id: str) -> None:
    print(f"received {number:06d} {control_id}", flush=True)
