"""The read-model kit: a row keeps the newest event that wrote it, whatever the order.

Runs on a SQLite file, or on a fresh PostgreSQL database when the run has one, with
tables of its own built from the kit's ``Known*`` column mixins.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from kit_support import database_url_for
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from services.kit.db import Database
from services.kit.ids import new_id
from services.kit.readmodel import (
    KnownClusterMemberFields,
    KnownFirmFields,
    KnownFirmMemberFields,
    deactivate_user_memberships,
    pk_names,
    upsert_if_newer,
)

SCHEMA = "readmodeltest"


class ReadModelTestBase(SQLModel, registry=registry()):
    pass


class Firm(KnownFirmFields, ReadModelTestBase, table=True):
    __tablename__ = "firms"


class FirmMember(KnownFirmMemberFields, ReadModelTestBase, table=True):
    __tablename__ = "firm_members"


class ClusterMember(KnownClusterMemberFields, ReadModelTestBase, table=True):
    __tablename__ = "cluster_members"


class Cluster(ReadModelTestBase, table=True):
    __tablename__ = "clusters"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    event_id: str = Field(max_length=40)


@pytest.fixture
async def db(tmp_path: Path, database_url: str | None) -> AsyncIterator[Database]:
    database = Database(database_url_for(tmp_path, database_url, SCHEMA), schema=SCHEMA)
    try:
        if database.postgres:
            async with database.engine.begin() as conn:
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{SCHEMA}"'))
        async with database.engine.begin() as conn:
            await conn.run_sync(ReadModelTestBase.metadata.create_all)
        yield database
    finally:
        await database.dispose()


def event_ids(n: int) -> list[str]:
    """``n`` event ids, oldest first (ids are time-ordered)."""
    ids = [new_id("evt") for _ in range(n)]
    assert ids == sorted(ids)
    return ids


def profile(name: str, city: str = "Taiyuan") -> dict[str, Any]:
    return {
        "name": name,
        "region": "CN-SX",
        "city": city,
        "actor_type": "small_micro_enterprise",
        "industries": ["0304"],
    }


async def write(
    db: Database, model: Any, key: Any, event_id: str, values: dict[str, Any], **kw: Any
) -> None:
    async with db.session_scope() as session:
        await upsert_if_newer(session, model, key, event_id, values, **kw)


async def fetch(db: Database, model: Any, key: Any) -> Any:
    async with db.read_scope() as session:
        return await session.get(model, key)


async def test_pk_names_follow_the_key_order() -> None:
    assert pk_names(Firm) == ["id"]
    assert pk_names(FirmMember) == ["firm_id", "user_id"]
    assert pk_names(ClusterMember) == ["cluster_id", "firm_id"]


async def test_first_event_inserts_the_row(db: Database) -> None:
    (e1,) = event_ids(1)
    await write(db, Firm, "firm_a", e1, profile("Alpha"))
    await write(db, FirmMember, ("firm_a", "user_a"), e1, {"role": "admin", "active": True})

    firm = await fetch(db, Firm, "firm_a")
    assert (firm.name, firm.city, firm.industries, firm.event_id) == (
        "Alpha",
        "Taiyuan",
        ["0304"],
        e1,
    )
    member = await fetch(db, FirmMember, ("firm_a", "user_a"))
    assert (member.role, member.active, member.event_id) == ("admin", True, e1)


async def test_newer_event_updates_the_row(db: Database) -> None:
    e1, e2 = event_ids(2)
    await write(db, Firm, "firm_a", e1, profile("Alpha"))
    await write(db, Firm, "firm_a", e2, profile("Alpha Ltd", city="Datong"))

    firm = await fetch(db, Firm, "firm_a")
    assert (firm.name, firm.city, firm.event_id) == ("Alpha Ltd", "Datong", e2)


async def test_older_or_same_event_is_ignored(db: Database) -> None:
    e1, e2 = event_ids(2)
    await write(db, Firm, "firm_a", e2, profile("Newer"))
    await write(db, Firm, "firm_a", e1, profile("Older", city="Datong"))  # late
    await write(db, Firm, "firm_a", e2, profile("Redelivered", city="Datong"))  # again

    firm = await fetch(db, Firm, "firm_a")
    assert (firm.name, firm.city, firm.event_id) == ("Newer", "Taiyuan", e2)


async def test_any_order_converges_on_the_newest_event(db: Database) -> None:
    events = list(zip(event_ids(3), ("one", "two", "three"), strict=True))
    for n, order in enumerate(itertools.permutations(events)):
        key = f"cluster_{n}"
        for event_id, name in order:
            await write(db, Cluster, key, event_id, {"name": name})
        cluster = await fetch(db, Cluster, key)
        assert (cluster.name, cluster.event_id) == ("three", events[-1][0])


async def test_keep_columns_are_set_on_insert_only(db: Database) -> None:
    e1, e2, e3 = event_ids(3)
    key = ("firm_a", "user_a")
    # An event that does not know the role still inserts one (it is required) ...
    await write(db, FirmMember, key, e1, {"role": "member", "active": True}, keep=("role",))
    member = await fetch(db, FirmMember, key)
    assert (member.role, member.active) == ("member", True)

    # ... but never overwrites the role an earlier event set.
    await write(db, FirmMember, key, e2, {"role": "admin", "active": True})
    await write(db, FirmMember, key, e3, {"role": "member", "active": False}, keep=("role",))
    member = await fetch(db, FirmMember, key)
    assert (member.role, member.active, member.event_id) == ("admin", False, e3)


async def test_flush_makes_a_new_row_visible_to_core_statements(db: Database) -> None:
    (e1,) = event_ids(1)
    table = ClusterMember.__table__  # type: ignore[attr-defined]
    count = sa.select(sa.func.count()).select_from(table)
    async with db.session_scope() as session:
        await upsert_if_newer(session, ClusterMember, ("clu_a", "firm_a"), e1, {"active": True})
        assert (await (await session.connection()).execute(count)).scalar_one() == 0
    async with db.session_scope() as session:
        await upsert_if_newer(
            session, ClusterMember, ("clu_a", "firm_b"), e1, {"active": True}, flush=True
        )
        assert (await (await session.connection()).execute(count)).scalar_one() == 2


async def test_deactivation_touches_only_the_users_older_rows(db: Database) -> None:
    before, deactivated, after = event_ids(3)
    await write(db, FirmMember, ("firm_a", "user_a"), before, {"role": "admin", "active": True})
    await write(db, FirmMember, ("firm_b", "user_a"), after, {"role": "member", "active": True})
    await write(db, FirmMember, ("firm_a", "user_b"), before, {"role": "member", "active": True})

    async with db.session_scope() as session:
        await deactivate_user_memberships(session, FirmMember, "user_a", deactivated)

    older = await fetch(db, FirmMember, ("firm_a", "user_a"))
    assert (older.active, older.role, older.event_id) == (False, "admin", deactivated)
    # A membership written after the deactivation (a re-add) stays as that event left it.
    newer = await fetch(db, FirmMember, ("firm_b", "user_a"))
    assert (newer.active, newer.event_id) == (True, after)
    # Other users are untouched.
    other = await fetch(db, FirmMember, ("firm_a", "user_b"))
    assert (other.active, other.event_id) == (True, before)

    # Redelivered, the deactivation changes nothing more.
    async with db.session_scope() as session:
        await deactivate_user_memberships(session, FirmMember, "user_a", deactivated)
    assert (await fetch(db, FirmMember, ("firm_b", "user_a"))).active is True
