"""A PostgreSQL database of a bench run's own, for the bench scripts that import it (they run
from this folder, which Python puts first on their path)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa


@contextmanager
def own_postgres_database(server: str, prefix: str = "mcbench") -> Iterator[str]:
    """A database created on ``server`` (a ``postgresql://`` URL of any database there) for the
    run; its URL is yielded, and it is dropped after, its sessions ended."""
    admin = sa.create_engine(
        server.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
