"""Inserts of the per-document path run on SQLite's own driver connection.

Why: in a profile of the end-to-end load on the embedded store (py-spy, samples of the thread
holding the interpreter lock), SQLAlchemy's execution of an accept's four inserts (document,
payload, delivery, history row) was 17% of all samples, about as much as the HTTP handler's own
work: per statement a cache key, the compiled parameters, bind processing, a result set-up.
The standard library's sqlite3 runs the same statement from its own statement cache.

What keeps it the same insert: the SQL is SQLAlchemy's, compiled once per dialect for a fixed
list of columns; values go through the columns' own bind processors (a DateTime is stored as
the text SQLAlchemy stores and reads back); a driver error is raised as SQLAlchemy raises it
(``IntegrityError`` for a duplicate key, which ``Engine.submit`` relies on). The statements run
in the caller's transaction on the caller's connection. They do not pass through SQLAlchemy's
execution events.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect


class DriverInsert:
    """``INSERT INTO table (columns) VALUES (?, …)``, rows given as tuples in ``columns``' order."""

    def __init__(self, table: sa.Table, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = tuple(columns)
        self._prepared: dict[type, tuple[str, list[Callable[[Any], Any] | None]]] = {}

    def _prepare(self, dialect: Dialect) -> tuple[str, list[Callable[[Any], Any] | None]]:
        compiled = self.table.insert().compile(dialect=dialect, column_keys=list(self.columns))
        if tuple(compiled.positiontup or ()) != self.columns:
            # a column with a Python-side default left out would be bound from nowhere
            raise ValueError(
                f"{self.table.name}: the insert binds {compiled.positiontup}, not {self.columns}"
            )
        processors: list[Callable[[Any], Any] | None] = [
            self.table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in self.columns
        ]
        return compiled.string, processors

    def run(self, c: Connection, raw: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
        """Insert ``rows`` on ``raw``, the sqlite3 connection under ``c``, in its transaction."""
        prepared = self._prepared.get(type(c.dialect))
        if prepared is None:
            prepared = self._prepared[type(c.dialect)] = self._prepare(c.dialect)
        sql, processors = prepared
        params = [
            tuple(
                v if p is None or v is None else p(v) for p, v in zip(processors, row, strict=True)
            )
            for row in rows
        ]
        try:
            if len(params) == 1:
                raw.execute(sql, params[0])
            else:
                raw.executemany(sql, params)
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(
                sql,
                None,
                exc,
                sqlite3.Error,
                hide_parameters=True,
                connection_invalidated=c.dialect.is_disconnect(
                    exc,  # type: ignore[arg-type]
                    c.connection.dbapi_connection,
                    None,
                ),
                dialect=c.dialect,
            ) from exc
