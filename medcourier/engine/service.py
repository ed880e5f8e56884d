"""The running engine: store, broker, router, per-route workers and the HTTP server, wired.

Accept durably, then answer: ``submit`` commits the document and its deliveries, then awaits the
broker's confirm for each route's work item; only then does the caller (HTTP) answer. On start,
the embedded broker's queues are rebuilt from the store (the store is the source of truth).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy.exc
import structlog
import uvicorn
from sqlalchemy.engine import Connection

from medcourier.engine.broker import Broker, WorkItem, is_amqp_url, open_broker
from medcourier.engine.clock import now
from medcourier.engine.config import Config
from medcourier.engine.control import RouteControl
from medcourier.engine.errors import BrokerError
from medcourier.engine.inbound import InboundChannel, InboundSink
from medcourier.engine.inbound_journal import JournalApplier, JournalingSink
from medcourier.engine.inbound_sink import EngineSink
from medcourier.engine.model import Status
from medcourier.engine.plugins import Plugins
from medcourier.engine.retention import Pruner
from medcourier.engine.router import Router
from medcourier.engine.store import AsyncStore, Store, rerunnable
from medcourier.engine.txid import new_transaction_id
from medcourier.engine.worker import RouteWorker

log = structlog.get_logger("medcourier.engine")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the engine owns SIGINT/SIGTERM and stops the
    HTTP server, the workers and the broker in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


ROLES = ("all", "api", "listener", "worker")
# How long an unfinished delivery must have been left alone before start-up queues it again.
ORPHAN_AFTER = timedelta(minutes=5)
#: Unfinished deliveries queued at once when the embedded engine rebuilds its queues.
REBUILD_BATCH = 1000


def route_broker(config: Config) -> Broker:
    """The broker of a config's routes, not started yet (see ``start_route_broker``)."""
    s = config.settings
    return open_broker(s.broker or "", s.instance, s.data_dir, quorum=s.quorum_queues)


async def start_route_broker(broker: Broker, config: Config) -> None:
    """Start ``broker`` declaring the route queues exactly as every engine process does: RabbitMQ
    refuses a queue declared again with other arguments, so tools (replay) must match."""
    parallel = [r.name for r in config.routes if r.settings.ordering == "parallel"]
    await broker.start([r.name for r in config.routes], parallel)


class NoRouteError(Exception):
    """No route matches the document and there is no fallback route."""


@dataclass(frozen=True)
class SubmitRequest:
    patient_id: str
    encounter_id: str | None
    content_type: str
    document_type: str
    title: str | None
    sender_identifier: str | None
    sender_application: str
    payload: bytes
    organizations: frozenset[str] = frozenset()
    # (sender, message id) of an inbound message, remembered once the document is queued, so a
    # resend is recognised; remembered only after the queue confirm, because a crash between
    # the commit and the confirm must let the resend through (a duplicate, never a loss).
    dedupe: tuple[str, str] | None = None
    # An inbound channel configured with ``routes`` sends its documents to exactly those, and so
    # does a CommunicationRequest addressed to the Devices of routes.
    only_routes: tuple[str, ...] = ()
    # Written in the transaction that accepts the document, with its transaction id: what must
    # exist exactly when the document does (the CommunicationRequest that asked for it).
    also: Callable[[Connection, str], object] | None = None


