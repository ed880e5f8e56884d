"""``ack_after: journal``: MLLP messages ACKed once journaled, applied in order just after.

Driven through the whole engine by python-hl7's MLLP client over real sockets, on the embedded
default and on RabbitMQ + PostgreSQL: the ACK comes once the journal row is committed, the
directory and the EHR then see the messages in the order they came, a message the engine cannot
check is still answered AE, rows a stopped engine left are applied at the next start, and one
that cannot be applied stays in the journal for `medcourier journal`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.engine import Connection

from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine import inbound_journal as inbound_journal_module
from medcourier.engine.clock import now
from medcourier.engine.config import parse_config
from medcourier.engine.inbound import InboundMessage, Verdict
from medcourier.engine.inbound_journal import JournalingSink, read_entries, tx_journal
from medcourier.engine.plugins import load_plugins
from medcourier.engine.schema import inbound_journal, inbound_log, patients
from medcourier.engine.store import AsyncStore, Store
from tests.harness import LoopThread, Running, engine_config, eventually, pdf_bytes, running_engine
from tests.services import delete_broker_objects, own_postgres_database, rabbitmq_url
from tests.test_inbound_mllp import ADT_A01, _exchange, _hospa_route, _msa, oru

LISTENER = {"name": "hl7-in", "channel": "mllp", "host": "127.0.0.1", "port": 0}
JOURNALED = {**LISTENER, "ack_after": "journal"}


@pytest.fixture(params=["embedded", "rabbitmq+postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A database of each test's own: the tests count every patient, document and journal row."""
    instance = f"mctest-{uuid.uuid4().hex[:8]}"
    if request.param == "embedded":
        yield {"instance": instance}
        return
    with own_postgres_database() as store:
        yield {"instance": instance, "broker": rabbitmq_url(), "store": store}
    delete_broker_objects(rabbitmq_url(), instance, ["ehr-a", "hospa"])


@contextlib.contextmanager
def _engine(
    lt: LoopThread,
    tmp_path: Path,
    hospa: EhrSimulator,
    listener: dict[str, Any],
    backend: dict[str, Any],
) -> Iterator[Running]:
    """The whole engine with ``listener`` and a route to ``hospa``."""
    with running_engine(
        lt, tmp_path, inbound=[listener], extra_routes=[_hospa_route(hospa.port)], **backend
    ) as running:
        yield running


@pytest.fixture
def eng(
    lt: LoopThread, tmp_path: Path, hospa: EhrSimulator, backend: dict[str, Any]
) -> Iterator[Running]:
    with _engine(lt, tmp_path, hospa, JOURNALED, backend) as running:
        yield running


def _port(eng: Running) -> int:
    return int(eng.engine.inbound[0].port)  # type: ignore[attr-defined]


def _journal_rows(eng: Running, *, failed: bool | None = None) -> int:
    q = sa.select(sa.func.count()).select_from(inbound_journal)
    if failed is not None:
        q = q.where(inbound_journal.c.failed.is_(failed))
    with eng.engine.store.sync.engine.connect() as c:
        return int(c.execute(q).scalar_one())


def _a08(cid: str, family: str) -> str:
    """An update of IPP-900's name (no visit)."""
    return (
        ADT_A01.format(cid=cid)
        .replace("ADT^A01^ADT_A01", "ADT^A08^ADT_A01")
        .replace("EVN|A01|", "EVN|A08|")
        .replace("Lévêque\\S\\Test^Hélène", f"{family}^Hélène")
    )


def _family(eng: Running) -> str | None:
    found = eng.http.get("/fhir/Patient", params={"identifier": "IPP-900"}).json()
    if found.get("total") != 1:
        return None
    return str(found["entry"][0]["resource"]["name"][0]["family"])


