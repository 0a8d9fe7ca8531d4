"""API shapes of the metrics service (responses, not the tables)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Window(BaseModel):
    days: int = Field(examples=[90])
    start: date
    end: date


class Basis(BaseModel):
    observed_share: float | None = Field(
        None, description="share of the indicator's basis observed on the platform"
    )
    imported_share: float | None = Field(
        None, description="share of the indicator's basis from the history import"
    )


class IndicatorOut(BaseModel):
    key: str = Field(examples=["cross_region_weight_share"])
    feature: str = Field(examples=["open_allocation"])
    name: str
    definition: str
    formula: str
    value: float | None = Field(description="None when the window has nothing to measure")
    score: float | None = Field(description="the value on a 0-1 scale for the feature score")
    counts: dict[str, float | None]
    basis: Basis


class FeatureOut(BaseModel):
    key: str
    name: str
    score: float | None = Field(description="weighted mean of its indicators' scores (0-1)")


class Evidence(BaseModel):
    members: int
    active_members: int
    ties: int
    days_of_data: int
    collaboration_weight: float
    observed_share: float | None
    imported_share: float | None


class IndicatorsOut(BaseModel):
    cluster_id: str
    as_of: datetime
    window: Window
    config_version: str
    features: list[FeatureOut]
    indicators: list[IndicatorOut]
    evidence: Evidence


class NodeOut(BaseModel):
    id: str
    region: str
    actor_type: str
    degree: int
    community: int | None


class EdgeOut(BaseModel):
    source: str
    target: str
    weight: float = Field(description="work weight plus conversation weight")
    work_weight: float
    messages: int


class NetworkOut(BaseModel):
    cluster_id: str
    as_of: datetime
    window: Window
    config_version: str
    statistics: dict[str, Any] = Field(
        description="density, average_clustering, giant_component_share, isolate_share, "
        "modularity (Louvain, fixed seed), communities, degree_centralisation, "
        "cross_region_edge_share, random_baseline, clustering_vs_random"
    )
    nodes: list[NodeOut]
    edges: list[EdgeOut]


class ConditionOut(BaseModel):
    indicator: str
    value: float | None
    op: str = Field(examples=[">="])
    threshold: float
    holds: bool
    margin: float | None = Field(description="distance of the value to the threshold")


class ConfidenceOut(BaseModel):
    agreement: float = Field(description="share of bootstrap runs giving the same type and form")
    runs: int
    seed: int
    borderline: bool
    band: str = Field(examples=["high"])


class GateOut(BaseModel):
    sufficient: bool
    active_members: int
    ties: int
    days_of_data: int
    missing: list[str]


class RecordedClassification(BaseModel):
    recorded_at: datetime
    as_of: datetime
    window_days: int
    label: str
    form: str | None
    agreement: float | None
    band: str | None
    config_version: str


class ClassificationOut(BaseModel):
    cluster_id: str
    as_of: datetime
    window: Window
    label: str = Field(
        examples=["virtual_network"],
        description="digital_industrialisation, industrial_digitalisation, virtual_network, "
        "not_yet_digital_economy or insufficient_evidence",
    )
    form: str | None = Field(
        examples=["network_space"],
        description="geographic, virtual_real_combined or network_space",
    )
    confidence: ConfidenceOut | None
    deciding: list[ConditionOut]
    explanation: str
    evidence: GateOut
    classifier_version: str
    config_version: str
    history: list[RecordedClassification] = Field(
        description="recorded classifications, newest first (a row per change)"
    )


class RejectedLine(BaseModel):
    index: int
    reason: str


class HistoryImportResult(BaseModel):
    lines: int
    imported: int
    duplicates: int = Field(description="lines already imported (same external id or content)")


class SignalOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    indicator: str = Field(examples=["park_occupancy"])
    value: float | None
    op: str = Field(examples=["<"])
    threshold: float
    crossed: bool


class ProblemOut(BaseModel):
    key: str = Field(examples=["idle_carriers"])
    name: str
    flagged: bool = Field(description="some signal crossed its threshold")
    signals: list[SignalOut]


class DiagnosticsOut(BaseModel):
    cluster_id: str
    as_of: datetime
    window: Window
    config_version: str
    problems: list[ProblemOut]


class VisibilityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    members: bool = Field(
        description="member firms may read the indicators, network, classification, "
        "diagnostics, history and charts"
    )


class VisibilityOut(BaseModel):
    cluster_id: str
    members: bool
    updated_at: datetime | None = Field(description="null while the default applies")
    updated_by: str | None


class SeriesWindow(BaseModel):
    start: date
    end: date


class SeriesEvidence(BaseModel):
    members: int
    active_members: int
    ties: int
    days_of_data: int
    collaboration_weight: float


class SeriesPoint(BaseModel):
    as_of: datetime
    window: SeriesWindow
    evidence: SeriesEvidence
    features: dict[str, float | None]
    indicators: dict[str, float | None]


class SeriesOut(BaseModel):
    cluster_id: str
    from_: date = Field(alias="from", serialization_alias="from")
    to: date
    step_days: int
    window_days: int
    config_version: str
    features: list[str]
    indicators: list[str]
    points: list[SeriesPoint] = Field(description="oldest first; the last point is `to`")

    model_config = ConfigDict(populate_by_name=True)


class ComparedCluster(BaseModel):
    id: str
    name: str
    members: int
    label: str = Field(description="by the decision list, without the bootstrap")
    form: str | None
    features: dict[str, float | None]
    industry_shares: dict[str, float]


class Similarity(BaseModel):
    cosine: list[list[float | None]] = Field(description="1 = the same industry structure")
    krugman: list[list[float | None]] = Field(description="0 = the same, 2 = disjoint")


class ComparisonOut(BaseModel):
    ids: list[str]
    as_of: datetime
    window_days: int
    config_version: str
    clusters: list[ComparedCluster]
    similarity: Similarity
