"""The marketplace's double-entry ledger: accounts, postings, escrow, payouts, refunds.

Credits are integers and live in accounts per (cluster, firm): ``available`` (free to
spend) and ``escrow`` (committed to the firm's tasks). Each cluster also has one
``issuance`` account, held by its operator firm: granted credits come out of it, so it
is the only account whose balance goes negative (minus everything ever granted).

A posting (journal entry) has two or more lines whose amounts sum to zero. Balances are
kept on the account rows, changed in the same transaction as the lines, while the rows
are locked: on PostgreSQL all accounts a transaction touches are locked in one
``SELECT … FOR UPDATE`` ordered by id (a fixed order, so two transactions never wait on
each other in a cycle), after any task and item locks; SQLite's ``BEGIN IMMEDIATE``
serialises writers instead. A non-issuance balance below zero is refused here
(``insufficient-funds``) and, as a last line, by a CHECK constraint on the table.

Escrow follows each task: publishing reserves ``reward * overlap * non-gold items``,
importing into an open or paused task and raising its overlap reserve the difference,
an accepted annotation pays its ``unit_price`` out of escrow to the annotator firm's
available account, and closing the task refunds what pending reviews do not need.
``Task.escrow_outstanding`` is the task's share of the requester's escrow balance:
for every firm and cluster, escrow balance = the sum over its tasks.

A payout or refund of one annotation is recorded in ``ledger_settlements`` with a
primary key (kind, assignment): the database itself refuses to pay an annotation twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from api.events import PayoutSettledV1, TaskCompletedV1
from services.kit.auth import Principal
from services.kit.db import utcnow
from services.kit.errors import Conflict, Forbidden, NotFound, Problem, Unprocessable
from services.kit.ids import new_id
from services.kit.outbox import emit
from services.kit.telemetry import count_on_commit
from services.marketplace.counters import LEDGER_CREDITS, LEDGER_POSTINGS
from services.marketplace.models import (
    Assignment,
    Item,
    KnownCluster,
    KnownClusterMember,
    KnownFirm,
    LedgerAccount,
    LedgerLine,
    LedgerPosting,
    LedgerSettlement,
    MarketplaceOutbox,
    Task,
)

AVAILABLE, ESCROW, ISSUANCE = "available", "escrow", "issuance"
LEDGER_READERS = frozenset({"owner", "admin", "client"})


class InsufficientFunds(Problem):
    status, slug, title = 409, "insufficient-funds", "Insufficient funds"


@dataclass(frozen=True, order=True)
class AccountKey:
    cluster_id: str
    firm_id: str
    kind: str


# -- accounts and postings -----------------------------------------------------------
async def lock_accounts(
    session: AsyncSession, keys: Iterable[AccountKey]
) -> dict[AccountKey, LedgerAccount]:
    """Create missing accounts, then lock all of them in id order; call once per transaction.

    Missing rows are inserted in key order with ``ON CONFLICT DO NOTHING`` (two
    transactions creating the same account meet at its unique key), then every row is
    locked by one ordered ``SELECT … FOR UPDATE``.
    """
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    match = sa.tuple_(
        col(LedgerAccount.cluster_id), col(LedgerAccount.firm_id), col(LedgerAccount.kind)
    ).in_([(k.cluster_id, k.firm_id, k.kind) for k in wanted])
    present = {
        AccountKey(*row)
        for row in (
            await session.execute(
                select(LedgerAccount.cluster_id, LedgerAccount.firm_id, LedgerAccount.kind).where(
                    match
                )
            )
        ).all()
    }
    missing = [k for k in wanted if k not in present]
    if missing:
        now = utcnow()
        rows = [
            {
                "id": new_id("acct"),
                "cluster_id": k.cluster_id,
                "firm_id": k.firm_id,
                "kind": k.kind,
                "balance": 0,
                "seq": 0,
                "created_at": now,
                "updated_at": now,
            }
            for k in missing
        ]
        await session.execute(_insert_ignoring_duplicates(session, rows))
    locked = await session.execute(
        select(LedgerAccount)
        .where(match)
        .order_by(col(LedgerAccount.id))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return {AccountKey(a.cluster_id, a.firm_id, a.kind): a for a in locked.scalars()}


def _insert_ignoring_duplicates(session: AsyncSession, rows: list[dict[str, Any]]) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert(LedgerAccount).values(rows).on_conflict_do_nothing()


async def post(
    session: AsyncSession,
    accounts: dict[AccountKey, LedgerAccount],
    *,
    kind: str,
    cluster_id: str,
    lines: Sequence[tuple[AccountKey, int]],
    memo: str = "",
    task_id: str | None = None,
    contract_id: str | None = None,
    created_by: str | None = None,
    reference: str | None = None,
    now: datetime | None = None,
) -> LedgerPosting:
    """One journal entry over accounts already locked by :func:`lock_accounts`."""
    lines = [(key, amount) for key, amount in lines if amount]
    if len(lines) < 2 or sum(amount for _, amount in lines) != 0:
        raise ValueError("a posting needs two or more lines that sum to zero")
    for key, amount in lines:
        account = accounts[key]
        if account.kind != ISSUANCE and account.balance + amount < 0:
            raise InsufficientFunds(
                f"The {account.kind} account holds {account.balance} credits; "
                f"{-amount} are needed.",
                needed=-amount,
                available=account.balance,
                account_id=account.id,
            )
    now = now or utcnow()
    posting = LedgerPosting(
        id=new_id("pst"),
        cluster_id=cluster_id,
        kind=kind,
        task_id=task_id,
        contract_id=contract_id,
        memo=memo[:500],
        created_by=created_by,
        reference=reference,
        created_at=now,
    )
    session.add(posting)
    count_on_commit(session, LEDGER_POSTINGS.labels(kind))
    count_on_commit(session, LEDGER_CREDITS.labels(kind), sum(a for _, a in lines if a > 0))
    await session.flush()  # the lines refer to it
    rows = []
    for key, amount in lines:
        account = accounts[key]
        account.balance += amount
        account.seq += 1
        account.updated_at = now
        rows.append(
            {
                "id": new_id("lin"),
                "posting_id": posting.id,
                "account_id": account.id,
                "seq": account.seq,
                "amount": amount,
                "balance_after": account.balance,
                "created_at": now,
            }
        )
    await session.execute(sa.insert(LedgerLine), rows)
    await session.flush()
    return posting


# -- grants --------------------------------------------------------------------------
async def grant(
    session: AsyncSession,
    principal: Principal,
    role: str | None,
    *,
    cluster_id: str,
    firm_id: str,
    amount: int,
    memo: str,
) -> tuple[LedgerPosting, LedgerAccount]:
    """The operator firm issues credits to a member firm's available account.

    ``role`` is the caller's role in its acting firm (``service.acting_role``). Firms
    outside the cluster get 404, members that do not run it (or lower roles) 403.
    """
    acting = principal.firm_id
    if role is None or acting is None or not await _member(session, cluster_id, acting):
        raise NotFound("No cluster with this id among your firm's clusters.")
    cluster = await session.get(KnownCluster, cluster_id)
    if cluster is None or cluster.operator_firm_id != acting:
        raise Forbidden("Only the cluster's operator firm grants credits.")
    if role not in LEDGER_READERS:
        raise Forbidden("Granting credits needs the operator firm's owner or admin role.")
    if not await _member(session, cluster_id, firm_id):
        raise Unprocessable("firm_id: not a member firm of this cluster.")
    issuance = AccountKey(cluster_id, acting, ISSUANCE)
    target = AccountKey(cluster_id, firm_id, AVAILABLE)
    accounts = await lock_accounts(session, [issuance, target])
    posting = await post(
        session,
        accounts,
        kind="grant",
        cluster_id=cluster_id,
        lines=[(issuance, -amount), (target, amount)],
        memo=memo,
        created_by=principal.subject,
    )
    return posting, accounts[target]


async def _member(session: AsyncSession, cluster_id: str, firm_id: str) -> bool:
    row = await session.get(KnownClusterMember, (cluster_id, firm_id))
    return row is not None and row.active


# -- escrow --------------------------------------------------------------------------
def escrow_for(task: Task, items: int, overlap: int | None = None) -> int:
    """What ``items`` non-gold items need in escrow: one reward per wanted annotation."""
    return task.reward_per_annotation * (task.overlap if overlap is None else overlap) * items


async def reserve(
    session: AsyncSession,
    task: Task,
    amount: int,
    *,
    memo: str,
    created_by: str | None,
    reference: str | None = None,
) -> LedgerPosting | None:
    """Move ``amount`` from the requester's available to its escrow for ``task``.

    Refused whole (409 ``insufficient-funds`` with ``needed`` and ``available``) when
    the requester's available balance is short.
    """
    if amount <= 0:
        return None
    available = AccountKey(task.cluster_id, task.requester_firm_id, AVAILABLE)
    escrow = AccountKey(task.cluster_id, task.requester_firm_id, ESCROW)
    accounts = await lock_accounts(session, [available, escrow])
    posting = await post(
        session,
        accounts,
        kind="escrow_reserve",
        cluster_id=task.cluster_id,
        lines=[(available, -amount), (escrow, amount)],
        memo=memo,
        task_id=task.id,
        created_by=created_by,
        reference=reference,
    )
    task.escrow_outstanding += amount
    return posting


@dataclass
class Payout:
    posting: LedgerPosting
    task: Task
    payee_firm_id: str
    amount: int
    annotations: int


def price_of(task: Task, assignment: Assignment) -> int:
    """What an accepted annotation pays: its lease's unit price, else the task's reward."""
    if assignment.unit_price is not None:
        return assignment.unit_price
    return task.reward_per_annotation


async def pay_out(
    session: AsyncSession,
    batches: Sequence[tuple[Task, Sequence[Assignment]]],
    *,
    created_by: str | None,
    memo: str,
) -> list[Payout]:
    """Pay accepted annotations from their requesters' escrow: one posting per payee firm.

    Every account involved is locked at once (one ordered statement). Each annotation
    is recorded as a ``payout`` settlement, so paying it again fails at its primary key.
    """
    keys: list[AccountKey] = []
    grouped: list[tuple[Task, str, list[Assignment]]] = []
    for task, assignments in batches:
        by_firm: dict[str, list[Assignment]] = defaultdict(list)
        for assignment in assignments:
            by_firm[assignment.annotator_firm_id].append(assignment)
        keys.append(AccountKey(task.cluster_id, task.requester_firm_id, ESCROW))
        for firm_id in sorted(by_firm):
            keys.append(AccountKey(task.cluster_id, firm_id, AVAILABLE))
            grouped.append((task, firm_id, by_firm[firm_id]))
    accounts = await lock_accounts(session, keys)
    now = utcnow()
    out: list[Payout] = []
    for task, firm_id, assignments in grouped:
        amount = sum(price_of(task, a) for a in assignments)
        if amount > task.escrow_outstanding:
            raise Conflict(
                "The task's escrow does not cover these payouts.",
                needed=amount,
                escrowed=task.escrow_outstanding,
            )
        escrow = AccountKey(task.cluster_id, task.requester_firm_id, ESCROW)
        payee = AccountKey(task.cluster_id, firm_id, AVAILABLE)
        posting = await post(
            session,
            accounts,
            kind="payout",
            cluster_id=task.cluster_id,
            lines=[(escrow, -amount), (payee, amount)],
            memo=memo,
            task_id=task.id,
            contract_id=_one_contract(assignments),
            created_by=created_by,
            now=now,
        )
        await _settle(session, "payout", posting, task, assignments)
        task.escrow_outstanding -= amount
        emit(
            session,
            MarketplaceOutbox,
            PayoutSettledV1(
                posting_id=posting.id,
                task_id=task.id,
                cluster_id=task.cluster_id,
                payer_firm_id=task.requester_firm_id,
                payee_firm_id=firm_id,
                amount=amount,
                annotations=len(assignments),
            ),
        )
        out.append(Payout(posting, task, firm_id, amount, len(assignments)))
    return out


async def refund(
    session: AsyncSession,
    task: Task,
    amount: int,
    *,
    memo: str,
    created_by: str | None,
    assignments: Sequence[Assignment] = (),
    reference: str | None = None,
) -> LedgerPosting | None:
    """Return ``amount`` of the task's escrow to the requester's available credits."""
    if amount <= 0:
        return None
    escrow = AccountKey(task.cluster_id, task.requester_firm_id, ESCROW)
    available = AccountKey(task.cluster_id, task.requester_firm_id, AVAILABLE)
    accounts = await lock_accounts(session, [escrow, available])
    posting = await post(
        session,
        accounts,
        kind="refund",
        cluster_id=task.cluster_id,
        lines=[(escrow, -amount), (available, amount)],
        memo=memo,
        task_id=task.id,
        created_by=created_by,
        reference=reference,
    )
    if assignments:
        await _settle(session, "refund", posting, task, assignments)
    task.escrow_outstanding -= amount
    return posting


async def _settle(
    session: AsyncSession,
    kind: str,
    posting: LedgerPosting,
    task: Task,
    assignments: Sequence[Assignment],
) -> None:
    await session.execute(
        sa.insert(LedgerSettlement),
        [
            {
                "kind": kind,
                "assignment_id": a.id,
                "posting_id": posting.id,
                "amount": price_of(task, a),
            }
            for a in assignments
        ],
    )


def _one_contract(assignments: Sequence[Assignment]) -> str | None:
    contracts = {a.contract_id for a in assignments}
    return contracts.pop() if len(contracts) == 1 else None


async def close_task(
    session: AsyncSession, task: Task, *, outcome: str, created_by: str | None, now: datetime
) -> int:
    """A task completes or is cancelled: leases lapse, unspent escrow goes back.

    Live leases end (``released``: their holders can no longer submit). Submissions
    still awaiting review stay reviewable, so their prices stay in escrow; the rest is
    refunded at once. Emits ``task.completed``; returns the refunded amount.
    """
    await session.execute(
        sa.update(Assignment)
        .where(col(Assignment.task_id) == task.id, col(Assignment.status) == "leased")
        .values(status="released")
    )
    pending = list(
        (
            await session.execute(
                select(Assignment).where(
                    Assignment.task_id == task.id,
                    Assignment.status == "submitted",
                    col(Assignment.gold).is_(False),
                )
            )
        ).scalars()
    )
    held = sum(price_of(task, a) for a in pending)
    refunded = max(0, task.escrow_outstanding - held)
    await refund(
        session,
        task,
        refunded,
        memo=f"task {outcome}: unspent escrow returned",
        created_by=created_by,
        reference=f"close:{task.id}",
    )
    accepted = (
        await session.execute(
            select(Assignment.annotator_firm_id, sa.func.count())
            .where(Assignment.task_id == task.id, Assignment.status == "accepted")
            .group_by(col(Assignment.annotator_firm_id))
        )
    ).all()
    finished = (
        await session.execute(
            select(sa.func.count()).where(
                Item.task_id == task.id, col(Item.gold).is_(False), col(Item.complete).is_(True)
            )
        )
    ).scalar_one()
    firm = await session.get(KnownFirm, task.requester_firm_id)
    emit(
        session,
        MarketplaceOutbox,
        TaskCompletedV1(
            task_id=task.id,
            cluster_id=task.cluster_id,
            requester_firm_id=task.requester_firm_id,
            requester_region=firm.region if firm else "",
            outcome="completed" if outcome == "completed" else "cancelled",
            accepted_annotations=sum(int(n) for _, n in accepted),
            items_finished=int(finished),
            refunded=refunded,
            vendor_firm_ids=sorted(firm_id for firm_id, _ in accepted),
        ),
    )
    return refunded


# -- statements ----------------------------------------------------------------------
async def list_accounts(
    session: AsyncSession, principal: Principal, role: str | None, *, cluster_id: str | None
) -> list[LedgerAccount]:
    """The acting firm's accounts (the operator's include its cluster's issuance account).

    An account appears with its first posting.
    """
    _require_reader(principal, role)
    query = select(LedgerAccount).where(LedgerAccount.firm_id == principal.firm_id)
    if cluster_id:
        query = query.where(LedgerAccount.cluster_id == cluster_id)
    query = query.order_by(col(LedgerAccount.cluster_id), col(LedgerAccount.kind))
    return list((await session.execute(query)).scalars())


async def readable_account(
    session: AsyncSession, principal: Principal, role: str | None, account_id: str
) -> LedgerAccount:
    """One of the acting firm's accounts; another firm's (or an unknown) id is a 404."""
    account = await session.get(LedgerAccount, account_id)
    if account is None or role is None or account.firm_id != principal.firm_id:
        raise NotFound("No account with this id.")
    _require_reader(principal, role)
    return account


def _require_reader(principal: Principal, role: str | None) -> None:
    if role is None or principal.firm_id is None:
        raise Forbidden("Needs an active membership of a firm.")
    if role not in LEDGER_READERS:
        raise Forbidden("Statements are for the firm's owners and admins.")


@dataclass
class Entry:
    line: LedgerLine
    posting: LedgerPosting


async def entries(
    session: AsyncSession, account: LedgerAccount, *, limit: int, before: int | None
) -> list[Entry]:
    """The account's lines, newest first, ``limit + 1`` of them from before ``before``."""
    query = (
        select(LedgerLine, LedgerPosting)
        .join(LedgerPosting, col(LedgerPosting.id) == col(LedgerLine.posting_id))
        .where(LedgerLine.account_id == account.id)
        .order_by(col(LedgerLine.seq).desc())
        .limit(limit + 1)
    )
    if before is not None:
        query = query.where(LedgerLine.seq < before)
    return [Entry(line, posting) for line, posting in (await session.execute(query)).all()]
