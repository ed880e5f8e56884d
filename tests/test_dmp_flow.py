"""Seed 001 end to end: Patient (NIR), Binary, DocumentReference, CommunicationRequest, then the
DMP check, the CDA and the Communication that records the outcome.

A real engine on real sockets sends to the DMP simulator (real HTTP); every CDA the simulator
receives goes to the CI-SIS judge, and every request and answer of the flow is loaded in
fhir.resources' STU3 models, the version the seed is written in.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.STU3.binary import Binary
from fhir.resources.STU3.bundle import Bundle
from fhir.resources.STU3.communication import Communication
from fhir.resources.STU3.communicationrequest import CommunicationRequest
from fhir.resources.STU3.device import Device
from fhir.resources.STU3.documentreference import DocumentReference
from fhir.resources.STU3.operationoutcome import OperationOutcome
from fhir.resources.STU3.patient import Patient
from fhir.resources.STU3.practitioner import Practitioner
from lxml import etree
from stdnum.fr import nir

from medcourier.channels.dmp.simulator import DmpSimulator
from medcourier.engine.nir import nir_problem
from tests import cda_judge
from tests.harness import TOKEN, LoopThread, Running, pdf_bytes, running_engine

NIR = "284067512345688"
HL7 = {"h": "urn:hl7-org:v3"}
DMP_TOKEN = "dmp-only-token-0123456789"
DMP_SCOPES = [
    "BINARY_CREATE",
    "DOCUMENTREFERENCE_CREATE",
    "COMMUNICATIONREQUEST_CREATE",
    "PATIENT_CREATE",
]


def corsican(department: str, key_delta: int = 0) -> str:
    body = f"18502{department}123456"
    key = int(nir.calc_check_digits(body)) + key_delta
    return f"{body}{key % 100:02d}"


# -- the seed's bodies ---------------------------------------------------------------------------


def seed_patient(value: str = NIR, **extra: Any) -> dict[str, Any]:
    """The seed's Patient example, its placeholders filled."""
    return {
        "resourceType": "Patient",
        "meta": {
            "tag": [
                {
                    "system": "https://www.lifen.fr/default",
                    "code": "DEFAULT",
                    "display": "Default tag",
                }
            ]
        },
        "identifier": [
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": "http://lifen.fr/fhir/ValueSet/patient-identifier-type",
                            "version": "1.0",
                            "code": "NIR-OD",
                            "display": "NIR ouvrant-droit",
                        }
                    ]
                },
                "system": "http://lifen.fr/fhir/Identifier/patient-nir-od",
                "value": value,
            }
        ],
        "name": [{"family": "MARTIN", "given": ["ALICE"]}],
        "birthDate": "1984-06-12",
        "multipleBirthInteger": 1,
        **extra,
    }


def qualified_traits() -> dict[str, Any]:
    """What the DMP needs beyond the seed's mandatory fields: gender and birth place."""
    return {
        "gender": "female",
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                "valueAddress": {
                    "extension": [
                        {
                            "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/"
                            "fr-core-address-insee-code",
                            "valueCoding": {"code": "75056"},
                        }
                    ],
                    "city": "Paris",
                },
            }
        ],
    }


def seed_request(patient: str, reference: str, sender: str, device: str = "dmp") -> dict[str, Any]:
    """The seed's CommunicationRequest example, its placeholders filled."""
    return {
        "resourceType": "CommunicationRequest",
        "meta": {
            "tag": [
                {
                    "system": "http://lifen.fr/fhir/tag/processing/mode",
                    "code": "IMMEDIATE_MODE",
                    "display": "request should be treated in immediate mode",
                }
            ]
        },
        "status": "suspended",
        "priority": "routine",
        "extension": [
            {
                "url": "http://lifen.fr/fhir/StructureDefinition/communicationrequest-active-devices",
                "valueReference": {"reference": f"Device/{device}"},
            }
        ],
        "category": [
            {
                "coding": [
                    {
                        "system": "http://lifen.fr/fhir/CodeSystem/communication-category",
                        "code": "MEDICAL_REPORT",
                    }
                ]
            }
        ],
        "subject": {"reference": f"Patient/{patient}"},
        "payload": [{"contentReference": {"reference": f"DocumentReference/{reference}"}}],
        "sender": {"reference": f"Practitioner/{sender}"},
        "requester": {"agent": {"reference": "Organization/demo-hl7"}},
        "recipient": [{"reference": f"Device/{device}"}],
    }


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture()
def dmp(lt: LoopThread, tmp_path: Path) -> Iterator[DmpSimulator]:
    simulator = DmpSimulator(out_dir=tmp_path / "dmp")
    lt.run(simulator.start())
    yield simulator
    lt.run(simulator.stop())


