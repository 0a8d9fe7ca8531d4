"""Versioned event contracts shared by every service.

An event travels as an :class:`Envelope` whose ``data`` validates against the payload
model registered for its ``(type, version)``. Adding a field with a default is
compatible; anything else is a new version registered beside the old one, and
producers keep publishing the old version until every consumer reads the new one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

ActorType = Literal[
    "government_body",
    "large_enterprise",
    "medium_enterprise",
    "small_micro_enterprise",
    "internet_platform",
    "technology_service_provider",
    "university",
    "research_institute",
    "investor",
    "industry_association",
    "service_agency",
]
FirmRole = Literal["owner", "admin", "member", "annotator"]


class Envelope(BaseModel):
    """What the outbox stores and the bus carries."""

    id: str = Field(description="unique event id; consumers deduplicate on it")
    type: str = Field(examples=["cluster.member_joined"])
    version: int = 1
    source: str = Field(description="the producing service")
    occurred_at: datetime
    data: dict[str, Any]

    def payload(self) -> EventPayload:
        """The typed payload; raises if the type or version is unknown."""
        model = REGISTRY[(self.type, self.version)]
        return model.model_validate(self.data)


class EventPayload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    event_type: ClassVar[str]
    event_version: ClassVar[int] = 1


REGISTRY: dict[tuple[str, int], type[EventPayload]] = {}


def register(model: type[EventPayload]) -> type[EventPayload]:
    key = (model.event_type, model.event_version)
    if key in REGISTRY:
        raise ValueError(f"event {key} registered twice")
    REGISTRY[key] = model
    return model


class FirmProfile(EventPayload):
    firm_id: str
    name: str
    region: str
    city: str
    actor_type: ActorType
    industries: list[str]


@register
class FirmRegisteredV1(FirmProfile):
    event_type = "firm.registered"


@register
class FirmUpdatedV1(FirmProfile):
    event_type = "firm.updated"


@register
class FirmMemberAddedV1(EventPayload):
    event_type = "firm.member_added"
    firm_id: str
    user_id: str
    role: FirmRole


@register
class FirmMemberRoleChangedV1(EventPayload):
    event_type = "firm.member_role_changed"
    firm_id: str
    user_id: str
    role: FirmRole


@register
class FirmMemberRemovedV1(EventPayload):
    event_type = "firm.member_removed"
    firm_id: str
    user_id: str


@register
class ClusterCreatedV1(EventPayload):
    event_type = "cluster.created"
    cluster_id: str
    name: str
    core_region: str
    focus_industries: list[str]
    operator_firm_id: str


class ClusterMembership(EventPayload):
    cluster_id: str
    firm_id: str
    region: str
    city: str
    actor_type: ActorType
    industries: list[str]


@register
class ClusterMemberJoinedV1(ClusterMembership):
    event_type = "cluster.member_joined"
    park_id: str | None = None


@register
class ClusterMemberLeftV1(ClusterMembership):
    event_type = "cluster.member_left"
    reason: Literal["left", "offboarded"] = "left"


@register
class ParkUpdatedV1(EventPayload):
    event_type = "park.updated"
    cluster_id: str
    park_id: str
    name: str
    region: str
    city: str
    capacity: int
    located_firm_ids: list[str]


@register
class UserDeactivatedV1(EventPayload):
    event_type = "user.deactivated"
    user_id: str


# -- marketplace ---------------------------------------------------------------------
TaskKind = Literal["single_label", "multi_label", "span", "bbox", "transcription"]


@register
class TaskPublishedV1(EventPayload):
    """A task opened for annotators; carries where the demand comes from (metrics)."""

    event_type = "task.published"
    task_id: str
    cluster_id: str
    requester_firm_id: str
    requester_region: str
    requester_industries: list[str]
    kind: TaskKind
    allocation: Literal["open", "contracted"] = "open"
    reward_per_annotation: int
    overlap: int
    item_count: int
    deadline: datetime | None = None


@register
class AssignmentSubmittedV1(EventPayload):
    """An annotator handed in an answer (not yet reviewed)."""

    event_type = "assignment.submitted"
    assignment_id: str
    task_id: str
    item_id: str
    cluster_id: str
    requester_firm_id: str
    annotator_id: str
    annotator_firm_id: str
    annotator_region: str
    gold: bool = False


@register
class ContractAwardedV1(EventPayload):
    """The requester awarded a vendor's bid: a contract with a quota and a price."""

    event_type = "contract.awarded"
    contract_id: str
    task_id: str
    cluster_id: str
    requester_firm_id: str
    requester_region: str
    vendor_firm_id: str
    vendor_region: str
    price_per_annotation: int
    quota: int


