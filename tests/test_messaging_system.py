"""System messages from marketplace events, and the task threads contracts open."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import sqlalchemy as sa

from tests.marketplace_support import Market, build_market, open_task
from tests.messaging_support import settle
from tests.oauth_flow import bearer
from tests.test_marketplace_contracts import bid, contracted_vendor


async def _channels(client: httpx.AsyncClient, market: Market, tokens: dict, kind: str) -> list:
    r = await client.get(
        "/v1/channels",
        params={"cluster_id": market.cluster_id, "kind": kind},
        headers=bearer(tokens),
    )
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def _messages_until(
    client: httpx.AsyncClient, tokens: dict, channel_id: str, count: int
) -> list[dict[str, Any]]:
    """The channel's messages once there are ``count`` (the consumer runs after commit)."""
    deadline = time.monotonic() + 20
    while True:
        r = await client.get(
            f"/v1/channels/{channel_id}/messages",
            params={"after_seq": 0},
            headers=bearer(tokens),
        )
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        if len(items) >= count:
            return items
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.05)


async def _threads_when_visible(
    client: httpx.AsyncClient, market: Market, tokens: dict, count: int
) -> dict[str, dict[str, Any]]:
    """The threads the caller sees, by name, once there are ``count`` of them."""
    deadline = time.monotonic() + 20
    while len(threads := await _channels(client, market, tokens, "thread")) < count:
        assert time.monotonic() < deadline, threads
        await asyncio.sleep(0.05)
    return {t["name"]: dict(t) for t in threads}


async def test_task_published_and_contract_awarded_post_system_messages(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    market = await build_market(client, gateway, tag="sysm")
    await settle(gateway)
    task = await open_task(client, market, allocation="contracted", items=10)
    (general,) = await _channels(client, market, market.owners["nm"], "general")
    (note,) = await _messages_until(client, market.owners["nm"], general["id"], 1)
    assert note["system"] is True and note["sender_id"] == "system"
    assert task["id"] in note["text"] and market.requester_id in note["text"]

    # publishing opens the task's thread, the requester alone in it so far
    threads = await _threads_when_visible(client, market, market.requester, 1)
    thread = threads[f"task {task['id']}"]
    assert thread["kind"] == "thread" and thread["role"] == "admin" and thread["joined"]
    assert await _channels(client, market, market.owners["sx"], "thread") == []

    # an award adds the vendor to the task's thread and opens the contract's own thread
    first = await contracted_vendor(client, market, task["id"], "sx", price=3, quota=5)
    threads = await _threads_when_visible(client, market, market.requester, 2)
    contract_sx = threads[f"contract {first['id']}"]
    published, awarded = await _messages_until(client, market.requester, thread["id"], 2)
    assert published["system"] and task["id"] in published["text"]
    assert awarded["system"] and market.vendors["sx"] in awarded["text"]
    (own,) = await _messages_until(client, market.requester, contract_sx["id"], 1)
    assert own["system"] and first["id"] in own["text"]

    # the vendor's users are in both (firm-level membership) and post; nm is in neither
    annotator = market.annotators["sx"][0]
    seen = await _threads_when_visible(client, market, annotator, 2)
    assert {t["id"] for t in seen.values()} == {thread["id"], contract_sx["id"]}
    assert seen[f"task {task['id']}"]["role"] == "member"
    posted = await client.post(
        f"/v1/channels/{thread['id']}/messages",
        json={"text": "starting today"},
        headers=bearer(annotator),
    )
    assert posted.status_code == 201, posted.text
    for channel in (thread, contract_sx):
        outsider = await client.get(
            f"/v1/channels/{channel['id']}", headers=bearer(market.owners["nm"])
        )
        assert outsider.status_code == 404
    joined = await client.post(
        f"/v1/channels/{thread['id']}:join", headers=bearer(market.owners["nm"])
    )
    assert joined.status_code == 404

    # a second award: nm joins the task's thread and gets a contract thread of its own,
    # never sx's
    placed = await bid(client, market.owners["nm"], task["id"], 4)
    assert placed.status_code == 201, placed.text
    second = await client.post(
        f"/v1/tasks/{task['id']}/bids/{placed.json()['id']}:award",
        json={"quota": 5},
        headers=bearer(market.requester),
    )
    assert second.status_code == 201, second.text
    items = await _messages_until(client, market.requester, thread["id"], 4)
    assert [(m["seq"], m["system"]) for m in items] == [
        (1, True),
        (2, True),
        (3, False),
        (4, True),
    ]
    assert market.vendors["nm"] in items[3]["text"]
    nm_sees = await _threads_when_visible(client, market, market.owners["nm"], 2)
    assert set(nm_sees) == {f"task {task['id']}", f"contract {second.json()['id']}"}
    members = await client.get(
        f"/v1/channels/{thread['id']}/members", headers=bearer(market.requester)
    )
    firms = {m["firm_id"] for m in members.json()["items"]}
    assert firms == {market.requester_id, market.vendors["sx"], market.vendors["nm"]}
    members = await client.get(
        f"/v1/channels/{contract_sx['id']}/members", headers=bearer(market.requester)
    )
    assert {m["firm_id"] for m in members.json()["items"]} == {
        market.requester_id,
        market.vendors["sx"],
    }

    # system messages are nobody's conversation: only the annotator's post is an event
    async with gateway.apps["messaging"].state.db.sessionmaker() as session:
        kinds = (
            await session.execute(sa.text("SELECT type FROM outbox WHERE type = 'message.posted'"))
        ).all()
    assert len(kinds) == 1
