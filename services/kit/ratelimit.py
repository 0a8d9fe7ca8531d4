"""Fixed-window rate limits: Redis when configured (shared by replicas), else in-process."""

from __future__ import annotations

import time
from typing import Protocol

from redis.asyncio import Redis

from services.kit.errors import RateLimited


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window: int) -> int:
        """Count a hit; returns 0 when allowed, else the seconds until the window resets."""
        ...


class MemoryRateLimiter:
    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int]] = {}

    async def hit(self, key: str, limit: int, window: int) -> int:
        now = time.time()
        start = int(now // window) * window
        current_start, count = self._windows.get(key, (start, 0))
        if current_start != start:
            count = 0
            if len(self._windows) > 100_000:
                self._windows = {k: v for k, v in self._windows.items() if v[0] == start}
        count += 1
        self._windows[key] = (start, count)
        if count > limit:
            return max(1, int(start + window - now + 0.999))
        return 0


_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('TTL', KEYS[1])}
"""


class RedisRateLimiter:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._script = redis.register_script(_HIT)

    async def hit(self, key: str, limit: int, window: int) -> int:
        now = time.time()
        start = int(now // window) * window
        count, _ttl = await self._script(keys=[f"{self.prefix}:rl:{key}:{start}"], args=[window])
        if int(count) > limit:
            # Until this window ends (the key's TTL runs a whole window from its first hit).
            return max(1, int(start + window - now + 0.999))
        return 0


async def enforce(limiter: RateLimiter, key: str, limit: int, window: int = 60) -> None:
    """Raise 429 with ``Retry-After`` when ``key`` is over ``limit`` in this window."""
    retry_after = await limiter.hit(key, limit, window)
    if retry_after:
        raise RateLimited(retry_after, f"At most {limit} requests per {window} s.")
