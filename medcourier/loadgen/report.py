"""The figures of a run: percentiles, a table for people and JSON for scripts.

Percentiles are nearest-rank over the latencies of the messages that succeeded: p99 is a latency
that 99% of the successful messages did not exceed. ``messages_per_s`` counts successful
messages only (``ok / seconds``); errors are reported apart, by kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medcourier import __version__
from medcourier.loadgen.runner import Recorder

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


@dataclass
class Phase:
    """One measured phase: the answers (ACK, HTTP accept) or the end-to-end deliveries."""

    name: str
    messages: int
    ok: int
    errors_by_kind: dict[str, int]
    seconds: float
    latencies: list[float] = field(repr=False)
    """Seconds, sorted."""

    @classmethod
    def of(cls, name: str, recorder: Recorder, seconds: float) -> Phase:
        return cls(
            name=name,
            messages=recorder.done,
            ok=recorder.ok,
            errors_by_kind=dict(sorted(recorder.errors.items())),
            seconds=seconds,
            latencies=sorted(recorder.latencies),
        )

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())

    @property
    def messages_per_s(self) -> float | None:
        return self.ok / self.seconds if self.seconds > 0 else None

    def latency_ms(self) -> dict[str, float | None]:
        values = {name: _ms(percentile(self.latencies, p)) for name, p in PERCENTILES}
        values["max"] = _ms(self.latencies[-1] if self.latencies else None)
        values["mean"] = _ms(sum(self.latencies) / len(self.latencies) if self.latencies else None)
        return values

    def to_json(self) -> dict[str, Any]:
        rate = self.messages_per_s
        return {
            "phase": self.name,
            "messages": self.messages,
            "ok": self.ok,
            "errors": self.errors,
            "errors_by_kind": self.errors_by_kind,
            "seconds": round(self.seconds, 4),
            "messages_per_s": None if rate is None else round(rate, 2),
            "latency_ms": self.latency_ms(),
        }


@dataclass
class Report:
    """A whole run: what was sent where and how, and its phases (the first is the main one)."""

    mode: str
    target: str
    message: str
    message_bytes: int
    payload_bytes: int | None
    connections: int
    rate: float | None
    count: int | None
    duration: float | None
    phases: list[Phase]
    interrupted: bool = False

    @property
    def errors(self) -> int:
        return sum(phase.errors for phase in self.phases)

    def to_json(self) -> dict[str, Any]:
        main, *others = self.phases
        data: dict[str, Any] = {
            "tool": "medcourier bench",
            "version": __version__,
            "mode": self.mode,
            "target": self.target,
            "message": self.message,
            "message_bytes": self.message_bytes,
            "payload_bytes": self.payload_bytes,
            "connections": self.connections,
            "loop": "open" if self.rate is not None else "closed",
            "rate": self.rate,
            "count": self.count,
            "duration": self.duration,
            "interrupted": self.interrupted,
            **main.to_json(),
        }
        for phase in others:
            data[phase.name] = phase.to_json()
        return data

    def _what(self) -> str:
        if self.payload_bytes is None:
            return f"{self.message} {_size(self.message_bytes)}"
        return f"{self.message} (PDF {_size(self.payload_bytes)})"

    def table(self) -> str:
        """A Markdown table, one row per phase, then the errors by kind if there were any."""
        columns = [
            "phase",
            "target",
            "message",
            "conns",
            "rate",
            "messages",
            "ok",
            "errors",
            "seconds",
            "msg/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
        ]
        rows = []
        for phase in self.phases:
            latency = phase.latency_ms()
            rows.append(
                [
                    phase.name,
                    self.target,
                    self._what(),
                    str(self.connections),
                    "-" if self.rate is None else f"{self.rate:g}/s",
                    str(phase.messages),
                    str(phase.ok),
                    str(phase.errors),
                    f"{phase.seconds:.2f}",
                    _number(phase.messages_per_s, 1),
                    *(_number(latency[k], 2) for k in ("p50", "p90", "p99", "max")),
                ]
            )
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in rows]
        for phase in self.phases:
            if phase.errors_by_kind:
                kinds = ", ".join(f"{k} {n}" for k, n in phase.errors_by_kind.items())
                out.append(f"{phase.name} errors: {kinds}")
        if self.interrupted:
            out.append("interrupted: the figures cover the messages sent before the interrupt")
        return "\n".join(out)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / 1024 / 1024:.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size} B"
