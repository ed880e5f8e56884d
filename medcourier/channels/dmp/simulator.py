"""A stand-in DMP web service, for tests and demos (``medcourier simulate-dmp``).

It speaks the protocol the ``dmp`` connector expects (see :mod:`.connector` and docs/dmp.md):

- ``GET /patients/{nir}/dmp[?authority=<oid>]``: ``200 {"ins": nir, "status": "open"}``,
  ``200 {"status": "closed"}`` or ``404 {"status": "unknown"}``, from the status set for that
  patient (``default_status`` for the others). An ``authority`` that is not an INS OID is a 400.
- ``POST /documents``: a CDA R2 document, ``X-Transaction-Id`` / ``Idempotency-Key`` naming it.
  The document is read safely (no DTD, no entity expansion, no network; a DOCTYPE is refused),
  its INS is taken from ``recordTarget/patientRole/id`` (an INS authority as ``@root``, the NIR
  as ``@extension``), and it is stored in the output folder as ``<transaction id>.xml``, written
  to a temporary file then renamed. Answers: ``201 {"id": ...}``; the same transaction id again
  gets the same id without storing anything; ``400`` no usable transaction id, ``413`` larger
  than ``max_body_bytes``, ``415`` not an XML media type, ``422`` not XML, a DOCTYPE, not a CDA,
  no valid INS, a closed DMP or the refuse-everything mode (``{"error": "document refused:
  ..."}``), ``404`` a patient without a DMP. Every error answer is ``{"error": "<why>"}``.

Misbehaving on purpose, set at start-up or while running:

- ``down``: every request (but ``/_admin``) is answered ``503``, with ``Retry-After: 1``;
- ``delay``: seconds waited before every answer (but ``/_admin``'s);
- ``documents``: ``accept``, or ``reject`` to refuse every document with a 422.

The ``/_admin`` endpoints change this at runtime, so a test or a demo can open a DMP or take the
service down between two deliveries: ``PUT /_admin/patients/{nir}`` with ``{"status": "open" |
"closed" | "unknown"}``, ``PUT /_admin/behaviour`` with any of ``{"documents": "accept" |
"reject", "delay": 0.5, "down": true}`` (``GET`` shows it), ``GET /_admin/received`` lists the
stored documents (id, transaction id, NIR, size, file name).

It is a Starlette app served by uvicorn inside the caller's event loop. Nothing it prints carries
patient data: one line per stored document, with its DMP id, transaction id and size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import re
import secrets
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

from lxml import etree
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medcourier.channels.http.embedded_server import EmbeddedHttpServer
from medcourier.engine.nir import INS_OIDS, nir_problem
from medcourier.engine.signals import until_signalled
from medcourier.transforms.cda.dmp import HL7_NS

DmpStatus = Literal["open", "closed", "unknown"]
STATUSES: tuple[DmpStatus, ...] = ("open", "closed", "unknown")
DocumentsMode = Literal["accept", "reject"]
DOCUMENTS_MODES: tuple[DocumentsMode, ...] = ("accept", "reject")

MAX_BODY_BYTES = 80 * 1024 * 1024
"""Documents larger than this are answered 413."""

MAX_ADMIN_BODY_BYTES = 64 * 1024
LIBXML_TEXT_LIMIT = 10_000_000
"""libxml2 refuses a text node longer than this unless ``huge_tree`` is set; only a body larger
than it can hold one (a big PDF in ``nonXMLBody``), so only such a body is parsed with it."""

_TRANSACTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_RECORD_TARGET_IDS = "h:recordTarget/h:patientRole/h:id"
_PROLOG_SCAN_BYTES = 64 * 1024
_NO_DOCTYPE = "a DOCTYPE is not allowed in a CDA document"

DocumentCallback = Callable[["StoredDocument"], None]


@dataclass(frozen=True)
class StoredDocument:
    """One document the simulated DMP took."""

    id: str
    transaction_id: str
    nir: str
    size: int
    file: str | None


class _Refusal(Exception):
    """An error answer: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DmpSimulator:
    """The simulated DMP. ``default_status``, ``documents``, ``delay`` and ``down`` may be
    changed while it runs, as may ``patients`` (NIR → status), in-process or through
    ``/_admin``.

    ``received`` holds the stored documents in arrival order. With ``token``, every request but
    ``/_admin`` needs ``Authorization: Bearer <token>`` (401 otherwise).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        out_dir: Path | None = None,
        *,
        default_status: DmpStatus = "open",
        patients: dict[str, DmpStatus] | None = None,
        documents: DocumentsMode = "accept",
        delay: float = 0.0,
        down: bool = False,
        token: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_document: DocumentCallback | None = None,
    ) -> None:
        self.host = host
        self.out_dir = out_dir
        self.default_status: DmpStatus = _checked(default_status, STATUSES, "status")
        self.patients: dict[str, DmpStatus] = {
            nir: _checked(status, STATUSES, "status") for nir, status in (patients or {}).items()
        }
        self.documents: DocumentsMode = _checked(documents, DOCUMENTS_MODES, "documents mode")
        self.delay = _checked_delay(delay)
        self.down = down
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.on_document = on_document
        self.received: list[StoredDocument] = []
        self._by_key: dict[str, StoredDocument] = {}
        self._storing = asyncio.Lock()
        self._stopping = asyncio.Event()
        service = _Service(self)
        self.app = Starlette(
            routes=[
                Route("/patients/{nir}/dmp", service.dmp_status, methods=["GET"]),
                Route("/documents", service.store_document, methods=["POST"]),
                Route("/_admin/patients/{nir}", self._set_patient, methods=["PUT"]),
                Route("/_admin/behaviour", self._set_behaviour, methods=["PUT"]),
                Route("/_admin/behaviour", self._get_behaviour, methods=["GET"]),
                Route("/_admin/received", self._list_received, methods=["GET"]),
            ]
        )
        self._http = EmbeddedHttpServer(self.app, host, port, "DMP simulator")

    @property
    def port(self) -> int:
        """The listening port: the real one once started (useful with port 0)."""
        return self._http.port

    @property
    def url(self) -> str:
        """The base URL to give the ``dmp`` connector."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def status_of(self, nir: str) -> DmpStatus:
        return self.patients.get(nir, self.default_status)

    def behaviour(self) -> dict[str, Any]:
        return {"documents": self.documents, "delay": self.delay, "down": self.down}

    async def start(self) -> None:
        """Listen; returns once connections are accepted."""
        if self._http.running:
            raise RuntimeError("simulator already started")
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = asyncio.Event()
        self._storing = asyncio.Lock()
        await self._http.start()

    async def stop(self) -> None:
        """Stop listening; requests held by ``delay`` are answered at once."""
        self._stopping.set()
        await self._http.stop()

    async def __aenter__(self) -> DmpSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what the service does, once the request has passed delay, down and auth ---------------

    async def pause(self) -> None:
        """Wait ``delay`` seconds, or less if the simulator is stopping."""
        if self.delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.delay)

    def authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def store(self, headers: dict[str, str], body: bytes) -> StoredDocument:
        """Check a document and store it, or raise :class:`_Refusal`."""
        transaction_id = headers.get("x-transaction-id") or headers.get("idempotency-key") or ""
        key = headers.get("idempotency-key") or transaction_id
        if not _TRANSACTION_ID.fullmatch(transaction_id):
            raise _Refusal(
                400,
                "an X-Transaction-Id header is required: 1 to 128 letters, digits, '_', '.' or "
                "'-', starting with a letter or a digit",
            )
        stored = self._by_key.get(key)
        if stored is not None:
            return stored
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ("text/xml", "application/xml") and not media_type.endswith("+xml"):
            raise _Refusal(415, f"expected an XML document, got Content-Type {media_type!r}")
        nir = await asyncio.to_thread(_read_ins, body)
        status = self.status_of(nir)
        if status == "closed":
            raise _Refusal(422, "the patient's DMP is closed")
        if status == "unknown":
            raise _Refusal(404, "the patient has no DMP")
        if self.documents == "reject":
            raise _Refusal(422, "document refused: the simulator was told to refuse documents")
        async with self._storing:
            stored = self._by_key.get(key)  # a concurrent resend may have stored it meanwhile
            if stored is not None:
                return stored
            name = None
            if self.out_dir is not None:
                name = f"{transaction_id}.xml"
                await asyncio.to_thread(_write_atomically, self.out_dir / name, body)
            stored = StoredDocument(str(uuid.uuid4()), transaction_id, nir, len(body), name)
            self._by_key[key] = stored
            self.received.append(stored)
        if self.on_document is not None:
            self.on_document(stored)
        return stored

    # -- /_admin ---------------------------------------------------------------------------------

    async def _set_patient(self, request: Request) -> Response:
        try:
            change = await _json_body(request)
            status = change.get("status")
            if set(change) != {"status"} or status not in STATUSES:
                raise _Refusal(400, 'give {"status": "open" | "closed" | "unknown"}')
        except _Refusal as refusal:
            return _error(refusal)
        nir = request.path_params["nir"]
        self.patients[nir] = cast(DmpStatus, status)
        return JSONResponse({"ins": nir, "status": status})

    async def _set_behaviour(self, request: Request) -> Response:
        try:
            change = await _json_body(request)
            unknown = sorted(set(change) - {"documents", "delay", "down"})
            if unknown:
                raise _Refusal(400, f"unknown setting(s) {unknown}: documents, delay or down")
            documents = change.get("documents", self.documents)
            delay = change.get("delay", self.delay)
            down = change.get("down", self.down)
            if documents not in DOCUMENTS_MODES:
                raise _Refusal(400, 'documents is "accept" or "reject"')
            if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
                raise _Refusal(400, "delay is a number of seconds, 0 or more")
            if not isinstance(down, bool):
                raise _Refusal(400, "down is true or false")
        except _Refusal as refusal:
            return _error(refusal)
        self.documents, self.delay, self.down = documents, float(delay), down
        return JSONResponse(self.behaviour())

    async def _get_behaviour(self, request: Request) -> Response:
        return JSONResponse(self.behaviour())

    async def _list_received(self, request: Request) -> Response:
        return JSONResponse([asdict(stored) for stored in self.received])


