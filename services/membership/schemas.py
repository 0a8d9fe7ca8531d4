"""API shapes of the membership service (requests and responses, not the tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from api.events import ActorType, FirmRole
from services.membership.reference import validate_industries, validate_region

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
City = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
Text = Annotated[str, StringConstraints(max_length=2000)]
Region = Annotated[
    str, StringConstraints(min_length=2, max_length=10), AfterValidator(validate_region)
]
Industries = Annotated[
    list[Annotated[str, StringConstraints(min_length=2, max_length=4)]],
    Field(max_length=20),
    AfterValidator(validate_industries),
]
Password = Annotated[str, StringConstraints(min_length=10, max_length=256)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- users ---------------------------------------------------------------------------
class SignUp(Request):
    email: EmailStr = Field(examples=["li.wei@example.cn"])
    password: Password = Field(description="10 to 256 characters")
    display_name: Name = Field(examples=["Li Wei"])


class UserUpdate(Request):
    display_name: Name | None = None
    password: Password | None = None
    current_password: str | None = Field(
        None, max_length=256, description="needed to change the password"
    )


class UserOut(BaseModel):
    id: str
    email: str
    display_name: str
    is_active: bool
    created_at: datetime


class MyFirm(BaseModel):
    firm_id: str
    name: str
    role: FirmRole
    status: Literal["active", "deactivated"]


class Me(UserOut):
    firms: list[MyFirm]


# -- firms ---------------------------------------------------------------------------
class FirmCreate(Request):
    name: Name = Field(examples=["Beijing Zhiyuan AI"])
    region: Region = Field(examples=["CN-BJ"], description="ISO 3166-2 subdivision code")
    city: City = Field(examples=["Beijing"])
    actor_type: ActorType
    industries: Industries = Field(examples=[["0301", "0406"]], description="see /v1/industries")
    description: Text = ""


class FirmUpdate(Request):
    name: Name | None = None
    region: Region | None = None
    city: City | None = None
    actor_type: ActorType | None = None
    industries: Industries | None = None
    description: Text | None = None


class FirmOut(BaseModel):
    id: str
    name: str
    region: str
    city: str
    actor_type: ActorType
    industries: list[str]
    description: str
    created_at: datetime
    updated_at: datetime


class FirmMemberOut(BaseModel):
    user_id: str
    email: str
    display_name: str
    role: FirmRole
    status: Literal["active", "deactivated"]
    joined_at: datetime


class RoleChange(Request):
    role: FirmRole


class FirmInvitationCreate(Request):
    email: EmailStr
    role: FirmRole = "member"


class FirmInvitationOut(BaseModel):
    id: str
    firm_id: str
    email: str
    role: FirmRole
    status: Literal["pending", "accepted", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime


class FirmInvitationCreated(FirmInvitationOut):
    token: str = Field(description="shown once; the invitee presents it to accept")


class InvitationAccept(Request):
    token: Annotated[str, StringConstraints(min_length=10, max_length=200)]


# -- clusters ------------------------------------------------------------------------
class ClusterCreate(Request):
    name: Name = Field(examples=["Jing-Jin-Ji AI annotation cluster"])
    description: Annotated[str, StringConstraints(max_length=4000)] = ""
    core_region: Region = Field(examples=["CN-BJ"])
    focus_industries: Industries = Field(default_factory=list, examples=[["0406", "0301"]])


class ClusterUpdate(Request):
    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=4000)] | None = None
    core_region: Region | None = None
    focus_industries: Industries | None = None


class ClusterOut(BaseModel):
    id: str
    name: str
    description: str
    core_region: str
    focus_industries: list[str]
    operator_firm_id: str
    created_at: datetime
    member_count: int
    is_member: bool = Field(description="whether the caller's firm is an active member")


class ClusterMemberOut(BaseModel):
    firm_id: str
    name: str
    region: str
    city: str
    actor_type: ActorType
    industries: list[str]
    is_operator: bool
    park_id: str | None
    joined_at: datetime


class MemberUpdate(Request):
    park_id: str | None = Field(description="the park the firm sits in, or null")


class Offboard(Request):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)] = ""


class JoinRequestCreate(Request):
    message: Text = ""


class JoinRequestOut(BaseModel):
    id: str
    cluster_id: str
    firm: FirmOut
    message: str
    status: Literal["pending", "approved", "rejected", "withdrawn"]
    reason: str | None
    created_at: datetime
    decided_at: datetime | None


class Rejection(Request):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class ClusterInvitationCreate(Request):
    firm_id: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    message: Text = ""


class ClusterInvitationOut(BaseModel):
    id: str
    cluster_id: str
    cluster_name: str
    firm_id: str
    message: str
    status: Literal["pending", "accepted", "declined", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None


# -- parks ---------------------------------------------------------------------------
class ParkCreate(Request):
    name: Name
    region: Region
    city: City
    capacity: int = Field(ge=0, le=1_000_000, description="firm slots")


class ParkUpdate(Request):
    name: Name | None = None
    region: Region | None = None
    city: City | None = None
    capacity: int | None = Field(None, ge=0, le=1_000_000)


class ParkOut(BaseModel):
    id: str
    cluster_id: str
    name: str
    region: str
    city: str
    capacity: int
    located_firms: int
    occupancy: float = Field(description="located firms / capacity (0 when capacity is 0)")
    created_at: datetime
    updated_at: datetime


# -- audit & reference ---------------------------------------------------------------
class AuditEventOut(BaseModel):
    id: str
    actor_kind: str
    actor_id: str | None
    action: str
    target_kind: str
    target_id: str | None
    firm_id: str | None
    cluster_id: str | None
    request_id: str | None
    outcome: str
    detail: dict[str, object]
    created_at: datetime


class RegionOut(BaseModel):
    code: str
    name: str
    type: str
    country: str
    parent: str
