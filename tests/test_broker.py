"""Both brokers against the real thing: RabbitMQ on its socket, kombu on a real SQLite file.

The shared scenarios run once per broker kind (``amqp``, ``amqp-quorum``, ``embedded``); each test
works under its own instance prefix and removes its RabbitMQ queues and exchange afterwards. An
independent client (pika's BlockingConnection, or kombu / sqlite3 for the embedded file) inspects
what the broker under test really stored. Tests are synchronous and drive the brokers with
``asyncio.run``, every scenario bounded by a timeout so that a hang fails instead of blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pytest
import yaml
from kombu import Connection, Producer, Queue
from pika.channel import Channel
from structlog.testing import capture_logs

from medcourier.engine.broker import (
    Broker,
    WorkItem,
    dead_letter_queue_name,
    exchange_name,
    is_amqp_url,
    open_broker,
    queue_name,
)
from medcourier.engine.broker.amqp import AmqpBroker, amqp_parameters
from medcourier.engine.broker.embedded import EmbeddedBroker
from medcourier.engine.config import parse_config
from medcourier.engine.errors import BrokerError
from medcourier.engine.plugins import load_plugins
from medcourier.engine.service import Engine
from tests.services import rabbitmq_url

T = TypeVar("T")
SCENARIO_TIMEOUT = 30.0


def run(coro: Coroutine[Any, Any, T], timeout: float = SCENARIO_TIMEOUT) -> T:
    """Run one async scenario to completion, failing (not hanging) past ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def new_instance() -> str:
    return f"mctest-{uuid.uuid4().hex[:8]}"


def admin_parameters() -> Any:
    """pika parameters of the test RabbitMQ for the independent inspecting client."""
    return amqp_parameters(rabbitmq_url())


# --------------------------------------------------------------------------- per-kind plumbing


@dataclass
class Kind:
    """How to build, feed raw bytes to, inspect and clean up one kind of broker."""

    name: str
    tmp_path: Path
    used: set[tuple[str, str]] = field(default_factory=set)  # (instance, route) to clean

    @property
    def is_amqp(self) -> bool:
        return self.name.startswith("amqp")

    def make(self, instance: str, routes: list[str]) -> Broker:
        self.used.update((instance, route) for route in routes)
        if self.is_amqp:
            return AmqpBroker(
                rabbitmq_url(),
                instance,
                quorum=self.name == "amqp-quorum",
                requeue_delay=0.05,
                confirm_timeout=5,
            )
        return EmbeddedBroker(
            self.tmp_path / "queue.sqlite", instance, polling_interval=0.01, requeue_delay=0.05
        )

    def inject_raw(self, instance: str, route: str, body: bytes) -> None:
        """Put bytes on the route's queue behind the broker's back (a foreign or broken sender)."""
        if self.is_amqp:
            connection = pika.BlockingConnection(admin_parameters())
            try:
                channel = connection.channel()
                channel.confirm_delivery()
                channel.basic_publish(
                    exchange_name(instance),
                    route,
                    body,
                    pika.BasicProperties(delivery_mode=2),
                    mandatory=True,
                )
            finally:
                connection.close()
            return
        url = f"sqla+sqlite:///{self.tmp_path / 'queue.sqlite'}"
        with Connection(url) as connection:
            channel = connection.channel()
            Producer(channel).publish(
                body,
                exchange="",
                routing_key=queue_name(instance, route),
                content_type="application/json",
                content_encoding="utf-8",
            )
            channel.session.close()

    def ready_count(self, instance: str, route: str) -> int:
        """Items waiting on the route's queue, as an independent client sees them."""
        queue = queue_name(instance, route)
        if self.is_amqp:
            connection = pika.BlockingConnection(admin_parameters())
            try:
                frame = connection.channel().queue_declare(queue, passive=True)
                return int(frame.method.message_count)
            finally:
                connection.close()
        with sqlite3.connect(self.tmp_path / "queue.sqlite") as db:
            row = db.execute(
                "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
                " WHERE q.name = ? AND m.visible = 1",
                (queue,),
            ).fetchone()
        return int(row[0])

    def cleanup(self) -> None:
        if self.is_amqp and self.used:
            delete_amqp(self.used)


def delete_amqp(used: set[tuple[str, str]]) -> None:
    connection = pika.BlockingConnection(admin_parameters())
    try:
        channel = connection.channel()
        for instance, route in sorted(used):
            channel.queue_delete(queue_name(instance, route))
            channel.queue_delete(dead_letter_queue_name(instance, route))
        for instance in sorted({instance for instance, _ in used}):
            channel.exchange_delete(exchange_name(instance))
    finally:
        connection.close()


