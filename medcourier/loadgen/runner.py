"""The load itself: a schedule of messages, workers that send them, and what each exchange gave.

Two ways to pace the load:

- **Closed loop** (no rate): each worker (one per connection) sends a message, waits for its
  answer and sends the next at once. The target sets the pace; latency is from the send to the
  answer.
- **Open loop** (a rate R): message ``i`` is due at ``start + i / R`` whoever sends it, and its
  latency is measured from that due time, not from when a worker got round to sending it. When
  the target slows down and every connection is busy, messages fall behind schedule and the time
  they waited counts in their latency. A closed-loop generator would instead send less and only
  time the messages it managed to send, hiding the stall ("coordinated omission").
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Clock = Callable[[], float]


class SetupError(Exception):
    """The load cannot start (target unreachable, patient not created...): exit 2, no report."""


class Session(Protocol):
    """One worker's link to the target (an MLLP connection, an HTTP client)."""

    async def open(self) -> None:
        """Connect before the clock starts; raise :class:`SetupError` when that fails."""

    async def exchange(self, seq: int, due: float) -> str | None:
        """Send message ``seq`` (due at ``due`` on the run's clock) and wait for its answer.

        :return: None when it succeeded, else the kind of error (``AE``, ``timeout``...).
        """

    async def close(self) -> None: ...


class Schedule:
    """Hands out message numbers and the time each is due, until the count or duration is
    reached or :meth:`stop` is called."""

    def __init__(
        self, count: int | None = None, duration: float | None = None, rate: float | None = None
    ) -> None:
        if count is None and duration is None:
            raise ValueError("give a count or a duration")
        if count is not None and count < 0:
            raise ValueError("the count cannot be negative")
        if duration is not None and duration <= 0:
            raise ValueError("the duration must be positive")
        if rate is not None and rate <= 0:
            raise ValueError("the rate must be positive")
        self.count = count
        self.duration = duration
        self.rate = rate
        self.started = 0.0
        self.stopped = False
        self._next = 0

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def taken(self) -> int:
        return self._next

    def start(self, now: float) -> None:
        self.started = now

    def stop(self) -> None:
        """Hand out no more messages (those in flight finish)."""
        self.stopped = True

    def take(self, now: float) -> tuple[int, float] | None:
        """The next message number and its due time, or None when the run is over."""
        seq = self._next
        if self.stopped or (self.count is not None and seq >= self.count):
            return None
        due = now if self.rate is None else self.started + seq / self.rate
        if self.duration is not None and due >= self.started + self.duration:
            return None
        self._next += 1
        return seq, due


@dataclass
class Recorder:
    """What the exchanges gave: counts, errors by kind, and the latency of each success."""

    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    started: float = 0.0
    last: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + self.errors.total()

    def sending(self) -> None:
        self.sent += 1

    def record(self, error: str | None, latency: float, now: float) -> None:
        if error is None:
            self.ok += 1
            self.latencies.append(latency)
        else:
            self.errors[error] += 1
        self.last = max(self.last, now)

    def elapsed(self, now: float) -> float:
        return max(0.0, now - self.started)


async def drive(
    schedule: Schedule,
    sessions: Sequence[Session],
    recorder: Recorder,
    clock: Clock = time.perf_counter,
) -> float:
    """Open every session, run the schedule on them, close them; return the elapsed seconds
    (from the start to the last answer)."""
    opened: list[Session] = []
    try:
        for session in sessions:
            await session.open()
            opened.append(session)

        async def worker(session: Session) -> None:
            while (slot := schedule.take(clock())) is not None:
                seq, due = slot
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                recorder.sending()
                error = await session.exchange(seq, due)
                now = clock()
                recorder.record(error, now - due, now)

        start = clock()
        schedule.start(start)
        recorder.started = recorder.last = start
        await asyncio.gather(*(worker(s) for s in sessions))
        return recorder.last - start
    finally:
        for session in opened:
            await session.close()
