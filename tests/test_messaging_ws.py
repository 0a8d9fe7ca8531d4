"""The WebSocket protocol against a served uvicorn: auth, replay then live, errors, backpressure.

Each test starts ``onecluster serve`` on a free 127.0.0.1 port (``replica``) and talks
to it with the in-repo client (``services.messaging.client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from services.messaging.client import MessagingClient
from tests.messaging_support import (
    cut_off_and_check,
    public_channel,
    replica,
    scrape,
    served_world,
    token,
    value,
)

pytestmark = pytest.mark.slow


async def test_auth_first_frame_and_typed_errors(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    env = {
        "ONECLUSTER_MESSAGING_AUTH_TIMEOUT": "1",
        "ONECLUSTER_MESSAGING_SEND_RATE_PER_MINUTE": "5",
        "ONECLUSTER_MESSAGING_MAX_FRAME_BYTES": "4096",
        "ONECLUSTER_MESSAGING_MAX_MESSAGE_BYTES": "1024",
    }
    with replica(tmp_path, "a", database_url, redis_prefix, env) as (base, _):
        http, w, general = await served_world(base, "auth")
        async with contextlib.aclosing(http):
            silent = MessagingClient(base, "")
            await silent.open(authenticate=False)
            with pytest.raises(ConnectionClosed):
                await silent.recv(wait=10)
            assert silent.close_code == 4401
            early = MessagingClient(base, "")
            await early.open(authenticate=False)
            await early.send_frame({"type": "subscribe", "channel_id": general})
            with pytest.raises(ConnectionClosed):
                await early.recv()
            assert early.close_code == 4401
            forged = MessagingClient(base, "garbage.token.here")
            with pytest.raises(ConnectionClosed):
                await forged.open()
                await forged.recv()
            assert forged.close_code == 4401

            async with MessagingClient(base, token(w, "sx")) as sx:
                assert sx.ws is not None
                await sx.ws.send("{nope")
                assert (await sx.recv())["code"] == "malformed_frame"
                await sx.send_frame({"type": "shout", "id": 7})
                err = await sx.recv()
                assert (err["code"], err["ref"]) == ("unknown_type", 7)
                await sx.send_frame({"type": "ping", "pad": "x" * 5000})
                assert (await sx.recv())["code"] == "frame_too_large"
                for channel in ("chan_00000000000000000000000000", general):
                    outsider = MessagingClient(base, token(w, "out"))
                    await outsider.open()
                    answer = await outsider.subscribe(channel)
                    assert (answer["type"], answer["code"]) == ("error", "not_found")
                    await outsider.close()
                await sx.send(await public_channel(http, w, "p"), "hi")
                assert (await sx.recv())["code"] == "not_a_member"
                await sx.send(general, "x" * 2000)
                assert (await sx.recv())["code"] == "message_too_large"
                mine = await http.post(
                    f"/v1/channels/{general}/messages", json={"text": "op's"}, headers=w.h("op")
                )
                await sx.send_frame(
                    {
                        "type": "edit",
                        "channel_id": general,
                        "message_id": mine.json()["id"],
                        "text": "mine now",
                    }
                )
                assert (await sx.recv())["code"] == "forbidden"
                # re-authentication: a fresh token of the same user, never another user's
                await sx.send_frame({"type": "auth", "token": token(w, "sx")})
                assert (await sx.recv())["type"] == "authenticated"
                await sx.send_frame({"type": "auth", "token": token(w, "nm")})
                assert (await sx.recv())["code"] == "auth_mismatch"
                # the per-user send rate: error frames, the socket stays open
                codes = []
                for i in range(7):
                    await sx.send(general, f"m{i}")
                    codes.append((await sx.recv_until_reply()).get("code", "ack"))
                assert codes.count("rate_limited") >= 2 and codes[0] == "ack"
                await sx.send_frame({"type": "ping", "id": "still-open"})
                assert (await sx.recv_until("pong"))["ref"] == "still-open"


async def test_replay_then_live_without_gaps_and_resync_beyond_the_bound(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    # no sweep: only the live notifications of posts, edits and deletes deliver them
    env = {
        "ONECLUSTER_MESSAGING_REPLAY_LIMIT": "30",
        "ONECLUSTER_MESSAGING_SWEEP_INTERVAL": "3600",
    }
    with replica(tmp_path, "a", database_url, redis_prefix, env) as (base, _):
        http, w, general = await served_world(base, "live")
        async with contextlib.aclosing(http):
            for i in range(5):
                r = await http.post(
                    f"/v1/channels/{general}/messages",
                    json={"text": f"old {i}"},
                    headers=w.h("op"),
                )
                assert r.status_code == 201
            async with (
                MessagingClient(base, token(w, "nm")) as reader,
                MessagingClient(base, token(w, "sx2")) as writer,
            ):
                subscribed = await reader.subscribe(general, since_seq=0)
                assert subscribed["type"] == "subscribed" and subscribed["last_seq"] == 5

                async def rest_sender() -> None:
                    for i in range(20):
                        r = await http.post(
                            f"/v1/channels/{general}/messages",
                            json={"text": f"rest {i}"},
                            headers=w.h("sx"),
                        )
                        assert r.status_code == 201, r.text

                async def ws_sender() -> None:
                    for i in range(20):
                        await writer.send(general, f"ws {i}", client_message_id=f"w{i}")
                        await writer.recv_until("ack")

                seen: list[int] = []

                async def read() -> None:
                    while len(seen) < 45:
                        data = await reader.recv(wait=20)
                        if data["type"] == "event":
                            seen.append(data["seq"])

                await asyncio.gather(rest_sender(), ws_sender(), read())
                assert seen == list(range(1, 46))
                # an edit is an event too, delivered in order
                first = (
                    await http.get(
                        f"/v1/channels/{general}/messages",
                        params={"after_seq": 0, "limit": 1},
                        headers=w.h("op"),
                    )
                ).json()["items"][0]
                await http.patch(
                    f"/v1/channels/{general}/messages/{first['id']}",
                    json={"text": "new"},
                    headers=w.h("op"),
                )
                edited = await reader.recv_until("event")
                assert (edited["seq"], edited["event"]) == (46, "edited")
                assert edited["message"]["text"] == "new"
                # and so is a delete: the next seq, the message as a tombstone, no text
                gone = await http.delete(
                    f"/v1/channels/{general}/messages/{first['id']}", headers=w.h("op")
                )
                assert gone.status_code == 200, gone.text
                deleted = await reader.recv_until("event")
                assert (deleted["type"], deleted["channel_id"]) == ("event", general)
                assert (deleted["seq"], deleted["event"]) == (47, "deleted")
                tombstone = deleted["message"]
                assert (tombstone["id"], tombstone["seq"]) == (first["id"], first["seq"])
                assert tombstone["deleted"] is True and tombstone["deleted_at"]
                assert tombstone["text"] == "" and tombstone["attachments"] == []
                assert '"new"' not in json.dumps(deleted) and "old 0" not in json.dumps(deleted)
            async with MessagingClient(base, token(w, "nm")) as late:
                answer = await late.subscribe(general, since_seq=10)
                assert answer["type"] == "resync_required" and answer["last_seq"] == 47
                answer = await late.subscribe(general, since_seq=40)
                assert answer["type"] == "subscribed"
                replayed = [await late.recv_until("event") for _ in range(7)]
                assert [e["seq"] for e in replayed] == [41, 42, 43, 44, 45, 46, 47]
                assert (replayed[-1]["event"], replayed[-1]["message"]) == ("deleted", tombstone)


async def test_a_client_that_stops_reading_is_closed_with_4008_and_slows_nobody(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    """A subscriber that never reads: its socket closes with 4008, a healthy one gets all.

    Small queue, large incompressible messages (frames are deflated): the stuck client's
    TCP window fills, then its frames wait past the send timeout or overflow its queue.
    Messages go out until the server has closed it; the healthy subscriber on the same
    channel must have every one of them, in order, meanwhile.
    """
    env = {
        "ONECLUSTER_MESSAGING_SEND_QUEUE": "4",
        "ONECLUSTER_MESSAGING_SEND_TIMEOUT": "2",
        "ONECLUSTER_MESSAGING_MAX_MESSAGE_BYTES": "65536",
    }
    with replica(tmp_path, "a", database_url, redis_prefix, env) as (base, _):
        log = tmp_path / "a.log"
        http, w, general = await served_world(base, "slow")
        async with (
            contextlib.aclosing(http),
            MessagingClient(base, token(w, "sx2")) as healthy,
        ):
            stuck = MessagingClient(
                base, token(w, "nm"), max_queue=1, receive_buffer=4096, keepalive=False
            )
            await stuck.open()
            assert (await stuck.subscribe(general))["type"] == "subscribed"
            assert (await healthy.subscribe(general))["type"] == "subscribed"
            seen: list[int] = []

            async def read_healthy(upto: int) -> None:
                while len(seen) < upto:
                    data = await healthy.recv(wait=60)
                    if data["type"] == "event":
                        seen.append(data["seq"])

            sent = 0
            closed = False
            while not closed and sent < 600:
                for _ in range(10):
                    r = await http.post(
                        f"/v1/channels/{general}/messages",
                        json={"text": f"{sent} {secrets.token_urlsafe(45_000)}"},
                        headers=w.h("op"),
                    )
                    assert r.status_code == 201, r.text
                    sent += 1
                await read_healthy(sent)  # the healthy one keeps up all along
                closed = "with 4008 (slow consumer)" in log.read_text(errors="replace")
            assert closed, "the stuck subscriber was never closed"
            assert seen == list(range(1, sent + 1))
            # the stuck client finally reads: a prefix of the stream, then 4008
            got: list[int] = []
            with pytest.raises(ConnectionClosed):
                while True:
                    data = await stuck.recv(wait=60)
                    if data["type"] == "event":
                        got.append(data["seq"])
            assert got == list(range(1, len(got) + 1)) and len(got) < sent
            assert stuck.ws is not None
            assert (stuck.ws.close_code, stuck.ws.close_reason) == (4008, "slow consumer")
            # the healthy one is still served
            await healthy.send_frame({"type": "ping", "id": "after"})
            assert (await healthy.recv_until("pong"))["ref"] == "after"
            metrics = await scrape(base)
            assert value(metrics, "messaging_slow_consumer_disconnects_total") == 1


async def test_access_loss_ends_subscriptions_at_once_and_revoked_tokens_close_the_socket(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    with replica(tmp_path, "a", database_url, redis_prefix) as (base, _):
        http, w, general = await served_world(base, "loss")
        async with (
            contextlib.aclosing(http),
            MessagingClient(base, token(w, "nm")) as nm,
            MessagingClient(base, token(w, "sx2")) as sx2,
            MessagingClient(base, token(w, "op")) as op,
        ):
            topic_id = await public_channel(http, w, "topic")
            for client in (nm, sx2, op):
                for channel in (general, topic_id):
                    assert (await client.subscribe(channel))["type"] == "subscribed"

            await cut_off_and_check(http, w, (general, topic_id), [nm], [sx2], op)
