"""Cursor pagination: round trips, bad cursors, the page-size cap, and ``make_page``."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, Depends
from kit_support import Item, build_app, serve
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from services.kit.app import session_dependency
from services.kit.ids import new_id
from services.kit.pagination import (
    MAX_PAGE_SIZE,
    Page,
    PageParams,
    decode_cursor,
    encode_cursor,
    make_page,
)
from services.kit.settings import Settings

SessionDep = Annotated[AsyncSession, Depends(session_dependency, scope="function")]


def make_router() -> APIRouter:
    router = APIRouter()

    @router.post("/items", status_code=201)
    async def create(session: SessionDep) -> dict[str, str]:
        item = Item(id=new_id("item"), name=new_id("name"))
        session.add(item)
        return {"id": item.id}

    @router.get("/items")
    async def list_items(page: PageParams, session: SessionDep) -> Page[dict[str, Any]]:
        query = sa.select(Item).order_by(col(Item.id)).limit(page.limit + 1)
        if page.after:
            query = query.where(col(Item.id) > page.after)
        rows = (await session.execute(query)).scalars().all()
        page_of_rows = make_page(list(rows), page.limit)
        return Page[dict[str, Any]](
            items=[{"id": r.id} for r in page_of_rows.items],
            next_cursor=page_of_rows.next_cursor,
        )

    return router


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(build_app(settings, [make_router()])) as c:
        yield c


async def create(client: httpx.AsyncClient, n: int) -> list[str]:
    return [(await client.post("/items")).json()["id"] for _ in range(n)]


async def walk(client: httpx.AsyncClient, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        response = await client.get("/items", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([i["id"] for i in body["items"]])
        cursor = body.get("next_cursor")
        if cursor is None:
            return pages
        assert len(pages) < 50, "the cursor does not advance"


async def test_cursor_round_trip_visits_every_row_once_in_order(
    client: httpx.AsyncClient,
) -> None:
    ids = await create(client, 5)
    pages = await walk(client, limit=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == ids  # ids sort by creation


async def test_no_cursor_when_the_last_page_is_exactly_full(client: httpx.AsyncClient) -> None:
    ids = await create(client, 4)
    pages = await walk(client, limit=2)
    assert pages == [ids[:2], ids[2:]]  # no third, empty page
    one_page = (await client.get("/items", params={"limit": 4})).json()
    assert len(one_page["items"]) == 4 and one_page["next_cursor"] is None


async def test_empty_list_has_no_cursor(client: httpx.AsyncClient) -> None:
    assert (await client.get("/items")).json() == {"items": [], "next_cursor": None}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "!!!not-base64!!!",
        b64(b"not json"),
        b64(b"{}"),
        b64(json.dumps(["after"]).encode()),
        b64(json.dumps({"after": 5}).encode()),
        b64(b"\xff\xfe"),
        "caf\u00e9",
    ],
)
async def test_invalid_cursor_is_400(client: httpx.AsyncClient, cursor: str) -> None:
    response = await client.get("/items", params={"cursor": cursor})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/bad-request")


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1, 10_000])
async def test_limit_out_of_range_is_422(client: httpx.AsyncClient, limit: int) -> None:
    response = await client.get("/items", params={"limit": limit})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["query", "limit"]


async def test_limit_at_the_cap_is_fine(client: httpx.AsyncClient) -> None:
    assert (await client.get("/items", params={"limit": MAX_PAGE_SIZE})).status_code == 200


async def test_overlong_cursor_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/items", params={"cursor": "a" * 513})
    assert response.status_code == 422


@dataclass
class Row:
    id: str


def test_make_page_sets_a_cursor_only_when_there_is_more() -> None:
    rows = [Row(f"r{i}") for i in range(4)]
    more = make_page(rows, 3)
    assert [r.id for r in more.items] == ["r0", "r1", "r2"]
    assert more.next_cursor is not None
    assert decode_cursor(more.next_cursor) == "r2"
    exact = make_page(rows[:3], 3)
    assert len(exact.items) == 3 and exact.next_cursor is None
    assert make_page([], 3).next_cursor is None


def test_cursor_encoding_is_url_safe_and_reversible() -> None:
    for value in ["item_01", "a/b+c=d", "\u00e9\u4e2d", ""]:
        cursor = encode_cursor(value)
        assert "=" not in cursor and "+" not in cursor and "/" not in cursor
        assert decode_cursor(cursor) == value
