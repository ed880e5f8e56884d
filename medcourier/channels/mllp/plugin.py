"""Entry point of the MLLP channel (``mllp`` in the ``medcourier`` entry-point group).

It registers the channel exactly as a third-party plugin would, so the core never imports it.
"""

from __future__ import annotations

from medcourier.channels.mllp import simulator
from medcourier.channels.mllp.client import MllpOptions, MllpSender
from medcourier.engine.plugins import CliCommand, ConnectorType, hookimpl


@hookimpl
def medcourier_connectors() -> list[ConnectorType]:
    """The ``mllp`` outbound connector."""
    return [
        ConnectorType(
            name="mllp",
            options_model=MllpOptions,
            open=MllpSender,
            description="HL7 v2 over MLLP/TCP, one persistent connection per route, ACK-checked",
        )
    ]


@hookimpl
def medcourier_cli_commands() -> list[CliCommand]:
    """``medcourier simulate-ehr``: a local EHR that ACKs what it receives."""
    return [
        CliCommand(
            name="simulate-ehr",
            help="listen for HL7 v2 over MLLP, save each message and ACK it",
            add_arguments=simulator.add_arguments,
            run=simulator.run,
        )
    ]
