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
import contextlib
import functools
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoResultFound

from medcourier.engine.clock import now
from medcourier.engine.directory import (
    DirectoryStore,
    live_patient_resource,
)
from medcourier.engine.directory_run import NotBatchable, tx_apply_directory_run
from medcourier.engine.driver_errors import driver_error
from medcourier.engine.driver_reads import DriverReads
from medcourier.engine.inbound import DirectoryUpdate
from medcourier.engine.model import Document, Status
from medcourier.engine.payload_read import DIRECT_READ_BYTES, read_payload, sqlite_connection
from medcourier.engine.payload_write import DIRECT_WRITE_BYTES, insert_payload
from medcourier.engine.resources import ResourceStore
from medcourier.engine.schema import (
    deliveries,
    documents,
    encounters,
    inbound_log,
    metadata,
    patients,
    payloads,
    status_events,
)
from medcourier.engine.sqlite_statements import DriverStatement, driver_insert


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


@dataclass(frozen=True)
class StatusChange:
    """One delivery's new status, for ``Store.tx_set_statuses``."""

    transaction_id: str
    status: Status
    reason: str | None = None
    sent_at: datetime | None = None


# What the payloads of deliveries claimed ahead of their turn (``Store.tx_claim_batch``) may add
# up to; each is at most DIRECT_READ_BYTES, larger ones are claimed on their own turn.
AHEAD_BYTES = 8 * 1024 * 1024

_FINAL = (Status.COMPLETED.value, Status.ENTERED_IN_ERROR.value)


# pg_advisory_xact_lock key serialising directory updates ("mcdir" in ASCII).
DIRECTORY_LOCK = 0x6D63646972
# pg_try_advisory_xact_lock key of the start-up orphan sweep ("mcorph").
ORPHAN_LOCK = 0x6D636F727068

log = structlog.get_logger("medcourier.store")

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def rerunnable(fn: F) -> F:
    """Mark a ``tx_*`` function that does nothing but its statements: run again after its
    batch was rolled back, it does the same and answers the same. The group commit runs a batch
    of such writes without savepoints (two statements fewer each), and again with them when
    one fails (``_GroupCommit._commit``). A function that keeps anything in Python (an id it
    made for its caller, a list it appends to) must not be marked."""
    fn.rerunnable = True  # type: ignore[attr-defined]
    return fn


