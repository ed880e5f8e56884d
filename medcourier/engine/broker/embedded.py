"""The embedded default broker: route queues in the engine's memory, a file between processes.

The embedded engine is one process, and its store is the durable record of every delivery: a
document is committed before it is queued, and start-up refills the queues with every delivery
that is not final (``Engine._rebuild_queues``). A queue item is only a claim check, so the route
queues of the process that consumes them live in its memory: a publish appends to a deque on the
event loop and wakes the route's consumer task, with no thread hop, no transaction and no fsync.
Before this, the queue was a second SQLite file written and polled by threads for every item,
15% of the engine's CPU per document (docs/performance.md), for a durability nothing read back.

What still needs a file is what another process queues: ``medcourier replay`` queues the
deliveries it resets while the engine runs, and dead letters are kept for an operator. So the
broker keeps kombu's SQLAlchemy transport tables in ``queue.sqlite``:

- ``publish`` appends in memory when this process consumes the route, and inserts into the file
  otherwise (the command line's process; the engine itself before ``consume``, while it rebuilds).
  Inserts made while one is being written go together, in one transaction.
- ``consume`` takes what waits in the file first (it is older), then the route's consumer runs
  on the event loop; every ``polling_interval`` the broker moves what other processes put in the
  file since to the tail of the route's memory queue. A row taken is deleted.
- ``dead_letter`` inserts into ``<queue>.dead`` in the file, where it stays.

What an item in memory is worth at a crash or a stop: nothing is lost, because the store says
which deliveries are unfinished, and start-up queues them again, oldest first. The same holds for
a parallel route's retry waiting in a timer.

Consumption follows the ``Broker`` contract: a FIFO route has one item in flight, retried in
place after ``requeue_delay`` while it fails; a ``Pipelined`` FIFO handler gets up to its
``window`` through a ``Lane``; a parallel route runs up to ``prefetch`` handlers at once.

kombu 5.7 details this module works around:

- **``polling_interval`` cannot go through ``transport_options``**: the transport passes its
  options on to ``sqlalchemy.create_engine``, which rejects unknown keywords. The file is read by
  this module's own statements, so the interval is simply this class's argument.
- **SQLAlchemy 2.1 deprecates the ``noload`` strategy** used by kombu's models; the warning is
  silenced (that message only) while kombu's mappers are configured, once per process.
- **kombu's own consumer only hides a row it fetched** and requeues a failed one at the tail of
  its queue: rows are read and deleted here instead, and a failed item is retried in place.

The file is switched to WAL journaling so that the engine's reads and another process's inserts
do not block each other; commits stay fully synchronous (durable).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import sqlite3
import threading
import uuid
import warnings
from collections import deque
from collections.abc import Collection, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import structlog
from kombu.connection import Connection
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

_models_lock = threading.Lock()
_models_configured = False

#: SQLite busy timeout: the engine and another process's inserts take turns on the file lock.
_BUSY_TIMEOUT = 30.0

#: Rows moved from the file to memory in one transaction.
_TAKE_BATCH = 1000


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


class _RouteQueue:
    """A consumed route's items in this process's memory, in queue order (event loop only)."""

    def __init__(self) -> None:
        self.items: deque[WorkItem] = deque()
        self._wake = asyncio.Event()

    def put(self, item: WorkItem) -> None:
        self.items.append(item)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def changed(self) -> None:
        """Wait for the next put or wake (one that came before this call counts too)."""
        await self._wake.wait()
        self._wake.clear()


class EmbeddedBroker:
    """The ``Broker`` protocol in this process's memory, with a SQLite file for other processes
    (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        instance: str,
        polling_interval: float = 0.1,
        *,
        requeue_delay: float = 0.5,
        close_timeout: float = 30.0,
    ) -> None:
        self._path = Path(path).expanduser().absolute()
        self._url = f"sqla+sqlite:///{self._path}"
        self._instance = instance
        self._polling_interval = polling_interval
        self._requeue_delay = requeue_delay
        self._close_timeout = close_timeout
        self._transport_options: dict[str, Any] = {
            "connect_args": {"timeout": _BUSY_TIMEOUT},
            "pool_size": 0,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopped = asyncio.Event()
        # Closing: consumers stop; closed: the file is closed too (nothing more is queued).
        self._closing = False
        self._closed = False
        self._due: set[asyncio.Task[None]] = set()
        # Route -> its queue in memory, for the routes this process consumes.
        self._local: dict[str, _RouteQueue] = {}
        self._consumers: dict[str, tuple[Handler, int]] = {}
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._poller: asyncio.Task[None] | None = None
        # Owned by the file thread only.
        self._pub_connection: Any = None
        self._pub_channel: Any = None
        self._pub_db: sqlite3.Connection | None = None
        self._queue_ids: dict[str, int] = {}
        # Inserts waiting for the file thread, written together (``_write_outbox``).
        self._outbox: list[tuple[str, WorkItem, asyncio.Future[None]]] = []
        self._outbox_task: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def waiting(self, route: str) -> int:
        """Items of a consumed route waiting in this process's memory (not begun yet)."""
        local = self._local.get(route)
        return len(local.items) if local is not None else 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self, routes: list[str], parallel: Collection[str] = ()) -> None:
        """Create the file if needed, declare the routes' queues, open the file's thread."""
        if self._executor is not None or self._closing:
            raise BrokerError("EmbeddedBroker.start() called twice or after close()")
        self._loop = asyncio.get_running_loop()
        _configure_kombu_models(self._url)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="medcourier-queue-file"
        )
        try:
            await self._in_file(self._open_file, list(dict.fromkeys(routes)))
        except BaseException:
            await self.close()
            raise
        log.info("broker.connected", path=str(self._path), instance=self._instance)

    def _open_file(self, routes: list[str]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        _enable_wal(self._path)
        self._pub_connection = _Connection(self._url, transport_options=self._transport_options)
        self._pub_channel = self._pub_connection.channel()
        for route in routes:
            self._pub_channel.queue_declare(queue=queue_name(self._instance, route), durable=True)
            self._pub_channel.queue_declare(
                queue=dead_letter_queue_name(self._instance, route), durable=True
            )
        self._pub_db = _open_queue_file(self._path)

    async def close(self) -> None:
        """Stop the consumers, then close the file.

        A handler running when close() is called is given ``close_timeout`` to finish (a
        pipelined route's status writes too); one still running then is cancelled. Items still
        waiting in memory are dropped: their deliveries are unfinished in the store, and the next
        start queues them again. Until the consumers are done, their handlers can still queue
        dead letters; retries they ask for are left to the store as well.
        """
        if self._closing:
            return
        self._closing = True
        self._stopped.set()
        for task in list(self._due):
            task.cancel()  # retries waiting: the store re-queues them at the next start
        if self._poller is not None:
            self._poller.cancel()
        for local in self._local.values():
            local.wake()
        await self._wait_for_consumers()
        left = sum(len(local.items) for local in self._local.values())
        if left:
            log.info("broker.items_left_to_the_store", count=left)
        self._local.clear()
        self._tasks.clear()
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_file)
            executor.shutdown(wait=True)
        log.info("broker.closed", path=str(self._path), instance=self._instance)

    async def _wait_for_consumers(self) -> None:
        """Wait for the routes' tasks, those begun while closing included (a pipeline's status
        writes), for ``close_timeout`` in all; cancel what still runs then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        while True:
            running = {t for tasks in self._tasks.values() for t in tasks if not t.done()}
            if not running:
                return
            left = deadline - loop.time()
            if left <= 0:
                for task in running:
                    log.warning("broker.consumer_still_running", route=task.get_name())
                    task.cancel()
                await asyncio.wait(running, timeout=1.0)
                return
            await asyncio.wait(running, timeout=left, return_when=asyncio.FIRST_COMPLETED)

    def _close_file(self) -> None:
        connection, channel = self._pub_connection, self._pub_channel
        self._pub_connection = self._pub_channel = None
        db, self._pub_db = self._pub_db, None
        if db is not None:
            db.close()
        if connection is not None:
            connection.release()
        if channel is not None:
            _close_channel_session(channel)

    async def _in_file(self, function: Any, *args: Any) -> Any:
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
        """Queue the item: in memory when this process consumes its route, else in the file
        (returning once the SQLite commit returned)."""
        if self._executor is None or self._closed:
            raise BrokerError("the embedded broker is not started (or already closed)")
        local = self._local.get(item.route)
        if local is not None:
            local.put(item)
            return
        await self._insert_later(queue_name(self._instance, item.route), item)

    async def _insert_later(self, queue: str, item: WorkItem) -> None:
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
                    await self._in_file(self._insert, [(q, i) for q, i, _ in batch])
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
        """File thread: insert the items, each into its queue, in one transaction.

        The rows are kombu's (the same envelope as ``Producer.publish`` writes), so kombu's own
        tools and ``queue_purge`` read them as theirs.
        """
        db = self._file_db()
        rows = [(self._queue_id(db, queue), _envelope(queue, item)) for queue, item in items]
        with _write_transaction(db):
            db.executemany(
                "INSERT INTO kombu_message (visible, timestamp, payload, version, queue_id)"
                " VALUES (1, NULL, ?, 1, ?)",
                [(payload, queue_id) for queue_id, payload in rows],
            )

    def _queue_id(self, db: sqlite3.Connection, queue: str) -> int:
        found = self._queue_ids.get(queue)
        if found is None:
            found = self._queue_ids[queue] = _queue_id_of(db, queue)
        return found

    async def publish_later(self, item: WorkItem, delay: float) -> None:
        """Publish ``item`` after ``delay`` seconds, from a task of this process.

        The wait is not durable, the delivery is: it stays unfinished in the store, and start-up
        re-queues every unfinished delivery, so a wait cut short by a crash or a stop is only
        shortened. While closing, nothing is scheduled (for the same reason), so a worker is not
        told to wait out its retry delay in place.
        """
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._publish_after(item, delay))
        self._due.add(task)
        task.add_done_callback(self._due.discard)

    async def _publish_after(self, item: WorkItem, delay: float) -> None:
        await asyncio.sleep(delay)
        wait = 0.5
        while not self._closing:
            try:
                await self.publish(item)
                return
            except BrokerError as exc:
                log.warning("broker.delayed_publish_failed", route=item.route, error=str(exc))
                await asyncio.sleep(wait)
                wait = min(wait * 2, 10.0)

    async def dead_letter(self, item: WorkItem, reason: str) -> None:
        """Keep the item in the file's ``<queue>.dead`` for an operator (durable)."""
        await self._insert_later(dead_letter_queue_name(self._instance, item.route), item)

    async def purge(self, route: str) -> int:
        """Drop every item of the route's queue, in memory and in the file; returns how many."""
        local = self._local.get(route)
        dropped = 0
        if local is not None:
            dropped = len(local.items)
            local.items.clear()
        count = await self._in_file(self._purge, queue_name(self._instance, route))
        return dropped + int(count or 0)

    def _purge(self, queue: str) -> int:
        return int(self._pub_channel.queue_purge(queue) or 0)

    # ------------------------------------------------------------------ consuming

    async def consume(self, route: str, handler: Handler, prefetch: int = 1) -> None:
        """Start the route's consumer on the event loop; returns once it runs.

        What waits in the file for the route goes first (publishes of this process still being
        written there included), ahead of what this process publishes from now on (which goes
        to memory). With ``prefetch`` above 1 (a parallel route) up to that many handlers run
        at once. A FIFO route whose handler is ``Pipelined`` takes up to its ``window`` ahead.
        """
        if self._loop is None or self._closing:
            raise BrokerError("EmbeddedBroker.consume() needs a started, open broker")
        if route in self._local:
            raise BrokerError(f"route {route!r} already has a consumer")
        local = self._local[route] = _RouteQueue()
        queue = queue_name(self._instance, route)
        try:
            if self._outbox_task is not None:  # published before this call: in the file first
                await asyncio.wait({self._outbox_task})
            waiting = await self._in_file(self._take_all, queue)
        except BrokerError as exc:
            self._local.pop(route, None)
            raise BrokerError(f"cannot consume route {route!r}: {exc}") from exc
        # Published meanwhile went to memory, behind what was in the file.
        local.items.extendleft(reversed(_items_of(route, waiting)))
        self._consumers[route] = (handler, prefetch)
        self._tasks[route] = set()
        self._run_consumer(route)
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_file())
            self._poller.add_done_callback(_poller_ended)

    def _run_consumer(self, route: str) -> None:
        """Start the route's consumer task, and again if it ends before the broker closes.

        A handler is expected to raise ``Exception`` for a failure; one raising something else
        (``CancelledError`` from a connector, an exception group) ends the consumer task. The
        item it held goes back to the head of the route's queue and the consumer starts again,
        rather than leaving a route that accepts documents and never delivers them.
        """
        if self._closing:
            return
        handler, prefetch = self._consumers[route]
        local, tasks = self._local[route], self._tasks[route]
        pipeline = pipeline_of(handler, prefetch)
        body: Coroutine[Any, Any, None]
        if pipeline is not None:
            body = self._consume_pipelined(route, pipeline, local, tasks)
        elif prefetch <= 1:
            body = self._consume_fifo(route, handler, local)
        else:
            body = self._consume_parallel(route, handler, local, prefetch, tasks)
        loop = asyncio.get_running_loop()
        task = loop.create_task(body, name=route)
        tasks.add(task)

        def ended(done: asyncio.Task[None]) -> None:
            tasks.discard(done)
            failure = None if done.cancelled() else done.exception()  # read, even when closing
            if self._closing:
                return
            if done.cancelled():
                error = "CancelledError"
            else:
                error = type(failure).__name__ if failure is not None else "its pipeline ended"
            log.error("broker.consumer_restarted", route=route, error=error)
            loop.call_later(self._requeue_delay, self._run_consumer, route)

        task.add_done_callback(ended)

    async def _consume_fifo(self, route: str, handler: Handler, local: _RouteQueue) -> None:
        """One item at a time, in order, each retried in place until it succeeds."""
        while not self._closing:
            if not local.items:
                await local.changed()
                continue
            item, delivered = local.items.popleft(), False
            try:
                delivered = await self._deliver(route, handler, item)
            finally:
                # Ended otherwise than by Exception: back at the head, for the restarted consumer.
                if not delivered and not self._closing:
                    local.items.appendleft(item)
                    local.wake()
            if not delivered:
                return

    async def _consume_parallel(
        self,
        route: str,
        handler: Handler,
        local: _RouteQueue,
        prefetch: int,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Up to ``prefetch`` handlers at once, each item retried in place in its own slot."""
        slots = asyncio.Semaphore(prefetch)
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not local.items:
                await local.changed()
                continue
            await slots.acquire()
            if self._closing or not local.items:  # closed or purged while waiting for a slot
                slots.release()
                continue
            item = local.items.popleft()

            async def in_slot(item: WorkItem = item) -> None:
                try:
                    await self._deliver(route, handler, item)
                except BaseException as exc:
                    if self._closing:
                        raise
                    # Ended otherwise than by Exception: the item waits as a failed attempt
                    # would (rather than spin in the next free slot), then goes back at the head.
                    log.error("broker.handler_ended", route=route, error=type(exc).__name__)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopped.wait(), self._requeue_delay)
                    if not self._closing:
                        local.items.appendleft(item)
                        local.wake()
                finally:
                    slots.release()

            task = loop.create_task(in_slot(), name=route)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _deliver(self, route: str, handler: Handler, item: WorkItem) -> bool:
        """Run the handler until it succeeds; False when the broker closed first."""
        while True:
            try:
                await handler(item)
                return True
            except Exception as exc:
                log.warning(
                    "broker.handler_failed",
                    route=route,
                    transaction_id=item.transaction_id,
                    error=type(exc).__name__,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._requeue_delay)
            if self._closing:
                return False

    async def _consume_pipelined(
        self,
        route: str,
        pipeline: Pipelined,
        local: _RouteQueue,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        """Feed a ``Lane`` up to the pipeline's window; ``run_pipeline`` begins the items in
        order, and each one's slot frees once its status write is done (or failed: the store
        then still has the delivery unfinished, and the next start queues it again)."""
        lane = Lane()
        held = 0
        loop = asyncio.get_running_loop()

        def settle(_token: Any, _ok: bool) -> None:
            nonlocal held
            held -= 1
            local.wake()

        def track(task: asyncio.Task[None]) -> None:
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        runner = loop.create_task(
            run_pipeline(route, pipeline, lane, settle, track, self._requeue_delay), name=route
        )
        tasks.add(runner)
        runner.add_done_callback(lambda _: local.wake())
        try:
            while not self._closing and not runner.done():
                while held < pipeline.window and local.items:
                    held += 1
                    lane.put(None, local.items.popleft())
                await local.changed()
        finally:
            lane.close()
            if not self._closing:
                # The pipeline ended under us: what it had not begun goes back, in order. The
                # item it was on, if any, is left to the store (the next start).
                local.items.extendleft(reversed(lane.ahead()))
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            raise cast(BaseException, runner.exception())

    async def _poll_file(self) -> None:
        """Move what other processes queued in the file to the consumed routes' memory.

        A take cut short by close() loses its rows from the file only: their deliveries are
        unfinished in the store, which the next start queues again.
        """
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._polling_interval)
            if self._closing:
                return
            routes = list(self._consumers)  # not a route whose consume() is still taking
            try:
                found = await self._in_file(
                    self._take_waiting, [queue_name(self._instance, r) for r in routes]
                )
            except Exception as exc:
                log.warning("broker.poll_failed", error=type(exc).__name__)
                continue
            for route, rows in zip(routes, found, strict=True):
                local = self._local.get(route)
                if local is None:
                    continue
                for item in _items_of(route, rows):
                    local.put(item)

    def _take_all(self, queue: str) -> list[str]:
        """File thread: every row waiting in ``queue``, oldest first, deleted as taken."""
        taken: list[str] = []
        while rows := self._take_waiting([queue])[0]:
            taken.extend(rows)
        return taken

    def _take_waiting(self, queues: list[str]) -> list[list[str]]:
        """File thread: up to a batch of each queue's waiting rows' payloads, oldest first,
        deleted in one transaction for all of them (so a failure takes none). Queues with
        nothing waiting cost a read each."""
        db = self._file_db()
        ids = [self._queue_id(db, queue) for queue in queues]
        if not any(db.execute(_TAKE, (queue_id, 1)).fetchone() for queue_id in ids):
            return [[] for _ in ids]
        with _write_transaction(db):
            found = [
                [(int(r[0]), str(r[1])) for r in db.execute(_TAKE, (queue_id, _TAKE_BATCH))]
                for queue_id in ids
            ]
            db.executemany(
                "DELETE FROM kombu_message WHERE id = ?",
                [(row_id,) for rows in found for row_id, _ in rows],
            )
        return [[payload for _, payload in rows] for rows in found]

    def _file_db(self) -> sqlite3.Connection:
        db = self._pub_db
        if db is None:
            raise BrokerError("the embedded broker is not started (or already closed)")
        return db


def _items_of(route: str, payloads: list[str]) -> list[WorkItem]:
    """The work items in kombu rows' payloads; a malformed row is dropped, with a log line."""
    items = []
    for payload in payloads:
        try:
            items.append(_item_of(payload))
        except Exception as exc:  # whatever another writer put there: not ours to stop on
            log.error("broker.malformed_item_dropped", route=route, error=type(exc).__name__)
    return items


def _poller_ended(task: asyncio.Task[None]) -> None:
    """The file poller catches every ``Exception``: say so if something else ended it."""
    if not task.cancelled() and task.exception() is not None:
        log.error("broker.poller_stopped", error=type(task.exception()).__name__)


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
