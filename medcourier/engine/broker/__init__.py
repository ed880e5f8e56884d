"""Durable work queues, one per route, behind one small interface.

The queue carries a claim check (``WorkItem``: transaction id, route, attempt), never the payload:
documents live in the store. Two implementations:

- ``amqp://`` — RabbitMQ through pika's asyncio connection on the engine's event loop. Publisher
  confirms are pipelined: every publish registers a future for its delivery tag and many are in
  flight at once, so concurrent senders are answered as their confirms arrive instead of paying one
  round trip each (the ~890/s ceiling measured in ARCHITECTURE.md).
- ``sqlite://`` (the embedded default) — the route queues of the process that consumes them in
  its memory, and kombu's SQLAlchemy tables in a SQLite file under the data directory for what
  another process queues and for dead letters (broker/embedded.py: the store is the durable
  record there, and start-up rebuilds the queues from it).

Queue and exchange names are prefixed by the engine's instance name so several engines (and test
runs) share one broker without taking each other's work.

A FIFO route whose handler is ``Pipelined`` (the route worker, engine/worker.py) is consumed with
a window: up to ``window`` items are taken from the queue at once, and ``run_pipeline`` begins
them one at a time, in order; each is acknowledged once what its ``begin`` left to do (the status
write) is done, while the next ones are already being sent.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from medcourier.engine.errors import BrokerError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One unit of work on a route queue: deliver ``transaction_id`` to ``route``."""

    transaction_id: str
    route: str
    attempt: int = 1

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkItem:
        raw = json.loads(data)
        return cls(str(raw["transaction_id"]), str(raw["route"]), int(raw.get("attempt", 1)))


Handler = Callable[[WorkItem], Awaitable[None]]


@runtime_checkable
class Pipelined(Protocol):
    """A handler that can take a FIFO route's items in two steps.

    ``begin`` does what must keep the queue's order (for the route worker: claim, render, send)
    and returns what is left to wait for before the item may be acknowledged (its status write),
    or None when nothing is. ``ahead`` are the items already taken from the queue behind this
    one, in order: the very objects that ``begin`` will be given later, so work done for them in
    advance (claims) can be told apart from a redelivered copy. Raising retries the same item in
    place, as a plain handler's failure does. Called as a plain handler it does both steps.
    """

    window: int

    async def __call__(self, item: WorkItem) -> None: ...

    async def begin(self, item: WorkItem, ahead: Sequence[WorkItem]) -> Awaitable[None] | None: ...


def pipeline_of(handler: Handler, prefetch: int) -> Pipelined | None:
    """The handler as a pipeline when a FIFO route (``prefetch`` 1) should be consumed so."""
    if prefetch <= 1 and isinstance(handler, Pipelined) and handler.window > 1:
        return handler
    return None


class Lane:
    """A pipelined FIFO route's items taken from the queue and not begun yet, in queue order,
    each with the broker's token for it (delivery tag, kombu message)."""

    def __init__(self) -> None:
        self.waiting: deque[tuple[Any, WorkItem]] = deque()
        self.closed = False
        self._wake = asyncio.Event()

    def put(self, token: Any, item: WorkItem) -> None:
        self.waiting.append((token, item))
        self._wake.set()

    def close(self) -> None:
        """No more items are begun; those waiting stay unacknowledged (given back)."""
        self.closed = True
        self._wake.set()

    def ahead(self) -> list[WorkItem]:
        return [item for _, item in self.waiting]

    async def next(self) -> tuple[Any, WorkItem] | None:
        while not self.waiting and not self.closed:
            self._wake.clear()
            await self._wake.wait()
        return None if self.closed else self.waiting.popleft()


async def run_pipeline(
    route: str,
    pipeline: Pipelined,
    lane: Lane,
    settle: Callable[[Any, bool], None],
    track: Callable[[asyncio.Task[None]], None],
    requeue_delay: float,
) -> None:
    """Begin the lane's items one at a time, in order, until it is closed.

    A ``begin`` that raises is called again for the same item after ``requeue_delay`` (the item
    keeps its place, the ones behind it wait). ``settle(token, True)`` acknowledges an item once
    what its ``begin`` returned is done; ``settle(token, False)`` is said when that failed (the
    item stays unacknowledged). ``track`` is given each such wait, so closing can wait for it.
    """
    while True:
        entry = await lane.next()
        if entry is None:
            return
        token, item = entry
        while True:
            try:
                done = await pipeline.begin(item, lane.ahead())
                break
            except Exception as exc:
                log.warning(
                    "broker.handler_failed",
                    route=route,
                    transaction_id=item.transaction_id,
                    error=type(exc).__name__,
                )
                await asyncio.sleep(requeue_delay)
                if lane.closed:
                    return
            except BaseException:
                # Not a failure the contract knows (a cancellation, an exception group): the
                # pipeline ends, and the item goes back to the head of what it had not begun.
                lane.waiting.appendleft(entry)
                raise
        if done is None:
            settle(token, True)
        else:
            track(asyncio.get_running_loop().create_task(_settle_when(done, token, settle)))


