"""``Idempotency-Key`` through HTTP, on a small service built with the kit's factory."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from kit_support import Item, KitIdempotencyKey, TokenMint, build_app, count_rows, serve
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from services.kit.app import session_dependency
from services.kit.db import Database, utcnow
from services.kit.errors import RateLimited
from services.kit.ids import new_id
from services.kit.runtime import Runtime
from services.kit.settings import Settings

SessionDep = Annotated[AsyncSession, Depends(session_dependency, scope="function")]


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)


@dataclass
class Control:
    """What the test service's handlers do, and how often they ran."""

    calls: int = 0
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    fail_with: int | None = None
    crash: bool = False
    rate_limited: bool = False


def make_router(control: Control) -> APIRouter:
    router = APIRouter()

    @router.post("/items", status_code=201)
    async def create_item(body: ItemIn, session: SessionDep) -> dict[str, Any]:
        control.calls += 1
        control.entered.set()
        if control.gate is not None:
            await control.gate.wait()
        if control.rate_limited:
            raise RateLimited(7)
        if control.crash:
            raise RuntimeError("boom")
        if control.fail_with is not None:
            return JSONResponse({"detail": "unavailable"}, status_code=control.fail_with)  # type: ignore[return-value]
        item = Item(id=new_id("item"), name=f"{body.name}-{control.calls}")
        session.add(item)
        await session.flush()
        return {"id": item.id, "name": item.name, "call": control.calls}

    @router.post("/export")
    async def export(request: Request) -> StreamingResponse:
        await request.body()
        control.calls += 1

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"line {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    return router


@dataclass
class Service:
    client: httpx.AsyncClient
    control: Control
    mint: TokenMint
    db: Database


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[Service]:
    control = Control()
    runtime = Runtime(settings)
    mint = TokenMint(settings)
    mint.install(runtime)
    app = build_app(settings, [make_router(control)], runtime=runtime)
    async with serve(app) as client:
        yield Service(client, control, mint, app.state.db)


def key_headers(key: str, token: str | None = None) -> dict[str, str]:
    headers = {"Idempotency-Key": key}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("/" + slug)
    assert body["status"] == status
    return body


async def test_same_key_same_body_replays_the_first_response(service: Service) -> None:
    first = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-1"))
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    second = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-1"))
    assert second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert second.headers["content-type"] == first.headers["content-type"]
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert service.control.calls == 1
    assert await count_rows(service.db, Item) == 1
    # Without a key every POST runs.
    third = await service.client.post("/items", json={"name": "a"})
    assert third.status_code == 201 and third.json()["id"] != first.json()["id"]
    assert service.control.calls == 2


async def test_same_key_other_body_is_422_and_runs_nothing(service: Service) -> None:
    await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-2"))
    response = await service.client.post("/items", json={"name": "b"}, headers=key_headers("k-2"))
    assert_problem(response, 422, "idempotency-key-reused")
    assert service.control.calls == 1
    assert await count_rows(service.db, Item) == 1


async def test_same_key_other_path_or_query_is_422(service: Service) -> None:
    await service.client.post("/items?dry_run=true", json={"name": "a"}, headers=key_headers("q"))
    other_query = await service.client.post(
        "/items?dry_run=false", json={"name": "a"}, headers=key_headers("q")
    )
    assert_problem(other_query, 422, "idempotency-key-reused")
    other_path = await service.client.post("/export", json={"name": "a"}, headers=key_headers("q"))
    assert_problem(other_path, 422, "idempotency-key-reused")
    assert service.control.calls == 1


async def test_concurrent_duplicate_is_409_while_the_first_runs(service: Service) -> None:
    service.control.gate = asyncio.Event()
    first = asyncio.create_task(
        service.client.post("/items", json={"name": "a"}, headers=key_headers("k-3"))
    )
    await asyncio.wait_for(service.control.entered.wait(), timeout=10)
    duplicate = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-3"))
    assert_problem(duplicate, 409, "idempotency-in-progress")
    assert duplicate.headers["retry-after"] == "1"
    service.control.gate.set()
    done = await asyncio.wait_for(first, timeout=10)
    assert done.status_code == 201
    assert service.control.calls == 1
    replay = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-3"))
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == done.json()


@pytest.mark.parametrize("failure", ["crash", "503"])
async def test_a_5xx_is_not_kept_and_the_retry_runs(service: Service, failure: str) -> None:
    if failure == "crash":
        service.control.crash = True
    else:
        service.control.fail_with = 503
    failed = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-4"))
    assert failed.status_code >= 500
    assert await count_rows(service.db, KitIdempotencyKey) == 0
    service.control.crash = False
    service.control.fail_with = None
    retry = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-4"))
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers
    assert service.control.calls == 2
    assert await count_rows(service.db, Item) == 1