def runs_together(name: str) -> Callable[[F], F]:
    """Mark a :func:`rerunnable` ``tx_*`` method whose writes, when a group commit holds several
    in a row, run as one call of the method ``name``: the writes' arguments in, a list of
    their answers out. Should that call raise, the batch runs again write by write
    (``_GroupCommit._commit``). The ADT feed's directory updates go this way: concurrent
    connections' messages applied in a few statements (engine/directory_run.py)."""

    def mark(fn: F) -> F:
        fn.together = name  # type: ignore[attr-defined]
        return fn

    return mark


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
            # Threads that may hold a connection at once: 8 readers, 4 group-commit writers, the
            # directory runs' writer, 4 journal writers (autocommit), a journal applier's lock
            # per listener, the pruner and the control API. Past that, a write waits for one.
            # Each reader may also keep one outside the pool (driver_reads.py): up to 8 more.
            kwargs["max_overflow"] = 24
            # No pre-ping: it costs a round trip per checkout; a dropped connection fails one
            # call and the pool replaces it.
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            # pysqlite begins transactions lazily and breaks SAVEPOINT, which group commit
            # needs: let SQLAlchemy emit BEGIN itself (the SQLAlchemy SQLite docs' recipe).
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        # The hot path's reads on the driver (driver_reads.py); not on ``sqlite://``'s in-memory
        # database, which a connection of their own would see empty.
        database = self.engine.url.database or ""
        in_memory = self.is_sqlite and (
            not database or ":memory:" in database or self.engine.url.query.get("mode") == "memory"
        )
        self.driver_reads = None if in_memory else DriverReads(self.engine)

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    def dispose(self) -> None:
        if self.driver_reads is not None:
            self.driver_reads.close()
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
    @rerunnable
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
        """Commit a document, its payload and one delivery per route (preparation) at once.

        The values go as execute parameters, never into the statements: SQLAlchemy's statement
        cache would keep the first statement, payload included, for the process's life. A large
        payload is written without a copy of it in the driver (engine/payload_write.py). On
        PostgreSQL the rows of a document that is not large go in one statement (``_ACCEPT_PG``):
        four round trips and four executions were most of an accept's cost."""
        at = now()
        route_list = list(routes)
        if not route_list:  # a document nothing would deliver (submit refuses it before this)
            raise ValueError("a document is accepted for at least one route")
        document = {
            "transaction_id": transaction_id,
            "created_at": created_at,
            "content_type": content_type,
            "document_type": document_type,
            "title": title,
            "sender_identifier": sender_identifier,
            "sender_application": sender_application,
            "patient_id": patient_id,
            "encounter_id": encounter_id,
            "payload_size": len(payload),
        }
        if c.dialect.name == "postgresql" and len(payload) <= DIRECT_WRITE_BYTES:
            rest = {"data": payload, "routes": route_list, "status": Status.PREPARATION.value}
            c.execute(_ACCEPT_PG, {**document, **rest, "at": at})
            return
        raw = sqlite_connection(c)  # None off SQLite
        if raw is not None and len(payload) <= DIRECT_WRITE_BYTES:
            # on the driver itself (engine/sqlite_statements.py): SQLAlchemy's execution of these
            # four was as much of the engine's time as the HTTP handler
            status = Status.PREPARATION.value
            rows = [
                {"transaction_id": transaction_id, "route": r, "status": status, "at": at}
                for r in route_list
            ]
            _ACCEPT_SQLITE[0].run(c, raw, [document])
            _ACCEPT_SQLITE[1].run(c, raw, [{"transaction_id": transaction_id, "data": payload}])
            _ACCEPT_SQLITE[2].run(c, raw, rows)
            _ACCEPT_SQLITE[3].run(c, raw, rows)
            return
        c.execute(documents.insert(), document)
        insert_payload(c, transaction_id, payload)
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

    @rerunnable
    def tx_remember(
        self, c: Connection, sender: str, message_id: str, transaction_ids: list[str]
    ) -> None:
        _remember(c, (sender, message_id), transaction_ids)

    @rerunnable
    def tx_apply_directory_update(
        self, c: Connection, update: DirectoryUpdate, dedupe: tuple[str, str] | None = None
    ) -> tuple[str, str | None]:
        """Apply an ADT event in one transaction; returns (patient id, encounter id).

        Kind ``ensure`` (documents arriving by message) creates what is missing and changes
        nothing that exists. ``dedupe`` is remembered with it, as ``tx_remember`` would.
        """
        lock_directory(c)
        if dedupe is not None:
            _remember(c, dedupe, [])
        return self._directory_update(c, update)

    @rerunnable
    @runs_together("tx_apply_directory_updates_once")
    def tx_apply_directory_update_once(
        self, c: Connection, update: DirectoryUpdate, dedupe: tuple[str, str], window: timedelta
    ) -> tuple[str, str | None] | Duplicate:
        """``tx_apply_directory_update`` with ``dedupe`` remembered, unless this sender already
        sent this message id within ``window`` (what ``seen`` tells): then nothing is applied
        and the transaction ids remembered with it are returned as a :class:`Duplicate`.

        The check and the remembering are one statement in the update's own transaction, after
        the directory lock: no read before the write, and a resend racing its original waits
        for it and is answered as its duplicate. A transaction that fails forgets both.
        """
        lock_directory(c)
        if not _remember_unless_seen(c, dedupe, window):
            return Duplicate(_remembered(c, dedupe))
        return self._directory_update(c, update)

    @rerunnable
    def tx_apply_directory_updates_once(
        self, c: Connection, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    ) -> list[tuple[str, str | None] | Duplicate]:
        """Writes of ``tx_apply_directory_update_once`` (their arguments) as one run; raises
        ``NotBatchable`` when the run is not for that path (the writes then go one by one)."""
        if any(kwargs or len(args) != 3 for args, kwargs in calls):
            raise NotBatchable("arguments by name")
        windows = {window for (_, _, window), _ in calls}
        if len(windows) != 1:
            raise NotBatchable("several duplicate windows")
        run = [(dedupe, update) for (update, dedupe, _), _ in calls]
        lock_directory(c)
        done = tx_apply_directory_run(c, run, windows.pop())
        return [
            ids if ids is not None else Duplicate(_remembered(c, dedupe))
            for ids, (dedupe, _) in zip(done, run, strict=True)
        ]

    def _directory_update(self, c: Connection, update: DirectoryUpdate) -> tuple[str, str | None]:
        overwrite = update.kind != "ensure"
        patient = self.upsert_patient(c, update.patient, update.organization, overwrite)
        encounter_id = None
        if update.encounter is not None:
            encounter = self.upsert_encounter(
                c, update.encounter, patient["id"], update.organization, overwrite
            )
            encounter_id = encounter["id"]
        if update.merge_from:
            self.merge_patients(c, patient["id"], [(i.system, i.value) for i in update.merge_from])
        return patient["id"], encounter_id

    def transaction_exists(self, transaction_id: str) -> bool:
        with self.engine.connect() as c:
            q = sa.select(documents.c.transaction_id).where(
                documents.c.transaction_id == transaction_id
            )
            return c.execute(q).first() is not None

    @rerunnable
    def tx_claim(self, c: Connection, transaction_id: str, route: str) -> Claim | None:
        """Take a delivery for work: in-progress (with the attempt counted) unless it is final.

        Returns None when the delivery does not exist; ``Claim.document`` is None when the
        delivery is already final (a redelivered queue item), so the caller just acknowledges it.
        Three statements: one read of the delivery with its document, payload, patient and
        encounter (``_claim_read``), the update, the history row (``tx_claim_batch``).
        """
        return self.tx_claim_batch(c, route, transaction_id)[0]

    @rerunnable
    def tx_claim_batch(
        self,
        c: Connection,
        route: str,
        transaction_id: str,
        ahead: Sequence[str] = (),
        ahead_bytes: int = AHEAD_BYTES,
    ) -> tuple[Claim | None, dict[str, Claim]]:
        """Claim ``transaction_id`` as ``tx_claim`` does, and with it what of ``ahead`` (the
        route's next queue items) can be: one read, one update and one history insert for all.

        The ``ahead`` claims are a bonus: a delivery that does not exist, whose payload is gone
        or large (read on its own turn, engine/payload_read.py), or that would take the payloads
        held past ``ahead_bytes``, is left untouched, to be claimed when its turn comes. A final
        one is answered with no document, as ``tx_claim`` answers it. Returns the claim of
        ``transaction_id`` and those of ``ahead`` by transaction id.
        """
        wanted = [transaction_id, *dict.fromkeys(t for t in ahead if t != transaction_id)]
        read = _claim_read(c.dialect.name)
        rows = {r.transaction_id: r for r in c.execute(read, {"route": route, "txids": wanted})}
        head = rows.get(transaction_id)
        if head is not None and not Status(head.status).is_final and _no_payload(head):
            # A pruned payload (or a delivery without its document) fails the claim, as reading
            # it did, before anything is written.
            raise NoResultFound("the document has no payload")
        at = now()
        budget = ahead_bytes
        taken: list[Any] = []
        finals: dict[str, Claim] = {}
        for txid in wanted:
            row = rows.get(txid)
            if row is None:
                continue
            previous = Status(row.status)
            if previous.is_final:
                finals[txid] = Claim(previous, None)
                continue
            if txid != transaction_id:
                if row.data is None or row.payload_size > budget:
                    continue
                budget -= row.payload_size
            taken.append(row)
        if taken:
            _mark_claimed(c, route, taken, at)
        claims = {
            r.transaction_id: Claim(Status(r.status), self._document(c, r), r.replay_mode)
            for r in taken
        }
        claims.update(finals)
        return claims.pop(transaction_id, None), claims

    def _document(self, c: Connection, row: Any) -> Document:
        """The document as a format renders it, from a row of ``_claim_read``. A large payload
        is read apart, without a second copy of it in memory (engine/payload_read.py), the size
        recorded at acceptance telling."""
        payload = row.data
        if payload is None:
            payload = read_payload(c, row.transaction_id, int(row.payload_size))
        patient = None
        if row.patient is not None and row.merged_into is None:
            patient = json.loads(row.patient)
        elif row.patient is not None:  # merged: follow the chain to the survivor
            patient = live_patient_resource(c, row.patient_id)
        created = _aware(row.created_at)
        assert created is not None
        return Document(
            transaction_id=row.transaction_id,
            created_at=created,
            content_type=row.content_type,
            document_type=row.document_type,
            title=row.title,
            payload=bytes(payload),  # no copy when the driver gave bytes already
            patient=patient or {"resourceType": "Patient", "id": row.patient_id},
            encounter=json.loads(row.encounter) if row.encounter is not None else None,
            sender_identifier=row.sender_identifier,
            sender_application=row.sender_application,
        )

    @rerunnable
    def tx_set_status(
        self,
        c: Connection,
        transaction_id: str,
        route: str,
        status: Status,
        reason: str | None = None,
        sent_at: datetime | None = None,
    ) -> Status | None:
        """Record a status change with its reason in the history; returns the previous status.

        PostgreSQL: one statement (the row locked and read, updated and its history row added in
        a ``WITH``). SQLite runs in-process under the writer's lock: a read, the update, the
        insert.
        """
        params = {
            "b_txid": transaction_id,
            "b_route": route,
            "b_status": status.value,
            "b_at": now(),
            "b_reason": reason,
            "b_sent": sent_at,
        }
        if c.dialect.name == "postgresql":
            previous = c.execute(_SET_STATUS_PG, params).scalar()
        else:
            previous = c.execute(_STATUS_OF, params).scalar()
            _record_statuses(c, [params])
        return Status(previous) if previous else None

    @rerunnable
    def tx_set_statuses(
        self, c: Connection, route: str, changes: Sequence[StatusChange]
    ) -> list[Status | None]:
        """``tx_set_status`` for several deliveries of ``route`` at once (a worker's finished
        deliveries): one read of their statuses, one update and one insert, each run for all.
        Returns each one's previous status, in the order of ``changes``."""
        if len(changes) == 1:  # one statement on PostgreSQL
            (ch,) = changes
            return [
                self.tx_set_status(c, ch.transaction_id, route, ch.status, ch.reason, ch.sent_at)
            ]
        if not changes:
            return []
        at = now()
        txids = [ch.transaction_id for ch in changes]
        read = _STATUSES_OF_PG if c.dialect.name == "postgresql" else _STATUSES_OF
        previous = {
            r.transaction_id: Status(r.status)
            for r in c.execute(read, {"b_route": route, "b_txids": txids})
        }
        rows = [
            {
                "b_txid": ch.transaction_id,
                "b_route": route,
                "b_status": ch.status.value,
                "b_at": at,
                "b_reason": ch.reason,
                "b_sent": ch.sent_at,
            }
            for ch in changes
        ]
        _record_statuses(c, rows)
        return [previous.get(t) for t in txids]

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


