"""Where the time of the authenticated member-list read goes: cProfile, in-process.

    uv run python -m bench.profile_read [--members 200] [--requests 3000] [--concurrency 16]

Builds the embedded gateway in this process (SQLite under a temporary folder, logging
configured as ``onecluster serve`` does it, lines written to a file), seeds the same
cluster as bench/auth_read.py through the API over ``httpx.ASGITransport``, then profiles
``GET /v1/clusters/{id}/members?limit=50`` with a bearer token at a fixed concurrency.

It prints the main thread's own time by area (shares exclude the httpx client that
drives the app in-process, and the loop's idle waits), the SQL statements per request,
and the top functions by own time. Cumulative times are not shown: SQLAlchemy's
greenlet switches scramble cProfile's call stacks, so only own times are trustworthy.
cProfile sees only the event loop's thread: SQLite itself runs in aiosqlite's worker
threads, and time spent waiting (for the database, for the write lock) is not CPU and
does not appear; bench/auth_read.py shows that side as latency.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import secrets
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from api.gateway import create_gateway
from bench.seed import seed
from services.kit.settings import Settings
from services.kit.telemetry import configure_logging

BASE = "http://testserver"
UNTRIPPED_LIMIT = 1_000_000_000

# (substring of the code's file name, area); the first match wins.
AREAS = [
    ("/services/kit/", "services.kit ({module})"),
    ("/services/membership/", "services.membership ({module})"),
    ("/api/", "api ({module})"),
    ("/bench/profile_read", "load client: the driver (excluded)"),
    ("/bench/", "bench ({module})"),
    ("/httpx/", "load client: httpx (excluded)"),
    ("/httpcore/", "load client: httpx (excluded)"),
    ("/sqlalchemy/orm/", "SQLAlchemy ORM"),
    ("/sqlalchemy/", "SQLAlchemy engine, SQL compilation, results"),
    ("/aiosqlite/", "aiosqlite (event-loop side)"),
    ("/sqlmodel/", "SQLModel"),
    ("/pydantic", "pydantic"),
    ("/fastapi/", "FastAPI"),
    ("/starlette/", "Starlette"),
    ("/logging/", "logging"),
    ("/json/", "json"),
    ("/prometheus_client/", "prometheus_client"),
    ("/joserfc/", "joserfc"),
    ("/asyncio/", "asyncio"),
    ("/anyio/", "anyio"),
    ("<frozen importlib", "load client: httpx (excluded)"),  # its per-request trio probe
    ("/site-packages/", "other libraries"),
    ("/lib/python3", "Python standard library"),
]
IDLE = "idle: the event loop waiting (excluded)"


def area_of(filename: str, funcname: str) -> str:
    if filename == "~":
        if "select.epoll" in funcname:
            return IDLE
        if "posix.stat" in funcname:  # importlib, for httpx's per-request trio probe
            return "load client: httpx (excluded)"
        if "greenlet" in funcname:
            return "greenlet switches"
        return "built-ins (" + funcname.split(" of ")[0].strip("<>{}").split()[-1] + ")"
    for needle, label in AREAS:
        if needle in filename:
            module = filename.split(needle, 1)[1].removesuffix(".py")
            return label.format(module=module)
    return "other"


def make_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        public_url=BASE,
        web_redirect_uris=[f"{BASE}/oauth/callback"],
        rate_limit_per_minute=UNTRIPPED_LIMIT,
        firm_rate_limit_per_minute=UNTRIPPED_LIMIT,
        token_rate_limit_per_minute=UNTRIPPED_LIMIT,
        access_token_ttl=7200,
    )


async def drive(client: httpx.AsyncClient, path: str, auth: dict[str, str], n: int, c: int) -> int:
    remaining = n
    failures = 0

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            if (await client.get(path, headers=auth)).status_code != 200:
                failures += 1

    await asyncio.gather(*(worker() for _ in range(c)))
    return failures


async def profile(
    app: Any,
    path: str,
    headers: dict[str, str],
    args: argparse.Namespace,
    statements: tuple[Engine, Counter[str]] | None = None,
) -> tuple[pstats.Stats, float, int]:
    """Profile ``args.requests`` GETs of ``path`` on ``app`` after a warm-up, counting the
    statements ``engine`` runs meanwhile when ``statements`` is given."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        await drive(client, path, headers, 200, args.concurrency)
        listeners = _count_statements(*statements) if statements else []
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        failures = await drive(client, path, headers, args.requests, args.concurrency)
        profiler.disable()
        wall = time.perf_counter() - started
        if statements:
            for name, fn in listeners:
                sa.event.remove(statements[0], name, fn)
        return pstats.Stats(profiler), wall, failures


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="onecluster-profile-") as tmp:
        settings = make_settings(Path(tmp) / "var")
        configure_logging(settings.log_level, settings.log_json)
        with (Path(tmp) / "server.log").open("w") as log:
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler):
                    handler.setStream(log)
            gateway = create_gateway(settings)
            async with gateway.lifespan():
                transport = httpx.ASGITransport(app=gateway)

                def new_client() -> httpx.AsyncClient:
                    return httpx.AsyncClient(transport=transport, base_url=BASE, timeout=120)

                print(f"-- seeding {args.members} member firms in-process", flush=True)
                seeded = await seed(
                    new_client,
                    redirect_uri=f"{BASE}/oauth/callback",
                    members=args.members,
                    tag=secrets.token_hex(3),
                )
                path = f"/v1/clusters/{seeded.cluster_id}/members?limit=50"
                auth = {"Authorization": f"Bearer {seeded.operator_tokens['access_token']}"}
                statements: Counter[str] = Counter()
                engine = gateway.apps["membership"].state.db.engine.sync_engine
                print(f"-- profiling {args.requests} requests on the full stack", flush=True)
                full = await profile(gateway, path, auth, args, (engine, statements))

                os.environ["BENCH_DATABASE_URL"] = (
                    f"sqlite+aiosqlite:///{(settings.data_dir / 'membership.sqlite3').resolve()}"
                )
                os.environ["BENCH_OPERATOR_FIRM_ID"] = seeded.operator_firm_id
                from bench.bare_members import app as bare_app

                print(f"-- profiling {args.requests} requests on the bare route", flush=True)
                async with bare_app.router.lifespan_context(bare_app):
                    bare = await profile(bare_app, path, {}, args)
        report(full, bare, args, statements)


