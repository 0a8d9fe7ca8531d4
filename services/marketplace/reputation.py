"""Vendor reputation, and the per-task quality gate on annotators' gold accuracy.

**Reputation** of a firm comes from its annotators' work on every task of the platform
(assignments whose ``annotator_firm_id`` is the firm), three shares:

- *gold accuracy*: gold answers that matched the gold answer (``kinds.correct``, scored
  when the answer is submitted and kept in ``assignments.gold_correct``) / gold answers;
- *acceptance rate*: annotations the requester accepted / annotations reviewed
  (``accepted`` or ``rejected``);
- *on-time completion*: leases submitted before they expired / leases that ended, where
  a lease ends by being submitted or by expiring. A lease given back (``released``) is
  neither: returning work one cannot finish is the behaviour we want, not a failure.
  A submit after expiry is refused, so every submitted lease was on time.

Each share is pulled toward :data:`PRIOR` as if :data:`PRIOR_WEIGHT` observations at
the prior had been seen (Bayesian smoothing with a beta prior), and the score is the
:data:`WEIGHTS`-weighted mean of the smoothed shares. A new firm therefore scores the
prior (neither 0 nor 1), and a few observations move it only a little.

The score is computed on read with one aggregate query over the firm's assignments, which
the covering index ``ix_assignments_firm_reputation`` answers without touching the
table on PostgreSQL: no counters to keep in step, and expired leases need no sweeper.

**Quality gate** (Toloka's "control tasks" rule): a task may set ``min_gold_accuracy``.
An annotator whose accuracy on that task's gold items is below it, once they have
answered at least ``gold_min_answers`` of them, gets a 403 ``quality-blocked`` on
every further claim; leases already held may still be answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlmodel import col, select

from services.kit.auth import Principal
from services.kit.db import utcnow
from services.kit.errors import NotFound, Problem
from services.marketplace.models import Assignment, KnownClusterMember, KnownFirmMember, Task

PRIOR = 0.7
"""Where a firm without history stands, and where thin evidence is pulled toward."""
PRIOR_WEIGHT = 10.0
"""The prior counts as this many observations in each share."""
WEIGHTS = {"gold_accuracy": 0.5, "acceptance_rate": 0.3, "on_time": 0.2}
"""Gold accuracy is measured against known answers, so it weighs most."""
SUBMITTED = ("submitted", "accepted", "rejected")
"""Statuses of an answered assignment (review adds ``accepted`` and ``rejected``)."""
REVIEWED = ("accepted", "rejected")


class QualityBlocked(Problem):
    status, slug, title = 403, "quality-blocked", "Gold accuracy below the task's threshold"


@dataclass(frozen=True)
class Share:
    """One input of the score: ``hits`` out of ``total`` observations."""

    hits: int
    total: int
    weight: float

    @property
    def value(self) -> float | None:
        return self.hits / self.total if self.total else None

    @property
    def smoothed(self) -> float:
        return (self.hits + PRIOR * PRIOR_WEIGHT) / (self.total + PRIOR_WEIGHT)


@dataclass(frozen=True)
class Reputation:
    firm_id: str
    gold_accuracy: Share
    acceptance_rate: Share
    on_time: Share
    computed_at: datetime

    @property
    def score(self) -> float:
        shares = (self.gold_accuracy, self.acceptance_rate, self.on_time)
        total = sum(s.weight for s in shares)
        return round(sum(s.weight * s.smoothed for s in shares) / total, 6)


def _count_if(condition: Any) -> Any:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


async def firm_reputation(session: AsyncSession, firm_id: str) -> Reputation:
    """The firm's reputation now, from one aggregate query over its annotators' work."""
    now = utcnow()
    status = col(Assignment.status)
    gold = col(Assignment.gold).is_(True)
    correct = col(Assignment.gold_correct)
    answered = status.in_(SUBMITTED)
    expired = sa.and_(status == "leased", col(Assignment.expires_at) <= now)
    row = (
        await session.execute(
            sa.select(
                _count_if(sa.and_(gold, correct.is_(True))),
                _count_if(sa.and_(gold, correct.is_not(None))),
                _count_if(status == "accepted"),
                _count_if(status.in_(REVIEWED)),
                _count_if(answered),
                _count_if(sa.or_(answered, expired)),
            ).where(col(Assignment.annotator_firm_id) == firm_id)
        )
    ).one()
    right, golds, accepted, reviewed, in_time, ended = (int(v) for v in row)
    return Reputation(
        firm_id=firm_id,
        gold_accuracy=Share(right, golds, WEIGHTS["gold_accuracy"]),
        acceptance_rate=Share(accepted, reviewed, WEIGHTS["acceptance_rate"]),
        on_time=Share(in_time, ended, WEIGHTS["on_time"]),
        computed_at=now,
    )


async def firm_score(session: AsyncSession, firm_id: str) -> float:
    return (await firm_reputation(session, firm_id)).score


async def visible_reputation(
    session: AsyncSession, principal: Principal, firm_id: str
) -> Reputation:
    """A firm's reputation for the firm itself and for firms sharing an active cluster."""
    me = principal.firm_id
    if me is None or not await _active_in_firm(session, principal):
        raise NotFound("No firm with this id.")
    if me != firm_id:
        mine, theirs = aliased(KnownClusterMember), aliased(KnownClusterMember)
        shared = await session.execute(
            select(mine.cluster_id)
            .join(theirs, col(theirs.cluster_id) == col(mine.cluster_id))
            .where(
                mine.firm_id == me,
                col(mine.active).is_(True),
                theirs.firm_id == firm_id,
                col(theirs.active).is_(True),
            )
            .limit(1)
        )
        if shared.first() is None:
            raise NotFound("No firm with this id.")
    return await firm_reputation(session, firm_id)


async def _active_in_firm(session: AsyncSession, principal: Principal) -> bool:
    """An integrator client acts for its firm; a user must be its active member."""
    if principal.kind == "client":
        return True
    member = await session.get(KnownFirmMember, (principal.firm_id, principal.subject))
    return member is not None and member.active


# -- quality gate --------------------------------------------------------------------
async def check_quality_gate(session: AsyncSession, task: Task, annotator_id: str) -> None:
    """403 ``quality-blocked`` for an annotator below the task's gold accuracy threshold."""
    if task.min_gold_accuracy is None:
        return
    correct = col(Assignment.gold_correct)
    right, answers = (
        await session.execute(
            select(_count_if(correct.is_(True)), _count_if(correct.is_not(None))).where(
                Assignment.task_id == task.id,
                Assignment.annotator_id == annotator_id,
                col(Assignment.gold).is_(True),
            )
        )
    ).one()
    right, answers = int(right), int(answers)
    if answers >= task.gold_min_answers and right < task.min_gold_accuracy * answers:
        accuracy = round(right / answers, 4)
        raise QualityBlocked(
            f"Your accuracy on this task's control items is {accuracy:.0%} over {answers} "
            f"answers; the task needs {task.min_gold_accuracy:.0%}.",
            accuracy=accuracy,
            gold_answers=answers,
            min_gold_accuracy=task.min_gold_accuracy,
        )
