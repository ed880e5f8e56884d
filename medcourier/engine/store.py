"""The store: the source of truth for documents, their payloads, deliveries and status history.

One SQLAlchemy Core schema runs on SQLite (WAL, the embedded default, a file under the data
directory) and PostgreSQL (production). Core rather than the ORM: rows are written once per
message on the hot path and the ORM's unit of work buys nothing there.

Everything here is synchronous; ``AsyncStore`` runs it on a small thread pool so the event loop
(HTTP, MLLP) never waits on disk. SQLite gets a single thread (one writer at a time is all it
allows); PostgreSQL several.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from medcourier.engine.clock import now
from medcourier.engine.directory import (
    DirectoryStore,
    encounter_resource,
    live_patient_resource,
)
from medcourier.engine.inbound import DirectoryUpdate
from medcourier.engine.model import Document, Status
from medcourier.engine.payload_read import read_payload
from medcourier.engine.resources import ResourceStore
from medcourier.engine.schema import (
    deliveries,
    documents,
    inbound_log,
    metadata,
    payloads,
    status_events,
)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we write is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def normalize_url(url: str | None, data_dir: Path) -> str:
    """Map the config's store URL to an SQLAlchemy URL (psycopg 3 for PostgreSQL)."""
    if not url:
        return f"sqlite:///{(data_dir / 'medcourier.sqlite').resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class DeliveryRow:
    transaction_id: str
    route: str
    status: Status
    status_at: datetime
    sent_at: datetime | None
    reason: str | None
    attempts: int


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it takes a delivery: the status it found, and the document."""

    previous: Status
    document: Document | None
    # Set by a replay (``admin.RESEND`` / ``admin.RERENDER``): read here, in the claim, so the
    # common case (no replay) costs no extra query.
    replay_mode: str | None = None


# pg_advisory_xact_lock key serialising directory updates ("mcdir" in ASCII).
DIRECTORY_LOCK = 0x6D63646972
# pg_try_advisory_xact_lock key of the start-up orphan sweep ("mcorph").
ORPHAN_LOCK = 0x6D636F727068

P = ParamSpec("P")
T = TypeVar("T")


class Store(DirectoryStore, ResourceStore):
    """Synchronous access to the schema; see ``AsyncStore`` for use from the event loop."""

    def __init__(self, url: str | None, data_dir: Path) -> None:
        self.url = normalize_url(url, data_dir)
        self.is_sqlite = self.url.startswith("sqlite")
        # hide_parameters: an error's text must never carry the bound values (patient data).
        kwargs: dict[str, Any] = {"hide_parameters": True}
        if self.is_sqlite:
            data_dir.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_size"] = 8
            # No pre-ping: it costs a round trip per checkout; a dropped connection fails one
            # call and the pool replaces it.
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            # pysqlite begins transactions lazily and breaks SAVEPOINT, which group commit
            # needs: let SQLAlchemy emit BEGIN itself (the SQLAlchemy SQLite docs' recipe).
            sa.event.listen(self.engine, "begin", _sqlite_begin)

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    def transaction(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run one ``tx_*`` method in a transaction of its own (tests, tools, start-up)."""
        with self.engine.begin() as c:
            return fn(c, *args, **kwargs)

    # Synchronous one-transaction forms of the ``tx_*`` methods, for tests and tools; the engine
    # goes through ``AsyncStore.write``, which commits many of them together.
    def accept_document(self, **kwargs: Any) -> None:
        self.transaction(self.tx_accept_document, **kwargs)

    def remember(self, sender: str, message_id: str, transaction_ids: list[str]) -> None:
        self.transaction(self.tx_remember, sender, message_id, transaction_ids)

    def apply_directory_update(
        self, update: DirectoryUpdate, dedupe: tuple[str, str] | None = None
    ) -> tuple[str, str | None]:
        return self.transaction(self.tx_apply_directory_update, update, dedupe)

    def claim(self, transaction_id: str, route: str) -> Claim | None:
        return self.transaction(self.tx_claim, transaction_id, route)

    def set_status(
        self,
        transaction_id: str,
        route: str,
        status: Status,
        reason: str | None = None,
        sent_at: datetime | None = None,
    ) -> Status | None:
        return self.transaction(self.tx_set_status, transaction_id, route, status, reason, sent_at)

    # -- documents -------------------------------------------------------------------------
    def tx_accept_document(
        self,
        c: Connection,
        *,
        transaction_id: str,
        created_at: datetime,
        content_type: str,
        document_type: str,
        title: str,
        sender_identifier: str | None,
        sender_application: str,
        patient_id: str,
        encounter_id: str | None,
        payload: bytes,
        routes: Iterable[str],
    ) -> None:
        """Commit a document, its payload and one delivery per route (preparation) at once."""
        at = now()
        route_list = list(routes)
        c.execute(
            documents.insert().values(
                transaction_id=transaction_id,
                created_at=created_at,
                content_type=content_type,
                document_type=document_type,
                title=title,
                sender_identifier=sender_identifier,
                sender_application=sender_application,
                patient_id=patient_id,
                encounter_id=encounter_id,
                payload_size=len(payload),
            )
        )
        c.execute(payloads.insert().values(transaction_id=transaction_id, data=payload))
        c.execute(
            deliveries.insert(),
            [
                {
                    "transaction_id": transaction_id,
                    "route": r,
                    "status": Status.PREPARATION.value,
                    "status_at": at,
                    "attempts": 0,
                }
                for r in route_list
            ],
        )
        c.execute(
            status_events.insert(),
            [
                {
                    "transaction_id": transaction_id,
                    "route": r,
                    "status": Status.PREPARATION.value,
                    "at": at,
                    "reason": "accepted",
                }
                for r in route_list
            ],
        )

    def seen(self, sender: str, message_id: str, window: timedelta) -> list[str] | None:
        """The transaction ids of a message this sender already sent within ``window``."""
        q = sa.select(inbound_log.c.transaction_ids, inbound_log.c.received_at).where(
            inbound_log.c.sender == sender, inbound_log.c.message_id == message_id
        )
        with self.engine.connect() as c:
            row = c.execute(q).first()
        if row is None or (_aware(row.received_at) or now()) < now() - window:
            return None
        return [t for t in row.transaction_ids.split(",") if t]

    def tx_remember(
        self, c: Connection, sender: str, message_id: str, transaction_ids: list[str]
    ) -> None:
        _remember(c, (sender, message_id), transaction_ids)

    def tx_apply_directory_update(
        self, c: Connection, update: DirectoryUpdate, dedupe: tuple[str, str] | None = None
    ) -> tuple[str, str | None]:
        """Apply an ADT event in one transaction; returns (patient id, encounter id).

        Kind ``ensure`` (documents arriving by message) creates what is missing and changes
        nothing that exists.
        """
        overwrite = update.kind != "ensure"
        if c.dialect.name == "postgresql":
            # Find-then-insert by identifier races between writer threads: two admissions of
            # the same new patient would create it twice. One transaction-scoped lock makes
            # directory updates take turns (SQLite has a single writer already).
            c.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": DIRECTORY_LOCK})
        patient = self.upsert_patient(c, update.patient, update.organization, overwrite)
        encounter_id = None
        if update.encounter is not None:
            encounter = self.upsert_encounter(
                c, update.encounter, patient["id"], update.organization, overwrite
            )
            encounter_id = encounter["id"]
        if update.merge_from:
            self.merge_patients(c, patient["id"], [(i.system, i.value) for i in update.merge_from])
        if dedupe is not None:
            _remember(c, dedupe, [])
        return patient["id"], encounter_id

    def transaction_exists(self, transaction_id: str) -> bool:
        with self.engine.connect() as c:
            q = sa.select(documents.c.transaction_id).where(
                documents.c.transaction_id == transaction_id
            )
            return c.execute(q).first() is not None

    def tx_claim(self, c: Connection, transaction_id: str, route: str) -> Claim | None:
        """Take a delivery for work: in-progress (with the attempt counted) unless it is final.

        Returns None when the delivery does not exist; ``Claim.document`` is None when the
        delivery is already final (a redelivered queue item), so the caller just acknowledges it.
        """
        row = c.execute(
            sa.select(deliveries.c.status, deliveries.c.replay_mode).where(
                deliveries.c.transaction_id == transaction_id, deliveries.c.route == route
            )
        ).first()
        if row is None:
            return None
        previous = Status(row[0])
        if previous.is_final:
            return Claim(previous, None)
        at = now()
        c.execute(
            deliveries.update()
            .where(deliveries.c.transaction_id == transaction_id, deliveries.c.route == route)
            .values(
                status=Status.IN_PROGRESS.value,
                status_at=at,
                attempts=deliveries.c.attempts + 1,
            )
        )
        if previous != Status.IN_PROGRESS:
            c.execute(
                status_events.insert().values(
                    transaction_id=transaction_id,
                    route=route,
                    status=Status.IN_PROGRESS.value,
                    at=at,
                    reason=None,
                )
            )
        return Claim(previous, self._document(c, transaction_id), row[1])

    def _document(self, c: Connection, transaction_id: str) -> Document:
        """The document as a format renders it; a large payload is read without a second copy
        of it in memory (engine/payload_read.py), the size recorded at acceptance telling."""
        doc = c.execute(
            sa.select(documents).where(documents.c.transaction_id == transaction_id)
        ).one()
        payload = read_payload(c, transaction_id, int(doc.payload_size))
        patient = live_patient_resource(c, doc.patient_id) or {
            "resourceType": "Patient",
            "id": doc.patient_id,
        }
        encounter = encounter_resource(c, doc.encounter_id) if doc.encounter_id else None
        created = _aware(doc.created_at)
        assert created is not None
        return Document(
            transaction_id=doc.transaction_id,
            created_at=created,
            content_type=doc.content_type,
            document_type=doc.document_type,
            title=doc.title,
            payload=payload,
            patient=patient,
            encounter=encounter,
            sender_identifier=doc.sender_identifier,
            sender_application=doc.sender_application,
        )

    def tx_set_status(
        self,
        c: Connection,
        transaction_id: str,
        route: str,
        status: Status,
        reason: str | None = None,
        sent_at: datetime | None = None,
    ) -> Status | None:
        """Record a status change with its reason in the history; returns the previous status."""
        at = now()
        old = c.execute(
            sa.select(deliveries.c.status).where(
                deliveries.c.transaction_id == transaction_id, deliveries.c.route == route
            )
        ).scalar()
        values: dict[str, Any] = {"status": status.value, "status_at": at, "reason": reason}
        if sent_at is not None:
            values["sent_at"] = sent_at
        c.execute(
            deliveries.update()
            .where(deliveries.c.transaction_id == transaction_id, deliveries.c.route == route)
            .values(**values)
        )
        c.execute(
            status_events.insert().values(
                transaction_id=transaction_id,
                route=route,
                status=status.value,
                at=at,
                reason=reason,
            )
        )
        return Status(old) if old else None

    def tx_mark_unqueued(self, c: Connection, transaction_id: str, route: str, reason: str) -> bool:
        """Record that a delivery's queue item was not confirmed, unless a worker took it.

        An unconfirmed publish may still have been queued (the confirm was lost, not the item),
        and a worker elsewhere may already be on it: only a delivery still in ``preparation``
        becomes entered-in-error. Returns False when a worker had it (it was queued after all).
        """
        at = now()
        done = c.execute(
            deliveries.update()
            .where(
                deliveries.c.transaction_id == transaction_id,
                deliveries.c.route == route,
                deliveries.c.status == Status.PREPARATION.value,
            )
            .values(status=Status.ENTERED_IN_ERROR.value, status_at=at, reason=reason)
        )
        if done.rowcount != 1:
            return False
        c.execute(
            status_events.insert().values(
                transaction_id=transaction_id,
                route=route,
                status=Status.ENTERED_IN_ERROR.value,
                at=at,
                reason=reason,
            )
        )
        return True

    def deliveries_of(self, transaction_id: str) -> list[DeliveryRow]:
        q = (
            sa.select(deliveries)
            .where(deliveries.c.transaction_id == transaction_id)
            .order_by(deliveries.c.route)
        )
        with self.engine.connect() as c:
            return [_delivery(r) for r in c.execute(q)]

    def history(self, transaction_id: str) -> list[tuple[str, Status, datetime, str | None]]:
        q = (
            sa.select(status_events)
            .where(status_events.c.transaction_id == transaction_id)
            .order_by(status_events.c.id)
        )
        with self.engine.connect() as c:
            return [
                (r.route, Status(r.status), _aware(r.at) or now(), r.reason) for r in c.execute(q)
            ]

    def tx_take_orphans(self, c: Connection, untouched_since: datetime) -> list[tuple[str, str]]:
        """Unfinished deliveries untouched since then, marked touched now, to be queued again.

        On PostgreSQL one engine at a time does this (a transaction-scoped advisory lock; the
        others find nothing), and the touch keeps the next engine starting from taking them
        too, so workers starting together do not queue the same orphan twice.
        """
        if not self.is_sqlite:
            locked = c.execute(sa.select(sa.func.pg_try_advisory_xact_lock(ORPHAN_LOCK)))
            if not locked.scalar():
                return []
        found = [
            (r[0], r[1])
            for r in c.execute(
                sa.select(deliveries.c.transaction_id, deliveries.c.route)
                .where(
                    deliveries.c.status.in_([Status.PREPARATION.value, Status.IN_PROGRESS.value]),
                    deliveries.c.status_at < untouched_since,
                )
                .order_by(deliveries.c.status_at)
            )
        ]
        at = now()
        for txid, route in found:
            c.execute(
                deliveries.update()
                .where(deliveries.c.transaction_id == txid, deliveries.c.route == route)
                .values(status_at=at)
            )
        return found

    def unfinished(self, untouched_since: datetime | None = None) -> list[tuple[str, str]]:
        """Deliveries not in a final state, oldest first: what start-up recovery re-enqueues.

        ``untouched_since``: only those whose status has not changed since then.
        """
        q = (
            sa.select(deliveries.c.transaction_id, deliveries.c.route)
            .join(documents, documents.c.transaction_id == deliveries.c.transaction_id)
            .where(deliveries.c.status.in_([Status.PREPARATION.value, Status.IN_PROGRESS.value]))
            .order_by(documents.c.created_at, documents.c.transaction_id)
        )
        if untouched_since is not None:
            q = q.where(deliveries.c.status_at < untouched_since)
        with self.engine.connect() as c:
            return [(r[0], r[1]) for r in c.execute(q)]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    _sqlite_connect_autocommit(dbapi_connection)
    cur = dbapi_connection.cursor()
    # Pruned space goes back to the file system (engine/retention.py). A new database takes it
    # only here, before journal_mode=WAL; on an existing one the pragma would wait for the write
    # lock, so it is set only while the file is empty (page_count 0).
    if cur.execute("PRAGMA page_count").fetchone()[0] == 0:
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the sender is answered, power loss included.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_connect_autocommit(dbapi_connection: Any) -> None:
    dbapi_connection.isolation_level = None


