"""The ``json-template`` format: a jinja2 template turns a Document into a vendor's JSON.

What a template sees
--------------------
``document``
    ``transaction_id``, ``created_at`` (ISO 8601), ``content_type``, ``document_type`` (LOINC),
    ``title``, ``sender_identifier`` (RPPS or None), ``sender_application``, ``size`` (bytes) and
    ``payload_base64`` (the file, see below).
``patient``, ``encounter``
    The FHIR R4 resources as plain dicts (``encounter`` may be None). An absent key is an error
    (``StrictUndefined``: a typo must fail, not send an empty string); read optional FHIR elements
    with ``patient.get("birthDate")``.
``identifier(system)``
    The value of the patient's first identifier with that system, or None.
``human_name(use=None)``
    The first name with that ``use`` (the first name at all without one), normalised to
    ``family`` (str or None), ``given`` / ``prefix`` / ``suffix`` (lists), ``text`` and ``use``;
    None when the patient has no such name.
``vars``
    The route's ``variables`` option, so one template can serve several hospitals.
``tojson``
    Serialises a value as JSON. It replaces jinja's own filter, which is meant for embedding JSON
    in HTML: that one sorts keys and escapes ``<``, ``>``, ``&`` and ``'`` as ``\\u003c``…, which is
    valid JSON but not what a JSON API needs. Ours is ``json.dumps(ensure_ascii=False,
    allow_nan=False)``: UTF-8 text as it is, and no NaN/Infinity, which are not JSON.

Templates run in jinja's *immutable* sandbox: no attribute escapes (``''.__class__``…) and no
mutation of the dicts in scope, which are shared with every other route of the same document.
The sandbox does not bound CPU time: templates are configuration, written by the integrator.

The payload
-----------
A document may weigh 50 MB. Pushing its Base64 through jinja would copy it five times or more
(the str, json.dumps, the joined output, the UTF-8 bytes, json.loads). So ``payload_base64`` is
a random placeholder token while the template runs, and the output is checked as JSON while it
is still small; the Base64 is computed once (only if the token is in the output) and spliced into
the encoded bytes in one pass. Since the token and Base64 use only characters that need no JSON
escaping, the splice cannot break the JSON. When a schema is set it is checked against the parsed
output with the real Base64 in place, so ``pattern``/``maxLength`` rules on it hold for real.
The cost of this is one rule: ``payload_base64`` can only be inserted whole; slicing it or
filtering it would act on the token (a cut token is detected and refused).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jsonschema import exceptions as schema_exceptions
from jsonschema import validators as schema_validators
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document, Rendered
from medcourier.engine.plugins import FormatType, hookimpl
from medcourier.transforms.fhir_json import as_dicts

FORMAT_NAME = "json-template"

# type/subtype[; parameters], printable ASCII only: it becomes a Content-Type header.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*(\s*;[\x20-\x7e]*)?", re.ASCII)
_TOKEN_PREFIX = "MCPAYLOAD"
# A token cut by a slice or a filter leaves a fragment at least this long behind (detected).
_FRAGMENT = 12
_MAX_MESSAGE = 300
_MAX_QUOTED = 100


class JsonTemplateOptions(BaseModel):
    """A route's ``format_options`` for ``json-template``.

    The template and the schema are read and checked when the configuration is loaded, so a
    syntax error or an invalid schema fails ``medcourier check`` with its key path, not the
    first delivery. Relative paths are resolved against ``config_dir`` when the loader passes it
    in the validation context, else against the working directory (like every path of the
    configuration today).
    """

    model_config = ConfigDict(extra="forbid")

    template: Path = Field(description="jinja2 template file; includes resolve beside it")
    json_schema: Path | None = Field(
        None, alias="schema", description="JSON Schema file the output must match"
    )
    media_type: str = Field("application/json", description="Content-Type of the rendering")
    variables: dict[str, JsonValue] = Field(
        default_factory=dict, description="values the template reads as vars.<name>"
    )

    _compiled: Template = PrivateAttr()
    _validator: Any = PrivateAttr(default=None)

    @field_validator("template")
    @classmethod
    def _template_compiles(cls, value: Path, info: ValidationInfo) -> Path:
        """Resolve and compile here so an error is reported under ``template``."""
        path = _resolve(value, info)
        _compile(path)
        return path

    @field_validator("json_schema")
    @classmethod
    def _schema_is_valid(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        path = _resolve(value, info)
        _load_schema(path)
        return path

    @field_validator("media_type")
    @classmethod
    def _media_type(cls, value: str) -> str:
        if not _MEDIA_TYPE.fullmatch(value):
            raise ValueError(f"{value!r} is not a media type (type/subtype)")
        return value

    @model_validator(mode="after")
    def _keep_compiled(self) -> JsonTemplateOptions:
        # Compiled a second time (the field validators could not store anything on the model):
        # a few milliseconds once per configuration load buys errors under the right key.
        self._compiled = _compile(self.template)
        if self.json_schema is not None:
            self._validator = _load_schema(self.json_schema)
        return self

    @property
    def compiled(self) -> Template:
        """The template, compiled in the sandbox when the options were validated."""
        return self._compiled

    @property
    def schema_validator(self) -> Any:
        """A ``jsonschema`` validator for ``schema``, or None."""
        return self._validator


@hookimpl
def medcourier_formats() -> list[FormatType]:
    """Register ``json-template``."""
    return [
        FormatType(
            name=FORMAT_NAME,
            options_model=JsonTemplateOptions,
            render=render,
            description="vendor JSON from a sandboxed jinja2 template, checked as JSON "
            "(and against a JSON Schema) before delivery",
        )
    ]


def render(document: Document, options: JsonTemplateOptions) -> Rendered:
    """Render ``document`` through the route's template and check the result.

    :raises RenderError: the template fails (undefined name, sandbox violation, error in the
        template's own logic), its output is not JSON, or does not match the schema.
    """
    token = f"{_TOKEN_PREFIX}{secrets.token_hex(16)}"
    template = options.compiled
    name = Path(template.filename or "template").name
    try:
        text = template.render(_context(document, token, options))
    except Exception as exc:  # the template is user code: any failure of it is a render failure
        where = _template_line(exc, options.template.parent) or name
        raise RenderError(f"template {where}: {_describe(exc)}") from exc

    present = _check_token(text, token, name)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RenderError(
            f"template {name} produced text that is not valid Unicode "
            f"(a lone surrogate at character {exc.start}): it cannot be sent as UTF-8 JSON"
        ) from exc
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_nan)
    except json.JSONDecodeError as exc:
        raise RenderError(
            f"template {name} produced invalid JSON at line {exc.lineno}, "
            f"column {exc.colno}: {exc.msg}"
        ) from exc
    except _NotJson as exc:
        raise RenderError(f"template {name} produced invalid JSON: {exc}") from exc
    del text

    encoded = base64.b64encode(document.payload) if present else b""
    validator = options.schema_validator
    if validator is not None:
        if present:
            parsed = _splice_tree(parsed, token, encoded.decode("ascii"))
        _check_schema(validator, parsed, name, options.json_schema)
    del parsed
    if present:
        data = data.replace(token.encode("ascii"), encoded)
    return Rendered(
        data=data,
        media_type=options.media_type,
        filename_hint=f"{document.transaction_id}.json",
        message_id=document.transaction_id,
    )


# --- the template's scope ---------------------------------------------------------------------


def _context(document: Document, token: str, options: JsonTemplateOptions) -> dict[str, Any]:
    patient = document.patient
    return {
        "document": {
            "transaction_id": document.transaction_id,
            "created_at": document.created_at.isoformat(),
            "content_type": document.content_type,
            "document_type": document.document_type,
            "title": document.title,
            "sender_identifier": document.sender_identifier,
            "sender_application": document.sender_application,
            "size": len(document.payload),
            "payload_base64": token,
        },
        "patient": patient,
        "encounter": document.encounter,
        "identifier": _identifier_helper(patient),
        "human_name": _name_helper(patient),
        "vars": options.variables,
    }


def _identifier_helper(patient: dict[str, Any]) -> Callable[[str | None], str | None]:
    def identifier(system: str | None) -> str | None:
        """The value of the first identifier with ``system``, or None."""
        for entry in as_dicts(patient.get("identifier")):
            if entry.get("system") == system and isinstance(entry.get("value"), str):
                return str(entry["value"])
        return None

    return identifier


def _name_helper(patient: dict[str, Any]) -> Callable[[str | None], dict[str, Any] | None]:
    def human_name(use: str | None = None) -> dict[str, Any] | None:
        """The first HumanName with ``use`` (any when None), with every part present."""
        for name in as_dicts(patient.get("name")):
            if use is None or name.get("use") == use:
                return {
                    "use": name.get("use"),
                    "family": name.get("family"),
                    "given": _strings(name.get("given")),
                    "prefix": _strings(name.get("prefix")),
                    "suffix": _strings(name.get("suffix")),
                    "text": name.get("text"),
                }
        return None

    return human_name


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON for a JSON API: no HTML escaping, no key sorting, UTF-8 as it is, strict numbers.

    A value JSON cannot hold (NaN, an object) raises, and the render fails with the template
    line: there is nothing sensible to send instead.
    """
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=indent)


