"""The ``http`` outbound connector: POST or PUT each rendering to a web API.

Vendors that take JSON (or HL7, or CDA) over HTTP answer with a status code, and that code is the
whole contract: 2xx means the document is theirs, a 4xx means this request will never succeed
(the answer says why, and it is kept in the delivery's reason), and a 5xx, a timeout or a refused
connection says nothing about the document, so it is retried. 408 (request timeout), 425 (too
early) and 429 (too many requests) are 4xx codes that mean "later", and are retried too; a route
can add more (``retry_statuses``: 401 while a token is being renewed, for instance).

Redirects are not followed: a POST that gets a 3xx usually means a wrong URL, and re-sending a
medical document to wherever a server points is not something to do silently. It is retried
(the route is held, nothing is lost) with a reason that says to fix the URL.

One ``httpx.AsyncClient`` per route keeps connections (and TLS sessions) alive between messages.
Proxy settings and CA bundles are not read from the environment (``trust_env`` off): what a route
does is what its YAML says, and only that.

Every request carries ``Idempotency-Key`` and ``X-Transaction-Id`` set to the message id (the
transaction id), so a receiver can recognise the retry of a request whose answer was lost.
"""

from __future__ import annotations

import email.utils
import errno
import os
import re
import ssl
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from medcourier.engine.model import DeliveryResult, Rendered

KEPT_BODY_BYTES = 64 * 1024
"""How much of an answer is read; the rest is dropped with the connection."""

DETAIL_BODY_CHARS = 4000
"""How much of the answer's text is kept in ``DeliveryResult.detail["body"]``."""

REASON_BODY_CHARS = 300
"""How much of it goes into the delivery's reason (stored with the status)."""

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 header name
_BAD_VALUE = re.compile(r"[^\t\x20-\x7e]")  # httpx sends header values as ASCII
# Headers httpx computes, or that the connector owns; setting them by hand breaks requests.
_RESERVED = {
    "host": "derived from the url",
    "content-length": "computed from the body",
    "transfer-encoding": "chosen by the client",
    "connection": "managed by the client",
    "content-type": "set from the format's media type (format_options.media_type)",
    "idempotency-key": "set to the message id",
    "x-transaction-id": "set to the message id",
}
_URL_FIELDS = ("{transaction_id}", "{message_id}")
_BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


class BearerAuth(BaseModel):
    """``auth: {type: bearer, token: ${VENDOR_TOKEN}}``"""

    model_config = ConfigDict(extra="forbid")

    type: Literal["bearer"]
    token: SecretStr = Field(min_length=1)

    @field_validator("token")
    @classmethod
    def _printable(cls, value: SecretStr) -> SecretStr:
        # Checked here: httpx would fail on every request, after the route had started.
        if not re.fullmatch(r"[\x21-\x7e]+", value.get_secret_value()):
            raise ValueError("a bearer token is printable ASCII without spaces")
        return value


class BasicAuth(BaseModel):
    """``auth: {type: basic, username: ..., password: ${VENDOR_PASSWORD}}``"""

    model_config = ConfigDict(extra="forbid")

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: SecretStr


class TlsClientOptions(BaseModel):
    """The TLS side of an HTTP client's options, shared by the connectors that speak HTTPS.

    ``verify`` is true (the system's CAs), false (no check: tests only) or a CA bundle file that
    replaces them; ``client_cert`` / ``client_key`` authenticate medcourier with a certificate
    (mutual TLS). The TLS context is built when the options are checked, so a bad certificate or
    key fails ``medcourier check``, not the first delivery.
    """

    client_cert: FilePath | None = Field(None, description="PEM certificate (may hold the key)")
    client_key: FilePath | None = Field(None, description="PEM private key of client_cert")
    verify: bool | Path = True

    _ssl: ssl.SSLContext = PrivateAttr()

    @field_validator("verify", mode="before")
    @classmethod
    def _verify_word_or_path(cls, value: Any) -> Any:
        """``${VERIFY:-true}`` arrives as a string: a boolean word, else a path."""
        if isinstance(value, str):
            word = _BOOLEAN_WORDS.get(value.strip().lower())
            return word if word is not None else Path(value)
        return value

    @field_validator("verify")
    @classmethod
    def _bundle_exists(cls, value: bool | Path) -> bool | Path:
        if isinstance(value, Path) and not value.is_file():
            raise ValueError(f"no CA bundle file at {value}")
        return value

    def _build_tls(self) -> None:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        self._ssl = _ssl_context(self.verify, self.client_cert, self.client_key)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return self._ssl


