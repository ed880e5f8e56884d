"""Ordering and retries across the queue: FIFO routes hold, parallel routes spread and park
failing documents in delay queues, the last attempt dead-letters, and several engine processes
share one RabbitMQ route without breaking its order.

The EHR here is a real MLLP server on a real socket that can be slow, or drop chosen messages
without an ACK, and counts how many messages it holds at once.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from medcourier.channels.mllp.ack import build_ack, message_control_id
from medcourier.channels.mllp.framing import frame, read_frame
from medcourier.engine.broker.amqp import amqp_parameters
from medcourier.engine.config import RetrySettings, parse_config
from medcourier.engine.plugins import load_plugins
from medcourier.engine.service import Engine
from tests.harness import LoopThread, Running, free_port, pdf_bytes, running_engine
from tests.services import fresh_postgres_url, rabbitmq_url


class SlowEhr:
    """An MLLP EHR that ACKs after ``delay`` and closes without an ACK for messages whose
    control id is in ``drop`` (as many times as the count says)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.drop: dict[str, int] = {}
        self.order: list[str] = []
        self.holding = 0
        self.most_held = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                message = await read_frame(reader)
                control = message_control_id(message)
                if self.drop.get(control, 0) > 0:
                    self.drop[control] -= 1
                    writer.close()
                    return
                self.holding += 1
                self.most_held = max(self.most_held, self.holding)
                await asyncio.sleep(self.delay)
                self.holding -= 1
                self.order.append(control)
                writer.write(frame(build_ack(message, "AA")))
                await writer.drain()
        except Exception:
            writer.close()


def parallel_route(port: int, **settings: Any) -> dict[str, Any]:
    return {
        "name": "fast-lane",
        "match": {"organizations": ["Organization/parallel"]},
        "format": "hl7v2-oru",
        "deliver": {"connector": "mllp", "host": "127.0.0.1", "port": port, "ack_timeout": 5},
        "ordering": "parallel",
        "concurrency": 4,
        "retry": {"max_attempts": 5, "initial_delay": 0.3, "max_delay": 1},
        **settings,
    }


@pytest.fixture()
def slow_ehr(lt: LoopThread) -> Iterator[SlowEhr]:
    ehr = SlowEhr()
    lt.run(ehr.start())
    yield ehr
    lt.run(ehr.stop())


