"""Concurrent annotators against a real ``onecluster serve`` process on PostgreSQL + Redis.

The in-process tests go through the ASGI app; here the requests cross real sockets
into uvicorn, the marketplace's read model is fed through Redis Streams, and the
claims race on PostgreSQL's row locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import requires_postgres
from tests.marketplace_support import build_market, task_body
from tests.oauth_flow import bearer
from tests.served import serve_platform

GOOD = {"label": "positive"}


@pytest.fixture
def server(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Iterator[str]:
    unlimited = {
        "ONECLUSTER_WEB_REDIRECT_URIS": '["http://testserver/cb"]',
        "ONECLUSTER_RATE_LIMIT_PER_MINUTE": "100000",
        "ONECLUSTER_FIRM_RATE_LIMIT_PER_MINUTE": "100000",
    }
    with serve_platform(tmp_path, database_url, redis_prefix, unlimited) as base:
        yield base


async def _until(call, ok: int, timeout: float = 20.0) -> httpx.Response:
    """Retry ``call`` while the read model has not caught up (404), up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        response = await call()
        if response.status_code == ok or time.monotonic() > deadline:
            return response
        assert response.status_code == 404, response.text
        await asyncio.sleep(0.1)


@requires_postgres
@pytest.mark.slow
async def test_concurrent_annotators_over_http_on_postgres(server: str, database_url: str) -> None:
    items, overlap = 150, 3
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
        market = await build_market(
            client,
            None,
            tag="srv",
            vendors={"sx": "CN-SX", "nm": "CN-NM", "he": "CN-HE"},
            annotators_per_vendor=6,
        )
        req = bearer(market.requester)
        body = task_body(market.cluster_id, overlap=overlap, lease_seconds=3)
        created = await _until(lambda: client.post("/v1/tasks", json=body, headers=req), 201)
        assert created.status_code == 201, created.text
        tid = created.json()["id"]
        lines = [{"input": {"text": f"review {i}"}} for i in range(items)]
        assert (await client.post(f"/v1/tasks/{tid}/items", json=lines, headers=req)).is_success
        assert (await client.post(f"/v1/tasks/{tid}:publish", headers=req)).is_success
        everyone = [t for tokens in market.annotators.values() for t in tokens]
        for tokens in everyone:  # every annotator's firm is known to the marketplace
            seen = await _until(
                lambda t=tokens: client.get(f"/v1/tasks/{tid}", headers=bearer(t)), 200
            )
            assert seen.status_code == 200, seen.text

        abandoned: Counter[str] = Counter()
        stop_at = time.monotonic() + 180

        async def finished() -> bool:
            return await asyncio.to_thread(_complete_items, database_url, tid) == items

        async def annotate(tokens: dict, index: int) -> None:
            batch = 0
            headers = bearer(tokens)
            while time.monotonic() < stop_at:
                response = await client.post(
                    f"/v1/tasks/{tid}/assignments:claim",
                    json={"count": 1 + index % 7},
                    headers=headers,
                )
                assert response.status_code == 200, response.text
                leases = response.json()["assignments"]
                if not leases:
                    if await finished():
                        return
                    await asyncio.sleep(0.3)
                    continue
                batch += 1
                ids = [a["assignment_id"] for a in leases]
                if index % 3 == 0 and batch <= 2:
                    if batch == 1:
                        abandoned["silent"] += len(ids)
                    else:
                        released = await client.post(
                            f"/v1/tasks/{tid}/assignments:release",
                            json={"assignment_ids": ids},
                            headers=headers,
                        )
                        assert released.status_code == 200, released.text
                        abandoned["released"] += len(ids)
                    continue
                done = await client.post(
                    f"/v1/tasks/{tid}/assignments:submit",
                    json={"answers": [{"assignment_id": a, "answer": GOOD} for a in ids]},
                    headers=headers,
                )
                assert done.status_code in (200, 409), done.text

        await asyncio.gather(*(annotate(t, i) for i, t in enumerate(everyone)))
        assert abandoned["silent"] and abandoned["released"]

    assert await asyncio.to_thread(_complete_items, database_url, tid) == items
    rows = await asyncio.to_thread(
        _query,
        database_url,
        "SELECT item_id, annotator_id, status FROM assignments WHERE task_id = :t",
        tid,
    )
    submitted = Counter(item for item, _, status in rows if status == "submitted")
    assert sum(submitted.values()) == items * overlap
    assert set(submitted.values()) == {overlap} and len(submitted) == items
    pairs = [(item, who) for item, who, _ in rows]
    assert len(pairs) == len(set(pairs)), "an annotator got an item twice"


def _query(url: str, sql: str, task_id: str) -> list[tuple]:
    engine = sa.create_engine(
        sa.engine.make_url(url).set(drivername="postgresql+psycopg"),
        connect_args={"options": "-csearch_path=marketplace"},
    )
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), {"t": task_id})]
    finally:
        engine.dispose()


def _complete_items(url: str, task_id: str) -> int:
    rows = _query(url, "SELECT count(*) FROM items WHERE task_id = :t AND complete", task_id)
    return int(rows[0][0])
