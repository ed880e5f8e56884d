"""Plugin loading: the pluggy manager and the descriptors hooks return.

The core never imports a concrete channel or format: it asks the plugin manager, which loads the
``medcourier`` entry-point group (the built-ins are listed there in pyproject.toml like anyone's).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pluggy
from pydantic import BaseModel

from medcourier.engine import hookspecs
from medcourier.engine.errors import PluginError
from medcourier.engine.model import DeliveryResult, Document, Issue, Rendered

ENTRY_POINT_GROUP = "medcourier"

hookimpl = pluggy.HookimplMarker("medcourier")


class Sender(Protocol):
    """A live outbound link for one route (keeps its connection between messages).

    A Sender may also offer ``async def precheck(self, document: Document) -> DeliveryResult``:
    the worker calls it after validation and before rendering, for destinations with a
    precondition of their own (the DMP must be open for the patient). Accepted goes on, rejected
    ends the delivery with the reason, retry is retried with the route's policy.

    A Sender that writes a rendering as it goes, reading :meth:`Rendered.chunks` and never
    ``Rendered.data``, says so with a class attribute ``streams_renderings = True`` (MLLP does):
    a large rendering then reaches it in parts (the ORU's Base64 made a slice at a time) and is
    never whole in memory. For any other Sender the worker builds ``data`` first, on a thread, so
    reading it in ``deliver`` costs the event loop nothing; ``rendered.size`` gives the length
    without building it.
    """

    async def deliver(self, rendered: Rendered) -> DeliveryResult: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class FormatType:
    """An output format: ``validate`` finds problems, ``render`` turns a Document into bytes.

    ``options_model`` is a pydantic model (``extra="forbid"``) checked against the route's
    ``format_options`` at start-up; ``validate`` and ``render`` receive the parsed instance.
    """

    name: str
    options_model: type[BaseModel]
    render: Callable[[Document, Any], Rendered]
    validate: Callable[[Document, Any], list[Issue]] | None = None
    description: str = ""


@dataclass(frozen=True)
class ConnectorType:
    """An outbound connector: ``open`` builds a Sender from a route's ``deliver`` options."""

    name: str
    options_model: type[BaseModel]
    open: Callable[[Any], Sender]
    description: str = ""


@dataclass(frozen=True)
class InboundType:
    """An inbound channel type: ``open(options, sink, name)`` builds a channel that is started
    by the engine and hands what it receives to ``sink`` (see ``medcourier.engine.inbound``)."""

    name: str
    options_model: type[BaseModel]
    open: Callable[[Any, Any, str], Any]
    description: str = ""


@dataclass(frozen=True)
class CliCommand:
    """A ``medcourier`` sub-command contributed by a plugin."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | Awaitable[int]]


class Plugins:
    """The loaded plugin set, with the descriptors indexed by name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.formats: dict[str, FormatType] = _index(pm.hook.medcourier_formats(), "format")
        self.connectors: dict[str, ConnectorType] = _index(
            pm.hook.medcourier_connectors(), "connector"
        )
        self.inbound: dict[str, InboundType] = _index(
            pm.hook.medcourier_inbound_channels(), "inbound channel"
        )
        self.commands: dict[str, CliCommand] = _index(pm.hook.medcourier_cli_commands(), "command")

    @property
    def hook(self) -> Any:
        return self.pm.hook


def _index(results: Iterable[Iterable[Any]], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for group in results:
        for item in group or ():
            if item.name in found:
                raise PluginError(f"two plugins register the {kind} {item.name!r}")
            found[item.name] = item
    return found


def load_plugins(extra: Iterable[object] = ()) -> Plugins:
    """Load every plugin of the entry-point group, plus ``extra`` objects (tests, embedding)."""
    pm = pluggy.PluginManager("medcourier")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        # a module the entry points already loaded is the same plugin, not a second one
        if not pm.is_registered(plugin):
            pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return Plugins(pm)
