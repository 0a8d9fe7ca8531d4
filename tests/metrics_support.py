"""Builders for metrics tests: clusters of firms through the public API, work done on
the marketplace, imported history, and :func:`settle_metrics`, which waits until the
metrics service has applied every event the other services have published so far."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from tests.marketplace_support import grant_credits, join, owner_of, settle
from tests.oauth_flow import bearer

PRODUCERS = ("membership", "marketplace", "messaging")


async def settle_metrics(gateway: Any, timeout: float = 30.0) -> None:
    """Wait until metrics consumed every event (of the types it reads) published so far."""
    from services.metrics.consumers import CONSUMER, TYPES

    metrics = gateway.apps["metrics"].state.db
    deadline = time.monotonic() + timeout
    while True:
        wanted: set[str] = set()
        for name in PRODUCERS:
            if name not in gateway.apps:
                continue
            async with gateway.apps[name].state.db.sessionmaker() as session:
                rows = (await session.execute(sa.text("SELECT id, type FROM outbox"))).all()
            wanted |= {event_id for event_id, kind in rows if kind in TYPES}
        async with metrics.sessionmaker() as session:
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
            raise AssertionError(f"metrics still lacks {len(wanted - done)} events")
        await asyncio.sleep(0.05)


def firm_profile(name: str, region: str, actor_type: str, industries: list[str]) -> dict:
    return {
        "name": name,
        "region": region,
        "city": "City",
        "actor_type": actor_type,
        "industries": industries,
    }


@dataclass
class World:
    """A cluster run by its first firm; ``firms`` maps a short name to (firm id, tokens)."""

    cluster_id: str
    operator: str
    firms: dict[str, tuple[str, dict]] = field(default_factory=dict)

    def id(self, name: str) -> str:
        return self.firms[name][0]

    def tokens(self, name: str) -> dict:
        return self.firms[name][1]

    @property
    def operator_tokens(self) -> dict:
        return self.tokens(self.operator)


async def build_cluster(
    client: httpx.AsyncClient,
    gateway: Any,
    tag: str,
    firms: dict[str, tuple[str, str, list[str]]],
    *,
    core_region: str = "CN-BJ",
) -> World:
    """The first firm of ``firms`` (name → (region, actor type, industries)) creates the
    cluster and invites the others, who accept."""
    names = list(firms)
    made: dict[str, tuple[str, dict]] = {}
    for name in names:
        region, actor, industries = firms[name]
        made[name] = await owner_of(
            client,
            f"{name}@{tag}.example",
            firm_profile(f"{tag}-{name}", region, actor, industries),
        )
    operator = names[0]
    created = await client.post(
        "/v1/clusters",
        json={"name": f"{tag} cluster", "core_region": core_region},
        headers=bearer(made[operator][1]),
    )
    assert created.status_code == 201, created.text
    world = World(created.json()["id"], operator, made)
    for name in names[1:]:
        await join(client, world.operator_tokens, world.cluster_id, made[name][0], made[name][1])
    await settle(gateway)
    await settle_metrics(gateway)
    return world


async def do_work(
    client: httpx.AsyncClient,
    gateway: Any,
    world: World,
    requester: str,
    vendor: str,
    items: int = 3,
) -> None:
    """``requester`` publishes a task of ``items`` items; ``vendor``'s owner annotates
    them all; the requester accepts every submission (accepted annotations, a payout)."""
    from tests.marketplace_support import claim, submit, task_body

    tokens = world.tokens(requester)
    await grant_credits(
        client, world.operator_tokens, world.cluster_id, world.id(requester), 10_000
    )
    created = await client.post(
        "/v1/tasks",
        json=task_body(world.cluster_id, overlap=1, reward_per_annotation=1),
        headers=bearer(tokens),
    )
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    lines = [{"input": {"text": f"t{i}"}} for i in range(items)]
    imported = await client.post(f"/v1/tasks/{task_id}/items", json=lines, headers=bearer(tokens))
    assert imported.status_code == 200, imported.text
    published = await client.post(f"/v1/tasks/{task_id}:publish", headers=bearer(tokens))
    assert published.status_code == 200, published.text
    claimed = await claim(client, world.tokens(vendor), task_id, items)
    assert claimed.status_code == 200, claimed.text
    leases = [a["assignment_id"] for a in claimed.json()["assignments"]]
    assert len(leases) == items, claimed.text
    submitted = await submit(
        client, world.tokens(vendor), task_id, [(a, {"label": "positive"}) for a in leases]
    )
    assert submitted.status_code == 200, submitted.text
    accepted = await client.post(
        f"/v1/tasks/{task_id}/submissions:accept",
        json={"assignment_ids": leases},
        headers=bearer(tokens),
    )
    assert accepted.status_code == 200, accepted.text


def days_ago(n: int) -> str:
    return (datetime.now(UTC) - timedelta(days=n)).date().isoformat()


async def import_history(
    client: httpx.AsyncClient, world: World, records: list[dict[str, Any]]
) -> httpx.Response:
    return await client.post(
        f"/v1/clusters/{world.cluster_id}/history",
        json=records,
        headers=bearer(world.operator_tokens),
    )


def record(
    world: World, a: str, b: str, kind: str, weight: float, age_days: int, ext: str | None = None
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "firm_a": world.id(a),
        "firm_b": world.id(b),
        "kind": kind,
        "weight": weight,
        "date": days_ago(age_days),
    }
    if ext:
        line["external_id"] = ext
    return line