async def _settle_when(
    done: Awaitable[None], token: Any, settle: Callable[[Any, bool], None]
) -> None:
    try:
        await done
    except asyncio.CancelledError:
        settle(token, False)
        raise
    except Exception as exc:
        log.warning("broker.completion_failed", error=type(exc).__name__)
        settle(token, False)
        return
    settle(token, True)


class Broker(Protocol):
    """What the engine needs of a queue.

    Consumption contract: ``handler`` returning normally acknowledges the item; raising retries
    it in place (the item keeps its place). A FIFO route has one item in flight at a time, and
    one consuming process at a time across engines; a parallel route up to ``prefetch``. A FIFO
    route whose handler is ``Pipelined`` has up to its ``window`` taken from the queue, begun one
    at a time in order (``run_pipeline``), each acknowledged once its ``begin``'s rest is done.
    """

    async def start(self, routes: list[str], parallel: Collection[str] = ()) -> None:
        """Connect and declare the durable queues of ``routes`` (``parallel``: not FIFO)."""

    async def publish(self, item: WorkItem) -> None:
        """Return once the item is queued (RabbitMQ: confirmed; embedded: in memory, or
        committed to the file by a process that does not consume the route); raise BrokerError
        otherwise."""

    async def publish_later(self, item: WorkItem, delay: float) -> None:
        """Queue ``item`` on its route after ``delay`` seconds (a retry's wait)."""

    async def dead_letter(self, item: WorkItem, reason: str) -> None:
        """Put ``item`` on its route's dead-letter queue, for an operator to look at."""

    async def consume(self, route: str, handler: Handler, prefetch: int = 1) -> None:
        """Start delivering the route's items to ``handler`` (returns once the consumer runs)."""

    async def purge(self, route: str) -> int:
        """Drop every item of the route's queue; returns how many were dropped."""

    async def close(self) -> None:
        """Stop consumers and disconnect; unacknowledged items go back to their queues
        (RabbitMQ), or to the store's next rebuild (embedded)."""


def queue_name(instance: str, route: str) -> str:
    return f"{instance}.route.{route}"


def dead_letter_queue_name(instance: str, route: str) -> str:
    return f"{queue_name(instance, route)}.dead"


def delay_bucket_ms(delay: float) -> int:
    """The delay queue a wait goes to: waits are grouped in bands a quarter wide (in ms).

    RabbitMQ expires messages only at the head of a queue, so a short wait queued behind a long
    one would wait for it: grouping waits of nearly the same length bounds that to the band's
    width, with a few queues per route.
    """
    ms = max(1, int(delay * 1000))
    bucket = 1
    while bucket * 1.25 <= ms:
        bucket = max(bucket + 1, int(bucket * 1.25))
    return bucket


def exchange_name(instance: str) -> str:
    return f"{instance}.routes"


def _scheme(url: str) -> str:
    spec = url.strip()
    return spec.partition(":")[0].lower() if ":" in spec else spec.lower()


def is_amqp_url(url: str) -> bool:
    """Whether ``open_broker`` opens RabbitMQ for this URL (the scheme in any case)."""
    return _scheme(url) in ("amqp", "amqps")


def open_broker(url: str, instance: str, data_dir: Path, *, quorum: bool = False) -> Broker:
    """Build the broker a configured URL names (not started yet: call ``start``).

    - ``amqp://…`` / ``amqps://…`` → RabbitMQ (``AmqpBroker``); ``//`` or ``/%2F`` name vhost ``/``.
    - empty, ``embedded:`` or ``sqlite://`` → the embedded queue at ``data_dir/queue.sqlite``;
      ``sqlite:///some/file.sqlite`` names the file (a relative path is taken under ``data_dir``,
      ``sqlite:////abs/file.sqlite`` is absolute).

    Implementations are imported here, lazily, so an engine using one never imports the other's
    client library.
    """
    spec = url.strip()
    scheme = _scheme(spec)
    if is_amqp_url(spec):
        from medcourier.engine.broker.amqp import AmqpBroker

        return AmqpBroker(spec, instance, quorum=quorum)
    if scheme in ("", "embedded", "sqlite"):
        from medcourier.engine.broker.embedded import EmbeddedBroker

        path = data_dir / "queue.sqlite"
        if scheme == "sqlite":
            rest = spec[len("sqlite:") :]
            if not rest.startswith("//"):
                raise BrokerError(
                    f"invalid queue URL {url!r}: write sqlite:///path/to/queue.sqlite"
                )
            file = rest[len("//") :]
            file = file[1:] if file.startswith("/") else file
            if file:
                path = Path(file) if Path(file).is_absolute() else data_dir / file
        elif scheme == "embedded" and spec.partition(":")[2].strip():
            raise BrokerError(f"invalid queue URL {url!r}: 'embedded:' takes no path")
        return EmbeddedBroker(path, instance)
    raise BrokerError(
        f"unsupported queue URL {url!r}: use amqp://user:pass@host:5672/vhost (RabbitMQ), "
        "amqps://… (RabbitMQ over TLS), sqlite:///path or embedded: (local SQLite queue)"
    )
