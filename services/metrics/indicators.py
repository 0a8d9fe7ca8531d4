"""The indicators of a cluster's six features and its spatial concentration.

Every indicator is a pure function of a :class:`~services.metrics.facts.ClusterFacts`
snapshot and the configuration, served with its definition, formula, value, the counts it
was computed from and the share of its basis that was observed on the platform versus
imported. The weight-based ones are computed on a :class:`Frame` (numpy arrays) with an
optional *multiplicity* per member firm, which is how the classifier's bootstrap
resamples members with their ties without rebuilding anything.

Conventions:

* a tie's *weight* is in contract-equivalents: an awarded task contract counts
  ``tie_weights.task_contract`` (1), an accepted annotation ``tie_weights.annotation``,
  an imported record its own weight; payouts carry money, not weight;
* a firm's *activity* is half the weight of each of its ties; a region's or an
  industry's activity is that of its firms (a firm's half split evenly over its
  industries);
* a firm is *digital core* when its first (primary) industry is in categories 01-04,
  *traditional* otherwise (05, or outside the digital-economy classification);
* entropy is normalised by ``ln k`` for the ``k`` categories present (evenness); one
  category gives 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from statistics import median
from typing import Any

import numpy as np
import numpy.typing as npt

from services.metrics.config import MetricsConfig
from services.metrics.facts import ClusterFacts, FirmFact, Tie

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

FEATURES = {
    "data_element_driven": "Data-element driven",
    "open_allocation": "Open, cross-region resource allocation",
    "diverse_actors": "Diverse ecosystem actors",
    "renewing_industries": "Fast-renewing leading industries",
    "digital_real_integration": "Digital-real economy integration",
    "platform_enablement": "Digital-platform enablement",
    "spatial_concentration": "Spatial concentration (not a feature; decides the form)",
}

# key: (feature, name, definition, formula)
DEFINITIONS: dict[str, tuple[str, str, str, str]] = {
    "data_work_share": (
        "data_element_driven",
        "Data work share",
        "Share of collaboration weight that is data work (task contracts, accepted "
        "annotations, imported data exchange).",
        "Σ w(data kinds) / Σ w",
    ),
    "annotation_volume": (
        "data_element_driven",
        "Annotations accepted",
        "Annotations accepted on the platform in the window (data volume processed).",
        "count(submission.accepted)",
    ),
    "cross_region_weight_share": (
        "open_allocation",
        "Cross-region collaboration share",
        "Share of collaboration weight between firms in different regions.",
        "Σ w(region_a ≠ region_b) / Σ w",
    ),
    "cross_region_task_share": (
        "open_allocation",
        "Cross-region task share",
        "Share of tasks published in the window, among those with a vendor, that have a "
        "vendor in another region than the requester's.",
        "#tasks(∃ vendor region ≠ requester region) / #tasks(with a vendor)",
    ),
    "region_entropy": (
        "open_allocation",
        "Regional evenness of members",
        "Normalised Shannon entropy of member firms over regions.",
        "-Σ p ln p / ln k",
    ),
    "actor_type_entropy": (
        "diverse_actors",
        "Actor-type evenness",
        "Normalised Shannon entropy of member firms over actor types.",
        "-Σ p ln p / ln k",
    ),
    "knowledge_capital_kinds": (
        "diverse_actors",
        "Knowledge and capital actor kinds",
        "Number of kinds among university, research institute, investor, industry "
        "association and service agency with a member that was active in the window.",
        "#kinds present and active (score = kinds / 5)",
    ),
    "cross_type_tie_share": (
        "diverse_actors",
        "Cross-type tie share",
        "Share of ties (firm pairs with collaboration) joining two actor types.",
        "#pairs(type_a ≠ type_b) / #pairs",
    ),
    "industry_rank_change": (
        "renewing_industries",
        "Industry rank change",
        "One minus the Spearman rank correlation of industry activity shares between "
        "the previous window and this one (0 = same order, 2 = reversed).",
        "1 - rho(shares_prev, shares_now) (score = value / 2)",
    ),
    "new_industry_share": (
        "renewing_industries",
        "New industry share",
        "Activity share of industries that had no activity in the same window a year earlier.",
        "Σ share_now(i : activity_year_ago(i) = 0)",
    ),
    "digital_core_share": (
        "digital_real_integration",
        "Digital-core activity share",
        "Activity share of digital-core industries (categories 01-04).",
        "Σ activity(core industries) / Σ activity",
    ),
    "integration_tie_share": (
        "digital_real_integration",
        "Integration tie share",
        "Share of ties linking a digital-core firm with a traditional (05 or other) firm.",
        "#pairs(core-traditional) / #pairs",
    ),
    "platform_matched_share": (
        "platform_enablement",
        "Platform-matched share",
        "Share of collaboration weight matched on the platform (task contracts and "
        "accepted annotations observed here).",
        "Σ w(observed platform kinds) / Σ w",
    ),
    "monthly_active_share": (
        "platform_enablement",
        "Monthly active share",
        "Mean over the window's 30-day slices of the share of members that acted on the "
        "platform in the slice.",
        "mean_slices(#active members / #members)",
    ),
    "claim_speed": (
        "platform_enablement",
        "Median time to first claim",
        "Median hours from a task's publication to its first claim (its first submission "
        "where no claim event is known).",
        "median(first_claim - published) (score = ref / (ref + median))",
    ),
    "top_region_share": (
        "spatial_concentration",
        "Top region's activity share",
        "The largest regional share of activity.",
        "max_r activity(r) / Σ activity",
    ),
    "regional_hhi": (
        "spatial_concentration",
        "Regional Herfindahl-Hirschman index",
        "Sum of squared regional activity shares.",
        "Σ_r share(r)²",
    ),
}


@dataclass
class Indicator:
    key: str
    feature: str
    name: str
    definition: str
    formula: str
    value: float | None
    score: float | None
    counts: dict[str, float]
    observed_share: float | None
    imported_share: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "feature": self.feature,
            "name": self.name,
            "definition": self.definition,
            "formula": self.formula,
            "value": _round(self.value),
            "score": _round(self.score),
            "counts": {k: _round(v) for k, v in self.counts.items()},
            "basis": {
                "observed_share": _round(self.observed_share),
                "imported_share": _round(self.imported_share),
            },
        }


@dataclass
class Report:
    indicators: dict[str, Indicator]
    features: dict[str, float | None]
    frame: Frame
    active_members: int
    ties: int
    days_of_data: int


# -- pure formulas -------------------------------------------------------------------
def evenness(counts: Any) -> float | None:
    """Shannon entropy normalised by ln k over the k categories present; None when empty."""
    values = np.asarray(counts, dtype=float)
    values = values[values > 0]
    total = values.sum()
    if total <= 0:
        return None
    if len(values) < 2:
        return 0.0
    p = values / total
    return float(-(p * np.log(p)).sum() / math.log(len(values)))


def hhi(weights: Any) -> float | None:
    values = np.asarray(weights, dtype=float)
    total = values.sum()
    if total <= 0:
        return None
    return float(((values / total) ** 2).sum())


def rankdata(values: Any) -> FloatArray:
    """Ranks from 1, ties given their average rank."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        same = x == value
        if same.sum() > 1:
            ranks[same] = ranks[same].mean()
    return ranks


