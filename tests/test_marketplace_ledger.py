"""The ledger: grants, escrow at publish/import/overlap, payouts, refunds at close,
idempotent and concurrent accepts, statements (pages and CSV).

``assert_ledger_balanced`` checks the double-entry invariants on the database itself
and is used by the concurrency tests too.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any

import httpx
import sqlalchemy as sa

from services.kit.db import Database
from tests.marketplace_support import (
    add_member,
    build_market,
    claim,
    grant_credits,
    open_task,
    owner_of,
    settle,
    submit,
    task_body,
    vendor_profile,
)
from tests.oauth_flow import bearer, client_credentials

GOOD = {"label": "positive"}


async def rows(source: Any, sql: str, **params: Any) -> list[Any]:
    """Rows of the marketplace's database: of a gateway, or a ``Database`` of its own."""
    db = source if isinstance(source, Database) else source.apps["marketplace"].state.db
    async with db.sessionmaker() as session:
        return list((await session.execute(sa.text(sql), params)).all())


async def assert_ledger_balanced(gateway: Any) -> None:
    """Double entry holds: postings and the journal sum to zero, balances are their lines,
    nothing but issuance is negative, and every firm's escrow is its tasks' commitments."""
    unbalanced = await rows(
        gateway,
        "SELECT posting_id, SUM(amount), COUNT(*) FROM ledger_lines GROUP BY posting_id "
        "HAVING SUM(amount) <> 0 OR COUNT(*) < 2",
    )
    assert unbalanced == []
    orphans = await rows(
        gateway,
        "SELECT p.id FROM ledger_postings p LEFT JOIN ledger_lines l ON l.posting_id = p.id "
        "WHERE l.id IS NULL",
    )
    assert orphans == []
    total = await rows(gateway, "SELECT COALESCE(SUM(amount), 0) FROM ledger_lines")
    assert total[0][0] == 0
    negative = await rows(
        gateway, "SELECT id, balance FROM ledger_accounts WHERE kind <> 'issuance' AND balance < 0"
    )
    assert negative == []
    drift = await rows(
        gateway,
        "SELECT a.id, a.balance, COALESCE(SUM(l.amount), 0), a.seq, COUNT(l.id) "
        "FROM ledger_accounts a LEFT JOIN ledger_lines l ON l.account_id = a.id "
        "GROUP BY a.id, a.balance, a.seq "
        "HAVING a.balance <> COALESCE(SUM(l.amount), 0) OR a.seq <> COUNT(l.id)",
    )
    assert drift == []
    last = await rows(
        gateway,
        "SELECT a.id FROM ledger_accounts a JOIN ledger_lines l "
        "ON l.account_id = a.id AND l.seq = a.seq WHERE l.balance_after <> a.balance",
    )
    assert last == []
    escrow = await rows(
        gateway,
        "SELECT a.cluster_id, a.firm_id, a.balance, "
        "(SELECT COALESCE(SUM(t.escrow_outstanding), 0) FROM tasks t "
        " WHERE t.cluster_id = a.cluster_id AND t.requester_firm_id = a.firm_id) "
        "FROM ledger_accounts a WHERE a.kind = 'escrow'",
    )
    assert all(balance == committed for _, _, balance, committed in escrow), escrow
    loose = await rows(
        gateway,
        "SELECT t.id FROM tasks t WHERE t.escrow_outstanding <> 0 AND NOT EXISTS "
        "(SELECT 1 FROM ledger_accounts a WHERE a.kind = 'escrow' "
        " AND a.cluster_id = t.cluster_id AND a.firm_id = t.requester_firm_id)",
    )
    assert loose == []
    assert await rows(gateway, "SELECT id FROM tasks WHERE escrow_outstanding < 0") == []


async def balances(client: httpx.AsyncClient, tokens: dict, cluster_id: str) -> dict[str, int]:
    response = await client.get(
        "/v1/ledger/accounts", params={"cluster_id": cluster_id}, headers=bearer(tokens)
    )
    assert response.status_code == 200, response.text
    return {a["kind"]: a["balance"] for a in response.json()}


