"""Every indicator, network statistic and classifier rule on small hand-computed cases.

The cluster below has four members and four ties in a 60-day window:

    A  CN-BJ  large enterprise        0301 (digital core)
    B  CN-BJ  university              0301 (digital core)
    C  CN-SX  small-micro enterprise  0501 (traditional)
    D  CN-SX  small-micro enterprise  (no industry: traditional)

    A→C task contract, observed, w 1.0      A→C annotations, observed, w 0.5 (5 accepted)
    A→B joint project, imported, w 2.0      C→D supply, imported, w 0.5

Total weight 4.0, of which 2.5 imported. Activity (half of each tie per endpoint):
A 1.75, B 1.0, C 1.0, D 0.25; by region CN-BJ 2.75, CN-SX 1.25.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta

import networkx as nx
import pytest

from services.metrics.classifier import bootstrap_agreement, classify, decide, gate
from services.metrics.config import load_config
from services.metrics.facts import ClusterFacts, FirmFact, TaskRecord, Tie
from services.metrics.indicators import (
    compute_indicators,
    evenness,
    hhi,
    rankdata,
    spearman,
)
from services.metrics.network import build_graph, degree_centralisation, network_statistics

CONFIG = load_config()
AS_OF = datetime(2026, 6, 30, 12, tzinfo=UTC)
T0 = datetime(2026, 6, 20, 8, tzinfo=UTC)


def four_firms() -> ClusterFacts:
    members = {
        "A": FirmFact("A", "CN-BJ", "large_enterprise", ("0301",)),
        "B": FirmFact("B", "CN-BJ", "university", ("0301",)),
        "C": FirmFact("C", "CN-SX", "small_micro_enterprise", ("0501",)),
        "D": FirmFact("D", "CN-SX", "small_micro_enterprise", ()),
    }
    facts = ClusterFacts("cl", AS_OF, 60, members)
    facts.ties = [
        Tie("A", "C", "task_contract", "observed", 1.0, 1, 100, 500),
        Tie("A", "C", "annotation", "observed", 0.5, 5, 5, 25),
        Tie("A", "B", "joint_project", "imported", 2.0),
        Tie("C", "D", "supply", "imported", 0.5),
    ]
    facts.previous_ties = [
        Tie("A", "C", "task_contract", "observed", 1.0),
        Tie("C", "D", "supply", "imported", 1.0),
    ]
    facts.year_ago_ties = [Tie("A", "B", "joint_project", "imported", 1.0)]
    facts.tasks = [
        TaskRecord("T1", "A", "CN-BJ", frozenset({"CN-SX"}), T0, T0 + timedelta(hours=2)),
        TaskRecord("T2", "B", "CN-BJ", frozenset({"CN-BJ"}), T0, None, T0 + timedelta(hours=6)),
        TaskRecord("T3", "A", "CN-BJ", frozenset(), T0),
    ]
    recent, older = AS_OF.date() - timedelta(days=3), AS_OF.date() - timedelta(days=40)
    facts.activity = {"A": {recent}, "C": {recent, older}}
    facts.first_day = date(2026, 1, 1)
    return facts


@pytest.fixture
def report():  # type: ignore[no-untyped-def]
    return compute_indicators(four_firms(), CONFIG)


def value(report, key):  # type: ignore[no-untyped-def]
    return report.indicators[key].value


def test_pure_formulas() -> None:
    assert evenness([5]) == 0.0
    assert evenness([]) is None
    assert evenness([2, 2]) == pytest.approx(1.0)
    assert evenness([1, 1, 2]) == pytest.approx(
        -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)) / math.log(3)
    )
    assert hhi([3, 1]) == pytest.approx(0.625)
    assert hhi([0, 0]) is None
    assert list(rankdata([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_data_element_driven(report) -> None:  # type: ignore[no-untyped-def]
    # task contract 1.0 + annotations 0.5 are data work; joint project and supply are not.
    assert value(report, "data_work_share") == pytest.approx(1.5 / 4)
    assert value(report, "annotation_volume") == 5
    assert report.indicators["data_work_share"].imported_share == pytest.approx(2.5 / 4)


def test_open_allocation(report) -> None:  # type: ignore[no-untyped-def]
    # Only A-C (1.5) crosses regions.
    assert value(report, "cross_region_weight_share") == pytest.approx(1.5 / 4)
    # T1 (vendor in CN-SX) crosses, T2 (vendor in CN-BJ) does not, T3 has no vendor.
    assert value(report, "cross_region_task_share") == pytest.approx(0.5)
    counts = report.indicators["cross_region_task_share"].counts
    assert counts == {"tasks": 3, "tasks_with_vendor": 2, "cross_region_tasks": 1}
    assert report.indicators["cross_region_task_share"].observed_share == 1.0
    assert value(report, "region_entropy") == pytest.approx(1.0)  # two and two


def test_diverse_actors(report) -> None:  # type: ignore[no-untyped-def]
    # types: large 1, university 1, small-micro 2 → p = ¼, ¼, ½ over k = 3.
    expected = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(3)
    assert value(report, "actor_type_entropy") == pytest.approx(expected)
    # The university is present and active (it has a tie); no other such kind.
    assert value(report, "knowledge_capital_kinds") == 1
    assert report.indicators["knowledge_capital_kinds"].score == pytest.approx(1 / 5)
    # pairs A-B (large/university), A-C (large/small), C-D (small/small): 2 of 3 cross.
    assert value(report, "cross_type_tie_share") == pytest.approx(2 / 3)
    # Pair basis: A-B 2.0 and C-D 0.5 imported of 4.0.
    assert report.indicators["cross_type_tie_share"].imported_share == pytest.approx(2.5 / 4)


def test_renewing_industries(report) -> None:  # type: ignore[no-untyped-def]
    # now: 0301 2.75, 0501 1.0, "" 0.25 → ranks ("", 0301, 0501) = 1, 3, 2
    # before: 0301 0.5, 0501 1.0, "" 0.5 → ranks 1.5, 1.5, 3 → rho = 0 → 1 - rho = 1.
    assert value(report, "industry_rank_change") == pytest.approx(1.0)
    assert report.indicators["industry_rank_change"].score == pytest.approx(0.5)
    # A year earlier only 0301 was active: 0501 and "" are new, 1.25 of 4.0.
    assert value(report, "new_industry_share") == pytest.approx(1.25 / 4)


def test_digital_real_integration(report) -> None:  # type: ignore[no-untyped-def]
    # core activity: A 1.75 + B 1.0 of 4.0.
    assert value(report, "digital_core_share") == pytest.approx(2.75 / 4)
    # core-traditional pairs: A-C only, of three pairs.
    assert value(report, "integration_tie_share") == pytest.approx(1 / 3)


def test_platform_enablement(report) -> None:  # type: ignore[no-untyped-def]
    assert value(report, "platform_matched_share") == pytest.approx(1.5 / 4)
    # 60 days → two 30-day slices: recent {A, C} = 2/4, older {C} = 1/4.
    assert value(report, "monthly_active_share") == pytest.approx(0.375)
    # T1 claimed after 2 h, T2 first submitted after 6 h: median 4 h.
    assert value(report, "claim_speed") == pytest.approx(4.0)
    assert report.indicators["claim_speed"].score == pytest.approx(24 / 28)


def test_spatial_concentration(report) -> None:  # type: ignore[no-untyped-def]
    assert value(report, "top_region_share") == pytest.approx(2.75 / 4)
    assert value(report, "regional_hhi") == pytest.approx((2.75 / 4) ** 2 + (1.25 / 4) ** 2)


def test_feature_scores_are_weighted_means(report) -> None:  # type: ignore[no-untyped-def]
    w = CONFIG.features["digital_real_integration"]
    expected = (w["digital_core_share"] * 2.75 / 4 + w["integration_tie_share"] / 3) / (
        w["digital_core_share"] + w["integration_tie_share"]
    )
    assert report.features["digital_real_integration"] == pytest.approx(expected)
    assert report.features["data_element_driven"] == pytest.approx(1.5 / 4)


def test_evidence_counts(report) -> None:  # type: ignore[no-untyped-def]
    assert report.active_members == 4  # A and C acted; B and D have ties
    assert report.ties == 3
    assert report.days_of_data == 60  # data since January: the whole window


def test_network_statistics() -> None:
    facts = four_firms()
    facts.conversations = {("B", "D"): 3, ("A", "D"): 2}  # 2 < min_messages: no edge
    graph = build_graph(facts, CONFIG)
    assert sorted(graph.edges) == [("A", "B"), ("A", "C"), ("B", "D"), ("C", "D")]
    assert graph.edges["A", "C"]["weight"] == pytest.approx(1.5)
    assert graph.edges["B", "D"]["messages"] == 3
    assert graph.edges["B", "D"]["weight"] == pytest.approx(
        3 * CONFIG.conversation.weight_per_message
    )
    stats = network_statistics(graph, CONFIG)
    assert stats["density"] == pytest.approx(4 / 6)
    assert stats["average_clustering"] == 0.0  # a 4-cycle has no triangles
    assert stats["giant_component_share"] == 1.0
    assert stats["isolate_share"] == 0.0
    assert stats["cross_region_edge_share"] == pytest.approx(2 / 4)  # A-C, B-D
    assert stats["degree_centralisation"] == 0.0  # every degree is 2
    assert stats["modularity"] is not None
    assert network_statistics(graph, CONFIG)["modularity"] == stats["modularity"]  # fixed seed


def test_degree_centralisation_and_baseline() -> None:
    star = nx.star_graph(3)  # centre degree 3, leaves 1: Σ(3 - d) = 6 over (3·2)
    assert degree_centralisation(star) == pytest.approx(1.0)
    assert degree_centralisation(nx.path_graph(4)) == pytest.approx(2 / 6)
    assert degree_centralisation(nx.path_graph(2)) is None
    # Two dense groups joined by one edge are far more clustered than their rewirings.
    groups = nx.connected_caveman_graph(4, 5)
    nx.set_node_attributes(groups, "CN-BJ", "region")
    nx.set_node_attributes(groups, "large_enterprise", "actor_type")
    stats = network_statistics(groups, CONFIG)
    assert stats["random_baseline"]["density"] == pytest.approx(stats["density"])
    assert stats["clustering_vs_random"] > 1.5


def test_isolates() -> None:
    facts = four_firms()
    facts.members["E"] = FirmFact("E", "CN-HE", "investor", ())
    stats = network_statistics(build_graph(facts, CONFIG), CONFIG)
    assert stats["isolate_share"] == pytest.approx(1 / 5)
    assert stats["giant_component_share"] == pytest.approx(4 / 5)


# -- the classifier ------------------------------------------------------------------
def measures(**values: float | None) -> dict[str, float | None]:
    base: dict[str, float | None] = {
        "cross_region_weight_share": 0.05,
        "top_region_share": 0.9,
        "cross_region_task_share": 0.0,
        "digital_core_share": 0.8,
        "integration_tie_share": 0.1,
        "platform_matched_share": 0.5,
    }
    base.update(values)
    return base


def test_decision_list() -> None:
    d = decide(measures(), CONFIG)
    assert (d.label, d.form) == ("digital_industrialisation", "geographic")
    assert [c.indicator for c in d.conditions] == [
        "cross_region_weight_share",
        "top_region_share",
        "digital_core_share",
    ]
    assert d.conditions[0].margin == pytest.approx(0.15)

    d = decide(measures(digital_core_share=0.3, integration_tie_share=0.4), CONFIG)
    assert (d.label, d.form) == ("industrial_digitalisation", "geographic")
    d = decide(measures(digital_core_share=0.3, platform_matched_share=0.1), CONFIG)
    assert d.label == "not_yet_digital_economy"

    d = decide(measures(cross_region_weight_share=0.7, top_region_share=0.4), CONFIG)
    assert (d.label, d.form) == ("virtual_network", "network_space")
    # A hub-and-spoke cluster: the hub holds half of every cross-region tie, so its
    # region's activity share stays above one half. From v2 the cross-region share alone
    # decides network space; v1 (kept for recorded classifications) capped the top region.
    hub = measures(cross_region_weight_share=0.83, top_region_share=0.58)
    d = decide(hub, CONFIG)
    assert (d.label, d.form) == ("virtual_network", "network_space")
    assert [(c.indicator, c.op, c.threshold) for c in d.conditions] == [
        ("cross_region_weight_share", ">=", 0.5)
    ]
    assert d.conditions[0].margin == pytest.approx(0.33)
    v1 = load_config("metrics-config-v1")
    assert v1.form.network_max_top_region_share == 0.5
    assert decide(hub, v1).form == "virtual_real_combined"

    # Combined form: tasks crossing regions decide the virtual network...
    d = decide(measures(cross_region_weight_share=0.35, cross_region_task_share=0.8), CONFIG)
    assert (d.label, d.form) == ("virtual_network", "virtual_real_combined")
    # ... or not, and the digital core share decides.
    d = decide(measures(cross_region_weight_share=0.35, cross_region_task_share=0.1), CONFIG)
    assert (d.label, d.form) == ("digital_industrialisation", "virtual_real_combined")
    assert "cross_region_task_share" in [c.indicator for c in d.conditions]
    # Unknown task share (no tasks) never holds.
    d = decide(measures(cross_region_weight_share=0.35, cross_region_task_share=None), CONFIG)
    assert d.label == "digital_industrialisation"


def test_gate_and_confidence(report) -> None:  # type: ignore[no-untyped-def]
    # Four members are one short of the five the gate asks for.
    assert gate(report, CONFIG) == [
        f"active members: 4 of {CONFIG.gate.min_active_members} needed",
        f"ties between members: 3 of {CONFIG.gate.min_ties} needed",
    ]
    result = classify(report, CONFIG)
    assert result["label"] == "insufficient_evidence"
    assert "active members: 4 of 5 needed" in result["explanation"]

    relaxed = CONFIG.model_copy(
        update={"gate": CONFIG.gate.model_copy(update={"min_active_members": 1, "min_ties": 1})}
    )
    result = classify(report, relaxed)
    # cross 0.375 (neither < 0.2 nor ≥ 0.5) → combined; task share 0.5 ≥ 0.4 → virtual.
    assert (result["label"], result["form"]) == ("virtual_network", "virtual_real_combined")
    assert result["confidence"]["runs"] == CONFIG.confidence.runs
    assert 0 <= result["confidence"]["agreement"] <= 1
    assert result["confidence"]["band"] in ("medium", "low")  # four firms: fragile
    again = bootstrap_agreement(report.frame, decide_of(report), relaxed)
    assert again == result["confidence"]["agreement"]  # fixed seed
    # Deciding: the geographic rule failed on the cross-region share (0.375 ≥ 0.2), the
    # network-space rule too (0.375 < 0.5); then the tasks crossing regions.
    named = [(c["indicator"], c["op"], c["holds"]) for c in result["deciding"]]
    assert named == [
        ("cross_region_weight_share", "<", False),
        ("cross_region_weight_share", ">=", False),
        ("cross_region_task_share", ">=", True),
    ]


def decide_of(report):  # type: ignore[no-untyped-def]
    from services.metrics.indicators import core_measures

    return decide(core_measures(report.frame), CONFIG)


# -- diagnostics ---------------------------------------------------------------------
def test_structure_similarity_and_krugman() -> None:
    from services.metrics.diagnostics import cosine, krugman, structure

    s = structure([("0301",), ("0301", "0501"), ()])
    assert s == {"0301": 1.5, "0501": 0.5, "": 1.0}
    assert cosine({"a": 1.0}, {"a": 3.0}) == pytest.approx(1.0)
    assert cosine({"a": 1.0}, {"b": 1.0}) == pytest.approx(0.0)
    assert cosine({"a": 1.0, "b": 1.0}, {"a": 1.0}) == pytest.approx(1 / math.sqrt(2))
    assert krugman({"a": 1.0}, {"b": 2.0}) == pytest.approx(2.0)
    assert krugman({"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0}) == pytest.approx(0.5)
    assert cosine({}, {"a": 1.0}) is None


def test_diagnose_flags_what_crosses() -> None:
    from services.metrics.diagnostics import DiagnosticInputs, ParkFact, diagnose

    facts = four_firms()
    facts.tasks = [
        TaskRecord("T1", "A", "CN-BJ", frozenset({"CN-SX"}), T0, outcome="completed"),
        TaskRecord("T2", "A", "CN-BJ", frozenset(), T0, outcome="cancelled"),
        TaskRecord("T3", "B", "CN-BJ", frozenset(), T0, outcome="cancelled"),
    ]
    report = compute_indicators(facts, CONFIG)
    stats = network_statistics(build_graph(facts, CONFIG), CONFIG)
    inputs = DiagnosticInputs(
        peers={"other": {"0301": 1.0, "0501": 1.0}},
        parks=[ParkFact("p1", "Park", 10, ["C", "D"])],
        dormant={"D"},
    )
    problems = {p["key"]: p for p in diagnose(facts, report, stats, inputs, CONFIG)}
    signals = {s["indicator"]: s for p in problems.values() for s in p["signals"]}
    assert signals["completion_rate"]["value"] == pytest.approx(1 / 3)
    assert signals["completion_rate"]["crossed"] is True
    assert problems["low_operating_efficiency"]["flagged"] is True
    # own structure: 0301 2, 0501 1, "" 1 → cosine with (1, 1, 0) = 3 / (√6 · √2).
    assert signals["max_similarity_to_other_clusters"]["value"] == pytest.approx(
        3 / (math.sqrt(6) * math.sqrt(2)), abs=1e-6
    )
    # CN-BJ (0301: 2) against CN-SX (0501: 1, "": 1): nothing in common.
    assert signals["mean_similarity_between_regions"]["value"] == 0.0
    assert problems["homogeneous_competition"]["flagged"] is False
    assert signals["park_occupancy"]["value"] == pytest.approx(0.2)
    assert signals["dormant_located_share"]["value"] == pytest.approx(0.5)
    assert problems["idle_carriers"]["flagged"] is True  # occupancy 0.2 < 0.5
    assert signals["knowledge_capital_kinds_present"]["value"] == 1
    assert "investor" in signals["knowledge_capital_kinds_present"]["missing"]
    assert signals["isolate_share"]["value"] == 0.0
    assert problems["agglomerated_not_clustered"]["flagged"] is True  # one kind of five


def homogeneous_of(
    industries: Mapping[str, tuple[str, tuple[str, ...]]], peers: dict[str, dict[str, float]]
) -> dict:
    """The homogeneous-competition diagnosis of ``four_firms`` with its members' regions
    and industries replaced (name → (region, industries); new names join untied)."""
    from services.metrics.diagnostics import DiagnosticInputs, diagnose

    facts = four_firms()
    facts.members = {
        name: FirmFact(name, region, "small_micro_enterprise", codes)
        for name, (region, codes) in industries.items()
    }
    report = compute_indicators(facts, CONFIG)
    stats = network_statistics(build_graph(facts, CONFIG), CONFIG)
    problems = diagnose(facts, report, stats, DiagnosticInputs(peers, [], set()), CONFIG)
    (problem,) = [p for p in problems if p["key"] == "homogeneous_competition"]
    return problem


def test_homogeneous_competition_is_flagged_above_the_peer_similarity_threshold() -> None:
    from services.metrics.diagnostics import krugman

    threshold = CONFIG.diagnostics.max_similarity_to_peers
    assert threshold == 0.9
    # Own structure: 0301 2, 0501 2, split over two regions with nothing in common, so
    # only the similarity to another cluster can flag. A peer (0301 1, 0501 y) has
    # cosine (1 + y) / (√2 · √(1 + y²)): 0.9010 at y = 0.35, 0.8991 at y = 0.345.
    members = {
        "A": ("CN-BJ", ("0301",)),
        "B": ("CN-BJ", ("0301",)),
        "C": ("CN-SX", ("0501",)),
        "D": ("CN-SX", ("0501",)),
    }
    own = {"0301": 2.0, "0501": 2.0}

    def similarity(y: float) -> float:
        return (1 + y) / (math.sqrt(2) * math.sqrt(1 + y * y))

    near = {"0301": 1.0, "0501": 0.35}
    problem = homogeneous_of(members, {"far": {"0601": 1.0}, "near": near})
    assert (problem["name"], problem["flagged"]) == ("Homogeneous competition", True)
    peers, regions = problem["signals"]
    assert peers == {
        "indicator": "max_similarity_to_other_clusters",
        "value": round(similarity(0.35), 6),
        "op": ">",
        "threshold": threshold,
        "crossed": True,
        "cluster_id": "near",  # the most similar of the clusters compared
        "krugman": pytest.approx(krugman(own, near)),
        "clusters_compared": 2,
    }
    assert peers["value"] == pytest.approx(0.901002, abs=1e-6)
    # shares ½ ½ against 1/1.35 and 0.35/1.35.
    assert peers["krugman"] == pytest.approx(2 * (1 / 1.35 - 0.5))
    assert regions["indicator"] == "mean_similarity_between_regions"
    assert (regions["value"], regions["crossed"]) == (0.0, False)
    assert regions["pairs"] == [{"regions": ["CN-BJ", "CN-SX"], "cosine": 0.0, "krugman": 2.0}]

    # Just under the threshold: not flagged, the evidence still names the nearest peer.
    problem = homogeneous_of(members, {"far": {"0601": 1.0}, "near": {"0301": 1.0, "0501": 0.345}})
    peers, regions = problem["signals"]
    assert peers["value"] == round(similarity(0.345), 6)
    assert threshold - 0.001 < peers["value"] < threshold
    assert (peers["crossed"], peers["cluster_id"], regions["crossed"]) == (False, "near", False)
    assert problem["flagged"] is False


def test_homogeneous_competition_is_flagged_when_regions_look_alike() -> None:
    threshold = CONFIG.diagnostics.max_similarity_between_regions
    assert threshold == 0.9
    # CN-BJ is all 0301; CN-SX has n firms in 0301 and one in 0501: cosine n / √(n² + 1),
    # 3/√10 = 0.9487 (flagged) with three, 2/√5 = 0.8944 (not) with two.
    look_alike = {
        "A": ("CN-BJ", ("0301",)),
        "B": ("CN-BJ", ("0301",)),
        "C": ("CN-SX", ("0301",)),
        "D": ("CN-SX", ("0301",)),
        "E": ("CN-SX", ("0301",)),
        "F": ("CN-SX", ("0501",)),
    }
    problem = homogeneous_of(look_alike, {})
    assert problem["flagged"] is True
    peers, regions = problem["signals"]
    # No other cluster to compare with: no value, which never crosses.
    assert peers["value"] is None and peers["crossed"] is False
    assert (peers["cluster_id"], peers["krugman"], peers["clusters_compared"]) == (None, None, 0)
    assert regions == {
        "indicator": "mean_similarity_between_regions",
        "value": round(3 / math.sqrt(10), 6),
        "op": ">",
        "threshold": threshold,
        "crossed": True,
        # shares 1, 0 against ¾, ¼: K = ¼ + ¼.
        "pairs": [
            {"regions": ["CN-BJ", "CN-SX"], "cosine": round(3 / math.sqrt(10), 6), "krugman": 0.5}
        ],
    }

    near_miss = {k: v for k, v in look_alike.items() if k != "E"}
    problem = homogeneous_of(near_miss, {})
    (_, regions) = problem["signals"]
    assert regions["value"] == round(2 / math.sqrt(5), 6)
    assert regions["value"] < threshold
    assert regions["crossed"] is False
    assert regions["pairs"][0]["krugman"] == pytest.approx(2 / 3)
    assert problem["flagged"] is False
