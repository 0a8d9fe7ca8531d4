"""Builders for messaging tests: a cluster of three firms with users, and served replicas.

Messaging learns clusters and memberships from membership's events after membership's
commit; :func:`settle` waits (bounded) until it has applied every one so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from services.messaging.client import MessagingClient
from tests.marketplace_support import add_member, join, owner_of, vendor_profile
from tests.oauth_flow import bearer
from tests.served import served_process


async def settle(gateway: Any, timeout: float = 15.0) -> None:
    """Wait until messaging consumed every membership event published so far."""
    from services.messaging.consumers import CONSUMER, TYPES

    membership = gateway.apps["membership"].state.db
    messaging = gateway.apps["messaging"].state.db
    deadline = time.monotonic() + timeout
    while True:
        async with membership.sessionmaker() as session:
            rows = (await session.execute(sa.text("SELECT id, type FROM outbox"))).all()
        wanted = {event_id for event_id, kind in rows if kind in TYPES}
        async with messaging.sessionmaker() as session:
            done = set(
                (
                    await session.execute(
                        sa.text("SELECT event_id FROM processed_events WHERE consumer = :c"),
                        {"c": CONSUMER},
                    )
                ).scalars()
            )
        if wanted <= done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"messaging read model lacks {len(wanted - done)} events")
        await asyncio.sleep(0.05)


@dataclass
class World:
    """Firm ``op`` runs the cluster; ``sx`` and ``nm`` are members; ``out`` is not."""

    cluster_id: str
    firms: dict[str, str] = field(default_factory=dict)  # name → firm id
    tokens: dict[str, dict] = field(default_factory=dict)  # person → tokens
    ids: dict[str, str] = field(default_factory=dict)  # person → user id

    def h(self, person: str) -> dict[str, str]:
        return bearer(self.tokens[person])


async def build_world(client: httpx.AsyncClient, gateway: Any, tag: str = "w") -> World:
    """Owners op/sx/nm/out of their firms, plus users op2 (member) and sx2 (annotator)."""
    op_id, op = await owner_of(client, f"op@{tag}.example", vendor_profile(f"{tag}-op", "CN-BJ"))
    cluster = await client.post(
        "/v1/clusters", json={"name": f"{tag} cluster", "core_region": "CN-BJ"}, headers=bearer(op)
    )
    assert cluster.status_code == 201, cluster.text
    world = World(cluster.json()["id"])
    world.firms["op"], world.tokens["op"] = op_id, op
    for name, region in (("sx", "CN-SX"), ("nm", "CN-NM"), ("out", "CN-HE")):
        firm_id, owner = await owner_of(
            client, f"{name}@{tag}.example", vendor_profile(f"{tag}-{name}", region)
        )
        if name != "out":
            await join(client, op, world.cluster_id, firm_id, owner)
        world.firms[name], world.tokens[name] = firm_id, owner
    world.tokens["op2"] = await add_member(client, op, op_id, f"op2@{tag}.example", "member")
    world.tokens["sx2"] = await add_member(
        client, world.tokens["sx"], world.firms["sx"], f"sx2@{tag}.example"
    )
    for person, tokens in world.tokens.items():
        me = await client.get("/v1/users/me", headers=bearer(tokens))
        world.ids[person] = me.json()["id"]
    if gateway is not None:
        await settle(gateway)
    return world


async def served_world(base: str, tag: str) -> tuple[httpx.AsyncClient, World, str]:
    """A world built through a served API, once messaging knows every firm of it.

    Returns an HTTP client on ``base`` (the caller closes it), the world and the id of
    the cluster's general channel.
    """
    client = httpx.AsyncClient(base_url=base, timeout=60)
    w = await build_world(client, None, tag)
    deadline = time.monotonic() + 60
    general = ""
    for person in ("op", "op2", "sx", "sx2", "nm"):
        while True:
            r = await client.get(
                "/v1/channels",
                params={"kind": "general", "cluster_id": w.cluster_id},
                headers=w.h(person),
            )
            if r.status_code == 200 and r.json()["items"]:
                general = r.json()["items"][0]["id"]
                break
            assert time.monotonic() < deadline, r.text
            await asyncio.sleep(0.1)
    return client, w, general


def token(w: World, person: str) -> str:
    return str(w.tokens[person]["access_token"])


async def general_of(client: httpx.AsyncClient, world: World, person: str = "op") -> dict:
    listed = await client.get(
        "/v1/channels",
        params={"cluster_id": world.cluster_id, "kind": "general"},
        headers=world.h(person),
    )
    assert listed.status_code == 200, listed.text
    (general,) = listed.json()["items"]
    return general


async def public_channel(
    client: httpx.AsyncClient, world: World, name: str, person: str = "op"
) -> str:
    """A new public channel of the world's cluster; its id."""
    made = await client.post(
        "/v1/channels",
        json={"cluster_id": world.cluster_id, "kind": "public", "name": name},
        headers=world.h(person),
    )
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


