"""The local read model of membership: firms, their members, cluster memberships.

Membership's events are the only source. Each is applied once per consumer
(``consume_once`` records its id with the change); a row keeps the id of the event
that last wrote it, and an older event arriving late is ignored, so at-least-once and
out-of-order delivery both converge on membership's latest state.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from api.events import (
    ClusterCreatedV1,
    ClusterMemberJoinedV1,
    ClusterMemberLeftV1,
    ClusterMembership,
    Envelope,
    FirmMemberAddedV1,
    FirmMemberRemovedV1,
    FirmMemberRoleChangedV1,
    FirmProfile,
    FirmRegisteredV1,
    FirmUpdatedV1,
    UserDeactivatedV1,
)
from services.kit.db import Database
from services.kit.outbox import consume_once
from services.marketplace.models import (
    KnownCluster,
    KnownClusterMember,
    KnownFirm,
    KnownFirmMember,
    MarketplaceProcessedEvent,
)

log = logging.getLogger("onecluster.marketplace.consumers")
CONSUMER = "marketplace"
TYPES = (
    "firm.registered",
    "firm.updated",
    "firm.member_added",
    "firm.member_role_changed",
    "firm.member_removed",
    "cluster.created",
    "cluster.member_joined",
    "cluster.member_left",
    "user.deactivated",
)


async def on_startup(app: FastAPI) -> None:
    db: Database = app.state.db

    async def handle(envelope: Envelope) -> None:
        await consume_once(db, MarketplaceProcessedEvent, CONSUMER, envelope, apply_event)

    app.state.runtime.bus.subscribe(CONSUMER, handle, sources=["membership"], types=TYPES)


async def apply_event(session: AsyncSession, envelope: Envelope) -> None:
    """Fold one membership event into the read model."""
    try:
        payload = envelope.payload()
    except KeyError:
        log.warning("ignoring unknown event %s v%s", envelope.type, envelope.version)
        return
    event_id = envelope.id
    if isinstance(payload, FirmRegisteredV1 | FirmUpdatedV1):
        await _upsert_firm(session, payload, event_id)
    elif isinstance(payload, FirmMemberAddedV1 | FirmMemberRoleChangedV1):
        await _upsert(
            session,
            KnownFirmMember,
            (payload.firm_id, payload.user_id),
            event_id,
            role=payload.role,
            active=True,
        )
    elif isinstance(payload, FirmMemberRemovedV1):
        await _upsert(
            session,
            KnownFirmMember,
            (payload.firm_id, payload.user_id),
            event_id,
            role="member",
            active=False,
            keep=("role",),
        )
    elif isinstance(payload, ClusterMemberJoinedV1 | ClusterMemberLeftV1):
        await _upsert_firm(session, payload, event_id)
        await _upsert(
            session,
            KnownClusterMember,
            (payload.cluster_id, payload.firm_id),
            event_id,
            active=isinstance(payload, ClusterMemberJoinedV1),
        )
    elif isinstance(payload, ClusterCreatedV1):
        # The operator firm issues the cluster's credits (ledger grants).
        await _upsert(
            session,
            KnownCluster,
            payload.cluster_id,
            event_id,
            operator_firm_id=payload.operator_firm_id,
        )
    elif isinstance(payload, UserDeactivatedV1):
        rows = await session.execute(
            select(KnownFirmMember).where(KnownFirmMember.user_id == payload.user_id)
        )
        for member in rows.scalars():
            if member.event_id < event_id:
                member.active = False
                member.event_id = event_id
    await session.flush()


async def _upsert_firm(
    session: AsyncSession, payload: FirmProfile | ClusterMembership, event_id: str
) -> None:
    name = payload.name if isinstance(payload, FirmProfile) else None
    await _upsert(
        session,
        KnownFirm,
        payload.firm_id,
        event_id,
        name=name or "",
        region=payload.region,
        city=payload.city,
        actor_type=payload.actor_type,
        industries=list(payload.industries),
        keep=() if name else ("name",),
    )


async def _upsert(
    session: AsyncSession,
    model: Any,
    key: Any,
    event_id: str,
    keep: tuple[str, ...] = (),
    **values: Any,
) -> None:
    """Insert the row, or update it unless a newer event already wrote it.

    ``keep`` names columns an event does not know: they are set on insert only.
    """
    row = await session.get(model, key, with_for_update=True)
    if row is None:
        keys = dict(zip(_pk_names(model), key if isinstance(key, tuple) else (key,), strict=True))
        session.add(model(**keys, **values, event_id=event_id))
        return
    if row.event_id >= event_id:
        return
    for name, value in values.items():
        if name not in keep:
            setattr(row, name, value)
    row.event_id = event_id


def _pk_names(model: Any) -> list[str]:
    return [column.name for column in model.__table__.primary_key.columns]
