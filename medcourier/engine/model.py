"""The objects that travel between the core and the plugins.

They are plain frozen dataclasses rather than pydantic models: they are built once per message
on the hot path and never validated again (inputs are validated where they enter the engine).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Status(enum.StrEnum):
    """The five delivery statuses of the Lifen contract (seed 000), used verbatim in FHIR."""

    PREPARATION = "preparation"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    ENTERED_IN_ERROR = "entered-in-error"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        return self in (Status.COMPLETED, Status.ENTERED_IN_ERROR)


@dataclass(frozen=True)
class Document:
    """One clinical document to deliver, with everything a format needs to render it.

    ``patient`` and ``encounter`` are the FHIR R4 resources (JSON dicts) of the directory as they
    were when the worker picked the document up, so a format reads identifiers, names and the
    visit exactly as the sender or the hospital's ADT recorded them.
    """

    transaction_id: str
    created_at: datetime
    content_type: str
    document_type: str
    title: str
    payload: bytes
    patient: dict[str, Any]
    encounter: dict[str, Any] | None = None
    sender_identifier: str | None = None
    sender_application: str = "medcourier"


@dataclass(frozen=True)
class Issue:
    """A validation finding, carrying what the inbound channel should answer."""

    message: str
    severity: str = "error"
    http_status: int = 422
    location: str | None = None


@dataclass(frozen=True)
class Rendered:
    """A document rendered for one destination.

    ``companions`` are files that must be delivered beside the main one, under exactly these
    names (an HPRIM file names its PDF in an OBX of type FIC): connectors that cannot deliver
    them refuse the rendering rather than drop them.
    """

    data: bytes
    media_type: str
    filename_hint: str
    message_id: str
    companions: tuple[tuple[str, bytes], ...] = ()


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"


@dataclass(frozen=True)
class DeliveryResult:
    """What a destination said: accepted, rejected for good (with a reason), or try later."""

    outcome: Outcome
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def accepted(cls, reason: str | None = None, **detail: Any) -> DeliveryResult:
        return cls(Outcome.ACCEPTED, reason, detail)

    @classmethod
    def rejected(cls, reason: str, **detail: Any) -> DeliveryResult:
        return cls(Outcome.REJECTED, reason, detail)

    @classmethod
    def retry(cls, reason: str, **detail: Any) -> DeliveryResult:
        return cls(Outcome.RETRY, reason, detail)
