"""Reading a document's payload from the store with no more than one copy of it in memory.

A plain ``SELECT data`` holds a large payload twice or three times while it is read:

- SQLite assembles the value's overflow pages into a buffer of its own, which Python then
  copies into a ``bytes``;
- PostgreSQL (psycopg 3, text protocol) sends a bytea as hex text: libpq keeps the whole
  result (twice the payload's size) until psycopg has decoded it into a ``bytes``.

For a 4 KB document none of this matters and the plain query is the cheapest, so it stays the
path of every payload up to :data:`DIRECT_READ_BYTES` (the size is known beforehand: the
document row carries it). Above it:

- SQLite reads the value through an incremental blob handle (``sqlite3.Connection.blobopen``,
  Python 3.11): ``Blob.read()`` copies the pages straight into the one ``bytes`` it returns.
- PostgreSQL reads the value in slices of :data:`PG_SLICE` bytes (``substring``), each in the
  binary protocol (no hex), into one buffer made at the payload's size: only a slice is ever
  held beside it. Out of line (TOAST) values that are not compressed, which PDFs and images
  are (PostgreSQL stores them uncompressed when compression gains too little), are read slice
  by slice from disk at no extra cost; a compressed one is decompressed from its start for
  each slice, which is why the slices are megabytes rather than the 64 KiB of a socket read.
- any other database or driver gets the plain query.

The reads run in the caller's connection and transaction, so they see the same snapshot as the
rest of the claim.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import NoResultFound

from medcourier.engine.buffers import presized_buffer
from medcourier.engine.schema import payloads

DIRECT_READ_BYTES = 1024 * 1024
"""Payloads up to this size are read with one plain query."""

PG_SLICE = 2 * 1024 * 1024
"""Bytes per PostgreSQL round trip for a large payload (25 for a 50 MB PDF). A slice is held
three times while it comes in (libpq's input buffer, its result, psycopg's ``bytes``) and libpq
keeps the input buffer at its largest for the connection's life, so the slice bounds both what
the read holds beside the payload and what each pooled connection keeps afterwards. Measured on
a 50 MiB payload: 0.14 s uncompressed whatever the slice (0.64 s for the plain text-protocol
SELECT); 0.58 s compressed by TOAST (0.21 s with 4 MiB slices, 1.1 s plain)."""


def read_payload(c: Connection, transaction_id: str, size: int) -> bytes:
    """The payload of ``transaction_id``; ``size`` (the document's ``payload_size``) picks the
    way to read it, the bytes returned do not depend on it.

    :raises NoResultFound: the document has no payload (pruned).
    """
    return read_large(c, payloads.c.data, payloads.c.transaction_id, transaction_id, size)


def read_large(
    c: Connection, column: sa.Column[Any], key: sa.Column[Any], value: str, size: int
) -> bytes:
    """``column`` of the row whose ``key`` is ``value`` (a Binary's bytes, a document's
    payload), read as the module docstring says; ``size`` (its length in bytes) picks the way.

    :raises NoResultFound: no such row.
    """
    if size > DIRECT_READ_BYTES:
        if c.dialect.name == "sqlite":
            return _sqlite_blob(c, column, key, value)
        if c.dialect.name == "postgresql" and c.dialect.driver == "psycopg":
            return _postgresql_slices(c, column, key, value, size)
    return _plain(c, column, key, value)


def _plain(c: Connection, column: sa.Column[Any], key: sa.Column[Any], value: str) -> bytes:
    data = c.execute(sa.select(column).where(key == value)).scalar_one()
    return bytes(data)  # no copy when the driver gave bytes already


def _sqlite_blob(c: Connection, column: sa.Column[Any], key: sa.Column[Any], value: str) -> bytes:
    table = column.table
    rowid: int = c.execute(
        sa.select(sa.literal_column("rowid")).select_from(table).where(key == value)
    ).scalar_one()
    raw = sqlite_connection(c)
    if raw is None:  # another SQLite driver: no blob handle
        return _plain(c, column, key, value)
    with raw.blobopen(table.name, column.name, rowid, readonly=True) as blob:
        return blob.read()


def _postgresql_slices(
    c: Connection, column: sa.Column[Any], key: sa.Column[Any], value: str, size: int
) -> bytes:
    """The value in :data:`PG_SLICE` slices, until a short one, written into a buffer made at
    the expected ``size`` (engine/buffers.py), which becomes the result without a copy."""
    sql = (
        f"SELECT substring({column.name} FROM %s::integer FOR %s::integer) "
        f"FROM {column.table.name} WHERE {key.name} = %s"
    )
    out = presized_buffer(size)
    with driver_connection(c).cursor(binary=True) as cursor:
        while True:
            cursor.execute(sql, (out.tell() + 1, PG_SLICE, value))
            row = cursor.fetchone()
            if row is None:
                raise NoResultFound("no such row")
            got = out.write(row[0])
            del row  # this slice's bytes go before the next one comes
            if got < PG_SLICE:
                out.truncate()
                return out.getvalue()


# Shared with the writes (engine/payload_write.py).
def driver_connection(c: Connection) -> Any:
    """The DBAPI connection under ``c``, in ``c``'s transaction."""
    return c.connection.driver_connection


def sqlite_connection(c: Connection) -> sqlite3.Connection | None:
    """The standard library's SQLite connection under ``c`` (which has blob handles), None
    under another SQLite driver."""
    raw = driver_connection(c)
    return raw if isinstance(raw, sqlite3.Connection) else None
