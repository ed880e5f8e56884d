"""RabbitMQ broker on pika's asyncio connection, with pipelined publisher confirms.

Why pika's asynchronous adapter rather than kombu here: waiting for one confirm per message costs
a network round trip each and caps a serial publisher around 890 messages/s (ARCHITECTURE.md).
This module keeps many publishes in flight on one channel instead: each publish gets the next
delivery tag and an ``asyncio.Future``; RabbitMQ's ``Basic.Ack``/``Basic.Nack`` (often
``multiple=True``, covering every tag up to the one named) settle those futures, so a hundred
concurrent senders share a handful of round trips. Everything runs on the engine's event loop:
no threads, no locks.

Failure model, in short:

- every wait (connect, channel RPC, confirm) is bounded by ``confirm_timeout``;
- while the connection is down, ``publish`` raises ``BrokerError`` at once (the HTTP layer answers
  503) instead of queueing in memory where a crash would lose the work;
- a lost connection fails every unconfirmed publish, then reconnects with backoff (0.5 s doubling to
  5 s), re-declares the topology and re-registers the consumers; unacknowledged deliveries are
  requeued by RabbitMQ itself, so a handler may see an item twice (at-least-once);
- a failed handler is retried in place (same delivery, after ``requeue_delay``) rather than
  nacked: on quorum queues (RabbitMQ 3.10 here) a nack-requeued message came back *behind* the
  items queued after it, breaking per-route FIFO, and recent RabbitMQ versions also cap quorum
  redeliveries (``delivery-limit``), after which the item would be dropped;
- a consumer channel closed by RabbitMQ (e.g. ``consumer_timeout`` on a delivery held too long) is
  reopened on the same connection once that route's running handler has finished, so publishers
  are not disturbed and the redelivered item is never handled twice at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Collection
from functools import partial
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions
import structlog
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from medcourier.engine.broker import (
    Handler,
    Lane,
    WorkItem,
    dead_letter_queue_name,
    delay_bucket_ms,
    exchange_name,
    pipeline_of,
    queue_name,
    run_pipeline,
)
from medcourier.engine.errors import BrokerError

log = structlog.get_logger(__name__)

#: Header carrying our publish sequence number, so a ``Basic.Return`` (unroutable message) can be
#: matched to the publish it belongs to.
_SEQ_HEADER = "x-medcourier-seq"

#: pika ``Parameters`` attributes copied from the parsed URL into the returned
#: ``ConnectionParameters`` (host, credentials, TLS and every tunable the URL query string can set).
_PARAMETER_FIELDS = (
    "host",
    "port",
    "virtual_host",
    "credentials",
    "ssl_options",
    "channel_max",
    "frame_max",
    "heartbeat",
    "connection_attempts",
    "retry_delay",
    "socket_timeout",
    "stack_timeout",
    "locale",
    "blocked_connection_timeout",
    "client_properties",
    "tcp_options",
)


def amqp_parameters(url: str) -> pika.ConnectionParameters:
    """Turn an ``amqp://`` / ``amqps://`` URL into pika connection parameters.

    The virtual host is normalised the way kombu (and the AMQP URI spec) read it, because the same
    URL is written in config files by people used to either: ``amqp://h:5672//`` means vhost ``/``
    (pika alone would read an empty vhost name there and the connection would be refused),
    ``/%2F`` is ``/`` too, and no path or a bare ``/`` selects the default vhost ``/``. Query-string
    options (``heartbeat``, ``ssl_options``, ...) keep pika's meaning.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps"):
        raise BrokerError(f"not an AMQP URL (expected amqp:// or amqps://): scheme {scheme!r}")
    if not parts.hostname:
        raise BrokerError("AMQP URL has no host name")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) or "/"
    normalised = urlunsplit((scheme, parts.netloc, "/" + quote(vhost, safe=""), parts.query, ""))
    try:
        parsed = pika.URLParameters(normalised)
    except (ValueError, TypeError) as exc:
        raise BrokerError(f"invalid AMQP URL options: {exc}") from exc
    return pika.ConnectionParameters(**{name: getattr(parsed, name) for name in _PARAMETER_FIELDS})


