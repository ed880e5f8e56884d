#!/usr/bin/env python3
"""Render throughput and peak memory per format, for every route of a config.

For each route of the config (by default config/example.yaml, which has one route per format),
renders a 4 KB and a 1 MB PDF for a fixed time and prints renders/s, then, in a fresh process per
format, renders a 50 MB PDF once and reports the peak resident memory above the process's
baseline, as a multiple of the document's size. Prints one table.

    .venv/bin/python bench/render_formats.py
    .venv/bin/python bench/render_formats.py --config my.yaml --seconds 2

Not a test: nothing is asserted. The INS-qualified patient below satisfies the DMP formats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medcourier.engine.config import load_config
from medcourier.engine.model import Document
from medcourier.engine.plugins import load_plugins

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"4 KB": 4 * 1024, "1 MB": 1024 * 1024}
BIG = 50 * 1024 * 1024

# The INS-qualified patient of config/examples/document-ins.json, which the DMP formats need.
PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "bench",
    **json.loads((ROOT / "config" / "examples" / "document-ins.json").read_text())["patient"],
}


def pdf(size: int) -> bytes:
    head, tail = b"%PDF-1.4\n%bench\n", b"\n%%EOF\n"
    return head + os.urandom(max(0, size - len(head) - len(tail))) + tail


def document(payload: bytes) -> Document:
    return Document(
        transaction_id="0123456789abcdef0123",
        created_at=datetime.now(UTC),
        content_type="application/pdf",
        document_type="11488-4",
        title="Bench document",
        payload=payload,
        patient=PATIENT,
        encounter=None,
        sender_identifier="10003999999",
    )


def targets(config: Path) -> list[tuple[str, str, Any]]:
    """(label, format, options) for each route, plus the bare CDA of each ANS-profile route
    (the DMP's own format, which no example route uses alone yet)."""
    os.environ.setdefault("MEDCOURIER_API_TOKEN", "bench-render-token-0123456789")
    found: list[tuple[str, str, Any]] = []
    for route in load_config(config, load_plugins()).routes:
        found.append((route.name, route.settings.format, route.format_options))
        if route.settings.format == "hl7v2-ans-cda":
            found.append((f"{route.name} (its CDA alone)", "cda-dmp", route.format_options.cda))
    return found


def rate(fmt_name: str, options: Any, size: int, seconds: float) -> float:
    fmt = load_plugins().formats[fmt_name]
    doc = document(pdf(size))
    fmt.render(doc, options)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fmt.render(doc, options)
        count += 1
    return count / (time.perf_counter() - start)


def peak_child(config: Path, label: str) -> dict[str, float]:
    """Runs in a fresh process: peak RSS growth while rendering one 50 MB PDF."""
    _, fmt_name, options = next(t for t in targets(config) if t[0] == label)
    fmt = load_plugins().formats[fmt_name]
    doc = document(pdf(BIG))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    rendered = fmt.render(doc, options)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "extra_bytes": after - before, "output_bytes": len(rendered.data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "example.yaml")
    parser.add_argument("--seconds", type=float, default=3.0, help="per rate measurement")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        print(json.dumps(peak_child(args.config, args.peak_child)))
        return 0
    print(
        "| route | format | renders/s 4 KB | renders/s 1 MB | 50 MB render s | "
        "memory above the held document | × document |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, fmt_name, options in targets(args.config):
        rates = [rate(fmt_name, options, size, args.seconds) for size in SIZES.values()]
        out = subprocess.run(
            [sys.executable, __file__, "--config", str(args.config), "--peak-child", label],
            capture_output=True,
            text=True,
            check=True,
        )
        peak = json.loads(out.stdout)
        extra = peak["extra_bytes"]
        print(
            f"| {label} | {fmt_name} | {rates[0]:,.0f} | {rates[1]:,.0f} | "
            f"{peak['seconds']:.2f} | {extra / 2**20:,.0f} MiB | {extra / BIG:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
