"""The plugin contract, end to end through pluggy: built-ins load from the entry-point group,
and a third-party plugin (a small class registered for one test) sees every hook fire."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from medcourier.engine import hookspecs
from medcourier.engine.model import Document, Issue, Status
from medcourier.engine.plugins import hookimpl, load_plugins
from tests.harness import LoopThread, pdf_bytes, running_engine


def test_builtins_register_through_the_entry_point_group() -> None:
    plugins = load_plugins()
    assert "hl7v2-oru" in plugins.formats
    assert "mllp" in plugins.connectors
    assert "simulate-ehr" in plugins.commands
    names = {plugins.pm.get_name(p) for p in plugins.pm.get_plugins()}
    assert {"hl7v2-oru", "mllp"} <= names


class Recorder:
    """A third-party plugin: records status changes, refuses documents titled 'REFUSE'."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, Status | None, Status]] = []

    @hookimpl
    def medcourier_status_changed(
        self, transaction_id: str, route: str, old: Status | None, new: Status
    ) -> None:
        self.changes.append((transaction_id, route, old, new))

    @hookimpl
    def medcourier_validate(self, document: Document) -> list[Issue]:
        if document.title == "REFUSE":
            return [Issue("the recorder plugin refuses this title")]
        return []


def test_status_and_validate_hooks_fire(lt: LoopThread, tmp_path: Path) -> None:
    rec = Recorder()
    with running_engine(lt, tmp_path, extra_plugins=(rec,)) as eng:
        pid = eng.patient(name=[{"family": "Hook", "given": ["Test"]}])
        ok = eng.send(pid, None, pdf_bytes(300)).json()["parameter"][1]["valueString"]
        bad = eng.send(pid, None, pdf_bytes(300), document_title="REFUSE").json()["parameter"][1][
            "valueString"
        ]
        eng.wait_status(ok, {"completed"})
        bundle = eng.wait_status(bad, {"entered-in-error"})
    assert "recorder plugin refuses" in bundle["entry"][0]["resource"]["statusReason"]["text"]
    ok_changes = [(old, new) for t, _r, old, new in rec.changes if t == ok]
    assert ok_changes == [
        (None, Status.PREPARATION),
        (Status.PREPARATION, Status.IN_PROGRESS),
        (Status.IN_PROGRESS, Status.COMPLETED),
    ]
    assert (Status.IN_PROGRESS, Status.ENTERED_IN_ERROR) in [
        (old, new) for t, _r, old, new in rec.changes if t == bad
    ]


def test_every_hook_is_documented_and_prefixed() -> None:
    specs = [
        (n, f)
        for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(f, "medcourier_spec")
    ]
    assert {n for n, _ in specs} == {
        "medcourier_formats",
        "medcourier_connectors",
        "medcourier_validate",
        "medcourier_status_changed",
        "medcourier_inbound_channels",
        "medcourier_interpret_message",
        "medcourier_cli_commands",
    }
    for name, fn in specs:
        doc: Any = inspect.getdoc(fn)
        assert doc and doc.splitlines()[0].endswith("."), name
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, (name, param)
