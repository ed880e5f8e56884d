"""Reads of the per-document path on a driver connection kept by each reading thread.

Why: every ``$send-to-ehr`` reads its patient. Through SQLAlchemy that read cost 233 µs on
SQLite and 993 µs on PostgreSQL on the development machine (a pool checkout, a transaction
begun for it, a compiled statement's execution context and result, the reset of the connection
on its return to the pool: on PostgreSQL, BEGIN and ROLLBACK are round trips of their own);
on the driver, from its own statement cache (SQLite) or a statement it prepared after a few
runs (psycopg), 29 and 164 µs (``bench/patient_read.py``, docs/performance.md). The store's
writer threads keep their connections for the same reason (store.py, ``_WriterThreads``).

What keeps the reads right:

- A connection comes from the engine (its connect arguments and connect events: SQLite's
  busy timeout and pragmas) and is detached from the pool: it belongs to its thread.
- It is in autocommit: each statement is its own read, its snapshot ended once its rows are
  fetched, so no thread sits in a transaction (on SQLite that would keep WAL checkpoints from
  completing; on PostgreSQL, vacuum from removing old rows). Following a merge chain reads
  row by row, each time the latest committed row; a merge committed in between is followed or
  not, as with a read begun a moment earlier or later.
- A driver error is raised as SQLAlchemy would raise it (driver_errors.py). When it says the
  connection is lost (a restarted server, a terminated session), the connection is closed and
  the pool's idle connections with it, as SQLAlchemy invalidates its pool on a disconnect: that
  read fails, the next one connects again.
- :meth:`DriverReads.close` (the store's ``dispose``) closes them all, those of threads that
  ended before it included; a thread reading after it connects again, as SQLAlchemy's pool
  does after ``dispose``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from medcourier.engine.driver_errors import dialect_error

_MARKS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


class DriverReads:
    """One driver connection per reading thread, opened on its first read."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        mark = _MARKS.get(engine.dialect.paramstyle)
        if mark is None:
            raise ValueError(f"driver reads: parameter style {engine.dialect.paramstyle!r}")
        self._patient = f"SELECT merged_into, resource FROM patients WHERE id = {mark}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[Any] = []
        self._closes = 0  # how many times close() ran: a thread's connection from before is gone

    def _connection(self) -> Any:
        kept = getattr(self._local, "conn", None)
        if kept is not None and self._local.closes == self._closes:
            return kept  # (a connection from before the last close() is closed)
        proxied = self.engine.raw_connection()
        conn: Any = proxied.driver_connection
        # This thread's from now on: the pool forgets it, and nothing closes it but us.
        proxied.detach()
        if self.engine.dialect.name == "postgresql":
            try:
                conn.autocommit = True  # SQLite's connect event sets its own (no I/O here)
            except self.engine.dialect.loaded_dbapi.Error as exc:
                self._close(conn)
                raise dialect_error(self.engine.dialect, exc, "SET autocommit") from exc
        with self._lock:
            self._opened.append(conn)
            self._local.conn, self._local.closes = conn, self._closes
        return conn

    def _rows(self, statement: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self._connection()
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(statement, params)
                return list(cursor.fetchall())
            finally:
                cursor.close()
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise self._error(conn, exc, statement) from exc

    def _error(self, conn: Any, exc: Exception, statement: str) -> sa.exc.StatementError:
        """``exc`` as SQLAlchemy's error. A connection the server or the driver lost is closed
        (this thread connects again at its next read), and the pool's idle connections with it:
        after a server restart they are all dead, and the next read would take one. An error of
        the read alone (a value the driver refuses) leaves the connection as it is."""
        dialect = self.engine.dialect
        gone = bool(
            dialect.is_disconnect(cast(Any, exc), conn, None)
            or getattr(conn, "closed", False)  # psycopg
            or getattr(conn, "broken", False)
        )
        if gone:
            self._forget(conn)
            self.engine.dispose()  # a new pool; connections checked out keep working
        return dialect_error(dialect, exc, statement, connection_invalidated=gone)

    def _forget(self, conn: Any) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            if conn in self._opened:
                self._opened.remove(conn)
        self._close(conn)

    def patient(self, patient_id: str, max_chain: int) -> dict[str, Any] | None:
        """The patient, or the survivor it was merged into (``max_chain`` reads at most); None
        when there is none, as ``directory._live_patient`` reads it."""
        current = patient_id
        for _ in range(max_chain):
            rows = self._rows(self._patient, (current,))
            if not rows:
                return None
            merged_into, resource = rows[0]
            if merged_into is None:
                found: dict[str, Any] = json.loads(resource)
                return found
            current = merged_into
        return None

    def close(self) -> None:
        """Close every thread's connection. The caller makes sure no read is running (the
        store's readers are shut down first, ``AsyncStore.close``): a connection closed under a
        running read would fail it."""
        with self._lock:
            opened, self._opened = self._opened, []
            self._closes += 1
        for conn in opened:
            self._close(conn)

    def _close(self, conn: Any) -> None:
        with contextlib.suppress(self.engine.dialect.loaded_dbapi.Error):
            conn.close()  # a broken one goes either way
