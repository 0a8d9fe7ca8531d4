"""API shapes of the marketplace service (requests and responses, not the tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from api.events import ActorType
from services.marketplace.kinds import Kind

Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Instructions = Annotated[str, StringConstraints(max_length=20000)]
Region = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}-[A-Z0-9]{1,3}$")]
TaskState = Literal["draft", "open", "paused", "completed", "cancelled"]
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_CLAIM = 100
MAX_ITEMS_PER_IMPORT = 10_000
Allocation = Literal["open", "contracted"]
ALLOCATION_DOC = (
    "`open`: any eligible member firm's annotators claim; `contracted`: vendor firms bid, "
    "the requester awards contracts, and only contracted vendors claim, within quota"
)
GATE_DOC = (
    "quality gate: an annotator whose accuracy on this task's gold items is below this "
    "share, once they answered `gold_min_answers` of them, is refused further claims"
)


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Eligibility(Request):
    """Which member firms' annotators may see and claim an open task (empty = any)."""

    regions: list[Region] = Field(default_factory=list, max_length=50, examples=[["CN-SX"]])
    actor_types: list[ActorType] = Field(default_factory=list, max_length=11)
    min_reputation: float | None = Field(
        None,
        ge=0,
        le=1,
        description=(
            "firms whose reputation (GET /v1/firms/{id}/reputation) is lower neither see "
            "nor bid on nor claim the task"
        ),
    )


class TaskCreate(Request):
    cluster_id: str = Field(min_length=1, max_length=64)
    title: Title = Field(examples=["Sentiment of product reviews"])
    instructions: Instructions = ""
    kind: Kind
    label_schema: dict[str, Any] = Field(
        examples=[{"labels": ["positive", "negative", "neutral"]}],
        description="per kind: see the `tasks` tag for each kind's schema, input and answer",
    )
    reward_per_annotation: int = Field(ge=0, le=1_000_000, description="credits per annotation")
    overlap: int = Field(1, ge=1, le=10, description="annotations wanted per item")
    lease_seconds: int = Field(600, ge=1, le=86_400, description="how long a claim holds")
    review_period_seconds: int = Field(259_200, ge=60, le=2_592_000)
    deadline: datetime | None = None
    eligibility: Eligibility = Field(default_factory=Eligibility)
    gold_rate: float = Field(0.0, ge=0, le=0.5, description="share of gold items in claims")
    allocation: Allocation = Field("open", description=ALLOCATION_DOC)
    min_gold_accuracy: float | None = Field(None, ge=0, le=1, description=GATE_DOC)
    gold_min_answers: int = Field(
        3, ge=1, le=1000, description="gold answers before the quality gate judges"
    )


class TaskUpdate(Request):
    """Changes to a draft."""

    title: Title | None = None
    instructions: Instructions | None = None
    label_schema: dict[str, Any] | None = None
    reward_per_annotation: int | None = Field(None, ge=0, le=1_000_000)
    overlap: int | None = Field(None, ge=1, le=10)
    lease_seconds: int | None = Field(None, ge=1, le=86_400)
    review_period_seconds: int | None = Field(None, ge=60, le=2_592_000)
    deadline: datetime | None = None
    eligibility: Eligibility | None = None
    gold_rate: float | None = Field(None, ge=0, le=0.5)
    allocation: Allocation | None = None
    min_gold_accuracy: float | None = Field(None, ge=0, le=1, description="null: no gate")
    gold_min_answers: int | None = Field(None, ge=1, le=1000)


class TaskOut(BaseModel):
    id: str
    cluster_id: str
    requester_firm_id: str
    title: str
    instructions: str
    kind: Kind
    label_schema: dict[str, Any]
    allocation: Literal["open", "contracted"]
    reward_per_annotation: int
    overlap: int
    lease_seconds: int
    review_period_seconds: int
    deadline: datetime | None
    eligibility: Eligibility
    gold_rate: float
    min_gold_accuracy: float | None = None
    gold_min_answers: int = 3
    state: TaskState
    item_count: int
    gold_count: int | None = Field(None, description="shown to the requester only")
    created_at: datetime
    published_at: datetime | None


# -- items ---------------------------------------------------------------------------
class ItemIn(Request):
    """One line of an import: the input, and for a gold item its known answer."""

    input: dict[str, Any]
    external_id: str | None = Field(None, max_length=200)
    gold: bool = False
    answer: Any | None = Field(None, description="the known answer; required for gold items")


class RejectedLine(BaseModel):
    index: int = Field(description="0-based position in the array or JSONL body")
    reason: str


class ImportResult(BaseModel):
    imported: int
    gold: int
    rejected: list[RejectedLine]
    item_count: int = Field(description="items of the task after the import")


class ItemOut(BaseModel):
    id: str
    external_id: str | None
    input: dict[str, Any]
    gold: bool
    answer: Any | None = None
    created_at: datetime


# -- assignments ---------------------------------------------------------------------
class Claim(Request):
    count: int = Field(1, ge=1, le=MAX_CLAIM)


class ClaimedItem(BaseModel):
    """What an annotator sees: never whether the item is gold, nor its known answer."""

    assignment_id: str
    item_id: str
    input: dict[str, Any]
    expires_at: datetime


class ClaimResult(BaseModel):
    assignments: list[ClaimedItem]


class Release(Request):
    assignment_ids: list[ItemId] = Field(min_length=1, max_length=MAX_CLAIM)


class ReleaseResult(BaseModel):
    released: int


