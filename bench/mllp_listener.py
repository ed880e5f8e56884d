#!/usr/bin/env python3
"""Inbound MLLP: ACKs per second and ACK latency of our listener against two other servers.

Each server runs in its own process, on 127.0.0.1 only:

- ``medcourier listener, null sink``: :class:`MllpListener` with a sink that only returns
  ACCEPT, i.e. the channel's own cost (MSH checks, charset, ACK); the engine-integrated figure,
  with its commit before each ACK, is another benchmark;
- ``python-hl7 asyncio server``: ``hl7.mllp.start_hl7_server`` with a handler that parses each
  message (``hl7.parse``, through ``readmessage``) and answers ``message.create_ack()``;
- ``@medplum/hl7 Hl7Server (node)``: installed with npm into a temporary directory, answering
  ``message.buildAck()``; reported as unavailable when node/npm or the install is missing.

The load generator is one asyncio process: N connections, each sending its share of a fixed
number of messages back to back and waiting for each ACK (MLLP is request/response). It shares
the machine with the server, so absolute figures are a floor; the ratios are the point.

    .venv/bin/python bench/mllp_listener.py
    .venv/bin/python bench/mllp_listener.py --adt-count 1000 --oru-count 100 --connections 1,8

Not a test: nothing is asserted (beyond every answer being an AA for the right message).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hl7.mllp
import structlog

from medcourier.channels.mllp.framing import frame, read_frame
from medcourier.channels.mllp.listener import ListenerOptions, MllpListener
from medcourier.engine.event_loop import loop_factory
from medcourier.engine.inbound import InboundDocument, InboundMessage, InboundResult, Verdict

HOST = "127.0.0.1"
MEDCOURIER = "medcourier listener, null sink"
PYTHON_HL7 = "python-hl7 asyncio server"
MEDPLUM = "@medplum/hl7 Hl7Server (node)"
ENGINE_EMBEDDED = "medcourier engine, embedded (persists before ACK)"
ENGINE_RABBITMQ = "medcourier engine, RabbitMQ+PostgreSQL (persists before ACK)"
JOURNAL_EMBEDDED = "medcourier engine, embedded, ack after journal"
JOURNAL_RABBITMQ = "medcourier engine, RabbitMQ+PostgreSQL, ack after journal"
RECEIPT_EMBEDDED = "medcourier engine, embedded, ack after receipt"
RECEIPT_RABBITMQ = "medcourier engine, RabbitMQ+PostgreSQL, ack after receipt"
JOURNALED = (JOURNAL_EMBEDDED, JOURNAL_RABBITMQ, RECEIPT_EMBEDDED, RECEIPT_RABBITMQ)
ENGINES = {  # row label: (backend, ack_after)
    ENGINE_EMBEDDED: ("embedded", "apply"),
    ENGINE_RABBITMQ: ("rabbitmq", "apply"),
    JOURNAL_EMBEDDED: ("embedded", "journal"),
    JOURNAL_RABBITMQ: ("rabbitmq", "journal"),
    RECEIPT_EMBEDDED: ("embedded", "receipt"),
    RECEIPT_RABBITMQ: ("rabbitmq", "receipt"),
}
DRAIN_TIMEOUT = 900.0
RABBIT = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
READ_LIMIT = 4 * 1024 * 1024
START_TIMEOUT = 30.0

NODE_SERVER = r"""
// Bench server: @medplum/hl7's Hl7Server answering every message with its own buildAck().
const net = require('node:net');
// Hl7Server.start(port) listens on every interface; keep the bench on loopback.
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (port, ...rest) {
  return typeof port === 'number' ? listen.call(this, port, '127.0.0.1', ...rest)
                                  : listen.call(this, port, ...rest);
};
const { Hl7Server } = require('@medplum/hl7');
const server = new Hl7Server((connection) => {
  connection.addEventListener('message', ({ message }) => connection.send(message.buildAck()));
});
server.start(0, 'utf-8');
server.server.once('listening', () => console.log(`PORT ${server.server.address().port}`));
process.on('SIGTERM', () => process.exit(0));
"""


# --- messages ------------------------------------------------------------------------------------


def adt_a01(control_id: str) -> bytes:
    """An ADT^A01 of about 2 KB (a fictitious patient with the usual segments)."""
    segments = [
        "MSH|^~\\&|ADTSYS^1.2.250.1.71^ISO|HOSP|MEDCOURIER|HOSP|20240102030405||ADT^A01^ADT_A01"
        f"|{control_id}|P|2.5|||||FRA|UNICODE UTF-8",
        "EVN|A01|20240102030405|||OP123^OPERATOR^JANE",
        "PID|1||123456789^^^HOSP^PI~1800199123456^^^ASIP-SANTE-INS-NIR^INS||BENCHPATIENT^JEAN"
        "^PIERRE^^^^L~BENCHPATIENT^JEAN^^^^^D||19800101|M|||12 RUE DE LA PAIX^^PARIS^^75002^FRA"
        "^H||0102030405^PRN^PH~0607080910^PRN^CP|||M||VN123456^^^HOSP^AN|||||PARIS",
        "PD1|||HOSP^^HOSP|10003123456^DOCTOR^FAMILY^^^DR^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO",
        "NK1|1|BENCHPATIENT^MARIE|SPO^Spouse^HL70063|12 RUE DE LA PAIX^^PARIS^^75002^FRA"
        "|0102030406^PRN^PH",
        "PV1|1|I|CARDIO^101^1^HOSP^^^^^CARDIOLOGIE||||10003123456^CARDIO^ANNE^^^DR|||CAR||||1"
        "|||10003123456^CARDIO^ANNE^^^DR|IN|VN123456^^^HOSP^VN|||||||||||||||||||||||||"
        "20240102030000",
        "PV2|||CHEST PAIN^Chest pain, unspecified",
    ]
    for n in range(1, 4):
        segments.append(f"OBX|{n}|NM|8302-2^Body height^LN||{170 + n}|cm^cm^UCUM|||||F")
    for n in range(1, 4):
        segments.append(f"AL1|{n}|DA|70618^Penicillin^RXNORM|MO|Rash|20200101")
    segments.append("DG1|1||I20.9^Angina pectoris, unspecified^I10||20240102|A")
    text = "\r".join(segments) + "\r"
    padding = 2048 - len(text) - len("ZBE|1||\r")
    return (text + f"ZBE|1||{'x' * max(0, padding)}\r").encode()


_PDF = base64.b64encode(b"%PDF-1.4\n" + os.urandom(47 * 1024)).decode()


def oru_r01(control_id: str) -> bytes:
    """An ORU^R01 of about 64 KB: a report with an embedded (random) PDF, base64 in OBX-5."""
    segments = [
        "MSH|^~\\&|LABSYS^1.2.250.1.99^ISO|LAB|MEDCOURIER|HOSP|20240102030405||ORU^R01^ORU_R01"
        f"|{control_id}|P|2.5|||||FRA|UNICODE UTF-8",
        "PID|1||123456789^^^HOSP^PI||BENCHPATIENT^JEAN||19800101|M",
        "PV1|1|I|CARDIO^101^1",
        "ORC|RE|ORD1|REP1",
        "OBR|1|ORD1|REP1|11502-2^Laboratory report^LN|||20240102030405",
        f"OBX|1|ED|11502-2^Laboratory report^LN||^application^pdf^Base64^{_PDF}||||||F",
    ]
    return ("\r".join(segments) + "\r").encode()


MESSAGES: dict[str, Callable[[str], bytes]] = {"ADT^A01 2KB": adt_a01, "ORU^R01 64KB": oru_r01}


# --- servers (each in its own process) -----------------------------------------------------------


async def serve_medcourier() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings

    class NullSink:
        async def hl7_message(self, message: InboundMessage) -> InboundResult:
            return InboundResult(Verdict.ACCEPT)

        async def document(self, document: InboundDocument) -> InboundResult:
            raise NotImplementedError

    listener = MllpListener(ListenerOptions(host=HOST, port=0), NullSink(), "bench")
    await listener.start()
    print(f"PORT {listener.port}", flush=True)
    await asyncio.Event().wait()


async def serve_engine(backend: str, ack_after: str) -> None:
    """The whole engine: ADT upserts the directory, ORU stores and queues a document (delivered
    to a simulated EHR in the same process), and only then is the message ACKed
    (``ack_after: apply``). With ``journal``, the message is ACKed once checked and journaled;
    with ``receipt``, once journaled unread; both are applied just after, and the store's URL is
    printed for the loader to watch the journal drain."""
    import signal
    import uuid

    import sqlalchemy as sa
    import yaml

    from medcourier.channels.mllp.simulator import EhrSimulator
    from medcourier.engine.config import parse_config
    from medcourier.engine.plugins import load_plugins
    from medcourier.engine.service import Engine

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    ehr = EhrSimulator(host=HOST)
    await ehr.start()
    instance = f"mllpbench-{uuid.uuid4().hex[:8]}"
    db = instance.replace("-", "_")
    admin_url = POSTGRES.replace("postgresql://", "postgresql+psycopg://", 1)
    with tempfile.TemporaryDirectory(prefix="mllp-bench-engine-") as tmp:
        cfg: dict[str, object] = {
            "instance": instance,
            "data_dir": tmp,
            "log_level": "warning",
            "inbound": [
                {
                    "name": "bench-in",
                    "channel": "mllp",
                    "host": HOST,
                    "port": 0,
                    "max_message_bytes": READ_LIMIT,
                    "ack_after": ack_after,
                }
            ],
            "routes": [
                {
                    "name": "bench-ehr",
                    "match": {"fallback": True},
                    "format": "hl7v2-oru",
                    "deliver": {"connector": "mllp", "host": HOST, "port": ehr.port},
                }
            ],
        }
        if backend == "rabbitmq":
            admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(sa.text(f'CREATE DATABASE "{db}"'))
            cfg["broker"] = RABBIT
            cfg["store"] = POSTGRES.rsplit("/", 1)[0] + f"/{db}"
        plugins = load_plugins()
        engine = Engine(parse_config(yaml.safe_dump(cfg), plugins, "bench.yaml"), plugins)
        await engine.start(http=False)
        print(f"STORE {engine.store.sync.url}", flush=True)
        print(f"PORT {engine.inbound[0].port}", flush=True)  # type: ignore[attr-defined]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await engine.stop()
        await ehr.stop()
        if backend == "rabbitmq":
            import pika

            conn = pika.BlockingConnection(
                pika.URLParameters(RABBIT.replace(":5672//", ":5672/%2F"))
            )
            channel = conn.channel()
            channel.queue_delete(f"{instance}.route.bench-ehr")
            channel.exchange_delete(f"{instance}.routes")
            conn.close()
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


async def serve_python_hl7() -> None:
    async def handle(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while True:
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await hl7.mllp.start_hl7_server(handle, HOST, 0, limit=READ_LIMIT, encoding="utf-8")
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


@dataclass
class Server:
    label: str
    process: subprocess.Popen[str]
    port: int
    store: str | None = None  # the engine's store URL, printed by an engine server

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_process(label: str, command: list[str], cwd: Path | None = None) -> Server:
    """Run a server and wait for the ``PORT n`` line it prints once listening."""
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    store = None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("STORE "):
            store = line.split(maxsplit=1)[1].strip()
        if line.startswith("PORT "):
            return Server(label, process, int(line.split()[1]), store)
        if not line and process.poll() is not None:
            break
    process.kill()
    _out, err = process.communicate()
    raise RuntimeError(f"{label} did not start: {err.strip()[-300:] or 'no output'}")


def install_medplum(directory: Path) -> Path:
    """``npm install @medplum/hl7`` into ``directory``; return the server script's path."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("node or npm not found")
    result = subprocess.run(
        ["npm", "install", "--prefix", str(directory), "--no-audit", "--no-fund", "@medplum/hl7"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm install failed: {result.stderr.strip()[-200:]}")
    script = directory / "server.js"
    script.write_text(NODE_SERVER)
    return script


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Figures:
    acks_per_second: float
    p50_ms: float
    p99_ms: float
    failures: int
    applied_per_second: float | None = None  # journaled: received to journal empty


async def one_connection(port: int, frames: list[bytes], latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection(HOST, port, limit=READ_LIMIT)
    failures = 0
    try:
        for data, control_id in frames_with_ids(frames):
            started = time.perf_counter()
            writer.write(data)
            await writer.drain()
            ack = await read_frame(reader, READ_LIMIT)
            latencies.append(time.perf_counter() - started)
            if b"MSA|AA|" + control_id not in ack:
                failures += 1
    finally:
        writer.close()
        await writer.wait_closed()
    return failures


def frames_with_ids(frames: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Each frame with its MSH-10 (the 10th field of the first segment)."""
    return [(data, data[1:].split(b"\r", 1)[0].split(b"|")[9]) for data in frames]


async def load(
    port: int,
    build: Callable[[str], bytes],
    connections: int,
    count: int,
    journal: str | None = None,
) -> Figures:
    share = [
        count // connections + (1 if i < count % connections else 0) for i in range(connections)
    ]
    # A run prefix per load: the engine ACKs a resent MSH-10 without processing it again, so
    # ids reused across the warm-up and the cases would measure skipped duplicates.
    run = uuid.uuid4().hex[:8]
    batches = [
        [frame(build(f"B{run}-{c}-{n}")) for n in range(share[c])] for c in range(connections)
    ]
    latencies: list[float] = []
    started = time.perf_counter()
    failures = await asyncio.gather(*(one_connection(port, b, latencies) for b in batches))
    elapsed = time.perf_counter() - started
    applied = None
    if journal is not None:  # the next case starts once this one's messages are applied
        await asyncio.to_thread(wait_journal_empty, journal)
        applied = count / (time.perf_counter() - started)
    latencies.sort()
    return Figures(
        acks_per_second=len(latencies) / elapsed,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        failures=sum(failures) + count - len(latencies),
        applied_per_second=applied,
    )


def wait_journal_empty(store_url: str) -> None:
    """Poll the engine's journal (its own store, read beside it) until every row is applied."""
    import sqlalchemy as sa

    from medcourier.engine.schema import inbound_journal

    db = sa.create_engine(store_url)
    q = sa.select(sa.func.count()).select_from(inbound_journal)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            with db.connect() as c:
                if c.execute(q).scalar_one() == 0:
                    return
            time.sleep(0.01)
        raise RuntimeError("the journal did not drain")
    finally:
        db.dispose()


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adt-count", type=int, default=4000, help="ADT messages per case")
    parser.add_argument("--oru-count", type=int, default=500, help="ORU messages per case")
    parser.add_argument("--connections", default="1,8,32", help="comma-separated counts")
    parser.add_argument(
        "--serve",
        choices=[
            "medcourier",
            "python-hl7",
            *(f"engine-{backend}-{ack_after}" for backend, ack_after in ENGINES.values()),
        ],
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per case; the table shows the run of median ACK/s (runs on this 2-core VM "
        "vary by up to a third from one to the next)",
    )
    parser.add_argument("--no-engine", action="store_true", help="skip the whole-engine rows")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated row labels (or unique parts of them) to run, default all",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    # Our listener and engine run on the loop `medcourier run` uses (uvloop unless
    # MEDCOURIER_EVENT_LOOP=asyncio); python-hl7's server on asyncio's, as it ships.
    if args.serve == "medcourier":
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_medcourier())
        return 0
    if args.serve == "python-hl7":
        asyncio.run(serve_python_hl7())
        return 0
    if args.serve and args.serve.startswith("engine-"):
        _engine, backend, ack_after = args.serve.split("-")
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve_engine(backend, ack_after))
        return 0

    connection_counts = [int(n) for n in args.connections.split(",")]
    counts = {"ADT^A01 2KB": args.adt_count, "ORU^R01 64KB": args.oru_count}
    me = [sys.executable, str(Path(__file__).resolve())]
    results: dict[tuple[str, str, int], Figures | str] = {}
    with tempfile.TemporaryDirectory(prefix="mllp-bench-") as tmp:
        starters: list[tuple[str, Callable[[], Server]]] = [
            (MEDCOURIER, lambda: start_process(MEDCOURIER, [*me, "--serve", "medcourier"])),
            (PYTHON_HL7, lambda: start_process(PYTHON_HL7, [*me, "--serve", "python-hl7"])),
            (MEDPLUM, lambda: start_medplum(Path(tmp))),
        ]
        if not args.no_engine:
            starters += [
                (label, engine_starter(label, [*me, "--serve", f"engine-{backend}-{ack_after}"]))
                for label, (backend, ack_after) in ENGINES.items()
            ]
        only = [part.strip() for part in args.only.split(",") if part.strip()]
        if only:
            starters = [(lb, st) for lb, st in starters if any(o in lb for o in only)]
        for label, start in starters:
            try:
                server = start()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                for kind in MESSAGES:
                    for n in connection_counts:
                        results[label, kind, n] = f"unavailable: {exc}"
                continue
            journal = server.store if label in JOURNALED else None
            try:
                asyncio.run(load(server.port, adt_a01, 4, 200, journal))  # warm-up
                for kind, build in MESSAGES.items():
                    if not counts[kind]:
                        continue  # --adt-count 0 / --oru-count 0: that message is not run
                    for n in connection_counts:
                        runs = [
                            asyncio.run(load(server.port, build, n, counts[kind], journal))
                            for _ in range(args.repeat)
                        ]
                        results[label, kind, n] = median_run(runs)
                        print(f"  done: {label}, {kind}, {n} conn", file=sys.stderr, flush=True)
            finally:
                server.stop()
    if args.repeat > 1:
        print(f"each row: the run of median ACK/s of {args.repeat}")
    print_table(results, connection_counts)
    return 0


def median_run(runs: list[Figures]) -> Figures:
    """The run of median ACK rate (the lower middle one of an even number), whole: its latency
    and applied rate go with it rather than medians taken from different runs."""
    ordered = sorted(runs, key=lambda figures: figures.acks_per_second)
    return ordered[(len(ordered) - 1) // 2]


def engine_starter(label: str, command: list[str]) -> Callable[[], Server]:
    return lambda: start_process(label, command)


def start_medplum(directory: Path) -> Server:
    script = install_medplum(directory)
    return start_process(MEDPLUM, ["node", str(script)], cwd=directory)


def print_table(results: dict[tuple[str, str, int], Figures | str], connections: list[int]) -> None:
    print(f"{'server':<60} {'message':<13} {'conns':>5} {'ACK/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'vs python-hl7':>14} {'applied/s':>10}")  # fmt: skip
    print("-" * 134)
    for kind in MESSAGES:
        for n in connections:
            baseline = results.get((PYTHON_HL7, kind, n))
            labels = (MEDCOURIER, *ENGINES, PYTHON_HL7, MEDPLUM)
            for label in labels:
                if (label, kind, n) not in results:
                    continue
                figures = results.get((label, kind, n))
                if not isinstance(figures, Figures):
                    print(f"{label:<60} {kind:<13} {n:>5}  {figures}")
                    continue
                ratio = (
                    f"{figures.acks_per_second / baseline.acks_per_second:.2f}x"
                    if isinstance(baseline, Figures)
                    else "-"
                )
                failed = f"  ({figures.failures} failed)" if figures.failures else ""
                applied = figures.applied_per_second
                drained = f"{applied:>10,.0f}" if applied is not None else f"{'':>10}"
                print(
                    f"{label:<60} {kind:<13} {n:>5} {figures.acks_per_second:>9,.0f} "
                    f"{figures.p50_ms:>8.2f} {figures.p99_ms:>8.2f} {ratio:>14} {drained}{failed}"
                )
        print()


if __name__ == "__main__":
    sys.exit(main())
