"""Config loading: interpolation, and `medcourier check` naming file, key path and reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medcourier.engine.config import parse_config
from medcourier.engine.errors import ConfigError
from medcourier.engine.plugins import load_plugins

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"

ROUTE = """
tokens:
  - {name: app, token: "${TOKEN}", scopes: [SEND_TO_EHR]}
routes:
  - name: r1
    match: {organizations: [Organization/a]}
    format: hl7v2-oru
    deliver: {connector: mllp, address: "${EHR:-127.0.0.1:6661}"}
"""


def _check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "medcourier.engine.cli", "check", str(path)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def test_interpolation_with_defaults_and_environment() -> None:
    plugins = load_plugins()
    cfg = parse_config(ROUTE, plugins, "t.yaml", env={"TOKEN": "x" * 20})
    assert cfg.settings.tokens[0].token == "x" * 20
    assert (cfg.routes[0].deliver_options.host, cfg.routes[0].deliver_options.port) == (
        "127.0.0.1",
        6661,
    )
    cfg = parse_config(ROUTE, plugins, "t.yaml", env={"TOKEN": "y" * 20, "EHR": "10.1.2.3:2575"})
    assert cfg.routes[0].deliver_options.port == 2575


def test_unset_variable_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(ROUTE, load_plugins(), "t.yaml", env={})
    assert "t.yaml: tokens[0].token: environment variable TOKEN is not set" in str(err.value)


def test_example_config_checks(tmp_path: Path) -> None:
    r = _check(EXAMPLE, {"MEDCOURIER_API_TOKEN": "t" * 32})
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ("port: 6661", "routes[1].deliver.port"),
        ("format: hl7v2-oru", "routes[1].format: unknown format 'nope'"),
        ("connector: mllp", "routes[1].deliver.connector: unknown connector 'carrier-pigeon'"),
        ("sending_application: X", "routes[1].format_options.colour"),
        ("organizations: [Organization/b]", "routes[1].match.organizations"),
    ],
)
def test_check_names_file_path_and_reason(tmp_path: Path, mutation: str, expected: str) -> None:
    bad = {
        "port: 6661": "port: 99999",
        "format: hl7v2-oru": "format: nope",
        "connector: mllp": "connector: carrier-pigeon",
        "sending_application: X": "colour: blue",
        "organizations: [Organization/b]": "organizations: [Hospital/b]",
    }[mutation]
    second = """
  - name: r2
    match:
      organizations: [Organization/b]
    format: hl7v2-oru
    format_options:
      sending_application: X
    deliver:
      connector: mllp
      host: 127.0.0.1
      port: 6661
""".replace(mutation, bad)
    path = tmp_path / "bad.yaml"
    path.write_text(ROUTE + second)
    r = _check(path, {"TOKEN": "z" * 20})
    assert r.returncode != 0
    assert f"{path}: " in r.stderr
    assert expected in r.stderr, r.stderr


def test_duplicate_route_and_two_fallbacks(tmp_path: Path) -> None:
    text = (
        ROUTE
        + """
  - name: r1
    match: {fallback: true}
    format: hl7v2-oru
    deliver: {connector: mllp, host: h, port: 1}
  - name: r3
    match: {fallback: true}
    format: hl7v2-oru
    deliver: {connector: mllp, host: h, port: 1}
"""
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, load_plugins(), "t.yaml", env={"TOKEN": "x" * 20})
    assert "routes[1].name: duplicate route name 'r1'" in str(err.value)
    assert "at most one route may have match.fallback" in str(err.value)


def test_inbound_channels_are_checked_by_their_plugin() -> None:
    text = (
        ROUTE
        + """
inbound:
  - name: in1
    channel: mllp
    port: 70000
  - name: in2
    channel: carrier-pigeon
  - name: in3
    channel: filedrop
    path: /tmp/x
    routes: [nope]
"""
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, load_plugins(), "t.yaml", env={"TOKEN": "x" * 20})
    message = str(err.value)
    assert "inbound[0].port" in message
    assert "inbound[1].channel: unknown inbound channel 'carrier-pigeon'" in message
    assert "inbound[2].routes[0]: no route named 'nope'" in message
