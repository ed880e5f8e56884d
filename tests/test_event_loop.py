"""The engine's event loop (engine/event_loop.py): uvloop by default, asyncio's on request, and
the running engine says which it runs on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop

from medcourier.engine.event_loop import ENV, loop_factory
from tests.harness import free_port


def test_uvloop_by_default_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv(ENV, "asyncio")
    assert loop_factory() is asyncio.new_event_loop
    monkeypatch.setenv(ENV, "trio")
    with pytest.raises(ValueError, match="uvloop or asyncio"):
        loop_factory()


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_medcourier_run_runs_on_the_chosen_loop(tmp_path: Path, choice: str) -> None:
    config = tmp_path / "engine.yaml"
    port = free_port()
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nhttp: {{host: 127.0.0.1, port: {port}}}\n"
        "log_level: info\nroutes: []\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcourier.engine.cli", "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        env={**os.environ, ENV: choice},
    )
    started = None
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while started is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "engine started":
                started = event
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert started is not None, "the engine did not start"
    assert started["event_loop"] == choice
