"""History import: a cluster moving onto the platform brings its dated collaboration.

Each line names two firms that are (or were) members of the cluster, a kind from the
configuration (contract, joint project, data exchange, supply, training, investment,
other), a weight > 0 in the cluster's own unit (the platform counts one awarded task
contract as 1), a date, and optionally an ``external_id``. All lines are validated
first; one bad line rejects the request with a 422 listing every bad line. A line is
identified by its ``external_id``, or else by the digest of its content, so importing
the same file twice adds nothing; the second import reports the lines as duplicates.
Records are stored as they came (``imported_records``) and added to the daily
aggregates with ``origin = imported``; every indicator reports this share of its basis.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.kit.auth import Principal
from services.kit.db import utcnow
from services.kit.errors import Unprocessable
from services.kit.ids import new_id
from services.metrics.config import load_config
from services.metrics.consumers import add_collab, mark_dirty
from services.metrics.models import Cluster, ImportedRecord, Membership

MAX_LINES = 10_000
EARLIEST = date(1990, 1, 1)


class HistoryLine(BaseModel):
    """One imported collaboration record."""

    model_config = ConfigDict(extra="forbid")

    firm_a: str = Field(min_length=1, max_length=40, description="a member firm's id")
    firm_b: str = Field(min_length=1, max_length=40, description="another member firm's id")
    kind: str = Field(max_length=30, examples=["joint_project"])
    weight: float = Field(gt=0, le=1_000_000, description="contract-equivalents; > 0")
    date: dt.date
    external_id: str | None = Field(None, min_length=1, max_length=200)


@dataclass
class ImportOutcome:
    lines: int
    imported: int
    duplicates: int


async def import_history(
    session: AsyncSession, principal: Principal, cluster: Cluster, raw: list[Any]
) -> ImportOutcome:
    """Validate every line, then store the new ones and add them to the aggregates."""
    if len(raw) > MAX_LINES:
        raise Unprocessable(f"At most {MAX_LINES} lines per import.")
    config = load_config()
    members = set(
        (
            await session.execute(
                select(Membership.firm_id).where(col(Membership.cluster_id) == cluster.id)
            )
        ).scalars()
    )
    today = utcnow().date()
    lines: list[HistoryLine] = []
    bad: list[dict[str, Any]] = []
    for index, value in enumerate(raw):
        try:
            line = HistoryLine.model_validate(value)
        except ValidationError as exc:
            reasons = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}" for e in exc.errors()
            )
            bad.append({"index": index, "reason": reasons})
            continue
        reason = _check(line, members, config.import_kinds, today)
        if reason:
            bad.append({"index": index, "reason": reason})
        else:
            lines.append(line)
    if bad:
        raise Unprocessable(f"{len(bad)} of {len(raw)} lines are invalid.", rejected=bad)
    keys = [_key(line) for line in lines]
    existing = set(
        (
            await session.execute(
                select(ImportedRecord.external_key).where(
                    col(ImportedRecord.cluster_id) == cluster.id,
                    col(ImportedRecord.external_key).in_(set(keys)),
                )
            )
        ).scalars()
    )
    imported = 0
    for key, line in zip(keys, lines, strict=True):
        if key in existing:
            continue
        existing.add(key)
        record = ImportedRecord(
            id=new_id("hr"),
            cluster_id=cluster.id,
            external_key=key,
            firm_a=line.firm_a,
            firm_b=line.firm_b,
            kind=line.kind,
            weight=line.weight,
            day=line.date,
            imported_by=principal.subject,
        )
        session.add(record)
        await add_record(session, record)
        imported += 1
    if imported:
        await mark_dirty(session, cluster.id)
    await session.flush()
    return ImportOutcome(lines=len(raw), imported=imported, duplicates=len(lines) - imported)


async def add_record(session: AsyncSession, record: ImportedRecord) -> None:
    """Add one imported record to the daily aggregates (also used by a rebuild)."""
    await add_collab(
        session,
        cluster_id=record.cluster_id,
        day=record.day,
        source=record.firm_a,
        target=record.firm_b,
        kind=record.kind,
        origin="imported",
        weight=record.weight,
    )


def _check(line: HistoryLine, members: set[str], kinds: list[str], today: date) -> str | None:
    if line.firm_a == line.firm_b:
        return "firm_a and firm_b must be two different firms"
    strangers = [f for f in (line.firm_a, line.firm_b) if f not in members]
    if strangers:
        return f"not a member firm of this cluster: {', '.join(strangers)}"
    if line.kind not in kinds:
        return f"kind must be one of: {', '.join(kinds)}"
    if line.date > today + timedelta(days=1):
        return "date is in the future"
    if line.date < EARLIEST:
        return f"date is before {EARLIEST.isoformat()}"
    return None


def _key(line: HistoryLine) -> str:
    if line.external_id is not None:
        return "x:" + line.external_id
    canonical = json.dumps(line.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "h:" + hashlib.sha256(canonical.encode()).hexdigest()
