"""The embedded default broker: kombu's SQLAlchemy transport on a SQLite file.

For a single machine this needs no server: an item is durable once the SQLite commit of its insert
returns. kombu objects are not thread-safe, so each thread owns its kombu connection: one
publishing thread (async ``publish`` waits for it through ``run_in_executor``) and one consuming
thread per route, which polls its queue and runs the handler on the event loop with
``asyncio.run_coroutine_threadsafe``.

Behaviours of kombu's SQLAlchemy transport (kombu 5.7) this module works around:

- **A fetched message is only marked invisible.** ``get`` flips the row's ``visible`` flag in the
  database and keeps the message in the consumer's memory until it is acknowledged; acknowledging
  never touches the database again. If the process dies while a handler runs, that queue copy is
  gone for good (the row stays invisible). The engine recovers at start-up by re-enqueuing every
  non-final transaction from its store (``purge`` then republish), which is why ``purge`` exists.
  Acknowledged rows also stay in the table forever; each consumer therefore deletes its queue's
  invisible rows every ``compact_every`` acknowledgements (and at start).
- **A requeued message goes to the tail.** ``requeue()``/``reject(requeue=True)`` insert a new row
  behind every waiting item, which would break per-route FIFO. So a failed item is never requeued:
  the consumer thread keeps it and runs the handler again after ``requeue_delay`` until it
  succeeds or the broker closes. On close, kombu restores an item still held that way at the tail
  of its queue; start-up recovery (above) restores the order.
- **``polling_interval`` cannot go through ``transport_options``**: this transport passes its
  options on to ``sqlalchemy.create_engine``, which rejects unknown keywords. Consumers poll on
  their own (``Queue.get`` then a short wait), so the interval is simply this class's argument.
- **SQLAlchemy 2.1 deprecates the ``noload`` strategy** used by kombu's models; the warning is
  silenced (that message only) while kombu's mappers are configured, once per process.

The SQLite file is switched to WAL journaling so that polling consumers and the publisher do not
block each other; commits stay fully synchronous (durable).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import queue
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, cast

import structlog
from kombu.connection import Connection
from kombu.entity import Queue
from sqlalchemy.exc import SADeprecationWarning

from medcourier.engine.broker import (
    Handler,
    Lane,
    Pipelined,
    WorkItem,
    dead_letter_queue_name,
    pipeline_of,
    queue_name,
    run_pipeline,
)
from medcourier.engine.errors import BrokerError

log = structlog.get_logger(__name__)

# kombu is untyped: reach it through ``Any`` so strict type checking stays on for our code.
_Connection = cast(Any, Connection)
_Queue = cast(Any, Queue)

_models_lock = threading.Lock()
_models_configured = False

#: SQLite busy timeout: writers (publisher, polling consumers) take turns on the file lock.
_BUSY_TIMEOUT = 30.0


def _configure_kombu_models(url: str) -> None:
    """Build and configure kombu's SQLAlchemy models once, silencing only kombu's known warning.

    Done eagerly on the calling thread so the deprecation warning cannot surface (or be turned into
    an error by a strict warnings filter) in a worker thread later.
    """
    global _models_configured
    with _models_lock:
        if _models_configured:
            return
        from kombu.transport.sqlalchemy import models

        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"The ``noload`` loader strategy is deprecated",
                category=SADeprecationWarning,
            )
            with _Connection(url) as connection:
                channel = connection.channel()
                _ = channel.queue_cls, channel.message_cls  # declares the mapped classes
                models.ModelBase.registry.configure()
        _models_configured = True


def _enable_wal(path: Path) -> None:
    """Switch the queue file to WAL journaling (a persistent property of the file)."""
    with contextlib.closing(sqlite3.connect(path, timeout=_BUSY_TIMEOUT)) as db:
        db.execute("PRAGMA journal_mode=WAL")


def _close_channel_session(channel: Any) -> None:
    """Return the channel's pooled SQLite connection explicitly.

    kombu never closes its SQLAlchemy session; left to the garbage collector, a session still
    inside a transaction makes SQLAlchemy warn about a non-checked-in connection.
    """
    session = getattr(channel, "_session", None)
    if session is not None:
        session.close()


class EmbeddedBroker:
    """The ``Broker`` protocol on a local SQLite file, through kombu (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        instance: str,
        polling_interval: float = 0.05,
        *,
        requeue_delay: float = 0.5,
        compact_every: int = 1000,
        close_timeout: float = 30.0,
    ) -> None:
        self._path = Path(path).expanduser().absolute()
        self._url = f"sqla+sqlite:///{self._path}"
        self._instance = instance
        self._polling_interval = polling_interval
        self._requeue_delay = requeue_delay
        self._compact_every = compact_every
        self._close_timeout = close_timeout
        self._transport_options: dict[str, Any] = {
            "connect_args": {"timeout": _BUSY_TIMEOUT},
            # One pooled connection per thread may be checked out at once: no pool ceiling.
            "pool_size": 0,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._due: set[asyncio.Task[None]] = set()
        self._closed = False
        # Owned by the publisher thread only.
        self._pub_connection: Any = None
        self._pub_channel: Any = None
        self._pub_db: sqlite3.Connection | None = None
        self._queue_ids: dict[str, int] = {}
        # Publishes waiting for the publisher thread, written together (``_write_outbox``).
        self._outbox: list[tuple[str, WorkItem, asyncio.Future[None]]] = []
        self._outbox_task: asyncio.Task[None] | None = None
        # Queue name -> wakes the pipelined consumer of that queue (a thread of this process).
        self._wake: dict[str, Callable[[], None]] = {}

    @property
    def path(self) -> Path:
        return self._path

    def _connection(self) -> Any:
        return _Connection(self._url, transport_options=self._transport_options)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, routes: list[str], parallel: Collection[str] = ()) -> None:
        """Create the file if needed, declare the routes' queues, open the publishing thread."""
        if self._executor is not None or self._closed:
            raise BrokerError("EmbeddedBroker.start() called twice or after close()")
        self._loop = asyncio.get_running_loop()
        _configure_kombu_models(self._url)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="medcourier-queue-publish"
        )
        try:
            await self._in_publisher(self._open_publisher, list(dict.fromkeys(routes)))
        except BaseException:
            await self.close()
            raise
        log.info("broker.connected", path=str(self._path), instance=self._instance)

    def _open_publisher(self, routes: list[str]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        _enable_wal(self._path)
        self._pub_connection = self._connection()
        self._pub_channel = self._pub_connection.channel()
        for route in routes:
            queue = queue_name(self._instance, route)
            self._pub_channel.queue_declare(queue=queue, durable=True)
            self._pub_channel.queue_declare(
                queue=dead_letter_queue_name(self._instance, route), durable=True
            )
            self._compact(queue)
        self._pub_db = _open_queue_file(self._path)

    async def close(self) -> None:
        """Stop and join the consumer threads, then close the publishing thread's connection.

        A handler running when close() is called is given ``close_timeout`` to finish (its item is
        then acknowledged); a thread still busy after that is left behind (it is a daemon thread).
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for handle in self._timers:
            handle.cancel()  # the store re-queues those deliveries at the next start
        self._timers.clear()
        for task in list(self._due):
            task.cancel()
        for route, thread in list(self._threads.items()):
            await asyncio.to_thread(thread.join, self._close_timeout)
            if thread.is_alive():
                log.warning("broker.consumer_still_running", route=route)
        self._threads.clear()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_publisher)
            executor.shutdown(wait=True)
        log.info("broker.closed", path=str(self._path), instance=self._instance)

    def _close_publisher(self) -> None:
        connection, channel = self._pub_connection, self._pub_channel
        self._pub_connection = self._pub_channel = None
        db, self._pub_db = self._pub_db, None
        if db is not None:
            db.close()
        if connection is not None:
            connection.release()
        if channel is not None:
            _close_channel_session(channel)

    async def _in_publisher(self, function: Any, *args: Any) -> Any:
        executor = self._executor
        if executor is None or self._closed:
            raise BrokerError("the embedded broker is not started (or already closed)")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, function, *args)
        except BrokerError:
            raise
        except Exception as exc:
            raise BrokerError(f"embedded queue {self._path}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ publishing

    async def publish(self, item: WorkItem) -> None:
        """Insert the item into its route's queue; returns once the SQLite commit returned.

        Publishes made while the publisher thread is writing wait for it and then go together,
        in one transaction (one fsync for them all), in the order they were made.
        """
        await self._enqueue(queue_name(self._instance, item.route), item)

    async def _enqueue(self, queue: str, item: WorkItem) -> None:
        if self._executor is None or self._closed:
            raise BrokerError("the embedded broker is not started (or already closed)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._outbox.append((queue, item, future))
        if self._outbox_task is None:
            self._outbox_task = loop.create_task(self._write_outbox())
        await future

    async def _write_outbox(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    await self._in_publisher(self._insert, [(q, i) for q, i, _ in batch])
                except BaseException as exc:
                    error = exc if isinstance(exc, BrokerError) else BrokerError(str(exc))
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for _, _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._outbox_task = None
            for _, _, future in self._outbox:  # cancelled: these were not queued
                future.cancel()
            self._outbox = []

    def _insert(self, items: list[tuple[str, WorkItem]]) -> None:
        """Publisher thread: insert the items, each into its queue, in one transaction.

        The rows are kombu's (the same envelope as ``Producer.publish`` writes), so kombu's own
        consumers and ``queue_purge`` read them as theirs.
        """
        db = self._pub_db
        if db is None:
            raise BrokerError("the embedded broker is not started (or already closed)")
        rows = [(self._queue_id(db, queue), _envelope(queue, item)) for queue, item in items]
        with _write_transaction(db):
            db.executemany(
                "INSERT INTO kombu_message (visible, timestamp, payload, version, queue_id)"
                " VALUES (1, NULL, ?, 1, ?)",
                [(payload, queue_id) for queue_id, payload in rows],
            )
        for name in {name for name, _ in items}:
            wake = self._wake.get(name)
            if wake is not None:
                wake()

    def _queue_id(self, db: sqlite3.Connection, queue: str) -> int:
        found = self._queue_ids.get(queue)
        if found is None:
            found = self._queue_ids[queue] = _queue_id_of(db, queue)
        return found

    async def publish_later(self, item: WorkItem, delay: float) -> None:
        """Publish ``item`` after ``delay`` seconds, from a timer of this process.

        The wait itself is not durable here (kombu's SQLite transport has no message TTL), but
        the delivery is: it stays unfinished in the store, and start-up re-queues every unfinished
        delivery, so a wait cut short by a crash is only shortened.
        """
        if self._closed:
            raise BrokerError("the embedded broker is closed: the item was not queued")
        loop = asyncio.get_running_loop()
        handle = loop.call_later(delay, self._publish_due, item)
        self._timers.add(handle)

    def _publish_due(self, item: WorkItem) -> None:
        task = asyncio.get_running_loop().create_task(self._publish_retry(item))
        self._due.add(task)
        task.add_done_callback(self._due.discard)

    async def _publish_retry(self, item: WorkItem) -> None:
        delay = 0.5
        while not self._closed:
            try:
                await self.publish(item)
                return
            except BrokerError as exc:
                log.warning("broker.delayed_publish_failed", route=item.route, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def dead_letter(self, item: WorkItem, reason: str) -> None:
        await self._enqueue(dead_letter_queue_name(self._instance, item.route), item)

    async def purge(self, route: str) -> int:
        """Delete every item of the route's queue; returns how many were waiting."""
        count = await self._in_publisher(self._purge, queue_name(self._instance, route))
        return int(count or 0)

    def _purge(self, queue: str) -> int:
        return int(self._pub_channel.queue_purge(queue) or 0)

    # ------------------------------------------------------------------ consuming

    async def consume(self, route: str, handler: Handler, prefetch: int = 1) -> None:
        """Start the route's consumer thread; returns once it has its connection and queue.

        With ``prefetch`` above 1 (a parallel route) the thread keeps up to that many items in
        flight at once, each acknowledged when its handler returns. A FIFO route whose handler is
        ``Pipelined`` takes up to its ``window`` ahead (``_consume_pipelined``).
        """
        loop = self._loop
        if loop is None or self._closed:
            raise BrokerError("EmbeddedBroker.consume() needs a started, open broker")
        if route in self._threads:
            raise BrokerError(f"route {route!r} already has a consumer")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        pipeline = pipeline_of(handler, prefetch)
        target: Any
        args: tuple[Any, ...]
        if pipeline is not None:
            target, args = self._consume_pipelined, (route, pipeline, loop, ready)
        elif prefetch <= 1:
            target, args = self._consume_loop, (route, handler, loop, ready)
        else:
            target, args = self._consume_parallel, (route, handler, loop, ready, prefetch)
        thread = threading.Thread(
            target=target, args=args, name=f"medcourier-queue-{route}", daemon=True
        )
        self._threads[route] = thread
        thread.start()
        try:
            await asyncio.wrap_future(ready)
        except Exception as exc:
            self._threads.pop(route, None)
            await asyncio.to_thread(thread.join)
            raise BrokerError(f"cannot consume route {route!r}: {exc}") from exc

    def _consume_loop(
        self,
        route: str,
        handler: Handler,
        loop: asyncio.AbstractEventLoop,
        ready: concurrent.futures.Future[None],
    ) -> None:
        """Body of a route's consumer thread: poll, hand over to the loop, ack.

        Runs until close(): one item in flight, FIFO; a failed item is retried in place (see the
        module docstring for why it is not requeued).
        """
        queue_label = queue_name(self._instance, route)
        opened = self._open_consumer(queue_label, ready)
        if opened is None:
            return
        connection, channel, queue = opened
        acked = 0
        try:
            while not self._stop.is_set():
                try:
                    message = queue.get(no_ack=False)
                except Exception as exc:  # e.g. a locked database beyond the busy timeout
                    log.warning("broker.poll_failed", route=route, error=type(exc).__name__)
                    self._stop.wait(max(self._polling_interval, 0.5))
                    continue
                if message is None:
                    self._stop.wait(self._polling_interval)
                    continue
                if self._deliver(route, handler, loop, message):
                    acked += 1
                    if acked % self._compact_every == 0:
                        self._compact(queue_label)
        finally:
            # Unacknowledged (held) items are restored by kombu here, at the tail of the queue.
            connection.release()
            _close_channel_session(channel)

    def _consume_pipelined(
        self,
        route: str,
        pipeline: Pipelined,
        loop: asyncio.AbstractEventLoop,
        ready: concurrent.futures.Future[None],
    ) -> None:
        """Body of a pipelined FIFO route's consumer thread: fetch, hand over, acknowledge.

        The thread keeps up to ``pipeline.window`` items taken from the queue and not yet
        acknowledged, and takes what is waiting in one transaction (``_take``) rather than
        kombu's one per item. ``run_pipeline``, on the event loop, begins them in order and
        reports each one done (or failed) in ``finished``. A row taken is invisible already, as
        kombu's ``get`` leaves it: acknowledging only counts it for compaction, and an item not
        finished at close waits for the start-up rebuild of the queue, as an item a crash
        interrupted does. A publish of this process wakes the thread (``_wake``), so the route
        does not wait for the polling interval to see it.
        """
        queue_label = queue_name(self._instance, route)
        opened = self._open_consumer(queue_label, ready)
        if opened is None:
            return
        connection, channel, _source = opened
        lane = Lane()
        finished: queue.SimpleQueue[tuple[Any, bool] | None] = queue.SimpleQueue()
        waits: set[asyncio.Task[None]] = set()

        def track(task: asyncio.Task[None]) -> None:
            waits.add(task)
            task.add_done_callback(waits.discard)

        held = acked = 0

        def settled(entry: tuple[Any, bool] | None) -> None:
            nonlocal held, acked
            if entry is None:  # a wake-up: something was published
                return
            held -= 1
            if entry[1]:
                acked += 1
                if acked % self._compact_every == 0:
                    self._compact(queue_label)

        db = _open_queue_file(self._path)
        try:
            runner = asyncio.run_coroutine_threadsafe(
                run_pipeline(
                    route,
                    pipeline,
                    lane,
                    lambda token, ok: finished.put((token, ok)),
                    track,
                    self._requeue_delay,
                ),
                loop,
            )
        except RuntimeError:  # the loop is closed
            db.close()
            connection.release()
            _close_channel_session(channel)
            return
        self._wake[queue_label] = lambda: finished.put(None)
        try:
            queue_id = _queue_id_of(db, queue_label)
            while not self._stop.is_set() and not runner.done():
                with contextlib.suppress(queue.Empty):
                    while True:
                        settled(finished.get_nowait())
                if held < pipeline.window:
                    try:
                        rows = _take(db, queue_id, pipeline.window - held)
                    except sqlite3.Error as exc:
                        log.warning("broker.poll_failed", route=route, error=type(exc).__name__)
                        self._stop.wait(max(self._polling_interval, 0.5))
                        continue
                    for row_id, payload in rows:
                        try:
                            item = _item_of(payload)
                        except (ValueError, KeyError, TypeError) as exc:
                            log.error(
                                "broker.malformed_item_dropped",
                                route=route,
                                error=type(exc).__name__,
                            )
                            continue
                        held += 1
                        if not _call_soon(loop, lane.put, row_id, item):
                            return
                    if rows:
                        continue  # take what else is waiting, up to the window
                # Nothing waiting, or the window is full: wait for a delivery to finish, or for
                # a publish.
                with contextlib.suppress(queue.Empty):
                    settled(finished.get(timeout=self._polling_interval))
        finally:
            self._wake.pop(queue_label, None)
            _call_soon(loop, lane.close)
            deadline = time.monotonic() + self._close_timeout
            try:
                runner.result(timeout=self._close_timeout)
            except concurrent.futures.TimeoutError:
                runner.cancel()  # a delivery still trying: its item waits for the next start
            except Exception:  # the runner failed or was cancelled: nothing more to wait for
                pass
            # The deliveries begun: acknowledged once their status writes are done.
            while held > 0 and waits:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(queue.Empty):
                    settled(finished.get(timeout=min(left, 0.5)))
            db.close()
            connection.release()
            _close_channel_session(channel)

    def _open_consumer(
        self, queue_label: str, ready: concurrent.futures.Future[None]
    ) -> tuple[Any, Any, Any] | None:
        """This thread's kombu connection, channel and declared queue; None (and ``ready``
        failed) when the queue cannot be opened."""
        connection = self._connection()
        channel: Any = None
        try:
            channel = connection.channel()
            queue = _Queue(queue_label, routing_key=queue_label, durable=True)(channel)
            queue.declare()
        except Exception as exc:
            connection.release()
            if channel is not None:
                _close_channel_session(channel)
            ready.set_exception(exc)
            return None
        ready.set_result(None)
        return connection, channel, queue

    def _consume_parallel(
        self,
        route: str,
        handler: Handler,
        loop: asyncio.AbstractEventLoop,
        ready: concurrent.futures.Future[None],
        prefetch: int,
    ) -> None:
        """Body of a parallel route's consumer thread: up to ``prefetch`` handlers at once.

        The thread alone touches kombu (fetch and ack); handlers run on the event loop. A handler
        that raises is started again after ``requeue_delay`` (its item stays in flight).
        """
        queue_label = queue_name(self._instance, route)
        opened = self._open_consumer(queue_label, ready)
        if opened is None:
            return
        connection, channel, queue = opened
        inflight: dict[concurrent.futures.Future[None], tuple[Any, WorkItem]] = {}
        retry_at: list[tuple[float, Any, WorkItem]] = []
        acked = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for entry in [e for e in retry_at if e[0] <= now]:
                    retry_at.remove(entry)
                    future = self._submit(handler, entry[2], loop)
                    if future is None:
                        return
                    inflight[future] = (entry[1], entry[2])
                while len(inflight) + len(retry_at) < prefetch:
                    try:
                        message = queue.get(no_ack=False)
                    except Exception as exc:
                        log.warning("broker.poll_failed", route=route, error=type(exc).__name__)
                        break
                    if message is None:
                        break
                    try:
                        item = WorkItem.from_bytes(message.body)
                    except (ValueError, KeyError, TypeError) as exc:
                        log.error(
                            "broker.malformed_item_dropped", route=route, error=type(exc).__name__
                        )
                        message.ack()
                        continue
                    future = self._submit(handler, item, loop)
                    if future is None:
                        return
                    inflight[future] = (message, item)
                if not inflight:
                    self._stop.wait(self._polling_interval)
                    continue
                done, _ = concurrent.futures.wait(
                    list(inflight), timeout=self._polling_interval, return_when="FIRST_COMPLETED"
                )
                for future in done:
                    message, item = inflight.pop(future)
                    if future.cancelled() or future.exception() is not None:
                        log.warning(
                            "broker.handler_failed",
                            route=route,
                            transaction_id=item.transaction_id,
                            error=type(future.exception()).__name__
                            if not future.cancelled()
                            else "CancelledError",
                        )
                        retry_at.append((time.monotonic() + self._requeue_delay, message, item))
                        continue
                    message.ack()
                    acked += 1
                    if acked % self._compact_every == 0:
                        self._compact(queue_label)
        finally:
            for future in inflight:
                with contextlib.suppress(Exception):
                    future.result(timeout=self._close_timeout)
            connection.release()
            _close_channel_session(channel)

    @staticmethod
    def _submit(
        handler: Handler, item: WorkItem, loop: asyncio.AbstractEventLoop
    ) -> concurrent.futures.Future[None] | None:
        async def call() -> None:
            await handler(item)

        try:
            return asyncio.run_coroutine_threadsafe(call(), loop)
        except RuntimeError:  # the loop is closed
            return None

    def _deliver(
        self, route: str, handler: Handler, loop: asyncio.AbstractEventLoop, message: Any
    ) -> bool:
        """Run the handler until it succeeds, then ack; False if the broker stopped first."""
        try:
            item = WorkItem.from_bytes(message.body)
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "broker.malformed_item_dropped",
                route=route,
                size=len(message.body or b""),
                error=type(exc).__name__,
            )
            message.ack()
            return True
        while True:
            try:
                outcome = self._run_handler(handler, item, loop)
            except Exception as exc:
                log.warning(
                    "broker.handler_failed",
                    route=route,
                    transaction_id=item.transaction_id,
                    error=type(exc).__name__,
                )
                if self._stop.wait(self._requeue_delay):
                    return False
                continue
            if not outcome:
                return False
            message.ack()
            return True

    def _run_handler(
        self, handler: Handler, item: WorkItem, loop: asyncio.AbstractEventLoop
    ) -> bool:
        """Run ``handler(item)`` on the event loop and wait; False if the loop went away."""

        async def call() -> None:
            await handler(item)

        try:
            future = asyncio.run_coroutine_threadsafe(call(), loop)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            done, _ = concurrent.futures.wait([future], timeout=0.5)
            if done:
                break
            if loop.is_closed() or not loop.is_running():
                future.cancel()
                return False
        try:
            future.result()  # re-raises the handler's exception
        except concurrent.futures.CancelledError:
            return False
        return True

    def _compact(self, queue: str) -> None:
        """Delete the queue's invisible rows (acknowledged or in flight, never read again)."""
        try:
            with contextlib.closing(sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT)) as db, db:
                db.execute(
                    "DELETE FROM kombu_message WHERE visible = 0 AND queue_id IN"
                    " (SELECT id FROM kombu_queue WHERE name = ?)",
                    (queue,),
                )
        except sqlite3.Error as exc:
            log.warning("broker.compact_failed", queue=queue, error=type(exc).__name__)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> bool:
    """Run ``fn(*args)`` on the loop from another thread; False if the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _open_queue_file(path: Path) -> sqlite3.Connection:
    """A connection of our own to the queue file (kombu's tables), in autocommit mode: each
    write is an explicit ``BEGIN IMMEDIATE`` … ``COMMIT`` (``_write_transaction``)."""
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous=FULL")  # durable once committed, as kombu's commits are
    return db


@contextlib.contextmanager
def _write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # A failed COMMIT leaves the transaction open: end it, or every later BEGIN fails.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _envelope(queue: str, item: WorkItem) -> str:
    """The row kombu's ``Producer.publish`` writes for ``item`` (its virtual transport's message:
    the body in Base64, the routing in the properties)."""
    return json.dumps(
        {
            "body": base64.b64encode(item.to_bytes()).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {},
            "properties": {
                "message_id": item.transaction_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def _item_of(payload: str) -> WorkItem:
    """The work item in a kombu row's payload (``_envelope``).

    :raises ValueError, KeyError, TypeError: a malformed row.
    """
    message = json.loads(payload)
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        return WorkItem.from_bytes(base64.b64decode(body))
    return WorkItem.from_bytes(body.encode() if isinstance(body, str) else body)


def _queue_id_of(db: sqlite3.Connection, queue: str) -> int:
    """The id of kombu's row for ``queue``, made if there is none (as kombu's ``_put`` does)."""
    row = db.execute("SELECT id FROM kombu_queue WHERE name = ?", (queue,)).fetchone()
    if row is None:
        with _write_transaction(db):
            db.execute("INSERT OR IGNORE INTO kombu_queue (name) VALUES (?)", (queue,))
        row = db.execute("SELECT id FROM kombu_queue WHERE name = ?", (queue,)).fetchone()
    return int(row[0])


_TAKE = (
    "SELECT id, payload FROM kombu_message WHERE queue_id = ? AND visible != 0"
    " ORDER BY timestamp, id LIMIT ?"
)


def _take(db: sqlite3.Connection, queue_id: int, most: int) -> list[tuple[int, str]]:
    """Up to ``most`` of the queue's waiting rows, oldest first, made invisible (taken) in one
    transaction, as kombu's ``get`` does one at a time. An empty queue costs a read only."""
    if not db.execute(_TAKE, (queue_id, 1)).fetchone():
        return []
    with _write_transaction(db):
        rows = [(int(r[0]), str(r[1])) for r in db.execute(_TAKE, (queue_id, most))]
        db.executemany("UPDATE kombu_message SET visible = 0 WHERE id = ?", [(r[0],) for r in rows])
    return rows
