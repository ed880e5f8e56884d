"""Replay, cancel, pause and resume: through the API and the command line, against a real engine.

The engine runs with the real EHR simulator on a socket; the command line runs as real
subprocesses (``medcourier replay ...``) on the same config file, so they share the engine's store
and queues as an operator's would. The replay tests run on the embedded default and on RabbitMQ +
PostgreSQL.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from medcourier.engine.schema import deliveries, documents, payloads, renderings
from tests.harness import (
    LIMITED_TOKEN,
    LoopThread,
    Running,
    engine_config,
    eventually,
    free_port,
    pdf_bytes,
    running_engine,
)
from tests.services import delete_broker_objects, fresh_postgres_url, rabbitmq_url

ROUTES = ["ehr-a", "ehr-keep"]
SENDER_TOKEN = "sender-token-0123456789abcdef"


def _keep_route(port: int) -> dict[str, Any]:
    """A second route to the same EHR that keeps its renderings (for resend)."""
    return {
        "name": "ehr-keep",
        "match": {"organizations": ["Organization/keep"]},
        "format": "hl7v2-oru",
        "format_options": {"receiving_application": "EHR", "receiving_facility": "K"},
        "deliver": {
            "connector": "mllp",
            "host": "127.0.0.1",
            "port": port,
            "ack_timeout": 5,
            "connect_timeout": 2,
        },
        "retry": {"max_attempts": 3, "initial_delay": 0.2, "max_delay": 1},
        "keep_renderings": True,
    }


def _delete_amqp(url: str, instance: str) -> None:
    delete_broker_objects(url, instance, list(ROUTES))


@pytest.fixture(params=["embedded", "rabbitmq+postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    instance = f"mctest-{uuid.uuid4().hex[:8]}"
    if request.param == "embedded":
        yield {"instance": instance}
        return
    url = rabbitmq_url()
    yield {"instance": instance, "broker": url, "store": fresh_postgres_url()}
    _delete_amqp(url, instance)


class Env:
    """A running engine, the config file it runs with (for the CLI), and helpers."""

    def __init__(self, eng: Running, config: Path) -> None:
        self.eng = eng
        self.config = config

    def patient(self, organization: str = "demo-hl7") -> str:
        return self.eng.patient(
            name=[{"family": "Replay", "given": ["Test"]}],
            managingOrganization={"reference": f"Organization/{organization}"},
        )

    def send(self, pid: str, size: int = 1500) -> str:
        r = self.eng.send(pid, None, pdf_bytes(size))
        assert r.status_code == 200, r.text
        return str(r.json()["parameter"][1]["valueString"])

    def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.eng.http.request(method, path, json=body)

    def status(self, txid: str) -> str:
        (row,) = self.eng.engine.store.sync.deliveries_of(txid)
        return row.status.value

    def history(self, txid: str) -> list[tuple[str, str | None]]:
        return [
            (s.value, reason) for _r, s, _at, reason in self.eng.engine.store.sync.history(txid)
        ]

    def received(self) -> list[str]:
        """MSH-10 of every message the EHR received, in arrival order."""
        return [_msh10(m) for m in self.eng.ehr.received]

    def wait_received(self, count: int) -> None:
        eventually(lambda: len(self.eng.ehr.received) >= count, what=f"{count} EHR messages")
        time.sleep(0.2)  # and no more than that
        assert len(self.eng.ehr.received) == count

    def sql(self, statement: Any) -> None:
        with self.eng.engine.store.sync.engine.begin() as c:
            c.execute(statement)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        exe = Path(sys.executable).parent / "medcourier"
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "medcourier.engine.cli"]
        name, *rest = args
        return subprocess.run(
            [*command, name, "--config", str(self.config), *rest],
            capture_output=True,
            text=True,
            timeout=120,
            input=stdin,
            cwd=self.config.parent,
        )


@contextlib.contextmanager
def engine_env(
    lt: LoopThread, tmp: Path, *, resume_at_exit: bool = True, **backend: Any
) -> Iterator[Env]:
    port = free_port()
    settings: dict[str, Any] = {
        **backend,
        "extra_routes": [_keep_route(port)],
        "tokens": [{"name": "sender", "token": SENDER_TOKEN, "scopes": ["SEND_TO_EHR"]}],
    }
    config = tmp / "engine.yaml"
    config.write_text(engine_config(tmp / "data", port, **settings))
    with running_engine(lt, tmp, ehr_port=port, **settings) as eng:
        env = Env(eng, config)
        try:
            yield env
        finally:
            # The route state lives in the store, which PostgreSQL runs share: leave it resumed.
            for route in ROUTES if resume_at_exit else ():
                env.admin("POST", f"/admin/routes/{route}/resume")


def _msh10(message: bytes) -> str:
    return message.split(b"\r", 1)[0].decode().split("|")[9]


# -- replay ----------------------------------------------------------------------------------
def test_replay_by_transaction_id_rerenders_and_keeps_the_history(
    lt: LoopThread, tmp_path: Path, backend: dict[str, Any]
) -> None:
    with engine_env(lt, tmp_path, **backend) as env:
        txid = env.send(env.patient())
        env.eng.wait_status(txid, {"completed"})
        env.wait_received(1)

        r = env.admin("POST", "/admin/replay", {"transaction_ids": [txid]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["selected"] == 1 and body["replayed"] == 1 and not body["dry_run"]
        (row,) = body["deliveries"]
        assert (row["transaction_id"], row["route"], row["status"], row["mode"]) == (
            txid,
            "ehr-a",
            "completed",
            "rerender",
        )

        env.wait_received(2)
        env.eng.wait_status(txid, {"completed"})
        assert env.received() == [txid, txid]  # the same MSH-10: the EHR can spot the repeat
        assert [s for s, _ in env.history(txid)] == [
            "preparation",
            "in-progress",
            "completed",
            "preparation",
            "in-progress",
            "completed",
        ]
        assert ("preparation", "replay requested (rerender, by api:test-app)") in env.history(txid)
        notes = [n["text"] for n in env.eng.tracking(txid)["entry"][0]["resource"]["note"]]
        assert any("replay requested (rerender, by api:test-app)" in n for n in notes)


def test_resend_sends_the_stored_rendering_byte_for_byte(
    lt: LoopThread, tmp_path: Path, backend: dict[str, Any]
) -> None:
    with engine_env(lt, tmp_path, **backend) as env:
        kept = env.send(env.patient("keep"))  # ehr-keep: keep_renderings
        plain = env.send(env.patient())  # ehr-a: renderings not kept
        env.eng.wait_status(kept, {"completed"})
        env.eng.wait_status(plain, {"completed"})
        env.wait_received(2)
        first = next(m for m in env.eng.ehr.received if _msh10(m) == kept)
        with env.eng.engine.store.sync.engine.connect() as c:
            stored = c.execute(sa.select(renderings.c.data, renderings.c.route)).all()
        assert [(bytes(d), route) for d, route in stored] == [(first, "ehr-keep")]

        r = env.admin("POST", "/admin/replay", {"transaction_ids": [kept, plain], "mode": "resend"})
        assert r.status_code == 200, r.text
        modes = {d["transaction_id"]: (d["mode"], d["note"]) for d in r.json()["deliveries"]}
        assert modes[kept] == ("resend", None)
        # Nothing stored for ehr-a: it falls back to rerender, and says so.
        assert modes[plain] == ("rerender", "resend asked, but no rendering of it is stored")
        env.wait_received(4)
        again = [m for m in env.eng.ehr.received if _msh10(m) == kept]
        assert again == [first, first]
        assert (
            "preparation",
            "replay requested (resend, by api:test-app)",
        ) in env.history(kept)
        assert (
            "preparation",
            "replay requested (rerender, by api:test-app): "
            "resend asked, but no rendering of it is stored",
        ) in env.history(plain)

        # What goes out is what the store holds, not a new rendering: mark the stored one.
        marked = first.replace(b"\rPID|", b"\rNTE|1||stored\rPID|", 1)
        assert marked != first
        env.sql(renderings.update().values(data=marked))
        r = env.admin("POST", "/admin/replay", {"transaction_ids": [kept], "mode": "resend"})
        assert r.status_code == 200, r.text
        env.wait_received(5)
        assert env.eng.ehr.received[-1] == marked
        env.eng.wait_status(kept, {"completed"})

        # A stored rendering is patient data: it goes when retention deletes the payload.
        env.sql(payloads.delete().where(payloads.c.transaction_id == kept))
        with env.eng.engine.store.sync.engine.connect() as c:
            assert c.execute(sa.select(sa.func.count()).select_from(renderings)).scalar() == 0


def test_replay_by_route_status_and_window_selects_exactly_those(
    lt: LoopThread, tmp_path: Path
) -> None:
    with engine_env(lt, tmp_path) as env:
        pid, keep = env.patient(), env.patient("keep")
        old = env.send(pid)
        inside = env.send(pid)
        other_route = env.send(keep)
        for t in (old, inside, other_route):
            env.eng.wait_status(t, {"completed"})
        env.eng.ehr.ack_code = "AE"
        failed = env.send(pid)
        env.eng.wait_status(failed, {"entered-in-error"})
        env.eng.ehr.ack_code = "AA"
        later = env.send(pid)
        env.eng.wait_status(later, {"completed"})
        env.wait_received(5)
        now = datetime.now(UTC)
        for txid, moved in ((old, now - timedelta(hours=3)), (later, now + timedelta(hours=3))):
            env.sql(
                documents.update()
                .where(documents.c.transaction_id == txid)
                .values(created_at=moved)
            )
        window = {
            "since": (now - timedelta(hours=1)).isoformat(),
            "until": (now + timedelta(hours=1)).isoformat(),
        }
        before = [env.history(t) for t in (old, inside, other_route, failed, later)]

        r = env.admin(
            "POST",
            "/admin/replay",
            {"route": "ehr-a", "statuses": ["completed"], **window, "dry_run": True},
        )
        assert r.status_code == 200, r.text
        assert r.json()["dry_run"] is True
        assert [(d["transaction_id"], d["replayed"]) for d in r.json()["deliveries"]] == [
            (inside, False)
        ]
        r = env.admin(
            "POST",
            "/admin/replay",
            {"route": "ehr-a", "statuses": ["completed", "entered-in-error"], **window},
        )
        assert r.status_code == 200, r.text
        assert [d["transaction_id"] for d in r.json()["deliveries"]] == [inside, failed]
        env.wait_received(7)
        assert env.received()[5:] == [inside, failed]
        for t in (inside, failed):
            env.eng.wait_status(t, {"completed"})
        # The others were not touched.
        after = [env.history(t) for t in (old, other_route, later)]
        assert after == [before[0], before[2], before[4]]


def test_dry_run_and_refusals_change_nothing(lt: LoopThread, tmp_path: Path) -> None:
    with engine_env(lt, tmp_path) as env:
        txid = env.send(env.patient())
        env.eng.wait_status(txid, {"completed"})
        env.wait_received(1)
        history = env.history(txid)

        r = env.admin("POST", "/admin/replay", {"transaction_ids": [txid], "dry_run": True})
        assert r.status_code == 200, r.text
        assert r.json()["replayed"] == 0
        assert r.json()["deliveries"][0]["detail"] == "would be replayed"

        cases: list[tuple[dict[str, Any], int, str]] = [
            ({}, 400, "say what to replay"),
            ({"transaction_ids": [txid], "mode": "again"}, 400, "mode must be"),
            ({"transaction_ids": [txid], "colour": "red"}, 400, "colour"),
            ({"statuses": ["lost"]}, 400, "not a delivery status"),
            ({"since": "yesterday"}, 400, "not an ISO 8601 time"),
            ({"transaction_ids": ["ffffffffffffffffffff"]}, 404, "unknown transaction id"),
            ({"route": "nowhere"}, 404, "not configured"),
            ({"statuses": ["completed"], "limit": 0}, 400, "limit"),
        ]
        for body, status, text in cases:
            r = env.admin("POST", "/admin/replay", body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["resourceType"] == "OperationOutcome"
            assert text in r.json()["issue"][0]["diagnostics"], r.text

        # An in-progress delivery may be in a worker's hands: refused unless forced.
        env.sql(
            deliveries.update()
            .where(deliveries.c.transaction_id == txid)
            .values(status="in-progress")
        )
        r = env.admin("POST", "/admin/replay", {"transaction_ids": [txid]})
        assert r.status_code == 409, r.text
        assert "in-progress" in r.json()["issue"][0]["diagnostics"]
        time.sleep(0.5)
        assert env.history(txid) == history and len(env.eng.ehr.received) == 1
        r = env.admin("POST", "/admin/replay", {"transaction_ids": [txid], "force": True})
        assert r.status_code == 200, r.text
        env.wait_received(2)
        env.eng.wait_status(txid, {"completed"})


# -- pause, resume, cancel -------------------------------------------------------------------
def test_pause_holds_new_documents_and_resume_delivers_them_in_order(
    lt: LoopThread, tmp_path: Path
) -> None:
    with engine_env(lt, tmp_path) as env:
        r = env.admin("POST", "/admin/routes/ehr-a/pause", {"reason": "EHR maintenance"})
        assert r.status_code == 200, r.text
        assert r.json()["paused"] is True and r.json()["reason"] == "EHR maintenance"
        pid = env.patient()
        txids = [env.send(pid, 1000 + i) for i in range(4)]
        kept = env.send(env.patient("keep"))  # another route is not held
        env.eng.wait_status(kept, {"completed"})
        time.sleep(1.5)
        assert [env.status(t) for t in txids] == ["preparation"] * 4
        assert env.received() == [kept]
        routes = {x["route"]: x for x in env.admin("GET", "/admin/routes").json()["routes"]}
        assert routes["ehr-a"]["paused"] is True
        assert routes["ehr-a"]["changed_by"] == "api:test-app"
        assert routes["ehr-a"]["preparation"] == 4 and routes["ehr-a"]["in_progress"] == 0
        assert routes["ehr-keep"]["paused"] is False

        r = env.admin("POST", "/admin/routes/ehr-a/resume")
        assert r.status_code == 200, r.text
        assert r.json()["paused"] is False
        for t in txids:
            env.eng.wait_status(t, {"completed"})
        assert env.received() == [kept, *txids]


def test_cancel_a_queued_message(lt: LoopThread, tmp_path: Path) -> None:
    with engine_env(lt, tmp_path) as env:
        assert env.admin("POST", "/admin/routes/ehr-a/pause").status_code == 200
        pid = env.patient()
        doomed, kept = env.send(pid), env.send(pid)
        time.sleep(0.5)

        r = env.admin("POST", "/admin/cancel", {"transaction_id": doomed})
        assert r.status_code == 200, r.text
        assert r.json()["cancelled"] == [
            {
                "transaction_id": doomed,
                "route": "ehr-a",
                "status": "entered-in-error",
                "reason": "cancelled by api:test-app",
            }
        ]
        r = env.admin("POST", "/admin/cancel", {"transaction_id": doomed})
        assert r.status_code == 409
        assert "already ended in error" in r.json()["issue"][0]["diagnostics"]
        r = env.admin("POST", "/admin/cancel", {"transaction_id": "ffffffffffffffffffff"})
        assert r.status_code == 404
        r = env.admin("POST", "/admin/cancel", {"transaction_id": kept, "route": "ehr-keep"})
        assert r.status_code == 404

        assert env.admin("POST", "/admin/routes/ehr-a/resume").status_code == 200
        env.eng.wait_status(kept, {"completed"})
        time.sleep(0.5)
        assert env.received() == [kept]
        comm = env.eng.tracking(doomed)["entry"][0]["resource"]
        assert comm["status"] == "entered-in-error"
        assert comm["statusReason"]["text"] == "cancelled by api:test-app"
        r = env.admin("POST", "/admin/cancel", {"transaction_id": kept})
        assert r.status_code == 409
        assert "already delivered" in r.json()["issue"][0]["diagnostics"]


def test_a_pause_outlives_a_restart_and_does_not_hold_up_the_stop(
    lt: LoopThread, tmp_path: Path
) -> None:
    with engine_env(lt, tmp_path, resume_at_exit=False) as env:
        env.admin("POST", "/admin/routes/ehr-a/pause", {"reason": "night"})
        txid = env.send(env.patient())
        time.sleep(1)
        started = time.monotonic()
    # Stopped without resuming: the held worker gave its item back at once.
    assert time.monotonic() - started < 10
    with engine_env(lt, tmp_path) as env:
        time.sleep(1)
        assert env.status(txid) == "preparation" and env.received() == []
        routes = {x["route"]: x for x in env.admin("GET", "/admin/routes").json()["routes"]}
        assert routes["ehr-a"]["paused"] is True and routes["ehr-a"]["reason"] == "night"
        env.admin("POST", "/admin/routes/ehr-a/resume")
        env.eng.wait_status(txid, {"completed"})
        assert env.received() == [txid]


# -- the command line ------------------------------------------------------------------------
def test_cli_commands_against_a_running_engine(
    lt: LoopThread, tmp_path: Path, backend: dict[str, Any]
) -> None:
    with engine_env(lt, tmp_path, **backend) as env:
        control = env.eng.engine.control
        done = env.cli("pause", "ehr-a", "--reason", "EHR upgrade")
        assert done.returncode == 0, done.stderr
        assert "route ehr-a paused" in done.stdout and "EHR upgrade" in done.stdout

        def paused() -> bool:
            state = lt.run(control.states()).get("ehr-a")
            return state is not None and state.paused

        eventually(paused, timeout=5, what="the engine seeing the pause")
        pid = env.patient()
        doomed, kept = env.send(pid), env.send(pid)
        time.sleep(1)
        assert env.status(doomed) == env.status(kept) == "preparation"
        assert env.received() == []

        done = env.cli("cancel", "--transaction-id", doomed)
        assert done.returncode == 0, done.stderr
        assert f"cancelled {doomed} to ehr-a" in done.stdout
        done = env.cli("cancel", "--transaction-id", doomed)
        assert done.returncode == 1 and "already ended in error" in done.stderr

        done = env.cli("resume", "ehr-a")
        assert done.returncode == 0, done.stderr
        env.eng.wait_status(kept, {"completed"})
        time.sleep(0.5)
        assert env.received() == [kept]
        assert env.status(doomed) == "entered-in-error"
        assert env.history(doomed)[-1][1] is not None
        assert env.history(doomed)[-1][1].startswith("cancelled by cli:")  # type: ignore[union-attr]

        history = env.history(kept)
        done = env.cli("replay", "--transaction-id", kept, "--dry-run")
        assert done.returncode == 0, done.stderr
        assert kept in done.stdout and "would be replayed" in done.stdout
        assert "nothing was changed" in done.stdout
        done = env.cli("replay", "--transaction-id", kept)  # stdin is no terminal: not confirmed
        assert done.returncode == 1 and "--yes" in done.stderr
        done = env.cli("replay")
        assert done.returncode == 2 and "say what to replay" in done.stderr
        time.sleep(0.5)
        assert env.history(kept) == history and env.received() == [kept]

        done = env.cli("replay", "--transaction-id", kept, "--route", "ehr-a", "--yes")
        assert done.returncode == 0, done.stderr
        assert "replayed 1 of 1 deliveries" in done.stdout
        assert kept in done.stdout and "queued" in done.stdout
        env.wait_received(2)
        env.eng.wait_status(kept, {"completed"})
        assert env.received() == [kept, kept]
        reasons = [reason or "" for _s, reason in env.history(kept)]
        assert any(r.startswith("replay requested (rerender, by cli:") for r in reasons)

        done = env.cli("pause", "nowhere")
        assert done.returncode == 2 and "not configured" in done.stderr


def test_cli_replay_by_status_and_window_with_resend(lt: LoopThread, tmp_path: Path) -> None:
    with engine_env(lt, tmp_path) as env:
        txids = [env.send(env.patient("keep")) for _ in range(2)]
        for t in txids:
            env.eng.wait_status(t, {"completed"})
        env.wait_received(2)
        first = list(env.eng.ehr.received)
        since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")
        done = env.cli(
            "replay",
            "--route",
            "ehr-keep",
            "--status",
            "completed",
            "--since",
            since,
            "--mode",
            "resend",
            "--yes",
        )
        assert done.returncode == 0, done.stderr
        assert "replayed 2 of 2 deliveries" in done.stdout
        env.wait_received(4)
        assert env.eng.ehr.received[2:] == first


# -- auth ------------------------------------------------------------------------------------
ADMIN_CALLS = [
    ("POST", "/admin/replay", {"transaction_ids": ["ffffffffffffffffffff"]}),
    ("POST", "/admin/cancel", {"transaction_id": "ffffffffffffffffffff"}),
    ("GET", "/admin/routes", None),
    ("POST", "/admin/routes/ehr-a/pause", None),
    ("POST", "/admin/routes/ehr-a/resume", None),
]


def test_admin_endpoints_need_the_admin_scope(lt: LoopThread, tmp_path: Path) -> None:
    with engine_env(lt, tmp_path) as env:
        for method, path, body in ADMIN_CALLS:
            url = env.eng.base + path
            r = httpx.request(method, url, json=body)
            assert r.status_code == 401, (path, r.text)
            assert "Bearer" in r.headers["www-authenticate"]
            r = httpx.request(method, url, json=body, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401, (path, r.text)
            for token in (LIMITED_TOKEN, SENDER_TOKEN):
                r = httpx.request(
                    method, url, json=body, headers={"Authorization": f"Bearer {token}"}
                )
                assert r.status_code == 403, (path, r.text)
                assert "ADMIN" in r.json()["issue"][0]["diagnostics"]
        routes = {x["route"]: x for x in env.admin("GET", "/admin/routes").json()["routes"]}
        assert set(routes) == set(ROUTES)
        assert routes["ehr-a"]["paused"] is False
        r = env.admin("POST", "/admin/routes/nowhere/pause")
        assert r.status_code == 404
