"""The resources seed 001's flow refers to: Practitioner, Organization, Binary,
DocumentReference, and the Devices that name routes.

A DMP send is posted in steps, each referring to the previous ones, so each step checks that what
it refers to exists and is what the engine will need later (a Binary of an accepted type, a
DocumentReference with a LOINC type): a mistake is answered at the step that made it, not as a
failed delivery an hour later. The shapes accepted are those of the seed (FHIR STU3) and, where
R4 moved a field, R4's too (``DocumentReference.date`` / ``indexed``).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medcourier.engine.api.auth import require
from medcourier.engine.api.fhir import (
    FhirError,
    bad_field,
    code_of,
    dict_field,
    expect_type,
    fhir_response,
    list_field,
    parse_json,
    read_body,
    read_body_buffer,
    read_json,
    searchset,
)
from medcourier.engine.api.large_json import decode_in_place
from medcourier.engine.config import Route
from medcourier.engine.content import CONTENT_TYPES, is_loinc, sniff
from medcourier.engine.service import Engine

router = APIRouter()

ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
REFERENCE = re.compile(r"^([A-Za-z]{1,40})/([A-Za-z0-9\-.]{1,64})$")
LOINC_SYSTEM = "http://loinc.org"
# Where a Practitioner's RPPS number is found: the ANS's national identifier of persons (whose
# values are "8" + RPPS, TRE_G08), or an identifier typed RPPS.
RPPS_OID_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
RPPS_SYSTEMS = frozenset(
    {"http://rpps.fr", "https://rpps.esante.gouv.fr", "urn:oid:1.2.250.1.71.4.2.1"}
)
RPPS = re.compile(r"^8?(\d{11})$")
DOCUMENT_REFERENCE_STATUSES = {"current", "superseded", "entered-in-error"}
# The seed's content types, with the registered name of plain text accepted for its own.
BINARY_TYPES = {**{t: t for t in CONTENT_TYPES}, "text/plain": "application/txt"}
DATE = re.compile(
    r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2}))?)?)?$"
)


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _body_limit(request: Request) -> int:
    return engine_of(request).config.settings.http.max_body_bytes


def reference_of(value: Any, field: str, allowed: tuple[str, ...]) -> tuple[str, str]:
    """(type, id) of a Reference whose type is one of ``allowed``, or a 400 naming the field."""
    ref = value.get("reference") if isinstance(value, dict) else None
    m = REFERENCE.fullmatch(ref) if isinstance(ref, str) else None
    if m is None or m.group(1) not in allowed:
        kinds = " or ".join(f"{k}/<id>" for k in allowed)
        raise bad_field(field, f"must be a reference like {kinds}")
    return m.group(1), m.group(2)


def unresolved(reference: str, field: str) -> FhirError:
    """The seed's 422 text for a reference to nothing, naming the field."""
    return FhirError(
        422,
        f"Resource contains reference to {reference} but this resource is not valid",
        code="invalid",
        expression=field,
    )


async def resolve(engine: Engine, kind: str, ident: str, field: str) -> dict[str, Any]:
    """The resource a reference points to, or the seed's 422 naming the field."""
    found: dict[str, Any] | None
    if kind == "Patient":
        found = await engine.store.run(engine.store.sync.get_patient, ident)
    elif kind == "Encounter":
        found = await engine.store.run(engine.store.sync.get_encounter, ident)
    elif kind == "Device":
        found = device_resource(engine, ident)
    else:
        found = await engine.store.run(engine.store.sync.get_resource, kind, ident)
        if found is None and kind == "Organization":
            found = configured_organization(engine, ident)
    if found is None:
        raise unresolved(f"{kind}/{ident}", field)
    return found


# -- Devices (from the config) -------------------------------------------------------------------


def device_resource(engine: Engine, device_id: str) -> dict[str, Any] | None:
    route = engine.config.device_routes().get(device_id)
    return _device(route) if route is not None else None


