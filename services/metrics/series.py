"""Indicators over time, and the CSV exports of indicators.

A series has one point per ``step_days`` from ``from`` to ``to`` (both days, UTC),
counted back from ``to`` so that the newest point is always ``to``: each point is the
usual window of ``window_days`` days ending with its day, computed exactly as
``GET …/indicators?as_of=<day, end of day>`` would (members at the end of that day).
Points are computed one after another from the fact store, so a long series at a small
step costs as many window reads; it is capped at :data:`MAX_POINTS` points.

CSV (RFC 4180, UTF-8, header row first): the series has one row per point — its day,
window, evidence, the six feature scores (``feature:<key>``) and the value of every
indicator; the current indicators have one row per indicator with its value, score,
observed and imported shares and formula. Spreadsheet users get numbers, not JSON.
"""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.errors import Unprocessable
from services.metrics.config import MetricsConfig, load_config
from services.metrics.facts import load_facts
from services.metrics.indicators import DEFINITIONS, compute_indicators

MAX_POINTS = 366
EVIDENCE = ("members", "active_members", "ties", "days_of_data", "collaboration_weight")


def end_of_day(day: date) -> datetime:
    return datetime.combine(day, time.max).replace(tzinfo=UTC)


def point_days(start: date, end: date, step_days: int) -> list[date]:
    """The days of a series, oldest first, the last one ``end``."""
    if start > end:
        raise Unprocessable("`from` must not be after `to`.")
    count = (end - start).days // step_days + 1
    if count > MAX_POINTS:
        raise Unprocessable(
            f"{count} points asked for; at most {MAX_POINTS} (raise `step` or narrow the range)."
        )
    return [end - timedelta(days=step_days * i) for i in reversed(range(count))]


def _point(facts: Any, config: MetricsConfig) -> dict[str, Any]:
    report = compute_indicators(facts, config)
    total = float(report.frame.weight.sum())
    return {
        "as_of": facts.as_of,
        "window": {"start": facts.start_day.isoformat(), "end": facts.end_day.isoformat()},
        "evidence": {
            "members": report.frame.size,
            "active_members": report.active_members,
            "ties": report.ties,
            "days_of_data": report.days_of_data,
            "collaboration_weight": round(total, 6),
        },
        "features": {k: None if v is None else round(v, 6) for k, v in report.features.items()},
        "indicators": {k: i.as_dict()["value"] for k, i in report.indicators.items()},
    }


async def indicator_series(
    session: AsyncSession,
    cluster_id: str,
    *,
    start: date | None,
    end: date | None,
    step_days: int,
    window_days: int | None,
) -> dict[str, Any]:
    """The indicators of every point of the series (defaults: the last year, monthly)."""
    config = load_config()
    window = window_days or config.window_days
    end = end or datetime.now(UTC).date()
    start = start or end - timedelta(days=364)
    days = point_days(start, end, step_days)
    points = []
    for day in days:
        facts = await load_facts(session, cluster_id, end_of_day(day), window)
        points.append(await asyncio.to_thread(_point, facts, config))
    return {
        "cluster_id": cluster_id,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "step_days": step_days,
        "window_days": window,
        "config_version": config.version,
        "features": list(config.features),
        "indicators": list(DEFINITIONS),
        "points": points,
    }


def series_csv(series: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    features, indicators = series["features"], series["indicators"]
    writer.writerow(
        [
            "as_of",
            "window_start",
            "window_end",
            *EVIDENCE,
            *(f"feature:{k}" for k in features),
            *indicators,
        ]
    )
    for p in series["points"]:
        writer.writerow(
            [
                p["as_of"].isoformat(),
                p["window"]["start"],
                p["window"]["end"],
                *(_cell(p["evidence"][k]) for k in EVIDENCE),
                *(_cell(p["features"].get(k)) for k in features),
                *(_cell(p["indicators"].get(k)) for k in indicators),
            ]
        )
    return out.getvalue()


def indicators_csv(payload: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        [
            "key",
            "feature",
            "name",
            "value",
            "score",
            "observed_share",
            "imported_share",
            "formula",
            "as_of",
            "window_start",
            "window_end",
        ]
    )
    for i in payload["indicators"]:
        writer.writerow(
            [
                i["key"],
                i["feature"],
                i["name"],
                _cell(i["value"]),
                _cell(i["score"]),
                _cell(i["basis"]["observed_share"]),
                _cell(i["basis"]["imported_share"]),
                i["formula"],
                payload["as_of"].isoformat(),
                payload["window"]["start"],
                payload["window"]["end"],
            ]
        )
    return out.getvalue()


def _cell(value: Any) -> str:
    """Empty for no value; numbers as plain decimals (no exponent, no trailing zeros)."""
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return text if text not in ("", "-0") else "0"
    return str(value)
