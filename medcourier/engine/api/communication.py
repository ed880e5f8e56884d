"""``CommunicationRequest`` (seed 001) and the ``Communication`` that records each outcome.

Posting a CommunicationRequest is what sends: its recipients are Devices, each the name of a
route (the DMP is one), its payload a DocumentReference whose Binary is the document. Every
reference is resolved before anything is stored; then the document is accepted exactly as
``$send-to-ehr`` accepts one (committed, queued, confirmed) and the request is stored in the same
transaction, carrying the transaction id, so either both exist or neither does.

The Communications are not stored: each is the current state of one delivery (one per recipient
route), read from the deliveries and their history, in the seed's (STU3) shape: ``basedOn`` the
request, ``status`` completed or entered-in-error, and the reason in ``notDoneReason`` and
``note``. ``$tracking`` with the transaction id shows the same deliveries.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy.engine import Connection

from medcourier.engine.api.auth import Principal, require
from medcourier.engine.api.fhir import (
    FhirError,
    bad_field,
    code_of,
    dict_field,
    expect_type,
    fhir_response,
    list_field,
    not_queued,
    read_json,
    searchset,
)
from medcourier.engine.api.resources import (
    engine_of,
    reference_of,
    resolve,
    resolve_document_reference,
    rpps_of,
)
from medcourier.engine.api.send_to_ehr import history_notes
from medcourier.engine.content import default_title
from medcourier.engine.errors import BrokerError
from medcourier.engine.model import Status
from medcourier.engine.resources import insert_resource
from medcourier.engine.service import Engine, SubmitRequest
from medcourier.engine.store import DeliveryRow

router = APIRouter()

TRANSACTION_SYSTEM = "urn:medcourier:transaction-id"
CATEGORY_SYSTEM = "http://lifen.fr/fhir/CodeSystem/communication-category"
CATEGORIES = {"MEDICAL_REPORT"}
MODE_SYSTEM = "http://lifen.fr/fhir/tag/processing/mode"
MODES = {"IMMEDIATE_MODE"}
ACTIVE_DEVICES_URL = "http://lifen.fr/fhir/StructureDefinition/communicationrequest-active-devices"
# FHIR STU3 CommunicationRequest.status and .priority
STATUSES = {"draft", "active", "suspended", "cancelled", "completed", "entered-in-error", "unknown"}
PRIORITIES = {"routine", "urgent", "asap", "stat"}
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
SENDERS = ("Practitioner", "Organization")


def _check_shape(body: dict[str, Any]) -> None:
    """Codes and tags of the seed's example; references are checked apart."""
    if code_of(body, "status") not in STATUSES:
        raise bad_field(
            "CommunicationRequest.status", f"is required: one of {', '.join(sorted(STATUSES))}"
        )
    if "priority" in body and code_of(body, "priority") not in PRIORITIES:
        raise bad_field("CommunicationRequest.priority", f"one of {', '.join(sorted(PRIORITIES))}")
    meta = dict_field(body, "meta", "CommunicationRequest.meta")
    for i, tag in enumerate(list_field(meta, "tag", "CommunicationRequest.meta.tag")):
        if isinstance(tag, dict) and tag.get("system") == MODE_SYSTEM:
            code = code_of(tag, "code")
            if code not in MODES:
                raise bad_field(
                    f"CommunicationRequest.meta.tag[{i}].code",
                    f"processing mode {code!r} is not supported "
                    f"(supported: {', '.join(sorted(MODES))})",
                    422,
                )
    codes = []
    for i, category in enumerate(list_field(body, "category", "CommunicationRequest.category")):
        where = f"CommunicationRequest.category[{i}].coding"
        for coding in list_field(category, "coding", where):
            if isinstance(coding, dict) and coding.get("system") == CATEGORY_SYSTEM:
                codes.append(code_of(coding, "code"))
    if not codes:
        raise bad_field(
            "CommunicationRequest.category",
            f"is required: a coding with system {CATEGORY_SYSTEM} and code MEDICAL_REPORT",
        )
    for code in codes:
        if code not in CATEGORIES:
            raise bad_field(
                "CommunicationRequest.category.coding.code",
                f"{code!r} is not supported (supported: {', '.join(sorted(CATEGORIES))})",
                422,
            )
    list_field(body, "identifier", "CommunicationRequest.identifier")


