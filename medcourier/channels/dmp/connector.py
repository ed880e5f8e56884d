"""The ``dmp`` outbound connector: check the patient's DMP, then store a CDA document in it.

The DMP web service medcourier talks to (``medcourier simulate-dmp`` plays it on one machine)
takes two requests, both under the route's ``url``:

``GET {url}/patients/{nir}/dmp?authority={oid}``
    Is this patient's DMP open? ``{nir}`` is the INS (NIR or NIA) and ``{oid}`` its authority
    (1.2.250.1.213.1.4.8 INS-NIR, .9 INS-NIA, .10/.11 their test counterparts). Answers:

    - ``200 {"ins": "<nir>", "status": "open"}``: go on (the precheck is accepted);
    - ``200 {"status": "closed"}``: rejected, "the patient's DMP is closed";
    - ``404 {"status": "unknown"}``: rejected, "the patient has no DMP";
    - 5xx, 408, 425, 429, a timeout, a refused connection, a 3xx or an answer that is not the
      JSON above: retried (the reason says which). A 404 without ``{"status": "unknown"}`` is a
      wrong URL, not a missing DMP, and is retried too;
    - any other 4xx: rejected, "DMP refused the status check: <its error>".

``POST {url}/documents``
    The body is the CDA document, byte for byte, with ``Content-Type`` the rendering's media
    type and ``Idempotency-Key`` and ``X-Transaction-Id`` both set to the message id (the
    transaction id). Sending the same message id again (a retry whose answer was lost) is
    answered like the first time, with the same document id. Answers:

    - ``201 {"id": "<DMP document id>"}`` (any 2xx): accepted, "stored in the DMP as <id>";
    - 5xx, 408, 425, 429, a timeout, a refused connection or a 3xx: retried;
    - any other 4xx: rejected, "DMP refused the document: <the answer's ``error``>" (300
      characters at most).

The engine calls :meth:`DmpSender.precheck` after validating a document and before rendering it,
then :meth:`DmpSender.deliver` with the rendering.

Reasons name what happened (status, timeout, refused connection) and never carry patient data:
the NIR travels in the status check's URL, so reasons name the service's base URL only. (httpx
logs request URLs at INFO level on its ``httpx`` logger; the engine keeps the standard library's
loggers at WARNING.)

As with the ``http`` connector: one ``httpx.AsyncClient`` per route keeps connections and TLS
sessions alive, TLS is verified by default, proxies and CA bundles are not taken from the
environment (``trust_env`` off), redirects are not followed and answers are read up to a bound.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.parse
from typing import Any, Literal

import httpx
from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from medcourier.channels.http.outbound import (
    KEPT_BODY_BYTES,
    BearerAuth,
    TlsClientOptions,
    _describe,
    _excerpt,
    _read_some,
    _retry_after,
)
from medcourier.engine.model import DeliveryResult, Document, Rendered
from medcourier.transforms.cda.dmp import patient_identity

RETRY_STATUSES = frozenset({408, 425, 429})
"""4xx answers that mean "later" rather than "never"."""

DMP_ID_CHARS = 200
"""How much of the DMP's document id goes into a reason."""

_HEADER_VALUE = re.compile(r"[\x20-\x7e]+")  # what httpx can send in a header, and no line break


