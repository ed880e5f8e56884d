#!/usr/bin/env python3
"""How fast the journal of an ``ack_after: journal`` listener is applied: a backlog of ADT.

A hospital feed that catches up after downtime, or a burst faster than the engine applies,
leaves rows in ``inbound_journal``; this is the rate they are applied at, without the listener
receiving meanwhile. N ADT^A01 of about 2 KB (bench/mllp_listener.py's) are journaled in one
go, then applied as ``JournalApplier`` does: read 256 rows at a time, interpret each, apply runs
of 32 directory updates a transaction (``tx_apply_updates``). Each case once with runs applied
in a few statements (engine/directory_run.py, the engine's way) and once one update at a time
(the way before it, and still the fallback), on SQLite and on PostgreSQL, with every message
for one patient or spread over many.

    .venv/bin/python bench/journal_apply.py
    .venv/bin/python bench/journal_apply.py --count 8000 --patients 1,1000 --backend postgresql

Not a test: nothing is asserted beyond every update being applied.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mllp_listener import adt_a01

from medcourier.engine import inbound_journal
from medcourier.engine.inbound import DirectoryUpdate, InboundMessage
from medcourier.engine.inbound_journal import (
    RUN,
    read_entries,
    tx_apply_updates,
    tx_journal,
)
from medcourier.engine.plugins import load_plugins
from medcourier.engine.store import Store

POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WINDOW = timedelta(hours=24)


def messages(count: int, patients: int) -> list[InboundMessage]:
    """``count`` ADT, message i for patient i mod ``patients`` (and that patient's visit)."""
    out = []
    for i in range(count):
        text = adt_a01(f"J{i}").decode()
        p = i % patients
        text = (
            text.replace("123456789^^^HOSP^PI", f"P{p:06d}^^^HOSP^PI")
            .replace("1800199123456", str(1800199000000 + p))
            .replace("VN123456", f"VN{p:06d}")
        )
        out.append(
            InboundMessage(
                text=text,
                channel="bench-in",
                sending_application="ADTSYS",
                sending_facility="HOSP",
                control_id=f"J{i}",
                message_type="ADT^A01",
            )
        )
    return out


@contextmanager
def store_of(backend: str) -> Iterator[Store]:
    """An empty store of its own: a SQLite file, or a PostgreSQL database dropped after."""
    with tempfile.TemporaryDirectory(prefix="journal-bench-") as tmp:
        if backend == "sqlite":
            store = Store(None, Path(tmp))
            store.create_schema()
            try:
                yield store
            finally:
                store.dispose()
            return
        name = f"journal_bench_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(
            POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1),
            isolation_level="AUTOCOMMIT",
        )
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        store = Store(POSTGRES.rsplit("/", 1)[0] + f"/{name}", Path(tmp))
        try:
            store.create_schema()
            yield store
        finally:
            store.dispose()
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def apply_all(store: Store, interpret: object) -> int:
    """Apply the whole journal as the applier does; returns how many rows were applied."""
    done = 0
    while True:
        with store.engine.connect() as c:
            entries = read_entries(c, "bench-in", failed=False)
        if not entries:
            return done
        for i in range(0, len(entries), RUN):
            run = []
            for entry in entries[i : i + RUN]:
                meaning = interpret(message=entry.message)  # type: ignore[operator]
                assert isinstance(meaning, DirectoryUpdate), meaning
                run.append((entry, meaning))
            failed = store.transaction(tx_apply_updates, store, run, WINDOW)
            assert failed == [], failed
            done += len(run)


def case(backend: str, count: int, patients: int, runs: bool) -> dict[str, object]:
    interpret = load_plugins().pm.hook.medcourier_interpret_message
    batch = messages(count, patients)
    original = inbound_journal._applied_as_one
    if not runs:  # the one-at-a-time path alone, as before directory runs
        inbound_journal._applied_as_one = lambda *_args: False
    try:
        with store_of(backend) as store:
            for i in range(0, count, 256):
                store.transaction(tx_journal, batch[i : i + 256])
            started, cpu = time.perf_counter(), time.process_time()
            applied = apply_all(store, interpret)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        inbound_journal._applied_as_one = original
    assert applied == count, (applied, count)
    return {
        "backend": backend,
        "patients": patients,
        "path": "runs" if runs else "one at a time",
        "applied_per_s": count / elapsed,
        "cpu_ms": 1000 * cpu / count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="ADT messages per case")
    parser.add_argument("--patients", default="1,1000", help="comma-separated patient counts")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    rows = [
        case(backend, args.count, int(patients), runs)
        for backend in backends
        for patients in args.patients.split(",")
        for runs in (False, True)
    ]
    print("| store | patients | applied | ADT/s | CPU ms/ADT (this process) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['patients']} | {r['path']} | {r['applied_per_s']:,.0f} "
            f"| {r['cpu_ms']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
