"""The ``dmp`` connector against the DMP simulator, on real sockets.

The simulator runs in-process on a free port (on the session's background loop), and once as a
real ``medcourier simulate-dmp`` process. Each answer the DMP can give maps to one outcome: an
open DMP lets the delivery go on, a closed or missing one ends it, a stored document is accepted
with its DMP id, a refused one is rejected with the DMP's reason, and trouble (503, timeout,
refused connection) is retried. No reason ever carries the patient's NIR.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from medcourier.channels.dmp.connector import DmpOptions, DmpSender, _document_result
from medcourier.channels.dmp.simulator import DmpSimulator
from medcourier.engine.model import DeliveryResult, Document, Outcome, Rendered
from medcourier.engine.plugins import load_plugins
from tests.harness import LoopThread, eventually, free_port

TXID = "0190f3a2b4c5d6e7f8a9"
NIR = "284067512345688"
CLOSED_NIR = "185077512345608"
UNKNOWN_NIR = "292013198765403"
INS_NIR = "1.2.250.1.213.1.4.8"
TOKEN = "dmp-token-0123456789"


def patient(*identifiers: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": list(identifiers),
        "name": [{"use": "official", "family": "Dupont", "given": ["Zoé"]}],
        "birthDate": "1980-02-29",
        "gender": "female",
    }


def document(nir: str | None = NIR) -> Document:
    identifiers = [{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-1001"}]
    if nir is not None:
        identifiers.append({"system": f"urn:oid:{INS_NIR}", "value": nir})
    return Document(
        transaction_id=TXID,
        created_at=datetime(2024, 5, 2, 10, 30, tzinfo=UTC),
        content_type="application/pdf",
        document_type="11488-4",
        title="Compte rendu",
        payload=b"%PDF-1.4\n%%EOF\n",
        patient=patient(*identifiers),
    )


def cda(
    nir: str = NIR, root: str = INS_NIR, prolog: str = "", extension: str | None = None
) -> bytes:
    """A small CDA R2 document about ``nir`` (its INS under ``root``)."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>{prolog}
<ClinicalDocument xmlns="urn:hl7-org:v3">
  <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
  <id root="1.2.250.1.999.2" extension="{TXID}"/>
  <title>Compte rendu</title>
  <recordTarget>
    <patientRole>
      <id root="1.2.250.1.999.1" extension="IPP-1001"/>
      <id root="{root}" extension="{nir if extension is None else extension}"/>
      <patient><name><family qualifier="BR">Dupont</family><given>Zoé</given></name></patient>
    </patientRole>
  </recordTarget>
  <component>
    <nonXMLBody><text mediaType="application/pdf" representation="B64">JVBERi0xLjQK</text>
    </nonXMLBody>
  </component>
