"""The FastAPI application: FHIR endpoints, and OperationOutcome for every error."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

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

    async def unexpected(_request: Request, exc: Exception) -> Response:
        # Logged by type only: exception texts from the data layer can carry patient data.
        log.error("unexpected error", error=type(exc).__name__)
        return fhir_response(
            operation_outcome("Internal error: the request was not processed", "exception"), 500
        )

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
