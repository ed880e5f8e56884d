"""Retention: payloads kept N days and metadata M days per route, pruned in the background.

What is pruned, and when (docs/reliability.md, section "Retention", says the same for operators):

- A delivery counts only once it is final (``completed`` or ``entered-in-error``). A document
  with any delivery in ``preparation``, ``in-progress`` or ``unknown`` is never touched, however
  old it is.
- A document's **payload** is deleted when every delivery of it is final and the latest of their
  ``status_at`` is older than ``payload_days``. A document sent to several routes takes the
  largest ``payload_days`` of those routes.
- A document's **metadata** (its ``documents`` row, its ``deliveries`` and its ``status_events``)
  is deleted on the same rule with ``metadata_days`` (again the largest across its routes), and
  the payload goes with it. Until then tracking answers as before: it reads deliveries and the
  history, never the payload. Afterwards the transaction id is ``unknown``.
- A delivery whose route is no longer in the config is kept by the top-level ``retention``.
- ``inbound_log`` rows (the duplicate memory) go once older than ``duplicate_window_hours``,
  after which a resend is no longer recognised anyway.

How, without blocking the flow:

- Every step is one bounded write transaction, with a pause between steps, so documents keep
  being accepted and delivered during a pass. On SQLite, which has one writer, the steps go
  through the store's writer (``AsyncStore.write``) and take their turn with the flow's writes.
  On PostgreSQL each step is a transaction of its own on a worker thread: going through group
  commit would make the flow's writes that happen to share its commit wait for the whole batch.
- ``tx_prune_documents`` looks at a window of at most ``batch_size`` documents, oldest first, on
  the ``(created_at, transaction_id)`` index, from where the previous window stopped. Only
  documents created before now minus the smallest ``payload_days`` in the config are looked at:
  a delivery's ``status_at`` is never earlier than its document's ``created_at``. The window also
  stops once the payloads it deletes add up to ``batch_bytes``, because deleting a payload costs
  about its size in I/O: an SQLite built with SECURE_DELETE (Debian's is) zeroes every freed
  page, and the incremental vacuum then moves as many pages.
- Deliveries are read ``FOR UPDATE`` on PostgreSQL, so a status written concurrently by another
  writer thread is seen before anything is deleted.

Giving the space back:

- **SQLite.** New databases are created with ``auto_vacuum=INCREMENTAL`` (store.py). After each
  batch, ``PRAGMA incremental_vacuum`` moves at most ``VACUUM_PAGES`` pages per transaction from
  the end of the file into the freed pages, then truncates the file. The pass ends with a
  ``wal_checkpoint(TRUNCATE)`` under a short busy timeout, so the WAL shrinks too. A database
  created before this setting has ``auto_vacuum=NONE``: its freed pages are reused by new
  documents but the file never shrinks. A one-time ``medcourier prune --vacuum``, with the engine
  stopped, rewrites it (full ``VACUUM``) in incremental mode.
- **PostgreSQL.** A deleted row's space, including the TOAST chunks of a payload, is reused once
  (auto)vacuum has marked it free. After a pass that deleted at least a batch of payloads, the
  pruner runs ``VACUUM (ANALYZE) payloads`` (not FULL) from an autocommit connection, so the reuse
  starts at once. VACUUM gives back to the operating system only the empty pages at the end of a
  table; space in the middle is reused by new rows, not returned. ``VACUUM FULL`` would return it
  all, but it locks the table for its whole run and is left to the operator.

Logs carry counts, sizes and durations, never transaction contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from medcourier.engine.clock import now as clock_now
from medcourier.engine.config import Config, PruningSettings, RetentionSettings
from medcourier.engine.model import Status
from medcourier.engine.schema import (
    binaries,
    deliveries,
    documents,
    inbound_log,
    payloads,
    resources,
    status_events,
)
from medcourier.engine.store import AsyncStore, Store

log = structlog.get_logger("medcourier.retention")
T = TypeVar("T")

FINAL = frozenset({Status.COMPLETED.value, Status.ENTERED_IN_ERROR.value})
# Pages ``PRAGMA incremental_vacuum`` moves per write transaction (2 MiB at 4 KiB pages): about
# 10-30 ms of the writer each (bench/retention.py).
VACUUM_PAGES = 512
# How long the closing WAL checkpoint may wait for the writer and readers before giving up.
CHECKPOINT_BUSY_SECONDS = 0.1
# Tables the document pruner deletes from; ``prune --vacuum`` vacuums them on PostgreSQL.
PRUNED_TABLES = (
    "payloads",
    "status_events",
    "deliveries",
    "documents",
    "inbound_log",
    "binaries",
    "resources",
)
CREATED_AT_INDEX = "ix_documents_created_at"
AUTO_VACUUM_MODES = {0: "none", 1: "full", 2: "incremental"}


class Action(enum.StrEnum):
    """What a document's age allows: drop its payload, or drop it altogether."""

    PAYLOAD = "payload"
    METADATA = "metadata"


