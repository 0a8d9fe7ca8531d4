"""Local read models of another service's state, kept by its events: the convergence rule.

A consuming service keeps its own copy of what it needs from another service (the
marketplace, messaging and metrics each keep firms, firm members, cluster members and
clusters from membership's events). Every read-model row stores ``event_id``, the id of
the event that last wrote it. Event ids are time-ordered (``services.kit.ids``), so:

* an event for a row that does not exist yet inserts it;
* an event *newer* than the row's ``event_id`` overwrites the columns it knows and
  takes over ``event_id``;
* an event *older than or equal to* the row's ``event_id`` changes nothing: a newer
  event already wrote the row, or this very event did (a redelivery).

Applying the same set of events in any order, any number of times, therefore leaves
the same rows: the state of the newest event for each row. At-least-once delivery
(``consume_once`` already drops exact repeats) and reordering across replicas both
converge on the source's latest state.

Some events do not carry every column (``firm.member_removed`` has no role, a cluster
membership event carries the firm's profile but not its name): such columns are named
in ``keep`` and are written on insert only, so the later event does not blank what an
earlier one knew.

``user.deactivated`` is one event for many rows: :func:`deactivate_user_memberships`
applies it to each of the user's firm memberships by the same rule, row by row.

The mixins below are non-table SQLModel bases with the columns shared by the services'
``Known*`` tables; each service declares its own table classes on its own metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import JSON, Field, SQLModel, col, select


# -- shared columns ------------------------------------------------------------------
class KnownFirmFields(SQLModel):
    """A firm's profile (table ``firms``)."""

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    region: str = Field(max_length=10)
    city: str = Field(max_length=120)
    actor_type: str = Field(max_length=40)
    industries: list[str] = Field(default_factory=list, sa_type=JSON)
    event_id: str = Field(max_length=40)


class KnownFirmMemberFields(SQLModel):
    """A user's membership of a firm (table ``firm_members``)."""

    firm_id: str = Field(primary_key=True, max_length=40)
    user_id: str = Field(primary_key=True, max_length=40, index=True)
    role: str = Field(max_length=16)
    active: bool = True
    event_id: str = Field(max_length=40)


class KnownClusterMemberFields(SQLModel):
    """A firm's membership of a cluster (table ``cluster_members``)."""

    cluster_id: str = Field(primary_key=True, max_length=40)
    firm_id: str = Field(primary_key=True, max_length=40, index=True)
    active: bool = True
    event_id: str = Field(max_length=40)


# -- writing -------------------------------------------------------------------------
def pk_names(model: Any) -> list[str]:
    """The names of a table model's primary-key columns, in key order."""
    return [column.name for column in model.__table__.primary_key.columns]


async def upsert_if_newer(
    session: AsyncSession,
    model: Any,
    key: Any,
    event_id: str,
    values: Mapping[str, Any],
    *,
    keep: tuple[str, ...] = (),
    flush: bool = False,
) -> None:
    """Insert the row, or update it unless a newer event already wrote it.

    ``key`` is the primary key (a tuple for a composite one, in :func:`pk_names` order).
    ``keep`` names columns the event does not know: they are set on insert only.
    ``flush`` flushes a new row at once, for callers that go on to write the table
    with Core statements the session does not autoflush for.
    """
    row = await session.get(model, key, with_for_update=True)
    if row is None:
        keys = dict(zip(pk_names(model), key if isinstance(key, tuple) else (key,), strict=True))
        session.add(model(**keys, **values, event_id=event_id))
        if flush:
            await session.flush()
        return
    if row.event_id >= event_id:
        return
    for name, value in values.items():
        if name not in keep:
            setattr(row, name, value)
    row.event_id = event_id


async def deactivate_user_memberships(
    session: AsyncSession, model: Any, user_id: str, event_id: str
) -> None:
    """Mark every firm membership of ``user_id`` inactive, unless a newer event wrote it.

    ``model`` is a firm-member table (``user_id``, ``active``, ``event_id`` columns).
    """
    rows = await session.execute(select(model).where(col(model.user_id) == user_id))
    for member in rows.scalars():
        if member.event_id < event_id:
            member.active = False
            member.event_id = event_id