@functools.cache
def _claim_read(dialect: str) -> sa.Select[Any]:
    """The deliveries of ``:route`` to claim (``:txids``), each with its document, its payload
    when it is small enough to read with a plain query (DIRECT_READ_BYTES), its patient and its
    encounter: one query. A final delivery comes without its document. PostgreSQL locks the
    deliveries read (``FOR UPDATE``), so their status cannot change before the claim's update.
    Built once: building it cost more than running it."""
    small = sa.case((documents.c.payload_size <= DIRECT_READ_BYTES, payloads.c.data))
    joined = (
        deliveries.outerjoin(
            documents,
            sa.and_(
                documents.c.transaction_id == deliveries.c.transaction_id,
                deliveries.c.status.not_in(_FINAL),
            ),
        )
        .outerjoin(payloads, payloads.c.transaction_id == documents.c.transaction_id)
        .outerjoin(patients, patients.c.id == documents.c.patient_id)
        .outerjoin(encounters, encounters.c.id == documents.c.encounter_id)
    )
    q = (
        sa.select(
            deliveries.c.transaction_id,
            deliveries.c.status,
            deliveries.c.replay_mode,
            documents.c.created_at,
            documents.c.content_type,
            documents.c.document_type,
            documents.c.title,
            documents.c.sender_identifier,
            documents.c.sender_application,
            documents.c.patient_id,
            documents.c.payload_size,
            small.label("data"),
            patients.c.resource.label("patient"),
            patients.c.merged_into,
            encounters.c.resource.label("encounter"),
        )
        .select_from(joined)
        .where(
            deliveries.c.route == sa.bindparam("route"),
            deliveries.c.transaction_id.in_(sa.bindparam("txids", expanding=True)),
        )
    )
    if dialect == "postgresql":
        q = q.with_for_update(of=deliveries)
    return q


