"""The API's HTTP/1.1 parser: uvicorn's httptools protocol, with a limit on a request's head.

Why httptools: under the end-to-end load, uvicorn's pure-Python h11 parser took about a fifth
of the event loop's time (py-spy), and the event loop is the engine's bottleneck; with httptools'
C parser (llhttp) the engine spent 17% less CPU per document (docs/performance.md).

Why the subclass: uvicorn bounds a request's line and headers when it parses with h11 (16 KB by
default, then 400), not with httptools, whose parser gathers a header of any length, and uvicorn
keeps every header line it is given. A client sending headers without end would hold memory
until it stopped. Here a read that begins and ends within a request's head, and completes no
head, is counted, and past :data:`MAX_HEAD_BYTES` the request is answered 400, as uvicorn
answers a request it cannot parse, and the connection closed. Any other read may carry a body,
or several pipelined requests, of any size: the end of one body and the start of the next
head, a whole request, a head and the start of its body. What goes uncounted is then at most
two reads (256 KB each for asyncio) beyond the limit.
The limit is 64 KB rather than h11's 16 KB: bearer tokens (JWTs) of several KB are common.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
"""Request line and headers: a FHIR request's are well under 4 KB."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request's head
        self._head_bytes = 0
        self._heads_completed = 0  # in the read being parsed

    def data_received(self, data: bytes) -> None:
        began_in_head, self._heads_completed = self._in_head, 0
        super().data_received(data)
        if (
            not (began_in_head and self._in_head)
            or self._heads_completed
            or self.transport.is_closing()
        ):
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self.logger.warning("Request head larger than %d bytes.", MAX_HEAD_BYTES)
            self.send_400_response("Invalid HTTP request received.")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_completed += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes = True, 0  # the next request on the connection
        super().on_message_complete()
