"""Two real uvicorn replicas on PostgreSQL + Redis: exactly once, in order, through a kill.

Each replica is ``onecluster serve`` on a free 127.0.0.1 port (``replica``); both share
the test's database, Redis prefix and token issuer. Clients are the in-repo client
(``services.messaging.client``); ``follow`` resubscribes with the last seq it saw after a
dropped socket, on the next replica.

The scale defaults to 50 clients and 2,000 messages (about a minute here);
``MESSAGING_TEST_CLIENTS`` / ``MESSAGING_TEST_MESSAGES`` change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from services.kit.db import Database
from services.messaging import service
from services.messaging.client import MessagingClient, follow
from services.messaging.schemas import Attachment
from tests.conftest import REDIS_URL, requires_postgres, requires_redis
from tests.messaging_support import (
    World,
    cut_off_and_check,
    public_channel,
    replica,
    served_world,
    token,
)

pytestmark = [pytest.mark.slow, requires_postgres, requires_redis]

CLIENTS = int(os.environ.get("MESSAGING_TEST_CLIENTS", "50"))
MESSAGES = int(os.environ.get("MESSAGING_TEST_MESSAGES", "2000"))
PEOPLE = ("op", "op2", "sx", "sx2", "nm")


class Follower:
    """One client following a channel across replicas, recording what it got."""

    def __init__(self, urls: list[str], w: World, person: str, channel_id: str) -> None:
        self.urls, self.w, self.person, self.channel_id = urls, w, person, channel_id
        self.events: list[dict[str, Any]] = []
        self.subscriptions: list[tuple[str, int]] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[int] | None = None

    async def _on_event(self, data: dict[str, Any]) -> None:
        self.events.append(data)

    def start(self) -> None:
        self.task = asyncio.create_task(
            follow(
                self.urls,
                lambda: token(self.w, self.person),
                self.channel_id,
                self._on_event,
                stop=self.stop,
                on_subscribed=lambda base, since: self.subscriptions.append((base, since)),
            )
        )

    @property
    def last(self) -> int:
        return self.events[-1]["seq"] if self.events else 0


async def wait_for(predicate: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def last_seq(http: httpx.AsyncClient, w: World, channel_id: str) -> int:
    r = await http.get(f"/v1/channels/{channel_id}", headers=w.h("op"))
    assert r.status_code == 200, r.text
    return int(r.json()["last_seq"])


async def rest_sender(
    urls: list[str], w: World, person: str, channel_id: str, ids: list[str], sent: Counter[str]
) -> None:
    """Post through the first URL, moving to the next when a replica is gone.

    A post whose replica died in flight may or may not have committed: the retry with
    the same client_message_id elsewhere returns the first message or makes it, once.
    """
    clients = [httpx.AsyncClient(base_url=u, timeout=30) for u in urls]
    at = 0
    try:
        for cmid in ids:
            while True:
                try:
                    r = await clients[at].post(
                        f"/v1/channels/{channel_id}/messages",
                        json={"text": f"{person} says {cmid}", "client_message_id": cmid},
                        headers=w.h(person),
                    )
                except httpx.TransportError:
                    at = (at + 1) % len(clients)
                    continue
                assert r.status_code in (200, 201), r.text
                sent[cmid] += 1
                break
    finally:
        for client in clients:
            await client.aclose()


async def ws_sender(
    base: str, w: World, person: str, channel_id: str, ids: list[str], sent: Counter[str]
) -> None:
    async with MessagingClient(base, token(w, person)) as ws:
        for cmid in ids:
            ref = await ws.send(channel_id, f"{person} says {cmid}", client_message_id=cmid)
            reply = await ws.recv_until_reply(wait=30)
            assert reply["type"] == "ack" and reply["ref"] == ref, reply
            sent[cmid] += 1


def assert_exactly_once_in_order(f: Follower, final: int, expected: set[str]) -> None:
    seqs = [e["seq"] for e in f.events]
    assert seqs == list(range(1, final + 1)), f"{f.person}: not 1..{final} once each"
    posted = [e["message"]["client_message_id"] for e in f.events if e["event"] == "posted"]
    assert Counter(posted) == Counter({c: 1 for c in expected}), f.person


async def test_two_replicas_deliver_exactly_once_in_order_through_a_kill(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    env = {"ONECLUSTER_MESSAGING_SWEEP_INTERVAL": "1"}
    with (
        replica(tmp_path, "a", database_url, redis_prefix, env) as (base_a, proc_a),
        replica(tmp_path, "b", database_url, redis_prefix, env) as (base_b, _),
    ):
        http, w, general = await served_world(base_b, "rep")
        async with contextlib.aclosing(http):
            # followers split across the replicas; those on A fall back to B
            followers = [
                Follower(
                    [base_a, base_b] if i % 2 == 0 else [base_b, base_a],
                    w,
                    PEOPLE[i % len(PEOPLE)],
                    general,
                )
                for i in range(CLIENTS)
            ]
            for f in followers:
                f.start()
            warm = await http.post(
                f"/v1/channels/{general}/messages",
                json={"text": "warm-up", "client_message_id": "warm"},
                headers=w.h("op"),
            )
            assert warm.status_code == 201
            await wait_for(lambda: all(f.last >= 1 for f in followers), "every follower live")
            on_a = [f for f in followers if f.urls[0] == base_a]
            assert all(f.subscriptions[0][0] == base_a for f in on_a)

            # phase 1: four senders, through B (REST and WebSocket) and through A
            per = MESSAGES // 4
            batches = {
                name: [f"{name}-{k}" for k in range(per)] for name in ("rb", "wb", "ra", "rc")
            }
            sent: Counter[str] = Counter()
            senders = [
                rest_sender([base_b], w, "sx", general, batches["rb"], sent),
                ws_sender(base_b, w, "nm", general, batches["wb"], sent),
                rest_sender([base_a, base_b], w, "op2", general, batches["ra"], sent),
                rest_sender([base_b, base_a], w, "sx2", general, batches["rc"], sent),
            ]
            sending = asyncio.gather(*senders)
            # phase 2: kill A mid-stream (SIGKILL: no goodbye to anyone)
            await wait_for(lambda: sum(sent.values()) >= MESSAGES // 2, "half the messages")
            killed_at = await last_seq(http, w, general)
            proc_a.send_signal(signal.SIGKILL)
            proc_a.wait(timeout=30)
            await sending
            final = await last_seq(http, w, general)
            assert killed_at < final
            await wait_for(lambda: all(f.last >= final for f in followers), "every event")
            for f in followers:
                f.stop.set()
            await asyncio.gather(*(f.task for f in followers if f.task is not None))

            expected = {c for ids in batches.values() for c in ids} | {"warm"}
            assert set(sent) == expected - {"warm"}
            for f in followers:
                assert_exactly_once_in_order(f, final, expected)
            # those on A resumed on B from where they were, mid-stream
            for f in on_a:
                resumed = [since for base, since in f.subscriptions[1:] if base == base_b]
                assert resumed and 0 < resumed[0] <= final, f.subscriptions


async def test_sigterm_closes_sockets_with_1012_and_clients_resume_on_the_other_replica(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    with (
        replica(tmp_path, "a", database_url, redis_prefix) as (base_a, proc_a),
        replica(tmp_path, "b", database_url, redis_prefix) as (base_b, _),
    ):
        http, w, general = await served_world(base_b, "term")
        async with contextlib.aclosing(http), MessagingClient(base_a, token(w, "op")) as raw:
            assert (await raw.subscribe(general))["type"] == "subscribed"
            followers = [Follower([base_a, base_b], w, p, general) for p in PEOPLE[:4]]
            for f in followers:
                f.start()
            warm = await http.post(
                f"/v1/channels/{general}/messages",
                json={"text": "warm-up", "client_message_id": "warm"},
                headers=w.h("op"),
            )
            assert warm.status_code == 201
            await wait_for(lambda: all(f.last >= 1 for f in followers), "every follower live")
            ids = [f"t-{k}" for k in range(120)]
            sent: Counter[str] = Counter()
            sending = asyncio.create_task(rest_sender([base_b], w, "sx", general, ids, sent))
            await wait_for(lambda: sum(sent.values()) >= 40, "a third of the messages")
            proc_a.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                while True:
                    await raw.recv(wait=60)
            assert raw.close_code == 1012  # service restart: reconnect elsewhere
            # it drained and exited on its own (uvicorn re-raises the signal once done)
            assert proc_a.wait(timeout=60) in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in (tmp_path / "a.log").read_text()
            await sending
            final = await last_seq(http, w, general)
            await wait_for(lambda: all(f.last >= final for f in followers), "every event")
            for f in followers:
                f.stop.set()
            await asyncio.gather(*(f.task for f in followers if f.task is not None))
            for f in followers:
                assert_exactly_once_in_order(f, final, set(ids) | {"warm"})
                assert any(base == base_b and since > 0 for base, since in f.subscriptions)


async def test_a_replica_that_misses_notifications_fills_the_gap_from_the_database(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    """Notifications lost, reordered and repeated: the client still sees 1, 2, 3, … once.

    The sweep is set to an hour, so only the gap check can deliver what a lost
    notification left behind. Messages are committed by this test straight into the
    database (nobody announces them) and notifications are published to Redis by hand.
    """
    assert database_url is not None and REDIS_URL is not None
    env = {"ONECLUSTER_MESSAGING_SWEEP_INTERVAL": "3600"}
    with replica(tmp_path, "a", database_url, redis_prefix, env) as (base, _):
        http, w, general = await served_world(base, "gap")
        db = Database(database_url, schema="messaging")
        redis = Redis.from_url(REDIS_URL)
        fanout = f"{redis_prefix}:messaging:fanout"
        caller = service.Caller(w.ids["sx"], w.firms["sx"])

        async def silent_post(text: str) -> int:
            async with db.session_scope() as session:
                message, _ = await service.post_message(
                    session,
                    caller,
                    general,
                    text=text,
                    client_message_id=None,
                    mention_user_ids=[],
                    mention_firm_ids=[],
                    attachments=list[Attachment](),
                    max_bytes=16_384,
                )
            return message.seq

        async def announce(seq: int) -> None:
            async with db.read_scope() as session:
                (frame,) = await service.channel_events(session, general, seq - 1, seq, 1)
            await redis.publish(fanout, json.dumps({"k": "e", "frame": frame}))

        try:
            async with contextlib.aclosing(http), MessagingClient(base, token(w, "nm")) as reader:
                subscribed = await reader.subscribe(general)
                assert (subscribed["type"], subscribed["last_seq"]) == ("subscribed", 0)
                # seq 1 and 2 committed, only 2 announced: 1 is fetched first
                assert [await silent_post("one"), await silent_post("two")] == [1, 2]
                await announce(2)
                got = [await reader.recv_until("event") for _ in range(2)]
                assert [(e["seq"], e["message"]["text"]) for e in got] == [(1, "one"), (2, "two")]
                # 4 announced before 3, then 4 again: 3, 4, once each
                await silent_post("three")
                await silent_post("four")
                for seq in (4, 3, 4):
                    await announce(seq)
                got = [await reader.recv_until("event") for _ in range(2)]
                assert [(e["seq"], e["message"]["text"]) for e in got] == [
                    (3, "three"),
                    (4, "four"),
                ]
                # a normal post next: nothing repeated in between
                r = await http.post(
                    f"/v1/channels/{general}/messages", json={"text": "five"}, headers=w.h("op")
                )
                assert r.status_code == 201
                nxt = await reader.recv_until("event")
                assert (nxt["seq"], nxt["message"]["text"]) == (5, "five")
        finally:
            await redis.aclose()
            await db.dispose()


async def test_access_loss_through_one_replica_ends_subscriptions_on_the_other(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    """A firm leaves the cluster (and a user its firm) through A: sockets on B hear of it.

    Membership's event is consumed by one replica of the consumer group, either one; the
    people affected have a socket on each replica, so one of the two learns of it only
    through Redis. The sweep is set to an hour: only the access notification can end a
    subscription or close a socket with a deny-listed token here.
    """
    env = {"ONECLUSTER_MESSAGING_SWEEP_INTERVAL": "3600"}
    with (
        replica(tmp_path, "a", database_url, redis_prefix, env) as (base_a, _),
        replica(tmp_path, "b", database_url, redis_prefix, env) as (base_b, _),
    ):
        http, w, general = await served_world(base_a, "revoke")
        async with (
            contextlib.aclosing(http),
            MessagingClient(base_b, token(w, "nm")) as nm_b,
            MessagingClient(base_a, token(w, "nm")) as nm_a,
            MessagingClient(base_b, token(w, "sx2")) as sx2_b,
            MessagingClient(base_a, token(w, "sx2")) as sx2_a,
            MessagingClient(base_b, token(w, "op")) as op_b,
        ):
            topic_id = await public_channel(http, w, "topic")
            for client in (nm_b, nm_a, sx2_b, sx2_a, op_b):
                for channel in (general, topic_id):
                    assert (await client.subscribe(channel))["type"] == "subscribed"

            # every change goes through A (the world's client); each person has a socket on B
            await cut_off_and_check(
                http, w, (general, topic_id), [nm_b, nm_a], [sx2_b, sx2_a], op_b
            )
