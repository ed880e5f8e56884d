"""Test harness: a real engine on a background event loop, a real EHR simulator, real HTTP.

Tests are plain synchronous functions; the engine, its HTTP server and the MLLP simulator run on
one asyncio loop in a daemon thread, reached over real sockets (httpx, MLLP).
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine.api import auth
from medcourier.engine.config import parse_config
from medcourier.engine.event_loop import loop_factory
from medcourier.engine.plugins import load_plugins
from medcourier.engine.service import Engine

T = TypeVar("T")
TOKEN = "test-token-0123456789abcdef"
LIMITED_TOKEN = "limited-token-0123456789abcdef"
ALL_SCOPES = list(auth.ALL_SCOPES)

# A small but real PDF (one empty page), padded to the size a test asks for with a comment.
_PDF_HEAD = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n"
)


def pdf_bytes(size: int = 4096) -> bytes:
    tail = b"trailer<</Root 1 0 R>>\n%%EOF\n"
    pad = max(0, size - len(_PDF_HEAD) - len(tail))
    body = bytes((i * 7 + 13) % 256 for i in range(pad))
    return _PDF_HEAD + b"%" + body[: max(0, pad - 2)].replace(b"\n", b" ") + b"\n" + tail


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = loop_factory()()  # the engine's own loop (engine/event_loop.py)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def engine_config(
    data_dir: Path,
    ehr_port: int,
    *,
    broker: str | None = None,
    store: str | None = None,
    instance: str = "mctest",
    retry: dict[str, Any] | None = None,
    extra_routes: list[dict[str, Any]] | None = None,
    max_document_bytes: int = 5 * 1024 * 1024,
    ack_timeout: float = 5,
    fallback: bool = True,
    inbound: list[dict[str, Any]] | None = None,
    ehr_device: str | None = None,
    tokens: list[dict[str, Any]] | None = None,
    quorum_queues: bool = False,
) -> str:
    cfg: dict[str, Any] = {
        "instance": instance,
        "data_dir": str(data_dir),
        "broker": broker or "",
        "store": store or "",
        "quorum_queues": quorum_queues,
        "log_level": "warning",
        "http": {"host": "127.0.0.1", "port": 0},
        "tokens": [
            {"name": "test-app", "token": TOKEN, "scopes": ALL_SCOPES},
            {"name": "reader", "token": LIMITED_TOKEN, "scopes": ["PATIENT_READ"]},
            *(tokens or []),
        ],
        "limits": {"max_document_bytes": max_document_bytes},
        "inbound": inbound or [],
        "routes": [
            {
                "name": "ehr-a",
                "match": {"organizations": ["Organization/demo-hl7"], "fallback": fallback},
                "format": "hl7v2-oru",
                "format_options": {"receiving_application": "EHR", "receiving_facility": "A"},
                "deliver": {
                    "connector": "mllp",
                    "host": "127.0.0.1",
                    "port": ehr_port,
                    "ack_timeout": ack_timeout,
                    "connect_timeout": 2,
                },
                "retry": retry or {"max_attempts": 3, "initial_delay": 0.2, "max_delay": 1},
                **({"device": {"id": ehr_device, "name": "EHR A"}} if ehr_device else {}),
            },
            *(extra_routes or []),
        ],
    }
    return yaml.safe_dump(cfg)


class Running:
    """A started engine and the simulator it delivers to, with an HTTP client."""

    def __init__(self, lt: LoopThread, engine: Engine, ehr: EhrSimulator) -> None:
        self.lt = lt
        self.engine = engine
        self.ehr = ehr
        self.base = f"http://127.0.0.1:{engine.http_port}"
        self.http = httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )

    # -- FHIR helpers ---------------------------------------------------------------------
    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kw)

    def patient(self, **fields: Any) -> str:
        body = {"resourceType": "Patient", **fields}
        r = self.post("/fhir/Patient", body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def encounter(self, patient_id: str, **fields: Any) -> str:
        body = {
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": f"Patient/{patient_id}"},
            **fields,
        }
        r = self.post("/fhir/Encounter", body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def send(
        self, patient_id: str, encounter_id: str | None, payload: bytes, **params: Any
    ) -> httpx.Response:
        return self.post(
            "/fhir/CommunicationRequest/$send-to-ehr",
            send_parameters(patient_id, encounter_id, payload, **params),
        )

    def tracking(self, txid: str) -> dict[str, Any]:
        r = self.http.get("/fhir/CommunicationRequest/$tracking", params={"transaction-id": txid})
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    def wait_status(self, txid: str, statuses: set[str], timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            bundle = self.tracking(txid)
            found = {e["resource"]["status"] for e in bundle["entry"]}
            if found and found <= statuses:
                return bundle
            if time.monotonic() > deadline:
                raise AssertionError(f"status stayed {found}, expected {statuses}: {bundle}")
            time.sleep(0.05)

    def document_count(self) -> int:
        import sqlalchemy as sa

        from medcourier.engine.schema import documents

        with self.engine.store.sync.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(documents)).scalar_one())


def send_parameters(
    patient_id: str | None, encounter_id: str | None, payload: bytes | None, **params: Any
) -> dict[str, Any]:
    """The seed's Parameters body; ``params`` maps parameter names (with '_' for '-') to values."""
    parameter: list[dict[str, Any]] = []
    if patient_id is not None:
        parameter.append(
            {"name": "subject", "valueReference": {"reference": f"Patient/{patient_id}"}}
        )
    if encounter_id is not None:
        parameter.append(
            {"name": "context", "valueReference": {"reference": f"Encounter/{encounter_id}"}}
        )
    kinds = {"content-type": "valueCode", "document-type": "valueCode"}
    for key, value in params.items():
        name = key.replace("_", "-")
        parameter.append({"name": name, kinds.get(name, "valueString"): value})
    if payload is not None:
        parameter.append({"name": "payload", "valueString": base64.b64encode(payload).decode()})
    return {"resourceType": "Parameters", "parameter": parameter}


