"""Reads on the reading thread's own driver connection (engine/driver_reads.py).

``get_patient`` reads through the driver on SQLite and on PostgreSQL (a fresh database); these
check it reads what SQLAlchemy's path reads (merge chains included), sees every commit, leaves
no transaction open (no snapshot a WAL checkpoint or vacuum would wait for), fails as
SQLAlchemy fails, and connects again after an error, a lost connection or ``dispose``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from medcourier.engine.directory import MAX_MERGE_CHAIN, _live_patient
from medcourier.engine.schema import patients
from medcourier.engine.store import Store, normalize_url
from tests.services import fresh_postgres_url, own_postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = None if request.param == "sqlite" else fresh_postgres_url()
    s = Store(url, tmp_path / "data")
    s.create_schema()
    yield s
    s.dispose()


def _patient(store: Store, family: str) -> str:
    saved = store.put_patient(
        {
            "resourceType": "Patient",
            "name": [{"family": family}],
            "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": family}],
        },
        None,
    )
    return str(saved["id"])


def _merge(store: Store, retired: str, into: str) -> None:
    with store.engine.begin() as c:
        c.execute(patients.update().where(patients.c.id == retired).values(merged_into=into))


def _through_sqlalchemy(store: Store, patient_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as c:
        row = _live_patient(c, patient_id)
        return json.loads(row.resource) if row is not None else None


class _Reader:
    """A thread that stays alive between reads, as the store's reader pool's threads do, so
    its kept connection is the one read on each time."""

    def __init__(self) -> None:
        self._calls: list[tuple[Callable[[], Any], list[Any], threading.Event]] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            while self._calls:
                fn, out, done = self._calls.pop(0)
                try:
                    out.append(fn())
                except Exception as exc:
                    out.append(exc)
                done.set()

    def call(self, fn: Callable[[], Any]) -> Any:
        out: list[Any] = []
        done = threading.Event()
        self._calls.append((fn, out, done))
        self._wake.set()
        assert done.wait(10), "the reader thread did not answer"
        return out[0]

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(5)


@pytest.fixture
def reader() -> Iterator[_Reader]:
    r = _Reader()
    yield r
    r.stop()


def test_the_driver_read_is_the_embedded_stores_patient_read(store: Store) -> None:
    assert store.driver_reads is not None  # what the tests below rely on
    pid = _patient(store, "ALONE")
    found = store.get_patient(pid)
    assert found is not None and found["id"] == pid
    assert found == _through_sqlalchemy(store, pid)
    assert store.get_patient("no-such-patient") is None


def test_merge_chains_read_as_through_sqlalchemy(store: Store) -> None:
    """Survivor at the end of a chain, a chain too long, and a chain to a missing patient:
    each read as ``_live_patient`` reads it."""
    chain = [_patient(store, f"CHAIN{i}") for i in range(MAX_MERGE_CHAIN + 1)]
    for retired, survivor in itertools.pairwise(chain):
        _merge(store, retired, survivor)
    short = chain[1]  # MAX_MERGE_CHAIN reads reach the survivor
    long = chain[0]  # one read too many
    dangling = _patient(store, "DANGLING")
    with store.engine.begin() as c:
        c.execute(
            patients.update().where(patients.c.id == dangling).values(merged_into="gone-away")
        )
    survivor = store.get_patient(short)
    assert survivor is not None and survivor["id"] == chain[-1]
    assert store.get_patient(long) is None
    assert store.get_patient(dangling) is None
    for pid in (short, long, dangling, chain[-1]):
        assert store.get_patient(pid) == _through_sqlalchemy(store, pid)


def test_a_kept_connection_reads_what_was_committed_after_it_opened(
    store: Store, reader: _Reader
) -> None:
    pid = _patient(store, "BEFORE")
    first = reader.call(lambda: store.get_patient(pid))
    assert first["name"] == [{"family": "BEFORE"}]
    with store.engine.begin() as c:
        c.execute(
            patients.update()
            .where(patients.c.id == pid)
            .values(resource=json.dumps({**first, "name": [{"family": "AFTER"}]}))
        )
    again = reader.call(lambda: store.get_patient(pid))
    assert again["name"] == [{"family": "AFTER"}]


def test_a_read_leaves_no_transaction_open(store: Store, reader: _Reader) -> None:
    """After a read, the reading thread keeps its connection but no transaction. SQLite: a
    TRUNCATE checkpoint copies the whole log back and empties it (busy 0). PostgreSQL: no
    session of the database is idle in a transaction."""
    pid = _patient(store, "SNAPSHOT")
    assert reader.call(lambda: store.get_patient(pid)) is not None
    for i in range(20):  # SQLite: frames for the checkpoint to copy
        _patient(store, f"MORE{i}")
    if store.is_sqlite:
        database = store.engine.url.database
        assert database is not None
        other = sqlite3.connect(database, isolation_level=None)
        try:
            checkpoint = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            other.close()
        assert tuple(checkpoint) == (0, 0, 0)  # busy, frames in the log, frames copied
        assert Path(database + "-wal").stat().st_size == 0
    else:
        with store.engine.connect() as c:
            states = c.execute(
                sa.text(
                    "SELECT state FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalars()
            assert "idle in transaction" not in list(states)
    assert reader.call(lambda: store.get_patient(pid)) is not None  # still reads


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_driver_error_is_sqlalchemys_without_the_values_and_the_next_read_connects(
    kind: str, tmp_path: Path, reader: _Reader
) -> None:
    with contextlib.ExitStack() as stack:
        url = None if kind == "sqlite" else stack.enter_context(own_postgres_database())
        s = Store(url, tmp_path / "data")
        stack.callback(s.dispose)
        error = reader.call(lambda: s.get_patient("PATIENT-SECRET-ID"))  # no schema yet
        assert isinstance(error, sa.exc.DBAPIError)  # OperationalError, ProgrammingError
        assert "patients" in str(error)
        assert "PATIENT-SECRET-ID" not in str(error)
        s.create_schema()
        pid = _patient(s, "RECOVERED")
        found = reader.call(lambda: s.get_patient(pid))
        assert found is not None and found["id"] == pid


def test_a_lost_postgresql_connection_fails_one_read_and_the_next_connects(
    tmp_path: Path, reader: _Reader
) -> None:
    """The server ends the reading thread's session (a restart, an operator): that read fails
    as SQLAlchemy's pool would have failed it (no pre-ping), the next one connects again."""
    s = Store(fresh_postgres_url(), tmp_path)
    try:
        s.create_schema()
        pid = _patient(s, "TERMINATED")
        assert reader.call(lambda: s.get_patient(pid)) is not None
        admin = sa.create_engine(normalize_url(fresh_postgres_url(), tmp_path))
        try:
            with admin.connect() as c:
                ended = c.execute(
                    sa.text(
                        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                        "pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND backend_type = 'client backend') t"
                    )
                ).scalar_one()
        finally:
            admin.dispose()
        assert ended >= 1
        error = reader.call(lambda: s.get_patient(pid))
        assert isinstance(error, sa.exc.OperationalError)
        found = reader.call(lambda: s.get_patient(pid))
        assert found is not None and found["id"] == pid
    finally:
        s.dispose()


def test_reads_after_dispose_connect_again(store: Store, reader: _Reader) -> None:
    pid = _patient(store, "DISPOSED")
    assert reader.call(lambda: store.get_patient(pid)) is not None
    store.dispose()
    found = reader.call(lambda: store.get_patient(pid))  # its old connection is closed
    assert found is not None and found["id"] == pid


def test_an_in_memory_store_reads_through_sqlalchemy(tmp_path: Path) -> None:
    """``sqlite://`` is a database per connection: a driver connection of its own would see
    none of the store's tables."""
    s = Store("sqlite://", tmp_path)
    try:
        assert s.driver_reads is None
        s.create_schema()
        pid = _patient(s, "MEMORY")
        found = s.get_patient(pid)
        assert found is not None and found["id"] == pid
    finally:
        s.dispose()
