"""The engine side of inbound channels: dedupe, directory updates, documents to route.

Channels (MLLP listeners, drop folders) call these coroutines and answer their sender only when
they return, so every ``ACCEPT`` here means committed: the directory change or the document and
its queue items are durable. Message meaning comes from plugins (``medcourier_interpret_message``),
so the core parses no HL7 itself.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy.exc
import structlog

from medcourier.engine.content import default_title, organizations, sniff
from medcourier.engine.errors import BrokerError
from medcourier.engine.inbound import (
    DirectoryUpdate,
    InboundDocument,
    InboundError,
    InboundMessage,
    InboundRejected,
    InboundResult,
    MessageDocuments,
    SinkUnavailable,
    Verdict,
)
from medcourier.engine.store import Duplicate

if TYPE_CHECKING:
    from medcourier.engine.service import Engine

log = structlog.get_logger("medcourier.inbound")


def dedupe_key(message: InboundMessage) -> tuple[str, str]:
    """What identifies a message to the duplicate check: its sender, and its control id."""
    sender = f"{message.channel}|{message.sending_application}|{message.sending_facility}"
    return sender, message.control_id


class EngineSink:
    def __init__(
        self, engine: Engine, duplicate_window: timedelta, routes: tuple[str, ...] = ()
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.window = duplicate_window
        self.routes = routes

    async def hl7_message(self, message: InboundMessage) -> InboundResult:
        try:
            return await self._hl7_message(message)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            raise SinkUnavailable(f"store unavailable: {type(exc).__name__}") from exc

    def interpret(
        self, message: InboundMessage
    ) -> DirectoryUpdate | MessageDocuments | InboundResult:
        """What the message means, through the plugins (``medcourier_interpret_message``); an
        ``InboundResult`` when they refuse it (AR: a type no plugin reads, or a trigger it does
        not support) or find it wrong (AE, with the error's location). Stores nothing."""
        try:
            meaning = self.engine.plugins.hook.medcourier_interpret_message(message=message)
        except InboundRejected as exc:
            return InboundResult(Verdict.REJECT, exc.text, exc.location)
        except InboundError as exc:
            return InboundResult(Verdict.ERROR, exc.text, exc.location)
        if meaning is None:
            return InboundResult(
                Verdict.REJECT, f"no plugin handles messages of type {message.message_type}"
            )
        assert isinstance(meaning, DirectoryUpdate | MessageDocuments)
        return meaning

    async def _hl7_message(self, message: InboundMessage) -> InboundResult:
        """Dedupe, interpret, apply. A message this sender already sent (same control id within
        the window) is answered as a duplicate whatever it says now. For a directory update,
        the most common message, the dedupe check is part of the update's own write rather than
        a read before it; for the rest, it is read first, as it must be before routing."""
        dedupe = dedupe_key(message) if message.control_id else None
        try:
            meaning = self.interpret(message)
        except Exception:
            # A plugin's bug: a message accepted before it is still answered as accepted.
            if dedupe is not None and (earlier := await self.seen(message, dedupe)):
                return earlier
            raise
        try:
            if isinstance(meaning, DirectoryUpdate):
                return await self._directory_update(message, meaning, dedupe)
            if dedupe is not None and (earlier := await self.seen(message, dedupe)):
                return earlier
            if isinstance(meaning, InboundResult):
                return meaning
            return await self._documents(meaning, dedupe)
        except InboundError as exc:
            return InboundResult(Verdict.ERROR, exc.text, exc.location)

    async def seen(self, message: InboundMessage, dedupe: tuple[str, str]) -> InboundResult | None:
        """The answer to a message already accepted within the window, None for a new one."""
        earlier = await self.store.run(self.store.sync.seen, *dedupe, self.window)
        return None if earlier is None else _duplicate(message, tuple(earlier))

    async def _directory_update(
        self, message: InboundMessage, update: DirectoryUpdate, dedupe: tuple[str, str] | None
    ) -> InboundResult:
        sync = self.store.sync
        if dedupe is None:
            await self.store.write(sync.tx_apply_directory_update, update, None)
        else:
            done = await self.store.write(
                sync.tx_apply_directory_update_once, update, dedupe, self.window
            )
            if isinstance(done, Duplicate):
                return _duplicate(message, done.transaction_ids)
        log.info(
            "directory updated",
            channel=message.channel,
            hl7_event=update.event,
            kind=update.kind,
            control_id=message.control_id,
        )
        return InboundResult(Verdict.ACCEPT)

    async def _documents(
        self, meaning: MessageDocuments, dedupe: tuple[str, str] | None
    ) -> InboundResult:
        """The patient (and visit) the message names are created if the directory lacks them
        (never rewritten: ADT owns demographics), then each document is routed.

        The dedupe key is remembered after the last document is queued: a resend after a crash
        mid-way delivers the first ones again (at least once) rather than losing the rest.
        """
        update = DirectoryUpdate(
            "ensure", meaning.patient, meaning.organization, meaning.encounter, event=meaning.event
        )
        patient_id, encounter_id = await self.store.write(
            self.store.sync.tx_apply_directory_update, update, None
        )
        patient = await self.store.run(self.store.sync.get_patient, patient_id)
        encounter = (
            await self.store.run(self.store.sync.get_encounter, encounter_id)
            if encounter_id
            else None
        )
        assert patient is not None
        # Every document is checked before any is queued: a message refused (AE) half-way would
        # have its first documents delivered again when the corrected message is resent.
        for doc in meaning.documents:
            self.check_document(doc)
        txids = []
        for i, doc in enumerate(meaning.documents):
            last = i == len(meaning.documents) - 1
            txids.append(await self._submit(doc, patient, encounter, dedupe if last else None))
        return InboundResult(Verdict.ACCEPT, transaction_ids=tuple(txids))

    async def document(self, document: InboundDocument) -> InboundResult:
        try:
            return await self._document(document)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            raise SinkUnavailable(f"store unavailable: {type(exc).__name__}") from exc

    async def _document(self, document: InboundDocument) -> InboundResult:
        key = document.extra.get("idempotency_key")
        dedupe = (f"{document.channel}|file", key) if key else None
        if dedupe is not None:
            earlier = await self.store.run(self.store.sync.seen, *dedupe, self.window)
            if earlier is not None:
                return InboundResult(
                    Verdict.ACCEPT,
                    "already accepted",
                    transaction_ids=tuple(earlier),
                    duplicate=True,
                )
        try:
            patient = await self._patient(document)
            encounter = await self._encounter(document, patient)
            self.check_document(document)
            txid = await self._submit(document, patient, encounter, dedupe)
        except InboundError as exc:
            return InboundResult(Verdict.ERROR, exc.text, exc.location)
        return InboundResult(Verdict.ACCEPT, transaction_ids=(txid,))

    async def _patient(self, document: InboundDocument) -> dict[str, Any]:
        sync = self.store.sync
        if document.patient_reference:
            pid = document.patient_reference.removeprefix("Patient/")
            found = await self.store.run(sync.get_patient, pid)
            if found is None:
                raise InboundError(
                    f"Resource contains reference to "
                    f"{document.patient_reference} but this resource is not valid"
                )
            return found
        idents = [(i.system, i.value) for i in document.patient_identifiers]
        if not idents:
            raise InboundError("the document names no patient (patient or patient_identifiers)")
        found = await self.store.run(sync.find_patient, idents)
        if found is None:
            shown = ", ".join(f"{s}|{v}" if s else v for s, v in idents)
            raise InboundError(f"no patient in the directory has the identifier {shown}")
        return found

    async def _encounter(
        self, document: InboundDocument, patient: dict[str, Any]
    ) -> dict[str, Any] | None:
        sync = self.store.sync
        if document.encounter_reference:
            eid = document.encounter_reference.removeprefix("Encounter/")
            found = await self.store.run(sync.get_encounter, eid)
        elif document.visit_number:
            found = await self.store.run(sync.find_encounter_by_value, document.visit_number)
        else:
            return None
        if found is None:
            raise InboundError(
                f"the encounter {document.encounter_reference or document.visit_number} "
                "is not in the directory"
            )
        if (found.get("subject") or {}).get("reference") != f"Patient/{patient['id']}":
            raise InboundError("the encounter does not belong to the document's patient")
        return found

    def check_document(self, doc: InboundDocument) -> None:
        """Size and content checks, answered with the document's place in the message."""
        where = doc.extra.get("location")
        limit = self.engine.config.settings.limits.max_document_bytes
        if len(doc.payload) > limit:
            raise InboundError(f"the document is larger than the limit of {limit} bytes", where)
        actual = sniff(doc.payload)
        if actual != doc.content_type:
            seen = f"it looks like {actual}" if actual else "its type is not recognised"
            raise InboundError(
                f"the document does not match content type {doc.content_type}: {seen}", where
            )

    async def _submit(
        self,
        doc: InboundDocument,
        patient: dict[str, Any],
        encounter: dict[str, Any] | None,
        dedupe: tuple[str, str] | None,
    ) -> str:
        """Submit a document the caller has already passed through ``_check``."""
        from medcourier.engine.service import NoRouteError, SubmitRequest

        request = SubmitRequest(
            patient_id=patient["id"],
            encounter_id=encounter["id"] if encounter else None,
            content_type=doc.content_type,
            document_type=doc.document_type,
            title=doc.title,
            sender_identifier=doc.sender_identifier,
            sender_application=doc.sender_application or doc.channel,
            payload=doc.payload,
            organizations=organizations(patient, encounter),
            dedupe=dedupe,
            only_routes=self.routes,
        )
        try:
            return await self.engine.submit(
                request, lambda txid: default_title(patient, doc.document_type, txid)
            )
        except NoRouteError as exc:
            raise InboundError(str(exc)) from exc
        except BrokerError as exc:
            # not an error of the message: let the channel hold it (no ACK, file stays)
            raise SinkUnavailable(f"queue unavailable: {exc}") from exc


def _duplicate(message: InboundMessage, transaction_ids: tuple[str, ...]) -> InboundResult:
    log.info("duplicate message", channel=message.channel, control_id=message.control_id)
    return InboundResult(
        Verdict.ACCEPT,
        "duplicate of an accepted message",
        transaction_ids=transaction_ids,
        duplicate=True,
    )