class _Service:
    """The DMP's own endpoints, each behind ``delay``, ``down`` and the token check."""

    def __init__(self, simulator: DmpSimulator) -> None:
        self.sim = simulator

    async def dmp_status(self, request: Request) -> Response:
        return await self._answer(request, self._dmp_status)

    async def store_document(self, request: Request) -> Response:
        return await self._answer(request, self._store_document)

    async def _answer(
        self, request: Request, handler: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """The handler's answer, given after ``delay``. The request is handled first, so a
        client that gives up waiting leaves its document stored (an answer lost on the way)."""
        sim = self.sim
        if sim.down:
            answer: Response = JSONResponse(
                {"error": "the DMP is down (simulated)"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        elif not sim.authorised(request):
            answer = JSONResponse(
                {"error": "a valid bearer token is required"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            try:
                answer = await handler(request)
            except _Refusal as refusal:
                answer = _error(refusal)
        await sim.pause()
        return answer

    async def _dmp_status(self, request: Request) -> Response:
        nir = request.path_params["nir"]
        authority = request.query_params.get("authority")
        if authority is not None and authority not in INS_OIDS:
            raise _Refusal(400, f"authority must be an INS OID: {', '.join(INS_OIDS)}")
        status = self.sim.status_of(nir)
        if status == "open":
            return JSONResponse({"ins": nir, "status": "open"})
        if status == "closed":
            return JSONResponse({"status": "closed"})
        return JSONResponse({"status": "unknown"}, status_code=404)

    async def _store_document(self, request: Request) -> Response:
        body = await _bounded_body(request, self.sim.max_body_bytes)
        headers = {name.lower(): value for name, value in request.headers.items()}
        stored = await self.sim.store(headers, body)
        return JSONResponse(
            {"id": stored.id},
            status_code=201,
            headers={"Location": f"/documents/{stored.id}"},
        )


# --- reading and writing documents --------------------------------------------------------------


def _read_ins(body: bytes) -> str:
    """The NIR of the patient a CDA document is about, or :class:`_Refusal` (422)."""
    if _doctype_in_prolog(body[:_PROLOG_SCAN_BYTES]):
        raise _Refusal(422, _NO_DOCTYPE)
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=len(body) > LIBXML_TEXT_LIMIT,
    )
    try:
        root = etree.fromstring(body, parser)
    except etree.XMLSyntaxError as exc:
        raise _Refusal(422, f"the body is not well-formed XML: {exc}") from None
    info = root.getroottree().docinfo
    if info.doctype or info.internalDTD is not None:
        raise _Refusal(422, _NO_DOCTYPE)
    if root.tag != f"{{{HL7_NS}}}ClinicalDocument":
        name = etree.QName(root).localname if isinstance(root.tag, str) else "?"
        raise _Refusal(422, f"not a CDA R2 document: the root element is {name}, in {HL7_NS}")
    found: dict[str, str] = {}
    for element in root.iterfind(_RECORD_TARGET_IDS, namespaces={"h": HL7_NS}):
        authority, extension = element.get("root"), (element.get("extension") or "").strip()
        if authority in INS_OIDS and extension:
            found.setdefault(authority, extension)
    if not found:
        raise _Refusal(
            422,
            "the document has no INS: recordTarget/patientRole/id needs @root "
            f"{INS_OIDS[0]} (INS-NIR), or another INS authority, and the NIR as @extension",
        )
    ins = next(found[oid] for oid in INS_OIDS if oid in found)
    problem = nir_problem(ins)
    if problem is not None:
        raise _Refusal(422, f"the document's INS is not a valid NIR: {problem}")
    return ins


def _doctype_in_prolog(head: bytes) -> bool:
    """Whether a DOCTYPE comes before the root element (after an optional BOM, the XML
    declaration, comments and processing instructions). Seen before parsing, so its refusal reads
    the same whatever libxml2 would trip on first; in an encoding that is not ASCII-compatible
    it is missed here and refused after parsing."""
    position = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    while True:
        while position < len(head) and head[position : position + 1].isspace():
            position += 1
        for opening, closing in ((b"<?", b"?>"), (b"<!--", b"-->")):
            if head.startswith(opening, position):
                end = head.find(closing, position + len(opening))
                if end < 0:
                    return False
                position = end + len(closing)
                break
        else:
            return head.startswith(b"<!DOCTYPE", position)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, synced, then renamed."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The request's body, or :class:`_Refusal` (413) past ``limit`` bytes (not read further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _Refusal(413, f"the document is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Refusal(413, f"the document is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Refusal(400, "the client left before sending the whole body") from None
    return b"".join(chunks)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await _bounded_body(request, MAX_ADMIN_BODY_BYTES)
    try:
        value = json.loads(body)
    except ValueError:
        raise _Refusal(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise _Refusal(400, "the body is not a JSON object")
    return value


def _error(refusal: _Refusal) -> Response:
    return JSONResponse({"error": refusal.message}, status_code=refusal.status)


def _checked(value: Any, allowed: tuple[Any, ...], what: str) -> Any:
    # Checked here so a typo fails where it is written, not in a request handler.
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


def _checked_delay(delay: float) -> float:
    if not delay >= 0:
        raise ValueError(f"delay must be 0 or more seconds, not {delay!r}")
    return float(delay)


# --- the ``medcourier simulate-dmp`` command ----------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medcourier simulate-dmp``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=6663, help="port to listen on (0: any)")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="write each document to DIR"
    )
    parser.add_argument(
        "--default-status",
        choices=STATUSES,
        default="open",
        help="the DMP of a patient not named by --closed or --unknown (default: open)",
    )
    parser.add_argument(
        "--closed", action="append", default=[], metavar="NIR", help="this patient's DMP is closed"
    )
    parser.add_argument(
        "--unknown", action="append", default=[], metavar="NIR", help="this patient has no DMP"
    )
    parser.add_argument(
        "--reject-documents", action="store_true", help="answer 422 to every document"
    )
    parser.add_argument(
        "--delay", type=float, default=0.0, metavar="SECONDS", help="wait before every answer"
    )
    parser.add_argument("--down", action="store_true", help="answer 503 to every request")


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, printing one line per stored document."""
    patients: dict[str, DmpStatus] = {nir: "closed" for nir in args.closed}
    patients.update({nir: "unknown" for nir in args.unknown})
    try:
        simulator = DmpSimulator(
            host=args.host,
            port=args.port,
            out_dir=args.out,
            default_status=args.default_status,
            patients=patients,
            documents="reject" if args.reject_documents else "accept",
            delay=args.delay,
            down=args.down,
            on_document=_print_stored,
        )
    except ValueError as exc:
        print(f"simulate-dmp: {exc}", file=sys.stderr)
        return 2
    try:
        await simulator.start()
    except OSError as exc:
        print(f"simulate-dmp: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(
        f"simulate-dmp: DMP web service on {simulator.url} "
        f"(DMPs {args.default_status} by default, documents "
        f"{'refused' if args.reject_documents else 'accepted'}{', down' if args.down else ''})",
        flush=True,
    )
    try:
        await until_signalled()
    finally:
        await simulator.stop()
    print(f"simulate-dmp: stopped after {len(simulator.received)} documents", flush=True)
    return 0


def _print_stored(stored: StoredDocument) -> None:
    print(f"stored {stored.id} {stored.transaction_id} {stored.size} bytes", flush=True)
