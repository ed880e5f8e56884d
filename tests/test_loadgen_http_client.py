"""The load's HTTP/1.1 client (loadgen/http_client.py) against small servers on real sockets.

Each server here speaks HTTP by hand, so the client is judged by bytes on the wire: one
connection kept for many requests, a new one after ``Connection: close``, a silent server, a
hang-up, an answer that is not HTTP, a chunked answer and an answer over the limit. The run
against the engine itself is in tests/test_loadgen.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from medcourier.loadgen.http_client import MAX_ANSWER_BYTES, HttpConnection, HttpFailure
from tests.harness import against_server, free_port

HOST = "127.0.0.1"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes]:
    """The request line and header lines, and the body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return lines, await reader.readexactly(length)


def answer(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


def scenario(handler: Handler, client: Callable[[str], Awaitable[Any]]) -> tuple[Any, int]:
    """Run ``client`` (given the server's base URL) against ``handler``; return what it
    returned and how many connections the server accepted."""

    async def on(host: str, port: int) -> Any:
        return await client(f"http://{host}:{port}")

    return against_server(handler, on)


def failure_of(
    method: str = "POST",
    body: bytes = b"x",
    headers: dict[str, str] | None = None,
    max_answer: int = MAX_ANSWER_BYTES,
) -> Callable[[str], Awaitable[str]]:
    """A client that sends one request and returns its failure kind ("answered" if none)."""

    async def client(base: str) -> str:
        conn = HttpConnection(base, headers or {}, timeout=5, max_answer=max_answer)
        try:
            await conn.request(method, "/", body)
        except HttpFailure as exc:
            return exc.kind
        finally:
            conn.close()
        return "answered"

    return client


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each request with its own request line and body, on one connection."""
    while True:
        lines, body = await read_request(reader)
        writer.write(answer(lines[0] + b"|" + body))
        await writer.drain()


def test_requests_share_one_kept_alive_connection() -> None:
    async def client(base: str) -> list[tuple[int, bytes]]:
        conn = HttpConnection(base + "/api", {"Authorization": "Bearer t"}, timeout=5)
        out = []
        for i in range(5):
            a = await conn.request("POST", "/x", b"body-%d" % i, {"Content-Type": "a/b"})
            out.append((a.status, a.body))
        out.append(((await conn.request("GET", "/y?q=1")).status, b""))
        conn.close()
        return out

    answers, connections = scenario(echo_forever, client)
    assert answers[:5] == [(200, b"POST /api/x HTTP/1.1|body-%d" % i) for i in range(5)]
    assert answers[5] == (200, b"")
    assert connections == 1


def test_headers_and_host_are_sent() -> None:
    seen: list[list[bytes]] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, _ = await read_request(reader)
        seen.append(lines)
        writer.write(answer(b"{}"))
        await writer.drain()

    async def client(base: str) -> int:
        conn = HttpConnection(base, {"Authorization": "Bearer secret"}, timeout=5)
        try:
            return (await conn.request("POST", "/p", b"12345", {"X-One": "1"})).status
        finally:
            conn.close()

    status, _ = scenario(record, client)
    assert status == 200
    headers = {line.split(b":")[0].lower(): line.split(b":", 1)[1].strip() for line in seen[0][1:]}
    assert headers[b"authorization"] == b"Bearer secret"
    assert headers[b"content-length"] == b"5"
    assert headers[b"x-one"] == b"1"
    assert headers[b"host"].startswith(b"127.0.0.1:")


def test_connection_close_opens_a_new_connection_for_the_next_request() -> None:
    async def one_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok", extra=b"Connection: close\r\n"))
        await writer.drain()

    async def client(base: str) -> list[bytes]:
        conn = HttpConnection(base, {}, timeout=5)
        try:
            return [(await conn.request("POST", "/", b"x")).body for _ in range(3)]
        finally:
            conn.close()

    bodies, connections = scenario(one_each, client)
    assert bodies == [b"ok", b"ok", b"ok"]
    assert connections == 3


def test_silent_server_times_out_and_a_late_answer_is_not_taken_for_the_next() -> None:
    requests = 0

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:
            _, body = await read_request(reader)
            requests += 1
            if requests == 1:
                await asyncio.sleep(0.5)  # answers the first request after the client gave up
            writer.write(answer(body))
            await writer.drain()

    async def client(base: str) -> tuple[str, bytes]:
        conn = HttpConnection(base, {}, timeout=0.2)
        try:
            with pytest.raises(HttpFailure) as failed:
                await conn.request("POST", "/", b"first")
            conn.timeout = 5  # at once, while the late answer is still on its way
            return failed.value.kind, (await conn.request("POST", "/", b"second")).body
        finally:
            conn.close()

    (kind, body), connections = scenario(late, client)
    assert kind == "timeout"
    assert body == b"second"
    assert connections == 2


def test_hang_up_before_answering_is_a_connection_failure() -> None:
    async def hang_up(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def client(base: str) -> list[str]:
        conn = HttpConnection(base, {}, timeout=5)
        kinds = []
        for _ in range(2):
            try:
                await conn.request("POST", "/", b"x")
            except HttpFailure as exc:
                kinds.append(exc.kind)
        conn.close()
        return kinds

    kinds, connections = scenario(hang_up, client)
    assert kinds == ["connection", "connection"]
    assert connections == 2


def test_hang_up_in_the_middle_of_the_answer_is_a_connection_failure() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"0123456789")[:-4])
        await writer.drain()

    kind, _ = scenario(half, failure_of())
    assert kind == "connection"


def test_an_answer_that_is_not_http_is_a_bad_answer() -> None:
    async def mllp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"\x0bMSH|^~\\&|ACK\r\x1c\r")
        await writer.drain()
        await reader.read()

    kind, _ = scenario(mllp, failure_of())
    assert kind == "bad-answer"


def test_chunked_answer_is_read_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            await writer.drain()

    async def client(base: str) -> list[tuple[int, bytes]]:
        conn = HttpConnection(base, {}, timeout=5)
        try:
            return [((a := await conn.request("GET", "/")).status, a.body) for _ in range(2)]
        finally:
            conn.close()

    answers, connections = scenario(chunked, client)
    assert answers == [(201, b"hello world")] * 2
    assert connections == 1


def test_answer_over_the_limit_is_a_bad_answer() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"x" * 5000))
        await writer.drain()
        await reader.read()

    kind, _ = scenario(big, failure_of("GET", b"", max_answer=1000))
    assert kind == "bad-answer"


def test_nothing_listening_is_a_connection_failure() -> None:
    async def run() -> str:
        conn = HttpConnection(f"http://{HOST}:{free_port()}", {}, timeout=5)
        try:
            await conn.request("GET", "/")
        except HttpFailure as exc:
            return exc.kind
        return "answered"

    assert asyncio.run(run()) == "connection"


def test_server_closing_an_idle_connection_is_reopened_quietly() -> None:
    """A kept-alive connection the server closes between requests (a keep-alive timeout) is not
    an error of the next request, even sent the moment the server has closed."""
    closed = asyncio.Event()

    async def closes_when_idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()
        writer.close()  # without Connection: close, as an idle timeout does
        await writer.wait_closed()
        closed.set()

    async def client(base: str) -> list[bytes]:
        conn = HttpConnection(base, {}, timeout=5)
        bodies = []
        try:
            for _ in range(3):
                closed.clear()
                bodies.append((await conn.request("GET", "/")).body)
                await closed.wait()
        finally:
            conn.close()
        return bodies

    bodies, connections = scenario(closes_when_idle, client)
    assert bodies == [b"ok"] * 3
    assert connections == 3


def test_bytes_the_server_sends_unasked_are_not_taken_for_the_next_answer() -> None:
    answered = 0

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while True:
            await read_request(reader)
            answered += 1
            # the first answer comes with a second one nobody asked for
            writer.write(
                answer(b"first") + answer(b"unasked") if answered == 1 else answer(b"again")
            )
            await writer.drain()

    async def client(base: str) -> list[bytes]:
        conn = HttpConnection(base, {}, timeout=5)
        try:
            first = (await conn.request("GET", "/")).body
            await asyncio.sleep(0.1)
            return [first, (await conn.request("GET", "/")).body]
        finally:
            conn.close()

    bodies, connections = scenario(chatty, client)
    assert bodies == [b"first", b"again"]
    assert connections == 2


def test_a_header_http_cannot_carry_is_a_failure_of_the_request() -> None:
    kind, _ = scenario(echo_forever, failure_of("GET", b"", headers={"X-Bad": "a\r\nb"}))
    assert kind == "connection"


def test_not_an_http_url_is_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpConnection("mllp://127.0.0.1:2575", {}, timeout=1)