class HttpOptions(TlsClientOptions):
    """The ``deliver:`` block of a route using ``connector: http``.

    ``url`` may contain ``{transaction_id}`` (or ``{message_id}``), replaced by the
    URL-encoded message id: ``PUT https://vendor/api/documents/{transaction_id}``.
    Secrets (``auth``, ``secret_headers``) are SecretStr: they never appear in a repr, a log
    line or an error message. ``verify`` is true (the system's CAs), false (no check: tests
    only), or a CA bundle file that replaces the system's CAs. ``timeout`` bounds each wait for
    the server (sending a chunk, the next bytes of the answer), ``connect_timeout`` the
    connection and TLS handshake.
    """

    model_config = ConfigDict(extra="forbid")

    connector: Literal["http"] = "http"
    method: Literal["POST", "PUT"] = "POST"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    secret_headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="headers whose values are secrets (API keys)"
    )
    auth: Annotated[BearerAuth | BasicAuth, Field(discriminator="type")] | None = None
    timeout: float = Field(30.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0)
    retry_statuses: frozenset[int] = Field(frozenset({408, 425, 429}))
    proxy: str | None = Field(None, description="http://proxy:3128 (the environment is ignored)")

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        sample = value
        for field in _URL_FIELDS:
            sample = sample.replace(field, "0190f3a2b4c5d6e7f8a9")
        try:
            url = httpx.URL(sample)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a valid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("an absolute http:// or https:// URL is needed")
        if url.userinfo:
            raise ValueError("put credentials in auth, not in the URL (they would be logged)")
        return value

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a valid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("an http:// or https:// proxy URL is needed")
        return value

    @field_validator("headers", "secret_headers")
    @classmethod
    def _header_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name, raw in value.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            reserved = _RESERVED.get(name.lower())
            if reserved:
                raise ValueError(f"{name} cannot be set here: it is {reserved}")
            text = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
            if _BAD_VALUE.search(text):
                raise ValueError(
                    f"the value of {name} holds a line break, a control or a non-ASCII character"
                )
        return value

    @field_validator("retry_statuses")
    @classmethod
    def _client_errors(cls, value: frozenset[int]) -> frozenset[int]:
        odd = sorted(code for code in value if not 400 <= code <= 499)
        if odd:
            raise ValueError(f"only 4xx codes need listing (5xx are always retried): {odd}")
        return value

    @model_validator(mode="after")
    def _tls(self) -> HttpOptions:
        """Build the TLS context now, so a bad certificate or key fails ``medcourier check``."""
        headers = {name.lower() for name in (*self.headers, *self.secret_headers)}
        if len(headers) != len(self.headers) + len(self.secret_headers):
            raise ValueError("a header is given twice (headers and secret_headers)")
        if self.auth is not None and "authorization" in headers:
            raise ValueError("give auth or an Authorization header, not both")
        self._build_tls()
        return self

    def url_for(self, message_id: str) -> str:
        """The URL with ``{transaction_id}`` / ``{message_id}`` filled in."""
        url = self.url
        quoted = urllib.parse.quote(message_id, safe="")
        for field in _URL_FIELDS:
            url = url.replace(field, quoted)
        return url


