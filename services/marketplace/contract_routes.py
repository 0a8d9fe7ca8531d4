"""HTTP routes of contracted allocation (bids, contracts) and of vendor reputation.

The domain lives in ``contracts.py`` and ``reputation.py``; claims on a contracted task
go through the ordinary ``/v1/tasks/{id}/assignments:claim``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from services.kit.errors import responses
from services.kit.pagination import Page, PageParams, make_page, page_of
from services.marketplace import contracts, reputation
from services.marketplace.deps import MarketplaceReader, MarketplaceWriter, SessionDep
from services.marketplace.models import Bid
from services.marketplace.schemas import (
    Award,
    BidCreate,
    BidDecline,
    BidOut,
    ContractOut,
    ReputationInput,
    ReputationOut,
)

router = APIRouter(prefix="/v1")
ERR = responses(400, 401, 403, 404, 409, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]


def bid_out(bid: Bid) -> BidOut:
    return BidOut(
        id=bid.id,
        task_id=bid.task_id,
        vendor_firm_id=bid.vendor_firm_id,
        price_per_annotation=bid.price_per_annotation,
        daily_capacity=bid.daily_capacity,
        note=bid.note,
        state=bid.state,
        decline_reason=bid.decline_reason,
        contract_id=bid.contract_id,
        created_at=bid.created_at,
        updated_at=bid.updated_at,
    )


def contract_out(view: contracts.ContractView) -> ContractOut:
    c = view.contract
    return ContractOut(
        id=c.id,
        task_id=c.task_id,
        bid_id=c.bid_id,
        vendor_firm_id=c.vendor_firm_id,
        price_per_annotation=c.price_per_annotation,
        quota=c.quota,
        daily_capacity=c.daily_capacity,
        state=c.state,
        used=view.used,
        remaining=view.remaining,
        claimed_today=view.claimed_today,
        created_at=c.created_at,
        terminated_at=c.terminated_at,
    )


# -- bids ----------------------------------------------------------------------------
@router.post(
    "/tasks/{task_id}/bids",
    status_code=201,
    response_model=BidOut,
    tags=["contracts"],
    summary="Bid on a contracted task (owners and admins of an eligible vendor firm)",
    responses=ERR,
)
async def place_bid(
    task_id: Id, body: BidCreate, session: SessionDep, principal: MarketplaceWriter
) -> BidOut:
    bid = await contracts.place_bid(
        session,
        principal,
        task_id,
        price_per_annotation=body.price_per_annotation,
        daily_capacity=body.daily_capacity,
        note=body.note,
    )
    return bid_out(bid)


@router.get(
    "/tasks/{task_id}/bids",
    response_model=Page[BidOut],
    tags=["contracts"],
    summary="Bids on a task: all of them for the requester, its own for a vendor",
    responses=ERR,
)
async def list_bids(
    task_id: Id, session: SessionDep, principal: MarketplaceReader, page: PageParams
) -> Page[BidOut]:
    rows = await contracts.list_bids(
        session, principal, task_id, limit=page.limit, after=page.after
    )
    found = make_page(rows, page.limit)
    return Page[BidOut](items=[bid_out(b) for b in found.items], next_cursor=found.next_cursor)


@router.get(
    "/tasks/{task_id}/bids/{bid_id}",
    response_model=BidOut,
    tags=["contracts"],
    summary="One bid",
    responses=ERR,
)
async def get_bid(
    task_id: Id, bid_id: Id, session: SessionDep, principal: MarketplaceReader
) -> BidOut:
    return bid_out(await contracts.get_bid(session, principal, task_id, bid_id))


@router.post(
    "/tasks/{task_id}/bids/{bid_id}:withdraw",
    response_model=BidOut,
    tags=["contracts"],
    summary="Take a pending bid back (the bidding firm)",
    responses=ERR,
)
async def withdraw_bid(
    task_id: Id, bid_id: Id, session: SessionDep, principal: MarketplaceWriter
) -> BidOut:
    return bid_out(await contracts.withdraw_bid(session, principal, task_id, bid_id))


@router.post(
    "/tasks/{task_id}/bids/{bid_id}:decline",
    response_model=BidOut,
    tags=["contracts"],
    summary="Turn a pending bid down (the requester)",
    responses=ERR,
)
async def decline_bid(
    task_id: Id,
    bid_id: Id,
    session: SessionDep,
    principal: MarketplaceWriter,
    body: BidDecline | None = None,
) -> BidOut:
    reason = body.reason if body else None
    return bid_out(await contracts.decline_bid(session, principal, task_id, bid_id, reason=reason))


@router.post(
    "/tasks/{task_id}/bids/{bid_id}:award",
    status_code=201,
    response_model=ContractOut,
    tags=["contracts"],
    summary="Award a pending bid: a contract for `quota` annotations at the bid's price",
    description=(
        "The quotas of the task's active contracts, plus what terminated ones used, may "
        "not exceed its items times its overlap (409 `quota-over-capacity`)."
    ),
    responses=ERR,
)
async def award_bid(
    task_id: Id, bid_id: Id, body: Award, session: SessionDep, principal: MarketplaceWriter
) -> ContractOut:
    view = await contracts.award_bid(session, principal, task_id, bid_id, quota=body.quota)
    return contract_out(view)


# -- contracts -----------------------------------------------------------------------
@router.get(
    "/tasks/{task_id}/contracts",
    response_model=Page[ContractOut],
    tags=["contracts"],
    summary="Contracts of a task: all of them for the requester, its own for a vendor",
    responses=ERR,
)
async def list_contracts(
    task_id: Id, session: SessionDep, principal: MarketplaceReader, page: PageParams
) -> Page[ContractOut]:
    views = await contracts.list_contracts(
        session, principal, task_id, limit=page.limit, after=page.after
    )
    found = page_of(views, views, page.limit, lambda v: v.contract.id)
    return Page[ContractOut](
        items=[contract_out(v) for v in found.items], next_cursor=found.next_cursor
    )


@router.get(
    "/tasks/{task_id}/contracts/{contract_id}",
    response_model=ContractOut,
    tags=["contracts"],
    summary="One contract with its used quota",
    responses=ERR,
)
async def get_contract(
    task_id: Id, contract_id: Id, session: SessionDep, principal: MarketplaceReader
) -> ContractOut:
    return contract_out(await contracts.get_contract(session, principal, task_id, contract_id))


@router.post(
    "/tasks/{task_id}/contracts/{contract_id}:terminate",
    response_model=ContractOut,
    tags=["contracts"],
    summary="End a contract (the requester): no new claims, live leases may be answered",
    responses=ERR,
)
async def terminate_contract(
    task_id: Id, contract_id: Id, session: SessionDep, principal: MarketplaceWriter
) -> ContractOut:
    view = await contracts.terminate_contract(session, principal, task_id, contract_id)
    return contract_out(view)


# -- reputation ----------------------------------------------------------------------
def _input(share: reputation.Share) -> ReputationInput:
    return ReputationInput(
        value=share.value,
        smoothed=round(share.smoothed, 6),
        hits=share.hits,
        total=share.total,
        weight=share.weight,
    )


@router.get(
    "/firms/{firm_id}/reputation",
    response_model=ReputationOut,
    tags=["reputation"],
    summary="A vendor firm's reputation (the firm itself, and firms sharing a cluster)",
    description=(
        "A score in [0, 1]: the weighted mean of gold accuracy, acceptance rate and on-time "
        "completion over the firm's annotators' work on the whole platform, each share "
        "pulled toward `prior` as if `prior_weight` observations at it had been seen (a "
        "new firm scores the prior). Computed at request time."
    ),
    responses=ERR,
)
async def get_reputation(
    firm_id: Id, session: SessionDep, principal: MarketplaceReader
) -> ReputationOut:
    found = await reputation.visible_reputation(session, principal, firm_id)
    return ReputationOut(
        firm_id=found.firm_id,
        score=found.score,
        prior=reputation.PRIOR,
        prior_weight=reputation.PRIOR_WEIGHT,
        gold_accuracy=_input(found.gold_accuracy),
        acceptance_rate=_input(found.acceptance_rate),
        on_time=_input(found.on_time),
        computed_at=found.computed_at,
    )
