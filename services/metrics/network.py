"""The collaboration network of a cluster in a window (networkx).

Nodes are the member firms (with region and actor type). Two firms are tied by *work*
(task contracts and accepted annotations, and imported collaboration, in
contract-equivalents) and by *conversation* (at least ``conversation.min_messages``
messages between them in direct channels or mentions, each worth
``conversation.weight_per_message``). Statistics are unweighted unless noted.

A degree-preserving rewiring keeps the number of edges, hence the density, exactly: the
comparison with the random baseline is therefore made on the *local* density — the
average clustering (how dense a firm's neighbourhood is) of the observed graph over the
mean of ``network.random_baselines`` rewired copies (double edge swaps, fixed seed). A
ratio well above 1 means ties close into groups, as in a real cluster; near 1 means the
ties are no more clustered than chance.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from services.metrics.config import MetricsConfig
from services.metrics.facts import ClusterFacts


def build_graph(facts: ClusterFacts, config: MetricsConfig) -> nx.Graph:
    graph = nx.Graph()
    for firm_id in sorted(facts.members):
        firm = facts.members[firm_id]
        graph.add_node(firm_id, region=firm.region, actor_type=firm.actor_type)
    for tie in facts.ties:
        if tie.weight <= 0 or tie.source == tie.target:
            continue
        _add(graph, tie.source, tie.target, work=tie.weight)
    conv = config.conversation
    for (a, b), messages in sorted(facts.conversations.items()):
        if messages >= conv.min_messages and a != b:
            _add(graph, a, b, messages=messages, work=0.0, extra=messages * conv.weight_per_message)
    return graph


def _add(
    graph: nx.Graph, a: str, b: str, *, work: float, messages: int = 0, extra: float = 0.0
) -> None:
    if graph.has_edge(a, b):
        data = graph.edges[a, b]
    else:
        graph.add_edge(a, b, weight=0.0, work_weight=0.0, messages=0)
        data = graph.edges[a, b]
    data["work_weight"] += work
    data["messages"] += messages
    data["weight"] += work + extra


def degree_centralisation(graph: nx.Graph) -> float | None:
    """Freeman's degree centralisation: Σ(max degree - degree) / ((n - 1)(n - 2))."""
    n = graph.number_of_nodes()
    if n < 3:
        return None
    degrees = [d for _, d in graph.degree()]
    top = max(degrees)
    return sum(top - d for d in degrees) / ((n - 1) * (n - 2))


def network_statistics(graph: nx.Graph, config: MetricsConfig) -> dict[str, Any]:
    n = graph.number_of_nodes()
    m = graph.number_of_edges()
    stats: dict[str, Any] = {
        "nodes": n,
        "edges": m,
        "density": nx.density(graph) if n > 1 else None,
        "average_clustering": nx.average_clustering(graph) if n else None,
        "giant_component_share": None,
        "isolate_share": None,
        "modularity": None,
        "communities": None,
        "degree_centralisation": degree_centralisation(graph),
        "cross_region_edge_share": None,
        "random_baseline": None,
        "clustering_vs_random": None,
    }
    if n:
        stats["giant_component_share"] = max(len(c) for c in nx.connected_components(graph)) / n
        stats["isolate_share"] = nx.number_of_isolates(graph) / n
    if m:
        seed = config.network.seed
        communities = nx.community.louvain_communities(graph, weight="weight", seed=seed)
        stats["modularity"] = nx.community.modularity(graph, communities, weight="weight")
        stats["communities"] = len(communities)
        regions = nx.get_node_attributes(graph, "region")
        cross = sum(1 for a, b in graph.edges if regions[a] != regions[b])
        stats["cross_region_edge_share"] = cross / m
        stats["random_baseline"] = _random_baseline(graph, config)
        baseline = stats["random_baseline"]
        if baseline and baseline["average_clustering"]:
            stats["clustering_vs_random"] = (
                stats["average_clustering"] / baseline["average_clustering"]
            )
    return stats


def communities_of(graph: nx.Graph, config: MetricsConfig) -> dict[str, int]:
    if not graph.number_of_edges():
        return {node: i for i, node in enumerate(sorted(graph.nodes))}
    found = nx.community.louvain_communities(graph, weight="weight", seed=config.network.seed)
    ordered = sorted((sorted(c) for c in found), key=lambda c: (-len(c), c[0]))
    return {node: i for i, members in enumerate(ordered) for node in members}


def _random_baseline(graph: nx.Graph, config: MetricsConfig) -> dict[str, Any] | None:
    """Mean density and clustering of degree-preserving rewirings (double edge swaps)."""
    settings = config.network
    m = graph.number_of_edges()
    if graph.number_of_nodes() < 4 or m < 2:
        return None
    simple = nx.Graph(graph.edges)
    clusterings = []
    for run in range(settings.random_baselines):
        copy = simple.copy()
        try:
            nx.double_edge_swap(
                copy,
                nswap=settings.swaps_per_edge * m,
                max_tries=settings.swaps_per_edge * m * 20,
                seed=settings.seed + run,
            )
        except (nx.NetworkXError, nx.NetworkXAlgorithmError):
            continue  # too few swappable edge pairs for this run: it is left out
        clusterings.append(nx.average_clustering(copy))
    if not clusterings:
        return None
    return {
        "runs": len(clusterings),
        "density": nx.density(simple),
        "average_clustering": sum(clusterings) / len(clusterings),
    }


def graph_payload(graph: nx.Graph, config: MetricsConfig) -> dict[str, Any]:
    community = communities_of(graph, config)
    nodes = [
        {
            "id": node,
            "region": data["region"],
            "actor_type": data["actor_type"],
            "degree": graph.degree(node),
            "community": community.get(node),
        }
        for node, data in sorted(graph.nodes(data=True))
    ]
    edges = [
        {
            "source": min(a, b),
            "target": max(a, b),
            "weight": round(data["weight"], 6),
            "work_weight": round(data["work_weight"], 6),
            "messages": data["messages"],
        }
        for a, b, data in sorted(graph.edges(data=True), key=lambda e: (min(e[:2]), max(e[:2])))
    ]
    return {"nodes": nodes, "edges": edges}
