"""The event loop ``medcourier run`` runs on: uvloop where it is installed, else asyncio's.

Why: the engine's event loop is its bottleneck under load (HTTP, the workers' deliveries and
the MLLP listeners all run on it), and asyncio's own machinery (the loop's scheduling, the
selector, transports) was about 12% of the time the interpreter lock was held. In alternated
end-to-end runs uvloop's loop took 10% less engine CPU per document (docs/performance.md).
``MEDCOURIER_EVENT_LOOP=asyncio`` keeps asyncio's loop (to rule the loop out when chasing a
problem); the test suite runs on the same loop as the engine, so both choices stay testable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

ENV = "MEDCOURIER_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """A new event loop's constructor: uvloop's unless told otherwise or not installed."""
    choice = os.environ.get(ENV, "uvloop").strip().lower()
    if choice not in ("uvloop", "asyncio"):
        raise ValueError(f"{ENV} must be uvloop or asyncio, not {choice!r}")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:  # not on this platform (Windows): asyncio's loop
            return asyncio.new_event_loop
        return uvloop.new_event_loop
    return asyncio.new_event_loop
