"""An ASGI app served by uvicorn inside the caller's event loop: the simulators' HTTP side.

``simulate-json`` and ``simulate-dmp`` both run in a test's loop or under the CLI, on a port
they bind themselves (port 0 for tests), without uvicorn's own signal handlers or logging
setup, and stop at once on request. This is that lifecycle, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the program embedding it owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedHttpServer:
    """Serve ``app`` on ``host:port``; ``start`` returns once connections are accepted."""

    def __init__(self, app: Any, host: str, port: int, what: str, **uvicorn_options: Any) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.what = what
        self.options = uvicorn_options
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"{self.what} already started")
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave the embedding program's logging alone
            log_level="warning",
            access_log=False,  # URLs may carry patient identifiers (the DMP status check)
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=2,
            **self.options,
        )
        self._server = server = _Server(config)
        self._task = task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                sock.close()
                self._server = self._task = None
                await task  # raises what went wrong (a bad certificate...)
                raise RuntimeError(f"the {self.what} stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        await task
