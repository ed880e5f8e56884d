"""Which patient identifiers are a NIR, and whether a NIR is well formed.

The DMP authenticates a patient by the NIR (numéro d'inscription au répertoire, the social
security number) or the NIA. It reaches the engine two ways: as an INS under one of the ANS's INS
authority OIDs (what FR Core and the CI-SIS use), or as the seed's Lifen identifier (system
``http://lifen.fr/fhir/Identifier/patient-nir-od``, type code ``NIR-OD``). Both name the same
number; the CDA carries it under the INS-NIR OID. Both the API (which refuses a malformed NIR
when the Patient is created) and the CDA format (which reads the INS) use this module, so the two
agree on what counts.

The checksum is python-stdnum's ``stdnum.fr.nir``: 13 characters and a two-digit key equal to
97 - (number mod 97), Corsican departments 2A / 2B counted as 19 / 18.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from stdnum.exceptions import InvalidChecksum, InvalidComponent, InvalidFormat, InvalidLength
from stdnum.fr import nir

INS_NIR_OID = "1.2.250.1.213.1.4.8"
# INS authorities, in order of preference when a patient carries several: INS-NIR, INS-NIA,
# then the test NIR and NIA the ANS reserves for integration platforms.
INS_OIDS = (
    INS_NIR_OID,
    "1.2.250.1.213.1.4.9",
    "1.2.250.1.213.1.4.10",
    "1.2.250.1.213.1.4.11",
)
# The seed's (Lifen's) NIR identifier systems; their number is read as an INS-NIR.
LIFEN_NIR_SYSTEMS = frozenset(
    {
        "http://lifen.fr/fhir/Identifier/patient-nir-od",
        "http://lifen.fr/fhir/Identifier/patient-nir",
    }
)
LIFEN_NIR_TYPE_CODES = frozenset({"NIR-OD", "NIR"})

_SPACES = re.compile(r"\s")


def ins_authority(identifier: Mapping[str, Any]) -> str | None:
    """The INS authority OID an identifier's number belongs to, or None if it is not a NIR/NIA."""
    system = identifier.get("system")
    if isinstance(system, str):
        if system.startswith("urn:oid:") and system[len("urn:oid:") :] in INS_OIDS:
            return system[len("urn:oid:") :]
        if system in LIFEN_NIR_SYSTEMS:
            return INS_NIR_OID
    kind = identifier.get("type")
    codings = kind.get("coding") if isinstance(kind, dict) else None
    for coding in codings if isinstance(codings, list) else []:
        if isinstance(coding, dict) and coding.get("code") in LIFEN_NIR_TYPE_CODES:
            return INS_NIR_OID
    return None


def compact(value: str) -> str:
    return _SPACES.sub("", value)


def nir_problem(value: str) -> str | None:
    """Why ``value`` is not a valid NIR, in words a sender understands; None when it is valid."""
    number = compact(value).upper()
    if len(number) != 15:
        return f"a NIR has 15 characters (13 and a 2-digit key), not {len(number)}"
    try:
        nir.validate(number)
    except InvalidLength:
        return "a NIR has 15 characters (13 and a 2-digit key)"
    except InvalidFormat:
        return (
            "a NIR is made of digits (the department may be 2A or 2B for Corsica), "
            "followed by a 2-digit key"
        )
    except InvalidChecksum:
        return "the key (last 2 digits) does not match: it must be 97 - (number mod 97)"
    except InvalidComponent:
        return "a NIR is made of digits, 2A or 2B for Corsica"
    return None