def _no_payload(row: Any) -> bool:
    """A row of ``_claim_read`` whose document or small payload is missing (a large payload is
    not in the row: ``read_payload`` tells whether it is there)."""
    return row.data is None and (row.created_at is None or row.payload_size <= DIRECT_READ_BYTES)


def _mark_claimed(c: Connection, route: str, rows: list[Any], at: datetime) -> None:
    """Set the deliveries of ``rows`` (read by ``_claim_read``) in-progress with the attempt
    counted, and add the history row of those that were not in progress already. On PostgreSQL
    this is one statement (the update in a ``WITH`` of the insert)."""
    txids = [r.transaction_id for r in rows]
    fresh = [r.transaction_id for r in rows if r.status != Status.IN_PROGRESS.value]
    params = {"b_route": route, "b_txids": txids, "b_fresh": fresh, "b_at": at}
    if fresh and c.dialect.name == "postgresql":
        c.execute(_CLAIM_AND_RECORD, params)
        return
    c.execute(_CLAIM, params)
    if fresh:
        c.execute(_RECORD_CLAIMED, params)


# tx_accept_document on PostgreSQL: the document, its payload, a delivery per route and their
# history rows, in one statement (the inserts in a WITH), history rows in the routes' order.
_ACCEPT_PG = sa.text(
    "WITH doc AS (INSERT INTO documents (transaction_id, created_at, content_type,"
    " document_type, title, sender_identifier, sender_application, patient_id, encounter_id,"
    " payload_size) VALUES (:transaction_id, :created_at, :content_type, :document_type, :title,"
    " :sender_identifier, :sender_application, :patient_id, :encounter_id, :payload_size)),"
    " pay AS (INSERT INTO payloads (transaction_id, data) VALUES (:transaction_id, :data)),"
    " dlv AS (INSERT INTO deliveries (transaction_id, route, status, status_at, attempts)"
    " SELECT :transaction_id, r, :status, :at, 0 FROM unnest(CAST(:routes AS text[])) AS r)"
    " INSERT INTO status_events (transaction_id, route, status, at, reason)"
    " SELECT :transaction_id, u.r, :status, :at, 'accepted'"
    " FROM unnest(CAST(:routes AS text[])) WITH ORDINALITY AS u(r, n) ORDER BY u.n"
).bindparams(
    sa.bindparam("created_at", type_=documents.c.created_at.type),
    sa.bindparam("at", type_=deliveries.c.status_at.type),
    sa.bindparam("data", type_=payloads.c.data.type),
    sa.bindparam("routes", type_=postgresql.ARRAY(sa.String())),
)


