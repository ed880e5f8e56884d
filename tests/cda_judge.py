"""The CI-SIS CDA judge (../shared/validators/cda/cda_check.py), found in one place.

It is pointed at where it lies, never copied. Missing, it fails the test that needs it with a
clear message: a CDA nobody checked cannot be trusted, so this is never a skip.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

JUDGE_DIR = Path(__file__).resolve().parents[2] / "shared" / "validators" / "cda"
SCRIPT = JUDGE_DIR / "cda_check.py"
REFERENCE = JUDGE_DIR / "examples" / "DOC_NON_STRUCTURE_CDA-R2-N1.xml"

Judge = Callable[[bytes | Path], list[str]]


def _require() -> None:
    if not SCRIPT.is_file():
        pytest.fail(
            f"the CDA judge is missing: expected {SCRIPT} (CI-SIS XSD + StrucMin schematron, "
            "shared beside the repository); CDA output cannot be trusted without it"
        )


def in_process() -> Judge:
    """``check`` loaded in this process: fast, the schematron compiled once per session."""
    _require()
    spec = importlib.util.spec_from_file_location("cda_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check: Judge = module.check
    return check


def in_subprocess() -> Callable[[bytes], list[str]]:
    """The judge in its own process. Its Saxon runtime (a GraalVM native image) installs
    process-wide handlers that later subprocess signals in the same test process can trip
    (the run then exits with status 99): tests that also drive engine processes use this."""
    _require()

    def check(cda: bytes) -> list[str]:
        with tempfile.NamedTemporaryFile(suffix=".xml") as f:
            f.write(cda)
            f.flush()
            done = subprocess.run(
                [sys.executable, str(SCRIPT), f.name],
                capture_output=True,
                text=True,
                timeout=120,
            )
        return [] if done.returncode == 0 else [done.stdout + done.stderr]

    return check
