"""Metrics at scale: all indicators + the classification of a 10,000-firm cluster built
from 1,000,000 events, against merely scanning the same facts, in the same run.

    uv run python -m bench.metrics [--firms 10000] [--events 1000000] [--consumer-events 2000]
                                   [--postgres URL | --sqlite] [--profile]

1. **Setup** (not timed): a fresh database (PostgreSQL by default: a new database on
   ``--postgres``, dropped at the end; ``--sqlite``: a temporary file) migrated with the
   metrics service's own migrations, then the fact store of one cluster written directly
   (``COPY`` on PostgreSQL): the aggregates that the consumers would have made of
   ``--events`` seeded events — accepted annotations and awarded contracts between
   requesters and vendors (hubs drawn with a Zipf-like skew), task publications with
   their vendors, first submissions and completions, and messages in direct
   conversations — spread over the current 90-day window (45 %), the one before (35 %)
   and the same window a year earlier (20 %), among ``--firms`` member firms in 12
   regions.
2. **Scan**: every row those windows hold in the fact tables (collaboration of the three
   windows, activity, tasks and their vendors, channel posts, mentions, members), read
   with plain ``SELECT`` statements through the same async driver into Python tuples.
3. **Compute**: what ``GET …/indicators`` and ``GET …/classification`` do — load the
   window's facts (``facts.load_facts``), every indicator, the gate, the decision list
   and the 200-run bootstrap.
4. **Incremental**: ``--consumer-events`` events (accepted annotations mostly, some
   contracts, publications and messages) applied one by one through the live consumer's
   code (``consume_once`` + ``apply_event``, a transaction each), on the loaded store.

It prints the best of three runs of 2 and 3, ``ratio = compute / scan`` (the aim is 3
or less) and the consumer's milliseconds per event (the aim is 1 or less).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from api.events import (
    ContractAwardedV1,
    Envelope,
    EventPayload,
    MessagePostedV1,
    SubmissionAcceptedV1,
    TaskPublishedV1,
)
from services.kit.db import Database
from services.kit.ids import new_id
from services.kit.outbox import consume_once
from services.metrics.app import SPEC
from services.metrics.classifier import classify
from services.metrics.config import load_config
from services.metrics.consumers import CONSUMER, apply_event
from services.metrics.facts import load_facts
from services.metrics.indicators import compute_indicators
from services.metrics.models import MetricsProcessedEvent

CLUSTER = "cl_bench"
REGIONS = [
    "CN-BJ", "CN-SX", "CN-NM", "CN-HE", "CN-SC", "CN-JX",
    "CN-GD", "CN-ZJ", "CN-JS", "CN-SH", "CN-HB", "CN-SN",
]  # fmt: skip
REGION_P = np.array([30, 10, 8, 8, 7, 6, 8, 6, 6, 5, 3, 3], dtype=float)
ACTORS = [
    "large_enterprise", "medium_enterprise", "small_micro_enterprise", "internet_platform",
    "technology_service_provider", "university", "research_institute", "investor",
    "industry_association", "service_agency", "government_body",
]  # fmt: skip
ACTOR_P = np.array([5, 20, 55, 3, 8, 3, 2, 2, 1, 0.5, 0.5], dtype=float)
INDUSTRIES = [f"0{c}0{i}" for c in range(1, 6) for i in range(1, 7)]


def _p(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def generate(firms: int, events: int, today: date, seed: int = 1) -> dict[str, list[tuple]]:
    """The fact rows the consumers would have written for ``events`` seeded events."""
    rng = np.random.default_rng(seed)
    ids = [f"frm_{i:08d}" for i in range(firms)]
    region = rng.choice(len(REGIONS), firms, p=_p(REGION_P))
    actor = rng.choice(len(ACTORS), firms, p=_p(ACTOR_P))
    industry = rng.integers(0, len(INDUSTRIES), firms)
    joined = datetime.combine(today - timedelta(days=800), datetime.min.time(), tzinfo=UTC)
    rows: dict[str, list[tuple]] = {
        "firms": [
            (
                ids[i],
                f"Firm {i}",
                REGIONS[region[i]],
                "City",
                ACTORS[actor[i]],
                f'["{INDUSTRIES[industry[i]]}"]',
                "evt_0",
            )
            for i in range(firms)
        ],
        "clusters": [(CLUSTER, "Bench cluster", "CN-BJ", ids[0], joined, False, "evt_0")],
        "memberships": [(CLUSTER, f, None, joined, None, "evt_0") for f in ids],
    }

    # Days: 45 % in the current window, 35 % in the one before, 20 % a year earlier.
    def days(n: int) -> np.ndarray:
        which = rng.choice(3, n, p=[0.45, 0.35, 0.20])
        offset = rng.integers(0, 90, n) + np.array([0, 90, 365])[which]
        return offset

    requesters = max(1, firms // 10)
    pair_count = min(firms * 3, 30_000)
    pair_src = (rng.zipf(1.6, pair_count) - 1) % requesters
    pair_dst = rng.integers(0, firms, pair_count)
    pairs = np.unique(np.stack([pair_src, pair_dst])[:, pair_src != pair_dst], axis=1)
    order = rng.permutation(pairs.shape[1])  # hub weights below go to random pairs
    pair_src, pair_dst = pairs[0][order], pairs[1][order]
    pair_w = _p(1.0 / np.arange(1, len(pair_src) + 1) ** 0.6)
    n_annot, n_contract, n_task, n_submit, n_message = (
        int(events * s) for s in (0.70, 0.03, 0.05, 0.12, 0.10)
    )

    def collab(n: int, kind: str, weight: float, volume: int, amount: int) -> list[tuple]:
        pair = rng.choice(len(pair_src), n, p=pair_w)
        day = days(n)
        keys, counts = np.unique(np.stack([day, pair]), axis=1, return_counts=True)
        return [
            (CLUSTER, today - timedelta(days=int(d)), ids[pair_src[p]], ids[pair_dst[p]],
             kind, "observed", weight * c, int(c), volume * int(c), amount * int(c))
            for (d, p), c in zip(keys.T.tolist(), counts.tolist(), strict=True)
        ]  # fmt: skip

    rows["collab_daily"] = collab(n_annot, "annotation", 0.1, 1, 2) + collab(
        n_contract, "task_contract", 1.0, 100, 200
    )
    # Tasks: published by requesters; first submissions and completions on later days.
    t_req = (rng.zipf(1.6, n_task) - 1) % requesters
    t_day = days(n_task)
    published = [
        datetime.combine(today - timedelta(days=int(d)), datetime.min.time(), tzinfo=UTC)
        + timedelta(hours=int(h))
        for d, h in zip(t_day, rng.integers(0, 20, n_task), strict=True)
    ]
    rows["tasks"] = [
        (f"task_{i:08d}", CLUSTER, ids[t_req[i]], REGIONS[region[t_req[i]]], "single_label",
         "open", 100, published[i], None, published[i] + timedelta(hours=3),
         published[i] + timedelta(days=2) if i % 2 else None,
         "completed" if i % 2 else None, 100 if i % 2 else 0)
        for i in range(n_task)
    ]  # fmt: skip
    vendor_rows = {}
    for i in range(n_task):
        for v in rng.integers(0, firms, 1 + i % 3).tolist():
            vendor_rows[(i, v)] = (f"task_{i:08d}", ids[v], CLUSTER, REGIONS[region[v]])
    rows["task_vendors"] = list(vendor_rows.values())
    # Messages in direct conversations between tied firms.
    m_pair = rng.choice(len(pair_src), n_message, p=pair_w)
    m_side = rng.integers(0, 2, n_message)
    m_firm = np.where(m_side == 0, pair_src[m_pair], pair_dst[m_pair])
    keys, counts = np.unique(
        np.stack([days(n_message), m_pair, m_firm]), axis=1, return_counts=True
    )
    rows["channel_posts"] = [
        (CLUSTER, f"chan_{p:08d}", today - timedelta(days=int(d)), ids[f], "direct", int(c))
        for (d, p, f), c in zip(keys.T.tolist(), counts.tolist(), strict=True)
    ]  # fmt: skip
    # Activity: every event's acting firm on its day.
    act_firm = np.concatenate(
        [
            pair_src[rng.choice(len(pair_src), n_annot // 4, p=pair_w)],
            pair_dst[rng.choice(len(pair_src), n_submit, p=pair_w)],
            t_req,
            m_firm,
        ]
    )
    act_day = days(len(act_firm))
    keys, counts = np.unique(np.stack([act_day, act_firm]), axis=1, return_counts=True)
    rows["firm_activity"] = [
        (CLUSTER, today - timedelta(days=int(d)), ids[f], int(c))
        for (d, f), c in zip(keys.T.tolist(), counts.tolist(), strict=True)
    ]
    rows["mention_daily"] = []
    return rows


COLUMNS = {
    "firms": "id, name, region, city, actor_type, industries, event_id",
    "clusters": "id, name, core_region, operator_firm_id, created_at, dirty, event_id",
    "memberships": "cluster_id, firm_id, park_id, joined_at, left_at, event_id",
    "collab_daily": "cluster_id, day, source_firm_id, target_firm_id, kind, origin, weight, "
    "events, volume, amount",
    "tasks": "id, cluster_id, requester_firm_id, requester_region, kind, allocation, "
    "item_count, published_at, first_claimed_at, first_submitted_at, completed_at, outcome, "
    "accepted_annotations",
    "task_vendors": "task_id, firm_id, cluster_id, region",
    "channel_posts": "cluster_id, channel_id, day, firm_id, channel_kind, messages",
    "firm_activity": "cluster_id, day, firm_id, events",
    "mention_daily": "cluster_id, day, firm_a, firm_b, messages",
}


def load(db: Database, rows: dict[str, list[tuple]]) -> None:
    """Write the rows (COPY on PostgreSQL, executemany on SQLite)."""
    engine = db.sync_engine
    if db.postgres:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            for table, data in rows.items():
                with cursor.copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as copy:
                    for row in data:
                        copy.write_row(row)
            raw.commit()
            cursor.execute("ANALYZE")
            raw.commit()
        finally:
            raw.close()
        return
    with engine.begin() as conn:
        for table, data in rows.items():
            if data:
                names = [c.strip() for c in COLUMNS[table].split(",")]
                marks = ", ".join(f":{n}" for n in names)
                conn.execute(
                    sa.text(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})"),
                    [dict(zip(names, r, strict=True)) for r in data],
                )
        conn.execute(sa.text("ANALYZE"))


async def scan(db: Database, as_of: datetime, window: int) -> int:
    """Read every fact row the window's computation touches, doing nothing with them."""
    end = as_of.date()
    start = end - timedelta(days=window - 1)
    ranges = [
        (start, end),
        (start - timedelta(days=window), start - timedelta(days=1)),
        (start - timedelta(days=365), end - timedelta(days=365)),
    ]
    lo = datetime.combine(start, datetime.min.time(), tzinfo=UTC)
    hi = datetime.combine(end + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    c = {"c": CLUSTER, "s": start, "e": end, "lo": lo, "hi": hi}
    statements = [
        ("SELECT f.* FROM firms f JOIN memberships m ON m.firm_id = f.id "
         "WHERE m.cluster_id = :c", c),
        *(("SELECT * FROM collab_daily WHERE cluster_id = :c AND day >= :s AND day <= :e",
           {"c": CLUSTER, "s": s, "e": e}) for s, e in ranges),
        ("SELECT * FROM firm_activity WHERE cluster_id = :c AND day >= :s AND day <= :e", c),
        ("SELECT * FROM tasks WHERE cluster_id = :c AND published_at >= :lo "
         "AND published_at < :hi", c),
        ("SELECT v.* FROM task_vendors v JOIN tasks t ON t.id = v.task_id WHERE t.cluster_id = :c "
         "AND t.published_at >= :lo AND t.published_at < :hi", c),
        ("SELECT * FROM channel_posts WHERE cluster_id = :c AND day >= :s AND day <= :e", c),
        ("SELECT * FROM mention_daily WHERE cluster_id = :c AND day >= :s AND day <= :e", c),
    ]  # fmt: skip
    count = 0
    async with db.read_scope() as session:
        for sql, params in statements:
            count += len((await session.execute(sa.text(sql), params)).all())
    return count


async def compute(db: Database, as_of: datetime, window: int) -> dict[str, Any]:
    config = load_config()
    async with db.read_scope() as session:
        facts = await load_facts(session, CLUSTER, as_of, window)
    report = compute_indicators(facts, config)
    return classify(report, config)


async def best_of(runs: int, fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        result = await fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def consumer_events(n: int, firms: int, at: datetime) -> list[Envelope]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        a, b = (f"frm_{x:08d}" for x in rng.integers(0, firms, 2))
        task = f"task_new_{i // 20:06d}"
        common = {"cluster_id": CLUSTER, "task_id": task}
        payload: EventPayload
        if i % 20 == 0:
            payload = TaskPublishedV1(
                **common, requester_firm_id=a, requester_region="CN-BJ",
                requester_industries=["0301"], kind="single_label", reward_per_annotation=2,
                overlap=1, item_count=20,
            )  # fmt: skip
        elif i % 20 == 1:
            payload = ContractAwardedV1(
                **common, contract_id=f"ctr_{i}", requester_firm_id=a, requester_region="CN-BJ",
                vendor_firm_id=b, vendor_region="CN-SX", price_per_annotation=2, quota=10,
            )  # fmt: skip
        elif i % 20 == 2:
            payload = MessagePostedV1(
                message_id=f"msg_{i}", channel_id=f"chan_new_{i % 50}", cluster_id=CLUSTER,
                channel_kind="direct", seq=i, sender_id="usr_x", sender_firm_id=a,
                mentioned_firm_ids=[b], posted_at=at,
            )  # fmt: skip
        else:
            payload = SubmissionAcceptedV1(
                **common, assignment_id=f"asg_{i}", item_id=f"itm_{i}", requester_firm_id=a,
                annotator_id="usr_y", annotator_firm_id=b, annotator_region="CN-SX", amount=2,
            )  # fmt: skip
        out.append(
            Envelope(
                id=new_id("evt"),
                type=payload.event_type,
                source="bench",
                occurred_at=at,
                data=payload.model_dump(mode="json"),
            )
        )
    return out


def fresh_postgres(url: str) -> tuple[str, Callable[[], None]]:
    base = sa.engine.make_url(url).set(drivername="postgresql+psycopg")
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"oc_bench_metrics_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return base.set(database=name).render_as_string(hide_password=False), drop


async def run(args: argparse.Namespace) -> None:
    drop: Callable[[], None] = lambda: None  # noqa: E731
    if args.sqlite:
        folder = tempfile.mkdtemp(prefix="oc-bench-metrics-")
        url = f"sqlite:///{Path(folder) / 'metrics.db'}"
    else:
        url, drop = fresh_postgres(args.postgres)
    db = Database(url, schema="metrics")
    try:
        db.migrate_sync(SPEC.migrations_dir)
        today = datetime.now(UTC).date()
        started = time.perf_counter()
        rows = generate(args.firms, args.events, today)
        load(db, rows)
        print(
            f"setup: {args.firms:,} firms, {args.events:,} events -> "
            + ", ".join(f"{t} {len(r):,}" for t, r in rows.items() if r)
            + f" rows ({time.perf_counter() - started:.0f} s)"
        )
        del rows
        as_of = datetime.now(UTC)
        window = load_config().window_days
        await compute(db, as_of, window)  # warm the caches and the pool
        scan_s, scanned = await best_of(3, lambda: scan(db, as_of, window))
        compute_s, result = await best_of(3, lambda: compute(db, as_of, window))
        if args.profile:  # one more run, under the profiler (not part of the figures)
            profiler = cProfile.Profile()
            profiler.enable()
            await compute(db, as_of, window)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue())
        async with db.read_scope() as session:
            load_s, _ = await best_of(3, lambda: load_facts(session, CLUSTER, as_of, window))
        engine = "SQLite" if args.sqlite else "PostgreSQL"
        print(f"database: {engine} ({db.url.host or db.url.database})")
        print(f"scan      {scan_s:8.3f} s  ({scanned:,} rows of the windows' facts)")
        print(
            f"compute   {compute_s:8.3f} s  (of which load_facts {load_s:.3f} s; "
            f"{result['label']}, {result['form']}, agreement "
            f"{(result['confidence'] or {}).get('agreement')})"
        )
        print(f"ratio = compute / scan = {compute_s / scan_s:.2f}  (aim <= 3)")

        envelopes = consumer_events(args.consumer_events, args.firms, as_of)

        async def nothing(session: Any, envelope: Envelope) -> None:
            return None

        started, cpu = time.perf_counter(), time.process_time()
        for envelope in envelopes:
            await consume_once(db, MetricsProcessedEvent, "floor", envelope, nothing)
        floor = (time.perf_counter() - started) / len(envelopes) * 1000
        floor_cpu = (time.process_time() - cpu) / len(envelopes) * 1000
        started, cpu = time.perf_counter(), time.process_time()
        for envelope in envelopes:
            await consume_once(db, MetricsProcessedEvent, CONSUMER, envelope, apply_event)
        per_event = (time.perf_counter() - started) / len(envelopes) * 1000
        per_cpu = (time.process_time() - cpu) / len(envelopes) * 1000
        print(
            f"consumer  {per_event:8.3f} ms per event ({len(envelopes):,} events, a "
            f"transaction each), of which {floor:.3f} ms is the floor: the same transaction "
            f"recording the event with no effect; own work {per_event - floor:.3f} ms "
            "(aim <= 1 ms)"
        )
        print(
            f"consumer  {per_cpu:8.3f} ms of this process's CPU per event "
            f"(floor {floor_cpu:.3f} ms; own work {per_cpu - floor_cpu:.3f} ms)"
        )
    finally:
        await db.dispose()
        if db._sync_engine is not None:
            db._sync_engine.dispose()
        drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--firms", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--consumer-events", type=int, default=2_000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "ONECLUSTER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--sqlite", action="store_true", help="a temporary SQLite file instead")
    parser.add_argument("--profile", action="store_true", help="cProfile the compute runs")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
