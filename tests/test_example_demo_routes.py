"""The example config's demo hospitals, end to end with real processes: change the patient's
organization and the same document leaves as vendor JSON over HTTP or as HPRIM files."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from medcourier.transforms.hprim.reader import parse_hprim
from tests import cda_judge
from tests.harness import eventually, free_ports, pdf_bytes

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "medcourier.engine.cli"]


class Demo:
    ehr_port: int

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # drawn together: the engine's HTTP port once came out equal to the DMP simulator's
        self.http_port, self.json_port, self.dmp_port, self.ehr_port, mllp_port = free_ports(5)
        self.token = uuid.uuid4().hex * 2
        self.data = tmp / "var"
        self.env = {
            **os.environ,
            "MEDCOURIER_API_TOKEN": self.token,
            "MEDCOURIER_HTTP_PORT": str(self.http_port),
            "MEDCOURIER_MLLP_PORT": str(mllp_port),
            "MEDCOURIER_DATA_DIR": str(self.data),
            "MEDCOURIER_INSTANCE": f"mcdemo-{uuid.uuid4().hex[:8]}",
            "DEMO_EHR_MLLP": f"127.0.0.1:{self.ehr_port}",
            "DEMO_JSON_URL": f"http://127.0.0.1:{self.json_port}/documents",
            "DEMO_DMP_URL": f"http://127.0.0.1:{self.dmp_port}",
        }
        for var in ("MEDCOURIER_BROKER_URL", "MEDCOURIER_STORE_URL"):
            self.env.pop(var, None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.base = f"http://127.0.0.1:{self.http_port}"

    def start(self, *args: str) -> None:
        log = (self.tmp / f"{args[0]}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                [*CLI, *args], env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT
            )
        )
        log.close()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, timeout=30, headers={"Authorization": f"Bearer {self.token}"}
        )

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(30)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One engine and its simulators for the module's tests (starting them took 5.5 s a test):
    each test sends to an organization of its own and reads only what that sent."""
    tmp_path = tmp_path_factory.mktemp("demo")
    d = Demo(tmp_path)
    d.start("simulate-json", "--port", str(d.json_port), "--out", str(tmp_path / "json"))
    d.start("simulate-ehr", "--port", str(d.ehr_port), "--out", str(tmp_path / "ehr"))
    d.start("simulate-dmp", "--port", str(d.dmp_port), "--out", str(tmp_path / "dmp"))
    try:
        d.start("run", "--config", str(ROOT / "config/example.yaml"))
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{d.base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.1)
        yield d
    finally:  # the simulators too, when the engine did not start
        d.stop()


def _send(
    c: httpx.Client, organization: str, payload: bytes, fields: dict[str, Any] | None = None
) -> str:
    fields = fields or {
        "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": f"IPP-{organization}"}],
        "name": [{"use": "official", "family": 'Bérénice "Démo"', "given": ["Ève"]}],
        "birthDate": "1990-01-02",
        "gender": "female",
    }
    patient = c.post(
        "/fhir/Patient",
        json={
            "resourceType": "Patient",
            **fields,
            "managingOrganization": {"reference": f"Organization/{organization}"},
        },
    ).json()
    r = c.post(
        "/fhir/CommunicationRequest/$send-to-ehr",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subject", "valueReference": {"reference": f"Patient/{patient['id']}"}},
                {"name": "sender-identifier", "valueString": "12345678910"},
                {"name": "payload", "valueString": base64.b64encode(payload).decode()},
            ],
        },
    )
    assert r.status_code == 200, r.text
    txid: str = r.json()["parameter"][1]["valueString"]

    def done() -> bool:
        bundle: dict[str, Any] = c.get(
            "/fhir/CommunicationRequest/$tracking", params={"transaction-id": txid}
        ).json()
        status = bundle["entry"][0]["resource"]["status"]
        assert status != "entered-in-error", json.dumps(bundle["entry"][0]["resource"])
        return bool(status == "completed")

    eventually(done, 30, f"{organization} delivery completed")
    return txid


def test_demo_json_posts_the_vendor_document(demo: Demo) -> None:
    payload = pdf_bytes(3000)
    with demo.client() as c:
        txid = _send(c, "demo-json", payload)
    received = list((demo.tmp / "json").glob(f"*{txid}*.json"))
    assert len(received) == 1
    body = json.loads(received[0].read_text(encoding="utf-8"))
    assert body["messageId"] == txid
    assert body["patient"]["birthName"] == 'Bérénice "Démo"'
    assert base64.b64decode(body["document"]["content"]) == payload


def test_demo_hprim_writes_hprim_with_its_pdf_and_ok(demo: Demo) -> None:
    payload = pdf_bytes(3000)
    with demo.client() as c:
        _send(c, "demo-hprim", payload)
    out = demo.data / "out" / "hprim"
    hpr = [p for p in out.iterdir() if p.suffix.upper() == ".HPR"]
    assert len(hpr) == 1
    assert (out / f"{hpr[0].name}.ok").exists()
    message = parse_hprim(hpr[0].read_bytes())
    text = hpr[0].read_bytes().decode("latin-1")
    assert "Bérénice" in text  # ISO-8859-1 on disk
    files = [
        f for patient in message.patients for request in patient.requests for f in request.files
    ]
    assert len(files) == 1
    assert (out / files[0].name).read_bytes() == payload


def test_demo_ans_sends_the_cda_in_an_oru_that_passes_the_ci_sis_checks(demo: Demo) -> None:
    judge = cda_judge.in_subprocess()
    example = json.loads((ROOT / "config/examples/document-ins.json").read_text())
    payload = pdf_bytes(3000)
    with demo.client() as c:
        txid = _send(c, "demo-ans", payload, example["patient"])
    messages = list((demo.tmp / "ehr").glob(f"*{txid}*.hl7"))
    assert len(messages) == 1
    segments = messages[0].read_bytes().decode("utf-8").split("\r")
    msh = segments[0].split("|")
    assert msh[16] == "FRA" and msh[20] == "2.1^CISIS_CDA_HL7_V2"
    assert "^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS" in segments[1]
    obx = next(s for s in segments if s.startswith("OBX|1|ED|")).split("|")
    assert obx[5].split("^")[1:4] == ["TEXT", "XML", "Base64"]
    cda = base64.b64decode(obx[5].split("^")[4])
    assert judge(cda) == []
    assert base64.b64encode(payload) in cda


def test_the_readme_dmp_walk_sends_the_seed_flow_to_the_simulated_dmp(demo: Demo) -> None:
    """config/examples/dmp/send-to-dmp.sh is what the README tells users to run."""
    judge = cda_judge.in_subprocess()
    pdf = ROOT / "config/examples/document.pdf"
    done = subprocess.run(
        ["sh", str(ROOT / "config/examples/dmp/send-to-dmp.sh")],
        env={**demo.env, "MEDCOURIER_URL": demo.base, "DOCUMENT": str(pdf)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Communication: completed" in done.stdout, done.stdout
    stored = list((demo.tmp / "dmp").glob("*.xml"))
    assert len(stored) == 1
    cda = stored[0].read_bytes()
    assert judge(cda) == []
    assert base64.b64encode(pdf.read_bytes()) in cda
    assert b'root="1.2.250.1.213.1.4.8" extension="284067512345688"' in cda
