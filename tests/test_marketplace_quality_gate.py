"""The quality gate: annotators below a task's gold accuracy threshold get no more work."""

from __future__ import annotations

import random
from typing import Any

import httpx
import sqlalchemy as sa

from tests.marketplace_support import build_market, claim, open_task, submit, task_body
from tests.oauth_flow import bearer

RIGHT, WRONG = {"label": "negative"}, {"label": "positive"}  # gold answers are "negative"


async def _gold_ids(client: httpx.AsyncClient, tokens: dict, task_id: str) -> set[str]:
    items = await client.get(f"/v1/tasks/{task_id}/items?limit=100", headers=bearer(tokens))
    return {i["id"] for i in items.json()["items"] if i["gold"]}


async def _gold_scores(gateway: Any, task_id: str) -> list[tuple[str, bool | None]]:
    async with gateway.apps["marketplace"].state.db.sessionmaker() as session:
        rows = await session.execute(
            sa.text(
                "SELECT annotator_id, gold_correct FROM assignments "
                "WHERE task_id = :t AND gold = :g AND status = 'submitted'"
            ),
            {"t": task_id, "g": True},
        )
        return [(r[0], None if r[1] is None else bool(r[1])) for r in rows]


async def test_wrong_gold_answers_block_an_annotator_and_right_ones_do_not(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    random.seed(11)  # the gold mix of each claim
    market = await build_market(client, gateway, tag="qg")
    task = await open_task(
        client,
        market,
        items=40,
        gold=12,
        overlap=2,
        gold_rate=0.5,
        min_gold_accuracy=0.75,
        gold_min_answers=3,
    )
    tid = task["id"]
    assert (task["min_gold_accuracy"], task["gold_min_answers"]) == (0.75, 3)
    gold = await _gold_ids(client, market.requester, tid)

    def answers(leases: list[dict], gold_answer: dict) -> list[tuple[str, Any]]:
        return [
            (a["assignment_id"], gold_answer if a["item_id"] in gold else RIGHT) for a in leases
        ]

    async def work(tokens: dict, gold_answer: dict) -> tuple[int, httpx.Response | None]:
        """Claim and answer until refused or out of work: (gold answered, the refusal).

        One batch is always held while the next is claimed, so a refusal finds leases in
        hand, which may still be answered.
        """
        answered = 0
        held: list[dict] = []
        while True:
            response = await claim(client, tokens, tid, 4)
            if response.status_code != 200:
                if held:
                    late = await submit(client, tokens, tid, answers(held, gold_answer))
                    assert late.status_code == 200, late.text
                return answered, response
            batch = response.json()["assignments"]
            if held:
                done = await submit(client, tokens, tid, answers(held, gold_answer))
                assert done.status_code == 200, done.text
                answered += sum(1 for a in held if a["item_id"] in gold)
            if not batch:
                return answered, None
            held = batch

    bad_answered, refusal = await work(market.annotators["sx"][0], WRONG)
    assert refusal is not None, "an annotator with every gold answer wrong was never blocked"
    assert refusal.status_code == 403, refusal.text
    problem = refusal.json()
    assert problem["type"].endswith("/quality-blocked")
    assert problem["accuracy"] == 0.0 and problem["min_gold_accuracy"] == 0.75
    # Judged once three gold answers were in, not before: the last batch added at most 4.
    assert 3 <= problem["gold_answers"] == bad_answered < 3 + 4

    good_answered, none = await work(market.annotators["nm"][0], RIGHT)
    assert none is None and good_answered >= 3  # it ran out of work, never blocked
    scores = await _gold_scores(gateway, tid)
    assert {s for _, s in scores} == {True, False}
    assert sum(1 for _, s in scores if s is True) == good_answered


async def test_gate_is_set_on_a_draft_and_fixed_once_published(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    market = await build_market(client, gateway, tag="qd", vendors={"sx": "CN-SX"})
    req = bearer(market.requester)
    created = await client.post("/v1/tasks", json=task_body(market.cluster_id), headers=req)
    assert created.json()["min_gold_accuracy"] is None
    assert created.json()["gold_min_answers"] == 3
    url = f"/v1/tasks/{created.json()['id']}"
    changed = await client.patch(
        url, json={"min_gold_accuracy": 0.9, "gold_min_answers": 5}, headers=req
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["min_gold_accuracy"], changed.json()["gold_min_answers"]) == (0.9, 5)
    cleared = await client.patch(url, json={"min_gold_accuracy": None}, headers=req)
    assert cleared.json()["min_gold_accuracy"] is None and cleared.json()["gold_min_answers"] == 5
    for bad in ({"min_gold_accuracy": 1.5}, {"gold_min_answers": 0}):
        assert (await client.patch(url, json=bad, headers=req)).status_code == 422
    refused = await client.post(
        "/v1/tasks", json=task_body(market.cluster_id, min_gold_accuracy=-0.1), headers=req
    )
    assert refused.status_code == 422
    published = await open_task(client, market, items=2, min_gold_accuracy=0.5)
    late = await client.patch(
        f"/v1/tasks/{published['id']}", json={"min_gold_accuracy": 0.9}, headers=req
    )
    assert late.status_code == 409
