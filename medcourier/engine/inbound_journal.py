"""``ack_after: journal``: an MLLP listener that answers once a message is journaled.

By default a listener ACKs a message once the engine has applied it: the directory updated, the
documents stored and queued. Each message then costs the sender a full commit of that work, and
with one message in flight per connection (MLLP has no pipelining) a feed goes no faster than
that commit. An ADT feed from a busy hospital, or one catching up after a network cut, wants
more. Engines answer this the same way (a "source queue" in Mirth Connect's terms, a commit
acknowledgement in HL7's enhanced mode): the message is written durably as received, answered,
and applied right after, in arrival order.

Here:

- :class:`JournalingSink` checks the message as the engine would (interpretation: segments,
  required fields, identifiers; an error is still answered AE/AR with ERR), writes it to the
  ``inbound_journal`` table (concurrent connections share one insert and one commit), and
  answers AA (CA in enhanced mode). A message is never answered before its journal row is
  committed. With ``ack_after: receipt`` it does not check: the message is journaled unread,
  and what is wrong with it is found when it is applied (the row is then parked, failed).
- :class:`JournalApplier` applies journaled messages, oldest first, through the same
  :class:`~medcourier.engine.inbound_sink.EngineSink` the default mode uses, so dedupe,
  directory rules and routing are the same code. A row is deleted once applied. A message the
  engine cannot apply (an error only the store can find: an encounter of another patient...)
  stays in the journal, ``failed`` with the reason, for an operator (``medcourier admin
  journal``), and the next message is applied: the sender would have got an AE and gone on.
- After a crash, rows left are applied at the next start. A row applied but not yet deleted is
  applied again and recognised as a duplicate (its control id was remembered with its effect, in
  one transaction), so nothing is applied twice.
- With several engine processes on one PostgreSQL (``--role listener``), one applier per channel
  works at a time (a session advisory lock), so the journal is applied in one order.

What the sender gives up is being told, in the ACK, of the errors only the store can find; what
it gains is an answer bounded by one small insert instead of the whole update.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
import sqlalchemy.exc
import structlog
from sqlalchemy.engine import Connection

from medcourier.engine.clock import now
from medcourier.engine.directory_run import NotBatchable, tx_apply_directory_run
from medcourier.engine.inbound import (
    DirectoryUpdate,
    InboundDocument,
    InboundError,
    InboundMessage,
    InboundResult,
    MessageDocuments,
    SinkUnavailable,
    Verdict,
)
from medcourier.engine.inbound_sink import dedupe_key
from medcourier.engine.schema import inbound_journal
from medcourier.engine.store import lock_directory, rerunnable

if TYPE_CHECKING:
    from medcourier.engine.inbound_sink import EngineSink
    from medcourier.engine.store import AsyncStore, Store

log = structlog.get_logger("medcourier.inbound.journal")

BATCH = 256
"""Journal rows read at a time by the applier."""

RUN = 32
"""Directory updates applied per transaction: short enough that journal writes, which senders
wait for, are not held up long behind one."""

YIELD_SECONDS = 0.25
"""How long the applier lets journal writes go first while senders are waiting on them: a
burst is answered at the rate the journal takes it and applied as soon as it eases, yet the
journal is never left unapplied for longer than this between runs."""

QUIET_SECONDS = 0.005
"""How long no journal write must have been waiting for the receipt side to count as idle: a
sender sends its next message a moment after its ACK, so an idle instant is not a lull."""

GATHER_SECONDS = 0.001
"""Longest a journal write waits for the senders the last write answered: each sends its next
message a moment after its ACK, and one write for all of them costs one commit where starting
on the first arrival costs two (the others wait behind it). Like PostgreSQL's ``commit_delay``
with ``commit_siblings``, it only waits while such senders are expected, so a lone sender is
never held up."""

POLL_SECONDS = 2.0
"""How often an idle applier looks for rows another process journaled (or a restart left)."""

RETRY_SECONDS = 1.0
"""Wait after the store or queue failed before applying the same row again."""

STOP_SECONDS = 10.0
"""How long stopping lets the applier drain what is journaled before leaving it for next start."""

MEANINGS_KEPT = 10_000
"""Interpretations kept from receipt for the applier, which otherwise interprets again (after a
restart, or when it falls that far behind)."""

_LOCK_PREFIX = 0x6D636A << 32  # "mcj": journal applier locks, one key per channel

Meaning = DirectoryUpdate | MessageDocuments | InboundResult


@dataclass(frozen=True)
class JournalEntry:
    """A journal row as the applier and the admin read it."""

    seq: int
    message: InboundMessage
    received_at: object
    failed: bool
    reason: str | None


_JOURNAL_COLUMNS = (
    "channel, received_at, failed, control_id, sending_application, sending_facility, "
    "message_type, peer, text"
)
_JOURNAL_ROWS = 256
"""Rows per insert statement: 8 parameters each, far under SQLite's limit of 32,766."""


