"""Review of submitted annotations: accept (and pay), reject (and re-open the item),
and accept automatically once the review period has run out.

A submitted non-gold annotation waits for review until ``review_due_at`` (submission
time + the task's ``review_period_seconds``), as on Mechanical Turk and Toloka: the
requester accepts or rejects it, and whatever is still unreviewed then is accepted
automatically (``automatic=true``). Gold answers are checks, not work: they are
neither reviewed nor paid; the price of an annotation covers the checks mixed into a
claim.

Every review of a task happens under the task's row lock, so two reviews of one task
(two requests, or a request and the sweeper) are decided one after the other: an id
list naming an already reviewed submission is a 409 carrying its state and changes
nothing; the filter form skips what is no longer ``submitted``. The sweeper takes due
rows ``FOR UPDATE SKIP LOCKED`` (of the assignment and its task), so replicas sweep
different tasks and never wait on a request that is reviewing one.

Auto-acceptance is applied by the background sweeper (every
``ONECLUSTER_REVIEW_SWEEP_INTERVAL`` seconds, 30 by default) and, where it is cheap,
lazily: a rejection first accepts whatever of the task is already due (so an overdue
submission cannot be rejected any more).
Reads (the submissions list, statements) never write: a due submission shows as
``submitted`` until the next sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select

from api.events import SubmissionAcceptedV1, SubmissionRejectedV1
from services.kit.auth import Principal
from services.kit.db import Database, utcnow
from services.kit.errors import Conflict, InvalidState, NotFound
from services.kit.outbox import emit
from services.kit.telemetry import count_on_commit
from services.marketplace import ledger, service
from services.marketplace.counters import SUBMISSIONS_REVIEWED
from services.marketplace.models import (
    Assignment,
    Item,
    KnownFirm,
    MarketplaceOutbox,
    Task,
)

log = logging.getLogger("onecluster.marketplace.review")
MAX_REVIEW_BATCH = 1000
REVIEWED_STATES = ("submitted", "accepted", "rejected")
CLOSED_STATES = frozenset({"completed", "cancelled"})


@dataclass
class ReviewFilter:
    annotator_firm_id: str | None = None
    annotator_id: str | None = None
    submitted_before: datetime | None = None


@dataclass
class ReviewOutcome:
    count: int = 0
    amount: int = 0
    payouts: list[ledger.Payout] = field(default_factory=list)
    refunded: int = 0
    more: bool = False


# -- reads ---------------------------------------------------------------------------
async def list_submissions(
    session: AsyncSession,
    principal: Principal,
    task_id: str,
    *,
    status: str | None,
    annotator_firm_id: str | None,
    limit: int,
    after: str | None,
) -> list[Assignment]:
    """The task's non-gold submissions with answers, oldest first: the requester's admins."""
    access = await service.task_access(session, principal, task_id)
    service.require_requester_admin(access)
    query = select(Assignment).where(
        Assignment.task_id == task_id,
        col(Assignment.gold).is_(False),
        col(Assignment.status).in_([status] if status else REVIEWED_STATES),
    )
    if annotator_firm_id:
        query = query.where(Assignment.annotator_firm_id == annotator_firm_id)
    if after:
        query = query.where(Assignment.id > after)
    query = query.order_by(col(Assignment.id)).limit(limit + 1)
    return list((await session.execute(query)).scalars())


# -- accept and reject ---------------------------------------------------------------
async def accept(
    session: AsyncSession,
    principal: Principal,
    task_id: str,
    *,
    assignment_ids: Sequence[str] | None,
    where: ReviewFilter | None,
) -> ReviewOutcome:
    """Accept submissions (an id list, all or nothing; or a filter) and pay for them."""
    task = await _reviewable_task(session, principal, task_id)
    targets, more = await _targets(session, task, assignment_ids, where)
    outcome = await _accept(
        session, [(task, targets)], reviewer=principal.subject, automatic=False, now=utcnow()
    )
    outcome.more = more
    return outcome


async def reject(
    session: AsyncSession,
    principal: Principal,
    task_id: str,
    *,
    assignment_ids: Sequence[str] | None,
    where: ReviewFilter | None,
    reason: str,
) -> ReviewOutcome:
    """Reject submissions with a reason; each item is open again for another annotator.

    The money stays in escrow for the re-do; on a closed task there is no re-do, so
    the rejected annotations' prices go back to the requester's available credits.
    """
    task = await _reviewable_task(session, principal, task_id)
    now = utcnow()
    # What is past its review period is accepted (lazily, here), never rejected.
    due = await _due(session, task, now)
    targets, more = await _targets(session, task, assignment_ids, where, overdue_at=now)
    per_item: dict[str, int] = defaultdict(int)
    for assignment in targets:
        per_item[assignment.item_id] += 1
    # Locks in the fixed order: task (above), items, then every account at once.
    items = await _lock_items(session, sorted(per_item))
    keys = [
        ledger.AccountKey(task.cluster_id, task.requester_firm_id, ledger.ESCROW),
        ledger.AccountKey(task.cluster_id, task.requester_firm_id, ledger.AVAILABLE),
    ]
    keys += [ledger.AccountKey(task.cluster_id, a.annotator_firm_id, ledger.AVAILABLE) for a in due]
    await ledger.lock_accounts(session, keys)
    await _accept(session, [(task, due)], reviewer=None, automatic=True, now=now)
    outcome = ReviewOutcome(more=more)
    if not targets:
        return outcome
    await _mark(
        session, targets, status="rejected", reviewer=principal.subject, now=now, reason=reason
    )
    count_on_commit(session, SUBMISSIONS_REVIEWED.labels("rejected", "false"), len(targets))
    for item_id, count in per_item.items():
        item = items[item_id]
        item.submitted = max(0, item.submitted - count)
        item.complete = False
    outcome.count = len(targets)
    outcome.amount = sum(ledger.price_of(task, a) for a in targets)
    if task.state in CLOSED_STATES:
        await ledger.refund(
            session,
            task,
            outcome.amount,
            memo="rejected after the task closed",
            created_by=principal.subject,
            assignments=targets,
        )
        outcome.refunded = outcome.amount
    regions = await _regions(session, targets)
    for assignment in targets:
        emit(
            session,
            MarketplaceOutbox,
            SubmissionRejectedV1(
                **_reviewed_fields(task, assignment, regions, automatic=False), reason=reason
            ),
        )
    await session.flush()
    return outcome


async def _reviewable_task(session: AsyncSession, principal: Principal, task_id: str) -> Task:
    """The task, locked: the requester's owners, admins and clients review it."""
    access = await service.task_access(session, principal, task_id, lock=True)
    service.require_requester_admin(access)
    return access.task


