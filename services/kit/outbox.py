"""Transactional outbox, its relay, and idempotent consumption.

A domain function calls :func:`emit` inside the request's transaction: the event is a row
in the service's ``outbox`` table, so it exists exactly when the change commits. The
:class:`OutboxRelay` publishes unsent rows to the bus and marks them sent; a commit wakes
it, and a poll catches anything a wake missed (or that a crashed replica left). Several
replicas may relay at once: on PostgreSQL rows are taken with ``FOR UPDATE SKIP LOCKED``.
Delivery is at least once; consumers deduplicate with :func:`consume_once`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import JSON, Field, SQLModel

from api.events import Envelope, EventPayload
from services.kit.bus import Bus, BusUnavailable
from services.kit.db import Database, UTCDateTime, utcnow
from services.kit.ids import new_id
from services.kit.telemetry import (
    OUTBOX_BACKLOG,
    OUTBOX_DEAD_LETTERED,
    OUTBOX_OLDEST_AGE,
    OUTBOX_PUBLISHED,
)

log = logging.getLogger("onecluster.outbox")
MAX_ATTEMPTS = 20
BACKLOG_GAUGE_INTERVAL = 15.0
"""Seconds between two refreshes of the outbox backlog and oldest-age gauges."""


class OutboxFields(SQLModel):
    """Columns of every service's ``outbox`` table."""

    id: str = Field(primary_key=True, max_length=40)
    type: str = Field(max_length=80)
    version: int = 1
    occurred_at: datetime = Field(sa_type=UTCDateTime)
    data: dict[str, Any] = Field(sa_type=JSON)
    published_at: datetime | None = Field(default=None, index=True, sa_type=UTCDateTime)
    attempts: int = 0
    last_error: str | None = Field(default=None, max_length=500)


class ProcessedEventFields(SQLModel):
    """Columns of every consuming service's ``processed_events`` table."""

    consumer: str = Field(primary_key=True, max_length=80)
    event_id: str = Field(primary_key=True, max_length=40)
    handled_at: datetime = Field(sa_type=UTCDateTime)


def emit(session: AsyncSession, model: type[OutboxFields], payload: EventPayload) -> str:
    """Add ``payload`` to the outbox in the session's transaction; returns the event id."""
    event_id = new_id("evt")
    session.add(
        model(
            id=event_id,
            type=payload.event_type,
            version=payload.event_version,
            occurred_at=utcnow(),
            data=payload.model_dump(mode="json"),
        )
    )
    session.info["outbox_dirty"] = True
    return event_id


@dataclass
class _Outcome:
    """What publishing a batch did: the ids sent, and the first failure if any
    (event id, error, whether it counts as an attempt of the event)."""

    published: set[str] = field(default_factory=set)
    failure: tuple[str, str, bool] | None = None


