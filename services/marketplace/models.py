"""Marketplace tables: the local read model of membership, tasks, items, assignments.

The read model (``firms``, ``firm_members``, ``cluster_members``) is written only by
``consumers.py`` from membership's events; nothing here reads membership's database.
Each read-model row remembers the id of the event that last wrote it: ids are
time-ordered, so an older event delivered late (at-least-once, unordered across
replicas) never overwrites a newer one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import JSON, Field, SQLModel

from services.kit.db import UTCDateTime, utcnow
from services.kit.idempotency import IdempotencyFields
from services.kit.outbox import OutboxFields, ProcessedEventFields
from services.kit.readmodel import KnownClusterMemberFields, KnownFirmFields, KnownFirmMemberFields


class MarketplaceBase(SQLModel, registry=registry()):
    pass


def _ts(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kw)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime)


# -- read model (from membership events) ---------------------------------------------
class KnownFirm(KnownFirmFields, MarketplaceBase, table=True):
    __tablename__ = "firms"


class KnownFirmMember(KnownFirmMemberFields, MarketplaceBase, table=True):
    __tablename__ = "firm_members"


class KnownClusterMember(KnownClusterMemberFields, MarketplaceBase, table=True):
    __tablename__ = "cluster_members"


# -- tasks ---------------------------------------------------------------------------
class Task(MarketplaceBase, table=True):
    __tablename__ = "tasks"
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40, index=True)
    requester_firm_id: str = Field(max_length=40, index=True)
    created_by: str = Field(max_length=64)
    title: str = Field(max_length=200)
    instructions: str = Field(default="", max_length=20000)
    kind: str = Field(max_length=20)
    label_schema: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    allocation: str = Field(default="open", max_length=16)
    reward_per_annotation: int
    overlap: int
    lease_seconds: int
    review_period_seconds: int
    deadline: datetime | None = _ts(default=None)
    allowed_regions: list[str] = Field(default_factory=list, sa_type=JSON)
    allowed_actor_types: list[str] = Field(default_factory=list, sa_type=JSON)
    min_reputation: float | None = None
    gold_rate: float = 0.0
    min_gold_accuracy: float | None = None
    """Quality gate: an annotator below this gold accuracy on the task gets no more work."""
    gold_min_answers: int = 3
    """Gold answers an annotator gives on the task before the quality gate judges them."""
    state: str = Field(default="draft", max_length=16, index=True)
    item_count: int = 0
    gold_count: int = 0
    created_at: datetime = _created()
    updated_at: datetime = _created()
    published_at: datetime | None = _ts(default=None)
    closed_at: datetime | None = _ts(default=None)
    escrow_outstanding: int = Field(default=0, sa_type=sa.BigInteger)
    """Credits of this task still held in the requester's escrow (see ``ledger.py``)."""


class TaskFirstClaim(MarketplaceBase, table=True):
    """When a task's first item was claimed, and by which firm (one row per task).

    A table of its own rather than a column of ``tasks``: claims lock items, and
    updating the task row under those locks would wait on (and deadlock with) the
    submits, imports and closes that lock the task row before its items.
    """

    __tablename__ = "task_first_claims"
    task_id: str = Field(primary_key=True, max_length=40)
    claimer_firm_id: str = Field(max_length=40)
    claimed_at: datetime = _ts()


class Item(MarketplaceBase, table=True):
    __tablename__ = "items"
    __table_args__ = (sa.Index("ix_items_claimable", "task_id", "gold", "complete", "id"),)
    id: str = Field(primary_key=True, max_length=40)
    task_id: str = Field(foreign_key="tasks.id", max_length=40)
    external_id: str | None = Field(default=None, max_length=200)
    input: dict[str, Any] = Field(sa_type=JSON)
    gold: bool = False
    gold_answer: Any | None = Field(default=None, sa_type=JSON)
    submitted: int = 0
    """Submitted (non-gold) annotations; kept under the item's row lock."""
    complete: bool = False
    """``submitted`` reached the task's overlap: claims skip the item through the index."""
    created_at: datetime = _created()


