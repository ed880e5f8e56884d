"""A stand-in vendor API that takes JSON documents over HTTP, for tests and demos.

``POST /documents`` with a JSON body is stored (in memory, and as a file when an output folder is
given) and answered ``201 Created``. The receiver can be told to misbehave the ways real APIs do,
so the ``http`` connector's handling of each is shown on a real socket: ``reject`` (400 with a
JSON error), ``fail`` (500), ``slow`` (answers after ``delay`` seconds). ``GET /documents`` lists
what arrived.

It is a Starlette app served by uvicorn inside the caller's event loop (both are dependencies of
the engine's API already), so HTTP parsing is theirs, and TLS is uvicorn's. Nothing here logs
document content: the command line prints transaction ids only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medcourier.channels.http.embedded_server import EmbeddedHttpServer
from medcourier.engine.signals import until_signalled

Mode = Literal["accept", "reject", "fail", "slow"]
MODES: tuple[Mode, ...] = ("accept", "reject", "fail", "slow")

MAX_BODY_BYTES = 100 * 1024 * 1024

DocumentCallback = Callable[[int, str], None]
"""Called with the document's sequence number (from 1) and its file-safe transaction id."""


@dataclass(frozen=True)
class Received:
    """One request as it arrived, whatever was answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class JsonReceiver:
    """The receiver; ``mode`` and ``delay`` may be changed while it runs.

    With ``certfile`` and ``keyfile`` it serves HTTPS; with ``client_ca`` too, it requires a
    client certificate signed by that CA (to test the connector's mutual TLS).

    ``received`` holds every request (headers lower-cased) in arrival order, ``documents`` the
    JSON bodies that were accepted.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        out_dir: Path | None = None,
        mode: Mode = "accept",
        delay: float = 5.0,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        client_ca: Path | None = None,
        on_document: DocumentCallback | None = None,
    ) -> None:
        self.host = host
        self.out_dir = out_dir
        self.mode = mode
        self.delay = delay
        self.certfile = certfile
        self.keyfile = keyfile
        self.client_ca = client_ca
        self.on_document = on_document
        self.received: list[Received] = []
        self.documents: list[Any] = []
        self._requested_port = port  # 0: any free port (read ``port`` once started)
        self._stopping = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/documents", self._post, methods=["POST", "PUT"]),
                Route("/documents/{rest:path}", self._post, methods=["POST", "PUT"]),
                Route("/documents", self._list, methods=["GET"]),
            ]
        )
        self._http = EmbeddedHttpServer(
            self.app,
            host,
            self._requested_port,
            "receiver",
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            # With client_ca, a client must present a certificate it signed (mutual TLS).
            ssl_ca_certs=client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
        )

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        # Checked here so a typo fails in the test that sets it, not in a request handler.
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self._mode = mode

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        """Where to POST documents."""
        scheme = "https" if self.certfile else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/documents"

    async def start(self) -> None:
        """Listen (returns once the socket accepts connections)."""
        if self._http.running:
            raise RuntimeError("receiver already started")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = asyncio.Event()
        await self._http.start()

    async def stop(self) -> None:
        """Stop listening; requests kept waiting by ``slow`` are answered at once."""
        self._stopping.set()
        await self._http.stop()

    async def __aenter__(self) -> JsonReceiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _post(self, request: Request) -> Response:
        mode = self.mode
        if mode == "slow":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.delay)
        body = await request.body()
        status, answer = self._answer(mode, request, body)
        self.received.append(
            Received(
                method=request.method,
                path=request.url.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                status=status,
            )
        )
        headers = {}
        if status == 201:
            headers["Location"] = f"/documents/{answer['id']}"
        return JSONResponse(answer, status_code=status, headers=headers)

    def _answer(self, mode: Mode, request: Request, body: bytes) -> tuple[int, dict[str, Any]]:
        if mode == "reject":
            return 400, {"error": "simulated rejection", "detail": "the receiver was told to"}
        if mode == "fail":
            return 500, {"error": "simulated failure"}
        if len(body) > MAX_BODY_BYTES:
            return 413, {"error": f"larger than {MAX_BODY_BYTES} bytes"}
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            return 415, {"error": f"expected JSON, got Content-Type {media_type or 'none'!r}"}
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return 400, {"error": f"the body is not JSON: {exc}"}
        self.documents.append(document)
        number = len(self.documents)
        transaction_id = _safe_id(request.headers.get("x-transaction-id", ""))
        if self.out_dir is not None:
            # Synchronous on purpose: small files, a test tool, and it keeps arrival order.
            (self.out_dir / f"{number:06d}-{transaction_id}.json").write_bytes(body)
        if self.on_document is not None:
            self.on_document(number, transaction_id)
        return 201, {"id": number, "transactionId": transaction_id}

    async def _list(self, request: Request) -> Response:
        return JSONResponse(
            {
                "count": len(self.documents),
                "transactionIds": [
                    r.headers.get("x-transaction-id") for r in self.received if r.status == 201
                ],
            }
        )


def _safe_id(value: str) -> str:
    """A transaction id reduced to characters safe in a file name and a terminal."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:64].lstrip(".") or "unknown"


# --- the ``medcourier simulate-json`` command ---------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medcourier simulate-json``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=6662, help="port to listen on (0: any)")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="write each document to DIR"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="accept",
        help="accept (201), reject (400), fail (500) or slow (201 after --delay seconds)",
    )
    parser.add_argument("--delay", type=float, default=5.0, help="seconds to wait in slow mode")
    parser.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this cert")
    parser.add_argument("--tls-key", type=Path, default=None, help="private key of --tls-cert")


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, printing one line (the transaction id) per document."""
    if (args.tls_cert is None) != (args.tls_key is None):
        print("simulate-json: give both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    receiver = JsonReceiver(
        host=args.host,
        port=args.port,
        out_dir=args.out,
        mode=args.mode,
        delay=args.delay,
        certfile=args.tls_cert,
        keyfile=args.tls_key,
        on_document=_print_received,
    )
    try:
        await receiver.start()
    except (OSError, ValueError) as exc:
        print(f"simulate-json: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"simulate-json: POST JSON to {receiver.url}, answering {args.mode}", flush=True)
    try:
        await until_signalled()
    finally:
        await receiver.stop()
    print(f"simulate-json: stopped after {len(receiver.documents)} documents", flush=True)
    return 0


def _print_received(number: int, transaction_id: str) -> None:
    print(f"received {number:06d} {transaction_id}", flush=True)
