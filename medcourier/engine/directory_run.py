"""A run of ADT directory updates applied in a handful of statements.

The journal applier (engine/inbound_journal.py) applies an ADT feed a run of updates per
transaction. One at a time, each update costs about seven round trips (remember its message id,
find the patient, write it, find the encounter, write it, and a savepoint around it), so a
feed applies no faster than the store answers them one after another: about 350 a second on
PostgreSQL over loopback, far less than a hospital catching up after downtime sends.

Here a run reads every patient and encounter its messages name in two queries, works the
updates out in order in memory, with exactly the rules the one-at-a-time path uses (the pure
functions of engine/directory.py), and writes the outcome back in a few multi-row statements:
about ten round trips for the whole run.

Only the plain case is taken: a run with a merge (A40), a message id twice, an identifier that
two directory rows carry, or a patient merged away raises :class:`NotBatchable`, and the caller
applies that run one update at a time, as before. The result is the same either way; what
differs is only how many statements it takes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from medcourier.engine.clock import now
from medcourier.engine.directory import (
    _INSERT_ENCOUNTER,
    _INSERT_PATIENT,
    _UPDATE_ENCOUNTER,
    _UPDATE_PATIENT,
    created,
    encounter_sent,
    encounter_updated,
    identifiers_of,
    patient_updated,
)
from medcourier.engine.inbound import DirectoryUpdate
from medcourier.engine.schema import (
    encounter_identifiers,
    encounters,
    inbound_log,
    patient_identifiers,
    patients,
)

Ident = tuple[str, str]


class NotBatchable(Exception):
    """The run needs the one-at-a-time path. It may come after the message ids were
    remembered: the caller must roll back (a savepoint) before going one at a time."""


@dataclass
class _Row:
    """A patient or encounter as the run leaves it."""

    id: str
    resource: dict[str, Any]
    organization: str | None
    patient_id: str | None = None  # encounters
    new: bool = False
    changed: bool = False
    at: datetime | None = None  # when it was last written, as one at a time stamps each write
    gained: list[Ident] = field(default_factory=list)  # identifier rows to insert


def tx_apply_directory_run(
    c: Connection, run: Sequence[tuple[Ident, DirectoryUpdate]], window: timedelta
) -> list[tuple[str, str | None] | None]:
    """Apply ``run`` (each update with its dedupe key, in order) as
    ``Store.tx_apply_directory_update_once`` would one by one; returns, for each, the ids of
    its patient and encounter, or None for a duplicate of a message seen within ``window``
    (skipped).

    The caller holds the directory lock (the transaction-scoped lock the one-at-a-time path
    takes) and runs this in a savepoint, rolled back when it raises: :class:`NotBatchable`
    (then the same run goes one update at a time) or any other error.
    """
    keys = [key for key, _ in run]
    if len(set(keys)) != len(keys):
        raise NotBatchable("a message id is repeated")
    if any(update.merge_from for _, update in run):
        raise NotBatchable("a merge")
    patient_by = _read(c, "patient", {i for _, u in run for i in identifiers_of(u.patient)})
    encounter_by = _read(
        c,
        "encounter",
        {i for _, u in run if u.encounter is not None for i in identifiers_of(u.encounter)},
    )
    fresh = _remember_unless_seen(c, keys, window)
    done: list[tuple[str, str | None] | None] = []
    touched_patients: dict[str, _Row] = {}
    touched_encounters: dict[str, _Row] = {}
    for key, update in run:
        if key not in fresh:
            done.append(None)
            continue
        patient = _patient(patient_by, update)
        touched_patients[patient.id] = patient
        encounter_id = None
        if update.encounter is not None:
            encounter = _encounter(encounter_by, update, patient.resource["id"])
            touched_encounters[encounter.id] = encounter
            encounter_id = encounter.resource["id"]
        done.append((patient.resource["id"], encounter_id))
    _write(c, list(touched_patients.values()), list(touched_encounters.values()))
    return done


def _patient(by_ident: dict[Ident, _Row], update: DirectoryUpdate) -> _Row:
    """``DirectoryStore.upsert_patient``, on the run's rows."""
    sent = identifiers_of(update.patient)
    row = next((by_ident[i] for i in sent if i in by_ident), None)
    if row is None:
        out = created(update.patient)
        row = _Row(out["id"], out, update.organization, new=True, at=now())
        row.gained = identifiers_of(out)
        _index(by_ident, row, row.gained)
        return row
    if update.kind == "ensure":
        return row
    merged, gained = patient_updated(row.resource, update.patient, row.id)
    row.resource = merged
    row.organization = update.organization or row.organization
    row.changed, row.at = True, now()
    row.gained += gained
    _index(by_ident, row, gained)
    return row


def _encounter(by_ident: dict[Ident, _Row], update: DirectoryUpdate, patient_id: str) -> _Row:
    """``DirectoryStore.upsert_encounter``, on the run's rows."""
    assert update.encounter is not None
    resource = encounter_sent(update.encounter, patient_id, update.organization)
    sent = identifiers_of(resource)
    row = next((by_ident[i] for i in sent if i in by_ident), None)
    if row is None:
        out = created(resource)
        row = _Row(out["id"], out, update.organization, patient_id=patient_id, new=True, at=now())
        row.gained = identifiers_of(out)
        _index(by_ident, row, row.gained)
        return row
    if update.kind == "ensure":
        return row
    row.resource = encounter_updated(row.resource, resource, row.id)
    row.patient_id = patient_id
    row.organization = update.organization or row.organization
    row.changed, row.at = True, now()
    return row


