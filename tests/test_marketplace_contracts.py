"""Contracted allocation: bids, awards, quotas, daily capacity, termination; bad input."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from tests.marketplace_support import Market, build_market, claim, open_task, submit
from tests.oauth_flow import bearer

GOOD = {"label": "positive"}


async def _rows(gateway: Any, sql: str, **params: Any) -> list[Any]:
    async with gateway.apps["marketplace"].state.db.sessionmaker() as session:
        return list((await session.execute(sa.text(sql), params)).all())


async def _execute(gateway: Any, sql: str, **params: Any) -> None:
    async with gateway.apps["marketplace"].state.db.session_scope() as session:
        await session.execute(sa.text(sql), params)


async def contracted_task(
    client: httpx.AsyncClient, market: Market, **overrides: Any
) -> dict[str, Any]:
    overrides.setdefault("items", 10)
    task = await open_task(client, market, allocation="contracted", **overrides)
    assert task["allocation"] == "contracted"
    return task


async def bid(
    client: httpx.AsyncClient, tokens: dict, task_id: str, price: int, capacity: int = 1000
) -> httpx.Response:
    return await client.post(
        f"/v1/tasks/{task_id}/bids",
        json={"price_per_annotation": price, "daily_capacity": capacity, "note": "we can"},
        headers=bearer(tokens),
    )


async def award(
    client: httpx.AsyncClient, tokens: dict, task_id: str, bid_id: str, quota: int
) -> httpx.Response:
    return await client.post(
        f"/v1/tasks/{task_id}/bids/{bid_id}:award", json={"quota": quota}, headers=bearer(tokens)
    )


async def contracted_vendor(
    client: httpx.AsyncClient,
    market: Market,
    task_id: str,
    vendor: str,
    *,
    price: int,
    quota: int,
    capacity: int = 1000,
) -> dict[str, Any]:
    placed = await bid(client, market.owners[vendor], task_id, price, capacity)
    assert placed.status_code == 201, placed.text
    awarded = await award(client, market.requester, task_id, placed.json()["id"], quota)
    assert awarded.status_code == 201, awarded.text
    return dict(awarded.json())


async def claim_all(client: httpx.AsyncClient, tokens: dict, task_id: str) -> list[dict]:
    """Claim until the contract or the work runs out; the leases taken."""
    taken: list[dict] = []
    while True:
        response = await claim(client, tokens, task_id, 3)
        if response.status_code == 409:
            assert response.json()["type"].endswith("/quota-exhausted"), response.text
            return taken
        assert response.status_code == 200, response.text
        batch = response.json()["assignments"]
        if not batch:
            return taken
        taken += batch


async def test_two_vendors_work_a_contracted_task_within_their_quotas(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    market = await build_market(
        client,
        gateway,
        tag="ctr",
        vendors={"sx": "CN-SX", "nm": "CN-NM", "he": "CN-HE"},
        annotators_per_vendor=2,
    )
    task = await contracted_task(client, market, items=10, overlap=2, reward_per_annotation=5)
    tid = task["id"]
    req = bearer(market.requester)

    sx_bid = await bid(client, market.owners["sx"], tid, price=4, capacity=500)
    nm_bid = await bid(client, market.owners["nm"], tid, price=3, capacity=500)
    assert sx_bid.status_code == nm_bid.status_code == 201, sx_bid.text + nm_bid.text
    assert sx_bid.json()["state"] == "pending" and sx_bid.json()["price_per_annotation"] == 4
    # The requester sees every bid, a vendor only its own.
    listed = (await client.get(f"/v1/tasks/{tid}/bids", headers=req)).json()["items"]
    assert {b["vendor_firm_id"] for b in listed} == {market.vendors["sx"], market.vendors["nm"]}
    own = await client.get(f"/v1/tasks/{tid}/bids", headers=bearer(market.owners["sx"]))
    assert [b["id"] for b in own.json()["items"]] == [sx_bid.json()["id"]]

    sx = await award(client, market.requester, tid, sx_bid.json()["id"], 6)
    nm = await award(client, market.requester, tid, nm_bid.json()["id"], 7)
    assert sx.status_code == nm.status_code == 201, sx.text + nm.text
    sx_contract, nm_contract = sx.json(), nm.json()
    assert sx_contract["vendor_firm_id"] == market.vendors["sx"]
    assert (sx_contract["price_per_annotation"], sx_contract["quota"]) == (4, 6)
    assert sx_contract["state"] == "active" and sx_contract["remaining"] == 6
    awarded = await client.get(f"/v1/tasks/{tid}/bids/{sx_bid.json()['id']}", headers=req)
    assert awarded.json()["state"] == "awarded"
    assert awarded.json()["contract_id"] == sx_contract["id"]
    events = await _rows(gateway, "SELECT data FROM outbox WHERE type = 'contract.awarded'")
    payloads = [e[0] if isinstance(e[0], dict) else json.loads(e[0]) for e in events]
    by_contract = {p["contract_id"]: p for p in payloads}
    assert by_contract[sx_contract["id"]]["vendor_region"] == "CN-SX"
    assert by_contract[nm_contract["id"]]["requester_region"] == "CN-BJ"
    assert by_contract[nm_contract["id"]]["quota"] == 7

    # A firm without a contract does not claim.
    outsider = await claim(client, market.annotators["he"][0], tid, 1)
    assert outsider.status_code == 403 and outsider.json()["type"].endswith("/no-contract")

    taken: Counter[str] = Counter()
    for vendor in ("sx", "nm"):
        for tokens in market.annotators[vendor]:
            leases = await claim_all(client, tokens, tid)
            taken[vendor] += len(leases)
            if leases:
                answers = [(a["assignment_id"], GOOD) for a in leases]
                done = await submit(client, tokens, tid, answers)
                assert done.status_code == 200, done.text
    assert taken == {"sx": 6, "nm": 7}
    refused = await claim(client, market.annotators["sx"][0], tid, 1)
    assert refused.status_code == 409
    assert refused.json()["quota"] == 6 and refused.json()["used"] == 6
    rows = await _rows(
        gateway,
        "SELECT annotator_firm_id, contract_id, unit_price, status FROM assignments "
        "WHERE task_id = :t",
        t=tid,
    )
    assert Counter(r[0] for r in rows) == {market.vendors["sx"]: 6, market.vendors["nm"]: 7}
    expected = {
        market.vendors["sx"]: (sx_contract["id"], 4),
        market.vendors["nm"]: (nm_contract["id"], 3),
    }
    for firm, contract_id, unit_price, status in rows:
        assert (contract_id, unit_price) == expected[firm]
        assert status == "submitted"

    view = await client.get(f"/v1/tasks/{tid}/contracts/{sx_contract['id']}", headers=req)
    assert view.json()["used"] == 6 and view.json()["remaining"] == 0
    contracts = await client.get(f"/v1/tasks/{tid}/contracts", headers=req)
    assert {c["id"] for c in contracts.json()["items"]} == {sx_contract["id"], nm_contract["id"]}
    theirs = await client.get(f"/v1/tasks/{tid}/contracts", headers=bearer(market.owners["nm"]))
    assert [c["id"] for c in theirs.json()["items"]] == [nm_contract["id"]]
    await _paid_at_contract_price(client, gateway, market, tid, expected)


async def _paid_at_contract_price(
    client: httpx.AsyncClient,
    gateway: Any,
    market: Market,
    task_id: str,
    expected: dict[str, tuple[str, int]],
) -> None:
    """Accepting the submissions pays each vendor its contract's price per annotation."""
    if "/v1/tasks/{task_id}/submissions:accept" not in gateway.openapi()["paths"]:
        return  # review and the ledger are not part of this build
    ids = await _rows(gateway, "SELECT id FROM assignments WHERE task_id = :t", t=task_id)
    accepted = await client.post(
        f"/v1/tasks/{task_id}/submissions:accept",
        json={"assignment_ids": [r[0] for r in ids]},
        headers=bearer(market.requester),
    )
    assert accepted.status_code == 200, accepted.text
    events = await _rows(gateway, "SELECT data FROM outbox WHERE type = 'payout.settled'")
    paid: Counter[str] = Counter()
    for (data,) in events:
        payload = data if isinstance(data, dict) else json.loads(data)
        if payload["task_id"] == task_id:
            paid[payload["payee_firm_id"]] += payload["amount"]
    sx, nm = market.vendors["sx"], market.vendors["nm"]
    assert expected[sx][1] == 4 and expected[nm][1] == 3
    assert paid == {sx: 6 * 4, nm: 7 * 3}