# --- loading ------------------------------------------------------------------------------------


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = info.context.get("config_dir") if isinstance(info.context, dict) else None
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.absolute()


def _environment(directory: Path) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(directory),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    # Before any compilation: the compiler checks filter names against this mapping.
    env.filters["tojson"] = _tojson
    return env


def _compile(path: Path) -> Template:
    """Read and compile one template file; ``ValueError`` with the line for a syntax error."""
    if not path.is_file():
        raise ValueError(f"no template file at {path}")
    try:
        return _environment(path.parent).get_template(path.name)
    except TemplateSyntaxError as exc:
        where = Path(exc.filename).name if exc.filename else path.name
        raise ValueError(f"{where} line {exc.lineno}: {exc.message}") from exc
    except TemplateError as exc:
        raise ValueError(f"{path.name}: {exc}") from exc
    except UnicodeDecodeError as exc:
        problem = f"{exc.reason} at byte {exc.start}"
        raise ValueError(f"{path.name} is not UTF-8 text: {problem}") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _load_schema(path: Path) -> Any:
    """Read a JSON Schema, check it against its meta-schema, return a validator for it.

    The dialect comes from ``$schema`` (2020-12 when absent); ``format`` is asserted for the
    formats the installed jsonschema can check (``date``, ``email``…).
    """
    try:
        schema = json.loads(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.name} is not JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise ValueError(f"{path.name} is not a JSON Schema (an object or a boolean)")
    cls = schema_validators.validator_for(schema, default=schema_validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except schema_exceptions.SchemaError as exc:
        where = _pointer(exc.absolute_path)
        problem = f"{path.name} is not a valid JSON Schema at {where}: {exc.message}"
        raise ValueError(problem) from exc
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


# --- checking the output ------------------------------------------------------------------------


class _NotJson(ValueError):
    """Text that json.loads accepts but JSON does not (NaN, duplicate keys)."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Receivers disagree on duplicate keys (first wins, last wins, error): never send one.
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _NotJson(f"duplicate key {key[:80]!r} in an object")
        found[key] = value
    return found


def _no_nan(constant: str) -> Any:
    raise _NotJson(f"{constant} is not a JSON number")


def _check_token(text: str, token: str, name: str) -> bool:
    """Whether the payload token is in the output; refuse a token that was cut or altered."""
    whole = text.count(token)
    if text.count(token[:_FRAGMENT]) != whole or text.count(token[-_FRAGMENT:]) != whole:
        raise RenderError(
            f"template {name} transforms document.payload_base64 (slice, filter, method): "
            "it can only be inserted whole"
        )
    return whole > 0


def _splice_tree(value: Any, token: str, encoded: str) -> Any:
    """The parsed output with the token replaced by the Base64 in every string holding it."""
    if isinstance(value, str):
        return value.replace(token, encoded) if token in value else value
    if isinstance(value, dict):
        return {
            _splice_tree(k, token, encoded): _splice_tree(v, token, encoded)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_splice_tree(v, token, encoded) for v in value]
    return value


def _check_schema(validator: Any, instance: Any, name: str, schema: Path | None) -> None:
    errors = list(validator.iter_errors(instance))
    if not errors:
        return
    error = schema_exceptions.best_match(errors)
    if isinstance(error.instance, str) and len(error.instance) > _MAX_QUOTED:
        # jsonschema's message quotes the value, which may be megabytes of Base64.
        rule = json.dumps(error.validator_value, ensure_ascii=False)[:_MAX_QUOTED]
        message = f"a string of {len(error.instance)} characters fails {error.validator} {rule}"
    else:
        message = str(error.message)
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "…"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    schema_name = schema.name if schema is not None else "schema"
    raise RenderError(
        f"template {name} output does not match {schema_name} at "
        f"{_pointer(error.absolute_path)}: {message} "
        f"[schema {_pointer(error.absolute_schema_path)}]{more}"
    )


def _pointer(parts: Any) -> str:
    """A JSON Pointer (RFC 6901) for a jsonschema path deque; ``/`` for the root."""
    escaped = [str(p).replace("~", "~0").replace("/", "~1") for p in parts]
    return "/" + "/".join(escaped) if escaped else "/"


# --- error messages -----------------------------------------------------------------------------


def _template_line(exc: BaseException, directory: Path) -> str:
    """``file line N`` of the innermost template frame in the traceback, or ``""``.

    jinja rewrites tracebacks so that template code appears as frames of the template file
    (its absolute path under the template's directory) at the template's own line numbers.
    """
    line = ""
    prefix = str(directory) + os.sep
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith(prefix):
            line = f"{Path(filename).name} line {tb.tb_lineno}"
        tb = tb.tb_next
    return line


def _describe(exc: BaseException) -> str:
    kind = type(exc).__name__
    text = str(exc) or kind
    if isinstance(exc, TemplateError):
        return text
    return f"{kind}: {text}"
