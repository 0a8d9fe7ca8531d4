"""The versioned thresholds and weights of the indicators and the classifier.

They live in ``config/metrics-config-v<N>.json``, not in code: a change of a threshold is
a new file with a new version, and every classification records the version it used.
Older files stay, so a recorded classification can be recomputed under its version.

* v1: the starting decision list.
* v2: network space is decided by the cross-region collaboration share alone (see
  :class:`FormThresholds`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

CONFIG_DIR = Path(__file__).parent / "config"
CURRENT = "metrics-config-v2"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Conversation(_Frozen):
    min_messages: int = Field(ge=1)
    weight_per_message: float = Field(ge=0)


class Gate(_Frozen):
    min_active_members: int
    min_ties: int
    min_days: int


class FormThresholds(_Frozen):
    geographic_max_cross_region_share: float
    geographic_min_top_region_share: float
    network_min_cross_region_share: float
    network_max_top_region_share: float | None = None
    """v1 also capped the top region's activity share for network space; v2 does not:
    every tie gives each end half its weight, so a hub region tied only to other
    regions already holds half the activity and a hub-and-spoke network could never
    qualify. The cross-region share alone decides network space from v2 on."""


class TypeThresholds(_Frozen):
    virtual_min_cross_region_task_share: float
    digital_min_core_share: float
    industrial_min_integration_share: float
    industrial_min_platform_share: float


class Confidence(_Frozen):
    runs: int = Field(ge=1)
    seed: int
    high_agreement: float
    medium_agreement: float
    borderline_margin: float


class NetworkSettings(_Frozen):
    seed: int
    random_baselines: int = Field(ge=1)
    swaps_per_edge: int = Field(ge=1)


class DiagnosticThresholds(_Frozen):
    min_completion_rate: float
    max_hours_to_first_claim: float
    min_monthly_active_share: float
    max_similarity_to_peers: float
    max_similarity_between_regions: float
    min_park_occupancy: float
    max_dormant_share: float
    dormant_days: int = Field(ge=1)
    max_isolate_share: float
    min_giant_component_share: float
    min_clustering_vs_random: float
    min_knowledge_capital_kinds: int


class MetricsConfig(_Frozen):
    version: str
    window_days: int
    tie_weights: dict[str, float]
    data_kinds: list[str]
    platform_kinds: list[str]
    import_kinds: list[str]
    knowledge_capital_actor_types: list[str]
    digital_core_prefixes: list[str]
    efficiency_prefixes: list[str]
    conversation: Conversation
    first_claim_reference_hours: float = Field(gt=0)
    features: dict[str, dict[str, float]]
    gate: Gate
    form: FormThresholds
    type: TypeThresholds
    confidence: Confidence
    network: NetworkSettings
    diagnostics: DiagnosticThresholds
    reclassify_interval_seconds: float = Field(gt=0)


@cache
def load_config(version: str = CURRENT) -> MetricsConfig:
    """The configuration file of ``version`` (the current one by default)."""
    path = CONFIG_DIR / f"{version}.json"
    return MetricsConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
