"""Retention: what is pruned and when, on SQLite and a real PostgreSQL, and the space coming back.

Aged documents are written through the store, then their times are moved into the past with SQL,
exactly as a store that ran for months would hold them.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from medcourier.channels.mllp.simulator import EhrSimulator
from medcourier.engine.clock import now
from medcourier.engine.config import Config, parse_config
from medcourier.engine.errors import ConfigError
from medcourier.engine.model import Status
from medcourier.engine.plugins import load_plugins
from medcourier.engine.retention import (
    Action,
    PruneCounts,
    Pruner,
    RetentionPolicy,
    sqlite_checkpoint,
    sqlite_path,
    store_size,
)
from medcourier.engine.schema import deliveries, documents, inbound_log, metadata, payloads
from medcourier.engine.service import Engine
from medcourier.engine.store import AsyncStore, Store
from medcourier.engine.txid import new_transaction_id
from tests.harness import (
    LoopThread,
    Running,
    engine_config,
    eventually,
    pdf_bytes,
    stored_document,
)
from tests.services import own_postgres_database

ROUTES = """
routes:
  - name: short
    match: {organizations: [Organization/a]}
    format: hl7v2-oru
    deliver: {connector: mllp, host: 127.0.0.1, port: 6661}
    retention: {payload_days: 2, metadata_days: 5}
  - name: long
    match: {organizations: [Organization/b]}
    format: hl7v2-oru
    deliver: {connector: mllp, host: 127.0.0.1, port: 6661}
    retention: {payload_days: 10}
  - name: plain
    match: {fallback: true}
    format: hl7v2-oru
    deliver: {connector: mllp, host: 127.0.0.1, port: 6661}
"""
# "long" takes metadata_days from the top level (80), "plain" takes both (40, 80).
CONFIG = (
    """
retention: {payload_days: 40, metadata_days: 80}
duplicate_window_hours: 12
pruning: {batch_size: 2, batch_bytes: 1500, pause_seconds: 0}
"""
    + ROUTES
)

DONE = Status.COMPLETED.value
FAILED = Status.ENTERED_IN_ERROR.value


def config(text: str = CONFIG) -> Config:
    return parse_config(text, load_plugins(), "t.yaml", env={})


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A database of its own: sizes and counts are this test's alone."""
    with own_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_database")
    s = Store(url, tmp_path / "data")
    s.create_schema()
    yield s
    s.dispose()


def add_document(
    store: Store,
    deliveries_ago: dict[str, tuple[str, float]],
    payload: bytes = b"x" * 1000,
    txid: str | None = None,
) -> str:
    """A document whose delivery on each route has (status, days since its status_at)."""
    txid = txid or new_transaction_id()
    at = now()
    oldest = max([days for _, days in deliveries_ago.values()] + [0.0])
    stored_document(store, payload, list(deliveries_ago), txid, at)

    for route, (status, _) in deliveries_ago.items():
        if status != Status.PREPARATION.value:  # the history as the engine writes it
            store.transaction(store.tx_set_status, txid, route, Status(status))

    def age(c: sa.Connection) -> None:
        created = at - timedelta(days=oldest, minutes=5)
        c.execute(
            documents.update().where(documents.c.transaction_id == txid).values(created_at=created)
        )
        for route, (_, days) in deliveries_ago.items():
            c.execute(
                deliveries.update()
                .where(deliveries.c.transaction_id == txid, deliveries.c.route == route)
                .values(status_at=at - timedelta(days=days))
            )

    store.transaction(age)
    return txid


def has_payload(store: Store, txid: str) -> bool:
    with store.engine.connect() as c:
        q = sa.select(payloads.c.transaction_id).where(payloads.c.transaction_id == txid)
        return c.execute(q).first() is not None


def has_document(store: Store, txid: str) -> bool:
    with store.engine.connect() as c:
        q = sa.select(documents.c.transaction_id).where(documents.c.transaction_id == txid)
        return c.execute(q).first() is not None


def run_pass(lt: LoopThread, store: Store, cfg: Config, **kw: Any) -> PruneCounts:
    """One pass of the engine's own pruner, on a writer of its own like the engine's."""
    async_store = AsyncStore(Store(store.url, Path(".")))
    try:
        return lt.run(Pruner(async_store, cfg).run_pass(**kw))
    finally:
        async_store.close()


