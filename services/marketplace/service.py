"""Domain logic of the marketplace: tasks, item import, open allocation of leased items.

Functions take the session first and only ``flush()``; the request's session
dependency owns the transaction. Who may do what is decided here from the local read
model (``firms``, ``firm_members``, ``cluster_members``), never from membership's
database.

Locking (see ARCHITECTURE.md, "Marketplace"): every change to an item's assignments
happens while its row in ``items`` is locked. A claim takes candidate items ``FOR
UPDATE SKIP LOCKED`` and counts their assignments again *after* the lock, in a new
statement (a fresh READ COMMITTED snapshot), so a claim that committed meanwhile is
seen; a submit locks its items (waiting) before checking that the lease is still live.
On SQLite ``FOR UPDATE`` renders as nothing and ``BEGIN IMMEDIATE`` serialises every
transaction, which gives the same guarantees one writer at a time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from api.events import AssignmentSubmittedV1, TaskFirstClaimedV1, TaskPublishedV1
from services.kit.auth import Principal
from services.kit.db import utcnow
from services.kit.errors import (
    Conflict,
    Forbidden,
    InvalidState,
    NotFound,
    Problem,
    Unprocessable,
)
from services.kit.ids import new_id
from services.kit.outbox import emit
from services.kit.telemetry import count_on_commit
from services.marketplace import kinds, ledger, reputation
from services.marketplace.counters import ASSIGNMENTS_CLAIMED, ASSIGNMENTS_SUBMITTED
from services.marketplace.models import (
    Assignment,
    Contract,
    Item,
    KnownClusterMember,
    KnownFirm,
    KnownFirmMember,
    MarketplaceOutbox,
    Task,
    TaskFirstClaim,
)
from services.marketplace.schemas import MAX_ITEMS_PER_IMPORT, Eligibility, ItemIn

REQUESTER_ADMINS = frozenset({"owner", "admin"})
MAX_REPORTED_ERRORS = 1000

# action → (states it is allowed from, the state it leads to)
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "publish": (frozenset({"draft"}), "open"),
    "pause": (frozenset({"open"}), "paused"),
    "resume": (frozenset({"paused"}), "open"),
    "complete": (frozenset({"open", "paused"}), "completed"),
    "cancel": (frozenset({"draft", "open", "paused"}), "cancelled"),
}
IMPORTABLE_STATES = frozenset({"draft", "open", "paused"})
SUBMITTABLE_STATES = frozenset({"open", "paused"})


@dataclass
class TaskAccess:
    """A task as one caller may see it: as its requester, or as an eligible annotator firm."""

    task: Task
    requester: bool
    role: str  # the caller's firm role, or "client" for an integrator


# -- access --------------------------------------------------------------------------
async def acting_role(session: AsyncSession, principal: Principal) -> str | None:
    """The caller's role in its acting firm per the read model; None if not an active member."""
    if principal.firm_id is None:
        return None
    if principal.kind == "client":
        return "client"
    member = await session.get(KnownFirmMember, (principal.firm_id, principal.subject))
    if member is None or not member.active:
        return None
    return member.role


async def is_cluster_member(session: AsyncSession, cluster_id: str, firm_id: str) -> bool:
    row = await session.get(KnownClusterMember, (cluster_id, firm_id))
    return row is not None and row.active


def eligible(task: Task, firm: KnownFirm, score: float | None = None) -> bool:
    """Region, actor type and, when the task sets one, the minimum reputation ``score``."""
    if task.allowed_regions and firm.region not in task.allowed_regions:
        return False
    if task.min_reputation is not None and (score is None or score < task.min_reputation):
        return False
    return not (task.allowed_actor_types and firm.actor_type not in task.allowed_actor_types)


async def firm_eligible(session: AsyncSession, task: Task, firm: KnownFirm) -> bool:
    """:func:`eligible`, computing the firm's reputation only when the task asks for one."""
    score = None
    if task.min_reputation is not None:
        score = await reputation.firm_score(session, firm.id)
    return eligible(task, firm, score)


