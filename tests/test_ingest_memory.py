"""A large document posted to $send-to-ehr is decoded where it lies in the body's buffer
(engine/api/large_json.py), and reading a body holds it once (engine/api/fhir.py).

The decoding in place must answer exactly as the plain parse does, for every body: each body
here goes through both, the plain one being the code this replaced (``json.loads``, then
``base64.b64decode(validate=True)``), and the answers (the checked request, or the refusal's
status and words) must be equal. Small windows and a small threshold put every body of the
tests through the in-place path, with escapes and padding across window boundaries.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.requests import Request

from medcourier.engine.api import fhir, large_json, resources, send_to_ehr
from medcourier.engine.api.fhir import FhirError
from tests.harness import LoopThread, Running, pdf_bytes, running_engine, send_parameters

LIMIT = 4096


# -- the plain path, as it was ------------------------------------------------------------------
def _plain_payload(value: str, limit: int) -> bytes:
    compact = "".join(value.split())
    if not compact:
        raise FhirError(
            400, "Parameter 'payload' is empty: the document in base64 is required", code="required"
        )
    if len(compact) // 4 * 3 > limit + 3:
        raise FhirError(
            413, f"The document is larger than the limit of {limit} bytes", code="too-costly"
        )
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FhirError(
            400, f"Parameter 'payload' is not valid base64: {exc}", code="invalid"
        ) from exc
    if len(data) > limit:
        raise FhirError(
            413, f"The document is larger than the limit of {limit} bytes", code="too-costly"
        )
    if not data:
        raise FhirError(400, "Parameter 'payload' decodes to an empty document", code="invalid")
    return data


def _plain(body: bytes, limit: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    if not body:
        raise FhirError(
            400, "The request body is empty: a FHIR JSON resource is expected", code="structure"
        )
    try:
        parsed = json.loads(body)
    except RecursionError as exc:
        raise FhirError(400, "The request body nests JSON too deeply", code="structure") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise FhirError(
            400, f"The request body is not valid JSON: {exc}", code="structure"
        ) from exc
    with monkeypatch.context() as m:
        m.setattr(send_to_ehr, "_payload", _plain_payload)
        return send_to_ehr.check(send_to_ehr._parameters(parsed), limit)


def _answer(run: Any) -> tuple[Any, ...]:
    try:
        return ("accepted", run())
    except FhirError as exc:
        return ("refused", exc.status, exc.diagnostics, exc.code, exc.expression)


@pytest.fixture
def in_place(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Every string of a byte or more goes the in-place way, read 7 bytes at a time; the list
    tells, per body, whether it went that way to the end."""
    monkeypatch.setattr(large_json, "MIN_SIZE", 1)
    monkeypatch.setattr(large_json, "WINDOW", 7)
    taken: list[bool] = []
    original = large_json.decode_in_place

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(send_to_ehr, "decode_in_place", spy)
    monkeypatch.setattr(resources, "decode_in_place", spy)
    yield taken


def _same(body: bytes, monkeypatch: pytest.MonkeyPatch, limit: int = LIMIT) -> tuple[Any, ...]:
    """Both answers for ``body``, checked equal; the answer."""
    plain = _answer(lambda: _plain(body, limit, monkeypatch))
    fast = _answer(lambda: send_to_ehr.read_request(io.BytesIO(body), limit))
    assert fast == plain, body[:300]
    return fast


# -- bodies ------------------------------------------------------------------------------------
PDF = pdf_bytes(1501)
B64 = base64.b64encode(PDF).decode()
SUBJECT = '{"name":"subject","valueReference":{"reference":"Patient/p1"}}'


def body_with(value: str, *, before: str = SUBJECT + ",", after: str = "") -> bytes:
    """A Parameters body whose payload's valueString is ``value``, written as is (JSON text)."""
    return (
        '{"resourceType":"Parameters","parameter":['
        f'{before}{{"name":"payload","valueString":"{value}"}}{after}]}}'
    ).encode()


def wrapped(text: str, width: int, newline: str) -> str:
    return newline.join(text[i : i + width] for i in range(0, len(text), width))


