"""The API's request-head limit (api/http_protocol.py), over real sockets to a running engine.

uvicorn's httptools parser has no limit of its own on a request's line and headers: these tests
send heads without end, one header line after another or one endless header, and expect a 400
and a closed connection well before the client is done; and they check that ordinary requests,
large headers within the limit and a large body sent with its head go through.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator

import pytest

from medcourier.engine.api.http_protocol import MAX_HEAD_BYTES
from tests.harness import TOKEN, LoopThread, Running, pdf_bytes, running_engine


@pytest.fixture(scope="module")
def eng(lt: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_engine(lt, tmp_path_factory.mktemp("limits")) as r:
        yield r


def _connect(eng: Running) -> socket.socket:
    host, port = eng.base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _answer(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
        if b"\r\n\r\n" in out and b"content-length" in out.lower():
            head, _, body = out.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                break
    return out


def _stream_head(eng: Running, pieces: Iterator[bytes]) -> tuple[int, bytes]:
    """Send the pieces until the server stops taking them; return the bytes sent and its answer."""
    s = _connect(eng)
    sent = 0
    try:
        for piece in pieces:
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        return sent, _answer(s)
    finally:
        s.close()


def test_endless_header_lines_are_refused_with_400(eng: Running) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"GET /health HTTP/1.1\r\nHost: t\r\n"
        for i in range(100_000):  # 100,000 lines of about 40 bytes: 4 MB if all were taken
            yield b"X-Pad-%d: %s\r\n" % (i, b"a" * 30)

    sent, answer = _stream_head(eng, pieces())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert sent < 4_000_000


def test_one_endless_header_is_refused_with_400(eng: Running) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: "
        for _ in range(1000):  # 4 MB of one header's value
            yield b"b" * 4096

    sent, answer = _stream_head(eng, pieces())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert sent < 4_000_000


def test_headers_within_the_limit_are_served(eng: Running) -> None:
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"c" * 100) for i in range(MAX_HEAD_BYTES // 200))
    s = _connect(eng)
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n" + padding + b"\r\n")
        answer = _answer(s)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_large_body_sent_with_its_head_is_not_taken_for_headers(eng: Running) -> None:
    """One send of head and a 400 KB body, twice on one connection: both are accepted."""
    patient = eng.patient(name=[{"family": "Limite"}])
    request = _send_request(eng, patient, pdf_bytes(300 * 1024))
    assert len(request) > 4 * MAX_HEAD_BYTES
    s = _connect(eng)
    try:
        answers = []
        for _ in range(2):
            s.sendall(request)
            answers.append(_answer(s))
    finally:
        s.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b"transaction-id" in answer


def _send_request(eng: Running, patient: str, document: bytes) -> bytes:
    body = json.dumps(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subject", "valueReference": {"reference": f"Patient/{patient}"}},
                {"name": "payload", "valueString": base64.b64encode(document).decode()},
            ],
        }
    ).encode()
    return (
        b"POST /fhir/CommunicationRequest/$send-to-ehr HTTP/1.1\r\nHost: t\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/fhir+json\r\n"
        b"Content-Length: %d\r\n\r\n" % (TOKEN.encode(), len(body))
    ) + body


def test_requests_of_64_to_256_kb_in_one_read_are_served(eng: Running) -> None:
    """A whole request that arrives in one read (up to asyncio's 256 KB) is not a head over the
    limit: each size is sent in one piece on a fresh connection, where the server usually reads
    it at once. The bug this guards against answered 400 after the document was stored."""
    patient = eng.patient(name=[{"family": "Lecture"}])
    for size in (60, 80, 110, 150) * 3:
        s = _connect(eng)
        try:
            s.sendall(_send_request(eng, patient, pdf_bytes(size * 1024)))
            answer = _answer(s)
        finally:
            s.close()
        assert answer.startswith(b"HTTP/1.1 200"), (size, answer[:200])


def test_pipelined_requests_over_the_limit_in_all_are_served(eng: Running) -> None:
    """Ten requests of about 13 KB sent at once (130 KB, often one read): ten answers."""
    patient = eng.patient(name=[{"family": "Pipeline"}])
    request = _send_request(eng, patient, pdf_bytes(9 * 1024))
    s = _connect(eng)
    try:
        s.sendall(request * 10)
        got = b""
        while got.count(b"HTTP/1.1 ") < 10 or not got.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, got[-300:]
            got += chunk
    finally:
        s.close()
    assert got.count(b"HTTP/1.1 200") == 10, got[:300]


def test_the_limit_is_per_request_on_a_kept_connection(eng: Running) -> None:
    """Heads of many requests on one connection add up to more than the limit: each is served."""
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"d" * 100) for i in range(100))  # ~11 KB
    s = _connect(eng)
    try:
        for _ in range(3 * MAX_HEAD_BYTES // len(padding)):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n" + padding + b"\r\n")
            assert _answer(s).startswith(b"HTTP/1.1 200")
    finally:
        s.close()