async def test_daily_capacity_caps_claims_per_utc_day(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    market = await build_market(client, gateway, tag="day", vendors={"sx": "CN-SX"})
    task = await contracted_task(client, market, items=10, overlap=1)
    tid = task["id"]
    contract = await contracted_vendor(client, market, tid, "sx", price=2, quota=8, capacity=3)
    ann = market.annotators["sx"][0]
    first = await claim(client, ann, tid, 5)
    assert first.status_code == 200 and len(first.json()["assignments"]) == 3
    capped = await claim(client, ann, tid, 1)
    assert capped.status_code == 409, capped.text
    assert capped.json()["type"].endswith("/daily-capacity-reached")
    assert int(capped.headers["retry-after"]) <= 86_400 and capped.json()["claimed_today"] == 3
    # A lease given back frees its share of the day.
    released = await client.post(
        f"/v1/tasks/{tid}/assignments:release",
        json={"assignment_ids": [first.json()["assignments"][0]["assignment_id"]]},
        headers=bearer(ann),
    )
    assert released.status_code == 200
    again = await claim(client, ann, tid, 5)
    assert len(again.json()["assignments"]) == 1
    # A new UTC day: yesterday's claims no longer count toward the capacity.
    yesterday = datetime.now(UTC) - timedelta(days=1)
    await _execute(
        gateway, "UPDATE assignments SET leased_at = :y WHERE task_id = :t", y=yesterday, t=tid
    )
    next_day = await claim(client, ann, tid, 5)
    assert len(next_day.json()["assignments"]) == 3
    view = await client.get(
        f"/v1/tasks/{tid}/contracts/{contract['id']}", headers=bearer(market.owners["sx"])
    )
    assert view.json()["used"] == 6 and view.json()["claimed_today"] == 3


async def test_concurrent_annotators_of_one_vendor_claim_exactly_the_quota(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    """Six annotators of one vendor claim at once, over and over: never past the quota."""
    market = await build_market(
        client, gateway, tag="cq", vendors={"sx": "CN-SX"}, annotators_per_vendor=6
    )
    task = await contracted_task(client, market, items=40, overlap=1)
    tid = task["id"]
    await contracted_vendor(client, market, tid, "sx", price=5, quota=17)

    async def claimer(tokens: dict) -> int:
        got = 0
        while True:
            response = await claim(client, tokens, tid, 2)
            if response.status_code == 409:
                return got
            assert response.status_code == 200, response.text
            got += len(response.json()["assignments"])

    counts = await asyncio.gather(*(claimer(t) for t in market.annotators["sx"]))
    assert sum(counts) == 17
    rows = await _rows(gateway, "SELECT count(*) FROM assignments WHERE task_id = :t", t=tid)
    assert rows[0][0] == 17


async def test_terminated_contract_takes_no_claims_but_live_leases_are_answered(
    client: httpx.AsyncClient, gateway: Any
) -> None:
    market = await build_market(client, gateway, tag="term", vendors={"sx": "CN-SX"})
    task = await contracted_task(client, market, items=6, overlap=1)
    tid = task["id"]
    contract = await contracted_vendor(client, market, tid, "sx", price=5, quota=6)
    ann = market.annotators["sx"][0]
    lease = (await claim(client, ann, tid, 1)).json()["assignments"][0]
    url = f"/v1/tasks/{tid}/contracts/{contract['id']}:terminate"
    vendor_try = await client.post(url, headers=bearer(market.owners["sx"]))
    assert vendor_try.status_code == 403
    ended = await client.post(url, headers=bearer(market.requester))
    assert ended.status_code == 200, ended.text
    assert ended.json()["state"] == "terminated" and ended.json()["remaining"] == 0
    assert ended.json()["terminated_at"] is not None
    refused = await claim(client, ann, tid, 1)
    assert refused.status_code == 403 and refused.json()["type"].endswith("/no-contract")
    done = await submit(client, ann, tid, [(lease["assignment_id"], GOOD)])
    assert done.status_code == 200, done.text
    twice = await client.post(url, headers=bearer(market.requester))
    assert twice.status_code == 409 and twice.json()["state"] == "terminated"
    # What the terminated contract used stays promised: 6 items, 1 used, 5 left to award.
    again = await bid(client, market.owners["sx"], tid, 5)
    assert again.status_code == 409  # its awarded bid is still its live bid
    market2 = await build_market(client, gateway, tag="term2", vendors={"nm": "CN-NM"})
    # A firm of another cluster does not see the task at all.
    stranger = await bid(client, market2.owners["nm"], tid, 5)
    assert stranger.status_code == 404


async def test_bids_and_awards_refuse_bad_input(client: httpx.AsyncClient, gateway: Any) -> None:
    market = await build_market(
        client,
        gateway,
        tag="bad",
        vendors={"sx": "CN-SX", "nm": "CN-NM"},
        annotators_per_vendor=1,
    )
    req = bearer(market.requester)
    open_one = await open_task(client, market, items=3)
    on_open = await bid(client, market.owners["sx"], open_one["id"], 1)
    assert on_open.status_code == 409 and on_open.json()["allocation"] == "open"
    assert on_open.json()["type"].endswith("/invalid-state")

    task = await contracted_task(client, market, items=5, overlap=2, reward_per_annotation=5)
    tid = task["id"]
    too_dear = await bid(client, market.owners["sx"], tid, 6)
    assert too_dear.status_code == 422 and too_dear.json()["reward_per_annotation"] == 5
    for body in (
        {"price_per_annotation": 0, "daily_capacity": 1},
        {"price_per_annotation": 1, "daily_capacity": 0},
        {"price_per_annotation": 1, "daily_capacity": 1, "note": "x" * 2001},
        {"price_per_annotation": 1, "daily_capacity": 1, "vendor_firm_id": "f"},
    ):
        response = await client.post(
            f"/v1/tasks/{tid}/bids", json=body, headers=bearer(market.owners["sx"])
        )
        assert response.status_code == 422, body
    # Roles: the requester does not bid on its own task; a vendor's annotator does not bid.
    assert (await bid(client, market.requester, tid, 1)).status_code == 403
    assert (await bid(client, market.annotators["sx"][0], tid, 1)).status_code == 403

    first = await bid(client, market.owners["sx"], tid, 4)
    assert first.status_code == 201
    second = await bid(client, market.owners["sx"], tid, 3)
    assert second.status_code == 409 and second.json()["bid_id"] == first.json()["id"]
    first_url = f"/v1/tasks/{tid}/bids/{first.json()['id']}"
    # Only the bidder withdraws, only the requester declines or awards.
    assert (await client.post(f"{first_url}:withdraw", headers=req)).status_code == 403
    vendor_decline = await client.post(
        f"{first_url}:decline", json={}, headers=bearer(market.owners["sx"])
    )
    assert vendor_decline.status_code == 403
    vendor_award = await award(client, market.owners["sx"], tid, first.json()["id"], 1)
    assert vendor_award.status_code == 403
    annotator_withdraw = await client.post(
        f"{first_url}:withdraw", headers=bearer(market.annotators["sx"][0])
    )
    assert annotator_withdraw.status_code == 403
    withdrawn = await client.post(f"{first_url}:withdraw", headers=bearer(market.owners["sx"]))
    assert withdrawn.status_code == 200 and withdrawn.json()["state"] == "withdrawn"
    again = await client.post(f"{first_url}:withdraw", headers=bearer(market.owners["sx"]))
    assert again.status_code == 409 and again.json()["state"] == "withdrawn"
    late_award = await award(client, market.requester, tid, first.json()["id"], 1)
    assert late_award.status_code == 409

    # After a withdrawal (or a decline) the firm may bid again.
    renewed = await bid(client, market.owners["sx"], tid, 4)
    assert renewed.status_code == 201
    nm_bid = await bid(client, market.owners["nm"], tid, 2)
    declined = await client.post(
        f"/v1/tasks/{tid}/bids/{nm_bid.json()['id']}:decline",
        json={"reason": "too slow"},
        headers=req,
    )
    assert declined.status_code == 200 and declined.json()["decline_reason"] == "too slow"
    nm_again = await bid(client, market.owners["nm"], tid, 2)
    assert nm_again.status_code == 201

    # Quotas may not promise more than items x overlap (5 x 2 = 10).
    over = await award(client, market.requester, tid, renewed.json()["id"], 11)
    assert over.status_code == 409 and over.json()["available"] == 10
    assert over.json()["type"].endswith("/quota-over-capacity")
    seven = await award(client, market.requester, tid, renewed.json()["id"], 7)
    assert seven.status_code == 201
    four = await award(client, market.requester, tid, nm_again.json()["id"], 4)
    assert four.status_code == 409 and four.json()["available"] == 3
    assert (await award(client, market.requester, tid, nm_again.json()["id"], 3)).status_code == 201
    zero = await award(client, market.requester, tid, nm_again.json()["id"], 0)
    assert zero.status_code == 422

    # Foreign ids: another vendor's bid or contract, another task's bid → 404.
    sx_bid_url = f"/v1/tasks/{tid}/bids/{renewed.json()['id']}"
    assert (await client.get(sx_bid_url, headers=bearer(market.owners["nm"]))).status_code == 404
    sx_contract = seven.json()["id"]
    peek = await client.get(
        f"/v1/tasks/{tid}/contracts/{sx_contract}", headers=bearer(market.owners["nm"])
    )
    assert peek.status_code == 404
    elsewhere = await client.get(
        f"/v1/tasks/{open_one['id']}/bids/{renewed.json()['id']}", headers=req
    )
    assert elsewhere.status_code == 404
    stop = await client.post(
        f"/v1/tasks/{tid}/contracts/{sx_contract}:terminate", headers=bearer(market.owners["nm"])
    )
    assert stop.status_code == 404

    # A draft takes no bids (vendors do not see it); a closed task awards nothing.
    draft = await client.post(
        "/v1/tasks",
        json={
            "cluster_id": market.cluster_id,
            "title": "Draft",
            "kind": "single_label",
            "label_schema": {"labels": ["a", "b"]},
            "reward_per_annotation": 3,
            "allocation": "contracted",
        },
        headers=req,
    )
    assert (await bid(client, market.owners["sx"], draft.json()["id"], 1)).status_code == 404
    late = await contracted_task(client, market, items=2)
    pending = await bid(client, market.owners["sx"], late["id"], 1)
    assert (await client.post(f"/v1/tasks/{late['id']}:complete", headers=req)).status_code == 200
    closed = await award(client, market.requester, late["id"], pending.json()["id"], 1)
    assert closed.status_code == 409 and closed.json()["state"] == "completed"
    assert (await bid(client, market.owners["nm"], late["id"], 1)).status_code == 409


async def test_region_rules_apply_to_bids(client: httpx.AsyncClient, gateway: Any) -> None:
    market = await build_market(client, gateway, tag="reg")
    task = await contracted_task(client, market, items=2, eligibility={"regions": ["CN-SX"]})
    assert (await bid(client, market.owners["sx"], task["id"], 1)).status_code == 201
    assert (await bid(client, market.owners["nm"], task["id"], 1)).status_code == 404
