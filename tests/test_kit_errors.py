"""Every error is RFC 9457 problem+json with a stable type, and nothing leaks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, HTTPException
from kit_support import build_app, serve
from pydantic import BaseModel, Field

from services.kit.errors import PROBLEM_BASE, NotFound, Unauthorized
from services.kit.settings import Settings

SECRET = "db-password-hunter2"


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=20)
    quantity: int = Field(ge=1)


def make_router() -> APIRouter:
    router = APIRouter()

    @router.post("/items", status_code=201)
    async def create(body: ItemIn) -> dict[str, Any]:
        return body.model_dump()

    @router.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        if item_id == 404:
            raise NotFound("No item with this id.")
        if item_id == 418:
            raise HTTPException(status_code=418, detail="I'm a teapot")
        if item_id == 401:
            raise Unauthorized("The access token has expired.")
        return {"id": item_id}

    @router.get("/boom")
    async def boom() -> dict[str, Any]:
        raise RuntimeError(f"connection to postgresql://app:{SECRET}@db failed")

    return router


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(build_app(settings, [make_router()])) as c:
        yield c


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + slug
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    return body


async def test_malformed_json_is_400_malformed_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/items", content=b'{"name": "x", ', headers={"content-type": "application/json"}
    )
    body = problem(response, 400, "malformed-body")
    assert body["instance"] == "/items"


async def test_schema_violation_is_422_with_the_errors(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", json={"name": "", "quantity": "many"})
    body = problem(response, 422, "validation-failed")
    locations = {tuple(e["loc"]) for e in body["errors"]}
    assert locations == {("body", "name"), ("body", "quantity")}
    assert all(set(e) == {"loc", "msg", "type"} for e in body["errors"])


async def test_missing_body_is_422(client: httpx.AsyncClient) -> None:
    body = problem(await client.post("/items"), 422, "validation-failed")
    assert body["errors"]


async def test_bad_path_parameter_is_422(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/items/abc"), 422, "validation-failed")
    assert body["errors"][0]["loc"] == ["path", "item_id"]


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    problem(await client.get("/nowhere"), 404, "not-found")


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/items")
    problem(response, 405, "method-not-allowed")
    assert "POST" in response.headers["allow"]


async def test_domain_problem_keeps_its_detail(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/items/404"), 404, "not-found")
    assert body["detail"] == "No item with this id."
    assert body["instance"] == "/items/404"


async def test_unauthorized_carries_a_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/401")
    problem(response, 401, "unauthorized")
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge


async def test_other_http_exceptions_become_problems(client: httpx.AsyncClient) -> None:
    body = problem(await client.get("/items/418"), 418, "http-error")
    assert body["detail"] == "I'm a teapot"


async def test_unexpected_exception_is_500_without_leaking(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="onecluster.errors"):
        response = await client.get("/boom", headers={"X-Request-ID": "boom-1"})
    body = problem(response, 500, "internal")
    assert SECRET not in response.text
    assert "Traceback" not in response.text and "RuntimeError" not in response.text
    assert set(body) <= {"type", "title", "status", "detail", "instance"}
    # The operator gets the traceback in the log, and can find it by the request id.
    assert any(SECRET in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert response.headers["x-request-id"] == "boom-1"
    assert response.headers["traceparent"].startswith("00-")


async def test_problem_schema_is_in_openapi(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "ProblemDetails" in schema["components"]["schemas"]
