"""A one-line progress bar, redrawn in place a few times a second.

It is only drawn on a terminal (a log file or a pipe would fill with carriage returns) and never
on stdout, which holds the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from medcourier.loadgen.runner import Recorder

BAR_WIDTH = 24
INTERVAL = 0.2


@dataclass(frozen=True)
class Snapshot:
    """What the bar shows: the fraction done (None when unknown) and the counters."""

    fraction: float | None
    sent: int
    ok: int
    errors: int
    elapsed: float
    label: str = ""


def render(s: Snapshot, width: int = 100) -> str:
    """The progress line for a snapshot, cut to ``width`` characters."""
    if s.fraction is None:
        bar = ""
    else:
        fraction = min(1.0, max(0.0, s.fraction))
        filled = round(fraction * BAR_WIDTH)
        bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction * 100:3.0f}% "
    rate = (s.ok + s.errors) / s.elapsed if s.elapsed > 0 else 0.0
    label = f"{s.label} " if s.label else ""
    text = (
        f"{label}{bar}sent {s.sent}  ok {s.ok}  errors {s.errors}  {rate:,.1f}/s  {s.elapsed:.1f}s"
    )
    return text[: max(0, width - 1)]


class Progress:
    """Redraws ``snapshot()`` on ``stream`` every ``interval`` seconds between start and stop.

    Does nothing at all unless ``enabled`` and ``stream`` is a terminal (``force`` skips the
    terminal check, for tests).
    """

    def __init__(
        self,
        stream: TextIO,
        enabled: bool = True,
        *,
        force: bool = False,
        interval: float = INTERVAL,
    ) -> None:
        self.stream = stream
        self.interval = interval
        self.enabled = enabled and (force or _is_tty(stream))
        self._task: asyncio.Task[None] | None = None
        self._snapshot: Callable[[], Snapshot] | None = None
        self.drawn = 0

    def start(self, snapshot: Callable[[], Snapshot]) -> None:
        if not self.enabled:
            return
        self._snapshot = snapshot
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop redrawing; the last state stays on screen, followed by a new line."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._draw()
        self.stream.write("\n")
        self.stream.flush()

    async def _loop(self) -> None:
        while True:
            self._draw()
            await asyncio.sleep(self.interval)

    def _draw(self) -> None:
        if self._snapshot is None:
            return
        width = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + render(self._snapshot(), width) + "\x1b[K")
        self.stream.flush()
        self.drawn += 1


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def snapshot_of(
    recorder: Recorder,
    *,
    total: int | None,
    duration: float | None,
    label: str = "",
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[[], Snapshot]:
    """A snapshot function over a recorder; the fraction is answers over ``total`` when there is
    a total, else the time elapsed over ``duration``."""

    def take() -> Snapshot:
        elapsed = recorder.elapsed(clock()) if recorder.started else 0.0
        errors = recorder.errors.total()
        if total:
            fraction: float | None = (recorder.ok + errors) / total
        elif duration:
            fraction = elapsed / duration
        else:
            fraction = None
        return Snapshot(fraction, recorder.sent, recorder.ok, errors, elapsed, label)

    return take
