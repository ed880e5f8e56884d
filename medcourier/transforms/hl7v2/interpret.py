"""What an inbound HL7 v2 message means to the engine (the ``medcourier_interpret_message`` hook).

ADT events become directory updates; ORU^R01 and MDM^T02 carrying documents become documents to
route. The hospital a message comes from (MSH-4) is the managing organization of the patients it
creates, so routes that match ``Organization/<facility>`` take their documents.
"""

from __future__ import annotations

import re
from typing import Any

from medcourier.engine.content import CONTENT_TYPES
from medcourier.engine.inbound import (
    DirectoryUpdate,
    InboundDocument,
    InboundError,
    InboundMessage,
    InboundRejected,
    Interpretation,
    MessageDocuments,
)
from medcourier.engine.plugins import hookimpl
from medcourier.transforms.hl7v2.inbound import (
    DocumentMessage,
    UnsupportedMessageError,
    parse_adt,
    parse_document_message,
)

DOCUMENT_MESSAGES = ("ORU^R01", "MDM^T02")
_NOT_ID = re.compile(r"[^A-Za-z0-9\-.]")


def organization_of(facility: str) -> str | None:
    """``Organization/<facility>`` with the characters a FHIR id cannot hold replaced by '-'."""
    ident = _NOT_ID.sub("-", facility)[:64]
    return f"Organization/{ident}" if ident else None


@hookimpl
def medcourier_interpret_message(message: InboundMessage) -> Interpretation | None:
    kind = message.message_type
    try:
        if kind.startswith("ADT^"):
            return _adt(message)
        if kind in DOCUMENT_MESSAGES:
            return _documents(message)
    except UnsupportedMessageError as exc:
        raise InboundRejected(exc.text, exc.location) from exc
    return None


def _encounter(resource: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if resource is None else {"resourceType": "Encounter", **resource}


def _adt(message: InboundMessage) -> DirectoryUpdate:
    event = parse_adt(message.text)
    organization = organization_of(event.facility)
    patient = {"resourceType": "Patient", **event.patient}
    if organization:
        patient["managingOrganization"] = {"reference": organization}
    return DirectoryUpdate(
        kind=event.kind,
        patient=patient,
        organization=organization,
        encounter=_encounter(event.encounter),
        merge_from=event.merge_from,
        event=event.event,
    )


def _documents(message: InboundMessage) -> MessageDocuments:
    parsed: DocumentMessage = parse_document_message(message.text)
    organization = organization_of(parsed.facility)
    patient = {"resourceType": "Patient", **parsed.patient}
    if organization:
        patient["managingOrganization"] = {"reference": organization}
    documents = []
    for doc in parsed.documents:
        where = f"OBX^{doc.obx}^5"
        if doc.payload is None:
            raise InboundError(
                "document references (OBX of type RP) are not fetched: send the document in an "
                "OBX of type ED",
                where,
            )
        if doc.content_type not in CONTENT_TYPES:
            raise InboundError(
                f"documents of type {doc.content_type} are not accepted "
                f"(accepted: {', '.join(CONTENT_TYPES)})",
                where,
            )
        documents.append(
            InboundDocument(
                channel=message.channel,
                payload=doc.payload,
                content_type=doc.content_type,
                document_type=doc.document_type,
                title=doc.title,
                sender_identifier=doc.sender_identifier,
                sender_application=message.sending_application or None,
                extra={**doc.extra, "location": where},
            )
        )
    return MessageDocuments(
        patient=patient,
        documents=tuple(documents),
        organization=organization,
        encounter=_encounter(parsed.encounter),
        event=message.message_type,
    )
