"""Driver errors raised as SQLAlchemy raises them, for the statements the engine runs on the
driver's own connection (engine/sqlite_statements.py, the SQLite BEGIN in store.py, the large
payload writes in payload_write.py, the reads of engine/driver_reads.py).

Callers tell errors apart by SQLAlchemy's classes (``Engine.submit`` draws a new transaction id
on ``IntegrityError``; a lock timeout is ``OperationalError``), and the store's writer threads
drop a connection SQLAlchemy marks invalidated. Parameters are hidden, as the engine's
``hide_parameters`` has them: they may carry patient data.
"""

from __future__ import annotations

from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect


def driver_error(c: Connection, exc: Exception, statement: str) -> sa.exc.StatementError:
    """``exc``, raised by the driver under ``c`` for ``statement``, as SQLAlchemy's error."""
    gone = c.dialect.is_disconnect(cast(Any, exc), c.connection.dbapi_connection, None)
    # a writer thread then drops the connection
    return dialect_error(c.dialect, exc, statement, connection_invalidated=gone)


def dialect_error(
    dialect: Dialect, exc: Exception, statement: str, *, connection_invalidated: bool = False
) -> sa.exc.StatementError:
    """``exc``, raised by ``dialect``'s driver for ``statement`` on a connection SQLAlchemy
    does not manage (engine/driver_reads.py), as SQLAlchemy's error."""
    return sa.exc.DBAPIError.instance(
        statement,
        None,
        exc,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=connection_invalidated,
        dialect=dialect,
    )