async def _targets(
    session: AsyncSession,
    task: Task,
    assignment_ids: Sequence[str] | None,
    where: ReviewFilter | None,
    *,
    overdue_at: datetime | None = None,
) -> tuple[list[Assignment], bool]:
    """The submissions a review acts on, and whether a filter matched more than a batch.

    With ``overdue_at``, submissions due by then count as accepted (a rejection's view).
    """
    base = select(Assignment).where(Assignment.task_id == task.id)
    if assignment_ids is not None:
        ids = list(dict.fromkeys(assignment_ids))
        rows = list(
            (
                await session.execute(
                    base.where(col(Assignment.id).in_(ids)).execution_options(
                        populate_existing=True
                    )
                )
            ).scalars()
        )
        found = {a.id: a for a in rows}
        for assignment_id in ids:
            assignment = found.get(assignment_id)
            if assignment is None or assignment.status in ("leased", "released"):
                raise NotFound(f"No submission with id {assignment_id} on this task.")
            if assignment.gold:
                raise InvalidState(
                    f"Assignment {assignment_id} answers a gold item: checks are not reviewed.",
                    state=assignment.status,
                    assignment_id=assignment_id,
                )
            due_at = assignment.review_due_at
            if overdue_at is not None and due_at is not None and due_at <= overdue_at:
                raise InvalidState(
                    f"Submission {assignment_id} was accepted: its review period ended.",
                    state="accepted",
                    assignment_id=assignment_id,
                )
            if assignment.status != "submitted":
                raise InvalidState(
                    f"Submission {assignment_id} is already {assignment.status}.",
                    state=assignment.status,
                    assignment_id=assignment_id,
                )
        return [found[i] for i in ids], False
    where = where or ReviewFilter()
    query = base.where(Assignment.status == "submitted", col(Assignment.gold).is_(False))
    if where.annotator_firm_id:
        query = query.where(Assignment.annotator_firm_id == where.annotator_firm_id)
    if where.annotator_id:
        query = query.where(Assignment.annotator_id == where.annotator_id)
    if where.submitted_before:
        query = query.where(col(Assignment.submitted_at) < where.submitted_before)
    if overdue_at is not None:
        query = query.where(col(Assignment.review_due_at) > overdue_at)
    query = query.order_by(col(Assignment.id)).limit(MAX_REVIEW_BATCH + 1)
    rows = list((await session.execute(query.execution_options(populate_existing=True))).scalars())
    return rows[:MAX_REVIEW_BATCH], len(rows) > MAX_REVIEW_BATCH


