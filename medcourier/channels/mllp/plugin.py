"""Entry point of the MLLP channel (``mllp`` in the ``medcourier`` entry-point group).

It registers the channel exactly as a third-party plugin would, so the core never imports it.
"""

from __future__ import annotations

from medcourier.channels.mllp import simulator
from medcourier.channels.mllp.client import MllpOptions, MllpSender
from medcourier.channels.mllp.listener import ListenerOptions, MllpListener
from medcourier.engine.inbound import InboundSink
from medcourier.engine.plugins import CliCommand, ConnectorType, InboundType, hookimpl


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
def medcourier_inbound_channels() -> list[InboundType]:
    """The ``mllp`` inbound channel: a listener handing HL7 v2 messages to the engine."""
    return [
        InboundType(
            name="mllp",
            options_model=ListenerOptions,
            open=open_listener,
            description="HL7 v2 over MLLP/TCP or TLS in, ACKed once the engine has committed",
        )
    ]


def open_listener(options: ListenerOptions, sink: InboundSink, name: str) -> MllpListener:
    """Build (not start) the listener of one ``inbound[]`` entry; the engine starts it."""
    return MllpListener(options, sink, name)


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
