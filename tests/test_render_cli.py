"""`medcourier render` prints what a route would send, without sending anything."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CMD = [sys.executable, "-m", "medcourier.engine.cli", "render"]
ENV = {**os.environ, "MEDCOURIER_API_TOKEN": "render-test-token-0123456789"}


def test_render_prints_the_routes_message() -> None:
    r = subprocess.run(
        [
            *CMD,
            "--config",
            str(ROOT / "config/example.yaml"),
            "--route",
            "demo-ehr",
            "--input",
            str(ROOT / "config/examples/document.json"),
        ],
        capture_output=True,
        env=ENV,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode()
    segments = r.stdout.decode("utf-8").split("\r")
    assert segments[0].startswith("MSH|^~\\&|")
    obx = next(s for s in segments if s.startswith("OBX|")).split("|")
    sent = base64.b64decode(obx[5].split("^")[4])
    assert sent == (ROOT / "config/examples/document.txt").read_bytes()
    pid = next(s for s in segments if s.startswith("PID|"))
    assert "Dupont^Zoé^Marie" in pid


def test_render_names_an_unknown_route(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            *CMD,
            "--config",
            str(ROOT / "config/example.yaml"),
            "--route",
            "nowhere",
            "--input",
            str(ROOT / "config/examples/document.json"),
        ],
        capture_output=True,
        env=ENV,
        timeout=60,
    )
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "no route named 'nowhere' (routes: demo-ehr" in err