async def events(gateway: Any, kind: str) -> list[dict[str, Any]]:
    found = await rows(gateway, "SELECT data FROM outbox WHERE type = :t ORDER BY id", t=kind)
    return [json.loads(d) if isinstance(d, str) else d for (d,) in found]


async def work(
    client: httpx.AsyncClient, tokens: dict, task_id: str, count: int
) -> list[dict[str, Any]]:
    """Claim ``count`` items and answer them all; returns the leases."""
    leases = (await claim(client, tokens, task_id, count)).json()["assignments"]
    assert len(leases) == count
    done = await submit(client, tokens, task_id, [(a["assignment_id"], GOOD) for a in leases])
    assert done.status_code == 200, done.text
    return list(leases)


def review(client: httpx.AsyncClient, tokens: dict, task_id: str, verb: str, **body: Any) -> Any:
    return client.post(f"/v1/tasks/{task_id}/submissions:{verb}", json=body, headers=bearer(tokens))


async def test_only_the_operator_grants_credits(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="gr", vendors={"sx": "CN-SX"}, credits=0)
    cid, sx = market.cluster_id, market.vendors["sx"]
    granted = await grant_credits(client, market.requester, cid, sx, 100)
    assert granted["balance"] == 100 and granted["firm_id"] == sx
    again = await grant_credits(client, market.requester, cid, sx, 50)
    assert again["balance"] == 150

    body = {"cluster_id": cid, "firm_id": sx, "amount": 10}
    url = "/v1/ledger/grants"
    member = await client.post(url, json=body, headers=bearer(market.owners["sx"]))
    assert member.status_code == 403
    clerk = await add_member(
        client, market.requester, market.requester_id, "clerk@gr.example", role="member"
    )
    await settle(gateway)
    assert (await client.post(url, json=body, headers=bearer(clerk))).status_code == 403
    _, outsider = await owner_of(client, "out@gr.example", vendor_profile("out", "CN-HE"))
    await settle(gateway)
    assert (await client.post(url, json=body, headers=bearer(outsider))).status_code == 404
    stranger = {**body, "firm_id": "firm_00000000000000000000000000"}
    refused = await client.post(url, json=stranger, headers=bearer(market.requester))
    assert refused.status_code == 422
    zero = await client.post(url, json={**body, "amount": 0}, headers=bearer(market.requester))
    assert zero.status_code == 422

    # The operator's integrator client with marketplace:write grants; a read-only one not.
    clients = {}
    for name, scope in (("etl", "marketplace:read marketplace:write"), ("ro", "marketplace:read")):
        made = await client.post(
            f"/v1/firms/{market.requester_id}/clients",
            json={"name": name, "scope": scope},
            headers=bearer(market.requester),
        )
        assert made.status_code == 201, made.text
        clients[name] = await client_credentials(
            client, made.json()["client_id"], made.json()["client_secret"]
        )
    assert (await client.post(url, json=body, headers=bearer(clients["etl"]))).status_code == 201
    assert (await client.post(url, json=body, headers=bearer(clients["ro"]))).status_code == 403
    assert await balances(client, clients["ro"], cid) == {"issuance": -160}

    assert await balances(client, market.owners["sx"], cid) == {"available": 160}
    assert await balances(client, market.requester, cid) == {"issuance": -160}
    assert (
        await client.get("/v1/ledger/accounts", headers=bearer(market.annotators["sx"][0]))
    ).status_code == 403
    await assert_ledger_balanced(gateway)


