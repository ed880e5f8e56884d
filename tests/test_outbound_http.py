"""The ``http`` connector against the test receiver on real sockets (plain and TLS).

Each answer a vendor API can give maps to one outcome: 2xx accepted, 4xx rejected with the
answer kept, 5xx / timeout / refused / TLS failure retried. Certificates are made by the
openssl command line for each test session (self-signed, for 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import ValidationError

from medcourier.channels.http import plugin as http_plugin
from medcourier.channels.http import receiver as receiver_module
from medcourier.channels.http.outbound import HttpOptions, HttpSender, _result
from medcourier.channels.http.receiver import JsonReceiver
from medcourier.engine.model import DeliveryResult, Outcome, Rendered
from medcourier.engine.plugins import load_plugins
from tests.harness import LoopThread, pdf_bytes, running_engine

T = TypeVar("T")
TXID = "0190f3a2b4c5d6e7f8a9"
BODY = json.dumps({"patient": {"name": "Zoé </script>"}, "content": "JVBERi0="}).encode()
TOKEN = "s3cret-token-0123456789"
EXAMPLE_TEMPLATE = Path(__file__).resolve().parents[1] / "config/templates/vendor-document.json.j2"


def rendered(data: bytes = BODY, media_type: str = "application/json") -> Rendered:
    return Rendered(data=data, media_type=media_type, filename_hint=f"{TXID}.json", message_id=TXID)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), 10))


async def send_once(options: dict[str, Any], r: Rendered | None = None) -> DeliveryResult:
    sender = HttpSender(HttpOptions.model_validate({"connector": "http", **options}))
    try:
        return await sender.deliver(r or rendered())
    finally:
        await sender.aclose()


def test_201_is_accepted_with_headers_body_and_auth(tmp_path: Path) -> None:
    async def scenario() -> tuple[DeliveryResult, JsonReceiver]:
        async with JsonReceiver(out_dir=tmp_path) as receiver:
            result = await send_once(
                {
                    "url": receiver.url,
                    "headers": {"X-Site": "CHU Sud"},
                    "auth": {"type": "bearer", "token": TOKEN},
                }
            )
        return result, receiver

    result, receiver = run(scenario)

    assert result.outcome is Outcome.ACCEPTED
    assert result.reason == "HTTP 201 Created"
    assert result.detail["status"] == 201
    assert json.loads(result.detail["body"]) == {"id": 1, "transactionId": TXID}
    (request,) = receiver.received
    assert request.method == "POST"
    assert request.body == BODY
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == TXID
    assert request.headers["x-transaction-id"] == TXID
    assert request.headers["x-site"] == "CHU Sud"
    assert receiver.documents == [json.loads(BODY)]
    assert (tmp_path / f"000001-{TXID}.json").read_bytes() == BODY


def test_basic_auth_secret_headers_and_put_to_a_templated_url() -> None:
    async def scenario() -> tuple[DeliveryResult, JsonReceiver]:
        async with JsonReceiver() as receiver:
            result = await send_once(
                {
                    "method": "put",
                    "url": receiver.url + "/{transaction_id}?site=1",
                    "auth": {"type": "basic", "username": "medcourier", "password": "pw:1"},
                    "secret_headers": {"X-Api-Key": "k-123"},
                }
            )
        return result, receiver

    result, receiver = run(scenario)

    assert result.outcome is Outcome.ACCEPTED
    (request,) = receiver.received
    assert (request.method, request.path) == ("PUT", f"/documents/{TXID}")
    assert request.headers["authorization"] == "Basic bWVkY291cmllcjpwdzox"  # medcourier:pw:1
    assert request.headers["x-api-key"] == "k-123"


def test_400_is_rejected_and_the_answer_kept() -> None:
    async def scenario() -> DeliveryResult:
        async with JsonReceiver(mode="reject") as receiver:
            return await send_once({"url": receiver.url})

    result = run(scenario)

    assert result.outcome is Outcome.REJECTED
    assert str(result.reason).startswith("HTTP 400 Bad Request: ")
    assert "simulated rejection" in str(result.reason)
    assert result.detail["status"] == 400
    assert json.loads(result.detail["body"])["error"] == "simulated rejection"


def test_a_body_the_receiver_cannot_take_is_rejected_too() -> None:
    async def scenario() -> DeliveryResult:
        async with JsonReceiver() as receiver:
            return await send_once({"url": receiver.url}, rendered(b"MSH|^~\\&", "text/plain"))

    result = run(scenario)

    assert result.outcome is Outcome.REJECTED
    assert "HTTP 415" in str(result.reason)


def test_500_is_retried() -> None:
    async def scenario() -> DeliveryResult:
        async with JsonReceiver(mode="fail") as receiver:
            return await send_once({"url": receiver.url})

    result = run(scenario)

    assert result.outcome is Outcome.RETRY
    assert str(result.reason).startswith("HTTP 500 Internal Server Error: ")
    assert result.detail["status"] == 500


def test_a_slow_answer_times_out_and_is_retried() -> None:
    async def scenario() -> tuple[DeliveryResult, float]:
        async with JsonReceiver(mode="slow", delay=5) as receiver:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await send_once({"url": receiver.url, "timeout": 0.3})
            return result, loop.time() - started

    result, elapsed = run(scenario)

    assert result.outcome is Outcome.RETRY
    assert result.reason is not None
    assert re.fullmatch(
        r"POST http://127\.0\.0\.1:\d+/documents: no answer within 0\.3 s", result.reason
    )
    assert elapsed < 2


def test_connection_refused_is_retried() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    result = run(lambda: send_once({"url": f"http://127.0.0.1:{port}/documents?key=secret"}))

    assert result.outcome is Outcome.RETRY
    assert f"POST http://127.0.0.1:{port}/documents: " in str(result.reason)
    assert "refused" in str(result.reason).lower()
    assert "secret" not in str(result.reason)  # the query string stays out of the reason


def test_a_rendering_that_cannot_go_in_headers_is_rejected_without_sending() -> None:
    result = run(
        lambda: send_once({"url": "http://127.0.0.1:9/x"}, rendered(media_type="text/plain; é"))
    )

    assert result.outcome is Outcome.REJECTED
    assert "cannot go in a header" in str(result.reason)


def test_the_sender_reuses_its_client_and_reopens_after_aclose() -> None:
    async def scenario() -> list[Outcome]:
        async with JsonReceiver() as receiver:
            sender = HttpSender(HttpOptions(url=receiver.url))
            outcomes = [(await sender.deliver(rendered())).outcome for _ in range(3)]
            await sender.aclose()
            outcomes.append((await sender.deliver(rendered())).outcome)
            await sender.aclose()
            return outcomes

    assert run(scenario) == [Outcome.ACCEPTED] * 4


@pytest.mark.parametrize(
    ("status", "headers", "outcome", "reason"),
    [
        (200, {}, Outcome.ACCEPTED, "HTTP 200 OK"),
        (204, {}, Outcome.ACCEPTED, "HTTP 204 No Content"),
        (429, {"Retry-After": "7"}, Outcome.RETRY, "HTTP 429 Too Many Requests (retry after 7 s)"),
        (408, {}, Outcome.RETRY, "HTTP 408 Request Timeout"),
        (503, {"Retry-After": "soon"}, Outcome.RETRY, "HTTP 503 Service Unavailable"),
        (401, {}, Outcome.REJECTED, "HTTP 401 Unauthorized"),
        (409, {}, Outcome.REJECTED, "HTTP 409 Conflict"),
        (
            301,
            {"Location": "https://elsewhere/"},
            Outcome.RETRY,
            "HTTP 301 Moved Permanently to https://elsewhere/: "
            "redirects are not followed, check deliver.url",
        ),
    ],
)
def test_status_classification(
    status: int, headers: dict[str, str], outcome: Outcome, reason: str
) -> None:
    result = _result(httpx.Response(status, headers=headers), "", frozenset({408, 425, 429}))

    assert (result.outcome, result.reason) == (outcome, reason)


def test_retry_statuses_can_add_4xx_codes() -> None:
    response = httpx.Response(401, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})

    result = _result(response, '{"error": "token expired"}', frozenset({401}))

    assert result.outcome is Outcome.RETRY
    assert result.detail["retry_after"] == 0.0  # a date in the past
    assert "token expired" in str(result.reason)


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed for test certificates (apt-get install openssl)")
    directory = tmp_path_factory.mktemp("certs")
    made: dict[str, Path] = {}
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=medcourier-client")):
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", subject,
                "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        made[name], made[f"{name}_key"] = cert, key
    return made


def tls_receiver(certs: dict[str, Path], client_ca: Path | None = None) -> JsonReceiver:
    return JsonReceiver(certfile=certs["server"], keyfile=certs["server_key"], client_ca=client_ca)


def test_tls_verified_against_a_ca_bundle(certs: dict[str, Path]) -> None:
    async def scenario() -> DeliveryResult:
        async with tls_receiver(certs) as receiver:
            assert receiver.url.startswith("https://")
            return await send_once({"url": receiver.url, "verify": str(certs["server"])})

    assert run(scenario).outcome is Outcome.ACCEPTED


def test_tls_verification_is_on_by_default(certs: dict[str, Path]) -> None:
    async def scenario() -> DeliveryResult:
        async with tls_receiver(certs) as receiver:
            return await send_once({"url": receiver.url})

    result = run(scenario)

    assert result.outcome is Outcome.RETRY
    assert "CERTIFICATE_VERIFY_FAILED" in str(result.reason)


def test_tls_verification_can_be_turned_off(certs: dict[str, Path]) -> None:
    async def scenario() -> DeliveryResult:
        async with tls_receiver(certs) as receiver:
            return await send_once({"url": receiver.url, "verify": "false"})

    assert run(scenario).outcome is Outcome.ACCEPTED


def test_client_certificate_for_mutual_tls(certs: dict[str, Path]) -> None:
    async def scenario() -> tuple[DeliveryResult, DeliveryResult]:
        async with tls_receiver(certs, client_ca=certs["client"]) as receiver:
            base = {"url": receiver.url, "verify": str(certs["server"])}
            without = await send_once(base)
            with_cert = await send_once(
                {
                    **base,
                    "client_cert": str(certs["client"]),
                    "client_key": str(certs["client_key"]),
                }
            )
            return without, with_cert

    without, with_cert = run(scenario)

    assert without.outcome is Outcome.RETRY
    assert with_cert.outcome is Outcome.ACCEPTED


def test_a_key_that_does_not_match_its_certificate_fails_at_load(certs: dict[str, Path]) -> None:
    with pytest.raises(ValidationError, match="cannot set up TLS"):
        HttpOptions(
            url="https://127.0.0.1/documents",
            client_cert=certs["client"],
            client_key=certs["server_key"],
        )


# --- options --------------------------------------------------------------------------------


def test_secrets_never_show_in_the_options_repr() -> None:
    options = HttpOptions.model_validate(
        {
            "url": "https://vendor.example/api",
            "auth": {"type": "basic", "username": "u", "password": "hunter2"},
            "secret_headers": {"X-Api-Key": "k-123456"},
        }
    )
    bearer = HttpOptions.model_validate(
        {"url": "https://vendor.example/api", "auth": {"type": "bearer", "token": TOKEN}}
    )

    for text in (repr(options), str(options), repr(bearer), options.model_dump_json()):
        assert "hunter2" not in text
        assert "k-123456" not in text
        assert TOKEN not in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "ftp://vendor/x"}, "http:// or https://"),
        ({"url": "/documents"}, "http:// or https://"),
        ({"url": "https://user:pw@vendor/x"}, "credentials in auth"),
        ({"method": "PATCH"}, "method"),
        ({"headers": {"Content-Type": "text/plain"}}, "media_type"),
        ({"headers": {"Bad Name": "x"}}, "not a valid header name"),
        ({"headers": {"X-A": "1\r\nX-B: 2"}}, "line break"),
        ({"headers": {"X-Site": "Hôpital"}}, "non-ASCII"),
        ({"headers": {"Authorization": "x"}, "auth": {"type": "bearer", "token": "t"}}, "not both"),
        ({"auth": {"type": "bearer", "token": ""}}, "at least 1"),
        ({"auth": {"type": "bearer", "token": "two words"}}, "printable ASCII"),
        ({"auth": {"type": "digest"}}, "does not match any of the expected tags"),
        ({"verify": "/no/such/ca.pem"}, "no CA bundle file"),
        ({"client_key": "/etc/hostname"}, "client_key needs client_cert"),
        ({"retry_statuses": [500]}, "only 4xx codes"),
        ({"timeout": 0}, "greater than 0"),
        ({"proxy": "socks://x"}, "proxy URL"),
        ({"colour": "red"}, "extra"),
    ],
)
def test_bad_options_fail_at_load(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HttpOptions.model_validate({"url": "https://vendor.example/api", **options})


# --- plugin and command ---------------------------------------------------------------------


def _plugins() -> Any:
    plugins = load_plugins()
    if "http" not in plugins.connectors:  # before pyproject lists the entry point
        plugins = load_plugins(extra=[http_plugin])
    return plugins


def test_the_plugin_registers_the_connector_and_the_command() -> None:
    plugins = _plugins()
    connector = plugins.connectors["http"]
    options = connector.options_model.model_validate(
        {"connector": "http", "url": "http://127.0.0.1:6662/documents"}
    )
    assert isinstance(connector.open(options), HttpSender)
    assert "simulate-json" in plugins.commands


def test_simulate_json_serves_until_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    receiver_module.add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--out", str(tmp_path)])

    async def scenario() -> int:
        serving = asyncio.create_task(receiver_module.run(args))
        while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # handler not installed yet
            assert not serving.done(), serving.result()
            await asyncio.sleep(0.01)
        url = capsys.readouterr().out.split("POST JSON to ")[1].split(",")[0]
        result = await send_once({"url": url})
        assert result.outcome is Outcome.ACCEPTED
        os.kill(os.getpid(), signal.SIGTERM)
        return await serving

    assert run(scenario) == 0
    out = capsys.readouterr().out
    assert f"received 000001 {TXID}" in out
    assert "stopped after 1 documents" in out
    assert [p.name for p in tmp_path.iterdir()] == [f"000001-{TXID}.json"]


# --- through the whole engine ---------------------------------------------------------------


def test_vendor_json_through_the_engine(lt: LoopThread, tmp_path: Path) -> None:
    """$send-to-ehr → json-template (the example) → http → the receiver; then a rejection."""
    receiver = JsonReceiver(out_dir=tmp_path / "received")
    lt.run(receiver.start())
    route = {
        "name": "demo-json",
        "match": {"organizations": ["Organization/demo-json"]},
        "format": "json-template",
        "format_options": {
            "template": str(EXAMPLE_TEMPLATE),
            "schema": str(EXAMPLE_TEMPLATE.with_name("vendor-document.schema.json")),
        },
        "deliver": {
            "connector": "http",
            "url": receiver.url,
            "auth": {"type": "bearer", "token": TOKEN},
        },
        "retry": {"max_attempts": 2, "initial_delay": 0.1, "max_delay": 0.1},
    }
    try:
        with running_engine(
            lt, tmp_path, extra_routes=[route], extra_plugins=_extra_plugins()
        ) as eng:
            patient = eng.patient(
                name=[{"use": "official", "family": 'O"Brien', "given": ["Zoé"]}],
                birthDate="1980-05-12",
                managingOrganization={"reference": "Organization/demo-json"},
            )
            payload = pdf_bytes(300_000)  # big enough for the worker's render thread
            txid = eng.send(patient, None, payload).json()["parameter"][1]["valueString"]
            eng.wait_status(txid, {"completed"})
            (document,) = receiver.documents
            assert document["patient"]["birthName"] == 'O"Brien'
            assert base64.b64decode(document["document"]["content"]) == payload
            assert receiver.received[0].headers["x-transaction-id"] == txid

            receiver.mode = "reject"
            txid = eng.send(patient, None, pdf_bytes(500)).json()["parameter"][1]["valueString"]
            bundle = eng.wait_status(txid, {"entered-in-error"})
            reason = bundle["entry"][0]["resource"]["statusReason"]["text"]
            assert reason.startswith("HTTP 400 Bad Request:")
            assert "simulated rejection" in reason
    finally:
        lt.run(receiver.stop())


def _extra_plugins() -> tuple[object, ...]:
    from medcourier.transforms.json_template import plugin as json_template_plugin

    loaded = load_plugins()
    wanted = {"http": http_plugin, "json-template": json_template_plugin}
    known = set(loaded.connectors) | set(loaded.formats)
    return tuple(module for name, module in wanted.items() if name not in known)


async def _raw_server(answer: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    """A bare HTTP/1.1 peer that reads one request and writes ``answer`` as is, then closes."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        seen.append(await reader.readexactly(length))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\npartia",
        b"HTTP/1.1 303 See Other\r\nLocation: /documents/42\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["2xx-cut-short", "303-see-other"],
)
def test_a_destination_that_took_the_document_is_not_sent_it_again(answer: bytes) -> None:
    async def scenario() -> tuple[Any, list[bytes]]:
        server, port, seen = await _raw_server(answer)
        sender = HttpSender(HttpOptions(url=f"http://127.0.0.1:{port}/documents"))
        try:
            result = await sender.deliver(
                Rendered(b'{"a": 1}', "application/json", "x.json", "01a200e4792dc23b0964")
            )
        finally:
            await sender.aclose()
            server.close()
            await server.wait_closed()
        return result, seen

    result, seen = asyncio.run(scenario())
    assert result.outcome is Outcome.ACCEPTED, result
    assert seen == [b'{"a": 1}']
