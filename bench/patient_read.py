"""The patient read every $send-to-ehr makes, on the embedded store: through SQLAlchemy and
through the reader thread's own driver connection (engine/sqlite_reads.py, what
``Store.get_patient`` uses on a SQLite file).

    .venv/bin/python bench/patient_read.py [--reads 3000] [--rounds 5]

Both run on one thread that stays alive between reads, as the store's reader pool's threads
do, against one store file holding ``--patients`` patients. Prints, per path, the median over
``--rounds`` rounds of microseconds per read and reads per second.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=3000, help="reads per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="patient-read-") as tmp:
        store = Store(None, Path(tmp))
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
            rows = [
                ("SQLAlchemy (pooled connection, Core)", through_sqlalchemy(store)),
                ("driver (Store.get_patient)", store.get_patient),
            ]
            print("| path | µs per read | reads/s |")
            print("|---|---|---|")
            for label, read in rows:
                micros = timed(read, ids, args.reads, args.rounds)
                print(f"| {label} | {micros:.1f} | {1e6 / micros:,.0f} |")
        finally:
            store.dispose()


if __name__ == "__main__":
    main()
