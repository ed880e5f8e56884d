"""Operator endpoints: replay, cancel, pause and resume routes (scope ``ADMIN``).

Plain JSON, not FHIR: these are operations on the engine's own deliveries and queues, which have
no FHIR resource. Errors are still OperationOutcome, like every error of the API. The logic is
engine/admin.py's, shared with the command line.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medcourier.engine.admin import (
    DEFAULT_LIMIT,
    RERENDER,
    AdminError,
    ReplayCriteria,
    ReplayOutcome,
    apply_replay,
    cancel,
    parse_status,
    parse_time,
    plan_replay,
    route_overview,
)
from medcourier.engine.api.auth import Principal, require
from medcourier.engine.api.fhir import FhirError, read_json
from medcourier.engine.service import Engine

router = APIRouter()

BODY_LIMIT = 1024 * 1024
ADMIN = "ADMIN"
_CODES = {400: "invalid", 404: "not-found", 409: "conflict"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReplayBody(_Body):
    transaction_ids: list[str] = Field(default_factory=list)
    route: str | None = None
    statuses: list[str] = Field(default_factory=list)
    since: str | None = None
    until: str | None = None
    mode: str = RERENDER
    dry_run: bool = False
    force: bool = False
    limit: int = DEFAULT_LIMIT


class CancelBody(_Body):
    transaction_id: str
    route: str | None = None


class PauseBody(_Body):
    reason: str | None = None


def _refused(exc: AdminError) -> FhirError:
    return FhirError(exc.status, exc.message, code=_CODES.get(exc.status, "processing"))


async def _body(request: Request, model: type[_Body], optional: bool = False) -> Any:
    if optional and not await request.body():
        return model()
    raw = await read_json(request, BODY_LIMIT)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise FhirError(400, f"invalid request body: {problems}", code="invalid") from None


def _who(principal: Principal) -> str:
    return f"api:{principal.name}"


def _route(engine: Engine, route: str) -> str:
    if route not in {r.name for r in engine.config.routes}:
        raise FhirError(404, f"route {route!r} is not configured", code="not-found")
    return route


@router.post("/admin/replay")
async def replay(request: Request, principal: Principal = Depends(require(ADMIN))) -> Response:
    engine: Engine = request.app.state.engine
    body: ReplayBody = await _body(request, ReplayBody)
    try:
        criteria = ReplayCriteria(
            transaction_ids=tuple(body.transaction_ids),
            route=body.route,
            statuses=tuple(parse_status(s) for s in body.statuses),
            since=parse_time(body.since) if body.since else None,
            until=parse_time(body.until) if body.until else None,
            mode=body.mode,
            force=body.force,
            limit=body.limit,
        )
        routes = [r.name for r in engine.config.routes]
        rows = await engine.store.run(plan_replay, engine.store.sync, criteria, routes)
        if body.dry_run:
            outcomes = [ReplayOutcome(r, False, "would be replayed") for r in rows]
        else:
            outcomes = await apply_replay(
                engine.store,
                engine.broker,
                rows,
                _who(principal),
                engine.plugins.hook.medcourier_status_changed,
            )
    except AdminError as exc:
        raise _refused(exc) from None
    return JSONResponse(
        {
            "dry_run": body.dry_run,
            "mode": body.mode,
            "selected": len(outcomes),
            "replayed": sum(o.replayed for o in outcomes),
            "deliveries": [o.as_json() for o in outcomes],
        }
    )


@router.post("/admin/cancel")
async def cancel_queued(
    request: Request, principal: Principal = Depends(require(ADMIN))
) -> Response:
    engine: Engine = request.app.state.engine
    body: CancelBody = await _body(request, CancelBody)
    try:
        done = await cancel(
            engine.store,
            body.transaction_id,
            body.route,
            _who(principal),
            engine.plugins.hook.medcourier_status_changed,
        )
    except AdminError as exc:
        raise _refused(exc) from None
    return JSONResponse({"cancelled": [d.as_json() for d in done]})


@router.get("/admin/routes")
async def routes(request: Request, _p: Principal = Depends(require(ADMIN))) -> Response:
    engine: Engine = request.app.state.engine
    names = [r.name for r in engine.config.routes]
    return JSONResponse(
        {"routes": await engine.store.run(route_overview, engine.store.sync, names)}
    )


async def _set_paused(request: Request, route: str, paused: bool, principal: Principal) -> Response:
    engine: Engine = request.app.state.engine
    _route(engine, route)
    reason = (await _body(request, PauseBody, optional=True)).reason if paused else None
    await engine.control.set(route, paused, reason, _who(principal))
    overview = await engine.store.run(route_overview, engine.store.sync, [route])
    return JSONResponse(overview[0])


@router.post("/admin/routes/{route}/pause")
async def pause(
    route: str, request: Request, principal: Principal = Depends(require(ADMIN))
) -> Response:
    return await _set_paused(request, route, True, principal)


@router.post("/admin/routes/{route}/resume")
async def resume(
    route: str, request: Request, principal: Principal = Depends(require(ADMIN))
) -> Response:
    return await _set_paused(request, route, False, principal)
