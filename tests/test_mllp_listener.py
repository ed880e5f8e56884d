"""The inbound MLLP listener, over real local sockets (TCP and TLS), against a recording sink.

The sink is the engine's side of the contract and is faked here (it records messages and returns
what a test asks); the clients are real: asyncio streams, python-hl7's own MLLP client, and TLS
with certificates made by ``openssl`` for each run. No pytest-asyncio: each scenario runs under
``asyncio.run`` in a plain test. The messages are synthetic; the patients are fictitious.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pluggy
import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from medcourier.channels.mllp import plugin
from medcourier.channels.mllp.ack import AckInfo, build_ack, parse_ack
from medcourier.channels.mllp.framing import FramingError, frame, read_frame, stream_limit
from medcourier.channels.mllp.listener import (
    _CLOSE_TIMEOUT,
    ListenerOptions,
    MllpListener,
    _IdleWatch,
)
from medcourier.engine import hookspecs
from medcourier.engine.inbound import (
    InboundDocument,
    InboundMessage,
    InboundResult,
    Verdict,
)
from medcourier.engine.plugins import Plugins

LOCALHOST = "127.0.0.1"
PATIENT = "TESTPATIENT"
TIMEOUT = 5.0


def message(
    control_id: str = "MSG-1",
    message_type: str = "ADT^A01^ADT_A01",
    *,
    charset: str = "",
    encoding: str = "ascii",
    given: str = "JEAN",
    accept_ack: str = "",
    application_ack: str = "",
    padding: int = 0,
) -> bytes:
    """A small HL7 v2.5 message; MSH-15/16/18 as asked, encoded with ``encoding``."""
    segments = [
        "MSH|^~\\&|LABSYS^1.2.250.1.99^ISO|LAB|MEDCOURIER|HOSP|20240102030405||"
        f"{message_type}|{control_id}|P|2.5|||{accept_ack}|{application_ack}|FRA|{charset}",
        "EVN|A01|20240102030405",
        f"PID|1||123456^^^HOSP^PI||{PATIENT}^{given}||19800101|M",
        "PV1|1|I|CARDIO^101^1",
    ]
    if padding:
        segments.append(f"NTE|1||{'x' * padding}")
    return ("\r".join(segments) + "\r").encode(encoding)


class FakeSink:
    """The engine's side: records what arrives, answers ``result`` (or a per-control-id one),
    optionally after ``delay`` seconds, and raises for the control ids in ``fail_on``."""

    def __init__(
        self,
        result: InboundResult | None = None,
        *,
        results: dict[str, InboundResult] | None = None,
        delay: float = 0.0,
        fail_on: tuple[str, ...] = (),
    ) -> None:
        self.result = result or InboundResult(Verdict.ACCEPT)
        self.results = results or {}
        self.delay = delay
        self.fail_on = set(fail_on)
        self.received: list[InboundMessage] = []
        self.returned_at: list[float] = []

    async def hl7_message(self, message: InboundMessage) -> InboundResult:
        self.received.append(message)
        if self.delay:
            await asyncio.sleep(self.delay)
        if message.control_id in self.fail_on:
            raise RuntimeError(f"database unavailable while storing {PATIENT}")
        self.returned_at.append(time.monotonic())
        return self.results.get(message.control_id, self.result)

    async def document(self, document: InboundDocument) -> InboundResult:
        raise NotImplementedError("the MLLP listener never sends documents")

    @property
    def control_ids(self) -> list[str]:
        return [m.control_id for m in self.received]


@contextlib.asynccontextmanager
async def listening(sink: FakeSink, **options: Any) -> AsyncIterator[MllpListener]:
    listener = MllpListener(ListenerOptions(port=0, **options), sink, "lab-in")
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


@dataclass
class Client:
    """A plain MLLP client on asyncio streams: frames out, frames in, nothing clever."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext | None = None) -> Client:
        reader, writer = await asyncio.open_connection(
            LOCALHOST, port, ssl=context, limit=stream_limit(1024 * 1024)
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:  # small writes leave as they are: the fragmentation tests need it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, timeout: float = TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            return await read_frame(self.reader, 1024 * 1024)

    async def send(self, data: bytes, timeout: float = TIMEOUT) -> bytes:
        await self.write(frame(data))
        return await self.read(timeout)

    async def closed_by_peer(self, timeout: float = TIMEOUT) -> bool:
        """True once the listener has closed the connection (EOF or reset)."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read() == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(2):
                await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connected(port: int, context: ssl.SSLContext | None = None) -> AsyncIterator[Client]:
    client = await Client.connect(port, context)
    try:
        yield client
    finally:
        await client.close()


def segments(ack: bytes, encoding: str = "ascii") -> dict[str, list[str]]:
    """The ACK's segments by name, each split on ``|`` (index n is field n)."""
    lines = ack.decode(encoding).rstrip("\r").split("\r")
    return {line[:3]: line.split("|") for line in lines}


def acked(ack: bytes) -> tuple[str, str]:
    info = parse_ack(ack)
    return info.code, info.control_id


# --- a real client nobody here wrote ------------------------------------------------------------


def test_python_hl7_client_gets_aa_echoing_its_control_id() -> None:
    async def scenario() -> list[tuple[str, str]]:
        sink = FakeSink()
        async with listening(sink) as listener:
            reader, writer = await hl7.mllp.open_hl7_connection(LOCALHOST, listener.port)
            answers = []
            try:
                for control_id in ("PY-1", "PY-2"):
                    writer.writemessage(hl7.parse(message(control_id).decode()))
                    await writer.drain()
                    ack = await asyncio.wait_for(reader.readmessage(), TIMEOUT)
                    msa = ack.segment("MSA")
                    answers.append((str(msa(1)), str(msa(2))))
            finally:
                writer.close()
                await writer.wait_closed()
        assert sink.control_ids == ["PY-1", "PY-2"]
        return answers

    assert asyncio.run(scenario()) == [("AA", "PY-1"), ("AA", "PY-2")]


def test_sink_receives_the_message_and_its_header() -> None:
    async def scenario() -> None:
        sink = FakeSink(InboundResult(Verdict.ACCEPT, "stored"))
        async with listening(sink) as listener, connected(listener.port) as client:
            # LF segment endings and a leading newline: repaired, not refused.
            sent = message("HDR-1").replace(b"\r", b"\n")
            ack = parse_ack(await client.send(b"\n" + sent))
            assert (ack.code, ack.control_id, ack.text) == ("AA", "HDR-1", "stored")
            local = client.writer.get_extra_info("sockname")
        (received,) = sink.received
        assert received.text == message("HDR-1").decode()
        assert received.channel == "lab-in"
        assert received.sending_application == "LABSYS^1.2.250.1.99^ISO"
        assert received.sending_facility == "LAB"
        assert received.control_id == "HDR-1"
        assert received.message_type == "ADT^A01"
        assert received.peer == f"{local[0]}:{local[1]}"

    asyncio.run(scenario())


# --- framing over the wire ---------------------------------------------------------------------


def test_frames_split_byte_by_byte_are_reassembled() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        async with listening(sink) as listener, connected(listener.port) as client:
            for control_id in ("FRAG-1", "FRAG-2"):
                for byte in frame(message(control_id)):
                    await client.write(bytes([byte]))
                    await asyncio.sleep(0)
                assert acked(await client.read()) == ("AA", control_id)
        assert [m.text.encode() for m in sink.received] == [message("FRAG-1"), message("FRAG-2")]

    asyncio.run(scenario())


def test_several_frames_in_one_write_are_answered_in_order() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        async with listening(sink) as listener, connected(listener.port) as client:
            await client.write(b"".join(frame(message(f"CO-{n}")) for n in range(3)))
            answers = [acked(await client.read()) for _ in range(3)]
        assert answers == [("AA", "CO-0"), ("AA", "CO-1"), ("AA", "CO-2")]
        assert sink.control_ids == ["CO-0", "CO-1", "CO-2"]

    asyncio.run(scenario())


def test_bytes_between_frames_are_dropped_and_counted() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        junk, noise = b"GET / HTTP/1.1\r\n\r\n", b"\x1c\rnoise\r\n"
        async with listening(sink) as listener, connected(listener.port) as client:
            await client.write(junk + frame(message("J-1")) + noise + frame(message("J-2")))
            assert acked(await client.read()) == ("AA", "J-1")
            assert acked(await client.read()) == ("AA", "J-2")
            assert listener.discarded_bytes == len(junk) + len(noise)
            assert (listener.connections, listener.messages) == (1, 2)

    asyncio.run(scenario())


def test_oversize_message_gets_ar_then_the_connection_is_closed() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        async with listening(sink, max_message_bytes=1024) as listener:
            # Whole in one write: the head of the frame is in the chunk that overflows.
            async with connected(listener.port) as client:
                await client.write(frame(message("BIG-1", padding=4000)))
                ack = parse_ack(await client.read())
                assert (ack.code, ack.control_id) == ("AR", "BIG-1")
                assert ack.errors == ["message larger than 1024 bytes"]
                assert await client.closed_by_peer()
            # In pieces: the MSH arrived in an earlier read than the one that overflows.
            async with connected(listener.port) as client:
                # Only up to just past the limit: a client still writing when the listener
                # hangs up gets a reset, and asyncio then drops what it had not read yet.
                data = frame(message("BIG-2", padding=4000))
                for start in (0, 700):
                    await client.write(data[start : start + 700])
                    await asyncio.sleep(0.05)
                ack = parse_ack(await client.read())
                assert (ack.code, ack.control_id) == ("AR", "BIG-2")
                assert await client.closed_by_peer()
            # Not even HL7: still an AR, with a minimal header.
            async with connected(listener.port) as client:
                await client.write(frame(b"x" * 3000))
                assert acked(await client.read()) == ("AR", "")
                assert await client.closed_by_peer()
            # The listener itself is fine.
            async with connected(listener.port) as client:
                assert acked(await client.send(message("SMALL"))) == ("AA", "SMALL")
        assert sink.control_ids == ["SMALL"]

    asyncio.run(scenario())


def test_many_connections_at_once_each_with_several_messages() -> None:
    async def one_sender(port: int, number: int) -> list[tuple[str, str]]:
        async with connected(port) as client:
            return [acked(await client.send(message(f"C{number}-{n}"))) for n in range(5)]

    async def scenario() -> None:
        sink = FakeSink(delay=0.001)
        async with listening(sink) as listener:
            started = time.monotonic()
            results = await asyncio.gather(*(one_sender(listener.port, i) for i in range(200)))
            elapsed = time.monotonic() - started
            assert listener.connections == 200
        for number, answers in enumerate(results):
            assert answers == [("AA", f"C{number}-{n}") for n in range(5)]
        assert len(sink.received) == 1000
        assert elapsed < 10

    asyncio.run(scenario())


def test_time_in_the_sink_and_a_steady_sender_do_not_count_as_idle() -> None:
    """The idle timeout runs only while the listener waits for a frame: a message the engine
    takes longer than it to commit is still answered, and a sender whose messages come closer
    together than it is never cut, however long it goes on."""

    async def scenario() -> None:
        sink = FakeSink()
        async with (
            listening(sink, idle_timeout=0.3) as listener,
            connected(listener.port) as steady,
        ):
            sink.delay = 0.7  # more than twice the idle timeout, in the sink
            assert acked(await steady.send(message("SLOW-1"))) == ("AA", "SLOW-1")
            sink.delay = 0.0
            started = time.monotonic()
            for i in range(8):  # 1.2 s in all, a message every 0.15 s
                await asyncio.sleep(0.15)
                assert acked(await steady.send(message(f"STEADY-{i}")))[0] == "AA"
            assert time.monotonic() - started > 1.0
            quiet = time.monotonic()
            assert await steady.closed_by_peer(timeout=3)
            assert 0.2 < time.monotonic() - quiet < 1.0

    asyncio.run(scenario())


def test_an_idle_connection_is_cut_even_when_its_peer_reads_nothing() -> None:
    """Expired, the idle watch closes the transport so that the read waiting on it ends. A close
    waits for the bytes still queued (ACKs a peer never read): then the connection is aborted
    after the close timeout, rather than leaving the connection's handler waiting forever."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[tuple[bytes, bool, float]] = loop.create_future()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"\x0bMSA|AA|X\r\x1c\r" * 1_000_000)  # 15 MB: more than sockets hold
            assert writer.transport.get_write_buffer_size() > 0
            watch = _IdleWatch(loop, 0.2, writer)
            started = loop.time()
            try:
                data = await reader.read(1024)
            finally:
                watch.cancel()
            ended.set_result((data, watch.expired, loop.time() - started))

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, kept small
        peer.setblocking(False)
        await loop.sock_connect(peer, ("127.0.0.1", port))
        _reader, writer = await asyncio.open_connection(sock=peer)  # never reads
        try:
            data, expired, waited = await asyncio.wait_for(ended, _CLOSE_TIMEOUT + 5)
        finally:
            writer.transport.abort()
            server.close()
            await server.wait_closed()
        assert data == b"" and expired
        assert 0.2 <= waited < 0.2 + _CLOSE_TIMEOUT + 2

    asyncio.run(scenario())


def test_idle_connections_are_closed() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        async with listening(sink, idle_timeout=0.3) as listener:
            async with connected(listener.port) as quiet:
                assert acked(await quiet.send(message("IDLE-1"))) == ("AA", "IDLE-1")
                started = time.monotonic()
                assert await quiet.closed_by_peer(timeout=3)
                assert 0.2 < time.monotonic() - started < 2
            # Dribbling bytes that never complete a frame does not keep a connection open.
            async with connected(listener.port) as dribbler:
                started = time.monotonic()
                data = frame(message("IDLE-2"))
                with contextlib.suppress(ConnectionError):
                    for byte in data[:100]:
                        if dribbler.writer.is_closing() or dribbler.reader.at_eof():
                            break
                        await dribbler.write(bytes([byte]))
                        await asyncio.sleep(0.02)
                assert await dribbler.closed_by_peer(timeout=3)
                assert time.monotonic() - started < 2
        assert sink.control_ids == ["IDLE-1"]

    asyncio.run(scenario())


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, with_certificate: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_certificate:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed for test certificates (apt-get install openssl)")
    directory = tmp_path_factory.mktemp("pki")
    (directory / "req.cnf").write_text("[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nCN=x\n")
    leaf = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    leaf += "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    (directory / "ext.cnf").write_text(
        f"[server]\n{leaf}extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n"
        f"[client]\n{leaf}extendedKeyUsage=clientAuth\n"
    )
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-new", *new_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=medcourier test CA", "-config", "req.cnf",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash")  # fmt: skip
    for serial, name in enumerate(("server", "client"), start=2):
        run("req", "-new", *new_key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=medcourier test {name}", "-config", "req.cnf")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem",
            "-extfile", "ext.cnf", "-extensions", name)  # fmt: skip
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


def test_tls_with_a_server_certificate(pki: Pki) -> None:
    tls = {"certfile": pki.server_cert, "keyfile": pki.server_key}

    async def scenario() -> None:
        sink = FakeSink()
        async with (
            listening(sink, tls=tls) as listener,
            connected(listener.port, pki.client_context(with_certificate=False)) as client,
        ):
            assert client.writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            assert acked(await client.send(message("TLS-1"))) == ("AA", "TLS-1")
            assert acked(await client.send(message("TLS-2"))) == ("AA", "TLS-2")
        assert sink.control_ids == ["TLS-1", "TLS-2"]

    asyncio.run(scenario())


def test_tls_requiring_client_certificates_refuses_a_client_without_one(pki: Pki) -> None:
    tls = {
        "certfile": pki.server_cert,
        "keyfile": pki.server_key,
        "cafile": pki.ca,
        "require_client_certificate": True,
    }

    async def anonymous(port: int) -> BaseException | None:
        """Try without a certificate; return what went wrong (None if it got an ACK)."""
        try:
            async with connected(port, pki.client_context(with_certificate=False)) as client:
                await client.send(message("ANON-1"), timeout=3)
        except (OSError, FramingError) as exc:  # ssl.SSLError is an OSError
            return exc
        return None

    async def scenario() -> None:
        sink = FakeSink()
        async with listening(sink, tls=tls) as listener:
            async with connected(listener.port, pki.client_context(with_certificate=True)) as c:
                assert acked(await c.send(message("MTLS-1"))) == ("AA", "MTLS-1")
            assert await anonymous(listener.port) is not None
        assert sink.control_ids == ["MTLS-1"]

    asyncio.run(scenario())


# --- character sets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msh18", "encoding", "given", "reply"),
    [
        ("8859/1", "latin-1", "ÉLOÏSE", "Reçu, séjour créé"),
        ("8859/1", "latin-1", "JEAN", "Reçu, séjour créé"),  # ASCII content: MSH-18 still rules
        ("UNICODE UTF-8", "utf-8", "ÉLOÏSE", "Reçu ✓"),
        ("8859/15", "iso8859-15", "ŒDIPE€", "Reçu €"),
    ],
)
def test_msh18_decodes_the_message_and_encodes_the_ack(
    msh18: str, encoding: str, given: str, reply: str
) -> None:
    async def scenario() -> bytes:
        sink = FakeSink(InboundResult(Verdict.ACCEPT, reply))
        async with listening(sink) as listener, connected(listener.port) as client:
            sent = message("CS-1", charset=msh18, encoding=encoding, given=given)
            ack = await client.send(sent)
        (received,) = sink.received
        assert received.text == sent.decode(encoding)
        assert f"^{given}|" in received.text
        return ack

    ack = asyncio.run(scenario())
    assert reply.encode(encoding) in ack
    msa = segments(ack, encoding)["MSA"]
    assert msa[1:4] == ["AA", "CS-1", reply]


@pytest.mark.parametrize(
    ("sent", "options", "reason"),
    [
        (message("CS-2", charset="EBCDIC-FR"), {}, "character set 'EBCDIC-FR' is not supported"),
        (
            message("CS-3", charset="UNICODE UTF-8", given="ÉLOÏSE", encoding="latin-1"),
            {},
            "message is not valid UNICODE UTF-8",
        ),
        (
            message("CS-4", given="ÉLOÏSE", encoding="latin-1"),
            {},
            "message is not valid ascii (the listener's default)",
        ),
    ],
)
def test_undecodable_messages_are_rejected(
    sent: bytes, options: dict[str, Any], reason: str
) -> None:
    async def scenario() -> AckInfo:
        sink = FakeSink()
        async with listening(sink, **options) as listener, connected(listener.port) as client:
            ack = parse_ack(await client.send(sent))
        assert sink.received == []
        return ack

    ack = asyncio.run(scenario())
    assert ack.code == "AR"
    assert ack.text == reason
    assert ack.errors == [reason]


def test_default_charset_applies_when_msh18_is_empty() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        async with (
            listening(sink, default_charset="8859/1") as listener,
            connected(listener.port) as client,
        ):
            ack = await client.send(message("DEF-1", given="ÉLOÏSE", encoding="latin-1"))
            assert acked(ack) == ("AA", "DEF-1")
        assert "^ÉLOÏSE|" in sink.received[0].text
        assert listener.options.default_charset == "iso8859-1"

    asyncio.run(scenario())


# --- what the listener refuses by itself -------------------------------------------------------


def test_message_types_not_accepted_are_rejected_without_calling_the_sink() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        async with listening(sink) as listener, connected(listener.port) as client:
            refused = parse_ack(await client.send(message("T-1", "SIU^S12^SIU_S12")))
            assert (refused.code, refused.control_id) == ("AR", "T-1")
            assert refused.text == "message type SIU^S12 is not accepted by listener lab-in"
            assert refused.errors == [refused.text]
            # ADT^* takes any ADT event; ORU^R01 and MDM^T02 exactly those.
            for control_id, kind in [("T-2", "ADT^A08"), ("T-3", "ORU^R01"), ("T-4", "MDM^T02")]:
                assert acked(await client.send(message(control_id, kind))) == ("AA", control_id)
            assert acked(await client.send(message("T-5", "ORU^R30"))) == ("AR", "T-5")
        assert sink.control_ids == ["T-2", "T-3", "T-4"]

        sink = FakeSink()
        async with (
            listening(sink, message_types=["oru^r01"]) as listener,
            connected(listener.port) as client,
        ):
            assert acked(await client.send(message("T-6", "ADT^A01"))) == ("AR", "T-6")
            assert acked(await client.send(message("T-7", "ORU^R01"))) == ("AA", "T-7")
        assert sink.control_ids == ["T-7"]

    asyncio.run(scenario())


def test_what_is_not_a_usable_hl7_message_is_rejected() -> None:
    async def scenario() -> None:
        sink = FakeSink()
        async with listening(sink) as listener, connected(listener.port) as client:
            not_hl7 = parse_ack(await client.send(b"PID|1||123"))
            assert (not_hl7.code, not_hl7.control_id) == ("AR", "")
            assert "does not start with an MSH segment" in not_hl7.text
            no_id = parse_ack(await client.send(message("")))
            assert no_id.code == "AR"
            assert no_id.text == "MSH-10 (message control id) is empty"
            assert acked(await client.send(message("OK-1"))) == ("AA", "OK-1")
        assert sink.control_ids == ["OK-1"]

    asyncio.run(scenario())


# --- the sink's verdict ------------------------------------------------------------------------


def test_sink_error_with_location_gives_ae_with_err2_and_reject_gives_ar() -> None:
    results = {
        "V-1": InboundResult(Verdict.ERROR, "unknown patient", error_location="PID^1^3^^"),
        "V-2": InboundResult(Verdict.REJECT, "not for this facility"),
    }

    async def scenario() -> tuple[bytes, bytes]:
        sink = FakeSink(results=results)
        async with listening(sink) as listener, connected(listener.port) as client:
            return await client.send(message("V-1")), await client.send(message("V-2"))

    error, reject = asyncio.run(scenario())
    info = parse_ack(error)
    assert (info.code, info.control_id, info.text, info.errors) == (
        "AE",
        "V-1",
        "unknown patient",
        ["unknown patient"],
    )
    err = segments(error)["ERR"]
    assert err[2] == "PID^1^3^^"
    assert err[4] == "E"
    info = parse_ack(reject)
    assert (info.code, info.text) == ("AR", "not for this facility")


def test_enhanced_mode_sends_the_commit_ack_msh15_asks_for() -> None:
    error = InboundResult(Verdict.ERROR, "unknown patient")
    results = {"E-ER-bad": error, "E-AL-bad": error}
    cases = [  # control id, MSH-15, MSH-16, expected answer (None: no answer)
        ("E-AL", "AL", "NE", "CA"),
        ("E-AL-bad", "AL", "", "CE"),
        ("E-NE", "NE", "AL", None),
        ("E-ER", "ER", "", None),
        ("E-ER-bad", "ER", "", "CE"),
        ("E-SU", "SU", "", "CA"),
        ("E-16", "", "AL", "CA"),  # enhanced because of MSH-16 alone: answered
        ("E-ORIGINAL", "", "", "AA"),
    ]

    async def scenario() -> None:
        sink = FakeSink(results=results)
        async with listening(sink) as listener, connected(listener.port) as client:
            for control_id, msh15, msh16, expected in cases:
                sent = message(control_id, accept_ack=msh15, application_ack=msh16)
                await client.write(frame(sent))
                if expected is None:
                    with pytest.raises(TimeoutError):
                        await client.read(timeout=0.3)
                else:
                    assert acked(await client.read()) == (expected, control_id)
            refused = message("E-CR", "SIU^S12", accept_ack="AL", application_ack="AL")
            assert acked(await client.send(refused)) == ("CR", "E-CR")
        assert sink.control_ids == [case[0] for case in cases]

    asyncio.run(scenario())


def test_sink_failure_gives_ae_and_the_connection_keeps_working() -> None:
    async def scenario() -> None:
        sink = FakeSink(fail_on=("BOOM-1",))
        async with listening(sink) as listener, connected(listener.port) as client:
            failed = parse_ack(await client.send(message("BOOM-1")))
            assert (failed.code, failed.control_id, failed.text) == (
                "AE",
                "BOOM-1",
                "internal error",
            )
            assert acked(await client.send(message("AFTER-1"))) == ("AA", "AFTER-1")

    with capture_logs() as logs:
        asyncio.run(scenario())
    (failure,) = [entry for entry in logs if entry["event"] == "mllp.listener.sink_failed"]
    assert failure["channel"] == "lab-in"
    assert failure["control_id"] == "BOOM-1"
    assert failure["error"] == "RuntimeError"
    assert PATIENT not in repr(logs)


def test_the_ack_is_sent_only_after_the_sink_returned() -> None:
    async def scenario() -> tuple[float, float, float]:
        sink = FakeSink(delay=0.3)
        async with listening(sink) as listener, connected(listener.port) as client:
            sent_at = time.monotonic()
            assert acked(await client.send(message("SLOW-1"))) == ("AA", "SLOW-1")
            acked_at = time.monotonic()
        return sent_at, sink.returned_at[0], acked_at

    sent_at, returned_at, acked_at = asyncio.run(scenario())
    assert acked_at - sent_at >= 0.3
    assert acked_at >= returned_at


def test_stop_lets_the_message_in_the_sink_finish_and_be_acked() -> None:
    async def scenario() -> None:
        sink = FakeSink(delay=0.3)
        listener = MllpListener(ListenerOptions(port=0), sink, "lab-in")
        await listener.start()
        port = listener.port
        async with connected(port) as busy, connected(port) as idle:
            await busy.write(frame(message("STOP-1")))
            while not sink.received:
                await asyncio.sleep(0.01)
            await listener.stop()
            assert acked(await busy.read()) == ("AA", "STOP-1")
            assert await busy.closed_by_peer()
            assert await idle.closed_by_peer()
        with pytest.raises(OSError):
            await Client.connect(port)

    asyncio.run(scenario())


# --- options and plugin -------------------------------------------------------------------------


def test_options_defaults_and_validation(tmp_path: Path) -> None:
    options = ListenerOptions.model_validate({"channel": "mllp", "port": 2575})
    assert (options.host, options.max_message_bytes, options.idle_timeout) == (
        "127.0.0.1",
        16 * 1024 * 1024,
        300.0,
    )
    assert options.message_types == ["ADT^*", "ORU^R01", "MDM^T02"]
    assert options.tls is None
    assert ListenerOptions(port=0, default_charset="UNICODE UTF-8").default_charset == "utf-8"
    bad: list[dict[str, Any]] = [
        {"port": 70000},
        {"port": 1, "verbose": True},
        {"port": 1, "channel": "file"},
        {"port": 1, "message_types": ["ADT"]},
        {"port": 1, "message_types": ["*"]},
        {"port": 1, "default_charset": "klingon"},
        {"port": 1, "default_charset": "utf-16"},
        {"port": 1, "idle_timeout": 0},
    ]
    for data in bad:
        with pytest.raises(ValidationError):
            ListenerOptions.model_validate(data)
    cert = tmp_path / "cert.pem"
    cert.write_text("not really")
    with pytest.raises(ValidationError, match="needs a cafile"):
        ListenerOptions.model_validate(
            {
                "port": 1,
                "tls": {"certfile": cert, "keyfile": cert, "require_client_certificate": True},
            }
        )
    with pytest.raises(ValidationError):
        ListenerOptions.model_validate(
            {"port": 1, "tls": {"certfile": tmp_path / "missing.pem", "keyfile": cert}}
        )


def test_plugin_registers_the_inbound_channel() -> None:
    pm = pluggy.PluginManager("medcourier")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.check_pending()
    inbound = Plugins(pm).inbound["mllp"]
    assert inbound.options_model is ListenerOptions
    options = ListenerOptions.model_validate({"channel": "mllp", "port": 0})
    listener = inbound.open(options, FakeSink(), "adt-in")
    assert isinstance(listener, MllpListener)
    assert (listener.name, listener.port) == ("adt-in", 0)


def test_build_ack_honours_msh18_and_writes_err2() -> None:
    latin = message("A-1", charset="8859/1")
    ack = build_ack(latin, "AE", "Séjour inconnu", error="Unité fermée", location="PV1^1^3")
    assert "Séjour inconnu".encode("latin-1") in ack
    assert segments(ack, "latin-1")["ERR"][2] == "PV1^1^3"
    custom = b"MSH#$*!%#A#B#C#D#20240101##ADT$A01#A-2#P#2.5\r"
    assert (
        build_ack(custom, "AE", error="x", location="PID^1^3")
        .split(b"\r")[2]
        .startswith(b"ERR##PID$1$3#")
    )