async def task_access(
    session: AsyncSession, principal: Principal, task_id: str, *, lock: bool = False
) -> TaskAccess:
    """The task and how the caller relates to it; 404 for anyone who may not see it.

    One statement: the task with the caller's membership of its firm, its firm's
    membership of the task's cluster and the firm's profile, outer-joined (every claim
    and submit starts here, so four round trips would be the hot path's largest cost).
    """
    if principal.firm_id is None:
        raise NotFound("No task with this id.")
    firm_id = principal.firm_id
    query = (
        select(Task, KnownFirmMember, KnownClusterMember, KnownFirm)
        .select_from(Task)
        .outerjoin(
            KnownFirmMember,
            sa.and_(
                col(KnownFirmMember.firm_id) == firm_id,
                col(KnownFirmMember.user_id) == principal.subject,
            ),
        )
        .outerjoin(
            KnownClusterMember,
            sa.and_(
                col(KnownClusterMember.cluster_id) == col(Task.cluster_id),
                col(KnownClusterMember.firm_id) == firm_id,
            ),
        )
        .outerjoin(KnownFirm, col(KnownFirm.id) == firm_id)
        .where(col(Task.id) == task_id)
    )
    if lock:
        # FOR NO KEY UPDATE: a claim inserting an assignment holds FOR KEY SHARE on the
        # task (the foreign key) while it holds item locks; FOR UPDATE here would wait
        # on it while waiting for those items itself, a deadlock.
        query = query.with_for_update(of=Task, key_share=True)
    found = (await session.execute(query)).one_or_none()
    if found is None:
        raise NotFound("No task with this id.")
    task, member, cluster_member, firm = found
    if principal.kind == "client":
        role: str | None = "client"
    else:
        role = member.role if member is not None and member.active else None
    if role is None:
        raise NotFound("No task with this id.")
    if task.requester_firm_id == firm_id:
        return TaskAccess(task, requester=True, role=role)
    if task.state == "draft" or cluster_member is None or not cluster_member.active:
        raise NotFound("No task with this id.")
    if firm is None or not await firm_eligible(session, task, firm):
        raise NotFound("No task with this id.")
    return TaskAccess(task, requester=False, role=role)


def require_requester_admin(access: TaskAccess) -> None:
    """Changing a task: the requester firm's owners and admins, or its integrator clients."""
    if not access.requester:
        raise Forbidden("Only the requester firm may change this task.")
    if access.role not in REQUESTER_ADMINS and access.role != "client":
        raise Forbidden("Needs the requester firm's owner or admin role.")


def require_annotator(principal: Principal, access: TaskAccess) -> None:
    """Working on a task: a user of an eligible member firm other than the requester."""
    if principal.kind != "user":
        raise Forbidden("Annotation needs a user's token, not a client's.")
    if access.requester:
        raise Forbidden("A firm does not annotate its own task.")


# -- tasks ---------------------------------------------------------------------------
async def create_task(
    session: AsyncSession, principal: Principal, *, cluster_id: str, fields: dict[str, Any]
) -> Task:
    """A draft task in a cluster the acting firm belongs to."""
    role = await acting_role(session, principal)
    firm_id = principal.firm_id
    if role is None or firm_id is None or not await is_cluster_member(session, cluster_id, firm_id):
        raise NotFound("No cluster with this id among your firm's clusters.")
    if role not in REQUESTER_ADMINS and role != "client":
        raise Forbidden("Posting a task needs the firm's owner or admin role.")
    eligibility: Eligibility = fields.pop("eligibility")
    schema = _label_schema(fields["kind"], fields.pop("label_schema"))
    now = utcnow()
    task = Task(
        id=new_id("task"),
        cluster_id=cluster_id,
        requester_firm_id=firm_id,
        created_by=principal.subject,
        label_schema=schema,
        allowed_regions=eligibility.regions,
        allowed_actor_types=list(eligibility.actor_types),
        min_reputation=eligibility.min_reputation,
        created_at=now,
        updated_at=now,
        **fields,
    )
    _check_deadline(task.deadline, now)
    session.add(task)
    await session.flush()
    return task


async def update_task(
    session: AsyncSession, principal: Principal, task_id: str, *, fields: dict[str, Any]
) -> Task:
    """Change a draft; a published task keeps the terms its annotators saw."""
    access = await task_access(session, principal, task_id, lock=True)
    require_requester_admin(access)
    task = access.task
    if task.state != "draft":
        if task.state in ("open", "paused") and set(fields) == {"overlap"}:
            await _raise_overlap(session, principal, task, fields["overlap"])
            return task
        raise InvalidState(
            "Only a draft can be changed; an open or paused task may only raise its overlap.",
            state=task.state,
        )
    if "eligibility" in fields:
        eligibility: Eligibility | None = fields.pop("eligibility")
        if eligibility is not None:
            task.allowed_regions = eligibility.regions
            task.allowed_actor_types = list(eligibility.actor_types)
            task.min_reputation = eligibility.min_reputation
    if fields.get("label_schema") is not None:
        fields["label_schema"] = _label_schema(task.kind, fields["label_schema"])
        if task.gold_count:
            raise Conflict("The label schema cannot change once gold items exist.")
    for name, value in fields.items():
        if value is not None or name in ("deadline", "min_gold_accuracy"):
            setattr(task, name, value)
    _check_deadline(task.deadline, utcnow())
    task.updated_at = utcnow()
    await session.flush()
    return task


