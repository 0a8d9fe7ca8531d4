"""Signed webhooks: subscriptions, fan-out to the audience, delivery, retries, SSRF guard.

A real HTTP receiver on a free 127.0.0.1 port collects what the worker sends, so the
platform runs with ``webhook_allow_private_addresses`` on; the SSRF tests use a
platform with the default (off).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from api.events import (
    ContractAwardedV1,
    Envelope,
    EventPayload,
    PayoutSettledV1,
    SubmissionAcceptedV1,
    SubmissionRejectedV1,
    TaskCompletedV1,
)
from api.gateway import Gateway, create_gateway
from services.kit.db import Database, utcnow
from services.kit.outbox import consume_once, emit
from services.kit.settings import Settings
from services.marketplace import webhooks
from services.marketplace.models import MarketplaceOutbox, MarketplaceProcessedEvent
from services.marketplace.webhooks import (
    CONSUMER,
    WebhookDelivery,
    WebhookWorker,
    address_problem,
    fixed_audience,
    verify_signature,
)
from tests.conftest import make_settings
from tests.marketplace_support import (
    Market,
    add_member,
    build_market,
    open_task,
    owner_of,
    settle,
    vendor_profile,
)
from tests.oauth_flow import bearer


# -- a real receiver -----------------------------------------------------------------
@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A tiny HTTP/1.1 server: records each POST, answers the statuses queued per path."""

    port: int = 0
    requests: list[Received] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            _, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            queued = self.statuses.get(path)
            status = queued.pop(0) if queued else 200
            self.requests.append(Received(path, headers, body))
            reply = json.dumps({"status": status, "note": "x" * 3000}).encode()
            writer.write(
                f"HTTP/1.1 {status} Reply\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(reply)}\r\nConnection: close\r\n\r\n".encode()
                + reply
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    rec.port = server.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url,
        redis_prefix,
        webhook_allow_private_addresses=True,
        webhook_poll_interval=0.2,
    )


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def worker_of(gateway: Gateway) -> WebhookWorker:
    worker: WebhookWorker = gateway.apps["marketplace"].state.webhook_worker
    return worker


async def subscribe(
    client: httpx.AsyncClient, tokens: dict, url: str, events: list[str]
) -> dict[str, Any]:
    created = await client.post(
        "/v1/webhooks", json={"url": url, "events": events}, headers=bearer(tokens)
    )
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    body: dict[str, Any] = created.json()
    assert body["secret"].startswith("whsec_") and len(body["secret"]) == 6 + 64
    return body


async def deliveries(client: httpx.AsyncClient, tokens: dict, webhook_id: str) -> list[dict]:
    listed = await client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=bearer(tokens))
    assert listed.status_code == 200, listed.text
    items: list[dict] = listed.json()["items"]
    return items


async def fanned_out(gateway: Gateway, event_type: str) -> list[str]:
    """Ids of the marketplace's events of ``event_type`` once the fan-out handled them all."""
    db = gateway.apps["marketplace"].state.db
    async with db.sessionmaker() as session:
        ids = set(
            (
                await session.execute(
                    sa.text("SELECT id FROM outbox WHERE type = :t"), {"t": event_type}
                )
            ).scalars()
        )
        done = set(
            (
                await session.execute(
                    sa.text("SELECT event_id FROM processed_events WHERE consumer = :c"),
                    {"c": CONSUMER},
                )
            ).scalars()
        )
    return sorted(ids) if ids and ids <= done else []


