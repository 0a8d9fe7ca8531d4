"""Contracted allocation: vendors bid on a task, the requester awards contracts.

A task with ``allocation = "contracted"`` takes bids once published (open or paused)
from owners and admins (or integrator clients) of member firms that pass the task's
eligibility; the requester firm does not bid on its own task. A bid is ``pending →
awarded | declined | withdrawn``; a firm holds one live (pending or awarded) bid per
task, so a firm whose contract was terminated does not come back through a new bid.

Awarding a bid creates a ``contract`` with the bid's price and daily capacity and the
quota the requester chose. Quotas may not promise more annotations than the task has to
give: active quotas plus what terminated contracts used stay within items times overlap.
Claims on the task then come only from contracted vendors, within their quota and daily
capacity (``service.claim_assignments``). Terminating a contract stops new claims; live
leases may still be answered and are paid at the contract's price.

Bids and awards of one task lock the task's row, so two awards cannot both pass the
capacity check, and a firm cannot place two live bids at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from api.events import ContractAwardedV1
from services.kit.auth import Principal
from services.kit.db import utcnow
from services.kit.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    InvalidState,
    NotFound,
    Problem,
    Unprocessable,
)
from services.kit.ids import new_id
from services.kit.outbox import emit
from services.marketplace.models import Bid, Contract, KnownFirm, MarketplaceOutbox, Task
from services.marketplace.service import (
    REQUESTER_ADMINS,
    TaskAccess,
    contract_usage,
    firm_eligible,
    is_cluster_member,
    require_requester_admin,
    task_access,
)

BIDDABLE_STATES = frozenset({"open", "paused"})
LIVE_BIDS = ("pending", "awarded")


class OverCapacity(Problem):
    status, slug, title = 409, "quota-over-capacity", "More than the task has to give"


@dataclass
class ContractView:
    """A contract with what its vendor has used of it."""

    contract: Contract
    used: int
    claimed_today: int

    @property
    def remaining(self) -> int:
        if self.contract.state != "active":
            return 0
        return max(0, self.contract.quota - self.used)


# -- access --------------------------------------------------------------------------
def require_vendor_admin(access: TaskAccess) -> None:
    """Bidding: owners and admins (or clients) of an eligible firm other than the requester."""
    if access.requester:
        raise Forbidden("A firm does not bid on its own task.")
    if access.role not in REQUESTER_ADMINS and access.role != "client":
        raise Forbidden("Bidding needs the firm's owner or admin role.")


def _contracted(task: Task) -> None:
    if task.allocation != "contracted":
        raise InvalidState(
            "This task is open to every eligible firm; it takes no bids.",
            state=task.state,
            allocation=task.allocation,
        )


async def _bid(
    session: AsyncSession, access: TaskAccess, firm_id: str, bid_id: str, *, lock: bool = False
) -> Bid:
    """A bid of the task: any for the requester, only its own for a vendor; else 404."""
    query = select(Bid).where(Bid.id == bid_id, Bid.task_id == access.task.id)
    if not access.requester:
        query = query.where(Bid.vendor_firm_id == firm_id)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    bid = (await session.execute(query)).scalar_one_or_none()
    if bid is None:
        raise NotFound("No bid with this id on this task.")
    return bid


# -- bids ----------------------------------------------------------------------------
async def place_bid(
    session: AsyncSession,
    principal: Principal,
    task_id: str,
    *,
    price_per_annotation: int,
    daily_capacity: int,
    note: str,
) -> Bid:
    """A pending bid of the acting firm; the task's reward (what was escrowed) caps its price."""
    access = await task_access(session, principal, task_id, lock=True)
    require_vendor_admin(access)
    task = access.task
    _contracted(task)
    if task.state not in BIDDABLE_STATES:
        raise InvalidState(f"A {task.state} task takes no bids.", state=task.state)
    if price_per_annotation > task.reward_per_annotation:
        raise Unprocessable(
            "price_per_annotation may not exceed the task's reward per annotation.",
            reward_per_annotation=task.reward_per_annotation,
        )
    firm_id = principal.firm_id or ""
    live = (
        await session.execute(
            select(Bid.id).where(
                Bid.task_id == task.id,
                Bid.vendor_firm_id == firm_id,
                col(Bid.state).in_(LIVE_BIDS),
            )
        )
    ).scalar_one_or_none()
    if live is not None:
        raise AlreadyExists("Your firm already has a live bid on this task.", bid_id=live)
    now = utcnow()
    bid = Bid(
        id=new_id("bid"),
        task_id=task.id,
        vendor_firm_id=firm_id,
        created_by=principal.subject,
        price_per_annotation=price_per_annotation,
        daily_capacity=daily_capacity,
        note=note,
        created_at=now,
        updated_at=now,
    )
    session.add(bid)
    await session.flush()
    return bid


