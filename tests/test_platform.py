"""The platform starts, migrates, and answers its operational endpoints."""

from __future__ import annotations

import httpx


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["membership"] == "ok"


async def test_unknown_path_is_problem_json(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/not-found")
    assert response.headers["x-request-id"]


async def test_metrics_exposes_request_histogram(client: httpx.AsyncClient) -> None:
    await client.get("/healthz")
    await client.get("/v1/nothing-here")
    body = (await client.get("/metrics")).text
    assert "http_request_duration_seconds_bucket" in body
