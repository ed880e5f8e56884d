"""Reads of the per-document path on a driver connection kept by each reading thread.

Why: every ``$send-to-ehr`` reads its patient. Through SQLAlchemy that read cost about 250 µs
on SQLite and 740 µs on PostgreSQL on the development machine (a pool checkout, a transaction
begun for it, a compiled statement's execution context and result, the reset of the connection
on its return to the pool: on PostgreSQL, BEGIN and ROLLBACK are round trips of their own);
on the driver, from its own statement cache (SQLite) or a statement it prepared after a few
runs (psycopg), 25 and 260 µs (``bench/patient_read.py``, docs/performance.md). The store's
writer threads keep their connections for the same reason (store.py, ``_WriterThreads``).

What keeps the reads right:

- A connection comes from the engine (its connect arguments and connect events: SQLite's
  busy timeout and pragmas) and is detached from the pool: it belongs to its thread.
- It is in autocommit: each statement is its own read, its snapshot ended once its rows are
  fetched, so no thread sits in a transaction (on SQLite that would keep WAL checkpoints from
  completing; on PostgreSQL, vacuum from removing old rows). Following a merge chain reads
  row by row, each time the latest committed row; a merge committed in between is followed or
  not, as with a read begun a moment earlier or later.
- A driver error is raised as SQLAlchemy would raise it (driver_errors.py), and the connection
  it came from is closed: the next read connects again (a restarted server, a lost socket).
- :meth:`DriverReads.close` (the store's ``dispose``) closes them all, those of threads that
  ended before it included; a thread reading after it connects again, as SQLAlchemy's pool
  does after ``dispose``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

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
            conn.autocommit = True  # SQLite's connect event sets its own
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
            self._forget(conn)
            raise dialect_error(self.engine.dialect, exc, statement) from exc

    def _forget(self, conn: Any) -> None:
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
        with self._lock:
            opened, self._opened = self._opened, []
            self._closes += 1
        for conn in opened:
            self._close(conn)

    def _close(self, conn: Any) -> None:
        with contextlib.suppress(self.engine.dialect.loaded_dbapi.Error):
            conn.close()  # a broken one goes either way
