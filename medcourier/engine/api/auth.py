"""Bearer tokens with scopes.

Tokens come from the config (which reads them from the environment). ``SEND_TO_EHR`` is the seed's
functional scope: it brings the technical scopes the seed lists with it. A missing or unknown
token is 401 with ``WWW-Authenticate: Bearer``; a known token without the scope is 403.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from medcourier.engine.api.fhir import FhirError
from medcourier.engine.config import TokenSettings

# The technical scopes the seed says SEND_TO_EHR gives; and what a create scope of seed 001 lets
# its holder read back (whoever may send a CommunicationRequest may follow its outcome and see
# the Devices it may address).
IMPLIED = {
    "SEND_TO_EHR": frozenset(
        {
            "ORGANIZATION_READ",
            "BINARY_CREATE",
            "COMMUNICATIONREQUEST_CREATE",
            "DOCUMENTREFERENCE_CREATE",
        }
    ),
    "COMMUNICATIONREQUEST_CREATE": frozenset(
        {"COMMUNICATIONREQUEST_READ", "COMMUNICATION_READ", "DEVICE_READ"}
    ),
    "DOCUMENTREFERENCE_CREATE": frozenset({"DOCUMENTREFERENCE_READ"}),
    "BINARY_CREATE": frozenset({"BINARY_READ"}),
}

ALL_SCOPES = (
    "SEND_TO_EHR",
    "PATIENT_CREATE",
    "PATIENT_READ",
    "ENCOUNTER_CREATE",
    "ENCOUNTER_READ",
    "PRACTITIONER_CREATE",
    "PRACTITIONER_READ",
    "ORGANIZATION_CREATE",
    "ORGANIZATION_READ",
    "BINARY_CREATE",
    "BINARY_READ",
    "DOCUMENTREFERENCE_CREATE",
    "DOCUMENTREFERENCE_READ",
    "COMMUNICATIONREQUEST_CREATE",
    "COMMUNICATIONREQUEST_READ",
    "COMMUNICATION_READ",
    "DEVICE_READ",
    "ADMIN",  # replay, cancel, pause and resume (/admin/...)
)


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


class TokenTable:
    def __init__(self, tokens: list[TokenSettings]) -> None:
        self._tokens = [(t.token.encode(), Principal(t.name, _expand(t.scopes))) for t in tokens]

    def lookup(self, presented: str) -> Principal | None:
        candidate = presented.encode()
        found = None
        # Compare against every token in constant time, so timing tells nothing about which.
        for token, principal in self._tokens:
            if hmac.compare_digest(token, candidate):
                found = principal
        return found


def _expand(scopes: list[str]) -> frozenset[str]:
    out: set[str] = set()
    todo = list(scopes)
    while todo:  # implied scopes imply in turn (SEND_TO_EHR -> BINARY_CREATE -> BINARY_READ)
        scope = todo.pop()
        if scope not in out:
            out.add(scope)
            todo.extend(IMPLIED.get(scope, frozenset()))
    return frozenset(out)


def authorize(request: Request, scope: str) -> Principal:
    """The caller's principal if its token holds ``scope``, else 401/403 as a FhirError."""
    header = request.headers.get("authorization", "")
    kind, _, presented = header.partition(" ")
    if kind.lower() != "bearer" or not presented.strip():
        raise FhirError(
            401,
            "Authentication required: send 'Authorization: Bearer <token>'",
            code="login",
            headers={"WWW-Authenticate": "Bearer"},
        )
    table: TokenTable = request.app.state.tokens
    principal = table.lookup(presented.strip())
    if principal is None:
        raise FhirError(
            401,
            "The bearer token is not valid",
            code="login",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if scope not in principal.scopes:
        raise FhirError(403, f"The {scope} scope is required for this operation", code="forbidden")
    return principal


def require(scope: str) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """A FastAPI dependency: the caller's principal, or 401/403 as OperationOutcome."""

    async def dependency(request: Request) -> Principal:
        return authorize(request, scope)

    return dependency
