"""Entry point of the ``hprim-sante`` format (pyproject: ``hprim-sante =
"medcourier.transforms.hprim.plugin"``).

Kept apart from the writer so that loading the plugin set imports only what it registers.
"""

from __future__ import annotations

from medcourier.engine.plugins import FormatType, hookimpl
from medcourier.transforms.hprim.writer import FORMAT_NAME, HprimOptions, render, validate


@hookimpl
def medcourier_formats() -> list[FormatType]:
    """Register ``hprim-sante``."""
    return [
        FormatType(
            name=FORMAT_NAME,
            options_model=HprimOptions,
            render=render,
            validate=validate,
            description="HPRIM Santé 2.2/2.4 ORU file; the document as a companion file named "
            "by a FIC OBX, or as TX/C text lines",
        )
    ]
