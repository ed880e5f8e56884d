"""The ``json-template`` format: valid JSON or a clear refusal, never a broken message.

The output is judged by ``json.loads`` and ``jsonschema``, not by the code that wrote it; the
tricky patient below carries everything that breaks naive string templating.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from medcourier.engine.config import parse_config
from medcourier.engine.errors import ConfigError, RenderError
from medcourier.engine.model import Document
from medcourier.engine.plugins import load_plugins
from medcourier.transforms.json_template import plugin as json_template_plugin
from medcourier.transforms.json_template.plugin import JsonTemplateOptions, render

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "templates" / "vendor-document.json.j2"
EXAMPLE_SCHEMA = ROOT / "config" / "templates" / "vendor-document.schema.json"

TRICKY_FAMILY = 'O\'Brien "the \\ one"</script>\n<!--'
TRICKY_GIVEN = "Zoé\u2028Ève\t&amp;"
PAYLOAD = b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF"
INS = "280052A12345678"


def make_patient(**overrides: Any) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [
            {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": INS},
            {"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-0042"},
        ],
        "name": [
            {"use": "official", "family": TRICKY_FAMILY, "given": [TRICKY_GIVEN, "Anne"]},
            {"use": "usual", "family": "Dupont-Lœuvre"},
        ],
        "birthDate": "1980-05-12",
        "gender": "female",
    }
    patient.update(overrides)
    return patient


def make_document(**overrides: Any) -> Document:
    fields: dict[str, Any] = {
        "transaction_id": "0190f3a2b4c5d6e7f8a9",
        "created_at": datetime(2024, 1, 21, 8, 30, 15, tzinfo=UTC),
        "content_type": "application/pdf",
        "document_type": "11488-4",
        "title": 'Compte-rendu "urgent" </script>',
        "payload": PAYLOAD,
        "patient": make_patient(),
        "encounter": {
            "resourceType": "Encounter",
            "id": "enc-1",
            "class": {"code": "IMP"},
            "period": {"start": "2024-01-15T10:30:00+01:00"},
        },
        "sender_identifier": "10001234567",
    }
    fields.update(overrides)
    return Document(**fields)


def example_options(**extra: Any) -> JsonTemplateOptions:
    return JsonTemplateOptions.model_validate(
        {
            "template": str(EXAMPLE),
            "schema": str(EXAMPLE_SCHEMA),
            "variables": {"local_id_system": "urn:oid:1.2.250.1.999.1"},
            **extra,
        }
    )


def options_for(tmp_path: Path, template: str, schema: Any = None) -> JsonTemplateOptions:
    (tmp_path / "t.json.j2").write_text(template, encoding="utf-8")
    raw: dict[str, Any] = {"template": str(tmp_path / "t.json.j2")}
    if schema is not None:
        (tmp_path / "s.json").write_text(json.dumps(schema), encoding="utf-8")
        raw["schema"] = str(tmp_path / "s.json")
    return JsonTemplateOptions.model_validate(raw)


# --- the example template -----------------------------------------------------------------------


def test_example_renders_json_matching_its_schema_for_a_tricky_patient() -> None:
    rendered = render(make_document(), example_options())

    body = json.loads(rendered.data)  # parsed by the stdlib, not by us
    schema = json.loads(EXAMPLE_SCHEMA.read_bytes())
    jsonschema.validate(body, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert rendered.media_type == "application/json"
    assert rendered.message_id == "0190f3a2b4c5d6e7f8a9"
    assert rendered.filename_hint == "0190f3a2b4c5d6e7f8a9.json"
    patient = body["patient"]
    assert patient["birthName"] == TRICKY_FAMILY
    assert patient["firstName"] == TRICKY_GIVEN
    assert patient["givenNames"] == [TRICKY_GIVEN, "Anne"]
    assert patient["usedName"] == "Dupont-Lœuvre"
    assert patient["ins"] == INS
    assert patient["localId"] == "IPP-0042"
    assert body["document"]["title"] == 'Compte-rendu "urgent" </script>'
    assert body["document"]["author"] == "10001234567"
    assert body["encounter"] == {
        "resourceId": "enc-1",
        "class": "IMP",
        "start": "2024-01-15T10:30:00+01:00",
        "end": None,
    }
    assert base64.b64decode(body["document"]["content"], validate=True) == PAYLOAD
    assert body["document"]["size"] == len(PAYLOAD)


def test_tojson_writes_utf8_not_html_escapes() -> None:
    """jinja's own tojson would write \\u003c/script\\u003e and \\u00e9: valid, but not ours."""
    data = render(make_document(), example_options()).data

    assert "Zoé".encode() in data
    assert b"</script>" in data
    assert b"\\u003c" not in data
    assert b"\\u00e9" not in data


