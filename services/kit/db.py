"""Database engines, sessions and migrations for one service.

Each service owns one database: a SQLite file in embedded mode, or its own schema in
PostgreSQL (selected through ``search_path``, so tables and Alembic's version table
never leave it). Engines are built in the app lifespan, never at import time.

One owner per transaction: :func:`session_scope` (and the request dependency built on
it) commits on success and rolls back on error; domain functions only ``flush()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from services.kit.telemetry import apply_pending_counts

log = logging.getLogger("onecluster.db")
READ_ONLY = "onecluster_read_only"  # execution option marking a read-only session


def _split(url: str) -> URL:
    parsed = make_url(url)
    if parsed.drivername.startswith("postgres"):
        return parsed.set(drivername="postgresql")
    if parsed.drivername.startswith("sqlite"):
        return parsed.set(drivername="sqlite")
    raise ValueError(f"unsupported database URL scheme: {parsed.drivername}")


def is_postgres(url: str) -> bool:
    return _split(url).drivername == "postgresql"


class ReadOnlySession(Session):
    """A session that refuses to flush changes: reads only, rolled back at the end."""

    def flush(self, objects: Any = None) -> None:
        if self.new or self.dirty or self.deleted:
            raise RuntimeError("a read-only session cannot write; use session_scope")
        super().flush(objects)


class Database:
    """The engines of one service's database, plus the hooks run after each commit."""

    def __init__(self, url: str, *, schema: str, pool_size: int = 10) -> None:
        self.url = _split(url)
        self.schema = schema
        self.pool_size = pool_size
        self.postgres = self.url.drivername == "postgresql"
        self.engine: AsyncEngine = self._async_engine()
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessionmaker = async_sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}),
            expire_on_commit=False,
            sync_session_class=ReadOnlySession,
        )
        self._sync_engine: Engine | None = None
        self._sync_sessionmaker: sessionmaker[Session] | None = None
        self._sync_read_sessionmaker: sessionmaker[Session] | None = None
        self.after_commit: list[Callable[[AsyncSession], None]] = [apply_pending_counts]

    # -- engines ---------------------------------------------------------------------
    def _async_engine(self) -> AsyncEngine:
        if self.postgres:
            engine = create_async_engine(
                self.url.set(drivername="postgresql+asyncpg"),
                pool_size=self.pool_size,
                max_overflow=self.pool_size,
                pool_pre_ping=True,
                connect_args={"server_settings": {"search_path": self.schema}},
            )
        else:
            self._ensure_sqlite_dir()
            engine = create_async_engine(
                self.url.set(drivername="sqlite+aiosqlite"),
                connect_args={"timeout": 30, "isolation_level": None},
            )
            _serialise_sqlite(engine.sync_engine)
        return engine

    @property
    def sync_engine(self) -> Engine:
        """A synchronous engine on the same database, for code that must run in a thread."""
        if self._sync_engine is None:
            if self.postgres:
                self._sync_engine = sa.create_engine(
                    self.url.set(drivername="postgresql+psycopg"),
                    pool_size=max(2, self.pool_size // 2),
                    pool_pre_ping=True,
                    connect_args={"options": f"-csearch_path={self.schema}"},
                )
            else:
                self._sync_engine = sa.create_engine(
                    self.url.set(drivername="sqlite+pysqlite"),
                    connect_args={
                        "timeout": 30,
                        "isolation_level": None,
                        "check_same_thread": False,
                    },
                )
                _serialise_sqlite(self._sync_engine)
        return self._sync_engine

    @property
    def sync_sessionmaker(self) -> sessionmaker[Session]:
        if self._sync_sessionmaker is None:
            self._sync_sessionmaker = sessionmaker(self.sync_engine, expire_on_commit=False)
        return self._sync_sessionmaker

    def _ensure_sqlite_dir(self) -> None:
        database = self.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._sync_engine is not None:
            self._sync_engine.dispose()

    # -- transactions ----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def session_scope(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
        for hook in self.after_commit:
            hook(session)

    @contextlib.asynccontextmanager
    async def read_scope(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only: on SQLite its transaction does not take the write lock.

        Readers then never queue behind writers (WAL lets them read a consistent snapshot
        while a writer works), and a reader opened while the same thread holds the write
        lock cannot deadlock on it. Nothing is committed; writing in it is a bug.
        """
        async with self.read_sessionmaker() as session:
            # Closing (not rolling back) keeps loaded objects readable after the scope;
            # the pool rolls the connection back when it takes it back.
            yield session

    @contextlib.contextmanager
    def sync_session_scope(self) -> Iterator[Session]:
        with self.sync_sessionmaker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextlib.contextmanager
    def sync_read_scope(self) -> Iterator[Session]:
        """:meth:`read_scope` for code that runs in a worker thread."""
        if self._sync_read_sessionmaker is None:
            self._sync_read_sessionmaker = sessionmaker(
                self.sync_engine.execution_options(**{READ_ONLY: True}),
                expire_on_commit=False,
                class_=ReadOnlySession,
            )
        with self._sync_read_sessionmaker() as session:
            yield session

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # -- migrations ------------------------------------------------------------------
    async def migrate(self, migrations_dir: Path, revision: str = "heads") -> None:
        """Bring the schema to ``revision`` (every head by default) with its Alembic tree."""
        await asyncio.to_thread(self.migrate_sync, migrations_dir, revision)

    def migrate_sync(self, migrations_dir: Path, revision: str = "heads") -> None:
        from alembic import command
        from alembic.config import Config

        if self.postgres:
            with self.sync_engine.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir))
        with self.sync_engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)


def _serialise_sqlite(engine: Engine) -> None:
    """SQLite: WAL, foreign keys, and ``BEGIN IMMEDIATE`` so writers queue, never deadlock.

    SQLite allows one writer. A deferred transaction that reads and later writes can fail
    at once with "database is locked" when another writer got in between; taking the write
    lock at ``BEGIN`` makes every transaction wait its turn (``timeout``) instead. This is
    the serialised equivalent of the row locks used on PostgreSQL.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Readers (``read_scope``) take a deferred snapshot and never the write lock.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def run_alembic_env(target_metadata: sa.MetaData) -> None:
    """The body of every service's ``migrations/env.py``."""
    from alembic import context

    connection = context.config.attributes.get("connection")
    if connection is None:  # pragma: no cover - the CLI always passes a connection
        raise RuntimeError("migrations run through `onecluster migrate`")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both engines (SQLite drops the zone otherwise)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_revision(url: str, schema: str, migrations_dir: Path, message: str) -> None:
    """Autogenerate a new revision of one service's tree against an up-to-date database."""
    from alembic import command
    from alembic.config import Config

    db = Database(url, schema=schema)
    db.migrate_sync(migrations_dir)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    with db.sync_engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True)
