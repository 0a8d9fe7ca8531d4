"""HTTP routes of the ledger (grants, accounts, statements) and of submission review.

``/v1/ledger/…`` for credits; ``/v1/tasks/{id}/submissions`` and its ``:accept`` /
``:reject`` actions for the requester's review.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from sqlmodel import col, select

from services.kit.db import Database
from services.kit.errors import BadRequest, responses
from services.kit.pagination import Page, PageParams, encode_cursor
from services.marketplace import ledger, review, service
from services.marketplace.deps import MarketplaceReader, MarketplaceWriter, SessionDep
from services.marketplace.models import Assignment, LedgerAccount, LedgerLine, LedgerPosting
from services.marketplace.schemas import (
    AccountOut,
    EntryOut,
    GrantCreate,
    GrantOut,
    PayoutOut,
    RejectIn,
    ReviewIn,
    ReviewResult,
    SubmissionOut,
    SubmissionState,
)

router = APIRouter(prefix="/v1")
ERR = responses(400, 401, 403, 404, 409, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]
CSV_BATCH = 1000


# -- ledger --------------------------------------------------------------------------
@router.post(
    "/ledger/grants",
    status_code=201,
    response_model=GrantOut,
    tags=["ledger"],
    summary="Issue credits to a member firm (the cluster operator's owners, admins, clients)",
    responses=ERR,
)
async def create_grant(
    body: GrantCreate, session: SessionDep, principal: MarketplaceWriter
) -> GrantOut:
    role = await service.acting_role(session, principal)
    posting, account = await ledger.grant(
        session,
        principal,
        role,
        cluster_id=body.cluster_id,
        firm_id=body.firm_id,
        amount=body.amount,
        memo=body.memo,
    )
    return GrantOut(
        posting_id=posting.id,
        cluster_id=body.cluster_id,
        firm_id=body.firm_id,
        amount=body.amount,
        memo=posting.memo,
        balance=account.balance,
        created_at=posting.created_at,
    )


@router.get(
    "/ledger/accounts",
    response_model=list[AccountOut],
    tags=["ledger"],
    summary="Your firm's accounts and balances (the operator also sees issuance)",
    responses=ERR,
)
async def list_accounts(
    session: SessionDep,
    principal: MarketplaceReader,
    cluster_id: Annotated[str | None, Query(max_length=64)] = None,
) -> list[AccountOut]:
    role = await service.acting_role(session, principal)
    accounts = await ledger.list_accounts(session, principal, role, cluster_id=cluster_id)
    return [_account_out(a) for a in accounts]


def _account_out(account: LedgerAccount) -> AccountOut:
    return AccountOut(
        id=account.id,
        cluster_id=account.cluster_id,
        firm_id=account.firm_id,
        kind=account.kind,
        balance=account.balance,
        updated_at=account.updated_at,
    )


@router.get(
    "/ledger/accounts/{account_id}/entries",
    response_model=Page[EntryOut],
    tags=["ledger"],
    summary="An account's statement, newest first (`format=csv`: every line as CSV)",
    responses={
        **ERR,
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
    },
)
async def account_entries(
    account_id: Id,
    request: Request,
    session: SessionDep,
    principal: MarketplaceReader,
    page: PageParams,
    format_: Annotated[Literal["json", "csv"], Query(alias="format")] = "json",
) -> Page[EntryOut] | StreamingResponse:
    role = await service.acting_role(session, principal)
    account = await ledger.readable_account(session, principal, role, account_id)
    if format_ == "csv":
        db: Database = request.app.state.db
        return StreamingResponse(
            _csv_lines(db, account.id),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{account.id}.csv"'},
        )
    before = _seq(page.after) if page.after else None
    rows = await ledger.entries(session, account, limit=page.limit, before=before)
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    return Page[EntryOut](
        items=[_entry_out(e.line, e.posting) for e in rows],
        next_cursor=encode_cursor(str(rows[-1].line.seq)) if more and rows else None,
    )


def _seq(cursor: str) -> int:
    try:
        return int(cursor)
    except ValueError:
        raise BadRequest("The cursor is not valid.") from None


def _entry_out(line: LedgerLine, posting: LedgerPosting) -> EntryOut:
    return EntryOut(
        id=line.id,
        seq=line.seq,
        posting_id=posting.id,
        kind=posting.kind,
        task_id=posting.task_id,
        memo=posting.memo,
        amount=line.amount,
        balance_after=line.balance_after,
        created_at=line.created_at,
    )


CSV_COLUMNS = ["seq", "created_at", "posting_id", "kind", "task_id", "amount", "balance_after"]


async def _csv_lines(db: Database, account_id: str) -> AsyncIterator[str]:
    """Every line of the account, newest first, read in batches in sessions of its own
    (the request's session is gone once the response starts)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*CSV_COLUMNS, "memo"])
    before: int | None = None
    while True:
        async with db.read_scope() as session:
            query = (
                select(LedgerLine, LedgerPosting)
                .join(LedgerPosting, col(LedgerPosting.id) == col(LedgerLine.posting_id))
                .where(LedgerLine.account_id == account_id)
                .order_by(col(LedgerLine.seq).desc())
                .limit(CSV_BATCH)
            )
            if before is not None:
                query = query.where(LedgerLine.seq < before)
            rows = (await session.execute(query)).all()
        for line, posting in rows:
            writer.writerow(
                [
                    line.seq,
                    line.created_at.isoformat(),
                    posting.id,
                    posting.kind,
                    posting.task_id or "",
                    line.amount,
                    line.balance_after,
                    posting.memo,
                ]
            )
        yield out.getvalue()
        out.seek(0)
        out.truncate()
        if len(rows) < CSV_BATCH:
            return
        before = rows[-1][0].seq


# -- review --------------------------------------------------------------------------
@router.get(
    "/tasks/{task_id}/submissions",
    response_model=Page[SubmissionOut],
    tags=["review"],
    summary="A task's submissions with their answers (the requester's owners, admins, clients)",
    responses=ERR,
)
async def list_submissions(
    task_id: Id,
    session: SessionDep,
    principal: MarketplaceReader,
    page: PageParams,
    status: SubmissionState | None = None,
    annotator_firm_id: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[SubmissionOut]:
    rows = await review.list_submissions(
        session,
        principal,
        task_id,
        status=status,
        annotator_firm_id=annotator_firm_id,
        limit=page.limit,
        after=page.after,
    )
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    return Page[SubmissionOut](
        items=[_submission_out(a) for a in rows],
        next_cursor=encode_cursor(rows[-1].id) if more and rows else None,
    )


def _submission_out(a: Assignment) -> SubmissionOut:
    return SubmissionOut(
        assignment_id=a.id,
        item_id=a.item_id,
        annotator_id=a.annotator_id,
        annotator_firm_id=a.annotator_firm_id,
        contract_id=a.contract_id,
        status=a.status,
        answer=a.answer,
        unit_price=a.unit_price,
        submitted_at=a.submitted_at,
        review_due_at=a.review_due_at,
        reviewed_at=a.reviewed_at,
        reject_reason=a.reject_reason,
    )


def _filter(body: ReviewIn) -> review.ReviewFilter | None:
    if body.filter is None:
        return None
    return review.ReviewFilter(**body.filter.model_dump())


def _result(outcome: review.ReviewOutcome) -> ReviewResult:
    return ReviewResult(
        count=outcome.count,
        amount=outcome.amount,
        payouts=[
            PayoutOut(
                posting_id=p.posting.id,
                firm_id=p.payee_firm_id,
                amount=p.amount,
                annotations=p.annotations,
            )
            for p in outcome.payouts
        ],
        refunded=outcome.refunded,
        more=outcome.more,
    )


@router.post(
    "/tasks/{task_id}/submissions:accept",
    response_model=ReviewResult,
    tags=["review"],
    summary="Accept submissions and pay their annotators' firms from escrow",
    description=(
        "`assignment_ids` (up to 1000) is all or nothing: an id already reviewed is a 409 "
        "with its `state`. `filter` accepts submitted ones that match, up to 1000 a call "
        "(`more` says whether to call again)."
    ),
    responses=ERR,
)
async def accept_submissions(
    task_id: Id, body: ReviewIn, session: SessionDep, principal: MarketplaceWriter
) -> ReviewResult:
    outcome = await review.accept(
        session, principal, task_id, assignment_ids=body.assignment_ids, where=_filter(body)
    )
    return _result(outcome)


@router.post(
    "/tasks/{task_id}/submissions:reject",
    response_model=ReviewResult,
    tags=["review"],
    summary="Reject submissions with a reason; their items open again for others",
    description=(
        "Like `:accept`, plus a mandatory `reason`. A submission past its review period "
        "was accepted automatically and cannot be rejected (409, `state: accepted`)."
    ),
    responses=ERR,
)
async def reject_submissions(
    task_id: Id, body: RejectIn, session: SessionDep, principal: MarketplaceWriter
) -> ReviewResult:
    outcome = await review.reject(
        session,
        principal,
        task_id,
        assignment_ids=body.assignment_ids,
        where=_filter(body),
        reason=body.reason,
    )
    return _result(outcome)