# The columns an accept sets in documents (every one today; a column added later and left out
# is NULL, as through SQLAlchemy).
_DOCUMENT_COLUMNS = (
    "transaction_id",
    "created_at",
    "content_type",
    "document_type",
    "title",
    "sender_identifier",
    "sender_application",
    "patient_id",
    "encounter_id",
    "payload_size",
)
# tx_accept_document on SQLite, on the driver: document, payload, deliveries, history rows.
_ACCEPT_SQLITE = (
    driver_insert(documents, _DOCUMENT_COLUMNS),
    driver_insert(payloads, ["transaction_id", "data"]),
    DriverStatement(
        deliveries.insert().values(
            status_at=sa.bindparam("at", type_=deliveries.c.status_at.type), attempts=0
        ),
        ["transaction_id", "route", "status"],
    ),
    DriverStatement(
        status_events.insert().values(reason="accepted"),
        ["transaction_id", "route", "status", "at"],
    ),
)


# Status changes (tx_set_status, tx_set_statuses), built once. A change without a sent time
# keeps the one recorded.
_KEY = (
    deliveries.c.transaction_id == sa.bindparam("b_txid"),
    deliveries.c.route == sa.bindparam("b_route"),
)
_STATUS_OF = sa.select(deliveries.c.status).where(*_KEY)
_STATUS_VALUES = {
    "status": sa.bindparam("b_status", type_=deliveries.c.status.type),
    "status_at": sa.bindparam("b_at", type_=deliveries.c.status_at.type),
    "reason": sa.bindparam("b_reason", type_=deliveries.c.reason.type),
    "sent_at": sa.func.coalesce(
        sa.bindparam("b_sent", type_=deliveries.c.sent_at.type), deliveries.c.sent_at
    ),
}
_SET_STATUS = deliveries.update().where(*_KEY).values(_STATUS_VALUES)
_STATUS_EVENT = status_events.insert().values(
    transaction_id=sa.bindparam("b_txid", type_=status_events.c.transaction_id.type),
    route=sa.bindparam("b_route", type_=status_events.c.route.type),
    status=sa.bindparam("b_status", type_=status_events.c.status.type),
    at=sa.bindparam("b_at", type_=status_events.c.at.type),
    reason=sa.bindparam("b_reason", type_=status_events.c.reason.type),
)
_STATUSES_OF = sa.select(deliveries.c.transaction_id, deliveries.c.status).where(
    deliveries.c.route == sa.bindparam("b_route"),
    deliveries.c.transaction_id.in_(sa.bindparam("b_txids", expanding=True)),
)
_STATUSES_OF_PG = _STATUSES_OF.with_for_update()
_SET_STATUS_SQLITE = DriverStatement(_SET_STATUS)
_STATUS_EVENT_SQLITE = DriverStatement(_STATUS_EVENT)


def _record_statuses(c: Connection, rows: list[dict[str, Any]]) -> None:
    """The update and the history row of each status change in ``rows``; on SQLite's driver, as
    an accept's inserts. (A single change on PostgreSQL takes ``_SET_STATUS_PG`` instead.)"""
    raw = sqlite_connection(c)  # None off SQLite
    if raw is None:
        c.execute(_SET_STATUS, rows)
        c.execute(_STATUS_EVENT, rows)
        return
    _SET_STATUS_SQLITE.run(c, raw, rows)
    _STATUS_EVENT_SQLITE.run(c, raw, rows)


def _set_status_pg() -> Any:
    """PostgreSQL's one statement: the row locked and read, updated (FROM ``before``: the update
    waits for the row read as it was) and its history row added, in a ``WITH``."""
    before = sa.select(deliveries.c.transaction_id, deliveries.c.status).where(*_KEY)
    before_cte = before.with_for_update().cte("before")
    change = (
        deliveries.update()
        .where(
            deliveries.c.transaction_id == before_cte.c.transaction_id,
            deliveries.c.route == sa.bindparam("b_route"),
        )
        .values(_STATUS_VALUES)
        .returning(deliveries.c.transaction_id)
        .cte("change")
    )
    added = _STATUS_EVENT.returning(status_events.c.id).cte("added")
    return sa.select(before_cte.c.status).add_cte(change, added)


_SET_STATUS_PG = _set_status_pg()


# _mark_claimed's statements, built once (building one cost more than running it): the update,
# the history rows of the deliveries that were not in progress (``:b_fresh``), and on PostgreSQL
# both in one statement, the history read from the update's RETURNING.
_CLAIM = (
    deliveries.update()
    .where(
        deliveries.c.route == sa.bindparam("b_route"),
        deliveries.c.transaction_id.in_(sa.bindparam("b_txids", expanding=True)),
    )
    .values(
        status=Status.IN_PROGRESS.value,
        status_at=sa.bindparam("b_at", type_=deliveries.c.status_at.type),
        attempts=deliveries.c.attempts + 1,
    )
)


