"""Annotation throughput end to end over HTTP, against the same loop in raw SQL, in one run.

    uv run python bench/annotate.py [--annotators N] [--items M] [--overlap K] [--batch B]

Against PostgreSQL (``--postgres``, default postgresql://postgres@127.0.0.1:5432/test; a
fresh database is created and dropped) and Redis (``--redis``, default
redis://127.0.0.1:6379/0; a fresh key prefix, deleted at the end), it:

1. starts ``onecluster serve`` (the embedded gateway, one uvicorn worker) and seeds through
   the public API a requester firm and four vendor firms with N annotators
   (tests/marketplace_support.build_crowd: two password hashes per annotator);
2. **import**: creates a single-label task and posts its M items as JSONL, 10,000 lines
   per request (items/s);
3. copies the task and its items into a scratch schema made by the marketplace's own
   migrations (the same table layout, indexes included), then publishes the task;
4. **HTTP**: N annotators, each on its own keep-alive connection, claim B items
   (``POST /v1/tasks/{id}/assignments:claim``) and answer them in one batch submit
   (``…/assignments:submit``), in a closed loop; annotations per second are counted in
   the database over the measured window;
5. **raw SQL**: ``pgbench`` with N clients runs bench/annotate_pgbench.sql, the same
   claim and submit statements without HTTP, authentication, access checks or ORM,
   on the scratch schema, over a window of the same length, counted the same way;
6. **export**: ``GET /v1/tasks/{id}/annotations?format=jsonl`` and ``/results`` if the
   platform serves them (skipped with a message otherwise).

It prints ``ratio = http / pgbench`` annotations per second (the aim is 0.5 with the batch
endpoints) and CPU per annotation of the server, PostgreSQL and the load generators. Every
process it starts is stopped by its own handle, also when the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench.annotate_profile import start_recording, summarize
from bench.auth_read import (
    UNTRIPPED_LIMIT,
    PostgresDatabase,
    Server,
    child_env,
    drop_redis_keys,
    free_port,
    step,
)
from bench.loadgen import (
    LOOPBACK,
    Backing,
    HttpRequest,
    machine_cpu_seconds,
    process_cpu_seconds,
    process_tree_cpu_seconds,
    processes_cpu,
    read_response,
)
from tests.marketplace_support import build_crowd, task_body, wait_until_visible
from tests.oauth_flow import bearer

ROOT = Path(__file__).resolve().parents[1]
PGBENCH_SCRIPT = Path(__file__).with_name("annotate_pgbench.sql")
SCRATCH_SCHEMA = "pgbench_market"
TARGET_RATIO = 0.5
IMPORT_LINES_PER_REQUEST = 10_000
VENDOR_REGIONS = ["CN-SX", "CN-NM", "CN-HE", "CN-BJ"]
ANSWER = {"label": "positive"}
LEASE_SECONDS = 600


# -- measuring -------------------------------------------------------------------------
@dataclass
class Cpu:
    """CPU seconds of the parties of one window, sampled at its start and end."""

    wall: float
    generator: float | None
    server: float | None
    backing: dict[int, float]
    machine: float | None

    @classmethod
    def sample(cls, generator_pid: int | None, server_pid: int | None, backing: Backing) -> Cpu:
        return cls(
            wall=time.perf_counter(),
            generator=time.process_time()
            if generator_pid is None
            else process_cpu_seconds(generator_pid),
            server=process_tree_cpu_seconds(server_pid) if server_pid is not None else None,
            backing=processes_cpu(backing),
            machine=machine_cpu_seconds(),
        )


@dataclass
class Window:
    name: str
    annotations: int
    seconds: float
    start: Cpu
    end: Cpu
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    exhausted: bool = False
    note: str = ""

    @property
    def rate(self) -> float:
        return self.annotations / self.seconds if self.seconds else 0.0

    def _delta(self, a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    def per_annotation_ms(self, which: str) -> float | None:
        if not self.annotations:
            return None
        if which == "backing":
            after, before = self.end.backing, self.start.backing
            used: float | None = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
        else:
            used = self._delta(getattr(self.start, which), getattr(self.end, which))
        return None if used is None else used / self.annotations * 1000

    def share(self, which: str) -> float | None:
        used = self._delta(getattr(self.start, which), getattr(self.end, which))
        wall = self.end.wall - self.start.wall
        return None if used is None or not wall else used / wall

    def others_share(self) -> float | None:
        machine = self._delta(self.start.machine, self.end.machine)
        gen = self._delta(self.start.generator, self.end.generator)
        srv = self._delta(self.start.server, self.end.server) or 0.0
        if machine is None or gen is None:
            return None
        bk = sum(cpu - self.start.backing.get(pid, 0.0) for pid, cpu in self.end.backing.items())
        wall = self.end.wall - self.start.wall
        return max(0.0, machine - gen - srv - bk) / wall if wall else None


SERVE = [sys.executable, "-m", "api.cli", "serve"]
IDLE_SHARE = 0.05


async def settle(pid: int, max_wait: float = 180.0) -> float:
    """Wait until the server (all its workers) uses under 5% of a core over a second."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        before = process_tree_cpu_seconds(pid)
        await asyncio.sleep(1.0)
        after = process_tree_cpu_seconds(pid)
        if before is None or after is None or after - before < IDLE_SHARE:
            break
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Counts:
    """Answered annotations of one task in one schema, read by a small sync engine."""

    def __init__(self, url: str, schema: str, task_id: str) -> None:
        self.engine = sa.create_engine(
            sa.engine.make_url(url).set(drivername="postgresql+psycopg"),
            connect_args={"options": f"-csearch_path={schema}"},
            pool_size=1,
        )
        self.task_id = task_id

    def answered(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM assignments"
                        " WHERE task_id = :t AND submitted_at IS NOT NULL"
                    ),
                    {"t": self.task_id},
                ).scalar_one()
            )

    def close(self) -> None:
        self.engine.dispose()


