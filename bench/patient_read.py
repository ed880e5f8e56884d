"""The patient read every $send-to-ehr makes: through SQLAlchemy, and through the reading
thread's own driver connection (engine/driver_reads.py, what ``Store.get_patient`` uses), on
the embedded store (SQLite) and on PostgreSQL.

    .venv/bin/python bench/patient_read.py [--reads 3000] [--rounds 5]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres | --no-postgres]

Each path runs on one thread that stays alive between reads, as the store's reader pool's
threads do, against a store holding ``--patients`` patients (PostgreSQL: a database created for
the run and dropped after it). Prints, per store and path, the median over ``--rounds`` rounds
of microseconds per read and reads per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from own_database import own_postgres_database

from medcourier.engine.directory import _live_patient
from medcourier.engine.store import Store


def through_sqlalchemy(store: Store) -> Callable[[str], Any]:
    """The read as ``get_patient`` made it before the driver path: a pooled connection, Core."""

    def read(patient_id: str) -> Any:
        with store.engine.connect() as c:
            row = _live_patient(c, patient_id)
            return json.loads(row.resource) if row is not None else None

    return read


def timed(read: Callable[[str], Any], ids: list[str], reads: int, rounds: int) -> float:
    """Median microseconds per read, measured on a thread of its own."""
    result: list[float] = []

    def work() -> None:
        for i in range(200):  # warm-up: connections, statement caches
            read(ids[i % len(ids)])
        per_round = []
        for _ in range(rounds):
            started = time.perf_counter()
            for i in range(reads):
                if read(ids[i % len(ids)]) is None:
                    raise RuntimeError("a patient was not found")
            per_round.append((time.perf_counter() - started) / reads * 1e6)
        result.append(statistics.median(per_round))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError("the read failed (see the thread's traceback above)")
    return result[0]


def rows_of(label: str, url: str | None, data_dir: Path, args: argparse.Namespace) -> list[str]:
    store = Store(url, data_dir)
    store.create_schema()
    try:
        ids = [
            store.put_patient(
                {
                    "resourceType": "Patient",
                    "name": [{"family": f"Bench{i}", "given": ["Load"]}],
                    "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": f"B{i}"}],
                },
                None,
            )["id"]
            for i in range(args.patients)
        ]
        paths = [
            ("SQLAlchemy (pooled connection, Core)", through_sqlalchemy(store)),
            ("driver (Store.get_patient)", store.get_patient),
        ]
        lines = []
        for path, read in paths:
            micros = timed(read, ids, args.reads, args.rounds)
            lines.append(f"| {label} | {path} | {micros:.1f} | {1e6 / micros:,.0f} |")
        return lines
    finally:
        store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=3000, help="reads per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--no-postgres", action="store_true", help="the embedded store only")
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory(prefix="patient-read-") as tmp:
        lines += rows_of("embedded (SQLite)", None, Path(tmp), args)
        if not args.no_postgres:
            with own_postgres_database(args.postgres, "patient_read") as url:
                lines += rows_of("PostgreSQL", url, Path(tmp), args)
    print("| store | path | µs per read | reads/s |")
    print("|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
