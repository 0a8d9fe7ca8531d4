"""Per-principal and per-firm API rate limits answer 429 with Retry-After."""

from __future__ import annotations

from pathlib import Path

import httpx

from api.gateway import create_gateway
from tests.conftest import make_settings
from tests.oauth_flow import bearer, login, sign_up


async def test_principal_limit_answers_429_with_retry_after(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    settings = make_settings(tmp_path, database_url, redis_prefix, rate_limit_per_minute=5)
    gateway = create_gateway(settings)
    async with gateway.lifespan():
        transport = httpx.ASGITransport(app=gateway)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            await sign_up(client, "busy@example.com")
            tokens = await login(client, "busy@example.com")
            # Fixed one-minute windows: if a window boundary falls inside the loop the
            # count restarts once, so the first 429 comes after 5 to 10 successes.
            successes = 0
            limited = None
            for _ in range(12):
                response = await client.get("/v1/users/me", headers=bearer(tokens))
                if response.status_code == 429:
                    limited = response
                    break
                assert response.status_code == 200
                successes += 1
            assert limited is not None
            assert 5 <= successes <= 10
            assert limited.headers["content-type"].startswith("application/problem+json")
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            # Another principal is not affected.
            await sign_up(client, "calm@example.com")
            other = await login(client, "calm@example.com")
            assert (await client.get("/v1/users/me", headers=bearer(other))).status_code == 200
