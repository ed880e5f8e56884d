"""The store's schema: one SQLAlchemy Core metadata for SQLite and PostgreSQL alike."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

patients = sa.Table(
    "patients",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization", sa.String(200), index=True),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Set when an ADT^A40 merged this patient into another: reads follow it to the survivor.
    sa.Column("merged_into", sa.String(64)),
)

patient_identifiers = sa.Table(
    "patient_identifiers",
    metadata,
    sa.Column("patient_id", sa.String(64), sa.ForeignKey("patients.id"), nullable=False),
    sa.Column("system", sa.String(400), nullable=False),
    sa.Column("value", sa.String(400), nullable=False),
    sa.Index("ix_patient_identifiers_value", "value", "system"),
    sa.Index("ix_patient_identifiers_patient", "patient_id"),
)

encounters = sa.Table(
    "encounters",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("patient_id", sa.String(64), index=True),
    sa.Column("organization", sa.String(200), index=True),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("transaction_id", sa.String(20), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("content_type", sa.String(100), nullable=False),
    sa.Column("document_type", sa.String(40), nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("sender_identifier", sa.String(40)),
    sa.Column("sender_application", sa.String(200), nullable=False),
    sa.Column("patient_id", sa.String(64), nullable=False, index=True),
    sa.Column("encounter_id", sa.String(64)),
    sa.Column("payload_size", sa.BigInteger, nullable=False),
    # Retention scans documents oldest first, a bounded window at a time (engine/retention.py).
    sa.Index("ix_documents_created_at", "created_at", "transaction_id"),
)

# Payloads apart from metadata: they are pruned sooner and are never read by tracking.
payloads = sa.Table(
    "payloads",
    metadata,
    sa.Column("transaction_id", sa.String(20), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("transaction_id", sa.String(20), primary_key=True),
    sa.Column("route", sa.String(63), primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("status_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column("reason", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    # Set by a replay (engine/admin.py): "resend" the stored rendering, or "rerender".
    sa.Column("replay_mode", sa.String(10)),
    sa.Index("ix_deliveries_status", "status"),
)

status_events = sa.Table(
    "status_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("transaction_id", sa.String(20), nullable=False, index=True),
    sa.Column("route", sa.String(63), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text),
)

encounter_identifiers = sa.Table(
    "encounter_identifiers",
    metadata,
    sa.Column("encounter_id", sa.String(64), sa.ForeignKey("encounters.id"), nullable=False),
    sa.Column("system", sa.String(400), nullable=False),
    sa.Column("value", sa.String(400), nullable=False),
    sa.Index("ix_encounter_identifiers_value", "value", "system"),
)

# What inbound channels already accepted, to answer a resent message without processing it twice.
inbound_log = sa.Table(
    "inbound_log",
    metadata,
    sa.Column("sender", sa.String(400), primary_key=True),
    sa.Column("message_id", sa.String(400), primary_key=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("transaction_ids", sa.Text, nullable=False, default=""),
)

# Messages an MLLP listener with ``ack_after: journal`` ACKed once they were written here, not
# yet applied (engine/inbound_journal.py). A row is deleted once applied; one the engine could
# not apply stays, ``failed`` with the reason, for an operator to read and resend.
inbound_journal = sa.Table(
    "inbound_journal",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),  # SQLite: the rowid, increasing
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("channel", sa.String(63), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("failed", sa.Boolean, nullable=False, default=False),
    sa.Column("reason", sa.Text),
    sa.Column("control_id", sa.String(400), nullable=False),
    sa.Column("sending_application", sa.String(400), nullable=False),
    sa.Column("sending_facility", sa.String(400), nullable=False),
    sa.Column("message_type", sa.String(20), nullable=False),
    sa.Column("peer", sa.String(200)),
    sa.Column("text", sa.Text, nullable=False),
    sa.Index("ix_inbound_journal_channel", "channel", "failed", "seq"),
    # Never reuse a number once the table empties: the applier keys what it kept by it.
    sqlite_autoincrement=True,
)

# FHIR resources the engine keeps as sent (seed 001's flow: Practitioner, Organization,
# DocumentReference, CommunicationRequest). A CommunicationRequest carries the transaction id of
# the document it created, so its Communications are found from either side.
resources = sa.Table(
    "resources",
    metadata,
    sa.Column("type", sa.String(40), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("resource", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("transaction_id", sa.String(20), index=True),
)

# Binary contents apart from their metadata, as payloads are.
binaries = sa.Table(
    "binaries",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("content_type", sa.String(100), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# The last rendering sent to a route, kept when the route says ``keep_renderings: true``, so a
# replay can resend exactly those bytes (engine/admin.py). It goes with the payload: retention
# deleting the payload deletes it too (ON DELETE CASCADE).
renderings = sa.Table(
    "renderings",
    metadata,
    sa.Column(
        "transaction_id",
        sa.String(20),
        sa.ForeignKey("payloads.transaction_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("route", sa.String(63), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("media_type", sa.String(100), nullable=False),
    sa.Column("filename_hint", sa.Text, nullable=False),
    sa.Column("message_id", sa.String(200), nullable=False),
    # JSON object: companion file name -> base64 of its bytes ({} for none).
    sa.Column("companions", sa.Text, nullable=False, default="{}"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# Paused routes (engine/control.py): every engine sharing the store holds a paused route's queue.
route_state = sa.Table(
    "route_state",
    metadata,
    sa.Column("route", sa.String(63), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("changed_by", sa.String(200)),
)
