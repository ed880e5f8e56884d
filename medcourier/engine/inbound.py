"""What inbound channels hand to the engine, and what they get back.

An inbound channel (MLLP listener, drop folder) owns its wire: framing, TLS, character sets,
files. The engine owns meaning and durability: it dedupes, updates the directory (ADT), turns
results and reports into Documents and routes them. A channel answers its sender (ACK, moving the
file) only after the sink's coroutine returned, i.e. after the commit and the queue confirm.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


class Verdict(enum.StrEnum):
    """The engine's answer; channels map it to AA/AE/AR (or CA/CE/CR), or processed/ vs error/."""

    ACCEPT = "accept"  # committed (or a known duplicate): AA / CA, file to processed/
    ERROR = "error"  # the content is wrong (missing field, unknown patient...): AE / CE, error/
    REJECT = "reject"  # not for us (message type not accepted, not HL7): AR / CR, error/


@dataclass(frozen=True)
class InboundResult:
    verdict: Verdict
    text: str = ""
    error_location: str | None = None  # HL7 ERR-2 style, e.g. "PID^1^3"
    transaction_ids: tuple[str, ...] = ()
    duplicate: bool = False


@dataclass(frozen=True)
class InboundMessage:
    """One HL7 v2 message as a channel received it.

    ``text`` is the message decoded with its MSH-18 character set (the channel decodes, since it
    also encodes the ACK in that character set); segments are separated by ``\\r``.
    """

    text: str
    channel: str
    sending_application: str = ""
    sending_facility: str = ""
    control_id: str = ""
    message_type: str = ""  # MSG-1^MSG-2, e.g. "ADT^A01"
    peer: str | None = None


@dataclass(frozen=True)
class PatientIdentifier:
    system: str
    value: str


@dataclass(frozen=True)
class InboundDocument:
    """A document that arrived as a file with a JSON sidecar (or was extracted by a channel)."""

    channel: str
    payload: bytes
    content_type: str
    patient_reference: str | None = None  # "Patient/<id>"
    patient_identifiers: tuple[PatientIdentifier, ...] = ()
    encounter_reference: str | None = None  # "Encounter/<id>"
    visit_number: str | None = None
    document_type: str = "11488-4"
    title: str | None = None
    sender_identifier: str | None = None
    sender_application: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class InboundSink(Protocol):
    """The engine side of every inbound channel."""

    async def hl7_message(self, message: InboundMessage) -> InboundResult:
        """Dedupe, then commit what the message means; return once it is durable."""

    async def document(self, document: InboundDocument) -> InboundResult:
        """Store and route one document; return once it is durable (queued)."""


class InboundChannel(Protocol):
    """A running inbound channel (a listener, a watched folder)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class InboundError(Exception):
    """A message or file whose content is wrong; answered AE (or error/) with this text.

    ``location`` follows HL7 ERR-2 (``segment^sequence^field``, e.g. ``PID^1^3``) when known.
    """

    def __init__(self, text: str, location: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.location = location


@dataclass(frozen=True)
class DirectoryUpdate:
    """What an admission/discharge/transfer message means for the directory.

    ``patient`` and ``encounter`` are FHIR R4 resources without ``id``: the directory finds the
    existing ones by identifier (IPP, INS, visit number) or creates them.
    """

    kind: str  # upsert, discharge, cancel-admit, cancel-discharge, merge; ensure: create only
    patient: dict[str, Any]
    organization: str | None = None
    encounter: dict[str, Any] | None = None
    merge_from: tuple[PatientIdentifier, ...] = ()
    event: str = ""  # e.g. "ADT^A01", for logs and the audit trail


@dataclass(frozen=True)
class MessageDocuments:
    """A message carrying documents (ORU, MDM): the patient it is about, and the documents."""

    patient: dict[str, Any]
    documents: tuple[InboundDocument, ...]
    organization: str | None = None
    encounter: dict[str, Any] | None = None
    event: str = ""


Interpretation = DirectoryUpdate | MessageDocuments


class InboundRejected(InboundError):
    """A message that is not for us (unsupported type or trigger): answered AR, not AE."""


class SinkUnavailable(Exception):
    """The engine cannot take anything right now (queue or database unreachable).

    Channels must not answer: no ACK (the sender resends), the file stays claimed and is tried
    again. Any other exception from a sink is a problem with this message or file, answered as
    such (AE, error/), so that one bad input never blocks the ones behind it.
    """