def test_example_without_encounter_or_names_still_matches_the_schema() -> None:
    patient = {"resourceType": "Patient", "identifier": []}
    rendered = render(make_document(patient=patient, encounter=None), example_options())

    body = json.loads(rendered.data)
    jsonschema.validate(body, json.loads(EXAMPLE_SCHEMA.read_bytes()))
    assert body["encounter"] is None
    assert body["patient"]["birthName"] is None
    assert body["patient"]["givenNames"] == []
    assert body["patient"]["gender"] == "unknown"


def test_payload_is_spliced_whole_even_when_large() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB
    rendered = render(make_document(payload=payload), example_options())

    body = json.loads(rendered.data)
    assert base64.b64decode(body["document"]["content"], validate=True) == payload
    assert b"MCPAYLOAD" not in rendered.data


def test_payload_is_not_encoded_when_the_template_does_not_use_it(tmp_path: Path) -> None:
    options = options_for(tmp_path, '{"size": {{ document.size }}}')

    assert json.loads(render(make_document(), options).data) == {"size": len(PAYLOAD)}


def test_schema_sees_the_real_base64_not_the_placeholder(tmp_path: Path) -> None:
    schema = {"properties": {"b64": {"type": "string", "maxLength": 20}}}
    options = options_for(tmp_path, '{"b64": {{ document.payload_base64 | tojson }}}', schema)

    with pytest.raises(RenderError) as caught:
        render(make_document(), options)
    length = len(base64.b64encode(PAYLOAD))
    assert f"at /b64: a string of {length} characters fails maxLength 20" in str(caught.value)
    assert "JVBER" not in str(caught.value)  # the payload is not quoted in the reason
    assert render(make_document(payload=b"short"), options).data == b'{"b64": "c2hvcnQ="}'


def test_a_cut_payload_token_is_refused(tmp_path: Path) -> None:
    options = options_for(tmp_path, '{"b64": {{ document.payload_base64[:30] | tojson }}}')

    with pytest.raises(RenderError, match="inserted whole"):
        render(make_document(), options)


def test_variables_reach_the_template(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text('{"site": {{ vars.site | tojson }}}', encoding="utf-8")
    options = JsonTemplateOptions.model_validate(
        {"template": str(tmp_path / "t.j2"), "variables": {"site": "CHU Sud"}}
    )

    assert json.loads(render(make_document(), options).data) == {"site": "CHU Sud"}


def test_includes_resolve_beside_the_template(tmp_path: Path) -> None:
    (tmp_path / "patient.j2").write_text('{"id": {{ patient.id | tojson }}}', encoding="utf-8")
    options = options_for(tmp_path, '{"patient": {% include "patient.j2" %}}')

    assert json.loads(render(make_document(), options).data) == {"patient": {"id": "pat-1"}}


# --- refusals -------------------------------------------------------------------------------


def test_invalid_json_is_refused_with_its_position(tmp_path: Path) -> None:
    # The classic mistake: quoting by hand, which breaks on the first name with a quote.
    template = '{\n  "ok": true,\n  "name": "{{ patient.name[0].family }}"\n}\n'
    options = options_for(tmp_path, template)

    with pytest.raises(RenderError, match=r"invalid JSON at line 3, column \d+"):
        render(make_document(), options)
    # The same template is fine for a name without anything to escape.
    plain = make_patient(name=[{"family": "Martin"}])
    assert json.loads(render(make_document(patient=plain), options).data)["name"] == "Martin"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": 1} trailing', "invalid JSON at line 1, column 10: Extra data"),
        ("", "invalid JSON at line 1, column 1"),
    ],
)
def test_json_that_python_tolerates_is_still_refused(
    tmp_path: Path, template: str, message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        render(make_document(), options_for(tmp_path, template))


def test_schema_violation_is_refused_with_its_path(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"patient": {"properties": {"birthDate": {"type": "integer"}}}},
    }
    options = options_for(
        tmp_path, '{"patient": {"birthDate": {{ patient.birthDate | tojson }}}}', schema
    )

    with pytest.raises(RenderError) as caught:
        render(make_document(), options)
    message = str(caught.value)
    assert "does not match s.json at /patient/birthDate" in message
    assert "is not of type 'integer'" in message
    assert "[schema /properties/patient/properties/birthDate/type]" in message


