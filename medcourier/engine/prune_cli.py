"""``medcourier prune``: one full retention pass now, with the store's size before and after.

The pass is the background pruner's own (engine/retention.py), in the same bounded batches, so
it can run beside a live engine. ``--vacuum`` then rewrites the SQLite file (a full VACUUM,
which also switches a database created before retention to incremental auto_vacuum: stop the
engine first) or runs VACUUM (ANALYZE), not FULL, on PostgreSQL's pruned tables.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import sqlalchemy as sa

from medcourier.engine.config import Config, load_config
from medcourier.engine.plugins import Plugins
from medcourier.engine.retention import (
    PRUNED_TABLES,
    PruneCounts,
    Pruner,
    pg_vacuum,
    sqlite_checkpoint,
    sqlite_path,
    sqlite_vacuum,
    store_size,
    tx_ensure_index,
)
from medcourier.engine.store import AsyncStore, Store


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


async def _pass(store: Store, config: Config, dry_run: bool) -> tuple[PruneCounts, str | None]:
    async_store = AsyncStore(store)
    try:
        pruner = Pruner(async_store, config)
        if not dry_run:
            await async_store.write(tx_ensure_index)
        counts = await pruner.run_pass(dry_run=dry_run)
        return counts, pruner.auto_vacuum
    finally:
        # AsyncStore.close disposes the engine too; the caller goes on with a fresh pool.
        await asyncio.to_thread(async_store.close)


def prune_command(args: argparse.Namespace, plugins: Plugins) -> int:
    config = load_config(args.config, plugins)
    s = config.settings
    store = Store(s.store, s.data_dir)
    store.create_schema()
    kind = "sqlite " + sqlite_path(store) if store.is_sqlite else "postgresql"
    before = store_size(store)
    counts, auto_vacuum = asyncio.run(_pass(store, config, args.dry_run))
    verb = "would prune" if args.dry_run else "pruned"
    print(f"store: {kind}")
    print(
        f"{verb}: {counts.metadata} document(s) with their metadata, {counts.payloads} "
        f"payload(s) ({_mb(counts.payload_bytes)}), {counts.inbound_log} inbound_log row(s); "
        f"{counts.scanned} document(s) looked at in {counts.batches} batch(es), "
        f"{counts.seconds:.1f} s"
    )
    if args.vacuum and not args.dry_run:
        started = time.monotonic()
        if store.is_sqlite:
            sqlite_vacuum(sqlite_path(store))
            what = "VACUUM (full rewrite, now auto_vacuum=incremental)"
        else:
            pg_vacuum(store, PRUNED_TABLES)
            what = f"VACUUM (ANALYZE) {', '.join(PRUNED_TABLES)}"
        print(f"{what}: {time.monotonic() - started:.1f} s")
    elif store.is_sqlite and not args.dry_run:
        sqlite_checkpoint(sqlite_path(store))
        if auto_vacuum == "none":
            print(
                "note: this SQLite file was created without auto_vacuum, so it does not shrink; "
                "stop the engine and run `medcourier prune --vacuum` once"
            )
    after = store_size(store)
    print(f"size before: {_mb(before.total)}, after: {_mb(after.total)}")
    if not store.is_sqlite:
        detail = ", ".join(
            f"{t} {_mb(before.parts[t])} -> {_mb(after.parts[t])}" for t in PRUNED_TABLES
        )
        print(f"tables: {detail}")
        with store.engine.connect() as c:
            live = c.execute(sa.text("SELECT sum(pg_column_size(data)) FROM payloads")).scalar()
        print(
            f"payloads: {_mb(int(live or 0))} of the table's {_mb(after.parts['payloads'])} is "
            "live data; PostgreSQL reuses the rest for new documents and returns to the system "
            "only empty pages at the end of a table (VACUUM FULL returns it all, under a lock)"
        )
    store.dispose()
    return 0
