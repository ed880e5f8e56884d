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

from medcourier.engine import directory
from medcourier.engine.directory import MAX_MERGE_CHAIN, _live_patient
from medcourier.engine.schema import patients
from medcourier.engine.store import Store
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


@contextlib.contextmanager
def _own_store(kind: str, data_dir: Path) -> Iterator[Store]:
    """A store of the test's own: SQLite in ``data_dir``, or a PostgreSQL database nobody else
    uses (the tests counting its sessions must not see another test's)."""
    with contextlib.ExitStack() as stack:
        url = None if kind == "sqlite" else stack.enter_context(own_postgres_database())
        s = Store(url, data_dir)
        stack.callback(s.dispose)
        yield s


def test_get_patient_reads_on_the_driver(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """With SQLAlchemy's read made to fail, the patient is still read: through the driver."""
    pid = _patient(store, "DRIVER")

    def not_this_way(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("read through SQLAlchemy")

    monkeypatch.setattr(directory, "_live_patient", not_this_way)
    found = store.get_patient(pid)
    assert found is not None and found["id"] == pid


def test_the_driver_read_is_the_stores_patient_read(store: Store) -> None:
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


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_read_leaves_no_transaction_open(kind: str, tmp_path: Path, reader: _Reader) -> None:
    """After a read, the reading thread keeps its connection but no transaction. SQLite: a
    TRUNCATE checkpoint copies the whole log back and empties it (busy 0). PostgreSQL: no
    session of the store's database is idle in a transaction."""
    with _own_store(kind, tmp_path / "data") as store:
        store.create_schema()
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
            states = _sessions(store)
            assert len(states) >= 2  # the reader's, and the one asking
            assert "idle in transaction" not in states.values()
        assert reader.call(lambda: store.get_patient(pid)) is not None  # still reads


def _sessions(store: Store) -> dict[int, str]:
    """PostgreSQL: the client sessions of the store's database, by server process id, with
    their state (the one asking included)."""
    with store.engine.connect() as c:
        rows = c.execute(
            sa.text(
                "SELECT pid, state FROM pg_stat_activity "
                "WHERE datname = current_database() AND backend_type = 'client backend'"
            )
        )
        return {int(pid): str(state) for pid, state in rows}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_driver_error_is_sqlalchemys_without_the_values_and_the_next_read_works(
    kind: str, tmp_path: Path, reader: _Reader
) -> None:
    with _own_store(kind, tmp_path / "data") as s:
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
    """The server ends every session (a restart, an operator): the read on the reading thread's
    connection fails, as SQLAlchemy's pool would have failed it (no pre-ping), and the next one
    connects again, though the pool held other connections, dead too, to take instead."""
    with _own_store("postgresql", tmp_path) as s:
        s.create_schema()
        pid = _patient(s, "TERMINATED")
        assert reader.call(lambda: s.get_patient(pid)) is not None
        with contextlib.ExitStack() as held:  # four connections idle in the pool
            for _ in range(4):
                held.enter_context(s.engine.connect()).execute(sa.text("SELECT 1"))
        with s.engine.connect() as c:
            ended = c.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                    "pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND backend_type = 'client backend') t"
                )
            ).scalar_one()
        assert ended >= 4  # the reader's session and the pool's idle ones
        error = reader.call(lambda: s.get_patient(pid))
        assert isinstance(error, sa.exc.OperationalError)
        found = reader.call(lambda: s.get_patient(pid))
        assert found is not None and found["id"] == pid


def test_a_value_the_server_refuses_fails_its_read_only(tmp_path: Path, reader: _Reader) -> None:
    """PostgreSQL refuses a NUL character in text (an id from a URL or a message): that read
    fails as SQLAlchemy's error and the reading thread keeps its session, no new one opened."""
    with _own_store("postgresql", tmp_path) as s:
        s.create_schema()
        pid = _patient(s, "KEPT")
        assert reader.call(lambda: s.get_patient(pid)) is not None
        before = set(_sessions(s))
        error = reader.call(lambda: s.get_patient("bad\x00id"))
        assert isinstance(error, sa.exc.DataError)
        found = reader.call(lambda: s.get_patient(pid))
        assert found is not None and found["id"] == pid
        assert set(_sessions(s)) == before


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
