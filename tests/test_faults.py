"""The reliability issue's fault table as tests: break one thing while documents flow, then check
that nothing accepted was lost, nothing is stuck, and each status tells the truth.

Real processes, real sockets, real RabbitMQ and PostgreSQL: each test runs a scenario of
``bench/faults.py`` (the script that produces the table in docs/reliability.md) with small counts
and short outages. The scenario itself states what it expects (``Result.problems``); the
assertions here repeat the main ones so a failure reads on its own.

The RabbitMQ restart test stops and starts the local node's application with ``rabbitmqctl``: it
needs the broker on this machine, and puts it back as it was (checked) even when it fails.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import pytest

from bench import faults
from medcourier.channels.mllp.ack import message_control_id
from medcourier.engine.broker import WorkItem
from medcourier.engine.errors import BrokerError
from medcourier.engine.model import Status
from tests.harness import LoopThread, pdf_bytes, running_engine
from tests.services import fresh_postgres_url, postgres_url, rabbitmq_url

SMALL = faults.Options(
    count=40,
    bad_count=4,
    rate=20.0,
    ehr_down=6.0,
    rabbit_down=2.0,
    engine_down=0.5,
    settle=60.0,
    # Short waits so the queue drains within a second of the EHR coming back.
    outage_retry={"max_attempts": 100, "initial_delay": 0.2, "max_delay": 1.0, "multiplier": 2.0},
)


def _run(name: str, backend: str) -> faults.Result:
    services = faults.Services()
    if backend == "rabbitmq":
        services = faults.Services(amqp_url=rabbitmq_url(), postgres_url=postgres_url())
    result = asyncio.run(faults.run_scenario(name, backend, SMALL, services))
    print("\n" + faults.text_table([result]))
    assert not result.lost, f"accepted documents lost: {result.lost[:10]}"
    assert not result.inconsistent, f"statuses that disagree: {result.inconsistent[:10]}"
    assert result.accepted > 0
    return result


def _all_completed_in_order(result: faults.Result) -> None:
    assert result.statuses == {"completed": result.accepted}, result.status_text()
    assert result.delivered == result.accepted
    assert result.order_violations == 0
    assert result.problems == []


@pytest.mark.parametrize("backend", ["embedded", "rabbitmq"])
def test_sigkill_of_the_engine_mid_delivery_loses_nothing(backend: str) -> None:
    """The EHR holds one document's ACK, the engine is SIGKILLed, then started again: the
    document is sent again with the same MSH-10 (the only duplicate, and the store counts the
    second attempt) and every accepted document ends completed, in order."""
    result = _run("kill-engine", backend)
    _all_completed_in_order(result)
    assert result.duplicates == 1
    (twice,) = [t for t, n in result.receipts.items() if n == 2]
    assert result.store[twice].attempts == 2


def test_sigkill_of_the_active_worker_process_hands_its_document_to_the_standby() -> None:
    """`--role api` plus two `--role worker`: the active worker dies mid-delivery, the other one
    takes the route over and resends the held document; the killed one comes back as standby."""
    result = _run("kill-worker", "rabbitmq")
    _all_completed_in_order(result)
    assert result.duplicates == 1


def test_rabbitmq_restart_during_flow_loses_nothing_accepted() -> None:
    """stop_app / start_app while posting: posts made while RabbitMQ is away are refused (503),
    never accepted then dropped; the engine reconnects and delivers every accepted one."""
    assert shutil.which("rabbitmqctl"), "this test restarts the local RabbitMQ: no rabbitmqctl"
    result = _run("rabbitmq-restart", "rabbitmq")
    _all_completed_in_order(result)
    assert result.duplicates == 0
    assert result.sent > result.accepted, "no post met RabbitMQ down: the fault was not hit"


def test_ehr_down_then_up_delivers_everything_queued_in_order() -> None:
    """The route's worker is the same on both backends; the bench runs this on both."""
    result = _run("ehr-down", "embedded")
    _all_completed_in_order(result)
    assert result.sent == result.accepted  # the API keeps accepting while the EHR is away
    assert result.duplicates == 0


