"""Diagnostics of the four known problems of a cluster, each with the values behind it.

* **Low operating efficiency**: completion rate of the window's tasks (completed of
  those published and closed), median hours to the first claim, monthly active share.
* **Homogeneous competition**: the cosine similarity (and Krugman dissimilarity) of the
  cluster's industry structure — member firms per industry, a firm's weight split over
  its industries — with every other cluster on the platform, and between the regions
  inside the cluster.
* **Idle carriers**: occupancy of each park (located member firms / capacity) and the
  share of located firms with no platform activity for ``dormant_days``.
* **Agglomerated but not clustered**: isolates, the giant component, clustering against
  the degree-preserving random baseline, knowledge and capital actor kinds present.

A problem is flagged when any of its signals crosses its threshold
(``diagnostics`` in the configuration); a signal with no value (nothing to measure)
never crosses.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import combinations
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.metrics.config import MetricsConfig
from services.metrics.facts import ClusterFacts
from services.metrics.indicators import Report
from services.metrics.models import Firm, FirmActivity, Membership, Park

PROBLEMS = {
    "low_operating_efficiency": "Low operating efficiency",
    "homogeneous_competition": "Homogeneous competition",
    "idle_carriers": "Idle carriers",
    "agglomerated_not_clustered": "Agglomerated but not clustered",
}


@dataclass
class ParkFact:
    id: str
    name: str
    capacity: int
    located: list[str]


@dataclass
class DiagnosticInputs:
    peers: dict[str, dict[str, float]]
    """Industry structure of every other cluster with members."""
    parks: list[ParkFact]
    dormant: set[str]
    """Located member firms without platform activity for ``dormant_days``."""


def structure(industry_lists: list[tuple[str, ...]]) -> dict[str, float]:
    """Member firms per industry; a firm's weight 1 is split over its industries."""
    out: dict[str, float] = defaultdict(float)
    for industries in industry_lists:
        for industry in industries or ("",):
            out[industry] += 1 / len(industries or ("",))
    return dict(out)


def cosine(a: dict[str, float], b: dict[str, float]) -> float | None:
    keys = set(a) | set(b)
    dot = sum(a.get(k, 0.0) * b.get(k, 0.0) for k in keys)
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return None if na == 0 or nb == 0 else dot / (na * nb)


def krugman(a: dict[str, float], b: dict[str, float]) -> float | None:
    """K = Σ |s_i - t_i| over industry shares (0 identical, 2 disjoint)."""
    ta, tb = sum(a.values()), sum(b.values())
    if ta == 0 or tb == 0:
        return None
    return sum(abs(a.get(k, 0.0) / ta - b.get(k, 0.0) / tb) for k in set(a) | set(b))


def _signal(
    indicator: str, value: float | None, op: str, threshold: float, **extra: Any
) -> dict[str, Any]:
    crossed = value is not None and (value < threshold if op == "<" else value > threshold)
    return {
        "indicator": indicator,
        "value": None if value is None else round(value, 6),
        "op": op,
        "threshold": threshold,
        "crossed": crossed,
        **extra,
    }