def _claimed_history(source: Any) -> Any:
    """``INSERT INTO status_events`` the in-progress rows of ``source``'s ``:b_fresh`` ids."""
    rows = sa.select(
        source.c.transaction_id,
        sa.bindparam("b_route", type_=status_events.c.route.type),
        sa.literal(Status.IN_PROGRESS.value, status_events.c.status.type),
        sa.bindparam("b_at", type_=status_events.c.at.type),
        sa.null(),
    ).where(source.c.transaction_id.in_(sa.bindparam("b_fresh", expanding=True)))
    columns = ["transaction_id", "route", "status", "at", "reason"]
    return status_events.insert().from_select(columns, rows)


_RECORD_CLAIMED = _claimed_history(
    sa.select(deliveries.c.transaction_id)
    .where(deliveries.c.route == sa.bindparam("b_route"))
    .subquery()
)
_claimed = _CLAIM.returning(deliveries.c.transaction_id).cte("claimed")
_CLAIM_AND_RECORD = _claimed_history(_claimed).add_cte(_claimed)


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
    # Straight to the driver: through ``exec_driver_sql`` (execution context, cursor, result,
    # events) the BEGIN cost more of the writer thread than the inbound journal's insert.
    # The event runs outside SQLAlchemy's wrapping of driver errors: wrap them here, so that a
    # write lock not had within the busy timeout is the OperationalError callers expect.
    statement = "BEGIN" if getattr(_reader, "only_reads", False) else "BEGIN IMMEDIATE"
    driver = conn.connection.driver_connection
    assert driver is not None  # an open connection
    try:
        driver.execute(statement)
    except sqlite3.Error as exc:
        raise driver_error(conn, exc, statement) from exc


@dataclass(frozen=True)
class Duplicate:
    """A message this sender already sent within the duplicate window (nothing was applied):
    the transaction ids remembered with it."""

    transaction_ids: tuple[str, ...]


# Connection.info key: the transaction that holds the directory lock (``lock_directory``).
_DIRECTORY_LOCKED = "medcourier.directory_locked"
_TAKE_DIRECTORY_LOCK = sa.text("SELECT pg_advisory_xact_lock(:key)")


def lock_directory(c: Connection) -> None:
    """Take the lock that makes directory updates take turns, once per transaction.

    Find-then-insert by identifier races between writer threads: two admissions of the same new
    patient would create it twice. One transaction-scoped advisory lock (PostgreSQL; SQLite has
    a single writer already) makes them take turns. It is held until the commit, so a group
    commit's later writes need not ask again, unless a savepoint was rolled back since:
    PostgreSQL releases the locks taken within it (``_forget_directory_lock``).
    """
    if c.dialect.name != "postgresql":
        return
    transaction = c.get_transaction()
    if transaction is not None and c.info.get(_DIRECTORY_LOCKED) is transaction:
        return
    c.execute(_TAKE_DIRECTORY_LOCK, {"key": DIRECTORY_LOCK})
    c.info[_DIRECTORY_LOCKED] = transaction


@sa.event.listens_for(Engine, "rollback_savepoint")
def _forget_directory_lock(conn: Connection, name: str, context: Any) -> None:
    """A savepoint rolled back may have taken the directory lock with it: ask again."""
    conn.info.pop(_DIRECTORY_LOCKED, None)