# Set in the reader pool's threads: their transactions only read.
_reader = threading.local()


def _mark_reader() -> None:
    _reader.only_reads = True


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front: a transaction that reads before it writes would
    # otherwise fail at its first write (SQLITE_BUSY_SNAPSHOT, which no busy timeout waits out)
    # whenever another connection committed in between. The reader pool only reads: its
    # transactions begin deferred, so WAL lets them run beside the writer instead of queueing
    # for its lock (they did, and reads were a fifth of a busy engine's time).
    conn.exec_driver_sql("BEGIN" if getattr(_reader, "only_reads", False) else "BEGIN IMMEDIATE")


def _remember(c: Connection, dedupe: tuple[str, str], transaction_ids: list[str]) -> None:
    sender, message_id = dedupe
    c.execute(
        inbound_log.delete().where(
            inbound_log.c.sender == sender, inbound_log.c.message_id == message_id
        )
    )
    c.execute(
        inbound_log.insert().values(
            sender=sender,
            message_id=message_id,
            received_at=now(),
            transaction_ids=",".join(transaction_ids),
        )
    )


def _delivery(r: Any) -> DeliveryRow:
    return DeliveryRow(
        transaction_id=r.transaction_id,
        route=r.route,
        status=Status(r.status),
        status_at=_aware(r.status_at) or now(),
        sent_at=_aware(r.sent_at),
        reason=r.reason,
        attempts=r.attempts,
    )


