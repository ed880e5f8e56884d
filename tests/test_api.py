"""The FHIR API's contract: auth, the directory, every refusal of $send-to-ehr.

One engine (embedded default) for the module; every refused request is checked to leave nothing
stored and nothing delivered.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from tests.harness import (
    LIMITED_TOKEN,
    LoopThread,
    Running,
    pdf_bytes,
    running_engine,
    send_parameters,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(40)
JPEG = b"\xff\xd8\xff\xe0" + bytes(60)


@pytest.fixture(scope="module")
def eng(lt: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_engine(lt, tmp_path_factory.mktemp("api"), max_document_bytes=64 * 1024) as r:
        yield r


@pytest.fixture(scope="module")
def people(eng: Running) -> dict[str, str]:
    pid = eng.patient(
        identifier=[{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-1"}],
        name=[{"family": "Bernard", "given": ["Anne"]}],
        birthDate="1990-05-17",
        gender="female",
        managingOrganization={"reference": "Organization/demo-hl7"},
    )
    other = eng.patient(name=[{"family": "Autre", "given": ["Personne"]}])
    enc = eng.encounter(pid, serviceProvider={"reference": "Organization/demo-hl7"})
    other_enc = eng.encounter(other)
    return {"patient": pid, "encounter": enc, "other": other, "other_encounter": other_enc}


def _outcome(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    oo = OperationOutcome.model_validate(r.json())
    assert oo.issue[0].severity == "error"
    diagnostics = oo.issue[0].diagnostics
    assert diagnostics
    return str(diagnostics)


# -- auth -------------------------------------------------------------------------------------
ENDPOINTS = [
    ("POST", "/fhir/Patient", "PATIENT_CREATE"),
    ("GET", "/fhir/Patient?identifier=x", "PATIENT_READ"),
    ("GET", "/fhir/Patient/abc", "PATIENT_READ"),
    ("POST", "/fhir/Encounter", "ENCOUNTER_CREATE"),
    ("GET", "/fhir/Encounter/abc", "ENCOUNTER_READ"),
    ("GET", "/fhir/Encounter?subject=Patient/abc", "ENCOUNTER_READ"),
    ("POST", "/fhir/CommunicationRequest/$send-to-ehr", "SEND_TO_EHR"),
    ("GET", "/fhir/CommunicationRequest/$tracking?transaction-id=x", "SEND_TO_EHR"),
]


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
def test_no_token_is_401(eng: Running, method: str, path: str, scope: str) -> None:
    r = httpx.request(method, eng.base + path, json={})
    assert "Bearer" in r.headers["www-authenticate"]
    assert "Authorization" in _outcome(r, 401)


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
def test_unknown_token_is_401(eng: Running, method: str, path: str, scope: str) -> None:
    r = httpx.request(
        method,
        eng.base + path,
        json={},
        headers={"Authorization": "Bearer not-a-known-token-at-all"},
    )
    assert "not valid" in _outcome(r, 401)


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
def test_missing_scope_is_403(eng: Running, method: str, path: str, scope: str) -> None:
    if scope == "PATIENT_READ":
        return  # the limited token has exactly this scope: checked in the next test
    r = httpx.request(
        method, eng.base + path, json={}, headers={"Authorization": f"Bearer {LIMITED_TOKEN}"}
    )
    assert scope in _outcome(r, 403)


def test_limited_token_reads_patients(eng: Running, people: dict[str, str]) -> None:
    r = httpx.get(
        f"{eng.base}/fhir/Patient/{people['patient']}",
        headers={"Authorization": f"Bearer {LIMITED_TOKEN}"},
    )
    assert r.status_code == 200


# -- directory --------------------------------------------------------------------------------
def test_patient_round_trip_and_search(eng: Running, people: dict[str, str]) -> None:
    r = eng.http.get(f"/fhir/Patient/{people['patient']}")
    assert r.status_code == 200
    patient = Patient.model_validate(r.json())
    assert patient.name[0].family == "Bernard"
    for query in ("urn:oid:1.2.250.1.999.1|IPP-1", "IPP-1"):
        bundle = eng.http.get("/fhir/Patient", params={"identifier": query}).json()
        Bundle.model_validate(bundle)
        assert bundle["type"] == "searchset" and bundle["total"] == 1
        assert bundle["entry"][0]["resource"]["id"] == people["patient"]
    none = eng.http.get("/fhir/Patient", params={"identifier": "other-system|IPP-1"}).json()
    assert none["total"] == 0


def test_encounter_round_trip_and_search(eng: Running, people: dict[str, str]) -> None:
    r = eng.http.get(f"/fhir/Encounter/{people['encounter']}")
    Encounter.model_validate(r.json())
    bundle = eng.http.get(
        "/fhir/Encounter", params={"subject": f"Patient/{people['patient']}"}
    ).json()
    Bundle.model_validate(bundle)
    assert [e["resource"]["id"] for e in bundle["entry"]] == [people["encounter"]]


def test_unknown_patient_is_404(eng: Running) -> None:
    assert "not known" in _outcome(eng.http.get("/fhir/Patient/nope"), 404)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"resourceType": "Patient", "birthDate": "1990-13-01", "name": [{"family": "X"}]},
            "Patient.birthDate",
        ),
        ({"resourceType": "Patient", "gender": "f", "name": [{"family": "X"}]}, "Patient.gender"),
        ({"resourceType": "Observation"}, "Patient resource"),
        (
            {
                "resourceType": "Patient",
                "name": [{"family": "X"}],
                "managingOrganization": {"reference": "Hospital/1"},
            },
            "managingOrganization",
        ),
    ],
)
def test_bad_patient_is_400(eng: Running, body: dict[str, Any], expected: str) -> None:
    assert expected in _outcome(eng.post("/fhir/Patient", body), 400)


def test_an_encounter_time_that_is_no_calendar_time_is_400(
    eng: Running, people: dict[str, str]
) -> None:
    body = {
        "resourceType": "Encounter",
        "status": "planned",
        "class": {"code": "AMB"},
        "subject": {"reference": f"Patient/{people['patient']}"},
        "period": {"start": "2024-02-30T10:00:00Z"},
    }
    assert "Encounter.period.start" in _outcome(eng.post("/fhir/Encounter", body), 400)


def test_encounter_of_unknown_patient_is_422(eng: Running) -> None:
    body = {
        "resourceType": "Encounter",
        "status": "planned",
        "class": {"code": "AMB"},
        "subject": {"reference": "Patient/ghost"},
    }
    assert _outcome(eng.post("/fhir/Encounter", body), 422) == (
        "Resource contains reference to Patient/ghost but this resource is not valid"
    )


# -- $send-to-ehr refusals --------------------------------------------------------------------
def _refused(eng: Running, body: Any, status: int, **kw: Any) -> str:
    before_docs, before_ehr = eng.document_count(), len(eng.ehr.received)
    if isinstance(body, (bytes, str)):
        r = eng.http.post(
            "/fhir/CommunicationRequest/$send-to-ehr",
            content=body,
            headers={"Content-Type": "application/fhir+json"},
        )
    else:
        r = eng.post("/fhir/CommunicationRequest/$send-to-ehr", body)
    diagnostics = _outcome(r, status)
    assert eng.document_count() == before_docs, "a refused document was stored"
    assert len(eng.ehr.received) == before_ehr, "a refused document was delivered"
    return diagnostics


def test_unknown_patient_reference_is_the_seed_422(eng: Running) -> None:
    d = _refused(eng, send_parameters("missing", None, pdf_bytes(100)), 422)
    assert d == "Resource contains reference to Patient/missing but this resource is not valid"


def test_malformed_patient_reference_is_422(eng: Running) -> None:
    body = send_parameters(None, None, pdf_bytes(100))
    body["parameter"].insert(0, {"name": "subject", "valueReference": {"reference": "Patient?x=1"}})
    d = _refused(eng, body, 422)
    assert d == "Resource contains reference to Patient?x=1 but this resource is not valid"


def test_unknown_encounter_reference_is_the_seed_422(eng: Running, people: dict[str, str]) -> None:
    d = _refused(eng, send_parameters(people["patient"], "nope", pdf_bytes(100)), 422)
    assert d == "Resource contains reference to Encounter/nope but this resource is not valid"


def test_encounter_of_another_patient_is_422(eng: Running, people: dict[str, str]) -> None:
    d = _refused(
        eng, send_parameters(people["patient"], people["other_encounter"], pdf_bytes(100)), 422
    )
    assert "does not belong" in d


@pytest.mark.parametrize(
    ("build", "status", "expected"),
    [
        (lambda p: send_parameters(p, None, None), 400, "'payload' is required"),
        (
            lambda p: {
                **send_parameters(p, None, None),
                "parameter": [
                    {"name": "subject", "valueReference": {"reference": f"Patient/{p}"}},
                    {"name": "payload", "valueString": "not base64!!"},
                ],
            },
            400,
            "not valid base64",
        ),
        (
            lambda p: send_parameters(p, None, pdf_bytes(100), content_type="application/zip"),
            422,
            "'application/zip' is not supported",
        ),
        (
            lambda p: send_parameters(p, None, PNG),
            422,
            "does not match content-type application/pdf",
        ),
        (
            lambda p: send_parameters(p, None, pdf_bytes(100), content_type="image/png"),
            422,
            "it looks like application/pdf",
        ),
        (lambda p: send_parameters(p, None, JPEG, content_type="image/png"), 422, "image/jpeg"),
        (lambda p: send_parameters(p, None, pdf_bytes(100), sender_identifier="1234"), 422, "RPPS"),
        (lambda p: send_parameters(p, None, pdf_bytes(100), document_type="11488-5"), 422, "LOINC"),
        (
            lambda p: send_parameters(p, None, pdf_bytes(100), colour="blue"),
            400,
            "unknown parameter",
        ),
        (lambda p: send_parameters(p, None, pdf_bytes(100 * 1024)), 413, "limit"),
        (lambda p: {"resourceType": "Patient"}, 400, "Parameters"),
        (
            lambda p: {"resourceType": "Parameters", "parameter": [{"name": ["subject"]}]},
            400,
            "unknown parameter",
        ),
    ],
)
def test_bad_input_is_refused(
    eng: Running, people: dict[str, str], build: Any, status: int, expected: str
) -> None:
    assert expected in _refused(eng, build(people["patient"]), status)


def test_body_not_json_is_400(eng: Running) -> None:
    assert "not valid JSON" in _refused(eng, b"{this is not json", 400)


def test_oversized_body_is_413_without_reading_it_all(eng: Running) -> None:
    assert "limit" in _refused(eng, b"{" + b" " * (200 * 1024), 413)


# -- accepted variants ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "payload", "obx_type"),
    [
        ("image/png", PNG, "IM^PNG"),
        ("image/jpeg", JPEG, "IM^JPEG"),
        ("application/txt", "Compte rendu: RAS, état stable.\n".encode(), "TEXT^PLAIN"),
    ],
)
def test_other_content_types_are_delivered(
    eng: Running, people: dict[str, str], content_type: str, payload: bytes, obx_type: str
) -> None:
    r = eng.send(people["patient"], people["encounter"], payload, content_type=content_type)
    assert r.status_code == 200, r.text
    txid = r.json()["parameter"][1]["valueString"]
    eng.wait_status(txid, {"completed"})
    message = next(m for m in eng.ehr.received if f"|{txid}|".encode() in m).decode()
    obx = next(s for s in message.split("\r") if s.startswith("OBX|"))
    assert f"^{obx_type}^Base64^" in obx
    assert base64.b64decode(obx.split("|")[5].split("^")[4]) == payload


def test_defaults_of_the_seed(eng: Running, people: dict[str, str]) -> None:
    """content-type application/pdf, document-type 11488-4, the title nomenclature, app sender."""
    r = eng.send(people["patient"], None, pdf_bytes(300))
    assert r.status_code == 200, r.text
    txid = r.json()["parameter"][1]["valueString"]
    eng.wait_status(txid, {"completed"})
    message = next(m for m in eng.ehr.received if f"|{txid}|".encode() in m).decode()
    obx = next(s for s in message.split("\r") if s.startswith("OBX|")).split("|")
    assert obx[3] == f"11488-4^Bernard_Anne_19900517_11488-4_{txid}^LN"
    assert obx[5].split("^")[1:3] == ["AP", "PDF"]
    assert "test-app" in obx[16]


def test_the_seed_example_sender_is_accepted(eng: Running, people: dict[str, str]) -> None:
    body = send_parameters(
        people["patient"],
        people["encounter"],
        pdf_bytes(200),
        content_type="application/pdf",
        document_type="11488-4",
        document_title="Consentement à l'intervention",
        sender_identifier="12345678910",
    )
    r = eng.post("/fhir/CommunicationRequest/$send-to-ehr", body)
    assert r.status_code == 200, r.text
    assert base64.b64decode(body["parameter"][-1]["valueString"]).startswith(b"%PDF")
