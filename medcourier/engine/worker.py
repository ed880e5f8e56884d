"""The per-route worker: take a delivery, render it, send it, record what the destination said.

One worker per route, fed one queue item at a time (FIFO per destination, as HL7 interfaces
expect). Transient failures are retried in place with backoff while the item stays unacknowledged,
so the route is held and the order kept; a crash meanwhile hands the item back to the queue. The
full policy (delay queues, dead letters, parallel routes) is the reliability issue's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from medcourier.engine.broker import WorkItem
from medcourier.engine.clock import now
from medcourier.engine.config import Route
from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document, Outcome, Status
from medcourier.engine.plugins import FormatType, Plugins, Sender
from medcourier.engine.store import AsyncStore

log = structlog.get_logger("medcourier.worker")

# Below this payload size a render is cheaper than the thread hop that would offload it.
INLINE_RENDER_BYTES = 256 * 1024


class RouteWorker:
    def __init__(self, route: Route, plugins: Plugins, store: AsyncStore) -> None:
        self.route = route
        self.plugins = plugins
        self.store = store
        self.format: FormatType = plugins.formats[route.settings.format]
        connector = plugins.connectors[str(route.settings.deliver["connector"])]
        self.sender: Sender = connector.open(route.deliver_options)
        self.duplicates = 0

    async def aclose(self) -> None:
        await self.sender.aclose()

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
        if claim.previous == Status.IN_PROGRESS:
            log.warning(
                "redelivered after an interruption",
                transaction_id=item.transaction_id,
                route=item.route,
            )
        else:
            self._changed(item.transaction_id, claim.previous, Status.IN_PROGRESS, None)
        await self._process(item, claim.document)

    async def _process(self, item: WorkItem, document: Document) -> None:
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
        try:
            if len(document.payload) > INLINE_RENDER_BYTES:
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
        retry = self.route.settings.retry
        attempt = 1
        while True:
            result = await self.sender.deliver(rendered)
            if result.outcome is Outcome.ACCEPTED:
                ack = result.detail.get("ack_code")
                reason = result.reason or (f"delivered, acknowledged {ack}" if ack else "delivered")
                await self._record_outcome(item, Status.COMPLETED, reason, sent_at=now())
                return
            if result.outcome is Outcome.REJECTED:
                await self._record_outcome(item, Status.ENTERED_IN_ERROR, result.reason)
                return
            if attempt >= retry.max_attempts:
                await self.set_status(
                    item,
                    Status.ENTERED_IN_ERROR,
                    f"gave up after {attempt} attempts: {result.reason}",
                )
                return
            delay = retry.delay(attempt)
            await self.set_status(
                item,
                Status.IN_PROGRESS,
                f"attempt {attempt} failed: {result.reason}; next in {delay:g}s",
            )
            log.warning(
                "delivery will be retried",
                transaction_id=item.transaction_id,
                route=item.route,
                attempt=attempt,
                delay=delay,
            )
            await asyncio.sleep(delay)
            attempt += 1

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