class OutboxRelay:
    """Moves committed outbox rows onto the bus."""

    def __init__(
        self,
        db: Database,
        model: type[OutboxFields],
        bus: Bus,
        *,
        source: str,
        poll_interval: float = 1.0,
        batch_size: int = 200,
    ) -> None:
        self.db = db
        self.model = model
        self.bus = bus
        self.source = source
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._gauged_at = float("-inf")
        self._draining = asyncio.Lock()
        db.after_commit.append(self._after_commit)

    def _after_commit(self, session: Any) -> None:
        if session.info.pop("outbox_dirty", False):
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stopping = False
        self._gauged_at = float("-inf")
        self._wake.set()  # publish what was left unsent before this start at once
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay:{self.source}")

    async def stop(self, grace: float = 5.0) -> None:
        if self._task is None:
            return
        # Let a batch in flight finish: cancelling it mid-publish rolls back rows that
        # consumers already got, and they would get them again. Cancel only after
        # ``grace``. A flag, not a cancel alone, ends the loop: on Python 3.11
        # ``wait_for`` swallows a cancellation that races with the wake-up it waits
        # for (a commit just before shutdown), and the loop would wait on forever.
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=grace)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A last pass so that what was committed before shutdown is not left waiting.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain_once(), timeout=2)

    async def _run(self) -> None:
        backoff = self.poll_interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            try:
                while await self.drain_once() == self.batch_size and not self._stopping:
                    pass
                backoff = self.poll_interval
                now = asyncio.get_running_loop().time()
                if now - self._gauged_at >= BACKLOG_GAUGE_INTERVAL:
                    self._gauged_at = now
                    await self.backlog()  # sets the backlog and oldest-age gauges
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay %s: %s", self.source, exc)
                backoff = min(max(backoff * 2, 0.2), 10.0)

    async def drain_once(self) -> int:
        """Publish one batch of unsent events; returns how many rows it handled.

        On PostgreSQL the batch is taken ``FOR UPDATE SKIP LOCKED`` and marked in the
        same transaction, so replicas relaying the same outbox never send a row
        concurrently. On SQLite (one process) the batch is read without the write lock,
        published, then marked in a short write transaction: the in-process bus runs
        subscribers while publishing, and a subscriber of the same service must be able
        to write to the same database file meanwhile.
        """
        async with self._draining:  # one batch at a time per relay
            return await self._drain()

    async def _drain(self) -> int:
        if self.db.postgres:
            async with self.db.session_scope() as session:
                rows = await self._unsent(session, lock=True)
                outcome = await self._publish(rows)
                self._record(rows, outcome)
        else:
            async with self.db.read_scope() as session:
                rows = await self._unsent(session, lock=False)
            outcome = await self._publish(rows)
            if rows:
                async with self.db.session_scope() as session:
                    fresh = [await session.get(self.model, row.id) for row in rows]
                    self._record([r for r in fresh if r is not None], outcome)
        OUTBOX_PUBLISHED.labels(self.source).inc(len(outcome.published))
        if outcome.failure is not None:
            raise RuntimeError(f"publishing stopped after {len(outcome.published)} events")
        return len(rows)

    async def _unsent(self, session: AsyncSession, *, lock: bool) -> list[OutboxFields]:
        model = self.model
        query = (
            sa.select(model)
            .where(model.published_at.is_(None))  # type: ignore[union-attr]
            .order_by(model.id)
            .limit(self.batch_size)
        )
        if lock:
            query = query.with_for_update(skip_locked=True)
        return list((await session.execute(query)).scalars().all())

    async def _publish(self, rows: Sequence[OutboxFields]) -> _Outcome:
        """Publish ``rows`` in order, stopping at the first failure."""
        outcome = _Outcome()
        for row in rows:
            envelope = Envelope(
                id=row.id,
                type=row.type,
                version=row.version,
                source=self.source,
                occurred_at=row.occurred_at,
                data=row.data,
            )
            try:
                await self.bus.publish(envelope)
            except BusUnavailable as exc:
                # The bus itself is down (Redis unreachable): nothing is wrong with this
                # event, so the attempt does not count towards giving it up.
                outcome.failure = (row.id, str(exc), False)
                break
            except Exception as exc:
                outcome.failure = (row.id, str(exc), True)
                break
            outcome.published.add(row.id)
        return outcome

    def _record(self, rows: Sequence[OutboxFields], outcome: _Outcome) -> None:
        now = utcnow()
        for row in rows:
            if row.id in outcome.published:
                row.published_at = now
            elif outcome.failure is not None and outcome.failure[0] == row.id:
                _, error, counts = outcome.failure
                row.last_error = error[:500]
                if counts:
                    row.attempts += 1
                    if row.attempts >= MAX_ATTEMPTS:
                        # Set aside so that one poisoned event does not hold back the
                        # rest; the row keeps the reason and the metric counts it.
                        log.error("dead-lettering event %s after %d attempts", row.id, row.attempts)
                        row.last_error = f"dead-lettered: {row.last_error}"[:500]
                        row.published_at = now
                        OUTBOX_DEAD_LETTERED.labels(self.source).inc()

    async def backlog(self) -> tuple[int, float]:
        """Unsent events and the age in seconds of the oldest one."""
        model = self.model
        async with self.db.read_scope() as session:  # never the SQLite write lock
            count, oldest = (
                await session.execute(
                    sa.select(sa.func.count(), sa.func.min(model.occurred_at)).where(
                        model.published_at.is_(None)  # type: ignore[union-attr]
                    )
                )
            ).one()
        age = 0.0
        if oldest is not None:
            if oldest.tzinfo is None:  # min() over SQLite text loses the type
                oldest = datetime.fromisoformat(str(oldest)).replace(tzinfo=UTC)
            age = (utcnow() - oldest).total_seconds()
        OUTBOX_BACKLOG.labels(self.source).set(count)
        OUTBOX_OLDEST_AGE.labels(self.source).set(age)
        return int(count), age


async def consume_once(
    db: Database,
    model: type[ProcessedEventFields],
    consumer: str,
    envelope: Envelope,
    apply: Callable[[AsyncSession, Envelope], Awaitable[None]],
) -> bool:
    """Apply ``envelope`` once per consumer; returns False when it was already handled.

    The processed-event row and the consumer's changes commit together, so a crash
    between them cannot record an event as handled without its effect (or the reverse).
    """
    try:
        async with db.session_scope() as session:
            seen = await session.get(model, (consumer, envelope.id))
            if seen is not None:
                return False
            session.add(model(consumer=consumer, event_id=envelope.id, handled_at=utcnow()))
            try:
                await session.flush()
            except IntegrityError:
                raise _AlreadyHandled from None  # a concurrent delivery of the same event won
            # An IntegrityError of the consumer's own change propagates: it is a failure,
            # and the bus must deliver the event again, not acknowledge it as a duplicate.
            await apply(session, envelope)
    except _AlreadyHandled:
        return False
    return True


class _AlreadyHandled(Exception):
    pass
