"""One clock for the engine: timezone-aware UTC, so stored times compare across machines."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)