ACCEPTED = {
    "plain": B64,
    "escaped slashes": B64.replace("/", "\\/"),
    "mime lines": wrapped(B64, 76, "\\r\\n"),
    "unix lines": wrapped(B64, 64, "\\n") + "\\n",
    "spaces and tabs": wrapped(B64, 5, " ") + " \\t ",
    "leading whitespace": "\\n  \\t" + B64,
    "everything": wrapped(B64, 3, " \\r\\n\\t").replace("/", "\\/"),
    "padding split by a line": B64[:-1] + "\\n" + B64[-1:],
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_payload_variants_are_decoded_in_place(
    name: str, in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert B64.endswith("=")  # the padding crosses a window
    answer = _same(body_with(ACCEPTED[name]), monkeypatch)
    assert answer[0] == "accepted"
    assert answer[1].payload == PDF
    assert in_place == [True]


REFUSED = {
    "not base64": "not base64!!",
    "urlsafe alphabet": B64.replace("+", "-"),
    "non-ascii letter": B64[:40] + "é" + B64[40:],
    "unicode escape": "\\u0041" + B64[1:],
    "escaped backslash": B64[:10] + "\\\\" + B64[10:],
    "backspace escape": B64[:10] + "\\b" + B64[10:],
    "raw newline": B64[:10] + "\n" + B64[10:],
    "raw tab": B64[:10] + "\t" + B64[10:],
    "data after padding": B64 + "AAAA",
    "padding in the middle": B64[:8] + "==" + B64[10:],
    "triple padding": "AAA" + "====",
    "missing padding": B64.rstrip("="),
    "leading padding": "=" + B64[1:],
    "one character too many": B64 + "A",
    "empty": "",
    "whitespace only": "  \\n\\r\\t ",
    "decodes to nothing": "====",
    "not a pdf": base64.b64encode(b"GIF89a" + bytes(100)).decode(),
    "too large": base64.b64encode(pdf_bytes(LIMIT + 1)).decode(),
    "too large by its length": "A" * (LIMIT * 2),
    "a lone backslash at the end": B64[:-4] + "\\",
    "an escaped quote": B64[:20] + '\\"' + B64[20:],
}


@pytest.mark.parametrize("name", REFUSED)
def test_bad_payloads_are_refused_in_the_same_words(
    name: str, in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = _same(body_with(REFUSED[name]), monkeypatch)
    assert answer[0] == "refused"


def test_form_feed_is_whitespace_for_the_plain_path(
    in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An escape the in-place path does not read (``\\f``) leaves the body to the plain path,
    which takes it (it is whitespace to ``str.split``)."""
    answer = _same(body_with(B64[:12] + "\\f" + B64[12:]), monkeypatch)
    assert answer[0] == "accepted"
    assert answer[1].payload == PDF
    assert in_place == [False]


OTHER_BODIES = {
    "the base64 in the title": body_with(
        B64, before=SUBJECT + f',{{"name":"document-title","valueString":"{B64}x"}},'
    ),
    "the large string is a parameter name": (
        '{"resourceType":"Parameters","parameter":[' + SUBJECT + f',{{"name":"{B64}"}}]}}'
    ).encode(),
    "the large string is a key": (
        '{"resourceType":"Parameters","parameter":['
        + SUBJECT
        + f',{{"name":"payload","{B64}":"x"}}]}}'
    ).encode(),
    "the payload given twice": body_with(B64, after=f',{{"name":"payload","valueString":"{B64}"}}'),
    "valueString given twice": body_with(B64)[:-3] + b',"valueString":"QUJD"}]}',
    "the payload as a valueReference": (
        '{"resourceType":"Parameters","parameter":['
        + SUBJECT
        + f',{{"name":"payload","valueReference":{{"reference":"{B64}"}}}}]}}'
    ).encode(),
    "no subject": body_with(B64, before=""),
    "an unknown parameter after": body_with(B64, after=',{"name":"colour","valueString":"x"}'),
    "a bad reference": body_with(B64).replace(b"Patient/p1", b"Patient?x"),
    "not Parameters": body_with(B64).replace(b'"Parameters"', b'"Patient"'),
    "truncated": body_with(B64)[:-2],
    "extra data": body_with(B64) + b" {}",
    "a missing comma": body_with(B64).replace(b'"valueString":', b'"valueString" '),
    "after a closing quote": body_with(B64).replace(b'"valueString":"', b'"valueString""'),
    "inside another string": body_with(B64).replace(b'"valueString":"', b'"valueString":"x\\"'),
    "whitespace between strings": b'["a"' + b" " * 50 + b'"b"]',
    "a utf-8 bom": b"\xef\xbb\xbf" + body_with(B64),
    "two utf-8 boms": b"\xef\xbb\xbf\xef\xbb\xbf" + body_with(B64),
    "utf-16": body_with(B64).decode().encode("utf-16"),
    "utf-16-le": body_with(B64).decode().encode("utf-16-le"),
    "invalid utf-8 in a reference": body_with(B64).replace(b"Patient/p1", b"Patient/p\xff1"),
    "a truncated utf-8 sequence before the payload": body_with(B64).replace(
        b'"valueString":"', b'"valueString":"\xe2'
    ),
    "escaped title before": body_with(
        B64, before=SUBJECT + ',{"name":"document-title","valueString":"Caf\\u00e9 \\"ok\\""},'
    ),
    "nested too deeply": b"[" * 100_000 + b'"' + B64.encode() + b'"' + b"]" * 100_000,
    "a bare string": json.dumps(B64).encode(),
    "empty": b"",
    "only quotes": b'""',
    "marker-like title": body_with(
        B64, before=SUBJECT + ',{"name":"document-title","valueString":"medcourier-base64-"},'
    ),
}


@pytest.mark.parametrize("name", OTHER_BODIES)
def test_other_bodies_answer_the_same(
    name: str, in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    _same(OTHER_BODIES[name], monkeypatch)


def test_the_other_parameters_are_kept(
    in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = json.dumps(
        send_parameters(
            "p1",
            "e1",
            PDF,
            content_type="application/pdf",
            document_type="11488-4",
            document_title='Compte rendu \u00e9/"x"',
            sender_identifier="12345678910",
        )
    ).encode()
    answer = _same(body, monkeypatch)
    assert answer[0] == "accepted"
    assert (answer[1].patient_id, answer[1].encounter_id, answer[1].title) == (
        "p1",
        "e1",
        'Compte rendu \u00e9/"x"',
    )
    assert answer[1].payload == PDF
    assert in_place == [True]


@pytest.mark.parametrize("window", [1, 2, 3, 4, 5, 8, 64, 4096])
def test_any_window_gives_the_same_bytes(
    window: int, in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(large_json, "WINDOW", window)
    for value in ACCEPTED.values():
        answer = _same(body_with(value), monkeypatch)
        assert answer[1].payload == PDF
    assert all(in_place)


def _reader(raw: bytes) -> Callable[[int, int], bytes]:
    return lambda a, b: raw[a:b]


def test_strict_base64_in_windows_matches_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random short strings of base64 characters, padding and whitespace escapes: decoded in
    windows of every size, they decode (or not) as the whole does, to the same bytes."""
    rng = random.Random(20240607)
    pieces = ["A", "Q", "/", "+", "=", "==", " ", "\\n", "\\/", "\\r\\n", "AAAA", "w"]
    for _ in range(3000):
        value = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        raw = value.encode()
        text: str = json.loads(f'"{value}"')
        try:
            whole: bytes | None = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            whole = None
        monkeypatch.setattr(large_json, "WINDOW", rng.randint(1, 9))
        try:
            size: int | None = large_json._check(raw, 0, len(raw))[1]
        except large_json._Unsure:
            size = None
        parts: bytes | None = None
        if size is not None:
            quanta = large_json._quanta(_reader(raw), 0, len(raw), [0])
            parts = b"".join(large_json._a2b(characters) for characters, _ in quanta)
            assert len(parts) == size
        assert parts == whole, value


def test_random_damage_answers_the_same(
    in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Valid bodies with bytes inserted, removed or replaced at random."""
    rng = random.Random(7)
    alphabet = [b'"', b"\\", b"=", b" ", b"\n", b"/", b"A", b"{", b"}", b"[", b":", b",", b"\xe9"]
    sources = [body_with(v) for v in ACCEPTED.values()]
    for _ in range(1500):
        body = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body))
            action = rng.randrange(3)
            if action == 0:
                body[at:at] = rng.choice(alphabet)
            elif action == 1:
                del body[at]
            else:
                body[at : at + 1] = rng.choice(alphabet)
        _same(bytes(body), monkeypatch)
    assert any(in_place) and not all(in_place)


# -- FHIR Binary (JSON) ------------------------------------------------------------------------
def _plain_binary(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[str, bytes]:
    """The Binary JSON path as it was: read_json, then b64decode(validate=True)."""
    parsed = _answer(lambda: _plain(body, LIMIT, monkeypatch))  # the JSON errors only
    if parsed[0] == "refused" and parsed[1] == 400 and "JSON" in parsed[2]:
        raise FhirError(parsed[1], parsed[2], code=parsed[3])
    resource = fhir.expect_type(json.loads(body), "Binary")
    content_type = resources._binary_type(resource.get("contentType"), "Binary.contentType")
    field = "content" if "content" in resource else "data"
    encoded = resource.get(field)
    if not isinstance(encoded, str):
        raise fhir.bad_field("Binary.content", "is required: the document in base64")
    try:
        data = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise fhir.bad_field(f"Binary.{field}", f"is not valid base64: {exc}") from exc
    return content_type, data


def binary(fields: str) -> bytes:
    return ('{"resourceType":"Binary",' + fields + "}").encode()


BINARIES = {
    "stu3": binary(f'"contentType":"application/pdf","content":"{B64}"'),
    "r4": binary(f'"contentType":"application/pdf","data":"{B64}"'),
    "escaped and wrapped": binary(
        '"contentType":"application/pdf","content":"'
        + wrapped(B64, 76, "\\r\\n").replace("/", "\\/")
        + '"'
    ),
    "both fields, data large": binary(
        f'"contentType":"application/pdf","content":"","data":"{B64}"'
    ),
    "both fields, content large": binary(f'"content":"{B64}","data":"","contentType":"text/plain"'),
    "no content": binary('"contentType":"application/pdf"'),
    "invalid base64": binary(f'"contentType":"application/pdf","content":"{B64}!"'),
    "missing padding": binary(f'"contentType":"application/pdf","data":"{B64.rstrip("=")}"'),
    "whitespace only": binary('"contentType":"application/pdf","content":"' + " " * 40 + '"'),
    "unknown content type": binary(f'"contentType":"application/zip","content":"{B64}"'),
    "the large string as the content type": binary(f'"contentType":"{B64}","content":"QUJD"'),
    "not a Binary": binary(f'"contentType":"application/pdf","content":"{B64}"').replace(
        b'"Binary"', b'"Patient"'
    ),
    "content not a string": binary('"contentType":"application/pdf","content":["' + B64 + '"]'),
    "not json": binary(f'"contentType":"application/pdf","content":"{B64}"')[:-1],
}


@pytest.mark.parametrize("name", BINARIES)
def test_binary_json_answers_the_same(
    name: str, in_place: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = BINARIES[name]
    plain = _answer(lambda: _plain_binary(body, monkeypatch))
    fast = _answer(lambda: resources.read_binary_json(io.BytesIO(body)))
    assert fast == plain
    if name in ("stu3", "r4", "escaped and wrapped"):
        assert fast == ("accepted", ("application/pdf", PDF))
        assert in_place == [True]


# -- memory ------------------------------------------------------------------------------------
def test_a_large_payload_costs_no_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the body's buffer to the checked request, no more than a few windows beside it: the
    decoded document is the body's own memory."""
    document = b"%PDF-1.4\n" + random.Random(1).randbytes(12 * 1024 * 1024)
    wrapped_b64 = wrapped(base64.b64encode(document).decode(), 76, "\\r\\n").replace("/", "\\/")
    tracemalloc.start()
    try:
        buffer = io.BytesIO(body_with(wrapped_b64))
        buffer.getbuffer().release()  # its own memory now (not the bytes it was made of)
        start, _ = tracemalloc.get_traced_memory()
        assert start > len(wrapped_b64)
        tracemalloc.reset_peak()
        checked = send_to_ehr.read_request(buffer, len(document))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert checked.payload == document
    assert peak - start < min(10 * large_json.WINDOW, len(document) // 4), (peak - start) / 2**20


# -- reading the body --------------------------------------------------------------------------
def _request(chunks: list[bytes], content_length: str | None) -> Request:
    headers = [(b"content-length", content_length.encode())] if content_length is not None else []
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive)


def _read(lt: LoopThread, chunks: list[bytes], content_length: str | None, limit: int) -> Any:
    try:
        return lt.run(fhir.read_body(_request(chunks, content_length), limit))
    except FhirError as exc:
        return (exc.status, exc.diagnostics, exc.code)


TOO_LARGE = (413, "The request body is larger than the limit of 10 bytes", "too-costly")


@pytest.mark.parametrize(
    ("chunks", "content_length", "expected"),
    [
        ([b"abc", b"def"], "6", b"abcdef"),
        ([b"abc", b"def"], None, b"abcdef"),
        ([b"abc", b"def"], "10", b"abcdef"),  # declares more: no zeros left behind
        ([b"abc", b"def"], "2", b"abcdef"),  # declares less: the buffer grows
        ([b"abc", b"def"], "0", b"abcdef"),
        ([b"abc", b"", b"def"], "6", b"abcdef"),
        ([], None, b""),
        ([b""], "0", b""),
        ([b"0123456789"], "10", b"0123456789"),  # exactly the limit
        ([b"0123456789", b"x"], "10", TOO_LARGE),  # lies, and sends more than the limit
        ([b"012345", b"6789x"], None, TOO_LARGE),
        ([b"x"], "11", TOO_LARGE),  # refused on its word, before reading
        ([b"x"], "1x", b"x"),  # not a length: the limit is kept while reading
        ([b"x"], "\u00b2", b"x"),
    ],
)
def test_read_body(
    lt: LoopThread, chunks: list[bytes], content_length: str | None, expected: Any
) -> None:
    assert _read(lt, chunks, content_length, 10) == expected


def test_a_refused_declared_length_reads_nothing(lt: LoopThread) -> None:
    request = _request([b"x"], "11")
    with pytest.raises(FhirError):
        lt.run(fhir.read_body(request, 10))
    assert not request._stream_consumed


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "The request body is empty: a FHIR JSON resource is expected"),
        (b"{this is not json", None),
        (b"\xef\xbb\xbf\xef\xbb\xbf{}", None),
        (b"\xff\xfe{", None),
        (b'{"a": "\xff"}', None),
        (b"[" * 100_000, "The request body nests JSON too deeply"),
    ],
)
def test_parse_json_errors_are_those_of_json_loads(body: bytes, expected: str | None) -> None:
    with pytest.raises(FhirError) as caught:
        fhir.parse_json(io.BytesIO(body))
    if expected is None:
        with pytest.raises((ValueError, UnicodeDecodeError)) as plain:
            json.loads(body)
        expected = f"The request body is not valid JSON: {plain.value}"
    assert (caught.value.status, caught.value.diagnostics) == (400, expected)


def test_parse_json_is_json_loads() -> None:
    for body in (b'{"a": [1, 2.5, "\\u00e9"]}', b"\xef\xbb\xbf[]", '"é"'.encode("utf-16")):
        assert fhir.parse_json(io.BytesIO(body)) == json.loads(body)


# -- through the engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big(lt: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_engine(
        lt, tmp_path_factory.mktemp("ingest"), max_document_bytes=4 * 1024 * 1024
    ) as r:
        yield r


def _patient(r: Running) -> str:
    return r.patient(
        name=[{"family": "Martin", "given": ["Paul"]}],
        managingOrganization={"reference": "Organization/demo-hl7"},
    )


def test_a_large_escaped_payload_is_delivered(big: Running) -> None:
    document = pdf_bytes(3 * 1024 * 1024)
    value = wrapped(base64.b64encode(document).decode(), 76, "\\r\\n").replace("/", "\\/")
    body = body_with(value).replace(b"Patient/p1", f"Patient/{_patient(big)}".encode())
    r = big.http.post(
        "/fhir/CommunicationRequest/$send-to-ehr",
        content=body,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert r.status_code == 200, r.text
    txid = r.json()["parameter"][1]["valueString"]
    big.wait_status(txid, {"completed"})
    message = next(m for m in big.ehr.received if f"|{txid}|".encode() in m).decode()
    obx = next(s for s in message.split("\r") if s.startswith("OBX|"))
    assert base64.b64decode(obx.split("|")[5].split("^")[4]) == document


def test_a_large_invalid_payload_is_refused_as_before(
    big: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    value = base64.b64encode(pdf_bytes(2 * 1024 * 1024)).decode()
    body = body_with(value[:1000] + "!" + value[1000:]).replace(
        b"Patient/p1", f"Patient/{_patient(big)}".encode()
    )
    before = big.document_count()
    r = big.http.post(
        "/fhir/CommunicationRequest/$send-to-ehr",
        content=body,
        headers={"Content-Type": "application/fhir+json"},
    )
    assert r.status_code == 400
    expected = _answer(lambda: _plain(body, 4 * 1024 * 1024, monkeypatch))
    assert r.json()["issue"][0]["diagnostics"] == expected[2]
    assert "not valid base64: Only base64 data is allowed" in expected[2]
    assert big.document_count() == before


def test_a_chunked_body_over_the_limit_is_413(big: Running) -> None:
    """No Content-Length (chunked): the limit holds while reading."""

    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            yield b" " * 65536

    r = big.http.post(
        "/fhir/CommunicationRequest/$send-to-ehr",
        content=chunks(),
        headers={"Content-Type": "application/fhir+json"},
    )
    assert r.status_code == 413
    assert "larger than the limit" in r.json()["issue"][0]["diagnostics"]
