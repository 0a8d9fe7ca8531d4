"""Metrics tables: the fact store, fed only by events and the history import.

*Read model* rows (``firms``, ``firm_members``, ``clusters``, ``memberships``, ``parks``)
keep the id of the event that last wrote them, so late or repeated events never
overwrite newer state. *Daily aggregates* (``collab_daily``, ``firm_activity``,
``channel_posts``, ``mention_daily``) are keyed by cluster, day and firms and grow by
upserts (``INSERT … ON CONFLICT DO UPDATE SET n = n + excluded.n``), one per event: the
service never recomputes them from scratch except in ``onecluster metrics rebuild``.
``imported_records`` is the operator's imported history, a source in its own right (a
rebuild re-derives its aggregate rows from it, it never deletes it).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import JSON, Field, SQLModel

from services.kit.db import UTCDateTime, utcnow
from services.kit.idempotency import IdempotencyFields
from services.kit.outbox import OutboxFields, ProcessedEventFields
from services.kit.readmodel import KnownFirmFields, KnownFirmMemberFields


class MetricsBase(SQLModel, registry=registry()):
    pass


def _ts(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kw)


# -- read model of membership --------------------------------------------------------
class Firm(KnownFirmFields, MetricsBase, table=True):
    __tablename__ = "firms"


class FirmMember(KnownFirmMemberFields, MetricsBase, table=True):
    __tablename__ = "firm_members"


class Cluster(MetricsBase, table=True):
    __tablename__ = "clusters"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    core_region: str = Field(max_length=10)
    operator_firm_id: str = Field(max_length=40)
    created_at: datetime = _ts()
    dirty: bool = Field(default=True, index=True)
    """Facts changed since the last recorded classification (the sweep reclassifies)."""
    event_id: str = Field(max_length=40)


class Membership(MetricsBase, table=True):
    """A firm's membership of a cluster over time: first joined, left (None while active)."""

    __tablename__ = "memberships"
    cluster_id: str = Field(primary_key=True, max_length=40)
    firm_id: str = Field(primary_key=True, max_length=40, index=True)
    park_id: str | None = Field(default=None, max_length=40)
    joined_at: datetime = _ts()
    left_at: datetime | None = _ts(default=None)
    event_id: str = Field(max_length=40)


class Park(MetricsBase, table=True):
    __tablename__ = "parks"
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40, index=True)
    name: str = Field(max_length=200)
    region: str = Field(max_length=10)
    capacity: int
    located_firm_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    event_id: str = Field(max_length=40)


# -- facts ---------------------------------------------------------------------------
class CollabDaily(MetricsBase, table=True):
    """Collaboration from ``source`` (requester, or first firm of a record) to ``target``.

    ``origin`` is ``observed`` (platform events) or ``imported`` (history import).
    """

    __tablename__ = "collab_daily"
    __table_args__ = (sa.Index("ix_collab_daily_cluster_day", "cluster_id", "day"),)
    cluster_id: str = Field(primary_key=True, max_length=40)
    day: date = Field(primary_key=True)
    source_firm_id: str = Field(primary_key=True, max_length=40)
    target_firm_id: str = Field(primary_key=True, max_length=40)
    kind: str = Field(primary_key=True, max_length=30)
    origin: str = Field(primary_key=True, max_length=10)
    weight: float = 0.0
    events: int = 0
    volume: int = Field(default=0, sa_type=sa.BigInteger)
    amount: int = Field(default=0, sa_type=sa.BigInteger)


class FirmActivity(MetricsBase, table=True):
    """Observed actions of a firm in a cluster on a day (publishing, working, messaging)."""

    __tablename__ = "firm_activity"
    cluster_id: str = Field(primary_key=True, max_length=40)
    day: date = Field(primary_key=True)
    firm_id: str = Field(primary_key=True, max_length=40)
    events: int = 0