@functools.cache
def _log_upsert(dialect: str, unless_seen: bool) -> Any:
    """``INSERT .. ON CONFLICT (sender, message_id) DO UPDATE``, the row replaced: one statement
    where a delete and an insert were two. ``unless_seen``: only a row received before
    ``:cutoff`` is replaced, and the statement returns a row only when it wrote one."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    received = inbound_log.c.received_at
    stmt = insert(inbound_log).values(
        sender=sa.bindparam("log_sender", type_=inbound_log.c.sender.type),
        message_id=sa.bindparam("log_message_id", type_=inbound_log.c.message_id.type),
        received_at=sa.bindparam("log_received_at", type_=received.type),
        transaction_ids=sa.bindparam("log_transaction_ids", type_=sa.Text()),
    )
    upsert = stmt.on_conflict_do_update(
        index_elements=[inbound_log.c.sender, inbound_log.c.message_id],
        set_={
            "received_at": stmt.excluded.received_at,
            "transaction_ids": stmt.excluded.transaction_ids,
        },
        where=received < sa.bindparam("log_cutoff", type_=received.type) if unless_seen else None,
    )
    return upsert.returning(inbound_log.c.sender) if unless_seen else upsert


def _log_params(dedupe: tuple[str, str], transaction_ids: list[str]) -> dict[str, Any]:
    return {
        "log_sender": dedupe[0],
        "log_message_id": dedupe[1],
        "log_received_at": now(),
        "log_transaction_ids": ",".join(transaction_ids),
    }


def _remember(c: Connection, dedupe: tuple[str, str], transaction_ids: list[str]) -> None:
    c.execute(_log_upsert(c.dialect.name, False), _log_params(dedupe, transaction_ids))


def _remember_unless_seen(c: Connection, dedupe: tuple[str, str], window: timedelta) -> bool:
    """Remember ``dedupe`` unless it was received within ``window`` (``Store.seen``'s rule);
    True when it was remembered."""
    params = _log_params(dedupe, [])
    params["log_cutoff"] = params["log_received_at"] - window
    return c.execute(_log_upsert(c.dialect.name, True), params).first() is not None


def _remembered(c: Connection, dedupe: tuple[str, str]) -> tuple[str, ...]:
    """The transaction ids remembered with ``dedupe``."""
    ids = c.execute(
        sa.select(inbound_log.c.transaction_ids).where(
            inbound_log.c.sender == dedupe[0], inbound_log.c.message_id == dedupe[1]
        )
    ).scalar()
    return tuple(t for t in (ids or "").split(",") if t)


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


class _Losses:
    """How many times a writer thread found its connection lost, shared by all the writer lanes
    of one store: their threads keep their connections out of the pool, so SQLAlchemy's own
    reset of the pool after a disconnect does not reach them."""

    def __init__(self) -> None:
        self.count = 0


class _WriterThreads:
    """Threads that take writes from one queue until closed; subclasses say how a thread
    commits what it takes (``_work``).

    Each thread keeps one connection for its life rather than taking one from the pool per
    commit: checking a connection out and in (SQLAlchemy's pool, its events, the reset on
    return) cost more than the journal's insert itself, on the thread every ACK waits for. A
    connection the driver lost is dropped, and so are the other threads' ones, in every lane of
    the store (a lost connection usually means the server restarted or cut every session):
    each connects again at its next write, as a pool checkout would have.
    """

    def __init__(
        self, engine: Engine, threads: int, name: str, losses: _Losses | None = None
    ) -> None:
        self.engine = engine
        self.queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._losses = losses or _Losses()
        self.threads = [
            threading.Thread(target=self._run, name=f"store-{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self.threads:
            t.start()

    def submit(self, write: _Write) -> None:
        self.queue.put(write)

    def close(self) -> None:
        """Let each thread finish the writes queued before this, then end it."""
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()

    def _run(self) -> None:
        try:
            self._work()
        finally:
            self._drop()

    def _work(self) -> None:
        raise NotImplementedError

    def _connect(self) -> Connection:
        return self.engine.connect()

    def _connection(self) -> Connection:
        """This thread's connection: connected on first use, and again after one was lost."""
        local = self._local
        if getattr(local, "conn", None) is not None and local.losses != self._losses.count:
            self._drop()  # another thread lost its connection: this one likely went too
        if getattr(local, "conn", None) is None:
            local.conn, local.losses = self._connect(), self._losses.count
        conn: Connection = local.conn
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A transaction on this thread's connection: committed at the end, rolled back on an
        exception (after which a lost connection is dropped)."""
        conn = self._connection()
        try:
            with conn.begin():
                yield conn
        except BaseException as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: BaseException) -> None:
        """After a write failed: drop this thread's connection if the driver lost it (and have
        the other threads connect again), else make sure no transaction is left open on it."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        if conn.invalidated or (isinstance(exc, Exception) and _lost(exc)):
            self._losses.count += 1
            self._drop()
            return
        if conn.in_transaction():
            try:
                conn.rollback()
            except Exception:
                self._drop()

    def _drop(self) -> None:
        conn: Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):  # it may be broken already; let it go
                conn.close()


class _GroupCommit(_WriterThreads):
    """Writer threads that commit whatever writes are waiting in one transaction.

    Each write still gets its own answer only after the commit that holds it, so "durable before
    the sender is answered" is kept, but concurrent writers share one commit (one fsync) instead
    of paying one each. A write that fails fails alone: a batch first runs without savepoints
    (two statements fewer per write); should one of its writes raise, nothing of it is committed
    and the batch runs again with a savepoint per write, the failing one rolled back to its own.
    """

    def __init__(
        self,
        engine: Engine,
        threads: int,
        name: str = "writer",
        max_batch: int = 128,
        losses: _Losses | None = None,
    ) -> None:
        self.max_batch = max_batch  # before the threads start: they read it
        super().__init__(engine, threads, name, losses)

    def _work(self) -> None:
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
            # The writes hold their arguments (a document's payload among them): let them go now
            # rather than while this thread waits for the next write.
            del batch, first
            if stop:
                return

    def _commit(self, batch: list[_Write]) -> None:
        """Run the batch in one transaction, each write of several in a savepoint of its own.

        A batch of :func:`rerunnable` writes only (the hot path's) runs without savepoints
        first, and again with them when one of its writes fails. Any other write runs once: a
        ``tx_*`` function may keep Python state, such as the id it made for its answer, which a
        second run would make anew for rows the first run rolled back.
        """
        if (
            len(batch) > 1
            and all(getattr(w.fn, "rerunnable", False) for w in batch)
            and not self._commit_together(batch)
        ):
            return
        outcomes: list[tuple[_Write, Any, BaseException | None]] = []
        try:
            with self._transaction() as c:
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

    def _commit_together(self, batch: list[_Write]) -> bool:
        """Run the batch in one transaction without savepoints. True when one of its writes
        raised: the transaction was rolled back, nothing is settled, the caller runs the batch
        again write by write. A failed begin or commit fails every write, as in ``_commit``."""
        results: list[Any] = []
        try:
            with self._transaction() as c:
                for run in _runs(batch):
                    try:
                        if len(run) == 1:
                            results.append(run[0].fn(c, *run[0].args, **run[0].kwargs))
                        else:
                            results += _together(run[0].fn)(c, [(w.args, w.kwargs) for w in run])
                    except Exception as exc:
                        if len(run) > 1 and not isinstance(exc, NotBatchable):
                            # the writes go one by one and say which failed; this says why
                            # the run did not take them (a bug, or a store error)
                            log.warning("store.run_failed", error=type(exc).__name__)
                        raise _WriteFailed from None
        except _WriteFailed:
            return True
        except Exception as exc:
            for w in batch:
                w.settle(error=exc)
            return False
        for w, result in zip(batch, results, strict=True):
            w.settle(result)
        return False


