"""Search over the channels the caller can read (PostgreSQL full-text / SQLite FTS5)."""

from __future__ import annotations

import httpx

from services.messaging.search import fts5_query
from tests.messaging_support import World, build_world, general_of, post


async def search(
    client: httpx.AsyncClient, w: World, person: str, q: str, **params: str | int
) -> httpx.Response:
    return await client.get("/v1/messages/search", params={"q": q, **params}, headers=w.h(person))


async def texts(client: httpx.AsyncClient, w: World, person: str, q: str, **params) -> list[str]:
    r = await search(client, w, person, q, **params)
    assert r.status_code == 200, r.text
    return [m["text"] for m in r.json()["items"]]


async def test_search_finds_readable_messages_literally_newest_first(
    client: httpx.AsyncClient, gateway
) -> None:
    w = await build_world(client, gateway, "sa")
    other = await build_world(client, gateway, "sb")  # another tenant's cluster
    general = (await general_of(client, w))["id"]
    foreign = (await general_of(client, other))["id"]
    assert (await post(client, other, "sx", foreign, "rare earth 包头 xitu")).status_code == 201

    for person, text in (
        ("sx", "Rare earth magnets from 包头 baotou"),
        ("nm", "稀土 xitu pricing this week"),
        ("nm", "nothing here"),
        ("op", "gone rare earth soon"),
    ):
        assert (await post(client, w, person, general, text)).status_code == 201
    private = await client.post(
        "/v1/channels",
        json={"cluster_id": w.cluster_id, "kind": "private", "name": "deal"},
        headers=w.h("op"),
    )
    assert private.status_code == 201
    secret = private.json()["id"]
    assert (await post(client, w, "op", secret, "rare earth secret terms")).status_code == 201

    # literal tokens: English (case-folded), pinyin and Chinese alike; never another tenant
    assert await texts(client, w, "sx", "rare earth") == [
        "gone rare earth soon",
        "Rare earth magnets from 包头 baotou",
    ]
    assert await texts(client, w, "sx", "包头") == ["Rare earth magnets from 包头 baotou"]
    assert await texts(client, w, "sx", "稀土") == ["稀土 xitu pricing this week"]
    assert await texts(client, w, "sx", "baotou or xitu") == [
        "稀土 xitu pricing this week",
        "Rare earth magnets from 包头 baotou",
    ]
    assert await texts(client, w, "sx", '"earth magnets"') == [
        "Rare earth magnets from 包头 baotou"
    ]
    assert await texts(client, w, "sx", "rare -magnets") == ["gone rare earth soon"]
    # the private channel: its member finds it, nobody else does
    assert await texts(client, w, "op", "rare earth") == [
        "rare earth secret terms",
        "gone rare earth soon",
        "Rare earth magnets from 包头 baotou",
    ]
    assert await texts(client, w, "op", "secret", channel_id=secret) == ["rare earth secret terms"]
    assert (await search(client, w, "sx", "secret", channel_id=secret)).status_code == 404
    assert (await search(client, w, "sx", "rare", channel_id=foreign)).status_code == 404
    assert await texts(client, w, "out", "rare") == []
    assert await texts(client, other, "sx", "rare") == ["rare earth 包头 xitu"]

    # tombstones are never found; edits are found by their new text only
    listed = await client.get(f"/v1/channels/{general}/messages", headers=w.h("op"))
    by_text = {m["text"]: m["id"] for m in listed.json()["items"]}
    gone = await client.delete(
        f"/v1/channels/{general}/messages/{by_text['gone rare earth soon']}", headers=w.h("op")
    )
    assert gone.status_code == 200
    edited = await client.patch(
        f"/v1/channels/{general}/messages/{by_text['nothing here']}",
        json={"text": "now about magnets"},
        headers=w.h("nm"),
    )
    assert edited.status_code == 200
    assert await texts(client, w, "sx", "gone") == []
    assert await texts(client, w, "sx", "nothing") == []
    assert await texts(client, w, "sx", "magnets") == [
        "now about magnets",
        "Rare earth magnets from 包头 baotou",
    ]

    # cursor pages, newest first, each message once
    for i in range(5):
        assert (await post(client, w, "sx", general, f"batch item {i}")).status_code == 201
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params: dict = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await search(client, w, "nm", "batch", **params)
        assert r.status_code == 200, r.text
        seen += [m["text"] for m in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"batch item {i}" for i in (4, 3, 2, 1, 0)]
    # bad input: no query, a garbage cursor
    assert (await search(client, w, "sx", "")).status_code == 422
    assert (await search(client, w, "sx", "x", cursor="%%%")).status_code == 400


def test_fts5_query_quotes_every_term() -> None:
    assert fts5_query('rare "earth magnets" or -x 包头 -"y z"') == (
        '("rare" AND "earth magnets") OR ("包头" NOT "x" NOT "y z")'
    )
    assert fts5_query("AND NOT ( NEAR") == '("AND" AND "NOT" AND "NEAR")'
    assert fts5_query("-only") is None
    assert fts5_query('say "hi') == '("say" AND "hi")'