@pytest.fixture(params=["embedded", "rabbitmq", "rabbitmq-quorum"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    return {
        "broker": rabbitmq_url(),
        "store": fresh_postgres_url(),
        "instance": f"mcorder-{uuid.uuid4().hex[:8]}",
        "quorum_queues": request.param == "rabbitmq-quorum",
    }


def _send_many(r: Running, count: int, organization: str) -> list[str]:
    patient = r.patient(
        name=[{"family": "ORDRE"}],
        managingOrganization={"reference": f"Organization/{organization}"},
    )
    txids = []
    for _ in range(count):
        answer = r.send(patient, None, pdf_bytes(2000))
        assert answer.status_code == 200, answer.text
        txids.append(answer.json()["parameter"][1]["valueString"])
    return txids


def test_jitter_stays_in_its_band_and_under_the_cap() -> None:
    retry = RetrySettings(initial_delay=1, multiplier=2, max_delay=60, jitter=0.2)
    assert retry.delay(1, draw=0.0) == pytest.approx(0.8)
    assert retry.delay(1, draw=0.999999) == pytest.approx(1.2, rel=1e-4)
    assert retry.delay(3, draw=0.5) == pytest.approx(4.0)
    assert all(retry.delay(20) <= 60 for _ in range(100))
    assert len({retry.delay(4) for _ in range(20)}) > 1  # drawn, not fixed


def test_concurrency_needs_a_parallel_route(tmp_path: Path) -> None:
    from medcourier.engine.errors import ConfigError

    route = {**parallel_route(1), "ordering": "fifo"}
    text = yaml.safe_dump({"data_dir": str(tmp_path), "routes": [route]})
    with pytest.raises(ConfigError, match="concurrency above 1 needs ordering: parallel"):
        parse_config(text, load_plugins(), "t.yaml", env={})


def test_a_parallel_route_has_several_deliveries_in_flight(
    lt: LoopThread, tmp_path: Path, slow_ehr: SlowEhr, backend: dict[str, Any]
) -> None:
    slow_ehr.delay = 0.3
    with running_engine(lt, tmp_path, extra_routes=[parallel_route(slow_ehr.port)], **backend) as r:
        txids = _send_many(r, 12, "parallel")
        for txid in txids:
            r.wait_status(txid, {"completed"})
    assert slow_ehr.most_held >= 3  # up to 4 at once
    assert sorted(slow_ehr.order) == sorted(txids)


def test_a_failing_document_waits_in_a_delay_queue_while_the_others_go_on(
    lt: LoopThread, tmp_path: Path, slow_ehr: SlowEhr, backend: dict[str, Any]
) -> None:
    with running_engine(
        lt, tmp_path, extra_routes=[parallel_route(slow_ehr.port, concurrency=1)], **backend
    ) as r:
        patient = r.patient(
            name=[{"family": "ORDRE"}],
            managingOrganization={"reference": "Organization/parallel"},
        )
        # the first document is dropped twice before it is ACKed; with one slot, a held route
        # would make every later document wait for it
        first = r.send(patient, None, pdf_bytes(2000)).json()["parameter"][1]["valueString"]
        slow_ehr.drop[first] = 2
        later = [
            r.send(patient, None, pdf_bytes(2000)).json()["parameter"][1]["valueString"]
            for _ in range(5)
        ]
        done = r.wait_status(first, {"completed"})
        for txid in later:
            r.wait_status(txid, {"completed"})
    notes = [n["text"] for n in done["entry"][0]["resource"]["note"]]
    assert any("attempt 1 failed" in n for n in notes)
    assert any("attempt 2 failed" in n for n in notes)
    assert slow_ehr.order.index(first) > 0  # the others overtook it while it waited
    assert set(slow_ehr.order) == {first, *later}


def test_the_last_attempt_goes_to_the_dead_letter_queue(lt: LoopThread, tmp_path: Path) -> None:
    instance = f"mcdead-{uuid.uuid4().hex[:8]}"
    url = rabbitmq_url()
    with running_engine(
        lt,
        tmp_path,
        ehr_up=False,
        broker=url,
        store=fresh_postgres_url(),
        instance=instance,
        retry={"max_attempts": 2, "initial_delay": 0.1, "max_delay": 0.2},
    ) as r:
        txid = _send_many(r, 1, "demo-hl7")[0]
        bundle = r.wait_status(txid, {"entered-in-error"})
    resource = bundle["entry"][0]["resource"]
    assert "gave up after 2 attempts" in resource["statusReason"]["text"]
    assert sum("attempt 1 failed" in n["text"] for n in resource["note"]) == 1
    connection = pika.BlockingConnection(amqp_parameters(url))
    try:
        channel = connection.channel()
        method, properties, body = channel.basic_get(f"{instance}.route.ehr-a.dead", auto_ack=True)
        assert method is not None, "nothing on the dead-letter queue"
        assert properties.message_id == txid
        assert b'"attempt":2' in body
        assert properties.headers["x-medcourier-reason"]  # the last attempt's reason
        for suffix in ("", ".dead"):
            channel.queue_delete(f"{instance}.route.ehr-a{suffix}")
    finally:
        connection.close()


def test_engines_sharing_a_fifo_route_keep_its_order(lt: LoopThread, tmp_path: Path) -> None:
    """An API process and two worker processes (here: three engines on one loop) on one
    RabbitMQ and one PostgreSQL: single-active-consumer gives the route to one worker at a time,
    so the EHR sees the documents in the order they were accepted."""
    from medcourier.channels.mllp.simulator import EhrSimulator
    from tests.harness import engine_config

    # The EHR is down while the documents are accepted, so they queue up: without
    # single-active-consumer each worker would hold one and retry it, and whichever retried
    # first once the EHR is back would overtake the other.
    ehr = EhrSimulator(port=free_port())
    backend = {
        "broker": rabbitmq_url(),
        "store": fresh_postgres_url(),
        "instance": f"mcsac-{uuid.uuid4().hex[:8]}",
        "retry": {"max_attempts": 200, "initial_delay": 0.05, "max_delay": 0.2},
    }
    plugins = load_plugins()
    engines = []
    try:
        for role in ("worker", "worker", "api"):
            text = engine_config(tmp_path / role, ehr.port, **backend)
            engine = Engine(parse_config(text, plugins, "t.yaml", env=os.environ), plugins)
            lt.run(engine.start(role=role))
            engines.append(engine)
        api = engines[-1]
        assert api.workers == {} and engines[0].workers  # roles split the work
        running = Running(lt, api, ehr)
        txids = _send_many(running, 40, "demo-hl7")
        lt.run(ehr.start())
        for txid in txids:
            running.wait_status(txid, {"completed"})
        running.http.close()
        # the first worker stops: the route fails over to the second, still in order
        lt.run(engines[0].stop())
        engines.pop(0)
        running = Running(lt, api, ehr)
        more = _send_many(running, 10, "demo-hl7")
        for txid in more:
            running.wait_status(txid, {"completed"})
        running.http.close()
    finally:
        for engine in engines:
            lt.run(engine.stop())
        lt.run(ehr.stop())
    received = [m.split(b"\r")[0].split(b"|")[9].decode() for m in ehr.received]
    assert received == txids + more


def test_roles_other_than_all_need_rabbitmq(lt: LoopThread, tmp_path: Path) -> None:
    from tests.harness import engine_config

    plugins = load_plugins()
    engine = Engine(
        parse_config(engine_config(tmp_path, 1), plugins, "t.yaml", env=os.environ), plugins
    )
    try:
        with pytest.raises(ValueError, match="needs RabbitMQ"):
            lt.run(engine.start(role="worker"))
    finally:
        engine.store.close()