class Assignment(MarketplaceBase, table=True):
    """One annotator's lease on one item, and later their answer.

    ``leased`` counts against the item's overlap only while ``expires_at`` is ahead;
    an expired lease is free again without anyone having to sweep it. The unique
    (item, annotator) pair is the database's own guarantee that nobody gets an item
    twice, released or expired leases included.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        sa.UniqueConstraint("item_id", "annotator_id"),
        sa.Index("ix_assignments_item_status", "item_id", "status", "expires_at"),
        sa.Index("ix_assignments_task_annotator", "task_id", "annotator_id", "status"),
        # Covers the reputation aggregate of one firm: an index-only scan on PostgreSQL.
        sa.Index(
            "ix_assignments_firm_reputation",
            "annotator_firm_id",
            "status",
            "gold",
            "gold_correct",
            "expires_at",
        ),
    )
    id: str = Field(primary_key=True, max_length=40)
    task_id: str = Field(foreign_key="tasks.id", max_length=40)
    item_id: str = Field(foreign_key="items.id", max_length=40)
    annotator_id: str = Field(max_length=40)
    annotator_firm_id: str = Field(max_length=40)
    gold: bool = False
    status: str = Field(default="leased", max_length=16)
    """leased | submitted | accepted | rejected | released"""
    contract_id: str | None = Field(default=None, max_length=40, index=True)
    """The vendor's contract this lease counts against (contracted tasks only)."""
    unit_price: int | None = None
    """Credits an accepted answer pays: the contract's price, else the task's reward."""
    leased_at: datetime = _created()
    expires_at: datetime = _ts()
    submitted_at: datetime | None = _ts(default=None)
    review_due_at: datetime | None = _ts(default=None, index=True)
    """Set while a (non-gold) submission awaits review; auto-accepted once it passes."""
    reviewed_at: datetime | None = _ts(default=None)
    reviewed_by: str | None = Field(default=None, max_length=64)
    """Who accepted or rejected it; None when it was accepted automatically."""
    reject_reason: str | None = Field(default=None, max_length=2000)
    answer: Any | None = Field(default=None, sa_type=JSON)
    gold_correct: bool | None = None
    """For a submitted gold item: whether the answer matched its gold answer."""


# -- bids and contracts --------------------------------------------------------------
class Bid(MarketplaceBase, table=True):
    """A vendor firm's offer to work on a contracted task: ``pending → awarded |
    declined | withdrawn``. One live (pending or awarded) bid per firm and task."""

    __tablename__ = "bids"
    __table_args__ = (sa.Index("ix_bids_task_vendor", "task_id", "vendor_firm_id", "state"),)
    id: str = Field(primary_key=True, max_length=40)
    task_id: str = Field(foreign_key="tasks.id", max_length=40)
    vendor_firm_id: str = Field(max_length=40)
    created_by: str = Field(max_length=64)
    price_per_annotation: int
    daily_capacity: int
    note: str = Field(default="", max_length=2000)
    state: str = Field(default="pending", max_length=16)
    decline_reason: str | None = Field(default=None, max_length=2000)
    contract_id: str | None = Field(default=None, max_length=40)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class Contract(MarketplaceBase, table=True):
    """An awarded bid: the vendor's annotators may claim up to ``quota`` annotations of
    the task at ``price_per_annotation``, at most ``daily_capacity`` per UTC day.
    ``active → terminated``; the row is locked while a claim counts against it."""

    __tablename__ = "contracts"
    __table_args__ = (sa.Index("ix_contracts_task_vendor", "task_id", "vendor_firm_id", "state"),)
    id: str = Field(primary_key=True, max_length=40)
    task_id: str = Field(foreign_key="tasks.id", max_length=40)
    bid_id: str = Field(foreign_key="bids.id", max_length=40)
    vendor_firm_id: str = Field(max_length=40)
    price_per_annotation: int
    quota: int
    daily_capacity: int
    state: str = Field(default="active", max_length=16)
    awarded_by: str = Field(max_length=64)
    created_at: datetime = _created()
    terminated_at: datetime | None = _ts(default=None)


