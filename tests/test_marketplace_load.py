"""200 concurrent annotators finish one open task over real sockets (PostgreSQL + Redis).

A served platform (``onecluster serve``, real uvicorn), a requester and four vendor
firms with 200 annotators, one open single-label task of 2,000 items wanted three
times each, a 15-second lease. Every annotator claims batches of 5 to 20 and submits them
in one request until claims come back empty and every item is complete. One in five
walks away mid-way: it claims a batch and never answers nor releases it. Those leases
expire on their own (no sweeper) and other annotators finish the items.

Afterwards the database must show exactly 2,000 x 3 submitted annotations, three per
item and no more, no annotator twice on one item, and every abandoned item finished by
three other people; then the requester accepts them all (a thousand per call) and
exactly 6,000 are accepted and paid for.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from services.kit.runtime import Runtime
from services.kit.settings import Settings
from tests.conftest import requires_postgres, requires_redis
from tests.marketplace_support import build_crowd, task_body, wait_until_visible
from tests.oauth_flow import bearer
from tests.served import serve_platform

ITEMS, OVERLAP, ANNOTATORS = 2_000, 3, 200
# Longer than a claim and its submit take while 200 clients queue on one worker (a few
# seconds on 2 busy cores): with a 3-second lease, batches expire before their submit
# is served and the run barely advances. Abandoned leases still come back, unswept.
LEASE_SECONDS = 15
# Every client its own keep-alive connection: 200 requests in flight at once. Each takes
# a Redis connection (deny-list, rate limits) from a pool of 100 that makes the rest
# wait (see the burst test below).
CONNECTIONS = 200
VENDOR_REGIONS = ["CN-SX", "CN-NM", "CN-HE", "CN-BJ"]
DEADLINE_SECONDS = 240  # the annotation phase; a healthy run needs a fraction of it
ANSWER = {"label": "positive"}
REWARD = 1


@pytest.fixture
def server(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Iterator[str]:
    untripped = "1000000000"
    env = {
        "ONECLUSTER_WEB_REDIRECT_URIS": '["http://testserver/cb"]',
        "ONECLUSTER_RATE_LIMIT_PER_MINUTE": untripped,
        "ONECLUSTER_FIRM_RATE_LIMIT_PER_MINUTE": untripped,
        "ONECLUSTER_TOKEN_RATE_LIMIT_PER_MINUTE": untripped,
        "ONECLUSTER_ACCESS_TOKEN_TTL": "3600",
    }
    with serve_platform(tmp_path, database_url, redis_prefix, env) as base:
        yield base


@dataclass
class Tally:
    submitted: int = 0
    empty_claims: int = 0
    expired: int = 0  # leases that ran out between claim and submit (409, dropped)
    retried: int = 0  # requests sent again with their Idempotency-Key
    abandoned: dict[str, str] = field(default_factory=dict)  # assignment id → item id
    abandoned_by: dict[str, str] = field(default_factory=dict)  # assignment id → annotator


class Database:
    """The served platform's marketplace schema, read with a small synchronous engine."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(
            sa.engine.make_url(url).set(drivername="postgresql+psycopg"),
            connect_args={"options": "-csearch_path=marketplace"},
            pool_size=2,
        )

    def rows(self, sql: str, **params: object) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]

    def scalar(self, sql: str, **params: object) -> int:
        return int(self.rows(sql, **params)[0][0])


@requires_redis
async def test_a_burst_of_redis_calls_beyond_the_pool_waits_for_connections(
    settings: Settings,
) -> None:
    """Every request checks the deny-list (and the rate limits) in Redis: 200 requests at
    once must queue for a connection, not fail."""
    runtime = Runtime(settings)
    await runtime.acquire()
    try:
        found = await asyncio.gather(
            *(runtime.denylist.contains(f"jti-{i}") for i in range(300)), return_exceptions=True
        )
        assert found == [False] * 300, Counter(type(f).__name__ for f in found)
    finally:
        await runtime.release()


@requires_postgres
@requires_redis
@pytest.mark.slow
async def test_200_annotators_finish_a_task_despite_abandoned_leases(
    server: str, database_url: str, tmp_path: Path
) -> None:
    try:
        await _run(server, database_url)
    except Exception as exc:
        raise AssertionError(f"{exc!r}\n{_server_errors(tmp_path / 'server.log')}") from exc


