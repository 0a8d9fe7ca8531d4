"""The fact store's only writer besides the history import: events of every service.

Each event is applied once (``consume_once`` records its id with the change). Read-model
rows keep the id of the event that last wrote them and ignore older ones
(``services.kit.readmodel``); daily
aggregates grow by one upsert per event (``INSERT … ON CONFLICT DO UPDATE``, on SQLite
and PostgreSQL alike), so an event costs a handful of row writes and nothing is
recomputed. Facts are dated by the event's ``occurred_at``, which is why replaying the
same events (``onecluster metrics rebuild``) gives the same store.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from api.events import (
    AssignmentSubmittedV1,
    ClusterCreatedV1,
    ClusterMemberJoinedV1,
    ClusterMemberLeftV1,
    ClusterMembership,
    ContractAwardedV1,
    Envelope,
    FirmMemberAddedV1,
    FirmMemberRemovedV1,
    FirmMemberRoleChangedV1,
    FirmProfile,
    FirmRegisteredV1,
    FirmUpdatedV1,
    MessagePostedV1,
    ParkUpdatedV1,
    PayoutSettledV1,
    SubmissionAcceptedV1,
    SubmissionRejectedV1,
    TaskCompletedV1,
    TaskFirstClaimedV1,
    TaskPublishedV1,
    UserDeactivatedV1,
)
from services.kit.db import Database
from services.kit.outbox import consume_once
from services.kit.readmodel import deactivate_user_memberships, upsert_if_newer
from services.metrics.config import load_config
from services.metrics.models import (
    ChannelPosts,
    Cluster,
    CollabDaily,
    Firm,
    FirmActivity,
    FirmMember,
    Membership,
    MentionDaily,
    MetricsProcessedEvent,
    Park,
    TaskFact,
    TaskVendor,
)

log = logging.getLogger("onecluster.metrics.consumers")
CONSUMER = "metrics"
SOURCES = ("membership", "marketplace", "messaging")
TYPES = (
    "firm.registered",
    "firm.updated",
    "firm.member_added",
    "firm.member_role_changed",
    "firm.member_removed",
    "user.deactivated",
    "cluster.created",
    "cluster.member_joined",
    "cluster.member_left",
    "park.updated",
    "task.published",
    "task.first_claimed",
    "assignment.submitted",
    "contract.awarded",
    "submission.accepted",
    "submission.rejected",
    "payout.settled",
    "task.completed",
    "message.posted",
)


async def on_startup(app: FastAPI) -> None:
    db: Database = app.state.db

    async def handle(envelope: Envelope) -> None:
        await consume_once(db, MetricsProcessedEvent, CONSUMER, envelope, apply_event)

    app.state.runtime.bus.subscribe(CONSUMER, handle, sources=SOURCES, types=TYPES)


async def apply_event(session: AsyncSession, envelope: Envelope) -> None:
    """Fold one event into the fact store."""
    try:
        payload = envelope.payload()
    except KeyError:
        log.warning("ignoring unknown event %s v%s", envelope.type, envelope.version)
        return
    at = envelope.occurred_at
    day = at.date()
    eid = envelope.id
    weights = load_config().tie_weights
    cluster_id: str | None = getattr(payload, "cluster_id", None)
    if isinstance(payload, FirmRegisteredV1 | FirmUpdatedV1):
        await _upsert_firm(session, payload, eid)
    elif isinstance(payload, FirmMemberAddedV1 | FirmMemberRoleChangedV1 | FirmMemberRemovedV1):
        active = not isinstance(payload, FirmMemberRemovedV1)
        role = getattr(payload, "role", "member")
        await upsert_if_newer(
            session,
            FirmMember,
            (payload.firm_id, payload.user_id),
            eid,
            {"role": role, "active": active},
            keep=() if active else ("role",),
            flush=True,
        )
    elif isinstance(payload, UserDeactivatedV1):
        await deactivate_user_memberships(session, FirmMember, payload.user_id, eid)
    elif isinstance(payload, ClusterCreatedV1):
        await upsert_if_newer(
            session,
            Cluster,
            payload.cluster_id,
            eid,
            {
                "name": payload.name,
                "core_region": payload.core_region,
                "operator_firm_id": payload.operator_firm_id,
                "created_at": at,
            },
            flush=True,
        )
    elif isinstance(payload, ClusterMemberJoinedV1 | ClusterMemberLeftV1):
        await _upsert_firm(session, payload, eid)
        joined = isinstance(payload, ClusterMemberJoinedV1)
        values: dict[str, Any] = {"left_at": None if joined else at, "joined_at": at}
        if isinstance(payload, ClusterMemberJoinedV1):
            values["park_id"] = payload.park_id
        # A rejoin keeps the first ``joined_at``; only a first join sets it.
        await upsert_if_newer(
            session,
            Membership,
            (payload.cluster_id, payload.firm_id),
            eid,
            values,
            keep=("joined_at",),
            flush=True,
        )
    elif isinstance(payload, ParkUpdatedV1):
        await upsert_if_newer(
            session,
            Park,
            payload.park_id,
            eid,
            {
                "cluster_id": payload.cluster_id,
                "name": payload.name,
                "region": payload.region,
                "capacity": payload.capacity,
                "located_firm_ids": list(payload.located_firm_ids),
            },
            flush=True,
        )
    elif isinstance(payload, TaskPublishedV1):
        await _insert_ignore(
            session,
            TaskFact,
            id=payload.task_id,
            cluster_id=payload.cluster_id,
            requester_firm_id=payload.requester_firm_id,
            requester_region=payload.requester_region,
            kind=payload.kind,
            allocation=payload.allocation,
            item_count=payload.item_count,
            published_at=at,
        )
        await _activity(session, payload.cluster_id, day, payload.requester_firm_id)
    elif isinstance(payload, TaskFirstClaimedV1):
        await _set_earliest(session, payload.task_id, "first_claimed_at", payload.claimed_at)
        await _activity(session, payload.cluster_id, day, payload.claimer_firm_id)
    elif isinstance(payload, AssignmentSubmittedV1):
        await _set_earliest(session, payload.task_id, "first_submitted_at", at)
        await _vendor(session, payload.task_id, payload.annotator_firm_id, payload)
        await _activity(session, payload.cluster_id, day, payload.annotator_firm_id)
    elif isinstance(payload, ContractAwardedV1):
        await _vendor(session, payload.task_id, payload.vendor_firm_id, payload)
        await add_collab(
            session,
            cluster_id=payload.cluster_id,
            day=day,
            source=payload.requester_firm_id,
            target=payload.vendor_firm_id,
            kind="task_contract",
            origin="observed",
            weight=weights.get("task_contract", 0.0),
            volume=payload.quota,
            amount=payload.quota * payload.price_per_annotation,
        )
        await _activity(session, payload.cluster_id, day, payload.requester_firm_id)
        await _activity(session, payload.cluster_id, day, payload.vendor_firm_id)
    elif isinstance(payload, SubmissionAcceptedV1):
        await add_collab(
            session,
            cluster_id=payload.cluster_id,
            day=day,
            source=payload.requester_firm_id,
            target=payload.annotator_firm_id,
            kind="annotation",
            origin="observed",
            weight=weights.get("annotation", 0.0),
            volume=1,
            amount=payload.amount,
        )
        await _activity(session, payload.cluster_id, day, payload.requester_firm_id)
    elif isinstance(payload, SubmissionRejectedV1):
        await _activity(session, payload.cluster_id, day, payload.requester_firm_id)
    elif isinstance(payload, PayoutSettledV1):
        await add_collab(
            session,
            cluster_id=payload.cluster_id,
            day=day,
            source=payload.payer_firm_id,
            target=payload.payee_firm_id,
            kind="payout",
            origin="observed",
            weight=weights.get("payout", 0.0),
            volume=payload.annotations,
            amount=payload.amount,
        )
    elif isinstance(payload, TaskCompletedV1):
        task = await session.get(TaskFact, payload.task_id, with_for_update=True)
        if task is not None and task.completed_at is None:
            task.completed_at = at
            task.outcome = payload.outcome
            task.accepted_annotations = payload.accepted_annotations
        await _activity(session, payload.cluster_id, day, payload.requester_firm_id)
    elif isinstance(payload, MessagePostedV1):
        mday = payload.posted_at.date()
        await upsert_add(
            session,
            ChannelPosts,
            {
                "cluster_id": payload.cluster_id,
                "channel_id": payload.channel_id,
                "day": mday,
                "firm_id": payload.sender_firm_id,
            },
            {"messages": 1},
            {"channel_kind": payload.channel_kind},
        )
        for other in sorted(set(payload.mentioned_firm_ids) - {payload.sender_firm_id}):
            a, b = sorted((payload.sender_firm_id, other))
            await upsert_add(
                session,
                MentionDaily,
                {"cluster_id": payload.cluster_id, "day": mday, "firm_a": a, "firm_b": b},
                {"messages": 1},
            )
        await _activity(session, payload.cluster_id, mday, payload.sender_firm_id)
    if cluster_id is not None:
        await mark_dirty(session, cluster_id)
    await session.flush()


# -- helpers -------------------------------------------------------------------------
async def add_collab(
    session: AsyncSession,
    *,
    cluster_id: str,
    day: date,
    source: str,
    target: str,
    kind: str,
    origin: str,
    weight: float,
    events: int = 1,
    volume: int = 0,
    amount: int = 0,
) -> None:
    """Add to the day's collaboration row of (source, target, kind, origin)."""
    await upsert_add(
        session,
        CollabDaily,
        {
            "cluster_id": cluster_id,
            "day": day,
            "source_firm_id": source,
            "target_firm_id": target,
            "kind": kind,
            "origin": origin,
        },
        {"weight": weight, "events": events, "volume": volume, "amount": amount},
    )


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "sqlite"