@dataclass
class _Write:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def done() -> None:
            if self.future.cancelled():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(done)


class _GroupCommit:
    """Writer threads that commit whatever writes are waiting in one transaction.

    Each write still gets its own answer only after the commit that holds it, so "durable before
    the sender is answered" is kept, but concurrent writers share one commit (one fsync) instead
    of paying one each. A write that fails rolls back to its own savepoint and fails alone.
    """

    def __init__(self, engine: Engine, threads: int, max_batch: int = 128) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._run, name=f"store-writer-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self.threads:
            t.start()

    def submit(self, write: _Write) -> None:
        self.queue.put(write)

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Write]) -> None:
        outcomes: list[tuple[_Write, Any, BaseException | None]] = []
        try:
            with self.engine.begin() as c:
                if len(batch) == 1:
                    w = batch[0]
                    outcomes.append((w, w.fn(c, *w.args, **w.kwargs), None))
                else:
                    for w in batch:
                        savepoint = c.begin_nested()
                        try:
                            result = w.fn(c, *w.args, **w.kwargs)
                        except Exception as exc:
                            savepoint.rollback()
                            outcomes.append((w, None, exc))
                        else:
                            savepoint.commit()
                            outcomes.append((w, result, None))
        except Exception as exc:
            for w in batch:
                w.settle(error=exc)
            return
        for w, result, error in outcomes:
            w.settle(result, error)


class AsyncStore:
    """The store from the event loop: reads on a thread pool, writes through group commit."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        # SQLite: one writer (the file allows no more), two readers (WAL lets them run beside it).
        readers, writers = (2, 1) if store.is_sqlite else (8, 4)
        self._pool = ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="store-read", initializer=_mark_reader
        )
        self._writes = _GroupCommit(store.engine, writers)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a read (or the start-up schema creation) on the reader pool; writes use ``write``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def write(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a ``tx_*`` method; returns once the transaction that holds it is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writes.submit(_Write(fn, args, kwargs, loop, future))
        return await future

    def close(self) -> None:
        self._writes.close()
        self._pool.shutdown(wait=True)
        self.sync.dispose()