class DmpOptions(TlsClientOptions):
    """The ``deliver:`` block of a route using ``connector: dmp``.

    ``url`` is the base of the DMP web service (``https://dmp.example/api``): the connector adds
    ``/patients/{nir}/dmp`` and ``/documents``. ``auth`` is ``{type: bearer, token: ...}``, a
    SecretStr that never appears in a repr, a log line or an error message. ``verify`` is true
    (the system's CAs), false (no check: tests only) or a CA bundle file that replaces them;
    ``client_cert`` / ``client_key`` authenticate medcourier with a certificate (mutual TLS).
    ``timeout`` bounds each wait for the service, ``connect_timeout`` the connection and TLS
    handshake.
    """

    model_config = ConfigDict(extra="forbid")

    connector: Literal["dmp"] = "dmp"
    url: str
    auth: BearerAuth | None = None
    timeout: float = Field(30.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a valid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("an absolute http:// or https:// URL is needed")
        if url.userinfo:
            raise ValueError("put credentials in auth, not in the URL (they would be logged)")
        if url.query or url.fragment:
            raise ValueError("the base URL takes no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tls(self) -> DmpOptions:
        """Build the TLS context now, so a bad certificate or key fails ``medcourier check``."""
        self._build_tls()
        return self


class DmpSender:
    """Talks to one DMP web service with one pooled client, created at the first request.

    After :meth:`aclose` the sender can still be used: the next request opens a new client.
    """

    def __init__(self, options: DmpOptions) -> None:
        self.options = options
        self._client: httpx.AsyncClient | None = None

    async def precheck(self, document: Document) -> DeliveryResult:
        """Ask whether the patient's DMP is open: accepted (go on), rejected or retry."""
        ins = patient_identity(document.patient).ins
        if ins is None:
            return DeliveryResult.rejected(
                "the patient has no INS (an INS-NIR or INS-NIA identifier): the DMP cannot be "
                "reached without it"
            )
        authority, nir = ins
        url = f"{self.options.url}/patients/{urllib.parse.quote(nir, safe='')}/dmp"
        where = f"DMP status check at {self.options.url}"
        try:
            client = self._open()
            async with client.stream(
                "GET", url, params={"authority": authority}, headers={"Accept": "application/json"}
            ) as response:
                body = await _read_some(response, KEPT_BODY_BYTES)
        except httpx.HTTPError as exc:
            return _without(nir, self._network_trouble(where, exc))
        except (OSError, ssl.SSLError) as exc:
            return _without(nir, DeliveryResult.retry(f"{where}: {_describe(exc)}"))
        return _without(nir, _status_result(where, response, body, nir))

    async def deliver(self, rendered: Rendered) -> DeliveryResult:
        """Send the CDA document; network trouble is a retry, never raised.

        The DMP's refusal text is kept in the reason, with anything shaped like a NIR masked:
        the sender does not know which patient the CDA names, and the reason is shown in
        tracking.
        """
        result = await self._deliver(rendered)
        if result.reason is None or not _NIR_SHAPE.search(result.reason):
            return result
        return DeliveryResult(result.outcome, _NIR_SHAPE.sub("<INS>", result.reason), result.detail)

    async def _deliver(self, rendered: Rendered) -> DeliveryResult:
        if rendered.companions:
            return DeliveryResult.rejected(
                "this format delivers companion files, which the dmp connector cannot send"
            )
        where = f"DMP document upload to {self.options.url}/documents"
        headers = {
            "Content-Type": rendered.media_type,
            "Idempotency-Key": rendered.message_id,
            "X-Transaction-Id": rendered.message_id,
            "Accept": "application/json",
        }
        for name, value in headers.items():
            if not _HEADER_VALUE.fullmatch(value):
                # The rendering itself cannot be sent: retrying the same values cannot help.
                return DeliveryResult.rejected(f"{where}: {value[:80]!r} cannot go in {name}")
        try:
            client = self._open()
            async with client.stream(
                "POST", f"{self.options.url}/documents", content=rendered.data, headers=headers
            ) as response:
                try:
                    body = await _read_some(response, KEPT_BODY_BYTES)
                except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
                    if 200 <= response.status_code <= 299:
                        # The DMP said it took the document: the rest of its answer is lost, but
                        # sending again is not the way to learn the id.
                        return DeliveryResult.accepted(
                            f"stored in the DMP (HTTP {response.status_code}, answer cut short: "
                            f"{_describe(exc)})",
                            status=response.status_code,
                        )
                    raise
        except httpx.HTTPError as exc:
            return self._network_trouble(where, exc)
        except (OSError, ssl.SSLError) as exc:
            return DeliveryResult.retry(f"{where}: {_describe(exc)}")
        return _document_result(where, response, body)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _network_trouble(self, where: str, exc: httpx.HTTPError) -> DeliveryResult:
        if isinstance(exc, httpx.ConnectTimeout):
            seconds = self.options.connect_timeout
            return DeliveryResult.retry(f"{where}: could not connect within {seconds:g} s")
        if isinstance(exc, httpx.TimeoutException):
            return DeliveryResult.retry(f"{where}: no answer within {self.options.timeout:g} s")
        return DeliveryResult.retry(f"{where}: {_describe(exc)}")

    def _open(self) -> httpx.AsyncClient:
        if self._client is None:
            options = self.options
            headers = {}
            if options.auth is not None:
                headers["Authorization"] = f"Bearer {options.auth.token.get_secret_value()}"
            self._client = httpx.AsyncClient(
                headers=headers,
                verify=options.ssl_context,
                timeout=httpx.Timeout(options.timeout, connect=options.connect_timeout),
                follow_redirects=False,
                trust_env=False,
            )
        return self._client


# --- reading the answers ----------------------------------------------------------------------


def _status_result(where: str, response: httpx.Response, body: bytes, nir: str) -> DeliveryResult:
    """Classify the answer to ``GET /patients/{nir}/dmp``."""
    status = response.status_code
    label = _label(response)
    later = _later(where, response, body)
    if later is not None:
        return later
    answer = _json_object(body)
    state = answer.get("status") if answer is not None else None
    if status == 200 or (status == 404 and state == "unknown"):
        if answer is None:
            return DeliveryResult.retry(f"{where}: {label} with an answer that is not JSON")
        ins = answer.get("ins")
        if ins is not None and ins != nir:
            return DeliveryResult.retry(f"{where}: {label} about another patient")
        if state == "open":
            return DeliveryResult.accepted("the patient's DMP is open", status=status)
        if state == "closed":
            return DeliveryResult.rejected("the patient's DMP is closed", status=status)
        if state == "unknown":
            return DeliveryResult.rejected("the patient has no DMP", status=status)
        shown = _excerpt(str(state))[:80]
        return DeliveryResult.retry(f"{where}: {label} with an unexpected status {shown!r}")
    if status == 404:
        return DeliveryResult.retry(
            f"{where}: {label} without a DMP status: check deliver.url", status=status
        )
    if 400 <= status <= 499:
        return DeliveryResult.rejected(
            f"DMP refused the status check: {_error_text(body) or label}", status=status
        )
    return DeliveryResult.retry(f"{where}: unexpected answer {label}", status=status)


def _document_result(where: str, response: httpx.Response, body: bytes) -> DeliveryResult:
    """Classify the answer to ``POST /documents``."""
    status = response.status_code
    later = _later(where, response, body)
    if later is not None:
        return later
    if 200 <= status <= 299:
        answer = _json_object(body)
        raw_id = answer.get("id") if answer is not None else None
        if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) and str(raw_id):
            dmp_id = _excerpt(str(raw_id))[:DMP_ID_CHARS]
            return DeliveryResult.accepted(
                f"stored in the DMP as {dmp_id}", status=status, dmp_id=dmp_id
            )
        return DeliveryResult.accepted(
            f"stored in the DMP ({_label(response)}, no document id in the answer)",
            status=status,
        )
    if 400 <= status <= 499:
        return DeliveryResult.rejected(
            f"DMP refused the document: {_error_text(body) or _label(response)}", status=status
        )
    return DeliveryResult.retry(f"{where}: unexpected answer {_label(response)}", status=status)


def _later(where: str, response: httpx.Response, body: bytes) -> DeliveryResult | None:
    """A retry for answers that say nothing about the request (5xx, 408/425/429, 3xx)."""
    status = response.status_code
    label = _label(response)
    if status >= 500 or status in RETRY_STATUSES:
        detail: dict[str, Any] = {"status": status}
        after = _retry_after(response.headers.get("Retry-After"))
        if after is not None:
            detail["retry_after"] = after
            label += f" (retry after {after:g} s)"
        error = _error_text(body)
        return DeliveryResult.retry(f"{where}: {label}: {error}" if error else label, **detail)
    if 300 <= status <= 399:
        return DeliveryResult.retry(
            f"{where}: {label}: redirects are not followed, check deliver.url", status=status
        )
    return None


def _label(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _error_text(body: bytes) -> str:
    """The answer's ``error`` text (or the answer itself), flattened and cut at 300 characters."""
    answer = _json_object(body)
    error = answer.get("error") if answer is not None else None
    return _excerpt(error if isinstance(error, str) else body.decode("utf-8", errors="replace"))


# 13 characters (sex, year, month, department with 2A/2B, commune, order) and a 2-digit key.
_NIR_SHAPE = re.compile(r"(?<![0-9A-Za-z])[1-478]\d{4}(?:\d{2}|2[ABab])\d{6}\d{2}(?![0-9A-Za-z])")


def _without(nir: str, result: DeliveryResult) -> DeliveryResult:
    """The result with the NIR masked in its reason, whatever a server or a library echoed."""
    if result.reason is None or nir not in result.reason:
        return result
    return DeliveryResult(result.outcome, result.reason.replace(nir, "<INS>"), result.detail)