@dataclass(frozen=True)
class Retention:
    payload: timedelta
    metadata: timedelta

    @classmethod
    def of(cls, settings: RetentionSettings) -> Retention:
        return cls(timedelta(days=settings.payload_days), timedelta(days=settings.metadata_days))


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention of each configured route, and the default for every other route name."""

    default: Retention
    routes: Mapping[str, Retention] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> RetentionPolicy:
        s = config.settings
        return cls(
            Retention.of(s.retention),
            {r.name: Retention.of(r.settings.retention or s.retention) for r in config.routes},
        )

    def of(self, route: str) -> Retention:
        return self.routes.get(route, self.default)

    @property
    def longest_payload(self) -> timedelta:
        return max([self.default.payload, *(r.payload for r in self.routes.values())])

    @property
    def longest_metadata(self) -> timedelta:
        return max([self.default.metadata, *(r.metadata for r in self.routes.values())])

    @property
    def shortest_payload(self) -> timedelta:
        """No document younger than this can lose anything: the scan starts below it."""
        return min([self.default.payload, *(r.payload for r in self.routes.values())])

    def decide(
        self,
        delivery_rows: Sequence[tuple[str, str, datetime]],
        created_at: datetime,
        now: datetime,
    ) -> Action | None:
        """What may go for a document with these (route, status, status_at) deliveries."""
        if any(status not in FINAL for _, status, _ in delivery_rows):
            return None
        if delivery_rows:
            last = max(at for _, _, at in delivery_rows)
            kept = [self.of(route) for route, _, _ in delivery_rows]
        else:  # not written by the engine, which stores a document with its deliveries
            last, kept = created_at, [self.default]
        age = now - last
        if age > max(k.metadata for k in kept):
            return Action.METADATA
        if age > max(k.payload for k in kept):
            return Action.PAYLOAD
        return None


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the store writes is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DocumentBatch:
    """One window of ``tx_prune_documents``; ``after`` is where the next window starts (None:
    the scan reached the end)."""

    scanned: int = 0
    metadata: int = 0
    payloads: int = 0
    payload_bytes: int = 0
    after: tuple[Any, str] | None = None


def tx_prune_documents(
    c: Connection,
    policy: RetentionPolicy,
    now: datetime,
    batch_size: int,
    batch_bytes: int,
    after: tuple[Any, str] | None = None,
    dry_run: bool = False,
) -> DocumentBatch:
    """Prune one window of at most ``batch_size`` documents, oldest first, after ``after``.

    A window also stops before the document whose payload would take it past ``batch_bytes``
    (that document opens the next window). With ``dry_run`` nothing is deleted; the counts are
    what would have been.
    """
    created = documents.c.created_at
    txid = documents.c.transaction_id
    q = sa.select(txid, created, documents.c.payload_size).where(
        created < now - policy.shortest_payload
    )
    if after is not None:
        at, last = after
        q = q.where(created >= at, sa.or_(created > at, txid > last))
    window = c.execute(q.order_by(created, txid).limit(batch_size)).all()
    if not window:
        return DocumentBatch()
    ids = [r.transaction_id for r in window]
    dq = sa.select(
        deliveries.c.transaction_id, deliveries.c.route, deliveries.c.status, deliveries.c.status_at
    ).where(deliveries.c.transaction_id.in_(ids))
    if c.dialect.name == "postgresql":
        dq = dq.with_for_update()
    found: dict[str, list[tuple[str, str, datetime]]] = defaultdict(list)
    for d in c.execute(dq):
        found[d.transaction_id].append((d.route, d.status, _aware(d.status_at)))
    with_payload = set(
        c.execute(
            sa.select(payloads.c.transaction_id).where(payloads.c.transaction_id.in_(ids))
        ).scalars()
    )

    drop_all: list[str] = []
    drop_payload: list[str] = []
    size = 0
    scanned = 0
    position: tuple[Any, str] | None = None
    for r in window:
        action = policy.decide(found[r.transaction_id], _aware(r.created_at), now)
        weight = int(r.payload_size) if r.transaction_id in with_payload else 0
        if action is not None and weight and size + weight > batch_bytes and size:
            break
        scanned += 1
        position = (r.created_at, r.transaction_id)
        if action is Action.METADATA:
            drop_all.append(r.transaction_id)
        elif action is Action.PAYLOAD and weight:
            drop_payload.append(r.transaction_id)
        else:
            continue
        size += weight
    gone = len(drop_all)
    payload_rows = len(drop_payload) + sum(1 for t in drop_all if t in with_payload)
    if not dry_run:
        # Counted from what was really deleted: another engine sharing a PostgreSQL store may
        # have pruned some of these rows first.
        payload_rows = 0
        if drop_all:
            for table in (status_events, deliveries, payloads, documents):
                n = c.execute(table.delete().where(table.c.transaction_id.in_(drop_all))).rowcount
                if table is payloads:
                    payload_rows += n
                elif table is documents:
                    gone = n
        if drop_payload:
            deleted = payloads.delete().where(payloads.c.transaction_id.in_(drop_payload))
            payload_rows += c.execute(deleted).rowcount
    finished = scanned == len(window) and len(window) < batch_size
    return DocumentBatch(
        scanned=scanned,
        metadata=gone,
        payloads=payload_rows,
        payload_bytes=size,
        after=None if finished else position,
    )


def tx_prune_inbound_log(
    c: Connection, before: datetime, batch_size: int, dry_run: bool = False
) -> int:
    """Delete about ``batch_size`` of the oldest ``inbound_log`` rows received before ``before``
    (rows sharing the last one's time go too); with ``dry_run``, count them all instead."""
    received = inbound_log.c.received_at
    expired = received < before
    if dry_run:
        count = sa.select(sa.func.count()).select_from(inbound_log).where(expired)
        return int(c.execute(count).scalar_one())
    edge = c.execute(
        sa.select(received).where(expired).order_by(received).limit(1).offset(batch_size - 1)
    ).scalar()
    condition = expired if edge is None else received <= edge
    return int(c.execute(inbound_log.delete().where(condition)).rowcount)


def tx_prune_uploads(
    c: Connection,
    binaries_before: datetime,
    resources_before: datetime,
    batch_size: int,
    dry_run: bool = False,
) -> int:
    """Delete a batch of seed 001's uploads: Binaries created before ``binaries_before`` (their
    bytes were copied into the document's payload when it was sent; one never sent is stale),
    and DocumentReferences and CommunicationRequests created before ``resources_before`` (the
    longest metadata retention, so a request outlives none of its deliveries). Practitioners
    and Organizations are a directory, kept. Returns how many rows went (or would go)."""
    kinds = ("DocumentReference", "CommunicationRequest")
    old_binaries = binaries.c.created_at < binaries_before
    old_resources = sa.and_(resources.c.type.in_(kinds), resources.c.created_at < resources_before)
    if dry_run:
        count = 0
        for table, where in ((binaries, old_binaries), (resources, old_resources)):
            query = sa.select(sa.func.count()).select_from(table).where(where)
            count += int(c.execute(query).scalar_one())
        return count
    ids = [r[0] for r in c.execute(sa.select(binaries.c.id).where(old_binaries).limit(batch_size))]
    deleted = 0
    if ids:
        deleted += int(c.execute(binaries.delete().where(binaries.c.id.in_(ids))).rowcount)
    keys = c.execute(
        sa.select(resources.c.type, resources.c.id).where(old_resources).limit(batch_size)
    ).all()
    for kind in kinds:
        chosen = [k.id for k in keys if k.type == kind]
        if chosen:
            done = c.execute(
                resources.delete().where(resources.c.type == kind, resources.c.id.in_(chosen))
            )
            deleted += int(done.rowcount)
    return deleted


# -- giving the space back -----------------------------------------------------------------
def sqlite_auto_vacuum(c: Connection) -> str:
    """The database's auto_vacuum mode: none, full or incremental."""
    mode = int(c.exec_driver_sql("PRAGMA auto_vacuum").scalar_one())
    return AUTO_VACUUM_MODES.get(mode, str(mode))


def tx_incremental_vacuum(c: Connection, pages: int = VACUUM_PAGES) -> tuple[int, int]:
    """Give at most ``pages`` free pages back to the file system; returns (freed, still free).

    Python's sqlite3 steps a statement once, and each step of ``incremental_vacuum`` frees one
    page, so the pragma is run once per page (a few tens of microseconds each).
    """
    free = int(c.exec_driver_sql("PRAGMA freelist_count").scalar_one())
    if free:
        cursor = c.connection.cursor()
        try:
            for _ in range(min(free, pages)):
                cursor.execute("PRAGMA incremental_vacuum(1)")
        finally:
            cursor.close()
    left = int(c.exec_driver_sql("PRAGMA freelist_count").scalar_one())
    return free - left, left


def sqlite_path(store: Store) -> str:
    path = store.engine.url.database
    assert path, "an SQLite store has a file"
    return path


def sqlite_checkpoint(path: str, busy_seconds: float = CHECKPOINT_BUSY_SECONDS) -> bool:
    """Copy the WAL into the database and truncate it to zero bytes; False if it had to give up.

    A TRUNCATE checkpoint holds the write lock while it waits for readers, so it gets a short
    busy timeout: a busy engine just keeps its WAL until the next pass.
    """
    con = sqlite3.connect(path, timeout=busy_seconds, isolation_level=None)
    try:
        busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return bool(busy == 0)
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def sqlite_vacuum(path: str) -> None:
    """A full VACUUM that also switches an old database to incremental auto_vacuum.

    It rewrites the whole file and holds the write lock while doing so: run it with the engine
    stopped (``medcourier prune --vacuum``).
    """
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")
        con.execute("VACUUM")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        con.close()


def pg_vacuum(store: Store, tables: Sequence[str] = ("payloads",)) -> None:
    """``VACUUM (ANALYZE)`` (not FULL: no long lock) from an autocommit connection."""
    with store.engine.connect() as c:
        c.execution_options(isolation_level="AUTOCOMMIT")
        for table in tables:
            if table not in PRUNED_TABLES:
                raise ValueError(f"not a pruned table: {table}")
            c.exec_driver_sql(f"VACUUM (ANALYZE) {table}")


@dataclass(frozen=True)
class StoreSize:
    """Bytes on disk: SQLite's file plus its WAL, or PostgreSQL's database and tables."""

    total: int
    parts: dict[str, int]


def store_size(store: Store) -> StoreSize:
    if store.is_sqlite:
        path = sqlite_path(store)
        parts = {
            "db": os.path.getsize(path) if os.path.exists(path) else 0,
            "wal": os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0,
        }
        return StoreSize(parts["db"] + parts["wal"], parts)
    with store.engine.connect() as c:
        parts = {
            t: int(c.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": t}).scalar_one())
            for t in PRUNED_TABLES
        }
        total = int(c.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one())
    return StoreSize(total, parts)


def tx_ensure_index(c: Connection) -> None:
    """Databases created before retention lack the scan's index: create it (once)."""
    index = next(i for i in documents.indexes if i.name == CREATED_AT_INDEX)
    index.create(c, checkfirst=True)


# -- the background pruner -----------------------------------------------------------------
@dataclass
class PruneCounts:
    metadata: int = 0
    payloads: int = 0
    payload_bytes: int = 0
    inbound_log: int = 0
    uploads: int = 0  # seed 001's Binaries, DocumentReferences, CommunicationRequests
    scanned: int = 0
    batches: int = 0
    pages_reclaimed: int = 0
    seconds: float = 0.0

    @property
    def deleted(self) -> bool:
        return bool(self.metadata or self.payloads or self.inbound_log or self.uploads)


class Pruner:
    """Runs a pass every ``pruning.interval_seconds``: documents, then ``inbound_log``, then the
    space. Each batch is one write of the store's writer, with ``pause_seconds`` between them."""

    def __init__(self, store: AsyncStore, config: Config) -> None:
        self.store = store
        self.settings: PruningSettings = config.settings.pruning
        self.policy = RetentionPolicy.from_config(config)
        self.window = timedelta(hours=config.settings.duplicate_window_hours)
        self.passes = 0
        self.last: PruneCounts | None = None
        self.auto_vacuum: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.enabled and self._task is None:
            self._task = asyncio.create_task(self._main(), name="medcourier-pruner")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _main(self) -> None:
        try:
            await self.prepare()
        except Exception as exc:
            log.error("pruner set-up failed", error=type(exc).__name__)
        while True:
            try:
                await self.run_pass()
            except Exception as exc:  # the next pass tries again; the flow goes on meanwhile
                log.error("prune pass failed", error=type(exc).__name__)
            await asyncio.sleep(self.settings.interval_seconds)

    async def prepare(self) -> None:
        """Create the scan's index if the database predates it; say once if SQLite cannot
        give space back."""
        await self._step(tx_ensure_index)
        sync = self.store.sync
        if not sync.is_sqlite:
            return
        self.auto_vacuum = await self.store.write(sqlite_auto_vacuum)
        if self.auto_vacuum == "none":
            log.warning(
                "this SQLite store was created without auto_vacuum: pruned space is reused but "
                "the file will not shrink until a one-time `medcourier prune --vacuum` is run "
                "with the engine stopped",
                path=sqlite_path(sync),
            )

    async def run_pass(self, *, dry_run: bool = False, now: datetime | None = None) -> PruneCounts:
        """One full pass now. ``dry_run`` counts what would go and deletes nothing."""
        s = self.settings
        at = now or clock_now()
        started = time.monotonic()
        counts = PruneCounts()
        sync = self.store.sync
        if sync.is_sqlite and self.auto_vacuum is None:
            self.auto_vacuum = await self.store.write(sqlite_auto_vacuum)
        if not dry_run:  # pages a pass interrupted by a stop left free
            counts.pages_reclaimed += await self._reclaim_pages()
        after: tuple[Any, str] | None = None
        while True:
            batch = await self._step(
                tx_prune_documents, self.policy, at, s.batch_size, s.batch_bytes, after, dry_run
            )
            counts.batches += 1
            counts.scanned += batch.scanned
            counts.metadata += batch.metadata
            counts.payloads += batch.payloads
            counts.payload_bytes += batch.payload_bytes
            if not dry_run and (batch.metadata or batch.payloads):
                counts.pages_reclaimed += await self._reclaim_pages()
            if batch.after is None:
                break
            after = batch.after
            await asyncio.sleep(s.pause_seconds)
        before = at - self.window
        if dry_run:
            counts.inbound_log = await self._step(tx_prune_inbound_log, before, s.batch_size, True)
        else:
            while True:
                n = await self._step(tx_prune_inbound_log, before, s.batch_size)
                counts.inbound_log += n
                if n < s.batch_size:
                    break
                await asyncio.sleep(s.pause_seconds)
        binaries_before = at - self.policy.longest_payload
        resources_before = at - self.policy.longest_metadata
        if dry_run:
            counts.uploads = await self._step(
                tx_prune_uploads, binaries_before, resources_before, s.batch_size, True
            )
        else:
            while True:
                n = await self._step(
                    tx_prune_uploads, binaries_before, resources_before, s.batch_size
                )
                counts.uploads += n
                if n == 0:
                    break
                await asyncio.sleep(s.pause_seconds)
        if not dry_run and counts.deleted:
            if sync.is_sqlite:
                counts.pages_reclaimed += await self._reclaim_pages()
                await asyncio.to_thread(sqlite_checkpoint, sqlite_path(sync))
            elif counts.payloads >= s.batch_size:
                await asyncio.to_thread(pg_vacuum, sync, ("payloads",))
        counts.seconds = time.monotonic() - started
        self.passes += 1
        self.last = counts
        (log.info if counts.deleted else log.debug)(
            "prune pass" + (" (dry run)" if dry_run else ""),
            metadata_pruned=counts.metadata,
            payloads_pruned=counts.payloads,
            payload_bytes=counts.payload_bytes,
            inbound_log_pruned=counts.inbound_log,
            uploads_pruned=counts.uploads,
            documents_scanned=counts.scanned,
            batches=counts.batches,
            pages_reclaimed=counts.pages_reclaimed,
            seconds=round(counts.seconds, 3),
        )
        return counts

    async def _step(self, fn: Callable[..., T], *args: Any) -> T:
        """One bounded write: SQLite's single writer, or a PostgreSQL transaction of its own."""
        if self.store.sync.is_sqlite:
            return await self.store.write(fn, *args)
        sync = self.store.sync
        return await asyncio.to_thread(lambda: sync.transaction(fn, *args))

    async def _reclaim_pages(self) -> int:
        """SQLite in incremental mode: truncate the file by the freed pages, a few at a time."""
        if self.auto_vacuum != "incremental":
            return 0
        reclaimed = 0
        while True:
            freed, left = await self.store.write(tx_incremental_vacuum, VACUUM_PAGES)
            reclaimed += freed
            if left == 0 or freed == 0:
                return reclaimed
            await asyncio.sleep(self.settings.pause_seconds)