async def _raise_overlap(
    session: AsyncSession, principal: Principal, task: Task, overlap: int | None
) -> None:
    """More annotations per item on a published task, escrowed first; never fewer (409):
    annotators may already be working on the share that would be taken back."""
    if overlap is None:
        raise Unprocessable("overlap: a number is needed.")
    if overlap < task.overlap:
        raise InvalidState(
            "A published task's overlap can only go up.", state=task.state, overlap=task.overlap
        )
    if overlap == task.overlap:
        return
    # Locks in the fixed order: task (held), items, accounts.
    await session.execute(
        sa.update(Item)
        .where(
            col(Item.task_id) == task.id,
            col(Item.gold).is_(False),
            col(Item.complete).is_(True),
            col(Item.submitted) < overlap,
        )
        .values(complete=False)
    )
    needed = ledger.escrow_for(task, task.item_count - task.gold_count, overlap - task.overlap)
    await ledger.reserve(
        session, task, needed, memo=f"overlap raised to {overlap}", created_by=principal.subject
    )
    task.overlap = overlap
    task.updated_at = utcnow()
    await session.flush()


async def transition_task(
    session: AsyncSession, principal: Principal, task_id: str, action: str
) -> Task:
    """Move a task along draft → open ⇄ paused → completed | cancelled; 409 otherwise."""
    access = await task_access(session, principal, task_id, lock=True)
    require_requester_admin(access)
    task = access.task
    allowed_from, target = TRANSITIONS[action]
    if task.state not in allowed_from:
        raise InvalidState(f"A {task.state} task cannot {action}.", state=task.state)
    now = utcnow()
    if action == "publish":
        if task.item_count - task.gold_count < 1:
            raise InvalidState("Import at least one non-gold item first.", state=task.state)
        _check_deadline(task.deadline, now)
        # The whole task is paid for up front; short funds leave it a draft (409).
        await ledger.reserve(
            session,
            task,
            ledger.escrow_for(task, task.item_count - task.gold_count),
            memo="task published",
            created_by=principal.subject,
            reference=f"publish:{task.id}",
        )
        firm = await session.get(KnownFirm, task.requester_firm_id)
        task.published_at = now
        emit(
            session,
            MarketplaceOutbox,
            TaskPublishedV1(
                task_id=task.id,
                cluster_id=task.cluster_id,
                requester_firm_id=task.requester_firm_id,
                requester_region=firm.region if firm else "",
                requester_industries=list(firm.industries) if firm else [],
                kind=task.kind,
                allocation=task.allocation,
                reward_per_annotation=task.reward_per_annotation,
                overlap=task.overlap,
                item_count=task.item_count - task.gold_count,
                deadline=task.deadline,
            ),
        )
    if target in ("completed", "cancelled"):
        task.closed_at = now
        await ledger.close_task(
            session, task, outcome=target, created_by=principal.subject, now=now
        )
    task.state = target
    task.updated_at = now
    await session.flush()
    return task


async def list_tasks(
    session: AsyncSession,
    principal: Principal,
    *,
    cluster_id: str | None,
    state: str | None,
    limit: int,
    after: str | None,
) -> tuple[list[Task], bool]:
    """Tasks the caller may see, newest id last; the flag says whether more follow."""
    role = await acting_role(session, principal)
    firm_id = principal.firm_id
    if role is None or firm_id is None:
        return [], False
    firm = await session.get(KnownFirm, firm_id)
    clusters = select(KnownClusterMember.cluster_id).where(
        KnownClusterMember.firm_id == firm_id, col(KnownClusterMember.active).is_(True)
    )
    query = select(Task).where(
        sa.or_(
            col(Task.requester_firm_id) == firm_id,
            sa.and_(col(Task.cluster_id).in_(clusters), col(Task.state) != "draft"),
        )
    )
    if cluster_id:
        query = query.where(Task.cluster_id == cluster_id)
    if state:
        query = query.where(Task.state == state)
    out: list[Task] = []
    score: float | None = None  # the firm's reputation, computed once if a task needs it
    while len(out) <= limit:
        page = query.order_by(col(Task.id)).limit(limit + 1)
        if after:
            page = page.where(Task.id > after)
        rows = list((await session.execute(page)).scalars())
        for task in rows:
            if task.requester_firm_id == firm_id:
                out.append(task)
            elif firm is not None:
                if task.min_reputation is not None and score is None:
                    score = await reputation.firm_score(session, firm.id)
                if eligible(task, firm, score):
                    out.append(task)
        if len(rows) <= limit:
            break
        after = rows[-1].id
    return out[:limit], len(out) > limit


