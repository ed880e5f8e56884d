#!/usr/bin/env python3
"""Fault injection: break one thing while documents flow, then count what was lost.

Each scenario starts real processes on 127.0.0.1: the engine (`medcourier run` on a config
written for the scenario, with its own instance name, data directory and, on RabbitMQ, its own
PostgreSQL database), an EHR (the `medcourier simulate-ehr` process, or an MLLP server in this
script when the EHR has to misbehave on cue), and a loader posting `$send-to-ehr` at a steady rate
from one sequential HTTP client, so the order in which documents were accepted is known.

After the fault, the scenario waits until every accepted document is final in the store, then
compares three records: the loader's (which posts got a 200 and a transaction id), the EHR's (every
MSH-10 it received, in arrival order) and the store's (status, attempts and status history of each
delivery). Per scenario it reports:

- sent / accepted: posts made, and posts answered 200 with a transaction id;
- delivered: accepted documents the EHR received at least once;
- lost: accepted documents that are missing from the store, not final in the end, or `completed`
  although the EHR never received them (must be 0);
- duplicates: extra receipts of an MSH-10 the EHR already had;
- order violations: accepted documents that reached the EHR (first receipt) after a document
  accepted later than them;
- inconsistent: deliveries whose status disagrees with their own history, `completed` without a
  sent time, or duplicates the store cannot explain (no second claim, no retry recorded).

    .venv/bin/python bench/faults.py                          # every scenario, both backends
    .venv/bin/python bench/faults.py --backend embedded --only kill-engine --count 50
    .venv/bin/python bench/faults.py --markdown               # the table for docs/reliability.md

Scenarios (`--only`): kill-engine, kill-worker, rabbitmq-restart, ehr-down, ehr-garbage, ehr-slow,
ehr-close-mid-frame, ehr-ae, two-workers-fifo, two-engines-fifo. Those needing RabbitMQ run on
the rabbitmq backend only.

`rabbitmq-restart` stops and starts the RabbitMQ application of the node on this machine
(`rabbitmqctl stop_app` / `start_app`): run it on your own machine only. The node name, users,
vhosts and permissions are compared before and after, and the application is always started
again. `tests/test_faults.py` runs the same scenarios with small counts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import yaml

from medcourier.channels.mllp.ack import AckParseError, build_ack, message_control_id
from medcourier.channels.mllp.framing import FramingError, frame, read_frame
from medcourier.engine.broker.amqp import amqp_parameters
from medcourier.engine.schema import deliveries, status_events

CLI = [sys.executable, "-m", "medcourier.engine.cli"]
TOKEN = "faults-token-" + uuid.uuid4().hex
ROUTE = "ehr"
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FINAL = ("completed", "entered-in-error")

# A real one-page PDF, a little over 2 KB.
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n%"
    + b"faults " * 300
    + b"\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)

# The policy of the misbehaving-EHR scenarios: short, so that giving up takes seconds.
SHORT_RETRY = {"max_attempts": 3, "initial_delay": 0.2, "max_delay": 1.0, "multiplier": 2.0}
SHORT_ACK_TIMEOUT = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the EHRs


class ScriptedEhr:
    """An MLLP EHR in this process that misbehaves on cue.

    ``mode``: ``aa`` answers AA; ``ae`` answers AE with an ERR text; ``garbage`` answers a
    well-framed answer that is not HL7; ``slow`` answers the first receipt of each MSH-10 after
    ``slow_delay`` seconds (past the route's ack_timeout), later receipts at once; ``midframe``
    sends the first half of an ACK frame and closes the connection.

    ``hold_next()`` makes the next message wait for its ACK until ``release()``: the engine is
    then mid-delivery for as long as the test wants. ``drop_first_of`` names the n-th distinct
    message (1-based) whose first receipt is answered by closing the connection, a transient
    failure the route must wait out.
    """

    AE_TEXT = "patient unknown in this EHR"

    def __init__(
        self, mode: str = "aa", *, slow_delay: float = 0.0, drop_first_of: int | None = None
    ) -> None:
        if mode not in ("aa", "ae", "garbage", "slow", "midframe"):
            raise ValueError(f"unknown EHR mode {mode!r}")
        self.mode = mode
        self.slow_delay = slow_delay
        self.drop_first_of = drop_first_of
        self.received: list[str] = []
        self.held = asyncio.Event()
        self._hold = False
        self._released = asyncio.Event()
        self._seen: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", port, limit=64 * 1024 * 1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        self._released.set()
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()

    def hold_next(self) -> None:
        self.held.clear()
        self._released.clear()
        self._hold = True

    def release(self) -> None:
        self._hold = False
        self._released.set()

    def received_ids(self) -> list[str]:
        return list(self.received)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                message = await read_frame(reader)
                if not await self._answer(message, writer):
                    return
        except (FramingError, OSError):
            pass  # the peer left (or was killed): the conversation is over
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await writer.wait_closed()

    async def _answer(self, message: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one message; False closes the connection."""
        try:
            control_id = message_control_id(message)
        except AckParseError:
            control_id = "?"
        self.received.append(control_id)
        self._seen[control_id] += 1
        first = self._seen[control_id] == 1
        if self._hold:
            self._hold = False
            self.held.set()
            await self._released.wait()
            return False
        if first and self.drop_first_of is not None and len(self._seen) == self.drop_first_of:
            return False
        if self.mode == "garbage":
            writer.write(frame(b"<html><body>502 Bad Gateway</body></html>\r"))
        elif self.mode == "midframe":
            ack = frame(build_ack(message, "AA"))
            writer.write(ack[: len(ack) // 2])
            await writer.drain()
            return False
        elif self.mode == "ae":
            writer.write(frame(build_ack(message, "AE", self.AE_TEXT, error=self.AE_TEXT)))
        else:
            if self.mode == "slow" and first:
                await asyncio.sleep(self.slow_delay)
            writer.write(frame(build_ack(message, "AA")))
        await writer.drain()
        return True


class SimulatorEhr:
    """The `medcourier simulate-ehr` process; stopping it is the EHR going down.

    Each start writes to a fresh folder; the simulator names its files ``NNNNNN-<MSH-10>.hl7`` in
    arrival order, which is how the receipts are read back.
    """

    def __init__(self, work: Path, port: int) -> None:
        self.work = work
        self.port = port
        self.phases: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        out = self.work / f"ehr-{len(self.phases) + 1}"
        self.phases.append(out)
        with (self.work / "ehr.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "simulate-ehr", "--port", str(self.port), "--out", str(out)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulate-ehr exited: see {self.work / 'ehr.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("simulate-ehr did not start listening")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    def received_ids(self) -> list[str]:
        found: list[str] = []
        for out in self.phases:
            if out.exists():
                names = sorted(p.name for p in out.glob("*.hl7"))
                found += [n.split("-", 1)[1].removesuffix(".hl7") for n in names]
        return found


# --------------------------------------------------------------------------- the engine


class EngineProcess:
    """One `medcourier run` process; its JSON log lines are appended to one file per process."""

    def __init__(
        self, config: Path, log: Path, http_port: int | None, role: str | None = None
    ) -> None:
        self.config = config
        self.log = log
        self.http_port = http_port
        self.role = role
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        args = [*CLI, "run", "--config", str(self.config)]
        if self.role is not None:
            args += ["--role", self.role]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1

    async def wait_up(self, timeout: float = 60) -> None:
        """Wait for /health (or, for a process without HTTP, for its "engine started" line)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the engine exited ({self.proc.returncode}): {self.tail()}")
                if self.http_port is None:
                    if self.count("engine started") >= self.starts:
                        return
                else:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get(f"{self.base}/health")).status_code == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the engine did not start within {timeout:g} s: {self.tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def events(self) -> list[dict[str, Any]]:
        found = []
        if self.log.exists():
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        found.append(json.loads(line))
        return found

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def engine_config(
    *,
    instance: str,
    data_dir: Path,
    http_port: int,
    ehr_port: int,
    broker: str | None,
    store: str | None,
    retry: dict[str, float] | None = None,
    ack_timeout: float = 5.0,
) -> str:
    route: dict[str, Any] = {
        "name": ROUTE,
        "match": {"fallback": True},
        "format": "hl7v2-oru",
        "deliver": {
            "connector": "mllp",
            "host": "127.0.0.1",
            "port": ehr_port,
            "ack_timeout": ack_timeout,
            "connect_timeout": 2,
        },
    }
    if retry is not None:
        route["retry"] = retry
    cfg: dict[str, Any] = {
        "instance": instance,
        "data_dir": str(data_dir),
        "broker": broker or "",
        "store": store or "",
        "log_level": "info",
        "http": {"host": "127.0.0.1", "port": http_port},
        "tokens": [
            {
                "name": "faults",
                "token": TOKEN,
                "scopes": ["SEND_TO_EHR", "PATIENT_CREATE", "PATIENT_READ"],
            }
        ],
        "pruning": {"enabled": False},
        "routes": [route],
    }
    return yaml.safe_dump(cfg)


def cli_has_role() -> bool:
    """Whether `medcourier run` takes ``--role`` (api / listener / worker / all)."""
    done = subprocess.run(
        [*CLI, "run", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return "--role" in done.stdout


# --------------------------------------------------------------------------- the loader


@dataclass
class Submission:
    index: int
    txid: str | None
    outcome: str  # "200", another HTTP status, or the transport error's type


class Loader:
    """Posts documents at ``rate`` per second until ``count`` were accepted (round-robin on
    ``bases``), giving up after ``5 × count`` posts.

    One sequential client: a document is posted only once the previous answer came, so the order
    in which documents were accepted is the order the route must keep. A post that is refused or
    gets no answer is not sent again: the next post is a new document, as the flow goes on.
    """

    def __init__(self, bases: list[str], patient: str, count: int, rate: float) -> None:
        self.bases = bases
        self.patient = patient
        self.count = count
        self.rate = rate
        # Set by a scenario whose fault must meet the flow: posting goes on until it is set.
        self.until = asyncio.Event()
        self.until.set()
        self.submissions: list[Submission] = []
        self._progress = asyncio.Condition()

    @property
    def accepted(self) -> list[str]:
        return [s.txid for s in self.submissions if s.txid is not None]

    def outcomes(self) -> Counter[str]:
        return Counter(s.outcome for s in self.submissions)

    async def wait_accepted(self, n: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: len(self.accepted) >= n)

    async def run(self) -> None:
        body = json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "subject", "valueReference": {"reference": f"Patient/{self.patient}"}},
                    {"name": "payload", "valueString": base64.b64encode(PDF).decode()},
                ],
            }
        ).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
        start = time.monotonic()
        async with httpx.AsyncClient(headers=headers, timeout=10) as client:
            i = -1
            while not self.until.is_set() or (
                len(self.accepted) < self.count and i < 5 * self.count
            ):
                i += 1
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                base = self.bases[i % len(self.bases)]
                txid: str | None = None
                try:
                    r = await client.post(
                        f"{base}/fhir/CommunicationRequest/$send-to-ehr", content=body
                    )
                    outcome = str(r.status_code)
                    if r.status_code == 200:
                        params = {p["name"]: p for p in r.json()["parameter"]}
                        txid = str(params["transaction-id"]["valueString"])
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                async with self._progress:
                    self.submissions.append(Submission(i, txid, outcome))
                    self._progress.notify_all()


async def create_patient(base: str) -> str:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        r = await c.post(
            f"{base}/fhir/Patient",
            json={
                "resourceType": "Patient",
                "identifier": [
                    {"system": "urn:oid:1.2.250.1.999.1", "value": f"F-{uuid.uuid4().hex[:8]}"}
                ],
                "name": [{"family": "Faults", "given": ["Bench"]}],
                "birthDate": "1970-01-01",
                "gender": "other",
            },
        )
        if r.status_code != 201:
            raise RuntimeError(f"cannot create the patient: {r.status_code} {r.text[:300]}")
        return str(r.json()["id"])


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class StoreRow:
    status: str
    reason: str | None
    attempts: int
    sent: bool
    last_event: str | None
    retries: int  # "attempt N failed" events: the worker retried in place
    reasons: tuple[str, ...]


def read_store(url: str) -> dict[str, StoreRow]:
    """Every delivery of the route, with what its history says (read straight from the store)."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as c:
            rows = c.execute(sa.select(deliveries).where(deliveries.c.route == ROUTE)).all()
            events = c.execute(
                sa.select(
                    status_events.c.transaction_id, status_events.c.status, status_events.c.reason
                )
                .where(status_events.c.route == ROUTE)
                .order_by(status_events.c.id)
            ).all()
    finally:
        engine.dispose()
    last: dict[str, str] = {}
    retries: Counter[str] = Counter()
    reasons: dict[str, list[str]] = {}
    for txid, status, reason in events:
        last[txid] = status
        reasons.setdefault(txid, []).append(reason or "")
        if (reason or "").startswith("attempt "):
            retries[txid] += 1
    return {
        r.transaction_id: StoreRow(
            status=r.status,
            reason=r.reason,
            attempts=int(r.attempts),
            sent=r.sent_at is not None,
            last_event=last.get(r.transaction_id),
            retries=retries[r.transaction_id],
            reasons=tuple(reasons.get(r.transaction_id, ())),
        )
        for r in rows
    }


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    fault: str
    backend: str
    sent: int = 0
    accepted: int = 0
    delivered: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    order_violations: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    inconsistent: list[str] = field(default_factory=list)
    unanswered_delivered: int = 0
    dead_letters: int | None = None  # items on the route's dead-letter queue (misbehaving EHR)
    did: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # for the checks: per accepted document, what the store says and how often the EHR got it
    store: dict[str, StoreRow] = field(default_factory=dict)
    receipts: Counter[str] = field(default_factory=Counter)
    accepted_ids: list[str] = field(default_factory=list)

    def status_text(self) -> str:
        parts = []
        for status, n in sorted(self.statuses.items()):
            reasons = Counter(
                _short_reason(self.store[t].reason)
                for t in self.accepted_ids
                if t in self.store and self.store[t].status == status == "entered-in-error"
            )
            why = "; ".join(r for r in reasons if r)
            parts.append(f"{status} {n}" + (f" ({why})" if why else ""))
        return ", ".join(parts) or "none"

    def row(self) -> dict[str, str]:
        return {
            "fault": self.fault,
            "backend": self.backend,
            "sent / accepted": f"{self.sent} / {self.accepted}",
            "delivered": str(self.delivered),
            "lost": str(len(self.lost)),
            "duplicates seen by the EHR": str(self.duplicates),
            "order violations": str(self.order_violations),
            "inconsistent statuses": str(len(self.inconsistent)),
            "final statuses": self.status_text(),
            "what the engine did": "; ".join(self.did),
            "as expected": "yes" if not self.problems else "NO: " + "; ".join(self.problems),
        }


def _short_reason(reason: str | None) -> str:
    if not reason:
        return ""
    if reason.startswith("gave up after"):
        head, _, rest = reason.partition(": ")
        if "not a valid HL7 ACK" in rest:
            return f"{head}: not an HL7 ACK"
        if "middle of a frame" in rest:
            return f"{head}: closed mid-frame"
        if "no ACK within" in rest:
            return f"{head}: no ACK in time"
        return head
    if reason.startswith("AE"):
        return "AE, with the EHR's text"
    return reason[:60]


def judge(
    fault: str,
    backend: str,
    loader: Loader,
    received: list[str],
    store: dict[str, StoreRow],
) -> Result:
    """Compare what the loader was told, what the EHR got and what the store says."""
    accepted = loader.accepted
    result = Result(fault, backend, sent=len(loader.submissions), accepted=len(accepted))
    result.accepted_ids = accepted
    result.store = {t: store[t] for t in accepted if t in store}
    receipts = Counter(received)
    result.receipts = Counter({t: receipts[t] for t in accepted})
    accepted_set = set(accepted)
    result.delivered = sum(1 for t in accepted if receipts[t])
    result.duplicates = sum(receipts[t] - 1 for t in accepted if receipts[t] > 1)
    result.unanswered_delivered = len({t for t in receipts if t not in accepted_set})
    # order: first receipts of accepted documents, by acceptance rank
    rank = {t: i for i, t in enumerate(accepted)}
    seen: set[str] = set()
    highest = -1
    for t in received:
        if t not in rank or t in seen:
            continue
        seen.add(t)
        if rank[t] < highest:
            result.order_violations += 1
        highest = max(highest, rank[t])
    for t in accepted:
        row = store.get(t)
        if row is None:
            result.lost.append(f"{t}: not in the store")
            continue
        result.statuses[row.status] += 1
        if row.status not in FINAL:
            result.lost.append(f"{t}: still {row.status}")
        elif row.status == "completed" and not receipts[t]:
            result.lost.append(f"{t}: completed but the EHR never received it")
        if row.last_event != row.status:
            result.inconsistent.append(f"{t}: status {row.status}, history ends {row.last_event}")
        if row.status == "completed" and not row.sent:
            result.inconsistent.append(f"{t}: completed without a sent time")
        if receipts[t] > 1 and row.attempts < 2 and row.retries == 0:
            result.inconsistent.append(
                f"{t}: the EHR got it {receipts[t]} times, the store shows one attempt"
            )
    return result


# --------------------------------------------------------------------------- RabbitMQ


async def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: no answer in {timeout:g} s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): {text}")
    return text


async def rabbitmq_state() -> dict[str, str]:
    """What must be the same after the restart: the node, its users, vhosts and permissions."""
    node, users, vhosts = await asyncio.gather(
        rabbitmqctl("eval", "node()."),
        rabbitmqctl("list_users", "-q", "--no-table-headers"),
        rabbitmqctl("list_vhosts", "-q", "--no-table-headers"),
    )
    names = sorted(v.strip() for v in vhosts.splitlines() if v.strip())
    permissions = await asyncio.gather(
        *(rabbitmqctl("list_permissions", "-q", "--no-table-headers", "-p", v) for v in names)
    )
    return {
        "node": node.strip(),
        "users": "\n".join(sorted(users.splitlines())),
        "vhosts": "\n".join(names),
        **{
            f"permissions {v}": "\n".join(sorted(p.splitlines()))
            for v, p in zip(names, permissions, strict=True)
        },
    }


async def wait_rabbitmq(port: int, timeout: float = 120) -> None:
    await rabbitmqctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 30)
    deadline = time.monotonic() + timeout
    while not _port_open(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"RabbitMQ's port {port} did not answer after start_app")
        await asyncio.sleep(0.1)


def local_amqp_port(amqp_url: str) -> int:
    """The port of a RabbitMQ on this machine, the only one a scenario may restart."""
    params = amqp_parameters(amqp_url)
    if params.host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(
            f"the RabbitMQ restart scenario restarts the node on this machine with rabbitmqctl; "
            f"the broker configured is on {params.host}"
        )
    return int(params.port)


@contextlib.asynccontextmanager
async def rabbitmq_stopped(before: dict[str, str], port: int) -> AsyncIterator[None]:
    """Stop the RabbitMQ application for the body of the block; always start it again.

    ``before`` is ``rabbitmq_state()`` taken earlier; raises if the node differs afterwards.
    """
    stopped = False
    try:
        stopped = True  # even a stop_app that fails half-way is followed by start_app
        await rabbitmqctl("stop_app")
        yield
    finally:
        if stopped:
            await rabbitmqctl("start_app")
        await wait_rabbitmq(port)
    after = await rabbitmq_state()
    if after != before:
        raise RuntimeError(f"RabbitMQ is not as it was: before {before}, after {after}")


async def delete_amqp_topology(amqp_url: str, instance: str) -> None:
    """Delete the instance's exchange and queues (its route, dead-letter and delay queues)."""
    import pika

    names = {f"{instance}.route.{ROUTE}", f"{instance}.route.{ROUTE}.dead"}
    with contextlib.suppress(RuntimeError, OSError):  # no rabbitmqctl here: the known names
        listed = await rabbitmqctl("list_queues", "-q", "--no-table-headers", "name")
        names |= {n.strip() for n in listed.splitlines() if n.startswith(f"{instance}.")}

    def delete() -> None:
        conn = pika.BlockingConnection(amqp_parameters(amqp_url))
        try:
            ch = conn.channel()
            for name in sorted(names):
                ch.queue_delete(name)
            ch.exchange_delete(f"{instance}.routes")
        finally:
            conn.close()

    await asyncio.to_thread(delete)


# --------------------------------------------------------------------------- a deployment


@dataclass
class Services:
    """Where RabbitMQ and PostgreSQL are (the PostgreSQL URL names an admin database)."""

    amqp_url: str = AMQP_URL
    postgres_url: str = POSTGRES_URL


class Deployment:
    """One scenario's engine(s), their configs, data directories and, on RabbitMQ, database."""

    def __init__(self, services: Services, backend: str, work: Path, fault: str) -> None:
        if backend not in ("embedded", "rabbitmq"):
            raise ValueError(f"unknown backend {backend!r}")
        self.services = services
        self.backend = backend
        self.work = work
        self.fault = fault
        self.instance = f"faults-{uuid.uuid4().hex[:10]}"
        self.database = self.instance.replace("-", "_")
        self.engines: list[EngineProcess] = []
        self.store_url = ""

    def _admin(self) -> sa.Engine:
        return sa.create_engine(
            self.services.postgres_url.replace("postgresql://", "postgresql+psycopg://", 1),
            isolation_level="AUTOCOMMIT",
        )

    async def __aenter__(self) -> Deployment:
        if self.backend == "rabbitmq":
            admin = self._admin()
            with admin.connect() as c:
                c.execute(sa.text(f'CREATE DATABASE "{self.database}"'))
            admin.dispose()
            self.store_url = self.services.postgres_url.rsplit("/", 1)[0] + f"/{self.database}"
        else:
            self.store_url = f"sqlite:///{(self.work / 'data-1' / 'medcourier.sqlite').resolve()}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for engine in self.engines:
            await engine.stop()
        if self.backend == "rabbitmq":
            try:
                await delete_amqp_topology(self.services.amqp_url, self.instance)
            except Exception as exc:  # a leftover queue is untidy, not a reason to fail
                print(f"faults: could not delete {self.instance}'s queues: {exc}", file=sys.stderr)
            admin = self._admin()
            with admin.connect() as c:
                c.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
            admin.dispose()

    def engine(
        self,
        ehr_port: int,
        *,
        retry: dict[str, float] | None = None,
        ack_timeout: float = 5.0,
        role: str | None = None,
        http: bool = True,
    ) -> EngineProcess:
        """A new engine process (not started) sharing this deployment's instance and store."""
        n = len(self.engines) + 1
        http_port = free_port()
        # Embedded: one process only, so one data directory. RabbitMQ: one each (unused).
        data_dir = self.work / ("data-1" if self.backend == "embedded" else f"data-{n}")
        config = self.work / f"engine-{n}.yaml"
        config.write_text(
            engine_config(
                instance=self.instance,
                data_dir=data_dir,
                http_port=http_port,
                ehr_port=ehr_port,
                broker=self.services.amqp_url if self.backend == "rabbitmq" else None,
                store=self.store_url if self.backend == "rabbitmq" else None,
                retry=retry,
                ack_timeout=ack_timeout,
            )
        )
        process = EngineProcess(
            config, self.work / f"engine-{n}.log", http_port if http else None, role
        )
        self.engines.append(process)
        return process

    async def wait_final(
        self, loader: Loader, received: Callable[[], list[str]], timeout: float
    ) -> None:
        """Wait until every accepted document is final (and, if completed, at the EHR)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            store = await asyncio.to_thread(read_store, self.store_url)
            got = set(received())
            if all(
                t in store
                and store[t].status in FINAL
                and (store[t].status != "completed" or t in got)
                for t in loader.accepted
            ):
                return
            await asyncio.sleep(0.5)

    async def result(self, loader: Loader, received: list[str], started: float) -> Result:
        store = await asyncio.to_thread(read_store, self.store_url)
        result = judge(self.fault, self.backend, loader, received, store)
        result.seconds = round(time.monotonic() - started, 1)
        return result

    def count(self, event: str) -> int:
        return sum(e.count(event) for e in self.engines)

    async def dead_letters(self) -> int:
        """Items waiting on the route's dead-letter queue (where given-up deliveries go)."""
        name = f"{self.instance}.route.{ROUTE}.dead"
        if self.backend == "rabbitmq":
            import pika
            import pika.exceptions

            def in_rabbitmq() -> int:
                conn = pika.BlockingConnection(amqp_parameters(self.services.amqp_url))
                try:
                    frame = conn.channel().queue_declare(name, passive=True)
                    return int(frame.method.message_count)
                except pika.exceptions.ChannelClosedByBroker:
                    return 0  # no such queue
                finally:
                    if conn.is_open:
                        conn.close()

            return await asyncio.to_thread(in_rabbitmq)
        path = self.work / "data-1" / "queue.sqlite"

        def in_sqlite() -> int:
            with contextlib.closing(sqlite3.connect(path)) as db:
                row = db.execute(
                    "SELECT count(*) FROM kombu_message m JOIN kombu_queue q"
                    " ON m.queue_id = q.id WHERE q.name = ? AND m.visible",
                    (name,),
                ).fetchone()
            return int(row[0])

        return await asyncio.to_thread(in_sqlite)

    def total(self, event: str, key: str) -> int:
        return sum(
            int(x.get(key, 0)) for e in self.engines for x in e.events() if x.get("event") == event
        )


# --------------------------------------------------------------------------- the scenarios


@dataclass
class Options:
    count: int = 200  # documents of the flowing scenarios
    bad_count: int = 10  # documents of the misbehaving-EHR scenarios
    rate: float = 20.0  # documents posted per second
    ehr_down: float = 60.0  # seconds the EHR stays down
    rabbit_down: float = 5.0  # seconds RabbitMQ's application stays stopped
    engine_down: float = 1.0  # seconds between the SIGKILL and the restart
    settle: float = 180.0  # longest wait for every accepted document to end
    # The route's retry policy in the EHR-down scenario; None: the engine's default (1 s doubling
    # to 60 s, 10 attempts), which outlasts a 60 s outage.
    outage_retry: dict[str, float] | None = None


def _expect_all_completed(result: Result) -> None:
    if result.lost:
        result.problems.append(f"{len(result.lost)} lost")
    if result.inconsistent:
        result.problems.append(f"{len(result.inconsistent)} inconsistent statuses")
    if result.order_violations:
        result.problems.append(f"{result.order_violations} delivered out of order")
    if result.statuses.get("completed", 0) != result.accepted:
        result.problems.append("not all accepted documents completed")
    if result.delivered != result.accepted:
        result.problems.append("not all accepted documents reached the EHR")
    if result.accepted == 0:
        result.problems.append("nothing was accepted")


def _flow_notes(result: Result, loader: Loader) -> None:
    refused = {k: v for k, v in loader.outcomes().items() if k != "200"}
    if refused:
        what = ", ".join(f"{n}× {k}" for k, v in sorted(refused.items()) for n in [v])
        result.did.append(f"posts not accepted: {what}")
    if result.unanswered_delivered:
        result.did.append(
            f"{result.unanswered_delivered} delivered whose post got no answer (sender may resend)"
        )


async def kill_engine(services: Services, backend: str, work: Path, opts: Options) -> Result:
    """SIGKILL the engine while the EHR holds an ACK (mid-delivery); start it again."""
    started = time.monotonic()
    ehr = ScriptedEhr("aa")
    await ehr.start()
    try:
        async with Deployment(services, backend, work, "SIGKILL the engine mid-delivery") as d:
            engine = d.engine(ehr.port)
            engine.start()
            await engine.wait_up()
            loader = Loader([engine.base], await create_patient(engine.base), opts.count, opts.rate)
            flow = asyncio.create_task(loader.run())
            await loader.wait_accepted(max(1, opts.count // 3))
            ehr.hold_next()
            async with asyncio.timeout(30):
                await ehr.held.wait()
            held = ehr.received[-1]
            engine.kill9()
            ehr.release()
            await asyncio.sleep(opts.engine_down)
            engine.start()
            await engine.wait_up()
            await flow
            await d.wait_final(loader, ehr.received_ids, opts.settle)
            await engine.stop()
            result = await d.result(loader, ehr.received_ids(), started)
            _expect_all_completed(result)
            redelivered = d.count("redelivered after an interruption")
            recovered = d.total("work recovered from the store", "count")
            result.did.append("SIGKILL while the EHR held the ACK of one document; restarted")
            if backend == "embedded":
                result.did.append(f"re-queued {recovered} unfinished deliveries from the store")
            else:
                result.did.append("RabbitMQ handed the unacknowledged item back")
            result.did.append(
                f"resent the interrupted document ({redelivered} redelivery logged); "
                f"the EHR got its MSH-10 {result.receipts[held]}×"
            )
            _flow_notes(result, loader)
            if result.receipts[held] < 2:
                result.problems.append("the interrupted document was not sent again")
            if result.duplicates > 1:
                result.problems.append("duplicates beyond the interrupted document")
            return result
    finally:
        await ehr.stop()


async def rabbitmq_restart(services: Services, backend: str, work: Path, opts: Options) -> Result:
    """Stop and start RabbitMQ's application while documents flow."""
    started = time.monotonic()
    ehr = SimulatorEhr(work, free_port())
    await ehr.start()
    try:
        async with Deployment(services, backend, work, "RabbitMQ restarted during flow") as d:
            port = local_amqp_port(services.amqp_url)
            engine = d.engine(ehr.port)
            engine.start()
            before = await rabbitmq_state()
            await engine.wait_up()
            loader = Loader([engine.base], await create_patient(engine.base), opts.count, opts.rate)
            loader.until.clear()  # post through the outage, whatever its length
            flow = asyncio.create_task(loader.run())
            try:
                await loader.wait_accepted(max(1, opts.count // 4))
                async with rabbitmq_stopped(before, port):
                    stopped_at = len(loader.submissions)
                    await asyncio.sleep(opts.rabbit_down)
                started_at = len(loader.submissions)
                # and on, until the engine has taken a few documents since
                await loader.wait_accepted(len(loader.accepted) + 5, timeout=120)
            finally:
                loader.until.set()
                await flow
            await d.wait_final(loader, ehr.received_ids, opts.settle)
            await engine.stop()
            result = await d.result(loader, ehr.received_ids(), started)
            _expect_all_completed(result)
            lost_conn = d.count("broker.connection_lost")
            reconnected = d.count("broker.reconnected")
            result.did.append(
                f"stop_app after post {stopped_at}, start_app {opts.rabbit_down:g} s later, "
                f"up again after post {started_at}; node, users, vhosts and permissions equal "
                "afterwards"
            )
            result.did.append(
                f"lost the connection {lost_conn}×, reconnected {reconnected}× and resumed "
                "consuming; posts while down answered 503"
            )
            _flow_notes(result, loader)
            if reconnected < 1:
                result.problems.append("the engine did not log a reconnection")
            return result
    finally:
        await ehr.stop()


async def ehr_down(services: Services, backend: str, work: Path, opts: Options) -> Result:
    """Stop the EHR simulator while documents flow; start it again after ``ehr_down`` s."""
    started = time.monotonic()
    ehr = SimulatorEhr(work, free_port())
    await ehr.start()
    try:
        fault = f"EHR down {opts.ehr_down:g} s, then up"
        async with Deployment(services, backend, work, fault) as d:
            engine = d.engine(ehr.port, retry=opts.outage_retry)
            engine.start()
            await engine.wait_up()
            loader = Loader([engine.base], await create_patient(engine.base), opts.count, opts.rate)
            flow = asyncio.create_task(loader.run())
            await loader.wait_accepted(max(1, opts.count // 4))
            await ehr.stop()
            down_at = time.monotonic()
            await asyncio.sleep(opts.ehr_down)
            await ehr.start()
            up_at = time.monotonic()
            await flow
            await d.wait_final(loader, ehr.received_ids, opts.settle)
            drained = time.monotonic() - up_at
            await engine.stop()
            result = await d.result(loader, ehr.received_ids(), started)
            _expect_all_completed(result)
            retries = d.count("delivery will be retried")
            policy = "default backoff" if opts.outage_retry is None else "short backoff"
            result.did.append(
                f"held the route for {up_at - down_at:.0f} s, retrying the head document in "
                f"place ({retries} failed attempts, {policy}); queue drained "
                f"{drained:.0f} s after the EHR came back"
            )
            _flow_notes(result, loader)
            if retries < 1:
                result.problems.append("no failed attempt: the outage was not exercised")
            return result
    finally:
        await ehr.stop()


async def _misbehaving(
    services: Services,
    backend: str,
    work: Path,
    opts: Options,
    fault: str,
    ehr: ScriptedEhr,
    check: Callable[[Result], None],
) -> Result:
    started = time.monotonic()
    await ehr.start()
    try:
        async with Deployment(services, backend, work, fault) as d:
            engine = d.engine(ehr.port, retry=SHORT_RETRY, ack_timeout=SHORT_ACK_TIMEOUT)
            engine.start()
            await engine.wait_up()
            loader = Loader(
                [engine.base], await create_patient(engine.base), opts.bad_count, opts.rate
            )
            await loader.run()
            await d.wait_final(loader, ehr.received_ids, opts.settle)
            await engine.stop()
            result = await d.result(loader, ehr.received_ids(), started)
            result.dead_letters = await d.dead_letters()
            if result.lost:
                result.problems.append(f"{len(result.lost)} lost")
            if result.inconsistent:
                result.problems.append(f"{len(result.inconsistent)} inconsistent statuses")
            if result.order_violations:
                result.problems.append(f"{result.order_violations} out of order")
            if result.accepted != result.sent:
                result.problems.append("posts refused")
            check(result)
            _flow_notes(result, loader)
            return result
    finally:
        await ehr.stop()


def _gave_up(result: Result, detail: str) -> None:
    attempts = int(SHORT_RETRY["max_attempts"])
    ok = all(
        row.status == "entered-in-error"
        and (row.reason or "").startswith(f"gave up after {attempts} attempts")
        and detail in (row.reason or "")
        for row in result.store.values()
    )
    if not ok or len(result.store) != result.accepted:
        result.problems.append(f"not every document gave up after {attempts} attempts ({detail})")
    if any(result.receipts[t] != attempts for t in result.accepted_ids):
        result.problems.append(f"the EHR did not get each document exactly {attempts}×")
    if result.dead_letters != result.accepted:
        result.problems.append(f"{result.dead_letters} items dead-lettered, not {result.accepted}")


def _no_dead_letters(result: Result) -> None:
    if result.dead_letters:
        result.problems.append(f"{result.dead_letters} items dead-lettered, expected none")


async def ehr_garbage(services: Services, backend: str, work: Path, opts: Options) -> Result:
    def check(result: Result) -> None:
        _gave_up(result, "not a valid HL7 ACK")
        result.did.append(
            "took the non-HL7 answer as transient: dropped the connection, sent each document "
            f"{int(SHORT_RETRY['max_attempts'])}×, then entered-in-error ('gave up after 3 "
            f"attempts: … not a valid HL7 ACK') and {result.dead_letters} items on the "
            "dead-letter queue; the route went on"
        )

    return await _misbehaving(
        services, backend, work, opts, "EHR answers garbage", ScriptedEhr("garbage"), check
    )


async def ehr_slow(services: Services, backend: str, work: Path, opts: Options) -> Result:
    delay = SHORT_ACK_TIMEOUT * 1.5

    def check(result: Result) -> None:
        if result.statuses.get("completed", 0) != result.accepted:
            result.problems.append("not all completed after the retry")
        if any(result.receipts[t] != 2 for t in result.accepted_ids):
            result.problems.append("the EHR did not get each document exactly twice")
        if not all(any("no ACK within" in r for r in row.reasons) for row in result.store.values()):
            result.problems.append("the timeout is not in every document's history")
        _no_dead_letters(result)
        result.did.append(
            f"no ACK within ack_timeout {SHORT_ACK_TIMEOUT:g} s (the EHR answered after "
            f"{delay:g} s): dropped the connection, ignored the late ACK, resent with the same "
            "MSH-10, completed on the 2nd attempt; each duplicate is in the history"
        )

    return await _misbehaving(
        services,
        backend,
        work,
        opts,
        "EHR ACKs past ack_timeout (first try)",
        ScriptedEhr("slow", slow_delay=delay),
        check,
    )


async def ehr_midframe(services: Services, backend: str, work: Path, opts: Options) -> Result:
    def check(result: Result) -> None:
        _gave_up(result, "middle of a frame")
        result.did.append(
            "a cut frame is transient: sent each document 3×, then entered-in-error ('gave up "
            f"after 3 attempts: … closed in the middle of a frame') and {result.dead_letters} "
            "items on the dead-letter queue"
        )

    return await _misbehaving(
        services, backend, work, opts, "EHR closes mid-frame", ScriptedEhr("midframe"), check
    )


async def ehr_ae(services: Services, backend: str, work: Path, opts: Options) -> Result:
    def check(result: Result) -> None:
        ok = all(
            row.status == "entered-in-error"
            and (row.reason or "").startswith("AE (application error)")
            and ScriptedEhr.AE_TEXT in (row.reason or "")
            and row.attempts == 1
            and row.retries == 0
            for row in result.store.values()
        )
        if not ok or len(result.store) != result.accepted:
            result.problems.append("not every document ended entered-in-error with the AE text")
        if result.duplicates:
            result.problems.append("an AE was retried")
        _no_dead_letters(result)
        result.did.append(
            "AE is final: entered-in-error at once with the EHR's text as the reason; no retry, "
            "nothing dead-lettered"
        )

    return await _misbehaving(
        services, backend, work, opts, "EHR ACKs AE", ScriptedEhr("ae"), check
    )


async def _start_roles(
    d: Deployment, ehr_port: int, workers: int
) -> tuple[EngineProcess, list[EngineProcess]]:
    """An ``--role api`` process and ``workers`` ``--role worker`` processes, started in order
    (the first worker to consume is the route's active consumer)."""
    if not await asyncio.to_thread(cli_has_role):
        raise RuntimeError("`medcourier run` has no --role option")
    api = d.engine(ehr_port, role="api")
    api.start()
    await api.wait_up()
    started = []
    for _ in range(workers):
        worker = d.engine(ehr_port, role="worker", http=False)
        worker.start()
        await worker.wait_up()
        started.append(worker)
    return api, started


def _completed_by(engine: EngineProcess) -> int:
    return sum(
        1 for e in engine.events() if e.get("event") == "status" and e.get("status") == "completed"
    )


async def kill_worker(services: Services, backend: str, work: Path, opts: Options) -> Result:
    """API + two worker processes; SIGKILL the active worker mid-delivery, then restart it."""
    started = time.monotonic()
    ehr = ScriptedEhr("aa")
    await ehr.start()
    try:
        fault = "SIGKILL a worker process mid-delivery"
        async with Deployment(services, backend, work, fault) as d:
            api, workers = await _start_roles(d, ehr.port, 2)
            loader = Loader([api.base], await create_patient(api.base), opts.count, opts.rate)
            flow = asyncio.create_task(loader.run())
            await loader.wait_accepted(max(1, opts.count // 3))
            ehr.hold_next()
            async with asyncio.timeout(30):
                await ehr.held.wait()
            held = ehr.received[-1]
            victim = next(
                (w for w in workers if any(e.get("transaction_id") == held for e in w.events())),
                workers[0],
            )
            before = _completed_by(victim)
            victim.kill9()
            ehr.release()
            await asyncio.sleep(opts.engine_down)
            victim.start()
            await victim.wait_up()
            await flow
            await d.wait_final(loader, ehr.received_ids, opts.settle)
            counts = [_completed_by(w) for w in workers]
            for engine in d.engines:
                await engine.stop()
            result = await d.result(loader, ehr.received_ids(), started)
            _expect_all_completed(result)
            other = workers[1 - workers.index(victim)]
            result.did.append(
                f"`--role api` + 2× `--role worker`; SIGKILL of the active worker (it had "
                f"completed {before}) while the EHR held an ACK; RabbitMQ made the other worker "
                f"active and handed it the unacknowledged item; it resent the document (the EHR "
                f"got its MSH-10 {result.receipts[held]}×); completed by worker: "
                f"{' / '.join(str(n) for n in counts)}; the killed worker restarted as standby"
            )
            _flow_notes(result, loader)
            if result.receipts[held] < 2:
                result.problems.append("the interrupted document was not sent again")
            if result.duplicates > 1:
                result.problems.append("duplicates beyond the interrupted document")
            if _completed_by(other) == 0:
                result.problems.append("the standby worker never took over")
            return result
    finally:
        await ehr.stop()


async def _fifo(services: Services, backend: str, work: Path, opts: Options, roles: bool) -> Result:
    started = time.monotonic()
    # The 5th document's first attempt fails (connection closed, no ACK): FIFO means the route
    # waits for it (1 s, the default first backoff) while the documents behind it pile up; a
    # second consumer taking them meanwhile would deliver them first.
    ehr = ScriptedEhr("aa", drop_first_of=5)
    await ehr.start()
    try:
        if roles:
            fault = "two worker processes on one FIFO route"
        else:
            fault = "two engines (all roles) on one FIFO route"
        async with Deployment(services, backend, work, fault) as d:
            if roles:
                api, workers = await _start_roles(d, ehr.port, 2)
                bases = [api.base]
                how = "`--role api` + 2× `--role worker`"
            else:
                workers = [d.engine(ehr.port), d.engine(ehr.port)]
                for w in workers:
                    w.start()
                    await w.wait_up()
                bases = [w.base for w in workers]
                how = "2 engine processes, same instance, posts alternating between their APIs"
            loader = Loader(bases, await create_patient(bases[0]), opts.count, opts.rate)
            await loader.run()
            await d.wait_final(loader, ehr.received_ids, opts.settle)
            counts = [_completed_by(w) for w in workers]
            for engine in d.engines:
                await engine.stop()
            result = await d.result(loader, ehr.received_ids(), started)
            _expect_all_completed(result)
            result.did.append(
                f"{how}; the EHR dropped the 5th document's first attempt and the route waited "
                f"for it; completed by process: {' / '.join(str(n) for n in counts)}"
            )
            _flow_notes(result, loader)
            return result
    finally:
        await ehr.stop()


async def two_workers_fifo(services: Services, backend: str, work: Path, opts: Options) -> Result:
    """``--role api`` and two ``--role worker`` processes on one FIFO route."""
    return await _fifo(services, backend, work, opts, roles=True)


async def two_engines_fifo(services: Services, backend: str, work: Path, opts: Options) -> Result:
    """Two whole engines (``--role`` absent: all) with one instance name on one FIFO route."""
    return await _fifo(services, backend, work, opts, roles=False)


Scenario = Callable[[Services, str, Path, Options], Awaitable[Result]]

SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "kill-engine": (kill_engine, ("embedded", "rabbitmq")),
    "kill-worker": (kill_worker, ("rabbitmq",)),
    "rabbitmq-restart": (rabbitmq_restart, ("rabbitmq",)),
    "ehr-down": (ehr_down, ("embedded", "rabbitmq")),
    "ehr-garbage": (ehr_garbage, ("embedded", "rabbitmq")),
    "ehr-slow": (ehr_slow, ("embedded", "rabbitmq")),
    "ehr-close-mid-frame": (ehr_midframe, ("embedded", "rabbitmq")),
    "ehr-ae": (ehr_ae, ("embedded", "rabbitmq")),
    "two-workers-fifo": (two_workers_fifo, ("rabbitmq",)),
    "two-engines-fifo": (two_engines_fifo, ("rabbitmq",)),
}

BACKEND_LABEL = {"embedded": "embedded (SQLite)", "rabbitmq": "RabbitMQ + PostgreSQL"}


async def run_scenario(
    name: str, backend: str, opts: Options, services: Services | None = None
) -> Result:
    """Run one scenario in a temporary directory (kept, and named, if it fails)."""
    scenario, backends = SCENARIOS[name]
    if backend not in backends:
        raise ValueError(f"{name} does not run on {backend} (only {', '.join(backends)})")
    work = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
    try:
        result = await scenario(services or Services(), backend, work, opts)
    except BaseException:
        print(f"faults: {name} on {backend} failed; its files are in {work}", file=sys.stderr)
        raise
    if result.problems:
        print(f"faults: {name} on {backend}: files kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- output


COLUMNS = [
    "fault",
    "backend",
    "sent / accepted",
    "delivered",
    "lost",
    "duplicates seen by the EHR",
    "order violations",
    "inconsistent statuses",
    "final statuses",
    "what the engine did",
    "as expected",
]


def markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        row = r.row()
        row["backend"] = BACKEND_LABEL.get(r.backend, r.backend)
        lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines)


def text_table(results: list[Result]) -> str:
    short = [c for c in COLUMNS if c not in ("what the engine did", "as expected")]
    rows = [r.row() for r in results]
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in short}
    out = ["  ".join(c.ljust(widths[c]) for c in short)]
    out.append("  ".join("-" * widths[c] for c in short))
    for row in rows:
        out.append("  ".join(row[c].ljust(widths[c]) for c in short))
    out.append("")
    for r, row in zip(results, rows, strict=True):
        out.append(f"{r.fault} [{r.backend}, {r.seconds:g} s]: {row['what the engine did']}")
        out.append(f"    as expected: {row['as expected']}")
        for detail in (r.lost + r.inconsistent)[:10]:
            out.append(f"    {detail}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["embedded", "rabbitmq", "both"], default="both")
    parser.add_argument("--count", type=int, default=200, help="documents per flowing scenario")
    parser.add_argument(
        "--bad-count", type=int, default=10, help="documents per misbehaving-EHR scenario"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="documents posted per second")
    parser.add_argument("--ehr-down", type=float, default=60.0, help="seconds the EHR is down")
    parser.add_argument(
        "--rabbit-down", type=float, default=5.0, help="seconds RabbitMQ's application is stopped"
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    opts = Options(
        count=args.count,
        bad_count=args.bad_count,
        rate=args.rate,
        ehr_down=args.ehr_down,
        rabbit_down=args.rabbit_down,
        settle=max(180.0, args.ehr_down * 3),
    )
    backends = ["embedded", "rabbitmq"] if args.backend == "both" else [args.backend]
    results: list[Result] = []
    for name, (_, supported) in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        for backend in backends:
            if backend in supported:
                print(f"faults: {name} on {backend}…", file=sys.stderr, flush=True)
                try:
                    result = asyncio.run(run_scenario(name, backend, opts))
                except Exception as exc:  # one broken run must not hide the others' rows
                    result = Result(name, backend)
                    last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    result.problems.append(f"the scenario did not finish: {last}")
                results.append(result)
                print(
                    f"faults: {name} on {backend}: {result.seconds:g} s, lost "
                    f"{len(result.lost)}, " + result.row()["as expected"],
                    file=sys.stderr,
                    flush=True,
                )
    print(markdown(results) if args.markdown else text_table(results))
    return 0 if all(not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