@functools.cache
def _journal_insert(paramstyle: str, rows: int) -> str:
    """The statement that inserts ``rows`` journal rows, in the driver's own parameter style
    (``dollar``: PostgreSQL's own ``$1``, for psycopg's raw cursors)."""
    marks = {"qmark": "?", "format": "%s", "pyformat": "%s", "dollar": "${}"}
    if paramstyle not in marks:
        raise ValueError(f"journal insert: driver parameter style {paramstyle!r} not supported")
    numbers = iter(range(1, 8 * rows + 1))

    def mark() -> str:
        return marks[paramstyle].format(next(numbers))

    values = ", ".join(
        f"({mark()}, {mark()}, false, {', '.join(mark() for _ in range(6))})" for _ in range(rows)
    )
    return f"INSERT INTO inbound_journal ({_JOURNAL_COLUMNS}) VALUES {values} RETURNING seq"


@contextlib.contextmanager
def _raw_cursors(c: Connection) -> Iterator[str]:
    """The parameter style the journal insert is written in on ``c``, with psycopg's cursors
    made raw for its length: its ordinary cursor rewrites ``%s`` into ``$n`` on every execution
    of a statement with more than 50 parameters (it caches none of those), 0.2 ms of the 0.8 ms
    an 8-row insert takes. SQLAlchemy still runs the statement, so its errors and its handling
    of a lost connection are as for any other."""
    if c.dialect.driver != "psycopg" or (driver := c.connection.driver_connection) is None:
        yield c.dialect.paramstyle
        return
    import psycopg  # the driver of this connection, hence installed

    plain = driver.cursor_factory
    driver.cursor_factory = psycopg.RawCursor
    try:
        yield "dollar"
    finally:
        driver.cursor_factory = plain


@rerunnable
def tx_journal(c: Connection, messages: list[InboundMessage]) -> list[int]:
    """Journal messages in as few statements as can hold them; returns their sequence numbers,
    in order.

    The statement goes to the driver as it is, with the received time put in the column's own
    storage form once: at thousands of messages a second, SQLAlchemy's work on a multi-row
    insert (a bound parameter per column per row, sorted back by a sentinel) cost more of the
    writer's time than the commit, and a JSON array unpacked by the database still twice the
    plain insert. Rows are numbered as they go in (a sequence, AUTOINCREMENT on SQLite: both
    only grow), so the numbers sorted are the messages' in order.
    """
    if len(messages) > _JOURNAL_ROWS and c.get_execution_options().get("isolation_level") == (
        "AUTOCOMMIT"
    ):  # each statement would commit alone: a failure would leave some journaled, unanswered
        raise ValueError(f"at most {_JOURNAL_ROWS} messages per journal write in autocommit")
    at_type = inbound_journal.c.received_at.type.dialect_impl(c.dialect)
    bind = at_type.bind_processor(c.dialect)  # SQLite: the text SQLAlchemy stores and reads
    at = now()
    stored_at = bind(at) if bind is not None else at
    seqs: list[int] = []
    for first in range(0, len(messages), _JOURNAL_ROWS):
        chunk = messages[first : first + _JOURNAL_ROWS]
        params: list[object] = []
        for m in chunk:
            params += (
                m.channel,
                stored_at,
                m.control_id,
                m.sending_application,
                m.sending_facility,
                m.message_type,
                m.peer,
                m.text,
            )
        with _raw_cursors(c) as paramstyle:
            result = c.exec_driver_sql(_journal_insert(paramstyle, len(chunk)), tuple(params))
            seqs += sorted(int(seq) for seq in result.scalars())
    return seqs


@rerunnable
def tx_settle(c: Connection, applied: list[int], failed: list[tuple[int, str]]) -> None:
    """Delete applied rows; mark the others failed with their reason."""
    if applied:
        c.execute(inbound_journal.delete().where(inbound_journal.c.seq.in_(applied)))
    for seq, reason in failed:
        c.execute(
            inbound_journal.update()
            .where(inbound_journal.c.seq == seq)
            .values(failed=True, reason=reason)
        )


