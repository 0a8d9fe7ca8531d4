"""The facts of one cluster in one window, read from the fact store in a few queries.

A window is ``window_days`` calendar days (UTC) ending with the day of ``as_of``. The
members are the firms that belong to the cluster at ``as_of`` (or, having joined later,
appear in its imported history by then); collaboration, tasks and
conversations count only between members. The previous window (for industry renewal)
and the same window a year earlier are read as plain tie lists.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import combinations
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.metrics.models import (
    ChannelPosts,
    CollabDaily,
    Firm,
    FirmActivity,
    ImportedRecord,
    Membership,
    MentionDaily,
    TaskFact,
    TaskVendor,
)


@dataclass(frozen=True)
class FirmFact:
    id: str
    region: str
    actor_type: str
    industries: tuple[str, ...] = ()


class Tie(NamedTuple):
    """Collaboration summed over the window for (source, target, kind, origin).

    A named tuple: a large cluster's windows hold hundreds of thousands of them.
    """

    source: str
    target: str
    kind: str
    origin: str = "observed"
    weight: float = 1.0
    events: int = 1
    volume: int = 0
    amount: int = 0


@dataclass(frozen=True)
class TaskRecord:
    id: str
    requester_firm_id: str
    requester_region: str
    vendor_regions: frozenset[str]
    published_at: datetime
    first_claimed_at: datetime | None = None
    first_submitted_at: datetime | None = None
    completed_at: datetime | None = None
    outcome: str | None = None
    item_count: int = 0


@dataclass
class ClusterFacts:
    cluster_id: str
    as_of: datetime
    window_days: int
    members: dict[str, FirmFact]
    ties: list[Tie] = field(default_factory=list)
    previous_ties: list[Tie] = field(default_factory=list)
    year_ago_ties: list[Tie] = field(default_factory=list)
    firms: dict[str, FirmFact] = field(default_factory=dict)
    """Every firm the tie lists mention (members and former members)."""
    tasks: list[TaskRecord] = field(default_factory=list)
    activity: dict[str, set[date]] = field(default_factory=dict)
    """Days on which each member acted on the platform (observed only)."""
    conversations: dict[tuple[str, str], int] = field(default_factory=dict)
    """Messages between two member firms (sorted pair) in the window."""
    first_day: date | None = None

    @property
    def end_day(self) -> date:
        return self.as_of.date()

    @property
    def start_day(self) -> date:
        return self.end_day - timedelta(days=self.window_days - 1)

    def firm(self, firm_id: str) -> FirmFact | None:
        return self.members.get(firm_id) or self.firms.get(firm_id)


async def load_facts(
    session: AsyncSession, cluster_id: str, as_of: datetime, window_days: int
) -> ClusterFacts:
    """Every fact the indicators, the network and the classifier of one window need."""
    end = as_of.date()
    start = end - timedelta(days=window_days - 1)
    members = await _members(session, cluster_id, as_of)
    facts = ClusterFacts(cluster_id, as_of, window_days, members)
    facts.ties = [
        t
        for t in await _ties(session, cluster_id, start, end)
        if t.source in members and t.target in members
    ]
    facts.previous_ties = await _ties(
        session, cluster_id, start - timedelta(days=window_days), start - timedelta(days=1)
    )
    facts.year_ago_ties = await _ties(
        session, cluster_id, start - timedelta(days=365), end - timedelta(days=365)
    )
    mentioned = {
        f
        for t in (*facts.previous_ties, *facts.year_ago_ties)
        for f in (t.source, t.target)
        if f not in members
    }
    if mentioned:
        rows = await session.execute(select(Firm).where(col(Firm.id).in_(mentioned)))
        facts.firms = {f.id: _firm_fact(f) for f in rows.scalars()}
    facts.tasks = await _tasks(session, cluster_id, start, end, members)
    activity: dict[str, set[date]] = defaultdict(set)
    for firm_id, day in (
        await session.execute(
            sa.select(col(FirmActivity.firm_id), col(FirmActivity.day)).where(
                col(FirmActivity.cluster_id) == cluster_id,
                col(FirmActivity.day) >= start,
                col(FirmActivity.day) <= end,
            )
        )
    ).all():
        if firm_id in members:
            activity[firm_id].add(day)
    facts.activity = dict(activity)
    facts.conversations = await _conversations(session, cluster_id, start, end, members)
    firsts = [
        (
            await session.execute(
                sa.select(sa.func.min(table.c.day)).where(
                    table.c.cluster_id == cluster_id, table.c.day <= end
                )
            )
        ).scalar()
        for table in (_table(CollabDaily), _table(FirmActivity))
    ]
    known = [d if isinstance(d, date) else date.fromisoformat(str(d)) for d in firsts if d]
    facts.first_day = min(known) if known else None
    return facts


async def _members(session: AsyncSession, cluster_id: str, as_of: datetime) -> dict[str, FirmFact]:
    """Firms in the cluster at ``as_of``: joined by then and not yet left.

    A firm that joined on the platform later but whose imported history shows it
    collaborating in the cluster on or before the day of ``as_of`` counts from its first
    imported record: the import brings the cluster's past, members included.
    """
    rows = (
        await session.execute(
            select(Firm, col(Membership.joined_at))
            .join(Membership, col(Membership.firm_id) == col(Firm.id))
            .where(
                col(Membership.cluster_id) == cluster_id,
                sa.or_(col(Membership.left_at).is_(None), col(Membership.left_at) > as_of),
            )
        )
    ).all()
    later = {firm.id for firm, joined_at in rows if joined_at > as_of}
    backdated: set[str] = set()
    if later:
        r = _table(ImportedRecord).c
        day = as_of.date()
        for column in (r.firm_a, r.firm_b):
            backdated |= set(
                (
                    await session.execute(
                        sa.select(column)
                        .where(r.cluster_id == cluster_id, r.day <= day, column.in_(later))
                        .distinct()
                    )
                ).scalars()
            )
    return {
        firm.id: _firm_fact(firm)
        for firm, joined_at in rows
        if joined_at <= as_of or firm.id in backdated
    }


def _table(model: Any) -> sa.Table:
    table: sa.Table = model.__table__
    return table


def _firm_fact(firm: Firm) -> FirmFact:
    return FirmFact(firm.id, firm.region, firm.actor_type, tuple(firm.industries or ()))


async def _ties(session: AsyncSession, cluster_id: str, start: date, end: date) -> list[Tie]:
    c = _table(CollabDaily).c
    rows = await session.execute(
        sa.select(
            c.source_firm_id,
            c.target_firm_id,
            c.kind,
            c.origin,
            sa.func.sum(c.weight),
            sa.func.sum(c.events),
            sa.func.sum(c.volume),
            sa.func.sum(c.amount),
        )
        .where(c.cluster_id == cluster_id, c.day >= start, c.day <= end)
        .group_by(c.source_firm_id, c.target_firm_id, c.kind, c.origin)
        .order_by(c.source_firm_id, c.target_firm_id, c.kind, c.origin)
    )
    return [
        Tie(s, t, k, o, float(w or 0), int(e or 0), int(v or 0), int(a or 0))
        for s, t, k, o, w, e, v, a in rows.all()
    ]


async def _tasks(
    session: AsyncSession, cluster_id: str, start: date, end: date, members: dict[str, FirmFact]
) -> list[TaskRecord]:
    lo = datetime.combine(start, datetime.min.time()).replace(tzinfo=UTC)
    hi = datetime.combine(end + timedelta(days=1), datetime.min.time()).replace(tzinfo=UTC)
    t = _table(TaskFact).c
    rows = (
        await session.execute(
            sa.select(
                t.id,
                t.requester_firm_id,
                t.requester_region,
                t.published_at,
                t.first_claimed_at,
                t.first_submitted_at,
                t.completed_at,
                t.outcome,
                t.item_count,
            )
            .where(t.cluster_id == cluster_id, t.published_at >= lo, t.published_at < hi)
            .order_by(t.id)
        )
    ).all()
    if not rows:
        return []
    vendors: dict[str, set[str]] = defaultdict(set)
    # A join on the window rather than an IN list of every task id (tens of thousands).
    for task_id, firm_id, region in (
        await session.execute(
            sa.select(col(TaskVendor.task_id), col(TaskVendor.firm_id), col(TaskVendor.region))
            .select_from(_table(TaskVendor))
            .join(_table(TaskFact), col(TaskFact.id) == col(TaskVendor.task_id))
            .where(
                col(TaskFact.cluster_id) == cluster_id,
                col(TaskFact.published_at) >= lo,
                col(TaskFact.published_at) < hi,
            )
        )
    ).all():
        if firm_id in members:
            vendors[task_id].add(region)
    return [
        TaskRecord(
            id=task_id,
            requester_firm_id=requester,
            requester_region=region,
            vendor_regions=frozenset(vendors.get(task_id, ())),
            published_at=published,
            first_claimed_at=claimed,
            first_submitted_at=submitted,
            completed_at=completed,
            outcome=outcome,
            item_count=items,
        )
        for (
            task_id,
            requester,
            region,
            published,
            claimed,
            submitted,
            completed,
            outcome,
            items,
        ) in rows
        if requester in members
    ]


async def _conversations(
    session: AsyncSession, cluster_id: str, start: date, end: date, members: dict[str, FirmFact]
) -> dict[tuple[str, str], int]:
    """Messages between two firms: direct channels both posted in, plus mentions."""
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    channels: dict[str, dict[str, int]] = defaultdict(dict)
    cp, md = _table(ChannelPosts).c, _table(MentionDaily).c
    for channel_id, firm_id, messages in (
        await session.execute(
            sa.select(cp.channel_id, cp.firm_id, sa.func.sum(cp.messages))
            .where(
                cp.cluster_id == cluster_id,
                cp.channel_kind == "direct",
                cp.day >= start,
                cp.day <= end,
            )
            .group_by(cp.channel_id, cp.firm_id)
        )
    ).all():
        if firm_id in members:
            channels[channel_id][firm_id] = int(messages)
    for posters in channels.values():
        total = sum(posters.values())
        for a, b in combinations(sorted(posters), 2):
            pairs[(a, b)] += total
    for a, b, messages in (
        await session.execute(
            sa.select(md.firm_a, md.firm_b, sa.func.sum(md.messages))
            .where(md.cluster_id == cluster_id, md.day >= start, md.day <= end)
            .group_by(md.firm_a, md.firm_b)
        )
    ).all():
        if a in members and b in members:
            pairs[(a, b)] += int(messages)
    return dict(pairs)
