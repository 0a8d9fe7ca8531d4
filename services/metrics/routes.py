"""HTTP routes of the metrics service, under ``/v1/clusters/{cluster_id}/`` and
``/v1/clusters/compare`` (the gateway hands that path to metrics: the route binding fewer
path parameters wins over membership's ``/v1/clusters/{cluster_id}``).

Who may call what is in :mod:`services.metrics.access`. Reads take ``window_days``
(default from the configuration, 90) and ``as_of`` (default now; a time without a zone
is UTC): the window is the ``window_days`` calendar days ending with the day of
``as_of``.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from services.kit.errors import MalformedBody, NotFound, Problem, Unprocessable, responses
from services.metrics import access, history, series, service
from services.metrics.compare import MAX_CLUSTERS
from services.metrics.deps import MetricsReader, MetricsWriter, SessionDep
from services.metrics.models import Cluster
from services.metrics.schemas import (
    ClassificationOut,
    ComparisonOut,
    DiagnosticsOut,
    HistoryImportResult,
    IndicatorsOut,
    NetworkOut,
    SeriesOut,
    VisibilityIn,
    VisibilityOut,
)

router = APIRouter(prefix="/v1", tags=["metrics"])
READ_ERRORS = responses(401, 403, 404, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]
WindowDays = Annotated[
    int | None, Query(ge=1, le=730, description="window length in days (default 90)")
]
AsOf = Annotated[datetime | None, Query(description="end of the window (default now)")]
Format = Annotated[Literal["json", "csv"], Query(description="`csv` for a spreadsheet (text/csv)")]
SVG = "image/svg+xml"
MAX_IMPORT_BYTES = 16 * 1024 * 1024
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Request body too large"


def _csv(text: str, filename: str) -> Response:
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.get(
    "/clusters/compare",
    response_model=ComparisonOut,
    summary="Clusters side by side: industry-structure similarity and the six features",
    description=(
        f"`ids`: 2 to {MAX_CLUSTERS} comma-separated cluster ids, each one the caller may "
        "read (any other is a 404 naming it). Cosine similarity and Krugman index of the "
        "member industry structures for every pair; feature scores and the decision "
        "list's type and form over the same window."
    ),
    responses=READ_ERRORS,
)
async def compare(
    session: SessionDep,
    principal: MetricsReader,
    ids: Annotated[str, Query(min_length=1, max_length=1000, examples=["cl_a,cl_b"])],
    window_days: WindowDays = None,
    as_of: AsOf = None,
) -> dict[str, Any]:
    wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    if not 2 <= len(wanted) <= MAX_CLUSTERS:
        raise Unprocessable(f"Give 2 to {MAX_CLUSTERS} distinct cluster ids in `ids`.")
    clusters = []
    for cluster_id in wanted:
        try:
            clusters.append((await access.readable_cluster(session, principal, cluster_id)).cluster)
        except NotFound:
            raise NotFound(f"No cluster with id {cluster_id!r}.", cluster_id=cluster_id) from None
    return await service.compare_clusters(session, clusters, _as_utc(as_of), window_days)


@router.get(
    "/clusters/{cluster_id}/indicators",
    response_model=IndicatorsOut,
    summary="The cluster's indicators and feature scores over a window",
    description=(
        "Every indicator with its definition, formula, value, the counts behind it and "
        "the observed/imported shares of its basis; the six feature scores (0-1). "
        "`format=csv`: one row per indicator (text/csv)."
    ),
    responses={**READ_ERRORS, 200: {"content": {"text/csv": {}}}},
)
async def get_indicators(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    window_days: WindowDays = None,
    as_of: AsOf = None,
    format: Format = "json",
) -> Any:
    await access.readable_cluster(session, principal, cluster_id)
    payload = await service.indicators(session, cluster_id, _as_utc(as_of), window_days)
    if format == "csv":
        return _csv(series.indicators_csv(payload), f"{cluster_id}-indicators.csv")
    return payload


@router.get(
    "/clusters/{cluster_id}/indicators/history",
    response_model=SeriesOut,
    summary="Indicators as a time series: a point every `step` days from `from` to `to`",
    description=(
        "Each point is the window of `window_days` days ending with its day, as "
        "`…/indicators?as_of=<that day>` would give it; the last point is `to`. "
        f"Defaults: the last 365 days, a point every 30 days; at most {series.MAX_POINTS} "
        "points. `format=csv`: one row per point (text/csv)."
    ),
    responses={**READ_ERRORS, 200: {"content": {"text/csv": {}}}},
)
async def get_indicator_history(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    from_: Annotated[date | None, Query(alias="from", description="first day (UTC)")] = None,
    to: Annotated[date | None, Query(description="last day (UTC), default today")] = None,
    step: Annotated[int, Query(ge=1, le=365, description="days between points")] = 30,
    window_days: WindowDays = None,
    format: Format = "json",
) -> Any:
    await access.readable_cluster(session, principal, cluster_id)
    payload = await series.indicator_series(
        session, cluster_id, start=from_, end=to, step_days=step, window_days=window_days
    )
    if format == "csv":
        return _csv(series.series_csv(payload), f"{cluster_id}-indicators-history.csv")
    return payload


@router.get(
    "/clusters/{cluster_id}/charts/radar.svg",
    response_class=Response,
    summary="SVG radar chart of the six feature scores",
    responses={**READ_ERRORS, 200: {"content": {SVG: {}}, "description": "an SVG document"}},
)
async def radar_chart(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    window_days: WindowDays = None,
    as_of: AsOf = None,
) -> Response:
    reader = await access.readable_cluster(session, principal, cluster_id)
    svg = await service.radar_chart(session, reader.cluster, _as_utc(as_of), window_days)
    return Response(svg, media_type=SVG)


@router.get(
    "/clusters/{cluster_id}/charts/network.svg",
    response_class=Response,
    summary="SVG drawing of the collaboration network, firms coloured by region",
    responses={**READ_ERRORS, 200: {"content": {SVG: {}}, "description": "an SVG document"}},
)
async def network_chart(
    cluster_id: Id,
    session: SessionDep,
    principal: MetricsReader,
    window_days: WindowDays = None,
    as_of: AsOf = None,
) -> Response:
    reader = await access.readable_cluster(session, principal, cluster_id)
    svg = await service.network_chart(session, reader.cluster, _as_utc(as_of), window_days)
    return Response(svg, media_type=SVG)


@router.get(
    "/clusters/{cluster_id}/metrics-visibility",
    response_model=VisibilityOut,
    summary="Whether member firms may read the cluster's metrics",
    description="For the operator and the member firms.",
    responses=READ_ERRORS,
)
async def get_visibility(
    cluster_id: Id, session: SessionDep, principal: MetricsReader
) -> dict[str, Any]:
    cluster = await session.get(Cluster, cluster_id)
    firm_id = principal.firm_id
    if cluster is None or firm_id is None:
        raise NotFound("No cluster with this id.")
    if cluster.operator_firm_id != firm_id and not await access.is_member(
        session, cluster_id, firm_id
    ):
        raise NotFound("No cluster with this id.")
    return await service.visibility(session, cluster_id)


@router.put(
    "/clusters/{cluster_id}/metrics-visibility",
    response_model=VisibilityOut,
    summary="Publish the cluster's metrics to its member firms, or stop publishing them",
    description=(
        "By the operator firm's owners and admins (or its clients with `metrics:write`). "
        "While `members` is true, every user of a member firm reads the indicators, "
        "network, classification, diagnostics, history and charts; importing history "
        "and this setting stay with the operator."
    ),
    responses=responses(400, 401, 403, 404, 422, 429),
)
async def put_visibility(
    cluster_id: Id, body: VisibilityIn, session: SessionDep, principal: MetricsWriter
) -> dict[str, Any]:
    await access.operated_cluster(session, principal, cluster_id)
    return await service.set_visibility(
        session, cluster_id, members=body.members, by=principal.subject
    )


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
    await access.readable_cluster(session, principal, cluster_id)
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
    await access.readable_cluster(session, principal, cluster_id)
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
    await access.readable_cluster(session, principal, cluster_id)
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
