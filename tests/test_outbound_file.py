"""The ``file`` connector: whole files or none, nothing replaced, trouble held for a retry.

The tests run as whatever user CI uses, root included, so each failure is provoked in a way
permissions cannot bypass (a directory squatting a file name, a regular file standing where a
folder is expected) or by making the system call fail the way a full disk does.
"""

from __future__ import annotations

import asyncio
import errno
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from medcourier.channels.file import outbound
from medcourier.channels.file import plugin as file_plugin
from medcourier.channels.file.outbound import FileOptions, FileSender
from medcourier.engine.model import DeliveryResult, Outcome, Rendered
from medcourier.engine.plugins import load_plugins
from tests.harness import LoopThread, pdf_bytes, running_engine

TXID = "018d2b244b5d1a2b3c4d"  # 0x018d2b244b5d ms = 2024-01-21T08:30:15.389Z
DATA = b"H|~^\\&|||MEDCOURIER\rP|1||IPP42\rL|1\r" * 100


def rendered(data: bytes = DATA, hint: str = f"{TXID}.hpr", message_id: str = TXID) -> Rendered:
    return Rendered(data=data, media_type="text/plain", filename_hint=hint, message_id=message_id)


def sender(directory: Path, **options: Any) -> FileSender:
    return FileSender(FileOptions(directory=directory, **options))


def deliver(s: FileSender, r: Rendered) -> DeliveryResult:
    return asyncio.run(s.deliver(r))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_writes_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    result = deliver(sender(tmp_path), rendered())

    assert result.outcome is Outcome.ACCEPTED
    assert result.detail == {
        "path": str(tmp_path / f"{TXID}.hpr"),
        "size": len(DATA),
        "duplicate": False,
    }
    assert (tmp_path / f"{TXID}.hpr").read_bytes() == DATA
    assert listing(tmp_path) == [f"{TXID}.hpr"]


def test_ok_file_is_created_after_the_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_when_ok_created: list[list[str]] = []
    real_touch = outbound._touch

    def spy(path: Path) -> None:
        seen_when_ok_created.append(listing(tmp_path))
        real_touch(path)

    monkeypatch.setattr(outbound, "_touch", spy)
    result = deliver(sender(tmp_path, ok_file=True), rendered())

    assert result.outcome is Outcome.ACCEPTED
    # When the .ok appears the data file already has its final name and full content.
    assert seen_when_ok_created == [[f"{TXID}.hpr"]]
    assert listing(tmp_path) == [f"{TXID}.hpr", f"{TXID}.hpr.ok"]
    assert (tmp_path / f"{TXID}.hpr.ok").read_bytes() == b""


def test_ok_name_can_replace_the_extension(tmp_path: Path) -> None:
    deliver(sender(tmp_path, ok_file=True, ok_name="{stem}.OK"), rendered())

    assert listing(tmp_path) == [f"{TXID}.OK", f"{TXID}.hpr"]


def test_filename_template_fields(tmp_path: Path) -> None:
    s = sender(
        tmp_path,
        filename="CR_{created:%Y%m%d%H%M%S}_{transaction_id}{suffix}",
        timezone="Europe/Paris",
    )

    result = deliver(s, rendered())

    # The time comes from the transaction id (stable across retries), in the route's zone.
    assert listing(tmp_path) == [f"CR_20240121093015_{TXID}.hpr"]
    assert result.detail["path"].endswith(f"CR_20240121093015_{TXID}.hpr")


def test_same_content_again_is_an_idempotent_success(tmp_path: Path) -> None:
    s = sender(tmp_path, ok_file=True)
    deliver(s, rendered())
    (tmp_path / f"{TXID}.hpr.ok").unlink()  # as if the engine crashed before writing it

    result = deliver(s, rendered())

    assert result.outcome is Outcome.ACCEPTED
    assert result.detail["duplicate"] is True
    assert listing(tmp_path) == [f"{TXID}.hpr", f"{TXID}.hpr.ok"]


def test_a_taken_name_with_other_content_gets_a_suffix_and_is_never_replaced(
    tmp_path: Path,
) -> None:
    (tmp_path / f"{TXID}.hpr").write_bytes(b"someone else's file")
    (tmp_path / f"{TXID}-1.hpr").write_bytes(b"and another")
    s = sender(tmp_path, ok_file=True)

    result = deliver(s, rendered())

    assert result.outcome is Outcome.ACCEPTED
    assert (tmp_path / f"{TXID}.hpr").read_bytes() == b"someone else's file"
    assert (tmp_path / f"{TXID}-1.hpr").read_bytes() == b"and another"
    assert (tmp_path / f"{TXID}-2.hpr").read_bytes() == DATA
    assert (tmp_path / f"{TXID}-2.hpr.ok").exists()
    # And a retry of the same message finds its own file under the suffixed name.
    again = deliver(s, rendered())
    assert again.detail == {"path": str(tmp_path / f"{TXID}-2.hpr"), "duplicate": True}
    assert len(listing(tmp_path)) == 4