def spearman(a: Any, b: Any) -> float | None:
    """Spearman's rank correlation; None when either side is constant or too short."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def is_core(industry: str, config: MetricsConfig) -> bool:
    return any(industry.startswith(p) for p in config.digital_core_prefixes)


def industry_activity(
    ties: list[Tie], firm_of: Any, config: MetricsConfig | None = None
) -> dict[str, float]:
    """Activity per industry: half of each tie's weight per endpoint, split over its
    industries (firms without industries count under ``""``)."""
    out: dict[str, float] = defaultdict(float)
    for tie in ties:
        for firm_id in (tie.source, tie.target):
            firm: FirmFact | None = firm_of(firm_id)
            industries = (firm.industries if firm else ()) or ("",)
            for industry in industries:
                out[industry] += tie.weight / 2 / len(industries)
    return {k: v for k, v in out.items() if v > 0}


# -- the frame -----------------------------------------------------------------------
@dataclass
class Frame:
    """One window's members, ties and tasks as arrays (indices into ``ids``)."""

    ids: list[str]
    regions: list[str]
    region: IntArray
    actors: list[str]
    actor: IntArray
    core_frac: FloatArray
    firm_class: IntArray  # 1 digital core, 0 traditional
    active: BoolArray
    src: IntArray
    dst: IntArray
    weight: FloatArray
    imported: BoolArray
    data: BoolArray
    platform: BoolArray
    cross: BoolArray
    pair_a: IntArray
    pair_b: IntArray
    pair_weight: FloatArray
    pair_imported: FloatArray
    task_requester: IntArray
    task_has_vendor: BoolArray
    task_cross: BoolArray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.ids)


