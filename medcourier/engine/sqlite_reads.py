"""Reads of the per-document path on a SQLite driver connection kept by each reading thread.

Why: every ``$send-to-ehr`` reads its patient. Through SQLAlchemy that read cost about 260 µs
on the development machine (a pool checkout, a transaction begun by the store's ``begin``
event, a compiled statement's execution context and result, the reset of the connection on
its return to the pool), while the driver runs the same query from its own statement cache in
a small fraction of it (docs/performance.md, seventh session). The writer threads keep their
connections for the same reason (store.py, ``_WriterThreads``).

What keeps the reads right:

- The connection is in autocommit: each statement is its own read transaction, ended when its
  rows are fetched (``fetchall``), so no thread holds a snapshot that would keep WAL
  checkpoints from completing. Following a merge chain reads row by row, each time the latest
  committed row; a merge committed in between is followed or not, as with a read begun a moment
  earlier or later.
- The file and its busy timeout are the store's (the URL's database, ``timeout`` as the engine
  connects); a driver error is raised as SQLAlchemy would raise it (driver_errors.py), and the
  connection it came from is closed, so the next read connects again.
- Connections are closed by :meth:`DriverReads.close` (the store's ``dispose``), those of
  threads that ended before it included; a thread reading after it connects again, as
  SQLAlchemy's pool does after ``dispose``.

PostgreSQL reads keep going through SQLAlchemy's pool: its statements are prepared by the
driver there, and the round trip, not the Python around it, is the cost.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any

from sqlalchemy.engine import Engine

from medcourier.engine.driver_errors import dialect_error

_PATIENT = "SELECT merged_into, resource FROM patients WHERE id = ?"


class DriverReads:
    """One sqlite3 connection per reading thread, opened on its first read."""

    def __init__(self, engine: Engine, database: str, timeout: float) -> None:
        self.engine = engine
        self.database = database
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[sqlite3.Connection] = []
        self._closes = 0  # how many times close() ran: a thread's connection from before is gone

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.closes != self._closes:  # none yet, or closed since
            conn = sqlite3.connect(
                self.database, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            with self._lock:
                self._opened.append(conn)
                self._local.conn, self._local.closes = conn, self._closes
        return conn

    def _rows(self, statement: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self._connection()
        try:
            return conn.execute(statement, params).fetchall()
        except sqlite3.Error as exc:
            self._forget(conn)
            raise dialect_error(self.engine.dialect, exc, statement) from exc

    def _forget(self, conn: sqlite3.Connection) -> None:
        self._local.conn = None
        with self._lock:
            if conn in self._opened:
                self._opened.remove(conn)
        conn.close()

    def patient(self, patient_id: str, max_chain: int) -> dict[str, Any] | None:
        """The patient, or the survivor it was merged into (``max_chain`` reads at most); None
        when there is none, as ``directory._live_patient`` reads it."""
        current = patient_id
        for _ in range(max_chain):
            rows = self._rows(_PATIENT, (current,))
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
            conn.close()