def _device(route: Route) -> dict[str, Any]:
    device = route.settings.device
    assert device is not None
    return {
        "resourceType": "Device",
        "id": device.id,
        "status": "active",
        "identifier": [{"system": "urn:medcourier:route", "value": route.name}],
        "type": {"text": device.name or device.id},
    }


def configured_organization(engine: Engine, org_id: str) -> dict[str, Any] | None:
    """An Organization a route matches on is known to the engine even if never posted."""
    ref = f"Organization/{org_id}"
    for route in engine.config.routes:
        if ref in route.settings.match.organizations:
            return {"resourceType": "Organization", "id": org_id, "active": True}
    return None


@router.get("/fhir/Device/{device_id}")
async def read_device(
    device_id: str, request: Request, _p: Any = Depends(require("DEVICE_READ"))
) -> Response:
    found = device_resource(engine_of(request), device_id)
    if found is None:
        raise FhirError(404, f"Device/{device_id} is not known", code="not-found")
    return fhir_response(found)


@router.get("/fhir/Device")
async def search_devices(request: Request, _p: Any = Depends(require("DEVICE_READ"))) -> Response:
    engine = engine_of(request)
    found = [_device(r) for r in engine.config.device_routes().values()]
    return fhir_response(searchset(found, engine.base_url))


# -- Practitioner and Organization ---------------------------------------------------------------


def rpps_of(practitioner: dict[str, Any]) -> str | None:
    """The RPPS number (11 digits) of a Practitioner, if it carries one."""
    identifiers = practitioner.get("identifier")
    for ident in identifiers if isinstance(identifiers, list) else []:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        kind = ident.get("type")
        codings = kind.get("coding") if isinstance(kind, dict) else None
        codes = {code_of(c, "code") for c in (codings if isinstance(codings, list) else [])}
        if code_of(ident, "system") in RPPS_SYSTEMS or "RPPS" in codes:
            m = RPPS.fullmatch(ident["value"].strip())
            if m is not None:
                return m.group(1)
    return None


def _check_identifiers(body: dict[str, Any], kind: str) -> None:
    for i, ident in enumerate(list_field(body, "identifier", f"{kind}.identifier")):
        value = ident.get("value") if isinstance(ident, dict) else None
        if not isinstance(value, str) or not value.strip() or len(value) > 400:
            raise bad_field(f"{kind}.identifier[{i}].value", "a string of 1 to 400 characters")
        assert isinstance(ident, dict)
        if "system" in ident and not isinstance(ident["system"], str):
            raise bad_field(f"{kind}.identifier[{i}].system", "must be a URI string")
        if "type" in ident:
            codings = list_field(
                dict_field(ident, "type", f"{kind}.identifier[{i}].type"),
                "coding",
                f"{kind}.identifier[{i}].type.coding",
            )
            if not all(isinstance(c, dict) for c in codings):
                raise bad_field(f"{kind}.identifier[{i}].type.coding", "a list of Coding")


def check_practitioner(body: dict[str, Any]) -> None:
    _check_identifiers(body, "Practitioner")
    for i, ident in enumerate(body.get("identifier") or []):
        if ident.get("system") in RPPS_SYSTEMS and not RPPS.fullmatch(ident["value"].strip()):
            raise bad_field(
                f"Practitioner.identifier[{i}].value",
                "an RPPS number has 11 digits (under the OID 1.2.250.1.71.4.2.1: 8 and the "
                "11 digits)",
            )
    names = body.get("name", [])
    if not isinstance(names, list) or not all(isinstance(n, dict) for n in names):
        raise bad_field("Practitioner.name", "must be a list of HumanName")
    if not body.get("identifier") and not names:
        raise bad_field("Practitioner", "give at least an identifier (the RPPS) or a name")


def check_organization(body: dict[str, Any]) -> None:
    _check_identifiers(body, "Organization")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_field("Organization.name", "must be a string")
    if not body.get("identifier") and not name:
        raise bad_field("Organization", "give at least an identifier or a name")


async def _create(request: Request, kind: str) -> Response:
    body = expect_type(await read_json(request, 1024 * 1024), kind)
    (check_practitioner if kind == "Practitioner" else check_organization)(body)
    engine = engine_of(request)
    saved = await engine.store.write(engine.store.sync.tx_put_resource, body)
    return fhir_response(saved, 201, Location=f"{engine.base_url}/fhir/{kind}/{saved['id']}")