def dmp_route(url: str) -> dict[str, Any]:
    return {
        "name": "dmp",
        "device": {"id": "dmp", "name": "DMP"},
        "format": "cda-dmp",
        "format_options": {
            "document_id_root": "1.2.250.1.999.1.1.1",
            "custodian": {"name": "CH de Test", "id_extension": "1750000000"},
        },
        "deliver": {"connector": "dmp", "url": url, "timeout": 3},
        "retry": {"max_attempts": 60, "initial_delay": 0.1, "max_delay": 0.3},
    }


@pytest.fixture()
def flow(lt: LoopThread, tmp_path: Path, dmp: DmpSimulator) -> Iterator[Flow]:
    with running_engine(
        lt,
        tmp_path,
        extra_routes=[dmp_route(dmp.url)],
        ehr_device="ehr-a",
        tokens=[{"name": "dmp-app", "token": DMP_TOKEN, "scopes": DMP_SCOPES}],
    ) as running:
        yield Flow(running, dmp)


class Flow:
    """The seed's steps over HTTP, each request and answer checked against STU3."""

    def __init__(self, running: Running, dmp: DmpSimulator) -> None:
        self.r = running
        self.dmp = dmp
        self.practitioner = self.create(
            Practitioner,
            {
                "resourceType": "Practitioner",
                "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.1", "value": "810001234567"}],
                "name": [{"family": "HOUSE", "given": ["GREGORY"]}],
            },
        )

    def create(self, model: Any, body: dict[str, Any]) -> str:
        model.model_validate(body)
        r = self.r.post(f"/fhir/{body['resourceType']}", body)
        assert r.status_code == 201, r.text
        model.model_validate(r.json())
        assert r.headers["location"].endswith(f"/fhir/{body['resourceType']}/{r.json()['id']}")
        return str(r.json()["id"])

    def binary(self, data: bytes, content_type: str = "application/pdf") -> str:
        r = self.r.http.post("/fhir/Binary", content=data, headers={"Content-Type": content_type})
        assert r.status_code == 201, r.text
        Binary.model_validate(r.json())
        return str(r.json()["id"])

    def document_reference(self, patient: str, binary: str, **extra: Any) -> dict[str, Any]:
        return {
            "resourceType": "DocumentReference",
            "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "author": [{"reference": f"Practitioner/{self.practitioner}"}],
            "indexed": "2026-11-22T10:00:00+01:00",
            "description": "Compte rendu de consultation",
            "content": [
                {"attachment": {"contentType": "application/pdf", "url": f"Binary/{binary}"}}
            ],
            **extra,
        }

    def send(self, patient_body: dict[str, Any], payload: bytes, device: str = "dmp") -> str:
        """Every step of the seed; returns the CommunicationRequest's id."""
        patient = self.create(Patient, patient_body)
        binary = self.binary(payload)
        reference = self.create(DocumentReference, self.document_reference(patient, binary))
        return self.create(
            CommunicationRequest, seed_request(patient, reference, self.practitioner, device)
        )

    def communications(self, request_id: str) -> list[dict[str, Any]]:
        r = self.r.http.get(
            "/fhir/Communication", params={"based-on": f"CommunicationRequest/{request_id}"}
        )
        assert r.status_code == 200, r.text
        Bundle.model_validate(r.json())
        found = [e["resource"] for e in r.json()["entry"]]
        for c in found:
            Communication.model_validate(c)
        return found

    def wait(self, request_id: str, statuses: set[str], timeout: float = 30) -> dict[str, Any]:
        import time

        deadline = time.monotonic() + timeout
        while True:
            found = self.communications(request_id)
            if found and all(c["status"] in statuses for c in found):
                assert len(found) == 1
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {statuses}, got {found}")
            time.sleep(0.05)


