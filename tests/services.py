"""Real RabbitMQ and PostgreSQL for the test suite, never mocks and never skips.

Order of preference, per service:

1. something already listening on 127.0.0.1 (development machines and CI run both services);
2. a container started with testcontainers when a Docker engine answers, kept for the whole test
   session (module-level cache) and stopped at interpreter exit;
3. otherwise the test fails with instructions: a suite that silently skips its integration tests
   would report green while testing nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

RABBITMQ_LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672//"
# Trust authentication as the ``postgres`` superuser on its default database (checked with
# ``psql -h 127.0.0.1 -U postgres -c 'select 1'``).
POSTGRES_LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

_lock = threading.Lock()
_cache: dict[str, str] = {}
_containers: list[Any] = []


def _listening(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _docker_usable() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _stop_containers() -> None:
    while _containers:
        container = _containers.pop()
        try:
            container.stop()
        except Exception as exc:  # interpreter exit: report, do not raise
            print(f"tests.services: could not stop {container!r}: {exc}")


def _keep(container: Any) -> None:
    if not _containers:
        atexit.register(_stop_containers)
    _containers.append(container)


def _start_rabbitmq() -> str:
    from testcontainers.community.rabbitmq import RabbitMqContainer

    container = RabbitMqContainer("rabbitmq:3.13-alpine")
    container.start()
    _keep(container)
    host = container.get_container_host_ip()
    port = container.get_exposed_port(container.port)
    return f"amqp://{container.username}:{container.password}@{host}:{port}//"


def _start_postgres() -> str:
    from testcontainers.community.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver=None)
    container.start()
    _keep(container)
    return str(container.get_connection_url())


def _service(name: str, port: int, local_url: str, start: Any, how_to_start: str) -> str:
    with _lock:
        if name in _cache:
            return _cache[name]
        if _listening(port):
            url = local_url
        elif _docker_usable():
            url = start()
        else:
            pytest.fail(
                f"{name} is not reachable on 127.0.0.1:{port} and no Docker engine is available "
                f"to start one: {how_to_start}",
                pytrace=False,
            )
        _cache[name] = url
        return url


def rabbitmq_url() -> str:
    """An ``amqp://`` URL of a running RabbitMQ (guest/guest, vhost ``/``)."""
    return _service(
        "RabbitMQ",
        5672,
        RABBITMQ_LOCAL_URL,
        _start_rabbitmq,
        "start RabbitMQ (rabbitmq-server -detached, or your service manager) with the guest "
        "user allowed from localhost, or start Docker so testcontainers can run one.",
    )


def postgres_url() -> str:
    """A ``postgresql://`` URL (no driver suffix) of a running PostgreSQL."""
    return _service(
        "PostgreSQL",
        5432,
        POSTGRES_LOCAL_URL,
        _start_postgres,
        "start PostgreSQL with trust authentication for user postgres on 127.0.0.1 "
        "(pg_ctlcluster … start, or your service manager), or start Docker so testcontainers "
        "can run one.",
    )


def fresh_postgres_url() -> str:
    """A new, empty database on the PostgreSQL server, dropped when the test process exits.

    The store creates its schema on start; a database per test session means a schema change
    never meets tables an older run left behind, and runs never see each other's rows.
    """
    if "fresh_postgres" in _cache:
        return _cache["fresh_postgres"]
    url, drop = _new_database()
    atexit.register(drop)
    _cache["fresh_postgres"] = url
    return url


@contextlib.contextmanager
def own_postgres_database() -> Iterator[str]:
    """A database of one test's own, for a test that counts every row of a table."""
    url, drop = _new_database()
    try:
        yield url
    finally:
        drop()


def _new_database() -> tuple[str, Callable[[], None]]:
    """Create an empty database; return its URL and what drops it."""
    import uuid

    import sqlalchemy as sa

    base = postgres_url()
    admin_url = base.replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"mctest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()

    def drop() -> None:
        eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()

    return base.rsplit("/", 1)[0] + f"/{name}", drop


def delete_broker_objects(url: str, instance: str, routes: list[str]) -> None:
    """Delete what an engine of ``instance`` declared on RabbitMQ: its routes' queues and dead
    letter queues, and its exchange (the server outlives the test session)."""
    import pika
    import pika.exceptions

    from medcourier.engine.broker import dead_letter_queue_name, exchange_name, queue_name

    conn = pika.BlockingConnection(pika.URLParameters(url.replace(":5672//", ":5672/%2F")))
    try:
        for route in routes:
            for queue in (queue_name(instance, route), dead_letter_queue_name(instance, route)):
                ch = conn.channel()
                with contextlib.suppress(pika.exceptions.AMQPError):
                    ch.queue_delete(queue)
                if ch.is_open:
                    ch.close()
        ch = conn.channel()
        with contextlib.suppress(pika.exceptions.AMQPError):
            ch.exchange_delete(exchange_name(instance))
    finally:
        conn.close()
