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
