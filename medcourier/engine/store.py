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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

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


class Store(DirectoryStore):
    """Synchronous access to the schema; see ``AsyncStore`` for use from the event loop."""

    def __init__(self, url: str | None, data_dir: Path) -> None:
        self.url = normalize_url(url, data_dir)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
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

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- documents -------------------------------------------------------------------------
    def accept_document(
        self,
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
        dedupe: tuple[str, str] | None = None,
    ) -> None:
        """Commit a document, its payload and one delivery per route (preparation) at once.

        ``dedupe`` (sender, message id) is remembered in the same transaction, so a sender that
        resends after a lost ACK finds it, and the document is never half-remembered.
        """
        at = now()
        route_list = list(routes)
        with self.engine.begin() as c:
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
            if dedupe is not None:
                _remember(c, dedupe, [transaction_id])
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

    def remember(self, sender: str, message_id: str, transaction_ids: list[str]) -> None:
        with self.engine.begin() as c:
            _remember(c, (sender, message_id), transaction_ids)

    def apply_directory_update(
        self, update: DirectoryUpdate, dedupe: tuple[str, str] | None = None
    ) -> tuple[str, str | None]:
        """Apply an ADT event in one transaction; returns (patient id, encounter id).

        Kind ``ensure`` (documents arriving by message) creates what is missing and changes
        nothing that exists.
        """
        overwrite = update.kind != "ensure"
        with self.engine.begin() as c:
            patient = self.upsert_patient(c, update.patient, update.organization, overwrite)
            encounter_id = None
            if update.encounter is not None:
                encounter = self.upsert_encounter(
                    c, update.encounter, patient["id"], update.organization, overwrite
                )
                encounter_id = encounter["id"]
            if update.merge_from:
                self.merge_patients(
                    c, patient["id"], [(i.system, i.value) for i in update.merge_from]
                )
            if dedupe is not None:
                _remember(c, dedupe, [])
        return patient["id"], encounter_id

    def transaction_exists(self, transaction_id: str) -> bool:
        with self.engine.connect() as c:
            q = sa.select(documents.c.transaction_id).where(
                documents.c.transaction_id == transaction_id
            )
            return c.execute(q).first() is not None

    def claim(self, transaction_id: str, route: str) -> Claim | None:
        """Take a delivery for work: in-progress (with the attempt counted) unless it is final.

        Returns None when the delivery does not exist; ``Claim.document`` is None when the
        delivery is already final (a redelivered queue item), so the caller just acknowledges it.
        """
        with self.engine.begin() as c:
            row = c.execute(
                sa.select(deliveries.c.status).where(
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
            return Claim(previous, self._document(c, transaction_id))

    def _document(self, c: Connection, transaction_id: str) -> Document:
        doc = c.execute(
            sa.select(documents).where(documents.c.transaction_id == transaction_id)
        ).one()
        payload = c.execute(
            sa.select(payloads.c.data).where(payloads.c.transaction_id == transaction_id)
        ).scalar_one()
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
            payload=bytes(payload),
            patient=patient,
            encounter=encounter,
            sender_identifier=doc.sender_identifier,
            sender_application=doc.sender_application,
        )

    def set_status(
        self,
        transaction_id: str,
        route: str,
        status: Status,
        reason: str | None = None,
        sent_at: datetime | None = None,
    ) -> Status | None:
        """Record a status change with its reason in the history; returns the previous status."""
        at = now()
        with self.engine.begin() as c:
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

    def unfinished(self) -> list[tuple[str, str]]:
        """Deliveries not in a final state, oldest first: what start-up recovery re-enqueues."""
        q = (
            sa.select(deliveries.c.transaction_id, deliveries.c.route)
            .join(documents, documents.c.transaction_id == deliveries.c.transaction_id)
            .where(deliveries.c.status.in_([Status.PREPARATION.value, Status.IN_PROGRESS.value]))
            .order_by(documents.c.created_at, documents.c.transaction_id)
        )
        with self.engine.connect() as c:
            return [(r[0], r[1]) for r in c.execute(q)]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the sender is answered, power loss included.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


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


P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """Runs ``Store`` calls on a thread pool sized for the database."""

    def __init__(self, store: Store) -> None:
        self.sync = store
        workers = 1 if store.is_sqlite else 8
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sync.dispose()
