"""Routes match on the hospital of the patient or encounter; the fallback takes the rest."""

from __future__ import annotations

from pathlib import Path

from medcourier.channels.mllp.simulator import EhrSimulator
from tests.harness import LoopThread, pdf_bytes, running_engine


def _route_b(port: int) -> dict[str, object]:
    return {
        "name": "ehr-b",
        "match": {"organizations": ["Organization/hosp-b"]},
        "format": "hl7v2-oru",
        "deliver": {"connector": "mllp", "host": "127.0.0.1", "port": port, "ack_timeout": 5},
    }


def test_documents_go_to_their_hospitals_route(lt: LoopThread, tmp_path: Path) -> None:
    ehr_b = EhrSimulator()
    lt.run(ehr_b.start())
    try:
        with running_engine(lt, tmp_path, extra_routes=[_route_b(ehr_b.port)]) as eng:
            b_patient = eng.patient(
                name=[{"family": "Bee"}], managingOrganization={"reference": "Organization/hosp-b"}
            )
            a_patient = eng.patient(
                name=[{"family": "Aye"}],
                managingOrganization={"reference": "Organization/demo-hl7"},
            )
            a_enc_in_b = eng.encounter(
                a_patient, serviceProvider={"reference": "Organization/hosp-b"}
            )
            nobody = eng.patient(name=[{"family": "Nowhere"}])

            only_b = eng.send(b_patient, None, pdf_bytes(200)).json()["parameter"][1]
            both = eng.send(a_patient, a_enc_in_b, pdf_bytes(200)).json()["parameter"][1]
            fallback = eng.send(nobody, None, pdf_bytes(200)).json()["parameter"][1]

            bundle = eng.wait_status(only_b["valueString"], {"completed"})
            assert [e["resource"]["recipient"][0]["display"] for e in bundle["entry"]] == ["ehr-b"]
            bundle = eng.wait_status(both["valueString"], {"completed"})
            assert sorted(e["resource"]["recipient"][0]["display"] for e in bundle["entry"]) == [
                "ehr-a",
                "ehr-b",
            ]
            bundle = eng.wait_status(fallback["valueString"], {"completed"})
            assert [e["resource"]["recipient"][0]["display"] for e in bundle["entry"]] == ["ehr-a"]
            assert len(eng.ehr.received) == 2
            assert len(ehr_b.received) == 2
    finally:
        lt.run(ehr_b.stop())


def test_a_document_no_route_takes_is_refused_and_not_stored(
    lt: LoopThread, tmp_path: Path
) -> None:
    with running_engine(lt, tmp_path, fallback=False) as eng:
        stray = eng.patient(name=[{"family": "Stray"}])
        r = eng.send(stray, None, pdf_bytes(200))
        assert r.status_code == 422
        assert "No route" in r.json()["issue"][0]["diagnostics"]
        assert eng.document_count() == 0
