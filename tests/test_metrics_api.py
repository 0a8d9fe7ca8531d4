"""Metrics through the public API: who sees what, the history import, the fact store fed
by real marketplace work, indicators, the network and the classification."""

from __future__ import annotations

from typing import Any

import httpx
import sqlalchemy as sa

from tests.metrics_support import (
    World,
    build_cluster,
    do_work,
    import_history,
    record,
    settle_metrics,
)
from tests.oauth_flow import bearer

AI = ["0301", "0406"]
FIRMS = {
    "core": ("CN-BJ", "large_enterprise", AI),
    "sx": ("CN-SX", "small_micro_enterprise", ["0304"]),
    "nm": ("CN-NM", "small_micro_enterprise", ["0304"]),
}


async def _rows(gateway: Any, table: str) -> list[Any]:
    async with gateway.apps["metrics"].state.db.sessionmaker() as session:
        return list((await session.execute(sa.text(f"SELECT * FROM {table}"))).all())


async def test_operator_reads_members_get_403_outsiders_404(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    world = await build_cluster(client, gateway, "acc", FIRMS)
    other = await build_cluster(
        client, gateway, "acc2", {"x": ("CN-HE", "medium_enterprise", ["0501"])}
    )
    base = f"/v1/clusters/{world.cluster_id}"
    for path in ("indicators", "network", "classification"):
        ok = await client.get(f"{base}/{path}", headers=bearer(world.operator_tokens))
        assert ok.status_code == 200, ok.text
        member = await client.get(f"{base}/{path}", headers=bearer(world.tokens("sx")))
        assert member.status_code == 403, member.text
        outsider = await client.get(f"{base}/{path}", headers=bearer(other.operator_tokens))
        assert outsider.status_code == 404, outsider.text
        unknown = await client.get(
            f"/v1/clusters/cl_unknown/{path}", headers=bearer(world.operator_tokens)
        )
        assert unknown.status_code == 404
    refused = await client.post(
        f"{base}/history",
        json=[record(world, "core", "sx", "contract", 1, 3)],
        headers=bearer(world.tokens("sx")),
    )
    assert refused.status_code == 403
    assert await _rows(gateway, "imported_records") == []


async def test_history_import_validates_every_line_and_is_idempotent(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    world = await build_cluster(client, gateway, "hist", FIRMS)
    good = [
        record(world, "core", "sx", "joint_project", 2.0, 10, ext="erp-1"),
        record(world, "core", "nm", "data_exchange", 1.5, 20),
    ]
    bad = [
        *good,
        {**good[0], "external_id": "erp-2", "kind": "gossip"},
        {**good[0], "external_id": "erp-3", "firm_b": good[0]["firm_a"]},
        {**good[0], "external_id": "erp-4", "weight": 0},
        {**good[0], "external_id": "erp-5", "firm_b": "frm_stranger"},
        {**good[0], "external_id": "erp-6", "date": "2999-01-01"},
        "not an object",
    ]
    rejected = await import_history(client, world, bad)
    assert rejected.status_code == 422, rejected.text
    assert [r["index"] for r in rejected.json()["rejected"]] == [2, 3, 4, 5, 6, 7]
    assert "kind" in rejected.json()["rejected"][0]["reason"]
    assert "not a member" in rejected.json()["rejected"][3]["reason"]
    assert await _rows(gateway, "imported_records") == []

    first = await import_history(client, world, good)
    assert first.status_code == 200, first.text
    assert first.json() == {"lines": 2, "imported": 2, "duplicates": 0}
    again = await import_history(client, world, good)
    assert again.json() == {"lines": 2, "imported": 0, "duplicates": 2}
    # JSONL is accepted too; the same external id is a duplicate even with other content.
    jsonl = "\n".join(
        __import__("json").dumps(line)
        for line in [{**good[0], "weight": 9.0}, record(world, "sx", "nm", "training", 1, 5)]
    )
    third = await client.post(
        f"/v1/clusters/{world.cluster_id}/history",
        content=jsonl,
        headers={**bearer(world.operator_tokens), "content-type": "application/x-ndjson"},
    )
    assert third.json() == {"lines": 2, "imported": 1, "duplicates": 1}, third.text
    collab = await _rows(gateway, "collab_daily")
    assert sorted(round(r.weight, 3) for r in collab if r.origin == "imported") == [1.0, 1.5, 2.0]

    malformed = await client.post(
        f"/v1/clusters/{world.cluster_id}/history",
        content=b"[{",
        headers={**bearer(world.operator_tokens), "content-type": "application/json"},
    )
    assert malformed.status_code == 400
    not_array = await import_history(client, world, {"firm_a": "x"})  # type: ignore[arg-type]
    assert not_array.status_code == 422


async def test_marketplace_work_and_imports_feed_indicators_and_network(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    world = await build_cluster(client, gateway, "feed", FIRMS)
    await do_work(client, gateway, world, "core", "sx", items=3)
    await settle_metrics(gateway)
    imported = await import_history(
        client, world, [record(world, "core", "nm", "joint_project", 0.7, 30)]
    )
    assert imported.status_code == 200, imported.text

    response = await client.get(
        f"/v1/clusters/{world.cluster_id}/indicators", headers=bearer(world.operator_tokens)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    ind = {i["key"]: i for i in body["indicators"]}
    # 3 accepted annotations at 0.1 each (observed) + 0.7 imported.
    assert body["evidence"]["collaboration_weight"] == 1.0
    assert ind["annotation_volume"]["value"] == 3
    assert ind["platform_matched_share"]["value"] == 0.3
    assert ind["platform_matched_share"]["basis"] == {
        "observed_share": 0.3,
        "imported_share": 0.7,
    }
    assert ind["cross_region_weight_share"]["value"] == 1.0
    assert ind["cross_region_task_share"]["value"] == 1.0
    assert ind["cross_region_task_share"]["counts"]["tasks"] == 1
    assert ind["claim_speed"]["counts"]["tasks_claimed"] == 1
    # Digital core: core's half of every tie is 0301/0406, the vendors' 0304: all core.
    assert ind["digital_core_share"]["value"] == 1.0
    for item in body["indicators"]:
        assert item["definition"] and item["formula"] and item["name"]
    assert {f["key"] for f in body["features"]} >= {
        "data_element_driven",
        "open_allocation",
        "diverse_actors",
        "renewing_industries",
        "digital_real_integration",
        "platform_enablement",
    }

    network = await client.get(
        f"/v1/clusters/{world.cluster_id}/network", headers=bearer(world.operator_tokens)
    )
    assert network.status_code == 200, network.text
    net = network.json()
    assert {n["id"] for n in net["nodes"]} == {world.id(n) for n in FIRMS}
    edges = {(e["source"], e["target"]): e["weight"] for e in net["edges"]}
    assert edges[tuple(sorted((world.id("core"), world.id("sx"))))] == 0.3
    assert edges[tuple(sorted((world.id("core"), world.id("nm"))))] == 0.7
    stats = net["statistics"]
    assert stats["edges"] == 2 and stats["density"] == round(2 / 3, 6)
    assert stats["cross_region_edge_share"] == 1.0
    assert stats["isolate_share"] == 0.0 and stats["giant_component_share"] == 1.0

    # A window that ends before anything happened is empty, not an error.
    empty = await client.get(
        f"/v1/clusters/{world.cluster_id}/indicators",
        params={"as_of": "2020-01-01T00:00:00Z", "window_days": 30},
        headers=bearer(world.operator_tokens),
    )
    assert empty.status_code == 200
    assert empty.json()["evidence"]["members"] == 0
    bad_window = await client.get(
        f"/v1/clusters/{world.cluster_id}/indicators",
        params={"window_days": 0},
        headers=bearer(world.operator_tokens),
    )
    assert bad_window.status_code == 422


async def test_thin_cluster_is_insufficient_evidence(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    from prometheus_client import REGISTRY

    def runs() -> float:
        labels = {"label": "insufficient_evidence"}
        return REGISTRY.get_sample_value("metrics_classifier_runs_total", labels) or 0.0

    world: World = await build_cluster(client, gateway, "thin", FIRMS)
    await import_history(client, world, [record(world, "core", "sx", "contract", 1, 2)])
    before = runs()
    response = await client.get(
        f"/v1/clusters/{world.cluster_id}/classification",
        headers=bearer(world.operator_tokens),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == "insufficient_evidence"
    assert body["form"] is None
    missing = " ".join(body["evidence"]["missing"])
    assert "active members: 2 of 5" in missing
    assert "ties between members: 1 of 4" in missing
    assert "days of data in the window: 3 of 14" in missing
    assert runs() > before  # operators see classifier runs on /metrics


async def test_idle_park_and_members_without_ties_raise_their_diagnostics(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    firms = {
        **FIRMS,
        "he": ("CN-HE", "small_micro_enterprise", ["0304"]),
        "he2": ("CN-HE", "medium_enterprise", ["0501"]),
    }
    world = await build_cluster(client, gateway, "diag", firms)
    park = await client.post(
        f"/v1/clusters/{world.cluster_id}/parks",
        json={"name": "Idle park", "region": "CN-HE", "city": "Baoding", "capacity": 10},
        headers=bearer(world.operator_tokens),
    )
    assert park.status_code == 201, park.text
    for name in ("he", "he2"):
        located = await client.patch(
            f"/v1/clusters/{world.cluster_id}/members/{world.id(name)}",
            json={"park_id": park.json()["id"]},
            headers=bearer(world.tokens(name)),
        )
        assert located.status_code == 200, located.text
    await import_history(client, world, [record(world, "core", "sx", "contract", 1.0, 5)])
    await settle_metrics(gateway)
    response = await client.get(
        f"/v1/clusters/{world.cluster_id}/diagnostics", headers=bearer(world.operator_tokens)
    )
    assert response.status_code == 200, response.text
    problems = {p["key"]: p for p in response.json()["problems"]}
    signals = {s["indicator"]: s for p in problems.values() for s in p["signals"]}
    assert problems["idle_carriers"]["flagged"] is True
    assert signals["park_occupancy"]["value"] == 0.2
    assert signals["park_occupancy"]["parks"][0]["located"] == 2
    assert signals["dormant_located_share"]["value"] == 1.0  # neither acted on the platform
    assert problems["agglomerated_not_clustered"]["flagged"] is True
    assert signals["isolate_share"]["value"] == 0.6  # nm, he, he2 have no tie
    assert signals["isolate_share"]["crossed"] is True
    member = await client.get(
        f"/v1/clusters/{world.cluster_id}/diagnostics", headers=bearer(world.tokens("sx"))
    )
    assert member.status_code == 403
