"""Statements on SQLite's driver (engine/sqlite_statements.py) store what SQLAlchemy would.

The same document is accepted twice on one embedded store: once through SQLAlchemy (the path a
large payload still takes, forced here by writing the rows with ``Connection.execute``) and once
through ``tx_accept_document``'s driver path; the stored text of every column must be the same,
and reading it back must give the same values. A duplicate key is SQLAlchemy's IntegrityError
(``Engine.submit`` draws a new transaction id on it), and the connection goes on.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from medcourier.engine import store as store_module
from medcourier.engine.model import Status
from medcourier.engine.schema import deliveries, documents, payloads, status_events
from medcourier.engine.sqlite_statements import driver_insert
from medcourier.engine.store import AsyncStore, StatusChange, Store
from tests.harness import pdf_bytes

AT = datetime(2026, 12, 7, 18, 30, 5, 123456, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(None, tmp_path / "data")
    s.create_schema()
    yield s
    s.dispose()


def accept(store: Store, txid: str, payload: bytes, routes: list[str]) -> None:
    with store.engine.begin() as c:
        store.tx_accept_document(c, **{**_document(txid, routes), "payload": payload})


def accept_through_sqlalchemy(
    store: Store, txid: str, payload: bytes, routes: list[str], at: datetime
) -> None:
    with store.engine.begin() as c:
        c.execute(
            documents.insert(),
            {
                **{
                    k: v
                    for k, v in _document(txid, routes).items()
                    if k not in ("payload", "routes")
                },
                "payload_size": len(payload),
            },
        )
        c.execute(payloads.insert(), {"transaction_id": txid, "data": payload})
        for r in routes:
            c.execute(
                deliveries.insert(),
                {
                    "transaction_id": txid,
                    "route": r,
                    "status": "preparation",
                    "status_at": at,
                    "attempts": 0,
                },
            )
            c.execute(
                status_events.insert(),
                {
                    "transaction_id": txid,
                    "route": r,
                    "status": "preparation",
                    "at": at,
                    "reason": "accepted",
                },
            )


def stored_text(store: Store, txid: str) -> list[list[object]]:
    """Every column of the document's rows as SQLite holds it (types as stored, no
    conversion), the transaction id left out, status events without their row id."""
    raw = sqlite3.connect(store.engine.url.database or "")
    try:
        out = []
        for table, skip in (
            ("documents", {"transaction_id"}),
            ("payloads", {"transaction_id"}),
            ("deliveries", {"transaction_id"}),
            ("status_events", {"transaction_id", "id"}),
        ):
            cur = raw.execute(f"SELECT * FROM {table} WHERE transaction_id = ?", (txid,))
            names = [d[0] for d in cur.description]
            for row in cur.fetchall():
                out.append(
                    [table]
                    + [
                        (n, v, type(v).__name__)
                        for n, v in zip(names, row, strict=True)
                        if n not in skip
                    ]
                )
        return sorted(out, key=repr)
    finally:
        raw.close()


def test_the_driver_path_stores_what_sqlalchemy_stores(store: Store) -> None:
    payload = pdf_bytes(4096)
    routes = ["r-b", "r-a"]
    accept(store, "T-DRIVER", payload, routes)
    with store.engine.connect() as c:  # the accept's own time, as SQLAlchemy reads it back
        at = c.execute(sa.select(deliveries.c.status_at).limit(1)).scalar_one()
    accept_through_sqlalchemy(store, "T-ORM", payload, routes, at)
    driver = stored_text(store, "T-DRIVER")
    assert driver == stored_text(store, "T-ORM")
    assert len(driver) == 1 + 1 + 2 + 2
    # and SQLAlchemy reads it back as it wrote it
    with store.engine.connect() as c:
        created, data = c.execute(
            sa.select(documents.c.created_at, payloads.c.data)
            .join(payloads, payloads.c.transaction_id == documents.c.transaction_id)
            .where(documents.c.transaction_id == "T-DRIVER")
        ).one()
    assert created == AT.replace(tzinfo=None)  # SQLite keeps no zone: the engine stores UTC
    assert bytes(data) == payload


def test_a_duplicate_key_is_sqlalchemys_integrity_error(store: Store) -> None:
    accept(store, "T-1", pdf_bytes(), ["r"])
    with pytest.raises(sa.exc.IntegrityError):
        accept(store, "T-1", pdf_bytes(), ["r"])
    accept(store, "T-2", pdf_bytes(), ["r"])  # the store goes on
    with store.engine.connect() as c:
        count = c.execute(sa.select(sa.func.count()).select_from(documents)).scalar_one()
    assert count == 2


def test_the_failed_accept_left_nothing(store: Store) -> None:
    """The duplicate's first insert fails; no payload, delivery or history row of it remains
    beside the first document's."""
    first = pdf_bytes(100)
    accept(store, "T-1", first, ["r"])
    with pytest.raises(sa.exc.IntegrityError):
        accept(store, "T-1", pdf_bytes(200), ["r", "s"])
    with store.engine.connect() as c:
        routes = c.execute(sa.select(deliveries.c.route)).scalars().all()
        events = c.execute(sa.select(sa.func.count()).select_from(status_events)).scalar_one()
        size = c.execute(sa.select(sa.func.length(payloads.c.data))).scalar_one()
    assert (routes, events, size) == (["r"], 1, len(first))