def _server_errors(log: Path) -> str:
    """The served process's errors, by their final line (its log goes with the temporary
    folder)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    errors: Counter[str] = Counter()
    for line in lines:
        if '"level": "error"' in line:
            try:
                entry = json.loads(line)
            except ValueError:
                errors[line[:300]] += 1
                continue
            last = str(entry.get("exc", "")).strip().splitlines()[-1:] or [""]
            errors[f"{entry.get('msg')}: {last[0][:300]}"] += 1
    return "server errors: " + "; ".join(f"{n} x {what}" for what, n in errors.most_common(5))


async def _run(server: str, database_url: str) -> None:
    db = Database(database_url)
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)

    def new_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server, timeout=120, trust_env=False)

    started = time.monotonic()
    try:
        crowd = await build_crowd(
            new_client, tag="load", vendors=VENDOR_REGIONS, annotators=ANNOTATORS, concurrency=8
        )
        async with httpx.AsyncClient(
            base_url=server, timeout=120, limits=limits, trust_env=False
        ) as client:
            tid = await _publish(client, crowd.cluster_id, crowd.requester)
            await wait_until_visible(client, tid, crowd.annotators)
            ready = time.monotonic()
            tally = await _annotate(client, db, tid, crowd.annotators)
            annotated = time.monotonic()
            _check_outcome(db, tid, tally)
            await _accept_everything(client, db, tid, crowd.requester)
        print(  # shown with -rP: where the time of a run goes
            f"set-up {ready - started:.0f} s, annotation {annotated - ready:.0f} s, checks and"
            f" acceptance {time.monotonic() - annotated:.0f} s; {len(tally.abandoned)} leases"
            f" abandoned, {tally.expired} expired before their submit, {tally.empty_claims}"
            f" empty claims, {tally.retried} requests sent again"
        )
    finally:
        db.engine.dispose()


async def _publish(client: httpx.AsyncClient, cluster_id: str, requester: dict) -> str:
    req = bearer(requester)
    body = task_body(
        cluster_id, overlap=OVERLAP, lease_seconds=LEASE_SECONDS, reward_per_annotation=REWARD
    )
    created = await client.post("/v1/tasks", json=body, headers=req)
    assert created.status_code == 201, created.text
    tid = str(created.json()["id"])
    lines = [{"input": {"text": f"review {i}"}, "external_id": f"r{i}"} for i in range(ITEMS)]
    imported = await client.post(f"/v1/tasks/{tid}/items", json=lines, headers=req)
    assert imported.status_code == 200, imported.text
    assert imported.json()["imported"] == ITEMS
    published = await client.post(f"/v1/tasks/{tid}:publish", headers=req)
    assert published.status_code == 200, published.text
    return tid


async def _post(
    client: httpx.AsyncClient, path: str, body: dict, headers: dict[str, str], tally: Tally
) -> httpx.Response:
    """POST with an Idempotency-Key, sent again (same key) when the connection fails or
    the first attempt is still running: the answer is the first attempt's, never a second
    claim or submit. A keep-alive connection the server closes just as a request goes out
    is an ordinary event for a client that holds hundreds of them."""
    headers = {**headers, "Idempotency-Key": secrets.token_urlsafe(16)}
    for attempt in range(10):
        try:
            response = await client.post(path, json=body, headers=headers)
        except httpx.TransportError:
            if attempt == 9:
                raise
        else:
            busy = response.status_code == 409 and response.json().get("type", "").endswith(
                "/idempotency-in-progress"
            )
            if not busy:
                return response
        tally.retried += 1
        await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError(f"POST {path} kept failing")


async def _annotate(
    client: httpx.AsyncClient, db: Database, tid: str, annotators: list[dict]
) -> Tally:
    tally = Tally()
    finished = asyncio.Event()
    deadline = time.monotonic() + DEADLINE_SECONDS

    async def watch() -> None:
        """Sets ``finished`` once every item is complete (one reader, not 200)."""
        query = "SELECT count(*) FROM items WHERE task_id = :t AND complete"
        while not finished.is_set():
            if await asyncio.to_thread(db.scalar, query, t=tid) == ITEMS:
                finished.set()
                return
            await asyncio.sleep(0.25)

    async def submit(headers: dict[str, str], ids: list[str]) -> None:
        """One batch submit. The leases of one claim expire together, so a 409 ``expired``
        (the answer came too late) drops the whole batch; its items go to others."""
        answers = [{"assignment_id": a, "answer": ANSWER} for a in ids]
        done = await _post(
            client, f"/v1/tasks/{tid}/assignments:submit", {"answers": answers}, headers, tally
        )
        if done.status_code == 200:
            assert len(done.json()["submitted"]) == len(ids), done.text
            tally.submitted += len(ids)
            return
        assert done.status_code == 409 and done.json().get("state") == "expired", done.text
        tally.expired += len(ids)

    async def annotator(index: int, tokens: dict) -> None:
        headers = bearer(tokens)
        batch = 5 + index % 16
        # One in five walks away after its first, second or third claim.
        walks_away_at = 1 + (index // 5) % 3 if index % 5 == 0 else None
        claims = 0
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the task was not finished within {DEADLINE_SECONDS} s: "
                    f"{tally.submitted} of {ITEMS * OVERLAP} annotations submitted"
                )
            response = await _post(
                client, f"/v1/tasks/{tid}/assignments:claim", {"count": batch}, headers, tally
            )
            if response.status_code == 409 and response.json().get("state") == "completed":
                return  # the task closed itself once its work was done
            assert response.status_code == 200, response.text
            leases = response.json()["assignments"]
            if not leases:
                tally.empty_claims += 1
                if finished.is_set():
                    return
                # Work is out but leases are outstanding: they come back when they expire.
                await asyncio.sleep(0.3 + random.random() * 0.4)
                continue
            claims += 1
            ids = [lease["assignment_id"] for lease in leases]
            if claims == walks_away_at:
                for lease in leases:
                    tally.abandoned[lease["assignment_id"]] = lease["item_id"]
                    tally.abandoned_by[lease["assignment_id"]] = str(index)
                return  # neither answered nor released: the leases simply run out
            await submit(headers, ids)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(annotator(i, t) for i, t in enumerate(annotators)))
    finally:
        finished.set()
        await watcher
    return tally


def _check_outcome(db: Database, tid: str, tally: Tally) -> None:
    # Every 200 of a submit is in the database, and nothing else was submitted.
    assert tally.submitted == ITEMS * OVERLAP
    assert tally.abandoned, "no annotator walked away: the test proves nothing about expiry"
    submitted = db.scalar(
        "SELECT count(*) FROM assignments WHERE task_id = :t AND status = 'submitted' AND NOT gold",
        t=tid,
    )
    assert submitted == ITEMS * OVERLAP

    per_item = dict(
        db.rows(
            "SELECT i.id, count(a.id) FROM items i LEFT JOIN assignments a"
            " ON a.item_id = i.id AND a.status = 'submitted'"
            " WHERE i.task_id = :t GROUP BY i.id",
            t=tid,
        )
    )
    assert len(per_item) == ITEMS
    assert Counter(per_item.values()) == {OVERLAP: ITEMS}, "an item has more or fewer answers"
    counters = db.rows(
        "SELECT count(*) FROM items WHERE task_id = :t AND complete AND submitted = :k",
        t=tid,
        k=OVERLAP,
    )
    assert counters[0][0] == ITEMS, "items.submitted/complete disagree with the assignments"

    twice = db.rows(
        "SELECT item_id, annotator_id FROM assignments WHERE task_id = :t"
        " GROUP BY item_id, annotator_id HAVING count(*) > 1",
        t=tid,
    )
    assert twice == [], "an annotator got an item twice"

    # The abandoned leases stayed leased, ran out, and others finished their items.
    abandoned = db.rows(
        "SELECT a.id, a.item_id, a.annotator_id, a.status, a.expires_at < now(),"
        " (SELECT count(*) FROM assignments o WHERE o.item_id = a.item_id"
        "  AND o.status = 'submitted' AND o.annotator_id <> a.annotator_id),"
        " i.complete"
        " FROM assignments a JOIN items i ON i.id = a.item_id WHERE a.id = ANY(:ids)",
        ids=list(tally.abandoned),
    )
    assert len(abandoned) == len(tally.abandoned)
    for asg, item, _who, status, expired, others, complete in abandoned:
        assert item == tally.abandoned[asg]
        assert (status, expired, complete) == ("leased", True, True), asg
        assert others == OVERLAP, f"item {item} of abandoned {asg} has {others} other answers"
    abandoners = {who for _, _, who, *_ in abandoned}
    assert len(abandoners) == len(set(tally.abandoned_by.values()))


async def _accept_everything(
    client: httpx.AsyncClient, db: Database, tid: str, requester: dict
) -> None:
    """The requester accepts every submission, a thousand per call, and pays for each."""
    accepted = paid = 0
    for _ in range(ITEMS * OVERLAP // 1000 + 3):
        response = await client.post(
            f"/v1/tasks/{tid}/submissions:accept", json={"filter": {}}, headers=bearer(requester)
        )
        assert response.status_code == 200, response.text
        outcome = response.json()
        accepted += outcome["count"]
        paid += outcome["amount"]
        if not outcome["more"] or not outcome["count"]:
            break
    assert accepted == ITEMS * OVERLAP
    assert paid == ITEMS * OVERLAP * REWARD
    statuses = dict(
        db.rows(
            "SELECT status, count(*) FROM assignments WHERE task_id = :t AND NOT gold"
            " AND status IN ('submitted', 'accepted', 'rejected') GROUP BY status",
            t=tid,
        )
    )
    assert statuses == {"accepted": ITEMS * OVERLAP}
