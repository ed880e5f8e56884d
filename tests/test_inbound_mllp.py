"""MLLP in, through the whole engine, driven by a client nobody here wrote (python-hl7's).

ADT feeds the directory; ORU carrying a document is routed to the hospital's EHR; a resent
message is ACKed and not processed twice; a bad message gets AE with ERR and the connection
stays usable; a document posted over HTTP for a patient admitted over ADT routes to that hospital.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.mllp import open_hl7_connection

from medcourier.channels.mllp.simulator import EhrSimulator
from tests.harness import LoopThread, Running, eventually, pdf_bytes, running_engine
from tests.services import fresh_postgres_url

ADT_A01 = (
    "MSH|^~\\&|ADT|HOSPA|MEDCOURIER|MC|20261121120000||ADT^A01^ADT_A01|{cid}|P|2.5|||||FRA|"
    "UNICODE UTF-8\r"
    "EVN|A01|20261121120000\r"
    "PID|1||IPP-900^^^HOSPA&1.2.250.1.999.1&ISO^PI||Lévêque\\S\\Test^Hélène||19620314|F\r"
    "PV1|1|I|CARDIO^12^A||||||||||||||||V-900^^^HOSPA&1.2.250.1.999.2&ISO^VN|||||||||||||||||||"
    "||||||20261121115500\r"
)


def oru(cid: str, payload: bytes) -> str:
    data = base64.b64encode(payload).decode()
    return (
        f"MSH|^~\\&|LAB|HOSPA|MEDCOURIER|MC|20261121121000||ORU^R01^ORU_R01|{cid}|P|2.5"
        "|||||FRA|UNICODE UTF-8\r"
        "PID|1||IPP-900^^^HOSPA&1.2.250.1.999.1&ISO^PI||Lévêque^Hélène||19620314|F\r"
        "PV1|1|I|CARDIO||||||||||||||||V-900^^^HOSPA&1.2.250.1.999.2&ISO^VN\r"
        "OBR|1|||11502-2^Laboratory report^LN\r"
        f"OBX|1|ED|11502-2^Bilan^LN||^AP^PDF^Base64^{data}||||||F|||||"
        "10003999999^^^^^^^^RPPS&1.2.250.1.71.4.2.1&ISO\r"
    )


def _hospa_route(port: int) -> dict[str, Any]:
    return {
        "name": "hospa",
        "match": {"organizations": ["Organization/HOSPA"]},
        "format": "hl7v2-oru",
        "deliver": {"connector": "mllp", "host": "127.0.0.1", "port": port, "ack_timeout": 5},
    }


@pytest.fixture
def eng(lt: LoopThread, tmp_path: Path, hospa: EhrSimulator) -> Iterator[Running]:
    listener = {"name": "hl7-in", "channel": "mllp", "host": "127.0.0.1", "port": 0}
    with running_engine(
        lt, tmp_path, inbound=[listener], extra_routes=[_hospa_route(hospa.port)]
    ) as running:
        yield running


def _port(eng: Running) -> int:
    return int(eng.engine.inbound[0].port)  # type: ignore[attr-defined]


async def _exchange(port: int, messages: list[str]) -> list[hl7.Message]:
    """Send each message on one connection with python-hl7's client; return the ACKs."""
    reader, writer = await open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    acks = []
    try:
        for text in messages:
            writer.writemessage(hl7.parse(text))
            await writer.drain()
            acks.append(await asyncio.wait_for(reader.readmessage(), 20))
    finally:
        writer.close()
        await writer.wait_closed()
    return acks


def _msa(ack: hl7.Message) -> tuple[str, str]:
    msa = ack.segment("MSA")
    return str(msa[1]), str(msa[2])


def test_adt_feeds_the_directory_and_oru_reaches_the_hospitals_ehr(
    lt: LoopThread, eng: Running, hospa: EhrSimulator
) -> None:
    payload = pdf_bytes(5000)
    acks = lt.run(_exchange(_port(eng), [ADT_A01.format(cid="ADT-1"), oru("ORU-1", payload)]))
    assert [_msa(a) for a in acks] == [("AA", "ADT-1"), ("AA", "ORU-1")]

    found = eng.http.get("/fhir/Patient", params={"identifier": "IPP-900"}).json()
    assert found["total"] == 1
    patient = found["entry"][0]["resource"]
    assert patient["name"][0]["family"] == "Lévêque^Test"
    assert patient["managingOrganization"] == {"reference": "Organization/HOSPA"}
    visits = eng.http.get("/fhir/Encounter", params={"subject": f"Patient/{patient['id']}"})
    assert [e["resource"]["class"]["code"] for e in visits.json()["entry"]] == ["IMP"]

    eventually(lambda: len(hospa.received) == 1, 20, "delivery to the hospital's EHR")
    message = hospa.received[0].decode()
    obx = next(s for s in message.split("\r") if s.startswith("OBX|")).split("|")
    assert base64.b64decode(obx[5].split("^")[4]) == payload
    assert obx[16].startswith("10003999999^")
    assert eng.ehr.received == []  # the fallback route took nothing