# -- the rule ------------------------------------------------------------------------------
def test_policy_takes_the_longest_retention_of_a_documents_routes() -> None:
    policy = RetentionPolicy.from_config(config())
    at = now()

    def ago(days: float) -> datetime:
        return at - timedelta(days=days)

    assert policy.decide([("short", DONE, ago(3))], ago(3), at) is Action.PAYLOAD
    assert policy.decide([("short", FAILED, ago(6))], ago(6), at) is Action.METADATA
    # sent to "long" too: its payload_days (10) wins over short's (2)
    assert policy.decide([("short", DONE, ago(6)), ("long", DONE, ago(6))], ago(6), at) is None
    # the latest status counts, whatever route it is on
    assert policy.decide([("short", DONE, ago(30)), ("long", DONE, ago(1))], ago(30), at) is None
    # "long" inherits metadata_days 80 from the top level, not the built-in 62
    assert policy.decide([("long", DONE, ago(70))], ago(70), at) is Action.PAYLOAD
    # a route gone from the config, and one without its own retention: the top level (40, 80)
    assert policy.decide([("gone", DONE, ago(50))], ago(50), at) is Action.PAYLOAD
    assert policy.decide([("plain", DONE, ago(90))], ago(90), at) is Action.METADATA
    # never while a delivery is not final
    for status in ("preparation", "in-progress", "unknown"):
        rows = [("short", status, ago(400)), ("long", DONE, ago(400))]
        assert policy.decide(rows, ago(400), at) is None
    assert policy.shortest_payload == timedelta(days=2)


# -- on a real store -----------------------------------------------------------------------
def test_prune_pass_semantics(lt: LoopThread, store: Store) -> None:
    cfg = config()
    docs = {
        "payload: short, 3 days": ({"short": (DONE, 3)}, "payload"),
        "metadata: short, 6 days": ({"short": (FAILED, 6)}, "metadata"),
        "kept: long's payload_days wins": ({"short": (DONE, 6), "long": (DONE, 6)}, "kept"),
        "payload: short+long, 12 days": ({"short": (DONE, 12), "long": (DONE, 12)}, "payload"),
        "kept: in-progress for 100 days": ({"short": ("in-progress", 100)}, "kept"),
        "kept: one route still preparing": (
            {"short": ("preparation", 100), "long": (DONE, 100)},
            "kept",
        ),
        "payload: removed route, 50 days": ({"gone": (DONE, 50)}, "payload"),
        "metadata: removed route, 90 days": ({"gone": (DONE, 90)}, "metadata"),
        "kept: just completed": ({"short": (DONE, 0)}, "kept"),
        "kept: latest status 1 day ago": ({"short": (DONE, 30), "long": (DONE, 1)}, "kept"),
        "payload: no own retention, 50 days": ({"plain": (DONE, 50)}, "payload"),
        "payload: long inherits metadata_days 80": ({"long": (DONE, 70)}, "payload"),
    }
    ids = {name: add_document(store, routes) for name, (routes, _) in docs.items()}
    expected = {name: outcome for name, (_, outcome) in docs.items()}

    dry = run_pass(lt, store, cfg, dry_run=True)
    assert all(has_payload(store, t) for t in ids.values())
    counts = run_pass(lt, store, cfg)
    assert (dry.metadata, dry.payloads, dry.payload_bytes) == (
        counts.metadata,
        counts.payloads,
        counts.payload_bytes,
    )
    assert counts.metadata == 2
    assert counts.payloads == 7  # 5 payload-only, plus the 2 that went with their metadata
    assert counts.payload_bytes == 7000
    # batch_bytes 1500 with 1000-byte payloads: at most one payload per batch
    assert counts.batches >= 7

    for name, txid in ids.items():
        outcome = expected[name]
        assert has_payload(store, txid) == (outcome == "kept"), name
        assert has_document(store, txid) == (outcome != "metadata"), name
        tracked = store.deliveries_of(txid)
        history = store.history(txid)
        if outcome == "metadata":
            assert tracked == [] and history == [], name
        else:
            # tracking reads deliveries and history, never the payload
            assert tracked and history and history[0][1] is Status.PREPARATION, name

    # a second pass finds nothing more
    again = run_pass(lt, store, cfg)
    assert (again.metadata, again.payloads) == (0, 0)