def test_acked_once_journaled_then_applied_in_order(
    lt: LoopThread, eng: Running, hospa: EhrSimulator
) -> None:
    updates = [_a08(f"UPD-{i}", f"Name{i}") for i in range(1, 31)]
    payload = pdf_bytes(3000)
    messages = [ADT_A01.format(cid="ADT-J1"), *updates, oru("ORU-J1", payload)]
    acks = lt.run(_exchange(_port(eng), messages))
    assert [_msa(a)[0] for a in acks] == ["AA"] * len(messages)
    assert [_msa(a)[1] for a in acks] == ["ADT-J1", *(f"UPD-{i}" for i in range(1, 31)), "ORU-J1"]

    # Applied in the order received: the last update wins, the document reaches the EHR.
    eventually(lambda: _family(eng) == "Name30", 20, "the updates applied in order")
    eventually(lambda: len(hospa.received) == 1, 20, "the document delivered")
    obx = next(seg for seg in hospa.received[0].decode().split("\r") if seg.startswith("OBX|"))
    assert base64.b64decode(obx.split("|")[5].split("^")[4]) == payload
    eventually(lambda: _journal_rows(eng) == 0, 10, "the journal emptied")
    assert eng.document_count() == 1


def test_a_message_that_cannot_be_checked_is_still_answered_ae(
    lt: LoopThread, eng: Running
) -> None:
    no_ipp = ADT_A01.format(cid="BAD-J").replace(
        "PID|1||IPP-900^^^HOSPA&1.2.250.1.999.1&ISO^PI||", "PID|1||||"
    )
    acks = lt.run(_exchange(_port(eng), [no_ipp, ADT_A01.format(cid="GOOD-J")]))
    assert _msa(acks[0]) == ("AE", "BAD-J")
    assert "PID" in str(acks[0].segment("ERR")[2])
    assert _msa(acks[1]) == ("AA", "GOOD-J")
    eventually(lambda: _family(eng) == "Lévêque^Test", 20, "the good one applied")
    assert _journal_rows(eng) == 0  # the bad one was never journaled


def test_a_bad_document_is_answered_ae_and_not_journaled(
    lt: LoopThread, eng: Running, hospa: EhrSimulator
) -> None:
    good = oru("DOC-J1", pdf_bytes(500))
    not_a_pdf = base64.b64encode(b"this is not a PDF").decode()
    two = (
        good.replace("DOC-J1", "DOC-J2")
        + f"OBX|2|ED|11502-2^Bilan^LN||^AP^PDF^Base64^{not_a_pdf}||||||F\r"
    )
    acks = lt.run(_exchange(_port(eng), [ADT_A01.format(cid="ADT-J4"), two, good]))
    assert [_msa(a) for a in acks] == [("AA", "ADT-J4"), ("AE", "DOC-J2"), ("AA", "DOC-J1")]
    assert "OBX" in str(acks[1].segment("ERR")[2])
    eventually(lambda: len(hospa.received) == 1, 20, "the good one delivered")
    eventually(lambda: _journal_rows(eng) == 0, 10, "the journal emptied")
    assert eng.document_count() == 1


def test_a_resend_after_the_journal_is_applied_once(
    lt: LoopThread, eng: Running, hospa: EhrSimulator
) -> None:
    port = _port(eng)
    lt.run(_exchange(port, [ADT_A01.format(cid="ADT-J2")]))
    first = lt.run(_exchange(port, [oru("ORU-J2", pdf_bytes(700))]))
    again = lt.run(_exchange(port, [oru("ORU-J2", pdf_bytes(700))]))
    assert _msa(first[0]) == _msa(again[0]) == ("AA", "ORU-J2")
    eventually(lambda: _journal_rows(eng) == 0, 20, "the journal emptied")
    eventually(lambda: len(hospa.received) == 1, 20, "delivery")
    assert eng.document_count() == 1


def test_a_resend_that_no_longer_reads_is_answered_as_the_duplicate_it_is(
    lt: LoopThread, eng: Running
) -> None:
    """As when applied: an accepted message sent again is a duplicate, whatever it says now."""
    port = _port(eng)
    first = lt.run(_exchange(port, [ADT_A01.format(cid="ADT-J5")]))
    eventually(lambda: _journal_rows(eng) == 0, 20, "applied")
    no_ipp = ADT_A01.format(cid="ADT-J5").replace(
        "PID|1||IPP-900^^^HOSPA&1.2.250.1.999.1&ISO^PI||", "PID|1||||"
    )
    again = lt.run(_exchange(port, [no_ipp]))
    assert _msa(first[0]) == _msa(again[0]) == ("AA", "ADT-J5")
    assert _journal_rows(eng) == 0


