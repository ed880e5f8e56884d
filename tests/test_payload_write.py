"""Large values go into the store without copies of them in the driver (engine/payload_write.py).

What is checked, on SQLite and PostgreSQL:

- a payload reads back byte for byte at every size that matters: small, the last size written
  with a plain ``INSERT``, the first written the other way, several slices and a bit; and the
  threshold decides which way it is written;
- the other columns of a row written the large way (text in and out of ASCII, a timestamp with
  time zone to the microsecond, NULL) read back as the plain ``INSERT`` stores them; a Binary's
  bytes too;
- errors: a duplicate key on the large path is SQLAlchemy's ``IntegrityError`` as on the plain
  one; a write that fails after its large payload is in, rolled back to its savepoint, leaves
  nothing of it, its neighbours in the transaction are committed (by hand and through the group
  commit);
- nothing keeps the payload once it is written: not SQLAlchemy's statement cache (the first
  payload used to stay in it for the process's life), not the driver;
- memory: writing a 32 MiB payload raises a fresh process's peak resident set by a small part of
  the payload, not by the one (PostgreSQL) or two (SQLite) copies a plain ``INSERT`` makes, and
  leaves nothing of it behind (libpq kept its copy for the connection's life). The bounds have
  wide margins: they fail when the large path is undone, not on allocator noise.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from medcourier.engine import payload_write
from medcourier.engine.payload_read import DIRECT_READ_BYTES, read_payload
from medcourier.engine.payload_write import (
    DIRECT_WRITE_BYTES,
    WRITE_SLICE,
    insert_payload,
    insert_row,
)
from medcourier.engine.schema import binaries, documents, payloads
from medcourier.engine.store import AsyncStore, Store
from tests.harness import PROC_STATUS
from tests.services import own_postgres_database

MIB = 1024 * 1024


def pdf(size: int) -> bytes:
    return b"%PDF-1.4\n" + os.urandom(size - 9)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[str]:
    """A database for this module alone: it counts rows."""
    with own_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = None if request.param == "sqlite" else str(request.getfixturevalue("own_postgres"))
    s = Store(url, tmp_path / "data")
    s.create_schema()
    yield s
    s.dispose()


def document(payload: bytes, routes: tuple[str, ...] = ("r",)) -> dict[str, Any]:
    return {
        "transaction_id": uuid.uuid4().hex[:20],
        "created_at": datetime.now(UTC),
        "content_type": "application/pdf",
        "document_type": "11488-4",
        "title": "t",
        "sender_identifier": None,
        "sender_application": "test",
        "patient_id": "p-1",
        "encounter_id": None,
        "payload": payload,
        "routes": list(routes),
    }


def stored(store: Store, txid: str) -> bytes | None:
    """The payload as a plain SELECT reads it (not through engine/payload_read.py)."""
    with store.engine.connect() as c:
        data = c.execute(
            sa.select(payloads.c.data).where(payloads.c.transaction_id == txid)
        ).scalar()
    return None if data is None else bytes(data)


def has_document(store: Store, txid: str) -> bool:
    with store.engine.connect() as c:
        q = sa.select(sa.func.count()).where(documents.c.transaction_id == txid)
        return bool(c.execute(q).scalar_one())


# --- the bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [4096, DIRECT_WRITE_BYTES, DIRECT_WRITE_BYTES + 1, 3 * WRITE_SLICE, 3 * WRITE_SLICE + 7],
    ids=["4k", "direct-max", "direct-max+1", "three-slices", "three-slices+7"],
)
def test_a_payload_reads_back_exactly(
    store: Store, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    large_writes: list[str] = []
    for name in ("_sqlite_blob", "_postgresql_copy"):
        real = getattr(payload_write, name)

        def spy(*args: Any, _real: Any = real, _name: str = name) -> None:
            large_writes.append(_name)
            _real(*args)

        monkeypatch.setattr(payload_write, name, spy)
    payload = pdf(size)
    doc = document(payload)
    store.accept_document(**doc)
    assert stored(store, doc["transaction_id"]) == payload
    with store.engine.connect() as c:
        assert read_payload(c, doc["transaction_id"], size) == payload
        q = sa.select(documents.c.payload_size).where(
            documents.c.transaction_id == doc["transaction_id"]
        )
        assert c.execute(q).scalar_one() == size
    expected = "_sqlite_blob" if store.is_sqlite else "_postgresql_copy"
    assert large_writes == ([expected] if size > DIRECT_WRITE_BYTES else [])


def test_a_compressible_payload_reads_back_exactly(store: Store) -> None:
    payload = b"%PDF-1.4\n" + b"compressible " * (3 * MIB // 13)  # TOAST compresses it
    doc = document(payload)
    store.accept_document(**doc)
    assert stored(store, doc["transaction_id"]) == payload


def test_the_other_columns_of_a_large_row_read_back_as_a_plain_insert_stores_them(
    store: Store,
) -> None:
    """A table of the test's own: text out of ASCII, NULL, a timestamp in another zone, the
    large column between the others; one row written the large way, one the plain way."""
    table = sa.Table(
        f"t_{uuid.uuid4().hex[:8]}",
        sa.MetaData(),
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label", sa.String(100), nullable=False),
    )
    table.create(store.engine)
    at = datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    rows: list[dict[str, Any]] = [
        {"id": "large", "data": pdf(DIRECT_WRITE_BYTES + 3), "note": None, "label": "hôpital"},
        {"id": "plain", "data": pdf(100), "note": "é ü 名前 ✓", "label": "hôpital"},
        {"id": "large2", "data": pdf(2 * MIB), "note": "ça", "label": "Compte rendu"},
    ]
    with store.engine.begin() as c:
        for row in rows:
            insert_row(c, table, {**row, "at": at}, "data")
    with store.engine.connect() as c:
        got = {r.id: r for r in c.execute(sa.select(table))}
    for row in rows:
        r = got[row["id"]]
        assert bytes(r.data) == row["data"]
        assert (r.note, r.label) == (row["note"], row["label"])
        assert r.at == got["plain"].at  # SQLite keeps the wall-clock time, without its zone
    if not store.is_sqlite:
        assert got["large"].at == at


@pytest.mark.parametrize(
    "size",
    [0, 5, DIRECT_READ_BYTES, DIRECT_READ_BYTES + 1],
    ids=["empty", "5b", "direct-max", "direct-max+1"],
)
def test_a_binary_of_any_size_reads_back_exactly(store: Store, size: int) -> None:
    data = pdf(max(size, 16))[:size]
    resource = store.transaction(store.tx_put_binary, "application/pdf", data)
    assert store.get_binary(resource["id"]) == ("application/pdf", data)
    assert store.get_binary("no-such-binary") is None


def test_a_large_binary_reads_back_exactly(store: Store) -> None:
    data = pdf(2 * MIB + 5)
    resource = store.transaction(store.tx_put_binary, "application/pdf", data)
    assert store.get_binary(resource["id"]) == ("application/pdf", data)
    with store.engine.connect() as c:
        created = c.execute(
            sa.select(binaries.c.created_at).where(binaries.c.id == resource["id"])
        ).scalar_one()
    created = created.replace(tzinfo=created.tzinfo or UTC)
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=5)


def test_a_python_side_default_must_be_passed_on_postgresql(
    own_postgres: str, tmp_path: Path
) -> None:
    """PostgreSQL only: SQLite's large path inserts through SQLAlchemy, which applies them."""
    store = Store(own_postgres, tmp_path / "data")
    table = sa.Table(
        f"t_{uuid.uuid4().hex[:8]}",
        sa.MetaData(),
        sa.Column("id", sa.String(20), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("extra", sa.Text, nullable=False, default="{}"),
    )
    table.create(store.engine)
    try:
        with pytest.raises(ValueError, match="default"), store.engine.begin() as c:
            insert_row(c, table, {"id": "a", "data": pdf(2 * MIB)}, "data")
    finally:
        store.dispose()


# --- errors and savepoints -------------------------------------------------------------------


@pytest.mark.parametrize("size", [4096, 2 * MIB], ids=["small", "large"])
def test_a_duplicate_payload_is_an_integrity_error_and_the_transaction_goes_on(
    store: Store, size: int
) -> None:
    txid = uuid.uuid4().hex[:20]
    first, second = pdf(size), pdf(size)
    with store.engine.begin() as c:
        insert_payload(c, txid, first)
        savepoint = c.begin_nested()
        with pytest.raises(sa.exc.IntegrityError):
            insert_payload(c, txid, second)
        savepoint.rollback()
        other = uuid.uuid4().hex[:20]
        insert_payload(c, other, second)
    assert stored(store, txid) == first
    assert stored(store, other) == second


def test_a_large_write_rolled_back_to_its_savepoint_leaves_nothing(store: Store) -> None:
    """Three writes in one transaction, each in a savepoint, as the group commit runs them; the
    middle one fails after its large payload is written (a route twice: the second delivery
    row is a duplicate key)."""
    before = document(pdf(3 * MIB))
    failing = document(pdf(3 * MIB), ("r", "r"))
    after = document(pdf(2 * MIB + 1))
    with store.engine.begin() as c:
        for doc in (before, failing, after):
            savepoint = c.begin_nested()
            try:
                store.tx_accept_document(c, **doc)
            except sa.exc.IntegrityError:
                assert doc is failing
                savepoint.rollback()
            else:
                savepoint.commit()
    assert stored(store, failing["transaction_id"]) is None
    assert not has_document(store, failing["transaction_id"])
    assert stored(store, before["transaction_id"]) == before["payload"]
    assert stored(store, after["transaction_id"]) == after["payload"]


def test_through_the_group_commit_a_failing_large_write_fails_alone(store: Store) -> None:
    """Writes sent together through ``AsyncStore.write``, however the group commit batches
    them: the one that fails leaves nothing, the others are committed."""
    docs = [document(pdf(2 * MIB + i)) for i in range(3)] + [document(pdf(4096))]
    failing = document(pdf(3 * MIB), ("r", "r"))
    docs.insert(2, failing)
    astore = AsyncStore(store)

    async def send_all() -> list[BaseException | None]:
        return await asyncio.gather(
            *(astore.write(store.tx_accept_document, **d) for d in docs), return_exceptions=True
        )

    try:
        outcomes = asyncio.run(send_all())
    finally:
        astore.close()  # disposes of the engine; the fixture's dispose does nothing more
    for doc, outcome in zip(docs, outcomes, strict=True):
        if doc is failing:
            assert isinstance(outcome, sa.exc.IntegrityError)
            assert stored(store, doc["transaction_id"]) is None
            assert not has_document(store, doc["transaction_id"])
        else:
            assert outcome is None
            assert stored(store, doc["transaction_id"]) == doc["payload"]


# --- nothing keeps the payload ---------------------------------------------------------------


@pytest.mark.parametrize("size", [4096, 2 * MIB], ids=["small", "large"])
def test_nothing_keeps_a_written_payload(store: Store, size: int) -> None:
    """Neither the statement cache nor the driver holds a reference to the payload afterwards:
    written twice (the second write meets the cached statements), each payload's reference count
    is back to what it was."""
    for _ in range(2):
        doc = document(pdf(size))
        payload = doc["payload"]
        gc.collect()
        refs = sys.getrefcount(payload)
        store.accept_document(**doc)
        del doc["payload"]
        gc.collect()
        assert sys.getrefcount(payload) == refs - 1, [
            type(r).__name__ for r in gc.get_referrers(payload)
        ]


@pytest.mark.parametrize("size", [4096, 2 * MIB], ids=["small", "large"])
def test_nothing_keeps_a_written_binary(store: Store, size: int) -> None:
    for _ in range(2):
        data = pdf(size)
        gc.collect()
        refs = sys.getrefcount(data)
        store.transaction(store.tx_put_binary, "application/pdf", data)
        gc.collect()
        assert sys.getrefcount(data) == refs


_WRITE_IN_A_FRESH_PROCESS = (
    PROC_STATUS
    + """
import json, os, sys, uuid
from datetime import UTC, datetime
from pathlib import Path
import sqlalchemy as sa
from medcourier.engine.store import Store

url, data_dir, size = sys.argv[1] or None, Path(sys.argv[2]), int(sys.argv[3])
store = Store(url, data_dir)
store.create_schema()
def accept(payload):
    txid = uuid.uuid4().hex[:20]
    store.accept_document(
        transaction_id=txid, created_at=datetime.now(UTC), content_type="application/pdf",
        document_type="11488-4", title="t", sender_identifier=None, sender_application="test",
        patient_id="p-1", encounter_id=None, payload=payload, routes=["r"],
    )
accept(b"%PDF-1.4\\n" + bytes(1000))  # connect, compile and warm up before measuring
payload = b"%PDF-1.4\\n" + os.urandom(size - 9)
Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from here
before = status()["VmRSS"]
accept(payload)
peak = status()["VmHWM"]
del payload
after = status()["VmRSS"]
print(json.dumps({"growth": peak - before, "kept": after - (before - size)}))
"""
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
def test_writing_a_large_payload_adds_no_copy_of_it(store: Store, tmp_path: Path) -> None:
    size = 32 * MIB
    url = "" if store.is_sqlite else store.url
    result = subprocess.run(
        [sys.executable, "-c", _WRITE_IN_A_FRESH_PROCESS, url, str(tmp_path / "w"), str(size)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    measured = json.loads(result.stdout)
    # a few slices at most; a plain INSERT adds one copy (libpq) or two (SQLite)
    assert measured["growth"] < 0.4 * size, f"{measured['growth'] / MIB:.1f} MiB"
    # and keeps none: libpq used to keep its copy, the statement cache the payload itself
    assert measured["kept"] < 0.4 * size, f"{measured['kept'] / MIB:.1f} MiB"


def test_the_fresh_process_check_would_see_a_copy(store: Store, tmp_path: Path) -> None:
    """The same measure with the plain INSERT forced: it does see the copies, so the test
    above measures what it says."""
    size = 32 * MIB
    url = "" if store.is_sqlite else store.url
    script = _WRITE_IN_A_FRESH_PROCESS.replace(
        "from medcourier.engine.store import Store",
        "from medcourier.engine.store import Store\n"
        "import medcourier.engine.payload_write as w\nw.DIRECT_WRITE_BYTES = 1 << 40",
    )
    result = subprocess.run(
        [sys.executable, "-c", script, url, str(tmp_path / "w"), str(size)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    measured = json.loads(result.stdout)
    assert measured["growth"] > 0.8 * size, f"{measured['growth'] / MIB:.1f} MiB"


_READ_BINARY_IN_A_FRESH_PROCESS = (
    PROC_STATUS
    + """
import hashlib, json, sys
from pathlib import Path
import sqlalchemy as sa
import medcourier.engine.payload_read as r
from medcourier.engine.store import Store

url, data_dir, binary_id, plain = sys.argv[1] or None, Path(sys.argv[2]), sys.argv[3], sys.argv[4]
if plain == "plain":
    r.DIRECT_READ_BYTES = 1 << 40
store = Store(url, data_dir)
with store.engine.begin() as c:  # connect and warm up before measuring
    c.execute(sa.text("SELECT 1"))
Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from here
before = status()["VmRSS"]
content_type, data = store.get_binary(binary_id)
peak = status()["VmHWM"]
print(json.dumps({"growth": peak - before, "sha256": hashlib.sha256(data).hexdigest()}))
"""
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only")
@pytest.mark.parametrize("way", ["large", "plain"])
def test_reading_a_large_binary_holds_it_about_once(store: Store, tmp_path: Path, way: str) -> None:
    """A Binary (the DMP and tele-expertise documents come as one) is read as a payload is:
    about one copy in memory. Forced through the plain SELECT, the same measure sees two or
    three, so it measures what it says."""
    import hashlib

    data = pdf(32 * MIB)
    binary = store.transaction(store.tx_put_binary, "application/pdf", data)
    url = "" if store.is_sqlite else store.url
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _READ_BINARY_IN_A_FRESH_PROCESS,
            url,
            str(tmp_path / "data"),
            binary["id"],
            way,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    measured = json.loads(result.stdout)
    assert measured["sha256"] == hashlib.sha256(data).hexdigest()
    if way == "large":
        assert measured["growth"] < 1.6 * len(data), f"{measured['growth'] / MIB:.1f} MiB"
    else:
        assert measured["growth"] > 1.8 * len(data), f"{measured['growth'] / MIB:.1f} MiB"
