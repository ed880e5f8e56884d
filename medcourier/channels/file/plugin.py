"""Entry point of the file connector (``file`` in the ``medcourier`` entry-point group).

It registers the connector exactly as a third-party plugin would, so the core never imports it.
"""

from __future__ import annotations

from medcourier.channels.file.outbound import FileOptions, FileSender
from medcourier.engine.plugins import ConnectorType, hookimpl


@hookimpl
def medcourier_connectors() -> list[ConnectorType]:
    """The ``file`` outbound connector."""
    return [
        ConnectorType(
            name="file",
            options_model=FileOptions,
            open=FileSender,
            description=(
                "files in a folder: atomic write, never overwriting, optional .ok companion; "
                "full disk or permissions hold the route"
            ),
        )
    ]
