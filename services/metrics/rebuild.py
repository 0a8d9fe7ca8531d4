"""Rebuild the fact store by replaying the event streams (``onecluster metrics rebuild``).

The durable log of every producing service is its outbox table: each event stays there
after it was relayed, with its id, type, version, ``occurred_at`` and data. A rebuild

1. empties every table derived from events (``models.FACT_TABLES``) and forgets which
   events the ``metrics`` consumer handled, in one transaction;
2. re-adds the imported history to the aggregates from ``imported_records`` (the
   operator's import is a source of its own and is kept);
3. reads the outbox tables of membership, marketplace and messaging, merges them in id
   order (ids start with their creation time) and applies each event through the same
   ``consume_once`` + ``apply_event`` as the live consumer.

Facts are dated by the events' ``occurred_at``, so the rebuilt store — and every
indicator computed from it — equals the one built live. The live consumer may keep
running: an event it applies meanwhile is recorded once, whoever gets it first. The
command needs each producer's database URL (embedded: the SQLite files in the data dir;
distributed: the shared PostgreSQL with a schema per service, or the per-service URLs).
Recorded classifications are history and are kept. The Redis streams are not used: they
are trimmed (``MAXLEN``) and so not a complete log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import col, delete, select

from api.events import Envelope
from services.kit.db import Database, UTCDateTime
from services.kit.outbox import consume_once
from services.metrics.consumers import CONSUMER, TYPES, apply_event
from services.metrics.history import add_record
from services.metrics.models import FACT_TABLES, ImportedRecord, MetricsProcessedEvent


@dataclass
class RebuildOutcome:
    events_read: int
    events_applied: int
    imported_records: int


async def read_outbox(db: Database, source: str) -> list[Envelope]:
    """Every event in one producing service's outbox that metrics consumes, in id order."""
    query = sa.text("SELECT id, type, version, occurred_at, data FROM outbox ORDER BY id").columns(
        sa.column("id", sa.String),
        sa.column("type", sa.String),
        sa.column("version", sa.Integer),
        sa.column("occurred_at", UTCDateTime),
        sa.column("data", sa.JSON),
    )
    async with db.read_scope() as session:
        rows = (await session.execute(query)).all()
    return [
        Envelope(id=i, type=t, version=v, source=source, occurred_at=at, data=data)
        for i, t, v, at, data in rows
        if t in TYPES
    ]


async def rebuild(metrics: Database, sources: Mapping[str, Database]) -> RebuildOutcome:
    """Empty the derived facts and replay every producer's outbox into them."""
    async with metrics.session_scope() as session:
        for model in FACT_TABLES:
            await session.execute(delete(model))
        await session.execute(
            delete(MetricsProcessedEvent).where(col(MetricsProcessedEvent.consumer) == CONSUMER)
        )
        records = list(
            (await session.execute(select(ImportedRecord).order_by(col(ImportedRecord.id))))
            .scalars()
            .all()
        )
        for record in records:
            await add_record(session, record)
    envelopes: list[Envelope] = []
    for name, db in sources.items():
        envelopes += await read_outbox(db, name)
    envelopes.sort(key=lambda e: e.id)
    applied = 0
    for envelope in envelopes:
        applied += await consume_once(
            metrics, MetricsProcessedEvent, CONSUMER, envelope, apply_event
        )
    return RebuildOutcome(len(envelopes), applied, len(records))
