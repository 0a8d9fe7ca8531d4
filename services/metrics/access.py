"""Who may read a cluster's metrics, import its history and change its settings.

The operator firm (from ``cluster.created``) sees its cluster's metrics: its owners and
admins, or its integrator clients (with ``metrics:read``, or ``metrics:write`` to
import and to change the settings). Member firms see what the operator publishes: while
the cluster's ``members_visible`` setting is on, every active user of an active member
firm (any role, the operator firm's annotators too) and the member firms' clients read
the indicators, network, classification, diagnostics, history and charts; while it is
off they get 403. Importing history and changing the settings stay with the operator.
Anyone else gets 404, as for every object of another tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.auth import Principal
from services.kit.errors import Forbidden, NotFound
from services.metrics.models import Cluster, ClusterSettings, FirmMember, Membership

OPERATOR_ROLES = frozenset({"owner", "admin"})


@dataclass(frozen=True)
class Reader:
    cluster: Cluster
    as_operator: bool


async def operated_cluster(session: AsyncSession, principal: Principal, cluster_id: str) -> Cluster:
    """The cluster, when the caller acts for its operator with an admin role."""
    cluster, operator_firm, member = await _standing(session, principal, cluster_id)
    if not operator_firm:
        if member:
            raise Forbidden("Only the cluster's operator may do this.")
        raise NotFound("No cluster with this id.")
    if not await _acts_with_role(session, principal, OPERATOR_ROLES):
        raise Forbidden("Needs the operator firm's owner or admin role.")
    return cluster


async def readable_cluster(session: AsyncSession, principal: Principal, cluster_id: str) -> Reader:
    """The cluster, when the caller may read its metrics (operator, or a member firm
    while the operator publishes them)."""
    cluster, operator_firm, member = await _standing(session, principal, cluster_id)
    if not member and not operator_firm:
        raise NotFound("No cluster with this id.")
    if operator_firm and await _acts_with_role(session, principal, OPERATOR_ROLES):
        return Reader(cluster, as_operator=True)
    if not await members_visible(session, cluster_id):
        raise Forbidden("The operator has not published this cluster's metrics to members.")
    if not await _acts_with_role(session, principal, None):
        raise Forbidden("Needs an active user of a member firm.")
    return Reader(cluster, as_operator=False)


async def members_visible(session: AsyncSession, cluster_id: str) -> bool:
    settings = await session.get(ClusterSettings, cluster_id)
    return settings is not None and settings.members_visible


async def _standing(
    session: AsyncSession, principal: Principal, cluster_id: str
) -> tuple[Cluster, bool, bool]:
    """``(cluster, acts for the operator firm, acts for an active member firm)``."""
    cluster = await session.get(Cluster, cluster_id)
    firm_id = principal.firm_id
    if cluster is None or firm_id is None:
        raise NotFound("No cluster with this id.")
    operator_firm = cluster.operator_firm_id == firm_id
    member = operator_firm or await is_member(session, cluster_id, firm_id)
    return cluster, operator_firm, member


async def _acts_with_role(
    session: AsyncSession, principal: Principal, roles: frozenset[str] | None
) -> bool:
    """A client of the firm, or an active user of it (with one of ``roles`` if given)."""
    if principal.kind == "client":
        return True
    if principal.firm_id is None:
        return False
    member = await session.get(FirmMember, (principal.firm_id, principal.subject))
    if member is None or not member.active:
        return False
    return roles is None or member.role in roles


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
