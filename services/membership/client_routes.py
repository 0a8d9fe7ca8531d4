"""Integrator clients: confidential OAuth clients a firm registers for its own systems.

A client acts for its firm through the client-credentials grant, with a scope chosen from
the API scopes. Its secret is shown once, in the response that creates or rotates it, and
stored only as a digest (see :mod:`services.membership.oauth`). Only the firm's owners and
admins manage clients, with a user token: outsiders get 404 (the firm's existence is not
revealed), lower roles 403, and a client id of another firm is 404.

Disabling a client also deny-lists its live access tokens, after the commit, so every
service refuses them at once rather than when they expire.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from services.kit.auth import Principal
from services.kit.db import utcnow
from services.kit.errors import Forbidden, NotFound, responses
from services.kit.ids import new_id
from services.kit.pagination import Page, PageParams, make_page
from services.kit.scopes import API_SCOPES
from services.membership import audit
from services.membership.access import ADMIN_ROLES, require_firm
from services.membership.deps import MembershipReader, MembershipWriter, SessionDep
from services.membership.models import AccessToken, FirmMember, OAuthClient, RefreshToken
from services.membership.oauth import generate_client_secret, hash_client_secret

router = APIRouter(prefix="/v1/firms/{firm_id}/clients", tags=["firms"])

FirmId = Annotated[str, Path(min_length=1, max_length=40, description="the firm")]
ClientId = Annotated[str, Path(min_length=1, max_length=64, description="the client_id")]
ERR = responses(400, 401, 403, 404, 422, 429)
DENY_MARGIN = 60


class ClientCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)] = (
        Field(examples=["Annotation pipeline"])
    )
    scope: str = Field(
        max_length=1000,
        description="space-separated API scopes: " + ", ".join(API_SCOPES),
        examples=["marketplace:read marketplace:write"],
    )
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = Field(
        "client_secret_basic",
        description="the method the client means to use; the token endpoint accepts both",
    )

    @field_validator("scope")
    @classmethod
    def _known_api_scopes(cls, value: str) -> str:
        scopes = list(dict.fromkeys(value.split()))
        if not scopes:
            raise ValueError("name at least one scope")
        unknown = [s for s in scopes if s not in API_SCOPES]
        if unknown:
            raise ValueError(f"not API scopes: {' '.join(unknown)}")
        return " ".join(scopes)


class ClientOut(BaseModel):
    client_id: str = Field(examples=["cli_01jd8z3c5q0m7t2w4x6y8z0a1b"])
    firm_id: str
    name: str
    scope: str
    grant_types: list[str]
    token_endpoint_auth_method: str
    disabled: bool
    created_at: datetime
    secret_rotated_at: datetime | None


class ClientWithSecret(ClientOut):
    client_secret: str = Field(description="shown only in this response; store it now")


def _out(row: OAuthClient) -> ClientOut:
    return ClientOut(
        client_id=row.id,
        firm_id=row.firm_id or "",
        name=row.name,
        scope=row.scope,
        grant_types=list(row.grant_types),
        token_endpoint_auth_method=row.token_endpoint_auth_method,
        disabled=row.disabled,
        created_at=row.created_at,
        secret_rotated_at=row.secret_rotated_at,
    )


def _with_secret(row: OAuthClient, secret: str) -> ClientWithSecret:
    return ClientWithSecret(**_out(row).model_dump(), client_secret=secret)


async def _require_admin(session: AsyncSession, firm_id: str, principal: Principal) -> None:
    """Owner or admin of the firm, acting as a user whose membership is active.

    ``require_firm`` answers 404 to outsiders (clients of other firms included) and 403 to
    lower roles; a client of the firm itself is not an admin, so it gets 403 too."""
    await require_firm(session, firm_id, principal, ADMIN_ROLES)
    status = (
        await session.execute(
            sa.select(col(FirmMember.status)).where(
                col(FirmMember.firm_id) == firm_id, col(FirmMember.user_id) == principal.subject
            )
        )
    ).scalar_one_or_none()
    if status != "active":
        raise Forbidden("Your membership of this firm is deactivated.")


async def _client(
    session: AsyncSession, firm_id: str, client_id: str, *, lock: bool = False
) -> OAuthClient:
    query = sa.select(OAuthClient).where(
        col(OAuthClient.id) == client_id, col(OAuthClient.firm_id) == firm_id
    )
    if lock:
        query = query.with_for_update()
    row = (await session.execute(query)).scalar_one_or_none()
    if row is None:
        raise NotFound("No client with this id in this firm.")
    return row


@router.post(
    "",
    status_code=201,
    response_model=ClientWithSecret,
    summary="Register an integrator client (its secret is shown once)",
    responses=ERR,
)
async def create_client(
    firm_id: FirmId,
    body: ClientCreate,
    session: SessionDep,
    principal: MembershipWriter,
    response: Response,
) -> ClientWithSecret:
    await _require_admin(session, firm_id, principal)
    response.headers["Cache-Control"] = "no-store"  # carries a secret: never cached or replayed
    secret = generate_client_secret()
    row = OAuthClient(
        id=new_id("cli"),
        firm_id=firm_id,
        name=body.name,
        kind="confidential",
        secret_hash=hash_client_secret(secret),
        scope=body.scope,
        redirect_uris=[],
        grant_types=["client_credentials"],
        token_endpoint_auth_method=body.token_endpoint_auth_method,
        created_by=principal.subject,
    )
    session.add(row)
    audit.record(
        session,
        principal,
        "client.created",
        target_kind="client",
        target_id=row.id,
        firm_id=firm_id,
        detail={"name": row.name, "scope": row.scope},
    )
    await session.flush()
    return _with_secret(row, secret)


@router.get(
    "",
    response_model=Page[ClientOut],
    summary="The firm's integrator clients",
    responses=ERR,
)
async def list_clients(
    firm_id: FirmId, page: PageParams, session: SessionDep, principal: MembershipReader
) -> Page[ClientOut]:
    await _require_admin(session, firm_id, principal)
    query = sa.select(OAuthClient).where(col(OAuthClient.firm_id) == firm_id)
    if page.after:
        query = query.where(col(OAuthClient.id) > page.after)
    rows = (
        (await session.execute(query.order_by(col(OAuthClient.id)).limit(page.limit + 1)))
        .scalars()
        .all()
    )
    return make_page([_out(r) for r in rows], page.limit, id_of="client_id")


@router.get(
    "/{client_id}",
    response_model=ClientOut,
    summary="One integrator client (never its secret)",
    responses=ERR,
)
async def get_client(
    firm_id: FirmId, client_id: ClientId, session: SessionDep, principal: MembershipReader
) -> ClientOut:
    await _require_admin(session, firm_id, principal)
    return _out(await _client(session, firm_id, client_id))


@router.post(
    "/{client_id}:rotate-secret",
    response_model=ClientWithSecret,
    summary="Replace the client's secret (the new one is shown once; the old stops working)",
    responses=ERR,
)
async def rotate_secret(
    firm_id: FirmId,
    client_id: ClientId,
    session: SessionDep,
    principal: MembershipWriter,
    response: Response,
) -> ClientWithSecret:
    await _require_admin(session, firm_id, principal)
    response.headers["Cache-Control"] = "no-store"
    row = await _client(session, firm_id, client_id, lock=True)
    secret = generate_client_secret()
    row.secret_hash = hash_client_secret(secret)
    row.secret_rotated_at = utcnow()
    audit.record(
        session,
        principal,
        "client.secret_rotated",
        target_kind="client",
        target_id=row.id,
        firm_id=firm_id,
    )
    await session.flush()
    return _with_secret(row, secret)


@router.post(
    "/{client_id}:disable",
    response_model=ClientOut,
    summary="Disable the client: no new tokens, and its live tokens are revoked",
    responses=ERR,
)
async def disable_client(
    request: Request,
    firm_id: FirmId,
    client_id: ClientId,
    session: SessionDep,
    principal: MembershipWriter,
) -> ClientOut:
    await _require_admin(session, firm_id, principal)
    row = await _client(session, firm_id, client_id, lock=True)
    now = utcnow()
    was_disabled = row.disabled
    row.disabled = True
    await session.execute(
        sa.update(RefreshToken)
        .where(col(RefreshToken.client_id) == client_id, col(RefreshToken.revoked_at).is_(None))
        .values(revoked_at=now)
    )
    # Also on a repeated call: it re-sends live tokens to the deny-list, so a call whose
    # deny-listing failed can simply be retried.
    live = (
        (
            await session.execute(
                sa.select(AccessToken).where(
                    col(AccessToken.client_id) == client_id, col(AccessToken.expires_at) > now
                )
            )
        )
        .scalars()
        .all()
    )
    for token in live:
        token.revoked_at = token.revoked_at or now
    if not was_disabled:
        audit.record(
            session,
            principal,
            "client.disabled",
            target_kind="client",
            target_id=row.id,
            firm_id=firm_id,
            detail={"access_tokens_revoked": len(live)},
        )
    out = _out(row)
    # Commit before deny-listing, so the deny-list never runs ahead of a rolled-back
    # change; the request's session dependency then finds nothing left to commit.
    await session.commit()
    denylist = request.app.state.runtime.denylist
    for token in live:
        ttl = max(1, int((token.expires_at - now).total_seconds())) + DENY_MARGIN
        await denylist.add(token.jti, ttl)
    return out
