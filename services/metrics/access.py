"""Who may read a cluster's metrics and import its history.

The operator firm (from ``cluster.created``) sees its cluster's metrics: its owners and
admins, or its integrator clients (with ``metrics:read``, or ``metrics:write`` to
import). Other member firms get 403: members see only what the operator publishes, and
publishing (a per-cluster visibility setting) is not built yet. Anyone else gets 404,
as for every object of another tenant.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.auth import Principal
from services.kit.errors import Forbidden, NotFound
from services.metrics.models import Cluster, FirmMember, Membership

OPERATOR_ROLES = frozenset({"owner", "admin"})


async def operated_cluster(session: AsyncSession, principal: Principal, cluster_id: str) -> Cluster:
    """The cluster, when the caller acts for its operator with an admin role."""
    cluster = await session.get(Cluster, cluster_id)
    firm_id = principal.firm_id
    if cluster is None or firm_id is None:
        raise NotFound("No cluster with this id.")
    if cluster.operator_firm_id != firm_id:
        if await is_member(session, cluster_id, firm_id):
            raise Forbidden("Only the cluster's operator sees its metrics.")
        raise NotFound("No cluster with this id.")
    if principal.kind == "client":
        return cluster
    member = await session.get(FirmMember, (firm_id, principal.subject))
    if member is None or not member.active or member.role not in OPERATOR_ROLES:
        raise Forbidden("Needs the operator firm's owner or admin role.")
    return cluster


async def is_member(
    session: AsyncSession, cluster_id: str, firm_id: str, at: datetime | None = None
) -> bool:
    """Whether the firm is an active member (or was one at ``at``)."""
    row = await session.get(Membership, (cluster_id, firm_id))
    if row is None:
        return False
    if at is None:
        return row.left_at is None
    return row.joined_at <= at and (row.left_at is None or row.left_at > at)