async def _accept(
    session: AsyncSession,
    batches: Sequence[tuple[Task, Sequence[Assignment]]],
    *,
    reviewer: str | None,
    automatic: bool,
    now: datetime,
) -> ReviewOutcome:
    """Mark submissions accepted, pay them (one posting per payee firm), emit events."""
    batches = [(task, list(rows)) for task, rows in batches if rows]
    everyone = [a for _, rows in batches for a in rows]
    if not everyone:
        return ReviewOutcome()
    await _mark(session, everyone, status="accepted", reviewer=reviewer, now=now)
    reviewed = SUBMISSIONS_REVIEWED.labels("accepted", "true" if automatic else "false")
    count_on_commit(session, reviewed, len(everyone))
    payouts = await ledger.pay_out(
        session,
        batches,
        created_by=reviewer,
        memo="accepted automatically" if automatic else "accepted",
    )
    regions = await _regions(session, everyone)
    for task, rows in batches:
        for assignment in rows:
            emit(
                session,
                MarketplaceOutbox,
                SubmissionAcceptedV1(
                    **_reviewed_fields(task, assignment, regions, automatic=automatic),
                    amount=ledger.price_of(task, assignment),
                ),
            )
    await session.flush()
    return ReviewOutcome(
        count=len(everyone), amount=sum(p.amount for p in payouts), payouts=payouts
    )


