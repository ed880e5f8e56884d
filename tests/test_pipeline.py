"""The delivery side's pipeline: claims taken in batches, statuses written in batches, group
commit without savepoints, and the brokers' windowed FIFO consumption (``Pipelined``).

Store tests run on SQLite and PostgreSQL, broker tests on RabbitMQ and the embedded queue; the
engine itself is exercised end to end by the ordering, admin, fault and crash-recovery tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import NoResultFound

from medcourier.channels.mllp.ack import message_control_id
from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine import store as store_module
from medcourier.engine.broker import WorkItem
from medcourier.engine.model import Status
from medcourier.engine.schema import deliveries, documents, payloads, status_events
from medcourier.engine.store import AsyncStore, StatusChange, Store, rerunnable
from tests.harness import (
    LoopThread,
    Running,
    free_port,
    pdf_bytes,
    running_engine,
    stored_document,
)
from tests.services import fresh_postgres_url, own_postgres_database, rabbitmq_url
from tests.test_broker import Kind, closing, new_instance, run
from tests.test_ordering import _send_many

ROUTE = "r"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store(None if request.param == "sqlite" else fresh_postgres_url(), tmp_path / "data")
    s.create_schema()
    yield s
    s.dispose()


def add(store: Store, payload: bytes | None = None) -> str:
    return stored_document(store, pdf_bytes() if payload is None else payload, [ROUTE])


def row(store: Store, txid: str) -> Any:
    with store.engine.connect() as c:
        return c.execute(sa.select(deliveries).where(deliveries.c.transaction_id == txid)).one()


def history(store: Store, txid: str) -> list[tuple[str, str | None]]:
    return [(s.value, reason) for _, s, _, reason in store.history(txid)]


class Statements:
    """Counts what a connection sends (BEGIN and COMMIT included where the driver sends them)."""

    def __init__(self, store: Store) -> None:
        self.sent: list[str] = []
        self.engine = store.engine
        sa.event.listen(self.engine, "before_cursor_execute", self._count)

    def _count(self, _c: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.sent.append(statement.split(None, 1)[0].upper())

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._count)

    def data(self) -> list[str]:
        return [s for s in self.sent if s not in ("BEGIN", "COMMIT")]


# --------------------------------------------------------------------------- accept


@pytest.mark.parametrize("size", [4096, 2 * 1024 * 1024], ids=["small", "large"])
def test_an_accept_is_one_statement_on_postgresql(store: Store, size: int) -> None:
    """A document's rows (document, payload, a delivery and a history row per route) go in one
    statement on PostgreSQL, unless the payload is large (written by COPY, apart); SQLite runs
    its four on the driver (engine/sqlite_statements.py), which SQLAlchemy's events do not see."""
    payload = pdf_bytes(size)
    routes = ["r-c", "r-a", "r-b"]
    counter = Statements(store)
    try:
        txid = stored_document(store, payload, routes)
    finally:
        counter.close()
    one = not store.is_sqlite and size == 4096
    assert (len(counter.data()) == 1) is one, counter.sent
    with store.engine.connect() as c:
        kept = c.execute(
            sa.select(payloads.c.data).where(payloads.c.transaction_id == txid)
        ).scalar_one()
        got = {
            r.route: r
            for r in c.execute(sa.select(deliveries).where(deliveries.c.transaction_id == txid))
        }
    assert bytes(kept) == payload
    assert sorted(got) == sorted(routes)
    assert {(r.status, r.attempts, r.sent_at, r.reason) for r in got.values()} == {
        ("preparation", 0, None, None)
    }
    # the history in the order of the routes given, as the route list is shown
    assert [(route, s.value, why) for route, s, _, why in store.history(txid)] == [
        (route, "preparation", "accepted") for route in routes
    ]
    with store.engine.connect() as c:
        doc = c.execute(sa.select(documents).where(documents.c.transaction_id == txid)).one()
    assert (doc.payload_size, doc.content_type, doc.title, doc.patient_id) == (
        size,
        "application/pdf",
        "t",
        "p-1",
    )
    assert (doc.sender_identifier, doc.sender_application, doc.encounter_id) == (None, "test", None)
    created = doc.created_at if doc.created_at.tzinfo else doc.created_at.replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 300


