"""The baseline of bench/auth_read.py: the member-list query behind a bare FastAPI route.

Same tables, same filters, same order and limit as ``service.list_members`` (and the same
SQL: every column of ``cluster_members`` and ``firms``), the same response model
(``Page[ClusterMemberOut]``) and the same cursor, but no token, no middleware, no access
checks, no ORM unit of work and no transaction of its own. It reads the database that a
running ``onecluster serve`` writes:

* ``BENCH_DATABASE_URL``: ``sqlite+aiosqlite:///<data-dir>/membership.sqlite3`` or a
  ``postgresql+asyncpg://`` URL (the ``membership`` schema is put on the ``search_path``);
* ``BENCH_OPERATOR_FIRM_ID``: the cluster's operator, for the ``is_operator`` field.

Run: ``python -m uvicorn bench.bare_members:app --port N --no-access-log``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import FastAPI, Query
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.kit.pagination import MAX_PAGE_SIZE, Page, encode_cursor
from services.membership.models import ClusterMember, Firm
from services.membership.schemas import ClusterMemberOut

MEMBERS: sa.Table = ClusterMember.__table__  # type: ignore[attr-defined]
FIRMS: sa.Table = Firm.__table__  # type: ignore[attr-defined]

QUERY = (
    sa.select(MEMBERS, FIRMS)
    .join(FIRMS, FIRMS.c.id == MEMBERS.c.firm_id)
    .where(MEMBERS.c.cluster_id == sa.bindparam("cluster_id"), MEMBERS.c.status == "active")
    .order_by(MEMBERS.c.id)
    .limit(sa.bindparam("limit"))
)
# Positions of the columns the response needs (rows are read by index: the cheapest way).
_AT = {column: i for i, column in enumerate(QUERY.selected_columns)}
M_ID, M_PARK, M_JOINED = (_AT[MEMBERS.c[n]] for n in ("id", "park_id", "joined_at"))
F_ID, F_NAME, F_REGION, F_CITY, F_ACTOR, F_INDUSTRIES = (
    _AT[FIRMS.c[n]] for n in ("id", "name", "region", "city", "actor_type", "industries")
)


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("postgresql"):
        return create_async_engine(
            url,
            pool_size=10,
            max_overflow=10,
            connect_args={"server_settings": {"search_path": "membership"}},
        )
    return create_async_engine(url, connect_args={"timeout": 30})


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine = make_engine(os.environ["BENCH_DATABASE_URL"])
    app.state.operator = os.environ.get("BENCH_OPERATOR_FIRM_ID", "")
    try:
        yield
    finally:
        await app.state.engine.dispose()


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/v1/clusters/{cluster_id}/members", response_model=Page[ClusterMemberOut])
async def members(
    cluster_id: str, limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50
) -> dict[str, Any]:
    engine: AsyncEngine = app.state.engine
    async with engine.connect() as conn:
        rows = (await conn.execute(QUERY, {"cluster_id": cluster_id, "limit": limit + 1})).all()
    operator = app.state.operator
    items = [
        {
            "firm_id": row[F_ID],
            "name": row[F_NAME],
            "region": row[F_REGION],
            "city": row[F_CITY],
            "actor_type": row[F_ACTOR],
            "industries": row[F_INDUSTRIES],
            "is_operator": row[F_ID] == operator,
            "park_id": row[M_PARK],
            "joined_at": row[M_JOINED],
        }
        for row in rows[:limit]
    ]
    more = len(rows) > limit
    return {"items": items, "next_cursor": encode_cursor(rows[limit - 1][M_ID]) if more else None}
