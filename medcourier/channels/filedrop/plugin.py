"""Entry point of the drop-folder channel (``filedrop`` in the ``medcourier`` entry-point group).

It registers the channel exactly as a third-party plugin would, so the core never imports it.
"""

from __future__ import annotations

from medcourier.channels.filedrop.watcher import FileDropOptions, FileDropWatcher
from medcourier.engine.plugins import InboundType, hookimpl


@hookimpl
def medcourier_inbound_channels() -> list[InboundType]:
    """The ``filedrop`` inbound channel: a polled folder of HL7 v2 files or documents."""
    return [
        InboundType(
            name="filedrop",
            options_model=FileDropOptions,
            open=FileDropWatcher,
            description=(
                "a watched drop folder: HL7 v2 files or documents with a JSON sidecar, "
                "moved to processed/ or error/ once the engine has answered"
            ),
        )
    ]
