"""Drop folders through the whole engine: files become delivered documents or directory updates,
and leave the folder only once that is durable."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import LoopThread, eventually, pdf_bytes, running_engine


def _inbox(tmp: Path, fmt: str) -> dict[str, object]:
    return {
        "name": f"inbox-{fmt}",
        "channel": "filedrop",
        "path": str(tmp / f"inbox-{fmt}"),
        "format": fmt,
        "poll_interval": 0.1,
        "stable_for": 0.1,
    }


def test_document_with_sidecar_is_delivered_and_moved(lt: LoopThread, tmp_path: Path) -> None:
    with running_engine(lt, tmp_path, inbound=[_inbox(tmp_path, "document")]) as eng:
        pid = eng.patient(
            identifier=[{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-55"}],
            name=[{"family": "Depot", "given": ["Fichier"]}],
        )
        inbox = tmp_path / "inbox-document"
        payload = pdf_bytes(3000)
        (inbox / "cr.pdf.json").write_text(
            json.dumps(
                {
                    "patient_identifiers": [
                        {"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-55"}
                    ],
                    "type": "11506-3",
                    "title": "Note de suivi",
                    "sender": "12345678910",
                }
            )
        )
        (inbox / "cr.pdf").write_bytes(payload)
        eventually(lambda: len(eng.ehr.received) == 1, 20, "delivery to the EHR")
        message = eng.ehr.received[0].decode()
        assert "11506-3^Note de suivi^LN" in message
        # The file is moved once the engine accepted it, which the delivery may overtake.
        processed = inbox / "processed" / "cr.pdf"
        eventually(processed.exists, 20, "file processed")
        assert processed.read_bytes() == payload
        assert not (inbox / "cr.pdf").exists()
        pids = [seg for seg in message.split("\r") if seg.startswith("PID|")]
        assert "IPP-55" in pids[0]
        assert eng.engine.store.sync.find_patient([("urn:oid:1.2.250.1.999.1", "IPP-55")]) == (
            eng.engine.store.sync.get_patient(pid)
        )


def test_unknown_patient_sends_the_file_to_error_with_a_reason(
    lt: LoopThread, tmp_path: Path
) -> None:
    with running_engine(lt, tmp_path, inbound=[_inbox(tmp_path, "document")]) as eng:
        inbox = tmp_path / "inbox-document"
        (inbox / "x.pdf.json").write_text(json.dumps({"patient": "Patient/nobody"}))
        (inbox / "x.pdf").write_bytes(pdf_bytes(500))
        reason = inbox / "error" / "x.pdf.error.txt"
        eventually(reason.exists, 20, "error file")
        assert "Patient/nobody" in reason.read_text()
        assert eng.document_count() == 0


def test_hl7_file_feeds_the_directory_and_routes_documents(lt: LoopThread, tmp_path: Path) -> None:
    """An ADT then an ORU in one file: the patient appears, the document reaches the EHR."""
    with running_engine(lt, tmp_path, inbound=[_inbox(tmp_path, "hl7v2")]) as eng:
        inbox = tmp_path / "inbox-hl7v2"
        adt = (
            "MSH|^~\\&|ADT|HOSPA|MEDCOURIER|MC|20261121120000||ADT^A01^ADT_A01|A1|P|2.5\r"
            "EVN|A01|20261121120000\r"
            "PID|1||IPP-77^^^HOSPA&1.2.250.1.999.1&ISO^PI||Fichier^Anne||19750101|F\r"
            "PV1|1|I|CARDIO^101^1||||||||||||||||V-77^^^HOSPA&1.2.250.1.999.2&ISO^VN\r"
        )
        oru = (
            "MSH|^~\\&|LAB|HOSPA|MEDCOURIER|MC|20261121120500||ORU^R01^ORU_R01|O1|P|2.5\r"
            "PID|1||IPP-77^^^HOSPA&1.2.250.1.999.1&ISO^PI||Fichier^Anne||19750101|F\r"
            "OBR|1|||11502-2^Laboratory report^LN\r"
            "OBX|1|ED|11502-2^CR biologie^LN||^TEXT^PLAIN^Base64^"
            "UsOpc3VsdGF0czogbm9ybWF1eC4K||||||F\r"
        )
        (inbox / "feed.hl7").write_text(adt.replace("\r", "\n") + oru.replace("\r", "\n"))
        eventually(lambda: (inbox / "processed" / "feed.hl7").exists(), 20, "file processed")
        found = eng.http.get("/fhir/Patient", params={"identifier": "IPP-77"}).json()
        assert found["total"] == 1
        patient = found["entry"][0]["resource"]
        assert patient["managingOrganization"]["reference"] == "Organization/HOSPA"
        encounters = eng.http.get(
            "/fhir/Encounter", params={"subject": f"Patient/{patient['id']}"}
        ).json()
        assert encounters["total"] == 1
        eventually(lambda: len(eng.ehr.received) == 1, 20, "delivery")
        assert "CR biologie" in eng.ehr.received[0].decode()


def test_a_channel_with_routes_feeds_exactly_those(lt: LoopThread, tmp_path: Path) -> None:
    from medcourier.channels.mllp.simulator import EhrSimulator

    other = EhrSimulator()
    lt.run(other.start())
    route_b = {
        "name": "ehr-b",
        "match": {"organizations": ["Organization/elsewhere"]},
        "format": "hl7v2-oru",
        "deliver": {"connector": "mllp", "host": "127.0.0.1", "port": other.port},
    }
    inbox = {**_inbox(tmp_path, "document"), "routes": ["ehr-b"]}
    try:
        with running_engine(lt, tmp_path, inbound=[inbox], extra_routes=[route_b]) as eng:
            pid = eng.patient(name=[{"family": "Routed"}])
            folder = tmp_path / "inbox-document"
            (folder / "a.pdf.json").write_text(json.dumps({"patient": f"Patient/{pid}"}))
            (folder / "a.pdf").write_bytes(pdf_bytes(400))
            eventually(lambda: len(other.received) == 1, 20, "delivery on ehr-b")
            assert eng.ehr.received == []
    finally:
        lt.run(other.stop())