# -- items ---------------------------------------------------------------------------
async def import_items(
    session: AsyncSession,
    principal: Principal,
    task_id: str,
    lines: Sequence[Any],
    *,
    partial: bool,
) -> tuple[Task, int, int, list[tuple[int, str]]]:
    """Validate and bulk-insert items; all or nothing unless ``partial``.

    Returns the task, how many items and gold items went in, and the rejected lines.
    """
    task = await require_item_writer(session, principal, task_id)
    if len(lines) > MAX_ITEMS_PER_IMPORT:
        raise Unprocessable(f"At most {MAX_ITEMS_PER_IMPORT} items per request.")
    now = utcnow()
    rows: list[dict[str, Any]] = []
    rejected: list[tuple[int, str]] = []
    for index, raw in enumerate(lines):
        try:
            rows.append(_item_row(task, raw, now))
        except kinds.InvalidAnswer as exc:
            rejected.append((index, str(exc)))
    if rejected and not partial:
        raise Unprocessable(
            f"{len(rejected)} of {len(lines)} items were rejected; nothing was imported.",
            rejected=[{"index": i, "reason": r} for i, r in rejected[:MAX_REPORTED_ERRORS]],
            rejected_count=len(rejected),
        )
    gold = sum(1 for row in rows if row["gold"])
    if rows:
        if task.state != "draft":  # work on offer already: the new items are escrowed first
            await ledger.reserve(
                session,
                task,
                ledger.escrow_for(task, len(rows) - gold),
                memo=f"{len(rows) - gold} items imported",
                created_by=principal.subject,
            )
        await session.execute(sa.insert(Item), rows)
        task.item_count += len(rows)
        task.gold_count += gold
        task.updated_at = now
        await session.flush()
    return task, len(rows), gold, rejected


async def require_item_writer(session: AsyncSession, principal: Principal, task_id: str) -> Task:
    """The task, locked, if the caller may add items to it now (checked before the body)."""
    access = await task_access(session, principal, task_id, lock=True)
    require_requester_admin(access)
    if access.task.state not in IMPORTABLE_STATES:
        raise InvalidState(
            f"Items cannot be added to a {access.task.state} task.", state=access.task.state
        )
    return access.task


def _item_row(task: Task, raw: Any, now: datetime) -> dict[str, Any]:
    try:
        line = ItemIn.model_validate(raw)
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise kinds.InvalidAnswer(
                f"{where}: {first['msg']}" if where else first["msg"]
            ) from None
        raise kinds.InvalidAnswer(str(exc)) from None
    item_input = kinds.validate_input(task.kind, line.input)
    answer = None
    if line.gold:
        if line.answer is None:
            raise kinds.InvalidAnswer("a gold item needs its known answer")
        answer = kinds.validate_answer(task.kind, task.label_schema, item_input, line.answer)
    elif line.answer is not None:
        raise kinds.InvalidAnswer("only gold items carry an answer")
    return {
        "id": new_id("item"),
        "task_id": task.id,
        "external_id": line.external_id,
        "input": item_input,
        "gold": line.gold,
        "gold_answer": answer,
        "submitted": 0,
        "complete": False,
        "created_at": now,
    }


async def list_items(
    session: AsyncSession, principal: Principal, task_id: str, *, limit: int, after: str | None
) -> list[Item]:
    """The task's items with gold answers: the requester firm only."""
    access = await task_access(session, principal, task_id)
    require_requester_admin(access)  # gold answers are in there
    query = select(Item).where(Item.task_id == task_id).order_by(col(Item.id)).limit(limit + 1)
    if after:
        query = query.where(Item.id > after)
    return list((await session.execute(query)).scalars())


