"""Fixed-window rate limits: in-process and on Redis, directly and through HTTP."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from conftest import REDIS_URL, make_settings, requires_redis
from fastapi import APIRouter, Request
from kit_support import TokenMint, build_app, serve, wait_for
from redis.asyncio import Redis

from services.kit.auth import CurrentPrincipal
from services.kit.errors import RateLimited
from services.kit.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter, enforce
from services.kit.runtime import Runtime
from services.kit.settings import Settings

WINDOW = 3600


@pytest.fixture(params=["memory", pytest.param("redis", marks=requires_redis)])
async def limiter(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[RateLimiter]:
    if request.param == "memory":
        yield MemoryRateLimiter()
        return
    assert REDIS_URL
    client = Redis.from_url(REDIS_URL)
    yield RedisRateLimiter(client, redis_prefix)
    await client.aclose()


async def over_the_limit(limiter: RateLimiter, limit: int, window: int) -> tuple[int, float]:
    """Hit a fresh key limit+1 times inside one window; the last hit's Retry-After and the
    seconds left in that window. Starts again in the rare case a window boundary fell in
    between (the count starts over there, as it should)."""
    for _ in range(3):
        key = f"test:{secrets.token_hex(4)}"
        start = int(time.time() // window)
        for _ in range(limit):
            assert await limiter.hit(key, limit, window) == 0
        try:
            await enforce(limiter, key, limit, window)
        except RateLimited as exc:
            now = time.time()
            if int(now // window) == start:
                left = (start + 1) * window - now
                return int(exc.headers["Retry-After"]), left
            continue
        if int(time.time() // window) == start:
            raise AssertionError(f"hit {limit + 1} was allowed")
    raise AssertionError("could not stay inside one window")


async def test_limit_plus_one_is_refused_with_retry_after_of_the_window(
    limiter: RateLimiter,
) -> None:
    retry_after, left = await over_the_limit(limiter, limit=3, window=WINDOW)
    assert 1 <= retry_after <= WINDOW
    # Retry-After is the time until this window ends, not a whole window from the first hit.
    assert abs(retry_after - left) <= 2


async def test_keys_are_counted_apart(limiter: RateLimiter) -> None:
    a, b = f"a:{secrets.token_hex(4)}", f"b:{secrets.token_hex(4)}"
    assert await limiter.hit(a, 1, WINDOW) == 0
    assert await limiter.hit(b, 1, WINDOW) == 0  # b has its own count
    assert await limiter.hit(a, 1, WINDOW) > 0


async def test_the_count_starts_over_in_the_next_window(limiter: RateLimiter) -> None:
    key = f"w:{secrets.token_hex(4)}"

    def hit_returns(expect_limited: bool) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return (await limiter.hit(key, 1, 1) > 0) == expect_limited

        return check

    await wait_for(hit_returns(True), what="a refused hit")
    await wait_for(hit_returns(False), what="the next window to allow a hit")


@requires_redis
async def test_replicas_share_the_redis_count(redis_prefix: str) -> None:
    assert REDIS_URL
    one, two = Redis.from_url(REDIS_URL), Redis.from_url(REDIS_URL)
    try:
        replica_a, replica_b = (
            RedisRateLimiter(one, redis_prefix),
            RedisRateLimiter(two, redis_prefix),
        )
        key = f"shared:{secrets.token_hex(4)}"
        assert await replica_a.hit(key, 2, WINDOW) == 0
        assert await replica_b.hit(key, 2, WINDOW) == 0
        assert await replica_a.hit(key, 2, WINDOW) > 0
        assert await replica_b.hit(key, 2, WINDOW) > 0
    finally:
        await one.aclose()
        await two.aclose()


# -- through HTTP -----------------------------------------------------------------------


def make_router() -> APIRouter:
    router = APIRouter()

    @router.get("/search")
    async def search(request: Request) -> dict[str, Any]:
        client = request.client.host if request.client else "unknown"
        await enforce(request.app.state.rate_limiter, f"search:{client}", 2, WINDOW)
        return {"results": []}

    @router.get("/me")
    async def me(principal: CurrentPrincipal) -> dict[str, Any]:
        return {"subject": principal.subject}

    return router


@pytest.fixture
async def http(tmp_path: Any, database_url: str | None, redis_prefix: str) -> AsyncIterator[Any]:
    settings: Settings = make_settings(
        tmp_path, database_url, redis_prefix, rate_limit_per_minute=2, firm_rate_limit_per_minute=3
    )
    runtime = Runtime(settings)
    mint = TokenMint(settings)
    mint.install(runtime)
    async with serve(build_app(settings, [make_router()], runtime=runtime)) as client:
        yield client, mint


def assert_429(response: httpx.Response, window: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/rate-limited")
    assert 1 <= int(response.headers["retry-after"]) <= window


async def test_route_over_its_limit_answers_429_problem(http: Any) -> None:
    client, _ = http
    assert (await client.get("/search")).status_code == 200
    assert (await client.get("/search")).status_code == 200
    assert_429(await client.get("/search"), WINDOW)


async def test_authenticated_principal_over_its_limit_answers_429(http: Any) -> None:
    client, mint = http
    alice = {"Authorization": f"Bearer {mint.token('user_alice')}"}
    bob = {"Authorization": f"Bearer {mint.token('user_bob')}"}
    for _ in range(2):
        response = await client.get("/me", headers=alice)
        assert response.status_code == 200 and response.json() == {"subject": "user_alice"}
    assert_429(await client.get("/me", headers=alice), 60)
    assert (await client.get("/me", headers=bob)).status_code == 200  # per principal


async def test_firm_limit_spans_its_principals(http: Any) -> None:
    client, mint = http
    calls = [
        await client.get("/me", headers={"Authorization": f"Bearer {mint.token(u, firm_id='f1')}"})
        for u in ("user_a", "user_b", "user_c", "user_d")
    ]
    assert [c.status_code for c in calls[:3]] == [200, 200, 200]
    assert_429(calls[3], 60)  # the firm's 4th call in the minute, by its 4th user
