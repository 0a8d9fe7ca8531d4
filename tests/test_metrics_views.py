"""Metrics views beyond the first slice, through the gateway: the operator publishing its
metrics to member firms, cross-cluster comparison, indicators over time and as CSV, and
the SVG pictures."""

from __future__ import annotations

import csv
import io
import math
import xml.etree.ElementTree as ET
from typing import Any

import httpx

from tests.marketplace_support import add_member, join, settle
from tests.metrics_support import (
    build_cluster,
    days_ago,
    do_work,
    import_history,
    record,
    settle_metrics,
)
from tests.oauth_flow import bearer

SVG = "{http://www.w3.org/2000/svg}"
FIRMS = {
    "core": ("CN-BJ", "large_enterprise", ["0301", "0406"]),
    "sx": ("CN-SX", "small_micro_enterprise", ["0304"]),
    "nm": ("CN-NM", "small_micro_enterprise", ["0304"]),
}
VIEWS = (
    "indicators",
    "indicators/history",
    "network",
    "classification",
    "diagnostics",
    "charts/radar.svg",
    "charts/network.svg",
)


async def test_members_read_what_the_operator_publishes(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    w = await build_cluster(client, gateway, "vis", FIRMS)
    other = await build_cluster(
        client, gateway, "vis2", {"x": ("CN-HE", "medium_enterprise", ["0501"])}
    )
    annotator = await add_member(client, w.tokens("sx"), w.id("sx"), "ann@vis.example")
    await settle_metrics(gateway)
    base = f"/v1/clusters/{w.cluster_id}"
    member, outsider = bearer(w.tokens("sx")), bearer(other.operator_tokens)

    async def statuses(headers: dict[str, str]) -> set[int]:
        return {(await client.get(f"{base}/{v}", headers=headers)).status_code for v in VIEWS}

    shown = await client.get(f"{base}/metrics-visibility", headers=member)
    assert shown.status_code == 200, shown.text
    assert shown.json() == {
        "cluster_id": w.cluster_id,
        "members": False,
        "updated_at": None,
        "updated_by": None,
    }
    assert await statuses(member) == {403}
    refused = await client.put(f"{base}/metrics-visibility", json={"members": True}, headers=member)
    assert refused.status_code == 403

    published = await client.put(
        f"{base}/metrics-visibility", json={"members": True}, headers=bearer(w.operator_tokens)
    )
    assert published.status_code == 200, published.text
    assert published.json()["members"] is True and published.json()["updated_by"]
    assert await statuses(member) == {200}
    assert await statuses(bearer(annotator)) == {200}  # any user of a member firm
    assert await statuses(outsider) == {404}
    assert (await client.get(f"{base}/metrics-visibility", headers=outsider)).status_code == 404
    # Importing history stays with the operator.
    imported = await client.post(
        f"{base}/history", json=[record(w, "core", "sx", "contract", 1.0, 3)], headers=member
    )
    assert imported.status_code == 403

    withdrawn = await client.put(
        f"{base}/metrics-visibility", json={"members": False}, headers=bearer(w.operator_tokens)
    )
    assert withdrawn.json()["members"] is False
    assert await statuses(member) == {403}
    assert await statuses(bearer(w.operator_tokens)) == {200}
    malformed = await client.put(
        f"{base}/metrics-visibility", json={"members": "maybe"}, headers=bearer(w.operator_tokens)
    )
    assert malformed.status_code == 422


async def test_compare_is_served_by_metrics_through_the_gateway(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    a = await build_cluster(client, gateway, "cmpa", FIRMS)
    b = await build_cluster(
        client,
        gateway,
        "cmpb",
        {
            "x": ("CN-HE", "medium_enterprise", ["0501"]),
            "y": ("CN-HE", "small_micro_enterprise", ["0304"]),
        },
        core_region="CN-HE",
    )
    c = await build_cluster(
        client, gateway, "cmpc", {"z": ("CN-JX", "medium_enterprise", ["0501"])}
    )
    # A's operator firm joins B as a member; B publishes its metrics to members.
    await join(client, b.operator_tokens, b.cluster_id, a.id("core"), a.operator_tokens)
    await settle(gateway)
    await settle_metrics(gateway)
    me = bearer(a.operator_tokens)
    ids = f"{a.cluster_id},{b.cluster_id}"

    unpublished = await client.get("/v1/clusters/compare", params={"ids": ids}, headers=me)
    assert unpublished.status_code == 403, unpublished.text
    await client.put(
        f"/v1/clusters/{b.cluster_id}/metrics-visibility",
        json={"members": True},
        headers=bearer(b.operator_tokens),
    )
    response = await client.get("/v1/clusters/compare", params={"ids": ids}, headers=me)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ids"] == [a.cluster_id, b.cluster_id]
    assert [c["members"] for c in body["clusters"]] == [3, 3]
    # A: 0301 ½, 0406 ½, 0304 2; B (with A's core): 0501 1, 0304 1, 0301 ½, 0406 ½.
    cos = 2.5 / (math.sqrt(4.5) * math.sqrt(2.5))
    assert body["similarity"]["cosine"] == [[1.0, round(cos, 6)], [round(cos, 6), 1.0]]
    assert body["similarity"]["krugman"] == [[0.0, round(2 / 3, 6)], [round(2 / 3, 6), 0.0]]
    assert body["clusters"][0]["industry_shares"]["0304"] == round(2 / 3, 6)
    features = body["clusters"][0]["features"]
    assert set(features) == {
        "data_element_driven",
        "open_allocation",
        "diverse_actors",
        "renewing_industries",
        "digital_real_integration",
        "platform_enablement",
    }
    assert body["clusters"][1]["label"] == "insufficient_evidence"

    # A cluster the caller cannot see is a 404 naming it; bad id lists are 422.
    hidden = await client.get(
        "/v1/clusters/compare", params={"ids": f"{ids},{c.cluster_id}"}, headers=me
    )
    assert hidden.status_code == 404
    assert c.cluster_id in hidden.text
    one = await client.get("/v1/clusters/compare", params={"ids": a.cluster_id}, headers=me)
    assert one.status_code == 422
    missing = await client.get("/v1/clusters/compare", headers=me)
    assert missing.status_code == 422
    # Membership still serves the directory entry of a cluster.
    entry = await client.get(f"/v1/clusters/{a.cluster_id}", headers=me)
    assert entry.status_code == 200 and entry.json()["id"] == a.cluster_id


async def test_indicator_history_as_series_and_csv(client: httpx.AsyncClient, gateway: Any) -> None:
    w = await build_cluster(client, gateway, "ser", FIRMS)
    lines = [
        record(w, "core", "sx", "contract", 1.0, 5),
        record(w, "core", "nm", "joint_project", 2.0, 40),
        record(w, "sx", "nm", "data_exchange", 4.0, 100),
    ]
    assert (await import_history(client, w, lines)).status_code == 200
    await do_work(client, gateway, w, "core", "sx", items=2)
    await settle_metrics(gateway)
    me = bearer(w.operator_tokens)
    base = f"/v1/clusters/{w.cluster_id}/indicators"
    params = {"from": days_ago(120), "to": days_ago(0), "step": 30, "window_days": 30}
    response = await client.get(f"{base}/history", params=params, headers=me)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["from"] == days_ago(120) and body["step_days"] == 30
    points = body["points"]
    assert [p["window"]["end"] for p in points] == [days_ago(d) for d in (120, 90, 60, 30, 0)]
    # Windows of 30 days ending 120, 90, 60, 30 and 0 days ago.
    weights = [p["evidence"]["collaboration_weight"] for p in points]
    assert weights == [0.0, 4.0, 0.0, 2.0, 1.2]  # today: 1.0 + two annotations at 0.1
    assert points[-1]["indicators"]["annotation_volume"] == 2
    assert points[1]["indicators"]["data_work_share"] == 1.0
    assert set(points[0]["features"]) == set(body["features"])

    as_csv = await client.get(f"{base}/history", params={**params, "format": "csv"}, headers=me)
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["window_end"] for r in rows] == [p["window"]["end"] for p in points]
    assert [float(r["collaboration_weight"]) for r in rows] == weights
    assert rows[-1]["annotation_volume"] == "2"
    assert rows[0]["data_work_share"] == ""  # nothing to measure
    assert (
        float(rows[-1]["feature:platform_enablement"])
        == points[-1]["features"]["platform_enablement"]
    )

    current = await client.get(base, params={"format": "csv"}, headers=me)
    assert current.status_code == 200 and current.headers["content-type"].startswith("text/csv")
    table = {r["key"]: r for r in csv.DictReader(io.StringIO(current.text))}
    as_json = {i["key"]: i for i in (await client.get(base, headers=me)).json()["indicators"]}
    assert set(table) == set(as_json)
    assert (
        float(table["cross_region_weight_share"]["value"])
        == as_json["cross_region_weight_share"]["value"]
    )

    too_many = await client.get(
        f"{base}/history", params={"from": "2000-01-01", "step": 1}, headers=me
    )
    assert too_many.status_code == 422
    backwards = await client.get(
        f"{base}/history", params={"from": days_ago(0), "to": days_ago(5)}, headers=me
    )
    assert backwards.status_code == 422
    bad_format = await client.get(base, params={"format": "xlsx"}, headers=me)
    assert bad_format.status_code == 422


def _no_external_resources(root: ET.Element) -> None:
    for element in root.iter():
        assert element.tag.startswith(SVG), element.tag
        assert element.tag not in (f"{SVG}script", f"{SVG}image", f"{SVG}foreignObject")
        for name, value in element.attrib.items():
            assert "href" not in name, (element.tag, name)
            assert "url(" not in value and "http" not in value.replace(SVG[1:-1], "")


async def test_radar_and_network_pictures_are_self_contained_svg(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    firms = {**FIRMS, "he": ("CN-HE", "university", ["0303"])}
    w = await build_cluster(client, gateway, "svg", firms)
    lines = [
        record(w, "core", "sx", "contract", 1.0, 5),
        record(w, "core", "nm", "joint_project", 2.0, 6),
    ]
    assert (await import_history(client, w, lines)).status_code == 200
    await settle_metrics(gateway)
    me = bearer(w.operator_tokens)
    base = f"/v1/clusters/{w.cluster_id}/charts"

    radar = await client.get(f"{base}/radar.svg", headers=me)
    assert radar.status_code == 200, radar.text
    assert radar.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(radar.text)
    assert root.tag == f"{SVG}svg"
    _no_external_resources(root)
    scores = [p for p in root.iter(f"{SVG}polygon") if p.get("class") == "scores"]
    assert len(scores) == 1
    assert len(scores[0].get("points", "").split()) == 6
    labels = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "Data-element driven" in labels and "svg cluster" in labels

    network = await client.get(f"{base}/network.svg", headers=me)
    assert network.status_code == 200, network.text
    assert network.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(network.text)
    _no_external_resources(root)
    nodes = [c for c in root.iter(f"{SVG}circle") if c.get("data-firm")]
    assert {c.get("data-firm") for c in nodes} == {w.id(n) for n in firms}
    fills = {c.get("data-region"): c.get("fill") for c in nodes}
    assert len(fills) == 4 and len(set(fills.values())) == 4  # one colour per region
    edges = [e for g in root.iter(f"{SVG}g") if g.get("class") == "edges" for e in g]
    assert len(edges) == 2
    again = await client.get(f"{base}/network.svg", headers=me)
    assert again.text == network.text  # the layout has a fixed seed