async def list_bids(
    session: AsyncSession, principal: Principal, task_id: str, *, limit: int, after: str | None
) -> list[Bid]:
    """Every bid for the requester firm; its own bids for a vendor (``limit + 1`` rows)."""
    access = await task_access(session, principal, task_id)
    query = select(Bid).where(Bid.task_id == task_id).order_by(col(Bid.id)).limit(limit + 1)
    if not access.requester:
        query = query.where(Bid.vendor_firm_id == principal.firm_id)
    if after:
        query = query.where(Bid.id > after)
    return list((await session.execute(query)).scalars())


async def get_bid(session: AsyncSession, principal: Principal, task_id: str, bid_id: str) -> Bid:
    access = await task_access(session, principal, task_id)
    return await _bid(session, access, principal.firm_id or "", bid_id)


async def withdraw_bid(
    session: AsyncSession, principal: Principal, task_id: str, bid_id: str
) -> Bid:
    """The bidder takes a pending bid back (an awarded one is a contract: 409)."""
    access = await task_access(session, principal, task_id, lock=True)
    bid = await _bid(session, access, principal.firm_id or "", bid_id, lock=True)
    if bid.vendor_firm_id != principal.firm_id:
        raise Forbidden("Only the bidding firm withdraws its bid.")
    require_vendor_admin(access)
    return await _move(session, bid, "withdrawn")


async def decline_bid(
    session: AsyncSession, principal: Principal, task_id: str, bid_id: str, *, reason: str | None
) -> Bid:
    """The requester turns a pending bid down, optionally saying why."""
    access = await task_access(session, principal, task_id, lock=True)
    bid = await _bid(session, access, principal.firm_id or "", bid_id, lock=True)
    require_requester_admin(access)
    return await _move(session, bid, "declined", reason=reason)


async def _move(session: AsyncSession, bid: Bid, target: str, *, reason: str | None = None) -> Bid:
    if bid.state != "pending":
        raise InvalidState(f"A {bid.state} bid cannot be {target}.", state=bid.state)
    bid.state, bid.decline_reason = target, reason
    bid.updated_at = utcnow()
    await session.flush()
    return bid


async def award_bid(
    session: AsyncSession, principal: Principal, task_id: str, bid_id: str, *, quota: int
) -> ContractView:
    """Turn a pending bid into an active contract for ``quota`` annotations."""
    access = await task_access(session, principal, task_id, lock=True)  # one award at a time
    bid = await _bid(session, access, principal.firm_id or "", bid_id, lock=True)
    require_requester_admin(access)
    task = access.task
    if bid.state != "pending":
        raise InvalidState(f"A {bid.state} bid cannot be awarded.", state=bid.state)
    if task.state not in BIDDABLE_STATES:
        raise InvalidState(f"A {task.state} task awards no contracts.", state=task.state)
    vendor = await session.get(KnownFirm, bid.vendor_firm_id)
    if (
        vendor is None
        or not await is_cluster_member(session, task.cluster_id, vendor.id)
        or not await firm_eligible(session, task, vendor)
    ):
        raise Conflict("The bidding firm is no longer eligible for this task.")
    now = utcnow()
    capacity = (task.item_count - task.gold_count) * task.overlap
    committed = await _committed(session, task.id)
    if committed + quota > capacity:
        raise OverCapacity(
            f"The task has {capacity} annotations to give and {committed} are promised.",
            capacity=capacity,
            committed=committed,
            available=max(0, capacity - committed),
        )
    contract = Contract(
        id=new_id("ctr"),
        task_id=task.id,
        bid_id=bid.id,
        vendor_firm_id=bid.vendor_firm_id,
        price_per_annotation=bid.price_per_annotation,
        quota=quota,
        daily_capacity=bid.daily_capacity,
        awarded_by=principal.subject,
        created_at=now,
    )
    session.add(contract)
    bid.state, bid.contract_id, bid.updated_at = "awarded", contract.id, now
    requester = await session.get(KnownFirm, task.requester_firm_id)
    emit(
        session,
        MarketplaceOutbox,
        ContractAwardedV1(
            contract_id=contract.id,
            task_id=task.id,
            cluster_id=task.cluster_id,
            requester_firm_id=task.requester_firm_id,
            requester_region=requester.region if requester else "",
            vendor_firm_id=vendor.id,
            vendor_region=vendor.region,
            price_per_annotation=contract.price_per_annotation,
            quota=quota,
        ),
    )
    await session.flush()
    return ContractView(contract, used=0, claimed_today=0)


