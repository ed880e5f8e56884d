"""``CommunicationRequest/$send-to-ehr`` and ``$tracking`` (seed 000).

Parameters, defaults and the 422 reference text follow the seed word for word. Every check runs
before anything is stored or queued: a refused request leaves no trace but its log line.
"""

from __future__ import annotations

import binascii
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medcourier.engine.api.auth import Principal, authorize, require
from medcourier.engine.api.fhir import (
    FhirError,
    fhir_response,
    not_queued,
    parse_json,
    read_body_buffer,
)
from medcourier.engine.api.large_json import decode_in_place
from medcourier.engine.content import (
    CONTENT_TYPES,
    default_title,
    is_loinc,
    organizations,
    sniff,
)
from medcourier.engine.errors import BrokerError
from medcourier.engine.model import Status
from medcourier.engine.service import Engine, NoRouteError, SubmitRequest
from medcourier.engine.store import DeliveryRow

router = APIRouter()

DEFAULT_CONTENT_TYPE = "application/pdf"
DEFAULT_DOCUMENT_TYPE = "11488-4"
# name -> the value[x] the seed uses for it
PARAMETERS = {
    "subject": "valueReference",
    "context": "valueReference",
    "content-type": "valueCode",
    "document-type": "valueCode",
    "document-title": "valueString",
    "sender-identifier": "valueString",
    "payload": "valueString",
}
REFERENCE = re.compile(r"^(Patient|Encounter)/([A-Za-z0-9\-.]{1,64})$")
RPPS = re.compile(r"^\d{11}$")
MAX_TITLE = 1000
# Title and base64 overhead on top of the document limit, for the raw body limit.
BODY_OVERHEAD = 64 * 1024


def invalid_reference(reference: str) -> FhirError:
    """The seed's 422 answer, word for word."""
    return FhirError(
        422, f"Resource contains reference to {reference} but this resource is not valid"
    )


