"""Large documents stream: read from the store once, Base64-encoded into the MLLP socket as they go.

What is checked, with real parts only (the engine, SQLite and PostgreSQL, sockets, hl7apy):

- a 12 MiB PDF goes through the engine on SQLite and on PostgreSQL, and the EHR gets exactly its
  bytes in OBX-5; a file route for the same document, whose connector needs the whole rendering,
  writes exactly the bytes the MLLP route streamed;
- the streamed ORU is byte for byte the rendering built whole, and hl7apy still validates it;
- the store's payload read returns the stored bytes on both databases, at every slice boundary;
- memory: sending a streamed 12 MiB rendering allocates a few MiB of Python objects, not its
  16 MiB of Base64 (tracemalloc, with the EHR in another process so that only the sender is
  counted); reading a 32 MiB payload raises a fresh process's peak resident set by about the
  payload, not by the two or more copies a plain ``SELECT`` makes (VmHWM, reset before the
  read). These bounds have wide margins both ways: they fail when the streaming is undone, not
  because of allocator noise. Time is never asserted (benchmarks do that, under bench/).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest
import sqlalchemy as sa
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydantic import BaseModel, ConfigDict

from medcourier.channels.mllp.client import MllpOptions, MllpSender
from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine.model import (
    BASE64_SLICE,
    Base64Part,
    DeliveryResult,
    Document,
    Outcome,
    Rendered,
)
from medcourier.engine.payload_read import DIRECT_READ_BYTES, PG_SLICE
from medcourier.engine.plugins import ConnectorType, hookimpl
from medcourier.engine.schema import renderings
from medcourier.engine.store import Store
from medcourier.transforms.hl7v2 import oru, oru_ans
from tests.harness import (
    PROC_STATUS,
    LoopThread,
    Running,
    free_port,
    running_engine,
    stored_document,
)
from tests.services import own_postgres_database

MIB = 1024 * 1024
LARGE = 12 * MIB + 7
"""Above every threshold, not a multiple of a slice, and 16 MiB of Base64 (the sender's bound
below is well under half of that)."""


def pdf(size: int, seed: int = 7) -> bytes:
    """A PDF-looking payload of exactly ``size`` bytes, incompressible like a real one."""
    head, tail = b"%PDF-1.4\n%", b"\n%%EOF\n"
    return head + random.Random(seed).randbytes(size - len(head) - len(tail)) + tail


def document(payload: bytes, **overrides: Any) -> Document:
    fields: dict[str, Any] = {
        "transaction_id": "TX-STREAM-0001",
        "created_at": datetime(2026, 11, 21, 8, 30, 15, tzinfo=UTC),
        "content_type": "application/pdf",
        "document_type": "11488-4",
        "title": "Compte rendu | opératoire",
        "payload": payload,
        "patient": {
            "resourceType": "Patient",
            "id": "p-1",
            "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-7"}],
            "name": [{"family": "Lévêque", "given": ["Hélène"]}],
            "birthDate": "1962-03-14",
            "gender": "female",
        },
        "sender_identifier": "12345678910",
    }
    fields.update(overrides)
    return Document(**fields)


def whole_rendering(doc: Document, monkeypatch: pytest.MonkeyPatch, **options: Any) -> bytes:
    """The ORU built whole, as every rendering was before large ones streamed."""
    with monkeypatch.context() as m:
        m.setattr(oru, "STREAM_ABOVE", sys.maxsize)
        rendered = oru.render(doc, oru.OruOptions(**options))
    assert not rendered.streamed
    return rendered.data


def obx5(message: bytes) -> list[str]:
    for segment in message.decode("utf-8").split("\r"):
        if segment.startswith("OBX|"):
            return segment.split("|")[5].split("^")
    raise AssertionError("no OBX segment")


def msh10(message: bytes) -> str:
    return message.split(b"\r", 1)[0].decode().split("|")[9]


def hl7apy_validates(message: bytes) -> None:
    """hl7apy strict on the message, OBX-5's data shortened: hl7apy caps ED data at 199
    characters (crs4/hl7apy#45), a limit the standard's ED does not have."""
    head, _, rest = message.decode("utf-8").partition("^Base64^")
    _, _, tail = rest.partition("|")
    parsed = parse_message(
        f"{head}^Base64^QUJD|{tail}", validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    assert parsed.validate() is True


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[str]:
    """A PostgreSQL database for this module alone, dropped after it: its documents, kept
    renderings and unfinished claims must not show in other modules' engines and counts."""
    with own_postgres_database() as url:
        yield url


def store_url(request: pytest.FixtureRequest, database: str) -> str | None:
    """The engine's ``store`` for ``database``: None is the embedded SQLite file."""
    return None if database == "sqlite" else str(request.getfixturevalue("own_postgres"))


# --- the rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        oru.STREAM_ABOVE + 1,  # the three Base64 paddings
        oru.STREAM_ABOVE + 2,
        oru.STREAM_ABOVE + 3,
        2 * BASE64_SLICE + oru.STREAM_ABOVE,  # whole slices only
        LARGE,
    ],
)
@pytest.mark.parametrize("message_type", ["ORU^R01", "MDM^T02"])
def test_streamed_rendering_is_the_whole_one_byte_for_byte(
    size: int, message_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = pdf(size)
    doc = document(payload)
    options = oru.OruOptions(message_type=message_type)  # type: ignore[arg-type]
    streamed = oru.render(doc, options)
    assert streamed.streamed
    assert any(isinstance(part, Base64Part) for part in streamed.parts)
    expected = whole_rendering(doc, monkeypatch, message_type=message_type)

    assert streamed.size == len(expected)
    assert b"".join(streamed.chunks()) == expected
    assert b"".join(streamed.chunks()) == expected  # again, as a retried delivery reads it
    assert streamed.streamed  # reading the chunks built nothing
    assert streamed.data == expected
    assert not streamed.streamed and streamed.parts == (expected,)

    fields = obx5(expected)
    assert fields[1:4] == ["AP", "PDF", "Base64"]
    assert base64.b64decode(fields[4], validate=True) == payload
    hl7apy_validates(expected)


@pytest.mark.parametrize("message_type", ["ORU^R01", "MDM^T02"])
def test_the_ans_profile_streams_its_cda_byte_for_byte(
    message_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ANS "CDA in HL7v2" message carries the CDA (which carries the PDF) in Base64: a
    large one streams the same way, with the same bytes, still valid for hl7apy."""
    from tests import test_hl7v2_oru_ans as ans

    payload = pdf(oru.STREAM_ABOVE + 5)
    doc = ans.make_document(payload=payload)
    options = ans.make_options(message_type=message_type, recipients=[ans.RECIPIENT])
    streamed = oru_ans.render(doc, options)
    assert streamed.streamed
    with monkeypatch.context() as m:
        m.setattr(oru_ans, "STREAM_ABOVE", sys.maxsize)
        whole = oru_ans.render(doc, options)
    assert not whole.streamed
    assert b"".join(streamed.chunks()) == whole.data
    assert streamed.data == whole.data
    ans.strict_structure(whole.data)
    cda = base64.b64decode(obx5(whole.data)[4], validate=True)
    assert base64.b64encode(payload) in cda


def test_small_documents_are_still_rendered_whole() -> None:
    rendered = oru.render(document(pdf(4096)))
    assert not rendered.streamed and rendered.parts == (rendered.data,)
    assert base64.b64decode(obx5(rendered.data)[4]) == pdf(4096)


def test_a_streamed_rendering_says_nothing_of_its_content() -> None:
    rendered = oru.render(document(pdf(oru.STREAM_ABOVE + 1)))
    text = repr(rendered)
    assert "Lévêque" not in text and "PDF" not in text and "TX-STREAM-0001" in text


# --- the MLLP client -------------------------------------------------------------------------


def mllp_options(port: int) -> MllpOptions:
    return MllpOptions.model_validate({"connector": "mllp", "host": "127.0.0.1", "port": port})


def test_a_streamed_rendering_reaches_the_ehr_whole_and_again_on_a_second_send() -> None:
    payload = pdf(LARGE)
    rendered = oru.render(document(payload))

    async def scenario() -> list[bytes]:
        async with EhrSimulator() as ehr:
            sender = MllpSender(mllp_options(ehr.port))
            try:
                for _ in range(2):
                    result = await sender.deliver(rendered)
                    assert result.outcome is Outcome.ACCEPTED, result.reason
            finally:
                await sender.aclose()
            return list(ehr.received)

    received = asyncio.run(scenario())
    assert rendered.streamed  # sent twice without ever being built whole
    assert len(received) == 2 and received[0] == received[1] == rendered.data
    assert base64.b64decode(obx5(received[0])[4]) == payload


def test_a_block_character_in_a_fixed_part_is_refused_before_anything_is_sent() -> None:
    broken = Rendered.from_parts(
        (b"MSH|^~\\&|\x0b|", Base64Part(pdf(oru.STREAM_ABOVE + 1)), b"\r"),
        oru.MEDIA_TYPE,
        "x.hl7",
        "X",
    )

    async def scenario() -> tuple[Outcome, int]:
        async with EhrSimulator() as ehr:
            sender = MllpSender(mllp_options(ehr.port))
            try:
                result = await sender.deliver(broken)
            finally:
                await sender.aclose()
            return result.outcome, ehr.connections

    assert asyncio.run(scenario()) == (Outcome.REJECTED, 0)
    assert broken.streamed


@pytest.fixture
def ehr_process(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``medcourier simulate-ehr`` in a process of its own: what it allocates is not counted
    by this process's tracemalloc."""
    port, out = free_port(), tmp_path / "ehr"
    command = [sys.executable, "-m", "medcourier.engine.cli", "simulate-ehr"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert process.poll() is None, "the EHR simulator exited"
            assert time.monotonic() < deadline, "the EHR simulator did not start"
            time.sleep(0.05)
        yield port, out
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_sending_a_large_document_never_holds_its_base64_whole(
    ehr_process: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, out = ehr_process
    payload = pdf(LARGE)
    doc = document(payload)

    async def send(rendered: Rendered) -> Outcome:
        sender = MllpSender(mllp_options(port))
        try:
            return (await sender.deliver(rendered)).outcome
        finally:
            await sender.aclose()

    tracemalloc.start()
    try:
        rendered = oru.render(doc)
        outcome = asyncio.run(send(rendered))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome is Outcome.ACCEPTED
    # about 3 MiB when streaming; the Base64 alone is 16 MiB, the message whole as much again
    assert peak < len(payload) // 2, f"{peak / MIB:.1f} MiB allocated while sending"
    (received,) = out.glob("*.hl7")
    assert received.read_bytes() == whole_rendering(doc, monkeypatch)


# --- the payload read ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store(store_url(request, request.param), tmp_path / "data")
    s.create_schema()
    yield s
    s.dispose()


def add_document(store: Store, payload: bytes) -> str:
    return stored_document(store, payload, ["r"])


def claimed_payload(store: Store, txid: str) -> bytes:
    claim = store.transaction(store.tx_claim, txid, "r")
    assert claim is not None and claim.document is not None
    return claim.document.payload


@pytest.mark.parametrize(
    "payload",
    [
        pdf(4096),
        pdf(DIRECT_READ_BYTES),  # the last size read with a plain query
        pdf(DIRECT_READ_BYTES + 1),
        pdf(2 * PG_SLICE),  # ends on a slice boundary: the last slice is empty
        pdf(2 * PG_SLICE + 1),
        b"%PDF-1.4\n" + b"compressible " * (PG_SLICE // 4),  # PostgreSQL compresses it (TOAST)
    ],
    ids=["4k", "direct-max", "direct-max+1", "two-slices", "two-slices+1", "compressible"],
)
def test_the_claim_reads_exactly_the_stored_payload(store: Store, payload: bytes) -> None:
    txid = add_document(store, payload)
    got = claimed_payload(store, txid)
    assert type(got) is bytes
    assert len(got) == len(payload) and got == payload


_READ_IN_A_FRESH_PROCESS = (
    PROC_STATUS
    + """
import hashlib, json, sys
from pathlib import Path
import sqlalchemy as sa
from medcourier.engine.schema import renderings
from medcourier.engine.store import Store

url, data_dir, txid = sys.argv[1] or None, Path(sys.argv[2]), sys.argv[3]
store = Store(url, data_dir)
with store.engine.begin() as c:  # connect and warm up before measuring
    c.execute(sa.text("SELECT 1"))
Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from here
before = status()["VmRSS"]
claim = store.transaction(store.tx_claim, txid, "r")
payload = claim.document.payload
peak = status()["VmHWM"]
print(json.dumps({"growth": peak - before, "sha256": hashlib.sha256(payload).hexdigest()}))
"""
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_reading_a_large_payload_holds_it_about_once(store: Store, tmp_path: Path) -> None:
    import hashlib

    payload = pdf(32 * MIB)
    txid = add_document(store, payload)
    url = "" if store.is_sqlite else store.url
    result = subprocess.run(
        [sys.executable, "-c", _READ_IN_A_FRESH_PROCESS, url, str(tmp_path / "data"), txid],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    measured = json.loads(result.stdout)
    assert measured["sha256"] == hashlib.sha256(payload).hexdigest()
    # one copy plus a slice or two; a plain SELECT holds two (SQLite) or more (bytea as hex)
    assert measured["growth"] < 1.6 * len(payload), f"{measured['growth'] / MIB:.1f} MiB"


# --- through the engine ----------------------------------------------------------------------


class RecordingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connector: Literal["recording"] = "recording"
    streams: bool


class RecordingSender:
    """Keeps, for each rendering it is handed, whether it was still in parts and its bytes."""

    def __init__(self, options: RecordingOptions, seen: list[tuple[bool, bytes]]) -> None:
        self.streams_renderings = options.streams
        self.seen = seen

    async def deliver(self, rendered: Rendered) -> DeliveryResult:
        streamed = rendered.streamed
        self.seen.append((streamed, b"".join(rendered.chunks()) if streamed else rendered.data))
        return DeliveryResult.accepted()

    async def aclose(self) -> None:
        return None


class Recorder:
    """A third-party outbound connector, ``recording``, one list of renderings per option."""

    def __init__(self) -> None:
        self.seen: dict[bool, list[tuple[bool, bytes]]] = {True: [], False: []}

    @hookimpl
    def medcourier_connectors(self) -> list[ConnectorType]:
        return [ConnectorType("recording", RecordingOptions, self._open)]

    def _open(self, options: RecordingOptions) -> RecordingSender:
        return RecordingSender(options, self.seen[options.streams])


def same_document_route(name: str, deliver: dict[str, Any]) -> dict[str, Any]:
    """A route taking the same documents as ``ehr-a``, rendered with the same options."""
    return {
        "name": name,
        "match": {"organizations": ["Organization/demo-hl7"]},
        "format": "hl7v2-oru",
        "format_options": {"receiving_application": "EHR", "receiving_facility": "A"},
        "deliver": deliver,
    }


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(params=["sqlite", "postgresql"])
def eng(
    lt: LoopThread, tmp_path: Path, request: pytest.FixtureRequest, recorder: Recorder
) -> Iterator[Running]:
    store = store_url(request, request.param)
    files = {"connector": "file", "directory": str(tmp_path / "files"), "create_directory": True}
    with running_engine(
        lt,
        tmp_path,
        store=store,
        instance=f"mctest-{uuid.uuid4().hex[:8]}",
        max_document_bytes=32 * MIB,
        ack_timeout=60,
        extra_routes=[
            same_document_route("file-a", files),
            same_document_route("streaming", {"connector": "recording", "streams": True}),
            same_document_route("whole", {"connector": "recording", "streams": False}),
            {
                **same_document_route("kept", {"connector": "recording", "streams": True}),
                "keep_renderings": True,
            },
        ],
        extra_plugins=(recorder,),
    ) as running:
        yield running


def test_a_large_pdf_reaches_the_ehr_byte_for_byte(eng: Running, tmp_path: Path) -> None:
    pid = eng.patient(
        identifier=[{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-BIG"}],
        name=[{"family": "Grand", "given": ["Document"]}],
        managingOrganization={"reference": "Organization/demo-hl7"},
    )
    payload = pdf(LARGE)
    r = eng.send(pid, None, payload)
    assert r.status_code == 200, r.text
    txid = r.json()["parameter"][1]["valueString"]

    bundle = eng.wait_status(txid, {"completed"}, timeout=120)
    routes = {e["resource"]["recipient"][0]["display"] for e in bundle["entry"]}
    assert routes == {"ehr-a", "file-a", "streaming", "whole", "kept"}
    (message,) = eng.ehr.received
    assert msh10(message) == txid
    fields = obx5(message)
    assert fields[1:4] == ["AP", "PDF", "Base64"]
    assert base64.b64decode(fields[4], validate=True) == payload
    hl7apy_validates(message)
    # the file connector needs the rendering whole: the same bytes as the ones streamed
    (written,) = (tmp_path / "files").glob("*.hl7")
    assert written.read_bytes() == message


def test_connectors_get_parts_only_when_they_stream(eng: Running, recorder: Recorder) -> None:
    """A connector that says it streams is handed the rendering in parts; any other gets it
    built (on a thread by the worker, not on the event loop in the connector), and so does a
    route that keeps its renderings (storing it built it): the stored one is what was sent."""
    pid = eng.patient(
        name=[{"family": "Grand", "given": ["Document"]}],
        managingOrganization={"reference": "Organization/demo-hl7"},
    )
    payload = pdf(LARGE)
    r = eng.send(pid, None, payload)
    assert r.status_code == 200, r.text
    txid = r.json()["parameter"][1]["valueString"]
    eng.wait_status(txid, {"completed"}, timeout=120)
    (message,) = eng.ehr.received
    assert sorted(recorder.seen[True]) == [(False, message), (True, message)]
    assert recorder.seen[False] == [(False, message)]
    with eng.engine.store.sync.engine.connect() as c:
        stored = c.execute(
            sa.select(renderings.c.route, renderings.c.data).where(
                renderings.c.transaction_id == txid
            )
        ).all()
    assert [(route, bytes(data)) for route, data in stored] == [("kept", message)]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_engine_delivers_a_large_document_holding_it_about_once(
    lt: LoopThread,
    tmp_path: Path,
    ehr_process: tuple[int, Path],
    database: str,
    request: pytest.FixtureRequest,
) -> None:
    """Python allocations of the whole engine while it delivers a 12 MiB PDF (accepted first,
    its route paused, so that only the delivery is counted): the payload read from the store
    and a few MiB more (15 MiB measured), not the payload and its Base64 whole (31 MiB)."""
    port, out = ehr_process
    payload = pdf(LARGE)
    with running_engine(
        lt,
        tmp_path,
        ehr_up=False,
        ehr_port=port,
        store=store_url(request, database),
        instance=f"mctest-{uuid.uuid4().hex[:8]}",
        max_document_bytes=32 * MIB,
        ack_timeout=60,
    ) as eng:
        pid = eng.patient(
            name=[{"family": "Grand", "given": ["Document"]}],
            managingOrganization={"reference": "Organization/demo-hl7"},
        )
        assert eng.post("/admin/routes/ehr-a/pause", {}).status_code == 200
        r = eng.send(pid, None, payload)
        assert r.status_code == 200, r.text
        txid = r.json()["parameter"][1]["valueString"]
        tracemalloc.start()
        try:
            assert eng.post("/admin/routes/ehr-a/resume", {}).status_code == 200
            eng.wait_status(txid, {"completed"}, timeout=120)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    (received,) = out.glob("*.hl7")
    assert base64.b64decode(obx5(received.read_bytes())[4]) == payload
    assert peak < len(payload) + 6 * MIB, f"{peak / MIB:.1f} MiB allocated while delivering"