@pytest.fixture(params=["amqp", "amqp-quorum", "embedded"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    if request.param.startswith("amqp"):
        rabbitmq_url()  # fails the test with instructions when RabbitMQ is unavailable
    k = Kind(request.param, tmp_path)
    yield k
    k.cleanup()


@pytest.fixture(params=["amqp", "amqp-quorum"])
def amqp_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kind]:
    rabbitmq_url()
    k = Kind(request.param, tmp_path)
    yield k
    k.cleanup()


class Recorder:
    """A handler that records deliveries and lets a test wait for a number of them."""

    def __init__(self, fail: Callable[[WorkItem, int], bool] | None = None) -> None:
        self.calls: list[str] = []  # every invocation, failed ones included
        self.done: list[str] = []  # successful ones, in order
        self._fail = fail
        self._changed = asyncio.Event()

    async def __call__(self, item: WorkItem) -> None:
        self.calls.append(item.transaction_id)
        self._changed.set()
        if self._fail is not None and self._fail(item, self.calls.count(item.transaction_id)):
            raise RuntimeError("handler failure requested by the test")
        self.done.append(item.transaction_id)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.done) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(self.done)} of {count} items: {self.done[-5:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.done

    async def settle(self, quiet: float = 0.3) -> None:
        """Wait until nothing new arrived for ``quiet`` seconds (to catch extra deliveries)."""
        seen = -1
        while seen != len(self.calls):
            seen = len(self.calls)
            await asyncio.sleep(quiet)


async def closing(broker: Broker, scenario: Callable[[], Awaitable[T]]) -> T:
    try:
        return await scenario()
    finally:
        await broker.close()


# --------------------------------------------------------------------------- shared scenarios


def test_concurrent_publishes_are_consumed_fifo_per_route(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab", "adt"])
    items = [WorkItem(f"tx-{i:04d}", "lab" if i % 3 else "adt") for i in range(500)]

    async def scenario() -> tuple[list[str], list[str]]:
        await broker.start(["lab", "adt"])
        await asyncio.gather(*(broker.publish(item) for item in items))
        lab, adt = Recorder(), Recorder()
        await broker.consume("lab", lab)
        await broker.consume("adt", adt)
        expected_lab = sum(1 for item in items if item.route == "lab")
        await lab.wait_for(expected_lab)
        await adt.wait_for(len(items) - expected_lab)
        await lab.settle(0.1)
        return lab.done, adt.done

    lab_done, adt_done = run(closing(broker, scenario))
    assert lab_done == [i.transaction_id for i in items if i.route == "lab"]
    assert adt_done == [i.transaction_id for i in items if i.route == "adt"]
    assert kind.ready_count(instance, "lab") == 0


def test_failed_item_is_redelivered_before_later_items(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab"])
    # tx-1 fails on its first two deliveries; everything queued behind it must wait.
    recorder = Recorder(fail=lambda item, nth: item.transaction_id == "tx-1" and nth <= 2)

    async def scenario() -> None:
        await broker.start(["lab"])
        for i in range(4):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        await broker.consume("lab", recorder)
        await recorder.wait_for(4)
        await recorder.settle(0.2)

    run(closing(broker, scenario))
    assert recorder.calls == ["tx-0", "tx-1", "tx-1", "tx-1", "tx-2", "tx-3"]
    assert recorder.done == ["tx-0", "tx-1", "tx-2", "tx-3"]


def test_items_survive_close_and_reopen(kind: Kind) -> None:
    instance = new_instance()
    first = kind.make(instance, ["lab"])

    async def publish() -> None:
        await first.start(["lab"])
        for i in range(20):
            await first.publish(WorkItem(f"tx-{i}", "lab", attempt=2))

    run(closing(first, publish))
    assert kind.ready_count(instance, "lab") == 20

    second = kind.make(instance, ["lab"])
    recorder = Recorder()

    async def consume() -> None:
        await second.start(["lab"])
        await second.consume("lab", recorder)
        await recorder.wait_for(20)

    run(closing(second, consume))
    assert recorder.done == [f"tx-{i}" for i in range(20)]


def test_work_item_fields_round_trip(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab"])
    received: list[WorkItem] = []

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.publish(WorkItem("tx-é-1", "lab", attempt=7))
        done = asyncio.Event()

        async def handler(item: WorkItem) -> None:
            received.append(item)
            done.set()

        await broker.consume("lab", handler)
        await asyncio.wait_for(done.wait(), 10)

    run(closing(broker, scenario))
    assert received == [WorkItem("tx-é-1", "lab", attempt=7)]


def test_instances_do_not_see_each_other(kind: Kind) -> None:
    one, two = new_instance(), new_instance()
    broker_one = kind.make(one, ["lab"])
    broker_two = kind.make(two, ["lab"])
    rec_one, rec_two = Recorder(), Recorder()

    async def scenario() -> None:
        await broker_one.start(["lab"])
        await broker_two.start(["lab"])
        try:
            for i in range(5):
                await broker_one.publish(WorkItem(f"one-{i}", "lab"))
                await broker_two.publish(WorkItem(f"two-{i}", "lab"))
            await broker_one.consume("lab", rec_one)
            await broker_two.consume("lab", rec_two)
            await rec_one.wait_for(5)
            await rec_two.wait_for(5)
            await rec_one.settle(0.2)
        finally:
            await broker_two.close()

    run(closing(broker_one, scenario))
    assert rec_one.done == [f"one-{i}" for i in range(5)]
    assert rec_two.done == [f"two-{i}" for i in range(5)]


def test_purge_drops_waiting_items(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab", "adt"])
    recorder = Recorder()

    async def scenario() -> tuple[int, int]:
        await broker.start(["lab", "adt"])
        for i in range(7):
            await broker.publish(WorkItem(f"old-{i}", "lab"))
        await broker.publish(WorkItem("other-route", "adt"))
        purged = await broker.purge("lab")
        again = await broker.purge("lab")
        await broker.publish(WorkItem("new-0", "lab"))
        await broker.consume("lab", recorder)
        await recorder.wait_for(1)
        await recorder.settle(0.2)
        return purged, again

    purged, again = run(closing(broker, scenario))
    assert (purged, again) == (7, 0)
    assert recorder.done == ["new-0"]
    assert kind.ready_count(instance, "adt") == 1


def test_malformed_item_is_dropped_not_retried(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab"])
    recorder = Recorder()

    async def scenario() -> None:
        await broker.start(["lab"])
        kind.inject_raw(instance, "lab", b"\x00 this is not a work item")
        kind.inject_raw(instance, "lab", b'{"route": "lab"}')
        await broker.publish(WorkItem("tx-ok", "lab"))
        await broker.consume("lab", recorder)
        await recorder.wait_for(1)
        await recorder.settle(0.2)

    run(closing(broker, scenario))
    assert recorder.calls == ["tx-ok"]
    assert kind.ready_count(instance, "lab") == 0


def test_unacknowledged_item_returns_to_queue_on_close(amqp_kind: Kind) -> None:
    """close() while a handler keeps failing: the item stays queued for the next start.

    RabbitMQ only: the embedded queue leaves such an item to the store, see
    ``test_embedded_items_in_memory_at_close_are_left_to_the_store``.
    """
    kind = amqp_kind
    instance = new_instance()
    broker = kind.make(instance, ["lab"])
    recorder = Recorder(fail=lambda item, nth: True)

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.publish(WorkItem("tx-stuck", "lab"))
        await broker.consume("lab", recorder)
        while len(recorder.calls) < 2:
            await asyncio.sleep(0.01)

    run(closing(broker, scenario))
    assert recorder.done == []
    # A quorum queue counts the returned item a moment after the channel has closed (seen
    # once: 0 right after close()), so the count is read until it shows or 5 s have passed.
    deadline = time.monotonic() + 5
    while kind.ready_count(instance, "lab") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kind.ready_count(instance, "lab") == 1


def test_lifecycle_errors_are_broker_errors(kind: Kind) -> None:
    instance = new_instance()
    broker = kind.make(instance, ["lab"])

    async def scenario() -> None:
        with pytest.raises(BrokerError):
            await broker.publish(WorkItem("tx-early", "lab"))
        await broker.start(["lab"])
        with pytest.raises(BrokerError):
            await broker.start(["lab"])
        await broker.consume("lab", Recorder())
        with pytest.raises(BrokerError):
            await broker.consume("lab", Recorder())
        await broker.close()
        await broker.close()  # idempotent
        with pytest.raises(BrokerError):
            await broker.publish(WorkItem("tx-late", "lab"))

    run(scenario())


# --------------------------------------------------------------------------- RabbitMQ only


@pytest.mark.parametrize(
    ("url", "vhost", "port", "tls"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "/", 5672, False),
        ("amqp://guest:guest@127.0.0.1:5672/%2F", "/", 5672, False),
        ("amqp://guest:guest@127.0.0.1:5672/%2f", "/", 5672, False),
        ("amqp://guest:guest@127.0.0.1:5672", "/", 5672, False),
        ("amqp://guest:guest@127.0.0.1:5672/", "/", 5672, False),
        ("amqp://guest:guest@127.0.0.1", "/", 5672, False),
        ("amqp://u:p@mq.example:5673/medical", "medical", 5673, False),
        ("amqp://u:p@mq.example/a%2Fb", "a/b", 5672, False),
        ("AMQP://u:p@mq.example//", "/", 5672, False),
        ("amqps://u:p@mq.example//", "/", 5671, True),
        ("amqps://u:p@mq.example:5676/%2F?heartbeat=15", "/", 5676, True),
    ],
)
def test_amqp_parameters(url: str, vhost: str, port: int, tls: bool) -> None:
    params = amqp_parameters(url)
    assert isinstance(params, pika.ConnectionParameters)
    assert params.virtual_host == vhost
    assert params.port == port
    assert (params.ssl_options is not None) is tls


def test_amqp_parameters_keep_credentials_and_options() -> None:
    params = amqp_parameters("amqp://alice:s%40cret@mq.example:5672//?heartbeat=15")
    assert params.host == "mq.example"
    assert (params.credentials.username, params.credentials.password) == ("alice", "s@cret")
    assert params.heartbeat == 15


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379", "amqp://", "amqp:///vhost", "amqp://h/?heartbeat=x"]
)
def test_amqp_parameters_reject_bad_urls(url: str) -> None:
    with pytest.raises(BrokerError):
        amqp_parameters(url)


def test_every_url_spelling_reaches_the_default_vhost() -> None:
    parts = urlsplit(rabbitmq_url())
    base = f"{parts.scheme}://{parts.netloc}"
    instance = new_instance()
    spellings = [base + "//", base + "/%2F", base, base + "/"]

    async def publish_once(url: str) -> None:
        broker = AmqpBroker(url, instance, confirm_timeout=5)
        await broker.start(["lab"])
        try:
            await broker.publish(WorkItem(url, "lab"))
        finally:
            await broker.close()

    try:
        for url in spellings:
            run(publish_once(url))
        connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                parts.hostname,
                parts.port or 5672,
                "/",
                pika.PlainCredentials(parts.username or "guest", parts.password or "guest"),
            )
        )
        try:
            channel = connection.channel()
            frame = channel.queue_declare(queue_name(instance, "lab"), passive=True)
            assert frame.method.message_count == len(spellings)
            bodies = []
            for _ in spellings:
                _method, _props, body = channel.basic_get(
                    queue_name(instance, "lab"), auto_ack=True
                )
                bodies.append(WorkItem.from_bytes(body).transaction_id)
            assert bodies == spellings
        finally:
            connection.close()
    finally:
        delete_amqp({(instance, "lab")})


def test_amqp_messages_are_persistent_json_with_message_id() -> None:
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance)

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.publish(WorkItem("tx-42", "lab", attempt=3))

    try:
        run(closing(broker, scenario))
        connection = pika.BlockingConnection(admin_parameters())
        try:
            channel = connection.channel()
            method, props, body = channel.basic_get(queue_name(instance, "lab"), auto_ack=True)
            assert method is not None
            assert props.delivery_mode == 2
            assert props.content_type == "application/json"
            assert props.message_id == "tx-42"
            assert WorkItem.from_bytes(body) == WorkItem("tx-42", "lab", attempt=3)
            # Durable topology: the exchange and queue exist after the broker is gone.
            channel.exchange_declare(exchange_name(instance), "direct", passive=True)
            declared = channel.queue_declare(queue_name(instance, "lab"), passive=True)
            assert declared.method.message_count == 0
        finally:
            connection.close()
    finally:
        delete_amqp({(instance, "lab")})


def test_amqp_publish_to_unknown_route_is_an_error() -> None:
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance, confirm_timeout=5)

    async def scenario() -> None:
        await broker.start(["lab"])
        with pytest.raises(BrokerError, match="route"):
            await broker.publish(WorkItem("tx-lost", "no-such-route"))
        await broker.publish(WorkItem("tx-ok", "lab"))  # the channel is still usable

    try:
        run(closing(broker, scenario))
    finally:
        delete_amqp({(instance, "lab")})


def test_amqp_start_fails_fast_when_unreachable() -> None:
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:1//", new_instance(), confirm_timeout=5)
    started = time.monotonic()
    with pytest.raises(BrokerError, match="cannot connect"):
        run(broker.start(["lab"]))
    assert time.monotonic() - started < 5


def test_amqp_connection_loss_fails_fast_then_recovers() -> None:
    """Close the broker's connection under it (RabbitMQ itself keeps running).

    In-flight publishes and publishes during the outage end with BrokerError or succeed, promptly;
    after the automatic reconnect, publishing works again and the consumer is back.
    """
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance, confirm_timeout=5, reconnect_delay=0.2)
    recorder = Recorder()

    async def scenario() -> tuple[list[object], list[str]]:
        await broker.start(["lab"])
        await broker.consume("lab", recorder)
        in_flight = [
            asyncio.ensure_future(broker.publish(WorkItem(f"flight-{i}", "lab"))) for i in range(50)
        ]
        await asyncio.sleep(0)  # let them hit the wire
        connection = broker._connection
        assert connection is not None
        connection.close()
        started = time.monotonic()
        outcomes: list[object] = list(await asyncio.gather(*in_flight, return_exceptions=True))
        try:
            await broker.publish(WorkItem("during-outage", "lab"))
            outcomes.append(None)
        except BrokerError as exc:
            outcomes.append(exc)
        assert time.monotonic() - started < 2, "publishes must not hang during an outage"

        deadline = time.monotonic() + 10
        while not broker.connected:
            assert time.monotonic() < deadline, "no reconnect within 10 s"
            await asyncio.sleep(0.05)
        await broker.publish(WorkItem("after-reconnect", "lab"))
        await recorder.wait_for(1)
        deadline = time.monotonic() + 10
        while "after-reconnect" not in recorder.done:
            assert time.monotonic() < deadline, "consumer not re-registered after reconnect"
            await asyncio.sleep(0.05)
        return outcomes, recorder.done

    try:
        outcomes, done = run(closing(broker, scenario))
    finally:
        delete_amqp({(instance, "lab")})
    assert all(o is None or isinstance(o, BrokerError) for o in outcomes), outcomes
    assert any(isinstance(o, BrokerError) for o in outcomes)
    assert "after-reconnect" in done
    # What was confirmed was queued: every successful publish is delivered.
    confirmed = [f"flight-{i}" for i, o in enumerate(outcomes[:50]) if o is None]
    assert set(confirmed) <= set(done)


