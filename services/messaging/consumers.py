"""The local read model of membership: clusters, their member firms, firms' users.

Membership's events are the only source, applied once per consumer (``consume_once``);
each row keeps the id of the event that last wrote it and ignores older ones, so
redelivery and out-of-order delivery converge (``services.kit.readmodel``).

``cluster.created`` also opens the cluster's general channel. A change that can take
access away (a firm left the cluster, a user left a firm or was deactivated) is
announced after commit to every replica's fan-out (``access_changed``), which closes
the subscriptions it ends at once instead of at the next message.

System messages come from the marketplace's events (consumer ``messaging-system``):
``task.published`` posts in the cluster's general channel and opens the task's thread
(the requester firm in it); ``contract.awarded`` adds the vendor firm to the task's
thread and opens the contract's own thread (the requester and that vendor only),
then posts there. Thread membership is by firm: every active user of those firms.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from api.events import (
    ClusterCreatedV1,
    ClusterMemberJoinedV1,
    ClusterMemberLeftV1,
    ContractAwardedV1,
    Envelope,
    FirmMemberAddedV1,
    FirmMemberRemovedV1,
    FirmMemberRoleChangedV1,
    TaskPublishedV1,
    UserDeactivatedV1,
)
from services.kit.db import Database
from services.kit.outbox import consume_once
from services.kit.readmodel import deactivate_user_memberships, upsert_if_newer
from services.messaging import service
from services.messaging.models import (
    KnownCluster,
    KnownClusterMember,
    KnownFirmMember,
    MessagingProcessedEvent,
)

log = logging.getLogger("onecluster.messaging.consumers")
CONSUMER = "messaging"
TYPES = (
    "cluster.created",
    "cluster.member_joined",
    "cluster.member_left",
    "firm.member_added",
    "firm.member_role_changed",
    "firm.member_removed",
    "user.deactivated",
)
SYSTEM_CONSUMER = "messaging-system"
SYSTEM_TYPES = ("task.published", "contract.awarded")


async def on_startup(app: FastAPI) -> None:
    db: Database = app.state.db

    async def handle(envelope: Envelope) -> None:
        await consume_once(db, MessagingProcessedEvent, CONSUMER, envelope, apply_event)

    async def handle_market(envelope: Envelope) -> None:
        await consume_once(db, MessagingProcessedEvent, SYSTEM_CONSUMER, envelope, apply_system)

    bus = app.state.runtime.bus
    bus.subscribe(CONSUMER, handle, sources=["membership"], types=TYPES)
    bus.subscribe(SYSTEM_CONSUMER, handle_market, sources=["marketplace"], types=SYSTEM_TYPES)


async def apply_system(session: AsyncSession, envelope: Envelope) -> None:
    """Post the system message of one marketplace event (once: ``event:<id>``)."""
    try:
        payload = envelope.payload()
    except KeyError:
        log.warning("ignoring unknown event %s v%s", envelope.type, envelope.version)
        return
    key = f"event:{envelope.id}"
    if isinstance(payload, TaskPublishedV1):
        general = await service.ensure_general_channel(session, payload.cluster_id)
        text = (
            f"Task `{payload.task_id}` was published by firm `{payload.requester_firm_id}` "
            f"({payload.requester_region}): {payload.kind}, {payload.item_count} items, "
            f"{payload.overlap} answers each, {payload.reward_per_annotation} per annotation "
            f"({payload.allocation} allocation)."
        )
        await service.post_system_message(session, general.id, text, key=key)
        thread = await service.ensure_task_thread(
            session, payload.cluster_id, payload.task_id, payload.requester_firm_id
        )
        await service.post_system_message(session, thread.id, text, key=f"{key}:thread")
    elif isinstance(payload, ContractAwardedV1):
        thread = await service.ensure_task_thread(
            session, payload.cluster_id, payload.task_id, payload.requester_firm_id
        )
        await service.add_thread_firm(session, thread, payload.vendor_firm_id, "vendor")
        text = (
            f"Contract `{payload.contract_id}` awarded to firm `{payload.vendor_firm_id}` "
            f"({payload.vendor_region}): quota {payload.quota} at "
            f"{payload.price_per_annotation} per annotation."
        )
        await service.post_system_message(session, thread.id, text, key=key)
        own = await service.ensure_contract_thread(
            session, payload.cluster_id, payload.contract_id, payload.requester_firm_id
        )
        await service.add_thread_firm(session, own, payload.vendor_firm_id, "vendor")
        await service.post_system_message(session, own.id, text, key=f"{key}:contract")


async def apply_event(session: AsyncSession, envelope: Envelope) -> None:
    """Fold one membership event into the read model."""
    try:
        payload = envelope.payload()
    except KeyError:
        log.warning("ignoring unknown event %s v%s", envelope.type, envelope.version)
        return
    event_id = envelope.id
    if isinstance(payload, ClusterCreatedV1):
        await upsert_if_newer(
            session,
            KnownCluster,
            payload.cluster_id,
            event_id,
            {"name": payload.name, "operator_firm_id": payload.operator_firm_id},
        )
        await service.ensure_general_channel(session, payload.cluster_id)
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
        service.announce_access_change(session, firm_id=payload.firm_id, user_id=payload.user_id)
    elif isinstance(payload, ClusterMemberJoinedV1 | ClusterMemberLeftV1):
        joined = isinstance(payload, ClusterMemberJoinedV1)
        await upsert_if_newer(
            session,
            KnownClusterMember,
            (payload.cluster_id, payload.firm_id),
            event_id,
            {"active": joined},
        )
        if not joined:
            service.announce_access_change(
                session, cluster_id=payload.cluster_id, firm_id=payload.firm_id
            )
    elif isinstance(payload, UserDeactivatedV1):
        await deactivate_user_memberships(session, KnownFirmMember, payload.user_id, event_id)
        service.announce_access_change(session, user_id=payload.user_id)
    await session.flush()
