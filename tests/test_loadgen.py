"""``medcourier bench``: the load generator against real listeners and a real engine.

The MLLP runs go to the project's EHR simulator (answering AA, then AE), to the engine's own MLLP
listener, and to small misbehaving servers written here (silent, hanging up, acknowledging the
wrong message). The HTTP runs go to a running engine's $send-to-ehr and follow the documents to
``completed``. Counts are small: each test takes a few seconds at most.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from medcourier.channels.mllp.ack import build_ack, message_control_id
from medcourier.channels.mllp.framing import frame, read_frame, stream_limit
from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine.plugins import load_plugins
from medcourier.loadgen import plugin
from medcourier.loadgen.http_load import HttpTarget, run_http
from medcourier.loadgen.messages import MessageSource, pdf
from medcourier.loadgen.mllp_load import MllpTarget, run_mllp
from medcourier.loadgen.progress import Progress, Snapshot, render
from medcourier.loadgen.report import Report, percentile
from medcourier.loadgen.runner import Schedule, SetupError
from medcourier.transforms.hl7v2.inbound import parse_adt, parse_document_message
from tests.harness import (
    TOKEN,
    LoopThread,
    Running,
    against_server,
    eventually,
    free_port,
    running_engine,
)

HOST = "127.0.0.1"


def _consistent(data: dict[str, Any]) -> None:
    """The fields every report has, and latencies in order."""
    for key in ("messages", "ok", "errors", "errors_by_kind", "seconds", "messages_per_s"):
        assert key in data, key
    assert data["messages"] == data["ok"] + data["errors"]
    assert data["errors"] == sum(data["errors_by_kind"].values())
    latency = data["latency_ms"]
    assert set(latency) == {"p50", "p90", "p99", "max", "mean"}
    if data["ok"]:
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert data["messages_per_s"] > 0
        # a run of a few ms: the two figures may differ by the clock's ~1 ms, not by 1%
        tolerance = max(0.01, 0.001 / data["seconds"])
        assert data["messages_per_s"] == pytest.approx(data["ok"] / data["seconds"], rel=tolerance)
    else:
        assert all(value is None for value in latency.values())


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medcourier bench")
    plugin.add_arguments(parser)
    return parser.parse_args(list(argv))


def _bench(*argv: str) -> tuple[int, str, str]:
    """Run ``medcourier bench`` in this process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = asyncio.run(plugin.bench(_args(*argv), out, err))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def simulator(lt: LoopThread) -> Iterator[EhrSimulator]:
    ehr = EhrSimulator(host=HOST)
    lt.run(ehr.start())
    yield ehr
    lt.run(ehr.stop())


# --- messages, percentiles, schedule, progress ----------------------------------------------


def test_messages_parse_have_their_size_and_unique_control_ids() -> None:
    adt = MessageSource("adt", 2048)
    messages = [b"".join(adt.parts(seq)[1]) for seq in range(50)]
    assert {len(m) for m in messages} == {2048}
    assert len({message_control_id(m) for m in messages}) == 50
    event = parse_adt(messages[7].decode())
    assert event.trigger == "A01" and event.encounter is not None
    assert event.patient["identifier"][0]["value"].endswith("P000007")
    assert MessageSource("adt", 2048).prefix != adt.prefix  # no collision between runs
    cycling = MessageSource("adt", 2048, patients=3)
    ipps = {parse_adt(b"".join(cycling.parts(s)[1]).decode()).patient_identifiers for s in range(9)}
    assert len(ipps) == 3

    oru = MessageSource("oru", 10_000)
    parsed = parse_document_message(b"".join(oru.parts(3)[1]).decode())
    (document,) = parsed.documents
    assert document.content_type == "application/pdf" and document.payload is not None
    assert len(document.payload) == 10_000 and document.payload.startswith(b"%PDF-1.4")
    assert len(pdf(1_000_000)) == 1_000_000


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([3.0], 0.99) == 3
    assert percentile([], 0.5) is None


def test_open_loop_schedule_gives_due_times_and_stops_at_the_duration() -> None:
    schedule = Schedule(duration=1.0, rate=4)
    schedule.start(100.0)
    dues = []
    while (slot := schedule.take(100.0)) is not None:
        dues.append(slot)
    assert dues == [(0, 100.0), (1, 100.25), (2, 100.5), (3, 100.75)]
    closed = Schedule(count=2)
    closed.start(0.0)
    assert [closed.take(5.0), closed.take(6.0), closed.take(7.0)] == [(0, 5.0), (1, 6.0), None]


