"""The patient and encounter directory in the store.

Patients and encounters come from two doors: the FHIR API (create, read, search) and the
hospital's ADT feed (create or update by identifier, discharge, cancel, merge). Both write the same
rows, so a document posted to ``$send-to-ehr`` for a patient admitted over ADT routes to that
hospital. Identifiers are indexed apart from the JSON so token search and ADT matching stay
indexed lookups.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from medcourier.engine.clock import now
from medcourier.engine.driver_reads import DriverReads
from medcourier.engine.schema import (
    documents,
    encounter_identifiers,
    encounters,
    patient_identifiers,
    patients,
)

# Merges can chain (A merged into B, later B into C); reads follow at most this many links.
MAX_MERGE_CHAIN = 16


def identifiers_of(resource: dict[str, Any]) -> list[tuple[str, str]]:
    """(system, value) of every identifier with a value; a missing system is ''."""
    found = []
    for ident in resource.get("identifier") or []:
        value = ident.get("value") if isinstance(ident, dict) else None
        if isinstance(value, str) and value:
            found.append((str(ident.get("system") or ""), value))
    return found


def server_meta(version: int, sent: object = None) -> dict[str, Any]:
    """The server's meta, keeping what the sender put there (tags, profiles, security)."""
    kept = (
        {k: v for k, v in sent.items() if k not in ("versionId", "lastUpdated")}
        if isinstance(sent, dict)
        else {}
    )
    return {
        **kept,
        "versionId": str(version),
        "lastUpdated": now().isoformat(timespec="milliseconds"),
    }


