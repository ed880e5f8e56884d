"""The per-route worker: take a delivery, render it, send it, record what the destination said.

One worker per route. A FIFO route (the default, as HL7 interfaces expect) has one item in flight:
transient failures are retried in place with backoff while the item stays unacknowledged, so the
route is held and the order kept; a crash meanwhile hands the item back to the queue. A parallel
route has up to ``concurrency`` items in flight, one connection each, and parks a failed attempt
in a delay queue so the others go on. The last attempt dead-letters the item (see
docs/architecture.md, "Retries").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from medcourier.engine.admin import NO_RENDERING, RESEND, replay_of, tx_keep_rendering
from medcourier.engine.broker import Broker, WorkItem
from medcourier.engine.clock import now
from medcourier.engine.config import Route
from medcourier.engine.control import RouteControl
from medcourier.engine.errors import BrokerError, RenderError
from medcourier.engine.model import DeliveryResult, Document, Outcome, Rendered, Status
from medcourier.engine.plugins import FormatType, Plugins, Sender
from medcourier.engine.store import AsyncStore

log = structlog.get_logger("medcourier.worker")

# Below this payload size a render is cheaper than the thread hop that would offload it.
INLINE_RENDER_BYTES = 256 * 1024


class RouteWorker:
    def __init__(
        self,
        route: Route,
        plugins: Plugins,
        store: AsyncStore,
        broker: Broker | None = None,
        control: RouteControl | None = None,
    ) -> None:
        self.route = route
        self.plugins = plugins
        self.store = store
        self.broker = broker
        # Pause and resume (engine/control.py); without one, the route is never paused.
        self.control = control if control is not None else RouteControl(None)
        self.format: FormatType = plugins.formats[route.settings.format]
        connector = plugins.connectors[str(route.settings.deliver["connector"])]
        # One live link per delivery in flight: a FIFO route has one, a parallel route one per
        # unit of concurrency (an MLLP connection carries one message at a time).
        self.parallel = route.settings.ordering == "parallel"
        self._senders: list[Sender] = [
            connector.open(route.deliver_options) for _ in range(route.settings.concurrency)
        ]
        self._idle: asyncio.Queue[Sender] = asyncio.Queue()
        for sender in self._senders:
            self._idle.put_nowait(sender)
        self.duplicates = 0
        # Transactions being handled here: a second copy of an item (a re-queued orphan landing
        # within a parallel route's window) is dropped instead of delivered alongside.
        self._handling: set[str] = set()

    async def aclose(self) -> None:
        for sender in self._senders:
            await sender.aclose()

    @contextlib.asynccontextmanager
    async def _link(self) -> AsyncIterator[Sender]:
        sender = await self._idle.get()
        try:
            yield sender
        finally:
            self._idle.put_nowait(sender)

    async def set_status(
        self, item: WorkItem, status: Status, reason: str | None = None, **kw: Any
    ) -> None:
        old = await self.store.write(
            self.store.sync.tx_set_status, item.transaction_id, item.route, status, reason, **kw
        )
        self._changed(item.transaction_id, old, status, reason)

    def _changed(self, txid: str, old: Status | None, new: Status, reason: str | None) -> None:
        log.info(
            "status",
            transaction_id=txid,
            route=self.route.name,
            status=new.value,
            previous=old.value if old else None,
        )
        self.plugins.hook.medcourier_status_changed(
            transaction_id=txid, route=self.route.name, old=old, new=new, reason=reason
        )

    async def handle(self, item: WorkItem) -> None:
        """Deliver one queue item; returning acknowledges it, raising puts it back."""
        if item.transaction_id in self._handling:
            self.duplicates += 1
            log.info(
                "copy of an item in hand dropped",
                transaction_id=item.transaction_id,
                route=item.route,
            )
            return
        self._handling.add(item.transaction_id)
        try:
            await self._handle(item)
        finally:
            self._handling.discard(item.transaction_id)

    async def _handle(self, item: WorkItem) -> None:
        await self.control.wait_if_paused(item.route)  # a paused route keeps its queue
        claim = await self.store.write(self.store.sync.tx_claim, item.transaction_id, item.route)
        if claim is None:
            log.warning(
                "unknown delivery dropped", transaction_id=item.transaction_id, route=item.route
            )
            return
        if claim.document is None:
            self.duplicates += 1
            log.info(
                "already final, duplicate dropped",
                transaction_id=item.transaction_id,
                route=item.route,
                status=claim.previous.value,
            )
            return
        if claim.previous == Status.IN_PROGRESS and item.attempt == 1:
            log.warning(
                "redelivered after an interruption",
                transaction_id=item.transaction_id,
                route=item.route,
            )
        elif claim.previous != Status.IN_PROGRESS:
            self._changed(item.transaction_id, claim.previous, Status.IN_PROGRESS, None)
        # Handed over in a list that _process empties: no frame but its own keeps the document,
        # so a large payload is freed once rendered instead of staying for the whole delivery.
        # A streamed rendering (a large ORU) keeps the payload itself and no Base64 of it: the
        # payload is then the one copy in memory, its Base64 made a slice at a time as it is sent.
        held, replay_mode = [claim.document], claim.replay_mode
        del claim
        async with self._link() as sender:
            await self._process(item, held, sender, replay_mode)

    async def _process(
        self, item: WorkItem, held: list[Document], sender: Sender, replay_mode: str | None
    ) -> None:
        document = held.pop()
        try:
            problems = self._validate(document)
        except Exception as exc:
            log.error(
                "validation crashed",
                transaction_id=item.transaction_id,
                route=item.route,
                error=type(exc).__name__,
            )
            problems = [f"validation failed: internal error ({type(exc).__name__})"]
        if problems:
            await self.set_status(item, Status.ENTERED_IN_ERROR, "; ".join(problems))
            return
        if not await self._precheck(item, document, sender):
            return
        # A replay may ask to resend the rendering stored when the delivery was last rendered.
        stored = None
        if replay_mode == RESEND:
            replay_mode, stored = await self.store.run(
                replay_of, self.store.sync, item.transaction_id, item.route
            )
        if replay_mode == RESEND and stored is None:  # pruned since the replay was asked
            await self.set_status(item, Status.IN_PROGRESS, NO_RENDERING)
        try:
            if stored is not None:
                rendered = stored
            elif len(document.payload) > INLINE_RENDER_BYTES:
                # Base64-encoding megabytes would stall the event loop: do it on a thread.
                rendered = await asyncio.to_thread(
                    self.format.render, document, self.route.format_options
                )
            else:
                # Small documents render in tens of microseconds; a thread hop costs more.
                rendered = self.format.render(document, self.route.format_options)
        except RenderError as exc:
            await self.set_status(item, Status.ENTERED_IN_ERROR, f"render failed: {exc}")
            return
        except Exception as exc:
            # A format bug on some input must not hold the route for ever (the item would come
            # back first, again and again): the document ends entered-in-error, the route goes
            # on. Only the type is kept: a bug's message may quote patient data.
            log.error(
                "render crashed",
                transaction_id=item.transaction_id,
                route=item.route,
                error=type(exc).__name__,
            )
            await self.set_status(
                item,
                Status.ENTERED_IN_ERROR,
                f"render failed: internal error ({type(exc).__name__})",
            )
            return
        del document  # only the rendering is needed from here on
        if rendered.streamed:  # large documents only: no coroutine call for the others
            await self._whole_unless_streamed(sender, rendered)
        if stored is not None:
            log.info(
                "resending the stored rendering",
                transaction_id=item.transaction_id,
                route=item.route,
            )
        elif self.route.settings.keep_renderings:
            await self.store.write(tx_keep_rendering, item.transaction_id, item.route, rendered)
        result = await self._with_retries(item, "delivery", lambda: sender.deliver(rendered))
        if result is None:
            return
        if result.outcome is Outcome.ACCEPTED:
            ack = result.detail.get("ack_code")
            reason = result.reason or (f"delivered, acknowledged {ack}" if ack else "delivered")
            await self._record_outcome(item, Status.COMPLETED, reason, sent_at=now())
        else:
            await self._record_outcome(item, Status.ENTERED_IN_ERROR, result.reason)

    @staticmethod
    async def _whole_unless_streamed(sender: Sender, rendered: Rendered) -> None:
        """Build a streamed rendering's bytes on a thread when the connector needs them whole.

        A format renders a large document in parts (the ORU's Base64 is made as it is sent), which
        keeps one copy of the payload in memory for a connector that writes as it goes: such a
        connector says so with ``streams_renderings = True`` (MLLP). Any other reads
        ``rendered.data``, and building megabytes of Base64 there, on the event loop, would stall
        it: it is built here on a thread, as the whole rendering was before formats streamed.
        """
        if not getattr(sender, "streams_renderings", False):
            await asyncio.to_thread(lambda: rendered.data)

    async def _precheck(self, item: WorkItem, document: Document, sender: Sender) -> bool:
        """Ask the destination whether it can take this document at all, before rendering.

        Some destinations have a precondition of their own (the DMP must be open for the
        patient): a connector that has one offers ``precheck``. A refusal ends the delivery
        with the destination's reason; an unreachable destination is retried like a delivery.
        """
        precheck = getattr(sender, "precheck", None)
        if precheck is None:
            return True
        result = await self._with_retries(item, "precheck", lambda: precheck(document))
        if result is None:
            return False
        if result.outcome is Outcome.REJECTED:
            await self.set_status(item, Status.ENTERED_IN_ERROR, result.reason)
            return False
        return True

    async def _with_retries(
        self,
        item: WorkItem,
        step: str,
        call: Callable[[], Awaitable[DeliveryResult]],
    ) -> DeliveryResult | None:
        """Call ``call`` until it answers accepted or rejected, per the route's retry policy.

        A FIFO route waits here, holding the route: the next document must not overtake this
        one. A parallel route parks the item in a delay queue and frees its slot (the others go
        on); the item comes back with its attempt number. After the last attempt the item goes
        to the dead-letter queue and the delivery ends entered-in-error; every failed attempt's
        reason is in the history. Returns None when the attempt is over for this item.
        """
        retry = self.route.settings.retry
        attempt = item.attempt
        while True:
            result = await call()
            if result.outcome is not Outcome.RETRY:
                return result
            if attempt >= retry.max_attempts:
                await self._give_up(item, attempt, result.reason)
                return None
            delay = retry.delay(attempt)
            await self.set_status(
                item,
                Status.IN_PROGRESS,
                f"attempt {attempt} failed: {result.reason}; next in {delay:.3g}s",
            )
            log.warning(
                f"{step} will be retried",
                transaction_id=item.transaction_id,
                route=item.route,
                attempt=attempt,
                delay=delay,
            )
            if self.parallel and self.broker is not None:
                later = WorkItem(item.transaction_id, item.route, attempt + 1)
                try:
                    await self.broker.publish_later(later, delay)
                    return None
                except BrokerError as exc:  # the queue is away: wait here instead
                    log.warning("delay queue unavailable", route=item.route, error=str(exc))
            await asyncio.sleep(delay)
            attempt += 1

    async def _give_up(self, item: WorkItem, attempts: int, reason: str | None) -> None:
        if self.broker is not None:
            try:
                await self.broker.dead_letter(
                    WorkItem(item.transaction_id, item.route, attempts), reason or ""
                )
            except BrokerError as exc:
                # The store still says entered-in-error with the whole history; only the
                # operator's queue copy is missing.
                log.error("dead-letter publish failed", route=item.route, error=str(exc))
        await self.set_status(
            item,
            Status.ENTERED_IN_ERROR,
            f"gave up after {attempts} attempts: {reason}",
        )

    async def _record_outcome(
        self, item: WorkItem, status: Status, reason: str | None, **kw: Any
    ) -> None:
        """Record what the destination answered, retrying the write until it lands.

        The destination has the message now: failing here would hand the item back to the queue
        and send it a second time, so a store hiccup is waited out instead.
        """
        delay = 0.1
        while True:
            try:
                await self.set_status(item, status, reason, **kw)
                return
            except Exception as exc:
                log.warning(
                    "status write failed, retrying",
                    transaction_id=item.transaction_id,
                    route=item.route,
                    error=type(exc).__name__,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _validate(self, document: Document) -> list[str]:
        issues = []
        if self.format.validate is not None:
            issues.extend(self.format.validate(document, self.route.format_options))
        for found in self.plugins.hook.medcourier_validate(
            document=document,
            route=self.route.name,
            options=self.route.settings.validate_options,
        ):
            issues.extend(found or [])
        return [i.message for i in issues if i.severity in ("error", "fatal")]
