"""HTTP routes of a task's quality report, aggregated results and raw annotation export.

Exports stream (``application/x-ndjson`` or ``text/csv``, with a ``Content-Disposition``
file name); who may read them is checked before the first byte, so refusals are
ordinary problem+json responses. See ``results.py`` for the rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from services.kit.db import Database
from services.kit.errors import responses
from services.marketplace import results
from services.marketplace.deps import MarketplaceReader, SessionDep

router = APIRouter(prefix="/v1")
ERR = responses(400, 401, 403, 404, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]
FormatQuery = Annotated[
    results.Format, Query(alias="format", description="`jsonl` (default) or `csv`")
]


# -- shapes --------------------------------------------------------------------------
class AnnotatorQuality(BaseModel):
    annotator_id: str
    firm_id: str
    answered: int = Field(description="answers to non-gold items, any status")
    gold_answered: int
    gold_correct: int
    gold_accuracy: float | None = Field(description="gold_correct / gold_answered")


class FirmQuality(BaseModel):
    firm_id: str
    answered: int
    gold_answered: int
    gold_correct: int
    gold_accuracy: float | None


class Agreement(BaseModel):
    method: Literal["krippendorff_alpha_nominal"] = "krippendorff_alpha_nominal"
    alpha: float | None = Field(
        description="1 = perfect agreement, 0 = chance, below 0 = systematic disagreement; "
        "null when undefined (no item with two answers, or no variation)"
    )
    items: int = Field(description="non-gold items with at least two counted answers")
    annotations: int = Field(description="counted answers on those items")
    note: str | None = None


class QualityCounts(BaseModel):
    items: int
    gold_items: int
    items_answered: int = Field(description="non-gold items with at least one counted answer")
    items_complete: int = Field(description="non-gold items that reached the task's overlap")
    answers: dict[str, int] = Field(description="answers to non-gold items by status")
    gold_answers: dict[str, int] = Field(description="answers to gold items by status")


class QualityOut(BaseModel):
    task_id: str
    kind: str
    counts: QualityCounts
    agreement: Agreement
    annotators: list[AnnotatorQuality]
    firms: list[FirmQuality]


def _stream_doc(columns: tuple[str, ...], example: dict[str, Any]) -> dict[int | str, Any]:
    return {
        200: {
            "description": "A streamed file: one JSON object per line, or CSV with a header",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string"}, "example": example},
                "text/csv": {"schema": {"type": "string"}, "example": ",".join(columns)},
            },
        },
        **ERR,
    }


# -- routes --------------------------------------------------------------------------
@router.get(
    "/tasks/{task_id}/quality",
    response_model=QualityOut,
    tags=["results"],
    summary="Gold accuracy per annotator and vendor firm, agreement and counts",
    responses=ERR,
)
async def get_quality(task_id: Id, session: SessionDep, principal: MarketplaceReader) -> QualityOut:
    report = await results.quality_report(session, principal, task_id)
    note = None
    if report.kind not in results.CATEGORICAL:
        note = (
            "answers are compared as exact canonical JSON: near-identical spans, boxes or "
            "transcriptions count as disagreement, so alpha is a lower bound"
        )
    return QualityOut(
        task_id=report.task_id,
        kind=report.kind,
        counts=QualityCounts(
            items=report.items,
            gold_items=report.gold_items,
            items_answered=report.items_answered,
            items_complete=report.items_complete,
            answers=report.statuses,
            gold_answers=report.gold_statuses,
        ),
        agreement=Agreement(
            alpha=report.alpha,
            items=report.alpha_items,
            annotations=report.alpha_annotations,
            note=note,
        ),
        annotators=[
            AnnotatorQuality(
                annotator_id=annotator_id,
                firm_id=firm_id,
                answered=score.answered,
                gold_answered=score.gold_answered,
                gold_correct=score.gold_correct,
                gold_accuracy=score.gold_accuracy,
            )
            for (annotator_id, firm_id), score in sorted(report.annotators.items())
        ],
        firms=[
            FirmQuality(
                firm_id=firm_id,
                answered=score.answered,
                gold_answered=score.gold_answered,
                gold_correct=score.gold_correct,
                gold_accuracy=score.gold_accuracy,
            )
            for firm_id, score in sorted(report.firms.items())
        ],
    )


@router.get(
    "/tasks/{task_id}/results",
    tags=["results"],
    summary="One aggregated answer per non-gold item, streamed as JSONL or CSV",
    description=(
        "Columns: " + ", ".join(results.RESULT_COLUMNS) + ". Counted answers are those "
        "submitted or accepted (`status=accepted`: accepted only); rejected ones never "
        "count. `majority_vote`: confidence is the winning share, ties go to the label "
        "listed first in the schema. `dawid_skene` (classification kinds only): EM over "
        "each annotator's confusion matrix, gold items pinned to their answers; "
        "confidence is the posterior. `one_coin_dawid_skene`: one accuracy per annotator. "
        "Items with no counted answer have no label."
    ),
    response_class=StreamingResponse,
    responses=_stream_doc(
        results.RESULT_COLUMNS,
        {
            "item_id": "item_01J…",
            "external_id": "r1",
            "label": "positive",
            "answer": {"label": "positive"},
            "confidence": 0.97,
            "method": "dawid_skene",
            "annotations": 3,
        },
    ),
)
async def get_results(
    task_id: Id,
    request: Request,
    session: SessionDep,
    principal: MarketplaceReader,
    fmt: FormatQuery = "jsonl",
    method: results.Method = "majority_vote",
    status: Literal["accepted"] | None = None,
) -> StreamingResponse:
    task = await results.require_results_reader(session, principal, task_id)
    statuses = results.counted_statuses(status)
    fitted = None
    if method != "majority_vote":
        fitted = await results.fit_dawid_skene(
            session, task, statuses, one_coin=method == "one_coin_dawid_skene"
        )
    db: Database = request.app.state.db
    return _download(
        results.stream_results(db, task, method=method, statuses=statuses, fmt=fmt, fitted=fitted),
        results.filename(task, f"results-{method}", fmt),
        fmt,
    )


@router.get(
    "/tasks/{task_id}/annotations",
    tags=["results"],
    summary="Every answered assignment (raw annotations), streamed as JSONL or CSV",
    description=(
        "Columns: " + ", ".join(results.ANNOTATION_COLUMNS) + ". Grouped by item; "
        "`answer` is the annotator's answer as JSON; `gold` marks answers to gold items "
        "and `correct` says whether they matched the gold answer. Rejected answers are "
        "included with their status; `status` filters on it."
    ),
    response_class=StreamingResponse,
    responses=_stream_doc(
        results.ANNOTATION_COLUMNS,
        {
            "assignment_id": "asg_01J…",
            "item_id": "item_01J…",
            "external_id": "r1",
            "annotator_id": "usr_01J…",
            "annotator_firm_id": "firm_01J…",
            "status": "submitted",
            "answer": {"label": "positive"},
            "submitted_at": "2026-01-01T00:00:00+00:00",
            "gold": False,
            "correct": None,
        },
    ),
)
async def get_annotations(
    task_id: Id,
    request: Request,
    session: SessionDep,
    principal: MarketplaceReader,
    fmt: FormatQuery = "jsonl",
    status: Annotated[str | None, Query(max_length=16)] = None,
) -> StreamingResponse:
    task = await results.require_results_reader(session, principal, task_id)
    db: Database = request.app.state.db
    return _download(
        results.stream_annotations(db, task, status=status, fmt=fmt),
        results.filename(task, "annotations", fmt),
        fmt,
    )


def _download(body: Any, name: str, fmt: results.Format) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type=results.MEDIA_TYPES[fmt],
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-store",
        },
    )