def test_amqp_consumer_recovers_alone_when_its_queue_is_deleted() -> None:
    """RabbitMQ cancels a consumer whose queue is deleted: it comes back, publishers untouched."""
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance, confirm_timeout=5, reconnect_delay=0.1)
    recorder = Recorder()

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.consume("lab", recorder)
        publisher = broker._publisher
        await asyncio.to_thread(delete_amqp_queue, queue_name(instance, "lab"))
        deadline = time.monotonic() + 10
        while True:  # unroutable until the consumer re-declared its queue
            try:
                await broker.publish(WorkItem("after-cancel", "lab"))
                break
            except BrokerError:
                assert time.monotonic() < deadline, "queue not re-declared within 10 s"
                await asyncio.sleep(0.05)
        await recorder.wait_for(1)
        assert broker._publisher is publisher, "the publisher channel must survive"

    try:
        run(closing(broker, scenario))
    finally:
        delete_amqp({(instance, "lab")})
    assert recorder.done == ["after-cancel"]


def delete_amqp_queue(queue: str) -> None:
    connection = pika.BlockingConnection(admin_parameters())
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def test_amqp_item_held_across_reconnect_is_never_handled_twice_at_once() -> None:
    """The delivery of a handler still running when the connection drops is redelivered only
    after that handler returned: one item of a route in flight, even across reconnects."""
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance, confirm_timeout=5, reconnect_delay=0.1)
    gate = asyncio.Event()
    calls: list[str] = []
    active = 0
    max_active = 0

    async def handler(item: WorkItem) -> None:
        nonlocal active, max_active
        calls.append(item.transaction_id)
        active += 1
        max_active = max(max_active, active)
        try:
            if len(calls) == 1:
                await gate.wait()
        finally:
            active -= 1

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.publish(WorkItem("tx-held", "lab"))
        await broker.publish(WorkItem("tx-next", "lab"))
        await broker.consume("lab", handler)
        while not calls:
            await asyncio.sleep(0.01)
        connection = broker._connection
        assert connection is not None
        connection.close()
        deadline = time.monotonic() + 10
        while not broker.connected:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # a premature consumer would have redelivered by now
        assert calls == ["tx-held"]
        gate.set()
        deadline = time.monotonic() + 10
        while calls[-1:] != ["tx-next"]:
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.02)

    try:
        run(closing(broker, scenario))
    finally:
        delete_amqp({(instance, "lab")})
    assert calls == ["tx-held", "tx-held", "tx-next"]
    assert max_active == 1