async def _mark(
    session: AsyncSession,
    assignments: Sequence[Assignment],
    *,
    status: str,
    reviewer: str | None,
    now: datetime,
    reason: str | None = None,
) -> None:
    """``submitted → status`` for all of them, or a 409 and no change if any moved meanwhile."""
    ids = [a.id for a in assignments]
    changed = 0
    for start in range(0, len(ids), MAX_REVIEW_BATCH):
        result = await session.execute(
            sa.update(Assignment)
            .where(
                col(Assignment.id).in_(ids[start : start + MAX_REVIEW_BATCH]),
                col(Assignment.status) == "submitted",
            )
            .values(
                status=status,
                reviewed_at=now,
                reviewed_by=reviewer,
                reject_reason=reason,
                review_due_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        changed += int(getattr(result, "rowcount", 0) or 0)
    if changed != len(ids):
        raise Conflict("Some of these submissions were reviewed meanwhile; nothing changed.")
    values = {
        "status": status,
        "reviewed_at": now,
        "reviewed_by": reviewer,
        "reject_reason": reason,
        "review_due_at": None,
    }
    for assignment in assignments:  # what the UPDATE wrote, without a second UPDATE
        for name, value in values.items():
            set_committed_value(assignment, name, value)


async def _lock_items(session: AsyncSession, item_ids: Sequence[str]) -> dict[str, Item]:
    """Lock items, waiting, in id order (the same order every writer of items uses)."""
    query = select(Item).where(col(Item.id).in_(list(item_ids))).order_by(col(Item.id))
    rows = await session.execute(query.with_for_update().execution_options(populate_existing=True))
    return {item.id: item for item in rows.scalars()}


async def _regions(session: AsyncSession, assignments: Sequence[Assignment]) -> dict[str, str]:
    firm_ids = sorted({a.annotator_firm_id for a in assignments})
    rows = await session.execute(
        select(KnownFirm.id, KnownFirm.region).where(col(KnownFirm.id).in_(firm_ids))
    )
    return {firm_id: region for firm_id, region in rows.all()}


def _reviewed_fields(
    task: Task, assignment: Assignment, regions: dict[str, str], *, automatic: bool
) -> dict[str, Any]:
    return {
        "assignment_id": assignment.id,
        "task_id": task.id,
        "item_id": assignment.item_id,
        "cluster_id": task.cluster_id,
        "requester_firm_id": task.requester_firm_id,
        "annotator_id": assignment.annotator_id,
        "annotator_firm_id": assignment.annotator_firm_id,
        "annotator_region": regions.get(assignment.annotator_firm_id, ""),
        "contract_id": assignment.contract_id,
        "automatic": automatic,
    }


# -- automatic acceptance ------------------------------------------------------------
def review_due(submitted_at: datetime, task: Task) -> datetime:
    """When a submission is accepted automatically unless reviewed before."""
    return submitted_at + timedelta(seconds=task.review_period_seconds)


async def _due(session: AsyncSession, task: Task, now: datetime) -> list[Assignment]:
    """The task's submissions past their review period (the task is locked by the caller)."""
    query = select(Assignment).where(
        Assignment.task_id == task.id,
        Assignment.status == "submitted",
        col(Assignment.review_due_at) <= now,
    )
    return list((await session.execute(query.execution_options(populate_existing=True))).scalars())


async def accept_due(session: AsyncSession, now: datetime, limit: int) -> int:
    """Accept up to ``limit`` submissions whose review period ended; returns how many.

    Rows are taken ``FOR UPDATE SKIP LOCKED`` together with their task's row: a task
    under review by a request (or by another replica's sweep) is left for the next
    round instead of waited for.
    """
    rows = (
        await session.execute(
            select(Assignment, Task)
            .join(Task, col(Task.id) == col(Assignment.task_id))
            .where(Assignment.status == "submitted", col(Assignment.review_due_at) <= now)
            .order_by(col(Assignment.review_due_at))
            .limit(limit)
            .with_for_update(skip_locked=True, of=[Assignment, Task], key_share=True)
            .execution_options(populate_existing=True)
        )
    ).all()
    batches: dict[str, tuple[Task, list[Assignment]]] = {}
    for assignment, task in rows:
        batches.setdefault(task.id, (task, []))[1].append(assignment)
    outcome = await _accept(session, list(batches.values()), reviewer=None, automatic=True, now=now)
    return outcome.count


SWEEP_BATCH = 500


async def sweep_once(db: Database, *, now: datetime | None = None) -> int:
    """One round of automatic acceptance; a cheap read first, so idle rounds write nothing."""
    now = now or utcnow()
    async with db.read_scope() as session:
        anything = (
            await session.execute(
                select(Assignment.id)
                .where(Assignment.status == "submitted", col(Assignment.review_due_at) <= now)
                .limit(1)
            )
        ).first()
    if anything is None:
        return 0
    total = 0
    while True:
        async with db.session_scope() as session:
            done = await accept_due(session, now, SWEEP_BATCH)
        total += done
        if done < SWEEP_BATCH:
            return total


async def on_startup(app: FastAPI) -> None:
    """Start the auto-accept sweeper of this replica."""
    db: Database = app.state.db
    interval: float = app.state.settings.review_sweep_interval

    async def run() -> None:
        while True:
            try:
                accepted = await sweep_once(db)
                if accepted:
                    log.info("accepted %d submissions past their review period", accepted)
            except Exception:
                log.exception("auto-accept sweep failed; retrying next round")
            await asyncio.sleep(interval)

    app.state.review_sweeper = asyncio.create_task(run(), name="marketplace-review-sweeper")


async def on_shutdown(app: FastAPI) -> None:
    """Stop the sweeper; a round in progress is cancelled and its transaction rolled back."""
    task: asyncio.Task[None] | None = getattr(app.state, "review_sweeper", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