async def measure(
    name: str,
    counts: Counts,
    *,
    warmup: float,
    duration: float,
    total: int,
    cpu_of: tuple[int | None, int | None, Backing],
) -> Window:
    """Sample the answered count at the window's start and end (and every half second, so
    that a run whose work ran out is measured until the moment it did)."""
    await asyncio.sleep(warmup)
    start = Cpu.sample(*cpu_of)
    first = await asyncio.to_thread(counts.answered)
    last, last_at = first, time.perf_counter()
    stop = start.wall + duration
    exhausted = False
    while time.perf_counter() < stop:
        await asyncio.sleep(min(0.5, max(0.0, stop - time.perf_counter())))
        now_count = await asyncio.to_thread(counts.answered)
        if now_count > last:
            last, last_at = now_count, time.perf_counter()
        if now_count >= total:
            exhausted = True
            break
    end = Cpu.sample(*cpu_of)
    seconds = (last_at if exhausted else end.wall) - start.wall
    return Window(name, last - first, seconds, start, end, exhausted=exhausted)


# -- the HTTP annotators ---------------------------------------------------------------
@dataclass
class HttpStats:
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    claim_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    empty_claims: int = 0


async def annotator(
    port: int, token: str, task_id: str, batch: int, until: float, stats: HttpStats
) -> None:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    claim = HttpRequest(
        "POST",
        f"/v1/tasks/{task_id}/assignments:claim",
        headers,
        json.dumps({"count": batch}).encode(),
    ).encode(LOOPBACK, port)
    submit_path = f"/v1/tasks/{task_id}/assignments:submit"
    reader, writer = await asyncio.open_connection(LOOPBACK, port)

    async def call(payload: bytes, timings: list[float]) -> tuple[int, bytes]:
        nonlocal reader, writer
        t0 = time.perf_counter()
        writer.write(payload)
        status, body, close = await read_response(reader)
        timings.append(time.perf_counter() - t0)
        stats.requests += 1
        if close:
            writer.close()
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
        return status, body

    try:
        while time.perf_counter() < until:
            status, body = await call(claim, stats.claim_ms)
            if status != 200:
                stats.errors[f"claim {status}"] += 1
                await asyncio.sleep(0.1)
                continue
            leases = json.loads(body)["assignments"]
            if not leases:
                stats.empty_claims += 1
                await asyncio.sleep(0.2)
                continue
            answers = [{"assignment_id": a["assignment_id"], "answer": ANSWER} for a in leases]
            request = HttpRequest(
                "POST", submit_path, headers, json.dumps({"answers": answers}).encode()
            )
            status, body = await call(request.encode(LOOPBACK, port), stats.submit_ms)
            if status != 200:
                stats.errors[f"submit {status}: {body[:120]!r}"] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- pgbench ---------------------------------------------------------------------------
