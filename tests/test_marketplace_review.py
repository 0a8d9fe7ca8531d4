"""Review of submissions: who reviews, the list and its filters, the two request forms,
rejection re-opening items, and the background sweeper that auto-accepts."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from services.kit.settings import Settings
from tests.conftest import make_settings
from tests.marketplace_support import build_market, claim, open_task, owner_of, settle
from tests.oauth_flow import bearer
from tests.test_marketplace_ledger import assert_ledger_balanced, balances, events, rows, work

GOOD = {"label": "positive"}


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Settings:
    """A sweeper that runs every 0.2 s, so tests can wait for it."""
    return make_settings(tmp_path, database_url, redis_prefix, review_sweep_interval=0.2)


def post(client: httpx.AsyncClient, tokens: dict, task_id: str, verb: str, body: Any) -> Any:
    return client.post(f"/v1/tasks/{task_id}/submissions:{verb}", json=body, headers=bearer(tokens))


async def _user_id(client: httpx.AsyncClient, tokens: dict) -> str:
    return str((await client.get("/v1/users/me", headers=bearer(tokens))).json()["id"])


async def test_the_sweeper_accepts_what_the_requester_left_unreviewed(
    client: httpx.AsyncClient, gateway
) -> None:
    from services.marketplace.models import Assignment

    market = await build_market(client, gateway, tag="swp", vendors={"sx": "CN-SX"})
    task = await open_task(client, market, items=3, overlap=1)
    tid = task["id"]
    leases = await work(client, market.annotators["sx"][0], tid, 3)
    reviewed, overdue, waiting = (a["assignment_id"] for a in leases)
    assert (
        await post(client, market.requester, tid, "accept", {"assignment_ids": [reviewed]})
    ).is_success
    # One review period runs out (its clock is moved); the other is still running.
    past = sa.update(Assignment).where(Assignment.id == overdue)
    async with gateway.apps["marketplace"].state.db.session_scope() as session:
        await session.execute(past.values(review_due_at=_ago(5)))
    deadline = time.monotonic() + 20
    while True:
        status = dict(
            await rows(gateway, "SELECT id, status FROM assignments WHERE task_id = :t", t=tid)
        )
        if status[overdue] == "accepted" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert status == {reviewed: "accepted", overdue: "accepted", waiting: "submitted"}
    automatic = [e for e in await events(gateway, "submission.accepted") if e["automatic"]]
    assert [e["assignment_id"] for e in automatic] == [overdue]
    assert await balances(client, market.owners["sx"], market.cluster_id) == {"available": 10}
    await assert_ledger_balanced(gateway)


def _ago(seconds: int) -> Any:
    from services.kit.db import utcnow

    return utcnow() - timedelta(seconds=seconds)


async def test_submission_list_filters_and_pages(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="lst")
    task = await open_task(client, market, items=5, overlap=2)
    tid = task["id"]
    sx_leases = await work(client, market.annotators["sx"][0], tid, 5)
    nm_leases = await work(client, market.annotators["nm"][0], tid, 2)
    req = bearer(market.requester)
    url = f"/v1/tasks/{tid}/submissions"
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(url, params=params, headers=req)).json()
        seen += [s["assignment_id"] for s in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == sorted(a["assignment_id"] for a in sx_leases + nm_leases)
    nm_only = await client.get(url, params={"annotator_firm_id": market.vendors["nm"]}, headers=req)
    assert {s["assignment_id"] for s in nm_only.json()["items"]} == {
        a["assignment_id"] for a in nm_leases
    }
    # Accept by annotator: only that annotator's submitted work.
    nm_user = await _user_id(client, market.annotators["nm"][0])
    by_user = await post(
        client, market.requester, tid, "accept", {"filter": {"annotator_id": nm_user}}
    )
    assert by_user.json()["count"] == 2
    accepted = await client.get(url, params={"status": "accepted"}, headers=req)
    assert {s["assignment_id"] for s in accepted.json()["items"]} == {
        a["assignment_id"] for a in nm_leases
    }
    assert all(s["reviewed_at"] and s["review_due_at"] is None for s in accepted.json()["items"])
    # submitted_before: nothing was submitted before the task existed.
    none = await post(
        client,
        market.requester,
        tid,
        "reject",
        {"filter": {"submitted_before": "2020-01-01T00:00:00Z"}, "reason": "x"},
    )
    assert none.status_code == 200 and none.json()["count"] == 0
    assert (await client.get(url, params={"status": "leased"}, headers=req)).status_code == 422


async def test_who_reviews_and_bad_requests(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="who")
    task = await open_task(client, market, items=2, overlap=1)
    tid = task["id"]
    (lease,) = await work(client, market.annotators["sx"][0], tid, 1)
    aid = lease["assignment_id"]
    one = {"assignment_ids": [aid]}
    _, outsider = await owner_of(
        client,
        "out@who.example",
        {
            "name": "Out",
            "region": "CN-HE",
            "city": "C",
            "actor_type": "university",
            "industries": ["0301"],
        },
    )
    await settle(gateway)
    assert (await post(client, outsider, tid, "accept", one)).status_code == 404
    assert (await post(client, market.owners["nm"], tid, "accept", one)).status_code == 403
    assert (await post(client, market.annotators["sx"][0], tid, "accept", one)).status_code == 403
    unknown = await post(client, market.requester, tid, "accept", {"assignment_ids": ["asg_x"]})
    assert unknown.status_code == 404
    too_many = {"assignment_ids": [f"asg_{i}" for i in range(1001)]}
    assert (await post(client, market.requester, tid, "accept", too_many)).status_code == 422
    both = {"assignment_ids": [aid], "filter": {}}
    assert (await post(client, market.requester, tid, "accept", both)).status_code == 422
    long_reason = {"assignment_ids": [aid], "reason": "x" * 2001}
    assert (await post(client, market.requester, tid, "reject", long_reason)).status_code == 422
    # A live lease is not a submission.
    live = (await claim(client, market.annotators["nm"][0], tid, 1)).json()["assignments"][0]
    leased = await post(
        client, market.requester, tid, "accept", {"assignment_ids": [live["assignment_id"]]}
    )
    assert leased.status_code == 404
    # Nothing changed by any refused call.
    status = await rows(gateway, "SELECT status FROM assignments WHERE id = :i", i=aid)
    assert status[0][0] == "submitted"
    # Reviews go on while the task is paused.
    assert (
        await client.post(f"/v1/tasks/{tid}:pause", headers=bearer(market.requester))
    ).is_success
    assert (await post(client, market.requester, tid, "accept", one)).status_code == 200


async def test_a_rejected_item_is_done_again_and_paid_once_more(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="redo", annotators_per_vendor=2)
    task = await open_task(client, market, items=1, overlap=2, reward_per_annotation=3)
    tid = task["id"]
    a, b = market.annotators["sx"]
    c = market.annotators["nm"][0]
    (first,) = await work(client, a, tid, 1)
    (second,) = await work(client, b, tid, 1)
    assert (await claim(client, c, tid, 1)).json()["assignments"] == []  # overlap reached
    rejected = await post(
        client,
        market.requester,
        tid,
        "reject",
        {"assignment_ids": [first["assignment_id"]], "reason": "wrong label"},
    )
    assert rejected.status_code == 200
    assert (await claim(client, a, tid, 1)).json()["assignments"] == []  # never again for a
    (third,) = await work(client, c, tid, 1)
    done = await post(client, market.requester, tid, "accept", {"filter": {}})
    assert done.json()["count"] == 2 and done.json()["amount"] == 6
    # The whole escrow (3 x 2) went to the two accepted annotations; nothing is left.
    assert (await balances(client, market.requester, market.cluster_id))["escrow"] == 0
    closed = await client.post(f"/v1/tasks/{tid}:complete", headers=bearer(market.requester))
    assert closed.is_success
    (completed,) = await events(gateway, "task.completed")
    assert completed["refunded"] == 0 and completed["accepted_annotations"] == 2
    assert completed["items_finished"] == 1
    assert sorted(completed["vendor_firm_ids"]) == sorted(market.vendors.values())
    assert {second["assignment_id"], third["assignment_id"]} == {
        r[0]
        for r in await rows(
            gateway, "SELECT id FROM assignments WHERE status = 'accepted' AND task_id = :t", t=tid
        )
    }
    await assert_ledger_balanced(gateway)