@rerunnable
def tx_apply_updates(
    c: Connection,
    store: Store,
    updates: list[tuple[JournalEntry, DirectoryUpdate]],
    window: timedelta,
) -> list[tuple[int, str]]:
    """Apply consecutive directory updates in order and delete their rows, in one transaction;
    returns the rows that failed, with their reasons (marked failed here too).

    One commit for a run of ADT instead of one each, and a row leaves the journal with its
    effect. The run is first applied whole, in a few statements (engine/directory_run.py);
    when that path does not take it, or it fails, each update runs in a savepoint of its own,
    so one the directory refuses fails alone.
    """
    if len(updates) > 1 and _applied_as_one(c, updates, window):
        tx_settle(c, [entry.seq for entry, _ in updates], [])
        return []
    applied: list[int] = []
    failed: list[tuple[int, str]] = []
    for entry, update in updates:
        savepoint = c.begin_nested()
        try:
            store.tx_apply_directory_update_once(c, update, dedupe_key(entry.message), window)
        except InboundError as exc:
            savepoint.rollback()
            failed.append((entry.seq, exc.text))
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
            raise  # the store, not the message: the whole run is tried again
        except Exception as exc:  # a bug must not stop the journal: park the row
            savepoint.rollback()
            log.error("journal entry failed", seq=entry.seq, error=type(exc).__name__)
            failed.append((entry.seq, "internal error"))
        else:
            savepoint.commit()
            applied.append(entry.seq)
    tx_settle(c, applied, failed)
    return failed


def _applied_as_one(
    c: Connection, updates: list[tuple[JournalEntry, DirectoryUpdate]], window: timedelta
) -> bool:
    """Apply the run with :func:`tx_apply_directory_run`, in a savepoint; False (nothing
    written) when the run is not for that path or an update failed there."""
    lock_directory(c)  # outside the savepoint, which would release it on a rollback
    run = [(dedupe_key(entry.message), update) for entry, update in updates]
    savepoint = c.begin_nested()
    try:
        tx_apply_directory_run(c, run, window)
    except NotBatchable:
        savepoint.rollback()
        return False
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
        raise  # the store, not the messages: the whole run is tried again
    except Exception as exc:  # one at a time says which update, and parks it
        savepoint.rollback()
        log.warning("journal run applied one at a time", error=type(exc).__name__)
        return False
    savepoint.commit()
    return True


def read_entries(
    c: Connection, channel: str | None, *, failed: bool, after: int = 0, limit: int = BATCH
) -> list[JournalEntry]:
    """Rows oldest first: the pending ones (``failed=False``) or the failed ones."""
    q = sa.select(inbound_journal).where(
        inbound_journal.c.failed == failed, inbound_journal.c.seq > after
    )
    if channel is not None:
        q = q.where(inbound_journal.c.channel == channel)
    rows = c.execute(q.order_by(inbound_journal.c.seq).limit(limit)).all()
    return [
        JournalEntry(
            seq=row.seq,
            message=InboundMessage(
                text=row.text,
                channel=row.channel,
                sending_application=row.sending_application,
                sending_facility=row.sending_facility,
                control_id=row.control_id,
                message_type=row.message_type,
                peer=row.peer,
            ),
            received_at=row.received_at,
            failed=row.failed,
            reason=row.reason,
        )
        for row in rows
    ]


def tx_release_failed(c: Connection, seqs: list[int]) -> int:
    """Put failed rows back to be applied again (after the cause was fixed); returns how many."""
    result = c.execute(
        inbound_journal.update()
        .where(inbound_journal.c.seq.in_(seqs), inbound_journal.c.failed.is_(True))
        .values(failed=False, reason=None)
    )
    return int(result.rowcount or 0)


def tx_discard_failed(c: Connection, seqs: list[int]) -> int:
    """Delete failed rows an operator gave up on; returns how many."""
    result = c.execute(
        inbound_journal.delete().where(
            inbound_journal.c.seq.in_(seqs), inbound_journal.c.failed.is_(True)
        )
    )
    return int(result.rowcount or 0)