# -- ack_after: receipt ----------------------------------------------------------------------
# Journaled unread: every message the listener's own header checks let through is answered AA
# (CA in enhanced mode); what is wrong with one is found when it is applied, and kept in the
# journal for the operator, as what cannot be applied is in ``ack_after: journal``.

RECEIPT = {**LISTENER, "ack_after": "receipt"}


@pytest.fixture
def eng_receipt(
    lt: LoopThread, tmp_path: Path, hospa: EhrSimulator, backend: dict[str, Any]
) -> Iterator[Running]:
    with _engine(lt, tmp_path, hospa, RECEIPT, backend) as running:
        yield running


def _no_ipp(cid: str) -> str:
    """An ADT whose PID names no patient identifier: it does not read (AE when checked)."""
    text = ADT_A01.format(cid=cid).replace(
        "PID|1||IPP-900^^^HOSPA&1.2.250.1.999.1&ISO^PI||", "PID|1||||"
    )
    assert text != ADT_A01.format(cid=cid)
    return text


def test_receipt_answers_aa_unread_and_parks_what_does_not_read(
    lt: LoopThread, eng_receipt: Running
) -> None:
    """The message the journal mode answers AE is answered AA here; applied, it fails alone,
    with the reason its AE would have given, and the messages after it are applied in order."""
    updates = [_a08(f"RUPD-{i}", f"Receipt{i}") for i in range(1, 6)]
    messages = [_no_ipp("RBAD-1"), ADT_A01.format(cid="RGOOD-1"), *updates]
    acks = lt.run(_exchange(_port(eng_receipt), messages))
    assert [_msa(a) for a in acks] == [
        ("AA", "RBAD-1"),
        ("AA", "RGOOD-1"),
        *(("AA", f"RUPD-{i}") for i in range(1, 6)),
    ]
    assert all("ERR" not in [str(seg[0]) for seg in a] for a in acks)  # nothing read yet

    eventually(lambda: _family(eng_receipt) == "Receipt5", 20, "the updates applied in order")
    eventually(lambda: _journal_rows(eng_receipt, failed=True) == 1, 10, "the bad row parked")
    eventually(lambda: _journal_rows(eng_receipt) == 1, 10, "the good rows deleted")
    with eng_receipt.engine.store.sync.engine.connect() as c:
        (entry,) = read_entries(c, "hl7-in", failed=True)
        assert read_entries(c, "hl7-in", failed=False) == []
    assert entry.message.control_id == "RBAD-1"
    assert entry.message.text == messages[0]  # kept as received, for a retry
    assert entry.reason is not None and "PID" in entry.reason
    applier = eng_receipt.engine.appliers[0]  # counted once the rows are settled
    eventually(lambda: (applier.applied, applier.failed) == (6, 1), 10, "counted")


def test_receipt_parks_a_bad_document_and_delivers_the_good_one_once(
    lt: LoopThread, eng_receipt: Running, hospa: EhrSimulator
) -> None:
    """A document that is not what it says is found when applied: the row fails with the
    content-type reason, none of that message's documents is queued (not even its good
    first one), and the next message's document is delivered once."""
    payload = pdf_bytes(500)
    good = oru("RDOC-1", payload)
    not_a_pdf = base64.b64encode(b"this is not a PDF").decode()
    two = (
        good.replace("RDOC-1", "RDOC-2")
        + f"OBX|2|ED|11502-2^Bilan^LN||^AP^PDF^Base64^{not_a_pdf}||||||F\r"
    )
    acks = lt.run(_exchange(_port(eng_receipt), [ADT_A01.format(cid="RADT-2"), two, good]))
    assert [_msa(a) for a in acks] == [("AA", "RADT-2"), ("AA", "RDOC-2"), ("AA", "RDOC-1")]

    eventually(lambda: len(hospa.received) == 1, 20, "the good one delivered")
    eventually(lambda: _journal_rows(eng_receipt, failed=True) == 1, 10, "the bad row parked")
    eventually(lambda: _journal_rows(eng_receipt) == 1, 10, "the good rows deleted")
    with eng_receipt.engine.store.sync.engine.connect() as c:
        (entry,) = read_entries(c, "hl7-in", failed=True)
    assert entry.message.control_id == "RDOC-2"
    assert entry.reason is not None and "content type" in entry.reason
    obx = next(seg for seg in hospa.received[0].decode().split("\r") if seg.startswith("OBX|"))
    assert base64.b64decode(obx.split("|")[5].split("^")[4]) == payload
    assert eng_receipt.document_count() == 1  # the bad message's good first OBX: not queued


