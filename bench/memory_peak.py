#!/usr/bin/env python3
"""Peak memory of a running engine while one 50 MiB PDF goes all the way through it.

Starts a real ``medcourier run`` process (embedded default, or RabbitMQ + PostgreSQL) with one
route to the EHR simulator, lets it settle, then sends one document with ``medcourier bench
http`` (its functions, in this process): POST $send-to-ehr → queue → ORU^R01 → MLLP → AA →
``completed`` on $tracking. VmHWM in /proc/<pid>/status is the kernel's own high-water mark of
the engine's resident set, so the peak is exact without sampling.

Then the same again in a fresh engine, split in its two phases so each has a peak of its own:
the route is paused (POST /admin/routes/<route>/pause) while the document is accepted, VmHWM
read, reset (writing 5 to /proc/<pid>/clear_refs), and the route resumed: the second VmHWM is
the delivery's alone (claim and payload read, render, MLLP send). The phases would otherwise
only be told apart by time, and the worker takes the document the moment it is committed.

Prints one table: resident memory when idle, the whole run's peak and its ratio to the
document (of the absolute peak, and of the peak above idle), then the accepting and delivering
phases' peaks.

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

import httpx
import yaml

# Helpers of the end-to-end bench next to this file (the directory of a script run as
# `python bench/x.py` is on sys.path): its engine config, token and start-up wait.
from e2e_send_to_ehr import TOKEN, cleanup_amqp, config, free_port, fresh_database, wait_http

from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.loadgen.http_load import (
    SEND_PATH,
    TRACKING_PATH,
    HttpTarget,
    create_patient,
    run_http,
    send_body,
)
from medcourier.loadgen.runner import Schedule

MIB = 1024 * 1024
DOCUMENT = 50 * MIB
ROUTE = "bench-ehr"
"""The one route of the end-to-end bench's config."""


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
        cfg["tokens"][0]["scopes"].append("ADMIN")  # pause and resume the route
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


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current resident set (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def whole_run(backend: str, size: int, settle: float, ehr: EhrSimulator) -> dict[str, Any]:
    """One document end to end in a fresh engine: idle RSS, the run's peak, RSS after."""
    async with engine_process(backend, ehr.port) as engine:
        pid = engine.process.pid
        await asyncio.sleep(settle)
        idle = proc_status(pid)
        report = await run_http(
            HttpTarget(engine.base, token=TOKEN, timeout=300),
            Schedule(count=1),
            payload_size=size,
            wait=True,
            wait_timeout=600,
        )
        after = proc_status(pid)
    data = report.to_json()
    if data["ok"] != 1 or data["end_to_end"]["ok"] != 1:
        raise SystemExit(f"the document did not complete: {data}")
    return {
        "idle": idle["VmRSS"],
        "peak": after["VmHWM"],
        "after": after["VmRSS"],
        "completed_s": data["end_to_end"]["latency_ms"]["max"] / 1000,
    }


async def final_status(client: httpx.AsyncClient, txid: str, timeout: float) -> str:
    """Poll $tracking until the delivery is completed or entered-in-error (or time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        bundle = (await client.get(TRACKING_PATH, params={"transaction-id": txid})).json()
        status = str(bundle["entry"][0]["resource"]["status"])
        if status in ("completed", "entered-in-error") or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def phased_run(backend: str, size: int, settle: float, ehr: EhrSimulator) -> dict[str, int]:
    """One document in a fresh engine, accepted while its route is paused, then delivered:
    the peak of each phase, and the resident set the delivery started from."""
    async with engine_process(backend, ehr.port) as engine:
        pid = engine.process.pid
        target = HttpTarget(engine.base, token=TOKEN, timeout=300)
        async with httpx.AsyncClient(
            base_url=engine.base, headers=target.headers(), timeout=300
        ) as client:
            patient = await create_patient(client, target, "MEM")
            body = send_body(patient, size)
            (await client.post(f"/admin/routes/{ROUTE}/pause")).raise_for_status()
            await asyncio.sleep(settle)
            reset_peak(pid)
            answer = await client.post(
                SEND_PATH, content=body, headers={"Content-Type": "application/fhir+json"}
            )
            answer.raise_for_status()
            del body
            txid = answer.json()["parameter"][1]["valueString"]
            accepting = proc_status(pid)["VmHWM"]
            await asyncio.sleep(settle)
            reset_peak(pid)
            start = proc_status(pid)["VmRSS"]
            (await client.post(f"/admin/routes/{ROUTE}/resume")).raise_for_status()
            status = await final_status(client, txid, timeout=600)
        delivering = proc_status(pid)["VmHWM"]
    if status != "completed":
        raise SystemExit(f"the phased document ended {status}")
    return {"accepting": accepting, "delivery_start": start, "delivering": delivering}


async def measure(backend: str, size: int, settle: float) -> dict[str, Any]:
    # the simulator must take the ORU: a 50 MiB PDF is ~67 MiB of base64
    ehr = EhrSimulator(max_size=size * 2 + MIB)
    await ehr.start()
    try:
        whole = await whole_run(backend, size, settle, ehr)
        phases = await phased_run(backend, size, settle, ehr)
    finally:
        await ehr.stop()
    delivery = phases["delivering"] - phases["delivery_start"]
    return {
        "backend": backend,
        "document_mib": size / MIB,
        "idle_mib": whole["idle"] / MIB,
        "peak_mib": whole["peak"] / MIB,
        "above_idle_mib": (whole["peak"] - whole["idle"]) / MIB,
        "peak_x_doc": whole["peak"] / size,
        "above_idle_x_doc": (whole["peak"] - whole["idle"]) / size,
        "after_mib": whole["after"] / MIB,
        "accepting_mib": phases["accepting"] / MIB,
        "delivery_start_mib": phases["delivery_start"] / MIB,
        "delivering_mib": phases["delivering"] / MIB,
        "delivery_x_doc": delivery / size,
        "completed_s": whole["completed_s"],
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
        "| peak × document | above idle × document | RSS after MiB | completed in s "
        "| accepting: peak MiB | delivering: RSS at start MiB | delivering: peak MiB "
        "| delivering: above its start × document |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['document_mib']:.1f} | {r['idle_mib']:.1f} "
            f"| {r['peak_mib']:.1f} | {r['above_idle_mib']:.1f} | {r['peak_x_doc']:.2f} "
            f"| {r['above_idle_x_doc']:.2f} | {r['after_mib']:.1f} | {r['completed_s']:.2f} "
            f"| {r['accepting_mib']:.1f} | {r['delivery_start_mib']:.1f} "
            f"| {r['delivering_mib']:.1f} | {r['delivery_x_doc']:.2f} |"
        )


if __name__ == "__main__":
    main()
