"""``HotRoutes`` (api/app.py): the routes served ahead of FastAPI answer as FastAPI would.

The engine's own ``$send-to-ehr`` goes through it in every test of tests/test_api.py (its
refusals word for word, auth included). Here a small FastAPI app behind it, called over ASGI,
shows what those tests cannot provoke: an unexpected failure in a hot handler, and that every
other path and method still reaches FastAPI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from structlog.testing import capture_logs

from medcourier.engine.api.app import HotRoutes, unexpected
from medcourier.engine.api.fhir import FhirError, fhir_error_handler, fhir_response
from tests.harness import TOKEN, LoopThread, running_engine


def _app() -> HotRoutes:
    inner = FastAPI()
    inner.state.word = "from-state"
    inner.add_exception_handler(FhirError, fhir_error_handler)
    inner.add_exception_handler(Exception, unexpected)

    @inner.get("/other")
    async def other() -> dict[str, str]:
        return {"served": "fastapi"}

    async def hot(request: Request) -> Response:
        kind = request.query_params.get("fail")
        if kind == "fhir":
            raise FhirError(409, "refused here", code="conflict", headers={"X-Why": "test"})
        if kind == "bug":
            raise RuntimeError("Patient DUPONT Jean 1970-01-01")  # text that must not be logged
        body = await request.body()
        return fhir_response({"state": request.app.state.word, "length": len(body)})

    return HotRoutes(inner, {("POST", "/hot"): hot})


def _call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_hot_route_is_served_with_the_apps_state() -> None:
    r = _call("POST", "/hot", content=b"12345")
    assert r.status_code == 200
    assert r.json() == {"state": "from-state", "length": 5}
    assert r.headers["content-type"].startswith("application/fhir+json")


def test_other_paths_reach_fastapi() -> None:
    r = _call("GET", "/other")
    assert (r.status_code, r.json()) == (200, {"served": "fastapi"})
    assert _call("GET", "/missing").status_code == 404


def test_other_methods_on_a_hot_path_reach_fastapi() -> None:
    r = _call("GET", "/hot")
    assert r.status_code == 404  # FastAPI's answer: it has no route at /hot
    assert r.json() == {"detail": "Not Found"}


def test_fhir_error_is_answered_as_fastapis_handler_answers_it() -> None:
    r = _call("POST", "/hot?fail=fhir")
    assert r.status_code == 409
    assert r.headers["x-why"] == "test"
    issue = r.json()["issue"][0]
    assert (issue["code"], issue["diagnostics"]) == ("conflict", "refused here")


def test_unexpected_error_is_a_500_outcome_logged_by_type_only() -> None:
    with capture_logs() as events:
        r = _call("POST", "/hot?fail=bug")
    assert r.status_code == 500
    issue = r.json()["issue"][0]
    assert issue["code"] == "exception"
    assert issue["diagnostics"] == "Internal error: the request was not processed"
    assert [e["error"] for e in events if e["event"] == "unexpected error"] == ["RuntimeError"]
    assert "DUPONT" not in repr(events) and "DUPONT" not in r.text


def test_get_on_send_to_ehr_is_answered_by_fastapi_as_before(
    lt: LoopThread, tmp_path: Path
) -> None:
    """FastAPI took GET $send-to-ehr for a CommunicationRequest read of that id (its
    ``/fhir/CommunicationRequest/{ident}`` route): it still does."""
    with running_engine(lt, tmp_path) as eng:
        got = httpx.get(
            f"{eng.base}/fhir/CommunicationRequest/$send-to-ehr",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        other = httpx.get(
            f"{eng.base}/fhir/CommunicationRequest/no-such-id",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert got.status_code == other.status_code
    assert got.json()["resourceType"] == "OperationOutcome"
    assert got.json()["issue"][0]["code"] == other.json()["issue"][0]["code"]


def test_a_root_path_is_taken_off_before_the_lookup() -> None:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app(), root_path="/engine")
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/engine/hot", content=b"abc")

    r = asyncio.run(go())
    assert (r.status_code, r.json()) == (200, {"state": "from-state", "length": 3})
