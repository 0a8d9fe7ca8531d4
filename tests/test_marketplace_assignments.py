"""Open allocation: claim, release, submit; leases that expire with no sweeper; concurrency."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import httpx
import sqlalchemy as sa

from tests.marketplace_support import (
    build_market,
    claim,
    open_task,
    submit,
)
from tests.oauth_flow import bearer

GOOD = {"label": "positive"}


async def _rows(gateway, sql: str, **params: Any) -> list[Any]:
    async with gateway.apps["marketplace"].state.db.sessionmaker() as session:
        return list((await session.execute(sa.text(sql), params)).all())


async def _expire_leases(gateway, task_id: str, annotator_id: str | None = None) -> None:
    """Move the clock for the task's leases: they now ended an hour ago."""
    from datetime import UTC, datetime, timedelta

    from services.marketplace.models import Assignment

    past = datetime.now(UTC) - timedelta(hours=1)
    query = sa.update(Assignment).where(
        Assignment.task_id == task_id, Assignment.status == "leased"
    )
    if annotator_id:
        query = query.where(Assignment.annotator_id == annotator_id)
    async with gateway.apps["marketplace"].state.db.session_scope() as session:
        await session.execute(query.values(expires_at=past))


async def _user_id(client: httpx.AsyncClient, tokens: dict) -> str:
    return (await client.get("/v1/users/me", headers=bearer(tokens))).json()["id"]


async def test_claim_submit_release_and_double_submission(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="cs")
    task = await open_task(client, market, items=3, overlap=1)
    tid = task["id"]
    ann = market.annotators["sx"][0]
    claimed = await claim(client, ann, tid, 2)
    assert claimed.status_code == 200, claimed.text
    leases = claimed.json()["assignments"]
    assert len(leases) == 2 and len({lease["item_id"] for lease in leases}) == 2
    first, second = leases

    events: list[Any] = []

    async def record(envelope: Any) -> None:
        if envelope.type == "assignment.submitted":
            events.append(envelope.data)

    gateway.runtime.bus.subscribe("test-submitted", record, sources=["marketplace"])
    done = await submit(client, ann, tid, [(first["assignment_id"], GOOD)])
    assert done.status_code == 200, done.text
    for _ in range(200):
        if events:
            break
        await asyncio.sleep(0.05)
    assert len(events) == 1
    assert events[0]["assignment_id"] == first["assignment_id"]
    assert events[0]["item_id"] == first["item_id"]
    assert events[0]["annotator_firm_id"] == market.vendors["sx"]
    assert events[0]["annotator_region"] == "CN-SX" and events[0]["gold"] is False
    twice = await submit(client, ann, tid, [(first["assignment_id"], GOOD)])
    assert twice.status_code == 409 and twice.json()["state"] == "submitted"
    dup = await submit(
        client, ann, tid, [(second["assignment_id"], GOOD), (second["assignment_id"], GOOD)]
    )
    assert dup.status_code == 422

    released = await client.post(
        f"/v1/tasks/{tid}/assignments:release",
        json={"assignment_ids": [second["assignment_id"]]},
        headers=bearer(ann),
    )
    assert released.status_code == 200 and released.json()["released"] == 1
    after = await submit(client, ann, tid, [(second["assignment_id"], GOOD)])
    assert after.status_code == 409 and after.json()["state"] == "released"
    again = await client.post(
        f"/v1/tasks/{tid}/assignments:release",
        json={"assignment_ids": [first["assignment_id"]]},
        headers=bearer(ann),
    )
    assert again.status_code == 409 and again.json()["state"] == "submitted"

    # The released item goes to someone else, never back to the one who released it.
    mine = await claim(client, ann, tid, 10)
    third = set(await _item_ids(gateway, tid)) - {first["item_id"], second["item_id"]}
    assert [a["item_id"] for a in mine.json()["assignments"]] == sorted(third)
    other = market.annotators["nm"][0]
    theirs = await claim(client, other, tid, 10)
    assert [a["item_id"] for a in theirs.json()["assignments"]] == [second["item_id"]]

    # Someone else's lease, or an unknown one, is not yours to submit or release.
    foreign = await submit(client, other, tid, [(first["assignment_id"], GOOD)])
    assert foreign.status_code == 404
    unknown = await submit(client, ann, tid, [("asg_00000000000000000000000000", GOOD)])
    assert unknown.status_code == 404