class HeldPipeline:
    """A ``Pipelined`` handler that holds the first copy of its item in ``begin``, then in that
    item's status write, each until the test lets it go; later copies return at once. Records
    when each copy is begun and when the first one's status write is done."""

    window = 4

    def __init__(self) -> None:
        self.events: list[str] = []
        self.in_hand = 0  # copies of the item begun and not written yet
        self.max_in_hand = 0
        self.in_begin = asyncio.Event()
        self.begun_again = asyncio.Event()
        self.release_begin = asyncio.Event()
        self.release_write = asyncio.Event()
        self.writes: list[asyncio.Task[None]] = []

    async def __call__(self, item: WorkItem) -> None:
        raise AssertionError("a pipelined FIFO route is begun, not called")

    async def begin(self, item: WorkItem, ahead: Sequence[WorkItem]) -> Awaitable[None] | None:
        copy = sum(event.startswith("begin ") for event in self.events) + 1
        self.events.append(f"begin {copy}")
        self.in_hand += 1
        self.max_in_hand = max(self.max_in_hand, self.in_hand)
        if copy > 1:
            self.in_hand -= 1
            self.begun_again.set()
            return None  # nothing left to wait for: acknowledged at once
        self.in_begin.set()
        await self.release_begin.wait()
        write = asyncio.get_running_loop().create_task(self._status_write())
        self.writes.append(write)
        return write

    async def _status_write(self) -> None:
        await self.release_write.wait()
        self.events.append("written 1")
        self.in_hand -= 1

    async def hold_an_item(self, broker: AmqpBroker) -> None:
        """Start ``broker`` with a route "lab" of one item consumed by this pipeline, and
        return once that item is held in ``begin``."""
        await broker.start(["lab"])
        await broker.publish(WorkItem("tx-held", "lab"))
        await broker.consume("lab", self)
        assert "lab" in broker._lanes, "the route must be consumed as a pipeline"
        await asyncio.wait_for(self.in_begin.wait(), 5)


