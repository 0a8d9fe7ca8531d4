"""HTTP routes of the marketplace: tasks, their items, and claiming/submitting work.

Actions are ``POST …/{id}:verb`` as in membership (``/v1/tasks/{id}:publish``,
``/v1/tasks/{id}/assignments:claim``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request

from services.kit.errors import MalformedBody, Problem, Unprocessable, responses
from services.kit.pagination import Page, PageParams, encode_cursor
from services.marketplace import service
from services.marketplace.deps import MarketplaceReader, MarketplaceWriter, SessionDep
from services.marketplace.models import Item, Task
from services.marketplace.schemas import (
    MAX_ITEMS_PER_IMPORT,
    Claim,
    ClaimedItem,
    ClaimResult,
    Eligibility,
    ImportResult,
    ItemIn,
    ItemOut,
    RejectedLine,
    Release,
    ReleaseResult,
    Submit,
    SubmitResult,
    SubmittedOut,
    TaskCreate,
    TaskOut,
    TaskState,
    TaskUpdate,
)

router = APIRouter(prefix="/v1")
ERR = responses(400, 401, 403, 404, 409, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]
MAX_IMPORT_BYTES = 64 * 1024 * 1024


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Request body too large"


def task_out(task: Task, *, requester: bool) -> TaskOut:
    return TaskOut(
        id=task.id,
        cluster_id=task.cluster_id,
        requester_firm_id=task.requester_firm_id,
        title=task.title,
        instructions=task.instructions,
        kind=task.kind,
        label_schema=task.label_schema,
        allocation=task.allocation,
        reward_per_annotation=task.reward_per_annotation,
        overlap=task.overlap,
        lease_seconds=task.lease_seconds,
        review_period_seconds=task.review_period_seconds,
        deadline=task.deadline,
        eligibility=Eligibility(
            regions=task.allowed_regions,
            actor_types=task.allowed_actor_types,
            min_reputation=task.min_reputation,
        ),
        gold_rate=task.gold_rate,
        min_gold_accuracy=task.min_gold_accuracy,
        gold_min_answers=task.gold_min_answers,
        state=task.state,
        item_count=task.item_count - task.gold_count,
        gold_count=task.gold_count if requester else None,
        created_at=task.created_at,
        published_at=task.published_at,
    )


# -- tasks ---------------------------------------------------------------------------
@router.post(
    "/tasks",
    status_code=201,
    response_model=TaskOut,
    tags=["tasks"],
    summary="Create a draft task in one of your firm's clusters",
    responses=ERR,
)
async def create_task(
    body: TaskCreate, session: SessionDep, principal: MarketplaceWriter
) -> TaskOut:
    fields = body.model_dump(exclude={"cluster_id", "eligibility"})
    fields["eligibility"] = body.eligibility
    task = await service.create_task(session, principal, cluster_id=body.cluster_id, fields=fields)
    return task_out(task, requester=True)


@router.get(
    "/tasks",
    response_model=Page[TaskOut],
    tags=["tasks"],
    summary="Tasks you posted, and open work your firm is eligible for",
    responses=ERR,
)
async def list_tasks(
    session: SessionDep,
    principal: MarketplaceReader,
    page: PageParams,
    cluster_id: Annotated[str | None, Query(max_length=64)] = None,
    state: TaskState | None = None,
) -> Page[TaskOut]:
    tasks, more = await service.list_tasks(
        session, principal, cluster_id=cluster_id, state=state, limit=page.limit, after=page.after
    )
    items = [task_out(t, requester=t.requester_firm_id == principal.firm_id) for t in tasks]
    return Page[TaskOut](
        items=items, next_cursor=encode_cursor(tasks[-1].id) if more and tasks else None
    )


@router.get(
    "/tasks/{task_id}", response_model=TaskOut, tags=["tasks"], summary="One task", responses=ERR
)
async def get_task(task_id: Id, session: SessionDep, principal: MarketplaceReader) -> TaskOut:
    access = await service.task_access(session, principal, task_id)
    return task_out(access.task, requester=access.requester)


@router.patch(
    "/tasks/{task_id}",
    response_model=TaskOut,
    tags=["tasks"],
    summary="Change a draft task",
    responses=ERR,
)
async def update_task(
    task_id: Id, body: TaskUpdate, session: SessionDep, principal: MarketplaceWriter
) -> TaskOut:
    fields = {name: getattr(body, name) for name in body.model_fields_set}
    task = await service.update_task(session, principal, task_id, fields=fields)
    return task_out(task, requester=True)


def _transition_route(action: str, summary: str) -> None:
    async def endpoint(task_id: Id, session: SessionDep, principal: MarketplaceWriter) -> TaskOut:
        task = await service.transition_task(session, principal, task_id, action)
        return task_out(task, requester=True)

    endpoint.__name__ = f"{action}_task"
    router.add_api_route(
        f"/tasks/{{task_id}}:{action}",
        endpoint,
        methods=["POST"],
        response_model=TaskOut,
        tags=["tasks"],
        summary=summary,
        responses=ERR,
    )


_transition_route("publish", "Open a draft to annotators (draft → open)")
_transition_route("pause", "Stop handing out work (open → paused)")
_transition_route("resume", "Hand out work again (paused → open)")
_transition_route("complete", "Close the task as done (open | paused → completed)")
_transition_route("cancel", "Call the task off (draft | open | paused → cancelled)")


# -- items ---------------------------------------------------------------------------
IMPORT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"type": "array", "items": ItemIn.model_json_schema()},
            "example": [
                {"input": {"text": "Great phone"}},
                {"input": {"text": "Awful"}, "gold": True, "answer": {"label": "negative"}},
            ],
        },
        "application/x-ndjson": {
            "schema": {"type": "string", "description": "one ItemIn JSON object per line"}
        },
    },
}


@router.post(
    "/tasks/{task_id}/items",
    response_model=ImportResult,
    tags=["items"],
    summary=f"Import up to {MAX_ITEMS_PER_IMPORT} items (JSON array or JSONL)",
    description=(
        "All or nothing by default: one invalid line rejects the request (422, every "
        "rejected line listed with its 0-based index). With `mode=partial` the valid "
        "lines are imported and the rejected ones reported. Gold items carry "
        "`gold: true` and their known `answer`, which annotators never see."
    ),
    responses={**ERR, **responses(413)},
    openapi_extra={"requestBody": IMPORT_BODY},
)
async def import_items(
    task_id: Id,
    request: Request,
    session: SessionDep,
    principal: MarketplaceWriter,
    mode: Literal["all", "partial"] = "all",
) -> ImportResult:
    # Who may import is settled before the body is read: outsiders learn nothing from it.
    await service.require_item_writer(session, principal, task_id)
    lines = _parse_items(await _read_body(request), request.headers.get("content-type", ""))
    task, imported, gold, rejected = await service.import_items(
        session, principal, task_id, lines, partial=mode == "partial"
    )
    return ImportResult(
        imported=imported,
        gold=gold,
        rejected=[RejectedLine(index=i, reason=r) for i, r in rejected],
        item_count=task.item_count - task.gold_count,
    )


async def _read_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_IMPORT_BYTES:
            raise PayloadTooLarge(f"At most {MAX_IMPORT_BYTES} bytes per import.")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_items(body: bytes, content_type: str) -> list[Any]:
    """A JSON array, or JSONL (one object per line; blank lines are skipped)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("application/x-ndjson", "application/jsonl", "application/ndjson"):
        lines: list[Any] = []
        for number, line in enumerate(body.splitlines()):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    raise MalformedBody(f"Line {number + 1} is not JSON.") from None
        if len(lines) > MAX_ITEMS_PER_IMPORT:
            raise Unprocessable(f"At most {MAX_ITEMS_PER_IMPORT} items per request.")
        return lines
    if media not in ("application/json", ""):
        raise Unprocessable("Send application/json (an array) or application/x-ndjson.")
    try:
        value = json.loads(body)
    except ValueError:
        raise MalformedBody("The body is not valid JSON.") from None
    if not isinstance(value, list):
        raise Unprocessable("The body must be a JSON array of items.")
    return value