def libpq_env(url: str, schema: str) -> dict[str, str]:
    u = sa.engine.make_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=u.host or LOOPBACK,
        PGPORT=str(u.port or 5432),
        PGUSER=u.username or "postgres",
        PGDATABASE=u.database or "postgres",
        PGOPTIONS=f"-c search_path={schema}",
    )
    if u.password:
        env["PGPASSWORD"] = u.password
    return env


def make_scratch_schema(url: str, task_id: str) -> None:
    """The marketplace's tables in a schema of their own, made by its own migrations, with
    a copy of the task and its items (before anyone annotated them)."""
    from services.kit.db import Database
    from services.marketplace.app import SPEC

    db = Database(url, schema=SCRATCH_SCHEMA)
    try:
        db.migrate_sync(SPEC.migrations_dir)
    finally:
        db.sync_engine.dispose()
    engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with engine.begin() as conn:
            for table in ("tasks", "items"):
                columns = ", ".join(
                    f'"{c}"'
                    for c in conn.execute(
                        sa.text(
                            "SELECT column_name FROM information_schema.columns"
                            " WHERE table_schema = 'marketplace' AND table_name = :t"
                            " ORDER BY ordinal_position"
                        ),
                        {"t": table},
                    ).scalars()
                )
                where = "id" if table == "tasks" else "task_id"
                conn.execute(
                    sa.text(
                        f"INSERT INTO {SCRATCH_SCHEMA}.{table} ({columns})"
                        f" SELECT {columns} FROM marketplace.{table} WHERE {where} = :t"
                    ),
                    {"t": task_id},
                )
            conn.execute(
                sa.text(f"UPDATE {SCRATCH_SCHEMA}.tasks SET state = 'open' WHERE id = :t"),
                {"t": task_id},
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for schema in ("marketplace", SCRATCH_SCHEMA):
                for table in ("tasks", "items", "assignments"):
                    conn.execute(sa.text(f"ANALYZE {schema}.{table}"))
    finally:
        engine.dispose()


# -- the run ---------------------------------------------------------------------------
@dataclass
class Report:
    mode: str
    annotators: int
    seed_seconds: float
    import_items: int = 0
    import_seconds: float = 0.0
    import_server_cpu: float | None = None
    http: Window | None = None
    sql: Window | None = None
    exports: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    settle_seconds: float = 0.0
    pgbench_summary: str = ""


def jsonl_items(start: int, count: int) -> bytes:
    return b"".join(
        json.dumps(
            {
                "input": {"text": f"review {i}: works as described, arrived on time"},
                "external_id": f"r{i}",
            }
        ).encode()
        + b"\n"
        for i in range(start, start + count)
    )


async def run(args: argparse.Namespace) -> Report:
    if shutil.which(args.pgbench) is None:
        raise SystemExit(f"pgbench not found ({args.pgbench}); install PostgreSQL's client tools")
    tag = secrets.token_hex(3)
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onecluster-bench-")))
        logs = Path(args.log_dir) if args.log_dir else tmp
        logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        base = f"http://{LOOPBACK}:{port}"
        pg = PostgresDatabase(args.postgres)
        stack.callback(pg.drop)
        db_url = pg.create()
        prefix = f"oc_bench_{tag}"
        stack.callback(drop_redis_keys, args.redis, prefix)
        env = {
            "ONECLUSTER_DATABASE_URL": db_url,
            "ONECLUSTER_REDIS_URL": args.redis,
            "ONECLUSTER_REDIS_PREFIX": prefix,
            "ONECLUSTER_WEB_REDIRECT_URIS": json.dumps(["http://testserver/cb"]),
            "ONECLUSTER_RATE_LIMIT_PER_MINUTE": UNTRIPPED_LIMIT,
            "ONECLUSTER_FIRM_RATE_LIMIT_PER_MINUTE": UNTRIPPED_LIMIT,
            "ONECLUSTER_TOKEN_RATE_LIMIT_PER_MINUTE": UNTRIPPED_LIMIT,
            "ONECLUSTER_ACCESS_TOKEN_TTL": "7200",
        }
        data = str(tmp / "var")
        server = Server(
            "onecluster serve",
            [*SERVE, "--port", str(port), "--data-dir", data, "--workers", str(args.workers)],
            child_env(**env),
            logs / "serve.log",
        )
        server.start()
        stack.callback(server.stop)
        stack.push(_show_errors_of(server))
        await server.wait_ready(f"{base}/readyz")
        mode = "PostgreSQL + Redis, " + (
            "one uvicorn worker" if args.workers == 1 else f"{args.workers} uvicorn workers"
        )
        step(f"onecluster serve ready on {base} ({mode}); seeding {args.annotators} annotators")

        def new_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=base, timeout=300, trust_env=False)

        t0 = time.perf_counter()
        crowd = await build_crowd(
            new_client, tag=f"b{tag}", vendors=VENDOR_REGIONS, annotators=args.annotators
        )
        report = Report(mode, args.annotators, time.perf_counter() - t0)
        step(f"seeded {args.annotators} annotators in {report.seed_seconds:.1f} s")

        backing: Backing = (("postgres", pg.name), ("redis-server", None))
        async with new_client() as client:
            req = bearer(crowd.requester)
            body = task_body(
                crowd.cluster_id,
                overlap=args.overlap,
                lease_seconds=LEASE_SECONDS,
                reward_per_annotation=1,
            )
            created = await client.post("/v1/tasks", json=body, headers=req)
            _ok(created, 201)
            tid = str(created.json()["id"])

            # -- import
            step(f"import: {args.items} items, {IMPORT_LINES_PER_REQUEST} JSONL lines per request")
            srv0, t0 = process_tree_cpu_seconds(server.pid), time.perf_counter()
            for start in range(0, args.items, IMPORT_LINES_PER_REQUEST):
                chunk = jsonl_items(start, min(IMPORT_LINES_PER_REQUEST, args.items - start))
                response = await client.post(
                    f"/v1/tasks/{tid}/items",
                    content=chunk,
                    headers={**req, "Content-Type": "application/x-ndjson"},
                )
                _ok(response)
            report.import_seconds = time.perf_counter() - t0
            srv1 = process_tree_cpu_seconds(server.pid)
            report.import_items = args.items
            if srv0 is not None and srv1 is not None:
                report.import_server_cpu = srv1 - srv0

            step("copying the task into a scratch schema made by the marketplace's migrations")
            await asyncio.to_thread(make_scratch_schema, db_url, tid)
            _ok(await client.post(f"/v1/tasks/{tid}:publish", headers=req))
            await wait_until_visible(client, tid, crowd.annotators)

        total = args.items * args.overlap
        window = args.warmup + args.duration

        # -- HTTP
        step(
            f"HTTP: {args.annotators} annotators, claim {args.batch} + batch submit, "
            f"{args.warmup:g} s warm-up + {args.duration:g} s"
        )
        http_counts = Counts(db_url, "marketplace", tid)
        stack.callback(http_counts.close)
        stats = HttpStats()
        until = time.perf_counter() + window
        workers = [
            annotator(port, t["access_token"], tid, args.batch, until, stats)
            for t in crowd.annotators
        ]
        measured = measure(
            "HTTP (claim + batch submit)",
            http_counts,
            warmup=args.warmup,
            duration=args.duration,
            total=total,
            cpu_of=(None, server.pid, backing),
        )
        profiling = None
        if args.profile:
            profiling = asyncio.create_task(
                _profile(server.pid, args.warmup, args.duration, Path(args.profile))
            )
        async with asyncio.timeout(window + 120):
            results = await asyncio.gather(measured, *workers)
        http = results[0]
        assert isinstance(http, Window)
        http.requests, http.errors = stats.requests, stats.errors
        http.latencies = {"claim": stats.claim_ms, "submit": stats.submit_ms}
        http.note = f"{stats.empty_claims} empty claims"
        report.http = http
        if profiling is not None:
            await profiling
            report.profile = summarize(
                Path(args.profile), server_ms_per_annotation=http.per_annotation_ms("server")
            )

        # -- pgbench, once the server has finished the HTTP run's background work (the
        # outbox relay and the consumers of the submitted answers), which would otherwise
        # run beside pgbench and take CPU from it
        report.settle_seconds = await settle(server.pid)
        step(
            f"server idle {report.settle_seconds:.1f} s after the HTTP window;"
            f" pgbench: {args.annotators} clients, the same claim + submit in SQL"
        )
        sql_counts = Counts(db_url, SCRATCH_SCHEMA, tid)
        stack.callback(sql_counts.close)
        proc = await asyncio.create_subprocess_exec(
            args.pgbench,
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={args.annotators}",
            f"--jobs={min(args.annotators, os.cpu_count() or 1)}",
            f"--time={int(window + 0.999)}",
            f"--file={PGBENCH_SCRIPT}",
            f"--define=task={tid}",
            f"--define=batch={args.batch}",
            f"--define=overlap={args.overlap}",
            f"--define=lease={LEASE_SECONDS}",
            env=libpq_env(pg.url(driver="postgresql"), SCRATCH_SCHEMA),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

        async def finish() -> tuple[bytes, bytes]:
            return await proc.communicate()

        try:
            async with asyncio.timeout(window + 120):
                sql, (out, err) = await asyncio.gather(
                    measure(
                        "pgbench (same SQL)",
                        sql_counts,
                        warmup=args.warmup,
                        duration=args.duration,
                        total=total,
                        cpu_of=(proc.pid, None, backing),
                    ),
                    finish(),
                )
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{err.decode()[-3000:]}")
        aborted = re.search(r"number of failed transactions: (\d+)", text)
        if aborted and int(aborted.group(1)):
            sql.errors["failed transactions"] = int(aborted.group(1))
        report.pgbench_summary = " ".join(
            line.strip() for line in text.splitlines() if line.startswith(("tps", "latency"))
        )
        sql.note = "pgbench " + report.pgbench_summary
        report.sql = sql

        # -- export
        async with new_client() as client:
            report.exports = await export(client, tid, bearer(crowd.requester))
        return report


async def _profile(pid: int, warmup: float, duration: float, out: Path) -> None:
    """py-spy over the measured window of the HTTP run."""
    await asyncio.sleep(warmup)
    proc = await start_recording(pid, duration, out)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed ({proc.returncode}): {err.decode()[-2000:]}")


async def export(client: httpx.AsyncClient, task_id: str, headers: dict[str, str]) -> list[str]:
    paths = set((await client.get("/openapi.json")).json().get("paths", {}))
    lines = []
    for template, query in (
        ("/v1/tasks/{task_id}/annotations", {"format": "jsonl"}),
        ("/v1/tasks/{task_id}/results", {"format": "jsonl"}),
    ):
        if template not in paths:
            lines.append(f"{template}: not served by this build, skipped")
            continue
        path = template.replace("{task_id}", task_id)
        t0 = time.perf_counter()
        count = size = 0
        async with client.stream("GET", path, params=query, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread())[:300]
                lines.append(f"{template}: answered {response.status_code} {body!r}, skipped")
                continue
            async for line in response.aiter_lines():
                if line.strip():
                    count += 1
                    size += len(line) + 1
        seconds = time.perf_counter() - t0
        lines.append(
            f"GET {template}?format=jsonl: {count} lines, {size / 1e6:.1f} MB in {seconds:.2f} s"
            f" = {count / seconds:.0f} lines/s"
        )
    return lines


def _ok(response: httpx.Response, status: int = 200) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )


