"""Metrics domain: indicators, network and classification of a window; recording changes.

Reads load the window's facts in a few queries and compute in a worker thread (numpy and
networkx hold the CPU, not the event loop). The *recorded* classification history is
written by a sweep: every ``reclassify_interval_seconds`` the clusters whose facts
changed (``clusters.dirty``, set by the consumers and the history import) are classified
as of now over the default window, and a row plus a ``cluster.classification_changed``
event are written when the type or the form differs from the last recorded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from api.events import ClusterClassificationChangedV1
from services.kit.db import Database, utcnow
from services.kit.ids import new_id
from services.kit.outbox import emit
from services.metrics import charts
from services.metrics.classifier import classify
from services.metrics.compare import comparison
from services.metrics.config import MetricsConfig, load_config
from services.metrics.diagnostics import DiagnosticInputs, diagnose, load_inputs
from services.metrics.facts import ClusterFacts, load_facts
from services.metrics.indicators import FEATURES, compute_indicators
from services.metrics.models import Classification, Cluster, ClusterSettings, MetricsOutbox
from services.metrics.network import build_graph, graph_payload, network_statistics

log = logging.getLogger("onecluster.metrics")
HISTORY_LIMIT = 100


def window_of(config: MetricsConfig, as_of: datetime | None, window_days: int | None) -> Any:
    return (as_of or utcnow()), (window_days or config.window_days)


def _window(facts: ClusterFacts) -> dict[str, Any]:
    return {
        "days": facts.window_days,
        "start": facts.start_day.isoformat(),
        "end": facts.end_day.isoformat(),
    }


def indicators_payload(facts: ClusterFacts, config: MetricsConfig) -> dict[str, Any]:
    report = compute_indicators(facts, config)
    total = float(report.frame.weight.sum())
    imported = float(report.frame.weight[report.frame.imported].sum())
    return {
        "cluster_id": facts.cluster_id,
        "as_of": facts.as_of,
        "window": _window(facts),
        "config_version": config.version,
        "features": [
            {
                "key": key,
                "name": FEATURES[key],
                "score": None if score is None else round(score, 6),
            }
            for key, score in report.features.items()
        ],
        "indicators": [i.as_dict() for i in report.indicators.values()],
        "evidence": {
            "members": report.frame.size,
            "active_members": report.active_members,
            "ties": report.ties,
            "days_of_data": report.days_of_data,
            "collaboration_weight": round(total, 6),
            "observed_share": round(1 - imported / total, 6) if total else None,
            "imported_share": round(imported / total, 6) if total else None,
        },
    }


def classification_payload(facts: ClusterFacts, config: MetricsConfig) -> dict[str, Any]:
    report = compute_indicators(facts, config)
    return {
        "cluster_id": facts.cluster_id,
        "as_of": facts.as_of,
        "window": _window(facts),
        **classify(report, config),
    }


def network_payload(facts: ClusterFacts, config: MetricsConfig) -> dict[str, Any]:
    graph = build_graph(facts, config)
    return {
        "cluster_id": facts.cluster_id,
        "as_of": facts.as_of,
        "window": _window(facts),
        "config_version": config.version,
        "statistics": _rounded(network_statistics(graph, config)),
        **graph_payload(graph, config),
    }


def diagnostics_payload(
    facts: ClusterFacts, inputs: DiagnosticInputs, config: MetricsConfig
) -> dict[str, Any]:
    report = compute_indicators(facts, config)
    stats = network_statistics(build_graph(facts, config), config)
    return {
        "cluster_id": facts.cluster_id,
        "as_of": facts.as_of,
        "window": _window(facts),
        "config_version": config.version,
        "problems": diagnose(facts, report, stats, inputs, config),
    }


async def diagnostics(
    session: AsyncSession, cluster_id: str, as_of: datetime | None, window_days: int | None
) -> dict[str, Any]:
    config = load_config()
    facts = await load_facts(session, cluster_id, *window_of(config, as_of, window_days))
    inputs = await load_inputs(session, facts, config)
    return await asyncio.to_thread(diagnostics_payload, facts, inputs, config)


async def indicators(
    session: AsyncSession, cluster_id: str, as_of: datetime | None, window_days: int | None
) -> dict[str, Any]:
    config = load_config()
    facts = await load_facts(session, cluster_id, *window_of(config, as_of, window_days))
    return await asyncio.to_thread(indicators_payload, facts, config)


async def network(
    session: AsyncSession, cluster_id: str, as_of: datetime | None, window_days: int | None
) -> dict[str, Any]:
    config = load_config()
    facts = await load_facts(session, cluster_id, *window_of(config, as_of, window_days))
    return await asyncio.to_thread(network_payload, facts, config)


async def classification(
    session: AsyncSession, cluster_id: str, as_of: datetime | None, window_days: int | None
) -> dict[str, Any]:
    config = load_config()
    facts = await load_facts(session, cluster_id, *window_of(config, as_of, window_days))
    payload = await asyncio.to_thread(classification_payload, facts, config)
    payload["history"] = await history(session, cluster_id)
    return payload


async def history(session: AsyncSession, cluster_id: str) -> list[dict[str, Any]]:
    rows = await session.execute(
        select(Classification)
        .where(col(Classification.cluster_id) == cluster_id)
        .order_by(col(Classification.recorded_at).desc(), col(Classification.id).desc())
        .limit(HISTORY_LIMIT)
    )
    return [
        {
            "recorded_at": r.recorded_at,
            "as_of": r.as_of,
            "window_days": r.window_days,
            "label": r.label,
            "form": r.form,
            "agreement": r.agreement,
            "band": r.band,
            "config_version": r.config_version,
        }
        for r in rows.scalars()
    ]


async def radar_chart(
    session: AsyncSession, cluster: Cluster, as_of: datetime | None, window_days: int | None
) -> str:
    config = load_config()
    facts = await load_facts(session, cluster.id, *window_of(config, as_of, window_days))

    def draw() -> str:
        report = compute_indicators(facts, config)
        title = f"{cluster.name}: six features, {facts.start_day} to {facts.end_day}"
        return charts.radar_svg(report.features, title)

    return await asyncio.to_thread(draw)


async def network_chart(
    session: AsyncSession, cluster: Cluster, as_of: datetime | None, window_days: int | None
) -> str:
    config = load_config()
    facts = await load_facts(session, cluster.id, *window_of(config, as_of, window_days))

    def draw() -> str:
        title = f"{cluster.name}: collaboration, {facts.start_day} to {facts.end_day}"
        return charts.network_svg(build_graph(facts, config), config, title)

    return await asyncio.to_thread(draw)


async def compare_clusters(
    session: AsyncSession,
    clusters: list[Cluster],
    as_of: datetime | None,
    window_days: int | None,
) -> dict[str, Any]:
    config = load_config()
    at, days = window_of(config, as_of, window_days)
    entries = [(c.id, c.name, await load_facts(session, c.id, at, days)) for c in clusters]
    payload = await asyncio.to_thread(comparison, entries, config)
    return {**payload, "as_of": at, "window_days": days}


async def visibility(session: AsyncSession, cluster_id: str) -> dict[str, Any]:
    row = await session.get(ClusterSettings, cluster_id)
    return {
        "cluster_id": cluster_id,
        "members": bool(row and row.members_visible),
        "updated_at": row.updated_at if row else None,
        "updated_by": row.updated_by if row else None,
    }


async def set_visibility(
    session: AsyncSession, cluster_id: str, *, members: bool, by: str
) -> dict[str, Any]:
    """Publish the cluster's metrics to its member firms, or stop publishing them."""
    row = await session.get(ClusterSettings, cluster_id, with_for_update=True)
    if row is None:
        row = ClusterSettings(cluster_id=cluster_id, updated_by=by, updated_at=utcnow())
        session.add(row)
    row.members_visible = members
    row.updated_at, row.updated_by = utcnow(), by
    await session.flush()
    return await visibility(session, cluster_id)


