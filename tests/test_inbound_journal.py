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
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine.config import parse_config
from medcourier.engine.inbound import InboundMessage
from medcourier.engine.inbound_journal import read_entries, tx_journal
from medcourier.engine.plugins import load_plugins
from medcourier.engine.schema import inbound_journal, patients
from medcourier.engine.store import Store
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


@pytest.fixture
def eng(
    lt: LoopThread, tmp_path: Path, hospa: EhrSimulator, backend: dict[str, Any]
) -> Iterator[Running]:
    with running_engine(
        lt, tmp_path, inbound=[JOURNALED], extra_routes=[_hospa_route(hospa.port)], **backend
    ) as running:
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


def test_journal_is_only_for_mllp_listeners(tmp_path: Path) -> None:
    folder = {
        "name": "inbox",
        "channel": "filedrop",
        "path": str(tmp_path / "in"),
        "ack_after": "journal",
    }
    text = engine_config(tmp_path / "data", 1, inbound=[folder])
    with pytest.raises(Exception) as raised:
        parse_config(text, load_plugins(), "test.yaml")
    assert "inbound[0].ack_after: journal is for mllp listeners" in str(raised.value)

    bad = engine_config(tmp_path / "data", 1, inbound=[{**LISTENER, "ack_after": "later"}])
    with pytest.raises(Exception) as raised:
        parse_config(bad, load_plugins(), "test.yaml")
    assert "inbound[0].ack_after: one of apply, journal" in str(raised.value)
    assert yaml.safe_load(text)["inbound"][0]["ack_after"] == "journal"


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