def _parameters(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise FhirError(400, "The body must be a FHIR Parameters resource", code="structure")
    params = body.get("parameter")
    if not isinstance(params, list):
        raise FhirError(400, "Parameters.parameter must be a list", code="structure")
    found: dict[str, Any] = {}
    for i, p in enumerate(params):
        name = p.get("name") if isinstance(p, dict) else None
        if not isinstance(name, str) or name not in PARAMETERS:
            known = ", ".join(PARAMETERS)
            raise FhirError(
                400,
                f"Parameters.parameter[{i}]: unknown parameter {name!r} (known: {known})",
                code="invalid",
            )
        if name in found:
            raise FhirError(400, f"Parameter '{name}' is given more than once", code="invalid")
        assert isinstance(p, dict)
        kind = PARAMETERS[name]
        if kind not in p:
            raise FhirError(400, f"Parameter '{name}' must carry {kind}", code="invalid")
        value = p[kind]
        if kind == "valueReference":
            value = value.get("reference") if isinstance(value, dict) else None
        if not isinstance(value, str):
            raise FhirError(400, f"Parameter '{name}': {kind} must be a string", code="invalid")
        found[name] = value
    return found


def _reference(value: str, expected: str) -> str:
    m = REFERENCE.fullmatch(value.strip())
    if m is None or m.group(1) != expected:
        raise invalid_reference(value)
    return m.group(2)


def _payload(value: str, limit: int) -> bytes:
    compact = "".join(value.split())  # the same str when there is no whitespace
    if not compact:
        raise FhirError(
            400, "Parameter 'payload' is empty: the document in base64 is required", code="required"
        )
    if len(compact) // 4 * 3 > limit + 3:
        raise FhirError(
            413, f"The document is larger than the limit of {limit} bytes", code="too-costly"
        )
    try:
        # base64.b64decode(compact, validate=True), errors and all, without its ASCII copy
        data = binascii.a2b_base64(compact, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise FhirError(
            400, f"Parameter 'payload' is not valid base64: {exc}", code="invalid"
        ) from exc
    if len(data) > limit:
        raise FhirError(
            413, f"The document is larger than the limit of {limit} bytes", code="too-costly"
        )
    if not data:
        raise FhirError(400, "Parameter 'payload' decodes to an empty document", code="invalid")
    return data


def _payload_fits(limit: int) -> Callable[[int, int], bool]:
    """Whether :func:`_payload` takes base64 of ``characters`` (without whitespace) that decodes
    to ``size`` bytes: its checks other than the decoding's own."""

    def fits(characters: int, size: int) -> bool:
        return characters > 0 and characters // 4 * 3 <= limit + 3 and 0 < size <= limit

    return fits


def _payload_at(body: Any, marker: str) -> bool:
    """Whether ``marker`` is the valueString of a parameter named payload."""
    params = body.get("parameter") if isinstance(body, dict) else None
    return isinstance(params, list) and any(
        isinstance(p, dict) and p.get("name") == "payload" and p.get("valueString") == marker
        for p in params
    )


def read_request(buffer: io.BytesIO, limit: int) -> _Checked:
    """The body in ``buffer`` (consumed) checked as the operation's parameters.

    A large payload is decoded where it lies in the body's buffer (api/large_json.py), which
    then holds the document instead of the body; any body that path is not certain of is
    parsed whole. Both give the same answer, refusals word for word.
    """
    lifted = decode_in_place(buffer, _payload_at, _payload_fits(limit))
    if lifted is None:
        return check(_parameters(parse_json(buffer)), limit)
    body, payload = lifted
    del lifted
    return check(_parameters(body), limit, payload)


@dataclass(frozen=True)
class _Checked:
    patient_id: str
    encounter_id: str | None
    content_type: str
    document_type: str
    title: str | None
    sender_identifier: str | None
    payload: bytes


def check(params: dict[str, Any], limit: int, decoded: bytes | None = None) -> _Checked:
    """Every syntactic check of the seed's parameters (references are resolved later).

    ``decoded`` is the payload already decoded, when the parameter is only its stand-in.
    """
    if "subject" not in params:
        raise FhirError(
            400, "Parameter 'subject' is required: a reference to Patient/<id>", code="required"
        )
    patient_id = _reference(params["subject"], "Patient")
    encounter_id = _reference(params["context"], "Encounter") if "context" in params else None
    content_type = params.get("content-type", DEFAULT_CONTENT_TYPE)
    if content_type not in CONTENT_TYPES:
        raise FhirError(
            422,
            f"Parameter 'content-type': {content_type!r} is not supported "
            f"(possible values: {', '.join(CONTENT_TYPES)})",
            code="not-supported",
        )
    document_type = params.get("document-type", DEFAULT_DOCUMENT_TYPE)
    if not is_loinc(document_type):
        raise FhirError(
            422,
            f"Parameter 'document-type': {document_type!r} is not a LOINC code "
            "(digits, a dash and a valid check digit, like 11488-4)",
            code="invalid",
        )
    title = params.get("document-title")
    if title is not None:
        title = title.strip()
        if not title or len(title) > MAX_TITLE:
            raise FhirError(
                422,
                f"Parameter 'document-title' must have 1 to {MAX_TITLE} characters",
                code="invalid",
            )
    sender = params.get("sender-identifier")
    if sender is not None and not RPPS.fullmatch(sender.strip()):
        raise FhirError(
            422, "Parameter 'sender-identifier' must be an RPPS number (11 digits)", code="invalid"
        )
    if "payload" not in params:
        raise FhirError(
            400, "Parameter 'payload' is required: the document in base64", code="required"
        )
    payload = _payload(params["payload"], limit) if decoded is None else decoded
    actual = sniff(payload)
    if actual != content_type:
        seen = f"it looks like {actual}" if actual else "its type is not recognised"
        raise FhirError(
            422,
            f"Parameter 'payload' does not match content-type {content_type}: {seen}",
            code="invalid",
        )
    return _Checked(
        patient_id,
        encounter_id,
        content_type,
        document_type,
        title,
        sender.strip() if sender else None,
        payload,
    )


SEND_PATH = "/fhir/CommunicationRequest/$send-to-ehr"


async def send_to_ehr(request: Request) -> Response:
    """``POST`` :data:`SEND_PATH`, served ahead of FastAPI's routing (api/app.py, ``HotRoutes``):
    it is the one endpoint every document goes through."""
    principal = authorize(request, "SEND_TO_EHR")
    engine: Engine = request.app.state.engine
    limit = engine.config.settings.limits.max_document_bytes
    body_limit = min(engine.config.settings.http.max_body_bytes, limit * 4 // 3 + BODY_OVERHEAD)
    checked = read_request(await read_body_buffer(request, body_limit), limit)
    patient = await engine.store.run(engine.store.sync.get_patient, checked.patient_id)
    if patient is None:
        raise invalid_reference(f"Patient/{checked.patient_id}")
    encounter: dict[str, Any] | None = None
    if checked.encounter_id is not None:
        encounter = await engine.store.run(engine.store.sync.get_encounter, checked.encounter_id)
        if encounter is None:
            raise invalid_reference(f"Encounter/{checked.encounter_id}")
        subject = (encounter.get("subject") or {}).get("reference")
        if subject != f"Patient/{checked.patient_id}":
            raise FhirError(
                422,
                f"Encounter/{checked.encounter_id} does not belong to Patient/{checked.patient_id}",
            )
    document_type = checked.document_type
    submission = [
        SubmitRequest(
            patient_id=checked.patient_id,
            encounter_id=checked.encounter_id,
            content_type=checked.content_type,
            document_type=document_type,
            title=checked.title,
            sender_identifier=checked.sender_identifier,
            sender_application=principal.name,
            payload=checked.payload,
            organizations=organizations(patient, encounter),
        )
    ]
    # From here the request alone holds the document, and submit alone holds the request
    # (popped into the call): it lets the document go once stored, while a worker may already
    # be reading it back to deliver it.
    del checked
    try:
        txid = await engine.submit(
            submission.pop(), lambda txid: default_title(patient, document_type, txid)
        )
    except NoRouteError as exc:
        raise FhirError(422, str(exc), code="not-found") from exc
    except BrokerError as exc:
        raise not_queued() from exc
    return fhir_response(
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "tracking-url", "valueString": engine.tracking_url(txid)},
                {"name": "transaction-id", "valueString": txid},
            ],
        }
    )


