"""Authenticated read through the whole stack, against the bare query, in one run.

    uv run python -m bench.auth_read                      # embedded: SQLite, in-process bus
    uv run python -m bench.auth_read --postgres postgresql://postgres@127.0.0.1:5432/test \
        --redis redis://127.0.0.1:6379/0                  # PostgreSQL + Redis

It starts ``onecluster serve`` (the embedded gateway) as a uvicorn subprocess on a free
loopback port, seeds a cluster of member firms through the public API, then starts
``bench/bare_members.py`` (the same member-list query behind a bare FastAPI route) as a
second uvicorn subprocess on the same database, and drives both with the same load
generator, one after the other:

* full stack: ``GET /v1/clusters/{id}/members?limit=50`` with a bearer access token;
* bare route: the same request (same bytes) to the bare app;
* token issuance: ``POST /oauth/token`` with the client-credentials grant of an
  integrator client created through ``POST /v1/firms/{id}/clients``.

It prints requests per second, p50/p99 latencies, server CPU per request, and
``ratio = full_stack_rps / bare_rps`` against the target (0.6). See bench/README.md.
Every process it starts is stopped through its own handle, and a PostgreSQL database
it created is dropped, even when the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Any

import httpx

from bench.loadgen import LOOPBACK, Backing, HttpRequest, LoadResult, run_load
from bench.seed import Seeded, seed

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.6
# The limits stay on (every request still counts against them) but must not trip: one
# principal reading flat out is far above the production per-principal limit.
UNTRIPPED_LIMIT = "1000000000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# -- processes -------------------------------------------------------------------------
class Server:
    """One uvicorn subprocess, stopped through its own handle."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, url: str, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + 90
        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url, headers=headers)).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log_tail()}")


def child_env(**values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ONECLUSTER_", "BENCH_", "PYTHONPROFILE"))
    }
    env.update(values)
    return env