@cache
def _upsert_statement(
    dialect: str,
    table: sa.Table,
    keys: tuple[str, ...],
    adds: tuple[str, ...],
    sets: tuple[str, ...],
) -> Any:
    """``INSERT … ON CONFLICT (keys) DO UPDATE SET add = add + excluded.add, set = excluded.set``,
    built once per shape: the values come as parameters, so an event costs no statement
    construction (the column proxies of ``excluded`` are the expensive part)."""
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    update = {name: table.c[name] + stmt.excluded[name] for name in adds}
    update.update({name: stmt.excluded[name] for name in sets})
    return stmt.on_conflict_do_update(index_elements=list(keys), set_=update)


@cache
def _insert_ignore_statement(dialect: str, table: sa.Table) -> Any:
    insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing()


async def upsert_add(
    session: AsyncSession,
    model: Any,
    keys: dict[str, Any],
    adds: dict[str, Any],
    sets: dict[str, Any] | None = None,
) -> None:
    """Insert the row, or add ``adds`` to its columns (and overwrite ``sets``) if it exists."""
    sets = sets or {}
    stmt = _upsert_statement(
        _dialect(session), model.__table__, tuple(keys), tuple(adds), tuple(sets)
    )
    # Straight to the connection: a Core statement needs none of the ORM's execution path.
    await (await session.connection()).execute(stmt, {**keys, **adds, **sets})