</ClinicalDocument>
""".encode()


def rendered(data: bytes | None = None, message_id: str = TXID) -> Rendered:
    return Rendered(
        data=cda() if data is None else data,
        media_type="text/xml",
        filename_hint=f"{message_id}.xml",
        message_id=message_id,
    )


def options(url: str, **more: Any) -> DmpOptions:
    return DmpOptions.model_validate({"connector": "dmp", "url": url, **more})


def precheck(lt: LoopThread, url: str, doc: Document | None = None, **more: Any) -> DeliveryResult:
    async def scenario() -> DeliveryResult:
        sender = DmpSender(options(url, **more))
        try:
            return await sender.precheck(doc or document())
        finally:
            await sender.aclose()

    return _no_nir(lt.run(scenario()))


def deliver(lt: LoopThread, url: str, *renderings: Rendered, **more: Any) -> list[DeliveryResult]:
    """Deliver each rendering in turn through one sender (one pooled client)."""

    async def scenario() -> list[DeliveryResult]:
        sender = DmpSender(options(url, **more))
        try:
            return [await sender.deliver(r) for r in renderings or (rendered(),)]
        finally:
            await sender.aclose()

    return [_no_nir(result) for result in lt.run(scenario())]


def _no_nir(result: DeliveryResult) -> DeliveryResult:
    for nir in (NIR, CLOSED_NIR, UNKNOWN_NIR):
        assert nir not in (result.reason or ""), result.reason
    return result


@pytest.fixture
def dmp(lt: LoopThread, tmp_path: Path) -> Iterator[DmpSimulator]:
    simulator = DmpSimulator(
        out_dir=tmp_path / "dmp", patients={CLOSED_NIR: "closed", UNKNOWN_NIR: "unknown"}
    )
    lt.run(simulator.start())
    try:
        yield simulator
    finally:
        lt.run(simulator.stop())


@pytest.fixture
def http(dmp: DmpSimulator) -> Iterator[httpx.Client]:
    """A plain client to the simulator, for what the connector never sends."""
    with httpx.Client(base_url=dmp.url, trust_env=False, timeout=10) as client:
        yield client


# --- options --------------------------------------------------------------------------------------


def test_options_defaults_and_a_secret_token() -> None:
    parsed = options("https://dmp.example/api/", auth={"type": "bearer", "token": TOKEN})
    assert parsed.url == "https://dmp.example/api"
    assert parsed.timeout == 30
    assert parsed.verify is True
    assert TOKEN not in repr(parsed)
    assert options("http://127.0.0.1:6663", verify="false").verify is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "ftp://dmp.example/api"}, "http:// or https://"),
        ({"url": "dmp.example/api"}, "http:// or https://"),
        ({"url": "https://user:pw@dmp.example/api"}, "credentials"),
        ({"url": "https://dmp.example/api?key=1"}, "no query"),
        ({"url": "https://dmp.example", "method": "PUT"}, "Extra inputs are not permitted"),
        ({"url": "https://dmp.example", "timeout": 0}, "greater than 0"),
        ({"url": "https://dmp.example", "verify": "/no/such/ca.pem"}, "no CA bundle file"),
        ({"url": "https://dmp.example", "auth": {"type": "bearer", "token": "a b"}}, "printable"),
        ({"url": "https://dmp.example", "connector": "http"}, "'dmp'"),
    ],
)
def test_options_refuse_bad_config(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DmpOptions.model_validate({"connector": "dmp", **fields})


def test_client_key_needs_a_certificate(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    with pytest.raises(ValidationError, match="client_key needs client_cert"):
        options("https://dmp.example", client_key=str(key))


def test_the_plugin_registers_the_connector_and_the_command() -> None:
    plugins = load_plugins()
    connector = plugins.connectors["dmp"]
    parsed = connector.options_model.model_validate(
        {"connector": "dmp", "url": "http://127.0.0.1:6663"}
    )
    assert isinstance(connector.open(parsed), DmpSender)
    assert "simulate-dmp" in plugins.commands


# --- precheck: is the patient's DMP open? ---------------------------------------------------------


def test_precheck_open_closed_and_unknown(lt: LoopThread, dmp: DmpSimulator) -> None:
    opened = precheck(lt, dmp.url)
    assert (opened.outcome, opened.reason) == (Outcome.ACCEPTED, "the patient's DMP is open")

    closed = precheck(lt, dmp.url, document(CLOSED_NIR))
    assert (closed.outcome, closed.reason) == (Outcome.REJECTED, "the patient's DMP is closed")

    unknown = precheck(lt, dmp.url, document(UNKNOWN_NIR))
    assert (unknown.outcome, unknown.reason) == (Outcome.REJECTED, "the patient has no DMP")

    dmp.default_status = "unknown"
    assert precheck(lt, dmp.url).reason == "the patient has no DMP"


def test_precheck_without_an_ins_is_rejected_before_any_request(lt: LoopThread) -> None:
    result = precheck(lt, f"http://127.0.0.1:{free_port()}", document(None))
    assert result.outcome is Outcome.REJECTED
    assert "the patient has no INS" in str(result.reason)


def test_precheck_sends_the_bearer_token(lt: LoopThread, dmp: DmpSimulator) -> None:
    dmp.token = TOKEN
    with_token = precheck(lt, dmp.url, auth={"type": "bearer", "token": TOKEN})
    assert with_token.outcome is Outcome.ACCEPTED

    without = precheck(lt, dmp.url)
    assert without.outcome is Outcome.REJECTED
    assert without.reason == "DMP refused the status check: a valid bearer token is required"


def test_precheck_retries_when_the_dmp_is_down(lt: LoopThread, dmp: DmpSimulator) -> None:
    dmp.down = True
    result = precheck(lt, dmp.url)
    assert result.outcome is Outcome.RETRY
    assert result.reason == (
        f"DMP status check at {dmp.url}: HTTP 503 Service Unavailable (retry after 1 s): "
        "the DMP is down (simulated)"
    )
    assert result.detail["retry_after"] == 1


def test_precheck_retries_a_refused_connection(lt: LoopThread) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = precheck(lt, url)
    assert result.outcome is Outcome.RETRY
    assert str(result.reason).startswith(f"DMP status check at {url}: ")
    assert "refused" in str(result.reason).lower()


def test_precheck_retries_a_dmp_slower_than_the_timeout(lt: LoopThread, dmp: DmpSimulator) -> None:
    dmp.delay = 5
    result = precheck(lt, dmp.url, timeout=0.3)
    assert result.outcome is Outcome.RETRY
    assert result.reason == f"DMP status check at {dmp.url}: no answer within 0.3 s"


def test_precheck_retries_a_wrong_url_rather_than_calling_the_dmp_missing(
    lt: LoopThread, dmp: DmpSimulator
) -> None:
    result = precheck(lt, dmp.url + "/v2")
    assert result.outcome is Outcome.RETRY
    assert "HTTP 404 Not Found without a DMP status: check deliver.url" in str(result.reason)


def test_precheck_retries_garbage(lt: LoopThread) -> None:
    """A server answering 200 with something that is not the protocol's JSON."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def serve_once() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            body = b"<html>maintenance</html>"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, sock=listener)
        async with server:
            sender = DmpSender(options(f"http://127.0.0.1:{port}"))
            try:
                result = await sender.precheck(document())
            finally:
                await sender.aclose()
        assert result.outcome is Outcome.RETRY
        assert result.reason == (
            f"DMP status check at http://127.0.0.1:{port}: HTTP 200 OK with an answer that is "
            "not JSON"
        )

    lt.run(serve_once())


