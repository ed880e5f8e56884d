"""A lean HTTP/1.1 client for the load: one kept-alive connection, one request at a time.

Why not httpx for the load itself: measured on the end-to-end bench, httpx's client spent about
2 ms of CPU per ``$send-to-ehr`` request (its pool, request and response models, header
normalisation), on the same two cores as the engine it was loading; with 64 connections the
loader, not the engine, set the rate. A load generator that is slower than what it measures
measures itself. This client keeps one connection per load session, which the load needs
anyway, and leaves the protocol to h11 (the HTTP/1.1 state machine httpx and uvicorn both use);
what it adds is an asyncio protocol, a timeout and reconnection. The setup calls and the
``$tracking`` polls stay on httpx, where its conveniences cost nothing that is measured.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""Largest response body read: the load's answers are a few hundred bytes to a few KB."""


class HttpFailure(Exception):
    """The exchange did not give an HTTP answer; ``kind`` is the load's error kind."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


class _Exchange(asyncio.Protocol):
    """The socket side: feeds what arrives to h11 and completes the awaited answer."""

    def __init__(self, conn: h11.Connection, max_answer: int) -> None:
        self.conn = conn
        self.max_answer = max_answer
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Answer] | None = None
        self.status = 0
        self.chunks: list[bytes] = []
        self.size = 0
        self.closed = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # nothing asked: a server talking out of turn is not kept
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            return
        self.conn.receive_data(data)
        self._advance()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.conn.receive_data(b"")
        self._advance()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HttpFailure("connection", str(exc) if exc else "the server closed"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _advance(self) -> None:
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Response):
                    self.status = event.status_code
                elif isinstance(event, h11.Data):
                    self.size += len(event.data)
                    if self.size > self.max_answer:
                        raise HttpFailure("bad-answer", "the answer is larger than the limit")
                    self.chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    if self.waiter is not None and not self.waiter.done():
                        self.waiter.set_result(Answer(self.status, b"".join(self.chunks)))
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpFailure("connection", "the server closed before answering")
        except h11.RemoteProtocolError as exc:
            if self.eof:  # h11's word for a close before the answer was whole
                self._fail(HttpFailure("connection", "the server closed before answering"))
            else:
                self._fail(HttpFailure("bad-answer", f"not an HTTP/1.1 answer: {exc}"))
            if self.transport is not None:
                self.transport.abort()
        except HttpFailure as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()


def _stale(proto: _Exchange) -> bool:
    """Whether an idle kept connection has something to read: the server's close (a keep-alive
    timeout) already arrived but not yet handled, or bytes it had no reason to send. Either way
    the next request goes on a new connection rather than fail on this one."""
    sock = proto.transport.get_extra_info("socket") if proto.transport is not None else None
    if sock is None:
        return False
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _expire(waiter: asyncio.Future[Answer]) -> None:
    if not waiter.done():
        waiter.set_exception(HttpFailure("timeout", "no answer"))


class HttpConnection:
    """One kept-alive connection to ``base`` (``http://`` or ``https://host:port``).

    Opened on the first request and again after the server closed it or an exchange failed: a
    late answer on a connection that timed out would otherwise be read as the next one's.
    """

    def __init__(
        self,
        base: str,
        headers: dict[str, str],
        timeout: float,
        max_answer: int = MAX_ANSWER_BYTES,
    ) -> None:
        url = urlsplit(base)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        authority = url.netloc.rpartition("@")[2]
        self.headers = [("Host", authority), *headers.items()]
        self.timeout = timeout
        self.max_answer = max_answer
        self.connects = 0
        self._proto: _Exchange | None = None

    async def _open(self, timeout: float) -> _Exchange:
        loop = asyncio.get_running_loop()
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: _Exchange(conn, self.max_answer), self.host, self.port, ssl=self.ssl
                )
        except TimeoutError as exc:
            raise HttpFailure("timeout", f"no connection to {self.host}:{self.port}") from exc
        except OSError as exc:
            raise HttpFailure("connection", str(exc) or type(exc).__name__) from exc
        self.connects += 1
        return proto

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        """Send one request and read its whole answer.

        :raises HttpFailure: ``timeout``, ``connection`` (refused, reset, closed) or
            ``bad-answer`` (not HTTP/1.1, too large); the connection is then dropped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout  # connecting included
        proto = self._proto
        if proto is None or proto.closed or proto.conn.our_state is not h11.IDLE or _stale(proto):
            self.close()
            proto = self._proto = await self._open(deadline - loop.time())
        if proto.waiter is not None:
            raise RuntimeError("one request at a time on an HttpConnection")
        conn = proto.conn
        fields = [*self.headers, ("Content-Length", str(len(body)))]
        if headers:
            fields.extend(headers.items())
        proto.status, proto.chunks, proto.size = 0, [], 0
        waiter: asyncio.Future[Answer] = loop.create_future()
        proto.waiter = waiter
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            try:
                request = h11.Request(method=method, target=self.prefix + path, headers=fields)
                pieces = [conn.send(request)]
                if body:  # the body itself, not a copy
                    pieces += conn.send_with_data_passthrough(h11.Data(data=body)) or []
                pieces.append(conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError as exc:  # a header h11 will not send, say
                raise HttpFailure("connection", f"request not sent: {exc}") from exc
            assert proto.transport is not None
            proto.transport.writelines([p for p in pieces if p])
            answer = await waiter
        except BaseException:
            self.close()
            raise
        finally:
            timer.cancel()
            proto.waiter = None
        unread, closed = conn.trailing_data  # bytes after the answer: not the next one's
        if (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not unread
            and not closed
        ):
            conn.start_next_cycle()
        else:  # the server asked to close (or did): the next request opens a new connection
            self.close()
        return answer

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