class Engine:
    def __init__(self, config: Config, plugins: Plugins) -> None:
        self.config = config
        self.plugins = plugins
        s = config.settings
        self.data_dir = s.data_dir
        self.store = AsyncStore(Store(s.store, s.data_dir))
        self.broker: Broker = route_broker(config)
        # RabbitMQ hands unacknowledged items back after a crash; the embedded queue does not.
        self.embedded = not is_amqp_url(s.broker or "")
        self.router = Router(config.routes)
        self.workers: dict[str, RouteWorker] = {}
        self.base_url = s.http.base_url()
        self.inbound: list[InboundChannel] = []
        self.appliers: list[JournalApplier] = []  # of listeners with ack_after: journal or receipt
        self.pruner = Pruner(self.store, config)
        self.control = RouteControl(self.store)  # pause / resume, shared through the store
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None

    def tracking_url(self, txid: str) -> str:
        return f"{self.base_url}/fhir/CommunicationRequest/$tracking?transaction-id={txid}"

    async def start(self, *, http: bool = True, role: str = "all") -> None:
        """Start what ``role`` runs: ``all``; ``api`` (the HTTP API); ``listener`` (inbound
        channels); ``worker`` (route workers and pruning). Several processes with different
        roles share one RabbitMQ and one PostgreSQL; the embedded queue allows only ``all``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        if role != "all" and self.embedded:
            raise ValueError(
                f"--role {role} needs RabbitMQ (broker: amqp://…) and PostgreSQL: the embedded "
                "queue and SQLite store belong to one engine process"
            )
        self.role = role
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.run(self.store.sync.create_schema)
        names = [r.name for r in self.config.routes]
        await start_route_broker(self.broker, self.config)
        if role in ("all", "worker"):
            if self.embedded:
                await self._rebuild_queues()
            else:
                await self._requeue_orphans()
            for route in self.config.routes:
                worker = RouteWorker(route, self.plugins, self.store, self.broker, self.control)
                self.workers[route.name] = worker
                await self.broker.consume(
                    route.name, worker.handle, prefetch=route.settings.concurrency
                )
        if role in ("all", "listener"):
            await self._start_inbound()
        # HTTP last: once /health answers, every listener and folder is up as well. A worker
        # or listener process serves /health only when asked to (http=True with its role).
        if http and role in ("all", "api"):
            await self._start_http()
        if role in ("all", "worker"):
            # Retention: background batches (engine/retention.py), once everything else is up.
            self.pruner.start()
        log.info(
            "engine started",
            role=role,
            routes=names,
            instance=self.config.settings.instance,
            broker="embedded" if self.embedded else "amqp",
            store="sqlite" if self.store.sync.is_sqlite else "postgresql",
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop?
        )

    async def _rebuild_queues(self) -> None:
        """Embedded queues lose the item being handled at a crash: refill them from the store."""
        for name in (r.name for r in self.config.routes):
            await self.broker.purge(name)
        routes = {r.name for r in self.config.routes}
        pending = await self.store.run(self.store.sync.unfinished)
        items = [WorkItem(txid, route) for txid, route in pending if route in routes]
        # Published together, a thousand at a time: the queue file takes each batch in one
        # transaction (nothing consumes yet), in this order.
        for start in range(0, len(items), REBUILD_BATCH):
            await asyncio.gather(*map(self.broker.publish, items[start : start + REBUILD_BATCH]))
        if pending:
            log.info("work recovered from the store", count=len(pending))

    async def _requeue_orphans(self) -> None:
        """Queue again what a crash may have left with no queue item (RabbitMQ).

        A document is committed before its item is confirmed, so a crash in between leaves a
        delivery in ``preparation`` with nothing queued; a crash between a failed attempt and
        its delay-queue publish does the same to one in progress. Anything unfinished and
        untouched for longer than any retry wait (``orphan_after``) is queued again at start-up.
        If its item was only slow (a long backlog), the copy is dropped when it comes up: the
        claim sees the final status.
        """
        cutoff = now() - self.orphan_after()
        routes = {r.name for r in self.config.routes}
        stale = await self.store.write(self.store.sync.tx_take_orphans, cutoff)
        count = 0
        for txid, route in stale:
            if route in routes:
                await self.broker.publish(WorkItem(txid, route))
                count += 1
        if count:
            log.info("unfinished work queued again", count=count)

    def orphan_after(self) -> timedelta:
        """Longer than any delivery is left untouched while alive: a FIFO route touches its
        delivery at each failed attempt, a parked retry waits at most ``max_delay``."""
        longest = max((r.settings.retry.max_delay for r in self.config.routes), default=0.0)
        return max(ORPHAN_AFTER, timedelta(seconds=2 * longest + 60))

    async def _start_inbound(self) -> None:
        """Listeners and folders start after the workers, which take the work they hand on."""
        window = timedelta(hours=self.config.settings.duplicate_window_hours)
        for spec in self.config.inbound:
            engine_sink = EngineSink(self, window, spec.routes)
            sink: InboundSink = engine_sink
            if spec.ack_after in ("journal", "receipt"):
                applier = JournalApplier(engine_sink, self.store, spec.name)
                applier.start()  # before the listener: rows a crash left are applied first
                self.appliers.append(applier)
                sink = JournalingSink(engine_sink, applier, check=spec.ack_after == "journal")
            channel = self.plugins.inbound[spec.channel].open(spec.options, sink, spec.name)
            await channel.start()
            self.inbound.append(channel)

    async def _start_http(self) -> None:
        from medcourier.engine.api.app import create_asgi
        from medcourier.engine.api.http_protocol import BoundedHttpToolsProtocol

        http = self.config.settings.http
        cfg = uvicorn.Config(
            create_asgi(self),
            host=http.host,
            port=http.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            http=BoundedHttpToolsProtocol,  # httptools, not h11 (api/http_protocol.py)
        )
        self._server = _Server(cfg)
        self._server_task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._server_task.done():
                self._server_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)

    @property
    def http_port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        await self.pruner.stop()
        # Inbound first: nothing new is accepted while the rest shuts down.
        for channel in reversed(self.inbound):
            await channel.stop()
        for applier in self.appliers:  # what listeners journaled, while the queue is still up
            await applier.stop()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            await self._server_task
        self.control.close()  # workers held by a paused route give their items back
        await self.broker.close()
        for worker in self.workers.values():
            await worker.aclose()
        await asyncio.to_thread(self.store.close)
        log.info("engine stopped")

    def _accept(
        self, c: Connection, also: Callable[[Connection, str], object] | None, /, **document: Any
    ) -> None:
        self.store.sync.tx_accept_document(c, **document)
        if also is not None:
            also(c, document["transaction_id"])

    @rerunnable
    def _accept_alone(
        self, c: Connection, also: Callable[[Connection, str], object] | None, /, **document: Any
    ) -> None:
        """``_accept`` when ``also`` is None (an ``also`` may keep Python state: not rerunnable)."""
        assert also is None
        self.store.sync.tx_accept_document(c, **document)

    async def submit(self, req: SubmitRequest, default_title: Callable[[str], str]) -> str:
        """Store a document, queue one work item per matching route, return its transaction id."""
        if req.only_routes:
            routes = [r for r in self.config.routes if r.name in req.only_routes]
        else:
            routes = self.router.match(set(req.organizations))
        if not routes:
            raise NoRouteError(
                "No route delivers documents for this patient or encounter: the hospital "
                "(managingOrganization / serviceProvider) has no route and there is no fallback"
            )
        created: datetime = now()
        txid = ""
        for _ in range(5):
            txid = new_transaction_id()
            try:
                await self.store.write(
                    self._accept if req.also is not None else self._accept_alone,
                    req.also,
                    transaction_id=txid,
                    created_at=created,
                    content_type=req.content_type,
                    document_type=req.document_type,
                    title=req.title or default_title(txid),
                    sender_identifier=req.sender_identifier,
                    sender_application=req.sender_application,
                    patient_id=req.patient_id,
                    encounter_id=req.encounter_id,
                    payload=req.payload,
                    routes=[r.name for r in routes],
                )
                break
            except sqlalchemy.exc.IntegrityError:
                if await self.store.run(self.store.sync.transaction_exists, txid):
                    continue
                raise
        # Stored: the request (and its payload) is let go, while a worker may read it back.
        dedupe = req.dedupe
        del req
        for r in routes:
            # told before publishing: once queued, a worker may move it on at once
            self.plugins.hook.medcourier_status_changed(
                transaction_id=txid, route=r.name, old=None, new=Status.PREPARATION, reason=None
            )
        outcomes = await asyncio.gather(
            *(self.broker.publish(WorkItem(txid, r.name)) for r in routes),
            return_exceptions=True,
        )
        failed = []
        for r, error in zip(routes, outcomes, strict=True):
            if error is None:
                continue
            if not isinstance(error, BrokerError):
                raise error
            unqueued = await self.store.write(
                self.store.sync.tx_mark_unqueued, txid, r.name, f"not queued: {error}"
            )
            if unqueued:  # else a worker already took the item: it was queued after all
                failed.append((r, error))
        if len(failed) == len(routes):
            # Nothing was queued: the sender is told so and may send again.
            raise failed[0][1]
        # Some routes were queued: the document is accepted; the others show entered-in-error.
        if dedupe is not None:
            await self.store.write(self.store.sync.tx_remember, *dedupe, [txid])
        for r in routes:
            log.info("accepted", transaction_id=txid, route=r.name, status="preparation")
        return txid