@pytest.mark.parametrize("applied_first", [True, False], ids=["after-apply", "sent-together"])
def test_receipt_a_resend_that_no_longer_reads_is_a_duplicate(
    lt: LoopThread, eng_receipt: Running, applied_first: bool
) -> None:
    """Journaled unread, the resend is only found to be a duplicate when applied: its row is
    deleted as applied, not parked as failed, whether the first was applied before the resend
    came or (sent right behind it) is usually still in the journal with it."""
    port = _port(eng_receipt)
    if applied_first:
        acks = lt.run(_exchange(port, [ADT_A01.format(cid="RADT-5")]))
        eventually(lambda: _family(eng_receipt) == "Lévêque^Test", 20, "the first applied")
        eventually(lambda: _journal_rows(eng_receipt) == 0, 10, "the first row deleted")
        acks += lt.run(_exchange(port, [_no_ipp("RADT-5")]))
    else:
        acks = lt.run(_exchange(port, [ADT_A01.format(cid="RADT-5"), _no_ipp("RADT-5")]))
    assert [_msa(a) for a in acks] == [("AA", "RADT-5")] * 2

    applier = eng_receipt.engine.appliers[0]
    eventually(lambda: applier.applied == 2, 20, "both applied")
    assert _journal_rows(eng_receipt) == 0
    assert applier.failed == 0
    assert _family(eng_receipt) == "Lévêque^Test"


def test_receipt_in_enhanced_mode_answers_the_commit_ack(
    lt: LoopThread, eng_receipt: Running
) -> None:
    """MSH-15 = AL asks for the commit acknowledgement: CA, for a message that reads and for
    one that does not (in ``ack_after: journal`` that one gets CE), since both are journaled."""
    good = ADT_A01.format(cid="RENH-1").replace("|2.5|||||FRA|", "|2.5|||AL||FRA|")
    bad = _no_ipp("RENH-2").replace("|2.5|||||FRA|", "|2.5|||AL||FRA|")
    assert good.split("\r")[0].split("|")[14] == bad.split("\r")[0].split("|")[14] == "AL"
    acks = lt.run(_exchange(_port(eng_receipt), [good, bad]))
    assert [_msa(a) for a in acks] == [("CA", "RENH-1"), ("CA", "RENH-2")]
    eventually(lambda: _family(eng_receipt) == "Lévêque^Test", 20, "the good one applied")
    eventually(lambda: _journal_rows(eng_receipt, failed=True) == 1, 10, "the bad row parked")


async def _send_until_acked(port: int, text: str, tries: int = 10) -> tuple[str, int]:
    """Send ``text`` as a sender does: again, on a new connection, while the listener hangs up
    without answering. Returns the MSA-1 it finally got and how many tries went unanswered."""
    for lost in range(tries):
        try:
            (ack,) = await _exchange(port, [text])
        except (asyncio.IncompleteReadError, ConnectionError):
            continue
        return _msa(ack)[0], lost
    raise AssertionError(f"no answer in {tries} tries")