# --- deliver: storing the CDA ---------------------------------------------------------------------


def test_a_document_is_stored_with_the_exact_bytes(
    lt: LoopThread, dmp: DmpSimulator, tmp_path: Path
) -> None:
    data = cda()
    (result,) = deliver(lt, dmp.url, rendered(data))

    assert result.outcome is Outcome.ACCEPTED
    (stored,) = dmp.received
    assert result.reason == f"stored in the DMP as {stored.id}"
    assert result.detail == {"status": 201, "dmp_id": stored.id}
    assert (stored.transaction_id, stored.nir, stored.size) == (TXID, NIR, len(data))
    assert [p.name for p in (tmp_path / "dmp").iterdir()] == [f"{TXID}.xml"]
    assert (tmp_path / "dmp" / f"{TXID}.xml").read_bytes() == data


def test_a_large_document_is_stored_whole(
    lt: LoopThread, dmp: DmpSimulator, tmp_path: Path
) -> None:
    """A 12 MB text node (a big PDF in nonXMLBody) is past libxml2's default limit."""
    data = cda().replace(b"JVBERi0xLjQK", b"JVBERi0xLjQK" * 1_000_000)
    (result,) = deliver(lt, dmp.url, rendered(data))
    assert result.outcome is Outcome.ACCEPTED, result.reason
    assert (tmp_path / "dmp" / f"{TXID}.xml").read_bytes() == data


def test_the_same_message_id_twice_is_stored_once(
    lt: LoopThread, dmp: DmpSimulator, tmp_path: Path
) -> None:
    first, again, other = deliver(
        lt, dmp.url, rendered(), rendered(), rendered(message_id="0190f3a2b4c5d6e7f8b0")
    )
    assert first.outcome is again.outcome is other.outcome is Outcome.ACCEPTED
    assert first.detail["dmp_id"] == again.detail["dmp_id"] != other.detail["dmp_id"]
    assert [s.transaction_id for s in dmp.received] == [TXID, "0190f3a2b4c5d6e7f8b0"]
    assert sorted(p.name for p in (tmp_path / "dmp").iterdir()) == [
        f"{TXID}.xml",
        "0190f3a2b4c5d6e7f8b0.xml",
    ]