async def _item_ids(gateway, task_id: str) -> list[str]:
    rows = await _rows(
        gateway,
        "SELECT id FROM items WHERE task_id = :t AND gold = :g ORDER BY id",
        t=task_id,
        g=False,
    )
    return [r[0] for r in rows]


async def test_nobody_twice_on_an_item_and_overlap_is_a_ceiling(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="ov", annotators_per_vendor=2)
    task = await open_task(client, market, items=4, overlap=3)
    tid = task["id"]
    a, b = market.annotators["sx"]
    c, d = market.annotators["nm"]
    first = await claim(client, a, tid, 100)
    assert len(first.json()["assignments"]) == 4
    assert (await claim(client, a, tid, 100)).json()["assignments"] == []
    for tokens in (b, c):
        assert len((await claim(client, tokens, tid, 100)).json()["assignments"]) == 4
    # Three live leases per item: the fourth annotator gets nothing.
    assert (await claim(client, d, tid, 100)).json()["assignments"] == []
    # Submitted annotations count as well as live leases.
    leases = (await claim(client, d, tid, 100)).json()["assignments"]
    assert leases == []
    rows = await _rows(
        gateway,
        "SELECT item_id, count(*) FROM assignments WHERE task_id = :t GROUP BY item_id",
        t=tid,
    )
    assert sorted(n for _, n in rows) == [3, 3, 3, 3]


async def test_expired_lease_is_free_for_the_next_claim_without_a_sweeper(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="exp")
    task = await open_task(client, market, items=2, overlap=1)
    tid = task["id"]
    slow, quick = market.annotators["sx"][0], market.annotators["nm"][0]
    held = (await claim(client, slow, tid, 2)).json()["assignments"]
    assert len(held) == 2
    assert (await claim(client, quick, tid, 2)).json()["assignments"] == []

    await _expire_leases(gateway, tid, await _user_id(client, slow))
    taken = (await claim(client, quick, tid, 2)).json()["assignments"]
    assert sorted(a["item_id"] for a in taken) == sorted(a["item_id"] for a in held)
    late = await submit(client, slow, tid, [(held[0]["assignment_id"], GOOD)])
    assert late.status_code == 409 and late.json()["state"] == "expired"
    # The one who let it expire does not get it back either.
    assert (await claim(client, slow, tid, 2)).json()["assignments"] == []
    done = await submit(client, quick, tid, [(a["assignment_id"], GOOD) for a in taken])
    assert done.status_code == 200
    rows = await _rows(gateway, "SELECT submitted, complete FROM items WHERE task_id = :t", t=tid)
    assert [tuple(r) for r in rows] == [(1, True), (1, True)]


async def test_gold_items_are_mixed_in_and_never_revealed(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="gold", annotators_per_vendor=2)
    task = await open_task(client, market, items=30, gold=10, overlap=1, gold_rate=0.5)
    tid = task["id"]
    ann = market.annotators["sx"][0]
    response = await claim(client, ann, tid, 40)
    raw = response.text
    leases = response.json()["assignments"]
    assert "gold" not in raw and "negative" not in raw  # neither the flag nor the answer
    assert all(
        set(lease) == {"assignment_id", "item_id", "input", "expires_at"} for lease in leases
    )
    gold_ids = {
        r[0]
        for r in await _rows(
            gateway, "SELECT id FROM items WHERE task_id = :t AND gold = :g", t=tid, g=True
        )
    }
    handed = {lease["item_id"] for lease in leases}
    assert handed & gold_ids, "the gold rate mixed no gold item into 40 claims"
    assert handed - gold_ids
    # Gold is a check, not work: it is not capped by the overlap, each annotator once.
    other = market.annotators["nm"][0]
    theirs: set[str] = set()
    while batch := (await claim(client, other, tid, 40)).json()["assignments"]:
        theirs |= {a["item_id"] for a in batch}
    assert not (theirs - gold_ids) & (handed - gold_ids)  # overlap 1 on real items
    assert (theirs | handed) - gold_ids == set(await _item_ids(gateway, tid))
    # Gold rides along with real work only: with none left, a claim hands out nothing,
    # though this annotator has seen no gold item yet.
    third = market.annotators["sx"][1]
    assert (await claim(client, third, tid, 40)).json()["assignments"] == []
    # The task view hides gold counts from annotators.
    vendor_view = (await client.get(f"/v1/tasks/{tid}", headers=bearer(ann))).json()
    assert vendor_view["gold_count"] is None and vendor_view["item_count"] == 30