class AnswerIn(Request):
    assignment_id: ItemId
    answer: Any


class Submit(Request):
    answers: list[AnswerIn] = Field(min_length=1, max_length=MAX_CLAIM)


class SubmittedOut(BaseModel):
    assignment_id: str
    item_id: str
    submitted_at: datetime


class SubmitResult(BaseModel):
    submitted: list[SubmittedOut]


# -- bids, contracts, reputation -----------------------------------------------------
BidState = Literal["pending", "awarded", "declined", "withdrawn"]
ContractState = Literal["active", "terminated"]
Reason = Annotated[str, StringConstraints(max_length=2000)]


class BidCreate(Request):
    price_per_annotation: int = Field(
        ge=1, le=1_000_000, description="credits per annotation; at most the task's reward"
    )
    daily_capacity: int = Field(ge=1, le=1_000_000, description="annotations per UTC day")
    note: Reason = ""


class BidDecline(Request):
    reason: Reason | None = None


class Award(Request):
    quota: int = Field(ge=1, le=100_000_000, description="annotations the vendor may deliver")


class BidOut(BaseModel):
    id: str
    task_id: str
    vendor_firm_id: str
    price_per_annotation: int
    daily_capacity: int
    note: str
    state: BidState
    decline_reason: str | None
    contract_id: str | None
    created_at: datetime
    updated_at: datetime


class ContractOut(BaseModel):
    id: str
    task_id: str
    bid_id: str
    vendor_firm_id: str
    price_per_annotation: int
    quota: int
    daily_capacity: int
    state: ContractState
    used: int = Field(description="live leases plus submitted and accepted annotations")
    remaining: int = Field(description="quota left to claim (0 once terminated)")
    claimed_today: int = Field(description="annotations claimed this UTC day, toward capacity")
    created_at: datetime
    terminated_at: datetime | None


class ReputationInput(BaseModel):
    value: float | None = Field(description="the raw share; null with no observations")
    smoothed: float = Field(description="the share pulled toward the prior")
    hits: int
    total: int
    weight: float


class ReputationOut(BaseModel):
    firm_id: str
    score: float = Field(ge=0, le=1)
    prior: float
    prior_weight: float = Field(description="the prior counts as this many observations")
    gold_accuracy: ReputationInput = Field(description="correct gold answers / gold answers")
    acceptance_rate: ReputationInput = Field(description="accepted / reviewed annotations")
    on_time: ReputationInput = Field(description="leases submitted in time / leases that ended")
    computed_at: datetime


# -- ledger and review ---------------------------------------------------------------
AccountKind = Literal["available", "escrow", "issuance"]
PostingKind = Literal["grant", "escrow_reserve", "payout", "refund"]
SubmissionState = Literal["submitted", "accepted", "rejected"]
MAX_REVIEW_IDS = 1000


class GrantCreate(Request):
    cluster_id: str = Field(min_length=1, max_length=64)
    firm_id: str = Field(min_length=1, max_length=64, description="a member firm of the cluster")
    amount: int = Field(gt=0, le=1_000_000_000_000, description="credits to issue")
    memo: str = Field("", max_length=500)


class GrantOut(BaseModel):
    posting_id: str
    cluster_id: str
    firm_id: str
    amount: int
    memo: str
    balance: int = Field(description="the firm's available credits after the grant")
    created_at: datetime


class AccountOut(BaseModel):
    id: str
    cluster_id: str
    firm_id: str
    kind: AccountKind = Field(
        description="`available`, `escrow` (committed to tasks), or the operator's "
        "`issuance` account, negative by everything granted"
    )
    balance: int
    updated_at: datetime


class EntryOut(BaseModel):
    """One line of a statement: a posting's effect on this account."""

    id: str
    seq: int = Field(description="the line's number in this account")
    posting_id: str
    kind: PostingKind
    task_id: str | None
    memo: str
    amount: int = Field(description="credits in (positive) or out (negative)")
    balance_after: int
    created_at: datetime


class ReviewFilterIn(Request):
    annotator_firm_id: str | None = Field(None, max_length=64)
    annotator_id: str | None = Field(None, max_length=64)
    submitted_before: datetime | None = None


class ReviewIn(Request):
    """Either ``assignment_ids`` (all or nothing) or ``filter`` (submitted ones only)."""

    assignment_ids: list[ItemId] | None = Field(None, min_length=1, max_length=MAX_REVIEW_IDS)
    filter: ReviewFilterIn | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> ReviewIn:
        if (self.assignment_ids is None) == (self.filter is None):
            raise ValueError("give either assignment_ids or filter")
        return self


class RejectIn(ReviewIn):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class PayoutOut(BaseModel):
    posting_id: str
    firm_id: str
    amount: int
    annotations: int


class ReviewResult(BaseModel):
    count: int = Field(description="submissions accepted or rejected")
    amount: int = Field(description="credits paid (accept) or concerned (reject)")
    payouts: list[PayoutOut] = Field(default_factory=list)
    refunded: int = Field(0, description="credits returned to the requester (closed tasks)")
    more: bool = Field(False, description="the filter matched more than one batch of 1000")


class SubmissionOut(BaseModel):
    assignment_id: str
    item_id: str
    annotator_id: str
    annotator_firm_id: str
    contract_id: str | None
    status: SubmissionState
    answer: Any
    unit_price: int | None
    submitted_at: datetime | None
    review_due_at: datetime | None = Field(description="set while awaiting review")
    reviewed_at: datetime | None
    reject_reason: str | None