def test_a_lost_answer_is_retried_and_the_resend_recognised(
    lt: LoopThread, dmp: DmpSimulator
) -> None:
    dmp.delay = 5
    (lost,) = deliver(lt, dmp.url, timeout=0.3)
    assert lost.outcome is Outcome.RETRY
    assert lost.reason == f"DMP document upload to {dmp.url}/documents: no answer within 0.3 s"
    eventually(lambda: len(dmp.received) == 1, timeout=5, what="the document stored")

    dmp.delay = 0
    (resent,) = deliver(lt, dmp.url)
    assert resent.outcome is Outcome.ACCEPTED
    assert resent.detail["dmp_id"] == dmp.received[0].id
    assert len(dmp.received) == 1


def test_a_refused_document_is_rejected_with_the_dmp_reason(
    lt: LoopThread, dmp: DmpSimulator
) -> None:
    dmp.documents = "reject"
    (result,) = deliver(lt, dmp.url)
    assert result.outcome is Outcome.REJECTED
    assert result.reason == (
        "DMP refused the document: document refused: the simulator was told to refuse documents"
    )
    assert result.detail == {"status": 422}
    assert dmp.received == []


def test_documents_for_a_closed_or_missing_dmp_are_rejected(
    lt: LoopThread, dmp: DmpSimulator
) -> None:
    closed, missing = deliver(
        lt,
        dmp.url,
        rendered(cda(CLOSED_NIR)),
        rendered(cda(UNKNOWN_NIR), message_id="0190f3a2b4c5d6e7f8b0"),
    )
    assert (closed.outcome, closed.reason) == (
        Outcome.REJECTED,
        "DMP refused the document: the patient's DMP is closed",
    )
    assert (missing.outcome, missing.reason, missing.detail["status"]) == (
        Outcome.REJECTED,
        "DMP refused the document: the patient has no DMP",
        404,
    )
    assert dmp.received == []


def test_a_document_is_retried_while_the_dmp_is_down(
    lt: LoopThread, dmp: DmpSimulator, tmp_path: Path
) -> None:
    dmp.down = True
    (down,) = deliver(lt, dmp.url)
    assert down.outcome is Outcome.RETRY
    assert "HTTP 503 Service Unavailable" in str(down.reason)
    assert list((tmp_path / "dmp").iterdir()) == []

    dmp.down = False
    (up,) = deliver(lt, dmp.url)
    assert up.outcome is Outcome.ACCEPTED


def test_deliver_retries_a_refused_connection(lt: LoopThread) -> None:
    (result,) = deliver(lt, f"http://127.0.0.1:{free_port()}")
    assert result.outcome is Outcome.RETRY
    assert "refused" in str(result.reason).lower()


def test_companion_files_cannot_go_to_the_dmp(lt: LoopThread, dmp: DmpSimulator) -> None:
    with_companion = Rendered(
        data=cda(),
        media_type="text/xml",
        filename_hint="x.xml",
        message_id=TXID,
        companions=(("x.pdf", b"%PDF"),),
    )
    (result,) = deliver(lt, dmp.url, with_companion)
    assert result.outcome is Outcome.REJECTED
    assert dmp.received == []


def test_a_long_error_is_cut_in_the_reason() -> None:
    request = httpx.Request("POST", "http://127.0.0.1/documents")
    answer = httpx.Response(400, json={"error": "x" * 1000}, request=request)
    result = _document_result("upload", answer, answer.content)
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "DMP refused the document: " + "x" * 300 + "…"


# --- what the simulator refuses -------------------------------------------------------------------


