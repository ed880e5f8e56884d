"""Every hook medcourier calls, in one place.

Built-in channels and formats implement these exactly as a third-party plugin would, through the
``medcourier`` entry-point group. Hooks are called synchronously by pluggy: they register
descriptors or do pure work; network I/O lives in the objects they return (async methods the
engine drives). An implementation may accept only some of a hook's arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from medcourier.engine.inbound import InboundMessage, Interpretation
    from medcourier.engine.model import Document, Issue, Status
    from medcourier.engine.plugins import CliCommand, ConnectorType, FormatType, InboundType

hookspec = pluggy.HookspecMarker("medcourier")


@hookspec
def medcourier_formats() -> list[FormatType]:
    """Register output formats.

    :return: format descriptors; each name must be unique across all plugins and is what a route's
        ``format:`` names in the YAML.
    """
    raise NotImplementedError


@hookspec
def medcourier_connectors() -> list[ConnectorType]:
    """Register outbound connector types.

    :return: connector descriptors; each name must be unique and is what a route's
        ``deliver.connector`` names.
    """
    raise NotImplementedError


@hookspec
def medcourier_inbound_channels() -> list[InboundType]:
    """Register inbound channel types (listeners, watched folders).

    :return: inbound descriptors; each name must be unique and is what an ``inbound[].channel``
        names in the YAML.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def medcourier_interpret_message(message: InboundMessage) -> Interpretation | None:
    """Say what an inbound message means: a directory update or documents to route.

    Stops at the first non-None result. Raise ``InboundError`` (with an HL7 ERR-2 location) for
    a message of your kind whose content is wrong; return None for a message you do not handle.

    :param message: the message as an inbound channel received and decoded it.
    :return: a ``DirectoryUpdate`` or ``MessageDocuments``, or None.
    """


@hookspec
def medcourier_validate(document: Document, route: str, options: dict[str, Any]) -> list[Issue]:
    """Add rule sets a profile needs before a document is rendered for a route.

    :param document: the document about to be rendered.
    :param route: the route's name.
    :param options: the route's ``validate`` options from the YAML (may be empty).
    :return: findings; any with severity ``error`` stops the delivery as entered-in-error.
    """
    raise NotImplementedError


@hookspec
def medcourier_status_changed(
    transaction_id: str, route: str, old: Status | None, new: Status, reason: str | None
) -> None:
    """Be told that a delivery changed status (after the change is committed).

    Called on the engine's event loop: do not block; hand slow work (webhooks) to a task.

    :param transaction_id: the document's transaction id (also MSH-10 of HL7 renderings).
    :param route: the route whose delivery changed.
    :param old: the previous status, ``None`` for a new delivery.
    :param new: the new status.
    :param reason: why, when the engine knows (an ACK's text, a connection error...).
    """


@hookspec
def medcourier_cli_commands() -> list[CliCommand]:
    """Add sub-commands to the ``medcourier`` command line (simulators, tools).

    :return: command descriptors; names must be unique.
    """
    raise NotImplementedError
