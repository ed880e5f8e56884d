#!/usr/bin/env python3
"""End-to-end load: N documents over HTTP $send-to-ehr → queue → ORU → MLLP EHR → completed.

Starts a real `medcourier run` process (embedded default, or RabbitMQ + PostgreSQL) and an EHR
simulator, posts N documents with C concurrent clients, then reads each document's `sent` time
from $tracking. Prints one table: documents/s (first submit to last completed) and p50/p90/p99/max
latency from submit to completed, per backend and payload size, and the CPU each document cost
the engine process and this loader during the load (Linux: the engine's /proc/<pid>/stat).

The EHR simulator runs in a process of its own, so its ACKs do not wait for the load clients'
event loop (``--ehr-in-process`` puts it back in this one, as the first figures were measured).

    .venv/bin/python bench/e2e_send_to_ehr.py                       # embedded, 4 KB and 1 MB
    .venv/bin/python bench/e2e_send_to_ehr.py --backend rabbitmq --count 2000 --size 4096

Not a test: nothing is asserted; the figures go in the notes and docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pika
import yaml

from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.loadgen.http_client import HttpConnection

TOKEN = "bench-token-" + uuid.uuid4().hex
RABBIT = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def pdf(size: int) -> bytes:
    head = b"%PDF-1.4\n%bench\n"
    tail = b"\n%%EOF\n"
    body = os.urandom(max(0, size - len(head) - len(tail)))
    return head + body + tail


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of a process so far, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_database(name: str, drop: bool = False) -> str:
    """Each run gets its own PostgreSQL database, so tables never carry over between runs."""
    import sqlalchemy as sa

    admin = sa.create_engine(
        POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as c:
        if drop:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        else:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return POSTGRES.rsplit("/", 1)[0] + f"/{name}"


def config(
    data_dir: Path, http_port: int, ehr_port: int, backend: str, instance: str, routes: int = 1
) -> str:
    """One engine; ``routes`` routes all taking the bench patient's documents (its organization),
    all delivering to the one EHR simulator."""
    cfg: dict[str, Any] = {
        "instance": instance,
        "data_dir": str(data_dir),
        "log_level": "warning",
        "http": {"host": "127.0.0.1", "port": http_port},
        "tokens": [{"name": "bench", "token": TOKEN, "scopes": ["SEND_TO_EHR", "PATIENT_CREATE"]}],
        "limits": {"max_document_bytes": 64 * 1024 * 1024},
        "routes": [
            {
                "name": route_name(n),
                # the first also takes documents of patients without the organization
                # (bench/memory_peak.py and medcourier bench create such patients)
                "match": {"organizations": [ORGANIZATION], "fallback": n == 0},
                "format": "hl7v2-oru",
                "deliver": {"connector": "mllp", "host": "127.0.0.1", "port": ehr_port},
            }
            for n in range(routes)
        ],
    }
    if backend == "rabbitmq":
        cfg["broker"] = RABBIT
        cfg["store"] = fresh_database(instance.replace("-", "_"))
    return yaml.safe_dump(cfg)


ORGANIZATION = "Organization/bench"


def route_name(n: int) -> str:
    return "bench-ehr" if n == 0 else f"bench-ehr-{n + 1}"


async def wait_http(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit(f"engine exited with {proc.returncode}")
            try:
                if (await c.get(f"{base}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("engine did not start")


def _ehr_main(conn: multiprocessing.connection.Connection, received: Any) -> None:
    """The EHR simulator's own process: ACK everything, count it, stop when told."""

    def count(_seq: int, _control_id: str) -> None:
        with received.get_lock():
            received.value += 1

    async def serve() -> None:
        ehr = EhrSimulator(on_message=count)
        await ehr.start()
        conn.send(ehr.port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        await ehr.stop()

    asyncio.run(serve())


class RemoteEhr:
    """``EhrSimulator`` in a process of its own (see the module docstring)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._received = ctx.Value("l", 0)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_ehr_main, args=(child, self._received), daemon=True)
        self.port = 0

    @property
    def count(self) -> int:
        return int(self._received.value)

    async def start(self) -> None:
        self._proc.start()
        self.port = int(await asyncio.get_running_loop().run_in_executor(None, self._conn.recv))

    async def stop(self) -> None:
        self._conn.send("stop")
        await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 10)


class LocalEhr(EhrSimulator):
    @property
    def count(self) -> int:
        return len(self.received)


async def run_case(
    backend: str,
    size: int,
    count: int,
    concurrency: int,
    ehr_in_process: bool = False,
    rate: float | None = None,
    routes: int = 1,
) -> dict[str, Any]:
    ehr: RemoteEhr | LocalEhr = LocalEhr() if ehr_in_process else RemoteEhr()
    await ehr.start()
    http_port = free_port()
    instance = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "bench.yaml"
        cfg_path.write_text(
            config(Path(tmp) / "data", http_port, ehr.port, backend, instance, routes)
        )
        log = (Path(tmp) / "engine.log").open("wb")
        # BENCH_WRAP="py-spy record -o profile.svg --" profiles the engine process
        wrap = os.environ.get("BENCH_WRAP", "").split()
        proc = subprocess.Popen(
            [
                *wrap,
                sys.executable,
                "-m",
                "medcourier.engine.cli",
                "run",
                "--config",
                str(cfg_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{http_port}"
        try:
            await wait_http(base, proc)
            # wrapped (py-spy), proc is the wrapper: its CPU would not be the engine's
            cpu = (lambda: None) if wrap else (lambda: process_cpu(proc.pid))
            result = await load(base, size, count, concurrency, ehr, rate, routes, cpu)
        finally:
            proc.send_signal(signal.SIGINT if wrap else signal.SIGTERM)
            proc.wait(60)
            log.close()
            await ehr.stop()
            if backend == "rabbitmq":
                cleanup_amqp(instance, routes)
                fresh_database(instance.replace("-", "_"), drop=True)
    return {
        "backend": backend,
        "size": size,
        "count": count,
        "concurrency": concurrency,
        "rate": rate or "-",
        "routes": routes,
        **result,
    }


def cleanup_amqp(instance: str, routes: int = 1) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(RABBIT.replace(":5672//", ":5672/%2F")))
    ch = conn.channel()
    for n in range(routes):
        ch.queue_delete(f"{instance}.route.{route_name(n)}")
    ch.exchange_delete(f"{instance}.routes")
    conn.close()


async def load(
    base: str,
    size: int,
    count: int,
    concurrency: int,
    ehr: RemoteEhr | LocalEhr,
    rate: float | None = None,
    routes: int = 1,
    engine_cpu: Callable[[], float | None] = lambda: None,
) -> dict[str, Any]:
    """Post ``count`` documents from ``concurrency`` clients, back to back, or with ``rate`` the
    i-th no sooner than i/rate seconds after the start (a paced load, to read latency below
    saturation), then read when each was completed."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120, limits=limits) as c:
        patient = (
            await c.post(
                "/fhir/Patient",
                json={
                    "resourceType": "Patient",
                    "name": [{"family": "Bench", "given": ["Load"]}],
                    "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": "BENCH-1"}],
                    "managingOrganization": {"reference": ORGANIZATION},
                },
            )
        ).json()["id"]
        body = json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "subject", "valueReference": {"reference": f"Patient/{patient}"}},
                    {"name": "payload", "valueString": base64.b64encode(pdf(size)).decode()},
                ],
            }
        ).encode()
        submitted: dict[str, float] = {}
        errors = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)

        async def client() -> None:
            # the lean client medcourier bench uses: httpx's own CPU per request was a third of
            # the engine's on the same two cores (medcourier/loadgen/http_client.py)
            nonlocal errors
            conn = HttpConnection(base, headers, timeout=120)
            try:
                while not queue.empty():
                    i = queue.get_nowait()
                    if rate:
                        await asyncio.sleep(max(0.0, start + i / rate - time.time()))
                    t0 = time.time()
                    r = await conn.request(
                        "POST",
                        "/fhir/CommunicationRequest/$send-to-ehr",
                        body,
                        {"Content-Type": "application/fhir+json"},
                    )
                    if r.status != 200:
                        errors += 1
                        continue
                    submitted[json.loads(r.body)["parameter"][1]["valueString"]] = t0
            finally:
                conn.close()

        start = time.time()
        cpu0, own0 = engine_cpu(), time.process_time()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        accepted_in = time.time() - start
        own1 = time.process_time()  # the loader's work is done; what follows is waiting
        while ehr.count < len(submitted) * routes:
            await asyncio.sleep(0.01)
            if time.time() - start > 600:
                break
        cpu1 = engine_cpu()  # the engine's, before the $tracking reads below
        # read the completion times the engine recorded
        latencies: list[float] = []
        last_done = start
        for txid, t0 in submitted.items():
            for _ in range(200):
                bundle = (
                    await c.get(
                        "/fhir/CommunicationRequest/$tracking", params={"transaction-id": txid}
                    )
                ).json()
                comms = [entry["resource"] for entry in bundle["entry"]]
                statuses = {comm["status"] for comm in comms}
                if statuses == {"completed"}:  # every route's delivery
                    done = max(datetime.fromisoformat(comm["sent"]).timestamp() for comm in comms)
                    latencies.append(done - t0)
                    last_done = max(last_done, done)
                    break
                if "entered-in-error" in statuses:
                    errors += 1
                    break
                await asyncio.sleep(0.05)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "completed": len(latencies),
        "errors": errors,
        "accept_per_s": round(len(submitted) / accepted_in, 1),
        "docs_per_s": round(len(latencies) / (last_done - start), 1),
        "p50_ms": round(pct(0.50), 1),
        "p90_ms": round(pct(0.90), 1),
        "p99_ms": round(pct(0.99), 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1),
        # CPU per delivered document: the engine process (Linux /proc), this loader process
        "engine_cpu_ms": (
            round((cpu1 - cpu0) * 1000 / len(latencies), 2)
            if cpu0 is not None and cpu1 is not None and latencies
            else "-"
        ),
        "loader_cpu_ms": round((own1 - own0) * 1000 / max(1, len(latencies)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["embedded", "rabbitmq", "both"], default="both")
    parser.add_argument("--count", type=int, default=500, help="documents per 4 KB case")
    parser.add_argument("--count-large", type=int, default=50, help="documents per 1 MB case")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--routes", type=int, default=1, help="routes each document goes to (same EHR)"
    )
    parser.add_argument(
        "--rate", type=float, help="documents per second offered (default: as fast as accepted)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--ehr-in-process",
        action="store_true",
        help="run the EHR simulator on this process's event loop, beside the load clients",
    )
    args = parser.parse_args()
    backends = ["embedded", "rabbitmq"] if args.backend == "both" else [args.backend]
    rows = []
    for backend in backends:
        for size, count in ((4096, args.count), (1024 * 1024, args.count_large)):
            if count <= 0:
                continue
            rows.append(
                asyncio.run(
                    run_case(
                        backend,
                        size,
                        count,
                        args.concurrency,
                        args.ehr_in_process,
                        args.rate,
                        args.routes,
                    )
                )
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = [
        "backend",
        "size",
        "count",
        "concurrency",
        "rate",
        "routes",
        "completed",
        "errors",
        "accept_per_s",
        "docs_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "engine_cpu_ms",
        "loader_cpu_ms",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
