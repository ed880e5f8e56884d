"""Operator actions on deliveries: replay and cancel, and the renderings a replay can resend.

The command line (engine/admin_cli.py) and the API (engine/api/admin.py) both go through these
functions, so the selection, the refusals and the history written are the same either way.

Replay
    ``plan_replay`` selects deliveries by transaction id, route, status and a window on the
    document's ``created_at``, and refuses the whole request (nothing changed) when a selected
    delivery is in-progress (unless forced: a worker may be delivering it right now) or belongs
    to a route the configuration no longer has. ``apply_replay`` then, in one transaction, puts
    each delivery back to ``preparation`` with the reason ``replay requested (<mode>, by <who>)``
    in the status history and the mode in ``deliveries.replay_mode``, and queues one work item
    per delivery, oldest document first, awaiting each confirm.

    ``resend`` sends the rendering stored when the delivery was last rendered (routes with
    ``keep_renderings: true``) byte for byte; ``rerender`` renders the document again with the
    directory and the configuration of now. A delivery asked to ``resend`` that has no stored
    rendering falls back to ``rerender`` at selection time: the plan (and ``--dry-run``) shows it
    and the history says so. Should the rendering be gone by the time the worker takes the
    delivery (pruned meanwhile), the worker renders again and notes that in the history too.

Cancel
    ``tx_cancel`` ends a delivery still waiting in its queue (``preparation``) as
    ``entered-in-error`` with the reason ``cancelled by <who>``; the queued item is dropped by
    the worker, which never delivers a final delivery. A delivery a worker has taken, or that is
    final, is refused, and nothing is changed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medcourier.engine.broker import Broker, WorkItem
from medcourier.engine.clock import now
from medcourier.engine.control import queued_counts, read_route_states
from medcourier.engine.errors import BrokerError
from medcourier.engine.model import Rendered, Status
from medcourier.engine.payload_write import insert_row
from medcourier.engine.schema import deliveries, documents, renderings, status_events
from medcourier.engine.store import AsyncStore, Store

RERENDER = "rerender"
RESEND = "resend"
REPLAY_MODES = (RERENDER, RESEND)
#: A replay selecting more deliveries than this is refused unless the limit is raised.
DEFAULT_LIMIT = 1000
NO_RENDERING = "resend asked, but no rendering of it is stored: rendered again"

StatusHook = Callable[..., object]


class AdminError(Exception):
    """A refused operator request; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def parse_time(text: str) -> datetime:
    """An ISO 8601 time or date; one without an offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AdminError(
            f"{text!r} is not an ISO 8601 time (e.g. 2026-03-01T08:00:00+01:00 or 2026-03-01)",
            400,
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def parse_status(text: str) -> Status:
    allowed = [s.value for s in Status if s is not Status.UNKNOWN]
    if text not in allowed:
        raise AdminError(f"{text!r} is not a delivery status: use one of {', '.join(allowed)}", 400)
    return Status(text)


@dataclass(frozen=True)
class ReplayCriteria:
    """Which deliveries to replay: every criterion given must hold (at least one is needed)."""

    transaction_ids: tuple[str, ...] = ()
    route: str | None = None
    statuses: tuple[Status, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    mode: str = RERENDER
    force: bool = False
    limit: int = DEFAULT_LIMIT

    def check(self) -> None:
        if not (self.transaction_ids or self.route or self.statuses or self.since or self.until):
            raise AdminError(
                "say what to replay: a transaction id, a route, a status or a time window "
                "(since/until)",
                400,
            )
        if self.mode not in REPLAY_MODES:
            raise AdminError(f"mode must be {' or '.join(REPLAY_MODES)}, not {self.mode!r}", 400)
        if self.since and self.until and self.since >= self.until:
            raise AdminError("the window is empty: since must be before until", 400)
        if self.limit < 1:
            raise AdminError("the limit must be at least 1", 400)


@dataclass(frozen=True)
class ReplayRow:
    """One delivery a replay selected: its status when selected and the mode it will get."""

    transaction_id: str
    route: str
    status: Status
    created_at: datetime
    mode: str
    note: str | None = None

    def reason(self, who: str) -> str:
        return f"replay requested ({self.mode}, by {who})" + (f": {self.note}" if self.note else "")


@dataclass(frozen=True)
class ReplayOutcome:
    row: ReplayRow
    replayed: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        r = self.row
        return {
            "transaction_id": r.transaction_id,
            "route": r.route,
            "status": r.status.value,
            "created_at": r.created_at.isoformat(timespec="milliseconds"),
            "mode": r.mode,
            "note": r.note,
            "replayed": self.replayed,
            "detail": self.detail,
        }


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _listing(items: Sequence[str], most: int = 10) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def select_replay(
    c: Connection, criteria: ReplayCriteria, routes: Collection[str]
) -> list[ReplayRow]:
    """The deliveries ``criteria`` selects, oldest document first; refusals raise AdminError."""
    criteria.check()
    if criteria.route is not None and criteria.route not in routes:
        raise AdminError(
            f"route {criteria.route!r} is not configured (routes: {', '.join(sorted(routes))})",
            404,
        )
    wanted = list(dict.fromkeys(criteria.transaction_ids))
    if wanted:
        known = set(
            c.execute(
                sa.select(documents.c.transaction_id).where(documents.c.transaction_id.in_(wanted))
            ).scalars()
        )
        unknown = [t for t in wanted if t not in known]
        if unknown:
            raise AdminError(f"unknown transaction id(s): {_listing(unknown)}", 404)
    stored = (
        sa.exists()
        .where(
            renderings.c.transaction_id == deliveries.c.transaction_id,
            renderings.c.route == deliveries.c.route,
        )
        .label("stored")
    )
    q = (
        sa.select(
            deliveries.c.transaction_id,
            deliveries.c.route,
            deliveries.c.status,
            documents.c.created_at,
            stored,
        )
        .join(documents, documents.c.transaction_id == deliveries.c.transaction_id)
        .order_by(documents.c.created_at, documents.c.transaction_id, deliveries.c.route)
        .limit(criteria.limit + 1)
    )
    if wanted:
        q = q.where(deliveries.c.transaction_id.in_(wanted))
    if criteria.route is not None:
        q = q.where(deliveries.c.route == criteria.route)
    if criteria.statuses:
        q = q.where(deliveries.c.status.in_([s.value for s in criteria.statuses]))
    if criteria.since is not None:
        q = q.where(documents.c.created_at >= criteria.since.astimezone(UTC))
    if criteria.until is not None:
        q = q.where(documents.c.created_at < criteria.until.astimezone(UTC))
    found = c.execute(q).all()
    if len(found) > criteria.limit:
        raise AdminError(
            f"more than {criteria.limit} deliveries match: narrow the selection or raise the "
            'limit (--limit, "limit")'
        )
    unrouted = sorted({r.route for r in found if r.route not in routes})
    if unrouted:
        raise AdminError(
            f"deliveries to route(s) no longer configured are selected ({', '.join(unrouted)}): "
            "nothing could deliver them; narrow the selection (--route). Nothing was replayed."
        )
    busy = [f"{r.transaction_id}/{r.route}" for r in found if r.status == Status.IN_PROGRESS.value]
    if busy and not criteria.force:
        raise AdminError(
            f"{len(busy)} selected deliveries are in-progress (a worker may be delivering them "
            f"now): {_listing(busy)}. Nothing was replayed: leave them out (status) or force "
            '(--force, "force": true) to replay them anyway.'
        )
    rows = []
    for r in found:
        mode, note = criteria.mode, None
        if mode == RESEND and not r.stored:
            mode, note = RERENDER, "resend asked, but no rendering of it is stored"
        created = _aware(r.created_at)
        rows.append(ReplayRow(r.transaction_id, r.route, Status(r.status), created, mode, note))
    return rows


def plan_replay(store: Store, criteria: ReplayCriteria, routes: Collection[str]) -> list[ReplayRow]:
    """What a replay would do (``--dry-run`` shows this); nothing is written."""
    with store.engine.connect() as c:
        return select_replay(c, criteria, routes)


def tx_apply_replay(c: Connection, rows: Sequence[ReplayRow], who: str) -> list[ReplayOutcome]:
    """Put the planned deliveries back to preparation, in one transaction, with their history.

    A delivery whose status changed since it was planned (a worker finished it, someone else
    replayed it) is left alone and reported.
    """
    at = now()
    out = []
    for row in rows:
        reason = row.reason(who)
        key = (deliveries.c.transaction_id == row.transaction_id, deliveries.c.route == row.route)
        changed = c.execute(
            deliveries.update()
            .where(*key, deliveries.c.status == row.status.value)
            .values(
                status=Status.PREPARATION.value, status_at=at, reason=reason, replay_mode=row.mode
            )
        )
        if changed.rowcount != 1:
            current = c.execute(sa.select(deliveries.c.status).where(*key)).scalar()
            out.append(
                ReplayOutcome(
                    row, False, f"not replayed: it became {current} since it was selected"
                )
            )
            continue
        c.execute(
            status_events.insert().values(
                transaction_id=row.transaction_id,
                route=row.route,
                status=Status.PREPARATION.value,
                at=at,
                reason=reason,
            )
        )
        out.append(ReplayOutcome(row, True, "queued"))
    return out


async def apply_replay(
    store: AsyncStore,
    broker: Broker,
    rows: Sequence[ReplayRow],
    who: str,
    status_changed: StatusHook | None = None,
) -> list[ReplayOutcome]:
    """Replay the planned deliveries: history first (one transaction), then one work item each.

    A work item the queue does not confirm leaves its delivery entered-in-error with the reason,
    rather than waiting in preparation for an item that is not there.
    """
    outcomes = await store.write(tx_apply_replay, rows, who)
    for o in outcomes:
        if o.replayed and status_changed is not None:
            status_changed(
                transaction_id=o.row.transaction_id,
                route=o.row.route,
                old=o.row.status,
                new=Status.PREPARATION,
                reason=o.row.reason(who),
            )
    final = []
    for o in outcomes:
        if o.replayed:
            try:
                await broker.publish(WorkItem(o.row.transaction_id, o.row.route))
            except BrokerError as exc:
                reason = f"replay not queued: {exc}"
                await store.write(
                    store.sync.tx_set_status,
                    o.row.transaction_id,
                    o.row.route,
                    Status.ENTERED_IN_ERROR,
                    reason,
                )
                if status_changed is not None:
                    status_changed(
                        transaction_id=o.row.transaction_id,
                        route=o.row.route,
                        old=Status.PREPARATION,
                        new=Status.ENTERED_IN_ERROR,
                        reason=reason,
                    )
                o = ReplayOutcome(o.row, False, f"not queued: {exc}")
        final.append(o)
    return final


# -- cancel ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cancelled:
    transaction_id: str
    route: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "transaction_id": self.transaction_id,
            "route": self.route,
            "status": Status.ENTERED_IN_ERROR.value,
            "reason": self.reason,
        }


_NOT_CANCELLABLE = {
    Status.IN_PROGRESS.value: "a worker has taken it (it is being delivered)",
    Status.COMPLETED.value: "it was already delivered",
    Status.ENTERED_IN_ERROR.value: "it has already ended in error",
}


def tx_cancel(c: Connection, transaction_id: str, route: str | None, who: str) -> list[Cancelled]:
    """Cancel the queued deliveries of a document (or its delivery to ``route``): all or none."""
    q = sa.select(deliveries.c.route, deliveries.c.status).where(
        deliveries.c.transaction_id == transaction_id
    )
    if route is not None:
        q = q.where(deliveries.c.route == route)
    found = c.execute(q.order_by(deliveries.c.route)).all()
    if not found:
        if route is None:
            raise AdminError(f"unknown transaction id {transaction_id}", 404)
        raise AdminError(f"transaction {transaction_id} has no delivery to route {route}", 404)
    refused = [
        f"{r.route} is {r.status}: {_NOT_CANCELLABLE.get(r.status, 'it is not queued')}"
        for r in found
        if r.status != Status.PREPARATION.value
    ]
    if refused:
        hint = "" if route is not None else ' (name a --route / "route" to cancel only that one)'
        raise AdminError(
            f"transaction {transaction_id} cannot be cancelled: {'; '.join(refused)}. "
            f"Only a delivery still queued (preparation) can be; nothing was changed{hint}."
        )
    at = now()
    reason = f"cancelled by {who}"
    out = []
    for r in found:
        changed = c.execute(
            deliveries.update()
            .where(
                deliveries.c.transaction_id == transaction_id,
                deliveries.c.route == r.route,
                deliveries.c.status == Status.PREPARATION.value,
            )
            .values(status=Status.ENTERED_IN_ERROR.value, status_at=at, reason=reason)
        )
        if changed.rowcount != 1:  # raising rolls the whole cancel back
            raise AdminError(
                f"transaction {transaction_id}: a worker took its delivery to {r.route} just now; "
                "nothing was changed"
            )
        c.execute(
            status_events.insert().values(
                transaction_id=transaction_id,
                route=r.route,
                status=Status.ENTERED_IN_ERROR.value,
                at=at,
                reason=reason,
            )
        )
        out.append(Cancelled(transaction_id, r.route, reason))
    return out


async def cancel(
    store: AsyncStore,
    transaction_id: str,
    route: str | None,
    who: str,
    status_changed: StatusHook | None = None,
) -> list[Cancelled]:
    done = await store.write(tx_cancel, transaction_id, route, who)
    if status_changed is not None:
        for d in done:
            status_changed(
                transaction_id=d.transaction_id,
                route=d.route,
                old=Status.PREPARATION,
                new=Status.ENTERED_IN_ERROR,
                reason=d.reason,
            )
    return done


# -- routes ----------------------------------------------------------------------------------
def route_overview(store: Store, routes: Sequence[str]) -> list[dict[str, Any]]:
    """Each configured route: paused or not (since when, why, by whom) and what waits on it."""
    with store.engine.connect() as c:
        states = read_route_states(c)
        counts = queued_counts(c)
    out = []
    for name in routes:
        state = states.get(name)
        waiting = counts.get(name, {})
        out.append(
            {
                "route": name,
                "paused": bool(state and state.paused),
                "since": state.changed_at.isoformat(timespec="milliseconds") if state else None,
                "reason": state.reason if state else None,
                "changed_by": state.changed_by if state else None,
                "preparation": waiting.get(Status.PREPARATION.value, 0),
                "in_progress": waiting.get(Status.IN_PROGRESS.value, 0),
            }
        )
    return out


# -- stored renderings -----------------------------------------------------------------------
def tx_keep_rendering(c: Connection, transaction_id: str, route: str, rendered: Rendered) -> None:
    """Store ``rendered`` as the delivery's rendering, replacing an older one."""
    key = (renderings.c.transaction_id == transaction_id, renderings.c.route == route)
    c.execute(renderings.delete().where(*key))
    # Values as parameters, through insert_row: a value inside the statement would stay in
    # SQLAlchemy's statement cache, and a large rendering is written without a copy.
    row = {
        "transaction_id": transaction_id,
        "route": route,
        "data": rendered.data,
        "media_type": rendered.media_type,
        "filename_hint": rendered.filename_hint,
        "message_id": rendered.message_id,
        "companions": json.dumps(
            {name: base64.b64encode(data).decode() for name, data in rendered.companions}
        ),
        "created_at": now(),
    }
    insert_row(c, renderings, row, "data")


def replay_of(store: Store, transaction_id: str, route: str) -> tuple[str | None, Rendered | None]:
    """The delivery's replay mode, and its stored rendering when that mode is ``resend``."""
    key = (deliveries.c.transaction_id == transaction_id, deliveries.c.route == route)
    with store.engine.connect() as c:
        mode = c.execute(sa.select(deliveries.c.replay_mode).where(*key)).scalar()
        if mode != RESEND:
            return mode, None
        row = c.execute(
            sa.select(renderings).where(
                renderings.c.transaction_id == transaction_id, renderings.c.route == route
            )
        ).first()
    if row is None:
        return mode, None
    companions = json.loads(row.companions or "{}")
    return mode, Rendered(
        data=bytes(row.data),
        media_type=row.media_type,
        filename_hint=row.filename_hint,
        message_id=row.message_id,
        companions=tuple((name, base64.b64decode(b64)) for name, b64 in companions.items()),
    )