def _requester(body: dict[str, Any]) -> tuple[str, str] | None:
    """STU3 puts the requester in ``requester.agent``; R4's plain reference is taken too."""
    requester = body.get("requester")
    if requester is None:
        return None
    if isinstance(requester, dict) and "agent" in requester:
        return reference_of(requester["agent"], "CommunicationRequest.requester.agent", SENDERS)
    return reference_of(requester, "CommunicationRequest.requester.agent", SENDERS)


def _devices(body: dict[str, Any]) -> list[str]:
    recipients = body.get("recipient")
    if not isinstance(recipients, list) or not recipients:
        raise bad_field(
            "CommunicationRequest.recipient",
            "is required: the Devices to send to, as Device/<id> (GET /fhir/Device lists them)",
        )
    devices = []
    for i, ref in enumerate(recipients):
        _, device = reference_of(ref, f"CommunicationRequest.recipient[{i}]", ("Device",))
        if device not in devices:
            devices.append(device)
    return devices


def _active_devices(body: dict[str, Any]) -> list[str]:
    found = []
    for i, ext in enumerate(list_field(body, "extension", "CommunicationRequest.extension")):
        if isinstance(ext, dict) and ext.get("url") == ACTIVE_DEVICES_URL:
            _, device = reference_of(
                ext.get("valueReference"), f"CommunicationRequest.extension[{i}]", ("Device",)
            )
            found.append(device)
    return found


def _document_reference(body: dict[str, Any]) -> str:
    payload = body.get("payload")
    if not isinstance(payload, list) or len(payload) != 1 or not isinstance(payload[0], dict):
        raise bad_field(
            "CommunicationRequest.payload",
            "is required: one entry whose contentReference is the DocumentReference to send",
        )
    _, ident = reference_of(
        payload[0].get("contentReference"),
        "CommunicationRequest.payload[0].contentReference",
        ("DocumentReference",),
    )
    return ident


@router.post("/fhir/CommunicationRequest")
async def create_communication_request(
    request: Request, principal: Principal = Depends(require("COMMUNICATIONREQUEST_CREATE"))
) -> Response:
    body = expect_type(await read_json(request, 1024 * 1024), "CommunicationRequest")
    engine = engine_of(request)
    _check_shape(body)
    _, patient_id = reference_of(body.get("subject"), "CommunicationRequest.subject", ("Patient",))
    document_id = _document_reference(body)
    if body.get("sender") is None:
        raise bad_field(
            "CommunicationRequest.sender", "is required: Practitioner/<id> or Organization/<id>"
        )
    sender = reference_of(body["sender"], "CommunicationRequest.sender", SENDERS)
    requester = _requester(body)
    devices = _devices(body)
    active = _active_devices(body)

    patient = await resolve(engine, "Patient", patient_id, "CommunicationRequest.subject")
    reference = await resolve(
        engine,
        "DocumentReference",
        document_id,
        "CommunicationRequest.payload[0].contentReference",
    )
    document = await resolve_document_reference(engine, reference)
    facts, content_type = document.facts, document.content_type
    if document.patient.get("id") != patient.get("id"):  # compared after merges are followed
        raise FhirError(
            422,
            f"DocumentReference/{document_id} is about Patient/{facts.patient_id}, "
            f"not Patient/{patient_id}",
            expression="CommunicationRequest.subject",
        )
    sender_resource = await resolve(engine, *sender, "CommunicationRequest.sender")
    if requester is not None:
        await resolve(engine, *requester, "CommunicationRequest.requester.agent")
    for i, device in enumerate(devices):
        await resolve(engine, "Device", device, f"CommunicationRequest.recipient[{i}]")
    for device in active:
        await resolve(engine, "Device", device, "CommunicationRequest.extension")
    # The CDA's author: the document's first author when a Practitioner, else the sender.
    author = sender_resource if sender[0] == "Practitioner" else None
    if document.author is not None and document.author.get("resourceType") == "Practitioner":
        author = document.author
    binary = await engine.store.run(engine.store.sync.get_binary, facts.binary_id)
    if binary is None:  # pruned between the two reads
        raise FhirError(
            422,
            f"Resource contains reference to Binary/{facts.binary_id} but this resource is "
            "not valid",
            expression="DocumentReference.content[0].attachment.url",
        )
    routes = engine.config.device_routes()
    saved: list[dict[str, Any]] = []

    def store_request(c: Connection, txid: str) -> None:
        identifiers = [i for i in body.get("identifier") or [] if isinstance(i, dict)]
        kept = {**body, "identifier": [*identifiers, {"system": TRANSACTION_SYSTEM, "value": txid}]}
        saved.append(insert_resource(c, kept, txid))

    try:
        txid = await engine.submit(
            SubmitRequest(
                patient_id=facts.patient_id,
                encounter_id=facts.encounter_id,
                content_type=content_type,
                document_type=facts.document_type,
                title=facts.title,
                sender_identifier=rpps_of(author) if author is not None else None,
                sender_application=principal.name,
                payload=binary[1],
                only_routes=tuple(routes[d].name for d in devices),
                also=store_request,
            ),
            lambda txid: default_title(patient, facts.document_type, txid),
        )
    except BrokerError as exc:
        raise not_queued() from exc
    resource = saved[0]
    return fhir_response(
        resource,
        201,
        Location=f"{engine.base_url}/fhir/CommunicationRequest/{resource['id']}",
        **{"X-Transaction-Id": txid},
    )