def test_an_accept_needs_a_route(store: Store) -> None:
    """A document no route would deliver is refused on both databases, nothing stored (submit
    never asks: it answers "no route" first)."""
    txid = uuid.uuid4().hex[:20]
    with pytest.raises(ValueError, match="at least one route"):
        stored_document(store, pdf_bytes(), [], txid=txid)
    with store.engine.connect() as c:
        for table in (documents, payloads):
            q = sa.select(sa.func.count()).where(table.c.transaction_id == txid)
            assert c.execute(q).scalar_one() == 0


# --------------------------------------------------------------------------- claims


def test_a_claim_is_three_statements_at_most(store: Store) -> None:
    txid = add(store)
    counter = Statements(store)
    try:
        claim = store.claim(txid, ROUTE)
    finally:
        counter.close()
    assert claim is not None and claim.document is not None
    assert claim.previous is Status.PREPARATION
    assert claim.document.payload == pdf_bytes()
    assert claim.document.patient == {"resourceType": "Patient", "id": "p-1"}
    # SQLite: read, update, history insert; PostgreSQL: read, then the update in the insert's WITH.
    assert len(counter.data()) == (3 if store.is_sqlite else 2), counter.sent
    assert row(store, txid).status == Status.IN_PROGRESS.value
    assert row(store, txid).attempts == 1
    assert history(store, txid) == [("preparation", "accepted"), ("in-progress", None)]


def test_a_batch_claim_adds_history_only_for_what_was_not_in_progress(store: Store) -> None:
    """The head already in progress (a retry), the items behind it new: every attempt is
    counted, and only the new ones get an in-progress history row."""
    head, *ahead = [add(store) for _ in range(3)]
    store.claim(head, ROUTE)
    claim, claimed = store.transaction(store.tx_claim_batch, ROUTE, head, ahead)
    assert claim is not None and claim.previous is Status.IN_PROGRESS
    assert sorted(claimed) == sorted(ahead)
    assert row(store, head).attempts == 2
    assert [row(store, t).attempts for t in ahead] == [1, 1]
    assert history(store, head) == [("preparation", "accepted"), ("in-progress", None)]
    for txid in ahead:
        assert history(store, txid) == [("preparation", "accepted"), ("in-progress", None)]


def test_a_claim_again_counts_the_attempt_and_adds_no_history(store: Store) -> None:
    txid = add(store)
    store.claim(txid, ROUTE)
    again = store.claim(txid, ROUTE)
    assert again is not None and again.document is not None
    assert again.previous is Status.IN_PROGRESS
    assert row(store, txid).attempts == 2
    assert history(store, txid) == [("preparation", "accepted"), ("in-progress", None)]


def test_a_final_delivery_is_not_claimed(store: Store) -> None:
    txid = add(store)
    store.set_status(txid, ROUTE, Status.COMPLETED, "done")
    claim = store.claim(txid, ROUTE)
    assert claim is not None and claim.document is None
    assert claim.previous is Status.COMPLETED
    assert row(store, txid).status == Status.COMPLETED.value
    assert store.claim("nonexistent000000000", ROUTE) is None


def test_a_claim_whose_payload_is_gone_fails_and_changes_nothing(store: Store) -> None:
    txid = add(store)
    with store.engine.begin() as c:
        c.execute(payloads.delete().where(payloads.c.transaction_id == txid))
    with pytest.raises(NoResultFound):
        store.claim(txid, ROUTE)
    assert row(store, txid).status == Status.PREPARATION.value
    assert row(store, txid).attempts == 0
    assert history(store, txid) == [("preparation", "accepted")]


def test_the_items_behind_are_claimed_in_the_same_three_statements(store: Store) -> None:
    head, *behind = [add(store) for _ in range(5)]
    counter = Statements(store)
    try:
        claim, more = store.transaction(store.tx_claim_batch, ROUTE, head, behind)
    finally:
        counter.close()
    assert claim is not None and claim.document is not None
    assert set(more) == set(behind)
    for txid in behind:
        assert more[txid].previous is Status.PREPARATION
        document = more[txid].document
        assert document is not None and document.transaction_id == txid
        assert row(store, txid).status == Status.IN_PROGRESS.value
        assert history(store, txid) == [("preparation", "accepted"), ("in-progress", None)]
    assert len(counter.data()) == (3 if store.is_sqlite else 2), counter.sent


