"""Presence per cluster and typing indicators over real sockets (served replicas).

On PostgreSQL + Redis the watcher and the typist sit on two replicas, so presence marks
(Redis sorted sets with expiry) and the ephemeral frames cross replicas; embedded, one
process keeps them in memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from services.messaging.client import MessagingClient
from tests.messaging_support import replica, served_world, token

pytestmark = pytest.mark.slow


async def test_presence_and_typing_reach_the_cluster_and_nobody_else(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    env = {"ONECLUSTER_MESSAGING_TYPING_INTERVAL": "600"}
    with contextlib.ExitStack() as stack:
        base, _ = stack.enter_context(replica(tmp_path, "a", database_url, redis_prefix, env))
        other = base
        if database_url and redis_prefix:  # a second replica sharing PostgreSQL and Redis
            other, _ = stack.enter_context(replica(tmp_path, "b", database_url, redis_prefix, env))
        http, w, general = await served_world(base, "pres")
        async with contextlib.aclosing(http):
            path = f"/v1/clusters/{w.cluster_id}/presence"
            empty = await http.get(path, headers=w.h("nm"))
            assert empty.status_code == 200 and empty.json()["users"] == []
            assert (await http.get(path, headers=w.h("out"))).status_code == 404

            async with MessagingClient(base, token(w, "op")) as op:
                assert (await op.subscribe(general))["type"] == "subscribed"
                online = await op.recv_until("presence")  # op itself
                assert (online["user_id"], online["status"]) == (w.ids["op"], "online")

                sx = MessagingClient(other, token(w, "sx"))
                await sx.open()
                assert (await sx.subscribe(general))["type"] == "subscribed"
                seen = await op.recv_until("presence", wait=30)
                assert (seen["user_id"], seen["firm_id"], seen["status"]) == (
                    w.ids["sx"],
                    w.firms["sx"],
                    "online",
                )
                listed = (await http.get(path, headers=w.h("nm"))).json()
                assert {u["user_id"] for u in listed["users"]} == {w.ids["op"], w.ids["sx"]}
                assert set(listed["firm_ids"]) == {w.firms["op"], w.firms["sx"]}

                # typing: the others see it, the typist does not; a repeat within the
                # interval is dropped; nothing is stored
                await sx.send_frame({"type": "typing", "channel_id": general})
                typing = await op.recv_until("typing", wait=30)
                assert (typing["channel_id"], typing["user_id"]) == (general, w.ids["sx"])
                await sx.send_frame({"type": "typing", "channel_id": general})
                await sx.send(general, "done typing")
                assert (await sx.recv_until_reply())["type"] == "ack"
                await sx.send_frame({"type": "ping", "id": "p"})
                while (frame := await sx.recv())["type"] != "pong":
                    assert frame["type"] != "typing", frame
                while (frame := await op.recv(wait=30))["type"] != "event":
                    assert frame["type"] != "typing", "a second typing frame went through"
                assert frame["message"]["text"] == "done typing"
                history = await http.get(f"/v1/channels/{general}/messages", headers=w.h("op"))
                assert [m["text"] for m in history.json()["items"]] == ["done typing"]
                # typing in a channel one may not read: not_found, nothing sent
                private = await http.post(
                    "/v1/channels",
                    json={"cluster_id": w.cluster_id, "kind": "private", "name": "p"},
                    headers=w.h("op"),
                )
                await sx.send_frame(
                    {"type": "typing", "channel_id": private.json()["id"], "id": "t"}
                )
                refused = await sx.recv_until("error")
                assert (refused["code"], refused["ref"]) == ("not_found", "t")

                # sx closes its socket: offline for the others, gone from the list
                await sx.close()
                gone = await op.recv_until("presence", wait=30)
                assert (gone["user_id"], gone["status"]) == (w.ids["sx"], "offline")
                listed = (await http.get(path, headers=w.h("nm"))).json()
                assert [u["user_id"] for u in listed["users"]] == [w.ids["op"]]