async def _committed(session: AsyncSession, task_id: str) -> int:
    """Annotations promised: active quotas, plus what terminated contracts used."""
    contracts = list(
        (await session.execute(select(Contract).where(Contract.task_id == task_id))).scalars()
    )
    ended = [c.id for c in contracts if c.state != "active"]
    usage = await contract_usage(session, ended, utcnow()) if ended else {}
    return sum(c.quota for c in contracts if c.state == "active") + sum(
        used for used, _ in usage.values()
    )


# -- contracts -----------------------------------------------------------------------
async def list_contracts(
    session: AsyncSession, principal: Principal, task_id: str, *, limit: int, after: str | None
) -> list[ContractView]:
    """Every contract for the requester firm; its own for a vendor (``limit + 1`` rows)."""
    access = await task_access(session, principal, task_id)
    query = (
        select(Contract)
        .where(Contract.task_id == task_id)
        .order_by(col(Contract.id))
        .limit(limit + 1)
    )
    if not access.requester:
        query = query.where(Contract.vendor_firm_id == principal.firm_id)
    if after:
        query = query.where(Contract.id > after)
    return await _views(session, list((await session.execute(query)).scalars()))


async def get_contract(
    session: AsyncSession, principal: Principal, task_id: str, contract_id: str
) -> ContractView:
    access = await task_access(session, principal, task_id)
    contract = await _contract(session, access, principal.firm_id or "", contract_id)
    return (await _views(session, [contract]))[0]


async def terminate_contract(
    session: AsyncSession, principal: Principal, task_id: str, contract_id: str
) -> ContractView:
    """The requester ends a contract: no new claims; live leases may still be answered."""
    access = await task_access(session, principal, task_id)
    # Waits for a claim that holds the row: it commits against the contract still active.
    contract = await _contract(session, access, principal.firm_id or "", contract_id, lock=True)
    require_requester_admin(access)
    if contract.state != "active":
        raise InvalidState(f"A {contract.state} contract cannot end.", state=contract.state)
    contract.state, contract.terminated_at = "terminated", utcnow()
    await session.flush()
    return (await _views(session, [contract]))[0]


async def _contract(
    session: AsyncSession,
    access: TaskAccess,
    firm_id: str,
    contract_id: str,
    *,
    lock: bool = False,
) -> Contract:
    query = select(Contract).where(Contract.id == contract_id, Contract.task_id == access.task.id)
    if not access.requester:
        query = query.where(Contract.vendor_firm_id == firm_id)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    contract = (await session.execute(query)).scalar_one_or_none()
    if contract is None:
        raise NotFound("No contract with this id on this task.")
    return contract


async def _views(session: AsyncSession, contracts: Sequence[Contract]) -> list[ContractView]:
    if not contracts:
        return []
    usage = await contract_usage(session, [c.id for c in contracts], utcnow())
    return [ContractView(c, *usage[c.id]) for c in contracts]