def test_inbound_log_is_pruned_by_the_duplicate_window(lt: LoopThread, store: Store) -> None:
    cfg = config()  # duplicate_window_hours: 12, batch_size 2
    for i in range(5):
        store.remember("old-sender", f"MSG-{i}", [])
    store.remember("new-sender", "MSG-NEW", ["t1"])

    def age(c: sa.Connection) -> None:
        c.execute(
            inbound_log.update()
            .where(inbound_log.c.sender == "old-sender")
            .values(received_at=now() - timedelta(hours=13))
        )

    store.transaction(age)
    assert run_pass(lt, store, cfg, dry_run=True).inbound_log == 5
    counts = run_pass(lt, store, cfg)
    assert counts.inbound_log == 5
    with store.engine.connect() as c:
        left = c.execute(sa.select(inbound_log.c.sender, inbound_log.c.message_id)).all()
    assert [tuple(r) for r in left] == [("new-sender", "MSG-NEW")]
    assert store.seen("new-sender", "MSG-NEW", timedelta(hours=12)) == ["t1"]


def test_sqlite_file_shrinks_after_prune(lt: LoopThread, tmp_path: Path) -> None:
    store = Store(None, tmp_path)
    store.create_schema()
    cfg = config(CONFIG.replace("batch_bytes: 1500", "batch_bytes: 4000000"))
    payload_size = 256 * 1024
    for i in range(40):
        add_document(store, {"short": (DONE, 3 if i % 2 else 9)}, os.urandom(payload_size))
    recent = [add_document(store, {"short": (DONE, 0)}, os.urandom(payload_size)) for _ in range(5)]
    assert sqlite_checkpoint(sqlite_path(store))
    before = store_size(store).total
    counts = run_pass(lt, store, cfg)
    after = store_size(store).total
    assert counts.payloads == 40 and counts.payload_bytes == 40 * payload_size
    assert counts.pages_reclaimed > 0
    # the file gave back at least 90% of what was pruned; the recent documents are whole
    assert before - after > 0.9 * 40 * payload_size, (before, after)
    assert after < 0.25 * before, (before, after)
    assert all(has_payload(store, t) for t in recent)
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2
        assert c.exec_driver_sql("PRAGMA freelist_count").scalar() == 0
        assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    store.dispose()


def test_postgresql_vacuum_gives_back_trailing_space(lt: LoopThread, pg_database: str) -> None:
    store = Store(pg_database, Path("."))
    store.create_schema()
    cfg = config(CONFIG.replace("batch_size: 2", "batch_size: 10").replace("1500", "4000000"))
    payload_size = 256 * 1024
    for _ in range(30):
        add_document(store, {"short": (DONE, 3)}, os.urandom(payload_size))
    before = store_size(store)
    counts = run_pass(lt, store, cfg)
    after = store_size(store)
    assert counts.payloads == 30
    # every payload went, so every page is at the end of the table: VACUUM (run by the pruner
    # after a pass of at least one full batch) truncates them all
    assert before.parts["payloads"] > 30 * payload_size
    assert after.parts["payloads"] < 0.1 * before.parts["payloads"], (before, after)
    store.dispose()


