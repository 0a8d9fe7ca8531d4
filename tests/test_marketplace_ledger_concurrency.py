"""The ledger stays balanced under real concurrency.

Many clients at once publish (some short of funds until a grant lands), import, raise
overlaps, claim, submit, release, accept, reject, sweep, complete and cancel, and retry
requests with the same ``Idempotency-Key``. Afterwards the double-entry invariants hold
(``assert_ledger_balanced``), every accepted annotation is paid exactly once, vendors
hold exactly their payouts, and the issuance account is minus every distinct grant.

Runs in-process on the embedded default (small) and on PostgreSQL (larger), and across
real sockets against a served ``onecluster serve`` on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.kit.db import Database, utcnow
from tests.conftest import PG_URL, requires_postgres
from tests.marketplace_support import Market, build_market, grant_credits, task_body
from tests.oauth_flow import bearer
from tests.served import serve_platform
from tests.test_marketplace_ledger import assert_ledger_balanced, rows

GOOD = {"label": "positive"}
REWARD, OVERLAP, ITEMS = 3, 2, 6
PER_TASK = REWARD * OVERLAP * ITEMS


@dataclass
class Workload:
    client: httpx.AsyncClient
    market: Market
    rng: random.Random
    rounds: int
    sweep: Callable[[], Awaitable[int]] | None = None
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    problems: Counter[tuple[str, str]] = field(default_factory=Counter)
    granted: int = 0
    task_ids: list[str] = field(default_factory=list)

    async def call(self, name: str, method: str, url: str, tokens: dict, **kw: Any) -> Any:
        headers = {**bearer(tokens), **kw.pop("headers", {})}
        response = await self.client.request(method, url, headers=headers, **kw)
        self.statuses[(name, response.status_code)] += 1
        assert response.status_code < 500, f"{name}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            self.problems[(name, response.json()["type"].rsplit("/", 1)[-1])] += 1
        return response

    async def open_tasks(self, tokens: dict) -> list[str]:
        params = {"cluster_id": self.market.cluster_id, "state": "open", "limit": 100}
        got = await self.call("tasks", "GET", "/v1/tasks", tokens, params=params)
        return [t["id"] for t in got.json()["items"]]


async def run_workload(w: Workload, *, tasks: int, starting_credits: int) -> None:
    """Drive every kind of ledger change at once; returns when all workers are done."""
    market, req = w.market, w.market.requester
    await grant_credits(w.client, req, market.cluster_id, market.requester_id, starting_credits)
    w.granted += starting_credits
    for _ in range(tasks):
        body = task_body(market.cluster_id, reward_per_annotation=REWARD, overlap=OVERLAP)
        created = await w.call("create", "POST", "/v1/tasks", req, json=body)
        assert created.status_code == 201, created.text
        tid = created.json()["id"]
        lines = [{"input": {"text": f"t{i}"}} for i in range(ITEMS)]
        imported = await w.call("import", "POST", f"/v1/tasks/{tid}/items", req, json=lines)
        assert imported.status_code == 200
        w.task_ids.append(tid)
    annotators = [t for tokens in market.annotators.values() for t in tokens]
    short = asyncio.Event()  # a publish was refused for want of credits
    annotated = asyncio.Event()  # every annotator has done its rounds
    reviewed = asyncio.Event()  # reviews are under way: time to close tasks

    async def publisher() -> None:
        try:
            await publish_all()
        finally:
            short.set()  # the granter never waits on a shortage that can no longer come

    async def publish_all() -> None:
        pending = list(w.task_ids)
        for attempt in range(100):
            if not pending:
                return
            tid = pending[attempt % len(pending)]
            key = {"Idempotency-Key": f"publish-{tid}-{attempt}"}
            url = f"/v1/tasks/{tid}:publish"
            answers = await asyncio.gather(
                w.call("publish", "POST", url, req, headers=key),
                w.call("publish", "POST", url, req, headers=key),
            )
            codes = {a.status_code for a in answers}
            if any(a.status_code == 409 and "needed" in a.json() for a in answers):
                short.set()
            if 200 in codes or any("state" in a.json() for a in answers):
                pending.remove(tid)
            await asyncio.sleep(0.05)

    async def granter() -> None:
        await short.wait()
        for n in range(tasks + 2):
            await asyncio.sleep(0.2)
            key = {"Idempotency-Key": f"grant-{n}"}
            body = {
                "cluster_id": market.cluster_id,
                "firm_id": market.requester_id,
                "amount": PER_TASK,
            }
            answers = await asyncio.gather(
                *(
                    w.call("grant", "POST", "/v1/ledger/grants", req, json=body, headers=key)
                    for _ in range(3)
                )
            )
            # One runs; the others wait their turn (409 in progress) or replay its answer.
            assert {a.status_code for a in answers} <= {201, 409}
            assert any(a.status_code == 201 for a in answers)
            w.granted += PER_TASK

    async def annotator(tokens: dict) -> None:
        for _ in range(w.rounds):
            live = await w.open_tasks(tokens)
            if not live:
                await asyncio.sleep(0.05)
                continue
            tid = w.rng.choice(live)
            got = await w.call(
                "claim",
                "POST",
                f"/v1/tasks/{tid}/assignments:claim",
                tokens,
                json={"count": w.rng.randint(1, 3)},
            )
            if got.status_code != 200:
                continue
            ids = [a["assignment_id"] for a in got.json()["assignments"]]
            if not ids:
                continue
            if w.rng.random() < 0.2:
                await w.call(
                    "release",
                    "POST",
                    f"/v1/tasks/{tid}/assignments:release",
                    tokens,
                    json={"assignment_ids": ids},
                )
                continue
            await w.call(
                "submit",
                "POST",
                f"/v1/tasks/{tid}/assignments:submit",
                tokens,
                json={"answers": [{"assignment_id": a, "answer": GOOD} for a in ids]},
            )

    async def annotating() -> None:
        try:
            await asyncio.gather(*(annotator(t) for t in annotators))
        finally:
            annotated.set()

    async def reviewer(index: int) -> None:
        try:
            await review_rounds(index)
        finally:
            reviewed.set()  # even when the last rounds found nothing left to review

    async def review_rounds(index: int) -> None:
        # Reviews race with claims and submissions for as long as annotators work.
        n = -1
        while (n := n + 1) < w.rounds or not annotated.is_set():
            if n >= w.rounds // 2:
                reviewed.set()
            tid = w.rng.choice(w.task_ids)
            listed = await w.call(
                "list",
                "GET",
                f"/v1/tasks/{tid}/submissions",
                req,
                params={"status": "submitted", "limit": 10},
            )
            ids = [s["assignment_id"] for s in listed.json()["items"]]
            if not ids:
                await asyncio.sleep(0.05)
                continue
            chosen = w.rng.sample(ids, w.rng.randint(1, len(ids)))
            verb = "reject" if w.rng.random() < 0.3 else "accept"
            body: dict[str, Any] = {"assignment_ids": chosen}
            if verb == "reject":
                body["reason"] = "does not match the instructions"
            if w.rng.random() < 0.2:
                body = {"filter": {}, **({"reason": "batch"} if verb == "reject" else {})}
            key = {"Idempotency-Key": f"review-{index}-{n}"}
            url = f"/v1/tasks/{tid}/submissions:{verb}"
            # The same request twice at once (a retry racing the original): paid once.
            await asyncio.gather(
                w.call(verb, "POST", url, req, json=body, headers=key),
                w.call(verb, "POST", url, req, json=body, headers=key),
            )

    async def changer() -> None:
        for n in range(w.rounds // 3):
            live = await w.open_tasks(req)
            if live:
                tid = w.rng.choice(live)
                more = [{"input": {"text": f"late {n}"}}]
                await w.call("import", "POST", f"/v1/tasks/{tid}/items", req, json=more)
                if n == 2:
                    await w.call("overlap", "PATCH", f"/v1/tasks/{tid}", req, json={"overlap": 3})
            await asyncio.sleep(0.1)

    async def closer() -> None:
        await reviewed.wait()
        for verb, tid in (("complete", w.task_ids[0]), ("cancel", w.task_ids[-1])):
            key = {"Idempotency-Key": f"{verb}-{tid}"}
            await asyncio.gather(
                w.call(verb, "POST", f"/v1/tasks/{tid}:{verb}", req, headers=key),
                w.call(verb, "POST", f"/v1/tasks/{tid}:{verb}", req, headers=key),
            )
            await asyncio.sleep(0.5)

    async def sweeper() -> None:
        if w.sweep is None:
            return
        for _ in range(w.rounds // 2):
            await w.sweep()
            await asyncio.sleep(0.1)

    await asyncio.gather(
        publisher(),
        granter(),
        changer(),
        closer(),
        sweeper(),
        reviewer(0),
        reviewer(1),
        annotating(),
    )
    # Everything still awaiting review is accepted in the end, so payouts can be counted.
    for tid in w.task_ids:
        done = await w.call(
            "accept", "POST", f"/v1/tasks/{tid}/submissions:accept", req, json={"filter": {}}
        )
        assert done.status_code == 200


async def assert_paid_exactly(source: Any, w: Workload) -> None:
    """Accepted annotations are each paid once, vendors hold exactly their payouts,
    and the issuance account is minus every distinct grant."""
    await assert_ledger_balanced(source)
    unpaid = await rows(
        source,
        "SELECT a.id FROM assignments a LEFT JOIN ledger_settlements s "
        "ON s.assignment_id = a.id AND s.kind = 'payout' "
        "WHERE a.status = 'accepted' AND s.assignment_id IS NULL",
    )
    assert unpaid == []
    wrongly_paid = await rows(
        source,
        "SELECT s.assignment_id FROM ledger_settlements s JOIN assignments a "
        "ON a.id = s.assignment_id WHERE s.kind = 'payout' AND a.status <> 'accepted'",
    )
    assert wrongly_paid == []
    vendors = await rows(
        source,
        "SELECT a.firm_id, a.balance, "
        "(SELECT COALESCE(SUM(s.amount), 0) FROM ledger_settlements s "
        " JOIN assignments x ON x.id = s.assignment_id "
        " WHERE s.kind = 'payout' AND x.annotator_firm_id = a.firm_id) "
        "FROM ledger_accounts a WHERE a.kind = 'available' AND a.firm_id <> :r",
        r=w.market.requester_id,
    )
    assert vendors and all(balance == paid for _, balance, paid in vendors), vendors
    issuance = await rows(source, "SELECT balance FROM ledger_accounts WHERE kind = 'issuance'")
    assert [b for (b,) in issuance] == [-w.granted]
    accepted = await rows(source, "SELECT COUNT(*) FROM assignments WHERE status = 'accepted'")
    assert accepted[0][0] > 0
    assert w.problems[("publish", "insufficient-funds")] > 0, "publishing never ran short"
    assert w.statuses[("publish", 200)] >= 2


async def test_ledger_invariants_under_concurrent_clients(
    client: httpx.AsyncClient, gateway
) -> None:
    from services.marketplace.review import accept_due

    big = PG_URL is not None
    market = await build_market(
        client,
        gateway,
        tag="lcc",
        vendors={"sx": "CN-SX", "nm": "CN-NM", "he": "CN-HE"},
        annotators_per_vendor=3 if big else 2,
        credits=0,
    )
    db: Database = gateway.apps["marketplace"].state.db

    async def sweep() -> int:
        async with db.session_scope() as session:  # as if every review period ran out
            return await accept_due(session, utcnow() + timedelta(days=31), 5)

    w = Workload(client, market, random.Random(11), rounds=30 if big else 12, sweep=sweep)
    await run_workload(w, tasks=6 if big else 4, starting_credits=PER_TASK)
    await assert_paid_exactly(gateway, w)


@pytest.fixture
def server(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Iterator[str]:
    unlimited = {
        "ONECLUSTER_WEB_REDIRECT_URIS": '["http://testserver/cb"]',
        "ONECLUSTER_RATE_LIMIT_PER_MINUTE": "100000",
        "ONECLUSTER_FIRM_RATE_LIMIT_PER_MINUTE": "100000",
    }
    with serve_platform(tmp_path, database_url, redis_prefix, unlimited) as base:
        yield base


@requires_postgres
@pytest.mark.slow
async def test_ledger_invariants_over_http_on_a_served_platform(
    server: str, database_url: str
) -> None:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
        market = await build_market(
            client,
            None,
            tag="lsv",
            vendors={"sx": "CN-SX", "nm": "CN-NM"},
            annotators_per_vendor=3,
            credits=0,
        )
        await _until_everyone_sees_the_cluster(client, market)
        w = Workload(client, market, random.Random(5), rounds=25)
        await run_workload(w, tasks=5, starting_credits=PER_TASK)
    db = Database(database_url, schema="marketplace")
    try:
        await assert_paid_exactly(db, w)
    finally:
        await db.dispose()


async def _until_everyone_sees_the_cluster(client: httpx.AsyncClient, market: Market) -> None:
    """The served marketplace learns memberships through Redis Streams: wait for them."""
    deadline = time.monotonic() + 30
    owners = [market.requester, *market.owners.values()]
    while True:
        answers = await asyncio.gather(
            *(
                client.get(
                    "/v1/ledger/accounts",
                    params={"cluster_id": market.cluster_id},
                    headers=bearer(t),
                )
                for t in owners
            )
        )
        if all(a.status_code == 200 for a in answers):
            break
        assert time.monotonic() < deadline, [a.text for a in answers]
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # the annotators' firm memberships travel the same stream
