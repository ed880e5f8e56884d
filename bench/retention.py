"""Retention: does pruning give the disk space back, how long does it take, and does it block?

    .venv/bin/python bench/retention.py [--backend sqlite|postgresql|both|all] [--docs 5000]
        [--size-kb 100] [--recent 500] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

For each store, the script writes ``--docs`` documents of ``--size-kb`` random (incompressible,
like a PDF) bytes whose deliveries completed long ago (half 40 days ago: payload past the default
31 days; half 100 days ago: metadata past 62 days), then ``--recent`` documents completed now,
which must stay. It then runs one pass of the engine's own pruner (engine/retention.py, default
``pruning`` settings: 500 documents or 4 MiB a batch, 50 ms pauses) while a probe accepts a 4 KB
document through the store's writer every 20 ms, as the HTTP path does, and compares the probe's
commit latency with the same probe run idle. Finally it writes as many documents again as were
pruned, to show whether the freed space is reused.

Sizes: SQLite is the database file plus its WAL; PostgreSQL is ``pg_database_size`` (the
per-table ``pg_total_relation_size`` of ``payloads`` is printed below the table). ``all`` adds a
row for an SQLite store created before retention (auto_vacuum none), pruned then rewritten with
``medcourier prune --vacuum``'s full VACUUM.

PostgreSQL runs in a throw-away database created on the server and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from own_database import own_postgres_database

from medcourier.engine.clock import now
from medcourier.engine.config import Config, parse_config
from medcourier.engine.plugins import load_plugins
from medcourier.engine.retention import (
    PruneCounts,
    Pruner,
    sqlite_checkpoint,
    sqlite_path,
    sqlite_vacuum,
    store_size,
)
from medcourier.engine.schema import deliveries, documents, metadata, payloads, status_events
from medcourier.engine.store import AsyncStore, Store
from medcourier.engine.txid import new_transaction_id

ROUTE = "bench"
CONFIG = f"""
routes:
  - name: {ROUTE}
    match: {{fallback: true}}
    format: hl7v2-oru
    deliver: {{connector: mllp, host: 127.0.0.1, port: 6661}}
"""
PROBE_EVERY = 0.02
IDLE_SECONDS = 5.0


@dataclass
class Row:
    backend: str
    before: int = 0
    after: int = 0
    refilled: int = 0
    counts: PruneCounts = field(default_factory=PruneCounts)
    idle: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    note: str = ""
    payloads_table: tuple[int, int, int] | None = None


def fill(store: Store, count: int, size: int, days_ago: float | None, chunk: int = 100) -> None:
    """Write ``count`` documents with one final delivery ``days_ago`` (None: now) in bulk."""
    at = now() - timedelta(days=days_ago or 0)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        ids = [new_transaction_id() for _ in range(n)]
        with store.engine.begin() as c:
            c.execute(
                documents.insert(),
                [
                    {
                        "transaction_id": t,
                        "created_at": at - timedelta(minutes=1),
                        "content_type": "application/pdf",
                        "document_type": "11488-4",
                        "title": "bench",
                        "sender_identifier": None,
                        "sender_application": "bench",
                        "patient_id": "bench-patient",
                        "encounter_id": None,
                        "payload_size": size,
                    }
                    for t in ids
                ],
            )
            c.execute(
                payloads.insert(), [{"transaction_id": t, "data": os.urandom(size)} for t in ids]
            )
            c.execute(
                deliveries.insert(),
                [
                    {
                        "transaction_id": t,
                        "route": ROUTE,
                        "status": "completed",
                        "status_at": at,
                        "sent_at": at,
                        "attempts": 1,
                    }
                    for t in ids
                ],
            )
            c.execute(
                status_events.insert(),
                [
                    {"transaction_id": t, "route": ROUTE, "status": s, "at": at, "reason": None}
                    for t in ids
                    for s in ("preparation", "in-progress", "completed")
                ],
            )


async def probe(store: AsyncStore, until: asyncio.Event | float) -> list[float]:
    """Accept a 4 KB document every PROBE_EVERY seconds; return each commit's latency (ms)."""
    latencies: list[float] = []
    deadline = time.monotonic() + until if isinstance(until, float) else None
    body = os.urandom(4096)
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            return latencies
        if isinstance(until, asyncio.Event) and until.is_set():
            return latencies
        started = time.perf_counter()
        await store.write(
            store.sync.tx_accept_document,
            transaction_id=new_transaction_id(),
            created_at=now(),
            content_type="application/pdf",
            document_type="11488-4",
            title="probe",
            sender_identifier=None,
            sender_application="bench",
            patient_id="bench-patient",
            encounter_id=None,
            payload=body,
            routes=[ROUTE],
        )
        latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(PROBE_EVERY)