def _count_statements(engine: Engine, counts: Counter[str]) -> list[tuple[str, Any]]:
    """Count the SQL statements (and commits) the engine runs, by their first words."""

    def on_execute(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        words = " ".join(statement.split())
        counts[words[:72] + ("…" if len(words) > 72 else "")] += 1

    def on_commit(_conn: Any) -> None:
        counts["COMMIT"] += 1

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    sa.event.listen(engine, "commit", on_commit)
    return [("before_cursor_execute", on_execute), ("commit", on_commit)]


def _areas(stats: pstats.Stats) -> tuple[dict[str, float], float, float]:
    """Own time by area, the app side's total, and the load client's."""
    by_area: dict[str, float] = defaultdict(float)
    for (filename, _, funcname), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_area[area_of(filename, funcname)] += tottime
    client = sum(v for k, v in by_area.items() if k.startswith("load client"))
    return by_area, sum(by_area.values()) - client - by_area[IDLE], client


def _excluded(area: str) -> bool:
    return area.startswith("load client") or area == IDLE


def report(
    full: tuple[pstats.Stats, float, int],
    bare: tuple[pstats.Stats, float, int],
    args: argparse.Namespace,
    statements: Counter[str],
) -> None:
    n = args.requests
    (fstats, fwall, ffailed), (bstats, bwall, bfailed) = full, bare
    fa, ftotal, fclient = _areas(fstats)
    ba, btotal, _ = _areas(bstats)
    extra = ftotal - btotal
    print()
    print(
        f"{n} requests each at concurrency {args.concurrency}, under the profiler: full stack "
        f"{n / fwall:.0f} req/s ({ffailed} failed), bare route {n / bwall:.0f} req/s "
        f"({bfailed} failed). Main-thread own time on the app side per request: full "
        f"{ftotal * 1000 / n:.2f} ms, bare {btotal * 1000 / n:.2f} ms, extra {extra * 1000 / n:.2f}"
        f" ms (the in-process httpx client adds {fclient * 1000 / n:.2f} ms, not counted)."
    )
    print()
    print("Own time by area, ms per request: full, bare, and the full stack's extra")
    print(f"  {'full':>7}{'bare':>7}{'extra':>7}{'of extra':>10}  area")
    areas = sorted(
        (a for a in set(fa) | set(ba) if not _excluded(a)),
        key=lambda a: -(fa.get(a, 0.0) - ba.get(a, 0.0)),
    )
    for area in areas:
        f, b = fa.get(area, 0.0), ba.get(area, 0.0)
        if max(f, b) / max(ftotal, 1e-9) < 0.004:
            continue
        share = (f - b) / extra if extra > 0 else float("nan")
        f_ms, b_ms = f * 1000 / n, b * 1000 / n
        print(f"  {f_ms:7.3f}{b_ms:7.3f}{f_ms - b_ms:7.3f}{share:10.1%}  {area}")
    print()
    print(f"SQL per request on the full stack ({sum(statements.values()) / n:.1f} incl. commits;")
    print("the bare route runs one SELECT, with no transaction of its own):")
    for statement, count in statements.most_common():
        print(f"  {count / n:5.2f}  {statement}")
    print()
    print(f"Top {args.top} functions of the full stack by own time (share of its app side):")
    table = fstats.stats  # type: ignore[attr-defined]
    rows = sorted(
        (kv for kv in table.items() if not _excluded(area_of(kv[0][0], kv[0][2]))),
        key=lambda kv: -kv[1][2],
    )[: args.top]
    for (filename, line, funcname), (_, ncalls, tottime, _, _) in rows:
        where = filename if filename == "~" else f"{_short(filename)}:{line}"
        print(f"  {tottime / ftotal:6.1%}  {ncalls / n:7.1f} calls/req  {funcname}  ({where})")


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_read", description=__doc__)
    parser.add_argument("--members", type=int, default=200, help="member firms to seed")
    parser.add_argument("--requests", type=int, default=3000, help="profiled requests")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    args = parser.parse_args()
    if not (51 <= args.members <= 5000 and 1 <= args.requests <= 100_000):
        parser.error("--members must be in [51, 5000] and --requests in [1, 100000]")
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be in [1, 256]")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