def _index(by_ident: dict[Ident, _Row], row: _Row, idents: list[Ident]) -> None:
    """Identifiers now carried by ``row``; one another row carries too would make the next
    lookup's answer depend on the database's row order: not for this path."""
    for ident in idents:
        other = by_ident.setdefault(ident, row)
        if other is not row:
            raise NotBatchable("an identifier two rows carry")


def _read(c: Connection, kind: str, idents: set[Ident]) -> dict[Ident, _Row]:
    """The patients (or encounters) carrying any of ``idents``, by identifier, in one query."""
    if not idents:
        return {}
    rows: dict[str, _Row] = {}
    found: dict[Ident, _Row] = {}
    params = {"idents": sorted(idents), "values": sorted({value for _, value in idents})}
    for r in c.execute(_carrying(kind), params):
        if kind == "patient" and r.merged_into is not None:
            raise NotBatchable("a merged patient")
        row = rows.get(r.id)
        if row is None:
            row = rows[r.id] = _Row(
                r.id,
                json.loads(r.resource),
                r.organization,
                patient_id=None if kind == "patient" else r.patient_id,
            )
        if found.setdefault((r.system, r.value), row) is not row:
            raise NotBatchable("an identifier two rows carry")
    return found


@functools.cache
def _carrying(kind: str) -> sa.Select[Any]:
    """Rows of ``kind`` with each (system, value) of ``:idents`` they carry. Built once: a
    statement built per call is compiled per call, which cost more than running it. The
    ``value IN :values`` is for SQLite, which reads the whole identifier table for a row-value
    ``IN`` of more than one pair, and the (value, system) index for this."""
    if kind == "patient":
        table, ids, key = patients, patient_identifiers, patient_identifiers.c.patient_id
    else:
        table, ids, key = encounters, encounter_identifiers, encounter_identifiers.c.encounter_id
    pairs = sa.tuple_(ids.c.system, ids.c.value)
    return (
        sa.select(ids.c.system, ids.c.value, table)
        .join(table, key == table.c.id)
        .where(
            ids.c.value.in_(sa.bindparam("values", expanding=True)),
            pairs.in_(sa.bindparam("idents", expanding=True)),
        )
    )


def _remember_unless_seen(c: Connection, keys: list[Ident], window: timedelta) -> set[Ident]:
    """Remember every key not received within ``window`` (one multi-row upsert); returns those
    remembered. The one-at-a-time path's ``_remember_unless_seen``, for a run."""
    at = now()
    params: dict[str, Any] = {"at": at, "cutoff": at - window}
    for n, (sender, message_id) in enumerate(keys):
        params[f"sender_{n}"], params[f"message_id_{n}"] = sender, message_id
    rows = c.execute(_log_upsert(len(keys)), params)
    return {(r.sender, r.message_id) for r in rows}


@functools.lru_cache(maxsize=256)
def _log_upsert(count: int) -> sa.TextClause:
    """``INSERT`` of ``count`` log rows ``ON CONFLICT DO UPDATE`` where the row was received
    before ``:cutoff``, returning the rows written: the same text on PostgreSQL and SQLite.
    Text, built once per run length: SQLAlchemy compiles a multi-row upsert built with Core
    anew at each execution (it has no cache key), which cost more than running it."""
    rows = ", ".join(f"(:sender_{n}, :message_id_{n}, :at, '')" for n in range(count))
    received = inbound_log.c.received_at.type
    return sa.text(
        "INSERT INTO inbound_log (sender, message_id, received_at, transaction_ids) "
        f"VALUES {rows} ON CONFLICT (sender, message_id) DO UPDATE "
        "SET received_at = excluded.received_at, transaction_ids = excluded.transaction_ids "
        "WHERE inbound_log.received_at < :cutoff RETURNING sender, message_id"
    ).bindparams(sa.bindparam("at", type_=received), sa.bindparam("cutoff", type_=received))


def _write(c: Connection, people: list[_Row], stays: list[_Row]) -> None:
    """The run's outcome, a statement per kind of write: patients before their identifiers
    and encounters (foreign keys), each row in its final state, stamped with the time of its
    last change (encounter search orders by it)."""
    if rows := [
        {
            "id": p.id,
            "organization": p.organization,
            "resource": json.dumps(p.resource),
            "updated_at": p.at,
        }
        for p in people
        if p.new
    ]:
        c.execute(_INSERT_PATIENT, rows)
    if rows := [
        {
            "b_id": p.id,
            "b_resource": json.dumps(p.resource),
            "b_organization": p.organization,
            "b_updated_at": p.at,
        }
        for p in people
        if p.changed and not p.new
    ]:
        c.execute(_UPDATE_PATIENT, rows)
    if rows := [{"patient_id": p.id, "system": s, "value": v} for p in people for s, v in p.gained]:
        c.execute(patient_identifiers.insert(), rows)
    if rows := [
        {
            "id": e.id,
            "patient_id": e.patient_id,
            "organization": e.organization,
            "resource": json.dumps(e.resource),
            "updated_at": e.at,
        }
        for e in stays
        if e.new
    ]:
        c.execute(_INSERT_ENCOUNTER, rows)
    if rows := [
        {
            "b_id": e.id,
            "b_resource": json.dumps(e.resource),
            "b_patient_id": e.patient_id,
            "b_organization": e.organization,
            "b_updated_at": e.at,
        }
        for e in stays
        if e.changed and not e.new
    ]:
        c.execute(_UPDATE_ENCOUNTER, rows)
    if rows := [
        {"encounter_id": e.id, "system": s, "value": v} for e in stays for s, v in e.gained
    ]:
        c.execute(encounter_identifiers.insert(), rows)