def test_a_resent_message_is_acked_and_not_processed_twice(
    lt: LoopThread, eng: Running, hospa: EhrSimulator
) -> None:
    port = _port(eng)
    lt.run(_exchange(port, [ADT_A01.format(cid="ADT-2")]))
    first = lt.run(_exchange(port, [oru("ORU-2", pdf_bytes(800))]))
    again = lt.run(_exchange(port, [oru("ORU-2", pdf_bytes(800))]))
    assert _msa(first[0]) == _msa(again[0]) == ("AA", "ORU-2")
    eventually(lambda: len(hospa.received) == 1, 20, "delivery")
    assert eng.document_count() == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_resent_adt_is_a_duplicate_whatever_it_says_now(
    lt: LoopThread, tmp_path: Path, backend: str
) -> None:
    """The dedupe check of an ADT is part of its directory write: a resend, even changed or now
    wrong, is answered AA as a duplicate and applies nothing; another control id applies."""
    ipp = f"IPP-{uuid.uuid4().hex[:10]}"
    first = ADT_A01.format(cid=f"{ipp}-1").replace("IPP-900", ipp)
    changed = first.replace("Lévêque\\S\\Test", "Changed")
    wrong = first.replace(f"PID|1||{ipp}^^^HOSPA&1.2.250.1.999.1&ISO^PI||", "PID|1||||")
    other = changed.replace(f"|{ipp}-1|", f"|{ipp}-2|")
    assert len({first, changed, wrong, other}) == 4
    listener = {"name": "hl7-in", "channel": "mllp", "host": "127.0.0.1", "port": 0}
    store = fresh_postgres_url() if backend == "postgresql" else None
    with running_engine(lt, tmp_path, inbound=[listener], store=store) as eng:
        acks = lt.run(_exchange(_port(eng), [first, changed, wrong]))
        assert [_msa(a) for a in acks] == [("AA", f"{ipp}-1")] * 3
        texts = [str(a.segment("MSA")[3]) for a in acks]
        assert texts == ["", "duplicate of an accepted message", "duplicate of an accepted message"]

        def patient() -> dict[str, Any]:
            found = eng.http.get("/fhir/Patient", params={"identifier": ipp}).json()
            assert found["total"] == 1
            resource: dict[str, Any] = found["entry"][0]["resource"]
            return resource

        assert patient()["name"][0]["family"] == "Lévêque^Test"
        assert patient()["meta"]["versionId"] == "1"
        (ack,) = lt.run(_exchange(_port(eng), [other]))
        assert _msa(ack) == ("AA", f"{ipp}-2")
        assert patient()["name"][0]["family"] == "Changed"
        assert patient()["meta"]["versionId"] == "2"


def test_a_bad_message_gets_ae_with_err_and_the_connection_stays_usable(
    lt: LoopThread, eng: Running
) -> None:
    no_ipp = ADT_A01.format(cid="BAD-1").replace(
        "PID|1||IPP-900^^^HOSPA&1.2.250.1.999.1&ISO^PI||", "PID|1||||"
    )
    acks = lt.run(_exchange(_port(eng), [no_ipp, ADT_A01.format(cid="GOOD-1")]))
    assert _msa(acks[0]) == ("AE", "BAD-1")
    err = acks[0].segment("ERR")
    assert "PID" in str(err[2]) and "3" in str(err[2])
    assert _msa(acks[1]) == ("AA", "GOOD-1")


def test_unsupported_trigger_is_rejected_with_ar(lt: LoopThread, eng: Running) -> None:
    a02 = ADT_A01.format(cid="TR-1").replace("ADT^A01^ADT_A01", "ADT^A02^ADT_A02")
    acks = lt.run(_exchange(_port(eng), [a02]))
    assert _msa(acks[0]) == ("AR", "TR-1")


def test_http_document_for_an_adt_patient_routes_to_that_hospital(
    lt: LoopThread, eng: Running, hospa: EhrSimulator
) -> None:
    lt.run(_exchange(_port(eng), [ADT_A01.format(cid="ADT-3")]))
    patient = eng.http.get("/fhir/Patient", params={"identifier": "IPP-900"}).json()
    pid = patient["entry"][0]["resource"]["id"]
    r = eng.send(pid, None, pdf_bytes(900))
    assert r.status_code == 200, r.text
    txid = r.json()["parameter"][1]["valueString"]
    bundle = eng.wait_status(txid, {"completed"})
    assert [e["resource"]["recipient"][0]["display"] for e in bundle["entry"]] == ["hospa"]
    assert len(hospa.received) == 1


def test_a_message_with_one_bad_document_queues_none_of_them(
    lt: LoopThread, eng: Running, hospa: EhrSimulator
) -> None:
    """Refused as a whole (AE naming the OBX), so the corrected resend delivers each once."""
    good = oru("MULTI-1", pdf_bytes(500))
    not_a_pdf = base64.b64encode(b"this is not a PDF").decode()
    two = good + f"OBX|2|ED|11502-2^Bilan^LN||^AP^PDF^Base64^{not_a_pdf}||||||F\r"
    acks = lt.run(_exchange(_port(eng), [ADT_A01.format(cid="ADT-M"), two]))
    assert _msa(acks[1]) == ("AE", "MULTI-1")
    assert "OBX" in str(acks[1].segment("ERR")[2])
    assert eng.document_count() == 0
    assert hospa.received == []