async def _insert_ignore(session: AsyncSession, model: Any, **values: Any) -> None:
    stmt = _insert_ignore_statement(_dialect(session), model.__table__)
    await (await session.connection()).execute(stmt, values)


async def _activity(session: AsyncSession, cluster_id: str, day: date, firm_id: str) -> None:
    await upsert_add(
        session,
        FirmActivity,
        {"cluster_id": cluster_id, "day": day, "firm_id": firm_id},
        {"events": 1},
    )


async def _vendor(session: AsyncSession, task_id: str, firm_id: str, payload: Any) -> None:
    region = getattr(payload, "vendor_region", None) or getattr(payload, "annotator_region", "")
    await _insert_ignore(
        session,
        TaskVendor,
        task_id=task_id,
        firm_id=firm_id,
        cluster_id=payload.cluster_id,
        region=region,
    )


async def _set_earliest(session: AsyncSession, task_id: str, column: str, at: datetime) -> None:
    """Lower a task's timestamp column to ``at`` (events may arrive in any order)."""
    field = getattr(TaskFact, column)
    await session.execute(
        sa.update(TaskFact)
        .where(col(TaskFact.id) == task_id, sa.or_(field.is_(None), field > at))
        .values({column: at})
    )


async def mark_dirty(session: AsyncSession, cluster_id: str) -> None:
    """Flag the cluster for the reclassification sweep (no write when already flagged)."""
    await (await session.connection()).execute(_MARK_DIRTY, {"cluster_id": cluster_id})


_CLUSTERS: sa.Table = Cluster.__table__  # type: ignore[attr-defined]
_MARK_DIRTY = (
    sa.update(_CLUSTERS)
    .where(_CLUSTERS.c.id == sa.bindparam("cluster_id"), _CLUSTERS.c.dirty.is_(False))
    .values(dirty=True)
)


async def _upsert_firm(
    session: AsyncSession, payload: FirmProfile | ClusterMembership, event_id: str
) -> None:
    name = payload.name if isinstance(payload, FirmProfile) else None
    await upsert_if_newer(
        session,
        Firm,
        payload.firm_id,
        event_id,
        {
            "name": name or "",
            "region": payload.region,
            "city": payload.city,
            "actor_type": payload.actor_type,
            "industries": list(payload.industries),
        },
        keep=() if name else ("name",),
        flush=True,
    )