def test_progress_draws_only_on_a_terminal() -> None:
    line = render(Snapshot(0.5, 10, 9, 1, 2.0, "ACK"), width=200)
    assert "50%" in line and "ok 9" in line and "errors 1" in line and "5.0/s" in line

    async def scenario(progress: Progress) -> None:
        progress.start(lambda: Snapshot(None, 1, 1, 0, 0.1))
        await asyncio.sleep(0.05)
        await progress.stop()

    pipe = io.StringIO()  # not a terminal
    asyncio.run(scenario(Progress(pipe)))
    assert pipe.getvalue() == ""
    forced = io.StringIO()
    progress = Progress(forced, force=True, interval=0.01)
    asyncio.run(scenario(progress))
    assert progress.drawn >= 2 and "sent 1" in forced.getvalue()
    assert forced.getvalue().endswith("\n")
    assert Progress(io.StringIO(), enabled=False, force=True).enabled is False


# --- MLLP against the EHR simulator --------------------------------------------------------


def test_bench_command_against_the_simulator(simulator: EhrSimulator, tmp_path: Path) -> None:
    """The installed command (entry point ``loadgen``) in its own process."""
    assert "bench" in load_plugins().commands
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medcourier.engine.cli",
            "bench",
            "mllp",
            "--port",
            str(simulator.port),
            "--count",
            "300",
            "--connections",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # stderr is not a terminal: no progress bar
    assert "| ACK " in done.stdout and "ADT^A01 2.0 KiB" in done.stdout
    data = json.loads(out.read_text())
    _consistent(data)
    assert (data["messages"], data["ok"], data["errors"]) == (300, 300, 0)
    assert data["mode"] == "mllp" and data["message"] == "ADT^A01"
    assert data["message_bytes"] == 2048 and data["connections"] == 4
    assert data["loop"] == "closed" and data["rate"] is None
    assert len(simulator.received) == 300
    assert len({message_control_id(m) for m in simulator.received}) == 300
    assert simulator.connections == 4


def test_json_on_stdout_and_oru_payload(simulator: EhrSimulator) -> None:
    code, out, err = _bench(
        "mllp",
        "--port",
        str(simulator.port),
        "--message",
        "oru",
        "--payload-size",
        "65536",
        "-n",
        "40",
        "-c",
        "2",
        "--json",
        "-",
    )
    assert code == 0, err
    data = json.loads(out)  # JSON only: no table
    _consistent(data)
    assert data["ok"] == 40 and data["message"] == "ORU^R01" and data["payload_bytes"] == 65536
    assert data["message_bytes"] > 65536 * 4 // 3
    documents = parse_document_message(simulator.received[-1].decode()).documents
    assert documents[0].payload is not None and len(documents[0].payload) == 65536


def test_negative_acks_are_errors_by_code(simulator: EhrSimulator) -> None:
    simulator.ack_code = "AE"
    code, out, err = _bench(
        "mllp", "--port", str(simulator.port), "-n", "20", "-c", "2", "--json", "-"
    )
    assert code == 0, err  # errors alone do not fail the command...
    data = json.loads(out)
    _consistent(data)
    assert (data["ok"], data["errors"], data["errors_by_kind"]) == (0, 20, {"AE": 20})
    code, out, _ = _bench("mllp", "--port", str(simulator.port), "-n", "5", "--fail-on-error")
    assert code == plugin.EXIT_ERRORS  # ...unless asked
    assert "ACK errors: AE 5" in out
    simulator.ack_code = "AR"
    code, out, _ = _bench("mllp", "--port", str(simulator.port), "-n", "3", "--json", "-")
    assert json.loads(out)["errors_by_kind"] == {"AR": 3}


def test_duration_mode_stops(simulator: EhrSimulator) -> None:
    async def scenario() -> Report:
        return await run_mllp(
            MllpTarget(HOST, simulator.port), MessageSource("adt", 1024), Schedule(duration=0.5), 2
        )

    report = asyncio.run(scenario())
    data = report.to_json()
    _consistent(data)
    assert data["ok"] > 10 and data["errors"] == 0
    assert 0.45 <= data["seconds"] < 3
    assert data["duration"] == 0.5 and data["count"] is None


def test_rate_paces_the_sends_from_their_due_time(simulator: EhrSimulator) -> None:
    async def scenario() -> Report:
        return await run_mllp(
            MllpTarget(HOST, simulator.port),
            MessageSource("adt", 2048),
            Schedule(count=40, rate=100),
            2,
        )

    data = asyncio.run(scenario()).to_json()
    _consistent(data)
    assert data["ok"] == 40 and data["loop"] == "open" and data["rate"] == 100
    # the last message is due at 0.39 s: an open loop cannot finish earlier
    assert 0.39 <= data["seconds"] < 3
    assert data["messages_per_s"] <= 103


def test_unreachable_listener_is_a_setup_error() -> None:
    code, out, err = _bench("mllp", "--port", str(free_port()), "-n", "5")
    assert code == plugin.EXIT_SETUP and out == ""
    assert "cannot connect to 127.0.0.1:" in err


