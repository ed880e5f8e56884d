"""Writing a large value (a document's payload, a Binary's bytes) into the store with no copy of
it beside the caller's own.

A plain ``INSERT`` with the value as a parameter holds a large value two or three times while
it is written:

- SQLite copies the bound value (``sqlite3_bind_blob`` with ``SQLITE_TRANSIENT``), then again
  into the record it builds for the row: two copies beside the caller's ``bytes``;
- PostgreSQL (psycopg 3): libpq builds the whole Bind message in its output buffer, a copy of
  the value, and keeps that buffer at its largest for the connection's life (every pooled
  connection that once wrote a 50 MiB PDF keeps 50 MiB).

Besides, the value must be an execute parameter, never part of the statement
(``insert().values(data=...)``): SQLAlchemy's compiled-statement cache keeps the first
statement it compiles for a shape, and with it that statement's values, for the process's life.

For a 4 KB document none of this matters and the plain ``INSERT`` is the cheapest, so it stays
the path of every value up to :data:`DIRECT_WRITE_BYTES`. Above it:

- SQLite inserts the row with ``zeroblob(n)`` in place of the value (when it is the row's last
  column, as in ``payloads`` and ``binaries``, SQLite does not even build the zeros in memory),
  then writes the value into the row through an incremental blob handle
  (``sqlite3.Connection.blobopen``) a :data:`WRITE_SLICE` at a time, straight from the caller's
  buffer into the pages.
- PostgreSQL (psycopg) sends the row with ``COPY … FROM STDIN (FORMAT BINARY)``: the small
  fields and the value's length first, then the value in :data:`WRITE_SLICE` pieces (psycopg
  cuts them smaller still and flushes every megabyte), so libpq holds a piece, never the value.
- any other database or driver gets the plain ``INSERT``.

The writes run in the caller's connection and transaction: inside the group commit
(engine/store.py ``_GroupCommit``), a write rolled back to its savepoint leaves nothing, large
value included. A database error is raised as SQLAlchemy's (``IntegrityError`` for a duplicate
key…), whichever path wrote the row.
"""

from __future__ import annotations

import functools
import sqlite3
import struct
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medcourier.engine.driver_errors import driver_error
from medcourier.engine.payload_read import driver_connection, sqlite_connection
from medcourier.engine.schema import payloads

DIRECT_WRITE_BYTES = 1024 * 1024
"""Values up to this size are written with one plain ``INSERT`` (the size the reads switch at,
engine/payload_read.py ``DIRECT_READ_BYTES``)."""

WRITE_SLICE = 1024 * 1024
"""Bytes of the value handed to the driver per call on the large paths."""


def insert_payload(c: Connection, transaction_id: str, payload: bytes) -> None:
    """Insert the payload row of ``transaction_id``."""
    insert_row(c, payloads, {"transaction_id": transaction_id, "data": payload}, "data")


def insert_row(c: Connection, table: sa.Table, row: Mapping[str, Any], large: str) -> None:
    """Insert ``row`` (column name → value) into ``table``; ``row[large]``, a ``bytes``-like
    value, may be large and is written without a copy of it when it is. The row must name every
    column that has a default on the Python side: the PostgreSQL path does not apply them.
    """
    value = row[large]
    if len(value) > DIRECT_WRITE_BYTES:
        if c.dialect.name == "sqlite":
            raw = sqlite_connection(c)
            if raw is not None:
                _sqlite_blob(c, raw, table, row, large)
                return
        elif c.dialect.name == "postgresql" and c.dialect.driver == "psycopg":
            _postgresql_copy(c, table, row, large)
            return
    c.execute(_plain_insert(table), row)


@functools.cache
def _plain_insert(table: sa.Table) -> sa.Insert:
    """``INSERT`` of ``table``, its columns from the execute parameters."""
    return table.insert()


# -- SQLite ---------------------------------------------------------------------------------
_ZEROBLOB_SIZE = "_zeroblob_size"


@functools.cache
def _zeroblob_insert(table: sa.Table, large: str) -> sa.Insert:
    """``INSERT`` of ``table`` with ``zeroblob(:_zeroblob_size)`` as the ``large`` column; the
    other columns come from the execute parameters. Built once per table: no value in it."""
    return table.insert().values(
        {large: sa.func.zeroblob(sa.bindparam(_ZEROBLOB_SIZE, type_=sa.Integer))}
    )


def _sqlite_blob(
    c: Connection, raw: sqlite3.Connection, table: sa.Table, row: Mapping[str, Any], large: str
) -> None:
    value = memoryview(row[large]).cast("B")
    params = {k: v for k, v in row.items() if k != large}
    params[_ZEROBLOB_SIZE] = len(value)
    rowid = c.execute(_zeroblob_insert(table, large), params).lastrowid
    try:
        with raw.blobopen(table.name, table.c[large].name, rowid) as blob:
            for start in range(0, len(value), WRITE_SLICE):
                blob.write(value[start : start + WRITE_SLICE])
    except sqlite3.Error as exc:
        raise driver_error(c, exc, f"blob write into {table.name}.{large}") from exc


# -- PostgreSQL -----------------------------------------------------------------------------
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)  # no flags, no extension
_COPY_TRAILER = struct.pack("!h", -1)
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _postgresql_copy(c: Connection, table: sa.Table, row: Mapping[str, Any], large: str) -> None:
    raw = driver_connection(c)
    columns = [table.c[name] for name in row]
    for column in table.c:
        if column.name not in row and column.default is not None:
            raise ValueError(f"{table.name}.{column.name} has a Python-side default: pass it")
    value = memoryview(row[large]).cast("B")
    encoding = raw.info.encoding
    head = bytearray(_COPY_SIGNATURE)
    head += struct.pack("!h", len(columns))
    tail = bytearray()
    into = head
    for column in columns:
        if column.name == large:
            head += struct.pack("!i", len(value))
            into = tail
        else:
            into += _binary_field(column, row[column.name], encoding)
    tail += _COPY_TRAILER
    quote = c.dialect.identifier_preparer
    names = ", ".join(quote.format_column(column) for column in columns)
    statement = f"COPY {quote.format_table(table)} ({names}) FROM STDIN (FORMAT BINARY)"
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            copy.write(head)
            for start in range(0, len(value), WRITE_SLICE):
                copy.write(value[start : start + WRITE_SLICE])
            copy.write(tail)
    except c.dialect.loaded_dbapi.Error as exc:
        raise driver_error(c, exc, statement) from exc


def _binary_field(column: sa.Column[Any], value: Any, encoding: str) -> bytes:
    """One field of a binary ``COPY`` row: its length, then the value as the column type's
    binary input function reads it. Only the types the large rows have are known."""
    if value is None:
        return struct.pack("!i", -1)
    kind = column.type
    data: bytes
    if isinstance(kind, sa.String):  # Text, VARCHAR: the text in the connection's encoding
        data = str(value).encode(encoding)
    elif isinstance(kind, sa.LargeBinary):
        data = bytes(value)
    elif isinstance(kind, sa.DateTime) and kind.timezone and isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{column.name}: a timestamp with time zone needs an aware datetime")
        # timestamptz: microseconds since 2000-01-01 00:00 UTC, as a 64-bit integer
        data = struct.pack("!q", (value - _PG_EPOCH) // _MICROSECOND)
    else:
        raise TypeError(f"{column.name}: no binary COPY encoding for {kind!r}")
    return struct.pack("!i", len(data)) + data
