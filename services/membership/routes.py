"""HTTP routes of the membership service: users, firms, clusters, parks, audit, reference.

Actions that are not plain CRUD are ``POST …/{id}:verb`` sub-resources
(``/v1/clusters/{id}/join-requests/{rid}:approve``), as in Google's API design guide.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response, status

from api.events import ActorType
from services.kit.auth import CurrentUser, Principal
from services.kit.errors import responses
from services.kit.pagination import Page, PageParams, page_of
from services.membership import service
from services.membership.access import ADMIN_ROLES, require_firm
from services.membership.deps import MembershipReader, MembershipWriter, SessionDep
from services.membership.models import (
    AuditEvent,
    Cluster,
    ClusterInvitation,
    ClusterMember,
    Firm,
    FirmInvitation,
    FirmMember,
    JoinRequest,
    Park,
    User,
)
from services.membership.reference import industry_taxonomy, regions
from services.membership.schemas import (
    AuditEventOut,
    ClusterCreate,
    ClusterInvitationCreate,
    ClusterInvitationOut,
    ClusterMemberOut,
    ClusterOut,
    ClusterUpdate,
    FirmCreate,
    FirmInvitationCreate,
    FirmInvitationCreated,
    FirmInvitationOut,
    FirmMemberOut,
    FirmOut,
    FirmUpdate,
    InvitationAccept,
    JoinRequestCreate,
    JoinRequestOut,
    Me,
    MemberUpdate,
    MyFirm,
    Offboard,
    ParkCreate,
    ParkOut,
    ParkUpdate,
    RegionOut,
    Rejection,
    RoleChange,
    SignUp,
    UserOut,
    UserUpdate,
)

router = APIRouter(prefix="/v1")
ERR = responses(400, 401, 403, 404, 409, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]


# -- users ---------------------------------------------------------------------------
def user_out(user: User) -> UserOut:
    return UserOut.model_validate(user, from_attributes=True)


@router.post(
    "/users",
    status_code=201,
    response_model=UserOut,
    tags=["users"],
    summary="Sign up",
    responses=responses(400, 409, 422, 429),
)
async def sign_up(body: SignUp, session: SessionDep) -> UserOut:
    user = await service.sign_up(
        session, email=str(body.email), password=body.password, display_name=body.display_name
    )
    return user_out(user)


async def _me(session: SessionDep, principal: Principal) -> Me:
    user = await service.get_active_user(session, principal)
    firms = [
        MyFirm(firm_id=f.id, name=f.name, role=m.role, status=m.status)
        for f, m in await service.my_firms(session, user.id)
    ]
    return Me(**user_out(user).model_dump(), firms=firms)


@router.get(
    "/users/me", response_model=Me, tags=["users"], summary="Your profile and firms", responses=ERR
)
async def get_me(session: SessionDep, principal: CurrentUser) -> Me:
    return await _me(session, principal)


@router.patch(
    "/users/me",
    response_model=Me,
    tags=["users"],
    summary="Change your name or password",
    responses=ERR,
)
async def patch_me(body: UserUpdate, session: SessionDep, principal: MembershipWriter) -> Me:
    await service.update_me(
        session,
        principal,
        display_name=body.display_name,
        password=body.password,
        current_password=body.current_password,
    )
    return await _me(session, principal)


@router.post(
    "/users/me:deactivate",
    response_model=UserOut,
    tags=["users"],
    summary="Deactivate your account",
    responses=ERR,
)
async def deactivate_me(
    request: Request, session: SessionDep, principal: MembershipWriter
) -> UserOut:
    user = await service.deactivate_me(session, principal, request.app.state.runtime.denylist)
    return user_out(user)


# -- firms ---------------------------------------------------------------------------
def firm_out(firm: Firm) -> FirmOut:
    return FirmOut.model_validate(firm, from_attributes=True)


@router.post(
    "/firms",
    status_code=201,
    response_model=FirmOut,
    tags=["firms"],
    summary="Register a firm; you become its owner",
    responses=ERR,
)
async def create_firm(
    body: FirmCreate, session: SessionDep, principal: MembershipWriter
) -> FirmOut:
    return firm_out(await service.create_firm(session, principal, **body.model_dump()))


@router.get(
    "/firms", response_model=Page[FirmOut], tags=["firms"], summary="Your firms", responses=ERR
)
async def list_firms(
    session: SessionDep, principal: MembershipReader, page: PageParams
) -> Page[Any]:
    if principal.kind == "client":
        firm = await session.get(Firm, principal.firm_id) if principal.firm_id else None
        return Page[Any](items=[firm_out(firm)] if firm else [], next_cursor=None)
    pairs = [
        p
        for p in await service.my_firms(session, principal.subject)
        if not page.after or p[1].id > page.after
    ]
    pairs.sort(key=lambda p: p[1].id)
    rows = pairs[: page.limit + 1]
    return page_of([firm_out(f) for f, _ in rows], rows, page.limit, lambda p: p[1].id)


@router.get(
    "/firms/{firm_id}",
    response_model=FirmOut,
    tags=["firms"],
    summary="A firm you belong to",
    responses=ERR,
)
async def get_firm(firm_id: Id, session: SessionDep, principal: MembershipReader) -> FirmOut:
    firm, _ = await require_firm(session, firm_id, principal)
    return firm_out(firm)


@router.patch(
    "/firms/{firm_id}",
    response_model=FirmOut,
    tags=["firms"],
    summary="Change a firm's profile (owner, admin)",
    responses=ERR,
)
async def patch_firm(
    firm_id: Id, body: FirmUpdate, session: SessionDep, principal: MembershipWriter
) -> FirmOut:
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    return firm_out(await service.update_firm(session, principal, firm_id, changes))


def member_out(member: FirmMember, user: User) -> FirmMemberOut:
    return FirmMemberOut(
        user_id=user.id,
        email=user.email,
        display_name=user.display_name,
        role=member.role,
        status=member.status,
        joined_at=member.created_at,
    )


@router.get(
    "/firms/{firm_id}/members",
    response_model=Page[FirmMemberOut],
    tags=["firms"],
    summary="The firm's users",
    responses=ERR,
)
async def list_firm_members(
    firm_id: Id, session: SessionDep, principal: MembershipReader, page: PageParams
) -> Page[Any]:
    rows = await service.firm_members(
        session, principal, firm_id, after=page.after, limit=page.limit
    )
    return page_of([member_out(m, u) for m, u in rows], rows, page.limit, lambda r: r[0].id)


async def _member_view(session: SessionDep, firm_id: str, user_id: str) -> FirmMemberOut:
    user = await session.get(User, user_id)
    member = await service._target_member(session, firm_id, user_id)
    assert user is not None
    return member_out(member, user)


@router.patch(
    "/firms/{firm_id}/members/{user_id}",
    response_model=FirmMemberOut,
    tags=["firms"],
    summary="Change a member's role",
    responses=ERR,
)
async def change_member_role(
    firm_id: Id, user_id: Id, body: RoleChange, session: SessionDep, principal: MembershipWriter
) -> FirmMemberOut:
    await service.change_role(session, principal, firm_id, user_id, body.role)
    return await _member_view(session, firm_id, user_id)


@router.delete(
    "/firms/{firm_id}/members/{user_id}",
    status_code=204,
    tags=["firms"],
    summary="Remove a member (or leave the firm yourself)",
    responses=ERR,
)
async def remove_firm_member(
    firm_id: Id, user_id: Id, request: Request, session: SessionDep, principal: MembershipWriter
) -> Response:
    await service.remove_member(
        session, principal, firm_id, user_id, request.app.state.runtime.denylist
    )
    return Response(status_code=204)


@router.post(
    "/firms/{firm_id}/members/{user_id}:deactivate",
    response_model=FirmMemberOut,
    tags=["firms"],
    summary="Suspend a member; their tokens stop working at once",
    responses=ERR,
)
async def deactivate_member(
    firm_id: Id, user_id: Id, request: Request, session: SessionDep, principal: MembershipWriter
) -> FirmMemberOut:
    await service.set_member_status(
        session, principal, firm_id, user_id, "deactivated", request.app.state.runtime.denylist
    )
    return await _member_view(session, firm_id, user_id)


@router.post(
    "/firms/{firm_id}/members/{user_id}:reactivate",
    response_model=FirmMemberOut,
    tags=["firms"],
    summary="Lift a member's suspension",
    responses=ERR,
)
async def reactivate_member(
    firm_id: Id, user_id: Id, request: Request, session: SessionDep, principal: MembershipWriter
) -> FirmMemberOut:
    await service.set_member_status(
        session, principal, firm_id, user_id, "active", request.app.state.runtime.denylist
    )
    return await _member_view(session, firm_id, user_id)


def firm_invitation_out(inv: FirmInvitation) -> FirmInvitationOut:
    return FirmInvitationOut(
        id=inv.id,
        firm_id=inv.firm_id,
        email=inv.email_normalized,
        role=inv.role,
        status=service.invitation_status(inv),
        created_at=inv.created_at,
        expires_at=inv.expires_at,
    )


@router.post(
    "/firms/{firm_id}/invitations",
    status_code=201,
    response_model=FirmInvitationCreated,
    tags=["firms"],
    summary="Invite a user by email (owner, admin)",
    responses=ERR,
)
async def invite_user(
    firm_id: Id,
    body: FirmInvitationCreate,
    session: SessionDep,
    principal: MembershipWriter,
    response: Response,
) -> FirmInvitationCreated:
    response.headers["Cache-Control"] = "no-store"  # the invitation token is shown once
    inv, token = await service.invite_user(
        session, principal, firm_id, email=str(body.email), role=body.role
    )
    await session.flush()
    return FirmInvitationCreated(**firm_invitation_out(inv).model_dump(), token=token)


@router.get(
    "/firms/{firm_id}/invitations",
    response_model=Page[FirmInvitationOut],
    tags=["firms"],
    summary="The firm's invitations (owner, admin)",
    responses=ERR,
)
async def list_firm_invitations(
    firm_id: Id, session: SessionDep, principal: MembershipReader, page: PageParams
) -> Page[Any]:
    rows = await service.list_firm_invitations(
        session, principal, firm_id, after=page.after, limit=page.limit
    )
    return page_of([firm_invitation_out(i) for i in rows], rows, page.limit, lambda i: i.id)


@router.post(
    "/firms/{firm_id}/invitations/{invitation_id}:revoke",
    response_model=FirmInvitationOut,
    tags=["firms"],
    summary="Withdraw an invitation",
    responses=ERR,
)
async def revoke_firm_invitation(
    firm_id: Id, invitation_id: Id, session: SessionDep, principal: MembershipWriter
) -> FirmInvitationOut:
    return firm_invitation_out(
        await service.revoke_firm_invitation(session, principal, firm_id, invitation_id)
    )


@router.post(
    "/firms/{firm_id}/invitations/{invitation_id}:accept",
    response_model=FirmMemberOut,
    tags=["firms"],
    summary="Accept an invitation sent to your email",
    responses=responses(400, 401, 403, 404, 409, 410, 422, 429),
)
async def accept_firm_invitation(
    firm_id: Id,
    invitation_id: Id,
    body: InvitationAccept,
    session: SessionDep,
    principal: MembershipWriter,
) -> FirmMemberOut:
    member = await service.accept_firm_invitation(
        session, principal, firm_id, invitation_id, body.token
    )
    await session.flush()
    return await _member_view(session, firm_id, member.user_id)


@router.get(
    "/firms/{firm_id}/audit-events",
    response_model=Page[AuditEventOut],
    tags=["firms"],
    summary="The firm's audit log, newest first (owner, admin)",
    responses=ERR,
)
async def firm_audit(
    firm_id: Id,
    session: SessionDep,
    principal: MembershipReader,
    page: PageParams,
    action: Annotated[str | None, Query(max_length=80)] = None,
) -> Page[Any]:
    await require_firm(session, firm_id, principal, ADMIN_ROLES)
    rows = await service.audit_events(
        session, firm_id=firm_id, action=action, before=page.after, limit=page.limit
    )
    return page_of([audit_out(e) for e in rows], rows, page.limit, lambda e: e.id)


def audit_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut.model_validate(event, from_attributes=True)


# -- clusters ------------------------------------------------------------------------
def cluster_out(cluster: Cluster, counts: dict[str, int], member_of: set[str]) -> ClusterOut:
    return ClusterOut(
        id=cluster.id,
        name=cluster.name,
        description=cluster.description,
        core_region=cluster.core_region,
        focus_industries=list(cluster.focus_industries),
        operator_firm_id=cluster.operator_firm_id,
        created_at=cluster.created_at,
        member_count=counts.get(cluster.id, 0),
        is_member=cluster.id in member_of,
    )


async def _one_cluster_out(session: SessionDep, cluster: Cluster, is_member: bool) -> ClusterOut:
    counts = await service.member_count(session, [cluster.id])
    return cluster_out(cluster, counts, {cluster.id} if is_member else set())


@router.post(
    "/clusters",
    status_code=201,
    response_model=ClusterOut,
    tags=["clusters"],
    summary="Create a cluster; your firm becomes its operator",
    responses=ERR,
)
async def create_cluster(
    body: ClusterCreate, session: SessionDep, principal: MembershipWriter
) -> ClusterOut:
    cluster = await service.create_cluster(session, principal, **body.model_dump())
    await session.flush()
    return await _one_cluster_out(session, cluster, True)


@router.get(
    "/clusters",
    response_model=Page[ClusterOut],
    tags=["clusters"],
    summary="The directory of clusters (any signed-in caller)",
    responses=ERR,
)
async def list_clusters(
    session: SessionDep,
    principal: MembershipReader,
    page: PageParams,
    membership: Annotated[
        Literal["all", "mine"], Query(description="`mine`: only your firm's clusters")
    ] = "all",
) -> Page[Any]:
    rows, member_of = await service.list_clusters(
        session, principal, mine=membership == "mine", after=page.after, limit=page.limit
    )
    counts = await service.member_count(session, [c.id for c in rows[: page.limit]])
    return page_of(
        [cluster_out(c, counts, member_of) for c in rows], rows, page.limit, lambda c: c.id
    )


@router.get(
    "/clusters/{cluster_id}",
    response_model=ClusterOut,
    tags=["clusters"],
    summary="A cluster's directory entry",
    responses=ERR,
)
async def get_cluster(
    cluster_id: Id, session: SessionDep, principal: MembershipReader
) -> ClusterOut:
    cluster = await service._cluster(session, cluster_id)
    membership = (
        await service._membership(session, cluster_id, principal.firm_id)
        if principal.firm_id
        else None
    )
    return await _one_cluster_out(
        session, cluster, membership is not None and membership.status == "active"
    )


@router.patch(
    "/clusters/{cluster_id}",
    response_model=ClusterOut,
    tags=["clusters"],
    summary="Change a cluster (operator)",
    responses=ERR,
)
async def patch_cluster(
    cluster_id: Id, body: ClusterUpdate, session: SessionDep, principal: MembershipWriter
) -> ClusterOut:
    cluster = await service.update_cluster(
        session, principal, cluster_id, body.model_dump(exclude_unset=True, exclude_none=True)
    )
    return await _one_cluster_out(session, cluster, True)


def join_request_out(request: JoinRequest, firm: Firm) -> JoinRequestOut:
    return JoinRequestOut(
        id=request.id,
        cluster_id=request.cluster_id,
        firm=firm_out(firm),
        message=request.message,
        status=request.status,
        reason=request.reason,
        created_at=request.created_at,
        decided_at=request.decided_at,
    )


@router.post(
    "/clusters/{cluster_id}/join-requests",
    status_code=201,
    response_model=JoinRequestOut,
    tags=["clusters"],
    summary="Apply to join, as your token's firm",
    responses=ERR,
)
async def request_to_join(
    cluster_id: Id, body: JoinRequestCreate, session: SessionDep, principal: MembershipWriter
) -> JoinRequestOut:
    request = await service.request_to_join(session, principal, cluster_id, body.message)
    await session.flush()
    firm = await session.get(Firm, request.firm_id)
    assert firm is not None
    return join_request_out(request, firm)


@router.get(
    "/clusters/{cluster_id}/join-requests",
    response_model=Page[JoinRequestOut],
    tags=["clusters"],
    summary="Join requests (operator: all; applicants: their own)",
    responses=ERR,
)
async def list_join_requests(
    cluster_id: Id,
    session: SessionDep,
    principal: MembershipReader,
    page: PageParams,
    status_: Annotated[
        Literal["pending", "approved", "rejected", "withdrawn"] | None, Query(alias="status")
    ] = None,
) -> Page[Any]:
    rows = await service.list_join_requests(
        session, principal, cluster_id, status=status_, after=page.after, limit=page.limit
    )
    return page_of([join_request_out(r, f) for r, f in rows], rows, page.limit, lambda r: r[0].id)


@router.post(
    "/clusters/{cluster_id}/join-requests/{request_id}:approve",
    response_model=JoinRequestOut,
    tags=["clusters"],
    summary="Approve a join request (operator)",
    responses=ERR,
)
async def approve_join_request(
    cluster_id: Id, request_id: Id, session: SessionDep, principal: MembershipWriter
) -> JoinRequestOut:
    request, firm = await service.decide_join_request(
        session, principal, cluster_id, request_id, approve=True, reason=None
    )
    return join_request_out(request, firm)


@router.post(
    "/clusters/{cluster_id}/join-requests/{request_id}:reject",
    response_model=JoinRequestOut,
    tags=["clusters"],
    summary="Reject a join request with a reason (operator)",
    responses=ERR,
)
async def reject_join_request(
    cluster_id: Id,
    request_id: Id,
    body: Rejection,
    session: SessionDep,
    principal: MembershipWriter,
) -> JoinRequestOut:
    request, firm = await service.decide_join_request(
        session, principal, cluster_id, request_id, approve=False, reason=body.reason
    )
    return join_request_out(request, firm)


@router.post(
    "/clusters/{cluster_id}/join-requests/{request_id}:withdraw",
    response_model=JoinRequestOut,
    tags=["clusters"],
    summary="Withdraw your firm's pending request",
    responses=ERR,
)
async def withdraw_join_request(
    cluster_id: Id, request_id: Id, session: SessionDep, principal: MembershipWriter
) -> JoinRequestOut:
    request, firm = await service.withdraw_join_request(session, principal, cluster_id, request_id)
    return join_request_out(request, firm)


def cluster_invitation_out(cluster: Cluster, inv: ClusterInvitation) -> ClusterInvitationOut:
    return ClusterInvitationOut(
        id=inv.id,
        cluster_id=inv.cluster_id,
        cluster_name=cluster.name,
        firm_id=inv.firm_id,
        message=inv.message,
        status=service.cluster_invitation_status(inv),
        created_at=inv.created_at,
        expires_at=inv.expires_at,
        decided_at=inv.decided_at,
    )


@router.post(
    "/clusters/{cluster_id}/invitations",
    status_code=201,
    response_model=ClusterInvitationOut,
    tags=["clusters"],
    summary="Invite a firm (operator)",
    responses=ERR,
)
async def invite_firm(
    cluster_id: Id, body: ClusterInvitationCreate, session: SessionDep, principal: MembershipWriter
) -> ClusterInvitationOut:
    inv = await service.invite_firm(
        session, principal, cluster_id, firm_id=body.firm_id, message=body.message
    )
    await session.flush()
    cluster = await service._cluster(session, cluster_id)
    return cluster_invitation_out(cluster, inv)


@router.get(
    "/clusters/{cluster_id}/invitations",
    response_model=Page[ClusterInvitationOut],
    tags=["clusters"],
    summary="Invitations (operator: all; invited firms: their own)",
    responses=ERR,
)
async def list_cluster_invitations(
    cluster_id: Id, session: SessionDep, principal: MembershipReader, page: PageParams
) -> Page[Any]:
    cluster, rows = await service.list_cluster_invitations(
        session, principal, cluster_id, after=page.after, limit=page.limit
    )
    return page_of(
        [cluster_invitation_out(cluster, i) for i in rows], rows, page.limit, lambda i: i.id
    )


@router.post(
    "/clusters/{cluster_id}/invitations/{invitation_id}:accept",
    response_model=ClusterInvitationOut,
    tags=["clusters"],
    summary="Accept an invitation for your firm",
    responses=ERR,
)
async def accept_cluster_invitation(
    cluster_id: Id, invitation_id: Id, session: SessionDep, principal: MembershipWriter
) -> ClusterInvitationOut:
    return cluster_invitation_out(
        *await service.answer_cluster_invitation(
            session, principal, cluster_id, invitation_id, accept=True
        )
    )


@router.post(
    "/clusters/{cluster_id}/invitations/{invitation_id}:decline",
    response_model=ClusterInvitationOut,
    tags=["clusters"],
    summary="Decline an invitation for your firm",
    responses=ERR,
)
async def decline_cluster_invitation(
    cluster_id: Id, invitation_id: Id, session: SessionDep, principal: MembershipWriter
) -> ClusterInvitationOut:
    return cluster_invitation_out(
        *await service.answer_cluster_invitation(
            session, principal, cluster_id, invitation_id, accept=False
        )
    )


@router.post(
    "/clusters/{cluster_id}/invitations/{invitation_id}:revoke",
    response_model=ClusterInvitationOut,
    tags=["clusters"],
    summary="Withdraw an invitation (operator)",
    responses=ERR,
)
async def revoke_cluster_invitation(
    cluster_id: Id, invitation_id: Id, session: SessionDep, principal: MembershipWriter
) -> ClusterInvitationOut:
    return cluster_invitation_out(
        *await service.revoke_cluster_invitation(session, principal, cluster_id, invitation_id)
    )


def cluster_member_out(cluster: Cluster, member: ClusterMember, firm: Firm) -> ClusterMemberOut:
    return ClusterMemberOut(
        firm_id=firm.id,
        name=firm.name,
        region=firm.region,
        city=firm.city,
        actor_type=firm.actor_type,
        industries=list(firm.industries),
        is_operator=cluster.operator_firm_id == firm.id,
        park_id=member.park_id,
        joined_at=member.joined_at,
    )


@router.get(
    "/clusters/{cluster_id}/members",
    response_model=Page[ClusterMemberOut],
    tags=["clusters"],
    summary="Member firms, with filters (members)",
    responses=ERR,
)
async def list_cluster_members(
    cluster_id: Id,
    session: SessionDep,
    principal: MembershipReader,
    page: PageParams,
    region: Annotated[str | None, Query(max_length=10, description="ISO 3166-2 code")] = None,
    actor_type: Annotated[ActorType | None, Query()] = None,
    industry: Annotated[
        str | None,
        Query(
            min_length=2,
            max_length=4,
            pattern=r"^\d{2}(\d{2})?$",
            description="category (03) or sub-category (0301)",
        ),
    ] = None,
) -> Page[Any]:
    cluster, rows = await service.list_members(
        session,
        principal,
        cluster_id,
        region=region,
        actor_type=actor_type,
        industry=industry,
        after=page.after,
        limit=page.limit,
    )
    # Plain dicts: the response model validates them once (a model here would be twice).
    items = [
        {
            "firm_id": r.firm_id,
            "name": r.name,
            "region": r.region,
            "city": r.city,
            "actor_type": r.actor_type,
            "industries": r.industries,
            "is_operator": cluster.operator_firm_id == r.firm_id,
            "park_id": r.park_id,
            "joined_at": r.joined_at,
        }
        for r in rows[: page.limit]
    ]
    return page_of(items, rows, page.limit, lambda r: r.membership_id)


@router.get(
    "/clusters/{cluster_id}/members/{firm_id}",
    response_model=ClusterMemberOut,
    tags=["clusters"],
    summary="One member firm",
    responses=ERR,
)
async def get_cluster_member(
    cluster_id: Id, firm_id: Id, session: SessionDep, principal: MembershipReader
) -> ClusterMemberOut:
    return cluster_member_out(*await service.get_member(session, principal, cluster_id, firm_id))


@router.patch(
    "/clusters/{cluster_id}/members/{firm_id}",
    response_model=ClusterMemberOut,
    tags=["clusters"],
    summary="Declare the park your firm sits in",
    responses=ERR,
)
async def locate_member(
    cluster_id: Id,
    firm_id: Id,
    body: MemberUpdate,
    session: SessionDep,
    principal: MembershipWriter,
) -> ClusterMemberOut:
    member, firm = await service.locate_member(
        session, principal, cluster_id, firm_id, body.park_id
    )
    cluster = await service._cluster(session, cluster_id)
    return cluster_member_out(cluster, member, firm)


@router.delete(
    "/clusters/{cluster_id}/members/{firm_id}",
    status_code=204,
    tags=["clusters"],
    summary="Leave (your firm) or offboard (operator)",
    responses=ERR,
)
async def remove_cluster_member(
    cluster_id: Id,
    firm_id: Id,
    session: SessionDep,
    principal: MembershipWriter,
    body: Offboard | None = None,
) -> Response:
    await service.remove_cluster_member(
        session, principal, cluster_id, firm_id, body.reason if body else ""
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- parks ---------------------------------------------------------------------------
def park_out(park: Park, located: int) -> ParkOut:
    return ParkOut(
        id=park.id,
        cluster_id=park.cluster_id,
        name=park.name,
        region=park.region,
        city=park.city,
        capacity=park.capacity,
        located_firms=located,
        occupancy=round(located / park.capacity, 4) if park.capacity else 0.0,
        created_at=park.created_at,
        updated_at=park.updated_at,
    )


async def _park_view(session: SessionDep, park: Park) -> ParkOut:
    await session.flush()
    located = await service.park_occupancy(session, [park.id])
    return park_out(park, len(located[park.id]))


@router.post(
    "/clusters/{cluster_id}/parks",
    status_code=201,
    response_model=ParkOut,
    tags=["clusters"],
    summary="Register an industrial park (operator)",
    responses=ERR,
)
async def create_park(
    cluster_id: Id, body: ParkCreate, session: SessionDep, principal: MembershipWriter
) -> ParkOut:
    return await _park_view(
        session, await service.create_park(session, principal, cluster_id, **body.model_dump())
    )


@router.get(
    "/clusters/{cluster_id}/parks",
    response_model=Page[ParkOut],
    tags=["clusters"],
    summary="The cluster's parks with occupancy (members)",
    responses=ERR,
)
async def list_parks(
    cluster_id: Id, session: SessionDep, principal: MembershipReader, page: PageParams
) -> Page[Any]:
    rows = await service.list_parks(
        session, principal, cluster_id, after=page.after, limit=page.limit
    )
    located = await service.park_occupancy(session, [p.id for p in rows])
    return page_of(
        [park_out(p, len(located[p.id])) for p in rows], rows, page.limit, lambda p: p.id
    )


@router.get(
    "/clusters/{cluster_id}/parks/{park_id}",
    response_model=ParkOut,
    tags=["clusters"],
    summary="One park",
    responses=ERR,
)
async def get_park(
    cluster_id: Id, park_id: Id, session: SessionDep, principal: MembershipReader
) -> ParkOut:
    return await _park_view(
        session, await service.get_park(session, principal, cluster_id, park_id)
    )


@router.patch(
    "/clusters/{cluster_id}/parks/{park_id}",
    response_model=ParkOut,
    tags=["clusters"],
    summary="Change a park (operator)",
    responses=ERR,
)
async def patch_park(
    cluster_id: Id, park_id: Id, body: ParkUpdate, session: SessionDep, principal: MembershipWriter
) -> ParkOut:
    park = await service.update_park(
        session,
        principal,
        cluster_id,
        park_id,
        body.model_dump(exclude_unset=True, exclude_none=True),
    )
    return await _park_view(session, park)


@router.get(
    "/clusters/{cluster_id}/audit-events",
    response_model=Page[AuditEventOut],
    tags=["clusters"],
    summary="The cluster's audit log, newest first (operator)",
    responses=ERR,
)
async def cluster_audit(
    cluster_id: Id,
    session: SessionDep,
    principal: MembershipReader,
    page: PageParams,
    action: Annotated[str | None, Query(max_length=80)] = None,
) -> Page[Any]:
    await service.operated_cluster(session, principal, cluster_id)
    rows = await service.audit_events(
        session, cluster_id=cluster_id, action=action, before=page.after, limit=page.limit
    )
    return page_of([audit_out(e) for e in rows], rows, page.limit, lambda e: e.id)


# -- reference -----------------------------------------------------------------------
@router.get(
    "/industries", tags=["reference"], summary="The digital-economy industry classification"
)
async def industries() -> dict[str, Any]:
    return industry_taxonomy()


@router.get(
    "/regions", response_model=list[RegionOut], tags=["reference"], summary="ISO 3166-2 regions"
)
async def list_regions(
    country: Annotated[str, Query(min_length=2, max_length=2, pattern="^[A-Za-z]{2}$")] = "CN",
) -> list[dict[str, str]]:
    return regions(country)
