"""Builders for marketplace tests: a cluster with a requester, vendors and annotators.

The marketplace learns firms and memberships from membership's events, after
membership's commit (in-process bus or Redis Streams). :func:`settle` waits, with a
bounded timeout, until the marketplace has applied every membership event so far.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa

from tests.oauth_flow import bearer, invite_member, login, sign_up

REQUESTER = {
    "name": "Zhiyuan AI",
    "region": "CN-BJ",
    "city": "Beijing",
    "actor_type": "large_enterprise",
    "industries": ["0301", "0406"],
}


def vendor_profile(name: str, region: str, actor_type: str = "small_micro_enterprise") -> dict:
    return {
        "name": name,
        "region": region,
        "city": "City",
        "actor_type": actor_type,
        "industries": ["0304"],
    }


async def settle(gateway: Any, timeout: float = 15.0) -> None:
    """Wait until the marketplace consumed every membership event published so far."""
    from services.marketplace.consumers import CONSUMER, TYPES

    membership = gateway.apps["membership"].state.db
    marketplace = gateway.apps["marketplace"].state.db
    deadline = time.monotonic() + timeout
    while True:
        async with membership.sessionmaker() as session:
            wanted = set(
                (
                    await session.execute(
                        sa.text("SELECT id, type FROM outbox"),
                    )
                ).all()
            )
        wanted_ids = {event_id for event_id, kind in wanted if kind in TYPES}
        async with marketplace.sessionmaker() as session:
            done = set(
                (
                    await session.execute(
                        sa.text("SELECT event_id FROM processed_events WHERE consumer = :c"),
                        {"c": CONSUMER},
                    )
                ).scalars()
            )
        if wanted_ids <= done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"read model still lacks {len(wanted_ids - done)} events")
        await asyncio.sleep(0.05)


async def owner_of(client: httpx.AsyncClient, email: str, firm: dict) -> tuple[str, dict]:
    """Sign up, register the firm, sign in acting for it; returns (firm id, tokens)."""
    await sign_up(client, email)
    tokens = await login(client, email)
    created = await client.post("/v1/firms", json=firm, headers=bearer(tokens))
    assert created.status_code == 201, created.text
    firm_id = created.json()["id"]
    return firm_id, await login(client, email, firm_id=firm_id)


async def add_member(
    client: httpx.AsyncClient, owner: dict, firm_id: str, email: str, role: str = "annotator"
) -> dict:
    """A new user with ``role`` in the firm; returns tokens acting for the firm."""
    await sign_up(client, email)
    tokens = await login(client, email)
    await invite_member(client, owner, firm_id, tokens, email, role=role)
    return await login(client, email, firm_id=firm_id)


async def join(
    client: httpx.AsyncClient, operator: dict, cluster_id: str, firm_id: str, owner: dict
):
    invited = await client.post(
        f"/v1/clusters/{cluster_id}/invitations",
        json={"firm_id": firm_id},
        headers=bearer(operator),
    )
    assert invited.status_code == 201, invited.text
    accepted = await client.post(
        f"/v1/clusters/{cluster_id}/invitations/{invited.json()['id']}:accept",
        headers=bearer(owner),
    )
    assert accepted.status_code == 200, accepted.text


@dataclass
class Market:
    """Requester firm (CN-BJ, operator of the cluster) and vendor firms with annotators."""

    cluster_id: str
    requester_id: str
    requester: dict
    vendors: dict[str, str] = field(default_factory=dict)  # name → firm id
    owners: dict[str, dict] = field(default_factory=dict)  # name → owner tokens
    annotators: dict[str, list[dict]] = field(default_factory=dict)  # name → tokens


async def build_market(
    client: httpx.AsyncClient,
    gateway: Any,
    *,
    tag: str = "m",
    vendors: dict[str, str] | None = None,
    annotators_per_vendor: int = 1,
    credits: int = 1_000_000,
) -> Market:
    """The market, with ``credits`` granted to the requester (publishing escrows rewards)."""
    vendors = vendors if vendors is not None else {"sx": "CN-SX", "nm": "CN-NM"}
    requester_id, requester = await owner_of(client, f"req@{tag}.example", REQUESTER)
    cluster = await client.post(
        "/v1/clusters",
        json={"name": f"{tag} cluster", "core_region": "CN-BJ"},
        headers=bearer(requester),
    )
    assert cluster.status_code == 201, cluster.text
    market = Market(cluster.json()["id"], requester_id, requester)
    for name, region in vendors.items():
        firm_id, owner = await owner_of(
            client, f"owner-{name}@{tag}.example", vendor_profile(f"{tag}-{name}", region)
        )
        await join(client, requester, market.cluster_id, firm_id, owner)
        market.vendors[name], market.owners[name] = firm_id, owner
        market.annotators[name] = [
            await add_member(client, owner, firm_id, f"ann{i}-{name}@{tag}.example")
            for i in range(annotators_per_vendor)
        ]
    if gateway is not None:  # a served process is waited for through its API instead
        await settle(gateway)
    if credits:
        await grant_credits(client, market.requester, market.cluster_id, requester_id, credits)
    return market


async def grant_credits(
    client: httpx.AsyncClient,
    operator: dict,
    cluster_id: str,
    firm_id: str,
    amount: int,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """The cluster operator grants ``amount`` credits to a member firm; a 404 or 403 while
    the marketplace's read model catches up with membership is retried."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.post(
            "/v1/ledger/grants",
            json={"cluster_id": cluster_id, "firm_id": firm_id, "amount": amount},
            headers=bearer(operator),
        )
        if response.status_code not in (403, 404) or time.monotonic() > deadline:
            assert response.status_code == 201, response.text
            return dict(response.json())
        await asyncio.sleep(0.1)


