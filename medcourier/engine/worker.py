"""The per-route worker: take a delivery, render it, send it, record what the destination said.

One worker per route. A FIFO route (the default, as HL7 interfaces expect) sends one item at a
time: transient failures are retried in place with backoff while the item stays unacknowledged,
so the route is held and the order kept; a crash meanwhile hands the item back to the queue. A
parallel route has up to ``concurrency`` items in flight, one connection each, and parks a failed
attempt in a delay queue so the others go on. The last attempt dead-letters the item (see
docs/architecture.md, "Retries").

A FIFO route is pipelined (``Pipelined`` in engine/broker): the broker hands over up to
``FIFO_WINDOW`` items at once and ``begin`` takes them one at a time, in order, up to the send. The
items waiting behind are claimed in the same write as the one at the head (one transaction for
them all), and a finished delivery's status is written while the next ones are sent: the outcomes
waiting are written together (``_Outcomes``), and each item is acknowledged only once its status
is durable. Claimed ahead, a delivery shows ``in-progress`` while it waits behind the head (a
worker has taken it), as it does during its own retries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
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
from medcourier.engine.store import AsyncStore, Claim, StatusChange

log = structlog.get_logger("medcourier.worker")

# Below this payload size a render is cheaper than the thread hop that would offload it.
INLINE_RENDER_BYTES = 256 * 1024

# Items of a FIFO route taken from the queue at once: claimed together, sent one at a time, their
# statuses written together. It bounds the deliveries sent whose status is not durable yet.
FIFO_WINDOW = 32


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
        self.window = 1 if self.parallel else FIFO_WINDOW
        # Claims made ahead of their turn, by transaction id, with the very queue item each was
        # made for: a redelivered copy of that item is another object and claims afresh.
        self._ahead: dict[str, tuple[WorkItem, Claim]] = {}
        self._outcomes = _Outcomes(self)
        # What the broker is given (engine/broker: a plain handler, and ``Pipelined``).
        self.handle = _Handler(self)

    async def aclose(self) -> None:
        await self._outcomes.aclose()
        self._ahead.clear()
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

    async def begin(
        self, item: WorkItem, ahead: Sequence[WorkItem] = ()
    ) -> asyncio.Future[None] | None:
        """Deliver one queue item up to its outcome; returns the write of that outcome, which
        the item's acknowledgement waits for (None: nothing left to wait for). Raising puts the
        item back. ``ahead``: the items behind it, claimed with it when they can be."""
        txid = item.transaction_id
        if txid in self._handling:
            self.duplicates += 1
            log.info("copy of an item in hand dropped", transaction_id=txid, route=item.route)
            return None
        self._handling.add(txid)
        try:
            done = await self._begin(item, ahead)
        except BaseException:
            self._handling.discard(txid)
            raise
        if done is None:
            self._handling.discard(txid)
        else:
            done.add_done_callback(lambda _: self._handling.discard(txid))
        return done

    async def _begin(
        self, item: WorkItem, ahead: Sequence[WorkItem]
    ) -> asyncio.Future[None] | None:
        if await self.control.wait_if_paused(item.route):  # a paused route keeps its queue
            self._forget_ahead()
        claim = self._claimed_ahead(item, ahead)
        if claim is None:
            claim = await self._claim(item, ahead)
        if claim is None:
            log.warning(
                "unknown delivery dropped", transaction_id=item.transaction_id, route=item.route
            )
            return None
        if claim.document is None:
            self.duplicates += 1
            log.info(
                "already final, duplicate dropped",
                transaction_id=item.transaction_id,
                route=item.route,
                status=claim.previous.value,
            )
            return None
        # Handed over in a list that _process empties: no frame but its own keeps the document,
        # so a large payload is freed once rendered instead of staying for the whole delivery.
        # A streamed rendering (a large ORU) keeps the payload itself and no Base64 of it: the
        # payload is then the one copy in memory, its Base64 made a slice at a time as it is sent.
        held, replay_mode = [claim.document], claim.replay_mode
        del claim
        async with self._link() as sender:
            return await self._process(item, held, sender, replay_mode)

    def _forget_ahead(self) -> None:
        """Drop the claims made ahead: the items wait longer than a send (a pause, a retry), and
        would otherwise go with what was read at their claim (the patient as it was then, a
        replay asked for meanwhile unseen). Claimed again at their turn (in progress already:
        the attempt is counted, no history row)."""
        self._ahead.clear()

    def _claimed_ahead(self, item: WorkItem, ahead: Sequence[WorkItem]) -> Claim | None:
        """The claim made for this very item with an earlier one, if any. Claims made for items
        no longer waiting (their channel closed, they went back to the queue) are dropped."""
        entry = self._ahead.pop(item.transaction_id, None)
        if self._ahead:
            waiting = {id(a) for a in ahead}
            for txid, (made_for, _) in list(self._ahead.items()):
                if id(made_for) not in waiting:
                    del self._ahead[txid]
        if entry is None or entry[0] is not item:
            return None
        return entry[1]

    async def _claim(self, item: WorkItem, ahead: Sequence[WorkItem]) -> Claim | None:
        """Claim the item, and with it (one write) the items waiting behind it on a FIFO route."""
        others: dict[str, WorkItem] = {}
        if self.window > 1:
            for a in ahead:
                txid = a.transaction_id
                if (
                    a.route == item.route
                    and txid != item.transaction_id
                    and txid not in others
                    and txid not in self._handling
                    and txid not in self._ahead
                ):
                    others[txid] = a
                    if len(others) >= self.window - 1:
                        break
        claim, more = await self.store.write(
            self.store.sync.tx_claim_batch, item.route, item.transaction_id, list(others)
        )
        if claim is not None:
            self._took(item, claim)
        for txid, got in more.items():
            self._ahead[txid] = (others[txid], got)
            self._took(others[txid], got)
        return claim

    def _took(self, item: WorkItem, claim: Claim) -> None:
        """Say what a claim changed (the store has it now)."""
        if claim.document is None:
            return  # final: dropped when its turn comes
        if claim.previous == Status.IN_PROGRESS and item.attempt == 1:
            log.warning(
                "redelivered after an interruption",
                transaction_id=item.transaction_id,
                route=item.route,
            )
        elif claim.previous != Status.IN_PROGRESS:
            self._changed(item.transaction_id, claim.previous, Status.IN_PROGRESS, None)

    async def _process(
        self, item: WorkItem, held: list[Document], sender: Sender, replay_mode: str | None
    ) -> asyncio.Future[None] | None:
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
            return None
        if not await self._precheck(item, document, sender):
            return None
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
            return None
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
            return None
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
        # While outcomes cannot be written, nothing more is sent: a crash would send again all
        # that was sent meanwhile.
        await self._outcomes.writable()
        result = await self._with_retries(item, "delivery", lambda: sender.deliver(rendered))
        if result is None:
            return None
        if result.outcome is Outcome.ACCEPTED:
            ack = result.detail.get("ack_code")
            reason = result.reason or (f"delivered, acknowledged {ack}" if ack else "delivered")
            return self._outcomes.add(item, Status.COMPLETED, reason, now())
        return self._outcomes.add(item, Status.ENTERED_IN_ERROR, result.reason)

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
            self._forget_ahead()
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


class _Handler:
    """The worker as the broker takes it: a plain handler (``__call__``: the whole delivery,
    acknowledged when it returns) and, on a FIFO route, ``Pipelined`` (engine/broker)."""

    def __init__(self, worker: RouteWorker) -> None:
        self.worker = worker
        self.window = worker.window

    async def __call__(self, item: WorkItem) -> None:
        done = await self.worker.begin(item)
        if done is not None:
            await done

    async def begin(self, item: WorkItem, ahead: Sequence[WorkItem]) -> asyncio.Future[None] | None:
        return await self.worker.begin(item, ahead)


class _Outcomes:
    """What the destination answered, written for the deliveries waiting in one write.

    ``add`` returns a future settled once the outcome is durable; meanwhile the route sends the
    next documents, and outcomes added during a write go together in the next one. A failing
    write is retried with backoff, with what came meanwhile, until it lands: the destination
    has the messages, and failing would hand the items back to the queue and send them again.
    """

    def __init__(self, worker: RouteWorker) -> None:
        self.worker = worker
        self.waiting: list[tuple[WorkItem, StatusChange, asyncio.Future[None]]] = []
        self.task: asyncio.Task[None] | None = None
        self._ok = asyncio.Event()
        self._ok.set()

    def add(
        self, item: WorkItem, status: Status, reason: str | None, sent_at: datetime | None = None
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.waiting.append(
            (item, StatusChange(item.transaction_id, status, reason, sent_at), future)
        )
        if self.task is None:
            self.task = loop.create_task(self._write())
        return future

    async def writable(self) -> None:
        """Return at once, unless outcomes cannot be written right now: then once they can."""
        if not self._ok.is_set():
            await self._ok.wait()

    async def _write(self) -> None:
        store, route = self.worker.store, self.worker.route.name
        delay = 0.1
        batch: list[tuple[WorkItem, StatusChange, asyncio.Future[None]]] = []
        try:
            while self.waiting or batch:
                batch, self.waiting = batch + self.waiting, []
                try:
                    previous = await store.write(
                        store.sync.tx_set_statuses, route, [change for _, change, _ in batch]
                    )
                except Exception as exc:
                    self._ok.clear()
                    log.warning(
                        "status write failed, retrying",
                        route=route,
                        count=len(batch),
                        error=type(exc).__name__,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                self._ok.set()
                delay = 0.1
                done, batch = batch, []
                for (item, change, future), old in zip(done, previous, strict=True):
                    try:
                        self.worker._changed(item.transaction_id, old, change.status, change.reason)
                    except Exception as exc:  # a plugin's hook: the status is durable anyway
                        log.error(
                            "status hook failed",
                            transaction_id=item.transaction_id,
                            route=route,
                            error=type(exc).__name__,
                        )
                    if not future.done():
                        future.set_result(None)
        finally:
            self.task = None
            self._ok.set()
            for _, _, future in batch + self.waiting:  # cancelled: these are not durable
                future.cancel()
            self.waiting = []

    async def aclose(self, timeout: float = 10.0) -> None:
        """Let the outcomes waiting be written (``timeout``), then give up on them."""
        task = self.task
        if task is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
