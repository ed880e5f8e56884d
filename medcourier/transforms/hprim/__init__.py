"""HPRIM Santé 2.2 / 2.4: the French ASTM-derived flat file for results and reports.

:mod:`.writer` renders a Document as an ORU file (the ``hprim-sante`` format, registered by
:mod:`.plugin`); :mod:`.reader` parses HPRIM files that come in through drop folders. The
recommendation is not public: ``docs/hprim.md`` lists each format fact with the public source it
rests on, and which choices are options because implementations differ.
"""

from __future__ import annotations

from medcourier.transforms.hprim.reader import (
    HPRIM_DELIMITERS,
    Delimiters,
    EscapeStyle,
    HprimFile,
    HprimHeader,
    HprimMessage,
    HprimParseError,
    HprimPatient,
    HprimRecord,
    HprimRequest,
    HprimResult,
    HprimTrailer,
    parse_hprim,
)
from medcourier.transforms.hprim.writer import (
    FORMAT_NAME,
    HprimOptions,
    render,
    render_bundle,
    representable,
    validate,
)

__all__ = [
    "FORMAT_NAME",
    "HPRIM_DELIMITERS",
    "Delimiters",
    "EscapeStyle",
    "HprimFile",
    "HprimHeader",
    "HprimMessage",
    "HprimOptions",
    "HprimParseError",
    "HprimPatient",
    "HprimRecord",
    "HprimRequest",
    "HprimResult",
    "HprimTrailer",
    "parse_hprim",
    "render",
    "render_bundle",
    "representable",
    "validate",
]
