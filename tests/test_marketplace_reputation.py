"""Vendor reputation: its inputs and score from a crafted history, who may read it, and
``min_reputation`` hiding a task from low-reputation firms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from services.marketplace import reputation
from tests.marketplace_support import build_market, claim, open_task
from tests.oauth_flow import bearer


async def _items(gateway: Any, task_id: str, gold: bool) -> list[str]:
    async with gateway.apps["marketplace"].state.db.sessionmaker() as session:
        rows = await session.execute(
            sa.text("SELECT id FROM items WHERE task_id = :t AND gold = :g ORDER BY id"),
            {"t": task_id, "g": gold},
        )
        return [r[0] for r in rows]


async def craft_history(
    gateway: Any,
    task_id: str,
    firm_id: str,
    *,
    gold_right: int = 0,
    gold_wrong: int = 0,
    accepted: int = 0,
    rejected: int = 0,
    submitted: int = 0,
    expired: int = 0,
    released: int = 0,
    live: int = 0,
) -> None:
    """Assignments of ``firm_id``'s annotators on the task's items, one annotator each."""
    from services.marketplace.models import Assignment

    gold_items = await _items(gateway, task_id, True)
    real_items = await _items(gateway, task_id, False)
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []

    def add(item_id: str, status: str, *, gold: bool = False, **extra: Any) -> None:
        ended = extra.pop("past", False) or status != "leased"
        rows.append(
            {
                "id": f"asg_{firm_id[-12:]}{len(rows):014d}",
                "task_id": task_id,
                "item_id": item_id,
                "annotator_id": f"usr_{firm_id[-12:]}{len(rows):014d}",
                "annotator_firm_id": firm_id,
                "gold": gold,
                "status": status,
                "leased_at": now - timedelta(hours=2),
                "expires_at": now - timedelta(hours=1) if ended else now + timedelta(hours=1),
                "gold_correct": None,
                **extra,
            }
        )

    for i in range(gold_right):
        add(gold_items[i % len(gold_items)], "submitted", gold=True, gold_correct=True)
    for i in range(gold_wrong):
        add(gold_items[i % len(gold_items)], "submitted", gold=True, gold_correct=False)
    for status, n in (("accepted", accepted), ("rejected", rejected), ("submitted", submitted)):
        for i in range(n):
            add(real_items[i % len(real_items)], status)
    for i in range(expired):
        add(real_items[i % len(real_items)], "leased", past=True)
    for i in range(released):
        add(real_items[i % len(real_items)], "released")
    for i in range(live):
        add(real_items[i % len(real_items)], "leased")
    async with gateway.apps["marketplace"].state.db.session_scope() as session:
        await session.execute(sa.insert(Assignment), rows)


def smoothed(hits: int, total: int) -> float:
    return (hits + reputation.PRIOR * reputation.PRIOR_WEIGHT) / (total + reputation.PRIOR_WEIGHT)


async def test_inputs_and_score_from_a_crafted_history(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    market = await build_market(client, gateway, tag="rep")
    task = await open_task(client, market, items=5, gold=3, overlap=1)
    sx = market.vendors["sx"]
    await craft_history(
        gateway,
        task["id"],
        sx,
        gold_right=6,
        gold_wrong=2,
        accepted=9,
        rejected=3,
        submitted=2,
        expired=4,
        released=5,
        live=3,
    )
    response = await client.get(f"/v1/firms/{sx}/reputation", headers=bearer(market.owners["sx"]))
    assert response.status_code == 200, response.text
    body = response.json()
    gold = body["gold_accuracy"]
    assert (gold["hits"], gold["total"], gold["value"]) == (6, 8, 0.75)
    acceptance = body["acceptance_rate"]
    assert (acceptance["hits"], acceptance["total"], acceptance["value"]) == (9, 12, 0.75)
    # Submitted in time: 8 gold + 9 + 3 + 2 answers; ended: those and 4 expired leases.
    # Released leases are neither; live ones have not ended.
    on_time = body["on_time"]
    assert (on_time["hits"], on_time["total"]) == (22, 26)
    weights = reputation.WEIGHTS
    expected = (
        weights["gold_accuracy"] * smoothed(6, 8)
        + weights["acceptance_rate"] * smoothed(9, 12)
        + weights["on_time"] * smoothed(22, 26)
    ) / sum(weights.values())
    assert body["score"] == pytest.approx(expected, abs=1e-6)
    assert gold["smoothed"] == pytest.approx(smoothed(6, 8), abs=1e-6)
    assert body["prior"] == 0.7 and body["prior_weight"] == 10
    assert datetime.fromisoformat(body["computed_at"]) <= datetime.now(UTC)

    # A firm with no history stands at the prior: neither 0 nor 1.
    nm = market.vendors["nm"]
    fresh = (
        await client.get(f"/v1/firms/{nm}/reputation", headers=bearer(market.owners["nm"]))
    ).json()
    assert fresh["score"] == pytest.approx(0.7)
    assert fresh["gold_accuracy"]["value"] is None and fresh["on_time"]["total"] == 0


async def test_who_may_read_a_reputation(client: httpx.AsyncClient, gateway: Any) -> None:
    market = await build_market(client, gateway, tag="rv")
    other = await build_market(client, gateway, tag="rv2", vendors={"he": "CN-HE"})
    sx = market.vendors["sx"]
    url = f"/v1/firms/{sx}/reputation"
    # The firm itself (any member), the requester and another vendor of the same cluster.
    for tokens in (market.annotators["sx"][0], market.requester, market.owners["nm"]):
        assert (await client.get(url, headers=bearer(tokens))).status_code == 200
    # A firm that shares no cluster with it, and an unknown firm: 404.
    assert (await client.get(url, headers=bearer(other.owners["he"]))).status_code == 404
    unknown = await client.get(
        "/v1/firms/firm_00000000000000000000000000/reputation", headers=bearer(market.requester)
    )
    assert unknown.status_code == 404
    assert (await client.get(url)).status_code == 401
    # The firm itself is still served by membership.
    firm = await client.get(f"/v1/firms/{sx}", headers=bearer(market.owners["sx"]))
    assert firm.status_code == 200 and firm.json()["name"] == "rv-sx"


async def test_min_reputation_hides_the_task_from_a_low_reputation_firm(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    market = await build_market(
        client, gateway, tag="mr", vendors={"sx": "CN-SX", "nm": "CN-NM", "he": "CN-HE"}
    )
    history = await open_task(client, market, items=5, gold=3, overlap=1)
    good, bad = market.vendors["sx"], market.vendors["nm"]
    # good: 10 right gold answers (score 0.815); bad: 10 wrong ones (0.565); he: new (0.7).
    await craft_history(gateway, history["id"], good, gold_right=10, submitted=10)
    await craft_history(gateway, history["id"], bad, gold_wrong=10, submitted=10)
    task = await open_task(client, market, items=4, overlap=1, eligibility={"min_reputation": 0.72})
    tid = task["id"]
    assert task["eligibility"]["min_reputation"] == 0.72

    for vendor, visible in (("sx", True), ("nm", False), ("he", False)):
        tokens = market.annotators[vendor][0]
        seen = await client.get(f"/v1/tasks/{tid}", headers=bearer(tokens))
        assert seen.status_code == (200 if visible else 404), vendor
        listed = await client.get("/v1/tasks", headers=bearer(tokens))
        assert (tid in {t["id"] for t in listed.json()["items"]}) is visible, vendor
        claimed = await claim(client, tokens, tid, 2)
        assert claimed.status_code == (200 if visible else 404), vendor
        if visible:
            assert len(claimed.json()["assignments"]) == 2
    # The requester still sees its task whatever its own reputation.
    own = await client.get(f"/v1/tasks/{tid}", headers=bearer(market.requester))
    assert own.status_code == 200

    # Bids on a contracted task follow the same rule.
    contracted = await open_task(
        client, market, items=2, allocation="contracted", eligibility={"min_reputation": 0.72}
    )
    body = {"price_per_annotation": 1, "daily_capacity": 5}
    for vendor, status in (("sx", 201), ("nm", 404)):
        placed = await client.post(
            f"/v1/tasks/{contracted['id']}/bids", json=body, headers=bearer(market.owners[vendor])
        )
        assert placed.status_code == status, placed.text
