"""FHIR JSON answers: resources, OperationOutcome errors, Bundles.

Every error the API gives is an OperationOutcome whose ``diagnostics`` says, in the caller's
terms, what is wrong. The seed's example spells severity and code in capitals ("ERROR",
"PROCESSING"); FHIR R4 binds both to lower-case code systems and strict clients (HAPI) reject the
capitals, so we send the FHIR codes and keep the seed's diagnostics texts word for word.
"""

from __future__ import annotations

import io
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from medcourier.engine.buffers import presized_buffer

FHIR_JSON = "application/fhir+json"


class FhirError(Exception):
    """Raised anywhere in a request handler; answered as an OperationOutcome."""

    def __init__(
        self,
        status: int,
        diagnostics: str,
        code: str = "processing",
        expression: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = code
        self.expression = expression
        self.headers = headers


def not_queued() -> FhirError:
    """503: the queue did not confirm, so the document was not accepted and may be sent again."""
    return FhirError(
        503,
        "The document could not be queued and was not accepted; try again later",
        code="transient",
        headers={"Retry-After": "5"},
    )


def bad_field(field: str, why: str, status: int = 400) -> FhirError:
    """An error about one field of the request, named as a FHIRPath expression."""
    return FhirError(status, f"{field}: {why}", code="invalid", expression=field)


def list_field(parent: Any, key: str, field: str) -> list[Any]:
    """``parent[key]`` as a list (empty when absent), or a 400 naming ``field``."""
    value = parent.get(key) if isinstance(parent, dict) else None
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_field(field, "must be a list")
    return value


def dict_field(parent: Any, key: str, field: str) -> dict[str, Any]:
    """``parent[key]`` as an object (empty when absent), or a 400 naming ``field``."""
    value = parent.get(key) if isinstance(parent, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_field(field, "must be an object")
    return value


def code_of(parent: Any, key: str) -> str | None:
    """A code-valued field as a string, or None when absent or of another JSON type (which the
    caller's membership test then refuses by name, instead of failing on an unhashable list)."""
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, str) else None


def expect_type(body: Any, resource_type: str) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("resourceType") != resource_type:
        raise FhirError(400, f"The body must be a FHIR {resource_type} resource", code="structure")
    return body


def operation_outcome(
    diagnostics: str, code: str = "processing", expression: str | None = None
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def fhir_response(body: dict[str, Any], status: int = 200, **headers: str) -> Response:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers or None)


async def fhir_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    return JSONResponse(
        operation_outcome(exc.diagnostics, exc.code, exc.expression),
        status_code=exc.status,
        media_type=FHIR_JSON,
        headers=exc.headers,
    )


def _too_large(limit: int) -> FhirError:
    return FhirError(
        413, f"The request body is larger than the limit of {limit} bytes", code="too-costly"
    )


async def read_body_buffer(request: Request, limit: int) -> io.BytesIO:
    """Read the body within ``limit`` bytes into a buffer, or answer 413.

    The body is read in chunks and the read stops at the limit, so a client cannot make the
    engine buffer more than ``limit`` bytes by lying about (or omitting) Content-Length. Each
    chunk is copied into one buffer and let go: a declared Content-Length sizes the buffer once
    when the first chunk arrives (engine/buffers.py), so a large body is held once, never as a
    list of chunks beside their join. A length that lies costs no more than the limit (a larger
    one is refused before reading): the limit is checked against what arrives, and the buffer
    is cut to it.

    The buffer holds exactly the body (``getvalue()`` hands it over without a copy); its owner
    may also decode it in place (api/large_json.py).
    """
    declared = request.headers.get("content-length")
    expected = int(declared) if declared and declared.isascii() and declared.isdigit() else None
    if expected is not None and expected > limit:
        raise _too_large(limit)
    out: io.BytesIO | None = None
    size = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        if out is None:  # sized when the body starts, not by a header alone
            out = presized_buffer(max(expected or 0, len(chunk)))
        out.write(chunk)
    if out is None:
        return io.BytesIO()
    out.truncate()
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The body within ``limit`` bytes (see :func:`read_body_buffer`), or a 413."""
    return (await read_body_buffer(request, limit)).getvalue()


_DECODER = json.JSONDecoder()
"""What ``json.loads`` uses when given no options (its private ``_default_decoder``)."""


def parse_json(buffer: io.BytesIO) -> Any:
    """The body in ``buffer`` as JSON, or a 400; the buffer is consumed (closed).

    Exactly ``json.loads(body)``, answers and errors alike, but the body's bytes are let go
    once decoded to text, before the parse builds its values: a large body is held as bytes
    and text, then as text and values, never all three at once.
    """
    body = buffer.getvalue()
    buffer.close()
    if not body:
        raise FhirError(
            400, "The request body is empty: a FHIR JSON resource is expected", code="structure"
        )
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        del body
        return _DECODER.decode(text)
    except RecursionError as exc:
        raise FhirError(400, "The request body nests JSON too deeply", code="structure") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise FhirError(
            400, f"The request body is not valid JSON: {exc}", code="structure"
        ) from exc


async def read_json(request: Request, limit: int) -> Any:
    """Read the body within ``limit`` bytes and parse it as JSON, or answer 413 / 400."""
    return parse_json(await read_body_buffer(request, limit))


def searchset(resources: list[dict[str, Any]], base_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {
                "fullUrl": f"{base_url}/fhir/{r['resourceType']}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in resources
        ],
    }
