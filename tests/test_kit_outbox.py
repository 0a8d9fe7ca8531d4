"""The transactional outbox, its relay on the in-process bus, and ``consume_once``.

Runs on a SQLite file, or on a fresh PostgreSQL database when the run has one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from kit_support import (
    SERVICE,
    Applied,
    Item,
    KitOutbox,
    KitProcessedEvent,
    count_rows,
    database_url_for,
    open_database,
    outbox_rows,
    wait_for,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from api.events import Envelope, FirmRegisteredV1
from services.kit.bus import InProcessBus
from services.kit.db import Database, utcnow
from services.kit.ids import new_id
from services.kit.outbox import OutboxRelay, consume_once, emit

_names = itertools.count()


def firm_registered(name: str | None = None) -> FirmRegisteredV1:
    return FirmRegisteredV1(
        firm_id=new_id("firm"),
        name=name or f"firm {next(_names)}",
        region="CN-SX",
        city="Taiyuan",
        actor_type="small_micro_enterprise",
        industries=["0304"],
    )


@pytest.fixture
async def db(tmp_path: Path, database_url: str | None) -> AsyncIterator[Database]:
    async with open_database(database_url_for(tmp_path, database_url)) as database:
        yield database


class Recorder:
    """An in-process consumer that records what it was given and can be made to fail."""

    def __init__(self, failures: int = 0) -> None:
        self.envelopes: list[Envelope] = []
        self.calls = 0
        self.failures = failures

    async def __call__(self, envelope: Envelope) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"consumer down (call {self.calls})")
        self.envelopes.append(envelope)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.envelopes]


def relay_with(
    db: Database, recorder: Recorder, poll_interval: float = 30.0
) -> tuple[OutboxRelay, InProcessBus]:
    bus = InProcessBus()
    bus.subscribe("kit-consumer", recorder, sources=[SERVICE])
    return OutboxRelay(db, KitOutbox, bus, source=SERVICE, poll_interval=poll_interval), bus


async def test_rolled_back_event_is_never_stored_nor_published(db: Database) -> None:
    recorder = Recorder()
    relay, _ = relay_with(db, recorder)
    relay.start()
    try:
        with pytest.raises(RuntimeError, match="abort"):
            async with db.session_scope() as session:
                rolled_back = emit(session, KitOutbox, firm_registered("rolled back"))
                await session.flush()  # the row did reach the database inside the transaction
                assert await session.get(KitOutbox, rolled_back) is not None
                raise RuntimeError("abort")
        async with db.session_scope() as session:
            committed = emit(session, KitOutbox, firm_registered("committed"))
        # The poll interval is 30 s: only the commit's wake-up can deliver this in time.
        await wait_for(_has(recorder, committed), what="wake on commit")
        assert await relay.drain_once() == 0  # nothing else is waiting
    finally:
        await relay.stop()
    assert recorder.ids == [committed]
    assert rolled_back not in recorder.ids
    rows = await outbox_rows(db)
    assert [r.id for r in rows] == [committed]
    assert rows[0].published_at is not None
    assert rows[0].attempts == 0


async def test_committed_event_is_published_once_with_its_payload(db: Database) -> None:
    recorder = Recorder()
    relay, _ = relay_with(db, recorder)
    relay.start()
    payload = firm_registered("Shanxi Annotation Co.")
    try:
        async with db.session_scope() as session:
            event_id = emit(session, KitOutbox, payload)
        await wait_for(_has(recorder, event_id), what="delivery")
        # More passes, a poll and a restart must not publish it again.
        assert await relay.drain_once() == 0
        relay.wake()
    finally:
        await relay.stop()
    relay.start()
    await relay.stop()
    assert recorder.ids == [event_id]
    envelope = recorder.envelopes[0]
    assert envelope.source == SERVICE
    assert envelope.type == "firm.registered"
    assert envelope.version == 1
    assert envelope.payload() == payload


async def test_stop_is_prompt_when_a_wake_arrives_just_before_it(db: Database) -> None:
    """A commit right before shutdown wakes the relay as ``stop`` cancels it; ``stop``
    must still return, not wait out a 30 s poll (Python 3.11's ``wait_for`` can swallow
    a cancellation that races with the wake-up it waits for)."""
    relay, _ = relay_with(db, Recorder(), poll_interval=30.0)
    async with db.session_scope() as session:
        emit(session, KitOutbox, firm_registered())  # work for the start-up pass
    drained = asyncio.Event()
    db.after_commit.append(lambda session: drained.set())
    relay.start()
    await asyncio.wait_for(drained.wait(), timeout=10)  # the start-up pass marked it sent
    # The relay is now parked waiting for a wake-up; wake it and stop at once.
    relay.wake()
    await asyncio.wait_for(relay.stop(), timeout=10)


async def test_stop_lets_a_publish_in_flight_finish(db: Database) -> None:
    """Shutdown while a consumer is handling an event: the event is delivered once and
    marked sent, not cut off, rolled back and delivered again by the next relay."""
    entered, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def slow(envelope: Envelope) -> None:
        calls.append(envelope.id)
        entered.set()
        await release.wait()

    bus = InProcessBus()
    bus.subscribe("kit-consumer", slow, sources=[SERVICE])
    relay = OutboxRelay(db, KitOutbox, bus, source=SERVICE, poll_interval=30.0)
    relay.start()
    async with db.session_scope() as session:
        event_id = emit(session, KitOutbox, firm_registered())
    await asyncio.wait_for(entered.wait(), timeout=10)
    stopping = asyncio.create_task(relay.stop())
    await asyncio.sleep(0)  # stop() has begun while the handler still runs
    release.set()
    await asyncio.wait_for(stopping, timeout=10)
    assert calls == [event_id]
    (row,) = await outbox_rows(db)
    assert row.published_at is not None
    relay.start()  # a later relay finds nothing to send again
    await relay.stop()
    assert calls == [event_id]


async def test_events_of_one_transaction_are_published_in_emit_order(db: Database) -> None:
    recorder = Recorder()
    relay, _ = relay_with(db, recorder)
    async with db.session_scope() as session:
        emitted = [emit(session, KitOutbox, firm_registered()) for _ in range(50)]
    while await relay.drain_once():
        pass
    assert recorder.ids == emitted


async def test_relay_publishes_a_backlog_left_before_it_started(db: Database) -> None:
    """Rows committed while no relay ran (a crash, a restart) go out when one starts,
    not one poll interval later."""
    async with db.session_scope() as session:
        left = [emit(session, KitOutbox, firm_registered()) for _ in range(3)]
    recorder = Recorder()
    relay, _ = relay_with(db, recorder, poll_interval=30.0)
    relay.start()
    try:
        await wait_for(_has(recorder, *left), what="backlog at start-up")
    finally:
        await relay.stop()
    assert recorder.ids == left


async def test_failing_consumer_leaves_event_unsent_and_it_is_retried(db: Database) -> None:
    recorder = Recorder(failures=1)
    relay, _ = relay_with(db, recorder)
    async with db.session_scope() as session:
        event_id = emit(session, KitOutbox, firm_registered())
    with pytest.raises(RuntimeError):
        await relay.drain_once()
    (row,) = await outbox_rows(db)
    assert row.published_at is None
    assert row.attempts == 1
    assert row.last_error is not None and "consumer down" in row.last_error
    assert recorder.ids == []
    assert await relay.backlog() == (1, pytest.approx(0.0, abs=60))

    assert await relay.drain_once() == 1
    (row,) = await outbox_rows(db)
    assert row.published_at is not None
    assert recorder.ids == [event_id]
    assert (await relay.backlog())[0] == 0


async def test_running_relay_retries_a_failing_consumer_by_itself(db: Database) -> None:
    recorder = Recorder(failures=2)
    relay, _ = relay_with(db, recorder, poll_interval=0.05)
    relay.start()
    try:
        async with db.session_scope() as session:
            event_id = emit(session, KitOutbox, firm_registered())
        await wait_for(_has(recorder, event_id), what="retried delivery")
    finally:
        await relay.stop()
    assert recorder.calls == 3
    assert recorder.ids == [event_id]
    (row,) = await outbox_rows(db)
    assert row.attempts == 2
    assert row.published_at is not None


async def test_a_failed_event_holds_back_later_ones_to_keep_order(db: Database) -> None:
    recorder = Recorder(failures=1)
    relay, _ = relay_with(db, recorder)
    async with db.session_scope() as session:
        first = emit(session, KitOutbox, firm_registered())
        second = emit(session, KitOutbox, firm_registered())
    with pytest.raises(RuntimeError):
        await relay.drain_once()
    rows = {r.id: r for r in await outbox_rows(db)}
    assert rows[first].published_at is None
    assert rows[second].published_at is None
    assert await relay.drain_once() == 2
    assert recorder.ids == [first, second]


# -- consume_once -------------------------------------------------------------------------


def envelope_of(payload: FirmRegisteredV1) -> Envelope:
    return Envelope(
        id=new_id("evt"),
        type=payload.event_type,
        version=payload.event_version,
        source=SERVICE,
        occurred_at=utcnow(),
        data=payload.model_dump(mode="json"),
    )


async def record_applied(session: AsyncSession, envelope: Envelope) -> None:
    session.add(Applied(consumer="reader", event_id=envelope.id))


async def test_consume_once_applies_a_redelivered_event_once(db: Database) -> None:
    envelope = envelope_of(firm_registered())
    first = await consume_once(db, KitProcessedEvent, "reader", envelope, record_applied)
    again = await consume_once(db, KitProcessedEvent, "reader", envelope, record_applied)
    redelivered = envelope.model_copy()  # what the bus hands over again after a crash
    third = await consume_once(db, KitProcessedEvent, "reader", redelivered, record_applied)
    assert (first, again, third) == (True, False, False)
    assert await count_rows(db, Applied) == 1
    # Each consumer keeps its own record: another consumer still gets the event.
    assert await consume_once(db, KitProcessedEvent, "other", envelope, record_applied)
    assert await count_rows(db, KitProcessedEvent) == 2


async def test_consume_once_records_nothing_when_the_effect_fails(db: Database) -> None:
    envelope = envelope_of(firm_registered())

    async def broken(session: AsyncSession, env: Envelope) -> None:
        await record_applied(session, env)
        await session.flush()
        raise RuntimeError("read model unavailable")

    with pytest.raises(RuntimeError):
        await consume_once(db, KitProcessedEvent, "reader", envelope, broken)
    assert await count_rows(db, KitProcessedEvent) == 0
    assert await count_rows(db, Applied) == 0
    # The next delivery applies it.
    assert await consume_once(db, KitProcessedEvent, "reader", envelope, record_applied)
    assert await count_rows(db, Applied) == 1


async def test_consume_once_does_not_mistake_the_effects_own_conflict_for_a_duplicate(
    db: Database,
) -> None:
    """An IntegrityError raised by the consumer's own change is a failure to report (so
    the bus redelivers), not "already handled" (which would acknowledge a lost event)."""
    async with db.session_scope() as session:
        session.add(Item(id=new_id("item"), name="taken"))
    envelope = envelope_of(firm_registered())

    async def conflicting(session: AsyncSession, env: Envelope) -> None:
        session.add(Item(id=new_id("item"), name="taken"))
        await session.flush()

    with pytest.raises(IntegrityError):
        await consume_once(db, KitProcessedEvent, "reader", envelope, conflicting)
    assert await count_rows(db, KitProcessedEvent) == 0


async def test_concurrent_deliveries_of_one_event_apply_it_once(db: Database) -> None:
    envelope = envelope_of(firm_registered())
    started = asyncio.Event()

    async def slow(session: AsyncSession, env: Envelope) -> None:
        started.set()
        await record_applied(session, env)
        await asyncio.sleep(0)  # let the other delivery run into the same key

    results = await asyncio.gather(
        *(consume_once(db, KitProcessedEvent, "reader", envelope, slow) for _ in range(4))
    )
    assert sorted(results) == [False, False, False, True]
    assert await count_rows(db, Applied) == 1
    rows = await _processed(db)
    assert rows == [("reader", envelope.id)]


async def _processed(db: Database) -> list[tuple[str, str]]:
    async with db.sessionmaker() as session:
        result = await session.execute(
            sa.select(col(KitProcessedEvent.consumer), col(KitProcessedEvent.event_id))
        )
        return [(c, e) for c, e in result.all()]


def _has(recorder: Recorder, *ids: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return set(ids) <= set(recorder.ids)

    return check


async def test_a_poisoned_event_is_dead_lettered_and_the_rest_flow_on(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.kit import outbox as outbox_module
    from services.kit.telemetry import OUTBOX_DEAD_LETTERED

    monkeypatch.setattr(outbox_module, "MAX_ATTEMPTS", 3)
    poisoned_name = "poisoned"

    class Picky(Recorder):
        async def __call__(self, envelope: Envelope) -> None:
            if envelope.data["name"] == poisoned_name:
                raise RuntimeError("cannot handle this one")
            await super().__call__(envelope)

    recorder = Picky()
    relay, _ = relay_with(db, recorder)
    before = OUTBOX_DEAD_LETTERED.labels(SERVICE)._value.get()
    async with db.session_scope() as session:
        bad = emit(session, KitOutbox, firm_registered(poisoned_name))
        good = emit(session, KitOutbox, firm_registered("fine"))
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await relay.drain_once()
    assert await relay.drain_once() == 1  # the good one, now that the bad one is set aside
    assert recorder.ids == [good]
    rows = {r.id: r for r in await outbox_rows(db)}
    assert rows[bad].last_error.startswith("dead-lettered:")
    assert rows[bad].attempts == 3
    assert OUTBOX_DEAD_LETTERED.labels(SERVICE)._value.get() == before + 1


async def test_a_subscriber_of_the_same_service_may_write_while_the_relay_publishes(
    db: Database,
) -> None:
    """Embedded mode calls subscribers while publishing. A subscriber in the producing
    service itself (webhook fan-out, say) writes to the same database; on SQLite the
    relay must not hold the write lock meanwhile, or the two would wait on each other."""
    handled: list[str] = []

    async def write_back(envelope: Envelope) -> None:
        async def apply(session: AsyncSession, env: Envelope) -> None:
            session.add(Applied(consumer="same-service", event_id=env.id))

        await consume_once(db, KitProcessedEvent, "same-service", envelope, apply)
        handled.append(envelope.id)

    bus = InProcessBus()
    bus.subscribe("same-service", write_back, sources=[SERVICE])
    relay = OutboxRelay(db, KitOutbox, bus, source=SERVICE, poll_interval=30.0)
    relay.start()
    try:
        async with db.session_scope() as session:
            event_id = emit(session, KitOutbox, firm_registered())

        async def done() -> bool:
            return handled == [event_id]

        await wait_for(done, timeout=10, what="the subscriber's write")
    finally:
        await relay.stop()
    assert await count_rows(db, Applied) == 1
    (row,) = await outbox_rows(db)
    assert row.published_at is not None