# -- ledger and review ---------------------------------------------------------------
class KnownCluster(MarketplaceBase, table=True):
    """Read model of a cluster: its operator firm issues the cluster's credits."""

    __tablename__ = "clusters"
    id: str = Field(primary_key=True, max_length=40)
    operator_firm_id: str = Field(max_length=40)
    event_id: str = Field(max_length=40)


class LedgerAccount(MarketplaceBase, table=True):
    """A firm's ``available`` or ``escrow`` credits in one cluster, or the cluster's
    ``issuance`` account (held by the operator firm), the only one that goes negative.

    ``balance`` is kept in step with the account's lines under the row's lock; ``seq``
    numbers its lines (statements page on it).
    """

    __tablename__ = "ledger_accounts"
    __table_args__ = (
        sa.UniqueConstraint("cluster_id", "firm_id", "kind"),
        sa.CheckConstraint(
            "kind = 'issuance' OR balance >= 0", name="ck_ledger_accounts_not_negative"
        ),
    )
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40)
    firm_id: str = Field(max_length=40, index=True)
    kind: str = Field(max_length=16)  # available | escrow | issuance
    balance: int = Field(default=0, sa_type=sa.BigInteger)
    seq: int = 0
    created_at: datetime = _created()
    updated_at: datetime = _created()


class LedgerPosting(MarketplaceBase, table=True):
    """One journal entry: two or more lines summing to zero.

    ``reference`` (unique when set) names the logical payment, so it is posted once.
    """

    __tablename__ = "ledger_postings"
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40, index=True)
    kind: str = Field(max_length=24)  # grant | escrow_reserve | payout | refund
    task_id: str | None = Field(default=None, max_length=40, index=True)
    contract_id: str | None = Field(default=None, max_length=40)
    memo: str = Field(default="", max_length=500)
    created_by: str | None = Field(default=None, max_length=64)
    reference: str | None = Field(default=None, max_length=120, unique=True)
    created_at: datetime = _created()


class LedgerLine(MarketplaceBase, table=True):
    """One side of a posting on one account, with the account's balance after it."""

    __tablename__ = "ledger_lines"
    __table_args__ = (sa.UniqueConstraint("account_id", "seq"),)
    id: str = Field(primary_key=True, max_length=40)
    posting_id: str = Field(foreign_key="ledger_postings.id", max_length=40, index=True)
    account_id: str = Field(foreign_key="ledger_accounts.id", max_length=40)
    seq: int
    amount: int = Field(sa_type=sa.BigInteger)
    balance_after: int = Field(sa_type=sa.BigInteger)
    created_at: datetime = _created()


class LedgerSettlement(MarketplaceBase, table=True):
    """Which annotation a payout or refund covers: each is paid (or refunded) once."""

    __tablename__ = "ledger_settlements"
    kind: str = Field(primary_key=True, max_length=24)  # payout | refund
    assignment_id: str = Field(primary_key=True, max_length=40)
    posting_id: str = Field(foreign_key="ledger_postings.id", max_length=40, index=True)
    amount: int = Field(sa_type=sa.BigInteger)


# -- kit tables ----------------------------------------------------------------------
class MarketplaceOutbox(OutboxFields, MarketplaceBase, table=True):
    __tablename__ = "outbox"


class MarketplaceIdempotencyKey(IdempotencyFields, MarketplaceBase, table=True):
    __tablename__ = "idempotency_keys"


class MarketplaceProcessedEvent(ProcessedEventFields, MarketplaceBase, table=True):
    __tablename__ = "processed_events"


metadata = MarketplaceBase.metadata
