#!/usr/bin/env python3
"""Peak memory of a running engine while one 50 MiB PDF goes all the way through it.

Starts a real ``medcourier run`` process (embedded default, or RabbitMQ + PostgreSQL) with one
route to the EHR simulator, lets it settle, then sends one document with ``medcourier bench
http`` (its functions, in this process): POST $send-to-ehr → queue → ORU^R01 → MLLP → AA →
``completed`` on $tracking. Meanwhile /proc/<pid>/status of the engine is sampled. VmHWM is the
kernel's own high-water mark of the resident set, so the peak is exact even between samples.

Prints one table: resident memory when idle, the peak, and the peak over the document's size.

    .venv/bin/python bench/memory_peak.py
    .venv/bin/python bench/memory_peak.py --backend both --size 10485760

Not a test: nothing is asserted; the figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Helpers of the end-to-end bench next to this file (the directory of a script run as
# `python bench/x.py` is on sys.path): its engine config, token and start-up wait.
from e2e_send_to_ehr import TOKEN, cleanup_amqp, config, free_port, fresh_database, wait_http

from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.loadgen.http_load import HttpTarget, run_http
from medcourier.loadgen.runner import Schedule

MIB = 1024 * 1024
DOCUMENT = 50 * MIB
SAMPLE_EVERY = 0.005
"""Seconds between two reads of VmRSS (VmHWM needs none: the kernel keeps it)."""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB → bytes) and Threads of a process, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
        elif key == "Threads":
            values[key] = int(rest)
    return values


def smaps_rollup(pid: int) -> dict[str, int]:
    """Pss and the private (unshared) resident bytes, from /proc/<pid>/smaps_rollup."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        with contextlib.suppress(ValueError, IndexError):
            values[key] = int(rest.split()[0]) * 1024
    values["Private"] = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return values


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class EngineProcess:
    process: subprocess.Popen[bytes]
    base: str
    started_in: float
    """Seconds from the process start to /health answering."""


@contextlib.asynccontextmanager
async def engine_process(
    backend: str, ehr_port: int, *, mllp_listener: bool = False
) -> AsyncIterator[EngineProcess]:
    """``medcourier run`` in a subprocess with the end-to-end bench's config (one route to
    ``ehr_port``), plus an MLLP listener when asked; stopped and cleaned up on exit."""
    http_port = free_port()
    instance = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="medcourier-mem-") as tmp:
        cfg: dict[str, Any] = yaml.safe_load(
            config(Path(tmp) / "data", http_port, ehr_port, backend, instance)
        )
        if mllp_listener:
            cfg["inbound"] = [{"name": "hl7-in", "channel": "mllp", "host": "127.0.0.1", "port": 0}]
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = (Path(tmp) / "engine.log").open("wb")
        begin = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "medcourier.engine.cli", "run", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{http_port}"
        try:
            await wait_http(base, process)
            yield EngineProcess(process, base, time.perf_counter() - begin)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
            if backend == "rabbitmq":
                cleanup_amqp(instance)
                fresh_database(instance.replace("-", "_"), drop=True)


async def measure(backend: str, size: int, settle: float) -> dict[str, Any]:
    # the simulator must take the ORU: a 50 MiB PDF is ~67 MiB of base64
    ehr = EhrSimulator(max_size=size * 2 + MIB)
    await ehr.start()
    try:
        async with engine_process(backend, ehr.port) as engine:
            pid = engine.process.pid
            await asyncio.sleep(settle)
            idle = proc_status(pid)
            samples: list[tuple[float, int]] = []
            running = True

            async def sample() -> None:
                while running:
                    samples.append((time.perf_counter(), proc_status(pid)["VmRSS"]))
                    await asyncio.sleep(SAMPLE_EVERY)

            sampler = asyncio.create_task(sample())
            began = time.perf_counter()
            try:
                report = await run_http(
                    HttpTarget(engine.base, token=TOKEN, timeout=300),
                    Schedule(count=1),
                    payload_size=size,
                    wait=True,
                    wait_timeout=600,
                )
            finally:
                running = False
                await sampler
            after = proc_status(pid)
    finally:
        await ehr.stop()
    data = report.to_json()
    e2e = data["end_to_end"]
    if data["ok"] != 1 or e2e["ok"] != 1:
        raise SystemExit(f"the document did not complete: {data}")
    peak = after["VmHWM"]
    # The answer to the POST came accept_s after the send (the patient creation before it takes
    # milliseconds): samples up to then are the HTTP side, later ones the delivery.
    accepted_at = began + data["latency_ms"]["max"] / 1000
    accepting = max((rss for t, rss in samples if t <= accepted_at), default=0)
    delivering = max((rss for t, rss in samples if t > accepted_at), default=0)
    return {
        "backend": backend,
        "document_mib": size / MIB,
        "idle_mib": idle["VmRSS"] / MIB,
        "peak_mib": peak / MIB,
        "above_idle_mib": (peak - idle["VmRSS"]) / MIB,
        "peak_x_doc": peak / size,
        "above_idle_x_doc": (peak - idle["VmRSS"]) / size,
        "after_mib": after["VmRSS"] / MIB,
        "accepting_mib": accepting / MIB,
        "delivering_mib": delivering / MIB,
        "accept_s": data["latency_ms"]["max"] / 1000,
        "completed_s": e2e["latency_ms"]["max"] / 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["embedded", "rabbitmq", "both"], default="embedded")
    parser.add_argument("--size", type=int, default=DOCUMENT, help="PDF bytes (50 MiB)")
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before sending")
    args = parser.parse_args()
    backends = ["embedded", "rabbitmq"] if args.backend == "both" else [args.backend]
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("this bench reads /proc/<pid>/status (Linux)")
    rows = [asyncio.run(measure(backend, args.size, args.settle)) for backend in backends]
    print(
        "| backend | document MiB | idle RSS MiB | peak RSS MiB (VmHWM) | peak above idle MiB "
        "| peak × document | above idle × document | sampled peak until accepted MiB "
        "| sampled peak while delivering MiB | RSS after MiB | accepted in s | completed in s |"
    )
    print("|---" * 12 + "|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['document_mib']:.1f} | {r['idle_mib']:.1f} "
            f"| {r['peak_mib']:.1f} | {r['above_idle_mib']:.1f} | {r['peak_x_doc']:.2f} "
            f"| {r['above_idle_x_doc']:.2f} | {r['accepting_mib']:.1f} "
            f"| {r['delivering_mib']:.1f} | {r['after_mib']:.1f} | {r['accept_s']:.2f} "
            f"| {r['completed_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