def refused(r: Any, status: int, expression: str, text: str = "") -> None:
    assert r.status_code == status, r.text
    OperationOutcome.model_validate(r.json())
    issue = r.json()["issue"][0]
    assert issue["expression"] == [expression], issue
    assert text in issue["diagnostics"], issue


# -- NIR -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        NIR,
        "1 84 06 75 123 456 88".replace(" ", "")[:13] + nir.calc_check_digits("1840675123456"),
        corsican("2A"),
        corsican("2B"),
        "2 84 06 75 123 456 88",
    ],
)
def test_valid_nirs(value: str) -> None:
    assert nir_problem(value) is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (NIR[:-2] + "89", "key"),
        (NIR[:-1], "15 characters"),
        (NIR + "1", "15 characters"),
        ("", "15 characters"),
        (corsican("2A", 1), "key"),
        (corsican("2B", -1), "key"),
        ("18502" + "2C" + "12345612", "digits"),
        ("2840675X2345688", "digits"),
        ("28406751234568A", "digits"),
    ],
)
def test_invalid_nirs(value: str, why: str) -> None:
    problem = nir_problem(value)
    assert problem is not None and why in problem


def test_the_seed_patient_is_accepted_as_it_is(flow: Flow) -> None:
    body = seed_patient()
    r = flow.r.post("/fhir/Patient", body)
    assert r.status_code == 201, r.text
    saved = r.json()
    Patient.model_validate(saved)
    assert saved["identifier"] == body["identifier"]
    assert saved["meta"]["tag"] == body["meta"]["tag"]  # the sender's tags are kept
    del body["multipleBirthInteger"]
    r = flow.r.post("/fhir/Patient", body)
    assert r.status_code == 201 and r.json()["multipleBirthInteger"] == 1  # the seed's default
    ins = seed_patient(corsican("2B"))
    ins["identifier"] = [{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": corsican("2B")}]
    assert flow.r.post("/fhir/Patient", ins).status_code == 201


@pytest.mark.parametrize(
    ("change", "expression", "text"),
    [
        (
            lambda p: p["identifier"][0].update(value=NIR[:-2] + "00"),
            "Patient.identifier[0].value",
            "key",
        ),
        (lambda p: p["identifier"][0].update(value=NIR[:14]), "Patient.identifier[0].value", "15"),
        (
            lambda p: p["identifier"][0].update(value=corsican("2A", 3)),
            "Patient.identifier[0].value",
            "key",
        ),
        (
            lambda p: p["identifier"][0].update(value="2840675A2345688"),
            "Patient.identifier[0].value",
            "digits",
        ),
        (lambda p: p["name"][0].pop("family"), "Patient.name.family", "mandatory"),
        (lambda p: p["name"][0].update(given=[]), "Patient.name.given", "mandatory"),
        (lambda p: p.pop("birthDate"), "Patient.birthDate", "mandatory"),
        (lambda p: p.update(birthDate="1984"), "Patient.birthDate", "full date"),
        (lambda p: p.update(multipleBirthInteger=0), "Patient.multipleBirthInteger", "rank"),
        (lambda p: p.update(multipleBirthInteger="1"), "Patient.multipleBirthInteger", "rank"),
    ],
)
def test_each_patient_violation_names_its_field(
    flow: Flow, change: Any, expression: str, text: str
) -> None:
    body = seed_patient()
    change(body)
    refused(flow.r.post("/fhir/Patient", body), 400, expression, text)


# -- the flow against the DMP --------------------------------------------------------------------


def cda_of(dmp: DmpSimulator, index: int = -1) -> bytes:
    stored = dmp.received[index]
    assert stored.file is not None
    return (dmp.out_dir / stored.file).read_bytes() if dmp.out_dir else b""


def test_open_dmp_the_document_is_stored_and_the_communication_completed(flow: Flow) -> None:
    payload = pdf_bytes(6000)
    request_id = flow.send(seed_patient(**qualified_traits()), payload)
    done = flow.wait(request_id, {"completed"})
    assert done["basedOn"] == [{"reference": f"CommunicationRequest/{request_id}"}]
    assert done["recipient"] == [{"reference": "Device/dmp"}]
    assert "sent" in done and "notDone" not in done
    assert len(flow.dmp.received) == 1
    cda = cda_of(flow.dmp)
    assert cda_judge.in_subprocess()(cda) == []
    root = etree.fromstring(cda, etree.XMLParser(resolve_entities=False, no_network=True))
    ins = root.xpath("h:recordTarget/h:patientRole/h:id[1]", namespaces=HL7)[0]
    assert (ins.get("root"), ins.get("extension")) == ("1.2.250.1.213.1.4.8", NIR)
    text = root.xpath("h:component/h:nonXMLBody/h:text", namespaces=HL7)[0]
    assert base64.b64decode(text.text) == payload  # the exact PDF bytes
    author = root.xpath("h:author/h:assignedAuthor/h:id", namespaces=HL7)[0]
    assert author.get("extension") == "810001234567"  # the Practitioner's RPPS
    # the request carries its transaction id; $tracking tells the same story
    cr = flow.r.http.get(f"/fhir/CommunicationRequest/{request_id}").json()
    CommunicationRequest.model_validate(cr)
    txid = next(
        i["value"] for i in cr["identifier"] if i["system"] == "urn:medcourier:transaction-id"
    )
    assert flow.r.tracking(txid)["entry"][0]["resource"]["status"] == "completed"
    one = flow.r.http.get(f"/fhir/Communication/{done['id']}")
    assert one.status_code == 200 and one.json() == done


def test_mandatory_fields_only_ends_in_error_naming_the_missing_traits(flow: Flow) -> None:
    request_id = flow.send(seed_patient(), pdf_bytes())
    failed = flow.wait(request_id, {"entered-in-error"})
    reason = failed["notDoneReason"]["text"]
    assert "gender" in reason and "birth place" in reason
    assert failed["notDone"] is True
    assert flow.dmp.received == []  # nothing reached the DMP


def test_closed_dmp_ends_in_error_with_the_reason(flow: Flow) -> None:
    flow.dmp.patients[NIR] = "closed"
    request_id = flow.send(seed_patient(**qualified_traits()), pdf_bytes())
    failed = flow.wait(request_id, {"entered-in-error"})
    assert "closed" in failed["notDoneReason"]["text"]
    assert flow.dmp.received == []


def test_unknown_dmp_ends_in_error(flow: Flow) -> None:
    flow.dmp.patients[NIR] = "unknown"
    request_id = flow.send(seed_patient(**qualified_traits()), pdf_bytes())
    failed = flow.wait(request_id, {"entered-in-error"})
    assert "no DMP" in failed["notDoneReason"]["text"]


def test_dmp_down_is_retried_then_completed_when_back(flow: Flow) -> None:
    import time

    flow.dmp.down = True
    request_id = flow.send(seed_patient(**qualified_traits()), pdf_bytes())
    deadline = time.monotonic() + 20
    while True:  # retried: the history shows failed attempts while it stays in progress
        found = flow.communications(request_id)
        notes = " ".join(n["text"] for n in found[0].get("note", [])) if found else ""
        if "attempt 2 failed" in notes:
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.05)
    assert found[0]["status"] == "in-progress"
    flow.dmp.down = False
    flow.wait(request_id, {"completed"})
    assert len(flow.dmp.received) == 1


def test_rejected_cda_ends_in_error_with_the_dmp_answer(flow: Flow) -> None:
    flow.dmp.documents = "reject"
    request_id = flow.send(seed_patient(**qualified_traits()), pdf_bytes())
    failed = flow.wait(request_id, {"entered-in-error"})
    assert "DMP refused the document" in failed["notDoneReason"]["text"]
    assert "document refused" in failed["notDoneReason"]["text"]


def test_an_ehr_route_is_a_device_too(flow: Flow) -> None:
    request_id = flow.send(seed_patient(), pdf_bytes(), device="ehr-a")
    done = flow.wait(request_id, {"completed"})
    assert done["recipient"] == [{"reference": "Device/ehr-a"}]
    assert len(flow.r.ehr.received) == 1 and flow.dmp.received == []
    devices = flow.r.http.get("/fhir/Device").json()
    assert {e["resource"]["id"] for e in devices["entry"]} == {"dmp", "ehr-a"}
    for entry in devices["entry"]:
        Device.model_validate(entry["resource"])


# -- every reference resolves, or nothing is accepted --------------------------------------------


def test_references_that_do_not_resolve_are_refused(flow: Flow) -> None:
    patient = flow.create(Patient, seed_patient(**qualified_traits()))
    binary = flow.binary(pdf_bytes())
    reference = flow.create(DocumentReference, flow.document_reference(patient, binary))
    good = seed_request(patient, reference, flow.practitioner)
    cases: list[tuple[Any, str, str]] = [
        (
            lambda b: b.update(subject={"reference": "Patient/nobody"}),
            "CommunicationRequest.subject",
            "Patient/nobody",
        ),
        (
            lambda b: b["payload"][0].update(
                contentReference={"reference": "DocumentReference/nothing"}
            ),
            "CommunicationRequest.payload[0].contentReference",
            "DocumentReference/nothing",
        ),
        (
            lambda b: b.update(sender={"reference": "Practitioner/nobody"}),
            "CommunicationRequest.sender",
            "Practitioner/nobody",
        ),
        (
            lambda b: b.update(requester={"agent": {"reference": "Organization/nowhere"}}),
            "CommunicationRequest.requester.agent",
            "Organization/nowhere",
        ),
        (
            lambda b: b.update(recipient=[{"reference": "Device/fax"}]),
            "CommunicationRequest.recipient[0]",
            "Device/fax",
        ),
        (
            lambda b: b["extension"][0].update(valueReference={"reference": "Device/fax"}),
            "CommunicationRequest.extension",
            "Device/fax",
        ),
    ]
    for change, expression, target in cases:
        body = copy.deepcopy(good)
        change(body)
        refused(flow.r.post("/fhir/CommunicationRequest", body), 422, expression, target)
    shapes: list[tuple[Any, str]] = [
        (lambda b: b.pop("recipient"), "CommunicationRequest.recipient"),
        (
            lambda b: b.update(recipient=[{"reference": "Organization/demo-hl7"}]),
            "CommunicationRequest.recipient[0]",
        ),
        (lambda b: b.pop("category"), "CommunicationRequest.category"),
        (lambda b: b.update(status="sent"), "CommunicationRequest.status"),
        (lambda b: b.pop("payload"), "CommunicationRequest.payload"),
        (lambda b: b.pop("sender"), "CommunicationRequest.sender"),
    ]
    for change, expression in shapes:
        body = copy.deepcopy(good)
        change(body)
        refused(flow.r.post("/fhir/CommunicationRequest", body), 400, expression)
    assert flow.r.document_count() == 0  # nothing was accepted
    other = flow.create(Patient, seed_patient(corsican("2A")))
    body = copy.deepcopy(good)
    body["subject"] = {"reference": f"Patient/{other}"}
    r = flow.r.post("/fhir/CommunicationRequest", body)
    assert r.status_code == 422 and "is about" in r.text
    assert flow.r.post("/fhir/CommunicationRequest", good).status_code == 201


def test_document_reference_and_binary_checks(flow: Flow) -> None:
    patient = flow.create(Patient, seed_patient())
    binary = flow.binary(pdf_bytes())
    r = flow.r.post("/fhir/DocumentReference", flow.document_reference(patient, "missing"))
    refused(r, 422, "DocumentReference.content[0].attachment.url", "Binary/missing")
    r = flow.r.post("/fhir/DocumentReference", flow.document_reference("nobody", binary))
    refused(r, 422, "DocumentReference.subject", "Patient/nobody")
    body = flow.document_reference(patient, binary)
    body["type"]["coding"][0]["code"] = "11488-5"
    refused(flow.r.post("/fhir/DocumentReference", body), 400, "DocumentReference.type.coding.code")
    body = flow.document_reference(patient, binary)
    body["content"][0]["attachment"]["contentType"] = "image/png"
    refused(
        flow.r.post("/fhir/DocumentReference", body),
        422,
        "DocumentReference.content[0].attachment.contentType",
    )
    # a Binary whose bytes are not what it says is refused; STU3 JSON Binaries are taken
    r = flow.r.http.post(
        "/fhir/Binary", content=b"\x89PNG\r\n\x1a\nxx", headers={"Content-Type": "application/pdf"}
    )
    assert r.status_code == 422 and "looks like image/png" in r.text
    r = flow.r.http.post(
        "/fhir/Binary", content=pdf_bytes(), headers={"Content-Type": "application/zip"}
    )
    refused(r, 422, "Content-Type", "not supported")
    stu3 = {
        "resourceType": "Binary",
        "contentType": "application/pdf",
        "content": base64.b64encode(pdf_bytes()).decode(),
    }
    Binary.model_validate(stu3)
    r = flow.r.post("/fhir/Binary", stu3, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    back = flow.r.http.get(f"/fhir/Binary/{r.json()['id']}")
    assert back.content == pdf_bytes() and back.headers["content-type"] == "application/pdf"
    as_json = flow.r.http.get(
        f"/fhir/Binary/{r.json()['id']}", headers={"Accept": "application/fhir+json"}
    )
    assert Binary.model_validate(as_json.json()).content == pdf_bytes()


def test_scopes_are_checked_on_each_call(flow: Flow) -> None:
    import httpx

    limited = httpx.Client(base_url=flow.r.base, headers={"Authorization": f"Bearer {DMP_TOKEN}"})
    anonymous = httpx.Client(base_url=flow.r.base)
    with limited, anonymous:
        for path in (
            "/fhir/Patient",
            "/fhir/Binary",
            "/fhir/DocumentReference",
            "/fhir/CommunicationRequest",
        ):
            r = anonymous.post(path, json={})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            OperationOutcome.model_validate(r.json())
        # the seed's four scopes are enough for the whole flow...
        patient = limited.post("/fhir/Patient", json=seed_patient(**qualified_traits()))
        assert patient.status_code == 201
        binary = limited.post(
            "/fhir/Binary", content=pdf_bytes(), headers={"Content-Type": "application/pdf"}
        )
        assert binary.status_code == 201
        reference = limited.post(
            "/fhir/DocumentReference",
            json=flow.document_reference(patient.json()["id"], binary.json()["id"]),
        )
        assert reference.status_code == 201, reference.text
        request = limited.post(
            "/fhir/CommunicationRequest",
            json=seed_request(patient.json()["id"], reference.json()["id"], flow.practitioner),
        )
        assert request.status_code == 201, request.text
        assert (
            limited.get(
                "/fhir/Communication", params={"based-on": request.json()["id"]}
            ).status_code
            == 200
        )
        # ...and nothing more
        r = limited.post(
            "/fhir/Practitioner", json={"resourceType": "Practitioner", "name": [{"family": "X"}]}
        )
        assert r.status_code == 403 and "PRACTITIONER_CREATE" in r.text
        OperationOutcome.model_validate(r.json())
    assert TOKEN != DMP_TOKEN
