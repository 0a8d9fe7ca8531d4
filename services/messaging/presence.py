"""Who is online in a cluster: one expiring mark per socket, per cluster of its channels.

A socket that subscribes to a channel marks its user and firm present in the channel's
cluster until it closes, unsubscribes from its last channel there, or stops being
refreshed: the hub refreshes every open socket's marks each third of
``messaging_presence_ttl`` (the server's heartbeat; uvicorn's WebSocket pings end dead
connections), and a client ``ping`` frame refreshes them at once. A replica that dies
leaves marks that expire by themselves after the TTL.

Distributed mode keeps one sorted set per cluster in Redis
(``<prefix>:messaging:presence:<cluster>``): the member is ``user|firm|socket``, the
score the time it expires; the key itself expires after two TTLs without a write.
Embedded mode keeps the same in a dict. A user is present while any of their sockets
is; the read model decides, at read time, that the user's firm is still in the cluster.
"""

from __future__ import annotations

import time
from typing import Protocol

from redis.asyncio import Redis


def entry(user_id: str, firm_id: str, socket_id: str) -> str:
    return f"{user_id}|{firm_id}|{socket_id}"


def who(entry_: str) -> tuple[str, str]:
    user_id, firm_id, _ = entry_.split("|", 2)
    return user_id, firm_id


class PresenceStore(Protocol):
    async def mark(self, cluster_id: str, entries: list[str], ttl: float) -> None: ...

    async def drop(self, cluster_id: str, entry_: str) -> None: ...

    async def live(self, cluster_id: str) -> list[str]:
        """Unexpired entries (expired ones are removed on the way)."""
        ...


class MemoryPresence:
    """Embedded mode: this process is the whole platform."""

    def __init__(self) -> None:
        self.clusters: dict[str, dict[str, float]] = {}

    async def mark(self, cluster_id: str, entries: list[str], ttl: float) -> None:
        until = time.time() + ttl
        marks = self.clusters.setdefault(cluster_id, {})
        for item in entries:
            marks[item] = until

    async def drop(self, cluster_id: str, entry_: str) -> None:
        marks = self.clusters.get(cluster_id, {})
        marks.pop(entry_, None)
        if not marks:
            self.clusters.pop(cluster_id, None)

    async def live(self, cluster_id: str) -> list[str]:
        now = time.time()
        marks = self.clusters.get(cluster_id, {})
        for item in [k for k, until in marks.items() if until <= now]:
            del marks[item]
        return sorted(marks)


class RedisPresence:
    """Distributed mode: every replica's sockets in one sorted set per cluster."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:messaging:presence:"

    async def mark(self, cluster_id: str, entries: list[str], ttl: float) -> None:
        key = self.prefix + cluster_id
        until = time.time() + ttl
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, dict.fromkeys(entries, until))
            pipe.expire(key, max(1, int(ttl * 2)))
            await pipe.execute()

    async def drop(self, cluster_id: str, entry_: str) -> None:
        await self.redis.zrem(self.prefix + cluster_id, entry_)

    async def live(self, cluster_id: str) -> list[str]:
        key, now = self.prefix + cluster_id, time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zrangebyscore(key, now, "+inf")
            _, rows = await pipe.execute()
        return sorted(r.decode() if isinstance(r, bytes) else str(r) for r in rows)


def present(entries: list[str]) -> list[tuple[str, str]]:
    """The distinct (user, firm) pairs of live entries."""
    return sorted({who(e) for e in entries})