async def test_publish_import_and_overlap_are_escrowed_first(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="esc", vendors={}, credits=29)
    cid, req = market.cluster_id, bearer(market.requester)
    created = await client.post(
        "/v1/tasks", json=task_body(cid, reward_per_annotation=5, overlap=2), headers=req
    )
    tid = created.json()["id"]
    lines = [{"input": {"text": f"r{i}"}} for i in range(3)]
    lines.append({"input": {"text": "g"}, "gold": True, "answer": {"label": "negative"}})
    assert (await client.post(f"/v1/tasks/{tid}/items", json=lines, headers=req)).is_success

    short = await client.post(f"/v1/tasks/{tid}:publish", headers=req)
    assert short.status_code == 409, short.text
    problem = short.json()
    assert problem["type"].endswith("/insufficient-funds")
    assert (problem["needed"], problem["available"]) == (30, 29)  # gold is not paid for
    assert (await client.get(f"/v1/tasks/{tid}", headers=req)).json()["state"] == "draft"
    assert await balances(client, market.requester, cid) == {"issuance": -29, "available": 29}

    await grant_credits(client, market.requester, cid, market.requester_id, 1)
    published = await client.post(f"/v1/tasks/{tid}:publish", headers=req)
    assert published.status_code == 200, published.text
    mine = await balances(client, market.requester, cid)
    assert (mine["available"], mine["escrow"]) == (0, 30)

    more = [{"input": {"text": f"n{i}"}} for i in range(2)]
    refused = await client.post(f"/v1/tasks/{tid}/items", json=more, headers=req)
    assert refused.status_code == 409 and refused.json()["needed"] == 20
    assert (await client.get(f"/v1/tasks/{tid}", headers=req)).json()["item_count"] == 3
    await grant_credits(client, market.requester, cid, market.requester_id, 20)
    assert (await client.post(f"/v1/tasks/{tid}/items", json=more, headers=req)).is_success
    assert (await balances(client, market.requester, cid))["escrow"] == 50

    patch = f"/v1/tasks/{tid}"
    raised = await client.patch(patch, json={"overlap": 3}, headers=req)
    assert raised.status_code == 409 and raised.json()["needed"] == 25
    await grant_credits(client, market.requester, cid, market.requester_id, 25)
    raised = await client.patch(patch, json={"overlap": 3}, headers=req)
    assert raised.status_code == 200 and raised.json()["overlap"] == 3
    assert await balances(client, market.requester, cid) == {
        "issuance": -75,
        "available": 0,
        "escrow": 75,
    }
    lowered = await client.patch(patch, json={"overlap": 2}, headers=req)
    assert lowered.status_code == 409 and lowered.json()["state"] == "open"
    renamed = await client.patch(patch, json={"title": "Other"}, headers=req)
    assert renamed.status_code == 409
    await assert_ledger_balanced(gateway)