# -- the command line ----------------------------------------------------------------------
def _prune_cli(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medcourier.engine.cli", "prune", "--config", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_prune_command_dry_run_then_prune(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    url = None if backend == "sqlite" else request.getfixturevalue("pg_database")
    data = tmp_path / "data"
    path = tmp_path / "c.yaml"
    path.write_text(f"data_dir: {data}\nstore: {url or ''}\n" + CONFIG)
    store = Store(url, data)
    store.create_schema()
    gone = add_document(store, {"short": (DONE, 6)})
    slim = add_document(store, {"short": (DONE, 3)})
    kept = add_document(store, {"short": ("in-progress", 30)})
    store.dispose()

    r = _prune_cli(path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would prune: 1 document(s) with their metadata, 2 payload(s)" in r.stdout
    assert all(has_payload(store, t) for t in (gone, slim, kept))

    r = _prune_cli(path)
    assert r.returncode == 0, r.stderr
    assert "pruned: 1 document(s) with their metadata, 2 payload(s)" in r.stdout
    assert "size before:" in r.stdout
    if backend == "postgresql":
        assert "is live data; PostgreSQL reuses the rest" in r.stdout
    assert not has_document(store, gone)
    assert has_document(store, slim) and not has_payload(store, slim)
    assert has_payload(store, kept)
    store.dispose()


def test_old_sqlite_store_needs_one_full_vacuum(tmp_path: Path) -> None:
    """A store created before retention (auto_vacuum none) keeps its size until --vacuum."""
    data = tmp_path / "data"
    data.mkdir()
    db = data / "medcourier.sqlite"
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    plain = sa.create_engine(f"sqlite:///{db}")
    metadata.create_all(plain)
    plain.dispose()
    store = Store(None, data)
    for _ in range(30):
        add_document(store, {"short": (DONE, 6)}, os.urandom(128 * 1024))
    store.dispose()
    path = tmp_path / "c.yaml"
    path.write_text(f"data_dir: {data}\n" + CONFIG.replace("1500", "4000000"))

    r = _prune_cli(path)
    assert r.returncode == 0, r.stderr
    assert "created without auto_vacuum" in r.stdout
    size_pruned = db.stat().st_size
    assert size_pruned > 30 * 128 * 1024  # freed pages stay in the file

    r = _prune_cli(path, "--vacuum")
    assert r.returncode == 0, r.stderr
    assert db.stat().st_size < 0.1 * size_pruned
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    con.close()


# -- configuration -------------------------------------------------------------------------
def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medcourier.engine.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "retention: {payload_days: 70}\n" + ROUTES,
            "retention: Value error, payload_days (70) is more than metadata_days (62)",
        ),
        (
            ROUTES.replace(
                "{payload_days: 2, metadata_days: 5}", "{payload_days: 9, metadata_days: 5}"
            ),
            "routes[0].retention: Value error, payload_days (9) is more than metadata_days (5)",
        ),
        (
            # the route's payload_days against the top-level metadata_days it inherits
            "retention: {metadata_days: 8}\n" + ROUTES,
            "routes[1].retention: Value error, payload_days (10) is more than metadata_days (8)",
        ),
        (
            "retention: {payload_days: 0}\n" + ROUTES,
            "retention.payload_days: Input should be greater than 0",
        ),
        (
            "pruning: {batch_size: 0}\n" + ROUTES,
            "pruning.batch_size: Input should be greater than or equal to 1",
        ),
    ],
)
def test_check_refuses_bad_retention(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = _check(path)
    assert r.returncode == 1
    assert f"{path}: {expected}" in r.stderr, r.stderr


def test_retention_defaults_and_inheritance() -> None:
    defaults = config(ROUTES)
    assert (
        defaults.settings.retention.payload_days,
        defaults.settings.retention.metadata_days,
    ) == (
        31,
        62,
    )
    assert defaults.settings.pruning.interval_seconds == 300
    assert defaults.settings.pruning.batch_size == 500
    assert defaults.settings.pruning.enabled
    routes = {r.name: r.settings.retention for r in config().routes}
    assert routes["plain"] is None
    assert routes["long"] is not None and (
        routes["long"].payload_days,
        routes["long"].metadata_days,
    ) == (10, 80)
    with pytest.raises(ConfigError):
        config("retention: {payload_days: 9, metadata_days: 3}\n" + ROUTES)


# -- in a running engine -------------------------------------------------------------------
@contextmanager
def engine_with_pruning(
    lt: LoopThread, tmp: Path, store_url: str | None, seed: Any
) -> Iterator[Running]:
    """The harness's engine and EHR simulator, with a pruner every 0.2 s in small batches."""
    ehr = EhrSimulator(port=0, out_dir=tmp / "ehr")
    lt.run(ehr.start())
    raw = yaml.safe_load(engine_config(tmp / "data", ehr.port, store=store_url))
    raw["retention"] = {"payload_days": 31, "metadata_days": 62}
    raw["pruning"] = {"interval_seconds": 0.2, "batch_size": 3, "pause_seconds": 0.02}
    plugins = load_plugins()
    cfg = parse_config(yaml.safe_dump(raw), plugins, "test.yaml", env={})
    seeded = Store(store_url, tmp / "data")
    seeded.create_schema()
    seed(seeded)
    seeded.dispose()
    engine = Engine(cfg, plugins)
    lt.run(engine.start())
    running = Running(lt, engine, ehr)
    try:
        yield running
    finally:
        running.http.close()
        lt.run(engine.stop())
        lt.run(ehr.stop())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_background_pruner_in_a_running_engine(
    lt: LoopThread, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    url = None if backend == "sqlite" else request.getfixturevalue("pg_database")
    aged: dict[str, list[str]] = {"metadata": [], "payload": [], "kept": []}

    def seed(store: Store) -> None:
        for _ in range(30):
            aged["metadata"].append(add_document(store, {"ehr-a": (DONE, 70)}))
            aged["payload"].append(add_document(store, {"ehr-a": (DONE, 40), "gone": (FAILED, 45)}))
        # on a route no longer configured, so start-up recovery does not take it up again
        aged["kept"].append(add_document(store, {"gone": ("in-progress", 100)}))

    with engine_with_pruning(lt, tmp_path, url, seed) as r:
        store = r.engine.store.sync
        patient = r.patient(
            identifier=[{"system": "urn:oid:1.2.250.1.999.1", "value": "IPP-RET-1"}],
            name=[{"family": "Retention", "given": ["Test"]}],
            managingOrganization={"reference": "Organization/demo-hl7"},
        )
        sent = r.send(patient, None, pdf_bytes(2048))
        assert sent.status_code == 200, sent.text
        txid = sent.json()["parameter"][1]["valueString"]
        # the new document flows while the pruner works through the aged ones
        r.wait_status(txid, {"completed"})
        eventually(
            lambda: (
                not any(has_document(store, t) for t in aged["metadata"])
                and not any(has_payload(store, t) for t in aged["payload"])
            ),
            20,
            "aged documents pruned",
        )
        # the pass is counted once it ends (inbound_log, uploads, vacuum after the documents)
        eventually(lambda: r.engine.pruner.passes >= 1, 20, "the pass counted")
        assert has_payload(store, txid) and has_document(store, txid)
        for t in aged["payload"]:
            bundle = r.tracking(t)
            statuses = sorted(e["resource"]["status"] for e in bundle["entry"])
            assert statuses == ["completed", "entered-in-error"]
        assert r.tracking(aged["metadata"][0])["entry"][0]["resource"]["status"] == "unknown"
        assert has_payload(store, aged["kept"][0])
        # and a document sent after the pruning still goes through
        again = r.send(patient, None, pdf_bytes(1024))
        assert again.status_code == 200, again.text
        r.wait_status(again.json()["parameter"][1]["valueString"], {"completed"})


def test_seed_001_uploads_are_pruned_after_the_longest_retention(store: Store) -> None:
    """Binaries go after the longest payload retention, DocumentReferences and
    CommunicationRequests after the longest metadata retention; Practitioners stay."""
    from medcourier.engine.retention import tx_prune_uploads
    from medcourier.engine.schema import binaries, resources

    at = now()
    with store.engine.begin() as c:
        # the longest retentions of CONFIG: payload 40 days, metadata 80 days
        for ident, days in (("old-bin", 45), ("new-bin", 1)):
            c.execute(
                binaries.insert().values(
                    id=ident,
                    content_type="application/pdf",
                    data=b"%PDF-",
                    created_at=at - timedelta(days=days),
                )
            )
        for kind, ident, days in (
            ("DocumentReference", "old-ref", 90),
            ("DocumentReference", "new-ref", 45),
            ("CommunicationRequest", "old-req", 90),
            ("Practitioner", "old-doc", 400),
        ):
            c.execute(
                resources.insert().values(
                    type=kind, id=ident, resource="{}", created_at=at - timedelta(days=days)
                )
            )
    policy = RetentionPolicy.from_config(config())
    binaries_before = at - policy.longest_payload
    resources_before = at - policy.longest_metadata
    with store.engine.begin() as c:
        assert tx_prune_uploads(c, binaries_before, resources_before, 10, dry_run=True) == 3
        assert tx_prune_uploads(c, binaries_before, resources_before, 10) == 3
        assert tx_prune_uploads(c, binaries_before, resources_before, 10) == 0
    with store.engine.connect() as c:
        assert [r[0] for r in c.execute(sa.select(binaries.c.id))] == ["new-bin"]
        kept = {r[0] for r in c.execute(sa.select(resources.c.id))}
    assert kept == {"new-ref", "old-doc"}