async def all_final(gateway: Gateway) -> bool:
    db = gateway.apps["marketplace"].state.db
    async with db.sessionmaker() as session:
        pending = (
            await session.execute(
                sa.text("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
            )
        ).scalar()
    return pending == 0


def assert_signed(received: Received, secret: str) -> None:
    headers = received.headers
    assert headers["content-type"] == "application/json"
    assert headers["onecluster-webhook-id"].startswith("whd_")
    assert verify_signature(
        secret, headers["onecluster-timestamp"], received.body, headers["onecluster-signature"]
    )


# -- fan-out and delivery ------------------------------------------------------------
async def test_task_published_reaches_each_subscribed_member_once(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver
) -> None:
    market = await build_market(client, gateway, tag="wh1")
    _, outsider = await owner_of(
        client, "owner-out@wh1.example", vendor_profile("wh1-out", "CN-HE")
    )
    await settle(gateway)
    requester = await subscribe(client, market.requester, receiver.url("/req"), ["task.published"])
    sx = await subscribe(
        client, market.owners["sx"], receiver.url("/sx"), ["task.published", "payout.settled"]
    )
    await subscribe(client, market.owners["nm"], receiver.url("/nm"), ["contract.awarded"])
    await subscribe(client, outsider, receiver.url("/out"), ["task.published"])

    task = await open_task(client, market, items=2, reward_per_annotation=0)

    await wait_until(lambda: _true(fanned_out(gateway, "task.published")))
    await wait_until(lambda: all_final(gateway))
    (event_id,) = await fanned_out(gateway, "task.published")
    assert [len(receiver.at(p)) for p in ("/req", "/sx", "/nm", "/out")] == [1, 1, 0, 0]
    for path, sub, tokens in (
        ("/req", requester, market.requester),
        ("/sx", sx, market.owners["sx"]),
    ):
        received = receiver.at(path)[0]
        assert_signed(received, sub["secret"])
        assert not verify_signature(
            "whsec_" + "0" * 64,
            received.headers["onecluster-timestamp"],
            received.body,
            received.headers["onecluster-signature"],
        )
        assert received.headers["onecluster-event"] == "task.published"
        assert abs(int(received.headers["onecluster-timestamp"]) - time.time()) < 300
        document = received.json()
        assert set(document) == {"id", "type", "version", "occurred_at", "data"}
        assert document["id"] == event_id and document["type"] == "task.published"
        assert document["data"]["task_id"] == task["id"]
        assert document["data"]["cluster_id"] == market.cluster_id
        (listed,) = await deliveries(client, tokens, sub["id"])
        assert listed["id"] == received.headers["onecluster-webhook-id"]
        assert listed["status"] == "delivered" and listed["attempts"] == 1
        assert listed["last_status_code"] == 200 and listed["delivered_at"]
        assert listed["event_id"] == event_id and listed["next_attempt_at"] is None

    # The bus delivering the same event again creates no second delivery.
    db = gateway.apps["marketplace"].state.db
    async with db.sessionmaker() as session:
        row = await session.get(MarketplaceOutbox, event_id)
    assert row is not None
    envelope = Envelope(
        id=row.id,
        type=row.type,
        version=row.version,
        source="marketplace",
        occurred_at=row.occurred_at,
        data=row.data,
    )
    assert not await consume_once(
        db, MarketplaceProcessedEvent, CONSUMER, envelope, webhooks.fan_out
    )
    async with db.sessionmaker() as session:
        count = (
            await session.execute(
                sa.select(sa.func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.event_id == event_id)
            )
        ).scalar()
    assert count == 2


async def _true(value: Awaitable[list[str]]) -> bool:
    return bool(await value)


async def test_events_emitted_through_the_outbox_reach_only_their_parties(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver
) -> None:
    market = await build_market(client, gateway, tag="wh2")
    payee = await subscribe(client, market.owners["sx"], receiver.url("/sx"), ["payout.settled"])
    await subscribe(client, market.owners["nm"], receiver.url("/nm"), ["payout.settled"])
    payer = await subscribe(client, market.requester, receiver.url("/req"), ["task.completed"])
    db = gateway.apps["marketplace"].state.db
    async with db.session_scope() as session:
        emit(
            session,
            MarketplaceOutbox,
            PayoutSettledV1(
                posting_id="post_1",
                task_id="task_1",
                cluster_id=market.cluster_id,
                payer_firm_id=market.requester_id,
                payee_firm_id=market.vendors["sx"],
                amount=40,
                annotations=8,
            ),
        )
        emit(
            session,
            MarketplaceOutbox,
            TaskCompletedV1(
                task_id="task_1",
                cluster_id=market.cluster_id,
                requester_firm_id=market.requester_id,
                requester_region="CN-BJ",
                outcome="completed",
                accepted_annotations=8,
                items_finished=4,
                refunded=0,
                vendor_firm_ids=[market.vendors["sx"]],
            ),
        )
    await wait_until(lambda: _true(fanned_out(gateway, "payout.settled")))
    await wait_until(lambda: _true(fanned_out(gateway, "task.completed")))
    await wait_until(lambda: all_final(gateway))
    assert [len(receiver.at(p)) for p in ("/sx", "/nm", "/req")] == [1, 0, 1]
    assert_signed(receiver.at("/sx")[0], payee["secret"])
    assert receiver.at("/sx")[0].json()["data"]["amount"] == 40
    assert_signed(receiver.at("/req")[0], payer["secret"])
    assert receiver.at("/req")[0].headers["onecluster-event"] == "task.completed"


def _envelope(payload: EventPayload) -> Envelope:
    return Envelope(
        id="evt_1",
        type=payload.event_type,
        version=payload.event_version,
        source="marketplace",
        occurred_at=utcnow(),
        data=payload.model_dump(mode="json"),
    )


def test_audience_of_each_event_named_in_its_payload() -> None:
    reviewed = {
        "assignment_id": "asg",
        "task_id": "task",
        "item_id": "item",
        "cluster_id": "cl",
        "requester_firm_id": "req",
        "annotator_id": "usr",
        "annotator_firm_id": "ven",
        "annotator_region": "CN-SX",
    }
    cases: list[tuple[EventPayload, set[str]]] = [
        (
            ContractAwardedV1(
                contract_id="c",
                task_id="t",
                cluster_id="cl",
                requester_firm_id="req",
                requester_region="CN-BJ",
                vendor_firm_id="ven",
                vendor_region="CN-SX",
                price_per_annotation=3,
                quota=10,
            ),
            {"req", "ven"},
        ),
        (SubmissionAcceptedV1(**reviewed, amount=3), {"req", "ven"}),
        (SubmissionRejectedV1(**reviewed, reason="wrong"), {"req", "ven"}),
        (
            PayoutSettledV1(
                posting_id="p",
                task_id="t",
                cluster_id="cl",
                payer_firm_id="req",
                payee_firm_id="ven",
                amount=3,
                annotations=1,
            ),
            {"req", "ven"},
        ),
        (
            TaskCompletedV1(
                task_id="t",
                cluster_id="cl",
                requester_firm_id="req",
                requester_region="CN-BJ",
                outcome="cancelled",
                accepted_annotations=0,
                items_finished=0,
                refunded=5,
                vendor_firm_ids=["v1", "v2"],
            ),
            {"req", "v1", "v2"},
        ),
    ]
    for payload, expected in cases:
        assert fixed_audience(_envelope(payload)) == expected, payload.event_type


async def test_inactive_webhook_gets_no_new_events(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver
) -> None:
    market = await build_market(client, gateway, tag="wh3", vendors={"sx": "CN-SX"})
    sub = await subscribe(client, market.owners["sx"], receiver.url("/sx"), ["task.published"])
    paused = await client.patch(
        f"/v1/webhooks/{sub['id']}", json={"active": False}, headers=bearer(market.owners["sx"])
    )
    assert paused.status_code == 200 and paused.json()["active"] is False
    await open_task(client, market, items=1, reward_per_annotation=0)
    await wait_until(lambda: _true(fanned_out(gateway, "task.published")))
    assert await deliveries(client, market.owners["sx"], sub["id"]) == []
    assert receiver.requests == []


# -- retries, redelivery, rotation (the worker driven by hand with a test clock) ------
class Clock:
    def __init__(self) -> None:
        self.now = utcnow() + timedelta(seconds=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def manual_worker(gateway: Gateway, settings: Settings, **changes: Any) -> WebhookWorker:
    """Stop the background worker; a worker with ``changes`` is driven by the test."""
    await worker_of(gateway).stop()
    clock = Clock()
    return WebhookWorker(
        gateway.apps["marketplace"].state.db,
        settings.model_copy(update=changes),
        clock=clock,
    )


async def detail(client: httpx.AsyncClient, tokens: dict, sub: dict, delivery_id: str) -> dict:
    got = await client.get(
        f"/v1/webhooks/{sub['id']}/deliveries/{delivery_id}", headers=bearer(tokens)
    )
    assert got.status_code == 200, got.text
    body: dict = got.json()
    return body


async def ping(client: httpx.AsyncClient, tokens: dict, sub: dict) -> dict:
    pinged = await client.post(f"/v1/webhooks/{sub['id']}:ping", headers=bearer(tokens))
    assert pinged.status_code == 202, pinged.text
    body: dict = pinged.json()
    return body


async def solo_market(client: httpx.AsyncClient, gateway: Gateway, tag: str) -> Market:
    return await build_market(client, gateway, tag=tag, vendors={})


async def test_retries_with_backoff_until_success(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver, settings: Settings
) -> None:
    market = await solo_market(client, gateway, "wh4")
    worker = await manual_worker(gateway, settings)
    clock = worker.clock
    assert isinstance(clock, Clock)
    sub = await subscribe(client, market.requester, receiver.url("/r"), ["task.published"])
    receiver.statuses["/r"] = [500, 500, 200]
    delivery = await ping(client, market.requester, sub)
    assert delivery["status"] == "pending" and delivery["event"] == "webhook.ping"
    try:
        assert await worker.run_due_once() == 1
        first = await detail(client, market.requester, sub, delivery["id"])
        assert first["status"] == "pending" and first["last_status_code"] == 500
        wait = datetime.fromisoformat(first["next_attempt_at"]) - clock.now
        assert timedelta(seconds=8) <= wait <= timedelta(seconds=12)  # 10 s ± 20 %

        clock.advance(7)
        assert await worker.run_due_once() == 0  # not yet due
        clock.advance(5.5)
        assert await worker.run_due_once() == 1
        second = await detail(client, market.requester, sub, delivery["id"])
        wait = datetime.fromisoformat(second["next_attempt_at"]) - clock.now
        assert timedelta(seconds=24) <= wait <= timedelta(seconds=36)  # 30 s ± 20 %

        clock.advance(23)
        assert await worker.run_due_once() == 0
        clock.advance(14)
        assert await worker.run_due_once() == 1
    finally:
        await worker.stop()
    final = await detail(client, market.requester, sub, delivery["id"])
    assert final["status"] == "delivered" and final["attempts"] == 3
    assert final["next_attempt_at"] is None and final["last_error"] is None
    log = final["attempt_log"]
    assert [a["number"] for a in log] == [1, 2, 3]
    assert [a["status_code"] for a in log] == [500, 500, 200]
    assert [a["error"] for a in log] == ["HTTP 500", "HTTP 500", None]
    assert all(len(a["response_snippet"].encode()) <= 1024 for a in log)
    assert log[0]["response_snippet"].startswith('{"status": 500')
    assert len(receiver.at("/r")) == 3
    assert len({r.headers["onecluster-webhook-id"] for r in receiver.at("/r")}) == 1
    assert len({r.json()["id"] for r in receiver.at("/r")}) == 1


async def test_failed_after_max_attempts_and_redelivered(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver, settings: Settings
) -> None:
    market = await solo_market(client, gateway, "wh5")
    worker = await manual_worker(gateway, settings, webhook_max_attempts=2)
    clock = worker.clock
    assert isinstance(clock, Clock)
    sub = await subscribe(client, market.requester, receiver.url("/r"), ["task.published"])
    receiver.statuses["/r"] = [503, 503, 503]
    delivery = await ping(client, market.requester, sub)
    redeliver_url = f"/v1/webhooks/{sub['id']}/deliveries/{delivery['id']}:redeliver"
    try:
        assert await worker.run_due_once() == 1
        clock.advance(13)
        assert await worker.run_due_once() == 1
        failed = await detail(client, market.requester, sub, delivery["id"])
        assert failed["status"] == "failed" and failed["attempts"] == 2
        assert failed["next_attempt_at"] is None
        clock.advance(100_000)
        assert await worker.run_due_once() == 0  # failed for good

        again = await client.post(redeliver_url, headers=bearer(market.requester))
        assert again.status_code == 202 and again.json()["status"] == "pending"
        assert await worker.run_due_once() == 1  # now, whatever the backoff said
        refailed = await detail(client, market.requester, sub, delivery["id"])
        assert refailed["status"] == "failed" and refailed["attempts"] == 3

        again = await client.post(redeliver_url, headers=bearer(market.requester))
        assert again.status_code == 202
        assert await worker.run_due_once() == 1
        done = await detail(client, market.requester, sub, delivery["id"])
        assert done["status"] == "delivered" and done["attempts"] == 4

        again = await client.post(redeliver_url, headers=bearer(market.requester))
        assert again.status_code == 202  # a delivered one may be sent again too
        assert await worker.run_due_once() == 1
        assert (await detail(client, market.requester, sub, delivery["id"]))["attempts"] == 5
    finally:
        await worker.stop()
    assert len(receiver.at("/r")) == 5


async def test_rotated_secret_signs_new_deliveries(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver, settings: Settings
) -> None:
    market = await solo_market(client, gateway, "wh6")
    worker = await manual_worker(gateway, settings)
    sub = await subscribe(client, market.requester, receiver.url("/r"), ["task.published"])
    old = sub["secret"]
    rotate_url = f"/v1/webhooks/{sub['id']}:rotate-secret"
    try:
        rotated = await client.post(rotate_url, headers=bearer(market.requester))
        assert rotated.status_code == 200, rotated.text
        assert rotated.headers["cache-control"] == "no-store"
        new = rotated.json()["secret"]
        assert new != old and rotated.json()["previous_secret_expires_at"]
        await ping(client, market.requester, sub)
        assert await worker.run_due_once() == 1
        during = receiver.at("/r")[-1]
        assert during.headers["onecluster-signature"].count("v1=") == 2
        assert during.headers["onecluster-signature"].startswith("v1=")
        assert_signed(during, new)
        assert_signed(during, old)  # the grace period: receivers may still hold the old one

        rotated = await client.post(
            rotate_url, json={"keep_previous_seconds": 0}, headers=bearer(market.requester)
        )
        assert rotated.status_code == 200, rotated.text
        newest = rotated.json()["secret"]
        assert rotated.json()["previous_secret_expires_at"] is None
        await ping(client, market.requester, sub)
        assert await worker.run_due_once() == 1
    finally:
        await worker.stop()
    after = receiver.at("/r")[-1]
    assert after.headers["onecluster-signature"].count("v1=") == 1
    assert_signed(after, newest)
    for stale in (old, new):
        assert not verify_signature(
            stale,
            after.headers["onecluster-timestamp"],
            after.body,
            after.headers["onecluster-signature"],
        )


async def test_delivery_time_guard_refuses_private_address(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver, settings: Settings
) -> None:
    market = await solo_market(client, gateway, "wh7")
    strict = await manual_worker(gateway, settings, webhook_allow_private_addresses=False)
    sub = await subscribe(client, market.requester, receiver.url("/r"), ["task.published"])
    delivery = await ping(client, market.requester, sub)
    try:
        assert await strict.run_due_once() == 1
    finally:
        await strict.stop()
    got = await detail(client, market.requester, sub, delivery["id"])
    assert got["status"] == "pending" and got["last_status_code"] is None
    assert "must use https" in got["last_error"]
    assert receiver.requests == []


async def test_two_replicas_never_send_a_delivery_twice(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver, settings: Settings
) -> None:
    market = await solo_market(client, gateway, "wh11")
    await worker_of(gateway).stop()
    sub = await subscribe(client, market.requester, receiver.url("/r"), ["task.published"])
    for _ in range(30):
        await ping(client, market.requester, sub)
    url = settings.database_url_for("marketplace")
    replicas = [Database(url, schema="marketplace") for _ in range(2)]
    workers = [WebhookWorker(db, settings) for db in replicas]
    try:
        counts = await asyncio.gather(*(w.run_due_once(limit=20) for w in workers))
        counts += await asyncio.gather(*(w.run_due_once(limit=20) for w in workers))
    finally:
        for worker, db in zip(workers, replicas, strict=True):
            await worker.stop()
            await db.dispose()
    assert sum(counts) == 30
    ids = [r.headers["onecluster-webhook-id"] for r in receiver.at("/r")]
    assert len(ids) == 30 and len(set(ids)) == 30
    assert await all_final(gateway)


# -- the API -------------------------------------------------------------------------
async def test_webhook_api_belongs_to_the_firms_admins(
    client: httpx.AsyncClient, gateway: Gateway, receiver: Receiver
) -> None:
    market = await build_market(client, gateway, tag="wh8", vendors={"sx": "CN-SX"})
    admin = await add_member(
        client, market.requester, market.requester_id, "admin@wh8.example", role="admin"
    )
    await settle(gateway)
    sub = await subscribe(client, admin, receiver.url("/a"), ["task.published"])
    other = await subscribe(client, market.owners["sx"], receiver.url("/b"), ["task.published"])
    mine = await client.get("/v1/webhooks", headers=bearer(market.requester))
    assert [w["id"] for w in mine.json()["items"]] == [sub["id"]]
    assert "secret" not in mine.json()["items"][0]
    got = await client.get(f"/v1/webhooks/{sub['id']}", headers=bearer(market.requester))
    assert got.status_code == 200 and got.json()["url"] == receiver.url("/a")
    assert "secret" not in got.json()

    foreign = await client.get(f"/v1/webhooks/{other['id']}", headers=bearer(market.requester))
    assert foreign.status_code == 404
    annotator = market.annotators["sx"][0]
    for method, url in (
        ("GET", "/v1/webhooks"),
        ("GET", f"/v1/webhooks/{other['id']}"),
        ("POST", f"/v1/webhooks/{other['id']}:ping"),
    ):
        refused = await client.request(method, url, headers=bearer(annotator))
        assert refused.status_code == 403, (method, url, refused.text)

    changed = await client.patch(
        f"/v1/webhooks/{sub['id']}",
        json={"events": ["payout.settled", "task.published"], "description": "ops"},
        headers=bearer(market.requester),
    )
    assert changed.status_code == 200
    assert changed.json()["events"] == ["task.published", "payout.settled"]
    unknown = await client.post(
        "/v1/webhooks",
        json={"url": receiver.url("/c"), "events": ["firm.registered"]},
        headers=bearer(market.requester),
    )
    assert unknown.status_code == 422
    empty = await client.post(
        "/v1/webhooks", json={"url": receiver.url("/c"), "events": []}, headers=bearer(admin)
    )
    assert empty.status_code == 422

    await ping(client, market.requester, sub)
    await wait_until(lambda: all_final(gateway))
    deleted = await client.delete(f"/v1/webhooks/{sub['id']}", headers=bearer(admin))
    assert deleted.status_code == 204
    gone = await client.get(f"/v1/webhooks/{sub['id']}", headers=bearer(admin))
    assert gone.status_code == 404


# -- SSRF guard at creation ----------------------------------------------------------
@pytest.fixture
async def strict_client(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    """A platform with the default settings: private addresses refused."""
    gw = create_gateway(make_settings(tmp_path, database_url, redis_prefix))
    async with gw.lifespan():
        transport = httpx.ASGITransport(app=gw)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c, gw


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "http://[::1]/",
        "https://[::1]/",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://0.0.0.0/",
        "https://192.168.1.10:8443/hook",
        "https://100.64.0.1/hook",
        "https://224.0.0.1/hook",
        "https://[fe80::1]/hook",
        "https://[fc00::1]/hook",
        "http://93.184.215.14/hook",
        "ftp://93.184.215.14/hook",
        "https://user:pw@93.184.215.14/hook",
        "not a url",
    ],
)
async def test_unsafe_urls_are_refused(
    strict_client: tuple[httpx.AsyncClient, Gateway], url: str
) -> None:
    client, gateway = strict_client
    market = await solo_market(client, gateway, "wh9")
    refused = await client.post(
        "/v1/webhooks",
        json={"url": url, "events": ["task.published"]},
        headers=bearer(market.requester),
    )
    assert refused.status_code == 422, refused.text
    listed = await client.get("/v1/webhooks", headers=bearer(market.requester))
    assert listed.json()["items"] == []


async def test_public_https_address_is_accepted_and_checked_again_on_change(
    strict_client: tuple[httpx.AsyncClient, Gateway],
) -> None:
    client, gateway = strict_client
    market = await solo_market(client, gateway, "wh10")
    created = await client.post(
        "/v1/webhooks",
        json={"url": "https://93.184.215.14/hook", "events": ["task.published"]},
        headers=bearer(market.requester),
    )
    assert created.status_code == 201, created.text
    moved = await client.patch(
        f"/v1/webhooks/{created.json()['id']}",
        json={"url": "https://169.254.169.254/"},
        headers=bearer(market.requester),
    )
    assert moved.status_code == 422
    got = await client.get(f"/v1/webhooks/{created.json()['id']}", headers=bearer(market.requester))
    assert got.json()["url"] == "https://93.184.215.14/hook"


def test_address_classification() -> None:
    assert address_problem("93.184.215.14") is None
    assert address_problem("2606:4700:4700::1111") is None
    for address in ("127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "::ffff:10.0.0.1", "::"):
        assert address_problem(address), address


def test_verify_signature_rejects_stale_and_tampered() -> None:
    secret = "whsec_" + "a" * 64
    body = b'{"id":"evt_1"}'
    now = 1_800_000_000
    header = f"v1={webhooks.sign(secret, now, body)}"
    assert verify_signature(secret, now, body, header, now=now + 299)
    assert not verify_signature(secret, now, body, header, now=now + 301)
    assert not verify_signature(secret, now, body + b" ", header, now=now)
    assert not verify_signature(secret, now + 1, body, header, now=now)
    assert not verify_signature(secret, "soon", body, header, now=now)
    assert verify_signature(secret, now, body, f"v1=00ff,{header}", now=now)
