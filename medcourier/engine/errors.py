"""The error tree of medcourier, readable at a glance.

    MedcourierError
    ├── ConfigError              a config file is wrong: file, key path, reason (at start-up)
    ├── PluginError              a plugin is missing, duplicated or breaks the hook contract
    ├── RenderError              a document cannot be rendered in the route's format (permanent)
    ├── DeliveryError
    │   ├── PermanentDeliveryError   the destination refused the message: retrying will not help
    │   └── RetryableDeliveryError   no answer, connection refused, broken frame: try again later
    └── BrokerError              the queue could not take or give work (publish not confirmed...)

Inbound validation errors are not exceptions of this tree: the HTTP layer answers them as FHIR
OperationOutcome (see ``medcourier.engine.api.fhir``) before anything is stored.
"""

from __future__ import annotations


class MedcourierError(Exception):
    """Base of every error medcourier raises on purpose."""


class ConfigError(MedcourierError):
    """A configuration is invalid; ``str()`` gives ``FILE: path: reason`` lines."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class PluginError(MedcourierError):
    """A plugin could not be loaded or breaks the hook contract."""


class RenderError(MedcourierError):
    """The document cannot be rendered in the requested format; retrying will not help."""


class DeliveryError(MedcourierError):
    """A delivery attempt failed."""


class PermanentDeliveryError(DeliveryError):
    """The destination refused the message (e.g. HL7 AE/AR)."""


class RetryableDeliveryError(DeliveryError):
    """A transient failure: the same message may succeed later."""


class BrokerError(MedcourierError):
    """The broker could not durably take or hand out work."""