# -- recording -----------------------------------------------------------------------
async def record_classification(
    session: AsyncSession, cluster_id: str, as_of: datetime | None = None
) -> Classification | None:
    """Classify as of ``as_of`` (now); record and announce it if type or form changed."""
    config = load_config()
    as_of = as_of or utcnow()
    facts = await load_facts(session, cluster_id, as_of, config.window_days)
    result = await asyncio.to_thread(classification_payload, facts, config)
    last = (
        await session.execute(
            select(Classification)
            .where(col(Classification.cluster_id) == cluster_id)
            .order_by(col(Classification.recorded_at).desc(), col(Classification.id).desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if last is not None and (last.label, last.form) == (result["label"], result["form"]):
        return None
    confidence = result.get("confidence") or {}
    row = Classification(
        id=new_id("cls"),
        cluster_id=cluster_id,
        recorded_at=utcnow(),
        as_of=as_of,
        window_days=config.window_days,
        label=result["label"],
        form=result["form"],
        agreement=confidence.get("agreement"),
        band=confidence.get("band"),
        config_version=config.version,
        detail={
            "deciding": result["deciding"],
            "evidence": result["evidence"],
            "explanation": result["explanation"],
            "classifier_version": result["classifier_version"],
        },
    )
    session.add(row)
    emit(
        session,
        MetricsOutbox,
        ClusterClassificationChangedV1(
            cluster_id=cluster_id,
            label=row.label,
            form=row.form,
            previous_label=last.label if last else None,
            previous_form=last.form if last else None,
            agreement=row.agreement,
            band=row.band,
            config_version=row.config_version,
            as_of=as_of,
        ),
    )
    await session.flush()
    return row


async def reclassify_dirty(db: Database) -> int:
    """One sweep: reclassify every cluster flagged dirty; returns how many were looked at."""
    async with db.read_scope() as session:
        ids = list(
            (
                await session.execute(
                    select(Cluster.id).where(col(Cluster.dirty).is_(True)).order_by(col(Cluster.id))
                )
            ).scalars()
        )
    for cluster_id in ids:
        async with db.session_scope() as session:
            # Cleared first, in the same transaction: an event committed meanwhile sets
            # it again and the next sweep looks once more. Another replica sweeping at
            # the same time skips the locked row.
            query = select(Cluster).where(col(Cluster.id) == cluster_id, col(Cluster.dirty))
            if db.postgres:
                query = query.with_for_update(skip_locked=True)
            cluster = (await session.execute(query)).scalar_one_or_none()
            if cluster is None:
                continue
            cluster.dirty = False
            await record_classification(session, cluster_id)
    return len(ids)


class Reclassifier:
    """The periodic sweep of one metrics process."""

    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-reclassifier")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await asyncio.wait_for(task, timeout=10)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval)
            if self._stop.is_set():
                return
            try:
                await reclassify_dirty(self.db)
            except Exception:
                log.exception("reclassification sweep failed")


async def on_startup(app: FastAPI) -> None:
    sweeper = Reclassifier(app.state.db, load_config().reclassify_interval_seconds)
    app.state.reclassifier = sweeper
    sweeper.start()


async def on_shutdown(app: FastAPI) -> None:
    sweeper: Reclassifier | None = getattr(app.state, "reclassifier", None)
    if sweeper is not None:
        await sweeper.stop()


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, float):
            out[key] = round(value, 6)
        elif isinstance(value, dict):
            out[key] = _rounded(value)
        else:
            out[key] = value
    return out