def test_amqp_pipelined_item_comes_back_only_after_its_status_write() -> None:
    """A consumer channel closed by RabbitMQ is reopened only once every task of its route is
    done, including the status write the old pipeline starts after the close: resuming after a
    snapshot of them began the redelivered item while its status write still ran."""
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance, confirm_timeout=5, reconnect_delay=0.05)
    pipeline = HeldPipeline()
    closed = asyncio.Event()
    seen: dict[str, Any] = {}

    def on_close(_channel: Channel, reason: BaseException) -> None:
        # pika calls close callbacks in the order added: the broker's have run already.
        seen["reason"] = reason
        seen["resume"] = broker._resume_tasks.get("lab")
        seen["tracked"] = set(broker._inflight.get("lab", ()))
        closed.set()

    async def scenario() -> None:
        await pipeline.hold_an_item(broker)
        channel = broker._consumer_channels["lab"]
        assert "lab" not in broker._resume_tasks
        channel.add_on_close_callback(on_close)
        channel.basic_ack(delivery_tag=99999)  # an unknown tag: RabbitMQ closes the channel
        await asyncio.wait_for(closed.wait(), 5)
        reason = seen["reason"]
        assert isinstance(reason, pika.exceptions.ChannelClosedByBroker), reason
        assert reason.reply_code == 406
        assert broker.connected, "only the consumer channel may go"
        resume = seen["resume"]
        assert isinstance(resume, asyncio.Task)
        assert not resume.done()
        # What a snapshot would hold: the old pipeline alone, still in begin.
        snapshot = seen["tracked"]
        assert len(snapshot) == 1
        await asyncio.sleep(0.05)  # the resume task now waits for the route's tasks

        pipeline.release_begin.set()
        done, _ = await asyncio.wait(snapshot, timeout=5)
        assert done == snapshot, "the old pipeline did not end with its closed channel"
        # The snapshot is over, but the wait for the status write it started is tracked now.
        settling = broker._inflight["lab"] - snapshot
        assert len(settling) == 1
        assert not any(task.done() for task in settling)
        assert not pipeline.writes[0].done()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pipeline.begun_again.wait(), 1.0)
        assert pipeline.events == ["begin 1"], (
            f"the item came back while its status write still ran: {pipeline.events}"
        )
        assert not resume.done()

        pipeline.release_write.set()
        await asyncio.wait_for(pipeline.begun_again.wait(), 5)
        await asyncio.wait_for(resume, 5)
        assert broker._consumer_channels["lab"] is not channel

    try:
        with capture_logs() as logs:
            run(closing(broker, scenario), timeout=20)
        connection = pika.BlockingConnection(admin_parameters())
        try:
            frame = connection.channel().queue_declare(queue_name(instance, "lab"), passive=True)
            assert frame.method.message_count == 0, "the copy begun again was not acknowledged"
        finally:
            connection.close()
    finally:
        delete_amqp({(instance, "lab")})
    assert pipeline.events == ["begin 1", "written 1", "begin 2"]
    assert pipeline.max_in_hand == 1
    (warning,) = [e for e in logs if e["event"] == "broker.consumer_channel_closed"]
    assert warning["route"] == "lab"
    assert "PRECONDITION_FAILED" in warning["reason"]


def test_amqp_close_waits_for_work_a_pipeline_starts_while_closing() -> None:
    """close() waits for every task of the broker, including the status write an old pipeline
    starts once close() is under way: after a snapshot of the tasks, close() returned (and shut
    the connection) while that write still ran."""
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance, confirm_timeout=5)
    pipeline = HeldPipeline()
    write_delay = 0.3  # far below confirm_timeout: the write must be waited for, not cancelled
    outcome: dict[str, Any] = {}

    async def scenario() -> None:
        await pipeline.hold_an_item(broker)
        lane = broker._lanes["lab"]
        closing_task = asyncio.create_task(broker.close())
        # close() has looked at the tasks in flight once its lanes are closed and its consumer
        # cancel is no longer awaited: from that RPC's answer to that wait it runs in one step.
        deadline = time.monotonic() + 5
        while not (lane.closed and not broker._waiters):
            assert time.monotonic() < deadline, "close() never got past cancelling its consumer"
            await asyncio.sleep(0.005)
        assert not closing_task.done()
        assert pipeline.events == ["begin 1"]

        asyncio.get_running_loop().call_later(write_delay, pipeline.release_write.set)
        pipeline.release_begin.set()
        started = time.monotonic()
        await asyncio.wait_for(closing_task, 5)
        outcome["close_took"] = time.monotonic() - started
        outcome["tracked"] = {task for tasks in broker._inflight.values() for task in tasks}

    try:
        run(scenario(), timeout=10)
        connection = pika.BlockingConnection(admin_parameters())
        try:
            frame = connection.channel().queue_declare(queue_name(instance, "lab"), passive=True)
            acked = frame.method.message_count == 0
        finally:
            connection.close()
    finally:
        delete_amqp({(instance, "lab")})
    (write,) = pipeline.writes
    assert write.done() and not write.cancelled(), (
        f"close() returned while the status write started during it still ran: {pipeline.events}"
    )
    assert pipeline.events == ["begin 1", "written 1"]
    assert not outcome["tracked"], "close() left tasks of the broker running"
    assert outcome["close_took"] >= write_delay * 0.9
    assert acked, "the item written during close() was not acknowledged"


def test_amqp_quorum_flag_declares_quorum_queues() -> None:
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance, quorum=True)

    async def scenario() -> None:
        await broker.start(["lab"])

    try:
        run(closing(broker, scenario))
        connection = pika.BlockingConnection(admin_parameters())
        try:
            channel = connection.channel()
            # Re-declaring with the other type is refused: proves the queue really is quorum.
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-queue-type"):
                channel.queue_declare(
                    queue_name(instance, "lab"),
                    durable=True,
                    arguments={"x-queue-type": "classic", "x-single-active-consumer": True},
                )
        finally:
            if connection.is_open:
                connection.close()
    finally:
        delete_amqp({(instance, "lab")})


def test_amqp_fifo_queues_have_a_single_active_consumer_and_parallel_ones_do_not() -> None:
    instance = new_instance()
    broker = AmqpBroker(rabbitmq_url(), instance)

    async def scenario() -> None:
        await broker.start(["lab", "api"], parallel=["api"])

    def redeclare(route: str, arguments: dict[str, object]) -> None:
        connection = pika.BlockingConnection(admin_parameters())
        try:
            connection.channel().queue_declare(
                queue_name(instance, route), durable=True, arguments=arguments
            )
        finally:
            if connection.is_open:
                connection.close()

    try:
        run(closing(broker, scenario))
        redeclare("lab", {"x-single-active-consumer": True})  # same arguments: accepted
        redeclare("api", {})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="single-active"):
            redeclare("lab", {})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="single-active"):
            redeclare("api", {"x-single-active-consumer": True})
    finally:
        delete_amqp({(instance, "lab"), (instance, "api")})


# --------------------------------------------------------------------------- embedded only


