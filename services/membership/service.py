"""Membership domain logic. Functions take the session first, flush, never commit.

Authorisation rules in one place:

* firm routes use the caller's role in that firm (from this database): outsiders get
  404, members whose role is too low get 403;
* cluster routes act as the caller's *acting firm* — the ``firm_id`` of the token, never
  a body field — and check that firm's standing in the cluster: the operator firm (the
  cluster promotion agency) runs the cluster, member firms read it, others see only the
  public directory entry;
* "firm admin" means a user who is owner or admin of the acting firm, or an integrator
  client of that firm holding ``membership:write``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from api.events import (
    ClusterCreatedV1,
    ClusterMemberJoinedV1,
    ClusterMemberLeftV1,
    FirmMemberAddedV1,
    FirmMemberRemovedV1,
    FirmMemberRoleChangedV1,
    FirmRegisteredV1,
    FirmUpdatedV1,
    ParkUpdatedV1,
    UserDeactivatedV1,
)
from services.kit.auth import DenyList, Principal
from services.kit.db import utcnow
from services.kit.errors import (
    AlreadyExists,
    Forbidden,
    Gone,
    InvalidState,
    NotFound,
    Unprocessable,
)
from services.kit.ids import new_id
from services.kit.outbox import emit
from services.membership import audit
from services.membership.access import ADMIN_ROLES, ROLE_RANK, require_firm
from services.membership.models import (
    AccessToken,
    AuditEvent,
    Cluster,
    ClusterInvitation,
    ClusterMember,
    Firm,
    FirmIndustry,
    FirmInvitation,
    FirmMember,
    JoinRequest,
    MembershipOutbox,
    Park,
    RefreshToken,
    User,
)
from services.membership.passwords import hash_password, verify_password

FIRM_INVITATION_TTL = timedelta(days=7)
CLUSTER_INVITATION_TTL = timedelta(days=30)


def _publish(session: AsyncSession, payload: Any) -> None:
    emit(session, MembershipOutbox, payload)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def normalize_email(email: str) -> str:
    return email.strip().lower()


# -- users ---------------------------------------------------------------------------
async def sign_up(session: AsyncSession, *, email: str, password: str, display_name: str) -> User:
    """Create a user; emails are unique regardless of case."""
    normalized = normalize_email(email)
    exists = await session.scalar(select(User.id).where(User.email_normalized == normalized))
    if exists:
        raise AlreadyExists("An account with this email exists.")
    user = User(
        id=new_id("usr"),
        email=email.strip(),
        email_normalized=normalized,
        display_name=display_name,
        # argon2 takes tens of milliseconds of CPU: keep it off the event loop.
        password_hash=await anyio.to_thread.run_sync(hash_password, password),
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:
        raise AlreadyExists("An account with this email exists.") from None
    audit.record(
        session, None, "user.signed_up", target_kind="user", target_id=user.id, actor_id=user.id
    )
    return user


async def get_active_user(session: AsyncSession, principal: Principal) -> User:
    if principal.kind != "user":
        raise Forbidden("This operation needs a user's token.")
    user = await session.get(User, principal.subject)
    if user is None or not user.is_active:
        raise NotFound("No such user.")
    return user


async def my_firms(session: AsyncSession, user_id: str) -> list[tuple[Firm, FirmMember]]:
    rows = await session.execute(
        select(Firm, FirmMember)
        .join(FirmMember, col(FirmMember.firm_id) == Firm.id)
        .where(FirmMember.user_id == user_id)
        .order_by(col(FirmMember.created_at))
    )
    return [(f, m) for f, m in rows.all()]


async def update_me(
    session: AsyncSession,
    principal: Principal,
    *,
    display_name: str | None,
    password: str | None,
    current_password: str | None,
) -> User:
    user = await get_active_user(session, principal)
    if password is not None:
        if not current_password or not await anyio.to_thread.run_sync(
            verify_password, user.password_hash, current_password
        ):
            raise Forbidden("The current password is wrong.")
        user.password_hash = await anyio.to_thread.run_sync(hash_password, password)
    if display_name is not None:
        user.display_name = display_name
    audit.record(
        session,
        principal,
        "user.updated",
        target_kind="user",
        target_id=user.id,
        detail={"password_changed": password is not None},
    )
    return user


async def revoke_tokens(
    session: AsyncSession,
    denylist: DenyList,
    *,
    user_id: str,
    firm_id: str | None = None,
) -> int:
    """Revoke a user's refresh tokens and deny-list their live access tokens at once.

    With ``firm_id`` only the tokens acting for that firm. The deny-list is written
    before the transaction commits: if the commit then fails the user merely has to sign
    in again, whereas the other order could leave a removed user's token alive.
    """
    now = utcnow()
    refresh = sa.update(RefreshToken).where(
        col(RefreshToken.user_id) == user_id,
        col(RefreshToken.revoked_at).is_(None),
    )
    live = select(AccessToken).where(
        AccessToken.subject == user_id,
        AccessToken.expires_at > now,
        AccessToken.revoked_at.is_(None),  # type: ignore[union-attr]
    )
    if firm_id is not None:
        refresh = refresh.where(col(RefreshToken.firm_id) == firm_id)
        live = live.where(AccessToken.firm_id == firm_id)
    await session.execute(refresh.values(revoked_at=now))
    tokens = (await session.execute(live)).scalars().all()
    for token in tokens:
        await denylist.add(token.jti, int((token.expires_at - now).total_seconds()) + 1)
        token.revoked_at = now
    return len(tokens)


async def deactivate_me(session: AsyncSession, principal: Principal, denylist: DenyList) -> User:
    user = await get_active_user(session, principal)
    for firm, membership in await my_firms(session, user.id):
        if membership.role == "owner" and await _owner_count(session, firm.id) == 1:
            others = await session.scalar(
                select(sa.func.count()).where(
                    FirmMember.firm_id == firm.id, FirmMember.user_id != user.id
                )
            )
            if others:
                raise InvalidState(
                    f"You are the only owner of {firm.name}; make someone else owner first.",
                    firm_id=firm.id,
                )
    user.is_active = False
    user.deactivated_at = utcnow()
    await revoke_tokens(session, denylist, user_id=user.id)
    _publish(session, UserDeactivatedV1(user_id=user.id))
    audit.record(session, principal, "user.deactivated", target_kind="user", target_id=user.id)
    return user


# -- firms ---------------------------------------------------------------------------
def _firm_profile(firm: Firm) -> dict[str, Any]:
    return {
        "firm_id": firm.id,
        "name": firm.name,
        "region": firm.region,
        "city": firm.city,
        "actor_type": firm.actor_type,
        "industries": list(firm.industries),
    }


async def _set_industries(session: AsyncSession, firm_id: str, codes: Sequence[str]) -> None:
    await session.execute(sa.delete(FirmIndustry).where(col(FirmIndustry.firm_id) == firm_id))
    session.add_all(FirmIndustry(firm_id=firm_id, code=c) for c in codes)


async def create_firm(session: AsyncSession, principal: Principal, **fields: Any) -> Firm:
    user = await get_active_user(session, principal)
    firm = Firm(id=new_id("firm"), created_by=user.id, **fields)
    session.add(firm)
    await session.flush()
    await _set_industries(session, firm.id, firm.industries)
    session.add(FirmMember(id=new_id("fm"), firm_id=firm.id, user_id=user.id, role="owner"))
    _publish(session, FirmRegisteredV1(**_firm_profile(firm)))
    _publish(session, FirmMemberAddedV1(firm_id=firm.id, user_id=user.id, role="owner"))
    audit.record(
        session,
        principal,
        "firm.registered",
        target_kind="firm",
        target_id=firm.id,
        firm_id=firm.id,
    )
    return firm


async def update_firm(
    session: AsyncSession, principal: Principal, firm_id: str, changes: dict[str, Any]
) -> Firm:
    firm, _ = await require_firm(session, firm_id, principal, ADMIN_ROLES)
    for key, value in changes.items():
        setattr(firm, key, value)
    if "industries" in changes:
        await _set_industries(session, firm.id, changes["industries"])
    firm.updated_at = utcnow()
    _publish(session, FirmUpdatedV1(**_firm_profile(firm)))
    audit.record(
        session,
        principal,
        "firm.updated",
        target_kind="firm",
        target_id=firm.id,
        firm_id=firm.id,
        detail={"fields": sorted(changes)},
    )
    return firm


async def firm_members(
    session: AsyncSession, principal: Principal, firm_id: str, *, after: str | None, limit: int
) -> list[tuple[FirmMember, User]]:
    await require_firm(session, firm_id, principal)
    query = (
        select(FirmMember, User)
        .join(User, col(User.id) == FirmMember.user_id)
        .where(FirmMember.firm_id == firm_id)
        .order_by(FirmMember.id)
        .limit(limit + 1)
    )
    if after:
        query = query.where(FirmMember.id > after)
    return [(m, u) for m, u in (await session.execute(query)).all()]


async def _owner_count(session: AsyncSession, firm_id: str) -> int:
    return int(
        await session.scalar(
            select(sa.func.count()).where(
                FirmMember.firm_id == firm_id,
                FirmMember.role == "owner",
                FirmMember.status == "active",
            )
        )
        or 0
    )


async def _target_member(session: AsyncSession, firm_id: str, user_id: str) -> FirmMember:
    member = await session.scalar(
        select(FirmMember).where(FirmMember.firm_id == firm_id, FirmMember.user_id == user_id)
    )
    if member is None:
        raise NotFound("No member with this id in the firm.")
    return member


def _check_can_manage(actor_role: str, target_role: str, new_role: str | None = None) -> None:
    """Admins manage members and annotators; only owners touch owners and admins."""
    if actor_role not in ADMIN_ROLES:
        raise Forbidden("Only the firm's owners and admins manage members.")
    if actor_role != "owner" and (
        ROLE_RANK[target_role] >= ROLE_RANK["admin"]
        or (new_role is not None and ROLE_RANK[new_role] >= ROLE_RANK["admin"])
    ):
        raise Forbidden("Only an owner can grant, change or remove the owner and admin roles.")


async def change_role(
    session: AsyncSession, principal: Principal, firm_id: str, user_id: str, role: str
) -> FirmMember:
    _, actor_role = await require_firm(session, firm_id, principal, ADMIN_ROLES, lock=True)
    member = await _target_member(session, firm_id, user_id)
    _check_can_manage(actor_role, member.role, role)
    if member.role == "owner" and role != "owner" and await _owner_count(session, firm_id) <= 1:
        raise InvalidState("A firm keeps at least one owner.")
    old = member.role
    member.role = role
    _publish(session, FirmMemberRoleChangedV1(firm_id=firm_id, user_id=user_id, role=role))
    audit.record(
        session,
        principal,
        "firm.member_role_changed",
        target_kind="user",
        target_id=user_id,
        firm_id=firm_id,
        detail={"from": old, "to": role},
    )
    return member


async def remove_member(
    session: AsyncSession, principal: Principal, firm_id: str, user_id: str, denylist: DenyList
) -> None:
    _, actor_role = await require_firm(session, firm_id, principal, lock=True)
    member = await _target_member(session, firm_id, user_id)
    leaving_self = principal.kind == "user" and principal.subject == user_id
    if not leaving_self:
        _check_can_manage(actor_role, member.role)
    if member.role == "owner" and await _owner_count(session, firm_id) <= 1:
        raise InvalidState("A firm keeps at least one owner.")
    await session.delete(member)
    await revoke_tokens(session, denylist, user_id=user_id, firm_id=firm_id)
    _publish(session, FirmMemberRemovedV1(firm_id=firm_id, user_id=user_id))
    audit.record(
        session,
        principal,
        "firm.member_left" if leaving_self else "firm.member_removed",
        target_kind="user",
        target_id=user_id,
        firm_id=firm_id,
    )


async def set_member_status(
    session: AsyncSession,
    principal: Principal,
    firm_id: str,
    user_id: str,
    status: str,
    denylist: DenyList,
) -> FirmMember:
    _, actor_role = await require_firm(session, firm_id, principal, ADMIN_ROLES, lock=True)
    member = await _target_member(session, firm_id, user_id)
    _check_can_manage(actor_role, member.role)
    if principal.subject == user_id:
        raise Forbidden("You cannot change your own status.")
    if member.status == status:
        return member
    if (
        status == "deactivated"
        and member.role == "owner"
        and await _owner_count(session, firm_id) <= 1
    ):
        raise InvalidState("A firm keeps at least one active owner.")
    member.status = status
    if status == "deactivated":
        await revoke_tokens(session, denylist, user_id=user_id, firm_id=firm_id)
        _publish(session, FirmMemberRemovedV1(firm_id=firm_id, user_id=user_id))
    else:
        _publish(session, FirmMemberAddedV1(firm_id=firm_id, user_id=user_id, role=member.role))
    audit.record(
        session,
        principal,
        f"firm.member_{'deactivated' if status == 'deactivated' else 'reactivated'}",
        target_kind="user",
        target_id=user_id,
        firm_id=firm_id,
    )
    return member


def invitation_status(inv: FirmInvitation) -> str:
    if inv.accepted_at:
        return "accepted"
    if inv.revoked_at:
        return "revoked"
    if inv.expires_at <= utcnow():
        return "expired"
    return "pending"


async def invite_user(
    session: AsyncSession, principal: Principal, firm_id: str, *, email: str, role: str
) -> tuple[FirmInvitation, str]:
    _, actor_role = await require_firm(session, firm_id, principal, ADMIN_ROLES)
    if actor_role != "owner" and ROLE_RANK[role] >= ROLE_RANK["admin"]:
        raise Forbidden("Only an owner can invite owners and admins.")
    normalized = normalize_email(email)
    already = await session.scalar(
        select(FirmMember.id)
        .join(User, col(User.id) == FirmMember.user_id)
        .where(FirmMember.firm_id == firm_id, User.email_normalized == normalized)
    )
    if already:
        raise AlreadyExists("This user is already a member of the firm.")
    token = secrets.token_urlsafe(32)
    inv = FirmInvitation(
        id=new_id("finv"),
        firm_id=firm_id,
        email_normalized=normalized,
        role=role,
        token_hash=_hash_token(token),
        invited_by=principal.subject,
        expires_at=utcnow() + FIRM_INVITATION_TTL,
    )
    session.add(inv)
    audit.record(
        session,
        principal,
        "firm.user_invited",
        target_kind="invitation",
        target_id=inv.id,
        firm_id=firm_id,
        detail={"email": normalized, "role": role},
    )
    return inv, token


async def list_firm_invitations(
    session: AsyncSession, principal: Principal, firm_id: str, *, after: str | None, limit: int
) -> list[FirmInvitation]:
    await require_firm(session, firm_id, principal, ADMIN_ROLES)
    query = (
        select(FirmInvitation)
        .where(FirmInvitation.firm_id == firm_id)
        .order_by(FirmInvitation.id)
        .limit(limit + 1)
    )
    if after:
        query = query.where(FirmInvitation.id > after)
    return list((await session.execute(query)).scalars())


async def revoke_firm_invitation(
    session: AsyncSession, principal: Principal, firm_id: str, invitation_id: str
) -> FirmInvitation:
    await require_firm(session, firm_id, principal, ADMIN_ROLES)
    inv = await session.get(FirmInvitation, invitation_id)
    if inv is None or inv.firm_id != firm_id:
        raise NotFound("No invitation with this id.")
    if invitation_status(inv) != "pending":
        raise InvalidState(
            f"The invitation is {invitation_status(inv)}.", state=invitation_status(inv)
        )
    inv.revoked_at = utcnow()
    audit.record(
        session,
        principal,
        "firm.invitation_revoked",
        target_kind="invitation",
        target_id=inv.id,
        firm_id=firm_id,
    )
    return inv


async def accept_firm_invitation(
    session: AsyncSession, principal: Principal, firm_id: str, invitation_id: str, token: str
) -> FirmMember:
    """Single use, expiring, and only for the user whose email was invited."""
    user = await get_active_user(session, principal)
    inv = (
        await session.execute(
            select(FirmInvitation).where(FirmInvitation.id == invitation_id).with_for_update()
        )
    ).scalar_one_or_none()
    if (
        inv is None
        or inv.firm_id != firm_id
        or not secrets.compare_digest(inv.token_hash, _hash_token(token))
    ):
        raise NotFound("No invitation with this id and token.")
    if inv.email_normalized != user.email_normalized:
        raise Forbidden("The invitation was sent to another email address.")
    state = invitation_status(inv)
    if state != "pending":
        raise Gone(f"The invitation is {state}.", state=state)
    existing = await session.scalar(
        select(FirmMember).where(FirmMember.firm_id == firm_id, FirmMember.user_id == user.id)
    )
    if existing is not None:
        raise AlreadyExists("You are already a member of this firm.")
    inv.accepted_at = utcnow()
    inv.accepted_by = user.id
    member = FirmMember(id=new_id("fm"), firm_id=firm_id, user_id=user.id, role=inv.role)
    session.add(member)
    _publish(session, FirmMemberAddedV1(firm_id=firm_id, user_id=user.id, role=inv.role))
    audit.record(
        session,
        principal,
        "firm.invitation_accepted",
        target_kind="invitation",
        target_id=inv.id,
        firm_id=firm_id,
    )
    return member


# -- clusters ------------------------------------------------------------------------
async def acting_firm(session: AsyncSession, principal: Principal, *, admin: bool) -> Firm:
    """The firm the token acts for; with ``admin``, the caller must be allowed to run it."""
    if not principal.firm_id:
        raise Forbidden("The token acts for no firm: create or join a firm, then sign in again.")
    if principal.kind == "client":
        firm = await session.get(Firm, principal.firm_id)
        if firm is None:
            raise Forbidden("The client's firm no longer exists.")
        if admin and not principal.has("membership:write"):
            raise Forbidden("Needs scope membership:write.")
        return firm
    roles = ADMIN_ROLES if admin else None
    try:
        firm, _ = await require_firm(session, principal.firm_id, principal, roles)
    except NotFound:
        raise Forbidden("You are no longer a member of the token's firm.") from None
    member = await _target_member(session, firm.id, principal.subject)
    if member.status != "active":
        raise Forbidden("Your membership of this firm is deactivated.")
    return firm


async def _cluster(session: AsyncSession, cluster_id: str, *, lock: bool = False) -> Cluster:
    query = select(Cluster).where(Cluster.id == cluster_id)
    if lock:
        query = query.with_for_update()
    cluster = (await session.execute(query)).scalar_one_or_none()
    if cluster is None:
        raise NotFound("No cluster with this id.")
    return cluster


async def _membership(session: AsyncSession, cluster_id: str, firm_id: str) -> ClusterMember | None:
    return await session.scalar(
        select(ClusterMember).where(
            ClusterMember.cluster_id == cluster_id, ClusterMember.firm_id == firm_id
        )
    )


async def member_cluster(
    session: AsyncSession,
    principal: Principal,
    cluster_id: str,
    *,
    admin: bool = False,
    lock: bool = False,
    operator: bool = False,
) -> tuple[Cluster, Firm]:
    """A cluster the acting firm belongs to; 404 for outsiders.

    The hot path of every cluster read, so it is one query: the cluster, the acting firm,
    the caller's membership of that firm and the firm's membership of the cluster. It
    answers exactly as :func:`acting_firm` followed by the cluster checks would.
    With ``operator``, the acting firm must run the cluster (403 for other members).
    """
    firm_id = principal.firm_id
    if not firm_id:
        raise Forbidden("The token acts for no firm: create or join a firm, then sign in again.")
    user_id = principal.subject if principal.kind == "user" else ""
    query = (
        sa.select(
            Cluster,
            Firm,
            col(FirmMember.role),
            col(FirmMember.status),
            col(ClusterMember.status),
        )
        .select_from(Cluster)
        .outerjoin(Firm, col(Firm.id) == firm_id)
        .outerjoin(
            FirmMember,
            sa.and_(col(FirmMember.firm_id) == firm_id, col(FirmMember.user_id) == user_id),
        )
        .outerjoin(
            ClusterMember,
            sa.and_(
                col(ClusterMember.cluster_id) == col(Cluster.id),
                col(ClusterMember.firm_id) == firm_id,
            ),
        )
        .where(col(Cluster.id) == cluster_id)
    )
    if lock:
        query = query.with_for_update(of=Cluster)
    row = (await session.execute(query)).one_or_none()
    if row is None:
        await acting_firm(session, principal, admin=admin)  # its 403s come first
        raise NotFound("No cluster with this id.")
    cluster, firm, role, member_status, cluster_status = row
    if principal.kind == "client":
        if firm is None:
            raise Forbidden("The client's firm no longer exists.")
    else:
        if role is None or firm is None:
            raise Forbidden("You are no longer a member of the token's firm.")
        if member_status != "active":
            raise Forbidden("Your membership of this firm is deactivated.")
    if admin:
        _check_firm_admin(principal, role)
    if cluster_status != "active":
        raise NotFound("No cluster with this id among your firm's clusters.")
    if operator:
        if cluster.operator_firm_id != firm.id:
            raise Forbidden("Only the cluster's operator may do this.")
        _check_firm_admin(principal, role)
    return cluster, firm


def _check_firm_admin(principal: Principal, role: str | None) -> None:
    if principal.kind == "client":
        if not principal.has("membership:write"):
            raise Forbidden("Needs scope membership:write.")
    elif role not in ADMIN_ROLES:
        raise Forbidden(f"Needs one of the firm roles: {', '.join(sorted(ADMIN_ROLES))}.")


async def operated_cluster(
    session: AsyncSession, principal: Principal, cluster_id: str, *, lock: bool = False
) -> tuple[Cluster, Firm]:
    """A cluster run by the acting firm; members get 403, outsiders 404."""
    return await member_cluster(session, principal, cluster_id, lock=lock, operator=True)


async def create_cluster(session: AsyncSession, principal: Principal, **fields: Any) -> Cluster:
    firm = await acting_firm(session, principal, admin=True)
    cluster = Cluster(id=new_id("cl"), operator_firm_id=firm.id, **fields)
    session.add(cluster)
    await session.flush()
    session.add(ClusterMember(id=new_id("cm"), cluster_id=cluster.id, firm_id=firm.id))
    _publish(
        session,
        ClusterCreatedV1(
            cluster_id=cluster.id,
            name=cluster.name,
            core_region=cluster.core_region,
            focus_industries=list(cluster.focus_industries),
            operator_firm_id=firm.id,
        ),
    )
    _publish(session, ClusterMemberJoinedV1(cluster_id=cluster.id, **_firm_profile(firm)))
    audit.record(
        session,
        principal,
        "cluster.created",
        target_kind="cluster",
        target_id=cluster.id,
        firm_id=firm.id,
        cluster_id=cluster.id,
    )
    return cluster


async def member_count(session: AsyncSession, cluster_ids: Sequence[str]) -> dict[str, int]:
    if not cluster_ids:
        return {}
    rows = await session.execute(
        select(ClusterMember.cluster_id, sa.func.count())
        .where(col(ClusterMember.cluster_id).in_(cluster_ids), ClusterMember.status == "active")
        .group_by(ClusterMember.cluster_id)
    )
    return {cid: int(n) for cid, n in rows.all()}


async def list_clusters(
    session: AsyncSession, principal: Principal, *, mine: bool, after: str | None, limit: int
) -> tuple[list[Cluster], set[str]]:
    """The public directory of clusters (or only the acting firm's, with ``mine``)."""
    member_of: set[str] = set()
    if principal.firm_id:
        rows = await session.execute(
            select(ClusterMember.cluster_id).where(
                ClusterMember.firm_id == principal.firm_id, ClusterMember.status == "active"
            )
        )
        member_of = set(rows.scalars())
    query = select(Cluster).order_by(Cluster.id).limit(limit + 1)
    if mine:
        query = query.where(col(Cluster.id).in_(member_of))
    if after:
        query = query.where(Cluster.id > after)
    return list((await session.execute(query)).scalars()), member_of


async def update_cluster(
    session: AsyncSession, principal: Principal, cluster_id: str, changes: dict[str, Any]
) -> Cluster:
    cluster, firm = await operated_cluster(session, principal, cluster_id)
    for key, value in changes.items():
        setattr(cluster, key, value)
    audit.record(
        session,
        principal,
        "cluster.updated",
        target_kind="cluster",
        target_id=cluster.id,
        firm_id=firm.id,
        cluster_id=cluster.id,
        detail={"fields": sorted(changes)},
    )
    return cluster


async def _join(session: AsyncSession, cluster: Cluster, firm: Firm) -> ClusterMember:
    membership = await _membership(session, cluster.id, firm.id)
    if membership is None:
        membership = ClusterMember(id=new_id("cm"), cluster_id=cluster.id, firm_id=firm.id)
        session.add(membership)
    else:
        membership.status = "active"
        membership.joined_at = utcnow()
        membership.left_at = None
        membership.park_id = None
    _publish(session, ClusterMemberJoinedV1(cluster_id=cluster.id, **_firm_profile(firm)))
    return membership


async def _ensure_not_member(session: AsyncSession, cluster_id: str, firm_id: str) -> None:
    membership = await _membership(session, cluster_id, firm_id)
    if membership is not None and membership.status == "active":
        raise AlreadyExists("The firm is already a member of this cluster.")


async def request_to_join(
    session: AsyncSession, principal: Principal, cluster_id: str, message: str
) -> JoinRequest:
    firm = await acting_firm(session, principal, admin=True)
    cluster = await _cluster(session, cluster_id)
    await _ensure_not_member(session, cluster_id, firm.id)
    pending = await session.scalar(
        select(JoinRequest.id).where(
            JoinRequest.cluster_id == cluster_id,
            JoinRequest.firm_id == firm.id,
            JoinRequest.status == "pending",
        )
    )
    if pending:
        raise AlreadyExists(
            "The firm already has a pending request to join.", join_request_id=pending
        )
    request = JoinRequest(
        id=new_id("jr"),
        cluster_id=cluster.id,
        firm_id=firm.id,
        message=message,
        created_by=principal.subject,
    )
    session.add(request)
    audit.record(
        session,
        principal,
        "cluster.join_requested",
        target_kind="join_request",
        target_id=request.id,
        firm_id=firm.id,
        cluster_id=cluster.id,
    )
    return request


async def list_join_requests(
    session: AsyncSession,
    principal: Principal,
    cluster_id: str,
    *,
    status: str | None,
    after: str | None,
    limit: int,
) -> list[tuple[JoinRequest, Firm]]:
    """The operator sees every request; an applicant firm sees its own."""
    firm = await acting_firm(session, principal, admin=False)
    cluster = await _cluster(session, cluster_id)
    query = (
        select(JoinRequest, Firm)
        .join(Firm, col(Firm.id) == JoinRequest.firm_id)
        .where(JoinRequest.cluster_id == cluster_id)
    )
    if cluster.operator_firm_id == firm.id:
        await acting_firm(session, principal, admin=True)
    else:
        query = query.where(JoinRequest.firm_id == firm.id)
        if not await session.scalar(query.with_only_columns(sa.func.count())):
            raise NotFound("No cluster with this id among those you applied to or belong to.")
    if status:
        query = query.where(JoinRequest.status == status)
    if after:
        query = query.where(JoinRequest.id > after)
    rows = await session.execute(query.order_by(JoinRequest.id).limit(limit + 1))
    return [(r, f) for r, f in rows.all()]


async def _join_request(session: AsyncSession, cluster_id: str, request_id: str) -> JoinRequest:
    request = (
        await session.execute(
            select(JoinRequest).where(JoinRequest.id == request_id).with_for_update()
        )
    ).scalar_one_or_none()
    if request is None or request.cluster_id != cluster_id:
        raise NotFound("No join request with this id.")
    return request


async def decide_join_request(
    session: AsyncSession,
    principal: Principal,
    cluster_id: str,
    request_id: str,
    *,
    approve: bool,
    reason: str | None,
) -> tuple[JoinRequest, Firm]:
    cluster, operator = await operated_cluster(session, principal, cluster_id, lock=True)
    request = await _join_request(session, cluster_id, request_id)
    if request.status != "pending":
        raise InvalidState(f"The request is {request.status}.", state=request.status)
    firm = await session.get(Firm, request.firm_id)
    assert firm is not None
    request.status = "approved" if approve else "rejected"
    request.reason = reason
    request.decided_by = principal.subject
    request.decided_at = utcnow()
    if approve:
        await _ensure_not_member(session, cluster_id, firm.id)
        await _join(session, cluster, firm)
    audit.record(
        session,
        principal,
        "cluster.join_approved" if approve else "cluster.join_rejected",
        target_kind="join_request",
        target_id=request.id,
        firm_id=operator.id,
        cluster_id=cluster.id,
        detail={"applicant_firm_id": firm.id, **({"reason": reason} if reason else {})},
    )
    return request, firm


async def withdraw_join_request(
    session: AsyncSession, principal: Principal, cluster_id: str, request_id: str
) -> tuple[JoinRequest, Firm]:
    firm = await acting_firm(session, principal, admin=True)
    request = await _join_request(session, cluster_id, request_id)
    if request.firm_id != firm.id:
        raise NotFound("No join request with this id.")
    if request.status != "pending":
        raise InvalidState(f"The request is {request.status}.", state=request.status)
    request.status = "withdrawn"
    request.decided_at = utcnow()
    request.decided_by = principal.subject
    audit.record(
        session,
        principal,
        "cluster.join_withdrawn",
        target_kind="join_request",
        target_id=request.id,
        firm_id=firm.id,
        cluster_id=cluster_id,
    )
    return request, firm


def cluster_invitation_status(inv: ClusterInvitation) -> str:
    if inv.status == "pending" and inv.expires_at <= utcnow():
        return "expired"
    return inv.status


async def invite_firm(
    session: AsyncSession, principal: Principal, cluster_id: str, *, firm_id: str, message: str
) -> ClusterInvitation:
    cluster, operator = await operated_cluster(session, principal, cluster_id)
    firm = await session.get(Firm, firm_id)
    if firm is None:
        raise NotFound("No firm with this id.")
    await _ensure_not_member(session, cluster_id, firm_id)
    pending = await session.scalar(
        select(ClusterInvitation.id).where(
            ClusterInvitation.cluster_id == cluster_id,
            ClusterInvitation.firm_id == firm_id,
            ClusterInvitation.status == "pending",
            ClusterInvitation.expires_at > utcnow(),
        )
    )
    if pending:
        raise AlreadyExists("The firm already has a pending invitation.", invitation_id=pending)
    inv = ClusterInvitation(
        id=new_id("cinv"),
        cluster_id=cluster.id,
        firm_id=firm_id,
        message=message,
        invited_by=principal.subject,
        expires_at=utcnow() + CLUSTER_INVITATION_TTL,
    )
    session.add(inv)
    audit.record(
        session,
        principal,
        "cluster.firm_invited",
        target_kind="cluster_invitation",
        target_id=inv.id,
        firm_id=operator.id,
        cluster_id=cluster.id,
        detail={"invited_firm_id": firm_id},
    )
    return inv


async def list_cluster_invitations(
    session: AsyncSession, principal: Principal, cluster_id: str, *, after: str | None, limit: int
) -> tuple[Cluster, list[ClusterInvitation]]:
    firm = await acting_firm(session, principal, admin=False)
    cluster = await _cluster(session, cluster_id)
    query = select(ClusterInvitation).where(ClusterInvitation.cluster_id == cluster_id)
    if cluster.operator_firm_id == firm.id:
        await acting_firm(session, principal, admin=True)
    else:
        query = query.where(ClusterInvitation.firm_id == firm.id)
        if not await session.scalar(query.with_only_columns(sa.func.count())):
            raise NotFound("No cluster with this id among those that invited your firm.")
    if after:
        query = query.where(ClusterInvitation.id > after)
    rows = await session.execute(query.order_by(ClusterInvitation.id).limit(limit + 1))
    return cluster, list(rows.scalars())


async def answer_cluster_invitation(
    session: AsyncSession,
    principal: Principal,
    cluster_id: str,
    invitation_id: str,
    *,
    accept: bool,
) -> tuple[Cluster, ClusterInvitation]:
    firm = await acting_firm(session, principal, admin=True)
    cluster = await _cluster(session, cluster_id, lock=True)
    inv = (
        await session.execute(
            select(ClusterInvitation).where(ClusterInvitation.id == invitation_id).with_for_update()
        )
    ).scalar_one_or_none()
    if inv is None or inv.cluster_id != cluster_id or inv.firm_id != firm.id:
        raise NotFound("No invitation with this id for your firm.")
    state = cluster_invitation_status(inv)
    if state != "pending":
        raise InvalidState(f"The invitation is {state}.", state=state)
    inv.status = "accepted" if accept else "declined"
    inv.decided_at = utcnow()
    if accept:
        await _ensure_not_member(session, cluster_id, firm.id)
        await _join(session, cluster, firm)
    audit.record(
        session,
        principal,
        f"cluster.invitation_{inv.status}",
        target_kind="cluster_invitation",
        target_id=inv.id,
        firm_id=firm.id,
        cluster_id=cluster_id,
    )
    return cluster, inv


async def revoke_cluster_invitation(
    session: AsyncSession, principal: Principal, cluster_id: str, invitation_id: str
) -> tuple[Cluster, ClusterInvitation]:
    cluster, operator = await operated_cluster(session, principal, cluster_id)
    inv = await session.get(ClusterInvitation, invitation_id)
    if inv is None or inv.cluster_id != cluster_id:
        raise NotFound("No invitation with this id.")
    state = cluster_invitation_status(inv)
    if state != "pending":
        raise InvalidState(f"The invitation is {state}.", state=state)
    inv.status = "revoked"
    inv.decided_at = utcnow()
    audit.record(
        session,
        principal,
        "cluster.invitation_revoked",
        target_kind="cluster_invitation",
        target_id=inv.id,
        firm_id=operator.id,
        cluster_id=cluster_id,
    )
    return cluster, inv


async def list_members(
    session: AsyncSession,
    principal: Principal,
    cluster_id: str,
    *,
    region: str | None,
    actor_type: str | None,
    industry: str | None,
    after: str | None,
    limit: int,
) -> tuple[Cluster, list[sa.Row[Any]]]:
    """Member rows with just the columns a listing shows (no ORM objects to build)."""
    cluster, _ = await member_cluster(session, principal, cluster_id)
    query: Any = (
        sa.select(
            col(ClusterMember.id).label("membership_id"),
            col(ClusterMember.park_id),
            col(ClusterMember.joined_at),
            col(Firm.id).label("firm_id"),
            col(Firm.name),
            col(Firm.region),
            col(Firm.city),
            col(Firm.actor_type),
            col(Firm.industries),
        )
        .join(Firm, col(Firm.id) == ClusterMember.firm_id)
        .where(col(ClusterMember.cluster_id) == cluster_id, col(ClusterMember.status) == "active")
    )
    if region:
        query = query.where(col(Firm.region) == region.upper())
    if actor_type:
        query = query.where(col(Firm.actor_type) == actor_type)
    if industry:
        codes = select(FirmIndustry.firm_id).where(
            sa.or_(col(FirmIndustry.code) == industry, col(FirmIndustry.code).startswith(industry))
            if len(industry) == 2
            else FirmIndustry.code == industry
        )
        query = query.where(col(Firm.id).in_(codes))
    if after:
        query = query.where(col(ClusterMember.id) > after)
    rows = await session.execute(query.order_by(col(ClusterMember.id)).limit(limit + 1))
    return cluster, list(rows.all())


async def get_member(
    session: AsyncSession, principal: Principal, cluster_id: str, firm_id: str
) -> tuple[Cluster, ClusterMember, Firm]:
    cluster, _ = await member_cluster(session, principal, cluster_id)
    membership = await _membership(session, cluster_id, firm_id)
    firm = await session.get(Firm, firm_id)
    if membership is None or membership.status != "active" or firm is None:
        raise NotFound("No member firm with this id in the cluster.")
    return cluster, membership, firm


async def remove_cluster_member(
    session: AsyncSession, principal: Principal, cluster_id: str, firm_id: str, reason: str
) -> None:
    """The operator offboards a member, or a member firm leaves by itself."""
    acting = await acting_firm(session, principal, admin=True)
    cluster, _ = await member_cluster(session, principal, cluster_id, lock=True)
    leaving_self = acting.id == firm_id
    if not leaving_self and cluster.operator_firm_id != acting.id:
        raise Forbidden("Only the cluster's operator may offboard other firms.")
    if firm_id == cluster.operator_firm_id:
        raise InvalidState("The operator cannot leave or offboard itself.")
    membership = await _membership(session, cluster_id, firm_id)
    firm = await session.get(Firm, firm_id)
    if membership is None or membership.status != "active" or firm is None:
        raise NotFound("No member firm with this id in the cluster.")
    membership.status = "left" if leaving_self else "offboarded"
    membership.left_at = utcnow()
    located_park = membership.park_id
    membership.park_id = None
    _publish(
        session,
        ClusterMemberLeftV1(cluster_id=cluster_id, reason=membership.status, **_firm_profile(firm)),
    )
    if located_park:
        park = await session.get(Park, located_park)
        if park is not None:
            await session.flush()
            await _publish_park(session, park)
    audit.record(
        session,
        principal,
        "cluster.member_left" if leaving_self else "cluster.member_offboarded",
        target_kind="firm",
        target_id=firm_id,
        firm_id=acting.id,
        cluster_id=cluster_id,
        detail={"reason": reason} if reason else {},
    )


async def locate_member(
    session: AsyncSession, principal: Principal, cluster_id: str, firm_id: str, park_id: str | None
) -> tuple[ClusterMember, Firm]:
    """A member firm declares the park it sits in (only for itself)."""
    acting = await acting_firm(session, principal, admin=True)
    await member_cluster(session, principal, cluster_id)
    if acting.id != firm_id:
        membership = await _membership(session, cluster_id, firm_id)
        if membership is None or membership.status != "active":
            raise NotFound("No member firm with this id in the cluster.")
        raise Forbidden("A firm declares its own park.")
    membership = await _membership(session, cluster_id, firm_id)
    assert membership is not None
    previous = membership.park_id
    if park_id is not None:
        park = await session.get(Park, park_id)
        if park is None or park.cluster_id != cluster_id:
            raise Unprocessable(
                "No park with this id in the cluster.",
                errors=[{"loc": ["body", "park_id"], "msg": "unknown park", "type": "value_error"}],
            )
    membership.park_id = park_id
    await session.flush()
    for changed in {previous, park_id} - {None}:
        park = await session.get(Park, changed)
        if park is not None:
            await _publish_park(session, park)
    audit.record(
        session,
        principal,
        "cluster.member_located",
        target_kind="firm",
        target_id=firm_id,
        firm_id=firm_id,
        cluster_id=cluster_id,
        detail={"park_id": park_id},
    )
    return membership, acting


# -- parks ---------------------------------------------------------------------------
async def park_occupancy(session: AsyncSession, park_ids: Sequence[str]) -> dict[str, list[str]]:
    if not park_ids:
        return {}
    rows = await session.execute(
        select(ClusterMember.park_id, ClusterMember.firm_id).where(
            col(ClusterMember.park_id).in_(park_ids),
            ClusterMember.status == "active",
        )
    )
    out: dict[str, list[str]] = {pid: [] for pid in park_ids}
    for park_id, firm_id in rows.all():
        out[park_id].append(firm_id)
    return out


async def _publish_park(session: AsyncSession, park: Park) -> None:
    located = (await park_occupancy(session, [park.id]))[park.id]
    _publish(
        session,
        ParkUpdatedV1(
            cluster_id=park.cluster_id,
            park_id=park.id,
            name=park.name,
            region=park.region,
            city=park.city,
            capacity=park.capacity,
            located_firm_ids=sorted(located),
        ),
    )


async def create_park(
    session: AsyncSession, principal: Principal, cluster_id: str, **fields: Any
) -> Park:
    cluster, operator = await operated_cluster(session, principal, cluster_id)
    park = Park(id=new_id("park"), cluster_id=cluster.id, **fields)
    session.add(park)
    await session.flush()
    await _publish_park(session, park)
    audit.record(
        session,
        principal,
        "park.registered",
        target_kind="park",
        target_id=park.id,
        firm_id=operator.id,
        cluster_id=cluster.id,
    )
    return park


async def update_park(
    session: AsyncSession,
    principal: Principal,
    cluster_id: str,
    park_id: str,
    changes: dict[str, Any],
) -> Park:
    cluster, operator = await operated_cluster(session, principal, cluster_id)
    park = await session.get(Park, park_id)
    if park is None or park.cluster_id != cluster_id:
        raise NotFound("No park with this id.")
    for key, value in changes.items():
        setattr(park, key, value)
    park.updated_at = utcnow()
    await session.flush()
    await _publish_park(session, park)
    audit.record(
        session,
        principal,
        "park.updated",
        target_kind="park",
        target_id=park.id,
        firm_id=operator.id,
        cluster_id=cluster.id,
        detail={"fields": sorted(changes)},
    )
    return park


async def list_parks(
    session: AsyncSession, principal: Principal, cluster_id: str, *, after: str | None, limit: int
) -> list[Park]:
    await member_cluster(session, principal, cluster_id)
    query = select(Park).where(Park.cluster_id == cluster_id).order_by(Park.id).limit(limit + 1)
    if after:
        query = query.where(Park.id > after)
    return list((await session.execute(query)).scalars())


async def get_park(
    session: AsyncSession, principal: Principal, cluster_id: str, park_id: str
) -> Park:
    await member_cluster(session, principal, cluster_id)
    park = await session.get(Park, park_id)
    if park is None or park.cluster_id != cluster_id:
        raise NotFound("No park with this id.")
    return park


# -- audit ---------------------------------------------------------------------------
async def audit_events(
    session: AsyncSession,
    *,
    firm_id: str | None = None,
    cluster_id: str | None = None,
    action: str | None = None,
    before: str | None,
    limit: int,
) -> list[AuditEvent]:
    """Newest first; the cursor pages towards older events."""
    query = select(AuditEvent)
    if firm_id:
        query = query.where(AuditEvent.firm_id == firm_id)
    if cluster_id:
        query = query.where(AuditEvent.cluster_id == cluster_id)
    if action:
        query = query.where(AuditEvent.action == action)
    if before:
        query = query.where(AuditEvent.id < before)
    rows = await session.execute(query.order_by(AuditEvent.id.desc()).limit(limit + 1))  # type: ignore[attr-defined]
    return list(rows.scalars())