async def test_accept_pays_the_annotator_firm_and_reject_reopens_the_item(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="rev")
    cid, req = market.cluster_id, market.requester
    task = await open_task(client, market, items=3, overlap=1, reward_per_annotation=7)
    tid = task["id"]
    sx, nm = market.annotators["sx"][0], market.annotators["nm"][0]
    first, second, third = await work(client, sx, tid, 3)

    listed = await client.get(f"/v1/tasks/{tid}/submissions", headers=bearer(req))
    assert listed.status_code == 200
    subs = listed.json()["items"]
    assert {s["status"] for s in subs} == {"submitted"} and len(subs) == 3
    assert all(s["answer"] == GOOD and s["review_due_at"] for s in subs)

    # Who may review: the requester's admins; a vendor that sees the task 403.
    vendor_try = await review(client, sx, tid, "accept", assignment_ids=[first["assignment_id"]])
    assert vendor_try.status_code == 403
    seen = await client.get(f"/v1/tasks/{tid}/submissions", headers=bearer(market.owners["nm"]))
    assert seen.status_code == 403

    accepted = await review(client, req, tid, "accept", assignment_ids=[first["assignment_id"]])
    assert accepted.status_code == 200, accepted.text
    result = accepted.json()
    assert (result["count"], result["amount"]) == (1, 7)
    assert [(p["firm_id"], p["amount"], p["annotations"]) for p in result["payouts"]] == [
        (market.vendors["sx"], 7, 1)
    ]
    assert await balances(client, market.owners["sx"], cid) == {"available": 7}
    assert (await balances(client, req, cid))["escrow"] == 21 - 7
    assert await balances(client, market.owners["nm"], cid) == {}

    rejected = await review(
        client, req, tid, "reject", assignment_ids=[second["assignment_id"]], reason="off topic"
    )
    assert rejected.status_code == 200 and rejected.json()["count"] == 1
    assert (await balances(client, req, cid))["escrow"] == 14  # kept for the re-do
    # The item is open again: not for the one rejected, but for someone else.
    assert (await claim(client, sx, tid, 3)).json()["assignments"] == []
    redo = (await claim(client, nm, tid, 3)).json()["assignments"]
    assert [a["item_id"] for a in redo] == [second["item_id"]]

    # Reviewed already: an id list is all or nothing (409 with the state), no change.
    both = [first["assignment_id"], third["assignment_id"]]
    twice = await review(client, req, tid, "accept", assignment_ids=both)
    assert twice.status_code == 409 and twice.json()["state"] == "accepted"
    again = await review(
        client, req, tid, "reject", assignment_ids=[second["assignment_id"]], reason="x"
    )
    assert again.status_code == 409 and again.json()["state"] == "rejected"
    pending = await client.get(
        f"/v1/tasks/{tid}/submissions", params={"status": "submitted"}, headers=bearer(req)
    )
    assert [s["assignment_id"] for s in pending.json()["items"]] == [third["assignment_id"]]
    no_reason = await review(client, req, tid, "reject", assignment_ids=both, reason="  ")
    assert no_reason.status_code == 422
    neither = await client.post(f"/v1/tasks/{tid}/submissions:accept", json={}, headers=bearer(req))
    assert neither.status_code == 422
    # The filter form takes what is still submitted and skips the rest.
    by_firm = await review(
        client, req, tid, "accept", filter={"annotator_firm_id": market.vendors["sx"]}
    )
    assert by_firm.json()["count"] == 1 and by_firm.json()["amount"] == 7

    accepted_events = await events(gateway, "submission.accepted")
    assert sorted(e["assignment_id"] for e in accepted_events) == sorted(
        [first["assignment_id"], third["assignment_id"]]
    )
    assert all(e["amount"] == 7 and e["annotator_region"] == "CN-SX" for e in accepted_events)
    assert not any(e["automatic"] for e in accepted_events)
    payouts = await events(gateway, "payout.settled")
    assert [(p["payee_firm_id"], p["amount"], p["annotations"]) for p in payouts] == [
        (market.vendors["sx"], 7, 1),
        (market.vendors["sx"], 7, 1),
    ]
    rejections = await events(gateway, "submission.rejected")
    assert [(e["assignment_id"], e["reason"]) for e in rejections] == [
        (second["assignment_id"], "off topic")
    ]
    item = await rows(
        gateway, "SELECT submitted, complete FROM items WHERE id = :i", i=second["item_id"]
    )
    assert tuple(item[0]) == (0, False)
    await assert_ledger_balanced(gateway)


async def test_batch_accept_pays_each_firm_once_and_gold_is_not_paid(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="bat")
    task = await open_task(client, market, items=4, gold=4, overlap=2, gold_rate=0.5)
    tid = task["id"]
    leases = await work(client, market.annotators["sx"][0], tid, 4)
    leases += await work(client, market.annotators["nm"][0], tid, 4)
    gold_ids = {
        r[0]
        for r in await rows(
            gateway, "SELECT id FROM assignments WHERE task_id = :t AND gold = :g", t=tid, g=True
        )
    }
    real = [a["assignment_id"] for a in leases if a["assignment_id"] not in gold_ids]
    listed = await client.get(f"/v1/tasks/{tid}/submissions", headers=bearer(market.requester))
    assert {s["assignment_id"] for s in listed.json()["items"]} == set(real)
    if gold_ids:
        checked = await review(
            client, market.requester, tid, "accept", assignment_ids=[sorted(gold_ids)[0]]
        )
        assert checked.status_code == 409
    everything = await review(client, market.requester, tid, "accept", filter={})
    result = everything.json()
    assert result["count"] == len(real) and result["amount"] == 5 * len(real)
    per_firm = {p["firm_id"]: p["annotations"] for p in result["payouts"]}
    firms = await rows(
        gateway,
        "SELECT annotator_firm_id, COUNT(*) FROM assignments WHERE task_id = :t "
        "AND status = 'accepted' GROUP BY annotator_firm_id",
        t=tid,
    )
    assert per_firm == {firm: n for firm, n in firms}
    assert len(await events(gateway, "payout.settled")) == len(per_firm)
    assert len(await events(gateway, "submission.accepted")) == len(real)
    await assert_ledger_balanced(gateway)


