"""MLLP load: each connection sends a framed message and waits for its ACK before the next.

An exchange succeeds when the ACK's MSA-1 is AA (or CA) and its MSA-2 names the message sent.
Anything else is an error of one kind:

- ``AE``, ``AR``, ``CE``, ``CR``: the receiver answered but refused the message;
- ``bad-ack``: the answer is not an HL7 acknowledgement, or acknowledges another message;
- ``timeout``: no ACK within the timeout;
- ``closed``: the receiver closed or reset the connection before answering;
- ``connect``: a new connection could not be opened.

After a timeout or a broken connection the connection is dropped (a late ACK would otherwise be
taken for the next message's) and the next message on it opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from medcourier.channels.mllp.ack import AckParseError, parse_ack
from medcourier.channels.mllp.framing import (
    END_SEQUENCE,
    START_BLOCK,
    FramingError,
    PeerClosed,
    read_frame,
    stream_limit,
)
from medcourier.loadgen.messages import MessageSource
from medcourier.loadgen.progress import Progress, snapshot_of
from medcourier.loadgen.report import Phase, Report
from medcourier.loadgen.runner import Recorder, Schedule, SetupError, drive

ACK_MAX_SIZE = 1024 * 1024
"""Largest ACK read: an acknowledgement is a few hundred bytes."""
RECONNECT_PAUSE = 0.05
"""Pause after a failed connection attempt, so a receiver that is down is not hammered."""


@dataclass(frozen=True)
class MllpTarget:
    host: str
    port: int
    timeout: float = 10.0

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class MllpSession:
    """One MLLP connection of the load, reopened when it breaks."""

    def __init__(self, target: MllpTarget, source: MessageSource) -> None:
        self.target = target
        self.source = source
        self.connects = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        async with asyncio.timeout(self.target.timeout):
            self._reader, self._writer = await asyncio.open_connection(
                self.target.host, self.target.port, limit=stream_limit(ACK_MAX_SIZE)
            )
        self.connects += 1

    async def open(self) -> None:
        try:
            await self._connect()
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise SetupError(f"cannot connect to {self.target}: {reason}") from exc

    async def exchange(self, seq: int, due: float) -> str | None:
        if self._writer is None:
            try:
                await self._connect()
            except (OSError, TimeoutError):
                await asyncio.sleep(RECONNECT_PAUSE)
                return "connect"
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        control_id, parts = self.source.parts(seq)
        try:
            async with asyncio.timeout(self.target.timeout):
                writer.writelines([START_BLOCK, *parts, END_SEQUENCE])
                await writer.drain()
                answer = await read_frame(reader, ACK_MAX_SIZE)
        except TimeoutError:
            await self._drop()
            return "timeout"
        except (PeerClosed, ConnectionError):
            await self._drop()
            return "closed"
        except (FramingError, OSError):
            await self._drop()
            return "bad-ack"
        try:
            ack = parse_ack(answer)
        except AckParseError:
            return "bad-ack"
        if ack.control_id != control_id:
            await self._drop()  # out of step with the receiver: start afresh
            return "bad-ack"
        return None if ack.positive else ack.code

    async def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    async def close(self) -> None:
        await self._drop()


async def run_mllp(
    target: MllpTarget,
    source: MessageSource,
    schedule: Schedule,
    connections: int = 1,
    progress: Progress | None = None,
) -> Report:
    """Run the schedule on ``connections`` MLLP connections and report.

    :raises SetupError: a connection could not be opened at the start.
    """
    if connections < 1:
        raise ValueError("at least one connection is needed")
    recorder = Recorder()
    sessions = [MllpSession(target, source) for _ in range(connections)]
    if progress is not None:
        progress.start(
            snapshot_of(recorder, total=schedule.count, duration=schedule.duration, label="ACK")
        )
    try:
        seconds = await drive(schedule, sessions, recorder)
    finally:
        if progress is not None:
            await progress.stop()
    return Report(
        mode="mllp",
        target=str(target),
        message=source.label,
        message_bytes=source.size(),
        payload_bytes=source.payload_size if source.kind == "oru" else None,
        connections=connections,
        rate=schedule.rate,
        count=schedule.count,
        duration=schedule.duration,
        phases=[Phase.of("ACK", recorder, seconds)],
        interrupted=schedule.stopped,
    )
