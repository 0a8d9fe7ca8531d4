"""The Redis Streams bus: consumer groups, reclaiming stuck entries, deduplication.

Every test runs against the real Redis of the run (skipped without one), each under a key
prefix of its own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import REDIS_URL, requires_redis
from kit_support import (
    SERVICE,
    Applied,
    KitProcessedEvent,
    count_rows,
    database_url_for,
    open_database,
    wait_for,
)
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from api.events import Envelope
from services.kit.bus import RedisStreamsBus, stream_name
from services.kit.db import utcnow
from services.kit.ids import new_id
from services.kit.outbox import consume_once

pytestmark = requires_redis
GROUP = "kit-readers"


def envelope(n: int = 0) -> Envelope:
    return Envelope(
        id=new_id("evt"),
        type="firm.member_removed",
        source=SERVICE,
        occurred_at=utcnow(),
        data={"firm_id": f"firm_{n}", "user_id": f"user_{n}"},
    )


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    assert REDIS_URL
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def buses(redis_prefix: str) -> AsyncIterator[Callable[..., RedisStreamsBus]]:
    """Makes buses, each on its own connection pool; stops them all at the end."""
    made: list[RedisStreamsBus] = []

    def make(consumer_name: str, **kw: object) -> RedisStreamsBus:
        assert REDIS_URL
        kw.setdefault("block_ms", 100)
        bus = RedisStreamsBus(
            Redis.from_url(REDIS_URL),
            prefix=redis_prefix,
            consumer_name=consumer_name,
            **kw,  # type: ignore[arg-type]
        )
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.stop()
        await bus.redis.aclose()


class Sink:
    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, env: Envelope) -> None:
        self.ids.append(env.id)

    def has(self, *ids: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return set(ids) <= set(self.ids)

        return check


async def pending(redis: Redis, prefix: str, group: str = GROUP) -> int:
    info = await redis.xpending(stream_name(prefix, SERVICE), group)
    return int(info["pending"])


def settled(redis: Redis, prefix: str, group: str = GROUP) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await pending(redis, prefix, group) == 0

    return check


async def test_each_group_gets_every_event_once_across_its_consumers(
    buses: Callable[..., RedisStreamsBus], redis: Redis, redis_prefix: str
) -> None:
    first, second, auditor = Sink(), Sink(), Sink()
    replica_a, replica_b = buses("replica-a"), buses("replica-b")
    replica_a.subscribe(GROUP, first, sources=[SERVICE])
    replica_b.subscribe(GROUP, second, sources=[SERVICE])
    other_group = buses("auditor-1")
    other_group.subscribe("kit-auditors", auditor, sources=[SERVICE])
    for bus in (replica_a, replica_b, other_group):
        await bus.start()

    producer = buses("producer")
    sent = [envelope(i) for i in range(60)]
    for env in sent:
        await producer.publish(env)
    ids = [e.id for e in sent]

    async def group_has_all() -> bool:
        return set(ids) <= set(first.ids) | set(second.ids)

    await wait_for(group_has_all, what="the group to receive everything")
    await wait_for(auditor.has(*ids), what="the second group to receive everything")
    await wait_for(settled(redis, redis_prefix), what="acknowledgements")
    await wait_for(settled(redis, redis_prefix, "kit-auditors"), what="acknowledgements")

    shared = Counter(first.ids + second.ids)
    assert set(shared) == set(ids)
    assert set(shared.values()) == {1}  # once per group, never to both replicas
    assert Counter(auditor.ids) == Counter(ids)  # and the other group got its own copy
    assert auditor.ids == ids  # one consumer reads the stream in order


async def test_type_filter_acknowledges_what_it_skips(
    buses: Callable[..., RedisStreamsBus], redis: Redis, redis_prefix: str
) -> None:
    sink = Sink()
    bus = buses("typed")
    bus.subscribe(GROUP, sink, sources=[SERVICE], types=["firm.registered"])
    await bus.start()
    skipped, wanted = envelope(1), envelope(2)
    wanted = wanted.model_copy(update={"type": "firm.registered"})
    await bus.publish(skipped)
    await bus.publish(wanted)
    await wait_for(sink.has(wanted.id), what="the wanted event")
    await wait_for(settled(redis, redis_prefix), what="acknowledgements")
    assert sink.ids == [wanted.id]


async def test_entry_whose_handler_failed_is_reclaimed_by_another_consumer(
    buses: Callable[..., RedisStreamsBus], redis: Redis, redis_prefix: str
) -> None:
    failures: list[str] = []

    async def broken(env: Envelope) -> None:
        failures.append(env.id)
        raise RuntimeError("this replica cannot handle it")

    # Replica A takes the entry and fails; it would only retry it itself after a minute.
    replica_a = buses("replica-a", claim_idle_ms=60_000)
    replica_a.subscribe(GROUP, broken, sources=[SERVICE])
    await replica_a.start()
    env = envelope()
    await replica_a.publish(env)

    async def failed_once() -> bool:
        return env.id in failures

    await wait_for(failed_once, what="replica A's failure")
    assert await pending(redis, redis_prefix) == 1  # not acknowledged

    # Replica B claims it once it has been idle for 100 ms.
    sink = Sink()
    replica_b = buses("replica-b", claim_idle_ms=100)
    replica_b.subscribe(GROUP, sink, sources=[SERVICE])
    await replica_b.start()
    await wait_for(sink.has(env.id), what="replica B to reclaim the entry")
    await wait_for(settled(redis, redis_prefix), what="acknowledgement")
    assert sink.ids == [env.id]
    assert failures == [env.id]


async def test_entry_of_a_consumer_that_died_before_acking_is_reclaimed(
    buses: Callable[..., RedisStreamsBus], redis: Redis, redis_prefix: str
) -> None:
    taken = asyncio.Event()

    async def hangs(env: Envelope) -> None:
        taken.set()
        await asyncio.Event().wait()  # never returns: the replica dies holding the entry

    replica_a = buses("replica-a", claim_idle_ms=60_000)
    replica_a.subscribe(GROUP, hangs, sources=[SERVICE])
    await replica_a.start()
    env = envelope()
    await replica_a.publish(env)
    await asyncio.wait_for(taken.wait(), timeout=10)
    await replica_a.stop()  # dies: the entry stays pending on replica-a

    detail = await redis.xpending_range(
        stream_name(redis_prefix, SERVICE), GROUP, min="-", max="+", count=10
    )
    assert [d["consumer"] for d in detail] == [b"replica-a"]

    sink = Sink()
    replica_b = buses("replica-b", claim_idle_ms=100)
    replica_b.subscribe(GROUP, sink, sources=[SERVICE])
    await replica_b.start()
    await wait_for(sink.has(env.id), what="replica B to reclaim the entry")
    await wait_for(settled(redis, redis_prefix), what="acknowledgement")
    assert sink.ids == [env.id]


async def test_a_malformed_entry_does_not_stop_the_consumer(
    buses: Callable[..., RedisStreamsBus], redis: Redis, redis_prefix: str
) -> None:
    """Someone (an old producer, a hand-run XADD) writes junk to the stream: the reader
    must skip it, not die and leave the group without a consumer."""
    sink = Sink()
    bus = buses("reader")
    bus.subscribe(GROUP, sink, sources=[SERVICE])
    await bus.start()
    stream = stream_name(redis_prefix, SERVICE)
    await redis.xadd(stream, {"envelope": b"{not json"})
    await redis.xadd(stream, {"something": b"else"})
    good = envelope()
    await bus.publish(good)
    await wait_for(sink.has(good.id), what="the event after the junk")
    await wait_for(settled(redis, redis_prefix), what="the junk to be acknowledged")
    assert sink.ids == [good.id]


async def test_consumer_deduplicates_redelivered_envelopes(
    buses: Callable[..., RedisStreamsBus],
    redis: Redis,
    redis_prefix: str,
    tmp_path: Path,
    database_url: str | None,
) -> None:
    """At-least-once delivery (a relay that published twice, a reclaimed entry) meets
    ``consume_once``: the effect is applied once."""
    async with open_database(database_url_for(tmp_path, database_url)) as db:
        calls: list[str] = []

        async def apply(session: AsyncSession, env: Envelope) -> None:
            session.add(Applied(consumer="reader", event_id=env.id))

        async def handler(env: Envelope) -> None:
            calls.append(env.id)
            await consume_once(db, KitProcessedEvent, "reader", env, apply)

        bus = buses("reader")
        bus.subscribe(GROUP, handler, sources=[SERVICE])
        await bus.start()
        env = envelope()
        for _ in range(3):  # the same envelope on the stream three times
            await bus.publish(env)
        other = envelope(1)
        await bus.publish(other)

        async def all_seen() -> bool:
            return len(calls) == 4

        await wait_for(all_seen, what="four deliveries")
        await wait_for(settled(redis, redis_prefix), what="acknowledgements")
        assert await count_rows(db, Applied) == 2
        assert await count_rows(db, Applied, col(Applied.event_id) == env.id) == 1
        assert await count_rows(db, KitProcessedEvent) == 2


async def test_stop_and_start_again_resumes_where_the_group_was(
    buses: Callable[..., RedisStreamsBus], redis: Redis, redis_prefix: str
) -> None:
    sink = Sink()
    bus = buses("reader")
    bus.subscribe(GROUP, sink, sources=[SERVICE])
    await bus.start()
    first = envelope(1)
    await bus.publish(first)
    await wait_for(sink.has(first.id), what="first event")
    await wait_for(settled(redis, redis_prefix), what="acknowledgement")
    await bus.stop()
    second = envelope(2)
    await bus.publish(second)  # published while nobody reads
    await bus.start()
    await wait_for(sink.has(second.id), what="the event published while stopped")
    assert sink.ids == [first.id, second.id]


async def test_stop_finishes_and_acknowledges_the_entry_in_hand(
    buses: Callable[..., RedisStreamsBus], redis: Redis, redis_prefix: str
) -> None:
    started = asyncio.Event()
    finished: list[str] = []

    async def slow(env: Envelope) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(env.id)

    bus = buses("draining")
    bus.subscribe(GROUP, slow, sources=[SERVICE])
    await bus.start()
    sent = envelope()
    await bus.publish(sent)
    await asyncio.wait_for(started.wait(), 10)
    await bus.stop()
    assert finished == [sent.id]  # not cancelled half-way
    pending = await redis.xpending(stream_name(redis_prefix, SERVICE), GROUP)
    assert pending["pending"] == 0  # and acknowledged before the reader ended


async def test_consumer_lag_gauges_follow_the_group(
    buses: Callable[..., RedisStreamsBus], redis_prefix: str
) -> None:
    from services.kit.telemetry import CONSUMER_LAG, CONSUMER_PENDING

    seen: list[str] = []

    async def record(env: Envelope) -> None:
        seen.append(env.id)

    bus = buses("gauged")
    bus.subscribe(GROUP, record, sources=[SERVICE])
    await bus.start()
    for n in range(3):
        await bus.publish(envelope(n))

    async def all_seen() -> bool:
        return len(seen) == 3

    await wait_for(all_seen, what="three events handled")
    sub = bus.subscriptions[0]
    CONSUMER_LAG.labels(GROUP, SERVICE).set(99)
    sub.lag_reported_at = float("-inf")
    await bus._report_lag(sub)
    assert CONSUMER_LAG.labels(GROUP, SERVICE)._value.get() == 0
    assert CONSUMER_PENDING.labels(GROUP, SERVICE)._value.get() == 0