def history_notes(history: list[tuple[str, Status, datetime, str | None]], route: str) -> list[str]:
    """A delivery's status history as Communication notes: time, status, reason."""
    return [
        f"{at.isoformat(timespec='milliseconds')} {status.value}"
        + (f": {reason}" if reason else "")
        for on, status, at, reason in history
        if on == route
    ]


def communication(row: DeliveryRow, notes: list[str]) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "identifier": [{"system": "urn:medcourier:transaction-id", "value": row.transaction_id}],
        "status": row.status.value,
        "recipient": [{"display": row.route}],
    }
    if row.status is Status.COMPLETED and row.sent_at is not None:
        resource["sent"] = row.sent_at.isoformat(timespec="milliseconds")
    if row.status is Status.ENTERED_IN_ERROR and row.reason:
        resource["statusReason"] = {"text": row.reason}
    if notes:
        resource["note"] = [{"text": n} for n in notes]
    return resource


@router.get("/fhir/CommunicationRequest/$tracking")
async def tracking(request: Request, _p: Principal = Depends(require("SEND_TO_EHR"))) -> Response:
    txid = request.query_params.get("transaction-id")
    if not txid:
        raise FhirError(400, "The transaction-id parameter is required", code="required")
    engine: Engine = request.app.state.engine
    rows = await engine.store.run(engine.store.sync.deliveries_of, txid)
    entries: list[dict[str, Any]]
    if not rows:
        entries = [
            {
                "resource": {
                    "resourceType": "Communication",
                    "status": Status.UNKNOWN.value,
                    "identifier": [{"system": "urn:medcourier:transaction-id", "value": txid}],
                }
            }
        ]
    else:
        history = await engine.store.run(engine.store.sync.history, txid)
        entries = []
        for row in rows:
            notes = history_notes(history, row.route)
            entries.append({"resource": communication(row, notes)})
    return fhir_response(
        {"resourceType": "Bundle", "type": "collection", "total": len(entries), "entry": entries}
    )