def test_a_column_with_a_python_default_must_be_given(store: Store) -> None:
    """deliveries.attempts has a default SQLAlchemy would bind: a column list without it is
    refused rather than inserted without the default."""
    insert = driver_insert(deliveries, ["transaction_id", "route", "status", "status_at"])
    row = {"transaction_id": "T", "route": "r", "status": "preparation", "status_at": AT}
    with store.engine.begin() as c:
        raw = c.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        with pytest.raises(ValueError, match="attempts"):
            insert.run(c, raw, [row])


def test_status_changes_on_the_driver_store_what_sqlalchemy_stores(store: Store) -> None:
    """``tx_set_statuses`` (the driver's update and history insert) against the same change
    written by SQLAlchemy's own execution of the same statements."""
    sent = datetime(2026, 12, 7, 18, 31, 0, 654321, tzinfo=UTC)
    for txid in ("T-ORM", "T-DRIVER"):
        accept(store, txid, pdf_bytes(), ["r-a", "r-b"])
    with store.engine.begin() as c:
        store.tx_set_statuses(
            c,
            "r-a",
            [
                StatusChange("T-DRIVER", Status.COMPLETED, None, sent),
            ],
        )
        store.tx_set_statuses(
            c,
            "r-b",
            [
                StatusChange("T-DRIVER", Status.ENTERED_IN_ERROR, "refused: AE", None),
            ],
        )
        at = c.execute(
            sa.select(deliveries.c.status_at).where(
                deliveries.c.transaction_id == "T-DRIVER", deliveries.c.route == "r-a"
            )
        ).scalar_one()
        for route, status, reason, sent_at in (
            ("r-a", "completed", None, sent),
            ("r-b", "entered-in-error", "refused: AE", None),
        ):
            row = {
                "b_txid": "T-ORM",
                "b_route": route,
                "b_status": status,
                "b_at": at,
                "b_reason": reason,
                "b_sent": sent_at,
            }
            c.execute(store_module._SET_STATUS, row)
            c.execute(store_module._STATUS_EVENT, row)

    def shape(rows: list[list[object]]) -> list[list[object]]:
        """Times of the changes (each write takes its own now()) kept as their format only."""
        return [
            [
                (c[0], re.sub(r"\d", "9", c[1]), c[2])
                if isinstance(c, tuple) and c[0] in ("status_at", "at")
                else c
                for c in r
            ]
            for r in rows
        ]

    driver, orm = stored_text(store, "T-DRIVER"), stored_text(store, "T-ORM")
    assert shape(driver) == shape(orm)
    assert any(("sent_at", "2026-12-07 18:31:00.654321", "str") in r for r in driver)
    assert sum(("status", "completed", "str") in r for r in driver) == 2  # delivery, history


def test_a_failure_after_some_driver_inserts_rolls_back_to_its_savepoint(store: Store) -> None:
    """The group commit reruns a failed batch with a savepoint per write: a write that fails
    after its first driver inserts (a route named twice: the deliveries insert fails, after the
    document and payload went in) must leave nothing, and its neighbours must stay."""
    with store.engine.begin() as c:
        store.tx_accept_document(c, **_document("T-BEFORE", ["r"]))
        savepoint = c.begin_nested()
        with pytest.raises(sa.exc.IntegrityError):
            store.tx_accept_document(c, **_document("T-FAILS", ["r", "r"]))
        savepoint.rollback()
        store.tx_accept_document(c, **_document("T-AFTER", ["r"]))
    with store.engine.connect() as c:
        kept = c.execute(sa.select(documents.c.transaction_id)).scalars().all()
        paid = c.execute(sa.select(payloads.c.transaction_id)).scalars().all()
    assert sorted(kept) == sorted(paid) == ["T-AFTER", "T-BEFORE"]


def test_the_group_commit_answers_each_accept_of_a_batch_with_a_failing_one(
    store: Store,
) -> None:
    """Through AsyncStore.write: concurrent accepts share a commit; the failing one gets its
    IntegrityError, the others are stored."""
    astore = AsyncStore(store)

    async def scenario() -> list[object]:
        return await asyncio.gather(
            *(
                astore.write(store.tx_accept_document, **_document(f"T-{i}", routes))
                for i, routes in enumerate([["r"], ["r"], ["r", "r"], ["r"], ["r"]])
            ),
            return_exceptions=True,
        )

    try:
        outcomes = asyncio.run(scenario())
    finally:
        astore.close()
    assert [type(o).__name__ for o in outcomes] == [
        "NoneType",
        "NoneType",
        "IntegrityError",
        "NoneType",
        "NoneType",
    ]
    with store.engine.connect() as c:
        kept = c.execute(sa.select(documents.c.transaction_id)).scalars().all()
    assert sorted(kept) == ["T-0", "T-1", "T-3", "T-4"]


def _document(txid: str, routes: list[str]) -> dict[str, object]:
    return {
        "transaction_id": txid,
        "created_at": AT,
        "content_type": "application/pdf",
        "document_type": "11488-4",
        "title": "Compte rendu",
        "sender_identifier": None,
        "sender_application": "tests",
        "patient_id": "p1",
        "encounter_id": "e1",
        "payload": pdf_bytes(),
        "routes": routes,
    }