# -- assignments ---------------------------------------------------------------------
async def claim_assignments(
    session: AsyncSession, principal: Principal, task_id: str, *, count: int
) -> list[tuple[Assignment, Item]]:
    """Lease up to ``count`` items to the caller, gold mixed in at the task's rate.

    An annotator the task's quality gate blocks gets a 403 ``quality-blocked``. On a
    contracted task only annotators of a firm with an active contract claim (else 403
    ``no-contract``), at most what the contract's quota and the day's capacity leave; gold
    items do not count against either. When nothing is left of them the claim is a 409
    ``quota-exhausted`` or ``daily-capacity-reached`` rather than an empty list, so that
    the vendor's tools stop polling; an empty list still means "no free item just now".
    """
    access = await task_access(session, principal, task_id)
    require_annotator(principal, access)
    task = access.task
    if task.state != "open":
        raise InvalidState(f"A {task.state} task hands out no work.", state=task.state)
    now = utcnow()
    if task.deadline is not None and task.deadline <= now:
        raise InvalidState("The task's deadline has passed.", state=task.state)
    await reputation.check_quality_gate(session, task, principal.subject)
    contract, room = None, count
    if task.allocation == "contracted":
        # Locked until this claim commits: the next claimer of the vendor counts after it.
        contract, room = await _contract_room(session, task, principal.firm_id or "", now)
    wanted_gold = 0
    if task.gold_count and task.gold_rate > 0:
        wanted_gold = sum(1 for _ in range(count) if random.random() < task.gold_rate)
    # Gold rides along with real work only: when none is left, a claim hands out nothing.
    real = min(room, max(1, count - wanted_gold))
    claimed = await _allocate(
        session, task, principal, gold=False, count=real, now=now, contract=contract
    )
    if claimed and wanted_gold:
        gold_count = count - len(claimed)
        if contract is not None:  # checks do not fill what the quota cut off
            gold_count = min(gold_count, wanted_gold)
        claimed += await _allocate(session, task, principal, gold=True, count=gold_count, now=now)
    random.shuffle(claimed)  # the position in the answer must not tell gold apart
    gold_leased = sum(1 for a, _ in claimed if a.gold)
    count_on_commit(session, ASSIGNMENTS_CLAIMED.labels("true"), gold_leased)
    count_on_commit(session, ASSIGNMENTS_CLAIMED.labels("false"), len(claimed) - gold_leased)
    if claimed and task.id not in _FIRST_CLAIMED:
        await _mark_first_claim(session, task, principal, now)
    await session.flush()
    return claimed


_FIRST_CLAIMED: set[str] = set()
"""Tasks this process knows were claimed before: their claims skip the insert below."""
_FIRST_CLAIMED_MAX = 100_000


async def _mark_first_claim(
    session: AsyncSession, task: Task, principal: Principal, now: datetime
) -> None:
    """Record the task's first claim once and tell metrics (time to first claim).

    ``INSERT … ON CONFLICT DO NOTHING`` into ``task_first_claims``: of concurrent first
    claimers exactly one inserts the row and emits the event; it touches no row that
    a submit, import or close locks, so it cannot join a deadlock with them.
    """
    values = {"task_id": task.id, "claimer_firm_id": principal.firm_id or "", "claimed_at": now}
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    inserted = await session.execute(
        insert(TaskFirstClaim).values(**values).on_conflict_do_nothing(index_elements=["task_id"])
    )
    if inserted.rowcount != 1:  # type: ignore[attr-defined]
        # Another claim's row is committed: remember it (never before the commit).
        if len(_FIRST_CLAIMED) >= _FIRST_CLAIMED_MAX:
            _FIRST_CLAIMED.clear()
        _FIRST_CLAIMED.add(task.id)
        return
    emit(
        session,
        MarketplaceOutbox,
        TaskFirstClaimedV1(
            task_id=task.id,
            cluster_id=task.cluster_id,
            requester_firm_id=task.requester_firm_id,
            claimer_firm_id=principal.firm_id or "",
            claimed_at=now,
        ),
    )


def _live_or_finished(now: datetime) -> Any:
    """Assignments that count against an item's overlap: answered and not rejected, or
    leased and unexpired."""
    return sa.or_(
        col(Assignment.status).in_(("submitted", "accepted")),
        sa.and_(col(Assignment.status) == "leased", col(Assignment.expires_at) > now),
    )