async def _read(request: Request, kind: str, ident: str) -> Response:
    engine = engine_of(request)
    found = await engine.store.run(engine.store.sync.get_resource, kind, ident)
    if found is None and kind == "Organization":
        found = configured_organization(engine, ident)
    if found is None:
        raise FhirError(404, f"{kind}/{ident} is not known", code="not-found")
    return fhir_response(found)


@router.post("/fhir/Practitioner")
async def create_practitioner(
    request: Request, _p: Any = Depends(require("PRACTITIONER_CREATE"))
) -> Response:
    return await _create(request, "Practitioner")


@router.get("/fhir/Practitioner/{ident}")
async def read_practitioner(
    ident: str, request: Request, _p: Any = Depends(require("PRACTITIONER_READ"))
) -> Response:
    return await _read(request, "Practitioner", ident)


@router.post("/fhir/Organization")
async def create_organization(
    request: Request, _p: Any = Depends(require("ORGANIZATION_CREATE"))
) -> Response:
    return await _create(request, "Organization")


@router.get("/fhir/Organization/{ident}")
async def read_organization(
    ident: str, request: Request, _p: Any = Depends(require("ORGANIZATION_READ"))
) -> Response:
    return await _read(request, "Organization", ident)


# -- Binary --------------------------------------------------------------------------------------


def _binary_type(declared: object, field: str) -> str:
    media = (declared if isinstance(declared, str) else "").split(";", 1)[0].strip().lower()
    if media not in BINARY_TYPES:
        raise FhirError(
            422,
            f"{field}: {media or 'no content type'!r} is not supported "
            f"(possible values: {', '.join(BINARY_TYPES)})",
            code="not-supported",
            expression=field,
        )
    return BINARY_TYPES[media]


def _checked_content(data: bytes, content_type: str, limit: int) -> bytes:
    if not data:
        raise FhirError(400, "The Binary is empty", code="required")
    if len(data) > limit:
        raise FhirError(
            413, f"The document is larger than the limit of {limit} bytes", code="too-costly"
        )
    actual = sniff(data)
    if actual != content_type:
        seen = f"it looks like {actual}" if actual else "its type is not recognised"
        raise FhirError(422, f"The Binary's content does not match {content_type}: {seen}")
    return data


def _binary_field(body: dict[str, Any]) -> str:
    """STU3 (the seed's version) calls the bytes ``content``; R4 renamed it ``data``."""
    return "content" if "content" in body else "data"


def _binary_data_at(body: Any, marker: str) -> bool:
    return isinstance(body, dict) and body.get(_binary_field(body)) == marker