def test_a_name_taken_between_the_check_and_the_link_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = outbound._write_temp

    def racing_write(temp: Path, data: bytes) -> None:
        real_write(temp, data)
        (tmp_path / f"{TXID}.hpr").write_bytes(b"arrived meanwhile")

    monkeypatch.setattr(outbound, "_write_temp", racing_write)
    result = deliver(sender(tmp_path), rendered())

    assert result.outcome is Outcome.ACCEPTED
    assert (tmp_path / f"{TXID}.hpr").read_bytes() == b"arrived meanwhile"
    assert (tmp_path / f"{TXID}-1.hpr").read_bytes() == DATA
    assert listing(tmp_path) == [f"{TXID}-1.hpr", f"{TXID}.hpr"]


def test_without_hard_links_it_falls_back_to_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / f"{TXID}.hpr").write_bytes(b"taken")

    result = deliver(sender(tmp_path), rendered())

    assert result.outcome is Outcome.ACCEPTED
    assert (tmp_path / f"{TXID}.hpr").read_bytes() == b"taken"
    assert (tmp_path / f"{TXID}-1.hpr").read_bytes() == DATA
    assert listing(tmp_path) == [f"{TXID}-1.hpr", f"{TXID}.hpr"]


def test_a_stale_temporary_from_a_crash_is_replaced(tmp_path: Path) -> None:
    (tmp_path / f".{TXID}.hpr.tmp").write_bytes(b"half a fi")

    deliver(sender(tmp_path), rendered())

    assert listing(tmp_path) == [f"{TXID}.hpr"]
    assert (tmp_path / f"{TXID}.hpr").read_bytes() == DATA


# --- failures are retries -------------------------------------------------------------------


