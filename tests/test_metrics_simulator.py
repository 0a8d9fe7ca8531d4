"""The simulator drives the three archetypes and the problem cases through the public
HTTP API of the embedded platform; the metrics service classifies and diagnoses them.

Only the simulator writes (through the API); the test reads the answers through the API
too, after :func:`settle_metrics` made sure every event was applied.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.metrics.simulator import SCENARIOS, SimulatedCluster, run
from tests.metrics_support import settle_metrics
from tests.served import ROOT, serve_platform


async def _get(client: httpx.AsyncClient, sim: SimulatedCluster, view: str) -> dict[str, Any]:
    response = await client.get(f"/v1/clusters/{sim.cluster_id}/{view}", headers=sim.operator.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _problems(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    problems = {p["key"]: p for p in body["problems"]}
    signals = {s["indicator"]: s for p in body["problems"] for s in p["signals"]}
    return problems, signals


@pytest.mark.slow
async def test_simulated_archetypes_and_problem_cases(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    sims = await run(client, redirect_uri="http://testserver/cb", tag="simtest")
    await settle_metrics(gateway)
    assert set(sims) == set(SCENARIOS)

    expected = {
        "software": (
            "digital_industrialisation",
            "geographic",
            ["cross_region_weight_share", "top_region_share", "digital_core_share"],
        ),
        "furniture": (
            "industrial_digitalisation",
            "geographic",
            [
                "cross_region_weight_share",
                "top_region_share",
                "digital_core_share",
                "integration_tie_share",
                "platform_matched_share",
            ],
        ),
        "ai": ("virtual_network", "network_space", ["cross_region_weight_share"]),
    }
    for key, (label, form, deciding) in expected.items():
        body = await _get(client, sims[key], "classification")
        assert (body["label"], body["form"]) == (label, form), (key, body["explanation"])
        assert [c["indicator"] for c in body["deciding"]] == deciding, key
        for name in deciding:
            assert name in body["explanation"], (key, body["explanation"])
        assert body["evidence"]["sufficient"] is True
        assert body["confidence"]["band"] in ("high", "medium", "low")

    # The recent activity came through the services, the older months through the import.
    ai = await _get(client, sims["ai"], "indicators")
    ind = {i["key"]: i for i in ai["indicators"]}
    assert ind["annotation_volume"]["value"] == SCENARIOS["ai"].accepted_annotations
    assert ind["cross_region_task_share"]["value"] == 1.0
    assert 0 < ai["evidence"]["imported_share"] < 1
    assert ind["platform_matched_share"]["value"] > 0
    network = await _get(client, sims["ai"], "network")
    assert sum(e["messages"] for e in network["edges"]) == SCENARIOS["ai"].messages
    # The AI cluster's operator publishes to its members: a vendor reads the type.
    vendor = sims["ai"].actors["he"]
    seen = await client.get(
        f"/v1/clusters/{sims['ai'].cluster_id}/classification", headers=vendor.auth
    )
    assert seen.status_code == 200 and seen.json()["label"] == "virtual_network"
    hidden = await client.get(
        f"/v1/clusters/{sims['software'].cluster_id}/classification",
        headers=sims["software"].actors["games"].auth,
    )
    assert hidden.status_code == 403

    # Contracts in contracted mode count as one contract-equivalent each.
    furniture = await _get(client, sims["furniture"], "indicators")
    f_ind = {i["key"]: i for i in furniture["indicators"]}
    assert f_ind["annotation_volume"]["value"] == SCENARIOS["furniture"].accepted_annotations
    assert f_ind["platform_matched_share"]["value"] == pytest.approx(2.9 / 7.2, abs=1e-6)

    problems, signals = _problems(await _get(client, sims["idle_park"], "diagnostics"))
    assert problems["idle_carriers"]["flagged"] is True
    assert signals["park_occupancy"]["value"] == pytest.approx(3 / 20)
    assert signals["park_occupancy"]["crossed"] is True
    assert signals["dormant_located_share"]["value"] == 1.0

    problems, signals = _problems(await _get(client, sims["loose"], "diagnostics"))
    assert problems["agglomerated_not_clustered"]["flagged"] is True
    assert signals["isolate_share"]["value"] == pytest.approx(5 / 7, abs=1e-6)
    assert signals["giant_component_share"]["crossed"] is True
    assert signals["knowledge_capital_kinds_present"]["value"] == 0
    assert problems["idle_carriers"]["flagged"] is False  # no parks: nothing idle

    # The software cluster shows none of what the problem cases show. (Its seven firms
    # are so densely tied that rewired copies are as clustered as it is: that signal
    # says little on a small dense network, and the test does not lean on it.)
    problems, signals = _problems(await _get(client, sims["software"], "diagnostics"))
    for name in ("isolate_share", "giant_component_share", "knowledge_capital_kinds_present"):
        assert signals[name]["crossed"] is False, (name, signals[name])
    assert signals["isolate_share"]["value"] == 0.0
    assert problems["idle_carriers"]["flagged"] is False

    thin = await _get(client, sims["thin"], "classification")
    assert thin["label"] == "insufficient_evidence" and thin["form"] is None
    missing = " ".join(thin["evidence"]["missing"])
    assert "active members: 2 of 5" in missing
    assert "ties between members: 1 of 4" in missing
    assert "days of data in the window: 3 of 14" in missing


@pytest.mark.slow
def test_onecluster_simulate_drives_a_served_platform(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    """The command, over real HTTP against `onecluster serve` (the redirect URI only has
    to be one the web client registers: the simulator reads the code off the redirect)."""
    with serve_platform(tmp_path, database_url, redis_prefix) as base:
        command = [sys.executable, "-m", "api.cli", "simulate", "--base-url", base]
        command += ["--scenario", "thin", "--scenario", "ai"]
        command += ["--redirect-uri", "http://127.0.0.1:8000/oauth/callback"]
        result = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": cl_" in line)
    assert set(lines) == {"thin", "ai"}
    assert "insufficient_evidence" in lines["thin"]
    assert (
        "virtual_network — virtual network (network space): cross_region_weight_share"
        in (lines["ai"])
    )
