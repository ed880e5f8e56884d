"""The patient and encounter directory: create, read, search (FHIR R4 JSON).

These are the resources the formats read (PID from the Patient, PV1 from the Encounter) and the
router matches on (managingOrganization, serviceProvider). Input is checked for the fields the
engine relies on; the rest of the resource is kept as sent.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medcourier.engine.api.auth import require
from medcourier.engine.api.fhir import (
    FhirError,
    bad_field,
    expect_type,
    fhir_response,
    read_json,
    searchset,
)
from medcourier.engine.nir import ins_authority, nir_problem
from medcourier.engine.service import Engine

router = APIRouter()

DATE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?$")
DATETIME = re.compile(
    r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01])(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2}))?)?)?$"
)
FULL_DATE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
GENDERS = {"male", "female", "other", "unknown"}
# The store's identifier columns hold 400 characters.
MAX_IDENTIFIER = 400
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ORG_REF = re.compile(r"^Organization/[A-Za-z0-9\-.]{1,64}$")
PATIENT_REF = re.compile(r"^Patient/([A-Za-z0-9\-.]{1,64})$")


def _is_datetime(value: object) -> bool:
    """A FHIR dateTime that is also a real calendar time (no 24:00, no February 30)."""
    if not isinstance(value, str) or not DATETIME.fullmatch(value):
        return False
    if "T" not in value:
        return True
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _limit(request: Request) -> int:
    return _engine(request).config.settings.http.max_body_bytes


def _reference(body: dict[str, Any], field: str, pattern: re.Pattern[str]) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    ref = value.get("reference") if isinstance(value, dict) else None
    if not isinstance(ref, str) or not pattern.fullmatch(ref):
        raise bad_field(
            f"{body['resourceType']}.{field}",
            f"must be a reference like {pattern.pattern.strip('^$').split('/')[0]}/<id>",
        )
    return ref


def check_patient(body: dict[str, Any]) -> str | None:
    """Check the fields the engine reads; returns the managing organization reference."""
    identifiers = body.get("identifier", [])
    if not isinstance(identifiers, list):
        raise bad_field("Patient.identifier", "must be a list")
    for i, ident in enumerate(identifiers):
        if (
            not isinstance(ident, dict)
            or not isinstance(ident.get("value"), str)
            or not ident["value"].strip()
        ):
            raise bad_field(f"Patient.identifier[{i}].value", "is required and must be a string")
        if "system" in ident and not isinstance(ident["system"], str):
            raise bad_field(f"Patient.identifier[{i}].system", "must be a URI string")
        for key in ("system", "value"):
            if len(ident.get(key) or "") > MAX_IDENTIFIER:
                raise bad_field(f"Patient.identifier[{i}].{key}", f"longer than {MAX_IDENTIFIER}")
    names = body.get("name", [])
    if not isinstance(names, list) or not all(isinstance(n, dict) for n in names):
        raise bad_field("Patient.name", "must be a list of HumanName")
    for i, name in enumerate(names):
        if "family" in name and not isinstance(name["family"], str):
            raise bad_field(f"Patient.name[{i}].family", "must be a string")
        given = name.get("given", [])
        if not isinstance(given, list) or not all(isinstance(g, str) for g in given):
            raise bad_field(f"Patient.name[{i}].given", "must be a list of strings")
    birth = body.get("birthDate")
    if birth is not None and (not isinstance(birth, str) or not DATE.fullmatch(birth)):
        raise bad_field("Patient.birthDate", "must be a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)")
    gender = body.get("gender")
    if gender is not None and (not isinstance(gender, str) or gender not in GENDERS):
        raise bad_field("Patient.gender", f"must be one of {', '.join(sorted(GENDERS))}")
    if not identifiers and not names:
        raise bad_field("Patient", "give at least an identifier or a name")
    _check_nir_patient(body)
    return _reference(body, "managingOrganization", ORG_REF)


def _check_nir_patient(body: dict[str, Any]) -> None:
    """A Patient carrying a NIR is one the DMP will be asked about: the seed's rules apply.

    The NIR must be well formed (15 characters, key mod 97, 2A/2B for Corsica); family, given
    and birthDate are mandatory; multipleBirthInteger is the birth rank, 1 when not given (the
    seed calls it mandatory and gives it a default, so a missing one is set, a wrong one refused).
    Patients without a NIR (an EHR's own, from seed 000 or the ADT feed) keep the lighter rules.
    """
    has_nir = False
    for i, ident in enumerate(body.get("identifier", [])):
        if ins_authority(ident) is None:
            continue
        has_nir = True
        problem = nir_problem(ident["value"])
        if problem is not None:
            raise bad_field(f"Patient.identifier[{i}].value", f"not a valid NIR: {problem}")
    if not has_nir:
        return
    names = body.get("name", [])
    if not any(isinstance(n.get("family"), str) and n["family"].strip() for n in names):
        raise bad_field("Patient.name.family", "is mandatory for a patient identified by a NIR")
    if not any(any(g.strip() for g in n.get("given", [])) for n in names):
        raise bad_field("Patient.name.given", "is mandatory for a patient identified by a NIR")
    birth = body.get("birthDate")
    if birth is None:
        raise bad_field("Patient.birthDate", "is mandatory for a patient identified by a NIR")
    if not isinstance(birth, str) or not FULL_DATE.fullmatch(birth):
        raise bad_field("Patient.birthDate", "must be a full date (YYYY-MM-DD) for a NIR patient")
    rank = body.setdefault("multipleBirthInteger", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise bad_field("Patient.multipleBirthInteger", "must be the birth rank: 1, 2, 3...")
    if "multipleBirthBoolean" in body:
        raise bad_field(
            "Patient.multipleBirthBoolean",
            "give the birth rank as multipleBirthInteger (FHIR allows only one of the two)",
        )


def check_encounter(body: dict[str, Any]) -> tuple[str, str | None]:
    """Check an Encounter; returns (patient id, service provider reference)."""
    if not isinstance(body.get("status"), str):
        raise bad_field("Encounter.status", "is required (planned, in-progress, finished...)")
    identifiers = body.get("identifier", [])
    if not isinstance(identifiers, list):
        raise bad_field("Encounter.identifier", "must be a list")
    for i, ident in enumerate(identifiers):
        if not isinstance(ident, dict) or not isinstance(ident.get("value", ""), str):
            raise bad_field(f"Encounter.identifier[{i}].value", "must be a string")
        for key in ("system", "value"):
            value = ident.get(key) or ""
            if not isinstance(value, str) or len(value) > MAX_IDENTIFIER:
                raise bad_field(
                    f"Encounter.identifier[{i}].{key}", f"a string of at most {MAX_IDENTIFIER}"
                )
    klass = body.get("class")
    if not isinstance(klass, dict) or not isinstance(klass.get("code"), str):
        raise bad_field("Encounter.class", "is required: a Coding with a code (IMP, AMB, EMER...)")
    subject = _reference(body, "subject", PATIENT_REF)
    if subject is None:
        raise bad_field("Encounter.subject", "is required: a reference to Patient/<id>")
    period = body.get("period")
    if period is not None:
        if not isinstance(period, dict):
            raise bad_field("Encounter.period", "must be a Period")
        for key in ("start", "end"):
            value = period.get(key)
            if value is not None and not _is_datetime(value):
                raise bad_field(f"Encounter.period.{key}", "must be a FHIR dateTime")
    return subject.split("/", 1)[1], _reference(body, "serviceProvider", ORG_REF)


@router.post("/fhir/Patient")
async def create_patient(
    request: Request, _p: Any = Depends(require("PATIENT_CREATE"))
) -> Response:
    body = expect_type(await read_json(request, _limit(request)), "Patient")
    organization = check_patient(body)
    engine = _engine(request)
    saved = await engine.store.write(engine.store.sync.tx_put_patient, body, organization)
    location = f"{engine.base_url}/fhir/Patient/{saved['id']}"
    return fhir_response(saved, 201, Location=location)


@router.get("/fhir/Patient/{patient_id}")
async def read_patient(
    patient_id: str, request: Request, _p: Any = Depends(require("PATIENT_READ"))
) -> Response:
    engine = _engine(request)
    found = await engine.store.run(engine.store.sync.get_patient, patient_id)
    if found is None:
        raise FhirError(404, f"Patient/{patient_id} is not known", code="not-found")
    return fhir_response(found)


@router.get("/fhir/Patient")
async def search_patient(request: Request, _p: Any = Depends(require("PATIENT_READ"))) -> Response:
    token = request.query_params.get("identifier")
    if token is None:
        raise FhirError(
            400, "Search Patient by identifier=system|value (or value)", code="not-supported"
        )
    system: str | None
    if "|" in token:
        system, value = token.split("|", 1)
    else:
        system, value = None, token
    if not value and not system:
        raise FhirError(400, "identifier: give a value, system|value or system|", code="invalid")
    engine = _engine(request)
    found = await engine.store.run(engine.store.sync.search_patients, system, value or None)
    return fhir_response(searchset(found, engine.base_url))


@router.post("/fhir/Encounter")
async def create_encounter(
    request: Request, _p: Any = Depends(require("ENCOUNTER_CREATE"))
) -> Response:
    body = expect_type(await read_json(request, _limit(request)), "Encounter")
    patient_id, organization = check_encounter(body)
    engine = _engine(request)
    if await engine.store.run(engine.store.sync.get_patient, patient_id) is None:
        raise FhirError(
            422,
            f"Resource contains reference to Patient/{patient_id} but this resource is not valid",
            expression="Encounter.subject",
        )
    saved = await engine.store.write(
        engine.store.sync.tx_put_encounter, body, patient_id, organization
    )
    location = f"{engine.base_url}/fhir/Encounter/{saved['id']}"
    return fhir_response(saved, 201, Location=location)


@router.get("/fhir/Encounter/{encounter_id}")
async def read_encounter(
    encounter_id: str, request: Request, _p: Any = Depends(require("ENCOUNTER_READ"))
) -> Response:
    engine = _engine(request)
    found = await engine.store.run(engine.store.sync.get_encounter, encounter_id)
    if found is None:
        raise FhirError(404, f"Encounter/{encounter_id} is not known", code="not-found")
    return fhir_response(found)


@router.get("/fhir/Encounter")
async def search_encounter(
    request: Request, _p: Any = Depends(require("ENCOUNTER_READ"))
) -> Response:
    subject = request.query_params.get("subject") or request.query_params.get("patient")
    if not subject:
        raise FhirError(400, "Search Encounter by subject=Patient/<id>", code="not-supported")
    patient_id = subject.removeprefix("Patient/")
    if not ID.fullmatch(patient_id):
        raise FhirError(400, "subject: expected Patient/<id>", code="invalid")
    engine = _engine(request)
    found = await engine.store.run(engine.store.sync.search_encounters, patient_id)
    return fhir_response(searchset(found, engine.base_url))
