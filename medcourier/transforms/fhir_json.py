"""Tolerant readers for FHIR JSON, shared by every format.

Resources reach formats as plain JSON (dicts) exactly as senders and the ADT feed wrote them;
a format must never crash on a missing or oddly typed element, so these read "what is there, of
the expected type" and give an empty value otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def as_str(value: object) -> str:
    return value if isinstance(value, str) else ""


def as_strs(value: object) -> list[str]:
    """The non-empty strings of a list (FHIR ``given``, ``line``...)."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str) and item]


def as_dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def as_dicts(value: object) -> list[Mapping[str, Any]]:
    """The objects of a list (``identifier``, ``name``, ``telecom``...)."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def first_of(value: object) -> object:
    return value[0] if isinstance(value, list) and value else None
