"""HTTP load on ``CommunicationRequest/$send-to-ehr``, and the wait for the documents' delivery.

Each request posts the same Parameters body (a PDF of the chosen size, in base64, for one
patient). A 200 answer with a transaction id is a success; anything else is an error of one
kind: ``http-<status>``, ``timeout``, ``connection`` (refused, reset, closed), or ``bad-answer``
(a 200 without a transaction id, or not an HTTP/1.1 answer). Each worker posts on a kept-alive
connection of its own (loadgen/http_client.py), reopened after a failure.

With ``wait_completed``, the accepted documents are then followed on ``$tracking`` until each
one is ``completed`` or ``entered-in-error``. Their end-to-end latency runs from the submit to the
``sent`` time the engine recorded, so it assumes the engine's clock and this machine's agree
(they do on one machine).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from medcourier.loadgen.http_client import HttpConnection, HttpFailure
from medcourier.loadgen.messages import pdf, run_prefix
from medcourier.loadgen.progress import Progress, snapshot_of
from medcourier.loadgen.report import Phase, Report
from medcourier.loadgen.runner import Clock, Recorder, Schedule, SetupError, drive

SEND_PATH = "/fhir/CommunicationRequest/$send-to-ehr"
TRACKING_PATH = "/fhir/CommunicationRequest/$tracking"
FINAL = frozenset({"completed", "entered-in-error"})
POLL_PAUSE = 0.2


@dataclass
class HttpTarget:
    base: str
    """The engine's base URL (``http://host:port``), without ``/fhir``."""
    token: str | None = None
    timeout: float = 30.0
    patient_id: str | None = None
    organization: str | None = None
    """``Organization/<id>`` for the patient created when none is given (routes match on it)."""

    def __post_init__(self) -> None:
        self.base = self.base.rstrip("/").removesuffix("/fhir")

    def __str__(self) -> str:
        return self.base

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def send_body(patient_id: str, payload_size: int) -> bytes:
    """The Parameters of one document: a PDF of ``payload_size`` bytes for the patient."""
    parameters = [
        {"name": "subject", "valueReference": {"reference": f"Patient/{patient_id}"}},
        {"name": "content-type", "valueCode": "application/pdf"},
        {"name": "document-type", "valueCode": "11488-4"},
        {"name": "document-title", "valueString": "Compte rendu de charge (medcourier bench)"},
        {"name": "sender-identifier", "valueString": "10003999999"},
        {"name": "payload", "valueString": base64.b64encode(pdf(payload_size)).decode()},
    ]
    return json.dumps({"resourceType": "Parameters", "parameter": parameters}).encode()


def _describe(response: httpx.Response) -> str:
    """Status and the OperationOutcome's text, for a setup failure."""
    try:
        issues = response.json().get("issue") or []
        text = "; ".join(str(i.get("diagnostics", "")) for i in issues if isinstance(i, dict))
    except (ValueError, AttributeError):
        text = response.text[:200]
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")


