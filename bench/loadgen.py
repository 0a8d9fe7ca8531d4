"""A closed-loop HTTP/1.1 load generator: fixed concurrency, fixed time, loopback only.

``concurrency`` workers each keep one keep-alive connection and send the next request as
soon as the previous answer is read. Requests are counted, and their latencies kept, when
they start after the warm-up and finish before the end of the measured window. The run
is bounded twice: by time (warm-up + duration, then at most ``timeout`` for requests in
flight) and by count (``max_requests``).

Two clients drive the same loop: ``raw`` writes prebuilt request bytes on asyncio streams
and parses only the status line and the framing headers; ``httpx`` uses one
``httpx.AsyncClient``. On a small machine the generator shares the CPU with the server,
so the cheaper one (``raw``) is the default; see bench/README.md for the measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

LOOPBACK = "127.0.0.1"
ClientKind = Literal["raw", "httpx"]


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def encode(self, host: str, port: int) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass
class LoadResult:
    name: str
    concurrency: int
    duration: float
    completed: int
    errors: dict[str, int]
    latencies: list[float]
    loadgen_cpu: float | None
    server_cpu: float | None
    machine_cpu: float | None = None
    backing_cpu: float | None = None

    @property
    def rps(self) -> float:
        return self.completed / self.duration if self.duration else 0.0

    def percentile(self, q: float) -> float:
        """Latency (seconds) at quantile ``q`` of the successful requests (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    @property
    def p50_ms(self) -> float:
        return self.percentile(0.50) * 1000

    @property
    def p99_ms(self) -> float:
        return self.percentile(0.99) * 1000

    @property
    def server_ms_per_request(self) -> float | None:
        """Server CPU (user + system, all threads) per successful request, in ms."""
        if self.server_cpu is None or not self.completed:
            return None
        return self.server_cpu / self.completed * 1000

    @property
    def loadgen_share(self) -> float | None:
        """The generator's CPU time over the window's wall time (1.0 = one core)."""
        return None if self.loadgen_cpu is None else self.loadgen_cpu / self.duration

    @property
    def backing_ms_per_request(self) -> float | None:
        """CPU of the backing services (PostgreSQL, Redis) per successful request, in ms."""
        if self.backing_cpu is None or not self.completed:
            return None
        return self.backing_cpu / self.completed * 1000

    @property
    def others_share(self) -> float | None:
        """CPU used by every other process of the machine during the window (1.0 = one
        core): anything much above zero means the figures were disturbed."""
        if self.machine_cpu is None or self.server_cpu is None or self.loadgen_cpu is None:
            return None
        used = self.server_cpu + self.loadgen_cpu + (self.backing_cpu or 0.0)
        return max(0.0, self.machine_cpu - used) / self.duration


class _Window:
    def __init__(self, warmup: float, duration: float, max_requests: int) -> None:
        now = time.perf_counter()
        self.start = now + warmup
        self.stop = self.start + duration
        self.max_requests = max_requests
        self.sent = 0
        self.completed = 0
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []

    def more(self) -> bool:
        return time.perf_counter() < self.stop and self.sent < self.max_requests

    def record(self, t0: float, t1: float, ok: bool, what: str) -> None:
        if t0 < self.start or t1 > self.stop:
            return
        if ok:
            self.completed += 1
            self.latencies.append(t1 - t0)
        else:
            self.errors[what] += 1


# -- the raw client --------------------------------------------------------------------
async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then a blank line
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """``(status, body, server_closes)`` of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    if chunked:
        body = await _read_chunked(reader)
    elif length is not None:
        body = await reader.readexactly(length)
    else:
        body, close = await reader.read(), True
    return status, body, close


async def _raw_worker(
    port: int, payload: bytes, expect: int, window: _Window, timeout: float
) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        while window.more():
            if writer is None:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
            assert reader is not None
            window.sent += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    writer.write(payload)
                    status, _, close = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                window.record(t0, time.perf_counter(), False, type(exc).__name__)
                close = True
            else:
                window.record(t0, time.perf_counter(), status == expect, str(status))
            if close:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                writer = reader = None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# -- the httpx client ------------------------------------------------------------------
async def _httpx_worker(
    client: httpx.AsyncClient, request: HttpRequest, expect: int, window: _Window
) -> None:
    while window.more():
        window.sent += 1
        t0 = time.perf_counter()
        try:
            response = await client.request(
                request.method, request.path, headers=request.headers, content=request.body or None
            )
        except httpx.HTTPError as exc:
            window.record(t0, time.perf_counter(), False, type(exc).__name__)
        else:
            window.record(
                t0, time.perf_counter(), response.status_code == expect, str(response.status_code)
            )


# -- CPU accounting --------------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process (all its threads), from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_tree_cpu_seconds(pid: int) -> float | None:
    """:func:`process_cpu_seconds` of ``pid`` plus every live descendant (uvicorn's workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    own = process_cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(process_cpu_seconds(p) or 0.0 for p in tree - {pid})


def machine_cpu_seconds() -> float | None:
    """CPU time all processes of the machine have used (busy, not idle or iowait)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


Backing = tuple[tuple[str, str | None], ...]


def processes_cpu(backing: Backing) -> dict[int, float]:
    """CPU of each process whose command name is one of ``backing``'s names and whose
    command line holds its marker, if any (a PostgreSQL backend's title names its
    database, so only this run's backends count)."""
    found: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                comm = f.read().strip()
            markers = [marker for name, marker in backing if name == comm]
            if not markers:
                continue
            if None not in markers:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
                if not any(m in cmdline for m in markers if m):
                    continue
        except OSError:
            continue
        cpu = process_cpu_seconds(pid)
        if cpu is not None:
            found[pid] = cpu
    return found


Sample = tuple[float, float | None, float | None, dict[int, float] | None]


def _cpu_sample(server_pid: int | None, backing: Backing) -> Sample:
    server = process_cpu_seconds(server_pid) if server_pid is not None else None
    return time.process_time(), server, machine_cpu_seconds(), processes_cpu(backing)


def _backing_delta(before: dict[int, float] | None, after: dict[int, float] | None) -> float:
    """CPU the backing processes used between two samples; a process that ended in
    between is lost (its last figure is unknown), one that started counts in full."""
    if not before and not after:
        return 0.0
    after = after or {}
    before = before or {}
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


async def run_load(
    name: str,
    port: int,
    request: HttpRequest,
    *,
    concurrency: int,
    warmup: float,
    duration: float,
    client: ClientKind = "raw",
    expect: int = 200,
    server_pid: int | None = None,
    backing: Backing = (),
    timeout: float = 10.0,
    max_requests: int = 2_000_000,
) -> LoadResult:
    """Drive ``request`` at ``127.0.0.1:port`` and measure the window after the warm-up."""
    if not 1 <= concurrency <= 1024:
        raise ValueError("concurrency must be between 1 and 1024")
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be positive and warm-up not negative")
    window = _Window(warmup, duration, max_requests)
    samples: list[Sample] = []

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
        samples.append(_cpu_sample(server_pid, backing))
        await asyncio.sleep(max(0.0, window.stop - time.perf_counter()))
        samples.append(_cpu_sample(server_pid, backing))

    async with contextlib.AsyncExitStack() as stack:
        if client == "raw":
            payload = request.encode(LOOPBACK, port)
            workers = [
                _raw_worker(port, payload, expect, window, timeout) for _ in range(concurrency)
            ]
        else:
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=f"http://{LOOPBACK}:{port}",
                    limits=httpx.Limits(
                        max_connections=concurrency, max_keepalive_connections=concurrency
                    ),
                    timeout=timeout,
                    trust_env=False,
                )
            )
            workers = [_httpx_worker(http, request, expect, window) for _ in range(concurrency)]
        bound = warmup + duration + timeout + 5
        async with asyncio.timeout(bound):
            await asyncio.gather(sampler(), *workers)

    (cpu0, srv0, all0, bk0), (cpu1, srv1, all1, bk1) = samples
    return LoadResult(
        name=name,
        concurrency=concurrency,
        duration=window.stop - window.start,
        completed=window.completed,
        errors=dict(window.errors),
        latencies=window.latencies,
        loadgen_cpu=cpu1 - cpu0,
        server_cpu=(srv1 - srv0) if srv0 is not None and srv1 is not None else None,
        machine_cpu=(all1 - all0) if all0 is not None and all1 is not None else None,
        backing_cpu=_backing_delta(bk0, bk1) if backing else None,
    )