def test_kombu_sqlalchemy_requeue_goes_to_the_tail(tmp_path: Path) -> None:
    """Why EmbeddedBroker retries a failed item in place instead of requeueing it.

    kombu's SQLAlchemy transport re-inserts a requeued message as a new row, behind everything
    already waiting. If this test starts failing, kombu changed and the workaround may go.
    """
    broker = EmbeddedBroker(tmp_path / "q.sqlite", "probe")
    run(closing(broker, lambda: broker.start(["r"])))  # creates the file, configures kombu
    with Connection(f"sqla+sqlite:///{tmp_path / 'q.sqlite'}") as connection:
        channel = connection.channel()
        queue = Queue("probe.route.r", routing_key="probe.route.r")(channel)
        producer = Producer(channel)
        for body in (b"first", b"second"):
            producer.publish(body, exchange="", routing_key="probe.route.r")
        message = queue.get(no_ack=False)
        assert message.body == b"first"
        message.requeue()
        order = []
        while (message := queue.get(no_ack=False)) is not None:
            order.append(message.body)
            message.ack()
        channel.session.close()
    assert order == [b"second", b"first"]


def file_rows(path: Path, queue: str) -> int:
    """Rows of ``queue`` in the embedded queue file, as sqlite3 (not the broker) sees them."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute(
            "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
            " WHERE q.name = ?",
            (queue,),
        ).fetchone()
    return int(row[0])


def embedded(path: Path, instance: str) -> EmbeddedBroker:
    return EmbeddedBroker(path, instance, polling_interval=0.01, requeue_delay=0.05)


def test_embedded_deletes_the_rows_it_takes_and_keeps_the_file_in_wal(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    broker = embedded(path, "take")
    recorder = Recorder()

    async def scenario() -> None:
        await broker.start(["lab"])
        for i in range(10):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        assert file_rows(path, "take.route.lab") == 10  # nobody consumes yet: in the file
        await broker.consume("lab", recorder)
        await recorder.wait_for(10)

    run(closing(broker, scenario))
    assert recorder.done == [f"tx-{i}" for i in range(10)]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (0,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_embedded_queues_in_memory_once_this_process_consumes_the_route(tmp_path: Path) -> None:
    """A consumed route's publishes never touch the file; another route's still do."""
    path = tmp_path / "queue.sqlite"
    broker = embedded(path, "mem")
    release, handling = asyncio.Event(), asyncio.Event()

    async def held(item: WorkItem) -> None:
        handling.set()
        await release.wait()

    async def scenario() -> tuple[int, int, int]:
        await broker.start(["lab", "adt"])
        await broker.consume("lab", held)
        for i in range(5):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        await broker.publish(WorkItem("adt-0", "adt"))
        await handling.wait()
        waiting = broker.waiting("lab")  # one is being handled
        rows = file_rows(path, "mem.route.lab"), file_rows(path, "mem.route.adt")
        release.set()
        return waiting, *rows

    waiting, lab_rows, adt_rows = run(closing(broker, scenario))
    assert (waiting, lab_rows, adt_rows) == (4, 0, 1)


def test_embedded_consumer_takes_what_another_process_queues_in_order(tmp_path: Path) -> None:
    """``medcourier replay`` run beside the engine: its publishes reach the running consumer,
    after what the file held at the consumer's start and in the order they were made."""
    path = tmp_path / "queue.sqlite"
    engine, command = embedded(path, "cross"), embedded(path, "cross")
    recorder = Recorder()

    async def scenario() -> None:
        await engine.start(["lab"])
        await engine.publish(WorkItem("before-0", "lab"))  # the start-up rebuild's publishes
        await engine.consume("lab", recorder)
        await engine.publish(WorkItem("local-0", "lab"))
        await command.start(["lab"])
        try:
            for i in range(5):
                await command.publish(WorkItem(f"replay-{i}", "lab"))
        finally:
            await command.close()
        await recorder.wait_for(7)
        await recorder.settle(0.1)

    run(closing(engine, scenario))
    assert recorder.done == ["before-0", "local-0"] + [f"replay-{i}" for i in range(5)]
    assert file_rows(path, "cross.route.lab") == 0


def test_embedded_items_in_memory_at_close_are_left_to_the_store(tmp_path: Path) -> None:
    """close() drops what waits in memory (the store re-queues it at the next start) and puts
    nothing in the file, where the next start's purge would drop it anyway."""
    path = tmp_path / "queue.sqlite"
    broker = embedded(path, "left")
    recorder = Recorder(fail=lambda item, nth: True)

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.consume("lab", recorder)
        for i in range(3):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        while len(recorder.calls) < 2:
            await asyncio.sleep(0.01)

    with capture_logs() as logs:
        run(closing(broker, scenario))
    assert set(recorder.calls) == {"tx-0"}  # retried in place, the others waited
    assert recorder.done == []
    assert file_rows(path, "left.route.lab") == 0
    left = [e for e in logs if e["event"] == "broker.items_left_to_the_store"]
    assert [e["count"] for e in left] == [2]


def test_embedded_dead_letters_stay_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    broker = embedded(path, "dead")

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.consume("lab", Recorder())
        await broker.dead_letter(WorkItem("tx-gone", "lab", attempt=5), "gave up")

    run(closing(broker, scenario))
    assert file_rows(path, "dead.route.lab.dead") == 1


@pytest.mark.parametrize("prefetch", [1, 4])
def test_embedded_close_waits_for_a_running_handler(tmp_path: Path, prefetch: int) -> None:
    """A handler running when close() is called finishes (FIFO and parallel routes)."""
    broker = embedded(tmp_path / "queue.sqlite", "wait")
    started, finished = asyncio.Event(), []

    async def slow(item: WorkItem) -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(item.transaction_id)

    async def scenario() -> None:
        await broker.start(["lab"], parallel=["lab"] if prefetch > 1 else [])
        await broker.consume("lab", slow, prefetch=prefetch)
        await broker.publish(WorkItem("tx-slow", "lab"))
        await started.wait()

    run(closing(broker, scenario))
    assert finished == ["tx-slow"]


def test_embedded_parallel_route_runs_up_to_prefetch_handlers_at_once(tmp_path: Path) -> None:
    broker = embedded(tmp_path / "queue.sqlite", "par")
    running, peak, done = 0, 0, []

    async def handler(item: WorkItem) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        done.append(item.transaction_id)

    async def scenario() -> None:
        await broker.start(["lab"], parallel=["lab"])
        await broker.consume("lab", handler, prefetch=3)
        for i in range(12):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        while len(done) < 12:
            await asyncio.sleep(0.01)

    run(closing(broker, scenario))
    assert peak == 3
    assert sorted(done) == sorted(f"tx-{i}" for i in range(12))