def test_what_cannot_be_claimed_ahead_is_left_for_its_turn(store: Store) -> None:
    head = add(store)
    final = add(store)
    store.set_status(final, ROUTE, Status.ENTERED_IN_ERROR, "cancelled")
    pruned = add(store)
    with store.engine.begin() as c:
        c.execute(payloads.delete().where(payloads.c.transaction_id == pruned))
    big = add(store, b"%PDF" + b"x" * 5000)
    fits = add(store)
    ahead = [final, pruned, "nonexistent000000000", big, fits]
    claim, more = store.transaction(store.tx_claim_batch, ROUTE, head, ahead, 4096)
    assert claim is not None and claim.document is not None
    # A final one is answered (dropped at its turn); the others wait untouched.
    assert more[final].previous is Status.ENTERED_IN_ERROR and more[final].document is None
    assert set(more) == {final, fits}
    for txid in (pruned, big):
        assert row(store, txid).status == Status.PREPARATION.value
        assert row(store, txid).attempts == 0
    assert row(store, fits).status == Status.IN_PROGRESS.value


# --------------------------------------------------------------------------- statuses


def test_a_status_change_reports_the_previous_status(store: Store) -> None:
    txid = add(store)
    counter = Statements(store)
    try:
        old = store.set_status(txid, ROUTE, Status.IN_PROGRESS, "taken")
    finally:
        counter.close()
    assert old is Status.PREPARATION
    # SQLite: the read; its update and history row run on the driver (engine/sqlite_statements.py),
    # unseen by SQLAlchemy's events
    assert len(counter.data()) == 1, counter.sent
    assert store.set_status(txid, ROUTE, Status.COMPLETED, "done") is Status.IN_PROGRESS
    # A delivery that does not exist: no previous status, the history row is added as before.
    assert store.set_status(txid, "other", Status.COMPLETED) is None
    assert history(store, txid)[-2:] == [("completed", "done"), ("completed", None)]


def test_status_changes_of_several_deliveries_go_together(store: Store) -> None:
    first, second = add(store), add(store)
    store.claim(first, ROUTE)
    sent = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    changes = [
        StatusChange(first, Status.COMPLETED, "delivered", sent),
        StatusChange(second, Status.ENTERED_IN_ERROR, "refused"),
        StatusChange("nonexistent000000000", Status.COMPLETED, "x"),
    ]
    counter = Statements(store)
    try:
        old = store.transaction(store.tx_set_statuses, ROUTE, changes)
    finally:
        counter.close()
    assert old == [Status.IN_PROGRESS, Status.PREPARATION, None]
    assert len(counter.data()) == (1 if store.is_sqlite else 3), counter.sent  # as above
    assert row(store, first).status == Status.COMPLETED.value
    assert row(store, first).sent_at.replace(tzinfo=UTC) == sent
    assert row(store, second).status == Status.ENTERED_IN_ERROR.value
    assert row(store, second).sent_at is None
    assert history(store, second)[-1] == ("entered-in-error", "refused")
    # A change without a sent time keeps the one recorded.
    store.transaction(
        store.tx_set_statuses,
        ROUTE,
        [StatusChange(first, Status.COMPLETED, "again"), StatusChange(second, Status.COMPLETED)],
    )
    assert row(store, first).sent_at.replace(tzinfo=UTC) == sent


# --------------------------------------------------------------------------- group commit


def _insert_event(c: Connection, txid: str, fail: bool = False) -> str:
    c.execute(
        status_events.insert().values(
            transaction_id=txid, route=ROUTE, status="completed", at=datetime.now(UTC)
        )
    )
    if fail:
        raise ValueError("this write fails")
    return txid


def test_a_batch_commits_once_and_a_failing_write_fails_alone(store: Store) -> None:
    async_store = AsyncStore(store)
    release = threading.Event()

    def hold(c: Connection) -> None:
        release.wait(10)

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(async_store.write(hold))
        await asyncio.sleep(0.1)  # the writer holds: what follows waits for it, as one batch
        tail = [async_store.write(_insert_event, f"ok-{i}") for i in range(5)]
        tail.insert(2, async_store.write(_insert_event, "failing", True))
        gathered = asyncio.gather(*tail, return_exceptions=True)
        await asyncio.sleep(0.1)
        release.set()
        await first
        return await gathered

    commits: list[int] = []
    sa.event.listen(store.engine, "commit", lambda _c: commits.append(1))
    try:
        results = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        async_store.close()
    assert isinstance(results[2], ValueError)
    assert [r for i, r in enumerate(results) if i != 2] == [f"ok-{i}" for i in range(5)]
    assert history(store, "failing") == []
    assert all(history(store, f"ok-{i}") == [("completed", None)] for i in range(5))
    # the held write, then the batch with a savepoint per write
    assert len(commits) == 2


