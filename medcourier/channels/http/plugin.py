"""Entry point of the HTTP channel (``http`` in the ``medcourier`` entry-point group).

It registers the connector exactly as a third-party plugin would, so the core never imports it.
"""

from __future__ import annotations

from medcourier.channels.http import receiver
from medcourier.channels.http.outbound import HttpOptions, HttpSender
from medcourier.engine.plugins import CliCommand, ConnectorType, hookimpl


@hookimpl
def medcourier_connectors() -> list[ConnectorType]:
    """The ``http`` outbound connector."""
    return [
        ConnectorType(
            name="http",
            options_model=HttpOptions,
            open=HttpSender,
            description=(
                "POST/PUT to a web API: 2xx accepted, 4xx rejected with the answer kept, "
                "5xx/timeouts/refused retried; TLS verified by default"
            ),
        )
    ]


@hookimpl
def medcourier_cli_commands() -> list[CliCommand]:
    """``medcourier simulate-json``: a local vendor API that stores the JSON it receives."""
    return [
        CliCommand(
            name="simulate-json",
            help="accept JSON documents on POST /documents, save each one and answer 201",
            add_arguments=receiver.add_arguments,
            run=receiver.run,
        )
    ]
