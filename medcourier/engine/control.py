"""Pausing and resuming a route: the state lives in the store, so every engine sharing it obeys.

A paused route keeps its queue: the route's worker holds the next item before claiming it (the
delivery stays ``preparation``, nothing is sent) and lets it go once the route is resumed, so the
queue's order is kept. An item already being delivered (retries included) finishes first.

The state is one row per route in ``route_state``. ``RouteControl`` keeps a copy of all rows,
read again at most every ``refresh_seconds``: a worker asks at every item, and asking costs a
dictionary look-up, not a query. A pause made through this process's API takes effect at once;
one made by another process (``medcourier pause``, another engine) within ``refresh_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from medcourier.engine.clock import now
from medcourier.engine.model import Status
from medcourier.engine.schema import deliveries, route_state
from medcourier.engine.store import AsyncStore

log = structlog.get_logger("medcourier.control")


class ControlClosed(Exception):
    """The engine is stopping: a held item goes back to its queue, unacknowledged."""


@dataclass(frozen=True)
class RouteState:
    route: str
    paused: bool
    reason: str | None
    changed_at: datetime
    changed_by: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "since": self.changed_at.isoformat(timespec="milliseconds"),
            "reason": self.reason,
            "changed_by": self.changed_by,
        }


def _state(row: Any) -> RouteState:
    at = row.changed_at
    if at.tzinfo is None:  # SQLite hands back naive datetimes; everything written is UTC
        at = at.replace(tzinfo=UTC)
    return RouteState(row.route, bool(row.paused), row.reason, at, row.changed_by)


def read_route_states(c: Connection) -> dict[str, RouteState]:
    """Every route that was ever paused or resumed, by name."""
    return {r.route: _state(r) for r in c.execute(sa.select(route_state))}


def tx_set_route_state(
    c: Connection, route: str, paused: bool, reason: str | None, changed_by: str
) -> RouteState:
    """Pause or resume ``route`` (an upsert of its row); returns the new state."""
    state = RouteState(route, paused, reason, now(), changed_by)
    changes = {
        "paused": paused,
        "reason": reason,
        "changed_at": state.changed_at,
        "changed_by": changed_by,
    }
    insert = postgresql.insert if c.dialect.name == "postgresql" else sqlite.insert
    statement = insert(route_state).values(route=route, **changes)
    c.execute(statement.on_conflict_do_update(index_elements=[route_state.c.route], set_=changes))
    return state


def queued_counts(c: Connection) -> dict[str, dict[str, int]]:
    """Per route, how many deliveries wait (preparation) or are being worked on (in-progress)."""
    q = (
        sa.select(deliveries.c.route, deliveries.c.status, sa.func.count())
        .where(deliveries.c.status.in_([Status.PREPARATION.value, Status.IN_PROGRESS.value]))
        .group_by(deliveries.c.route, deliveries.c.status)
    )
    out: dict[str, dict[str, int]] = {}
    for route, status, count in c.execute(q):
        out.setdefault(route, {})[status] = int(count)
    return out


class RouteControl:
    """Whether a route is paused, as the store says, for the workers of one engine.

    Built without a store it never pauses anything (a worker used on its own, in tests).
    """

    def __init__(
        self,
        store: AsyncStore | None,
        *,
        refresh_seconds: float = 0.5,
        poll_seconds: float = 0.5,
    ) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.poll_seconds = poll_seconds
        self._states: dict[str, RouteState] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()
        self._closed = asyncio.Event()

    async def wait_if_paused(self, route: str) -> bool:
        """Return at once unless ``route`` is paused; otherwise hold until it is resumed.
        True when it held.

        Raises ``ControlClosed`` when the engine stops meanwhile, so the item is not acknowledged
        and stays on its queue.
        """
        if self.store is None:
            return False
        state = (await self.states()).get(route)
        if state is None or not state.paused:
            return False
        log.warning(
            "route paused: holding its queue",
            route=route,
            reason=state.reason,
            by=state.changed_by,
        )
        while state is not None and state.paused:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.poll_seconds)
            if self._closed.is_set():
                raise ControlClosed(f"the engine is stopping while route {route} is paused")
            state = (await self.states()).get(route)
        log.info("route resumed: releasing its queue", route=route)
        return True

    async def states(self) -> Mapping[str, RouteState]:
        """Every route's state, read from the store at most every ``refresh_seconds``."""
        if self.store is None:
            return {}
        if time.monotonic() - self._read_at < self.refresh_seconds:
            return self._states
        async with self._lock:
            if time.monotonic() - self._read_at >= self.refresh_seconds:
                store = self.store
                self._states = await store.run(_read_all, store)
                self._read_at = time.monotonic()
        return self._states

    async def set(self, route: str, paused: bool, reason: str | None, by: str) -> RouteState:
        """Pause or resume a route in the store; this engine's workers see it at once."""
        if self.store is None:
            raise RuntimeError("this RouteControl has no store")
        async with self._lock:  # not overtaken by a refresh that read before this write
            state = await self.store.write(tx_set_route_state, route, paused, reason, by)
            self._states = {**self._states, route: state}
        log.info("route paused" if paused else "route resumed", route=route, reason=reason, by=by)
        return state

    def close(self) -> None:
        """Release the held workers (they raise ``ControlClosed``): the engine is stopping."""
        self._closed.set()


def _read_all(store: AsyncStore) -> dict[str, RouteState]:
    with store.sync.engine.connect() as c:
        return read_route_states(c)
