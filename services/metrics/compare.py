"""Several clusters side by side: industry-structure similarity and the six features.

For each cluster the caller may read (its operator, or a member firm while the operator
publishes; any other id is a 404 naming it, so a comparison reveals nothing about
clusters the caller cannot see) and for one window (the same ``as_of`` and
``window_days`` for all): the feature scores, the classification by the decision list
(without the bootstrap: ``…/classification`` gives its confidence), and the member
industry structure (member firms per industry, a firm's weight split over its
industries, as in the homogeneous-competition diagnostic). The similarity matrices hold,
for every pair, the cosine similarity (1 = the same structure) and the Krugman
dissimilarity K = Σ|sᵢ - tᵢ| of industry shares (0 = the same, 2 = disjoint).
"""

from __future__ import annotations

from typing import Any

from services.metrics.classifier import INSUFFICIENT, decide, gate
from services.metrics.config import MetricsConfig
from services.metrics.diagnostics import cosine, krugman, structure
from services.metrics.facts import ClusterFacts
from services.metrics.indicators import FEATURES, compute_indicators, core_measures

MAX_CLUSTERS = 10


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def comparison(
    entries: list[tuple[str, str, ClusterFacts]], config: MetricsConfig
) -> dict[str, Any]:
    """``entries`` are ``(cluster id, name, facts)``, in the order asked for."""
    clusters = []
    structures = []
    for cluster_id, name, facts in entries:
        report = compute_indicators(facts, config)
        if gate(report, config):
            label, form = INSUFFICIENT, None
        else:
            decision = decide(core_measures(report.frame), config)
            label, form = decision.label, decision.form
        own = structure([f.industries for f in facts.members.values()])
        total = sum(own.values())
        structures.append(own)
        clusters.append(
            {
                "id": cluster_id,
                "name": name,
                "members": report.frame.size,
                "label": label,
                "form": form,
                "features": {
                    k: _r(report.features.get(k)) for k in config.features if k in FEATURES
                },
                "industry_shares": {
                    k or "unclassified": round(v / total, 6) for k, v in sorted(own.items())
                }
                if total
                else {},
            }
        )
    n = len(entries)
    return {
        "ids": [e[0] for e in entries],
        "config_version": config.version,
        "clusters": clusters,
        "similarity": {
            "cosine": [
                [_r(cosine(structures[i], structures[j])) for j in range(n)] for i in range(n)
            ],
            "krugman": [
                [_r(krugman(structures[i], structures[j])) for j in range(n)] for i in range(n)
            ],
        },
    }
