"""``medcourier render``: what a route would send for a document, without sending anything.

Hospital IT checks a mapping before going live: the route's format validates and renders a
document described in a JSON file, and the result is printed (or written to ``--out``). The input
holds the FHIR Patient (and optionally Encounter) and the document's metadata and payload:

    {"patient": {...FHIR Patient...}, "encounter": {...} | null,
     "document": {"content_type": "application/pdf", "document_type": "11488-4",
                  "title": "...", "sender_identifier": "12345678910",
                  "payload_file": "report.pdf" | "payload_base64": "..."}}
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from pathlib import Path
from typing import Any

from medcourier.engine.clock import now
from medcourier.engine.config import load_config
from medcourier.engine.errors import ConfigError, RenderError
from medcourier.engine.model import Document
from medcourier.engine.plugins import Plugins
from medcourier.engine.txid import new_transaction_id

# An input file is a small JSON description plus one document; refuse anything absurd.
MAX_INPUT_BYTES = 128 * 1024 * 1024


def load_document(path: Path) -> Document:
    """Build a Document from the JSON description, resolving ``payload_file`` beside it."""
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise ValueError(f"{path}: larger than {MAX_INPUT_BYTES} bytes")
    raw: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("patient"), dict):
        raise ValueError(f"{path}: expected an object with a 'patient' FHIR resource")
    meta = raw.get("document") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'document' must be an object")
    if "payload_file" in meta:
        payload = (path.parent / str(meta["payload_file"])).read_bytes()
    elif "payload_base64" in meta:
        try:
            payload = base64.b64decode(str(meta["payload_base64"]), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{path}: document.payload_base64 is not base64: {exc}") from exc
    else:
        raise ValueError(f"{path}: give document.payload_file or document.payload_base64")
    patient = {"resourceType": "Patient", "id": "example", **raw["patient"]}
    encounter = raw.get("encounter")
    return Document(
        transaction_id=str(meta.get("transaction_id") or new_transaction_id()),
        created_at=now(),
        content_type=str(meta.get("content_type", "application/pdf")),
        document_type=str(meta.get("document_type", "11488-4")),
        title=str(meta.get("title", "Document")),
        payload=payload,
        patient=patient,
        encounter=encounter if isinstance(encounter, dict) else None,
        sender_identifier=meta.get("sender_identifier"),
        sender_application=str(meta.get("sender_application", "medcourier render")),
    )


def render_command(args: argparse.Namespace, plugins: Plugins) -> int:
    config = load_config(args.config, plugins)
    route = next((r for r in config.routes if r.name == args.route), None)
    if route is None:
        names = ", ".join(r.name for r in config.routes) or "none"
        raise ConfigError([f"no route named {args.route!r} (routes: {names})"], args.config)
    try:
        document = load_document(Path(args.input))
    except (OSError, ValueError) as exc:
        print(f"medcourier render: {exc}", file=sys.stderr)
        return 2
    fmt = plugins.formats[route.settings.format]
    problems = fmt.validate(document, route.format_options) if fmt.validate else []
    for issue in problems:
        print(f"{issue.severity}: {issue.message}", file=sys.stderr)
    if any(i.severity in ("error", "fatal") for i in problems):
        return 1
    try:
        rendered = fmt.render(document, route.format_options)
    except RenderError as exc:
        print(f"medcourier render: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_bytes(rendered.data)
        print(f"{args.out}: {len(rendered.data)} bytes, {rendered.media_type}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(rendered.data)
        sys.stdout.buffer.flush()
    return 0