def test_ehr_answering_garbage_gives_up_after_max_attempts() -> None:
    result = _run("ehr-garbage", "embedded")
    assert result.problems == []
    assert result.statuses == {"entered-in-error": result.accepted}
    attempts = int(faults.SHORT_RETRY["max_attempts"])
    for row in result.store.values():
        assert row.reason is not None
        assert row.reason.startswith(f"gave up after {attempts} attempts: ")
        assert "not a valid HL7 ACK" in row.reason
    assert result.dead_letters == result.accepted  # each given-up item, for an operator


def test_ehr_acking_past_the_timeout_is_resent_and_completes() -> None:
    """The first ACK of each document comes after ack_timeout: the engine drops the connection,
    does not take the late ACK for the next message's, and the resend completes."""
    result = _run("ehr-slow", "embedded")
    assert result.problems == []
    assert result.statuses == {"completed": result.accepted}
    assert set(result.receipts.values()) == {2}
    assert result.order_violations == 0


def test_ehr_closing_mid_frame_gives_up_after_max_attempts() -> None:
    result = _run("ehr-close-mid-frame", "embedded")
    assert result.problems == []
    assert result.statuses == {"entered-in-error": result.accepted}
    for row in result.store.values():
        assert row.reason is not None and "middle of a frame" in row.reason
    assert result.dead_letters == result.accepted


def test_ehr_ack_ae_ends_entered_in_error_with_the_ehr_text_at_once() -> None:
    result = _run("ehr-ae", "embedded")
    assert result.problems == []
    assert result.statuses == {"entered-in-error": result.accepted}
    assert result.duplicates == 0
    for row in result.store.values():
        assert row.reason is not None and faults.ScriptedEhr.AE_TEXT in row.reason
    assert result.dead_letters == 0  # a refusal is final, not a delivery that gave up


def test_two_worker_processes_on_a_fifo_route_keep_the_order_sent() -> None:
    """One document's first attempt fails while the ones behind it wait: with two worker
    processes consuming the route, the EHR must still see the order in which they were sent."""
    result = _run("two-workers-fifo", "rabbitmq")
    _all_completed_in_order(result)


def test_two_engines_on_a_fifo_route_keep_the_order_sent() -> None:
    """The same with two whole engines (no --role) sharing one instance name."""
    result = _run("two-engines-fifo", "rabbitmq")
    _all_completed_in_order(result)


def test_a_lost_publish_confirm_does_not_overwrite_a_delivery_that_happened(
    lt: LoopThread, tmp_path: Path
) -> None:
    """A confirm can be lost after RabbitMQ queued the item (the API's connection drops, the
    confirm times out), while a worker on another connection consumes it at once. There is no
    way to lose exactly that confirm from outside, so ``publish`` is wrapped: the real publish,
    then wait until the worker completed the delivery, then fail as a lost confirm does."""
    instance = f"mcconfirm-{uuid.uuid4().hex[:8]}"
    broker, store_url = rabbitmq_url(), fresh_postgres_url()
    try:
        with running_engine(lt, tmp_path, broker=broker, store=store_url, instance=instance) as r:
            store = r.engine.store
            publish = r.engine.broker.publish

            async def publish_then_lose_the_confirm(item: WorkItem) -> None:
                await publish(item)
                async with asyncio.timeout(20):
                    while True:
                        rows = await store.run(store.sync.deliveries_of, item.transaction_id)
                        if rows and rows[0].status is Status.COMPLETED:
                            break
                        await asyncio.sleep(0.02)
                raise BrokerError("connection to RabbitMQ lost before the confirm")

            r.engine.broker.publish = publish_then_lose_the_confirm  # type: ignore[method-assign]
            patient = r.patient(name=[{"family": "Confirm", "given": ["Lost"]}])
            answer = r.send(patient, None, pdf_bytes())
            (message,) = r.ehr.received  # the EHR has the document
            txid = message_control_id(message)
            (row,) = store.sync.deliveries_of(txid)
            # The status must say what happened ...
            assert row.status is Status.COMPLETED, f"{row.status}: {row.reason}"
            # ... and the sender must not be told to send again: its resend would reach the EHR
            # as a second copy under another MSH-10, a duplicate nobody can recognise.
            assert answer.status_code == 200, answer.text
    finally:
        asyncio.run(faults.delete_amqp_topology(broker, instance))