async def measure(store: Store, config: Config, row: Row) -> None:
    async_store = AsyncStore(store)
    try:
        row.idle = await probe(async_store, IDLE_SECONDS)
        done = asyncio.Event()
        probing = asyncio.create_task(probe(async_store, done))
        row.counts = await Pruner(async_store, config).run_pass()
        done.set()
        row.busy = await probing
    finally:
        await asyncio.to_thread(async_store.close)


def payload_table(store: Store) -> int:
    return store_size(store).parts["payloads"] if not store.is_sqlite else 0


def run(
    store: Store, config: Config, row: Row, docs: int, size: int, recent: int, refill: bool = True
) -> None:
    store.create_schema()
    fill(store, docs // 2, size, 40)
    fill(store, docs - docs // 2, size, 100)
    fill(store, recent, size, None)
    if store.is_sqlite:
        sqlite_checkpoint(sqlite_path(store), busy_seconds=5)
    row.before = store_size(store).total
    pt_before = payload_table(store)
    asyncio.run(measure(store, config, row))
    row.after = store_size(store).total
    pt_after = payload_table(store)
    if not refill:
        return
    fill(store, row.counts.payloads, size, None)
    if store.is_sqlite:
        sqlite_checkpoint(sqlite_path(store), busy_seconds=5)
    row.refilled = store_size(store).total
    if not store.is_sqlite:
        row.payloads_table = (pt_before, pt_after, payload_table(store))


def old_sqlite(directory: Path, config: Config, docs: int, size: int, recent: int) -> Row:
    """A store created before retention: auto_vacuum none, then one full VACUUM."""
    db = directory / "medcourier.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    plain = sa.create_engine(f"sqlite:///{db}")
    metadata.create_all(plain)
    plain.dispose()
    store = Store(None, directory)
    row = Row("SQLite, old file (auto_vacuum none)")
    run(store, config, row, docs, size, recent, refill=False)
    started = time.monotonic()
    sqlite_vacuum(sqlite_path(store))
    row.note = (
        f"one full VACUUM (`medcourier prune --vacuum`): {mb(row.after)} -> "
        f"{mb(store_size(store).total)} in {time.monotonic() - started:.1f} s"
    )
    store.dispose()
    return row


def mb(n: int) -> str:
    return f"{n / 1_000_000:,.1f} MB"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lat(values: list[float]) -> str:
    return (
        f"{statistics.median(values):.1f} / {pct(values, 0.99):.1f} / {max(values):.1f}"
        if values
        else "-"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=["sqlite", "postgresql", "both", "all"], default="both"
    )
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--size-kb", type=int, default=100)
    parser.add_argument("--recent", type=int, default=500)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    size = args.size_kb * 1024
    config = parse_config(CONFIG, load_plugins(), "bench", env={})
    rows: list[Row] = []
    if args.backend in ("sqlite", "both", "all"):
        with tempfile.TemporaryDirectory(prefix="mcbench-") as tmp:
            store = Store(None, Path(tmp))
            row = Row("SQLite (WAL, auto_vacuum incremental)")
            run(store, config, row, args.docs, size, args.recent)
            store.dispose()
            rows.append(row)
    if args.backend in ("postgresql", "both", "all"):
        with own_postgres_database(args.pg) as url:
            store = Store(url, Path("."))
            row = Row("PostgreSQL")
            run(store, config, row, args.docs, size, args.recent)
            store.dispose()
            rows.append(row)
    if args.backend == "all":
        with tempfile.TemporaryDirectory(prefix="mcbench-") as tmp:
            rows.append(old_sqlite(Path(tmp), config, args.docs, size, args.recent))

    print(
        f"\n{args.docs} aged documents of {args.size_kb} KB ({args.docs // 2} past payload_days, "
        f"{args.docs - args.docs // 2} past metadata_days) + {args.recent} recent; "
        "probe: one 4 KB accept every 20 ms\n"
    )
    print(
        "| store | before | after prune | after refill | pruned (metadata / payloads) "
        "| prune s | batches | accept ms idle p50/p99/max | accept ms pruning p50/p99/max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r.counts
        print(
            f"| {r.backend} | {mb(r.before)} | {mb(r.after)} "
            f"| {mb(r.refilled) if r.refilled else '-'} "
            f"| {c.metadata} / {c.payloads} | {c.seconds:.1f} | {c.batches} "
            f"| {lat(r.idle)} | {lat(r.busy)} |"
        )
    for r in rows:
        if r.payloads_table is not None:
            b, a, f = r.payloads_table
            print(
                f"\n{r.backend}: pg_total_relation_size(payloads) {mb(b)} before, "
                f"{mb(a)} after prune + VACUUM, {mb(f)} after refill"
            )
        if r.note:
            print(f"\n{r.backend}: {r.note}")


if __name__ == "__main__":
    main()