def _post(http: httpx.Client, body: bytes, **headers: str) -> httpx.Response:
    sent = {"Content-Type": "text/xml", "X-Transaction-Id": TXID, "Idempotency-Key": TXID}
    sent.update(headers)
    return http.post("/documents", content=body, headers={k: v for k, v in sent.items() if v})


def test_the_simulator_refuses_what_is_not_xml(http: httpx.Client, dmp: DmpSimulator) -> None:
    answer = _post(http, b"%PDF-1.4 not a CDA")
    assert answer.status_code == 422
    assert answer.json()["error"].startswith("the body is not well-formed XML")

    not_cda = _post(http, b"<Bundle xmlns='http://hl7.org/fhir'/>")
    assert not_cda.status_code == 422
    assert "not a CDA R2 document: the root element is Bundle" in not_cda.json()["error"]
    assert dmp.received == []


def test_the_simulator_refuses_a_doctype_without_expanding_it(
    http: httpx.Client, dmp: DmpSimulator, tmp_path: Path
) -> None:
    # Expanded, &nir; would give the document a valid INS; it must be refused instead.
    internal = cda(
        prolog=f'\n<!DOCTYPE ClinicalDocument [<!ENTITY nir "{NIR}">]>', extension="&nir;"
    )
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    external = cda(
        prolog=f'\n<!DOCTYPE ClinicalDocument [<!ENTITY x SYSTEM "file://{secret}">]>',
        extension="&x;",
    )
    laughs = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    bomb = cda(
        prolog=f'\n<!DOCTYPE ClinicalDocument [<!ENTITY l0 "lol">{laughs}]>', extension="&l9;"
    )

    for body in (internal, external, bomb, b"\xef\xbb\xbf<!-- a -->" + internal[38:]):
        answer = _post(http, body)
        assert answer.status_code == 422, answer.text
        assert answer.json() == {"error": "a DOCTYPE is not allowed in a CDA document"}
    assert dmp.received == []


def test_a_doctype_the_prolog_scan_misses_is_refused_after_parsing(
    http: httpx.Client, dmp: DmpSimulator
) -> None:
    internal = cda(
        prolog=f'\n<!DOCTYPE ClinicalDocument [<!ENTITY nir "{NIR}">]>', extension="&nir;"
    )
    utf16 = internal.decode().replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")
    answer = _post(http, utf16)
    assert answer.status_code == 422, answer.text
    assert answer.json() == {"error": "a DOCTYPE is not allowed in a CDA document"}
    assert dmp.received == []


def test_the_simulator_refuses_a_cda_without_a_valid_ins(
    http: httpx.Client, dmp: DmpSimulator
) -> None:
    no_ins = _post(http, cda(root="1.2.250.1.999.3"))
    assert no_ins.status_code == 422
    assert no_ins.json()["error"].startswith("the document has no INS")

    bad_key = _post(http, cda(nir=NIR[:-2] + "00"))
    assert bad_key.status_code == 422
    assert bad_key.json()["error"].startswith("the document's INS is not a valid NIR")
    assert NIR[:13] not in bad_key.text
    assert dmp.received == []


def test_the_simulator_checks_headers_type_and_size(http: httpx.Client, dmp: DmpSimulator) -> None:
    missing = _post(http, cda(), **{"X-Transaction-Id": "", "Idempotency-Key": ""})
    assert missing.status_code == 400
    assert "X-Transaction-Id" in missing.json()["error"]

    unsafe = _post(http, cda(), **{"X-Transaction-Id": "../escape", "Idempotency-Key": ""})
    assert unsafe.status_code == 400

    pdf = _post(http, cda(), **{"Content-Type": "application/pdf"})
    assert pdf.status_code == 415

    dmp.max_body_bytes = 100
    big = _post(http, cda())
    assert big.status_code == 413
    assert dmp.received == []

    bad_authority = http.get(f"/patients/{NIR}/dmp", params={"authority": "1.2.3"})
    assert bad_authority.status_code == 400


# --- runtime control ------------------------------------------------------------------------------