def test_full_disk_is_a_retry_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        if len(data) > 100:
            real_write(fd, bytes(data[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)  # only while this test runs
    result = deliver(sender(tmp_path, ok_file=True), rendered())

    assert result.outcome is Outcome.RETRY
    assert str(result.reason).endswith(": No space left on device (ENOSPC)")
    assert str(tmp_path) in str(result.reason)
    assert listing(tmp_path) == []  # no partial file, no temporary, no .ok


def test_an_unwritable_temporary_name_is_a_retry_even_as_root(tmp_path: Path) -> None:
    # A directory squatting the temporary name: unlink() and open() fail whoever we are.
    (tmp_path / f".{TXID}.hpr.tmp").mkdir()

    result = deliver(sender(tmp_path), rendered())

    assert result.outcome is Outcome.RETRY
    assert "cannot write" in str(result.reason)
    assert "(EISDIR)" in str(result.reason) or "(EPERM)" in str(result.reason)
    assert not (tmp_path / f"{TXID}.hpr").exists()


def test_a_file_where_the_folder_should_be_is_a_retry(tmp_path: Path) -> None:
    (tmp_path / "share").write_bytes(b"")

    for directory in (tmp_path / "share", tmp_path / "share" / "out"):
        result = deliver(sender(directory, create_directory=True), rendered())
        assert result.outcome is Outcome.RETRY, directory
        assert "not a directory" in str(result.reason).lower()


def test_a_missing_folder_is_a_retry_unless_creation_is_asked(tmp_path: Path) -> None:
    directory = tmp_path / "mnt" / "hprim"

    held = deliver(sender(directory), rendered())
    assert held.outcome is Outcome.RETRY
    assert held.reason == f"directory {directory} does not exist (not mounted?)"
    assert not directory.exists()

    created = deliver(sender(directory, create_directory=True), rendered())
    assert created.outcome is Outcome.ACCEPTED
    assert listing(directory) == [f"{TXID}.hpr"]


def test_an_ok_file_that_cannot_be_written_is_a_retry_completed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path) -> None:
        raise OSError(errno.EACCES, "Permission denied", str(path))

    s = sender(tmp_path, ok_file=True)
    with monkeypatch.context() as m:
        m.setattr(outbound, "_touch", refuse)
        first = deliver(s, rendered())
    assert first.outcome is Outcome.RETRY
    assert "written but cannot write" in str(first.reason)
    assert "Permission denied (EACCES)" in str(first.reason)

    second = deliver(s, rendered())
    assert second.outcome is Outcome.ACCEPTED
    assert listing(tmp_path) == [f"{TXID}.hpr", f"{TXID}.hpr.ok"]


def test_unusable_names_are_rejected_not_retried(tmp_path: Path) -> None:
    s = sender(tmp_path)

    too_long = deliver(s, rendered(hint="x" * 251 + ".hpr"))
    hidden = deliver(s, rendered(hint="../../x.hpr"))

    assert too_long.outcome is Outcome.REJECTED
    assert "longer than 250 bytes" in str(too_long.reason)
    assert hidden.outcome is Outcome.REJECTED
    assert "starts with a dot" in str(hidden.reason)
    assert listing(tmp_path) == []


def test_separators_in_values_cannot_escape_the_folder(tmp_path: Path) -> None:
    result = deliver(
        sender(tmp_path / "out", create_directory=True), rendered(hint="a/../b\\c.hpr")
    )

    assert result.outcome is Outcome.ACCEPTED
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["a_.._b_c.hpr"]


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"filename": "{route}.hpr"}, "not passed to connectors yet"),
        ({"filename": "{unknown}"}, "unknown field"),
        ({"filename": "sub/{hint}"}, "a file name, not a path"),
        ({"filename": ".{hint}"}, "starts with a dot"),
        ({"filename": "{hint.upper}"}, "unknown field"),
        ({"filename": "{transaction_id:%Y}"}, "cannot be formatted"),
        ({"filename": "{hint"}, "not a valid format string"),
        ({"filename": "{hint}" + "x" * 240}, "longer than 250 bytes"),
        ({"ok_name": "{hint}.ok"}, "unknown field"),
        ({"ok_name": "{stem}.hpr"}, "must differ from the data file"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"colour": "red"}, "extra"),
    ],
)
def test_bad_options_fail_at_config_load(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        FileOptions(directory=tmp_path, **options)


def test_created_falls_back_to_now_for_other_message_ids(tmp_path: Path) -> None:
    s = sender(tmp_path, filename="{created:%Y}-{message_id}.txt")

    name = s.file_name(rendered(message_id="MSG-1"))

    assert name == f"{datetime.now(UTC).year}-MSG-1.txt"


def test_the_plugin_registers_the_file_connector(tmp_path: Path) -> None:
    plugins = load_plugins()
    if "file" not in plugins.connectors:  # before pyproject lists the entry point
        plugins = load_plugins(extra=[file_plugin])
    connector = plugins.connectors["file"]
    options = connector.options_model.model_validate(
        {"connector": "file", "directory": str(tmp_path), "ok_file": "true"}
    )
    assert isinstance(options, FileOptions)
    assert options.ok_file is True
    assert isinstance(connector.open(options), FileSender)


def test_files_through_the_engine(lt: LoopThread, tmp_path: Path) -> None:
    """$send-to-ehr → hl7v2-oru → file: the message lands with its .ok, nothing else."""
    out = tmp_path / "out" / "hprim"
    route = {
        "name": "demo-files",
        "match": {"organizations": ["Organization/demo-files"]},
        "format": "hl7v2-oru",
        "deliver": {
            "connector": "file",
            "directory": str(out),
            "create_directory": True,
            "ok_file": True,
            "filename": "ORU_{created:%Y%m%d}_{transaction_id}{suffix}",
        },
    }
    plugins = load_plugins()
    extra = () if "file" in plugins.connectors else (file_plugin,)
    with running_engine(lt, tmp_path, extra_routes=[route], extra_plugins=extra) as eng:
        patient = eng.patient(
            name=[{"family": "Martin"}],
            managingOrganization={"reference": "Organization/demo-files"},
        )
        txid = eng.send(patient, None, pdf_bytes(2000)).json()["parameter"][1]["valueString"]
        eng.wait_status(txid, {"completed"})

    day = datetime.fromtimestamp(int(txid[:12], 16) / 1000, UTC).strftime("%Y%m%d")
    name = f"ORU_{day}_{txid}.hl7"
    assert listing(out) == [name, f"{name}.ok"]
    assert (out / name).read_bytes().startswith(b"MSH|^~\\&|")


def test_hprim_companion_is_written_before_the_file_that_names_it(tmp_path: Path) -> None:
    """An HPRIM file in FIC mode names its PDF: the PDF lands first, the .ok last."""
    from medcourier.transforms.hprim.writer import HprimOptions, render

    doc_payload = pdf_bytes(2000)
    from medcourier.engine.model import Document

    document = Document(
        transaction_id="01a200c28a731cd4e468",
        created_at=datetime(2026, 11, 21, 12, 0, tzinfo=UTC),
        content_type="application/pdf",
        document_type="11488-4",
        title="CR",
        payload=doc_payload,
        patient={
            "resourceType": "Patient",
            "id": "p",
            "name": [{"family": "Durand"}],
            "identifier": [{"system": "urn:oid:1.2.3", "value": "IPP1"}],
        },
    )
    rendered = render(document, HprimOptions(receiver_id="CHG77"))
    assert len(rendered.companions) == 1
    companion_name, companion_data = rendered.companions[0]
    assert companion_data == doc_payload
    assert companion_name.encode("latin-1") in rendered.data  # the FIC OBX names it

    result = asyncio.run(sender(tmp_path, ok_file=True).deliver(rendered))
    assert result.outcome is Outcome.ACCEPTED
    written = {p.name: p for p in tmp_path.iterdir()}
    main = written[rendered.filename_hint]
    assert written[companion_name].read_bytes() == doc_payload
    ok = written[f"{main.name}.ok"]
    # written in that order (the clock may not tell them apart, hence <=)
    times = [p.stat().st_mtime_ns for p in (written[companion_name], main, ok)]
    assert times == sorted(times)