def build_frame(facts: ClusterFacts, config: MetricsConfig) -> Frame:
    ids = sorted(facts.members)
    index = {f: i for i, f in enumerate(ids)}
    regions = sorted({facts.members[f].region for f in ids})
    actors = sorted({facts.members[f].actor_type for f in ids})
    region = np.array([regions.index(facts.members[f].region) for f in ids], dtype=np.int64)
    actor = np.array([actors.index(facts.members[f].actor_type) for f in ids], dtype=np.int64)
    core_frac = np.array(
        [
            (sum(is_core(i, config) for i in inds) / len(inds)) if inds else 0.0
            for inds in (facts.members[f].industries for f in ids)
        ],
        dtype=float,
    )
    firm_class = np.array(
        [
            1
            if facts.members[f].industries and is_core(facts.members[f].industries[0], config)
            else 0
            for f in ids
        ],
        dtype=np.int64,
    )
    ties = [t for t in facts.ties if t.weight > 0 and t.source != t.target]
    src = np.array([index[t.source] for t in ties], dtype=np.int64)
    dst = np.array([index[t.target] for t in ties], dtype=np.int64)
    weight = np.array([t.weight for t in ties], dtype=float)
    imported = np.array([t.origin == "imported" for t in ties], dtype=bool)
    data = np.array([t.kind in config.data_kinds for t in ties], dtype=bool)
    platform = np.array(
        [t.origin == "observed" and t.kind in config.platform_kinds for t in ties], dtype=bool
    )
    cross = region[src] != region[dst] if ties else np.zeros(0, dtype=bool)
    pairs: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for s, d, w, imp in zip(
        src.tolist(), dst.tolist(), weight.tolist(), imported.tolist(), strict=True
    ):
        key = (min(s, d), max(s, d))
        pairs[key][0] += w
        if imp:
            pairs[key][1] += w
    keys = sorted(pairs)
    active_ids = set(facts.activity) | {t.source for t in ties} | {t.target for t in ties}
    tasks = facts.tasks
    return Frame(
        ids=ids,
        regions=regions,
        region=region,
        actors=actors,
        actor=actor,
        core_frac=core_frac,
        firm_class=firm_class,
        active=np.array([f in active_ids for f in ids], dtype=bool),
        src=src,
        dst=dst,
        weight=weight,
        imported=imported,
        data=data,
        platform=platform,
        cross=cross,
        pair_a=np.array([k[0] for k in keys], dtype=np.int64),
        pair_b=np.array([k[1] for k in keys], dtype=np.int64),
        pair_weight=np.array([pairs[k][0] for k in keys], dtype=float),
        pair_imported=np.array([pairs[k][1] for k in keys], dtype=float),
        task_requester=np.array([index[t.requester_firm_id] for t in tasks], dtype=np.int64),
        task_has_vendor=np.array([bool(t.vendor_regions) for t in tasks], dtype=bool),
        task_cross=np.array(
            [bool(t.vendor_regions - {t.requester_region}) for t in tasks], dtype=bool
        ),
    )


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def core_measures(frame: Frame, m: FloatArray | None = None) -> dict[str, float | None]:
    """The measures the classifier decides on, with member multiplicities ``m``."""
    if m is None:
        m = np.ones(frame.size)
    tw = frame.weight * m[frame.src] * m[frame.dst]
    total = float(tw.sum())
    activity = np.bincount(frame.src, tw / 2, frame.size) + np.bincount(
        frame.dst, tw / 2, frame.size
    )
    regional = np.bincount(frame.region, activity, len(frame.regions))
    pm = m[frame.pair_a] * m[frame.pair_b]
    cls_a, cls_b = frame.firm_class[frame.pair_a], frame.firm_class[frame.pair_b]
    task_m = m[frame.task_requester]
    return {
        "cross_region_weight_share": _share(float(tw[frame.cross].sum()), total),
        "top_region_share": _share(float(regional.max(initial=0)), float(regional.sum())),
        "cross_region_task_share": _share(
            float(task_m[frame.task_cross].sum()), float(task_m[frame.task_has_vendor].sum())
        ),
        "digital_core_share": _share(float((activity * frame.core_frac).sum()), total),
        "integration_tie_share": _share(float(pm[cls_a != cls_b].sum()), float(pm.sum())),
        "platform_matched_share": _share(float(tw[frame.platform].sum()), total),
    }