def diagnose(
    facts: ClusterFacts,
    report: Report,
    network: dict[str, Any],
    inputs: DiagnosticInputs,
    config: MetricsConfig,
) -> list[dict[str, Any]]:
    d = config.diagnostics
    closed = [t for t in facts.tasks if t.outcome is not None]
    completed = [t for t in closed if t.outcome == "completed"]
    completion = len(completed) / len(closed) if closed else None
    efficiency = [
        _signal(
            "completion_rate",
            completion,
            "<",
            d.min_completion_rate,
            counts={"closed": len(closed), "completed": len(completed)},
        ),
        _signal(
            "median_hours_to_first_claim",
            report.indicators["claim_speed"].value,
            ">",
            d.max_hours_to_first_claim,
        ),
        _signal(
            "monthly_active_share",
            report.indicators["monthly_active_share"].value,
            "<",
            d.min_monthly_active_share,
        ),
    ]
    own = structure([f.industries for f in facts.members.values()])
    peer_similarity = {cid: cosine(own, other) for cid, other in sorted(inputs.peers.items())}
    known = [v for v in peer_similarity.values() if v is not None]
    most_similar = max(peer_similarity, key=lambda c: peer_similarity[c] or -1, default=None)
    by_region: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for firm in facts.members.values():
        by_region[firm.region].append(firm.industries)
    regional = {r: structure(v) for r, v in sorted(by_region.items())}
    region_pairs = [
        (a, b, cosine(regional[a], regional[b]), krugman(regional[a], regional[b]))
        for a, b in combinations(sorted(regional), 2)
    ]
    pair_values = [c for _, _, c, _ in region_pairs if c is not None]
    homogeneous = [
        _signal(
            "max_similarity_to_other_clusters",
            max(known) if known else None,
            ">",
            d.max_similarity_to_peers,
            cluster_id=most_similar if known else None,
            krugman=krugman(own, inputs.peers[most_similar]) if known and most_similar else None,
            clusters_compared=len(known),
        ),
        _signal(
            "mean_similarity_between_regions",
            sum(pair_values) / len(pair_values) if pair_values else None,
            ">",
            d.max_similarity_between_regions,
            pairs=[
                {
                    "regions": [a, b],
                    "cosine": None if c is None else round(c, 6),
                    "krugman": None if k is None else round(k, 6),
                }
                for a, b, c, k in region_pairs
            ],
        ),
    ]
    capacity = sum(p.capacity for p in inputs.parks)
    located = {f for p in inputs.parks for f in p.located}
    idle = [
        _signal(
            "park_occupancy",
            sum(len(p.located) for p in inputs.parks) / capacity if capacity else None,
            "<",
            d.min_park_occupancy,
            parks=[
                {
                    "id": p.id,
                    "name": p.name,
                    "capacity": p.capacity,
                    "located": len(p.located),
                    "occupancy": round(len(p.located) / p.capacity, 6) if p.capacity else None,
                }
                for p in inputs.parks
            ],
        ),
        _signal(
            "dormant_located_share",
            len(inputs.dormant & located) / len(located) if located else None,
            ">",
            d.max_dormant_share,
            dormant_days=d.dormant_days,
        ),
    ]
    kinds = report.indicators["knowledge_capital_kinds"].counts.get("kinds_present")
    loose = [
        _signal("isolate_share", network.get("isolate_share"), ">", d.max_isolate_share),
        _signal(
            "giant_component_share",
            network.get("giant_component_share"),
            "<",
            d.min_giant_component_share,
        ),
        _signal(
            "clustering_vs_random",
            network.get("clustering_vs_random"),
            "<",
            d.min_clustering_vs_random,
        ),
        _signal(
            "knowledge_capital_kinds_present",
            None if kinds is None else float(kinds),
            "<",
            d.min_knowledge_capital_kinds,
            missing=sorted(
                set(config.knowledge_capital_actor_types)
                - {f.actor_type for f in facts.members.values()}
            ),
        ),
    ]
    out = []
    for key, signals in (
        ("low_operating_efficiency", efficiency),
        ("homogeneous_competition", homogeneous),
        ("idle_carriers", idle),
        ("agglomerated_not_clustered", loose),
    ):
        out.append(
            {
                "key": key,
                "name": PROBLEMS[key],
                "flagged": any(s["crossed"] for s in signals),
                "signals": signals,
            }
        )
    return out


async def load_inputs(
    session: AsyncSession, facts: ClusterFacts, config: MetricsConfig
) -> DiagnosticInputs:
    """Other clusters' industry structures, the parks, and dormant located firms."""
    as_of: datetime = facts.as_of
    rows = await session.execute(
        sa.select(col(Membership.cluster_id), col(Firm.industries))
        .join(Firm, col(Firm.id) == col(Membership.firm_id))
        .where(
            col(Membership.cluster_id) != facts.cluster_id,
            col(Membership.joined_at) <= as_of,
            sa.or_(col(Membership.left_at).is_(None), col(Membership.left_at) > as_of),
        )
    )
    lists: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for cluster_id, industries in rows.all():
        lists[cluster_id].append(tuple(industries or ()))
    parks = [
        ParkFact(p.id, p.name, p.capacity, [f for f in p.located_firm_ids if f in facts.members])
        for p in (
            await session.execute(
                select(Park).where(col(Park.cluster_id) == facts.cluster_id).order_by(col(Park.id))
            )
        ).scalars()
    ]
    located = {f for p in parks for f in p.located}
    since = facts.end_day - timedelta(days=config.diagnostics.dormant_days - 1)
    active = set()
    if located:
        active = set(
            (
                await session.execute(
                    sa.select(col(FirmActivity.firm_id))
                    .where(
                        col(FirmActivity.cluster_id) == facts.cluster_id,
                        col(FirmActivity.firm_id).in_(located),
                        col(FirmActivity.day) >= since,
                        col(FirmActivity.day) <= facts.end_day,
                    )
                    .distinct()
                )
            ).scalars()
        )
    return DiagnosticInputs(
        peers={c: structure(v) for c, v in lists.items()},
        parks=parks,
        dormant=located - active,
    )