class AmqpBroker:
    """The ``Broker`` protocol on RabbitMQ.

    Topology: one durable direct exchange ``<instance>.routes``; per route one durable queue
    ``<instance>.route.<route>`` bound with the route name as routing key (classic by default,
    ``quorum=True`` for replicated quorum queues). Messages are persistent JSON claim checks whose
    ``message_id`` is the transaction id, published ``mandatory`` so that a route without a queue is
    an error rather than a silently dropped item.
    """

    def __init__(
        self,
        url: str,
        instance: str,
        *,
        quorum: bool = False,
        confirm_timeout: float = 10.0,
        requeue_delay: float = 0.5,
        reconnect_delay: float = 0.5,
        reconnect_max_delay: float = 5.0,
    ) -> None:
        self._params = amqp_parameters(url)
        self._instance = instance
        self._exchange = exchange_name(instance)
        self._queue_arguments: dict[str, Any] = {"x-queue-type": "quorum"} if quorum else {}
        self._confirm_timeout = confirm_timeout
        self._requeue_delay = requeue_delay
        self._reconnect_delay = reconnect_delay
        self._reconnect_max_delay = reconnect_max_delay

        self._routes: list[str] = []
        self._parallel: set[str] = set()
        self._prefetch: dict[str, int] = {}
        self._delay_queues: set[str] = set()
        self._handlers: dict[str, Handler] = {}
        self._started = False
        self._closing = False

        self._connection: AsyncioConnection | None = None
        self._publisher: Channel | None = None
        self._consumer_channels: dict[str, Channel] = {}
        self._reconnect_task: asyncio.Task[None] | None = None
        self._connection_closed: asyncio.Future[None] | None = None

        # Publisher confirms: delivery tag -> future of the publish awaiting it. ``_order`` keeps
        # (tag, deadline) in publish order, so a ``multiple`` ack settles a prefix in
        # O(settled) and, the timeout being constant, deadlines are sorted too: one timer at the
        # front deadline bounds every publish (a timer per publish cost a third of the rate).
        self._next_tag = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._order: deque[tuple[int, float]] = deque()
        self._returned: set[int] = set()
        self._expiry: asyncio.TimerHandle | None = None

        # RPC replies being awaited (channel open, declare, ...), each with the channel it was
        # sent on (None: connection level): failed at once when that channel or the connection
        # closes, instead of waiting for their timeout.
        self._waiters: dict[asyncio.Future[Any], Channel | None] = {}
        # Handler invocations in flight (per route), so close() can let them finish and a
        # consumer is only re-registered once its route's previous delivery is done.
        self._inflight: dict[str, set[asyncio.Task[None]]] = {}
        # Background re-registrations of consumers after a reconnect or a lost consumer channel.
        self._resume_tasks: dict[str, asyncio.Task[None]] = {}
        # The lane of each pipelined FIFO route's consumer channel (broker/__init__.py).
        self._lanes: dict[str, Lane] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        """True while a publish can be attempted (connection and publisher channel open)."""
        return self._publisher is not None and self._publisher.is_open and not self._closing

    async def start(self, routes: list[str], parallel: Collection[str] = ()) -> None:
        """Connect, declare the exchange and the routes' queues, open the confirm channel.

        Raises ``BrokerError`` if RabbitMQ cannot be reached or refuses the topology (for instance a
        queue that already exists with another type): start-up should fail loudly, not retry
        forever in the background.
        """
        if self._started or self._closing:
            raise BrokerError("AmqpBroker.start() called twice or after close()")
        self._routes = list(dict.fromkeys(routes))
        self._parallel = set(parallel)
        try:
            await self._connect()
        except BaseException:
            self._abort_connection()
            raise
        self._started = True
        log.info(
            "broker.connected",
            host=self._params.host,
            vhost=self._params.virtual_host,
            instance=self._instance,
            routes=len(self._routes),
        )

    async def close(self) -> None:
        """Stop consumers, let in-flight handlers and confirms finish (bounded), disconnect.

        Handlers still running after ``confirm_timeout`` are cancelled; their items were never
        acknowledged, so RabbitMQ requeues them when the channel closes.
        """
        if self._closing:
            return
        self._closing = True
        background = [t for t in (self._reconnect_task, *self._resume_tasks.values()) if t]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for lane in self._lanes.values():
            lane.close()  # nothing more is begun; the deliveries begun are waited for below
        for channel in list(self._consumer_channels.values()):
            for tag in list(channel.consumer_tags):
                with contextlib.suppress(BrokerError):
                    await self._rpc(
                        partial(self._basic_cancel, channel, tag), "cancel consumer", channel
                    )
        # Until none is left, not a snapshot (as in _resume_consumer): an old pipeline finishing
        # its item starts the wait for that item's status write. One deadline for all rounds;
        # past it, what is still running (or started while cancelling) is cancelled.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._confirm_timeout
        while handlers := {task for tasks in self._inflight.values() for task in tasks}:
            remaining = max(0.0, deadline - loop.time())
            _done, running = await asyncio.wait(handlers, timeout=remaining)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        if self._pending:
            await asyncio.wait(set(self._pending.values()), timeout=self._confirm_timeout)
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            closed = self._connection_closed
            connection.close()
            if closed is not None:
                with contextlib.suppress(asyncio.TimeoutError, BrokerError):
                    await asyncio.wait_for(asyncio.shield(closed), self._confirm_timeout)
        self._connection = None
        self._publisher = None
        self._consumer_channels.clear()
        self._fail_all(BrokerError("broker closed"))
        log.info("broker.closed", instance=self._instance)

    # ------------------------------------------------------------------ publishing

    async def publish(self, item: WorkItem) -> None:
        """Queue ``item`` and return once RabbitMQ confirmed it (persisted, routed to its queue).

        Raises ``BrokerError`` when disconnected (immediately), when RabbitMQ nacks or cannot route
        the message, when the connection drops before the confirm, or after ``confirm_timeout``.
        """
        await self._publish(self._exchange, item.route, item)

    async def publish_later(self, item: WorkItem, delay: float) -> None:
        """Park ``item`` in a delay queue; RabbitMQ dead-letters it back to its route when its
        per-message TTL expires, so the wait survives an engine restart."""
        queue = f"{queue_name(self._instance, item.route)}.delay.{delay_bucket_ms(delay)}"
        if queue not in self._delay_queues:
            await self._declare_delay_queue(queue, item.route)
            self._delay_queues.add(queue)
        await self._publish("", queue, item, expiration=str(max(1, int(delay * 1000))))

    async def _declare_delay_queue(self, queue: str, route: str) -> None:
        """Declare a delay queue on a short-lived channel of its own.

        A queue left with other arguments (say, before ``quorum_queues`` was switched on) makes
        RabbitMQ close the channel that declared it: on the publisher channel that would fail
        every publish in flight. Here only this call fails, and the worker waits in place.
        """
        connection = self._connection
        if connection is None or not self.connected:
            raise BrokerError("RabbitMQ is not connected: the item was not queued")
        arguments: dict[str, Any] = {
            **self._queue_arguments,
            "x-dead-letter-exchange": self._exchange,
            "x-dead-letter-routing-key": route,
        }
        if self._queue_arguments.get("x-queue-type") == "quorum":
            # Quorum queues dead-letter at most once unless told otherwise: an expired retry
            # could be dropped on its way back to the route.
            arguments["x-dead-letter-strategy"] = "at-least-once"
            arguments["x-overflow"] = "reject-publish"
        channel: Channel = await self._rpc(
            lambda done: connection.channel(on_open_callback=done), "open admin channel"
        )
        channel.add_on_close_callback(self._fail_waiters)
        try:
            await self._rpc(
                lambda done: channel.queue_declare(
                    queue, durable=True, arguments=arguments, callback=done
                ),
                f"declare queue {queue} (a delay queue left with other arguments must be "
                "deleted once empty)",
                channel,
            )
        finally:
            if channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.close()

    async def dead_letter(self, item: WorkItem, reason: str) -> None:
        await self._publish(
            "", dead_letter_queue_name(self._instance, item.route), item, reason=reason[:1000]
        )

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        item: WorkItem,
        *,
        expiration: str | None = None,
        reason: str | None = None,
    ) -> None:
        channel = self._publisher
        if channel is None or not channel.is_open or self._closing:
            raise BrokerError("RabbitMQ is not connected: the item was not queued")
        tag = self._next_tag + 1
        headers: dict[str, Any] = {_SEQ_HEADER: tag}
        if reason is not None:
            headers["x-medcourier-reason"] = reason
        properties = BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=item.transaction_id,
            headers=headers,
            expiration=expiration,
        )
        try:
            channel.basic_publish(
                exchange, routing_key, item.to_bytes(), properties, mandatory=True
            )
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"publish failed: {exc!r}") from exc
        self._next_tag = tag
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending[tag] = future
        deadline = loop.time() + self._confirm_timeout
        self._order.append((tag, deadline))
        if self._expiry is None:
            self._expiry = loop.call_at(deadline, self._expire)
        try:
            await future
        finally:
            self._pending.pop(tag, None)

    def _expire(self) -> None:
        """Fail the publishes whose confirm is overdue, then re-arm for the next deadline."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        order, pending = self._order, self._pending
        while order and (order[0][0] not in pending or order[0][1] <= now):
            tag, _deadline = order.popleft()
            future = pending.pop(tag, None)
            if future is not None and not future.done():
                future.set_exception(
                    BrokerError(
                        f"RabbitMQ did not confirm the item within {self._confirm_timeout:g} s"
                    )
                )
        if order:
            self._expiry = loop.call_at(order[0][1], self._expire)

    def _on_confirm(self, channel: Channel, frame: Any) -> None:
        """Settle the futures of the publishes a ``Basic.Ack``/``Basic.Nack`` covers."""
        if channel is not self._publisher:
            return
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        tag: int = method.delivery_tag
        if method.multiple:
            order = self._order
            while order and (tag == 0 or order[0][0] <= tag):
                self._settle(order.popleft()[0], acked)
        else:
            self._settle(tag, acked)
            # Drop settled tags from the front so ``_order`` cannot grow under single acks.
            while self._order and self._order[0][0] not in self._pending:
                self._order.popleft()

    def _settle(self, tag: int, acked: bool) -> None:
        future = self._pending.pop(tag, None)
        returned = tag in self._returned
        if returned:
            self._returned.discard(tag)
        if future is None or future.done():
            return
        if not acked:
            future.set_exception(BrokerError("RabbitMQ refused the item (Basic.Nack)"))
        elif returned:
            future.set_exception(
                BrokerError("RabbitMQ could not route the item: no queue is bound for its route")
            )
        else:
            future.set_result(None)

    def _on_return(
        self, channel: Channel, method: Any, properties: BasicProperties, body: bytes
    ) -> None:
        """Remember an unroutable publish; its (following) ack then fails the publish."""
        if channel is not self._publisher:
            return
        tag = (properties.headers or {}).get(_SEQ_HEADER)
        if isinstance(tag, int):
            self._returned.add(tag)
        log.error("broker.unroutable", routing_key=method.routing_key, exchange=method.exchange)

    # ------------------------------------------------------------------ consuming

    async def consume(self, route: str, handler: Handler, prefetch: int = 1) -> None:
        """Deliver the route's items to ``handler``: one at a time (prefetch 1, FIFO), or up to
        ``prefetch`` at once on a parallel route.

        The consumer is re-registered after every reconnect. Raises ``BrokerError`` if the broker
        is not connected right now.
        """
        if not self._started or self._closing:
            raise BrokerError("AmqpBroker.consume() needs a started, open broker")
        if route in self._handlers:
            raise BrokerError(f"route {route!r} already has a consumer")
        connection = self._connection
        if connection is None or not self.connected:
            raise BrokerError("RabbitMQ is not connected: cannot start the consumer")
        self._handlers[route] = handler
        self._prefetch[route] = prefetch
        try:
            await self._start_consumer(connection, route, handler)
        except BaseException:
            self._handlers.pop(route, None)
            raise

    async def _start_consumer(
        self, connection: AsyncioConnection, route: str, handler: Handler
    ) -> None:
        channel: Channel = await self._rpc(
            lambda done: connection.channel(on_open_callback=done), "open consumer channel"
        )
        self._consumer_channels[route] = channel
        channel.add_on_close_callback(partial(self._on_consumer_channel_closed, route))
        channel.add_on_cancel_callback(partial(self._on_consumer_cancelled, route, channel))
        prefetch = self._prefetch.get(route, 1)
        pipeline = pipeline_of(handler, prefetch) if route not in self._parallel else None
        lane = Lane()
        if pipeline is not None:
            # A pipelined FIFO route: RabbitMQ hands over up to the window, in order; the lane
            # keeps them until they are begun, one at a time.
            prefetch = pipeline.window
            on_message = partial(self._on_lane_message, route, lane)
            channel.add_on_close_callback(lambda _channel, _reason: lane.close())
        else:
            on_message = partial(self._on_message, route, handler)
        try:
            await self._rpc(
                lambda done: channel.basic_qos(prefetch_count=prefetch, callback=done),
                "qos",
                channel,
            )
            await self._declare_queue(channel, route)
            await self._rpc(
                lambda done: channel.basic_consume(
                    queue_name(self._instance, route),
                    on_message_callback=on_message,
                    callback=done,
                ),
                "consume",
                channel,
            )
        except BaseException:
            lane.close()
            if self._consumer_channels.get(route) is channel:
                del self._consumer_channels[route]
            if channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.close()
            raise
        if pipeline is not None:
            self._lanes[route] = lane
            if self._closing:
                lane.close()

            def settle(tag: int, ok: bool) -> None:
                if ok:
                    self._ack(channel, tag, route)
                # else: left unacknowledged, given back when the channel closes

            self._track(
                route,
                asyncio.get_running_loop().create_task(
                    run_pipeline(
                        route,
                        pipeline,
                        lane,
                        settle,
                        partial(self._track, route),
                        self._requeue_delay,
                    )
                ),
            )

    def _track(self, route: str, task: asyncio.Task[None]) -> None:
        """Count ``task`` among the route's deliveries in flight (close and resume wait)."""
        inflight = self._inflight.setdefault(route, set())
        inflight.add(task)
        task.add_done_callback(inflight.discard)

    def _on_lane_message(
        self,
        route: str,
        lane: Lane,
        channel: Channel,
        method: Any,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        item = self._decode(route, channel, method.delivery_tag, body)
        if item is not None:
            lane.put(method.delivery_tag, item)

    def _decode(self, route: str, channel: Channel, tag: int, body: bytes) -> WorkItem | None:
        """The delivery's item; None for a malformed one, acked and dropped: it can never
        succeed, and retrying it would block the route forever."""
        try:
            return WorkItem.from_bytes(body)
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "broker.malformed_item_dropped",
                route=route,
                size=len(body),
                error=type(exc).__name__,
            )
            self._ack(channel, tag, route)
            return None

    def _schedule_consumer(self, route: str) -> None:
        """Re-register the route's consumer in the background (idempotent)."""
        task = self._resume_tasks.get(route)
        if self._closing or (task is not None and not task.done()):
            return
        self._resume_tasks[route] = asyncio.get_running_loop().create_task(
            self._resume_consumer(route)
        )

    async def _resume_consumer(self, route: str) -> None:
        """Wait for the route's running handler, then consume again, retrying with backoff.

        The delivery that handler holds died with its channel and will be redelivered to the new
        consumer: starting it earlier would run the same item twice concurrently.
        """
        # Until none is left, not a snapshot: the old pipeline, finishing its item, starts the
        # wait for that item's status write, which must end before the item comes back.
        while busy := self._inflight.get(route):
            await asyncio.wait(set(busy))
        delay = self._reconnect_delay
        while not self._closing:
            connection = self._connection
            handler = self._handlers.get(route)
            if connection is None or handler is None or not self.connected:
                return  # the reconnect in progress schedules this again once it is done
            try:
                await self._start_consumer(connection, route, handler)
            except BrokerError as exc:
                log.warning("broker.consumer_resume_failed", route=route, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max_delay)
            else:
                log.info("broker.consumer_resumed", route=route)
                return

    def _on_message(
        self,
        route: str,
        handler: Handler,
        channel: Channel,
        method: Any,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        self._track(
            route,
            asyncio.get_running_loop().create_task(
                self._handle(route, handler, channel, method.delivery_tag, body)
            ),
        )

    async def _handle(
        self, route: str, handler: Handler, channel: Channel, tag: int, body: bytes
    ) -> None:
        """Run the handler for one delivery until it succeeds, then ack.

        A failure is retried in place after ``requeue_delay`` (see the module docstring for why
        not nack): the item keeps its place at the head of the route. The loop ends without an
        ack when the broker closes or the channel is gone; RabbitMQ then requeues the item.
        Only exception type names are logged: messages of arbitrary exceptions may quote payloads.
        """
        item = self._decode(route, channel, tag, body)
        if item is None:
            return
        while True:
            try:
                await handler(item)
            except Exception as exc:
                log.warning(
                    "broker.handler_failed",
                    route=route,
                    transaction_id=item.transaction_id,
                    error=type(exc).__name__,
                )
                # A pause so a persistently failing item does not spin the CPU and the log.
                await asyncio.sleep(self._requeue_delay)
                if self._closing or not channel.is_open:
                    return
            else:
                self._ack(channel, tag, route)
                return

    def _ack(self, channel: Channel, tag: int, route: str) -> None:
        if not channel.is_open:
            # The delivery died with its channel; RabbitMQ requeues it for the next consumer.
            log.info("broker.ack_lost", route=route)
            return
        try:
            channel.basic_ack(tag)
        except pika.exceptions.AMQPError as exc:
            log.info("broker.ack_lost", route=route, error=type(exc).__name__)

    def _on_consumer_channel_closed(
        self, route: str, channel: Channel, reason: BaseException
    ) -> None:
        self._fail_waiters(channel, reason)
        if self._consumer_channels.get(route) is channel:
            del self._consumer_channels[route]
        if self._closing or isinstance(reason, pika.exceptions.ChannelClosedByClient):
            return
        if self._connection is None or not self._connection.is_open:
            return  # the whole connection is going: _on_connection_closed handles it
        log.warning("broker.consumer_channel_closed", route=route, reason=str(reason))
        self._schedule_consumer(route)

    def _on_consumer_cancelled(self, route: str, channel: Channel, frame: Any) -> None:
        """RabbitMQ cancelled our consumer (queue deleted...): reopen it, re-declaring the queue."""
        if self._closing:
            return
        log.warning("broker.consumer_cancelled_by_server", route=route)
        if self._consumer_channels.get(route) is channel:
            del self._consumer_channels[route]
        if channel.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                channel.close()
        self._schedule_consumer(route)

    # ------------------------------------------------------------------ admin

    async def purge(self, route: str) -> int:
        """Drop the route's ready items; returns how many there were.

        Runs on a short-lived channel of its own: RabbitMQ answers an unknown queue by closing
        the channel, which must not take the publisher channel (and its confirms) with it.
        """
        connection = self._connection
        if connection is None or not self.connected:
            raise BrokerError("RabbitMQ is not connected: cannot purge")
        channel: Channel = await self._rpc(
            lambda done: connection.channel(on_open_callback=done), "open admin channel"
        )
        channel.add_on_close_callback(self._fail_waiters)
        try:
            frame = await self._rpc(
                lambda done: channel.queue_purge(queue_name(self._instance, route), callback=done),
                f"purge route {route!r}",
                channel,
            )
        finally:
            if channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    channel.close()
        return int(frame.method.message_count)

    # ------------------------------------------------------------------ connection management

    async def _connect(self) -> None:
        """One connection attempt: open, set up the publisher, topology and consumers."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        closed: asyncio.Future[None] = loop.create_future()

        def on_open(_connection: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_connection: Any, error: BaseException) -> None:
            if not opened.done():
                opened.set_exception(
                    BrokerError(
                        f"cannot connect to RabbitMQ at {self._params.host}:{self._params.port}"
                        f" vhost {self._params.virtual_host!r}: {error!r}"
                    )
                )

        def on_close(connection: Any, reason: BaseException) -> None:
            if not closed.done():
                closed.set_result(None)
            if not opened.done():
                on_open_error(connection, reason)
                return
            self._on_connection_closed(connection, reason)

        try:
            connection = AsyncioConnection(
                self._params,
                on_open_callback=on_open,
                on_open_error_callback=on_open_error,
                on_close_callback=on_close,
                custom_ioloop=loop,
            )
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot connect to RabbitMQ: {exc!r}") from exc
        self._connection = connection
        self._connection_closed = closed
        await self._bounded(opened, "connect")
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)

        channel: Channel = await self._rpc(
            lambda done: connection.channel(on_open_callback=done), "open publisher channel"
        )
        channel.add_on_close_callback(self._on_publisher_closed)
        channel.add_on_return_callback(self._on_return)
        await self._rpc(
            lambda done: channel.confirm_delivery(partial(self._on_confirm, channel), done),
            "confirm.select",
            channel,
        )
        await self._rpc(
            lambda done: channel.exchange_declare(
                exchange=self._exchange, exchange_type="direct", durable=True, callback=done
            ),
            "declare exchange",
            channel,
        )
        for route in self._routes:
            await self._declare_queue(channel, route)
        self._next_tag = 0
        self._order.clear()
        self._returned.clear()
        self._publisher = channel
        for route in self._handlers:
            self._schedule_consumer(route)

    async def _declare_queue(self, channel: Channel, route: str) -> None:
        queue = queue_name(self._instance, route)
        arguments = dict(self._queue_arguments)
        if route not in self._parallel:
            # Several engines may consume one FIFO route: RabbitMQ gives the route to one of
            # them at a time and fails over to another, so the order holds across processes.
            arguments["x-single-active-consumer"] = True
        await self._rpc(
            lambda done: channel.queue_declare(
                queue, durable=True, arguments=arguments, callback=done
            ),
            f"declare queue {queue} (a queue left by an older version with other arguments "
            "must be drained and deleted, or use another instance name)",
            channel,
        )
        dead = dead_letter_queue_name(self._instance, route)
        await self._rpc(
            lambda done: channel.queue_declare(
                dead, durable=True, arguments=self._queue_arguments, callback=done
            ),
            f"declare queue {dead}",
            channel,
        )
        await self._rpc(
            lambda done: channel.queue_bind(
                queue, self._exchange, routing_key=route, callback=done
            ),
            f"bind queue {queue}",
            channel,
        )

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        self._publisher = None
        self._consumer_channels.clear()
        self._fail_all(BrokerError(f"connection to RabbitMQ lost: {reason!r}"))
        if self._closing or not self._started:
            return
        log.warning("broker.connection_lost", reason=type(reason).__name__)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Reconnect with exponential backoff until it works or the broker is closed."""
        delay = self._reconnect_delay
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except (BrokerError, pika.exceptions.AMQPError) as exc:
                log.warning("broker.reconnect_failed", error=str(exc), retry_in=delay)
                self._abort_connection()
                delay = min(delay * 2, self._reconnect_max_delay)
            else:
                log.info("broker.reconnected", instance=self._instance)
                return

    def _on_publisher_closed(self, channel: Channel, reason: BaseException) -> None:
        """The publisher channel closed: expected when we close, otherwise reconnect.

        RabbitMQ closes a channel on a protocol error (an exchange deleted under us...): the
        connection stays up but our topology is stale, so the whole connection is rebuilt.
        """
        if channel is self._publisher:
            self._publisher = None
        self._fail_waiters(channel, reason)
        if self._closing or isinstance(reason, pika.exceptions.ChannelClosedByClient):
            return
        if self._connection is None or not self._connection.is_open:
            return  # the whole connection is going: _on_connection_closed handles it
        self._fail_all(BrokerError(f"RabbitMQ closed the publisher channel: {reason!r}"))
        log.warning("broker.publisher_channel_closed", reason=str(reason))
        self._drop_connection("publisher channel closed")

    def _drop_connection(self, why: str) -> None:
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close(reply_code=320, reply_text=why)

    def _abort_connection(self) -> None:
        """Tear down a half-made connection after a failed attempt (no reconnect triggered)."""
        connection, self._connection = self._connection, None
        self._publisher = None
        self._consumer_channels.clear()
        if connection is not None and not (connection.is_closing or connection.is_closed):
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()
        self._fail_all(BrokerError("connection attempt abandoned"))

    def _fail_all(self, error: BrokerError) -> None:
        """Fail every unconfirmed publish and every awaited RPC reply."""
        pending, self._pending = self._pending, {}
        self._order.clear()
        self._returned.clear()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for future in [*pending.values(), *self._waiters]:
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()

    def _on_blocked(self, _connection: Any, _frame: Any) -> None:
        log.warning("broker.blocked_by_rabbitmq", hint="resource alarm: disk or memory")

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        log.info("broker.unblocked")

    # ------------------------------------------------------------------ helpers

    async def _rpc(
        self,
        start: Callable[[Callable[[Any], None]], object],
        what: str,
        channel: Channel | None = None,
    ) -> Any:
        """Start a pika call taking a completion callback and await that callback, bounded."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(result: Any) -> None:
            if not future.done():
                future.set_result(result)

        self._waiters[future] = channel
        try:
            try:
                start(done)
            except pika.exceptions.AMQPError as exc:
                raise BrokerError(f"{what} failed: {exc!r}") from exc
            return await self._bounded(future, what)
        finally:
            self._waiters.pop(future, None)

    def _fail_waiters(self, channel: Channel, reason: BaseException) -> None:
        for future, sent_on in list(self._waiters.items()):
            if sent_on is channel and not future.done():
                future.set_exception(BrokerError(f"RabbitMQ closed the channel: {reason!r}"))

    async def _bounded(self, future: asyncio.Future[Any], what: str) -> Any:
        try:
            return await asyncio.wait_for(future, self._confirm_timeout)
        except TimeoutError:
            raise BrokerError(
                f"{what}: no answer from RabbitMQ within {self._confirm_timeout:g} s"
            ) from None

    @staticmethod
    def _basic_cancel(channel: Channel, tag: str, done: Callable[[Any], None]) -> None:
        channel.basic_cancel(tag, callback=done)