class WindowPipeline:
    """A ``Pipelined`` handler whose status writes the test completes: records the begins, the
    most items begun and not yet written, and fails the begin of chosen items once."""

    def __init__(
        self,
        window: int,
        fail_once: set[str] = frozenset(),  # type: ignore[assignment]
        cancel_once: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.window = window
        self._cancel_once = set(cancel_once)
        self.begun: list[str] = []
        self.ahead_seen: list[list[str]] = []
        self.writes: list[asyncio.Future[None]] = []
        self.in_hand = self.max_in_hand = 0
        self._fail_once = set(fail_once)

    async def __call__(self, item: WorkItem) -> None:
        done = await self.begin(item, [])
        if done is not None:
            await done

    async def begin(self, item: WorkItem, ahead: Sequence[WorkItem]) -> Awaitable[None] | None:
        if item.transaction_id in self._fail_once:
            self._fail_once.discard(item.transaction_id)
            raise RuntimeError("begin failure requested by the test")
        if item.transaction_id in self._cancel_once:
            self._cancel_once.discard(item.transaction_id)
            raise asyncio.CancelledError  # a connector's own cancellation leaking out
        self.begun.append(item.transaction_id)
        self.ahead_seen.append([a.transaction_id for a in ahead])
        self.in_hand += 1
        self.max_in_hand = max(self.max_in_hand, self.in_hand)
        write: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writes.append(write)

        async def written() -> None:
            await write
            self.in_hand -= 1

        return written()

    def finish_writes(self) -> None:
        for write in self.writes:
            if not write.done():
                write.set_result(None)

    async def drive(self, count: int) -> None:
        """Complete status writes as they come until ``count`` items are begun, then the last."""
        while len(self.begun) < count:
            self.finish_writes()
            await asyncio.sleep(0.01)
        self.finish_writes()
        await asyncio.sleep(0.05)


def test_embedded_pipelined_route_keeps_order_window_and_retries_in_place(tmp_path: Path) -> None:
    broker = embedded(tmp_path / "queue.sqlite", "pipe")
    pipeline = WindowPipeline(window=3, fail_once={"tx-2"})

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.consume("lab", pipeline)
        for i in range(8):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        # No status write is done yet: the window holds three items taken, no more.
        while len(pipeline.begun) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert pipeline.begun == ["tx-0", "tx-1", "tx-2"]  # tx-2 on its second try
        assert broker.waiting("lab") == 8 - 3
        await pipeline.drive(8)

    run(closing(broker, scenario))
    assert pipeline.begun == [f"tx-{i}" for i in range(8)]  # tx-2 failed once, kept its place
    assert pipeline.max_in_hand <= 3
    assert pipeline.ahead_seen[0] == ["tx-1", "tx-2"]


def test_embedded_pipelined_route_restarts_with_the_item_it_was_on_first(tmp_path: Path) -> None:
    """A begin ended by CancelledError ends the pipeline; the restarted one begins that item
    before the ones behind it."""
    broker = embedded(tmp_path / "queue.sqlite", "piperestart")
    pipeline = WindowPipeline(window=4, cancel_once={"tx-1"})

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.consume("lab", pipeline)
        for i in range(5):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        await pipeline.drive(5)

    with capture_logs() as logs:
        run(closing(broker, scenario), timeout=10)
    assert pipeline.begun == [f"tx-{i}" for i in range(5)]
    assert [e["route"] for e in logs if e["event"] == "broker.consumer_restarted"] == ["lab"]


def test_embedded_close_waits_for_a_status_write_begun_while_closing(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "queue.sqlite", "close", requeue_delay=0.05)
    pipeline = WindowPipeline(window=2)
    finished: list[str] = []

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.consume("lab", pipeline)
        await broker.publish(WorkItem("tx-0", "lab"))
        while not pipeline.writes:
            await asyncio.sleep(0.01)

        async def later() -> None:
            await asyncio.sleep(0.2)
            finished.append("write")
            pipeline.finish_writes()

        writer = asyncio.get_running_loop().create_task(later())
        await broker.close()
        finished.append("closed")
        await writer

    run(scenario())
    assert finished == ["write", "closed"]


def test_embedded_publishes_made_before_consume_come_first(tmp_path: Path) -> None:
    """A publish still being written to the file when consume() starts is taken before the
    publishes made after it (which go to memory)."""
    broker = embedded(tmp_path / "queue.sqlite", "first")
    recorder = Recorder()

    async def scenario() -> None:
        await broker.start(["lab"])
        await asyncio.gather(
            broker.publish(WorkItem("tx-a", "lab")),
            broker.consume("lab", recorder),
            broker.publish(WorkItem("tx-b", "lab")),
        )
        await recorder.wait_for(2)

    run(closing(broker, scenario))
    assert recorder.done == ["tx-a", "tx-b"]


def test_embedded_publish_later_waits_and_is_dropped_while_closing(tmp_path: Path) -> None:
    broker = embedded(tmp_path / "queue.sqlite", "later")
    recorder = Recorder()

    async def scenario() -> float:
        await broker.start(["lab"], parallel=["lab"])
        await broker.consume("lab", recorder, prefetch=2)
        started = time.monotonic()
        await broker.publish_later(WorkItem("tx-late", "lab", attempt=2), 0.3)
        await recorder.wait_for(1)
        return time.monotonic() - started

    waited = run(closing(broker, scenario))
    assert waited >= 0.3
    assert recorder.done == ["tx-late"]

    closing_broker = embedded(tmp_path / "queue.sqlite", "later2")
    seen: list[str] = []

    async def handler(item: WorkItem) -> None:
        # a retry asked for while the broker closes: no error, nothing scheduled
        await asyncio.sleep(0.1)
        await closing_broker.publish_later(WorkItem(item.transaction_id, "lab", 2), 0.01)
        seen.append(item.transaction_id)

    async def close_during_handler() -> None:
        await closing_broker.start(["lab"], parallel=["lab"])
        await closing_broker.consume("lab", handler, prefetch=2)
        await closing_broker.publish(WorkItem("tx-x", "lab"))
        await asyncio.sleep(0.02)
        await closing_broker.close()

    run(close_during_handler())
    assert seen == ["tx-x"]


def test_embedded_purge_counts_what_waits_in_memory(tmp_path: Path) -> None:
    broker = embedded(tmp_path / "queue.sqlite", "purge")
    release, handling = asyncio.Event(), asyncio.Event()

    async def held(item: WorkItem) -> None:
        handling.set()
        await release.wait()

    async def scenario() -> tuple[int, int]:
        await broker.start(["lab"])
        await broker.consume("lab", held)
        for i in range(4):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        await handling.wait()
        purged = await broker.purge("lab")  # tx-0 is being handled; three wait
        release.set()
        return purged, broker.waiting("lab")

    assert run(closing(broker, scenario)) == (3, 0)


def test_embedded_poller_outlives_a_foreign_row(tmp_path: Path) -> None:
    """A row the engine cannot read, put in the file by another writer, is dropped with a log
    line; what is queued after it still reaches the running consumer."""
    path = tmp_path / "queue.sqlite"
    engine, command = embedded(path, "foreign"), embedded(path, "foreign")
    recorder = Recorder()

    async def scenario() -> None:
        await engine.start(["lab"])
        await engine.consume("lab", recorder)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            (queue_id,) = db.execute(
                "SELECT id FROM kombu_queue WHERE name = 'foreign.route.lab'"
            ).fetchone()
            for payload in ('{"properties": "x", "body": "e30="}', "not json", "[]"):
                db.execute(
                    "INSERT INTO kombu_message (visible, payload, version, queue_id)"
                    " VALUES (1, ?, 1, ?)",
                    (payload, queue_id),
                )
        await asyncio.sleep(0.1)
        await command.start(["lab"])
        try:
            await command.publish(WorkItem("tx-after", "lab"))
        finally:
            await command.close()
        await recorder.wait_for(1)

    with capture_logs() as logs:
        run(closing(engine, scenario))
    assert recorder.done == ["tx-after"]
    assert len([e for e in logs if e["event"] == "broker.malformed_item_dropped"]) == 3
    assert not [e for e in logs if e["event"] == "broker.poller_stopped"]


@pytest.mark.parametrize("prefetch", [1, 3])
def test_embedded_consumer_restarts_when_a_handler_ends_it(tmp_path: Path, prefetch: int) -> None:
    """A handler raising CancelledError (not a failure the contract knows) ends the consumer
    task: its item goes back to the head of the queue and the consumer starts again."""
    broker = embedded(tmp_path / "queue.sqlite", "restart")
    calls: list[str] = []
    done: list[str] = []
    times: list[float] = []

    async def handler(item: WorkItem) -> None:
        calls.append(item.transaction_id)
        if item.transaction_id == "tx-0":
            times.append(time.monotonic())
        if calls.count(item.transaction_id) == 1 and item.transaction_id == "tx-0":
            raise asyncio.CancelledError  # a connector's own cancellation leaking out
        done.append(item.transaction_id)

    async def scenario() -> None:
        await broker.start(["lab"], parallel=["lab"] if prefetch > 1 else [])
        await broker.consume("lab", handler, prefetch=prefetch)
        for i in range(3):
            await broker.publish(WorkItem(f"tx-{i}", "lab"))
        while len(done) < 3:
            await asyncio.sleep(0.01)

    with capture_logs() as logs:
        run(closing(broker, scenario), timeout=10)
    assert sorted(done) == ["tx-0", "tx-1", "tx-2"]
    assert calls.count("tx-0") == 2
    assert times[1] - times[0] >= 0.04  # waited as a failed attempt does (requeue_delay 0.05)
    if prefetch == 1:
        assert done == ["tx-0", "tx-1", "tx-2"]  # FIFO: it kept its place
        assert [e["route"] for e in logs if e["event"] == "broker.consumer_restarted"] == ["lab"]


# --------------------------------------------------------------------------- open_broker


def test_open_broker_chooses_by_scheme(tmp_path: Path) -> None:
    for url in ("", "embedded:", "  "):
        broker = open_broker(url, "i", tmp_path)
        assert isinstance(broker, EmbeddedBroker)
        assert broker.path == tmp_path / "queue.sqlite"
    relative = open_broker("sqlite:///queues/q.sqlite", "i", tmp_path)
    assert isinstance(relative, EmbeddedBroker)
    assert relative.path == tmp_path / "queues" / "q.sqlite"
    absolute = open_broker(f"sqlite:///{tmp_path}/abs.sqlite", "i", tmp_path / "elsewhere")
    assert isinstance(absolute, EmbeddedBroker)
    assert absolute.path == tmp_path / "abs.sqlite"
    assert isinstance(open_broker("amqp://guest:guest@127.0.0.1:5672//", "i", tmp_path), AmqpBroker)
    assert isinstance(open_broker("amqps://u:p@mq.example//", "i", tmp_path), AmqpBroker)


def test_the_engine_and_open_broker_agree_on_what_is_rabbitmq(tmp_path: Path) -> None:
    """An engine that took RabbitMQ for its embedded queue would purge the shared queues at
    start-up (its rebuild from the store)."""
    for url in ("AMQP://guest:guest@127.0.0.1:5672//", " amqps://u:p@mq.example// "):
        assert is_amqp_url(url)
        assert isinstance(open_broker(url, "i", tmp_path), AmqpBroker)
        config = parse_config(
            yaml.safe_dump({"broker": url, "data_dir": str(tmp_path), "routes": []}),
            load_plugins(),
            "t.yaml",
        )
        assert Engine(config, load_plugins()).embedded is False
    for url in ("", "embedded:", "sqlite:///q.sqlite"):
        assert not is_amqp_url(url)
        assert isinstance(open_broker(url, "i", tmp_path), EmbeddedBroker)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "sqlite:/relative", "embedded:/x"])
def test_open_broker_rejects_unknown_urls(url: str, tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="queue URL"):
        open_broker(url, "i", tmp_path)


def test_open_broker_embedded_default_works_end_to_end(tmp_path: Path) -> None:
    broker = open_broker("", "e2e", tmp_path)
    recorder = Recorder()

    async def scenario() -> None:
        await broker.start(["lab"])
        await broker.publish(WorkItem("tx-1", "lab"))
        await broker.consume("lab", recorder)
        await recorder.wait_for(1)

    run(closing(broker, scenario))
    assert recorder.done == ["tx-1"]
    assert (tmp_path / "queue.sqlite").exists()