class _Autocommit(_WriterThreads):
    """Writer threads for writes of one statement, each on a connection of its own kept in
    autocommit, so the statement commits as it runs.

    On PostgreSQL a transaction costs three round trips (BEGIN, the statement, COMMIT): for a
    one-statement write that the sender waits on (the inbound journal's insert), two of them
    are pure latency. A thread connects on its first write and keeps the connection; one the
    driver lost is dropped, and the next write connects again.
    """

    def __init__(self, engine: Engine, threads: int, losses: _Losses | None = None) -> None:
        super().__init__(engine, threads, "autocommit", losses)

    def _connect(self) -> Connection:
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def _work(self) -> None:
        while (w := self.queue.get()) is not None:
            try:
                result = w.fn(self._connection(), *w.args, **w.kwargs)
            except Exception as exc:
                self._failed(exc)
                w.settle(error=exc)
            else:
                w.settle(result)
            del w  # its arguments, while this thread waits for the next write


def _lost(exc: Exception) -> bool:
    """Whether ``exc`` says the connection itself is gone (the next write should reconnect)."""
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


def _runs(batch: list[_Write]) -> list[list[_Write]]:
    """The batch cut into runs: consecutive writes of one :func:`runs_together` method make one
    run, any other write a run of its own."""
    runs: list[list[_Write]] = []
    for w in batch:
        if (
            runs
            and getattr(w.fn, "together", None) is not None
            and getattr(w.fn, "__self__", None) is not None
            and runs[-1][-1].fn == w.fn
        ):
            runs[-1].append(w)
        else:
            runs.append([w])
    return runs


def _together(fn: Any) -> Callable[..., list[Any]]:
    """The method a :func:`runs_together` method's run goes to, on the same object."""
    return getattr(fn.__self__, fn.together)  # type: ignore[no-any-return]


class _WriteFailed(Exception):
    """A write of a batch run without savepoints raised (``_GroupCommit._commit_together``)."""


class AsyncStore:
    """The store from the event loop: reads on a thread pool, writes through group commit."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        # SQLite: one writer (the file allows no more), two readers (WAL lets them run beside it).
        readers, writers = (2, 1) if store.is_sqlite else (8, 4)
        self._pool = ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="store-read", initializer=_mark_reader
        )
        self.writers = writers  # how many writes may commit at once
        losses = _Losses()  # one lane finding the server gone has the others connect again
        self._writes = _GroupCommit(store.engine, writers, losses=losses)
        # Writes that run together (directory updates) take turns on one lock anyway: on
        # PostgreSQL they get a writer thread of their own, where concurrent ones queue into one
        # run and one commit instead of spreading over the writers, each waiting for the lock.
        self._runs = (
            self._writes if writers == 1 else _GroupCommit(store.engine, 1, "runs", losses=losses)
        )
        # SQLite has one writer, and no round trips to save: its autocommit writes go there.
        self._autocommit = None if store.is_sqlite else _Autocommit(store.engine, writers, losses)

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
        lane = self._runs if getattr(fn, "together", None) else self._writes
        lane.submit(_Write(fn, args, kwargs, loop, future))
        return await future

    async def write_autocommit(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a ``tx_*`` function of one statement, committed as it runs (``_Autocommit``);
        returns once committed. On SQLite, the same as ``write``."""
        if self._autocommit is None:
            return await self.write(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._autocommit.submit(_Write(fn, args, kwargs, loop, future))
        return await future

    def close(self) -> None:
        if self._autocommit is not None:
            self._autocommit.close()
        self._writes.close()
        if self._runs is not self._writes:
            self._runs.close()
        self._pool.shutdown(wait=True)
        self.sync.dispose()
