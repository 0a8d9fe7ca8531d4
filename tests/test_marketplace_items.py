"""Bulk item import: JSON array or JSONL, all-or-nothing or partial, gold items, retries."""

from __future__ import annotations

import json

import httpx
import sqlalchemy as sa

from tests.marketplace_support import build_market, task_body
from tests.oauth_flow import bearer


async def _draft(client: httpx.AsyncClient, market, **overrides) -> str:
    created = await client.post(
        "/v1/tasks",
        json=task_body(market.cluster_id, **overrides),
        headers=bearer(market.requester),
    )
    assert created.status_code == 201, created.text
    return created.json()["id"]


async def _count_items(gateway, task_id: str) -> int:
    async with gateway.apps["marketplace"].state.db.sessionmaker() as session:
        return (
            await session.execute(
                sa.text("SELECT count(*) FROM items WHERE task_id = :t"), {"t": task_id}
            )
        ).scalar_one()


async def test_all_or_nothing_by_default_partial_on_request(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="imp", vendors={})
    req = bearer(market.requester)
    tid = await _draft(client, market)
    lines = [
        {"input": {"text": "fine"}},
        {"input": {}},  # neither text nor image
        {"input": {"text": "ok"}, "answer": {"label": "positive"}},  # answer without gold
        {"input": {"text": "gold"}, "gold": True},  # gold without answer
        {"input": {"text": "fine too"}, "external_id": "x-2"},
        "not an object",
        {"input": {"text": "gold"}, "gold": True, "answer": {"label": "positive"}},
    ]
    refused = await client.post(f"/v1/tasks/{tid}/items", json=lines, headers=req)
    assert refused.status_code == 422
    assert [r["index"] for r in refused.json()["rejected"]] == [1, 2, 3, 5]
    assert refused.json()["rejected_count"] == 4
    assert await _count_items(gateway, tid) == 0

    partial = await client.post(f"/v1/tasks/{tid}/items?mode=partial", json=lines, headers=req)
    assert partial.status_code == 200, partial.text
    result = partial.json()
    assert (result["imported"], result["gold"], result["item_count"]) == (3, 1, 2)
    assert [r["index"] for r in result["rejected"]] == [1, 2, 3, 5]
    assert all(r["reason"] for r in result["rejected"])
    assert await _count_items(gateway, tid) == 3

    listed = (await client.get(f"/v1/tasks/{tid}/items", headers=req)).json()["items"]
    gold = [i for i in listed if i["gold"]]
    assert len(gold) == 1 and gold[0]["answer"] == {"label": "positive"}
    assert {i["external_id"] for i in listed} == {None, "x-2"}


async def test_jsonl_body_and_malformed_bodies(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="jsonl", vendors={})
    req = bearer(market.requester)
    tid = await _draft(client, market)
    body = "\n".join(json.dumps({"input": {"text": f"line {i}"}}) for i in range(50)) + "\n\n"
    imported = await client.post(
        f"/v1/tasks/{tid}/items",
        content=body,
        headers={**req, "content-type": "application/x-ndjson"},
    )
    assert imported.status_code == 200, imported.text
    assert imported.json()["imported"] == 50
    bad_line = '{"input": {"text": "a"}}\n{nope\n'
    response = await client.post(
        f"/v1/tasks/{tid}/items",
        content=bad_line,
        headers={**req, "content-type": "application/x-ndjson"},
    )
    assert response.status_code == 400
    for content, ctype in (
        (b"{nope", "application/json"),
        (b'{"input": {"text": "a"}}', "application/json"),
        (b"input=a", "application/x-www-form-urlencoded"),
    ):
        response = await client.post(
            f"/v1/tasks/{tid}/items", content=content, headers={**req, "content-type": ctype}
        )
        assert response.status_code in (400, 422), (content, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    assert await _count_items(gateway, tid) == 50


async def test_ten_thousand_items_in_one_request_and_no_more(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="bulk", vendors={})
    req = bearer(market.requester)
    tid = await _draft(client, market)
    lines = [{"input": {"text": f"item {i}"}} for i in range(10_000)]
    response = await client.post(f"/v1/tasks/{tid}/items", json=lines, headers=req)
    assert response.status_code == 200, response.text
    assert response.json()["item_count"] == 10_000
    too_many = await client.post(f"/v1/tasks/{tid}/items", json=[*lines, lines[0]], headers=req)
    assert too_many.status_code == 422
    assert await _count_items(gateway, tid) == 10_000


async def test_retried_import_with_idempotency_key_imports_once(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="idem", vendors={})
    req = bearer(market.requester)
    tid = await _draft(client, market)
    lines = [{"input": {"text": f"item {i}"}} for i in range(20)]
    headers = {**req, "Idempotency-Key": "import-1"}
    first = await client.post(f"/v1/tasks/{tid}/items", json=lines, headers=headers)
    again = await client.post(f"/v1/tasks/{tid}/items", json=lines, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    assert await _count_items(gateway, tid) == 20
    other = await client.post(f"/v1/tasks/{tid}/items", json=lines[:3], headers=headers)
    assert other.status_code == 422
    assert await _count_items(gateway, tid) == 20
