"""Loading and checking the YAML configuration.

A misconfigured engine must be refused at start-up, with the file, the key path
(``routes[2].deliver.port``) and the reason, never at the first message. So loading runs in three
passes: YAML parsing, ``${VAR}`` / ``${VAR:-default}`` interpolation of every string value (secrets
stay in the environment, never in the file), then pydantic models for the core keys and each
plugin's own options model for ``format_options`` and ``deliver``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medcourier.engine.errors import ConfigError
from medcourier.engine.plugins import Plugins

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = Field(
        None, description="Base URL put in tracking-url; defaults to http://host:port"
    )
    max_body_bytes: int = Field(
        70 * 1024 * 1024, gt=0, description="Largest request body read before answering 413"
    )

    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


class TokenSettings(_Strict):
    name: str
    token: str = Field(min_length=16, description="Read it from the environment: ${VAR}")
    scopes: list[str]


class LimitSettings(_Strict):
    max_document_bytes: int = Field(
        50 * 1024 * 1024, gt=0, description="Largest decoded document accepted by $send-to-ehr"
    )


class RetrySettings(_Strict):
    """Retries of transient delivery failures: exponential backoff with jitter, capped.

    On a FIFO route the failing document holds its route while it waits (the next one must not
    overtake it); on a parallel route it waits in a delay queue and the others go on. After
    ``max_attempts`` it goes to the route's dead-letter queue and ends entered-in-error.
    """

    max_attempts: int = Field(10, ge=1)
    initial_delay: float = Field(1.0, gt=0)
    max_delay: float = Field(60.0, gt=0, description="The longest wait between two attempts")
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(
        0.2, ge=0, le=1, description="Each wait is drawn within ±jitter of the backoff"
    )

    def delay(self, attempt: int, draw: float | None = None) -> float:
        """Wait before the attempt after ``attempt`` (1-based).

        ``draw`` in [0, 1) places the wait in the jitter band (random when None): engines that
        lost the same EHR do not all come back at the same instant.
        """
        try:
            base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        except OverflowError:  # thousands of attempts: long past the cap
            base = self.max_delay
        u = random.random() if draw is None else draw
        return float(min(self.max_delay, base * (1 + self.jitter * (2 * u - 1))))


class RetentionSettings(_Strict):
    """How long a document is kept once every delivery of it is final (see engine/retention.py).

    The payload goes after ``payload_days``; the metadata that tracking reads (the document row,
    its deliveries and status history) after ``metadata_days``. A route's ``retention`` overrides
    the top-level one key by key.
    """

    payload_days: float = Field(31, gt=0, description="Days a final document keeps its payload")
    metadata_days: float = Field(
        62, gt=0, description="Days a final document stays trackable (the seed: two months)"
    )

    @model_validator(mode="after")
    def _payload_goes_first(self) -> RetentionSettings:
        if self.payload_days > self.metadata_days:
            raise ValueError(
                f"payload_days ({self.payload_days:g}) is more than metadata_days "
                f"({self.metadata_days:g}): a document must stay trackable at least as long as "
                "its payload is kept"
            )
        return self


class PruningSettings(_Strict):
    """The background pruner: one pass every interval, in small batches with pauses between."""

    enabled: bool = True
    interval_seconds: float = Field(300, gt=0)
    batch_size: int = Field(500, ge=1, le=5000, description="Documents looked at per batch")
    batch_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="A batch also stops once its payloads add up to this"
    )
    pause_seconds: float = Field(0.05, ge=0, description="Pause between batches")


class MatchSettings(_Strict):
    organizations: list[str] = Field(
        default_factory=list,
        description="Organization references (Organization/<id>) owning the patient or encounter",
    )
    fallback: bool = Field(False, description="Also take documents no other route matches")

    @field_validator("organizations")
    @classmethod
    def _references(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not re.fullmatch(r"Organization/[A-Za-z0-9\-.]{1,64}", ref):
                raise ValueError(f"{ref!r} is not an Organization/<id> reference")
        return value


class DeviceSettings(_Strict):
    """The FHIR Device that names this route as a recipient (seed 001: ``recipient: Device/…``).

    A CommunicationRequest addressed to ``Device/<id>`` is delivered by the route that declares
    it; the DMP is one such Device, an EHR route can be another.
    """

    id: str = Field(
        pattern=r"^[A-Za-z0-9\-.]{1,40}$",
        description="the Device's FHIR id (at most 40 characters: Communication ids add 21)",
    )
    name: str | None = Field(None, description="shown as the Device's type text")


class RouteSettings(_Strict):
    name: str
    match: MatchSettings = Field(default_factory=MatchSettings)
    device: DeviceSettings | None = None
    format: str
    format_options: dict[str, Any] = Field(default_factory=dict)
    deliver: dict[str, Any]
    retry: RetrySettings = Field(default_factory=RetrySettings)
    ordering: Literal["fifo", "parallel"] = Field(
        "fifo",
        description="fifo: one delivery in flight, in order (HL7 interfaces); parallel: "
        "up to `concurrency` at once, for destinations that allow it",
    )
    concurrency: int = Field(1, ge=1, le=64, description="Deliveries in flight (parallel only)")
    validate_options: dict[str, Any] = Field(default_factory=dict, alias="validate")
    retention: RetentionSettings | None = Field(
        None, description="Overrides the top-level retention, key by key"
    )
    keep_renderings: bool = Field(
        False, description="Store each rendering sent, so a replay can resend it byte for byte"
    )

    @model_validator(mode="after")
    def _concurrency_needs_parallel(self) -> RouteSettings:
        if self.concurrency > 1 and self.ordering == "fifo":
            raise ValueError(
                "concurrency above 1 needs ordering: parallel (a FIFO route has one delivery "
                "in flight, so that the order is kept)"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ROUTE_NAME.fullmatch(value):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 63 characters)")
        return value


class Settings(_Strict):
    instance: str = Field("medcourier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    data_dir: Path = Path("./var")
    broker: str | None = Field(None, description="amqp://… for RabbitMQ; empty for embedded")
    quorum_queues: bool = Field(
        False, description="RabbitMQ: declare replicated quorum queues (for a cluster)"
    )
    store: str | None = Field(None, description="postgresql://… ; empty for SQLite in data_dir")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http: HttpSettings = Field(default_factory=HttpSettings)
    tokens: list[TokenSettings] = Field(default_factory=list)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    routes: list[RouteSettings] = Field(default_factory=list)
    inbound: list[dict[str, Any]] = Field(
        default_factory=list, description="Listeners and drop folders: name, channel, options"
    )
    duplicate_window_hours: float = Field(
        24, gt=0, description="A message resent within this window is ACKed, not processed"
    )
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    pruning: PruningSettings = Field(default_factory=PruningSettings)

    @model_validator(mode="before")
    @classmethod
    def _route_retention_inherits(cls, data: Any) -> Any:
        """Keys a route's ``retention`` leaves out come from the top-level ``retention``."""
        if not isinstance(data, dict):
            return data
        top, routes = data.get("retention") or {}, data.get("routes")
        if not isinstance(top, dict) or not isinstance(routes, list):
            return data
        merged = [
            {**r, "retention": {**top, **r["retention"]}}
            if isinstance(r, dict) and isinstance(r.get("retention"), dict)
            else r
            for r in routes
        ]
        return {**data, "routes": merged}

    @field_validator("broker", "store")
    @classmethod
    def _empty_is_default(cls, value: str | None) -> str | None:
        """``${MEDCOURIER_BROKER_URL:-}`` interpolates to '' when unset: that means the default."""
        return value or None