@pytest.mark.parametrize("ack_after", ["journal", "receipt"])
def test_journal_writes_survive_postgresql_dropping_their_connections(
    lt: LoopThread, tmp_path: Path, hospa: EhrSimulator, ack_after: str
) -> None:
    """Journal inserts run on connections of their own, in autocommit: when PostgreSQL drops
    them (a restart, a failover, an administrator), the message that met a dead one is not
    answered, so its sender sends it again, and the next write connects again. Nothing is
    lost or applied twice, and each writer thread fails at most once."""
    instance = f"mctest-{uuid.uuid4().hex[:8]}"
    listener = {**LISTENER, "ack_after": ack_after}
    with (
        own_postgres_database() as store,
        _engine(
            lt,
            tmp_path,
            hospa,
            listener,
            {"instance": instance, "broker": rabbitmq_url(), "store": store},
        ) as eng,
    ):
        try:
            port = _port(eng)
            first = [_a08(f"PGD-{i}", f"Before{i}") for i in range(8)]
            acks = lt.run(_exchange(port, first))
            assert [_msa(a)[0] for a in acks] == ["AA"] * 8
            eventually(lambda: _journal_rows(eng) == 0, 20, "the first ones applied")

            admin = sa.create_engine(store.replace("postgresql://", "postgresql+psycopg://", 1))
            with admin.connect() as c:
                # the journal's writers, by the last statement each ran, and every other one
                journal_writers, killed = c.execute(
                    sa.text(
                        "SELECT count(*) FILTER (WHERE query LIKE 'INSERT INTO inbound_journal%'),"
                        " count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).one()
            admin.dispose()
            assert journal_writers >= 1 and killed > journal_writers

            lost = 0
            after = 30
            for i in range(after):
                code, unanswered = lt.run(_send_until_acked(port, _a08(f"PGA-{i}", f"After{i}")))
                assert code == "AA"
                lost += unanswered
            # A dead connection costs one unanswered try, once: then its thread connects again.
            assert 1 <= lost <= eng.engine.store.writers + 1

            eventually(lambda: _journal_rows(eng) == 0, 30, "everything applied")
            eventually(lambda: _family(eng) == "After29", 20, "the updates applied in order")
            applier = eng.engine.appliers[0]
            # Each message journaled and applied once: none lost, none twice.
            eventually(lambda: applier.applied == len(first) + after, 10, "counted")
            assert applier.failed == 0
            with eng.engine.store.sync.engine.connect() as c:
                assert c.execute(sa.select(sa.func.count()).select_from(patients)).scalar() == 1
                logged = c.execute(sa.select(sa.func.count()).select_from(inbound_log)).scalar()
                assert logged == len(first) + after
        finally:
            delete_broker_objects(rabbitmq_url(), instance, ["ehr-a", "hospa"])


def test_a_journal_write_waits_for_the_senders_it_answered(
    lt: LoopThread, tmp_path: Path, hospa: EhrSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite's one writer, a write started by the first sender back waits for the others
    the last write answered, so that they share one commit, and never for a sender that is
    alone; senders that do not come back are waited for once, then no longer expected."""
    monkeypatch.setattr(inbound_journal_module, "GATHER_SECONDS", 30.0)
    with _engine(lt, tmp_path, hospa, RECEIPT, {}) as eng:
        sink = eng.engine.inbound[0].sink  # type: ignore[attr-defined]
        assert isinstance(sink, JournalingSink)
        batches: list[int] = []
        journal = sink.store.write_autocommit

        async def recorded(fn: Any, messages: list[InboundMessage]) -> list[int]:
            batches.append(len(messages))
            return await journal(fn, messages)

        sink.store.write_autocommit = recorded  # type: ignore[method-assign]

        def sent(cid: str) -> Any:
            return sink.hl7_message(_message(_a08(cid, "Gather"), cid))

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            started = loop.time()
            for cid in ("G-1", "G-2"):  # a lone sender, then the same one again
                assert (await sent(cid)).verdict is Verdict.ACCEPT
            assert loop.time() - started < 10 and batches == [1, 1]  # not held up

            await asyncio.gather(*(sent(f"G-3-{i}") for i in range(8)))  # eight at once
            assert batches[-1] == 8

            back = [asyncio.create_task(sent(f"G-4-{i}")) for i in range(3)]
            await asyncio.sleep(0.3)  # three of the eight are back: their write waits
            assert not any(t.done() for t in back) and len(batches) == 3
            back += [asyncio.create_task(sent(f"G-4-{i}")) for i in range(3, 8)]
            await asyncio.wait_for(asyncio.gather(*back), 10)  # the rest: one write, at once
            assert batches[3:] == [8]

            inbound_journal_module.GATHER_SECONDS = 0.5  # seven of the eight leave
            started = loop.time()
            await sent("G-5")
            assert loop.time() - started >= 0.5 and batches[-1] == 1  # waited for them once
            started = loop.time()
            await sent("G-6")
            assert loop.time() - started < 0.5 and batches[-1] == 1  # and no longer

        lt.run(scenario())
        eventually(lambda: _journal_rows(eng) == 0, 20, "all applied")
        assert eng.engine.appliers[0].applied == 2 + 8 + 8 + 2


def _message(text: str, cid: str) -> InboundMessage:
    return InboundMessage(
        text=text,
        channel="hl7-in",
        sending_application="ADT",
        sending_facility="HOSPA",
        control_id=cid,
        message_type="ADT^A01",
        peer="127.0.0.1:1",
    )


def test_rows_a_stopped_engine_left_are_applied_at_start(
    lt: LoopThread, tmp_path: Path, backend: dict[str, Any]
) -> None:
    """What a crash between the ACK and the apply leaves: journal rows, applied at start."""
    store = Store(backend.get("store"), tmp_path / "data")
    store.create_schema()
    try:
        left = [
            _message(ADT_A01.format(cid="LEFT-1"), "LEFT-1"),
            _message(_a08("LEFT-2", "Survivor"), "LEFT-2"),
        ]
        assert store.transaction(tx_journal, left[:1]) < store.transaction(tx_journal, left[1:])
    finally:
        store.dispose()
    with running_engine(lt, tmp_path, inbound=[JOURNALED], **backend) as eng:
        eventually(lambda: _family(eng) == "Survivor", 20, "the journal applied at start")
        eventually(lambda: _journal_rows(eng) == 0, 10, "the journal emptied")


TRICKY = [
    "é à ç Lévêque\\S\\Hélène",
    "emoji outside the BMP: \U0001f600 \U0001f3e5 \U00010348",
    'double "quotes" and \\"escaped\\" ones',
    "back\\slashes \\\\ \\E\\ \\u0041 \\n (not a newline)",
    "carriage\rreturn, line\nfeed, crlf\r\n, tab\there",
    "",
    "null",
    "[1, 2]",
    '{"a": 1}',
    "0123",
    "'single' -- ; DROP TABLE inbound_journal",
    "\u2028\u2029 \x7f \x1f \x01 combining e\u0301 rtl \u05e9\u05dc\u05d5\u05dd",
    "  leading and trailing spaces  ",
]
"""Text that a JSON encoding, a JSON unpacking in the database or a driver could get wrong."""


def _tricky_message(i: int) -> InboundMessage:
    t = TRICKY[i % len(TRICKY)]
    short = t[:40]  # message_type is 20 characters, the header fields 400: the same trickery
    return InboundMessage(
        text=f"MSH|^~\\&|{i}|{t}\r" if i != 7 else "x" * 50_000 + t + "é\U0001f600" * 12_500,
        channel="hl7-in" if i % 3 else "hl7-é\U0001f600",
        sending_application=short if i % 4 else "",
        sending_facility=t[::-1][:40],
        control_id=f"{i}:{short}",
        message_type=t[:20],
        peer=None if i % 5 == 0 else f"{short}:{i}",
    )


def test_journal_writes_give_back_exactly_what_was_journaled(
    tmp_path: Path, backend: dict[str, Any]
) -> None:
    """Rows travel as one multi-row statement in the driver's own parameter style (PostgreSQL:
    ``$n`` through a raw psycopg cursor): every character, an empty field, a missing peer and a
    100 KB text come back as sent, numbered in the order sent, and a later write is numbered
    after. The connection's cursors are left as they were for the statements that follow."""

    def journal_then_count(c: Connection, messages: list[InboundMessage]) -> tuple[list[int], int]:
        seqs = tx_journal(c, messages)
        q = sa.select(sa.func.count()).where(inbound_journal.c.channel == "hl7-in")
        return seqs, c.execute(q).scalar_one()

    first = [_tricky_message(i) for i in range(300)]
    second = [_tricky_message(i) for i in range(300, 310)]
    assert len(first[7].text.encode()) > 100_000
    store = Store(backend.get("store"), tmp_path / "data")
    store.create_schema()
    try:
        before = now()
        seqs = store.transaction(tx_journal, first)
        after = now()
        more, counted = store.transaction(journal_then_count, second)
        assert counted == sum(m.channel == "hl7-in" for m in first + second)
        assert len(seqs) == len(first) and len(more) == len(second)
        assert seqs == sorted(set(seqs)) and more == sorted(set(more))  # strictly increasing
        assert min(more) > max(seqs)
        with store.engine.connect() as c:
            entries = read_entries(c, None, failed=False, limit=1000)
        assert [e.seq for e in entries] == seqs + more
        for sent, entry in zip(first + second, entries, strict=True):
            assert entry.message == sent, entry.seq
        assert not any(e.failed or e.reason for e in entries)
        assert len({e.received_at for e in entries[:300]}) == 1  # one write, one time
        # The time goes in as the column stores it (SQLite: SQLAlchemy's text) and reads back.
        at = entries[0].received_at
        assert isinstance(at, datetime)
        assert before <= (at if at.tzinfo else at.replace(tzinfo=UTC)) <= after
        with store.engine.connect() as c:  # found by a time SQLAlchemy binds: stored alike
            q = sa.select(sa.func.count()).where(inbound_journal.c.received_at == at)
            assert c.execute(q).scalar_one() == len(first)
    finally:
        store.dispose()


def test_a_journal_write_from_the_event_loop_is_one_statement_or_refused(
    lt: LoopThread, tmp_path: Path, backend: dict[str, Any]
) -> None:
    """The engine's path: ``AsyncStore.write_autocommit``. On PostgreSQL an autocommit
    connection of its own takes a full statement (256 rows) whole and refuses more, which
    would commit piecemeal; on SQLite the group commit's transaction takes any number."""
    store = Store(backend.get("store"), tmp_path / "data")
    store.create_schema()
    async_store = AsyncStore(store)
    try:
        full = [_tricky_message(i) for i in range(256)]
        seqs = lt.run(async_store.write_autocommit(tx_journal, full))
        with store.engine.connect() as c:
            entries = read_entries(c, None, failed=False, limit=1000)
        assert [e.seq for e in entries] == seqs and len(seqs) == len(full)
        assert [e.message for e in entries] == full

        more = [_tricky_message(i) for i in range(300, 557)]
        if store.is_sqlite:
            assert len(lt.run(async_store.write_autocommit(tx_journal, more))) == len(more)
            expected = len(full) + len(more)
        else:
            with pytest.raises(ValueError, match="at most 256 messages"):
                lt.run(async_store.write_autocommit(tx_journal, more))
            expected = len(full)  # nothing of the refused write
        with store.engine.connect() as c:
            assert len(read_entries(c, None, failed=False, limit=1000)) == expected
    finally:
        async_store.close()


def test_a_message_that_cannot_be_applied_stays_for_the_operator(
    lt: LoopThread, tmp_path: Path, backend: dict[str, Any]
) -> None:
    """No route takes the document (no fallback): the default mode would answer AE; journaled,
    the row stays failed with the reason, listed, put back and discarded by `medcourier
    journal`, and the messages after it are applied."""
    with running_engine(lt, tmp_path, inbound=[JOURNALED], fallback=False, **backend) as eng:
        messages = [
            ADT_A01.format(cid="ADT-J3"),
            oru("ORU-NOROUTE", pdf_bytes(600)),
            _a08("AFTER-1", "After"),
        ]
        acks = lt.run(_exchange(_port(eng), messages))
        assert [_msa(a)[0] for a in acks] == ["AA", "AA", "AA"]
        eventually(lambda: _family(eng) == "After", 20, "the message after it applied")
        eventually(lambda: _journal_rows(eng, failed=True) == 1, 10, "the failed row kept")
        assert _journal_rows(eng) == 1
        with eng.engine.store.sync.engine.connect() as c:
            (entry,) = read_entries(c, "hl7-in", failed=True)
        assert entry.message.control_id == "ORU-NOROUTE"
        assert entry.reason and "route" in entry.reason

        config = tmp_path / "engine.yaml"
        config.write_text(engine_config(tmp_path / "data", 1, inbound=[JOURNALED], **backend))
        listed = _cli("journal", "--config", str(config))
        assert listed.returncode == 0, listed.stderr
        assert f"{entry.seq}\thl7-in\t" in listed.stdout and "ORU-NOROUTE" in listed.stdout

        # Put back: applied again, fails again for the same reason (the config is unchanged).
        applier = eng.engine.appliers[0]
        assert applier.failed == 1
        retried = _cli("journal", "--config", str(config), "--retry", str(entry.seq))
        assert retried.returncode == 0, retried.stdout + retried.stderr
        eventually(lambda: applier.failed == 2, 10, "applied again, failed again")
        assert _journal_rows(eng, failed=True) == 1

        gone = _cli("journal", "--config", str(config), "--discard", str(entry.seq), "999999")
        assert gone.returncode == 1  # one of the two was not a failed row
        assert "1 of 2 failed messages deleted" in gone.stdout
        assert _journal_rows(eng) == 0
        assert eng.document_count() == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "medcourier"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("ack_after", ["journal", "receipt"])
def test_journal_is_only_for_mllp_listeners(tmp_path: Path, ack_after: str) -> None:
    """Both journaled modes answer before applying, which only means something to a sender that
    waits for each answer: a folder or an HTTP client is answered once applied."""
    folder = {
        "name": "inbox",
        "channel": "filedrop",
        "path": str(tmp_path / "in"),
        "ack_after": ack_after,
    }
    text = engine_config(tmp_path / "data", 1, inbound=[folder])
    with pytest.raises(Exception) as raised:
        parse_config(text, load_plugins(), "test.yaml")
    assert f"inbound[0].ack_after: {ack_after} is for mllp listeners" in str(raised.value)

    bad = engine_config(tmp_path / "data", 1, inbound=[{**LISTENER, "ack_after": "later"}])
    with pytest.raises(Exception) as raised:
        parse_config(bad, load_plugins(), "test.yaml")
    assert "inbound[0].ack_after: one of apply, journal, receipt" in str(raised.value)
    assert yaml.safe_load(text)["inbound"][0]["ack_after"] == ack_after

    # On an mllp listener, the same value is taken.
    fine = engine_config(tmp_path / "data", 1, inbound=[{**LISTENER, "ack_after": ack_after}])
    (spec,) = parse_config(fine, load_plugins(), "test.yaml").inbound
    assert spec.ack_after == ack_after


def test_many_connections_at_once_lose_nothing(lt: LoopThread, eng: Running) -> None:
    """8 connections, 25 messages each: every one ACKed AA and applied."""

    async def feed(conn: int) -> list[str]:
        msgs = [
            ADT_A01.format(cid=f"C{conn}-{i}").replace("IPP-900", f"IPP-{conn}-{i}")
            for i in range(25)
        ]
        return [_msa(a)[0] for a in await _exchange(_port(eng), msgs)]

    async def all_of_them() -> list[list[str]]:
        return list(await asyncio.gather(*(feed(n) for n in range(8))))

    assert lt.run(all_of_them()) == [["AA"] * 25] * 8
    eventually(lambda: _journal_rows(eng) == 0, 30, "the journal emptied")
    with eng.engine.store.sync.engine.connect() as c:
        q = sa.select(sa.func.count()).select_from(patients)
        assert c.execute(q).scalar_one() == 200


def test_a_stopped_engine_lets_another_apply_its_journal(lt: LoopThread, tmp_path: Path) -> None:
    """PostgreSQL: the applier's session lock is released at stop, not kept by the pool."""
    with own_postgres_database() as url:
        backend = {"instance": f"mctest-{uuid.uuid4().hex[:8]}", "broker": rabbitmq_url()}
        with running_engine(lt, tmp_path, inbound=[JOURNALED], store=url, **backend) as eng:
            applier = eng.engine.appliers[0]
            eventually(lambda: applier._lock is not None, 10, "the applier holds the lock")
            lt.run(applier.stop())
            other = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
            try:
                with other.connect() as c:
                    key = applier._lock_key
                    q = sa.text("SELECT pg_try_advisory_lock(:key)")
                    assert c.execute(q, {"key": key}).scalar() is True
                    c.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            finally:
                other.dispose()
        delete_broker_objects(rabbitmq_url(), backend["instance"], ["ehr-a"])
