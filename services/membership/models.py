"""Membership's tables. Nothing outside this service reads them; see ``schemas.py``
for the API shapes and ``api.events`` for what other services learn."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import JSON, Field, SQLModel

from services.kit.db import UTCDateTime, utcnow
from services.kit.idempotency import IdempotencyFields
from services.kit.outbox import OutboxFields


class MembershipBase(SQLModel, registry=registry()):
    pass


def _ts(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kw)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime)


class User(MembershipBase, table=True):
    __tablename__ = "users"
    id: str = Field(primary_key=True, max_length=40)
    email: str = Field(max_length=320)
    email_normalized: str = Field(max_length=320, unique=True)
    display_name: str = Field(max_length=120)
    password_hash: str = Field(max_length=255)
    is_active: bool = True
    created_at: datetime = _created()
    deactivated_at: datetime | None = _ts(default=None)


class Firm(MembershipBase, table=True):
    __tablename__ = "firms"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    region: str = Field(max_length=10, index=True)
    city: str = Field(max_length=120)
    actor_type: str = Field(max_length=40, index=True)
    industries: list[str] = Field(default_factory=list, sa_type=JSON)
    description: str = Field(default="", max_length=2000)
    created_by: str = Field(max_length=40)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class FirmMember(MembershipBase, table=True):
    __tablename__ = "firm_members"
    __table_args__ = (sa.UniqueConstraint("firm_id", "user_id"),)
    id: str = Field(primary_key=True, max_length=40)
    firm_id: str = Field(foreign_key="firms.id", max_length=40, index=True)
    user_id: str = Field(foreign_key="users.id", max_length=40, index=True)
    role: str = Field(max_length=16)
    status: str = Field(default="active", max_length=16)  # active | deactivated
    created_at: datetime = _created()


class FirmIndustry(MembershipBase, table=True):
    """One row per (firm, industry code): lets member lists filter by industry in SQL."""

    __tablename__ = "firm_industries"
    firm_id: str = Field(foreign_key="firms.id", primary_key=True, max_length=40)
    code: str = Field(primary_key=True, max_length=8, index=True)


class FirmInvitation(MembershipBase, table=True):
    __tablename__ = "firm_invitations"
    id: str = Field(primary_key=True, max_length=40)
    firm_id: str = Field(foreign_key="firms.id", max_length=40, index=True)
    email_normalized: str = Field(max_length=320)
    role: str = Field(max_length=16)
    token_hash: str = Field(max_length=64, unique=True)
    invited_by: str = Field(max_length=40)
    created_at: datetime = _created()
    expires_at: datetime = _ts()
    accepted_at: datetime | None = _ts(default=None)
    accepted_by: str | None = Field(default=None, max_length=40)
    revoked_at: datetime | None = _ts(default=None)


class Cluster(MembershipBase, table=True):
    __tablename__ = "clusters"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    description: str = Field(default="", max_length=4000)
    core_region: str = Field(max_length=10)
    focus_industries: list[str] = Field(default_factory=list, sa_type=JSON)
    operator_firm_id: str = Field(foreign_key="firms.id", max_length=40, index=True)
    created_at: datetime = _created()


class ClusterMember(MembershipBase, table=True):
    __tablename__ = "cluster_members"
    __table_args__ = (sa.UniqueConstraint("cluster_id", "firm_id"),)
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(foreign_key="clusters.id", max_length=40, index=True)
    firm_id: str = Field(foreign_key="firms.id", max_length=40, index=True)
    status: str = Field(default="active", max_length=16)  # active | left | offboarded
    park_id: str | None = Field(default=None, foreign_key="parks.id", max_length=40)
    joined_at: datetime = _created()
    left_at: datetime | None = _ts(default=None)


class JoinRequest(MembershipBase, table=True):
    __tablename__ = "join_requests"
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(foreign_key="clusters.id", max_length=40, index=True)
    firm_id: str = Field(foreign_key="firms.id", max_length=40, index=True)
    message: str = Field(default="", max_length=2000)
    status: str = Field(default="pending", max_length=16)  # pending|approved|rejected|withdrawn
    reason: str | None = Field(default=None, max_length=2000)
    created_by: str = Field(max_length=40)
    created_at: datetime = _created()
    decided_by: str | None = Field(default=None, max_length=40)
    decided_at: datetime | None = _ts(default=None)


class ClusterInvitation(MembershipBase, table=True):
    __tablename__ = "cluster_invitations"
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(foreign_key="clusters.id", max_length=40, index=True)
    firm_id: str = Field(foreign_key="firms.id", max_length=40, index=True)
    message: str = Field(default="", max_length=2000)
    status: str = Field(default="pending", max_length=16)  # pending|accepted|declined|revoked
    invited_by: str = Field(max_length=40)
    created_at: datetime = _created()
    expires_at: datetime = _ts()
    decided_at: datetime | None = _ts(default=None)


class Park(MembershipBase, table=True):
    __tablename__ = "parks"
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(foreign_key="clusters.id", max_length=40, index=True)
    name: str = Field(max_length=200)
    region: str = Field(max_length=10)
    city: str = Field(max_length=120)
    capacity: int
    created_at: datetime = _created()
    updated_at: datetime = _created()


class OAuthClient(MembershipBase, table=True):
    __tablename__ = "oauth_clients"
    id: str = Field(primary_key=True, max_length=64)  # the client_id
    firm_id: str | None = Field(default=None, foreign_key="firms.id", max_length=40, index=True)
    name: str = Field(max_length=120)
    kind: str = Field(max_length=16)  # confidential | public
    secret_hash: str | None = Field(default=None, max_length=255)
    scope: str = Field(default="", max_length=1000)
    redirect_uris: list[str] = Field(default_factory=list, sa_type=JSON)
    grant_types: list[str] = Field(default_factory=list, sa_type=JSON)
    token_endpoint_auth_method: str = Field(default="client_secret_basic", max_length=40)
    disabled: bool = False
    created_by: str | None = Field(default=None, max_length=40)
    created_at: datetime = _created()
    secret_rotated_at: datetime | None = _ts(default=None)


class AuthorizationCode(MembershipBase, table=True):
    __tablename__ = "authorization_codes"
    code_hash: str = Field(primary_key=True, max_length=64)
    client_id: str = Field(max_length=64)
    user_id: str = Field(max_length=40)
    firm_id: str | None = Field(default=None, max_length=40)
    redirect_uri: str = Field(max_length=2000)
    scope: str = Field(default="", max_length=1000)
    code_challenge: str = Field(max_length=128)
    code_challenge_method: str = Field(max_length=10)
    nonce: str | None = Field(default=None, max_length=255)
    auth_time: int
    expires_at: datetime = _ts()
    used_at: datetime | None = _ts(default=None)


class RefreshToken(MembershipBase, table=True):
    __tablename__ = "refresh_tokens"
    id: str = Field(primary_key=True, max_length=40)
    token_hash: str = Field(max_length=64, unique=True)
    family_id: str = Field(max_length=40, index=True)
    client_id: str = Field(max_length=64)
    user_id: str = Field(max_length=40, index=True)
    firm_id: str | None = Field(default=None, max_length=40)
    scope: str = Field(default="", max_length=1000)
    issued_at: datetime = _created()
    expires_at: datetime = _ts()
    used_at: datetime | None = _ts(default=None)
    revoked_at: datetime | None = _ts(default=None)


class AccessToken(MembershipBase, table=True):
    """Issued access tokens, kept until they expire: introspection and revocation."""

    __tablename__ = "access_tokens"
    jti: str = Field(primary_key=True, max_length=40)
    client_id: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=64, index=True)
    firm_id: str | None = Field(default=None, max_length=40)
    scope: str = Field(default="", max_length=1000)
    family_id: str | None = Field(default=None, max_length=40, index=True)
    issued_at: datetime = _created()
    expires_at: datetime = _ts(index=True)
    revoked_at: datetime | None = _ts(default=None)


class SigningKey(MembershipBase, table=True):
    __tablename__ = "signing_keys"
    kid: str = Field(primary_key=True, max_length=64)
    algorithm: str = Field(default="RS256", max_length=10)
    private_pem: str
    public_jwk: dict[str, Any] = Field(sa_type=JSON)
    created_at: datetime = _created()
    retired_at: datetime | None = _ts(default=None)
    """When a newer key took over signing; the key stays published until ``drop_after``."""
    drop_after: datetime | None = _ts(default=None)


class AuditEvent(MembershipBase, table=True):
    __tablename__ = "audit_events"
    id: str = Field(primary_key=True, max_length=40)
    actor_kind: str = Field(max_length=16)  # user | client | system | anonymous
    actor_id: str | None = Field(default=None, max_length=64)
    action: str = Field(max_length=80)
    target_kind: str = Field(max_length=40)
    target_id: str | None = Field(default=None, max_length=64)
    firm_id: str | None = Field(default=None, max_length=40, index=True)
    cluster_id: str | None = Field(default=None, max_length=40, index=True)
    request_id: str | None = Field(default=None, max_length=128)
    outcome: str = Field(default="success", max_length=16)  # success | denied | failed
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: datetime = _created()


class MembershipOutbox(OutboxFields, MembershipBase, table=True):
    __tablename__ = "outbox"


class MembershipIdempotencyKey(IdempotencyFields, MembershipBase, table=True):
    __tablename__ = "idempotency_keys"


metadata = MembershipBase.metadata
