"""Entry point of the DMP channel (``dmp`` in the ``medcourier`` entry-point group).

It registers the connector exactly as a third-party plugin would, so the core never imports it.
"""

from __future__ import annotations

from medcourier.channels.dmp import simulator
from medcourier.channels.dmp.connector import DmpOptions, DmpSender
from medcourier.engine.plugins import CliCommand, ConnectorType, hookimpl


@hookimpl
def medcourier_connectors() -> list[ConnectorType]:
    """The ``dmp`` outbound connector."""
    return [
        ConnectorType(
            name="dmp",
            options_model=DmpOptions,
            open=DmpSender,
            description=(
                "the patient's DMP: checks it is open before rendering, then POSTs the CDA; "
                "closed or missing DMP and 4xx rejected, 5xx/timeouts/refused retried"
            ),
        )
    ]


@hookimpl
def medcourier_cli_commands() -> list[CliCommand]:
    """``medcourier simulate-dmp``: a local DMP web service that stores the CDA it receives."""
    return [
        CliCommand(
            name="simulate-dmp",
            help="a DMP web service: answers DMP status checks, stores CDA documents in a folder",
            add_arguments=simulator.add_arguments,
            run=simulator.run,
        )
    ]
