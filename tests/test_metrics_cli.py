"""``onecluster metrics rebuild`` run as the real command, in a process of its own.

The test's platform builds a cluster with marketplace work, a channel message and an
imported history; the command then runs with the same ``ONECLUSTER_*`` settings (the
SQLite files of the data dir, or the test's PostgreSQL database) and must leave every
fact table and every view exactly as the live consumer built them.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import httpx
import sqlalchemy as sa

from services.kit.settings import Settings
from services.metrics.consumers import TYPES
from services.metrics.models import FACT_TABLES, Cluster
from tests.messaging_support import settle as settle_messaging
from tests.metrics_support import (
    PRODUCERS,
    World,
    build_cluster,
    do_work,
    import_history,
    record,
    settle_metrics,
)
from tests.oauth_flow import bearer
from tests.served import ROOT

FIRMS = {
    "core": ("CN-BJ", "large_enterprise", ["0301", "0406"]),
    "uni": ("CN-BJ", "university", ["0406"]),
    "sx": ("CN-SX", "small_micro_enterprise", ["0304"]),
    "nm": ("CN-NM", "small_micro_enterprise", ["0304"]),
}
VIEWS = ("indicators", "network", "diagnostics")
OUTPUT = re.compile(r"metrics: replayed (\d+) of (\d+) events, kept (\d+) imported records")


def cli_env(settings: Settings) -> dict[str, str]:
    """The test app's settings as the environment of a ``onecluster`` process (as in
    ``tests/served.py``: the run's own environment minus every ``ONECLUSTER_`` variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONECLUSTER_")}
    env.update(
        {
            "ONECLUSTER_ENV": settings.env,
            "ONECLUSTER_SECRET_KEY": settings.secret_key.get_secret_value(),
            "ONECLUSTER_REDIS_PREFIX": settings.redis_prefix,
        }
    )
    if settings.database_url:
        env["ONECLUSTER_DATABASE_URL"] = settings.database_url
    if settings.redis_url:
        env["ONECLUSTER_REDIS_URL"] = settings.redis_url
    return env


async def fact_tables(gateway: Any) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table a rebuild derives, in a stable order."""
    out: dict[str, list[dict[str, Any]]] = {}
    async with gateway.apps["metrics"].state.db.sessionmaker() as session:
        for model in FACT_TABLES:
            table: sa.Table = model.__table__  # type: ignore[union-attr]
            # ``clusters.dirty`` is the sweep's bookkeeping (a rebuild marks every
            # cluster for reclassification), not a fact.
            columns = [c for c in table.c if not (model is Cluster and c.name == "dirty")]
            rows = (await session.execute(sa.select(*columns))).mappings().all()
            out[table.name] = sorted((dict(r) for r in rows), key=repr)
    return out


async def views(client: httpx.AsyncClient, world: World, as_of: str) -> dict[str, Any]:
    out = {}
    for view in VIEWS:
        response = await client.get(
            f"/v1/clusters/{world.cluster_id}/{view}",
            params={"as_of": as_of},
            headers=bearer(world.operator_tokens),
        )
        assert response.status_code == 200, response.text
        out[view] = response.json()
    return out


async def consumed_events(gateway: Any) -> int:
    """Events of the types metrics reads in the three producers' outboxes."""
    total = 0
    for name in PRODUCERS:
        async with gateway.apps[name].state.db.sessionmaker() as session:
            kinds = (await session.execute(sa.text("SELECT type FROM outbox"))).scalars()
            total += sum(1 for kind in kinds if kind in TYPES)
    return total


async def test_metrics_rebuild_command_replays_the_outboxes_into_the_same_facts(
    client: httpx.AsyncClient, gateway: Any, settings: Settings
) -> None:
    world = await build_cluster(client, gateway, "cli", FIRMS)
    await do_work(client, gateway, world, "core", "sx", items=3)
    await do_work(client, gateway, world, "core", "nm", items=2)
    await settle_messaging(gateway)
    general = await client.get(
        "/v1/channels",
        params={"cluster_id": world.cluster_id, "kind": "general"},
        headers=bearer(world.operator_tokens),
    )
    assert general.status_code == 200, general.text
    (channel,) = general.json()["items"]
    posted = await client.post(
        f"/v1/channels/{channel['id']}/messages",
        json={"text": "welcome"},
        headers=bearer(world.operator_tokens),
    )
    assert posted.status_code == 201, posted.text
    lines = [
        record(world, "core", "uni", "joint_project", 0.5, 15, ext="j-1"),
        record(world, "core", "sx", "contract", 1.0, 40, ext="c-1"),
    ]
    assert (await import_history(client, world, lines)).status_code == 200
    await settle_metrics(gateway)

    as_of = datetime.now(UTC).isoformat()
    facts_before = await fact_tables(gateway)
    views_before = await views(client, world, as_of)
    # The store holds what every producer fed it, so a rebuild that only emptied the
    # tables (and re-added the imported history) could not compare equal below.
    for table in (
        "firms",
        "clusters",
        "memberships",
        "collab_daily",
        "firm_activity",
        "channel_posts",
        "tasks",
        "task_vendors",
    ):
        assert facts_before[table], f"{table} is empty before the rebuild"
    assert {r["origin"] for r in facts_before["collab_daily"]} == {"observed", "imported"}
    expected_events = await consumed_events(gateway)

    command = [sys.executable, "-m", "api.cli", "metrics", "rebuild"]
    command += ["--data-dir", str(settings.data_dir)]
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=ROOT,
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = OUTPUT.search(done.stdout)
    assert match, done.stdout + done.stderr
    applied, read, kept = map(int, match.groups())
    assert read == expected_events > 0
    assert applied == read
    assert kept == len(lines)

    assert await fact_tables(gateway) == facts_before
    assert await views(client, world, as_of) == views_before
    # Every replayed event is recorded as handled: the live consumer skips them.
    await settle_metrics(gateway)
