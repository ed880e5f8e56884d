"""MLLP channel: framing, ACKs, the sender and the EHR simulator, over real local sockets.

There is no pytest-asyncio: each async scenario runs under ``asyncio.run`` in a plain test.
The messages are synthetic; the patient in them is fictitious.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pluggy
import pytest
from pydantic import ValidationError

from medcourier.channels.mllp import plugin
from medcourier.channels.mllp.ack import AckParseError, build_ack, message_control_id, parse_ack
from medcourier.channels.mllp.client import MllpOptions, MllpSender
from medcourier.channels.mllp.framing import (
    CARRIAGE_RETURN,
    END_BLOCK,
    START_BLOCK,
    FrameReader,
    FramingError,
    PeerClosed,
    frame,
    read_frame,
    stream_limit,
)
from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine import hookspecs
from medcourier.engine.model import Outcome, Rendered
from medcourier.engine.plugins import Plugins

LOCALHOST = "127.0.0.1"
PATIENT_NAME = "TESTPATIENT"


def hl7(control_id: str = "MSG00001", note: str = "Compte rendu") -> bytes:
    """A small ORU^R01 as the hl7v2 format would render it."""
    segments = [
        "MSH|^~\\&|MEDCOURIER|LAB|EHR|HOSP|20240102030405||ORU^R01^ORU_R01"
        f"|{control_id}|P|2.5|||||FRA|UNICODE UTF-8",
        f"PID|1||123456^^^HOSP^PI||{PATIENT_NAME}^JEAN||19800101|M",
        "OBR|1||DOC1|11490-0^Discharge summary^LN",
        f"OBX|1|TX|11490-0^Discharge summary^LN||{note}||||||F",
    ]
    return ("\r".join(segments) + "\r").encode()


def rendered(control_id: str = "MSG00001", note: str = "Compte rendu") -> Rendered:
    return Rendered(
        data=hl7(control_id, note),
        media_type="x-application/hl7-v2+er7",
        filename_hint=f"{control_id}.hl7",
        message_id=control_id,
    )


def options(port: int, **extra: float) -> MllpOptions:
    return MllpOptions.model_validate(
        {"connector": "mllp", "host": LOCALHOST, "port": port, **extra}
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


# --- framing ----------------------------------------------------------------------------------


def test_frame_wraps_message_in_block_characters() -> None:
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"
    assert (START_BLOCK, END_BLOCK, CARRIAGE_RETURN) == (b"\x0b", b"\x1c", b"\r")


@pytest.mark.parametrize("bad", [b"a\x0bb", b"a\x1cb"])
def test_frame_refuses_block_characters_inside(bad: bytes) -> None:
    with pytest.raises(FramingError):
        frame(bad)


def test_reader_reassembles_messages_split_across_reads() -> None:
    stream = frame(hl7("A")) + frame(hl7("B"))
    reader = FrameReader()
    messages = [message for i in range(len(stream)) for message in reader.feed(stream[i : i + 1])]
    assert messages == [hl7("A"), hl7("B")]
    assert not reader.in_frame and reader.pending == 0 and reader.discarded == 0


def test_reader_splits_several_messages_in_one_read() -> None:
    reader = FrameReader()
    assert reader.feed(frame(b"one") + frame(b"two") + frame(b"") + frame(b"three")[:4]) == [
        b"one",
        b"two",
        b"",
    ]
    assert reader.in_frame
    assert reader.feed(b"ee\x1c") == []
    assert reader.feed(b"\r") == [b"three"]


def test_reader_discards_and_counts_bytes_outside_frames() -> None:
    reader = FrameReader()
    assert reader.feed(b"junk" + frame(b"A") + b"\r\n" + frame(b"B") + b"tail") == [b"A", b"B"]
    assert reader.discarded == len(b"junk") + len(b"\r\n") + len(b"tail")


def test_reader_restarts_on_start_block_inside_an_open_frame() -> None:
    reader = FrameReader()
    assert reader.feed(b"\x0babandoned" + frame(b"kept")) == [b"kept"]
    assert reader.discarded == len(b"\x0babandoned")


def test_reader_accepts_exactly_max_size() -> None:
    assert FrameReader(max_size=10).feed(frame(b"x" * 10)) == [b"x" * 10]


def test_reader_refuses_oversized_frame_without_waiting_for_its_end() -> None:
    reader = FrameReader(max_size=10)
    with pytest.raises(FramingError, match="10-byte limit"):
        reader.feed(START_BLOCK + b"x" * 12)
    assert not reader.in_frame  # reset, usable again
    assert reader.feed(frame(b"ok")) == [b"ok"]


def test_reader_refuses_oversized_frame_arriving_whole() -> None:
    with pytest.raises(FramingError):
        FrameReader(max_size=10).feed(frame(b"x" * 11))


def test_reader_eof_inside_a_frame_is_an_error() -> None:
    reader = FrameReader()
    reader.feed(b"\x0bMSH|")
    with pytest.raises(FramingError, match="middle of a frame"):
        reader.eof()
    FrameReader().eof()  # between frames: fine


def stream_of(*chunks: bytes, limit: int = stream_limit()) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return reader


def test_read_frame_skips_junk_and_reads_in_order() -> None:
    async def scenario() -> list[bytes]:
        reader = stream_of(b"noise\x1c\r", b"xx\x0bA", b"B\x1c", b"\r\x0bC\x1c\r")
        return [await read_frame(reader), await read_frame(reader)]

    assert asyncio.run(scenario()) == [b"AB", b"C"]


def test_read_frame_end_of_stream_between_frames_is_peer_closed() -> None:
    async def scenario() -> None:
        reader = stream_of(frame(b"A"), b"trailing junk")
        assert await read_frame(reader) == b"A"
        with pytest.raises(PeerClosed):
            await read_frame(reader)

    asyncio.run(scenario())


def test_read_frame_end_of_stream_inside_a_frame_is_framing_error() -> None:
    async def scenario() -> None:
        with pytest.raises(FramingError, match="middle of a frame") as caught:
            await read_frame(stream_of(b"\x0bMSH|^~"))
        assert not isinstance(caught.value, PeerClosed)

    asyncio.run(scenario())


def test_read_frame_refuses_oversized_frames() -> None:
    async def scenario() -> None:
        with pytest.raises(FramingError):
            await read_frame(stream_of(frame(b"x" * 11), limit=stream_limit(100)), max_size=10)
        with pytest.raises(FramingError):  # no end in sight: the stream limit stops it
            await read_frame(stream_of(b"\x0b" + b"x" * 200, limit=stream_limit(10)), max_size=10)

    asyncio.run(scenario())


# --- ACKs -------------------------------------------------------------------------------------


def test_build_ack_swaps_parties_and_echoes_control_id() -> None:
    ack = build_ack(hl7("CTRL-42"), "AA", "ok")
    msh, msa = ack.decode().rstrip("\r").split("\r")
    fields = msh.split("|")
    assert fields[1] == "^~\\&"
    assert fields[2:6] == ["EHR", "HOSP", "MEDCOURIER", "LAB"]
    assert fields[8] == "ACK^R01^ACK"
    assert fields[9] and fields[9] != "CTRL-42"
    assert fields[10:12] == ["P", "2.5"]
    assert msa == "MSA|AA|CTRL-42|ok"
    assert ack.endswith(b"\r") and b"\n" not in ack


def test_ack_ids_are_unique_short_and_a_forked_process_draws_its_own() -> None:
    """MSH-10 of our ACKs: a per-process prefix and a counter, 20 characters at most (v2.5);
    MSH-7 the current second with its offset."""
    before = datetime.now().astimezone().replace(microsecond=0)
    ids = []
    for i in range(5000):
        fields = build_ack(hl7(f"C{i}"), "AA").decode().split("\r")[0].split("|")
        ids.append(fields[9])
    after = datetime.now().astimezone()
    assert len(set(ids)) == len(ids) and all(len(i) == 20 for i in ids)
    assert before <= datetime.strptime(fields[6], "%Y%m%d%H%M%S%z") <= after

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child answers with the id of an ACK it builds, then leaves at once
        os.write(write, build_ack(hl7("FORKED"), "AA").split(b"|")[9])
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    forked = os.read(read, 64).decode()
    os.close(read)
    assert len(forked) == 20 and forked[:12] != ids[-1][:12]


def test_build_and_parse_ack_round_trip() -> None:
    info = parse_ack(build_ack(hl7("CTRL-1"), "AA", "Message accepted"))
    assert (info.code, info.control_id, info.text, info.errors) == (
        "AA",
        "CTRL-1",
        "Message accepted",
        [],
    )
    assert info.positive


def test_ack_texts_are_escaped_then_read_back_unescaped() -> None:
    tricky = "bad | field ^ comp & sub ~ rep \\ esc"
    ack = build_ack(hl7("CTRL-2"), "AE", tricky, error=f"ERR: {tricky}")
    msa = ack.decode().split("\r")[1]
    assert msa == "MSA|AE|CTRL-2|bad \\F\\ field \\S\\ comp \\T\\ sub \\R\\ rep \\E\\ esc"
    info = parse_ack(ack)
    assert info.text == tricky
    assert info.errors == [f"ERR: {tricky}"]
    assert not info.positive


def test_ack_keeps_non_ascii_text() -> None:
    info = parse_ack(build_ack(hl7("C"), "AR", "Séjour inconnu", error="Unité fermée"))
    assert (info.text, info.errors) == ("Séjour inconnu", ["Unité fermée"])


def test_ack_text_line_breaks_survive_and_control_characters_go() -> None:
    ack = build_ack(hl7("C"), "AE", "line 1\r\nline 2\x1c\x0b\tend")
    assert b"\x1c" not in ack and b"\x0b" not in ack and b"\n" not in ack
    assert parse_ack(ack).text == "line 1\nline 2 end"


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
def test_parse_ack_tolerates_segment_endings(ending: str) -> None:
    ack = ending.join(["MSH|^~\\&|EHR|H|MC|L|20240101||ACK|1|P|2.5", "MSA|AR|X9|nope"]) + ending
    info = parse_ack(ack.encode())
    assert (info.code, info.control_id, info.text) == ("AR", "X9", "nope")


def test_parse_ack_reads_the_declared_separators() -> None:
    ack = "MSH#$*!%#EHR#H#MC#L#20240101##ACK#1#P#2.5\rMSA#AE#X1#a !F! b !S! c\rERR#####E"
    info = parse_ack(ack.encode())
    assert (info.code, info.control_id, info.text) == ("AE", "X1", "a # b $ c")


def test_parse_ack_reads_old_and_new_err_layouts() -> None:
    ack = "\r".join(
        [
            "MSH|^~\\&|EHR|H|MC|L|20240101||ACK|1|P|2.3",
            "MSA|AE|X2",
            "ERR|PID^1^3^204&Unknown key identifier",  # v2.3: everything in ERR-1
            "ERR|||101^Required field missing^HL70357|E",  # v2.5 without a user message
            "ERR|||207^x^HL70357|E|||diagnostic|patient not found",  # v2.5, ERR-8 wins
        ]
    )
    info = parse_ack(ack.encode())
    assert info.text == ""
    assert info.errors == [
        "PID 1 3 204 Unknown key identifier",
        "Required field missing",
        "patient not found",
    ]


@pytest.mark.parametrize(
    "data",
    [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"MSH|^~\\&|EHR\rPID|1", b"MSH|^~\\&|E\rMSA|ZZ|1"],
)
def test_parse_ack_refuses_what_is_not_an_ack(data: bytes) -> None:
    with pytest.raises(AckParseError):
        parse_ack(data)


def test_build_ack_refuses_bad_code_and_non_hl7() -> None:
    with pytest.raises(ValueError):
        build_ack(hl7(), "OK")
    with pytest.raises(AckParseError):
        build_ack(b"hello", "AA")


def test_message_control_id() -> None:
    assert message_control_id(hl7("ABC-1")) == "ABC-1"


# --- options ----------------------------------------------------------------------------------


def test_options_accept_address_or_host_and_port() -> None:
    by_address = MllpOptions.model_validate({"connector": "mllp", "address": "ehr.local:6661"})
    assert (by_address.host, by_address.port) == ("ehr.local", 6661)
    ipv6 = MllpOptions.model_validate({"connector": "mllp", "address": "[::1]:2575"})
    assert (ipv6.host, ipv6.port) == ("::1", 2575)
    explicit = MllpOptions.model_validate({"connector": "mllp", "host": "h", "port": "2575"})
    assert (explicit.host, explicit.port, explicit.ack_timeout, explicit.connect_timeout) == (
        "h",
        2575,
        30,
        10,
    )


@pytest.mark.parametrize(
    ("deliver", "message"),
    [
        ({"address": "h:1", "host": "h"}, "not both"),
        ({"address": "h:1", "port": 1}, "not both"),
        ({}, "address"),
        ({"host": "h"}, "address"),
        ({"address": "nocolon"}, "host:port"),
        ({"address": "h:0"}, "greater than or equal to 1"),
        ({"address": "h:70000"}, "less than or equal to 65535"),
        ({"address": "h:http"}, "integer"),
        ({"address": "h:1", "retries": 3}, "Extra inputs"),
        ({"address": "h:1", "ack_timeout": 0}, "greater than 0"),
    ],
)
def test_options_refuse_unclear_destinations(deliver: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MllpOptions.model_validate({"connector": "mllp", **deliver})


def test_options_refuse_another_connector() -> None:
    with pytest.raises(ValidationError):
        MllpOptions.model_validate({"connector": "sftp", "address": "h:1"})


# --- sender against the simulator ---------------------------------------------------------------


def test_sender_accepts_on_aa_then_rejects_on_ae_with_the_text(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with EhrSimulator(out_dir=tmp_path) as ehr:
            sender = MllpSender(options(ehr.port))
            try:
                ok = await sender.deliver(rendered("M1"))
                assert ok.outcome is Outcome.ACCEPTED
                assert ok.detail == {"ack_code": "AA"}

                ehr.ack_code, ehr.ack_text = "AE", "Unknown visit number"
                refused = await sender.deliver(rendered("M2"))
                assert refused.outcome is Outcome.REJECTED
                assert refused.reason == "AE (application error): Unknown visit number"
                assert refused.detail == {"ack_code": "AE"}

                ehr.ack_code, ehr.ack_text = "AR", ""
                refused = await sender.deliver(rendered("M3"))
                assert refused.outcome is Outcome.REJECTED
                assert refused.reason == "AR (application reject): simulated AR"
            finally:
                await sender.aclose()
            assert ehr.received == [hl7("M1"), hl7("M2"), hl7("M3")]
            assert ehr.connections == 1

    asyncio.run(scenario())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000001-M1.hl7",
        "000002-M2.hl7",
        "000003-M3.hl7",
    ]
    assert (tmp_path / "000002-M2.hl7").read_bytes() == hl7("M2")


def test_sender_reuses_one_connection_for_many_messages() -> None:
    async def scenario() -> None:
        async with EhrSimulator() as ehr:
            sender = MllpSender(options(ehr.port))
            try:
                for n in range(200):
                    result = await sender.deliver(rendered(f"SEQ{n}"))
                    assert result.outcome is Outcome.ACCEPTED, result.reason
            finally:
                await sender.aclose()
            assert len(ehr.received) == 200
            assert ehr.connections == 1

    asyncio.run(scenario())


def test_concurrent_deliveries_on_one_sender_do_not_interleave() -> None:
    async def scenario() -> None:
        async with EhrSimulator() as ehr:
            sender = MllpSender(options(ehr.port))
            try:
                results = await asyncio.gather(
                    *(sender.deliver(rendered(f"C{n}")) for n in range(30))
                )
            finally:
                await sender.aclose()
            assert all(r.outcome is Outcome.ACCEPTED for r in results), results
            assert sorted(ehr.received) == sorted(hl7(f"C{n}") for n in range(30))
            assert ehr.connections == 1

    asyncio.run(scenario())


def test_simulator_serves_many_senders_at_once() -> None:
    async def one_route(port: int, route: int) -> None:
        sender = MllpSender(options(port))
        try:
            for n in range(10):
                result = await sender.deliver(rendered(f"R{route}-{n}"))
                assert result.outcome is Outcome.ACCEPTED
        finally:
            await sender.aclose()

    async def scenario() -> None:
        async with EhrSimulator() as ehr:
            await asyncio.gather(*(one_route(ehr.port, route) for route in range(8)))
            assert len(ehr.received) == 80
            assert ehr.connections == 8

    asyncio.run(scenario())


def test_sender_carries_large_messages() -> None:
    note = "A" * (5 * 1024 * 1024)

    async def scenario() -> None:
        async with EhrSimulator() as ehr:
            sender = MllpSender(options(ehr.port))
            try:
                result = await sender.deliver(rendered("BIG", note))
            finally:
                await sender.aclose()
            assert result.outcome is Outcome.ACCEPTED
            assert ehr.received == [hl7("BIG", note)]

    asyncio.run(scenario())


def test_simulator_file_names_are_sanitized(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with EhrSimulator(out_dir=tmp_path) as ehr:
            sender = MllpSender(options(ehr.port))
            try:
                assert (await sender.deliver(rendered("../a/b:c"))).outcome is Outcome.ACCEPTED
            finally:
                await sender.aclose()

    asyncio.run(scenario())
    assert [p.name for p in tmp_path.iterdir()] == ["000001-_a_b_c.hl7"]


def test_simulator_nacks_what_is_not_hl7() -> None:
    async def scenario() -> None:
        async with EhrSimulator() as ehr:
            reader, writer = await asyncio.open_connection(LOCALHOST, ehr.port)
            try:
                writer.write(frame(b"hello"))
                info = parse_ack(await read_frame(reader))
            finally:
                writer.close()
                await writer.wait_closed()
            assert info.code == "AR"
            assert ehr.received == [b"hello"]

    asyncio.run(scenario())


def test_simulator_refuses_unknown_ack_code() -> None:
    with pytest.raises(ValueError):
        EhrSimulator().ack_code = "OK"


def test_sender_reconnects_after_the_destination_restarts() -> None:
    async def scenario() -> None:
        port = free_port()
        sender = MllpSender(options(port))
        try:
            async with EhrSimulator(port=port):
                assert (await sender.deliver(rendered("before"))).outcome is Outcome.ACCEPTED
            await asyncio.sleep(0.05)  # the idle connection's EOF reaches the sender
            async with EhrSimulator(port=port) as ehr:
                assert (await sender.deliver(rendered("after"))).outcome is Outcome.ACCEPTED
                assert ehr.connections == 1
        finally:
            await sender.aclose()

    asyncio.run(scenario())


def test_sender_asks_for_retry_when_nothing_listens() -> None:
    async def scenario() -> None:
        port = free_port()
        sender = MllpSender(options(port, connect_timeout=2))
        try:
            result = await sender.deliver(rendered())
            assert result.outcome is Outcome.RETRY
            assert result.reason is not None and f"127.0.0.1:{port}" in result.reason
            async with EhrSimulator(port=port):  # the destination comes up: next try works
                assert (await sender.deliver(rendered())).outcome is Outcome.ACCEPTED
        finally:
            await sender.aclose()

    asyncio.run(scenario())


# --- sender against misbehaving servers ---------------------------------------------------------

Behaviour = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


async def _garbage_in_a_frame(message: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(frame(b"this is not HL7"))


async def _garbage_outside_frames(message: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


async def _silence(message: bytes, writer: asyncio.StreamWriter) -> None:
    pass


async def _close_mid_frame(message: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(frame(build_ack(message, "AA"))[:20])
    await writer.drain()
    writer.close()


async def _close_before_answering(message: bytes, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _wrong_control_id(message: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(frame(build_ack(hl7("SOMEONE-ELSE"), "AA")))


async def _ack_of_another_kind(message: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(frame(message))  # echoes the message back: valid HL7, but no MSA


@contextlib.asynccontextmanager
async def misbehaving_server(port: int, behaviour: Behaviour) -> AsyncIterator[None]:
    """A raw MLLP server that reads one frame per turn and answers with ``behaviour``."""
    handlers: set[asyncio.Task[object]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while not writer.is_closing():
                await behaviour(await read_frame(reader), writer)
                await writer.drain()
        except (FramingError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, LOCALHOST, port)
    try:
        yield
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (_garbage_in_a_frame, "not a valid HL7 ACK"),
        (_garbage_outside_frames, "no ACK within 0.3 s"),
        (_silence, "no ACK within 0.3 s"),
        (_close_mid_frame, "middle of a frame"),
        (_close_before_answering, "connection closed by the peer"),
        (_wrong_control_id, "ACK for control id 'SOMEONE-ELSE', expected 'GOOD-1'"),
        (_ack_of_another_kind, "no MSA segment"),
    ],
)
def test_sender_retries_on_bad_answers_and_recovers(behaviour: Behaviour, expected: str) -> None:
    async def scenario() -> None:
        port = free_port()
        sender = MllpSender(options(port, ack_timeout=0.3))
        try:
            async with misbehaving_server(port, behaviour):
                result = await sender.deliver(rendered("GOOD-1"))
            assert result.outcome is Outcome.RETRY
            assert result.reason is not None and expected in result.reason, result.reason
            async with EhrSimulator(port=port) as ehr:
                again = await sender.deliver(rendered("GOOD-1"))
                assert again.outcome is Outcome.ACCEPTED, again.reason
                assert ehr.received == [hl7("GOOD-1")]
        finally:
            await sender.aclose()

    asyncio.run(scenario())


def test_sender_rejects_what_cannot_be_framed() -> None:
    async def scenario() -> None:
        async with EhrSimulator() as ehr:
            sender = MllpSender(options(ehr.port))
            broken = Rendered(b"MSH|\x1c|", "x-application/hl7-v2+er7", "x.hl7", "X")
            try:
                result = await sender.deliver(broken)
            finally:
                await sender.aclose()
            assert result.outcome is Outcome.REJECTED
            assert ehr.connections == 0

    asyncio.run(scenario())


def test_aclose_is_idempotent_and_sender_reopens_afterwards() -> None:
    async def scenario() -> None:
        async with EhrSimulator() as ehr:
            sender = MllpSender(options(ehr.port))
            await sender.aclose()
            assert (await sender.deliver(rendered("1"))).outcome is Outcome.ACCEPTED
            await sender.aclose()
            await sender.aclose()
            assert (await sender.deliver(rendered("2"))).outcome is Outcome.ACCEPTED
            await sender.aclose()
            assert ehr.connections == 2

    asyncio.run(scenario())


# --- plugin and command line ----------------------------------------------------------------------


def test_plugin_registers_connector_and_command() -> None:
    pm = pluggy.PluginManager("medcourier")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.check_pending()
    plugins = Plugins(pm)
    connector = plugins.connectors["mllp"]
    assert connector.options_model is MllpOptions
    sender = connector.open(MllpOptions.model_validate({"connector": "mllp", "address": "h:1"}))
    assert isinstance(sender, MllpSender)
    assert "simulate-ehr" in plugins.commands


def test_simulate_ehr_command_serves_until_sigint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = plugin.medcourier_cli_commands()[0]
    parser = argparse.ArgumentParser(prog="medcourier simulate-ehr")
    command.add_arguments(parser)
    args = parser.parse_args(
        ["--port", "0", "--out", str(tmp_path / "inbox"), "--ack", "AE", "--ack-text", "nope"]
    )

    async def wait_for_port(output: list[str]) -> int:
        for _ in range(500):
            output.append(capsys.readouterr().out)
            if found := re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(output)):
                return int(found.group(1))
            await asyncio.sleep(0.01)
        raise AssertionError("simulate-ehr did not start")

    async def scenario() -> tuple[int, str]:
        output: list[str] = []
        running = command.run(args)
        assert inspect.isawaitable(running)
        task = asyncio.ensure_future(running)
        port = await wait_for_port(output)
        sender = MllpSender(options(port))
        try:
            for control_id in ("CLI-1", "CLI-2"):
                result = await sender.deliver(rendered(control_id))
                assert result.outcome is Outcome.REJECTED
                assert result.reason == "AE (application error): nope"
        finally:
            await sender.aclose()
        os.kill(os.getpid(), signal.SIGINT)
        code = await asyncio.wait_for(task, 5)
        output.append(capsys.readouterr().out)
        return code, "".join(output)

    code, printed = asyncio.run(scenario())
    assert code == 0
    assert "received 000001 CLI-1\n" in printed
    assert "received 000002 CLI-2\n" in printed
    assert "stopped after 2 messages" in printed
    assert PATIENT_NAME not in printed
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == [
        "000001-CLI-1.hl7",
        "000002-CLI-2.hl7",
    ]


def test_an_ack_in_the_senders_charset_declares_it_in_msh_18() -> None:
    message = (
        "MSH|^~\\&|LAB|HOSP|MC|MC|20260101120000||ORU^R01^ORU_R01|42|P|2.5|||||FRA|8859/1\r"
        "PID|1||X^^^H^PI\r"
    ).encode("latin-1")
    ack = build_ack(message, "AE", "patient inconnu : Hélène")
    msh = ack.split(b"\r")[0].split(b"|")
    assert msh[17] == b"8859/1"
    assert "Hélène".encode("latin-1") in ack