class Route:
    """A route with its plugin options parsed: what the router and workers use."""

    def __init__(self, settings: RouteSettings, format_options: Any, deliver_options: Any) -> None:
        self.settings = settings
        self.name = settings.name
        self.format_options = format_options
        self.deliver_options = deliver_options


class Inbound:
    """An inbound channel with its options parsed by the channel's plugin."""

    def __init__(
        self,
        name: str,
        channel: str,
        options: Any,
        routes: tuple[str, ...] = (),
        ack_after: str = "apply",
    ) -> None:
        self.name = name
        self.channel = channel
        self.options = options
        # When set, documents from this channel go to exactly these routes (no matching).
        self.routes = routes
        # "apply": answer once the message is applied (directory updated, documents queued);
        # "journal": once checked and journaled, applied just after (engine/inbound_journal.py);
        # "receipt": once journaled, read and applied just after.
        self.ack_after = ack_after


class Config:
    """A checked configuration: core settings plus routes whose plugin options were validated."""

    def __init__(
        self,
        settings: Settings,
        routes: list[Route],
        source: str,
        inbound: list[Inbound] | None = None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.source = source
        self.inbound = inbound or []

    def device_routes(self) -> dict[str, Route]:
        """Device id -> the route that delivers what is addressed to it."""
        return {r.settings.device.id: r for r in self.routes if r.settings.device is not None}


def interpolate(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            found = env.get(name)
            if found not in (None, ""):
                return str(found)
            if default is not None:
                return default
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {
            k: interpolate(v, env, f"{path}.{k}" if path else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _errors(exc: ValidationError, prefix: str = "") -> list[str]:
    return [f"{_loc(prefix, tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]


def parse_config(
    text: str,
    plugins: Plugins,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    config_dir: Path | None = None,
) -> Config:
    """Parse and check a YAML config; raise ConfigError listing every problem found.

    Plugin options see ``config_dir`` in their validation context, so files a config names
    (templates, schemas) are found beside it wherever the engine is started from.
    """
    context: dict[str, Any] = {"config_dir": config_dir or Path.cwd()}
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: the file must be a mapping of settings"], source)
    problems: list[str] = []
    raw = interpolate(raw, os.environ if env is None else env, "", problems)
    if problems:
        raise ConfigError(problems, source)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_errors(exc), source) from exc

    routes: list[Route] = []
    seen: set[str] = set()
    devices: set[str] = set()
    for i, rs in enumerate(settings.routes):
        where = f"routes[{i}]"
        if rs.name in seen:
            problems.append(f"{where}.name: duplicate route name {rs.name!r}")
        seen.add(rs.name)
        fmt = plugins.formats.get(rs.format)
        format_options: Any = None
        if fmt is None:
            known = ", ".join(sorted(plugins.formats)) or "none"
            problems.append(f"{where}.format: unknown format {rs.format!r} (known: {known})")
        else:
            try:
                format_options = fmt.options_model.model_validate(
                    rs.format_options, context=context
                )
            except ValidationError as exc:
                problems.extend(_errors(exc, f"{where}.format_options"))
        deliver_options: Any = None
        connector_name = rs.deliver.get("connector")
        connector = plugins.connectors.get(str(connector_name))
        if connector is None:
            known = ", ".join(sorted(plugins.connectors)) or "none"
            problems.append(
                f"{where}.deliver.connector: unknown connector {connector_name!r} (known: {known})"
            )
        else:
            try:
                deliver_options = connector.options_model.model_validate(
                    rs.deliver, context=context
                )
            except ValidationError as exc:
                problems.extend(_errors(exc, f"{where}.deliver"))
        if not rs.match.organizations and not rs.match.fallback and rs.device is None:
            problems.append(
                f"{where}.match: give organizations, or fallback: true (or a device, for a "
                "route reached only by CommunicationRequests addressed to it)"
            )
        if rs.device is not None:
            if rs.device.id in devices:
                problems.append(f"{where}.device.id: Device/{rs.device.id} is already declared")
            devices.add(rs.device.id)
        routes.append(Route(rs, format_options, deliver_options))
    if sum(1 for r in settings.routes if r.match.fallback) > 1:
        problems.append("routes: at most one route may have match.fallback: true")
    inbound = _inbound(settings, plugins, problems, context)
    if problems:
        raise ConfigError(problems, source)
    return Config(settings, routes, source, inbound)


ACK_AFTER = ("apply", "journal", "receipt")
"""When an inbound channel answers its sender: once the message is applied; once it is checked
and journaled; once it is journaled, unread (engine/inbound_journal.py)."""

JOURNALED_CHANNELS = ("mllp",)
"""Channels whose senders wait for each answer, for whom ``ack_after: journal`` and
``receipt`` are meant."""

INBOUND_CORE_KEYS = ("name", "routes", "ack_after")
"""Keys of an ``inbound[]`` entry the core reads; the rest are the channel plugin's options."""


def _inbound(
    settings: Settings, plugins: Plugins, problems: list[str], context: dict[str, Any]
) -> list[Inbound]:
    found: list[Inbound] = []
    names: set[str] = set()
    for i, raw in enumerate(settings.inbound):
        where = f"inbound[{i}]"
        name = raw.get("name")
        if not isinstance(name, str) or not ROUTE_NAME.fullmatch(name):
            problems.append(f"{where}.name: required: letters, digits, '.', '_' or '-'")
            continue
        if name in names:
            problems.append(f"{where}.name: duplicate inbound name {name!r}")
        names.add(name)
        kind = plugins.inbound.get(str(raw.get("channel")))
        if kind is None:
            known = ", ".join(sorted(plugins.inbound)) or "none"
            problems.append(
                f"{where}.channel: unknown inbound channel {raw.get('channel')!r} (known: {known})"
            )
            continue
        routes = raw.get("routes") or []
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            problems.append(f"{where}.routes: a list of route names")
            continue
        for j, route in enumerate(routes):
            if route not in {r.name for r in settings.routes}:
                problems.append(f"{where}.routes[{j}]: no route named {route!r}")
        ack_after = raw.get("ack_after", "apply")
        if ack_after not in ACK_AFTER:
            problems.append(f"{where}.ack_after: one of {', '.join(ACK_AFTER)}")
            continue
        if ack_after != "apply" and kind.name not in JOURNALED_CHANNELS:
            problems.append(
                f"{where}.ack_after: {ack_after} is for {', '.join(JOURNALED_CHANNELS)} listeners "
                f"(a {kind.name} input is answered once applied)"
            )
            continue
        try:
            options = kind.options_model.model_validate(
                {k: v for k, v in raw.items() if k not in INBOUND_CORE_KEYS}, context=context
            )
        except ValidationError as exc:
            problems.extend(_errors(exc, where))
            continue
        found.append(Inbound(name, kind.name, options, tuple(routes), ack_after))
    return found


def load_config(path: str | Path, plugins: Plugins, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` and parse it (see ``parse_config``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], str(p)) from exc
    return parse_config(text, plugins, str(p), env, p.resolve().parent)
