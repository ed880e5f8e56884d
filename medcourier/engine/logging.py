"""Structured logs: one JSON object per line, carrying ids, routes and codes.

Never patient data: events carry transaction ids, route names, statuses and error codes, never
names, birth dates, identifiers or payloads. ``scrub`` is a last line of defence that drops keys
which by their name could carry them, should a future call site slip.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

FORBIDDEN_KEYS = frozenset(
    {
        "name",
        "family",
        "given",
        "birth_date",
        "birthdate",
        "nir",
        "ins",
        "payload",
        "patient",
        "identifier",
        "address",
        "telecom",
        "body",
        "document",
    }
)


def scrub(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in FORBIDDEN_KEYS:
            event[key] = "[redacted]"
    return event


def configure(level: str = "info", stream: Any = None) -> None:
    """Set structlog (and the stdlib loggers of our dependencies) to JSON lines on ``stream``."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    out = stream or sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=out, force=True)