async def test_auto_accept_after_the_review_period(client: httpx.AsyncClient, gateway) -> None:
    from datetime import timedelta

    from services.kit.db import utcnow
    from services.marketplace.review import accept_due

    market = await build_market(client, gateway, tag="auto", vendors={"sx": "CN-SX"})
    task = await open_task(client, market, items=3, overlap=1, review_period_seconds=60)
    tid = task["id"]
    early, late, kept = await work(client, market.annotators["sx"][0], tid, 3)
    db = gateway.apps["marketplace"].state.db
    async with db.session_scope() as session:
        assert await accept_due(session, utcnow(), 100) == 0  # nothing is due yet
    async with db.session_scope() as session:
        done = await accept_due(session, utcnow() + timedelta(seconds=61), 2)
    assert done == 2
    statuses = dict(
        await rows(gateway, "SELECT id, status FROM assignments WHERE task_id = :t", t=tid)
    )
    assert sorted(statuses.values()) == ["accepted", "accepted", "submitted"]
    automatic = await events(gateway, "submission.accepted")
    assert len(automatic) == 2 and all(e["automatic"] for e in automatic)
    assert await balances(client, market.owners["sx"], market.cluster_id) == {"available": 10}

    # The last one's period has run out too: it can no longer be rejected (409, accepted).
    left = next(i for i, s in statuses.items() if s == "submitted")
    await _overdue(gateway, left)
    refused = await review(
        client, market.requester, tid, "reject", assignment_ids=[left], reason="late"
    )
    assert refused.status_code == 409 and refused.json()["state"] == "accepted"
    # A rejection by filter accepts what is due (lazily) and rejects nothing else.
    by_filter = await review(client, market.requester, tid, "reject", filter={}, reason="no")
    assert by_filter.status_code == 200 and by_filter.json()["count"] == 0
    assert (await rows(gateway, "SELECT status FROM assignments WHERE id = :i", i=left))[0][
        0
    ] == "accepted"
    assert await balances(client, market.owners["sx"], market.cluster_id) == {"available": 15}
    assert {early["assignment_id"], late["assignment_id"], kept["assignment_id"]} == set(statuses)
    await assert_ledger_balanced(gateway)


async def _overdue(gateway: Any, assignment_id: str) -> None:
    from datetime import timedelta

    from services.kit.db import utcnow
    from services.marketplace.models import Assignment

    async with gateway.apps["marketplace"].state.db.session_scope() as session:
        await session.execute(
            sa.update(Assignment)
            .where(Assignment.id == assignment_id)
            .values(review_due_at=utcnow() - timedelta(seconds=1))
        )


async def test_complete_and_cancel_refund_the_unspent_rest(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="close", vendors={"sx": "CN-SX"}, credits=1000)
    cid, req = market.cluster_id, market.requester
    task = await open_task(client, market, items=3, overlap=2)  # 5 x 2 x 3 = 30
    tid = task["id"]
    ann = market.annotators["sx"][0]
    paid, pending = await work(client, ann, tid, 2)
    lapsing = (await claim(client, ann, tid, 1)).json()["assignments"][0]
    await review(client, req, tid, "accept", assignment_ids=[paid["assignment_id"]])
    assert await balances(client, req, cid) == {"issuance": -1000, "available": 970, "escrow": 25}

    closed = await client.post(f"/v1/tasks/{tid}:complete", headers=bearer(req))
    assert closed.status_code == 200
    # One submission awaits review: its 5 stay in escrow, the other 20 come back.
    assert await balances(client, req, cid) == {"issuance": -1000, "available": 990, "escrow": 5}
    late = await submit(client, ann, tid, [(lapsing["assignment_id"], GOOD)])
    assert late.status_code == 409
    (completed,) = await events(gateway, "task.completed")
    assert (completed["outcome"], completed["refunded"]) == ("completed", 20)
    assert completed["accepted_annotations"] == 1
    assert completed["vendor_firm_ids"] == [market.vendors["sx"]]
    # Rejected after the close: there is no re-do, so its price goes back too.
    rejected = await review(
        client, req, tid, "reject", assignment_ids=[pending["assignment_id"]], reason="wrong"
    )
    assert rejected.status_code == 200 and rejected.json()["refunded"] == 5
    assert await balances(client, req, cid) == {"issuance": -1000, "available": 995, "escrow": 0}

    other = await open_task(client, market, items=2, overlap=1)
    assert (await balances(client, req, cid))["escrow"] == 10
    assert (await client.post(f"/v1/tasks/{other['id']}:cancel", headers=bearer(req))).is_success
    assert await balances(client, req, cid) == {"issuance": -1000, "available": 995, "escrow": 0}
    cancelled = (await events(gateway, "task.completed"))[-1]
    assert (cancelled["outcome"], cancelled["refunded"]) == ("cancelled", 10)
    await assert_ledger_balanced(gateway)