class DirectoryStore:
    """Directory operations; mixed into ``Store``, which provides ``self.engine`` and
    ``self.driver_reads`` (driver_reads.py; None on an in-memory SQLite database)."""

    engine: Engine
    driver_reads: DriverReads | None

    # -- FHIR API ------------------------------------------------------------------------------
    def put_patient(self, resource: dict[str, Any], organization: str | None) -> dict[str, Any]:
        with self.engine.begin() as c:
            return _insert_patient(c, resource, organization)

    def tx_put_patient(
        self, c: Connection, resource: dict[str, Any], organization: str | None
    ) -> dict[str, Any]:
        return _insert_patient(c, resource, organization)

    def tx_put_encounter(
        self, c: Connection, resource: dict[str, Any], patient_id: str, organization: str | None
    ) -> dict[str, Any]:
        return _insert_encounter(c, resource, patient_id, organization)

    def get_patient(self, patient_id: str) -> dict[str, Any] | None:
        """The patient, or the survivor it was merged into (the retired id still resolves)."""
        if self.driver_reads is not None:  # every $send-to-ehr reads it: the lean way
            return self.driver_reads.patient(patient_id, MAX_MERGE_CHAIN)
        with self.engine.connect() as c:
            row = _live_patient(c, patient_id)
            return json.loads(row.resource) if row is not None else None

    def search_patients(self, system: str | None, value: str | None) -> list[dict[str, Any]]:
        """FHIR token search: ``system|value``, ``|value`` (no system), ``value``, ``system|``."""
        q = sa.select(patients.c.resource).distinct()
        q = q.join(patient_identifiers, patient_identifiers.c.patient_id == patients.c.id)
        q = q.where(patients.c.merged_into.is_(None))
        if value:
            q = q.where(patient_identifiers.c.value == value)
        if system is not None:
            q = q.where(patient_identifiers.c.system == system)
        with self.engine.connect() as c:
            return [json.loads(r[0]) for r in c.execute(q.order_by(patients.c.resource))]

    def put_encounter(
        self, resource: dict[str, Any], patient_id: str, organization: str | None
    ) -> dict[str, Any]:
        with self.engine.begin() as c:
            return _insert_encounter(c, resource, patient_id, organization)

    def get_encounter(self, encounter_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            return encounter_resource(c, encounter_id)

    def search_encounters(self, patient_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            live = _live_patient(c, patient_id)
            if live is None:
                return []
            q = sa.select(encounters.c.resource).where(encounters.c.patient_id == live.id)
            return [json.loads(r[0]) for r in c.execute(q.order_by(encounters.c.updated_at))]

    def find_patient(self, identifiers: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
        """The live patient carrying any of these (system, value) identifiers."""
        with self.engine.connect() as c:
            pid = _patient_by_identifiers(c, list(identifiers))
            row = _live_patient(c, pid) if pid else None
            return json.loads(row.resource) if row is not None else None

    def find_encounter(self, identifiers: Iterable[tuple[str, str]]) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            eid = _encounter_by_identifiers(c, list(identifiers))
            return self.get_encounter(eid) if eid else None

    def find_encounter_by_value(self, value: str) -> dict[str, Any] | None:
        """An encounter by visit number whatever its system (drop-folder sidecars give only the
        number)."""
        q = sa.select(encounter_identifiers.c.encounter_id).where(
            encounter_identifiers.c.value == value
        )
        with self.engine.connect() as c:
            eid = c.execute(q.limit(1)).scalar()
            return encounter_resource(c, str(eid)) if eid else None

    # -- ADT feed ----------------------------------------------------------------------------
    def upsert_patient(
        self,
        c: Connection,
        resource: dict[str, Any],
        organization: str | None,
        overwrite: bool = True,
    ) -> dict[str, Any]:
        """Create the patient, or update the one sharing an identifier (identifiers are merged:
        an update that lacks an identifier the directory knows does not drop it).

        ``overwrite=False`` only creates: a result message's PID must not rewrite what the ADT
        feed, the directory's source of truth, recorded.
        """
        sent = identifiers_of(resource)
        found = _patient_row_by_identifiers(c, sent)
        row = _live_patient(c, found.id, found) if found is not None else None
        if row is None:
            return _insert_patient(c, resource, organization)
        old = json.loads(row.resource)
        if not overwrite:
            return dict(old)
        merged, new_ids = patient_updated(old, resource, row.id)
        c.execute(
            _UPDATE_PATIENT,
            {
                "b_id": row.id,
                "b_resource": json.dumps(merged),
                "b_organization": organization or row.organization,
                "b_updated_at": now(),
            },
        )
        if new_ids:
            c.execute(
                patient_identifiers.insert(),
                [{"patient_id": row.id, "system": s, "value": v} for s, v in new_ids],
            )
        return merged

    def upsert_encounter(
        self,
        c: Connection,
        resource: dict[str, Any],
        patient_id: str,
        organization: str | None,
        overwrite: bool = True,
    ) -> dict[str, Any]:
        """Create the encounter, or update the one with the same visit number."""
        resource = encounter_sent(resource, patient_id, organization)
        old_row = _encounter_row_by_identifiers(c, identifiers_of(resource))
        if old_row is None:
            return _insert_encounter(c, resource, patient_id, organization)
        eid = old_row.id
        old = json.loads(old_row.resource)
        if not overwrite:
            return dict(old)
        merged = encounter_updated(old, resource, eid)
        c.execute(
            _UPDATE_ENCOUNTER,
            {
                "b_id": eid,
                "b_resource": json.dumps(merged),
                "b_patient_id": patient_id,
                "b_organization": organization or old_row.organization,
                "b_updated_at": now(),
            },
        )
        return merged

    def merge_patients(
        self, c: Connection, survivor_id: str, retired: Iterable[tuple[str, str]]
    ) -> list[str]:
        """ADT^A40: move encounters, documents and identifiers of the retired patient(s) to the
        survivor; the retired ids keep resolving to it. Returns the retired patient ids."""
        gone: list[str] = []
        for system, value in retired:
            pid = _patient_by_identifiers(c, [(system, value)], exclude=survivor_id)
            if pid is None or pid in gone:
                continue
            gone.append(pid)
            c.execute(patients.update().where(patients.c.id == pid).values(merged_into=survivor_id))
            c.execute(
                patient_identifiers.update()
                .where(patient_identifiers.c.patient_id == pid)
                .values(patient_id=survivor_id)
            )
            c.execute(
                documents.update()
                .where(documents.c.patient_id == pid)
                .values(patient_id=survivor_id)
            )
            for row in c.execute(
                sa.select(encounters.c.id, encounters.c.resource).where(
                    encounters.c.patient_id == pid
                )
            ).all():
                res = json.loads(row.resource)
                res["subject"] = {"reference": f"Patient/{survivor_id}"}
                c.execute(
                    encounters.update()
                    .where(encounters.c.id == row.id)
                    .values(patient_id=survivor_id, resource=json.dumps(res), updated_at=now())
                )
        if gone:
            # the survivor's resource lists every identifier it now answers to
            row = c.execute(sa.select(patients).where(patients.c.id == survivor_id)).one()
            res = json.loads(row.resource)
            have = set(identifiers_of(res))
            for pid in gone:
                old = json.loads(
                    c.execute(
                        sa.select(patients.c.resource).where(patients.c.id == pid)
                    ).scalar_one()
                )
                for ident in old.get("identifier") or []:
                    key = (str(ident.get("system") or ""), ident.get("value"))
                    if key not in have:
                        res.setdefault("identifier", []).append({**ident, "use": "old"})
                        have.add(key)
            c.execute(
                patients.update()
                .where(patients.c.id == survivor_id)
                .values(resource=json.dumps(res), updated_at=now())
            )
        return gone


def created(resource: dict[str, Any]) -> dict[str, Any]:
    """A new patient or encounter: the resource sent, with a fresh id and the server's meta."""
    return {**resource, "id": uuid.uuid4().hex, "meta": server_meta(1, resource.get("meta"))}


def patient_updated(
    old: dict[str, Any], resource: dict[str, Any], patient_id: str
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The patient ``old`` after an ADT update sent ``resource``, and the identifiers it gained.

    The update replaces what it sends; identifiers are merged (one the directory knows and the
    update lacks is kept), since a feed often sends only the identifiers it owns.
    """
    merged = {**old, **resource, "id": patient_id}
    sent_keys = set(identifiers_of(resource))
    extra = [
        i
        for i in (old.get("identifier") or [])
        if (str(i.get("system") or ""), i.get("value")) not in sent_keys
    ]
    merged["identifier"] = list(resource.get("identifier") or []) + extra
    merged["meta"] = server_meta(int(old.get("meta", {}).get("versionId", "1")) + 1)
    known = identifiers_of(old)
    return merged, [x for x in identifiers_of(merged) if x not in known]


def encounter_sent(
    resource: dict[str, Any], patient_id: str, organization: str | None
) -> dict[str, Any]:
    """The encounter an ADT message sent, tied to its patient (and organization)."""
    resource = {**resource, "subject": {"reference": f"Patient/{patient_id}"}}
    if organization and "serviceProvider" not in resource:
        resource["serviceProvider"] = {"reference": organization}
    return resource


def encounter_updated(
    old: dict[str, Any], resource: dict[str, Any], encounter_id: str
) -> dict[str, Any]:
    """The encounter ``old`` after an update sent ``resource`` (see :func:`encounter_sent`):
    the period is merged, so a discharge adds the end to the admission's start."""
    merged = {**old, **resource, "id": encounter_id}
    if "period" in old or "period" in resource:
        merged["period"] = {**old.get("period", {}), **resource.get("period", {})}
    merged["meta"] = server_meta(int(old.get("meta", {}).get("versionId", "1")) + 1)
    return merged


def _insert_patient(
    c: Connection, resource: dict[str, Any], organization: str | None
) -> dict[str, Any]:
    out = created(resource)
    c.execute(
        _INSERT_PATIENT,
        {
            "id": out["id"],
            "organization": organization,
            "resource": json.dumps(out),
            "updated_at": now(),
        },
    )
    rows = [{"patient_id": out["id"], "system": s, "value": v} for s, v in identifiers_of(out)]
    if rows:
        c.execute(patient_identifiers.insert(), rows)
    return out


def _insert_encounter(
    c: Connection, resource: dict[str, Any], patient_id: str, organization: str | None
) -> dict[str, Any]:
    out = created(resource)
    c.execute(
        _INSERT_ENCOUNTER,
        {
            "id": out["id"],
            "patient_id": patient_id,
            "organization": organization,
            "resource": json.dumps(out),
            "updated_at": now(),
        },
    )
    rows = [{"encounter_id": out["id"], "system": s, "value": v} for s, v in identifiers_of(out)]
    if rows:
        c.execute(encounter_identifiers.insert(), rows)
    return out


def encounter_resource(c: Connection, encounter_id: str) -> dict[str, Any] | None:
    row = c.execute(sa.select(encounters.c.resource).where(encounters.c.id == encounter_id)).first()
    return json.loads(row[0]) if row else None


def live_patient_resource(c: Connection, patient_id: str) -> dict[str, Any] | None:
    row = _live_patient(c, patient_id)
    return json.loads(row.resource) if row is not None else None


def _live_patient(c: Connection, patient_id: str, row: Any = None) -> Any:
    """The patient row, following merges to the survivor; ``row``: that of ``patient_id``, when
    the caller has already read it."""
    current = patient_id
    for _ in range(MAX_MERGE_CHAIN):
        if row is None:
            row = c.execute(_PATIENT_BY_ID, {"patient_id": current}).first()
        if row is None or row.merged_into is None:
            return row
        current, row = row.merged_into, None
    return None


def _patient_by_identifiers(
    c: Connection, idents: list[tuple[str, str]], exclude: str | None = None
) -> str | None:
    for system, value in idents:
        q = sa.select(patient_identifiers.c.patient_id).where(
            patient_identifiers.c.value == value, patient_identifiers.c.system == system
        )
        if exclude:
            q = q.where(patient_identifiers.c.patient_id != exclude)
        found = c.execute(q.limit(1)).scalar()
        if found:
            return str(found)
    return None


def _encounter_by_identifiers(c: Connection, idents: list[tuple[str, str]]) -> str | None:
    for system, value in idents:
        found = c.execute(
            sa.select(encounter_identifiers.c.encounter_id)
            .where(encounter_identifiers.c.value == value, encounter_identifiers.c.system == system)
            .limit(1)
        ).scalar()
        if found:
            return str(found)
    return None


# The ADT feed's statements, built once: building a Core statement costs more than running it
# on SQLite (SQLAlchemy caches the compiled form, not the construction).
_INSERT_PATIENT = patients.insert()
_PATIENT_BY_ID = sa.select(patients).where(patients.c.id == sa.bindparam("patient_id"))
_INSERT_ENCOUNTER = encounters.insert()
_UPDATE_PATIENT = (
    patients.update()
    .where(patients.c.id == sa.bindparam("b_id"))
    .values(
        resource=sa.bindparam("b_resource", type_=patients.c.resource.type),
        organization=sa.bindparam("b_organization", type_=patients.c.organization.type),
        updated_at=sa.bindparam("b_updated_at", type_=patients.c.updated_at.type),
    )
)
_UPDATE_ENCOUNTER = (
    encounters.update()
    .where(encounters.c.id == sa.bindparam("b_id"))
    .values(
        resource=sa.bindparam("b_resource", type_=encounters.c.resource.type),
        patient_id=sa.bindparam("b_patient_id", type_=encounters.c.patient_id.type),
        organization=sa.bindparam("b_organization", type_=encounters.c.organization.type),
        updated_at=sa.bindparam("b_updated_at", type_=encounters.c.updated_at.type),
    )
)


@functools.lru_cache(maxsize=64)
def _first_match(kind: str, count: int) -> sa.Select[Any]:
    """The row (``patients`` or ``encounters``) carrying the first of ``count`` identifiers
    (bound as ``value_<n>``, ``system_<n>``) that any row carries: one query, where looking
    each identifier up in turn, then reading the row, took one per step.

    Identifiers are ranked in the order given, as the lookups went; rows carrying the same
    identifier come in whatever order the database has them, as with ``LIMIT 1`` before.
    """
    if kind == "patient":
        table, identifiers, key = patients, patient_identifiers, patient_identifiers.c.patient_id
    else:
        table, identifiers = encounters, encounter_identifiers
        key = encounter_identifiers.c.encounter_id
    matches = [
        sa.and_(
            identifiers.c.value == sa.bindparam(f"value_{n}"),
            identifiers.c.system == sa.bindparam(f"system_{n}"),
        )
        for n in range(count)
    ]
    rank = sa.case(*((match, n) for n, match in enumerate(matches)))
    return (
        sa.select(table)
        .join(identifiers, key == table.c.id)
        .where(sa.or_(*matches))
        .order_by(rank)
        .limit(1)
    )


def _first_row(c: Connection, kind: str, idents: list[tuple[str, str]]) -> Any:
    if not idents:
        return None
    params = {}
    for n, (system, value) in enumerate(idents):
        params[f"value_{n}"], params[f"system_{n}"] = value, system
    return c.execute(_first_match(kind, len(idents)), params).first()


def _patient_row_by_identifiers(c: Connection, idents: list[tuple[str, str]]) -> Any:
    """The patients row (merged or not) of the first of ``idents`` the directory knows."""
    return _first_row(c, "patient", idents)


def _encounter_row_by_identifiers(c: Connection, idents: list[tuple[str, str]]) -> Any:
    """The encounters row of the first of ``idents`` the directory knows."""
    return _first_row(c, "encounter", idents)
