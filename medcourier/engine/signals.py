"""Waiting for SIGINT/SIGTERM, for the engine and the simulators alike."""

from __future__ import annotations

import asyncio
import signal


async def until_signalled() -> None:
    """Wait for SIGINT/SIGTERM. Where handlers cannot be set (not the main thread, Windows),
    wait forever: Ctrl-C then cancels the task and the caller's cleanup still happens."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(signum)
    try:
        await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