async def cut_off_and_check(
    http: httpx.AsyncClient,
    w: World,
    channels: tuple[str, str],
    nm: list[MessagingClient],
    sx2: list[MessagingClient],
    op: MessagingClient,
) -> None:
    """The access-loss scenario on sockets subscribed to ``channels`` (general first):
    the firm nm leaves the cluster (its sockets stay, their subscriptions end with
    ``access_revoked``); sx2 is removed from its firm (its token is deny-listed: 4002);
    op notices nothing and gets the next message."""
    left = await http.delete(
        f"/v1/clusters/{w.cluster_id}/members/{w.firms['nm']}", headers=w.h("nm")
    )
    assert left.status_code == 204, left.text
    for client in nm:
        ended = [await client.recv_until("unsubscribed", wait=30) for _ in channels]
        assert {(u["channel_id"], u["reason"]) for u in ended} == {
            (c, "access_revoked") for c in channels
        }
        await client.send_frame({"type": "ping", "id": "still"})
        assert (await client.recv_until("pong"))["ref"] == "still"
        again = await client.subscribe(channels[0])
        assert (again["type"], again["code"]) == ("error", "not_found")
    removed = await http.delete(
        f"/v1/firms/{w.firms['sx']}/members/{w.ids['sx2']}", headers=w.h("sx")
    )
    assert removed.status_code == 204, removed.text
    for client in sx2:
        with pytest.raises(ConnectionClosed):
            while True:
                await client.recv(wait=30)
        assert client.ws is not None
        assert (client.ws.close_code, client.ws.close_reason) == (4002, "token revoked")
    r = await post(http, w, "op", channels[0], "still here")
    assert r.status_code == 201, r.text
    event = await op.recv_until("event", wait=30)
    assert (event["seq"], event["message"]["text"]) == (1, "still here")


async def post(
    client: httpx.AsyncClient, world: World, person: str, channel_id: str, text: str, **extra: Any
) -> httpx.Response:
    return await client.post(
        f"/v1/channels/{channel_id}/messages", json={"text": text, **extra}, headers=world.h(person)
    )


@contextlib.contextmanager
def replica(
    tmp_path: Path,
    name: str,
    database_url: str | None,
    redis_prefix: str,
    extra_env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A served platform (``onecluster serve``) and its process handle, stopped on exit.

    Several replicas share the test's PostgreSQL and Redis (and one token issuer); each
    has its own log file.
    """
    env = {
        "ONECLUSTER_PUBLIC_URL": "http://127.0.0.1:1",  # one issuer for every replica
        "ONECLUSTER_WEB_REDIRECT_URIS": '["http://testserver/cb"]',
        "ONECLUSTER_RATE_LIMIT_PER_MINUTE": "100000",
        "ONECLUSTER_FIRM_RATE_LIMIT_PER_MINUTE": "100000",
        "ONECLUSTER_MESSAGING_SEND_RATE_PER_MINUTE": "100000",
        **(extra_env or {}),
    }
    with served_process(
        tmp_path, database_url, redis_prefix, env, name=name, ready_within=180
    ) as served:
        yield served


async def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        text = (await http.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))
