"""The local read model of membership: firms, their members, cluster memberships.

Membership's events are the only source. Each is applied once per consumer
(``consume_once`` records its id with the change); a row keeps the id of the event
that last wrote it, and an older event arriving late is ignored, so at-least-once and
out-of-order delivery both converge on membership's latest state (the rule and its
helpers: ``services.kit.readmodel``).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

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
from services.kit.readmodel import deactivate_user_memberships, upsert_if_newer
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
        await upsert_if_newer(
            session,
            KnownFirmMember,
            (payload.firm_id, payload.user_id),
            event_id,
            {"role": payload.role, "active": True},
        )
    elif isinstance(payload, FirmMemberRemovedV1):
        await upsert_if_newer(
            session,
            KnownFirmMember,
            (payload.firm_id, payload.user_id),
            event_id,
            {"role": "member", "active": False},
            keep=("role",),
        )
    elif isinstance(payload, ClusterMemberJoinedV1 | ClusterMemberLeftV1):
        await _upsert_firm(session, payload, event_id)
        await upsert_if_newer(
            session,
            KnownClusterMember,
            (payload.cluster_id, payload.firm_id),
            event_id,
            {"active": isinstance(payload, ClusterMemberJoinedV1)},
        )
    elif isinstance(payload, ClusterCreatedV1):
        # The operator firm issues the cluster's credits (ledger grants).
        await upsert_if_newer(
            session,
            KnownCluster,
            payload.cluster_id,
            event_id,
            {"operator_firm_id": payload.operator_firm_id},
        )
    elif isinstance(payload, UserDeactivatedV1):
        await deactivate_user_memberships(session, KnownFirmMember, payload.user_id, event_id)
    await session.flush()


async def _upsert_firm(
    session: AsyncSession, payload: FirmProfile | ClusterMembership, event_id: str
) -> None:
    name = payload.name if isinstance(payload, FirmProfile) else None
    await upsert_if_newer(
        session,
        KnownFirm,
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
    )
