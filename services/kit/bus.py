"""The event bus: in-process in embedded mode, Redis Streams in distributed mode.

Both deliver each published envelope at least once to every subscribed consumer group.
Handlers must be idempotent (see :func:`services.kit.outbox.consume_once`).

*In-process*: ``publish`` awaits every matching handler and raises if one fails, so the
outbox relay keeps the event unsent and retries it.

*Redis Streams*: one stream per producing service (``<prefix>:events:<service>``); each
consuming service is a consumer group, each replica a consumer in it. An entry is
acknowledged only after its handler returned; entries left pending by a crashed replica
are reclaimed with ``XAUTOCLAIM`` once idle for ``claim_idle_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from api.events import Envelope
from services.kit.telemetry import CONSUMER_LAG, CONSUMER_PENDING

log = logging.getLogger("onecluster.bus")
Handler = Callable[[Envelope], Awaitable[None]]


class BusUnavailable(Exception):
    """The bus could not take the event at all (its broker is unreachable).

    Unlike a consumer's failure this says nothing about the event, so the outbox keeps
    retrying it for as long as the outage lasts instead of counting it towards giving up.
    """


class Bus(Protocol):
    async def publish(self, envelope: Envelope) -> None: ...

    def subscribe(
        self, group: str, handler: Handler, *, sources: Iterable[str], types: Iterable[str] = ()
    ) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


LAG_REPORT_INTERVAL = 15.0
"""Seconds between two ``XINFO GROUPS`` reads that set the consumer-lag gauges."""


@dataclass
class _Subscription:
    group: str
    handler: Handler
    sources: frozenset[str]
    types: frozenset[str] = field(default_factory=frozenset)
    lag_reported_at: float = float("-inf")

    def wants(self, envelope: Envelope) -> bool:
        return envelope.source in self.sources and (not self.types or envelope.type in self.types)


class InProcessBus:
    """Delivers by calling the handlers in the publishing process."""

    def __init__(self) -> None:
        self.subscriptions: list[_Subscription] = []

    def subscribe(
        self, group: str, handler: Handler, *, sources: Iterable[str], types: Iterable[str] = ()
    ) -> None:
        self.subscriptions.append(
            _Subscription(group, handler, frozenset(sources), frozenset(types))
        )

    async def publish(self, envelope: Envelope) -> None:
        failures = []
        for sub in self.subscriptions:
            if sub.wants(envelope):
                try:
                    await sub.handler(envelope)
                except Exception as exc:
                    log.exception("consumer %s failed on %s", sub.group, envelope.id)
                    failures.append(exc)
        if failures:
            raise failures[0]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def stream_name(prefix: str, source: str) -> str:
    return f"{prefix}:events:{source}"


class RedisStreamsBus:
    """Publishes to Redis Streams and runs one reader task per consumer group."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        maxlen: int = 1_000_000,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        consumer_name: str | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.maxlen = maxlen
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.consumer_name = consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.subscriptions: list[_Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._running = False

    def subscribe(
        self, group: str, handler: Handler, *, sources: Iterable[str], types: Iterable[str] = ()
    ) -> None:
        sub = _Subscription(group, handler, frozenset(sources), frozenset(types))
        self.subscriptions.append(sub)
        if self._running:
            self._spawn(sub)

    def _spawn(self, sub: _Subscription) -> None:
        self._tasks.append(asyncio.create_task(self._run(sub), name=f"bus:{sub.group}"))

    async def publish(self, envelope: Envelope) -> None:
        try:
            await self.redis.xadd(
                stream_name(self.prefix, envelope.source),
                {"envelope": envelope.model_dump_json()},
                maxlen=self.maxlen,
                approximate=True,
            )
        except (RedisError, OSError) as exc:
            raise BusUnavailable(f"Redis: {type(exc).__name__}: {exc}") from exc

    async def start(self) -> None:
        self._stopping.clear()
        self._running = True
        for sub in self.subscriptions:
            self._spawn(sub)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop reading: each reader finishes (and acknowledges) the entry in hand, then
        ends; readers still busy after ``grace`` seconds are cancelled, and what they held
        stays pending for another replica's ``XAUTOCLAIM``."""
        self._running = False
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace + self.block_ms / 1000)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _ensure_groups(self, sub: _Subscription) -> None:
        for source in sub.sources:
            try:
                await self.redis.xgroup_create(
                    stream_name(self.prefix, source), sub.group, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _run(self, sub: _Subscription) -> None:
        backoff = 0.1
        streams: dict[Any, Any] = {stream_name(self.prefix, s): ">" for s in sub.sources}
        ready = False
        while not self._stopping.is_set():
            try:
                if not ready:
                    await self._ensure_groups(sub)
                    ready = True
                    await self._reclaim(sub)
                replies: Any = await self.redis.xreadgroup(
                    sub.group, self.consumer_name, streams, count=100, block=self.block_ms
                )
                for stream, entries in replies or []:
                    await self._handle_entries(sub, stream, entries)
                if self._stopping.is_set():
                    break
                await self._reclaim(sub)
                await self._report_lag(sub)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, or anything else: never end the reader
                ready = False
                log.warning("bus reader %s: %r; retrying in %.1fs", sub.group, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _reclaim(self, sub: _Subscription) -> None:
        for stream in (stream_name(self.prefix, s) for s in sub.sources):
            result = await self.redis.xautoclaim(
                stream, sub.group, self.consumer_name, self.claim_idle_ms, "0-0", count=100
            )
            entries = result[1] if result else []
            if entries:
                await self._handle_entries(sub, stream, entries)

    async def _report_lag(self, sub: _Subscription) -> None:
        """Set the consumer-lag gauges from ``XINFO GROUPS``, at most every 15 seconds."""
        now = asyncio.get_running_loop().time()
        if now - sub.lag_reported_at < LAG_REPORT_INTERVAL:
            return
        sub.lag_reported_at = now
        for source in sub.sources:
            stream = stream_name(self.prefix, source)
            for group in await self.redis.xinfo_groups(stream):
                name = group.get("name")
                if isinstance(name, bytes):
                    name = name.decode()
                if name != sub.group:
                    continue
                lag = group.get("lag")
                CONSUMER_LAG.labels(sub.group, source).set(lag if lag is not None else -1)
                CONSUMER_PENDING.labels(sub.group, source).set(group.get("pending") or 0)

    async def _handle_entries(self, sub: _Subscription, stream: Any, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            if self._stopping.is_set():
                return  # the rest stays pending; XAUTOCLAIM hands it to another replica
            if not fields:  # deleted by MAXLEN trimming while pending
                await self.redis.xack(stream, sub.group, entry_id)
                continue
            raw = fields.get(b"envelope") or fields.get("envelope")
            try:
                envelope = Envelope.model_validate_json(raw)
            except Exception:
                # No retry can make junk readable; acknowledge it rather than let it end
                # this reader (and leave the group without a consumer).
                log.error(
                    "consumer %s: entry %r on %r is not an envelope", sub.group, entry_id, stream
                )
                await self.redis.xack(stream, sub.group, entry_id)
                continue
            if sub.wants(envelope):
                try:
                    await sub.handler(envelope)
                except Exception:
                    log.exception("consumer %s failed on %s; left pending", sub.group, envelope.id)
                    continue
            await self.redis.xack(stream, sub.group, entry_id)
