"""Seeding through the public HTTP API: a cluster with many member firms, each its own user.

Every firm is made the way a person would make it: sign up, sign in through the login
page (authorization code + PKCE), register the firm, refresh the token (the new token acts
for the new firm), apply to the cluster; the operator approves. The operator also
registers an integrator client for the token-issuance benchmark.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tests.oauth_flow import bearer, login, refresh, sign_up

REGIONS = [("CN-BJ", "Beijing"), ("CN-SX", "Taiyuan"), ("CN-NM", "Hohhot"), ("CN-HE", "Baoding")]
ACTOR_TYPES = [
    "small_micro_enterprise",
    "medium_enterprise",
    "technology_service_provider",
    "university",
    "investor",
]
INDUSTRIES = [["0301"], ["0406", "0301"], ["0104"], ["0406"]]
ClientFactory = Callable[[], httpx.AsyncClient]


@dataclass
class Seeded:
    cluster_id: str
    operator_firm_id: str
    operator_tokens: dict[str, Any]
    member_firms: int
    client_id: str
    client_secret: str
    seconds: float


def _ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    body: dict[str, Any] = response.json()
    return body


async def user_with_firm(
    client: httpx.AsyncClient, email: str, index: int, redirect_uri: str
) -> tuple[dict[str, Any], str]:
    """A new user who owns a new firm, and a token acting for that firm."""
    await sign_up(client, email, display_name=f"Bench user {index}")
    tokens = await login(client, email, redirect_uri=redirect_uri)
    region, city = REGIONS[index % len(REGIONS)]
    firm = _ok(
        await client.post(
            "/v1/firms",
            json={
                "name": f"Bench firm {index:04d}",
                "region": region,
                "city": city,
                "actor_type": ACTOR_TYPES[index % len(ACTOR_TYPES)],
                "industries": INDUSTRIES[index % len(INDUSTRIES)],
                "description": "A firm seeded by bench/auth_read.py.",
            },
            headers=bearer(tokens),
        ),
        201,
    )
    # The first token acted for no firm; a refreshed one acts for the user's earliest firm.
    tokens = _ok(await refresh(client, tokens["refresh_token"]))
    return tokens, str(firm["id"])


async def seed(
    new_client: ClientFactory,
    *,
    redirect_uri: str,
    members: int,
    tag: str,
    concurrency: int = 8,
) -> Seeded:
    """A cluster with ``members`` firms besides its operator, built through the API."""
    started = time.perf_counter()
    async with new_client() as client:
        op_tokens, op_firm = await user_with_firm(
            client, f"bench-{tag}-operator@example.com", 0, redirect_uri
        )
        cluster = _ok(
            await client.post(
                "/v1/clusters",
                json={
                    "name": f"Bench cluster {tag}",
                    "description": "Seeded by bench/auth_read.py.",
                    "core_region": "CN-BJ",
                    "focus_industries": ["0406", "0301"],
                },
                headers=bearer(op_tokens),
            ),
            201,
        )
        integrator = _ok(
            await client.post(
                f"/v1/firms/{op_firm}/clients",
                json={"name": "Bench integrator", "scope": "membership:read"},
                headers=bearer(op_tokens),
            ),
            201,
        )
    cluster_id = str(cluster["id"])
    gate = asyncio.Semaphore(concurrency)

    async def member(index: int) -> None:
        # One client per user: the login page's CSRF cookie belongs to one browser.
        async with gate, new_client() as client:
            tokens, _ = await user_with_firm(
                client, f"bench-{tag}-{index:04d}@example.com", index, redirect_uri
            )
            request = _ok(
                await client.post(
                    f"/v1/clusters/{cluster_id}/join-requests",
                    json={"message": "Seeded member."},
                    headers=bearer(tokens),
                ),
                201,
            )
            _ok(
                await client.post(
                    f"/v1/clusters/{cluster_id}/join-requests/{request['id']}:approve",
                    headers=bearer(op_tokens),
                )
            )

    async with asyncio.TaskGroup() as group:  # the first failure cancels the rest
        for index in range(1, members + 1):
            group.create_task(member(index))
    return Seeded(
        cluster_id=cluster_id,
        operator_firm_id=op_firm,
        operator_tokens=op_tokens,
        member_firms=members + 1,
        client_id=str(integrator["client_id"]),
        client_secret=str(integrator["client_secret"]),
        seconds=time.perf_counter() - started,
    )