def test_example_schema_refuses_an_ins_of_the_wrong_shape() -> None:
    patient = make_patient(identifier=[{"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "12"}])

    with pytest.raises(RenderError, match="at /patient/ins"):
        render(make_document(patient=patient), example_options())


def test_undefined_name_is_an_error_not_an_empty_string(tmp_path: Path) -> None:
    template = '{\n  "birth": {{ patient.birthDate | tojson }},\n  "x": {{ patient.nmae }}\n}'
    options = options_for(tmp_path, template)

    with pytest.raises(RenderError, match=r"t\.json\.j2 line 3: .*has no attribute 'nmae'"):
        render(make_document(), options)


def test_optional_elements_are_read_with_get(tmp_path: Path) -> None:
    options = options_for(tmp_path, '{"d": {{ patient.get("deceasedBoolean") | tojson }}}')

    assert json.loads(render(make_document(), options).data) == {"d": None}


@pytest.mark.parametrize(
    "expression",
    [
        "''.__class__.__mro__",
        "document.__class__",
        "identifier.__globals__",
        "patient.update({'id': 'x'})",
        "patient.name.append(1)",
    ],
)
def test_the_sandbox_blocks_escapes_and_mutation(tmp_path: Path, expression: str) -> None:
    options = options_for(tmp_path, f'{{"x": {{{{ {expression} }}}}}}')
    document = make_document()

    with pytest.raises(RenderError, match=r"unsafe|not safely callable"):
        render(document, options)
    assert document.patient["id"] == "pat-1"
    assert len(document.patient["name"]) == 2


def test_a_value_json_cannot_hold_fails_with_the_template_line(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text('{\n"x": {{ vars.n | float | tojson }}}', encoding="utf-8")
    options = JsonTemplateOptions.model_validate(
        {"template": str(tmp_path / "t.j2"), "variables": {"n": "nan"}}
    )

    with pytest.raises(RenderError, match=r"t\.j2 line 2: ValueError: Out of range float"):
        render(make_document(), options)


# --- options: errors at config load ---------------------------------------------------------


def test_syntax_error_fails_at_load_with_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.j2").write_text('{\n  "a": {{ document.title | tojson }\n}', encoding="utf-8")

    with pytest.raises(ValidationError) as caught:
        JsonTemplateOptions.model_validate({"template": str(tmp_path / "bad.j2")})
    (error,) = caught.value.errors()
    assert error["loc"] == ("template",)
    assert "bad.j2 line 2" in error["msg"]


def test_missing_template_unknown_filter_and_bad_schema_fail_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no template file"):
        JsonTemplateOptions.model_validate({"template": str(tmp_path / "absent.j2")})
    (tmp_path / "f.j2").write_text("{{ 1 | no_such_filter }}", encoding="utf-8")
    with pytest.raises(ValidationError, match="no_such_filter"):
        JsonTemplateOptions.model_validate({"template": str(tmp_path / "f.j2")})
    (tmp_path / "ok.j2").write_text("{}", encoding="utf-8")
    (tmp_path / "s.json").write_text('{"type": "nonsense"}', encoding="utf-8")
    with pytest.raises(ValidationError) as caught:
        JsonTemplateOptions.model_validate(
            {"template": str(tmp_path / "ok.j2"), "schema": str(tmp_path / "s.json")}
        )
    (error,) = caught.value.errors()
    assert error["loc"] == ("schema",)
    assert "not a valid JSON Schema at /type" in error["msg"]
    with pytest.raises(ValidationError, match="extra"):
        JsonTemplateOptions.model_validate({"template": str(tmp_path / "ok.j2"), "colour": 1})
    with pytest.raises(ValidationError, match="media type"):
        JsonTemplateOptions.model_validate({"template": str(tmp_path / "ok.j2"), "media_type": "x"})


def test_relative_paths_resolve_against_config_dir_when_given(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("{}", encoding="utf-8")

    options = JsonTemplateOptions.model_validate(
        {"template": "t.j2"}, context={"config_dir": str(tmp_path)}
    )
    assert options.template == tmp_path / "t.j2"


def _plugins() -> Any:
    plugins = load_plugins()
    if "json-template" not in plugins.formats:  # before pyproject lists the entry point
        plugins = load_plugins(extra=[json_template_plugin])
    return plugins


def test_registered_and_a_bad_template_fails_config_check_with_the_key_path(
    tmp_path: Path,
) -> None:
    (tmp_path / "bad.j2").write_text("{% if %}", encoding="utf-8")
    route = f"""
routes:
  - name: vendor
    match: {{organizations: [Organization/demo-json]}}
    format: json-template
    format_options: {{template: {tmp_path / "bad.j2"}}}
    deliver: {{connector: mllp, address: "127.0.0.1:1"}}
"""
    plugins = _plugins()
    assert "json-template" in plugins.formats

    with pytest.raises(
        ConfigError, match=r"routes\[0\]\.format_options\.template: .*bad\.j2 line 1"
    ):
        parse_config(route, plugins, "t.yaml", env={})


def test_a_lone_surrogate_cannot_be_sent_as_utf8(tmp_path: Path) -> None:
    patient = make_patient(name=[{"family": "Bad\udcff"}])
    options = options_for(tmp_path, '{"n": {{ human_name().family | tojson }}}')

    with pytest.raises(RenderError, match="lone surrogate"):
        render(make_document(patient=patient), options)