async def test_a_429_is_not_kept_either(service: Service) -> None:
    """A rate-limited attempt must not be replayed for a day: after Retry-After the same
    request with the same key has to run."""
    service.control.rate_limited = True
    limited = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-5"))
    assert_problem(limited, 429, "rate-limited")
    service.control.rate_limited = False
    retry = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-5"))
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers


async def test_keys_belong_to_their_principal(service: Service) -> None:
    alice = service.mint.token("user_alice")
    bob = service.mint.token("user_bob")
    body = {"name": "a"}
    as_alice = await service.client.post("/items", json=body, headers=key_headers("same", alice))
    as_bob = await service.client.post("/items", json=body, headers=key_headers("same", bob))
    anonymous = await service.client.post("/items", json=body, headers=key_headers("same"))
    for response in (as_alice, as_bob, anonymous):
        assert response.status_code == 201
        assert "idempotent-replayed" not in response.headers
    assert len({r.json()["id"] for r in (as_alice, as_bob, anonymous)}) == 3
    again = await service.client.post("/items", json=body, headers=key_headers("same", alice))
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == as_alice.json()
    # Another body under Bob's key conflicts with Bob's request only.
    clash = await service.client.post(
        "/items", json={"name": "other"}, headers=key_headers("same", bob)
    )
    assert_problem(clash, 422, "idempotency-key-reused")
    assert service.control.calls == 3


async def test_a_bad_token_with_a_key_is_401_and_nothing_runs(service: Service) -> None:
    response = await service.client.post(
        "/items", json={"name": "a"}, headers=key_headers("k-6", "not-a-jwt")
    )
    assert_problem(response, 401, "unauthorized")
    assert service.control.calls == 0
    assert await count_rows(service.db, KitIdempotencyKey) == 0


async def test_an_expired_key_runs_again(service: Service) -> None:
    first = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-7"))
    async with service.db.session_scope() as session:
        await session.execute(
            sa.update(KitIdempotencyKey)
            .where(KitIdempotencyKey.key == "k-7")  # type: ignore[arg-type]
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    second = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-7"))
    assert second.status_code == 201
    assert "idempotent-replayed" not in second.headers
    assert second.json()["id"] != first.json()["id"]
    assert service.control.calls == 2
    # The renewed key now replays the second response.
    third = await service.client.post("/items", json={"name": "a"}, headers=key_headers("k-7"))
    assert third.json() == second.json()


@pytest.mark.parametrize("key", ["x" * 256, "   "])
async def test_a_key_out_of_bounds_is_400(service: Service, key: str) -> None:
    response = await service.client.post("/items", json={"name": "a"}, headers=key_headers(key))
    body = assert_problem(response, 400, "bad-request")
    assert "Idempotency-Key" in body["detail"]
    assert service.control.calls == 0


async def test_a_key_of_255_characters_is_fine(service: Service) -> None:
    key = "k" * 255
    first = await service.client.post("/items", json={"name": "a"}, headers=key_headers(key))
    second = await service.client.post("/items", json={"name": "a"}, headers=key_headers(key))
    assert first.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"


async def test_streaming_response_with_a_key_completes(settings: Settings) -> None:
    """The handler may listen for the client's disconnect (Starlette's streaming and file
    responses do, under servers below ASGI 2.4 such as uvicorn). The middleware's
    ``receive`` must then wait for it, not return empty bodies forever - which spins the
    event loop and hangs the whole process, so the request runs on a thread of its own."""
    outcome: dict[str, Any] = {}

    async def scenario() -> None:
        control = Control()
        app = build_app(settings, [make_router(control)])
        async with serve(app) as client:
            first = await client.post("/export", content=b"{}", headers=key_headers("s-1"))
            second = await client.post("/export", content=b"{}", headers=key_headers("s-1"))
        outcome.update(first=first, second=second, calls=control.calls)

    thread = threading.Thread(target=lambda: asyncio.run(scenario()), daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, 30)
    assert not thread.is_alive(), "the streamed response never completed"
    assert outcome["first"].text == "line 0\nline 1\nline 2\n"
    assert outcome["second"].text == outcome["first"].text
    assert outcome["second"].headers["idempotent-replayed"] == "true"
    assert outcome["calls"] == 1