# -- PostgreSQL and Redis --------------------------------------------------------------
class PostgresDatabase:
    """A fresh database on the given server, dropped at the end (as tests/conftest.py)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.base = sa.engine.make_url(url).set(drivername="postgresql+psycopg")
        self.admin = sa.create_engine(self.base, isolation_level="AUTOCOMMIT", pool_size=1)
        self.name = f"oc_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.created = False

    def create(self) -> str:
        self._execute(f'CREATE DATABASE "{self.name}"')
        self.created = True
        return self.url(driver="postgresql")

    def url(self, driver: str) -> str:
        return self.base.set(drivername=driver, database=self.name).render_as_string(
            hide_password=False
        )

    def drop(self) -> None:
        try:
            if self.created:
                self._execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                self.created = False
        finally:
            self.admin.dispose()

    def _execute(self, sql: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(self.sa.text(sql))


def drop_redis_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


# -- the run ---------------------------------------------------------------------------
@dataclass
class Report:
    mode: str
    seeded: Seeded
    full: list[LoadResult]
    bare: list[LoadResult]
    tokens: LoadResult | None

    @staticmethod
    def median_of(results: list[LoadResult]) -> LoadResult:
        """The median round by req/s (the upper one of an even count)."""
        return sorted(results, key=lambda r: r.rps)[len(results) // 2]

    @property
    def ratio(self) -> float:
        """Of the median rounds (by req/s) of each target."""
        bare = self.median_of(self.bare).rps
        return self.median_of(self.full).rps / bare if bare else float("nan")


def _row(label: str, r: LoadResult) -> str:
    errors = sum(r.errors.values())
    return (
        f"  {label:<22}{r.rps:>9.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{errors:>8d}"
        f"{_ms(r.server_ms_per_request):>12}{_ms(r.backing_ms_per_request):>11}"
        f"{_share(r.loadgen_share):>9}{_share(r.others_share):>8}"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def print_report(report: Report, args: argparse.Namespace) -> None:
    header = (
        f"  {'':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'srv ms/req':>12}{'db ms/req':>11}{'gen CPU':>9}{'others':>8}"
    )
    print()
    print(f"== OneCluster auth_read benchmark, {date.today().isoformat()}, {report.mode}")
    print(
        f"   {os.cpu_count()} CPUs shared by server and load generator; concurrency "
        f"{args.concurrency}, {args.warmup:g} s warm-up + {args.duration:g} s measured, "
        f"{args.client} client, {len(report.full)} round(s)"
    )
    print(
        f"   cluster of {report.seeded.member_firms} member firms seeded through the API "
        f"in {report.seeded.seconds:.1f} s"
    )
    print()
    print("GET /v1/clusters/{id}/members?limit=50")
    print(header)
    for i, (full, bare) in enumerate(zip(report.full, report.bare, strict=True), 1):
        suffix = f" #{i}" if len(report.full) > 1 else ""
        print(_row("full stack (token)" + suffix, full))
        print(_row("bare route" + suffix, bare))
    full, bare = Report.median_of(report.full), Report.median_of(report.bare)
    verdict = "meets" if report.ratio >= args.target else "BELOW"
    print()
    print(
        f"full_stack_rps = {full.rps:.0f} (p50 {full.p50_ms:.1f} ms, p99 {full.p99_ms:.1f} ms)   "
        f"bare_rps = {bare.rps:.0f} (p50 {bare.p50_ms:.1f} ms, p99 {bare.p99_ms:.1f} ms)"
    )
    print(
        f"ratio = full_stack_rps / bare_rps = {report.ratio:.2f}   "
        f"({verdict} the target of {args.target:g})"
    )
    full_cpu, bare_cpu = full.server_ms_per_request, bare.server_ms_per_request
    if full_cpu and bare_cpu:
        print(
            f"server CPU per request: full {full_cpu:.2f} ms, bare {bare_cpu:.2f} ms "
            f"(bare / full = {bare_cpu / full_cpu:.2f}: the ratio a CPU-bound server tends to,"
            " steadier when the machine is busy)"
        )
    if report.tokens is not None:
        t = report.tokens
        print()
        print("POST /oauth/token (client_credentials)")
        print(header)
        print(_row("token issuance", t))
        print(f"tokens/s = {t.rps:.0f}")
    print()
    print(
        "srv ms/req: server CPU (all threads) per answered request; db ms/req: PostgreSQL\n"
        "and Redis CPU per request; gen CPU: the load generator (100% = one core); others:\n"
        "every other process during the window (well above 0% means a disturbed figure)."
    )
    for r in [*report.full, *report.bare, *([report.tokens] if report.tokens else [])]:
        if r.errors:
            print(f"!! {r.name}: unexpected answers {r.errors}", file=sys.stderr)


def _show_errors_of(server: Server) -> Any:
    """An exit callback that shows the server's error log lines when the run fails."""

    def show(exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is not None:
            lines = [
                line
                for line in server.log_tail(2000).splitlines()
                if '"level": "error"' in line or "Traceback" in line or "Error" in line
            ]
            if lines:
                print(f"!! {server.name} logged:", *lines[-12:], sep="\n", file=sys.stderr)
        return False

    return show


def _compare(full: dict[str, Any], bare: dict[str, Any]) -> None:
    if full != bare:
        raise RuntimeError(
            "the bare route does not answer what the full stack answers:\n"
            f"full: {json.dumps(full)[:600]}\nbare: {json.dumps(bare)[:600]}"
        )


async def run(args: argparse.Namespace) -> Report:
    tag = secrets.token_hex(3)
    mode = ("PostgreSQL" if args.postgres else "SQLite (embedded)") + (
        " + Redis" if args.redis else ", in-process deny-list and limits"
    )
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onecluster-bench-")))
        data_dir = tmp / "var"
        logs = Path(args.log_dir) if args.log_dir else tmp
        logs.mkdir(parents=True, exist_ok=True)
        full_port, bare_port = free_port(), free_port()
        full_base = f"http://{LOOPBACK}:{full_port}"
        redirect_uri = f"{full_base}/oauth/callback"
        server_env = {
            "ONECLUSTER_WEB_REDIRECT_URIS": json.dumps([redirect_uri]),
            "ONECLUSTER_RATE_LIMIT_PER_MINUTE": UNTRIPPED_LIMIT,
            "ONECLUSTER_FIRM_RATE_LIMIT_PER_MINUTE": UNTRIPPED_LIMIT,
            "ONECLUSTER_TOKEN_RATE_LIMIT_PER_MINUTE": UNTRIPPED_LIMIT,
            "ONECLUSTER_ACCESS_TOKEN_TTL": "7200",
        }
        bare_url = f"sqlite+aiosqlite:///{(data_dir / 'membership.sqlite3').resolve()}"
        if args.postgres:
            pg = PostgresDatabase(args.postgres)
            stack.callback(pg.drop)
            server_env["ONECLUSTER_DATABASE_URL"] = pg.create()
            bare_url = pg.url(driver="postgresql+asyncpg")
        if args.redis:
            prefix = f"oc_bench_{tag}"
            server_env["ONECLUSTER_REDIS_URL"] = args.redis
            server_env["ONECLUSTER_REDIS_PREFIX"] = prefix
            stack.callback(drop_redis_keys, args.redis, prefix)

        full = Server(
            "onecluster serve",
            [
                sys.executable,
                "-m",
                "api.cli",
                "serve",
                "--port",
                str(full_port),
                "--data-dir",
                str(data_dir),
            ],
            child_env(**server_env),
            logs / "serve.log",
        )
        full.start()
        stack.callback(full.stop)
        stack.push(_show_errors_of(full))
        await full.wait_ready(f"{full_base}/readyz")
        step(f"onecluster serve ready on {full_base} ({mode}); seeding {args.members} firms")

        seeded = await seed(
            lambda: httpx.AsyncClient(base_url=full_base, timeout=120, trust_env=False),
            redirect_uri=redirect_uri,
            members=args.members,
            tag=tag,
            concurrency=args.seed_concurrency,
        )
        step(f"seeded {seeded.member_firms} member firms in {seeded.seconds:.1f} s")

        path = f"/v1/clusters/{seeded.cluster_id}/members?limit=50"
        auth = {"Authorization": f"Bearer {seeded.operator_tokens['access_token']}"}
        bare = Server(
            "bare route",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.bare_members:app",
                "--host",
                LOOPBACK,
                "--port",
                str(bare_port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            child_env(BENCH_DATABASE_URL=bare_url, BENCH_OPERATOR_FIRM_ID=seeded.operator_firm_id),
            logs / "bare.log",
        )
        bare.start()
        stack.callback(bare.stop)
        stack.push(_show_errors_of(bare))
        bare_base = f"http://{LOOPBACK}:{bare_port}"
        await bare.wait_ready(bare_base + path)

        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            full_page = (await client.get(full_base + path, headers=auth)).json()
            bare_page = (await client.get(bare_base + path)).json()
        _compare(full_page, bare_page)
        step(f"both answer the same page of {len(full_page['items'])} firms")

        # The same bytes to both: the bare route ignores the Authorization header.
        backing: Backing = ()
        if args.postgres:
            backing += (("postgres", pg.name),)
        if args.redis:
            backing += (("redis-server", None),)
        read = HttpRequest("GET", path, {"Accept": "application/json", **auth})
        full_results: list[LoadResult] = []
        bare_results: list[LoadResult] = []
        for round_ in range(1, args.rounds + 1):
            for name, server, port, results in (
                ("full stack", full, full_port, full_results),
                ("bare route", bare, bare_port, bare_results),
            ):
                step(f"round {round_}: {name}")
                results.append(
                    await run_load(
                        name,
                        port,
                        read,
                        concurrency=args.concurrency,
                        warmup=args.warmup,
                        duration=args.duration,
                        client=args.client,
                        server_pid=server.pid,
                        backing=backing,
                    )
                )

        tokens = None
        if not args.skip_tokens:
            basic = base64.b64encode(f"{seeded.client_id}:{seeded.client_secret}".encode()).decode()
            issue = HttpRequest(
                "POST",
                "/oauth/token",
                {
                    "Accept": "application/json",
                    "Authorization": f"Basic {basic}",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
                b"grant_type=client_credentials",
            )
            step("token issuance")
            tokens = await run_load(
                "token issuance",
                full_port,
                issue,
                concurrency=args.concurrency,
                warmup=args.warmup,
                duration=args.duration,
                client=args.client,
                server_pid=full.pid,
                backing=backing,
            )
        return Report(mode, seeded, full_results, bare_results, tokens)


def step(message: str) -> None:
    print(f"-- {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.auth_read",
        description="Authenticated member-list read: full stack vs the bare query.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=16, help="connections kept busy")
    parser.add_argument("--rounds", type=int, default=1, help="full/bare pairs (median kept)")
    parser.add_argument("--members", type=int, default=200, help="member firms to seed")
    parser.add_argument("--seed-concurrency", type=int, default=8, help="firms seeded at once")
    parser.add_argument(
        "--client", choices=["raw", "httpx"], default="raw", help="load generator client"
    )
    parser.add_argument("--postgres", metavar="URL", help="PostgreSQL server (a fresh database)")
    parser.add_argument("--redis", metavar="URL", help="Redis (keys under a fresh prefix)")
    parser.add_argument("--log-dir", metavar="DIR", help="keep the servers' logs there")
    parser.add_argument("--skip-tokens", action="store_true", help="no token-issuance run")
    parser.add_argument("--target", type=float, default=TARGET_RATIO, help="ratio to meet")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when the ratio is below target"
    )
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 600 and 0 <= args.warmup <= 60):
        parser.error("--duration must be in (0, 600] and --warmup in [0, 60]")
    if not (1 <= args.concurrency <= 256 and 1 <= args.rounds <= 10):
        parser.error("--concurrency must be in [1, 256] and --rounds in [1, 10]")
    if not (1 <= args.members <= 5000 and 1 <= args.seed_concurrency <= 64):
        parser.error("--members must be in [1, 5000] and --seed-concurrency in [1, 64]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print_report(report, args)
    return 1 if args.check and report.ratio < args.target else 0


if __name__ == "__main__":
    sys.exit(main())
