#!/usr/bin/env python3
"""Resident memory of an idle engine after start-up: embedded, and RabbitMQ + PostgreSQL when
both answer on 127.0.0.1.

Starts a real ``medcourier run`` process with the end-to-end bench's config (the FHIR API, one
MLLP route to an EHR simulator) plus one inbound MLLP listener, waits until /health answers, lets
it settle, then reads /proc/<pid>/status and /proc/<pid>/smaps_rollup a few times. Nothing is
sent to it: this is the floor every deployment pays.

Prints one table: start-up time, RSS (median of the samples), VmHWM (the peak, start-up
included), PSS, private memory and threads.

    .venv/bin/python bench/idle_memory.py
    .venv/bin/python bench/idle_memory.py --settle 10 --samples 10

Not a test: nothing is asserted; the figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

# Both helpers' modules are scripts next to this one (on sys.path when run as bench/x.py).
from memory_peak import MIB, engine_process, proc_status, reachable, smaps_rollup

from medcourier.channels.mllp.simulator import EhrSimulator


async def measure(backend: str, settle: float, samples: int) -> dict[str, Any]:
    ehr = EhrSimulator()
    await ehr.start()
    try:
        async with engine_process(backend, ehr.port, mllp_listener=True) as engine:
            pid = engine.process.pid
            await asyncio.sleep(settle)
            rss: list[int] = []
            for _ in range(samples):
                rss.append(proc_status(pid)["VmRSS"])
                await asyncio.sleep(0.5)
            status = proc_status(pid)
            rollup = smaps_rollup(pid)
            return {
                "backend": backend,
                "startup_s": engine.started_in,
                "rss_mib": statistics.median(rss) / MIB,
                "hwm_mib": status["VmHWM"] / MIB,
                "pss_mib": rollup.get("Pss", 0) / MIB,
                "private_mib": rollup["Private"] / MIB,
                "threads": status["Threads"],
            }
    finally:
        await ehr.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before sampling")
    parser.add_argument("--samples", type=int, default=5, help="RSS samples, 0.5 s apart")
    args = parser.parse_args()
    backends = ["embedded"]
    skipped = ""
    if reachable(5672) and reachable(5432):
        backends.append("rabbitmq")
    else:
        skipped = "RabbitMQ + PostgreSQL: not measured (nothing on 127.0.0.1:5672 and :5432)"
    rows = [asyncio.run(measure(b, args.settle, max(1, args.samples))) for b in backends]
    labels = {"embedded": "embedded (SQLite + kombu SQLite)", "rabbitmq": "RabbitMQ + PostgreSQL"}
    print(
        "| backend | start-up s | RSS MiB | peak RSS (VmHWM) MiB | PSS MiB | private MiB "
        "| threads |"
    )
    print("|---" * 7 + "|")
    for r in rows:
        print(
            f"| {labels[r['backend']]} | {r['startup_s']:.2f} | {r['rss_mib']:.1f} "
            f"| {r['hwm_mib']:.1f} | {r['pss_mib']:.1f} | {r['private_mib']:.1f} "
            f"| {r['threads']} |"
        )
    if skipped:
        print(skipped)


if __name__ == "__main__":
    main()