def _ssl_context(verify: bool | Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    try:
        if verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif isinstance(verify, Path):
            context = ssl.create_default_context(cafile=str(verify))
        else:
            context = ssl.create_default_context()
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot set up TLS (verify, client_cert, client_key): {exc}") from exc
    return context


class HttpSender:
    """Sends renderings with one pooled client, created at the first delivery.

    After :meth:`aclose` the sender can still be used: the next delivery opens a new client.
    """

    def __init__(self, options: HttpOptions) -> None:
        self.options = options
        self._client: httpx.AsyncClient | None = None

    async def deliver(self, rendered: Rendered) -> DeliveryResult:
        """Send one rendering and classify the answer; network trouble is a retry, never raised."""
        if rendered.companions:
            return DeliveryResult.rejected(
                "this format delivers companion files, which the http connector cannot send: "
                "use the file connector or a single-file format option"
            )
        url = self.options.url_for(rendered.message_id)
        headers = {
            "Content-Type": rendered.media_type,
            "Idempotency-Key": rendered.message_id,
            "X-Transaction-Id": rendered.message_id,
        }
        where = f"{self.options.method} {_without_query(url)}"
        problem = next((v for v in headers.values() if _BAD_VALUE.search(v)), None)
        if problem is not None:
            # The rendering itself cannot be sent: retrying the same values cannot help.
            return DeliveryResult.rejected(f"{where}: {problem[:80]!r} cannot go in a header")
        try:
            client = self._open()
            async with client.stream(
                self.options.method, url, content=rendered.data, headers=headers
            ) as response:
                try:
                    body = await _read_some(response, KEPT_BODY_BYTES)
                except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
                    if 200 <= response.status_code <= 299:
                        # The destination said it took the document: resending would duplicate
                        # it, whatever happened to the rest of its answer.
                        label = f"HTTP {response.status_code} (answer cut short: {_describe(exc)})"
                        return DeliveryResult.accepted(label, status=response.status_code)
                    raise
        except httpx.ConnectTimeout:
            seconds = self.options.connect_timeout
            return DeliveryResult.retry(f"{where}: could not connect within {seconds:g} s")
        except httpx.TimeoutException:
            return DeliveryResult.retry(f"{where}: no answer within {self.options.timeout:g} s")
        except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
            return DeliveryResult.retry(f"{where}: {_describe(exc)}")
        return _result(response, _text(response, body), self.options.retry_statuses)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _open(self) -> httpx.AsyncClient:
        if self._client is None:
            options = self.options
            headers = dict(options.headers)
            headers.update({k: v.get_secret_value() for k, v in options.secret_headers.items()})
            auth: httpx.Auth | None = None
            if isinstance(options.auth, BearerAuth):
                headers["Authorization"] = f"Bearer {options.auth.token.get_secret_value()}"
            elif isinstance(options.auth, BasicAuth):
                password = options.auth.password.get_secret_value()
                auth = httpx.BasicAuth(options.auth.username, password)
            self._client = httpx.AsyncClient(
                headers=headers,
                auth=auth,
                verify=options.ssl_context,
                timeout=httpx.Timeout(options.timeout, connect=options.connect_timeout),
                proxy=options.proxy,
                follow_redirects=False,
                trust_env=False,
            )
        return self._client


def _without_query(url: str) -> str:
    """The URL without query or fragment (API keys hide there), fit for a reason or a log."""
    return str(httpx.URL(url).copy_with(query=None, fragment=None))


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    """Up to ``limit`` bytes of the answer: enough to say why, bounded whatever is sent."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _text(response: httpx.Response, body: bytes) -> str:
    try:
        return body.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


def _result(response: httpx.Response, body: str, retry_statuses: frozenset[int]) -> DeliveryResult:
    status = response.status_code
    label = f"HTTP {status} {response.reason_phrase}".rstrip()
    detail: dict[str, Any] = {"status": status, "body": body[:DETAIL_BODY_CHARS]}
    excerpt = _excerpt(body)
    if 200 <= status <= 299:
        return DeliveryResult.accepted(label, **detail)
    if status == 303:
        # "See Other" after a POST: the request was processed and the answer is elsewhere.
        # Re-sending would duplicate the document.
        detail["location"] = response.headers.get("Location", "")
        return DeliveryResult.accepted(label, **detail)
    if 300 <= status <= 399:
        location = response.headers.get("Location", "?")
        return DeliveryResult.retry(
            f"{label} to {location[:200]}: redirects are not followed, check deliver.url",
            **detail,
        )
    if status >= 500 or status in retry_statuses:
        after = _retry_after(response.headers.get("Retry-After"))
        if after is not None:
            detail["retry_after"] = after
            label += f" (retry after {after:g} s)"
        return DeliveryResult.retry(f"{label}: {excerpt}" if excerpt else label, **detail)
    if 400 <= status <= 499:
        return DeliveryResult.rejected(f"{label}: {excerpt}" if excerpt else label, **detail)
    return DeliveryResult.retry(f"unexpected answer {label}", **detail)


def _excerpt(body: str) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= REASON_BODY_CHARS else flat[:REASON_BODY_CHARS] + "…"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _describe(exc: BaseException) -> str:
    """A short reason. httpx and anyio wrap the socket or TLS error ("All connection attempts
    failed"): the innermost one says what happened (refused, unreachable, certificate...)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in reversed(chain):
        if isinstance(error, ssl.SSLError):
            return f"TLS failed: {error}"
    for error in reversed(chain):
        if isinstance(error, OSError) and error.errno:
            code = errno.errorcode.get(error.errno, str(error.errno))
            return f"{os.strerror(error.errno)} ({code})"
    return str(exc) or type(exc).__name__