@contextmanager
def running_engine(
    lt: LoopThread,
    tmp: Path,
    *,
    ehr_up: bool = True,
    ehr_port: int | None = None,
    extra_plugins: tuple[object, ...] = (),
    **config: Any,
) -> Iterator[Running]:
    """Start a simulator (unless ``ehr_up`` is False) and an engine delivering to it."""
    ehr = EhrSimulator(port=ehr_port or 0, out_dir=tmp / "ehr")
    if ehr_up:
        lt.run(ehr.start())
        port = ehr.port
    else:
        port = ehr_port or free_port()
    text = engine_config(tmp / "data", port, **config)
    plugins = load_plugins(extra_plugins)
    engine = Engine(parse_config(text, plugins, "test.yaml", env=os.environ), plugins)
    lt.run(engine.start())
    running = Running(lt, engine, ehr)
    try:
        yield running
    finally:
        running.http.close()
        lt.run(engine.stop())
        lt.run(ehr.stop())


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: the sockets are held until all are drawn, so two calls'
    worth of ports cannot come out the same (the kernel may hand a released one out again)."""
    import socket

    held = [socket.socket() for _ in range(count)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def eventually(check: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def stored_document(
    store: Any,
    payload: bytes,
    routes: list[str],
    txid: str | None = None,
    created_at: Any = None,
) -> str:
    """A document accepted straight into ``store`` (a ``Store``) for ``routes``, as the engine
    would store it (now, under a new transaction id, unless told); returns its transaction id."""
    import uuid
    from datetime import UTC, datetime

    txid = txid or uuid.uuid4().hex[:20]
    store.accept_document(
        transaction_id=txid,
        created_at=created_at or datetime.now(UTC),
        content_type="application/pdf",
        document_type="11488-4",
        title="t",
        sender_identifier=None,
        sender_application="test",
        patient_id="p-1",
        encounter_id=None,
        payload=payload,
        routes=routes,
    )
    return txid


PROC_STATUS = """
from pathlib import Path


def status():
    \"\"\"This process's VmRSS and VmHWM (its peak since /proc/self/clear_refs), in bytes.\"\"\"
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found
"""
"""The memory reader of the scripts that the memory tests run in a fresh process (Linux)."""


ServerHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def against_server(
    handler: ServerHandler,
    client: Callable[[str, int], Awaitable[T]],
    limit: int | None = None,
) -> tuple[T, int]:
    """Run ``client(host, port)`` against a small TCP server on 127.0.0.1 whose connections
    ``handler`` serves (a misbehaving listener, say); return what the client returned and how
    many connections the server accepted. A handler's read errors end its connection quietly."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def run() -> T:
        options = {} if limit is None else {"limit": limit}
        server = await asyncio.start_server(serve, "127.0.0.1", 0, **options)
        port = server.sockets[0].getsockname()[1]
        try:
            return await client("127.0.0.1", port)
        finally:
            server.close()
            await server.wait_closed()

    result = asyncio.run(run())
    return result, connections