class JournalApplier:
    """Applies one channel's journal in order, in the background (see the module docstring)."""

    def __init__(self, sink: EngineSink, store: AsyncStore, channel: str) -> None:
        self.sink = sink
        self.store = store
        self.channel = channel
        self.applied = 0
        self.failed = 0
        # seq -> (the message, what it means), kept from receipt
        self._meanings: dict[int, tuple[InboundMessage, Meaning]] = {}
        self._read_upto = 0  # the highest seq read: numbers only grow
        self._applying = False  # this process applies the journal (PostgreSQL: holds the lock)
        self._wake = asyncio.Event()
        # Set by the sink: a journal write is waiting or committing / when the last one ended.
        self.receipt_busy = False
        self.receipt_ended = 0.0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._lock: Connection | None = None
        self._lock_key = _LOCK_PREFIX | zlib.crc32(channel.encode())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"journal-{self.channel}")

    def journaled(self, seq: int, message: InboundMessage, meaning: Meaning | None) -> None:
        """``message`` was journaled as ``seq``, checked into ``meaning`` (None: journaled
        unread, ``ack_after: receipt``): apply it soon.

        Nothing is kept for a row this applier has read already (it reads on its own thread as
        soon as the commit is done), nor while another process applies the journal: it would
        never be used.
        """
        if (
            meaning is not None
            and self._applying
            and seq > self._read_upto
            and len(self._meanings) < MEANINGS_KEPT
        ):
            self._meanings[seq] = (message, meaning)
        self._wake.set()

    def _meaning(self, entry: JournalEntry) -> Meaning:
        kept = self._meanings.pop(entry.seq, None)
        if kept is not None and kept[0] == entry.message:
            return kept[1]
        try:
            return self.sink.interpret(entry.message)
        except Exception as exc:  # a plugin's bug: the row is parked, the journal goes on
            log.error(
                "journal entry failed",
                channel=self.channel,
                seq=entry.seq,
                error=type(exc).__name__,
            )
            return InboundResult(Verdict.ERROR, "internal error")

    async def stop(self) -> None:
        """Drain what is journaled (for up to :data:`STOP_SECONDS`), then stop: what is left is
        applied at the next start."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_SECONDS)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._lock is not None:
            await asyncio.to_thread(self._release_lock, self._lock)
            self._lock = None

    def _release_lock(self, conn: Connection) -> None:
        """Unlock, then give the connection back: the pool keeps the session (and a session
        lock with it) open, so closing alone would keep other processes from the journal."""
        try:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": self._lock_key})
            conn.commit()
        except sqlalchemy.exc.SQLAlchemyError:
            conn.invalidate()  # the session goes, and its lock with it
        finally:
            conn.close()

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before reading: a row committed after this wakes the wait
            try:
                entries = await self._pending()
            except sqlalchemy.exc.SQLAlchemyError as exc:
                log.warning("journal unreadable", channel=self.channel, error=type(exc).__name__)
                entries = None
            if entries is None or not entries:
                if self._stopping:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                continue
            if not await self._apply(entries):
                if self._stopping:
                    return
                await asyncio.sleep(RETRY_SECONDS)

    async def _pending(self) -> list[JournalEntry] | None:
        """The next rows, or None while another process holds this channel's journal."""
        self._applying = await self.store.run(self._hold_lock)
        if not self._applying:
            self._meanings.clear()
            return None
        entries = await self.store.run(self._read)
        if entries:
            self._read_upto = max(self._read_upto, entries[-1].seq)
        return entries

    def _read(self) -> list[JournalEntry]:
        with self.store.sync.engine.connect() as c:
            return read_entries(c, self.channel, failed=False)

    def _hold_lock(self) -> bool:
        """PostgreSQL: hold this channel's applier lock on a connection of its own."""
        if self.store.sync.is_sqlite:
            return True  # one engine process only
        if self._lock is not None:
            try:  # a connection lost (a PostgreSQL restart) lost the lock with it
                self._lock.execute(sa.text("SELECT 1"))
                self._lock.commit()
                return True
            except sqlalchemy.exc.SQLAlchemyError:
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                    self._lock.close()
                self._lock = None
        conn = self.store.sync.engine.connect()
        got = conn.execute(
            sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": self._lock_key}
        ).scalar()
        conn.commit()  # the lock is the session's, not the transaction's
        if got:
            self._lock = conn
            return True
        conn.close()
        return False

    async def _apply(self, entries: list[JournalEntry]) -> bool:
        """Apply rows in order; False when the store or queue failed (retry from that row).

        Runs of directory updates, the bulk of a feed, are applied a run per transaction
        (:func:`tx_apply_updates`); a message with documents goes through the sink as in the
        default mode, since it is routed and queued.
        """
        applied: list[int] = []
        failed: list[tuple[int, str]] = []
        complete = True
        i = 0
        while i < len(entries):
            await self._yield_to_receipt()
            run: list[tuple[JournalEntry, DirectoryUpdate]] = []
            while i < len(entries) and len(run) < RUN:
                meaning = self._meaning(entries[i])
                # Interpreting a run of 32 takes ~10 ms of the event loop: let the listener
                # answer between messages rather than hold every sender up for all of it.
                await asyncio.sleep(0)
                if not isinstance(meaning, DirectoryUpdate) or not entries[i].message.control_id:
                    break
                run.append((entries[i], meaning))
                i += 1
            if run:
                if not await self._apply_updates(run):
                    complete = False
                    break
                continue
            entry = entries[i]
            i += 1
            # Documents, and a message that does not read (journaled unread with ``ack_after:
            # receipt``, or a plugin changed): through the sink, which answers a resend of a
            # message accepted before as the duplicate it is, and says what is wrong otherwise.
            try:
                result = await self.sink.hl7_message(entry.message)
            except SinkUnavailable:
                complete = False
                break
            except Exception as exc:  # a bug must not stop the journal: park the row
                log.error(
                    "journal entry failed",
                    channel=self.channel,
                    seq=entry.seq,
                    error=type(exc).__name__,
                )
                result = InboundResult(Verdict.ERROR, "internal error")
            if result.verdict is Verdict.ACCEPT:
                applied.append(entry.seq)
            else:
                failed.append((entry.seq, result.text or result.verdict.value))
                self._report(entry, result.verdict)
        if not applied and not failed:
            return complete
        try:
            await self.store.write(tx_settle, applied, failed)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            # Applied rows stay and are recognised as duplicates when read again.
            log.warning("journal not settled", channel=self.channel, error=type(exc).__name__)
            return False
        self.applied += len(applied)
        self.failed += len(failed)
        return complete

    async def _yield_to_receipt(self) -> None:
        """Let journal writes go first while senders keep the journal busy (up to
        :data:`YIELD_SECONDS`): on one writer (SQLite) or one interpreter, a run of updates
        applied meanwhile is that much longer before the senders get their ACKs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + YIELD_SECONDS
        while not self._stopping and loop.time() < deadline:
            quiet = loop.time() - self.receipt_ended
            if not self.receipt_busy and quiet >= QUIET_SECONDS:
                return
            await asyncio.sleep(max(0.001, QUIET_SECONDS - quiet))

    async def _apply_updates(self, run: list[tuple[JournalEntry, DirectoryUpdate]]) -> bool:
        """Apply a run in a transaction of its own on PostgreSQL, where a run of round trips
        committed with the group commit's other writes would hold up the journal writes that
        senders wait for; through the group commit on SQLite, which has one writer anyway."""
        sync, window = self.store.sync, self.sink.window
        try:
            if sync.is_sqlite:
                failed = await self.store.write(tx_apply_updates, sync, run, window)
            else:
                failed = await self.store.run(sync.transaction, tx_apply_updates, sync, run, window)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            log.warning("journal not applied", channel=self.channel, error=type(exc).__name__)
            for entry, update in run:  # interpreted already: kept for the retry
                self._meanings[entry.seq] = (entry.message, update)
            return False
        failed_seqs = {seq for seq, _ in failed}
        for entry, _ in run:
            if entry.seq in failed_seqs:
                self._report(entry, Verdict.ERROR)
        self.failed += len(failed)
        self.applied += len(run) - len(failed)
        log.info("journal applied", channel=self.channel, updates=len(run), failed=len(failed))
        return True

    def _report(self, entry: JournalEntry, verdict: Verdict) -> None:
        # The reason may quote the message (identifiers): it stays in the store.
        log.warning(
            "journaled message not applied",
            channel=self.channel,
            seq=entry.seq,
            control_id=entry.message.control_id[:64],
            verdict=verdict.value,
        )


class JournalingSink:
    """The sink an ``ack_after: journal`` or ``receipt`` listener talks to (module docstring).

    Messages that arrive while a journal write is committing wait for the next one, and go in
    it together, as one multi-row insert: the store's group commit would commit them together
    too, but at a savepoint and a statement each, which at thousands of messages a second is
    most of the writer's time. A write first waits briefly for the senders answered last
    (GATHER_SECONDS).

    One write at a time per listener, on either store: through the group commit on SQLite, on
    an autocommit connection of its own on PostgreSQL (the listeners' writes run side by side
    there). A commit costs about the same for one row as for eight, so more writes in flight
    only meant smaller ones: with 8 connections on PostgreSQL, four in flight carried 3
    messages each on average (2,860 ACK/s), two 3,170–3,760, one 4,860 (alternated runs of
    ``bench/mllp_listener.py``, docs/performance.md).

    Order: a sender waits for each ACK before its next message, so its messages are committed,
    and numbered, in the order it sent them, whichever write carries them.
    """

    def __init__(self, sink: EngineSink, applier: JournalApplier, *, check: bool = True) -> None:
        self.sink = sink
        self.applier = applier
        self.check = check  # False: ``ack_after: receipt``, journaled unread
        self.store = sink.store
        self._waiting: list[tuple[InboundMessage, asyncio.Future[int]]] = []
        self._writing: asyncio.Task[None] | None = None  # the one write in flight
        # Senders answered by a write that have not sent again yet (see GATHER_SECONDS), and
        # the event a write gathering for them waits on.
        self._expected = 0
        self._gathered: asyncio.Event | None = None

    async def hl7_message(self, message: InboundMessage) -> InboundResult:
        if not self.check:
            return await self._journaled(message, None)
        meaning = self.sink.interpret(message)
        if isinstance(meaning, MessageDocuments):  # sizes and content types, as when applied
            try:
                for doc in meaning.documents:
                    self.sink.check_document(doc)
            except InboundError as exc:
                meaning = InboundResult(Verdict.ERROR, exc.text, exc.location)
        if isinstance(meaning, InboundResult):  # refused or wrong: answered now, not journaled
            # unless it was accepted before: a resend is answered as one, as when applied
            if message.control_id:
                earlier = await self.sink.seen(message, dedupe_key(message))
                if earlier is not None:
                    return earlier
            return meaning
        return await self._journaled(message, meaning)

    async def _journaled(self, message: InboundMessage, meaning: Meaning | None) -> InboundResult:
        """AA once ``message`` is in a committed journal write."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, future))
        if self._expected:
            self._expected -= 1
            if not self._expected:
                self._end_gathering()
        if len(self._waiting) >= _JOURNAL_ROWS:
            self._end_gathering()  # a full statement's worth: nothing to wait for
        self._start_write()
        try:
            seq = await future
        except (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.TimeoutError,  # no connection free in the pool
        ) as exc:
            raise SinkUnavailable(f"store unavailable: {type(exc).__name__}") from exc
        self.applier.journaled(seq, message, meaning)
        return InboundResult(Verdict.ACCEPT)

    def _start_write(self) -> None:
        if self._waiting and self._writing is None:
            self.applier.receipt_busy = True
            self._writing = asyncio.create_task(self._write())
            self._writing.add_done_callback(self._written)

    def _end_gathering(self) -> None:
        if self._gathered is not None:
            self._gathered.set()

    def _written(self, _task: asyncio.Task[None]) -> None:
        self._writing = None
        if not self._waiting:
            self.applier.receipt_busy = False
            self.applier.receipt_ended = asyncio.get_running_loop().time()
        self._start_write()  # what waited meanwhile

    async def _write(self) -> None:
        """Write what waits, in one commit."""
        await self._gather()
        # One statement's worth: on an autocommit connection, more would commit piecemeal.
        batch, self._waiting = self._waiting[:_JOURNAL_ROWS], self._waiting[_JOURNAL_ROWS:]
        try:
            seqs = await self.store.write_autocommit(tx_journal, [m for m, _ in batch])
            if len(seqs) != len(batch):
                raise RuntimeError(f"journal write gave {len(seqs)} numbers for {len(batch)}")
        except BaseException as exc:  # each waiting message's sender gets no ACK
            failure = exc if isinstance(exc, Exception) else SinkUnavailable("engine stopping")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if isinstance(exc, Exception):
                return  # told to each sender; nothing for the task to report
            raise
        for (_, future), seq in zip(batch, seqs, strict=True):
            if not future.done():  # its connection may have gone meanwhile
                future.set_result(seq)
                self._expected += 1

    async def _gather(self) -> None:
        """Let the senders that will write together arrive (see GATHER_SECONDS)."""
        # One turn of the loop first: messages read in the same pass over the sockets (senders
        # on several connections answered by the last commit send together) join this write.
        await asyncio.sleep(0)
        if not self._expected:
            return
        if len(self._waiting) >= _JOURNAL_ROWS:
            return
        self._gathered = asyncio.Event()
        try:
            async with asyncio.timeout(GATHER_SECONDS):
                await self._gathered.wait()
        except TimeoutError:
            self._expected = 0  # they are not coming (yet): stop expecting them
        finally:
            self._gathered = None

    async def document(self, document: InboundDocument) -> InboundResult:
        return await self.sink.document(document)