def test_admin_endpoints_change_behaviour_at_runtime(
    lt: LoopThread, http: httpx.Client, dmp: DmpSimulator
) -> None:
    assert precheck(lt, dmp.url).outcome is Outcome.ACCEPTED
    closing = http.put(f"/_admin/patients/{NIR}", json={"status": "closed"})
    assert closing.status_code == 200
    assert precheck(lt, dmp.url).reason == "the patient's DMP is closed"
    http.put(f"/_admin/patients/{NIR}", json={"status": "unknown"})
    assert precheck(lt, dmp.url).reason == "the patient has no DMP"
    http.put(f"/_admin/patients/{NIR}", json={"status": "open"})

    down = http.put("/_admin/behaviour", json={"down": True})
    assert down.json() == {"documents": "accept", "delay": 0.0, "down": True}
    assert precheck(lt, dmp.url).outcome is Outcome.RETRY
    assert http.get("/_admin/behaviour").json()["down"] is True  # /_admin is never down

    http.put("/_admin/behaviour", json={"down": False, "documents": "reject"})
    (refused,) = deliver(lt, dmp.url)
    assert refused.outcome is Outcome.REJECTED

    http.put("/_admin/behaviour", json={"documents": "accept", "delay": 0.5})
    assert precheck(lt, dmp.url, timeout=0.2).outcome is Outcome.RETRY
    http.put("/_admin/behaviour", json={"delay": 0})
    (stored,) = deliver(lt, dmp.url)
    assert stored.outcome is Outcome.ACCEPTED

    received = http.get("/_admin/received").json()
    assert received == [
        {
            "id": stored.detail["dmp_id"],
            "transaction_id": TXID,
            "nir": NIR,
            "size": len(cda()),
            "file": f"{TXID}.xml",
        }
    ]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"/_admin/patients/{NIR}", {"status": "half-open"}),
        (f"/_admin/patients/{NIR}", ["open"]),
        ("/_admin/behaviour", {"documents": "maybe"}),
        ("/_admin/behaviour", {"delay": -1}),
        ("/_admin/behaviour", {"down": "yes"}),
        ("/_admin/behaviour", {"slow": True}),
    ],
)
def test_admin_refuses_bad_settings(
    http: httpx.Client, dmp: DmpSimulator, path: str, body: Any
) -> None:
    before = dmp.behaviour(), dict(dmp.patients)
    answer = http.put(path, json=body)
    assert answer.status_code == 400
    assert "error" in answer.json()
    assert (dmp.behaviour(), dict(dmp.patients)) == before


def test_the_simulator_refuses_bad_settings_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown status"):
        DmpSimulator(default_status="ajar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delay"):
        DmpSimulator(delay=-1)


# --- medcourier simulate-dmp, a real process ------------------------------------------------------


def test_simulate_dmp_command(lt: LoopThread, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "dmp"
    medcourier = Path(sys.executable).with_name("medcourier")
    process = subprocess.Popen(
        [
            str(medcourier),
            "simulate-dmp",
            "--port",
            str(port),
            "--out",
            str(out),
            "--closed",
            CLOSED_NIR,
            "--unknown",
            UNKNOWN_NIR,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(lambda: _listening(port, process), timeout=20, what="simulate-dmp listening")
        url = f"http://127.0.0.1:{port}"
        assert precheck(lt, url).outcome is Outcome.ACCEPTED
        assert precheck(lt, url, document(CLOSED_NIR)).reason == "the patient's DMP is closed"
        assert precheck(lt, url, document(UNKNOWN_NIR)).reason == "the patient has no DMP"
        (result,) = deliver(lt, url)
        assert result.outcome is Outcome.ACCEPTED
        assert (out / f"{TXID}.xml").read_bytes() == cda()

        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    lines = stdout.splitlines()
    assert (
        lines[0]
        == f"simulate-dmp: DMP web service on {url} (DMPs open by default, documents accepted)"
    )
    assert lines[1] == f"stored {result.detail['dmp_id']} {TXID} {len(cda())} bytes"
    assert lines[2] == "simulate-dmp: stopped after 1 documents"
    assert NIR not in stdout + stderr


def _listening(port: int, process: subprocess.Popen[str]) -> bool:
    assert process.poll() is None, process.communicate()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
