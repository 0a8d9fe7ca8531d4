"""A task's quality report, its aggregated results and its raw annotations, for the requester.

- **Who**: the requester firm's owners and admins, and its integrator clients (the same
  people who see gold answers); other users of the requester firm get 403, annotators'
  firms that can see the task get 403, everyone else 404 — decided before any byte is
  streamed, so a refusal is an ordinary problem+json response.
- **Which answers count**: answered and not rejected (``submitted`` and ``accepted``);
  ``status="accepted"`` narrows results to reviewed answers. The raw export lists every
  answered assignment, rejected ones included, with its status.
- **Classes**: answers are compared by :func:`kinds.category` (the label, the sorted label
  set, or the canonical JSON of a span/box/transcription answer). Exact canonical JSON is
  a crude class for spans, boxes and transcriptions — two near-identical boxes are two
  classes — so Dawid-Skene is offered for the classification kinds only, and the
  agreement of the other kinds is a lower bound.
- **Ties** go to the class listed first in the task's label schema (single labels), else
  to the smallest canonical answer text.
- **Bounded memory**: an export is one statement read through a server-side cursor in
  chunks of :data:`CHUNK` rows (so it sees one snapshot), inside its own read-only scope
  since a streamed body outlives the request's session. Majority vote is computed item
  by item on the way.
  Dawid-Skene needs every answer at once: it holds them as int32 numpy arrays (12 bytes
  an answer, plus the item ids), fits before the response starts (so a refusal is still
  a problem+json), then streams the rows.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.kit.auth import Principal
from services.kit.db import Database
from services.kit.errors import Forbidden, Unprocessable
from services.marketplace import aggregation, kinds
from services.marketplace.models import Assignment, Item, Task
from services.marketplace.service import REQUESTER_ADMINS, task_access

Method = Literal["majority_vote", "dawid_skene", "one_coin_dawid_skene"]
Format = Literal["jsonl", "csv"]
COUNTED = ("submitted", "accepted")
"""Answers that count for results and agreement: answered and not rejected."""
CATEGORICAL = frozenset({"single_label", "multi_label"})
CHUNK = 500
MAX_CONFUSION_CELLS = 16_000_000
"""Dawid-Skene keeps annotators * classes**2 probabilities (128 MB of float64 at this cap)."""
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
RESULT_COLUMNS = (
    "item_id",
    "external_id",
    "label",
    "answer",
    "confidence",
    "method",
    "annotations",
)
ANNOTATION_COLUMNS = (
    "assignment_id",
    "item_id",
    "external_id",
    "annotator_id",
    "annotator_firm_id",
    "status",
    "answer",
    "submitted_at",
    "gold",
    "correct",
)


# -- access --------------------------------------------------------------------------
async def require_results_reader(session: AsyncSession, principal: Principal, task_id: str) -> Task:
    """The task, if the caller may read its quality and results (see the module's doc)."""
    access = await task_access(session, principal, task_id)
    if not access.requester:
        raise Forbidden("Only the requester firm reads a task's results.")
    if access.role not in REQUESTER_ADMINS and access.role != "client":
        raise Forbidden("Needs the requester firm's owner or admin role.")
    return access.task


def counted_statuses(status: Literal["accepted"] | None) -> tuple[str, ...]:
    return ("accepted",) if status == "accepted" else COUNTED


# -- classes -------------------------------------------------------------------------
def class_order(kind: str, schema: dict[str, Any]) -> Callable[[str], tuple[int, str]]:
    """Sort key of classes: ties go to the first (schema order for single labels)."""
    if kind == "single_label":
        position = {label: i for i, label in enumerate(schema.get("labels", ()))}
        return lambda c: (position.get(c, len(position)), c)
    return lambda c: (0, c)


def representative(kind: str, answer: Any) -> Any:
    """The answer reported for a class (multi-label sets sorted)."""
    if kind == "multi_label":
        return {"labels": sorted(answer["labels"])}
    return answer


def result_label(kind: str, category: str | None) -> str | None:
    """The flat label column: the class of the classification kinds, else None."""
    return category if kind in CATEGORICAL else None


# -- quality -------------------------------------------------------------------------
@dataclass
class GoldScore:
    answered: int = 0
    gold_answered: int = 0
    gold_correct: int = 0

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_answered if self.gold_answered else None


@dataclass
class QualityReport:
    task_id: str
    kind: str
    items: int
    gold_items: int
    items_answered: int
    items_complete: int
    statuses: dict[str, int]
    gold_statuses: dict[str, int]
    alpha: float | None
    alpha_items: int
    alpha_annotations: int
    annotators: dict[tuple[str, str], GoldScore] = field(default_factory=dict)
    firms: dict[str, GoldScore] = field(default_factory=dict)


async def quality_report(
    session: AsyncSession, principal: Principal, task_id: str
) -> QualityReport:
    """Gold accuracy per annotator and vendor firm, agreement, and counts of one task.

    Gold accuracy counts every answered gold assignment, rejected ones included (a wrong
    answer stays wrong whatever the review said); agreement is Krippendorff's nominal
    alpha over the counted answers to non-gold items.
    """
    task = await require_results_reader(session, principal, task_id)
    statuses: dict[str, int] = {}
    gold_statuses: dict[str, int] = {}
    rows = await session.execute(
        select(Assignment.gold, Assignment.status, sa.func.count())
        .where(Assignment.task_id == task.id, col(Assignment.submitted_at).is_not(None))
        .group_by(col(Assignment.gold), col(Assignment.status))
    )
    for gold, status, count in rows.all():
        (gold_statuses if gold else statuses)[status] = int(count)

    annotators: dict[tuple[str, str], GoldScore] = {}
    answered = await session.execute(
        select(Assignment.annotator_id, Assignment.annotator_firm_id, sa.func.count())
        .where(
            Assignment.task_id == task.id,
            col(Assignment.gold).is_(False),
            col(Assignment.submitted_at).is_not(None),
        )
        .group_by(col(Assignment.annotator_id), col(Assignment.annotator_firm_id))
    )
    for annotator_id, firm_id, count in answered.all():
        annotators.setdefault((annotator_id, firm_id), GoldScore()).answered = int(count)
    gold_rows = (
        select(
            Assignment.annotator_id,
            Assignment.annotator_firm_id,
            Assignment.answer,
            Item.gold_answer,
        )
        .join(Item, col(Item.id) == col(Assignment.item_id))
        .where(
            Assignment.task_id == task.id,
            col(Assignment.gold).is_(True),
            col(Assignment.submitted_at).is_not(None),
        )
    )
    async for chunk in _chunks(session, gold_rows):
        for annotator_id, firm_id, answer, gold_answer in chunk:
            score = annotators.setdefault((annotator_id, firm_id), GoldScore())
            score.gold_answered += 1
            if answer is not None and gold_answer is not None:
                score.gold_correct += kinds.correct(task.kind, answer, gold_answer)
    firms: dict[str, GoldScore] = {}
    for (_, firm_id), score in annotators.items():
        firm = firms.setdefault(firm_id, GoldScore())
        firm.answered += score.answered
        firm.gold_answered += score.gold_answered
        firm.gold_correct += score.gold_correct

    items, classes, item_count = await _load_classes(session, task)
    alpha = aggregation.krippendorff_alpha_nominal(items, classes)
    per_item = np.bincount(items, minlength=item_count) if item_count else np.zeros(0, int)
    complete = await session.execute(
        select(sa.func.count())
        .select_from(Item)
        .where(Item.task_id == task.id, col(Item.gold).is_(False), col(Item.complete).is_(True))
    )
    return QualityReport(
        task_id=task.id,
        kind=task.kind,
        items=task.item_count - task.gold_count,
        gold_items=task.gold_count,
        items_answered=int((per_item > 0).sum()),
        items_complete=int(complete.scalar_one()),
        statuses=statuses,
        gold_statuses=gold_statuses,
        alpha=None if math.isnan(alpha) else alpha,
        alpha_items=int((per_item >= 2).sum()),
        alpha_annotations=int(per_item[per_item >= 2].sum()),
        annotators=annotators,
        firms=firms,
    )


async def _load_classes(session: AsyncSession, task: Task) -> tuple[np.ndarray, np.ndarray, int]:
    """(item index, class index) of every counted answer to a non-gold item."""
    query = (
        select(Assignment.item_id, Assignment.answer)
        .where(
            Assignment.task_id == task.id,
            col(Assignment.gold).is_(False),
            col(Assignment.status).in_(COUNTED),
        )
        .order_by(col(Assignment.item_id))
    )
    items, classes = array("i"), array("i")
    class_ids: dict[str, int] = {}
    last, index = None, -1
    async for chunk in _chunks(session, query):
        for item_id, answer in chunk:
            if answer is None:
                continue
            if item_id != last:
                last, index = item_id, index + 1
            key = kinds.category(task.kind, answer)
            items.append(index)
            classes.append(class_ids.setdefault(key, len(class_ids)))
    return np.frombuffer(items, np.int32), np.frombuffer(classes, np.int32), index + 1


# -- results -------------------------------------------------------------------------
@dataclass
class Fitted:
    """A Dawid-Skene fit, ready to stream: non-gold item ids in id order and their result."""

    ids: np.ndarray  # bytes, sorted
    labels: np.ndarray
    confidence: np.ndarray
    annotations: np.ndarray
    answers: list[Any]  # class index → reported answer
    categories: list[str]  # class index → class


async def fit_dawid_skene(
    session: AsyncSession, task: Task, statuses: Sequence[str], *, one_coin: bool
) -> Fitted:
    """Load every counted answer as int32 arrays and fit Dawid-Skene off the event loop.

    Gold items take part with their class pinned (they teach the model each annotator's
    confusions) and are left out of the results.
    """
    if task.kind not in CATEGORICAL:
        raise Unprocessable(
            f"Dawid-Skene needs categorical answers; a {task.kind} task aggregates by "
            "majority_vote."
        )
    order = class_order(task.kind, task.label_schema)
    # Classes are numbered in tie-break order up front where the schema allows it.
    class_ids: dict[str, int] = {}
    answers: dict[str, Any] = {}
    if task.kind == "single_label":
        for label in sorted(task.label_schema.get("labels", ()), key=order):
            class_ids[label] = len(class_ids)
            answers[label] = {"label": label}
    annotator_ids: dict[str, int] = {}
    items, annotators, classes = array("i"), array("i"), array("i")
    known, gold_flags = array("i"), array("b")
    id_chunks: list[np.ndarray] = []
    query = (
        sa.select(
            col(Item.id),
            col(Item.gold),
            col(Item.gold_answer),
            col(Assignment.annotator_id),
            col(Assignment.answer),
        )
        .select_from(Item)
        .outerjoin(
            Assignment,
            sa.and_(col(Assignment.item_id) == col(Item.id), col(Assignment.status).in_(statuses)),
        )
        .where(col(Item.task_id) == task.id)
        .order_by(col(Item.id), col(Assignment.id))
    )
    last, index = None, -1
    chunk_ids: list[str] = []
    async for chunk in _chunks(session, query):
        for item_id, gold, gold_answer, annotator_id, answer in chunk:
            if item_id != last:
                last, index = item_id, index + 1
                gold_flags.append(bool(gold))
                pinned = -1
                if gold and gold_answer is not None:
                    key = kinds.category(task.kind, gold_answer)
                    answers.setdefault(key, representative(task.kind, gold_answer))
                    pinned = class_ids.setdefault(key, len(class_ids))
                else:
                    chunk_ids.append(item_id)
                known.append(pinned)
            if annotator_id is None or answer is None:
                continue
            key = kinds.category(task.kind, answer)
            answers.setdefault(key, representative(task.kind, answer))
            items.append(index)
            annotators.append(annotator_ids.setdefault(annotator_id, len(annotator_ids)))
            classes.append(class_ids.setdefault(key, len(class_ids)))
        if chunk_ids:
            id_chunks.append(np.array(chunk_ids, dtype="S40"))
            chunk_ids = []
    n_items, n_classes = index + 1, max(len(class_ids), 1)
    if not one_coin and len(annotator_ids) * n_classes * n_classes > MAX_CONFUSION_CELLS:
        raise Unprocessable(
            f"{len(annotator_ids)} annotators and {n_classes} classes are too many confusion "
            "matrices; use one_coin_dawid_skene or majority_vote."
        )
    # Classes first met in the answers are renumbered in tie-break order.
    categories = sorted(class_ids, key=order)
    renumber = np.empty(len(class_ids), dtype=np.int32)
    for new, key in enumerate(categories):
        renumber[class_ids[key]] = new
    class_arr = renumber[np.frombuffer(classes, np.int32)] if classes else np.zeros(0, np.int32)
    known_arr = np.frombuffer(known, np.int32) if known else np.zeros(0, np.int32)
    known_arr = np.where(known_arr >= 0, renumber[np.maximum(known_arr, 0)], -1)
    item_arr = np.frombuffer(items, np.int32) if items else np.zeros(0, np.int32)
    fitted = await asyncio.to_thread(
        aggregation.dawid_skene,
        item_arr,
        np.frombuffer(annotators, np.int32) if annotators else np.zeros(0, np.int32),
        class_arr,
        n_items=n_items,
        n_annotators=len(annotator_ids),
        n_classes=n_classes,
        known=known_arr,
        one_coin=one_coin,
    )
    work = ~np.frombuffer(gold_flags, np.bool_) if gold_flags else np.zeros(0, bool)
    return Fitted(
        ids=np.concatenate(id_chunks) if id_chunks else np.zeros(0, "S40"),
        labels=fitted.labels[work],
        confidence=fitted.confidence[work],
        annotations=np.bincount(item_arr, minlength=n_items)[work],
        answers=[answers.get(key) for key in categories],
        categories=categories,
    )


async def stream_results(
    db: Database,
    task: Task,
    *,
    method: Method,
    statuses: Sequence[str],
    fmt: Format,
    fitted: Fitted | None = None,
) -> AsyncIterator[bytes]:
    """One aggregated row per non-gold item, in item id order, chunk by chunk.

    Items with no counted answer appear with no label and confidence 0.
    """
    encode = _Encoder(fmt, RESULT_COLUMNS, csv_json=("answer",))
    yield encode.header()
    async with db.read_scope() as session:
        if fitted is None:
            rows = _majority_rows(session, task, statuses)
        else:
            rows = _fitted_rows(session, task, fitted, method)
        async for chunk in rows:
            yield encode.rows(chunk)


async def _majority_rows(
    session: AsyncSession, task: Task, statuses: Sequence[str]
) -> AsyncIterator[list[dict[str, Any]]]:
    query = (
        select(Item.id, Item.external_id, Assignment.answer)
        .select_from(Item)
        .outerjoin(
            Assignment,
            sa.and_(col(Assignment.item_id) == col(Item.id), col(Assignment.status).in_(statuses)),
        )
        .where(Item.task_id == task.id, col(Item.gold).is_(False))
        .order_by(col(Item.id), col(Assignment.id))
    )
    pending: list[tuple[str, str | None, list[Any]]] = []
    async for chunk in _chunks(session, query):
        for item_id, external_id, answer in chunk:
            if not pending or pending[-1][0] != item_id:
                pending.append((item_id, external_id, []))
            if answer is not None:
                pending[-1][2].append(answer)
        # The last item may go on in the next chunk.
        done, pending = pending[:-1], pending[-1:]
        if done:
            yield majority_chunk(task, done)
    if pending:
        yield majority_chunk(task, pending)


def majority_chunk(
    task: Task, groups: Sequence[tuple[str, str | None, list[Any]]]
) -> list[dict[str, Any]]:
    """Majority vote over a run of whole items (item id, external id, counted answers)."""
    order = class_order(task.kind, task.label_schema)
    categories: dict[str, Any] = {}
    keyed: list[list[str]] = []
    for _, _, answers in groups:
        keys = [kinds.category(task.kind, answer) for answer in answers]
        for key, answer in zip(keys, answers, strict=True):
            categories.setdefault(key, representative(task.kind, answer))
        keyed.append(keys)
    ranked = sorted(categories, key=order)
    number = {key: i for i, key in enumerate(ranked)}
    item_idx = [i for i, keys in enumerate(keyed) for _ in keys]
    class_idx = [number[key] for keys in keyed for key in keys]
    vote = aggregation.majority_vote(item_idx, class_idx, n_items=len(groups))
    out = []
    for i, (item_id, external_id, answers) in enumerate(groups):
        label = int(vote.labels[i])
        category = ranked[label] if label >= 0 else None
        out.append(
            {
                "item_id": item_id,
                "external_id": external_id,
                "label": result_label(task.kind, category),
                "answer": categories[category] if category is not None else None,
                "confidence": round(float(vote.confidence[i]), 6),
                "method": vote.method,
                "annotations": len(answers),
            }
        )
    return out


async def _fitted_rows(
    session: AsyncSession, task: Task, fitted: Fitted, method: str
) -> AsyncIterator[list[dict[str, Any]]]:
    """Walk the task's non-gold items in id order alongside the fit's sorted ids.

    An item imported after the fit (not in its snapshot) is reported with no label.
    """
    query = (
        select(Item.id, Item.external_id)
        .where(Item.task_id == task.id, col(Item.gold).is_(False))
        .order_by(col(Item.id))
    )
    position = 0
    total = len(fitted.ids)
    async for chunk in _chunks(session, query):
        out = []
        for item_id, external_id in chunk:
            key = item_id.encode()
            while position < total and fitted.ids[position] < key:
                position += 1
            label, confidence, count = -1, 0.0, 0
            if position < total and fitted.ids[position] == key:
                label = int(fitted.labels[position])
                confidence = float(fitted.confidence[position])
                count = int(fitted.annotations[position])
            category = fitted.categories[label] if label >= 0 else None
            out.append(
                {
                    "item_id": item_id,
                    "external_id": external_id,
                    "label": result_label(task.kind, category),
                    "answer": fitted.answers[label] if label >= 0 else None,
                    "confidence": round(confidence, 6),
                    "method": method,
                    "annotations": count,
                }
            )
        yield out


# -- raw annotations -----------------------------------------------------------------
async def stream_annotations(
    db: Database, task: Task, *, status: str | None, fmt: Format
) -> AsyncIterator[bytes]:
    """Every answered assignment of the task, grouped by item, gold ones flagged."""
    encode = _Encoder(fmt, ANNOTATION_COLUMNS, csv_json=("answer",))
    yield encode.header()
    query = (
        sa.select(
            col(Assignment.id),
            col(Assignment.item_id),
            col(Item.external_id),
            col(Assignment.annotator_id),
            col(Assignment.annotator_firm_id),
            col(Assignment.status),
            col(Assignment.answer),
            col(Assignment.submitted_at),
            col(Assignment.gold),
            col(Item.gold_answer),
        )
        .join(Item, col(Item.id) == col(Assignment.item_id))
        .where(col(Assignment.task_id) == task.id, col(Assignment.submitted_at).is_not(None))
        .order_by(col(Assignment.item_id), col(Assignment.id))
    )
    if status is not None:
        query = query.where(col(Assignment.status) == status)
    async with db.read_scope() as session:
        async for chunk in _chunks(session, query):
            yield encode.rows(
                {
                    "assignment_id": row[0],
                    "item_id": row[1],
                    "external_id": row[2],
                    "annotator_id": row[3],
                    "annotator_firm_id": row[4],
                    "status": row[5],
                    "answer": row[6],
                    "submitted_at": _iso(row[7]),
                    "gold": bool(row[8]),
                    "correct": (
                        kinds.correct(task.kind, row[6], row[9])
                        if row[8] and row[6] is not None and row[9] is not None
                        else None
                    ),
                }
                for row in chunk
            )


# -- plumbing ------------------------------------------------------------------------
async def _chunks(session: AsyncSession, query: Any) -> AsyncIterator[Sequence[Any]]:
    """Rows of ``query`` from a server-side cursor, :data:`CHUNK` at a time."""
    result = await session.stream(query.execution_options(yield_per=CHUNK))
    async for partition in result.partitions():
        yield partition


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class _Encoder:
    """Rows as JSON lines, or CSV with a header (JSON-valued cells as JSON text)."""

    def __init__(self, fmt: Format, columns: Sequence[str], *, csv_json: Iterable[str]) -> None:
        self.fmt = fmt
        self.columns = columns
        self.csv_json = frozenset(csv_json)

    def header(self) -> bytes:
        if self.fmt == "jsonl":
            return b""
        return self._csv([list(self.columns)])

    def rows(self, rows: Iterable[dict[str, Any]]) -> bytes:
        if self.fmt == "jsonl":
            return "".join(
                json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows
            ).encode()
        return self._csv([[self._cell(name, row[name]) for name in self.columns] for row in rows])

    def _cell(self, name: str, value: Any) -> Any:
        if value is None:
            return ""
        if name in self.csv_json:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if isinstance(value, bool):
            return "true" if value else "false"
        return value

    @staticmethod
    def _csv(rows: list[list[Any]]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerows(rows)
        return buffer.getvalue().encode()


def filename(task: Task, what: str, fmt: Format) -> str:
    return f"{task.id}-{what}.{fmt}"