class ChannelPosts(MetricsBase, table=True):
    __tablename__ = "channel_posts"
    __table_args__ = (sa.Index("ix_channel_posts_cluster_day", "cluster_id", "day"),)
    cluster_id: str = Field(primary_key=True, max_length=40)
    channel_id: str = Field(primary_key=True, max_length=40)
    day: date = Field(primary_key=True)
    firm_id: str = Field(primary_key=True, max_length=40)
    channel_kind: str = Field(max_length=16)
    messages: int = 0


class MentionDaily(MetricsBase, table=True):
    """Messages of one firm that mention another; the pair is stored sorted."""

    __tablename__ = "mention_daily"
    cluster_id: str = Field(primary_key=True, max_length=40)
    day: date = Field(primary_key=True)
    firm_a: str = Field(primary_key=True, max_length=40)
    firm_b: str = Field(primary_key=True, max_length=40)
    messages: int = 0


class TaskFact(MetricsBase, table=True):
    __tablename__ = "tasks"
    __table_args__ = (sa.Index("ix_tasks_cluster_published", "cluster_id", "published_at"),)
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40)
    requester_firm_id: str = Field(max_length=40)
    requester_region: str = Field(max_length=10)
    kind: str = Field(max_length=20)
    allocation: str = Field(max_length=16)
    item_count: int = 0
    published_at: datetime = _ts()
    first_claimed_at: datetime | None = _ts(default=None)
    first_submitted_at: datetime | None = _ts(default=None)
    completed_at: datetime | None = _ts(default=None)
    outcome: str | None = Field(default=None, max_length=16)
    accepted_annotations: int = 0


class TaskVendor(MetricsBase, table=True):
    """A firm that worked on a task (awarded a contract or submitted an answer)."""

    __tablename__ = "task_vendors"
    task_id: str = Field(primary_key=True, max_length=40)
    firm_id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40, index=True)
    region: str = Field(max_length=10)


class ImportedRecord(MetricsBase, table=True):
    """One line of an operator's history import (unique per cluster and external key)."""

    __tablename__ = "imported_records"
    __table_args__ = (sa.UniqueConstraint("cluster_id", "external_key"),)
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40, index=True)
    external_key: str = Field(max_length=200)
    firm_a: str = Field(max_length=40)
    firm_b: str = Field(max_length=40)
    kind: str = Field(max_length=30)
    weight: float
    day: date
    imported_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    imported_by: str = Field(max_length=64)


class Classification(MetricsBase, table=True):
    """A recorded classification: a new row whenever the label or the form changes."""

    __tablename__ = "classifications"
    __table_args__ = (sa.Index("ix_classifications_cluster_recorded", "cluster_id", "recorded_at"),)
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40)
    recorded_at: datetime = _ts()
    as_of: datetime = _ts()
    window_days: int
    label: str = Field(max_length=40)
    form: str | None = Field(default=None, max_length=40)
    agreement: float | None = None
    band: str | None = Field(default=None, max_length=10)
    config_version: str = Field(max_length=40)
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class ClusterSettings(MetricsBase, table=True):
    """The operator's metrics settings of a cluster: what member firms may read.

    No row means the defaults (nothing published to members).
    """

    __tablename__ = "cluster_settings"
    cluster_id: str = Field(primary_key=True, max_length=40)
    members_visible: bool = False
    updated_at: datetime = _ts()
    updated_by: str = Field(max_length=64)


# -- kit tables ----------------------------------------------------------------------
class MetricsOutbox(OutboxFields, MetricsBase, table=True):
    __tablename__ = "outbox"


class MetricsIdempotencyKey(IdempotencyFields, MetricsBase, table=True):
    __tablename__ = "idempotency_keys"


class MetricsProcessedEvent(ProcessedEventFields, MetricsBase, table=True):
    __tablename__ = "processed_events"


metadata = MetricsBase.metadata

FACT_TABLES = (
    Firm,
    FirmMember,
    Cluster,
    Membership,
    Park,
    CollabDaily,
    FirmActivity,
    ChannelPosts,
    MentionDaily,
    TaskFact,
    TaskVendor,
)
"""Everything events derive: emptied and replayed by a rebuild."""