class SubmissionReviewed(EventPayload):
    assignment_id: str
    task_id: str
    item_id: str
    cluster_id: str
    requester_firm_id: str
    annotator_id: str
    annotator_firm_id: str
    annotator_region: str
    contract_id: str | None = None
    automatic: bool = Field(False, description="accepted because the review period ran out")


@register
class SubmissionAcceptedV1(SubmissionReviewed):
    """An annotation was accepted (by the requester or at the end of the review period)."""

    event_type = "submission.accepted"
    amount: int = Field(description="credits paid to the annotator's firm for it")


@register
class SubmissionRejectedV1(SubmissionReviewed):
    """An annotation was rejected with a reason; its item is open again."""

    event_type = "submission.rejected"
    reason: str


@register
class PayoutSettledV1(EventPayload):
    """Credits moved from the requester's escrow to a vendor firm's available account."""

    event_type = "payout.settled"
    posting_id: str
    task_id: str
    cluster_id: str
    payer_firm_id: str
    payee_firm_id: str
    amount: int
    annotations: int = Field(description="accepted annotations this payout covers")


@register
class TaskCompletedV1(EventPayload):
    """A task closed: ``completed`` (all work done or closed early) or ``cancelled``."""

    event_type = "task.completed"
    task_id: str
    cluster_id: str
    requester_firm_id: str
    requester_region: str
    outcome: Literal["completed", "cancelled"]
    accepted_annotations: int
    items_finished: int
    refunded: int = Field(description="unspent escrow returned to the requester")
    vendor_firm_ids: list[str] = Field(default_factory=list)


# -- messaging -----------------------------------------------------------------------
ChannelKind = Literal["general", "public", "private", "direct", "thread"]


@register
class MessagePostedV1(EventPayload):
    """A message was posted in a channel (who talks to whom, for the collaboration graph)."""

    event_type = "message.posted"
    message_id: str
    channel_id: str
    cluster_id: str
    channel_kind: ChannelKind
    seq: int
    sender_id: str
    sender_firm_id: str
    mentioned_firm_ids: list[str] = Field(
        default_factory=list,
        description="firms mentioned directly or through one of their users, sender's excluded",
    )
    posted_at: datetime


# -- metrics -------------------------------------------------------------------------
@register
class TaskFirstClaimedV1(EventPayload):
    """The first claim of a task's items (metrics: time from publication to first claim).

    Emitted by the marketplace once per task, with the claim that leased its first item.
    """

    event_type = "task.first_claimed"
    task_id: str
    cluster_id: str
    requester_firm_id: str
    claimer_firm_id: str
    claimed_at: datetime


@register
class ClusterClassificationChangedV1(EventPayload):
    """A cluster's recorded type or agglomeration form changed (or was first recorded)."""

    event_type = "cluster.classification_changed"
    cluster_id: str
    label: str = Field(description="cluster type, or insufficient_evidence / not_yet")
    form: str | None = None
    previous_label: str | None = None
    previous_form: str | None = None
    agreement: float | None = Field(None, description="bootstrap share of runs that agree")
    band: str | None = Field(None, description="high, medium or low confidence")
    config_version: str
    as_of: datetime