# -- contracted allocation (bids and awards: contracts.py) ---------------------------
class NoContract(Problem):
    status, slug, title = 403, "no-contract", "Your firm has no active contract on this task"


class QuotaExhausted(Problem):
    status, slug, title = 409, "quota-exhausted", "The contract's quota is used up"


class DailyCapacityReached(Problem):
    status, slug, title = 409, "daily-capacity-reached", "The contract's daily capacity is used"


QUOTA_STATUSES = ("submitted", "accepted")
"""Answered assignments that keep counting against a quota (a rejected one frees its slot)."""
DAY_STATUSES = ("submitted", "accepted", "rejected")
"""Answered assignments that count toward the day they were claimed on."""


def contract_usage_columns(now: datetime) -> tuple[Any, Any]:
    """Per contract: annotations counting against the quota (live leases, submitted and
    accepted), and those claimed this UTC day and not given back or left to expire."""
    status = col(Assignment.status)
    live = sa.and_(status == "leased", col(Assignment.expires_at) > now)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    used = sa.or_(status.in_(QUOTA_STATUSES), live)
    today = sa.and_(col(Assignment.leased_at) >= day, sa.or_(status.in_(DAY_STATUSES), live))
    return (
        sa.func.coalesce(sa.func.sum(sa.case((used, 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((today, 1), else_=0)), 0),
    )


async def contract_usage(
    session: AsyncSession, contract_ids: Sequence[str], now: datetime
) -> dict[str, tuple[int, int]]:
    """``{contract id: (used, claimed today)}``; gold items never count."""
    used, today = contract_usage_columns(now)
    rows = await session.execute(
        select(col(Assignment.contract_id), used, today)
        .where(col(Assignment.contract_id).in_(list(contract_ids)), col(Assignment.gold).is_(False))
        .group_by(col(Assignment.contract_id))
    )
    found = {str(cid): (int(u), int(t)) for cid, u, t in rows.all()}
    return {cid: found.get(cid, (0, 0)) for cid in contract_ids}


async def _contract_room(
    session: AsyncSession, task: Task, firm_id: str, now: datetime
) -> tuple[Contract, int]:
    """The firm's active contract on the task, locked, and how many annotations still fit.

    The row lock (``FOR UPDATE``; SQLite serialises writers anyway) is held until the
    claim commits, and the usage is counted after it was taken, in a new statement: two
    annotators of one vendor claiming at once are counted one after the other.
    """
    contract = (
        await session.execute(
            select(Contract)
            .where(
                Contract.task_id == task.id,
                Contract.vendor_firm_id == firm_id,
                Contract.state == "active",
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if contract is None:
        raise NoContract("Only vendors with an active contract claim on a contracted task.")
    used, today = (await contract_usage(session, [contract.id], now))[contract.id]
    if used >= contract.quota:
        raise QuotaExhausted(
            "The contract's quota is used up; leases that expire or answers that are "
            "rejected free their share again.",
            quota=contract.quota,
            used=used,
            contract_id=contract.id,
        )
    if today >= contract.daily_capacity:
        resets = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        raise DailyCapacityReached(
            "The contract's capacity for today (UTC) is used up.",
            headers={"Retry-After": str(max(1, int((resets - now).total_seconds())))},
            daily_capacity=contract.daily_capacity,
            claimed_today=today,
            resets_at=resets.isoformat(),
            contract_id=contract.id,
        )
    return contract, min(contract.quota - used, contract.daily_capacity - today)


async def _allocate(
    session: AsyncSession,
    task: Task,
    principal: Principal,
    *,
    gold: bool,
    count: int,
    now: datetime,
    contract: Contract | None = None,
) -> list[tuple[Assignment, Item]]:
    """Lock free items SKIP LOCKED, recount them under the lock, lease the ones still free.

    Gold items are checks, not work: every annotator may get each one once, so the
    overlap does not cap them. Real work under a ``contract`` carries it and its price.
    """
    out: list[tuple[Assignment, Item]] = []
    me = principal.subject
    passed: list[str] = []
    for _ in range(5):  # items dropped at the recount are replaced by another round
        need = count - len(out)
        if need <= 0:
            break
        mine = sa.exists().where(
            col(Assignment.item_id) == col(Item.id), col(Assignment.annotator_id) == me
        )
        query = (
            select(Item)
            .where(
                Item.task_id == task.id,
                col(Item.gold).is_(gold),
                col(Item.complete).is_(False),
                ~mine,
            )
            .order_by(col(Item.id))
            .limit(need)
            .with_for_update(skip_locked=True, of=Item)
        )
        if not gold:
            taken = (
                select(sa.func.count())
                .where(Assignment.item_id == Item.id, _live_or_finished(now))
                .scalar_subquery()
            )
            query = query.where(taken < task.overlap)
        if passed:
            query = query.where(col(Item.id).not_in(passed))
        items = list((await session.execute(query)).scalars())
        if not items:
            break
        ids = [item.id for item in items]
        # A new statement now that the rows are ours: it sees claims committed meanwhile.
        counts = dict(
            (
                await session.execute(
                    select(Assignment.item_id, sa.func.count())
                    .where(col(Assignment.item_id).in_(ids), _live_or_finished(now))
                    .group_by(col(Assignment.item_id))
                )
            ).all()
        )
        seen = set(
            (
                await session.execute(
                    select(Assignment.item_id).where(
                        col(Assignment.item_id).in_(ids), Assignment.annotator_id == me
                    )
                )
            ).scalars()
        )
        expires = now + timedelta(seconds=task.lease_seconds)
        for item in items:
            passed.append(item.id)
            if item.id in seen or (not gold and counts.get(item.id, 0) >= task.overlap):
                continue
            assignment = Assignment(
                id=new_id("asg"),
                task_id=task.id,
                item_id=item.id,
                annotator_id=me,
                annotator_firm_id=principal.firm_id or "",
                gold=gold,
                leased_at=now,
                expires_at=expires,
                unit_price=None if gold else task.reward_per_annotation,
            )
            if contract is not None and not gold:
                assignment.contract_id = contract.id
                assignment.unit_price = contract.price_per_annotation
            session.add(assignment)
            out.append((assignment, item))
        if len(items) < need:
            break
    return out


async def release_assignments(
    session: AsyncSession, principal: Principal, task_id: str, assignment_ids: Sequence[str]
) -> int:
    """Hand live leases back; the items go to other annotators (never back to the caller)."""
    access = await task_access(session, principal, task_id)
    require_annotator(principal, access)
    assignments = await _my_assignments(session, principal, task_id, assignment_ids)
    # Under the items' locks, like a submit: the same lease released and submitted at
    # once is decided one way, never both.
    await _lock_items(session, sorted({a.item_id for a in assignments}))
    assignments = await _my_assignments(session, principal, task_id, assignment_ids, fresh=True)
    now = utcnow()
    for assignment in assignments:
        if assignment.status != "leased" or assignment.expires_at <= now:
            state = "expired" if assignment.status == "leased" else assignment.status
            raise InvalidState(
                f"Assignment {assignment.id} is {state}.", state=state, assignment_id=assignment.id
            )
    result = await session.execute(
        sa.update(Assignment)
        .where(
            col(Assignment.id).in_([a.id for a in assignments]),
            col(Assignment.status) == "leased",
            col(Assignment.expires_at) > now,
        )
        .values(status="released")
    )
    released = int(getattr(result, "rowcount", 0) or 0)
    if released != len(assignments):  # a concurrent submit or release of the same lease won
        raise Conflict("Some of these leases changed meanwhile; nothing was released.")
    return released


async def submit_answers(
    session: AsyncSession,
    principal: Principal,
    task_id: str,
    answers: Sequence[tuple[str, Any]],
) -> list[Assignment]:
    """Record answers to live leases; a bad answer is a 422 and every lease stays."""
    access = await task_access(session, principal, task_id)
    require_annotator(principal, access)
    task = access.task
    if task.state not in SUBMITTABLE_STATES:
        raise InvalidState(f"A {task.state} task takes no answers.", state=task.state)
    ids = [assignment_id for assignment_id, _ in answers]
    if len(set(ids)) != len(ids):
        raise Unprocessable("An assignment appears twice in one submission.")
    found = await _my_assignments(session, principal, task_id, ids)
    # Closing the task holds its row: wait for a close in progress, then look again, so
    # that no answer lands on a task whose escrow was just refunded.
    task = (
        await session.execute(
            select(Task)
            .where(Task.id == task_id)
            .with_for_update(read=True)
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    if task.state not in SUBMITTABLE_STATES:
        raise InvalidState(f"A {task.state} task takes no answers.", state=task.state)
    item_ids = sorted({a.item_id for a in found})
    # Lock the items (waiting, in id order) so an expiring lease and a claim of its item
    # are decided one after the other; then read the leases again, after the lock.
    items = await _lock_items(session, item_ids)
    by_id = {
        a.id: a
        for a in (
            await session.execute(
                select(Assignment)
                .where(col(Assignment.id).in_(ids))
                .execution_options(populate_existing=True)
            )
        ).scalars()
    }
    now = utcnow()
    errors: list[dict[str, Any]] = []
    for index, (assignment_id, answer) in enumerate(answers):
        assignment = by_id[assignment_id]
        if assignment.status == "submitted":
            raise InvalidState(
                f"Assignment {assignment_id} was already submitted.",
                state="submitted",
                assignment_id=assignment_id,
            )
        if assignment.status != "leased" or assignment.expires_at <= now:
            state = "expired" if assignment.status == "leased" else assignment.status
            raise InvalidState(
                f"Assignment {assignment_id} is {state}.", state=state, assignment_id=assignment_id
            )
        item = items[assignment.item_id]
        try:
            assignment.answer = kinds.validate_answer(
                task.kind, task.label_schema, item.input, answer
            )
        except kinds.InvalidAnswer as exc:
            errors.append({"index": index, "assignment_id": assignment_id, "reason": str(exc)})
    if errors:
        raise Unprocessable("Some answers do not fit the task's label schema.", answers=errors)
    firm = await session.get(KnownFirm, principal.firm_id)
    out = []
    for assignment_id, _ in answers:
        assignment = by_id[assignment_id]
        assignment.status = "submitted"
        assignment.submitted_at = now
        item = items[assignment.item_id]
        if not item.gold:
            item.submitted += 1
            item.complete = item.submitted >= task.overlap
            assignment.review_due_at = now + timedelta(seconds=task.review_period_seconds)
        else:  # scored once, here: reputation and the quality gate only count
            assignment.gold_correct = kinds.correct(task.kind, assignment.answer, item.gold_answer)
        emit(
            session,
            MarketplaceOutbox,
            AssignmentSubmittedV1(
                assignment_id=assignment.id,
                task_id=task.id,
                item_id=item.id,
                cluster_id=task.cluster_id,
                requester_firm_id=task.requester_firm_id,
                annotator_id=assignment.annotator_id,
                annotator_firm_id=assignment.annotator_firm_id,
                annotator_region=firm.region if firm else "",
                gold=item.gold,
            ),
        )
        out.append(assignment)
    gold_answered = sum(1 for a in out if a.gold)
    count_on_commit(session, ASSIGNMENTS_SUBMITTED.labels("true"), gold_answered)
    count_on_commit(session, ASSIGNMENTS_SUBMITTED.labels("false"), len(out) - gold_answered)
    await session.flush()
    return out


async def _lock_items(session: AsyncSession, item_ids: Sequence[str]) -> dict[str, Item]:
    """Lock items, waiting, in id order (two requests never wait on each other in a cycle)."""
    query = select(Item).where(col(Item.id).in_(list(item_ids))).order_by(col(Item.id))
    rows = await session.execute(query.with_for_update().execution_options(populate_existing=True))
    return {item.id: item for item in rows.scalars()}


async def _my_assignments(
    session: AsyncSession,
    principal: Principal,
    task_id: str,
    ids: Sequence[str],
    *,
    fresh: bool = False,
) -> list[Assignment]:
    query = select(Assignment).where(
        col(Assignment.id).in_(list(ids)),
        Assignment.task_id == task_id,
        Assignment.annotator_id == principal.subject,
    )
    if fresh:  # read again after a lock: another transaction may have changed them
        query = query.execution_options(populate_existing=True)
    rows = list((await session.execute(query)).scalars())
    missing = sorted(set(ids) - {a.id for a in rows})
    if missing:
        raise NotFound(f"No assignment of yours with id {missing[0]} on this task.")
    return rows


# -- helpers -------------------------------------------------------------------------
def _label_schema(kind: str, schema: dict[str, Any]) -> dict[str, Any]:
    try:
        return kinds.validate_label_schema(kind, schema)  # type: ignore[arg-type]
    except kinds.InvalidAnswer as exc:
        raise Unprocessable(f"label_schema: {exc}") from None


def _check_deadline(deadline: datetime | None, now: datetime) -> None:
    if deadline is not None:
        if deadline.tzinfo is None:
            raise Unprocessable("deadline needs a time zone.")
        if deadline <= now:
            raise Unprocessable("deadline must be in the future.")