# --- MLLP against misbehaving listeners -----------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _against(handler: Handler, count: int, timeout: float = 10.0) -> tuple[dict[str, Any], int]:
    """Run the load against a server with ``handler``; return the report and the number of
    connections it accepted."""

    async def load(host: str, port: int) -> dict[str, Any]:
        report = await run_mllp(
            MllpTarget(host, port, timeout), MessageSource("adt", 1024), Schedule(count=count)
        )
        return report.to_json()

    data, connections = against_server(handler, load, limit=stream_limit())
    _consistent(data)
    return data, connections


def test_silent_listener_times_out_and_the_connection_is_renewed() -> None:
    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        await reader.read()  # never answers; waits for the client to hang up

    data, connections = _against(silent, 3, timeout=0.2)
    assert data["errors_by_kind"] == {"timeout": 3}
    assert connections == 3  # a late ACK must not be taken for the next message's


def test_listener_hanging_up_counts_closed_and_the_load_goes_on() -> None:
    served = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            message = await read_frame(reader)
            served += 1
            if served % 2 == 0:
                return  # hang up without answering every other message
            writer.write(frame(build_ack(message, "AA")))
            await writer.drain()

    data, connections = _against(flaky, 10)
    assert data["ok"] == 5 and data["errors_by_kind"] == {"closed": 5}
    assert connections == 5  # reopened after each hang-up but the last


def test_ack_for_another_message_is_a_bad_ack() -> None:
    async def confused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            message = await read_frame(reader)
            other = message.replace(message_control_id(message).encode(), b"SOMETHING-ELSE", 1)
            writer.write(frame(build_ack(other, "AA")))
            await writer.drain()

    data, _ = _against(confused, 4)
    assert data["errors_by_kind"] == {"bad-ack": 4}


# --- a running engine: its MLLP listener, and $send-to-ehr ----------------------------------


@pytest.fixture
def eng(lt: LoopThread, tmp_path: Path) -> Iterator[Running]:
    listener = {"name": "hl7-in", "channel": "mllp", "host": HOST, "port": 0}
    with running_engine(lt, tmp_path, inbound=[listener]) as running:
        yield running


def test_mllp_load_on_the_engine_listener(eng: Running) -> None:
    port = int(eng.engine.inbound[0].port)  # type: ignore[attr-defined]

    async def scenario(kind: str, count: int) -> Report:
        return await run_mllp(MllpTarget(HOST, port), MessageSource(kind, 2048), Schedule(count), 3)

    adt = asyncio.run(scenario("adt", 15)).to_json()
    _consistent(adt)
    assert (adt["ok"], adt["errors"]) == (15, 0)
    oru = asyncio.run(scenario("oru", 6)).to_json()
    _consistent(oru)
    assert (oru["ok"], oru["errors"]) == (6, 0)
    # ACKed means committed: the documents are then delivered to the EHR (the fallback route)
    eventually(lambda: len(eng.ehr.received) == 6, what="6 documents delivered")


def test_http_send_to_ehr_until_completed(eng: Running) -> None:
    async def scenario() -> Report:
        return await run_http(
            HttpTarget(eng.base, token=TOKEN),
            Schedule(count=12),
            4,
            payload_size=3000,
            wait=True,
            wait_timeout=60,
        )

    data = asyncio.run(scenario()).to_json()
    _consistent(data)
    assert data["mode"] == "http" and data["phase"] == "accepted"
    assert (data["ok"], data["errors"], data["payload_bytes"]) == (12, 0, 3000)
    e2e = data["end_to_end"]
    _consistent(e2e)
    assert (e2e["ok"], e2e["errors"]) == (12, 0)
    assert e2e["latency_ms"]["p50"] >= data["latency_ms"]["p50"] * 0.5  # delivered after accepted
    assert len(eng.ehr.received) == 12


def test_http_errors_and_setup_failures(eng: Running) -> None:
    # a patient the engine does not know: every document is refused with the seed's 422
    code, out, err = _bench(
        "http",
        "--url",
        eng.base + "/fhir",
        "--token",
        TOKEN,
        "--patient-id",
        "no-such-patient",
        "-n",
        "3",
        "--json",
        "-",
        "--no-progress",
    )
    assert code == 0, err
    data = json.loads(out)
    _consistent(data)
    assert data["errors_by_kind"] == {"http-422": 3}
    # a wrong token: the patient cannot be created, nothing is sent
    code, out, err = _bench("http", "--url", eng.base, "--token", "x" * 20, "-n", "3")
    assert code == plugin.EXIT_SETUP and out == ""
    assert "cannot create a patient" in err and "HTTP 401" in err
    # the same with a patient given: checked before anything is sent
    code, out, err = _bench(
        "http", "--url", eng.base, "--token", "x" * 20, "--patient-id", "p1", "-n", "3"
    )
    assert code == plugin.EXIT_SETUP and "refused the token" in err and "HTTP 401" in err


def test_http_setup_error_when_nothing_listens() -> None:
    async def scenario() -> Report:
        return await run_http(HttpTarget(f"http://{HOST}:{free_port()}"), Schedule(count=1))

    with pytest.raises(SetupError, match="cannot create a patient"):
        asyncio.run(scenario())