@rerunnable
def _insert_event_again(c: Connection, txid: str, fail: bool = False) -> str:
    """``_insert_event``, marked as safe to run again."""
    return _insert_event(c, txid, fail)


def test_a_batch_of_rerunnable_writes_has_no_savepoints_and_a_failure_still_fails_alone(
    store: Store,
) -> None:
    async_store = AsyncStore(store)
    release = threading.Event()
    counter = Statements(store)

    async def batch(names: list[str], failing: str | None = None) -> list[Any]:
        first = asyncio.ensure_future(async_store.write(lambda c: release.wait(10)))
        await asyncio.sleep(0.1)  # the writer holds: what follows waits for it, as one batch
        tail = [async_store.write(_insert_event_again, n, n == failing) for n in names]
        gathered = asyncio.gather(*tail, return_exceptions=True)
        await asyncio.sleep(0.1)
        release.set()
        await first
        release.clear()
        return await gathered

    try:
        plain = asyncio.run(asyncio.wait_for(batch([f"sp-{i}" for i in range(4)]), 30))
        sent_plain = list(counter.sent)
        names = [f"rr-{i}" for i in range(4)]
        failed = asyncio.run(asyncio.wait_for(batch(names, "rr-1"), 30))
    finally:
        counter.close()
        async_store.close()
    assert plain == [f"sp-{i}" for i in range(4)]
    assert not [s for s in sent_plain if s in ("SAVEPOINT", "RELEASE")], sent_plain
    assert isinstance(failed[1], ValueError)
    assert [failed[i] for i in (0, 2, 3)] == ["rr-0", "rr-2", "rr-3"]
    assert history(store, "rr-1") == []
    assert all(history(store, n) == [("completed", None)] for n in ("rr-0", "rr-2", "rr-3"))


def test_each_write_of_a_batch_runs_once_even_when_a_neighbour_fails(store: Store) -> None:
    """A write may keep Python state (the id it made for its answer): never run twice."""
    async_store = AsyncStore(store)
    release = threading.Event()
    runs: list[str] = []

    def counted(c: Connection, txid: str, fail: bool = False) -> str:
        runs.append(txid)
        return _insert_event(c, txid, fail)

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(async_store.write(lambda c: release.wait(10)))
        await asyncio.sleep(0.1)
        tail = [async_store.write(counted, f"once-{i}", i == 1) for i in range(4)]
        gathered = asyncio.gather(*tail, return_exceptions=True)
        await asyncio.sleep(0.1)
        release.set()
        await first
        return await gathered

    try:
        results = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        async_store.close()
    assert sorted(runs) == [f"once-{i}" for i in range(4)]
    assert isinstance(results[1], ValueError)
    assert [results[i] for i in (0, 2, 3)] == ["once-0", "once-2", "once-3"]
    assert history(store, "once-1") == []