async def create_patient(client: httpx.AsyncClient, target: HttpTarget, prefix: str) -> str:
    """Create the fictitious patient the documents are sent for; return its id."""
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": f"{prefix}-PATIENT"}],
        "name": [{"use": "official", "family": "LOADGEN", "given": ["Bench"]}],
        "birthDate": "1970-01-01",
        "gender": "unknown",
    }
    if target.organization:
        patient["managingOrganization"] = {"reference": target.organization}
    try:
        response = await client.post("/fhir/Patient", json=patient)
    except httpx.HTTPError as exc:
        raise SetupError(f"cannot create a patient at {target}: {exc}") from exc
    if response.status_code != 201:
        raise SetupError(f"cannot create a patient at {target}: {_describe(response)}")
    try:
        return str(response.json()["id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"{target}/fhir/Patient answered 201 without an id") from exc


async def check_access(client: httpx.AsyncClient, target: HttpTarget) -> None:
    """Ask ``$tracking`` about an unknown transaction: proves the engine answers and the token
    has SEND_TO_EHR, before any document is sent for a given patient."""
    try:
        response = await client.get(TRACKING_PATH, params={"transaction-id": "medcourier-bench"})
    except httpx.HTTPError as exc:
        raise SetupError(f"cannot reach {target}: {exc}") from exc
    if response.status_code != 200:
        raise SetupError(f"{target}{TRACKING_PATH} refused the token: {_describe(response)}")


@dataclass
class Accepted:
    """The documents the engine accepted: transaction id → submit time (wall clock)."""

    submitted: dict[str, float] = field(default_factory=dict)


class HttpSession:
    """One worker posting documents on a kept-alive connection of its own."""

    def __init__(
        self,
        target: HttpTarget,
        body: bytes,
        accepted: Accepted,
        wall: Callable[[float], float],
    ) -> None:
        self.connection = HttpConnection(target.base, target.headers(), target.timeout)
        self.body = body
        self.accepted = accepted
        self.wall = wall

    async def open(self) -> None:
        """The connection opens on first use; :func:`run_http` checked the server first."""

    async def exchange(self, seq: int, due: float) -> str | None:
        submitted = self.wall(due)
        try:
            response = await self.connection.request(
                "POST", SEND_PATH, self.body, {"Content-Type": "application/fhir+json"}
            )
        except HttpFailure as exc:
            return exc.kind
        if response.status != 200:
            return f"http-{response.status}"
        try:
            values = {
                p.get("name"): p.get("valueString") for p in json.loads(response.body)["parameter"]
            }
            txid = values["transaction-id"]
        except (ValueError, KeyError, TypeError, AttributeError):
            return "bad-answer"
        if not isinstance(txid, str) or not txid:
            return "bad-answer"
        self.accepted.submitted[txid] = submitted
        return None

    async def close(self) -> None:
        self.connection.close()


def _final(bundle: Any) -> tuple[str, float | None] | None:
    """(``completed`` or ``entered-in-error``, the last ``sent`` time) once every delivery of a
    transaction is final, else None."""
    try:
        resources = [entry["resource"] for entry in bundle["entry"]]
        statuses = {r["status"] for r in resources}
    except (KeyError, TypeError):
        return None
    if not statuses or not statuses <= FINAL:
        return None
    if "entered-in-error" in statuses:
        return "entered-in-error", None
    try:
        sent = [datetime.fromisoformat(r["sent"]).timestamp() for r in resources if r.get("sent")]
    except (TypeError, ValueError):
        sent = []
    return "completed", max(sent) if sent else None


async def wait_completed(
    client: httpx.AsyncClient,
    accepted: Accepted,
    recorder: Recorder,
    *,
    wall_start: float,
    concurrency: int,
    timeout: float,
    stop: Callable[[], bool] = lambda: False,
    clock: Clock = time.perf_counter,
) -> float:
    """Poll ``$tracking`` until every accepted document is final or ``timeout`` has passed.

    Records each completed document with its end-to-end latency, each ``entered-in-error`` and
    each document still not final as errors. Returns the seconds from the load's start to the
    last completion.
    """
    pending = dict(accepted.submitted)
    last_sent = wall_start
    limit = asyncio.Semaphore(max(1, concurrency))
    deadline = clock() + timeout

    async def check(txid: str) -> None:
        nonlocal last_sent
        async with limit:
            try:
                response = await client.get(TRACKING_PATH, params={"transaction-id": txid})
                bundle = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                return  # asked again on the next round
        final = _final(bundle)
        if final is None:
            return
        status, sent = final
        submitted = pending.pop(txid)
        if status == "completed" and sent is not None:
            last_sent = max(last_sent, sent)
            recorder.record(None, max(0.0, sent - submitted), clock())
        elif status == "completed":
            recorder.record("completed-without-sent", 0.0, clock())
        else:
            recorder.record("entered-in-error", 0.0, clock())

    while pending and clock() < deadline and not stop():
        await asyncio.gather(*(check(txid) for txid in list(pending)))
        if pending:
            await asyncio.sleep(POLL_PAUSE)
    if not stop():
        for _ in pending:
            recorder.record("not-completed", 0.0, clock())
    return max(0.0, last_sent - wall_start)


async def run_http(
    target: HttpTarget,
    schedule: Schedule,
    connections: int = 1,
    *,
    payload_size: int = 4096,
    wait: bool = False,
    wait_timeout: float = 300.0,
    progress: Progress | None = None,
) -> Report:
    """Post documents on ``connections`` concurrent requests and report; with ``wait``, follow
    them to ``completed`` and report that as a second phase (``end_to_end``).

    :raises SetupError: the engine does not answer, refuses the token, or the patient could not
        be created.
    """
    if connections < 1:
        raise ValueError("at least one connection is needed")
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        base_url=target.base,
        headers=target.headers(),
        timeout=httpx.Timeout(target.timeout),
        limits=limits,
    ) as client:
        if target.patient_id:
            await check_access(client, target)
            patient_id = target.patient_id
        else:
            patient_id = await create_patient(client, target, run_prefix())
        body = send_body(patient_id, payload_size)
        accepted = Accepted()
        recorder = Recorder()
        mono0, wall0 = time.perf_counter(), time.time()

        def wall(moment: float) -> float:
            return wall0 + (moment - mono0)

        sessions = [HttpSession(target, body, accepted, wall) for _ in range(connections)]
        if progress is not None:
            progress.start(
                snapshot_of(
                    recorder, total=schedule.count, duration=schedule.duration, label="accepted"
                )
            )
        try:
            seconds = await drive(schedule, sessions, recorder)
        finally:
            if progress is not None:
                await progress.stop()
        phases = [Phase.of("accepted", recorder, seconds)]
        if wait:
            completed = Recorder()
            completed.started = time.perf_counter()
            if progress is not None:
                progress.start(
                    snapshot_of(
                        completed,
                        total=len(accepted.submitted),
                        duration=None,
                        label="completed",
                    )
                )
            try:
                e2e_seconds = await wait_completed(
                    client,
                    accepted,
                    completed,
                    wall_start=wall(recorder.started),
                    concurrency=connections,
                    timeout=wait_timeout,
                    stop=lambda: schedule.stopped,
                )
            finally:
                if progress is not None:
                    await progress.stop()
            phases.append(Phase.of("end_to_end", completed, e2e_seconds))
    return Report(
        mode="http",
        target=target.base,
        message="$send-to-ehr",
        message_bytes=len(body),
        payload_bytes=payload_size,
        connections=connections,
        rate=schedule.rate,
        count=schedule.count,
        duration=schedule.duration,
        phases=phases,
        interrupted=schedule.stopped,
    )
