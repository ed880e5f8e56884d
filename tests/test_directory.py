"""The directory as the ADT feed changes it: upserts by identifier, visits, merges, dedupe.

Run on SQLite and on PostgreSQL (a fresh database): the same SQLAlchemy code serves both.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from medcourier.engine.clock import now
from medcourier.engine.inbound import DirectoryUpdate, PatientIdentifier
from medcourier.engine.schema import patients
from medcourier.engine.store import DIRECTORY_LOCK, Duplicate, Store
from medcourier.engine.txid import new_transaction_id
from tests.services import fresh_postgres_url

IPP = "urn:oid:1.2.250.1.999.1"
VISITS = "urn:oid:1.2.250.1.999.2"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = None if request.param == "sqlite" else fresh_postgres_url()
    s = Store(url, tmp_path)
    s.create_schema()
    yield s
    s.dispose()


def _patient(ipp: str, family: str, **extra: object) -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": IPP, "value": ipp}],
        "name": [{"family": family, "given": ["Jean"]}],
        **extra,
    }


def _visit(number: str, status: str = "in-progress", **extra: object) -> dict[str, object]:
    return {
        "resourceType": "Encounter",
        "status": status,
        "class": {"code": "IMP"},
        "identifier": [{"system": VISITS, "value": number}],
        **extra,
    }


def test_admit_then_update_keeps_one_patient_and_one_visit(store: Store) -> None:
    org = "Organization/HOSPA"
    pid, eid = store.apply_directory_update(
        DirectoryUpdate(
            "upsert",
            _patient("P1", "Martin"),
            org,
            _visit("V1", period={"start": "2026-11-20T08:00:00+01:00"}),
        )
    )
    ins = {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": "180017512345617"}
    pid2, eid2 = store.apply_directory_update(
        DirectoryUpdate(
            "upsert",
            {
                **_patient("P1", "Martin-Durand"),
                "identifier": [{"system": IPP, "value": "P1"}, ins],
            },
            org,
            _visit("V1", "finished", period={"end": "2026-11-21T10:00:00+01:00"}),
        )
    )
    assert (pid2, eid2) == (pid, eid)
    patient = store.get_patient(pid)
    assert patient is not None
    assert patient["name"][0]["family"] == "Martin-Durand"
    assert patient["meta"]["versionId"] == "2"
    assert [p["id"] for p in store.search_patients(ins["system"], ins["value"])] == [pid]
    assert [p["id"] for p in store.search_patients(None, "P1")] == [pid]
    assert eid is not None
    encounter = store.get_encounter(eid)
    assert encounter is not None
    assert encounter["status"] == "finished"
    assert encounter["period"] == {
        "start": "2026-11-20T08:00:00+01:00",
        "end": "2026-11-21T10:00:00+01:00",
    }
    assert encounter["subject"] == {"reference": f"Patient/{pid}"}
    assert encounter["serviceProvider"] == {"reference": org}


def test_merge_moves_visits_and_documents_and_the_retired_id_resolves(store: Store) -> None:
    org = "Organization/HOSPA"
    survivor, _ = store.apply_directory_update(
        DirectoryUpdate("upsert", _patient("S1", "Good"), org)
    )
    retired, visit = store.apply_directory_update(
        DirectoryUpdate("upsert", _patient("R1", "Dup"), org, _visit("V9"))
    )
    txid = new_transaction_id()
    store.accept_document(
        transaction_id=txid,
        created_at=now(),
        content_type="application/pdf",
        document_type="11488-4",
        title="t",
        sender_identifier=None,
        sender_application="a",
        patient_id=retired,
        encounter_id=visit,
        payload=b"%PDF-1",
        routes=["r"],
    )
    store.apply_directory_update(
        DirectoryUpdate(
            "merge", _patient("S1", "Good"), org, merge_from=(PatientIdentifier(IPP, "R1"),)
        )
    )
    resolved = store.get_patient(retired)
    assert resolved is not None and resolved["id"] == survivor
    assert [p["id"] for p in store.search_patients(IPP, "R1")] == [survivor]
    assert [e["id"] for e in store.search_encounters(survivor)] == [visit]
    assert store.search_encounters(retired)[0]["subject"]["reference"] == f"Patient/{survivor}"
    claim = store.claim(txid, "r")
    assert claim is not None and claim.document is not None
    assert claim.document.patient["id"] == survivor
    values = {(i["value"], i.get("use")) for i in resolved["identifier"]}
    assert ("R1", "old") in values and ("S1", None) in values


def test_dedupe_remembers_within_the_window(store: Store) -> None:
    store.apply_directory_update(
        DirectoryUpdate("upsert", _patient("D1", "Dup")), dedupe=("adt|APP|FAC", "MSG1")
    )
    assert store.seen("adt|APP|FAC", "MSG1", timedelta(hours=1)) == []
    assert store.seen("adt|APP|FAC", "MSG2", timedelta(hours=1)) is None
    assert store.seen("adt|OTHER|FAC", "MSG1", timedelta(hours=1)) is None
    assert store.seen("adt|APP|FAC", "MSG1", timedelta(seconds=-1)) is None


def test_an_update_applied_once_per_message_within_the_window(store: Store) -> None:
    """``tx_apply_directory_update_once``: the dedupe check is in the write; a duplicate applies
    nothing and answers with what was remembered."""
    key = ("adt|APP|FAC", "ONCE-1")
    hour = timedelta(hours=1)
    first = store.transaction(
        store.tx_apply_directory_update_once,
        DirectoryUpdate("upsert", _patient("O1", "A")),
        key,
        hour,
    )
    assert isinstance(first, tuple)
    pid, eid = first
    assert eid is None
    assert store.seen(*key, hour) == []
    again = store.transaction(
        store.tx_apply_directory_update_once,
        DirectoryUpdate("upsert", _patient("O1", "B")),
        key,
        hour,
    )
    assert again == Duplicate(())
    patient = store.get_patient(pid)
    assert patient is not None and patient["name"][0]["family"] == "A"
    assert patient["meta"]["versionId"] == "1"
    # What a later write remembered under the key comes back with the duplicate.
    store.remember(*key, ["T1", "T2"])
    assert store.transaction(
        store.tx_apply_directory_update_once,
        DirectoryUpdate("upsert", _patient("O1", "C")),
        key,
        hour,
    ) == Duplicate(("T1", "T2"))
    # Past the window, the message is applied (and remembered) again.
    late = store.transaction(
        store.tx_apply_directory_update_once,
        DirectoryUpdate("upsert", _patient("O1", "D")),
        key,
        timedelta(seconds=-1),
    )
    assert late == (pid, None)
    patient = store.get_patient(pid)
    assert patient is not None and patient["name"][0]["family"] == "D"
    assert store.seen(*key, hour) == []


def test_an_update_that_fails_is_not_remembered(store: Store) -> None:
    key = ("adt|APP|FAC", "FAIL-1")
    with pytest.raises(RuntimeError), store.engine.begin() as c:
        store.tx_apply_directory_update_once(
            c, DirectoryUpdate("upsert", _patient("F1", "A")), key, timedelta(hours=1)
        )
        raise RuntimeError("the transaction fails after the update")
    assert store.seen(*key, timedelta(hours=1)) is None
    assert store.search_patients(IPP, "F1") == []


def test_the_first_identifier_known_decides_the_patient(store: Store) -> None:
    """Identifiers are looked up in the order the message gives them (one query now)."""
    a = store.put_patient(_patient("FA", "First"), None)
    b = store.put_patient(_patient("FB", "Second"), None)
    both = [{"system": IPP, "value": "FB"}, {"system": IPP, "value": "FA"}]
    pid, _ = store.apply_directory_update(
        DirectoryUpdate("upsert", {**_patient("FB", "Second-2"), "identifier": both})
    )
    assert pid == b["id"]
    unknown_first = [{"system": IPP, "value": "NONE"}, {"system": IPP, "value": "FA"}, both[0]]
    pid, _ = store.apply_directory_update(
        DirectoryUpdate("upsert", {**_patient("FA", "First-2"), "identifier": unknown_first})
    )
    assert pid == a["id"]
    found = store.get_patient(a["id"])
    assert found is not None and found["name"][0]["family"] == "First-2"
    # The same value under another system is another identifier.
    pid, _ = store.apply_directory_update(
        DirectoryUpdate("upsert", {**_patient("FA", "Other"), "identifier": [{"value": "FA"}]})
    )
    assert pid not in (a["id"], b["id"])


def test_an_identifier_of_a_merged_patient_updates_the_survivor(store: Store) -> None:
    survivor = store.put_patient(_patient("MS", "Survivor"), None)
    retired = store.put_patient(_patient("MR", "Retired"), None)
    with store.engine.begin() as c:
        c.execute(
            patients.update()
            .where(patients.c.id == retired["id"])
            .values(merged_into=survivor["id"])
        )
    pid, _ = store.apply_directory_update(DirectoryUpdate("upsert", _patient("MR", "Updated")))
    assert pid == survivor["id"]
    found = store.get_patient(survivor["id"])
    assert found is not None and found["name"][0]["family"] == "Updated"


def test_group_commit_takes_the_directory_lock_once_per_transaction(tmp_path: Path) -> None:
    """Writes committed together (each in a savepoint) share the transaction's advisory lock;
    a savepoint rolled back released it, so the next write takes it again."""
    store = Store(fresh_postgres_url(), tmp_path)
    store.create_schema()
    locks: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "pg_advisory_xact_lock" in statement:
            locks.append(statement)

    def held_elsewhere() -> bool:
        with store.engine.connect() as other:
            free = other.execute(
                sa.select(sa.func.pg_try_advisory_xact_lock(DIRECTORY_LOCK))
            ).scalar()
            other.rollback()
        return not free

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        with store.engine.begin() as c:
            for n in range(3):
                with c.begin_nested():
                    store.tx_apply_directory_update(
                        c, DirectoryUpdate("upsert", _patient(f"L{n}", "L"))
                    )
            assert len(locks) == 1
            assert held_elsewhere()
            savepoint = c.begin_nested()
            store.tx_apply_directory_update(c, DirectoryUpdate("upsert", _patient("L9", "L")))
            savepoint.rollback()
            with c.begin_nested():
                store.tx_apply_directory_update(c, DirectoryUpdate("upsert", _patient("L3", "L")))
            assert len(locks) == 2
            assert held_elsewhere()
        with store.engine.begin() as c:  # a new transaction takes it again
            store.tx_apply_directory_update(c, DirectoryUpdate("upsert", _patient("L4", "L")))
        assert len(locks) == 3
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
        store.dispose()


def test_concurrent_resends_through_group_commit_apply_once(tmp_path: Path) -> None:
    """Through the writer threads (PostgreSQL: four, committing groups): a new patient admitted
    by several messages at once is created once, and a message sent twice at once is applied
    once, the other copy answered as a duplicate."""
    import asyncio

    from medcourier.engine.store import AsyncStore

    store = Store(fresh_postgres_url(), tmp_path)
    store.create_schema()
    writes = AsyncStore(store)
    run = new_transaction_id()

    async def send_all() -> list[object]:
        sync = writes.sync
        jobs = [
            writes.write(
                sync.tx_apply_directory_update_once,
                DirectoryUpdate("upsert", _patient(f"G-{run}-{i % 10}", "G")),
                ("adt|APP|FAC", f"{run}-{i % 20}"),
                timedelta(hours=1),
            )
            for i in range(40)
        ]
        return list(await asyncio.gather(*jobs))

    try:
        results = asyncio.run(send_all())
        assert sum(isinstance(r, Duplicate) for r in results) == 20
        for i in range(10):
            assert len(store.search_patients(IPP, f"G-{run}-{i}")) == 1
    finally:
        writes.close()


def test_concurrent_admissions_of_one_new_patient_make_one_patient(tmp_path: Path) -> None:
    """On PostgreSQL, writes run in parallel transactions (group commit has several writer
    threads): the same new IPP admitted twice at once must resolve to a single patient."""
    from concurrent.futures import ThreadPoolExecutor

    store = Store(fresh_postgres_url(), tmp_path)
    store.create_schema()
    updates = [
        DirectoryUpdate("upsert", _patient(f"RACE-{i}", "Race"), None)
        for i in range(20)
        for _ in range(2)
    ]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda u: store.apply_directory_update(u), updates))
        for i in range(20):
            assert len(store.search_patients(IPP, f"RACE-{i}")) == 1
    finally:
        store.dispose()


def test_sqlite_reads_do_not_wait_for_the_writers_lock(tmp_path: Path) -> None:
    """The reader pool's transactions begin deferred: under WAL a read runs while another
    connection holds the write lock (they used to begin IMMEDIATE and queue behind it)."""
    import asyncio
    import time

    from medcourier.engine.store import AsyncStore

    store = Store(None, tmp_path)
    store.create_schema()
    saved = store.put_patient({"resourceType": "Patient", "name": [{"family": "LU"}]}, None)
    writer = store.engine.connect()
    writer.begin()  # BEGIN IMMEDIATE: the write lock is held until rollback
    try:
        reads = AsyncStore(store)

        async def read() -> tuple[object, float]:
            started = time.monotonic()
            found = await reads.run(store.get_patient, saved["id"])
            return found, time.monotonic() - started

        found, took = asyncio.run(read())
        assert found is not None and found["id"] == saved["id"]
        assert took < 5  # the busy timeout is 30 s: a read waiting for the lock would take that
    finally:
        writer.rollback()
        writer.close()
        reads.close()
