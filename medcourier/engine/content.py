"""Facts about documents shared by every inbound door (HTTP, MLLP, drop folders)."""

from __future__ import annotations

import re
from typing import Any

from stdnum import luhn

# The four content types of the seed's $send-to-ehr; every door accepts the same ones.
CONTENT_TYPES = ("application/pdf", "image/jpeg", "image/png", "application/txt")


_LOINC = re.compile(r"^(\d{1,7})-(\d)$")


def is_loinc(code: str) -> bool:
    """A LOINC code: digits, a dash and the Luhn (mod 10) check digit, like 11488-4."""
    m = _LOINC.fullmatch(code)
    return m is not None and luhn.is_valid(m.group(1) + m.group(2))


def sniff(data: bytes) -> str | None:
    """The content type the bytes really are, among the four accepted ones."""
    if data.startswith(b"%PDF-") or b"%PDF-" in data[:1024]:
        return "application/pdf"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(ch) < 32 and ch not in "\t\r\n\f" for ch in text[:65536]):
        return None
    return "application/txt"


def organizations(patient: dict[str, Any], encounter: dict[str, Any] | None) -> frozenset[str]:
    """The hospitals a document belongs to, which routes match on."""
    refs = [(patient.get("managingOrganization") or {}).get("reference")]
    if encounter is not None:
        refs.append((encounter.get("serviceProvider") or {}).get("reference"))
    return frozenset(r for r in refs if isinstance(r, str))


def default_title(patient: dict[str, Any], document_type: str, transaction_id: str) -> str:
    """The seed's nomenclature: last_name_first_name_birthdate_document_type_identifier."""
    names = patient.get("name") or [{}]
    name = next((n for n in names if n.get("use") == "official"), names[0])
    family = name.get("family") or ""
    given = (name.get("given") or [""])[0]
    birth = (patient.get("birthDate") or "").replace("-", "")
    return "_".join([family, given, birth, document_type, transaction_id])