def test_writer_threads_keep_their_connections_and_connect_again_after_postgresql_drops_them(
    tmp_path: Path,
) -> None:
    """Each writer thread keeps one connection across commits. When PostgreSQL drops them all
    (a restart, a failover), the write that meets a dead one fails, as a pool checkout of a
    dead connection would; the other threads connect again before their next write instead of
    failing one write each, in the group commit and in the autocommit lane alike."""
    with own_postgres_database() as url:
        store = Store(url, tmp_path / "data")
        store.create_schema()
        async_store = AsyncStore(store)

        def backend(c: Connection, txid: str) -> tuple[str, int]:
            _insert_event(c, txid)
            pid = c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            return threading.current_thread().name, pid

        async def in_turn(prefix: str, count: int) -> list[Any]:
            results: list[Any] = []
            for i in range(count):
                try:
                    results.append(await async_store.write(backend, f"{prefix}-{i}"))
                except sa.exc.OperationalError as exc:
                    results.append(exc)
            return results

        async def autocommit(txid: str) -> Any:
            try:
                return await async_store.write_autocommit(backend, txid)
            except sa.exc.OperationalError as exc:
                return exc

        try:
            before = asyncio.run(in_turn("kept", 4 * async_store.writers))
            auto = [
                asyncio.run(autocommit(f"auto-kept-{i}")) for i in range(4 * async_store.writers)
            ]
            assert len({name for name, _pid in auto}) == async_store.writers  # each connected
            kept_auto = {pid for _name, pid in auto}
            threads: dict[str, set[int]] = {}
            for name, pid in before:
                threads.setdefault(name, set()).add(pid)
            assert len(threads) == async_store.writers  # every thread wrote...
            assert all(len(pids) == 1 for pids in threads.values())  # ...on one connection
            kept = set().union(*threads.values())

            admin = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
            with admin.connect() as c:
                c.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            admin.dispose()

            count = 2 * async_store.writers
            after = asyncio.run(in_turn("after", count))
            failed = [i for i, r in enumerate(after) if isinstance(r, Exception)]
            assert failed == [0], after  # the first write met a dead connection; no other did
            assert not kept & {pid for _name, pid in after[1:]}  # the rest on new connections
            assert history(store, "after-0") == []
            assert all(
                history(store, f"after-{i}") == [("completed", None)] for i in range(1, count)
            )
            # The autocommit lane's threads had dead connections too: told, they connected again.
            auto = [asyncio.run(autocommit(f"auto-after-{i}")) for i in range(async_store.writers)]
            assert not [r for r in auto if isinstance(r, Exception)], auto
            assert not kept_auto & {pid for _name, pid in auto}
        finally:
            async_store.close()  # disposes of the store's engine too


def test_a_sqlite_write_lock_not_had_in_time_is_sqlalchemys_operational_error(
    tmp_path: Path,
) -> None:
    """The store's BEGIN IMMEDIATE goes straight to the driver; when another connection holds
    the write lock past the busy timeout, callers still get SQLAlchemy's OperationalError (the
    journal answers it as "engine unavailable", the applier retries), not sqlite3's own."""
    store = Store(None, tmp_path / "data")
    store.create_schema()
    quick = sa.create_engine(store.url, connect_args={"timeout": 0.2})
    sa.event.listen(quick, "connect", store_module._sqlite_pragmas)
    sa.event.listen(quick, "begin", store_module._sqlite_begin)
    try:
        with store.engine.connect() as holder:
            holder.begin()  # BEGIN IMMEDIATE: the write lock, until rolled back
            with quick.connect() as c, pytest.raises(sa.exc.OperationalError, match="locked"):
                c.begin()
            holder.rollback()
        with quick.begin() as c:  # and the lock is taken once free
            assert c.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        quick.dispose()
        store.dispose()


# --------------------------------------------------------------------------- brokers


