"""HTTP routes of the metrics service, all under ``/v1/clusters/{cluster_id}/``.

Reads take ``window_days`` (default from the configuration, 90) and ``as_of`` (default
now; a time without a zone is UTC): the window is the ``window_days`` calendar days
ending with the day of ``as_of``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from services.kit.errors import MalformedBody, Problem, Unprocessable, responses
from services.metrics import access, history, service
from services.metrics.deps import MetricsReader, MetricsWriter, SessionDep
from services.metrics.schemas import (
    ClassificationOut,
    DiagnosticsOut,
    HistoryImportResult,
    IndicatorsOut,
    NetworkOut,
)

router = APIRouter(prefix="/v1", tags=["metrics"])
READ_ERRORS = responses(401, 403, 404, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]
WindowDays = Annotated[
    int | None, Query(ge=1, le=730, description="window length in days (default 90)")
]
AsOf = Annotated[datetime | None, Query(description="end of the window (default now)")]
MAX_IMPORT_BYTES = 16 * 1024 * 1024
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Request body too large"


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.get(
    "/clusters/{cluster_id}/indicators",
    response_model=IndicatorsOut,
    summary="The cluster's indicators and feature scores over a window",
    description=(
        "Every indicator with its definition, formula, value, the counts behind it and "
        "the observed/imported shares of its basis; the six feature scores (0-1)."
    ),
    responses=READ_ERRORS,
)
async def get_indicators(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    window_days: WindowDays = None,
    as_of: AsOf = None,
) -> dict[str, Any]:
    await access.operated_cluster(session, principal, cluster_id)
    return await service.indicators(session, cluster_id, _as_utc(as_of), window_days)


@router.get(
    "/clusters/{cluster_id}/network",
    response_model=NetworkOut,
    summary="The collaboration network: firms, weighted ties and network statistics",
    responses=READ_ERRORS,
)
async def get_network(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    window_days: WindowDays = None,
    as_of: AsOf = None,
) -> dict[str, Any]:
    await access.operated_cluster(session, principal, cluster_id)
    return await service.network(session, cluster_id, _as_utc(as_of), window_days)


@router.get(
    "/clusters/{cluster_id}/classification",
    response_model=ClassificationOut,
    summary="Cluster type and agglomeration form, with confidence and deciding indicators",
    description=(
        "Computed for the window asked for; `history` lists the recorded "
        "classifications (a row each time the type or form changed)."
    ),
    responses=READ_ERRORS,
)
async def get_classification(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    window_days: WindowDays = None,
    as_of: AsOf = None,
) -> dict[str, Any]:
    await access.operated_cluster(session, principal, cluster_id)
    return await service.classification(session, cluster_id, _as_utc(as_of), window_days)


@router.get(
    "/clusters/{cluster_id}/diagnostics",
    response_model=DiagnosticsOut,
    summary="The four known problems, each with its signals, values and thresholds",
    description=(
        "Low operating efficiency, homogeneous competition, idle carriers, and "
        "agglomerated but not clustered; a problem is flagged when a signal crosses."
    ),
    responses=READ_ERRORS,
)
async def get_diagnostics(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    window_days: WindowDays = None,
    as_of: AsOf = None,
) -> dict[str, Any]:
    await access.operated_cluster(session, principal, cluster_id)
    return await service.diagnostics(session, cluster_id, _as_utc(as_of), window_days)


IMPORT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"type": "array", "items": history.HistoryLine.model_json_schema()},
            "example": [
                {
                    "firm_a": "frm_01HZX…",
                    "firm_b": "frm_01HZY…",
                    "kind": "joint_project",
                    "weight": 2.0,
                    "date": "2026-03-14",
                    "external_id": "erp-4711",
                }
            ],
        },
        "application/x-ndjson": {
            "schema": {"type": "string", "description": "one record JSON object per line"}
        },
    },
}


@router.post(
    "/clusters/{cluster_id}/history",
    response_model=HistoryImportResult,
    summary=f"Import up to {history.MAX_LINES} dated collaboration records (JSON or JSONL)",
    description=(
        "By the cluster's operator. All or nothing: any invalid line rejects the request "
        "(422, `rejected` lists each 0-based index and reason). A line already imported "
        "(same `external_id`, or the same content without one) is skipped and counted "
        "in `duplicates`."
    ),
    responses={**responses(400, 401, 403, 404, 413, 422, 429)},
    openapi_extra={"requestBody": IMPORT_BODY},
)
async def import_history(
    cluster_id: Id, request: Request, session: SessionDep, principal: MetricsWriter
) -> HistoryImportResult:
    # Who may import is settled before the body is read.
    cluster = await access.operated_cluster(session, principal, cluster_id)
    lines = _parse(await _read_body(request), request.headers.get("content-type", ""))
    outcome = await history.import_history(session, principal, cluster, lines)
    return HistoryImportResult(
        lines=outcome.lines, imported=outcome.imported, duplicates=outcome.duplicates
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


def _parse(body: bytes, content_type: str) -> list[Any]:
    """A JSON array, or JSONL (one object per line; blank lines skipped)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in JSONL_TYPES:
        lines: list[Any] = []
        for number, line in enumerate(body.splitlines()):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    raise MalformedBody(f"Line {number + 1} is not JSON.") from None
        return lines
    if media not in ("application/json", ""):
        raise Unprocessable("Send application/json (an array) or application/x-ndjson.")
    try:
        value = json.loads(body)
    except ValueError:
        raise MalformedBody("The body is not valid JSON.") from None
    if not isinstance(value, list):
        raise Unprocessable("The body must be a JSON array of records.")
    return value