# -- the report ----------------------------------------------------------------------
def compute_indicators(facts: ClusterFacts, config: MetricsConfig) -> Report:
    """Every indicator of the window, the six feature scores, and the evidence counts."""
    frame = build_frame(facts, config)
    core = core_measures(frame)
    total = float(frame.weight.sum())
    imported_w = float(frame.weight[frame.imported].sum())
    tie_basis = _share(imported_w, total)
    pair_total = float(frame.pair_weight.sum())
    pair_basis = _share(float(frame.pair_imported.sum()), pair_total)
    values: dict[str, tuple[float | None, float | None, dict[str, float], float | None]] = {}

    def put(
        key: str,
        value: float | None,
        counts: dict[str, float],
        imported: float | None = 0.0,
        score: float | None = None,
    ) -> None:
        values[key] = (value, value if score is None else score, counts, imported)

    n_members = frame.size
    n_pairs = len(frame.pair_weight)
    put(
        "data_work_share",
        _share(float(frame.weight[frame.data].sum()), total),
        {"data_weight": float(frame.weight[frame.data].sum()), "total_weight": total},
        tie_basis,
    )
    annotations = sum(t.volume for t in facts.ties if t.kind == "annotation")
    values["annotation_volume"] = (float(annotations), None, {"annotations": annotations}, 0.0)
    put(
        "cross_region_weight_share",
        core["cross_region_weight_share"],
        {"cross_region_weight": float(frame.weight[frame.cross].sum()), "total_weight": total},
        tie_basis,
    )
    with_vendor = int(frame.task_has_vendor.sum())
    put(
        "cross_region_task_share",
        core["cross_region_task_share"],
        {
            "tasks": len(facts.tasks),
            "tasks_with_vendor": with_vendor,
            "cross_region_tasks": int(frame.task_cross.sum()),
        },
    )
    region_counts = np.bincount(frame.region, minlength=len(frame.regions))
    put(
        "region_entropy",
        evenness(region_counts),
        {"members": n_members, "regions": len(frame.regions)},
    )
    actor_counts = np.bincount(frame.actor, minlength=len(frame.actors))
    put(
        "actor_type_entropy",
        evenness(actor_counts),
        {"members": n_members, "actor_types": len(frame.actors)},
    )
    kinds = set(config.knowledge_capital_actor_types)
    present = {frame.actors[frame.actor[i]] for i in range(n_members)} & kinds
    active_kinds = {
        frame.actors[frame.actor[i]] for i in range(n_members) if frame.active[i]
    } & kinds
    put(
        "knowledge_capital_kinds",
        float(len(active_kinds)),
        {"kinds_present": len(present), "kinds_active": len(active_kinds)},
        score=len(active_kinds) / len(kinds) if kinds else None,
    )
    cross_type = frame.actor[frame.pair_a] != frame.actor[frame.pair_b]
    put(
        "cross_type_tie_share",
        _share(float(cross_type.sum()), n_pairs),
        {"ties": n_pairs, "cross_type_ties": int(cross_type.sum())},
        pair_basis,
    )
    current = industry_activity(facts.ties, facts.firm)
    previous = industry_activity(facts.previous_ties, facts.firm)
    year_ago = industry_activity(facts.year_ago_ties, facts.firm)
    change = _rank_change(current, previous)
    renew_basis = _share(
        sum(t.weight for t in (*facts.ties, *facts.previous_ties) if t.origin == "imported"),
        sum(t.weight for t in (*facts.ties, *facts.previous_ties)),
    )
    put(
        "industry_rank_change",
        change,
        {"industries_now": len(current), "industries_before": len(previous)},
        renew_basis,
        score=None if change is None else min(1.0, change / 2),
    )
    new_share = None
    cur_total = sum(current.values())
    if year_ago and cur_total > 0:
        new_share = sum(v for k, v in current.items() if k not in year_ago) / cur_total
    put(
        "new_industry_share",
        new_share,
        {"industries_now": len(current), "industries_year_ago": len(year_ago)},
        tie_basis,
    )
    core_weight = float(
        (
            (
                np.bincount(frame.src, frame.weight / 2, n_members)
                + np.bincount(frame.dst, frame.weight / 2, n_members)
            )
            * frame.core_frac
        ).sum()
    )
    put(
        "digital_core_share",
        core["digital_core_share"],
        {"core_activity": core_weight, "total_activity": total},
        tie_basis,
    )
    integration = frame.firm_class[frame.pair_a] != frame.firm_class[frame.pair_b]
    put(
        "integration_tie_share",
        core["integration_tie_share"],
        {"ties": n_pairs, "core_traditional_ties": int(integration.sum())},
        pair_basis,
    )
    put(
        "platform_matched_share",
        core["platform_matched_share"],
        {"platform_weight": float(frame.weight[frame.platform].sum()), "total_weight": total},
        tie_basis,
    )
    put(
        "monthly_active_share",
        _monthly_active(facts),
        {"members": n_members, "active_members": int(sum(1 for f in facts.activity))},
    )
    hours = _claim_hours(facts)
    med = median(hours) if hours else None
    ref = config.first_claim_reference_hours
    put(
        "claim_speed",
        med,
        {"tasks_claimed": len(hours), "reference_hours": ref},
        score=None if med is None else ref / (ref + med),
    )
    activity = np.bincount(frame.src, frame.weight / 2, n_members) + np.bincount(
        frame.dst, frame.weight / 2, n_members
    )
    regional = np.bincount(frame.region, activity, len(frame.regions))
    put(
        "top_region_share",
        core["top_region_share"],
        {
            "top_region_activity": float(regional.max(initial=0)),
            "total_activity": float(regional.sum()),
            "regions_active": int((regional > 0).sum()),
        },
        tie_basis,
    )
    put(
        "regional_hhi",
        hhi(regional),
        {"regions_active": int((regional > 0).sum())},
        tie_basis,
    )
    indicators: dict[str, Indicator] = {}
    for key, (value, score, counts, imported) in values.items():
        feature, name, definition, formula = DEFINITIONS[key]
        indicators[key] = Indicator(
            key=key,
            feature=feature,
            name=name,
            definition=definition,
            formula=formula,
            value=value,
            score=score,
            counts=counts,
            observed_share=None if imported is None else 1 - imported,
            imported_share=imported,
        )
    features: dict[str, float | None] = {}
    for feature, weights in config.features.items():
        used = [(w, indicators[k].score) for k, w in weights.items() if k in indicators]
        known = [(w, s) for w, s in used if s is not None]
        den = sum(w for w, _ in known)
        features[feature] = sum(w * s for w, s in known) / den if den > 0 else None
    days = 0
    if facts.first_day is not None:
        days = (facts.end_day - max(facts.first_day, facts.start_day)).days + 1
    return Report(
        indicators=indicators,
        features=features,
        frame=frame,
        active_members=int(frame.active.sum()),
        ties=n_pairs,
        days_of_data=max(days, 0),
    )


def _rank_change(current: dict[str, float], previous: dict[str, float]) -> float | None:
    if not current or not previous:
        return None
    names = sorted(set(current) | set(previous))
    now_total, before_total = sum(current.values()), sum(previous.values())
    rho = spearman(
        [previous.get(n, 0.0) / before_total for n in names],
        [current.get(n, 0.0) / now_total for n in names],
    )
    return None if rho is None else 1 - rho


def _monthly_active(facts: ClusterFacts) -> float | None:
    if not facts.members:
        return None
    shares = []
    end = facts.end_day
    slices = max(1, math.ceil(facts.window_days / 30))
    for i in range(slices):
        hi = end - timedelta(days=30 * i)
        lo = max(facts.start_day, hi - timedelta(days=29))
        active = sum(1 for days in facts.activity.values() if any(lo <= d <= hi for d in days))
        shares.append(active / len(facts.members))
    return sum(shares) / len(shares)


def _claim_hours(facts: ClusterFacts) -> list[float]:
    hours = []
    for task in facts.tasks:
        first = task.first_claimed_at or task.first_submitted_at
        if first is not None:
            hours.append(max(0.0, (first - task.published_at).total_seconds() / 3600))
    return hours


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return round(float(value), 6)