def _show_errors_of(server: Server) -> Any:
    def show(exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None:
            lines = [
                line
                for line in server.log_tail(2000).splitlines()
                if '"level": "error"' in line or "Traceback" in line
            ]
            if lines:
                print(f"!! {server.name} logged:", *lines[-8:], sep="\n", file=sys.stderr)
        return False

    return show


# -- output ----------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def print_report(report: Report, args: argparse.Namespace) -> None:
    print()
    print(f"== OneCluster annotate benchmark, {date.today().isoformat()}, {report.mode}")
    print(
        f"   {os.cpu_count()} CPUs shared by everything; Python {platform.python_version()};"
        f" {args.annotators} annotators (seeded in {report.seed_seconds:.0f} s), task of"
        f" {args.items} items x overlap {args.overlap}, claims of {args.batch};"
        f" {args.warmup:g} s warm-up + {args.duration:g} s measured"
    )
    if report.import_items:
        cpu = report.import_server_cpu
        print()
        print(
            f"import: {report.import_items} items in {report.import_seconds:.1f} s = "
            f"{report.import_items / report.import_seconds:.0f} items/s "
            f"({IMPORT_LINES_PER_REQUEST} JSONL lines per request"
            + (f"; server CPU {cpu / report.import_items * 1e6:.0f} us/item)" if cpu else ")")
        )
    print()
    print(
        f"  {'':<30}{'ann/s':>8}{'answered':>10}{'gen ms/ann':>12}{'srv ms/ann':>12}"
        f"{'db ms/ann':>11}{'gen CPU':>9}{'srv CPU':>9}{'others':>8}"
    )
    for w in (report.http, report.sql):
        if w is None:
            continue
        print(
            f"  {w.name:<30}{w.rate:>8.0f}{w.annotations:>10d}"
            f"{_ms(w.per_annotation_ms('generator')):>12}{_ms(w.per_annotation_ms('server')):>12}"
            f"{_ms(w.per_annotation_ms('backing')):>11}{_share(w.share('generator')):>9}"
            f"{_share(w.share('server')):>9}{_share(w.others_share()):>8}"
        )
    http, sql = report.http, report.sql
    if http is not None:
        claim, submit = http.latencies.get("claim", []), http.latencies.get("submit", [])
        print()
        print(
            f"HTTP latencies (whole run): claim p50 {percentile(claim, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(claim, 0.99) * 1000:.0f} ms; submit p50 "
            f"{percentile(submit, 0.5) * 1000:.0f} ms, p99 {percentile(submit, 0.99) * 1000:.0f}"
            f" ms; {http.requests} requests, {http.note}"
        )
    if sql is not None:
        print(sql.note)
        print(
            f"pgbench started once the server was idle, {report.settle_seconds:.1f} s after the"
            " HTTP window (its outbox relay and event consumers finishing the run's events)"
        )
    for w in (http, sql):
        if w is not None and w.exhausted:
            print(f"!! {w.name}: the task's work ran out; rate measured until it did")
        if w is not None and w.errors:
            print(f"!! {w.name}: unexpected answers {dict(w.errors)}", file=sys.stderr)
    if report.exports:
        print()
        for line in report.exports:
            print("export: " + line)
    if report.profile:
        print()
        print(f"py-spy profile of the server during the measured HTTP window ({args.profile}):")
        for line in report.profile:
            print(line)
    if http is not None and sql is not None and sql.rate:
        ratio = http.rate / sql.rate
        verdict = "meets" if ratio >= args.target else "BELOW"
        print()
        print(
            f"ratio = http_annotations_per_s / pgbench_annotations_per_s = "
            f"{http.rate:.0f} / {sql.rate:.0f} = {ratio:.2f}"
            f"   ({verdict} the aim of {args.target:g})"
        )
        http_cpu, sql_cpu = _cpu_per_annotation(http), _cpu_per_annotation(sql)
        if http_cpu and sql_cpu:
            print(
                f"CPU per annotation, every party: HTTP {http_cpu:.2f} ms, pgbench {sql_cpu:.2f} ms"
                f" (pgbench / HTTP = {sql_cpu / http_cpu:.2f}: the ratio on an otherwise idle"
                " machine, steadier when it is busy); one full core of server would do"
                f" {1000 / (http.per_annotation_ms('server') or 1):.0f} annotations/s"
            )
    print(
        "\ngen: the load generator (this process for HTTP, pgbench for SQL); srv: the\n"
        "onecluster serve process and its workers; db: this run's PostgreSQL backends and\n"
        "Redis; CPU columns are shares of one core; others: every other process (well above\n"
        "0% = disturbed)."
    )


def _cpu_per_annotation(w: Window) -> float | None:
    parts = [w.per_annotation_ms(which) for which in ("generator", "server", "backing")]
    known = [p for p in parts if p is not None]
    return sum(known) if known else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/annotate.py",
        description="Annotation throughput: claim + batch submit over HTTP vs the same SQL.",
    )
    parser.add_argument("--annotators", type=int, default=32, help="concurrent annotators")
    parser.add_argument("--items", type=int, default=100_000, help="items of the task")
    parser.add_argument("--overlap", type=int, default=3, help="annotations per item")
    parser.add_argument("--batch", type=int, default=10, help="items per claim")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes of the server"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        metavar="URL",
        help="PostgreSQL server (a fresh database is created and dropped)",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", metavar="URL")
    parser.add_argument("--pgbench", default="pgbench", help="the pgbench executable")
    parser.add_argument("--log-dir", metavar="DIR", help="keep the server's log there")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the server with py-spy during the HTTP window (collapsed stacks to FILE)",
    )
    parser.add_argument("--target", type=float, default=TARGET_RATIO, help="ratio to meet")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when the ratio is below target"
    )
    args = parser.parse_args(argv)
    if not (1 <= args.annotators <= 500 and 1 <= args.batch <= 100):
        parser.error("--annotators must be in [1, 500] and --batch in [1, 100]")
    if not (1 <= args.items <= 1_000_000 and 1 <= args.overlap <= 10):
        parser.error("--items must be in [1, 1000000] and --overlap in [1, 10]")
    if not (0 < args.duration <= 600 and 0 <= args.warmup <= 60):
        parser.error("--duration must be in (0, 600] and --warmup in [0, 60]")
    if not 1 <= args.workers <= 16 or (args.profile and args.workers > 1):
        parser.error("--workers must be in [1, 16], and 1 with --profile")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print_report(report, args)
    ratio = (
        report.http.rate / report.sql.rate
        if report.http and report.sql and report.sql.rate
        else 0.0
    )
    return 1 if args.check and ratio < args.target else 0


if __name__ == "__main__":
    sys.exit(main())