@pytest.fixture(params=["amqp", "embedded"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    if request.param == "amqp":
        rabbitmq_url()
    k = Kind(request.param, tmp_path)
    yield k
    k.cleanup()


class Pipeline:
    """A ``Pipelined`` handler that records what it is given; each item's rest is a future the
    test settles."""

    window = 4

    def __init__(self, fail_times: dict[str, int] | None = None) -> None:
        self.calls: list[WorkItem] = []
        self.begun: list[str] = []
        self.seen_ahead: list[WorkItem] = []
        self.rest: dict[str, asyncio.Future[None]] = {}
        self.fail_times = dict(fail_times or {})

    async def __call__(self, item: WorkItem) -> None:
        raise AssertionError("a pipelined FIFO route is begun, not called")

    async def begin(self, item: WorkItem, ahead: Sequence[WorkItem]) -> asyncio.Future[None]:
        self.calls.append(item)
        if self.fail_times.get(item.transaction_id, 0) > 0:
            self.fail_times[item.transaction_id] -= 1
            raise RuntimeError("begin failure requested by the test")
        self.begun.append(item.transaction_id)
        self.seen_ahead.extend(ahead)
        future = asyncio.get_running_loop().create_future()
        self.rest[item.transaction_id] = future
        return future

    async def wait_begun(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.begun) < count:
            assert time.monotonic() < deadline, f"begun {self.begun}"
            await asyncio.sleep(0.01)


def test_a_fifo_route_is_begun_in_order_within_its_window(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab"])
    pipeline = Pipeline()
    txids = [f"tx-{i}" for i in range(10)]

    async def scenario() -> list[str]:
        await broker.start(["lab"])
        for txid in txids:
            await broker.publish(WorkItem(txid, "lab"))
        await broker.consume("lab", pipeline)
        await pipeline.wait_begun(4)
        await asyncio.sleep(0.3)
        held = list(pipeline.begun)  # nothing is acknowledged: the window is full
        for txid in txids:
            await pipeline.wait_begun(txids.index(txid) + 1)
            pipeline.rest[txid].set_result(None)
        await asyncio.sleep(0.2)
        return held

    held = run(closing(broker, scenario))
    assert held == txids[:4]
    assert pipeline.begun == txids
    # An item announced ahead is later begun as that very object.
    for item in pipeline.calls:
        earlier = [a for a in pipeline.seen_ahead if a.transaction_id == item.transaction_id]
        assert all(a is item for a in earlier)
    assert kind.ready_count(instance, "lab") == 0


def test_a_failed_begin_is_retried_in_place_before_the_next(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab"])
    pipeline = Pipeline(fail_times={"tx-1": 2})

    async def scenario() -> None:
        await broker.start(["lab"])
        for i in range(4):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        await broker.consume("lab", pipeline)
        for i in range(4):
            await pipeline.wait_begun(i + 1)
            pipeline.rest[f"tx-{i}"].set_result(None)

    run(closing(broker, scenario))
    calls = [c.transaction_id for c in pipeline.calls]
    assert calls == ["tx-0", "tx-1", "tx-1", "tx-1", "tx-2", "tx-3"]
    retried = [c for c in pipeline.calls if c.transaction_id == "tx-1"]
    assert all(c is retried[0] for c in retried)


def test_an_item_is_acknowledged_only_once_its_rest_is_done() -> None:
    """RabbitMQ gives back what was begun but not finished when the consumer goes away."""
    rabbitmq_url()
    kind = Kind("amqp", Path("/nonexistent"))
    instance = new_instance()
    broker = kind.make(instance, ["lab"])
    pipeline = Pipeline()

    async def scenario() -> None:
        await broker.start(["lab"])
        for i in range(6):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        await broker.consume("lab", pipeline)
        await pipeline.wait_begun(4)
        pipeline.rest["tx-0"].set_result(None)
        await asyncio.sleep(0.2)
        pipeline.rest["tx-1"].cancel()  # the rest failed: left unacknowledged

    try:
        run(closing(broker, scenario))
        assert kind.ready_count(instance, "lab") == 5
    finally:
        kind.cleanup()


# --------------------------------------------------------------------------- claims made ahead


class _DropsOnce(EhrSimulator):
    """An EHR that closes the connection without an ACK the first time it gets ``control_id``:
    the sender retries that message (a transport failure, unlike an AE)."""

    def __init__(self, port: int, control_id: str) -> None:
        super().__init__(port=port)
        self.control_id = control_id
        self.dropped = False

    def _accept(self, message: bytes) -> bytes:
        ack = super()._accept(message)
        if not self.dropped and message_control_id(message) == self.control_id:
            self.dropped = True
            raise OSError("dropped without an ACK")
        return ack


def test_claims_made_ahead_are_dropped_when_the_item_before_them_retries(
    lt: LoopThread, tmp_path: Path
) -> None:
    """Items claimed with an earlier one would otherwise go with what was read then (a patient
    updated meanwhile, a replay asked meanwhile) however long it retries: they are claimed
    again at their turn, which counts their attempt again."""
    port = free_port()
    retry = {"max_attempts": 100, "initial_delay": 0.1, "max_delay": 0.2}
    with running_engine(lt, tmp_path, ehr_up=False, ehr_port=port, retry=retry) as r:
        # the EHR is down: the first waits, the others queue behind it
        txids = _send_many(r, 4, "demo-hl7")
        ehr = _DropsOnce(port, txids[1])
        lt.run(ehr.start())
        try:
            for txid in txids:
                r.wait_status(txid, {"completed"})
        finally:
            lt.run(ehr.stop())
        assert ehr.dropped
        firsts = list(dict.fromkeys(message_control_id(m) for m in ehr.received))
        assert firsts == txids  # in order all the same
        # claimed with the second (or the first), then again once the second retried
        assert [attempts(r, t) >= 2 for t in txids[2:]] == [True, True]


def attempts(r: Running, txid: str) -> int:
    with r.engine.store.sync.engine.connect() as c:
        q = sa.select(deliveries.c.attempts).where(deliveries.c.transaction_id == txid)
        return int(c.execute(q).scalar_one())