def task_body(cluster_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "cluster_id": cluster_id,
        "title": "Sentiment of reviews",
        "instructions": "Pick the sentiment.",
        "kind": "single_label",
        "label_schema": {"labels": ["positive", "negative", "neutral"]},
        "reward_per_annotation": 5,
        "overlap": 2,
        "lease_seconds": 600,
    }
    body.update(overrides)
    return body


async def open_task(
    client: httpx.AsyncClient,
    market: Market,
    *,
    items: int = 10,
    gold: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """A published single-label task with ``items`` items and ``gold`` gold items."""
    created = await client.post(
        "/v1/tasks",
        json=task_body(market.cluster_id, **overrides),
        headers=bearer(market.requester),
    )
    assert created.status_code == 201, created.text
    task = created.json()
    lines = [{"input": {"text": f"review {i}"}, "external_id": f"r{i}"} for i in range(items)]
    lines += [
        {"input": {"text": f"review {items + i}"}, "gold": True, "answer": {"label": "negative"}}
        for i in range(gold)
    ]
    imported = await client.post(
        f"/v1/tasks/{task['id']}/items", json=lines, headers=bearer(market.requester)
    )
    assert imported.status_code == 200, imported.text
    published = await client.post(
        f"/v1/tasks/{task['id']}:publish", headers=bearer(market.requester)
    )
    assert published.status_code == 200, published.text
    return published.json()


async def claim(
    client: httpx.AsyncClient, tokens: dict, task_id: str, count: int
) -> httpx.Response:
    return await client.post(
        f"/v1/tasks/{task_id}/assignments:claim", json={"count": count}, headers=bearer(tokens)
    )


async def submit(
    client: httpx.AsyncClient, tokens: dict, task_id: str, answers: list[tuple[str, Any]]
) -> httpx.Response:
    return await client.post(
        f"/v1/tasks/{task_id}/assignments:submit",
        json={"answers": [{"assignment_id": a, "answer": ans} for a, ans in answers]},
        headers=bearer(tokens),
    )


@dataclass
class Crowd:
    """A requester firm (operator of the cluster) and many annotators over vendor firms."""

    cluster_id: str
    requester_id: str
    requester: dict
    vendor_ids: list[str]
    annotators: list[dict]  # tokens acting for the annotator's vendor firm


async def build_crowd(
    new_client: Callable[[], httpx.AsyncClient],
    *,
    tag: str,
    vendors: list[str],
    annotators: int,
    concurrency: int = 16,
    credits: int = 1_000_000,
) -> Crowd:
    """Many annotators through the public API, concurrently, two password hashes each.

    ``vendors`` are the vendor firms' regions; annotators are spread over them round
    robin; the requester is granted ``credits`` (publishing escrows the rewards). An
    annotator signs up, signs in (acting for no firm yet), accepts the owner's
    invitation and refreshes the token, which then acts for the firm (the user's earliest
    and only one). Each user signs in with a client of its own: the login page's CSRF
    cookie belongs to one browser.
    """
    async with new_client() as client:
        requester_id, requester = await owner_of(client, f"req@{tag}.example", REQUESTER)
        cluster = await client.post(
            "/v1/clusters",
            json={"name": f"{tag} cluster", "core_region": "CN-BJ"},
            headers=bearer(requester),
        )
        assert cluster.status_code == 201, cluster.text
        cluster_id = cluster.json()["id"]
        firms: list[tuple[str, dict]] = []
        for i, region in enumerate(vendors):
            firm_id, owner = await owner_of(
                client, f"owner-{i}@{tag}.example", vendor_profile(f"{tag}-v{i}", region)
            )
            await join(client, requester, cluster_id, firm_id, owner)
            firms.append((firm_id, owner))
        if credits:
            await grant_credits(client, requester, cluster_id, requester_id, credits)
    gate = asyncio.Semaphore(concurrency)

    async def annotator(index: int) -> dict:
        firm_id, owner = firms[index % len(firms)]
        email = f"ann{index:04d}@{tag}.example"
        async with gate, new_client() as client:
            await sign_up(client, email)
            tokens = await login(client, email)
            await invite_member(client, owner, firm_id, tokens, email, role="annotator")
            refreshed = await client.post(
                "/oauth/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": tokens["refresh_token"],
                    "client_id": "onecluster-web",
                },
            )
            assert refreshed.status_code == 200, refreshed.text
            return dict(refreshed.json())

    crowd = await asyncio.gather(*(annotator(i) for i in range(annotators)))
    return Crowd(cluster_id, requester_id, requester, [f for f, _ in firms], list(crowd))


async def wait_until_visible(
    client: httpx.AsyncClient, task_id: str, people: list[dict], timeout: float = 60.0
) -> None:
    """Wait until every one of ``people`` may read the task: the marketplace's read model
    (fed by membership's events) knows their firm, membership and role."""
    deadline = time.monotonic() + timeout
    waiting = list(people)
    while waiting:
        answers = await asyncio.gather(
            *(client.get(f"/v1/tasks/{task_id}", headers=bearer(t)) for t in waiting)
        )
        for response in answers:
            assert response.status_code in (200, 404), response.text
        waiting = [t for t, r in zip(waiting, answers, strict=True) if r.status_code != 200]
        if waiting and time.monotonic() > deadline:
            raise AssertionError(f"{len(waiting)} annotators still cannot see the task")
        if waiting:
            await asyncio.sleep(0.2)
