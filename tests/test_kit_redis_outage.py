"""No event is lost while Redis is down (distributed mode).

The relay's Redis client talks to the real Redis through a TCP proxy owned by the test:
stopping the proxy (listener and every open connection) is Redis going away, starting it
on the same port is Redis coming back. A consumer group reads the stream directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import REDIS_URL, requires_redis
from kit_support import (
    SERVICE,
    KitOutbox,
    TcpProxy,
    database_url_for,
    open_database,
    outbox_rows,
    wait_for,
)
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from api.events import Envelope, FirmRegisteredV1
from services.kit.bus import RedisStreamsBus, stream_name
from services.kit.db import Database
from services.kit.ids import new_id
from services.kit.outbox import MAX_ATTEMPTS, OutboxRelay, emit

pytestmark = requires_redis
_names = itertools.count()


@pytest.fixture
async def db(tmp_path: Path, database_url: str | None) -> AsyncIterator[Database]:
    async with open_database(database_url_for(tmp_path, database_url)) as database:
        yield database


class Stack:
    """The pieces of one outage scenario, torn down in reverse by their own handles."""

    def __init__(self, prefix: str) -> None:
        assert REDIS_URL
        target = urlsplit(REDIS_URL)
        self.db_index = int((target.path or "/0").lstrip("/") or 0)
        self.proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
        self.prefix = prefix
        self.received: list[str] = []
        self.url = REDIS_URL
        self.direct = Redis.from_url(REDIS_URL)

    async def __aenter__(self) -> Stack:
        await self.proxy.start()
        # No client-side retries: each relay attempt fails fast while the proxy is down.
        self.via_proxy = Redis(
            host="127.0.0.1",
            port=self.proxy.port,
            db=self.db_index,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )
        self.publisher = RedisStreamsBus(self.via_proxy, prefix=self.prefix)
        self.consumer = RedisStreamsBus(
            Redis.from_url(self.url), prefix=self.prefix, consumer_name="reader-1", block_ms=100
        )
        self.consumer.subscribe("kit-readers", self._handle, sources=[SERVICE])
        await self.consumer.start()
        return self

    async def _handle(self, envelope: Envelope) -> None:
        self.received.append(envelope.id)

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.consumer.redis.aclose()
        await self.via_proxy.aclose()
        await self.proxy.stop()
        await self.direct.aclose()

    def has(self, *ids: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return set(ids) <= set(self.received)

        return check

    async def settled(self) -> bool:
        """Every stream entry was read and acknowledged by the group."""
        pending = await self.direct.xpending(stream_name(self.prefix, SERVICE), "kit-readers")
        return int(pending["pending"]) == 0


async def commit_event(db: Database) -> str:
    async with db.session_scope() as session:
        return emit(
            session,
            KitOutbox,
            FirmRegisteredV1(
                firm_id=new_id("firm"),
                name=f"outage firm {next(_names)}",
                region="CN-NM",
                city="Hohhot",
                actor_type="technology_service_provider",
                industries=["0304"],
            ),
        )


async def test_events_committed_while_redis_is_down_are_delivered_once_after(
    db: Database, redis_prefix: str
) -> None:
    async with Stack(redis_prefix) as stack:
        relay = OutboxRelay(db, KitOutbox, stack.publisher, source=SERVICE, poll_interval=0.1)
        relay.start()
        try:
            before = await commit_event(db)
            await wait_for(stack.has(before), what="delivery while Redis is up")

            await stack.proxy.stop()  # Redis is gone
            during = [await commit_event(db) for _ in range(5)]

            async def relay_has_failed() -> bool:
                rows = {r.id: r for r in await outbox_rows(db)}
                return rows[during[0]].last_error is not None

            await wait_for(relay_has_failed, what="the relay to try and fail")
        finally:
            await relay.stop()

        # A long outage: far more failed passes than the relay's give-up limit.
        for _ in range(MAX_ATTEMPTS + 5):
            with pytest.raises(Exception):  # noqa: B017 - whatever the client raises
                await relay.drain_once()
        rows = {r.id: r for r in await outbox_rows(db)}
        assert all(rows[i].published_at is None for i in during), "an event was given up"
        assert rows[before].published_at is not None
        assert not set(during) & set(stack.received)

        await stack.proxy.start()  # Redis is back, on the same address
        relay.start()
        try:
            await wait_for(stack.has(*during), timeout=30, what="delivery after the outage")
            assert await relay.drain_once() == 0
        finally:
            await relay.stop()
        await wait_for(stack.settled, what="the group to acknowledge everything")

        rows = {r.id: r for r in await outbox_rows(db)}
        assert all(r.published_at is not None for r in rows.values())
        stream = stream_name(redis_prefix, SERVICE)
        assert await stack.direct.xlen(stream) == 1 + len(during)  # each published once
        counts = Counter(stack.received)
        assert set(counts) == {before, *during}
        assert set(counts.values()) == {1}  # each delivered once to the group


async def test_a_relay_started_while_redis_is_down_waits_for_it(
    db: Database, redis_prefix: str
) -> None:
    """Start-up during an outage: events stay in the outbox and go out when Redis does."""
    async with Stack(redis_prefix) as stack:
        await stack.proxy.stop()
        ids = [await commit_event(db) for _ in range(3)]
        relay = OutboxRelay(db, KitOutbox, stack.publisher, source=SERVICE, poll_interval=0.1)
        relay.start()
        try:

            async def attempted() -> bool:
                return any(r.last_error for r in await outbox_rows(db))

            await wait_for(attempted, what="a failed attempt")
            assert all(r.published_at is None for r in await outbox_rows(db))
            await stack.proxy.start()
            await wait_for(stack.has(*ids), timeout=30, what="delivery after the outage")
        finally:
            await relay.stop()
        await wait_for(stack.settled, what="acknowledgements")
        assert sorted(stack.received) == sorted(ids)


async def test_proxy_really_cuts_redis_off(redis_prefix: str) -> None:
    """The outage tests mean something only if the proxy's stop is a real outage."""
    async with Stack(redis_prefix) as stack:
        assert await stack.via_proxy.ping()
        await stack.proxy.stop()
        with pytest.raises(Exception):  # noqa: B017
            await stack.via_proxy.ping()
        await stack.proxy.start()
        with contextlib.suppress(Exception):
            await stack.via_proxy.ping()  # the first call may still meet a dead socket
        assert await asyncio.wait_for(stack.via_proxy.ping(), timeout=10)