@router.get(
    "/tasks/{task_id}/items",
    response_model=Page[ItemOut],
    tags=["items"],
    summary="A task's items with gold answers (the requester's owners, admins, clients)",
    responses=ERR,
)
async def list_items(
    task_id: Id, session: SessionDep, principal: MarketplaceReader, page: PageParams
) -> Page[ItemOut]:
    rows = await service.list_items(session, principal, task_id, limit=page.limit, after=page.after)
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    return Page[ItemOut](
        items=[_item_out(item) for item in rows],
        next_cursor=encode_cursor(rows[-1].id) if more and rows else None,
    )


def _item_out(item: Item) -> ItemOut:
    return ItemOut(
        id=item.id,
        external_id=item.external_id,
        input=item.input,
        gold=item.gold,
        answer=item.gold_answer,
        created_at=item.created_at,
    )


# -- assignments ---------------------------------------------------------------------
@router.post(
    "/tasks/{task_id}/assignments:claim",
    response_model=ClaimResult,
    tags=["assignments"],
    summary="Lease up to `count` items to annotate (fewer, or none, when work runs out)",
    responses=ERR,
)
async def claim(
    task_id: Id, body: Claim, session: SessionDep, principal: MarketplaceWriter
) -> ClaimResult:
    claimed = await service.claim_assignments(session, principal, task_id, count=body.count)
    return ClaimResult(
        assignments=[
            ClaimedItem(
                assignment_id=a.id, item_id=item.id, input=item.input, expires_at=a.expires_at
            )
            for a, item in claimed
        ]
    )


@router.post(
    "/tasks/{task_id}/assignments:release",
    response_model=ReleaseResult,
    tags=["assignments"],
    summary="Give live leases back without answering",
    responses=ERR,
)
async def release(
    task_id: Id, body: Release, session: SessionDep, principal: MarketplaceWriter
) -> ReleaseResult:
    released = await service.release_assignments(session, principal, task_id, body.assignment_ids)
    return ReleaseResult(released=released)


@router.post(
    "/tasks/{task_id}/assignments:submit",
    response_model=SubmitResult,
    tags=["assignments"],
    summary="Answer one or many leased items",
    responses=ERR,
)
async def submit(
    task_id: Id, body: Submit, session: SessionDep, principal: MarketplaceWriter
) -> SubmitResult:
    done = await service.submit_answers(
        session, principal, task_id, [(a.assignment_id, a.answer) for a in body.answers]
    )
    return SubmitResult(
        submitted=[
            SubmittedOut(assignment_id=a.id, item_id=a.item_id, submitted_at=a.submitted_at)
            for a in done
        ]
    )
