"""`config/example.yaml` runs as it is: real `medcourier run` and `medcourier simulate-ehr`
processes, the README's curl path done with httpx, then a clean shutdown."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from medcourier.channels.mllp.ack import parse_ack
from medcourier.channels.mllp.framing import FrameReader, frame
from tests.harness import eventually, free_ports, pdf_bytes

ROOT = Path(__file__).resolve().parent.parent
MEDCOURIER = [sys.executable, "-m", "medcourier.engine.cli"]


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"medcourier exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


ADT = (
    "MSH|^~\\&|ADT|DEMO|MC|MC|20261121120000||ADT^A04^ADT_A01|EX-1|P|2.5\r"
    "EVN|A04\r"
    "PID|1||IPP-8^^^DEMO&1.2.250.1.999.1&ISO^PI||Martin^Paul||19700101|M\r"
    "PV1|1|O|CONSULT||||||||||||||||V-8^^^DEMO&1.2.250.1.999.2&ISO^VN\r"
)


def _send_mllp(port: int, message: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(frame(message.encode()))
        reader = FrameReader()
        while True:
            for ack in reader.feed(s.recv(65536)):
                return parse_ack(ack).code


def test_example_config_delivers_to_the_simulated_ehr(tmp_path: Path) -> None:
    http_port, ehr_port, mllp_port = free_ports(3)
    token = uuid.uuid4().hex + uuid.uuid4().hex
    env = {
        **os.environ,
        "MEDCOURIER_API_TOKEN": token,
        "MEDCOURIER_HTTP_PORT": str(http_port),
        "MEDCOURIER_DATA_DIR": str(tmp_path / "var"),
        "MEDCOURIER_INSTANCE": f"mctest-{uuid.uuid4().hex[:8]}",
        "DEMO_EHR_MLLP": f"127.0.0.1:{ehr_port}",
        "MEDCOURIER_MLLP_PORT": str(mllp_port),
    }
    env.pop("MEDCOURIER_BROKER_URL", None)
    env.pop("MEDCOURIER_STORE_URL", None)
    out = tmp_path / "ehr"
    engine_log = tmp_path / "engine.log"
    with (tmp_path / "ehr.log").open("wb") as ehr_out, engine_log.open("wb") as engine_out:
        ehr = subprocess.Popen(
            [*MEDCOURIER, "simulate-ehr", "--port", str(ehr_port), "--out", str(out)],
            env=env,
            stdout=ehr_out,
            stderr=subprocess.STDOUT,
        )
        engine = subprocess.Popen(
            [*MEDCOURIER, "run", "--config", str(ROOT / "config/example.yaml")],
            env=env,
            cwd=tmp_path,
            stdout=engine_out,
            stderr=subprocess.STDOUT,
        )
        _exercise(engine, ehr, http_port, token, out, mllp_port, tmp_path / "var" / "inbox")
    logs = engine_log.read_text()
    # no patient data in the engine's logs
    assert "Lefèvre" not in logs and "2001-09-11" not in logs and "IPP-7" not in logs
    assert '"status": "completed"' in logs


def _exercise(
    engine: subprocess.Popen[bytes],
    ehr: subprocess.Popen[bytes],
    http_port: int,
    token: str,
    out: Path,
    mllp_port: int,
    inbox: Path,
) -> None:
    try:
        base = f"http://127.0.0.1:{http_port}"
        _wait_http(f"{base}/health", engine)
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
            patient = c.post(
                "/fhir/Patient",
                json={
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-7"}],
                    "name": [{"family": "Lefèvre", "given": ["Éloïse"]}],
                    "birthDate": "2001-09-11",
                    "gender": "female",
                    "managingOrganization": {"reference": "Organization/demo-hl7"},
                },
            ).json()
            enc = c.post(
                "/fhir/Encounter",
                json={
                    "resourceType": "Encounter",
                    "status": "in-progress",
                    "class": {"code": "AMB"},
                    "subject": {"reference": f"Patient/{patient['id']}"},
                    "serviceProvider": {"reference": "Organization/demo-hl7"},
                },
            ).json()
            payload = pdf_bytes(4096)
            r = c.post(
                "/fhir/CommunicationRequest/$send-to-ehr",
                json={
                    "resourceType": "Parameters",
                    "parameter": [
                        {
                            "name": "subject",
                            "valueReference": {"reference": f"Patient/{patient['id']}"},
                        },
                        {
                            "name": "context",
                            "valueReference": {"reference": f"Encounter/{enc['id']}"},
                        },
                        {"name": "payload", "valueString": base64.b64encode(payload).decode()},
                    ],
                },
            )
            assert r.status_code == 200, r.text
            tracking_url = r.json()["parameter"][0]["valueString"]
            assert tracking_url.startswith(base)

            def completed() -> bool:
                bundle = c.get(tracking_url).json()
                return bool(bundle["entry"][0]["resource"]["status"] == "completed")

            eventually(completed, 20, "completed status")
        files = list(out.glob("*.hl7"))
        assert len(files) == 1
        assert "Lefèvre".encode() in files[0].read_bytes()

        # the example's MLLP listener takes ADT into the directory
        assert _send_mllp(mllp_port, ADT) == "AA"
        with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
            found = c.get("/fhir/Patient", params={"identifier": "IPP-8"}).json()
            assert found["total"] == 1
        # and its inbox takes a document with a sidecar naming that patient
        (inbox / "cr.pdf.json").write_text(
            '{"patient_identifiers": [{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-8"}]}'
        )
        (inbox / "cr.pdf").write_bytes(pdf_bytes(1000))
        eventually(lambda: len(list(out.glob("*.hl7"))) == 2, 20, "inbox document delivered")
        # moved once accepted, which the delivery may overtake
        eventually((inbox / "processed" / "cr.pdf").exists, 20, "inbox document moved")
    finally:
        engine.send_signal(signal.SIGTERM)
        ehr.send_signal(signal.SIGTERM)
        assert engine.wait(20) == 0
        ehr.wait(20)
