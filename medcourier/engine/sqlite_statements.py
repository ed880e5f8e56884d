"""Statements of the per-document path run on SQLite's own driver connection.

Why: in a profile of the end-to-end load on the embedded store (py-spy, samples of the thread
holding the interpreter lock), SQLAlchemy's execution of an accept's four inserts (document,
payload, delivery, history row) was 17% of all samples, about as much as the HTTP handler's own
work: per statement a cache key, the compiled parameters, bind processing, a result set-up.
The standard library's sqlite3 runs the same statement from its own statement cache. The status
changes that follow each delivery (an update and a history row) go the same way.

What keeps them the same statements: the SQL is SQLAlchemy's, compiled once per dialect; values
go through the binds' own processors (a DateTime is stored as the text SQLAlchemy stores and
reads back); a driver error is raised as SQLAlchemy raises it (``IntegrityError`` for a
duplicate key, which ``Engine.submit`` relies on). They run in the caller's transaction on the
caller's connection, savepoints included. They do not pass through SQLAlchemy's execution
events. Statements with an expanding ``IN`` (a list bound at run time) are not for this class.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from medcourier.engine.driver_errors import driver_error

Processor = Callable[[Any], Any] | None


class DriverStatement:
    """``statement`` run with rows given as mappings from its bind names to values; a value set
    in the statement itself (``.values(reason="accepted")``) is taken when a row has none.

    For an insert, ``columns`` names the columns its rows set, each bound under its own name.
    A column with a Python-side default must be given a value (in the rows or the statement):
    SQLAlchemy would compute the default, and this class does not.
    """

    def __init__(self, statement: ClauseElement, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.columns = list(columns) if columns is not None else None
        self._prepared: dict[type, tuple[str, list[tuple[str, Any]], list[Processor]]] = {}

    def _prepare(self, dialect: Dialect) -> tuple[str, list[tuple[str, Any]], list[Processor]]:
        compiled = cast(
            SQLCompiler, self.statement.compile(dialect=dialect, column_keys=self.columns)
        )
        computed = [c.name for c in [*compiled.insert_prefetch, *compiled.update_prefetch]]
        if computed:
            raise ValueError(f"give a value for {computed}: their default is computed in Python")
        names = list(compiled.positiontup or ())
        # (name, the statement's own value or _REQUIRED) in the order of the ? marks
        sources = [
            (n, _REQUIRED if compiled.binds[n].required else compiled.binds[n].value) for n in names
        ]
        processors: list[Processor] = [
            compiled.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names
        ]
        return compiled.string, sources, processors

    def run(
        self, c: Connection, raw: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Run the statement once per row on ``raw``, the sqlite3 connection under ``c``."""
        prepared = self._prepared.get(type(c.dialect))
        if prepared is None:
            prepared = self._prepared[type(c.dialect)] = self._prepare(c.dialect)
        sql, sources, processors = prepared
        params = [
            tuple(
                value if p is None or value is None else p(value)
                for p, value in zip(
                    processors,
                    (row[n] if own is _REQUIRED else row.get(n, own) for n, own in sources),
                    strict=True,
                )
            )
            for row in rows
        ]
        try:
            if len(params) == 1:
                raw.execute(sql, params[0])
            else:
                raw.executemany(sql, params)
        except sqlite3.Error as exc:
            raise driver_error(c, exc, sql) from exc


_REQUIRED = object()


def driver_insert(table: sa.Table, columns: Sequence[str]) -> DriverStatement:
    """``INSERT INTO table (columns) VALUES (?, …)``, rows keyed by column name."""
    return DriverStatement(table.insert(), columns)
