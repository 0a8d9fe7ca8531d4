"""What the services of one process share: the bus, Redis, the deny-list, rate limits, keys.

Embedded mode builds one runtime and hands it to all four service apps, so an event
published by membership reaches marketplace in-process and a token revoked by
membership is refused by messaging at once. A service running alone builds its own.
Either way the same code runs; only URLs in the settings differ.
"""

from __future__ import annotations

import logging
from typing import Any

from joserfc.jwk import KeySet
from redis.asyncio import BlockingConnectionPool, Redis

from services.kit.auth import (
    DenyList,
    HttpJwksSource,
    JwksSource,
    MemoryDenyList,
    RedisDenyList,
    TokenVerifier,
)
from services.kit.bus import Bus, InProcessBus, RedisStreamsBus
from services.kit.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from services.kit.settings import Settings

log = logging.getLogger("onecluster.runtime")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: Redis | None = None
        self.bus: Bus = InProcessBus()
        self.denylist: DenyList = MemoryDenyList()
        self.rate_limiter: RateLimiter = MemoryRateLimiter()
        self.local_jwks: JwksSource | None = None
        self._http_jwks = HttpJwksSource(settings.jwks_url) if settings.jwks_url else None
        self.draining = False
        self._users = 0
        if settings.redis_url:
            # A blocking pool: a burst of more concurrent requests than connections
            # waits for one (up to 5 s) instead of failing at once.
            pool = BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.redis_pool_size,
                timeout=5,
                socket_timeout=5,
                socket_connect_timeout=5,
                health_check_interval=15,
            )
            self.redis = Redis(connection_pool=pool)
            prefix = settings.redis_prefix
            self.bus = RedisStreamsBus(self.redis, prefix=prefix)
            self.denylist = RedisDenyList(self.redis, prefix)
            self.rate_limiter = RedisRateLimiter(self.redis, prefix)

    async def key_set(self, *, refresh: bool = False) -> KeySet:
        """The JWKS: in-process when this process holds the key store, else over HTTP."""
        if self.local_jwks is not None:
            return await self.local_jwks.key_set(refresh=refresh)
        if self._http_jwks is not None:
            return await self._http_jwks.key_set(refresh=refresh)
        raise RuntimeError("no JWKS: run membership in this process or set ONECLUSTER_JWKS_URL")

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(
            issuer=self.settings.issuer,
            audience=self.settings.token_audience,
            jwks=self,
            denylist=self.denylist,
        )

    async def acquire(self) -> None:
        self._users += 1
        if self._users == 1:
            await self.bus.start()

    async def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            await self.bus.stop()
            if self.redis is not None:
                await self.redis.aclose(close_connection_pool=True)

    async def redis_ping(self) -> Any:
        if self.redis is None:
            return None
        return await self.redis.ping()
