"""Cursor pagination with a capped page size.

Ids are time-ordered (see :mod:`services.kit.ids`), so a page is "the next ``limit``
rows after this id" in the list's order. The cursor is opaque to clients.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel, Field

from services.kit.errors import BadRequest

T = TypeVar("T")
MAX_PAGE_SIZE = 100


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        None, description="pass as `cursor` to get the next page; absent on the last page"
    )


class PageRequest(BaseModel):
    limit: int
    after: str | None


def encode_cursor(last_id: str) -> str:
    raw = json.dumps({"after": last_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)["after"]
    except (ValueError, KeyError, TypeError):
        raise BadRequest("The cursor is not valid.") from None
    if not isinstance(value, str):
        raise BadRequest("The cursor is not valid.")
    return value


async def page_request(
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="page size")] = 50,
    cursor: Annotated[str | None, Query(max_length=512, description="from next_cursor")] = None,
) -> PageRequest:
    return PageRequest(limit=limit, after=decode_cursor(cursor) if cursor else None)


PageParams = Annotated[PageRequest, Depends(page_request)]


def page_of(items: list[Any], rows: list[Any], limit: int, key: Callable[[Any], str]) -> Page[Any]:
    """A page of ``items`` built from ``limit + 1`` fetched ``rows``.

    The extra row only says there is more; the cursor is ``key`` of the last row shown.
    """
    more = len(rows) > limit
    cursor = encode_cursor(key(rows[limit - 1])) if more and limit else None
    return Page[Any](items=items[:limit], next_cursor=cursor)


def make_page(rows: list[T], limit: int, id_of: str = "id") -> Page[T]:
    """A page of ``limit + 1`` fetched rows that are the items themselves."""
    return page_of(rows, rows, limit, lambda row: getattr(row, id_of))
