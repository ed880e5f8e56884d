"""End to end with several worker processes: one `--role api` process and N `--role worker`
processes on one RabbitMQ and one PostgreSQL, HTTP $send-to-ehr → queue → ORU → MLLP EHR →
completed. Prints one table: documents/s and latency per ordering and number of workers.

    .venv/bin/python bench/scale_out.py                        # parallel 1, 2, 4 workers; fifo 1, 2
    .venv/bin/python bench/scale_out.py --count 2000 --workers 1 2 4 --ordering parallel

A parallel route (concurrency 4 per worker) spreads over every worker. A FIFO route is held by
one worker at a time (single-active-consumer): more workers only stand by, which the fifo rows
show. Not a test: nothing is asserted; the figures go in the notes and docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pika
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_send_to_ehr import (
    RABBIT,
    TOKEN,
    RemoteEhr,
    free_port,
    fresh_database,
    load,
    wait_http,
)

from medcourier.engine.broker.amqp import amqp_parameters


def config(data_dir: Path, http_port: int, ehr_port: int, instance: str, ordering: str) -> str:
    route: dict[str, Any] = {
        "name": "bench-ehr",
        "match": {"fallback": True},
        "format": "hl7v2-oru",
        "deliver": {"connector": "mllp", "host": "127.0.0.1", "port": ehr_port},
        "ordering": ordering,
    }
    if ordering == "parallel":
        route["concurrency"] = 4
    return yaml.safe_dump(
        {
            "instance": instance,
            "data_dir": str(data_dir),
            "log_level": "warning",
            "broker": RABBIT,
            "store": fresh_database(instance.replace("-", "_")),
            "http": {"host": "127.0.0.1", "port": http_port},
            "tokens": [
                {"name": "bench", "token": TOKEN, "scopes": ["SEND_TO_EHR", "PATIENT_CREATE"]}
            ],
            "routes": [route],
        }
    )


def start(cfg: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medcourier.engine.cli",
                "run",
                "--config",
                str(cfg),
                "--role",
                role,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def run_case(workers: int, ordering: str, count: int, concurrency: int) -> dict[str, Any]:
    ehr = RemoteEhr()  # in a process of its own, as in the end-to-end bench
    await ehr.start()
    http_port = free_port()
    instance = f"scale-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(config(Path(tmp) / "data", http_port, ehr.port, instance, ordering))
        try:
            # the API first: it creates the schema and declares the queues
            procs.append(start(cfg, "api", Path(tmp) / "api.log"))
            base = f"http://127.0.0.1:{http_port}"
            await wait_http(base, procs[0])
            for n in range(workers):
                procs.append(start(cfg, "worker", Path(tmp) / f"worker{n}.log"))
            await asyncio.sleep(3)  # the workers connect and register their consumers
            for proc in procs:
                if proc.poll() is not None:
                    raise SystemExit(f"a process exited with {proc.returncode}: see its log")
            result = await load(base, 4096, count, concurrency, ehr)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
            await ehr.stop()
            cleanup(instance)
            fresh_database(instance.replace("-", "_"), drop=True)
    return {"ordering": ordering, "workers": workers, "count": count, **result}


def cleanup(instance: str) -> None:
    connection = pika.BlockingConnection(amqp_parameters(RABBIT))
    channel = connection.channel()
    for suffix in ("", ".dead"):
        channel.queue_delete(f"{instance}.route.bench-ehr{suffix}")
    channel.exchange_delete(f"{instance}.routes")
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="4 KB documents per case")
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP clients")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ordering", choices=["parallel", "fifo", "both"], default="both")
    args = parser.parse_args()
    cases = []
    for ordering in ("parallel", "fifo"):
        if args.ordering not in (ordering, "both"):
            continue
        counts = args.workers if ordering == "parallel" else [w for w in args.workers if w <= 2]
        for workers in counts:
            cases.append(asyncio.run(run_case(workers, ordering, args.count, args.concurrency)))
    print(
        f"{'ordering':<9} {'workers':>7} {'docs':>6} {'accepted/s':>10} {'completed/s':>11} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    for c in cases:
        print(
            f"{c['ordering']:<9} {c['workers']:>7} {c['completed']:>6} {c['accept_per_s']:>10} "
            f"{c['docs_per_s']:>11} {c['p50_ms']:>8} {c['p99_ms']:>8} {c['errors']:>6}"
        )


if __name__ == "__main__":
    main()
