"""SIGKILL the engine while messages and files arrive: nothing that got an ACK, nothing that left
the drop folder, is lost; whatever got no ACK is safe for the sender to send again.

Real processes: `medcourier run` is killed with SIGKILL mid-flow and started again on the same
data directory; the EHR is the simulator on a real socket.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from medcourier.channels.mllp.ack import parse_ack
from medcourier.channels.mllp.framing import FrameReader, frame
from medcourier.channels.mllp.simulator import EhrSimulator
from tests.harness import TOKEN, LoopThread, eventually, free_ports
from tests.services import fresh_postgres_url, rabbitmq_url

ADT = (
    "MSH|^~\\&|ADT|HOSPK|MC|MC|20261121120000||ADT^A01^ADT_A01|ADT-K|P|2.5\r"
    "EVN|A01\r"
    "PID|1||IPP-K^^^HOSPK&1.2.250.1.999.9&ISO^PI||Crash^Test||19800101|M\r"
    "PV1|1|I|W||||||||||||||||V-K^^^HOSPK&1.2.250.1.999.8&ISO^VN\r"
)


def _oru(i: int) -> bytes:
    text = base64.b64encode(f"document number {i}\n".encode()).decode()
    return (
        f"MSH|^~\\&|LAB|HOSPK|MC|MC|20261121120000||ORU^R01^ORU_R01|ORU-{i}|P|2.5\r"
        "PID|1||IPP-K^^^HOSPK&1.2.250.1.999.9&ISO^PI||Crash^Test||19800101|M\r"
        "OBR|1|||11502-2^Lab^LN\r"
        f"OBX|1|ED|11502-2^Lab^LN||^TEXT^PLAIN^Base64^{text}||||||F\r"
    ).encode()


def _send(port: int, message: bytes, timeout: float = 10) -> str | None:
    """One message on a fresh connection; the ACK code, or None when no ACK came."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(frame(message))
            reader = FrameReader()
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                for ack in reader.feed(chunk):
                    return parse_ack(ack).code
    except OSError:
        return None


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "medcourier.engine.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        out.close()


def _wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the engine exited"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("engine did not start")


def _delivered(ehr: EhrSimulator) -> list[str]:
    found = []
    for raw in ehr.received:
        obx = next(s for s in raw.decode().split("\r") if s.startswith("OBX|"))
        found.append(base64.b64decode(obx.split("|")[5].split("^")[4]).decode().strip())
    return found


@pytest.mark.parametrize("backend", ["embedded", "rabbitmq+postgresql"])
def test_sigkill_mid_flow_loses_nothing_accepted(
    lt: LoopThread, tmp_path: Path, backend: str
) -> None:
    ehr = EhrSimulator()
    lt.run(ehr.start())
    http_port, mllp_port = free_ports(2)
    inbox = tmp_path / "inbox"
    instance = f"mccrash-{uuid.uuid4().hex[:8]}"
    cfg: dict[str, Any] = {
        "instance": instance,
        "data_dir": str(tmp_path / "data"),
        "log_level": "warning",
        "http": {"host": "127.0.0.1", "port": http_port},
        "tokens": [{"name": "t", "token": TOKEN, "scopes": ["SEND_TO_EHR", "PATIENT_READ"]}],
        "inbound": [
            {"name": "hl7-in", "channel": "mllp", "host": "127.0.0.1", "port": mllp_port},
            {
                "name": "inbox",
                "channel": "filedrop",
                "path": str(inbox),
                "format": "document",
                "poll_interval": 0.05,
                "stable_for": 0.05,
            },
        ],
        "routes": [
            {
                "name": "ehr",
                "match": {"fallback": True},
                "format": "hl7v2-oru",
                "deliver": {
                    "connector": "mllp",
                    "host": "127.0.0.1",
                    "port": ehr.port,
                    "ack_timeout": 5,
                },
                "retry": {"max_attempts": 20, "initial_delay": 0.1, "max_delay": 0.5},
            }
        ],
    }
    if backend != "embedded":
        cfg["broker"] = rabbitmq_url()
        cfg["store"] = fresh_postgres_url()
    config = tmp_path / "crash.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "engine.log"
    base = f"http://127.0.0.1:{http_port}"
    proc = _start(config, log)
    try:
        _wait_up(base, proc)
        code = _send(mllp_port, ADT.encode())
        assert code == "AA", f"ADT answered {code}: {log.read_text()[-3000:]}"

        acked: set[str] = set()
        unacked: list[int] = []
        dropped: list[str] = []
        stop = threading.Event()

        def messages() -> None:
            for i in range(400):
                if stop.is_set():
                    unacked.append(i)
                    continue
                code = _send(mllp_port, _oru(i), timeout=3)
                if code == "AA":
                    acked.add(f"document number {i}")
                else:
                    unacked.append(i)

        def files() -> None:
            inbox.mkdir(parents=True, exist_ok=True)
            for i in range(40):
                name = f"file-{i}.txt"
                tmp = tmp_path / name
                (tmp_path / f"{name}.json").write_text(
                    json.dumps(
                        {
                            "patient_identifiers": [
                                {"system": "urn:oid:1.2.250.1.999.9", "value": "IPP-K"}
                            ]
                        }
                    )
                )
                tmp.write_text(f"document file {i}\n")
                os.replace(tmp_path / f"{name}.json", inbox / f"{name}.json")
                os.replace(tmp, inbox / name)
                dropped.append(f"document file {i}")
                time.sleep(0.02)

        sender = threading.Thread(target=messages)
        dropper = threading.Thread(target=files)
        sender.start()
        dropper.start()
        eventually(lambda: len(acked) >= 40, 30, "some messages ACKed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        sender.join(60)
        dropper.join(60)
        assert acked, "nothing was ACKed before the kill"

        # after the restart every ACKed message and every file is delivered
        proc = _start(config, log)
        _wait_up(base, proc)
        for i in unacked:  # the sender resends what got no ACK, as MLLP senders do
            assert _send(mllp_port, _oru(i)) == "AA"
        expected = acked | {f"document number {i}" for i in unacked} | set(dropped)

        def all_delivered() -> bool:
            return expected <= set(_delivered(ehr))

        eventually(all_delivered, 90, "every accepted document delivered")
        delivered = _delivered(ehr)
        duplicates = len(delivered) - len(set(delivered))
        print(
            f"\n[{backend}] acked before kill: {len(acked)}, resent: {len(unacked)}, "
            f"files: {len(dropped)}, delivered: {len(set(delivered))}, "
            f"duplicates: {duplicates}"
        )
        assert not set(delivered) - expected, "something was delivered that nobody sent"
        assert not list(inbox.glob("file-*")), "files left in the drop folder"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        lt.run(ehr.stop())
        if backend != "embedded":
            import pika

            conn = pika.BlockingConnection(
                pika.URLParameters(rabbitmq_url().replace(":5672//", ":5672/%2F"))
            )
            ch = conn.channel()
            ch.queue_delete(f"{instance}.route.ehr")
            ch.exchange_delete(f"{instance}.routes")
            conn.close()
