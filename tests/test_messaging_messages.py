"""Messages over REST: seq, idempotent sends, edits, tombstones, history, read markers."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import requires_postgres
from tests.messaging_support import build_world, general_of, post


async def test_seq_idempotency_edits_tombstones_and_history(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    cid = (await general_of(client, w))["id"]
    first = await post(client, w, "sx", cid, "**hello**", client_message_id="c-1")
    assert first.status_code == 201, first.text
    again = await post(client, w, "sx", cid, "**hello**", client_message_id="c-1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    for i in range(2, 6):
        assert (await post(client, w, "nm", cid, f"m{i}")).status_code == 201
    page = await client.get(f"/v1/channels/{cid}/messages", headers=w.h("op"))
    assert [m["seq"] for m in page.json()["items"]] == [1, 2, 3, 4, 5]
    assert page.json()["last_seq"] == 5

    # edits: author only, history kept; each edit takes the channel's next seq
    mid = first.json()["id"]
    other = await client.patch(
        f"/v1/channels/{cid}/messages/{mid}", json={"text": "x"}, headers=w.h("nm")
    )
    assert other.status_code == 403
    edited = await client.patch(
        f"/v1/channels/{cid}/messages/{mid}", json={"text": "hello, edited"}, headers=w.h("sx")
    )
    assert edited.status_code == 200 and edited.json()["edited_at"]
    history = await client.get(f"/v1/channels/{cid}/messages/{mid}/edits", headers=w.h("nm"))
    assert [(e["seq"], e["previous_text"]) for e in history.json()] == [(6, "**hello**")]
    # delete: a tombstone, by the author or a channel admin (op runs the general channel)
    victim = page.json()["items"][1]["id"]
    refused = await client.delete(f"/v1/channels/{cid}/messages/{victim}", headers=w.h("sx"))
    assert refused.status_code == 403
    deleted = await client.delete(f"/v1/channels/{cid}/messages/{victim}", headers=w.h("op"))
    assert deleted.status_code == 200
    assert deleted.json()["deleted"] and deleted.json()["text"] == ""
    gone = await client.patch(
        f"/v1/channels/{cid}/messages/{victim}", json={"text": "back"}, headers=w.h("nm")
    )
    assert gone.status_code == 409
    events = await _events(gateway, cid)
    assert events == [
        (1, "posted"),
        (2, "posted"),
        (3, "posted"),
        (4, "posted"),
        (5, "posted"),
        (6, "edited"),
        (7, "deleted"),
    ]
    # history in both directions
    newest = await client.get(
        f"/v1/channels/{cid}/messages", params={"limit": 2}, headers=w.h("op")
    )
    assert [m["seq"] for m in newest.json()["items"]] == [4, 5] and newest.json()["has_more"]
    older = await client.get(
        f"/v1/channels/{cid}/messages", params={"before_seq": 4, "limit": 2}, headers=w.h("op")
    )
    assert [m["seq"] for m in older.json()["items"]] == [2, 3] and older.json()["has_more"]
    assert older.json()["items"][0]["deleted"] is True
    forward = await client.get(
        f"/v1/channels/{cid}/messages", params={"after_seq": 3, "limit": 5}, headers=w.h("op")
    )
    assert [m["seq"] for m in forward.json()["items"]] == [4, 5]
    assert not forward.json()["has_more"]


async def test_validation_of_mentions_attachments_and_size(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    cid = (await general_of(client, w))["id"]
    ok = await post(
        client,
        w,
        "op",
        cid,
        "see spec @nm",
        mentions={"user_ids": [w.ids["nm"]], "firm_ids": [w.firms["sx"]]},
        attachments=[
            {
                "url": "https://files.example.com/a.pdf",
                "name": "a.pdf",
                "size": 10,
                "media_type": "application/pdf",
            }
        ],
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["mentions"] == {"user_ids": [w.ids["nm"]], "firm_ids": [w.firms["sx"]]}
    outsider = await post(client, w, "op", cid, "x", mentions={"user_ids": [w.ids["out"]]})
    assert outsider.status_code == 422 and outsider.json()["unknown"] == [w.ids["out"]]
    plain = await post(
        client,
        w,
        "op",
        cid,
        "x",
        attachments=[{"url": "http://a.example/x", "name": "x", "size": 1, "media_type": "a/b"}],
    )
    assert plain.status_code == 422
    huge = await post(client, w, "op", cid, "é" * 9000)  # 18,000 bytes > 16 KiB
    assert huge.status_code == 413
    empty = await post(client, w, "op", cid, "   ")
    assert empty.status_code == 422
    page = await client.get(f"/v1/channels/{cid}/messages", headers=w.h("op"))
    assert len(page.json()["items"]) == 1


async def test_read_markers_and_unread_counts(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    cid = (await general_of(client, w))["id"]
    await post(client, w, "op", cid, "one")
    await post(client, w, "op", cid, "two @sx", mentions={"firm_ids": [w.firms["sx"]]})
    await post(client, w, "sx", cid, "mine")
    await post(client, w, "op", cid, "three", mentions={"user_ids": [w.ids["sx2"]]})
    sx = await general_of(client, w, "sx")
    assert (sx["unread_count"], sx["mention_count"], sx["read_seq"]) == (3, 1, 0)
    sx2 = await general_of(client, w, "sx2")
    assert (sx2["unread_count"], sx2["mention_count"]) == (4, 2)
    marked = await client.post(
        f"/v1/channels/{cid}/read-marker", json={"seq": 2}, headers=w.h("sx")
    )
    assert marked.status_code == 200 and marked.json()["seq"] == 2
    back = await client.post(f"/v1/channels/{cid}/read-marker", json={"seq": 1}, headers=w.h("sx"))
    assert back.json()["seq"] == 2  # never moves back
    beyond = await client.post(
        f"/v1/channels/{cid}/read-marker", json={"seq": 99}, headers=w.h("sx")
    )
    assert beyond.status_code == 422
    sx = await general_of(client, w, "sx")
    assert (sx["unread_count"], sx["mention_count"], sx["read_seq"]) == (1, 0, 2)


@requires_postgres
@pytest.mark.slow
async def test_concurrent_senders_get_gap_free_seqs(client: httpx.AsyncClient, gateway):
    w = await build_world(client, gateway)
    cid = (await general_of(client, w))["id"]
    people = ["op", "op2", "sx", "sx2", "nm"]

    async def sender(person: str) -> list[int]:
        seqs = []
        for i in range(20):
            r = await post(client, w, person, cid, f"{person} {i}", client_message_id=f"k{i}")
            assert r.status_code == 201, r.text
            seqs.append(r.json()["seq"])
        return seqs

    results = await asyncio.gather(*(sender(p) for p in people))
    every = sorted(s for seqs in results for s in seqs)
    assert every == list(range(1, 101))
    for seqs in results:
        assert seqs == sorted(seqs)
    assert await _events(gateway, cid) == [(s, "posted") for s in range(1, 101)]


async def _events(gateway, channel_id: str) -> list[tuple[int, str]]:
    async with gateway.apps["messaging"].state.db.sessionmaker() as session:
        rows = await session.execute(
            sa.text("SELECT seq, kind FROM channel_events WHERE channel_id = :c ORDER BY seq"),
            {"c": channel_id},
        )
        return [(int(s), k) for s, k in rows.all()]
