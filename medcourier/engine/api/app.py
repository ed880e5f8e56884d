"""The FastAPI application: FHIR endpoints, and OperationOutcome for every error.

In front of it, :class:`HotRoutes` serves ``$send-to-ehr`` itself. A profile of the end-to-end
load (py-spy, engine process, 4 KB documents) had FastAPI's middleware, routing and dependency
solving at about 15% of the time the interpreter lock was held, almost as much as the handler's
own work (18%), on the event loop that is the engine's bottleneck. The hot route keeps the
same handler, the same authorization and the same OperationOutcome answers; every other path
goes to FastAPI untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from medcourier import __version__
from medcourier.engine.api import admin, communication, directory, resources, send_to_ehr
from medcourier.engine.api.auth import TokenTable
from medcourier.engine.api.fhir import (
    FhirError,
    fhir_error_handler,
    fhir_response,
    operation_outcome,
)
from medcourier.engine.service import Engine

log = structlog.get_logger("medcourier.api")


async def unexpected(_request: Request, exc: Exception) -> Response:
    # Logged by type only: exception texts from the data layer can carry patient data.
    log.error("unexpected error", error=type(exc).__name__)
    return fhir_response(
        operation_outcome("Internal error: the request was not processed", "exception"), 500
    )


Handler = Callable[[Request], Awaitable[Response]]


class HotRoutes:
    """An ASGI app that answers a few (method, path) pairs itself and hands the rest to ``app``,
    other methods on those paths included (FastAPI answers them as before).

    A hot handler takes a Starlette request whose ``app`` is the FastAPI app (for its state) and
    returns a response; a FhirError it raises is answered as FastAPI's handler would, anything
    else as a 500 OperationOutcome, logged by type only. Unlike FastAPI's error middleware, the
    error is not raised again to uvicorn, whose log line would carry its text (patient data,
    possibly) and traceback; the connection stays open.
    """

    def __init__(self, app: FastAPI, routes: dict[tuple[str, str], Handler]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):  # uvicorn prefixes it; Starlette matches without
                path = path[len(root) :]
            handler = self.routes.get((scope["method"], path))
        if handler is None:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except FhirError as exc:
            response = await fhir_error_handler(request, exc)
        except Exception as exc:
            response = await unexpected(request, exc)
        await response(scope, receive, send)


def create_asgi(engine: Engine) -> HotRoutes:
    """What uvicorn serves: the hot route, then the FastAPI app."""
    return HotRoutes(create_app(engine), {("POST", send_to_ehr.SEND_PATH): send_to_ehr.send_to_ehr})


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="medcourier", version=__version__, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.tokens = TokenTable(engine.config.settings.tokens)
    app.add_exception_handler(FhirError, fhir_error_handler)

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = "not-found" if exc.status_code == 404 else "processing"
        return fhir_response(operation_outcome(str(exc.detail), code), exc.status_code)

    async def validation_error(_request: Request, exc: Exception) -> Response:
        return fhir_response(operation_outcome(str(exc), "invalid"), 400)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(send_to_ehr.router)
    app.include_router(directory.router)
    app.include_router(resources.router)
    app.include_router(communication.router)
    app.include_router(admin.router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
