"""``medcourier replay | cancel | pause | resume | journal``: operator actions beside a running
engine.

Each command opens the store (and, for replay, the queues) named by the config file itself, so it
acts on a running engine without going through its API: the embedded default shares the SQLite
store and queue files with the engine, RabbitMQ and PostgreSQL are shared by nature. The logic
is engine/admin.py's, the same as the API's (``/admin/...``).

Exit status: 0 done; 1 refused or partly done (the reason is printed); 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence

from medcourier.engine.admin import (
    DEFAULT_LIMIT,
    REPLAY_MODES,
    RERENDER,
    AdminError,
    ReplayCriteria,
    ReplayOutcome,
    apply_replay,
    cancel,
    parse_status,
    parse_time,
    plan_replay,
    route_overview,
)
from medcourier.engine.config import Config, load_config
from medcourier.engine.control import tx_set_route_state
from medcourier.engine.inbound_journal import (
    JournalEntry,
    read_entries,
    tx_discard_failed,
    tx_release_failed,
)
from medcourier.engine.model import Status
from medcourier.engine.plugins import Plugins
from medcourier.engine.service import route_broker, start_route_broker
from medcourier.engine.store import AsyncStore, Store

COMMANDS = ("replay", "cancel", "pause", "resume", "journal")
STATUSES = [s.value for s in Status if s is not Status.UNKNOWN]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = sub.add_parser(
        "replay",
        help="queue deliveries again, re-rendered or resending the stored rendering",
        description="Select deliveries (every criterion given must hold) and queue them again. "
        "Each replay is recorded in the delivery's status history.",
    )
    replay.add_argument("--config", "-c", required=True, help="YAML configuration file")
    replay.add_argument(
        "--transaction-id",
        "-t",
        action="append",
        default=[],
        dest="transaction_ids",
        metavar="ID",
        help="a document's transaction id (repeatable)",
    )
    replay.add_argument("--route", "-r", help="only deliveries to this route")
    replay.add_argument(
        "--status",
        "-s",
        action="append",
        default=[],
        dest="statuses",
        choices=STATUSES,
        help="only deliveries in this status (repeatable)",
    )
    replay.add_argument(
        "--since", help="documents received at or after this ISO time (UTC if no offset)"
    )
    replay.add_argument(
        "--until", help="documents received before this ISO time (UTC if no offset)"
    )
    replay.add_argument(
        "--mode",
        choices=REPLAY_MODES,
        default=RERENDER,
        help="rerender (default): render again; resend: send the stored rendering byte for byte",
    )
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed")
    replay.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    replay.add_argument("--force", action="store_true", help="also replay in-progress deliveries")
    replay.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"refuse when more deliveries match (default {DEFAULT_LIMIT})",
    )

    cancel_parser = sub.add_parser(
        "cancel", help="cancel a queued delivery (preparation): it ends entered-in-error"
    )
    cancel_parser.add_argument("--config", "-c", required=True, help="YAML configuration file")
    cancel_parser.add_argument("--transaction-id", "-t", required=True, dest="transaction_id")
    cancel_parser.add_argument("--route", "-r", help="only the delivery to this route")

    pause = sub.add_parser("pause", help="hold a route's queue: nothing is delivered until resumed")
    pause.add_argument("--config", "-c", required=True, help="YAML configuration file")
    pause.add_argument("route", help="route name")
    pause.add_argument("--reason", help="why (shown in GET /admin/routes and the logs)")

    resume = sub.add_parser("resume", help="resume a paused route: its queue is delivered in order")
    resume.add_argument("--config", "-c", required=True, help="YAML configuration file")
    resume.add_argument("route", help="route name")

    journal = sub.add_parser(
        "journal",
        help="messages MLLP listeners journaled (ack_after: journal) and could not apply",
        description="List the journal's failed messages (default) or those still to apply; "
        "--retry puts failed ones back to be applied in order, --discard deletes them.",
    )
    journal.add_argument("--config", "-c", required=True, help="YAML configuration file")
    journal.add_argument("--channel", help="only this listener's journal")
    journal.add_argument(
        "--pending", action="store_true", help="list messages still to apply instead"
    )
    what = journal.add_mutually_exclusive_group()
    what.add_argument("--retry", type=int, nargs="+", metavar="SEQ", help="apply these again")
    what.add_argument("--discard", type=int, nargs="+", metavar="SEQ", help="delete these")


def run(args: argparse.Namespace, plugins: Plugins) -> int:
    config = load_config(args.config, plugins)
    try:
        if args.command == "replay":
            return asyncio.run(_replay(args, config, plugins))
        if args.command == "cancel":
            return asyncio.run(_cancel(args, config, plugins))
        if args.command == "journal":
            return _journal(args, config)
        return _pause(args, config, paused=args.command == "pause")
    except AdminError as exc:
        print(f"medcourier {args.command}: {exc.message}", file=sys.stderr)
        return 2 if exc.status == 400 else 1


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name and no passwd entry (some containers)
        user = "unknown"
    return f"cli:{user}"


def _store(config: Config) -> Store:
    s = config.settings
    store = Store(s.store, s.data_dir)
    store.create_schema()  # the tables this version added, if the engine is older
    return store


def _criteria(args: argparse.Namespace) -> ReplayCriteria:
    return ReplayCriteria(
        transaction_ids=tuple(args.transaction_ids),
        route=args.route,
        statuses=tuple(parse_status(s) for s in args.statuses),
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        mode=args.mode,
        force=args.force,
        limit=args.limit,
    )


def replay_table(outcomes: Sequence[ReplayOutcome]) -> str:
    header = ("TRANSACTION ID", "ROUTE", "WAS", "RECEIVED (UTC)", "MODE", "RESULT")
    lines = [
        (
            o.row.transaction_id,
            o.row.route,
            o.row.status.value,
            o.row.created_at.strftime("%Y-%m-%dT%H:%M:%S"),
            o.row.mode,
            o.detail + (f" ({o.row.note})" if o.row.note else ""),
        )
        for o in outcomes
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *lines]
    )


def _confirm(count: int) -> bool:
    if not sys.stdin.isatty():
        raise AdminError(f"{count} deliveries would be replayed: add --yes to confirm")
    answer = input(f"Replay these {count} deliveries? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


async def _replay(args: argparse.Namespace, config: Config, plugins: Plugins) -> int:
    criteria = _criteria(args)
    routes = [r.name for r in config.routes]
    store = AsyncStore(_store(config))
    try:
        rows = await store.run(plan_replay, store.sync, criteria, routes)
        if not rows:
            print("nothing to replay: no delivery matches")
            return 0
        if args.dry_run:
            print(replay_table([ReplayOutcome(r, False, "would be replayed") for r in rows]))
            print(f"dry run: {len(rows)} deliveries would be replayed; nothing was changed")
            return 0
        if not args.yes:
            print(replay_table([ReplayOutcome(r, False, "to replay") for r in rows]))
            if not _confirm(len(rows)):
                print("nothing was replayed")
                return 1
        broker = route_broker(config)
        await start_route_broker(broker, config)
        try:
            # Plugins are told of the status changes here, as the engine tells them of its own.
            outcomes = await apply_replay(
                store, broker, rows, who(), plugins.hook.medcourier_status_changed
            )
        finally:
            await broker.close()
        print(replay_table(outcomes))
        done = sum(o.replayed for o in outcomes)
        print(f"replayed {done} of {len(outcomes)} deliveries")
        return 0 if done == len(outcomes) else 1
    finally:
        await asyncio.to_thread(store.close)


async def _cancel(args: argparse.Namespace, config: Config, plugins: Plugins) -> int:
    store = AsyncStore(_store(config))
    try:
        done = await cancel(
            store,
            args.transaction_id,
            args.route,
            who(),
            plugins.hook.medcourier_status_changed,
        )
    finally:
        await asyncio.to_thread(store.close)
    for d in done:
        print(f"cancelled {d.transaction_id} to {d.route}: entered-in-error ({d.reason})")
    return 0


def _pause(args: argparse.Namespace, config: Config, *, paused: bool) -> int:
    routes = [r.name for r in config.routes]
    if args.route not in routes:
        raise AdminError(
            f"route {args.route!r} is not configured (routes: {', '.join(routes)})", 400
        )
    store = _store(config)
    try:
        reason = args.reason if paused else None
        store.transaction(tx_set_route_state, args.route, paused, reason, who())
        view = route_overview(store, [args.route])[0]
    finally:
        store.dispose()
    state = "paused" if paused else "resumed"
    why = f", reason: {view['reason']}" if view["reason"] else ""
    print(
        f"route {args.route} {state} at {view['since']} by {view['changed_by']}{why}; "
        f"{view['preparation']} queued, {view['in_progress']} in progress"
    )
    if paused:
        print("running engines hold its queue within a second; an item being delivered finishes")
    return 0


def _journal(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    try:
        if args.retry:
            count = store.transaction(tx_release_failed, args.retry)
            print(f"{count} of {len(args.retry)} failed messages put back to apply")
            print("a running engine applies them within seconds, in journal order")
            return 0 if count == len(args.retry) else 1
        if args.discard:
            count = store.transaction(tx_discard_failed, args.discard)
            print(f"{count} of {len(args.discard)} failed messages deleted")
            return 0 if count == len(args.discard) else 1
        with store.engine.connect() as c:
            entries = read_entries(c, args.channel, failed=not args.pending, limit=1000)
    finally:
        store.dispose()
    print(journal_table(entries))
    return 0


def journal_table(entries: Sequence[JournalEntry]) -> str:
    """One line per journaled message: what identifies it to its sender, and the reason."""
    if not entries:
        return "no messages"
    lines = ["seq\tchannel\treceived\ttype\tcontrol id\treason"]
    for e in entries:
        m = e.message
        reason = (e.reason or "").replace("\n", " ")
        lines.append(
            f"{e.seq}\t{m.channel}\t{e.received_at}\t{m.message_type}\t{m.control_id}\t{reason}"
        )
    return "\n".join(lines)
