"""Shared fixtures.

Every test gets a fresh platform: on the embedded default, SQLite files in its own
temporary folder and the in-process bus; with ``ONECLUSTER_TEST_DATABASE_URL`` set, a
fresh PostgreSQL database cloned from a migrated template; with
``ONECLUSTER_TEST_REDIS_URL`` set, Redis under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.gateway import Gateway, create_gateway, service_factories
from services.kit.settings import Settings

PG_URL = os.environ.get("ONECLUSTER_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("ONECLUSTER_TEST_REDIS_URL")

requires_postgres = pytest.mark.skipif(not PG_URL, reason="needs ONECLUSTER_TEST_DATABASE_URL")
requires_redis = pytest.mark.skipif(not REDIS_URL, reason="needs ONECLUSTER_TEST_REDIS_URL")


# -- hang diagnostics ----------------------------------------------------------------
# pytest-timeout (``timeout`` in pyproject.toml) fails a test that runs too long. Shortly
# before, this watchdog prints what every thread and every asyncio task is waiting on, so
# a hang in CI says where it hangs rather than only that it did.
HANG_REPORT_MARGIN = 30.0


def _dump_asyncio_tasks() -> None:
    loops = [
        o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()
    ]
    for loop in loops:
        for _ in range(3):  # the set of tasks may change under us: try again
            try:
                tasks = list(asyncio.all_tasks(loop))
                break
            except RuntimeError:
                continue
        else:
            continue
        print(f"--- {len(tasks)} asyncio tasks of {loop!r}", file=sys.stderr)
        for task in tasks:
            try:
                task.print_stack(limit=12, file=sys.stderr)
            except Exception as error:  # a task finishing under us
                print(f"{task!r}: {error!r}", file=sys.stderr)


def _report_hang(nodeid: str) -> None:
    print(f"\n=== {nodeid} is still running: stacks follow ===", file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    _dump_asyncio_tasks()
    sys.stderr.flush()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    limit = float(item.config.getini("timeout") or 0)
    marker = item.get_closest_marker("timeout")
    if marker and marker.args:
        limit = float(marker.args[0])
    watchdog = None
    if limit > HANG_REPORT_MARGIN:
        watchdog = threading.Timer(limit - HANG_REPORT_MARGIN, _report_hang, (item.nodeid,))
        watchdog.daemon = True
        watchdog.start()
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.cancel()


class PostgresDatabases:
    """Creates databases on the test server, each a copy of one migrated template."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.base = sa.engine.make_url(url).set(drivername="postgresql+psycopg")
        self.admin = sa.create_engine(self.base, isolation_level="AUTOCOMMIT", pool_size=1)
        self.prefix = f"oc_t_{os.getpid()}_{secrets.token_hex(3)}"
        self.template = f"{self.prefix}_tmpl"
        self.created: list[str] = []

    def url_of(self, name: str) -> str:
        return self.base.set(database=name).render_as_string(hide_password=False)

    def build_template(self) -> None:
        from services.kit.db import Database

        self._execute(f'CREATE DATABASE "{self.template}"')
        self.created.append(self.template)
        for name, factory in service_factories().items():
            module = __import__(factory.__module__, fromlist=["SPEC"])
            db = Database(self.url_of(self.template), schema=name)
            db.migrate_sync(module.SPEC.migrations_dir)
            db.sync_engine.dispose()

    def fresh(self) -> str:
        name = f"{self.prefix}_{secrets.token_hex(4)}"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.created.append(name)
        return self.url_of(name)

    def drop(self, url: str) -> None:
        name = self.sa.engine.make_url(url).database
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in reversed(list(self.created)):
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()
        self.admin.dispose()

    def _execute(self, sql: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(self.sa.text(sql))


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PostgresDatabases | None]:
    if not PG_URL:
        yield None
        return
    dbs = PostgresDatabases(PG_URL)
    dbs.build_template()
    try:
        yield dbs
    finally:
        dbs.drop_all()


@pytest.fixture
def database_url(pg_databases: PostgresDatabases | None) -> Iterator[str | None]:
    if pg_databases is None:
        yield None
        return
    url = pg_databases.fresh()
    yield url
    pg_databases.drop(url)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"oc_t_{secrets.token_hex(6)}"
    yield prefix
    if REDIS_URL:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def make_settings(
    tmp_path: Path, database_url: str | None, redis_prefix: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "secret_key": "test-secret-" + secrets.token_hex(8),
        "data_dir": tmp_path / "var",
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "redis_prefix": redis_prefix,
        "public_url": "http://testserver",
        "web_redirect_uris": ["http://127.0.0.1:8000/oauth/callback", "http://testserver/cb"],
        "outbox_poll_interval": 0.2,
        "log_json": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Settings:
    return make_settings(tmp_path, database_url, redis_prefix)


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    gw = create_gateway(settings)
    async with gw.lifespan():
        yield gw


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c