async def test_a_retried_or_concurrent_accept_pays_once(client: httpx.AsyncClient, gateway) -> None:
    market = await build_market(client, gateway, tag="once", vendors={"sx": "CN-SX"})
    task = await open_task(client, market, items=6, overlap=1)
    tid = task["id"]
    leases = await work(client, market.annotators["sx"][0], tid, 6)
    ids = [a["assignment_id"] for a in leases]
    url = f"/v1/tasks/{tid}/submissions:accept"
    keyed = {**bearer(market.requester), "Idempotency-Key": "accept-batch-1"}
    first = await client.post(url, json={"assignment_ids": ids[:3]}, headers=keyed)
    retry = await client.post(url, json={"assignment_ids": ids[:3]}, headers=keyed)
    assert first.status_code == retry.status_code == 200
    assert retry.headers.get("idempotent-replayed") == "true"
    assert retry.json() == first.json()

    racing = await asyncio.gather(
        *(
            client.post(url, json={"assignment_ids": ids[3:]}, headers=bearer(market.requester))
            for _ in range(6)
        )
    )
    codes = sorted(r.status_code for r in racing)
    assert codes == [200] + [409] * 5, [r.text for r in racing]
    sx = await balances(client, market.owners["sx"], market.cluster_id)
    assert sx == {"available": 30}
    settled = await rows(gateway, "SELECT COUNT(*) FROM ledger_settlements WHERE kind = 'payout'")
    assert settled[0][0] == 6
    await assert_ledger_balanced(gateway)


async def test_statements_page_newest_first_and_export_as_csv(
    client: httpx.AsyncClient, gateway
) -> None:
    market = await build_market(client, gateway, tag="stm", vendors={"sx": "CN-SX"}, credits=0)
    cid, sx = market.cluster_id, market.vendors["sx"]
    for amount in (1, 2, 3, 4, 5):
        await grant_credits(client, market.requester, cid, sx, amount)
    owner = bearer(market.owners["sx"])
    (account,) = (
        await client.get("/v1/ledger/accounts", params={"cluster_id": cid}, headers=owner)
    ).json()
    url = f"/v1/ledger/accounts/{account['id']}/entries"
    seen: list[tuple[int, int]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(url, params=params, headers=owner)).json()
        seen += [(e["amount"], e["balance_after"]) for e in page["items"]]
        assert all(e["kind"] == "grant" for e in page["items"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == [(5, 15), (4, 10), (3, 6), (2, 3), (1, 1)]

    exported = await client.get(url, params={"format": "csv"}, headers=owner)
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(int(r["amount"]), int(r["balance_after"])) for r in table] == seen

    # Only the owning firm's owners and admins read it.
    assert (await client.get(url, headers=bearer(market.requester))).status_code == 404
    annotator = bearer(market.annotators["sx"][0])
    assert (await client.get(url, headers=annotator)).status_code == 403
    issuance = (
        await client.get(
            "/v1/ledger/accounts", params={"cluster_id": cid}, headers=bearer(market.requester)
        )
    ).json()
    assert [(a["kind"], a["balance"]) for a in issuance] == [("issuance", -15)]
    await assert_ledger_balanced(gateway)
