"""Classify a cluster: the evidence gate, the agglomeration form, the cluster type.

A transparent decision list whose thresholds come from the configuration:

1. **Gate.** Fewer active members, ties (firm pairs with collaboration) or days of data
   in the window than ``gate`` asks for → ``insufficient_evidence``, naming what is
   missing.
2. **Form.** ``geographic`` when the cross-region collaboration share is below
   ``geographic_max_cross_region_share`` and the top region holds at least
   ``geographic_min_top_region_share`` of activity; ``network_space`` when the
   cross-region share is at least ``network_min_cross_region_share`` (configuration v1
   also asked the top region to hold less than ``network_max_top_region_share``, which
   a hub-and-spoke cluster can never meet: a hub gets half of every cross-region tie);
   otherwise ``virtual_real_combined``. The cross-region share of collaboration weight
   is thus the deciding indicator of network space, and spatial concentration (with a
   low cross-region share) that of the geographic form.
3. **Type.** ``virtual_network`` when the form is network-space, or virtual-real
   combined with a cross-region task share of at least
   ``virtual_min_cross_region_task_share``; else ``digital_industrialisation`` when the
   digital-core activity share reaches ``digital_min_core_share``; else
   ``industrial_digitalisation`` when integration ties and platform matching reach
   their thresholds; else ``not_yet_digital_economy``.

Every condition the list evaluated is reported with its value, threshold and margin
(the distance to the threshold): those are the deciding indicators. **Confidence** is a
bootstrap: members are resampled with replacement (``confidence.runs`` times, fixed
seed), each keeping its ties (a tie counts once per copy of each endpoint) and its
tasks, and the same list decides again; the agreement is the share of runs that give
the same type and form. A deciding margin under ``borderline_margin`` marks the result
borderline. Band: high (agreement ≥ ``high_agreement`` and not borderline), medium
(≥ ``medium_agreement``), low otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from services.metrics.config import MetricsConfig
from services.metrics.counters import CLASSIFIER_RUNS, CLASSIFIER_SECONDS
from services.metrics.indicators import Frame, Report, core_measures

CLASSIFIER_VERSION = "decision-list-1"
INSUFFICIENT = "insufficient_evidence"


@dataclass
class Condition:
    indicator: str
    op: str  # "<", ">=", "=="
    threshold: float
    value: float | None

    @property
    def holds(self) -> bool:
        if self.value is None:
            return False
        if self.op == "<":
            return self.value < self.threshold
        return self.value >= self.threshold

    @property
    def margin(self) -> float | None:
        return None if self.value is None else abs(self.value - self.threshold)

    def as_dict(self) -> dict[str, Any]:
        return {
            "indicator": self.indicator,
            "value": None if self.value is None else round(self.value, 6),
            "op": self.op,
            "threshold": self.threshold,
            "holds": self.holds,
            "margin": None if self.margin is None else round(self.margin, 6),
        }


@dataclass
class Decision:
    label: str
    form: str | None
    conditions: list[Condition]


def decide(measures: dict[str, float | None], config: MetricsConfig) -> Decision:
    """The form and the type from the deciding measures (the decision list above)."""
    f, t = config.form, config.type
    cross = measures.get("cross_region_weight_share")
    top = measures.get("top_region_share")
    geo = [
        Condition("cross_region_weight_share", "<", f.geographic_max_cross_region_share, cross),
        Condition("top_region_share", ">=", f.geographic_min_top_region_share, top),
    ]
    net = [Condition("cross_region_weight_share", ">=", f.network_min_cross_region_share, cross)]
    if f.network_max_top_region_share is not None:
        net.append(Condition("top_region_share", "<", f.network_max_top_region_share, top))
    used: list[Condition] = []
    if all(c.holds for c in geo):
        form = "geographic"
        used += geo
    elif all(c.holds for c in net):
        form = "network_space"
        used += net
    else:
        form = "virtual_real_combined"
        used += [c for c in geo if not c.holds] + [c for c in net if not c.holds]
    if form == "network_space":
        return Decision("virtual_network", form, used)
    if form == "virtual_real_combined":
        tasks = Condition(
            "cross_region_task_share",
            ">=",
            t.virtual_min_cross_region_task_share,
            measures.get("cross_region_task_share"),
        )
        used.append(tasks)
        if tasks.holds:
            return Decision("virtual_network", form, used)
    core = Condition(
        "digital_core_share", ">=", t.digital_min_core_share, measures.get("digital_core_share")
    )
    used.append(core)
    if core.holds:
        return Decision("digital_industrialisation", form, used)
    integration = Condition(
        "integration_tie_share",
        ">=",
        t.industrial_min_integration_share,
        measures.get("integration_tie_share"),
    )
    platform = Condition(
        "platform_matched_share",
        ">=",
        t.industrial_min_platform_share,
        measures.get("platform_matched_share"),
    )
    used += [integration, platform]
    if integration.holds and platform.holds:
        return Decision("industrial_digitalisation", form, used)
    return Decision("not_yet_digital_economy", form, used)


def gate(report: Report, config: MetricsConfig) -> list[str]:
    """What is missing for a classification (empty when the evidence suffices)."""
    g = config.gate
    missing = []
    if report.active_members < g.min_active_members:
        missing.append(f"active members: {report.active_members} of {g.min_active_members} needed")
    if report.ties < g.min_ties:
        missing.append(f"ties between members: {report.ties} of {g.min_ties} needed")
    if report.days_of_data < g.min_days:
        missing.append(f"days of data in the window: {report.days_of_data} of {g.min_days} needed")
    return missing


def bootstrap_agreement(frame: Frame, decision: Decision, config: MetricsConfig) -> float:
    """Share of member resamples (with their ties) that decide the same type and form."""
    settings = config.confidence
    rng = np.random.default_rng(settings.seed)
    n = frame.size
    agree = 0
    for _ in range(settings.runs):
        m = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        again = decide(core_measures(frame, m), config)
        agree += again.label == decision.label and again.form == decision.form
    return agree / settings.runs


def classify(report: Report, config: MetricsConfig) -> dict[str, Any]:
    """The classification of one window, with its evidence, confidence and reasons."""
    with CLASSIFIER_SECONDS.time():
        result = _classify(report, config)
    CLASSIFIER_RUNS.labels(result["label"]).inc()
    return result


def _classify(report: Report, config: MetricsConfig) -> dict[str, Any]:
    missing = gate(report, config)
    evidence = {
        "sufficient": not missing,
        "active_members": report.active_members,
        "ties": report.ties,
        "days_of_data": report.days_of_data,
        "missing": missing,
    }
    base: dict[str, Any] = {
        "classifier_version": CLASSIFIER_VERSION,
        "config_version": config.version,
        "evidence": evidence,
    }
    if missing:
        return {
            **base,
            "label": INSUFFICIENT,
            "form": None,
            "confidence": None,
            "deciding": [],
            "explanation": "Insufficient evidence: " + "; ".join(missing) + ".",
        }
    measures = core_measures(report.frame)
    decision = decide(measures, config)
    agreement = bootstrap_agreement(report.frame, decision, config)
    settings = config.confidence
    margins = [c.margin for c in decision.conditions if c.margin is not None]
    borderline = any(m < settings.borderline_margin for m in margins) or len(margins) < len(
        decision.conditions
    )
    if agreement >= settings.high_agreement and not borderline:
        band = "high"
    elif agreement >= settings.medium_agreement:
        band = "medium"
    else:
        band = "low"
    return {
        **base,
        "label": decision.label,
        "form": decision.form,
        "confidence": {
            "agreement": round(agreement, 6),
            "runs": settings.runs,
            "seed": settings.seed,
            "borderline": borderline,
            "band": band,
        },
        "deciding": [c.as_dict() for c in decision.conditions],
        "explanation": explain(decision),
    }


def explain(decision: Decision) -> str:
    parts = [
        f"{c.indicator} unknown (needs {c.op} {c.threshold})"
        if c.value is None
        else f"{c.indicator} {c.value:.3f} {c.op if c.holds else _negate(c.op)} {c.threshold}"
        for c in decision.conditions
    ]
    return (
        f"{decision.label.replace('_', ' ')} ({(decision.form or '').replace('_', ' ')}): "
        + "; ".join(parts)
        + "."
    )


def _negate(op: str) -> str:
    return {"<": ">=", ">=": "<"}.get(op, "!" + op)