@router.get("/fhir/CommunicationRequest/{ident}")
async def read_communication_request(
    ident: str, request: Request, _p: Any = Depends(require("COMMUNICATIONREQUEST_READ"))
) -> Response:
    engine = engine_of(request)
    found = await engine.store.run(engine.store.sync.get_resource, "CommunicationRequest", ident)
    if found is None:
        raise FhirError(404, f"CommunicationRequest/{ident} is not known", code="not-found")
    return fhir_response(found)


async def communications(
    engine: Engine, request_id: str, only: str | None = None
) -> list[dict[str, Any]]:
    """The Communications of a CommunicationRequest: one per delivery, as it stands now."""
    found = await engine.store.run(
        engine.store.sync.get_resource_row, "CommunicationRequest", request_id
    )
    if found is None or found[1] is None:
        return []
    resource, txid = found[0], found[1]
    rows = await engine.store.run(engine.store.sync.deliveries_of, txid)
    history = await engine.store.run(engine.store.sync.history, txid)
    devices = {r.name: d for d, r in engine.config.device_routes().items()}
    out = []
    for row in rows:
        device = devices.get(row.route)
        # FHIR ids allow letters, digits, '-' and '.': a route name's '_' becomes '-'.
        ident = f"{txid}-{device or row.route.replace('_', '-')}"
        if only is not None and ident != only:
            continue
        notes = history_notes(history, row.route)
        out.append(_communication(ident, request_id, resource, row, device, notes))
    return out


def _communication(
    ident: str,
    request_id: str,
    request: dict[str, Any],
    row: DeliveryRow,
    device: str | None,
    notes: list[str],
) -> dict[str, Any]:
    recipient = {"reference": f"Device/{device}"} if device else {"display": row.route}
    out: dict[str, Any] = {
        "resourceType": "Communication",
        "id": ident,
        "identifier": [{"system": TRANSACTION_SYSTEM, "value": row.transaction_id}],
        "basedOn": [{"reference": f"CommunicationRequest/{request_id}"}],
        "status": row.status.value,
        "recipient": [recipient],
    }
    for key in ("category", "subject", "payload"):
        if key in request:
            out[key] = request[key]
    if row.status is Status.COMPLETED and row.sent_at is not None:
        out["sent"] = row.sent_at.isoformat(timespec="milliseconds")
    if row.status is Status.ENTERED_IN_ERROR:
        out["notDone"] = True
        if row.reason:
            out["notDoneReason"] = {"text": row.reason}
    if notes:
        out["note"] = [{"text": n} for n in notes]
    return out


@router.get("/fhir/Communication")
async def search_communications(
    request: Request, _p: Any = Depends(require("COMMUNICATION_READ"))
) -> Response:
    based_on = request.query_params.get("based-on")
    if not based_on:
        raise FhirError(
            400,
            "Search Communication by based-on=CommunicationRequest/<id>",
            code="not-supported",
        )
    request_id = based_on.removeprefix("CommunicationRequest/")
    if not ID.fullmatch(request_id):
        raise FhirError(400, "based-on: expected CommunicationRequest/<id>", code="invalid")
    engine = engine_of(request)
    return fhir_response(searchset(await communications(engine, request_id), engine.base_url))


@router.get("/fhir/Communication/{ident}")
async def read_communication(
    ident: str, request: Request, _p: Any = Depends(require("COMMUNICATION_READ"))
) -> Response:
    engine = engine_of(request)
    txid = ident.split("-", 1)[0]
    found = []
    for request_id in await engine.store.run(engine.store.sync.requests_of, txid):
        found.extend(await communications(engine, request_id, only=ident))
    if not found:
        raise FhirError(404, f"Communication/{ident} is not known", code="not-found")
    return fhir_response(found[0])