async def test_who_may_claim_and_when(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="when")
    task = await open_task(client, market, items=3, overlap=1)
    tid = task["id"]
    # The requester firm does not annotate its own task.
    own = await claim(client, market.requester, tid, 1)
    assert own.status_code == 403
    ann = market.annotators["sx"][0]
    lease = (await claim(client, ann, tid, 1)).json()["assignments"][0]
    req = bearer(market.requester)
    assert (await client.post(f"/v1/tasks/{tid}:pause", headers=req)).status_code == 200
    paused = await claim(client, ann, tid, 1)
    assert paused.status_code == 409 and paused.json()["state"] == "paused"
    # A lease taken before the pause may still be answered.
    assert (await submit(client, ann, tid, [(lease["assignment_id"], GOOD)])).status_code == 200
    assert (await client.post(f"/v1/tasks/{tid}:resume", headers=req)).status_code == 200
    second = (await claim(client, ann, tid, 1)).json()["assignments"][0]
    assert (await client.post(f"/v1/tasks/{tid}:cancel", headers=req)).status_code == 200
    closed = await submit(client, ann, tid, [(second["assignment_id"], GOOD)])
    assert closed.status_code == 409 and closed.json()["state"] == "cancelled"
    too_many = await claim(client, ann, tid, 101)
    assert too_many.status_code == 422


async def test_concurrent_annotators_finish_every_item_exactly(
    client: httpx.AsyncClient, gateway
) -> None:
    """Many annotators at once, some abandoning leases: exact totals, nothing doubled."""
    items, overlap = 40, 3
    market = await build_market(
        client,
        gateway,
        tag="conc",
        vendors={"sx": "CN-SX", "nm": "CN-NM", "he": "CN-HE"},
        annotators_per_vendor=4,
    )
    task = await open_task(client, market, items=items, overlap=overlap, lease_seconds=3)
    tid = task["id"]
    everyone = [t for tokens in market.annotators.values() for t in tokens]
    rng = random.Random(7)
    abandoned: Counter[str] = Counter()
    stop_at = time.monotonic() + 120

    async def annotate(tokens: dict, abandoner: bool) -> None:
        batch = 0
        while time.monotonic() < stop_at:
            response = await claim(client, tokens, tid, rng.randint(1, 5))
            assert response.status_code == 200, response.text
            leases = response.json()["assignments"]
            if not leases:
                if await _finished(gateway, tid, items):
                    return
                await asyncio.sleep(0.2)  # wait for other leases to end or finish
                continue
            batch += 1
            if abandoner and batch <= 2:
                if batch == 1:
                    abandoned["silent"] += len(leases)  # walk away: the lease must expire
                else:
                    released = await client.post(
                        f"/v1/tasks/{tid}/assignments:release",
                        json={"assignment_ids": [a["assignment_id"] for a in leases]},
                        headers=bearer(tokens),
                    )
                    # On a busy machine the lease may run out first: the item is free
                    # again either way, and releasing it is a 409 ``expired``.
                    if released.status_code == 409:
                        assert released.json()["state"] == "expired", released.text
                        abandoned["ran out"] += len(leases)
                    else:
                        assert released.status_code == 200, released.text
                        abandoned["released"] += len(leases)
                continue
            done = await submit(client, tokens, tid, [(a["assignment_id"], GOOD) for a in leases])
            # A lease may run out while the server is busy: that answer is refused (409)
            # and the item goes to someone else.
            assert done.status_code in (200, 409), done.text

    await asyncio.gather(
        *(annotate(tokens, abandoner=i % 3 == 0) for i, tokens in enumerate(everyone))
    )
    assert await _finished(gateway, tid, items), "work left undone"
    assert abandoned["silent"] and (abandoned["released"] or abandoned["ran out"])

    submitted = await _rows(
        gateway,
        "SELECT item_id, annotator_id FROM assignments WHERE task_id = :t AND status = 'submitted'",
        t=tid,
    )
    assert len(submitted) == items * overlap
    per_item = Counter(item for item, _ in submitted)
    assert set(per_item.values()) == {overlap} and len(per_item) == items
    pairs = await _rows(
        gateway, "SELECT item_id, annotator_id FROM assignments WHERE task_id = :t", t=tid
    )
    assert len(pairs) == len(set(map(tuple, pairs))), "an annotator got an item twice"
    counters = await _rows(gateway, "SELECT submitted FROM items WHERE task_id = :t", t=tid)
    assert {r[0] for r in counters} == {overlap}