def read_binary_json(buffer: io.BytesIO) -> tuple[str, bytes]:
    """A FHIR Binary's content type and bytes, from the JSON body in ``buffer`` (consumed).

    A large document is decoded where it lies in the body's buffer (api/large_json.py); any body
    that path is not certain of is parsed whole. Both answer the same, refusals word for word.
    """
    lifted = decode_in_place(buffer, _binary_data_at, lambda characters, size: True)
    body = expect_type(parse_json(buffer) if lifted is None else lifted[0], "Binary")
    content_type = _binary_type(body.get("contentType"), "Binary.contentType")
    if lifted is not None:
        return content_type, lifted[1]
    field = _binary_field(body)
    encoded = body.get(field)
    if not isinstance(encoded, str):
        raise bad_field("Binary.content", "is required: the document in base64")
    try:
        # base64.b64decode(..., validate=True), errors and all, without its ASCII copy
        data = binascii.a2b_base64("".join(encoded.split()), strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_field(f"Binary.{field}", f"is not valid base64: {exc}") from exc
    return content_type, data


@router.post("/fhir/Binary")
async def create_binary(request: Request, _p: Any = Depends(require("BINARY_CREATE"))) -> Response:
    """Raw bytes with their Content-Type, or a FHIR Binary (JSON, data in base64)."""
    engine = engine_of(request)
    limit = engine.config.settings.limits.max_document_bytes
    declared = request.headers.get("content-type", "")
    media = declared.split(";", 1)[0].strip().lower()
    if media in ("application/fhir+json", "application/json"):
        buffer = await read_body_buffer(request, min(_body_limit(request), limit * 4 // 3 + 65536))
        content_type, data = read_binary_json(buffer)
    else:
        content_type = _binary_type(declared, "Content-Type")
        data = await read_body(request, min(_body_limit(request), limit))
    data = _checked_content(data, content_type, limit)
    saved = await engine.store.write(engine.store.sync.tx_put_binary, content_type, data)
    location = f"{engine.base_url}/fhir/Binary/{saved['id']}"
    if "return=minimal" in request.headers.get("prefer", ""):
        # Large documents need not travel back: the Location names the new Binary.
        return Response(status_code=201, headers={"Location": location})
    # The whole resource by default: STU3 requires a Binary's content, so an answer without it
    # would not be a valid Binary for the seed's clients.
    return fhir_response(
        {**saved, "content": base64.b64encode(data).decode("ascii")}, 201, Location=location
    )


@router.get("/fhir/Binary/{binary_id}")
async def read_binary(
    binary_id: str, request: Request, _p: Any = Depends(require("BINARY_READ"))
) -> Response:
    """The bytes as they were posted; FHIR JSON (STU3: base64 in ``content``) when asked."""
    engine = engine_of(request)
    found = await engine.store.run(engine.store.sync.get_binary, binary_id)
    if found is None:
        raise FhirError(404, f"Binary/{binary_id} is not known", code="not-found")
    content_type, data = found
    accept = request.headers.get("accept", "")
    if "fhir+json" in accept or "application/json" in accept:
        return fhir_response(
            {
                "resourceType": "Binary",
                "id": binary_id,
                "contentType": content_type,
                "content": base64.b64encode(data).decode("ascii"),
            }
        )
    return Response(data, media_type=content_type)


# -- DocumentReference ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentFacts:
    """What the engine reads from a DocumentReference to build the Document it sends."""

    patient_id: str
    encounter_id: str | None
    binary_id: str
    document_type: str
    title: str | None
    authors: tuple[tuple[str, str], ...]  # (type, id) of each author reference


def document_facts(body: dict[str, Any]) -> DocumentFacts:
    """Check a DocumentReference's shape; references are resolved by the caller."""
    if code_of(body, "status") not in DOCUMENT_REFERENCE_STATUSES:
        raise bad_field(
            "DocumentReference.status",
            f"is required: one of {', '.join(sorted(DOCUMENT_REFERENCE_STATUSES))}",
        )
    codings = list_field(
        dict_field(body, "type", "DocumentReference.type"),
        "coding",
        "DocumentReference.type.coding",
    )
    loinc = [
        c.get("code") for c in codings if isinstance(c, dict) and c.get("system") == LOINC_SYSTEM
    ]
    if not loinc:
        raise bad_field(
            "DocumentReference.type",
            "is required: a coding with system http://loinc.org (the document's type)",
        )
    if not isinstance(loinc[0], str) or not is_loinc(loinc[0]):
        raise bad_field(
            "DocumentReference.type.coding.code",
            f"{loinc[0]!r} is not a LOINC code (digits, a dash and a valid check digit)",
        )
    _, patient_id = reference_of(body.get("subject"), "DocumentReference.subject", ("Patient",))
    encounter_id = None
    context = body.get("context")
    if isinstance(context, dict) and context.get("encounter") is not None:
        encounter = context["encounter"]
        if isinstance(encounter, list):  # R4: a list; STU3: one reference
            encounter = encounter[0] if encounter else None
        if encounter is not None:
            _, encounter_id = reference_of(
                encounter, "DocumentReference.context.encounter", ("Encounter",)
            )
    authors = body.get("author", [])
    if not isinstance(authors, list):
        raise bad_field("DocumentReference.author", "must be a list of references")
    author_refs = tuple(
        reference_of(ref, f"DocumentReference.author[{i}]", ("Practitioner", "Organization"))
        for i, ref in enumerate(authors)
    )
    for field in ("indexed", "date", "created"):
        value = body.get(field)
        if value is not None and (not isinstance(value, str) or not DATE.fullmatch(value)):
            raise bad_field(f"DocumentReference.{field}", "must be a FHIR date or dateTime")
    content = body.get("content")
    attachment = (
        content[0].get("attachment")
        if isinstance(content, list) and content and isinstance(content[0], dict)
        else None
    )
    url = attachment.get("url") if isinstance(attachment, dict) else None
    m = re.search(r"(?:^|/)Binary/([A-Za-z0-9\-.]{1,64})$", url) if isinstance(url, str) else None
    if m is None:
        raise bad_field(
            "DocumentReference.content[0].attachment.url",
            "is required: the document's Binary, as Binary/<id>",
        )
    assert isinstance(attachment, dict)
    title = body.get("description") or attachment.get("title")
    if title is not None and (not isinstance(title, str) or not 0 < len(title.strip()) <= 1000):
        raise bad_field("DocumentReference.description", "a title of 1 to 1000 characters")
    return DocumentFacts(
        patient_id=patient_id,
        encounter_id=encounter_id,
        binary_id=m.group(1),
        document_type=loinc[0],
        title=title.strip() if isinstance(title, str) else None,
        authors=author_refs,
    )


@dataclass(frozen=True)
class ResolvedDocument:
    """A checked DocumentReference with what its references resolved to."""

    facts: DocumentFacts
    content_type: str  # the Binary's
    patient: dict[str, Any]  # the subject (the survivor, when it was merged)
    author: dict[str, Any] | None  # the first author


async def resolve_document_reference(engine: Engine, body: dict[str, Any]) -> ResolvedDocument:
    """Check a DocumentReference and everything it refers to."""
    facts = document_facts(body)
    patient = await resolve(engine, "Patient", facts.patient_id, "DocumentReference.subject")
    if facts.encounter_id is not None:
        encounter = await resolve(
            engine, "Encounter", facts.encounter_id, "DocumentReference.context.encounter"
        )
        if (encounter.get("subject") or {}).get("reference") != f"Patient/{facts.patient_id}":
            raise FhirError(
                422,
                f"Encounter/{facts.encounter_id} does not belong to Patient/{facts.patient_id}",
                expression="DocumentReference.context.encounter",
            )
    authors = [
        await resolve(engine, kind, ident, f"DocumentReference.author[{i}]")
        for i, (kind, ident) in enumerate(facts.authors)
    ]
    content_type = await engine.store.run(engine.store.sync.binary_content_type, facts.binary_id)
    if content_type is None:
        raise unresolved(f"Binary/{facts.binary_id}", "DocumentReference.content[0].attachment.url")
    declared = body["content"][0]["attachment"].get("contentType")
    if declared is not None and BINARY_TYPES.get(str(declared).lower()) != content_type:
        raise bad_field(
            "DocumentReference.content[0].attachment.contentType",
            f"{declared!r} differs from the Binary's content type {content_type}",
            422,
        )
    return ResolvedDocument(facts, content_type, patient, authors[0] if authors else None)


@router.post("/fhir/DocumentReference")
async def create_document_reference(
    request: Request, _p: Any = Depends(require("DOCUMENTREFERENCE_CREATE"))
) -> Response:
    body = expect_type(await read_json(request, 1024 * 1024), "DocumentReference")
    engine = engine_of(request)
    await resolve_document_reference(engine, body)
    saved = await engine.store.write(engine.store.sync.tx_put_resource, body)
    return fhir_response(
        saved, 201, Location=f"{engine.base_url}/fhir/DocumentReference/{saved['id']}"
    )


@router.get("/fhir/DocumentReference/{ident}")
async def read_document_reference(
    ident: str, request: Request, _p: Any = Depends(require("DOCUMENTREFERENCE_READ"))
) -> Response:
    return await _read(request, "DocumentReference", ident)
