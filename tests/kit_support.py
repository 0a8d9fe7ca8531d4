"""Helpers for the kit's own tests: a tiny service, its tables, tokens, a TCP proxy.

The kit is exercised on real engines only: SQLite files (or a fresh PostgreSQL database)
and a real Redis. Nothing here replaces a database or Redis with a fake; the
:class:`TcpProxy` sits *in front of* the real Redis so a test can cut it off and bring it
back the way a network failure would.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel, col

from services.kit.app import KitModels, ServiceSpec, create_service_app
from services.kit.auth import LocalJwksSource
from services.kit.db import Database
from services.kit.idempotency import IdempotencyFields
from services.kit.outbox import OutboxFields, ProcessedEventFields
from services.kit.runtime import Runtime
from services.kit.settings import Settings

SERVICE = "kittest"


class KitTestBase(SQLModel, registry=registry()):
    pass


class KitOutbox(OutboxFields, KitTestBase, table=True):
    __tablename__ = "outbox"


class KitIdempotencyKey(IdempotencyFields, KitTestBase, table=True):
    __tablename__ = "idempotency_keys"


class KitProcessedEvent(ProcessedEventFields, KitTestBase, table=True):
    __tablename__ = "processed_events"


class Item(KitTestBase, table=True):
    __tablename__ = "items"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200, unique=True)


class Applied(KitTestBase, table=True):
    """What a test consumer writes: one row per effect it applied."""

    __tablename__ = "applied"
    id: int | None = Field(default=None, primary_key=True)
    consumer: str = Field(max_length=80)
    event_id: str = Field(max_length=40)


metadata = KitTestBase.metadata


def database_url_for(tmp_path: Path, pg_url: str | None, name: str = SERVICE) -> str:
    """The fresh PostgreSQL database when the run has one, else a SQLite file."""
    if pg_url:
        return pg_url
    return f"sqlite:///{tmp_path / f'{name}.sqlite3'}"


async def create_tables(db: Database) -> None:
    if db.postgres:
        async with db.engine.begin() as conn:
            await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


@contextlib.asynccontextmanager
async def open_database(url: str, schema: str = SERVICE) -> AsyncIterator[Database]:
    db = Database(url, schema=schema, pool_size=5)
    try:
        await create_tables(db)
        yield db
    finally:
        await db.dispose()


async def count_rows(db: Database, model: Any, *where: Any) -> int:
    async with db.sessionmaker() as session:
        query = sa.select(sa.func.count()).select_from(model)
        if where:
            query = query.where(*where)
        return int((await session.execute(query)).scalar_one())


async def outbox_rows(db: Database) -> list[KitOutbox]:
    async with db.sessionmaker() as session:
        query = sa.select(KitOutbox).order_by(col(KitOutbox.id))
        return list((await session.execute(query)).scalars().all())


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Await ``condition`` becoming true; fails after a generous ``timeout``.

    This is a bound on how long a test may hang, never an assertion about speed.
    """
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- a tiny service built with the kit's factory ----------------------------------------


def build_app(
    settings: Settings,
    routers: Sequence[APIRouter],
    *,
    runtime: Runtime | None = None,
    on_startup: Sequence[Callable[[FastAPI], Awaitable[None]]] = (),
) -> FastAPI:
    async def make_tables(app: FastAPI) -> None:
        await create_tables(app.state.db)

    spec = ServiceSpec(
        name=SERVICE,
        title="kit test service",
        description="exercises the shared kit",
        routers=list(routers),
        models=KitModels(
            outbox=KitOutbox, idempotency=KitIdempotencyKey, processed_events=KitProcessedEvent
        ),
        migrations_dir=Path(__file__).parent / "no-migrations",
        on_startup=[make_tables, *on_startup],
    )
    return create_service_app(spec, settings.model_copy(update={"auto_migrate": False}), runtime)


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and give an HTTP client on it (app errors become 500s)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


# -- access tokens signed by a key the test holds ---------------------------------------


class TokenMint:
    """Signs RFC 9068 access tokens and serves its JWKS to a runtime in-process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key = RSAKey.generate_key(2048, parameters={"kid": "kit-test-key"})

    def install(self, runtime: Runtime) -> None:
        async def load() -> dict[str, Any]:
            return {"keys": [self.key.as_dict(private=False)]}

        runtime.local_jwks = LocalJwksSource(load)

    def token(self, subject: str, *, scope: str = "", firm_id: str | None = None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.settings.issuer,
            "aud": self.settings.token_audience,
            "sub": subject,
            "client_id": "kit-client",
            "jti": secrets.token_hex(8),
            "iat": now,
            "exp": now + 300,
            "scope": scope,
        }
        if firm_id:
            claims["firm_id"] = firm_id
        header = {"alg": "RS256", "typ": "at+jwt", "kid": "kit-test-key"}
        return jwt.encode(header, claims, self.key)


# -- a TCP proxy that can play "Redis is down" -------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``stop`` drops the listener and every
    connection, ``start`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            client_w.close()
            self._writers.discard(client_w)
            return
        self._writers.add(upstream_w)
        for reader, writer in ((client_r, upstream_w), (upstream_r, client_w)):
            task = asyncio.create_task(self._pipe(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