async def _finished(gateway, task_id: str, items: int) -> bool:
    rows = await _rows(
        gateway,
        "SELECT count(*) FROM items WHERE task_id = :t AND complete = :c",
        t=task_id,
        c=True,
    )
    return rows[0][0] == items


async def test_a_retried_claim_hands_out_the_same_leases_once(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="retry", vendors={"sx": "CN-SX"})
    task = await open_task(client, market, items=6, overlap=1)
    tid = task["id"]
    headers = {**bearer(market.annotators["sx"][0]), "Idempotency-Key": "claim-1"}
    url = f"/v1/tasks/{tid}/assignments:claim"
    first = await client.post(url, json={"count": 3}, headers=headers)
    again = await client.post(url, json={"count": 3}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and len(first.json()["assignments"]) == 3
    rows = await _rows(gateway, "SELECT count(*) FROM assignments WHERE task_id = :t", t=tid)
    assert rows[0][0] == 3


async def test_the_first_claim_of_a_task_is_announced_once(
    client: httpx.AsyncClient, gateway
) -> None:
    """Metrics measures the time from publication to the first claim: one
    ``task.first_claimed`` per task, even when several annotators claim at once."""
    import json

    market = await build_market(client, gateway, tag="first", annotators_per_vendor=2)
    task = await open_task(client, market, items=20)
    claimers = [t for tokens in market.annotators.values() for t in tokens]
    answers = await asyncio.gather(*(claim(client, t, task["id"], 2) for t in claimers))
    assert all(a.status_code == 200 and a.json()["assignments"] for a in answers)
    again = await claim(client, claimers[0], task["id"], 1)
    assert again.status_code == 200
    found = await _rows(gateway, "SELECT data FROM outbox WHERE type = 'task.first_claimed'")
    assert len(found) == 1
    (data,) = found[0]
    event = json.loads(data) if isinstance(data, str) else data
    assert event["task_id"] == task["id"]
    assert event["claimer_firm_id"] in market.vendors.values()


async def test_claims_and_answers_are_counted_for_operators(
    client: httpx.AsyncClient, gateway
) -> None:
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"gold": "false"}) or 0.0

    market = await build_market(client, gateway, tag="counted")
    task = await open_task(client, market, items=5)
    tokens = market.annotators["sx"][0]
    claimed_before = value("marketplace_assignments_claimed_total")
    submitted_before = value("marketplace_assignments_submitted_total")
    leases = (await claim(client, tokens, task["id"], 3)).json()["assignments"]
    answered = await submit(
        client, tokens, task["id"], [(a["assignment_id"], GOOD) for a in leases]
    )
    assert answered.status_code == 200, answered.text
    refused = await submit(client, tokens, task["id"], [(leases[0]["assignment_id"], GOOD)])
    assert refused.status_code == 409  # a double submission counts nothing
    assert value("marketplace_assignments_claimed_total") - claimed_before == 3
    assert value("marketplace_assignments_submitted_total") - submitted_before == 3
