"""Messaging fan-out: one channel, N WebSocket subscribers, against a bare broadcast server.

    uv run python bench/fanout.py                      # embedded, 1000 subscribers
    uv run python bench/fanout.py --mode redis         # PostgreSQL + Redis, two replicas

``--mode embedded`` serves ``onecluster serve`` on SQLite in a temp dir (in-process bus).
``--mode redis`` serves two replicas on a scratch PostgreSQL database (created on
``--postgres``' server, dropped at the end) and Redis (``--redis``, a fresh key prefix,
deleted at the end); the sender talks to the first replica and every subscriber to the
second, so each delivery crosses Redis pub/sub.

Five users of a three-firm cluster are created through the public API; the N
subscribers share their tokens, each on its own socket subscribed to the cluster's
general channel. One sender socket posts messages at a fixed rate (open loop: a late
send does not delay the next); each text carries its send time (``time.time()``), read
back by the subscribers in the same process, so the latency is end to end on one clock.

The limit is measured in the same run: ``bench/fanout_bare.py`` (a ``websockets`` server
that sends every frame it receives to every other socket) with the same number of
subscribers, frames of the platform's event-frame size and the same rate schedule. Each
target is ramped (rates x1.6 per step) until it saturates: deliveries fall below 90% of
what was offered, or p99 exceeds 2 s (a queue that only grows). Printed: deliveries/s per
step, the ratio platform/bare of the best deliveries/s, server CPU per delivery of both,
and the platform's p99 at half its saturating rate (the most messages per second it
delivered, since a saturated step's offered rate overshoots it by up to the ramp's factor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.auth_read import (
    LOOPBACK,
    PostgresDatabase,
    Server,
    child_env,
    drop_redis_keys,
    free_port,
)
from bench.loadgen import machine_cpu_seconds, process_cpu_seconds
from services.messaging.client import MessagingClient

TARGET_RATIO = 0.5
TARGET_P99_MS = 100.0
MARK = "~ts="
UNTRIPPED = "1000000000"


# -- the receiving side ---------------------------------------------------------------
@dataclass
class Deliveries:
    """Every delivery seen: (receive time, send time), and the sockets that closed."""

    seen: list[tuple[float, float]] = field(default_factory=list)
    closed: dict[int | None, int] = field(default_factory=dict)
    last: float = 0.0
    frame_bytes: int = 0  # size of the last event frame (UTF-8 bytes)

    def on_frame(self, raw: str | bytes) -> None:
        now = time.time()
        text = raw if isinstance(raw, str) else raw.decode()
        i = text.find(MARK)
        if i < 0:
            return  # subscribed, presence, typing…
        j = text.index("~", i + len(MARK))
        self.seen.append((now, float(text[i + len(MARK) : j])))
        self.frame_bytes = len(text)  # ASCII: json.dumps escapes the rest
        self.last = now


async def receive(ws: ClientConnection, sink: Deliveries) -> None:
    try:
        async for raw in ws:
            sink.on_frame(raw)
    except ConnectionClosed:
        pass
    sink.closed[ws.close_code] = sink.closed.get(ws.close_code, 0) + 1


# -- one step of the ramp -------------------------------------------------------------
@dataclass
class Step:
    rate: float  # messages per second offered
    subscribers: int
    sent: int
    seconds: float
    deliveries_per_s: float
    offered_per_s: float
    p50_ms: float
    p99_ms: float
    server_us: float | None  # server CPU per delivery (µs)
    client_cpu: float  # this process, share of one core
    others_cpu: float | None  # every other process of the machine, share of one core

    @property
    def saturated(self) -> bool:
        # one message of slack: a window holds a whole number of messages, not of seconds
        slack = self.subscribers / self.seconds
        return self.deliveries_per_s < 0.9 * self.offered_per_s - slack or self.p99_ms > 2000.0

    def row(self) -> str:
        srv = "-" if self.server_us is None else f"{self.server_us:.0f}"
        others = "-" if self.others_cpu is None else f"{self.others_cpu:.0%}"
        flag = "  saturated" if self.saturated else ""
        return (
            f"  {self.rate:>7.1f}{self.offered_per_s:>10.0f}{self.deliveries_per_s:>10.0f}"
            f"{self.p50_ms:>9.1f}{self.p99_ms:>9.1f}{srv:>9}{self.client_cpu:>7.0%}"
            f"{others:>8}{flag}"
        )


HEADER = (
    "  msg/s   offered/s deliv./s   p50 ms   p99 ms  srv µs    gen  others\n"
    "  (offered and delivered are deliveries per second; srv µs = server CPU per delivery)"
)


@dataclass
class Cpu:
    """CPU seconds so far: this process, the whole machine, the servers under test."""

    own: float
    machine: float | None
    servers: float | None

    @classmethod
    def sample(cls, pids: list[int]) -> Cpu:
        each = [process_cpu_seconds(pid) for pid in pids]
        servers = None if any(v is None for v in each) else sum(v or 0.0 for v in each)
        return cls(time.process_time(), machine_cpu_seconds(), servers)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_step(
    send: Callable[[str], Awaitable[None]],
    pad: Callable[[str], str],
    sink: Deliveries,
    subscribers: int,
    rate: float,
    seconds: float,
    warmup: float,
    server_pids: list[int],
) -> Step:
    """Send at ``rate`` for ``warmup + seconds``; measure the last ``seconds``."""
    await drain(sink)
    sink.seen.clear()
    start = time.time()
    t0, t1 = start + warmup, start + warmup + seconds
    cpu0: Cpu | None = None
    sent = 0
    for i in itertools.count():
        due = start + i / rate
        if due >= t1:
            break
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if cpu0 is None and time.time() >= t0:
            cpu0 = Cpu.sample(server_pids)
        await send(pad(f"{MARK}{time.time():.6f}~"))
        if time.time() >= t0:
            sent += 1
    await asyncio.sleep(max(0.0, t1 - time.time()))
    cpu1 = Cpu.sample(server_pids)
    elapsed = seconds
    cpu0 = cpu0 or cpu1
    # latencies of what was sent in the window, once it arrived (grace: 2 s after)
    await drain(sink, quiet=0.3, limit=2.0)
    delivered = sum(1 for now, _ in sink.seen if t0 <= now < t1)
    latencies = [(now - sent_at) * 1000 for now, sent_at in sink.seen if t0 <= sent_at < t1]
    client = (cpu1.own - cpu0.own) / elapsed
    server_cpu = None
    if cpu0.servers is not None and cpu1.servers is not None:
        server_cpu = cpu1.servers - cpu0.servers
    others = None
    if cpu0.machine is not None and cpu1.machine is not None:
        own = (cpu1.own - cpu0.own) + (server_cpu or 0.0)
        others = max(0.0, (cpu1.machine - cpu0.machine - own) / elapsed)
    return Step(
        rate=rate,
        subscribers=subscribers,
        sent=sent,
        seconds=elapsed,
        deliveries_per_s=delivered / elapsed,
        offered_per_s=sent * subscribers / elapsed,
        p50_ms=percentile(latencies, 0.5),
        p99_ms=percentile(latencies, 0.99),
        server_us=None if server_cpu is None or not delivered else server_cpu / delivered * 1e6,
        client_cpu=client,
        others_cpu=others,
    )


async def drain(sink: Deliveries, quiet: float = 0.5, limit: float = 15.0) -> None:
    """Wait until no delivery came for ``quiet`` seconds (at most ``limit``)."""
    deadline = time.time() + limit
    while time.time() < deadline and time.time() - sink.last < quiet:
        await asyncio.sleep(0.1)


async def ramp(
    name: str,
    send: Callable[[str], Awaitable[None]],
    pad: Callable[[str], str],
    sink: Deliveries,
    args: argparse.Namespace,
    server_pids: list[int],
    rates: list[float] | None = None,
) -> list[Step]:
    print(f"-- {name}: ramp, {args.warmup:g} s + {args.step:g} s per step", flush=True)
    print(HEADER, flush=True)
    steps: list[Step] = []
    schedule = rates or [args.start_rate * 1.6**k for k in range(args.max_steps)]
    for rate in schedule:
        seconds = max(1.0, args.messages / rate) if args.messages else max(args.step, 8 / rate)
        step = await run_step(
            send, pad, sink, args.subscribers, rate, seconds, args.warmup, server_pids
        )
        print(step.row(), flush=True)
        steps.append(step)
        if rates is None and step.saturated:
            break
    if rates is None and not steps[-1].saturated:
        print(f"   not saturated after {len(steps)} steps: the best figure is a lower bound")
    if sink.closed:
        print(f"   sockets closed (code: count): {sink.closed}", flush=True)
    return steps


def best(steps: list[Step]) -> Step:
    return max(steps, key=lambda s: s.deliveries_per_s)


def saturating(steps: list[Step]) -> float:
    """Messages per second at which the platform saturates: the most it delivered.

    When the best step is the saturated one its offered rate overshoots what was
    delivered (by up to the ramp's factor), so the delivered rate is the one used.
    """
    top = best(steps)
    return min(top.rate, top.deliveries_per_s / top.subscribers)


# -- the platform ---------------------------------------------------------------------
def serve(name: str, port: int, data_dir: Path, env: dict[str, str], log: Path) -> Server:
    argv = [sys.executable, "-m", "api.cli", "serve", "--port", str(port)]
    return Server(name, [*argv, "--data-dir", str(data_dir)], child_env(**env), log)


async def subscribe_all(
    base: str, tokens: list[str], channel_id: str, n: int, sink: Deliveries
) -> list[ClientConnection]:
    gate = asyncio.Semaphore(32)
    sockets: list[ClientConnection] = []

    async def one(i: int) -> None:
        async with gate:
            client = MessagingClient(base, tokens[i % len(tokens)], max_queue=None, keepalive=False)
            answer = await client.open()
            assert answer and answer["type"] == "authenticated", answer
            subscribed = await client.subscribe(channel_id)
            assert subscribed["type"] == "subscribed", subscribed
            assert client.ws is not None
            sockets.append(client.ws)

    await asyncio.gather(*(one(i) for i in range(n)))
    return sockets


async def platform(
    args: argparse.Namespace, stack: contextlib.AsyncExitStack, tmp: Path
) -> tuple[list[Step], Step, int]:
    from tests.messaging_support import served_world, token

    env = {
        "ONECLUSTER_ENV": "test",
        "ONECLUSTER_SECRET_KEY": secrets.token_hex(16),
        "ONECLUSTER_PUBLIC_URL": "http://127.0.0.1:1",  # one issuer for both replicas
        "ONECLUSTER_WEB_REDIRECT_URIS": '["http://testserver/cb"]',
        "ONECLUSTER_RATE_LIMIT_PER_MINUTE": UNTRIPPED,
        "ONECLUSTER_FIRM_RATE_LIMIT_PER_MINUTE": UNTRIPPED,
        "ONECLUSTER_TOKEN_RATE_LIMIT_PER_MINUTE": UNTRIPPED,
        "ONECLUSTER_MESSAGING_SEND_RATE_PER_MINUTE": UNTRIPPED,
        "ONECLUSTER_ACCESS_TOKEN_TTL": "7200",
        "ONECLUSTER_LOG_LEVEL": "WARNING",
    }
    replicas = 1
    if args.mode == "redis":
        pg = PostgresDatabase(args.postgres)
        stack.callback(pg.drop)
        env["ONECLUSTER_DATABASE_URL"] = pg.create()
        prefix = f"oc_fanout_{secrets.token_hex(3)}"
        env["ONECLUSTER_REDIS_URL"] = args.redis
        env["ONECLUSTER_REDIS_PREFIX"] = prefix
        stack.callback(drop_redis_keys, args.redis, prefix)
        replicas = 2
    servers, bases = [], []
    for k in range(replicas):
        port = free_port()
        server = serve(f"replica {k}", port, tmp / "var", env, tmp / f"serve{k}.log")
        server.start()
        stack.callback(server.stop)
        await server.wait_ready(f"http://{LOOPBACK}:{port}/readyz")
        servers.append(server)
        bases.append(f"http://{LOOPBACK}:{port}")
    print(f"-- {replicas} replica(s) ready: {', '.join(bases)} ({args.mode})", flush=True)
    started = time.monotonic()
    http, world, general = await served_world(bases[0], secrets.token_hex(3))
    await http.aclose()
    tokens = [token(world, p) for p in ("op", "op2", "sx", "sx2", "nm")]
    print(f"-- cluster of 3 firms, 5 users, general channel in {time.monotonic() - started:.1f} s")

    sink = Deliveries()
    started = time.monotonic()
    sockets = await subscribe_all(bases[-1], tokens, general, args.subscribers, sink)
    readers = [asyncio.create_task(receive(ws, sink)) for ws in sockets]
    print(f"-- {len(sockets)} subscribers on {bases[-1]} in {time.monotonic() - started:.1f} s")

    sender = MessagingClient(bases[0], tokens[0], max_queue=None, keepalive=False)
    await sender.open()
    assert sender.ws is not None
    acks = asyncio.create_task(_discard(sender.ws))
    ids = itertools.count()
    prefix = json.dumps({"v": 1, "type": "send", "channel_id": general})[:-1]

    async def send(text: str) -> None:
        assert sender.ws is not None
        n = next(ids)
        await sender.ws.send(f'{prefix}, "client_message_id": "b{n}", "text": "{text}"}}')

    pad_to = args.text_bytes

    def pad(text: str) -> str:
        return text + "x" * max(0, pad_to - len(text))

    # one message to learn the size of an event frame (the bare server sends the same)
    await send(pad(f"{MARK}{time.time():.6f}~"))
    deadline = time.monotonic() + 30
    while len(sink.seen) < len(sockets) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    frame_bytes = sink.frame_bytes
    if not frame_bytes:
        raise RuntimeError("the first message reached no subscriber in 30 s")
    pids = [s.pid for s in servers]
    steps = await ramp("platform", send, pad, sink, args, pids)
    (half,) = await ramp(
        "platform at half its saturating rate", send, pad, sink, args, pids, [saturating(steps) / 2]
    )
    acks.cancel()
    await sender.close()
    for ws in sockets:
        await ws.close()
    for task in readers:
        task.cancel()
    return steps, half, frame_bytes


async def _discard(ws: ClientConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


# -- the bare broadcast server --------------------------------------------------------
async def bare(
    args: argparse.Namespace, stack: contextlib.AsyncExitStack, tmp: Path, frame_bytes: int
) -> list[Step]:
    port = free_port()
    here = Path(__file__).resolve().parent
    server = Server(
        "bare broadcast",
        [sys.executable, str(here / "fanout_bare.py"), "--port", str(port)],
        child_env(),
        tmp / "bare.log",
    )
    server.start()
    stack.callback(server.stop)
    url = f"ws://{LOOPBACK}:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            probe = await connect(url, ping_interval=None)
            await probe.close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("bare server did not start:\n" + server.log_tail()) from None
            await asyncio.sleep(0.2)
    sink = Deliveries()
    sockets = [
        await connect(url, ping_interval=None, max_queue=None) for _ in range(args.subscribers)
    ]
    readers = [asyncio.create_task(receive(ws, sink)) for ws in sockets]
    sender = await connect(url, ping_interval=None)
    print(f"-- bare server: {len(sockets)} subscribers, frames of {frame_bytes} bytes", flush=True)

    async def send(text: str) -> None:
        await sender.send(text)

    def pad(text: str) -> str:
        body = '{"type":"event","message":{"text":"' + text
        return body + "x" * max(0, frame_bytes - len(body) - 3) + '"}}'

    steps = await ramp("bare broadcast", send, pad, sink, args, [server.pid])
    await sender.close()
    for ws in sockets:
        await ws.close()
    for task in readers:
        task.cancel()
    return steps


# -- main -----------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> int:
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onecluster-fanout-")))
        if args.log_dir:
            tmp = Path(args.log_dir)
            tmp.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        steps, half, frame_bytes = await platform(args, stack, tmp)
        bare_steps = await bare(args, stack, tmp, frame_bytes or 400)
        p, b = best(steps), best(bare_steps)
        ratio = p.deliveries_per_s / b.deliveries_per_s if b.deliveries_per_s else float("nan")
        print()
        print(
            f"mode {args.mode}, {args.subscribers} subscribers, event frames of {frame_bytes} bytes"
        )
        print(
            f"platform: best {p.deliveries_per_s:,.0f} deliveries/s at {p.rate:.1f} msg/s "
            f"(p50 {p.p50_ms:.1f} / p99 {p.p99_ms:.1f} ms)"
        )
        print(
            f"bare:     best {b.deliveries_per_s:,.0f} deliveries/s at {b.rate:.1f} msg/s "
            f"(p50 {b.p50_ms:.1f} / p99 {b.p99_ms:.1f} ms)"
        )
        verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
        print(
            f"ratio = platform / bare deliveries/s = {ratio:.2f}"
            f"   ({verdict} the aim of {TARGET_RATIO})"
        )
        p_us = _median([st.server_us for st in steps if not st.saturated] or [p.server_us])
        b_us = _median([st.server_us for st in bare_steps if not st.saturated] or [b.server_us])
        if p_us and b_us:
            print(
                f"server CPU per delivery (median of unsaturated steps): platform {p_us:.0f} µs, "
                f"bare {b_us:.0f} µs: bare / platform = {b_us / p_us:.2f}"
            )
        verdict = "meets" if half.p99_ms <= TARGET_P99_MS else "ABOVE"
        print(
            f"platform p99 at half its saturating rate ({half.rate:.1f} msg/s) = "
            f"{half.p99_ms:.1f} ms   ({verdict} the aim of {TARGET_P99_MS:.0f} ms)"
        )
        print(f"run took {time.monotonic() - started:.0f} s")
        return 0


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=1000, help="WebSocket subscribers")
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per measured step (a step lasts N/rate s, at least 1 s; default: --step)",
    )
    parser.add_argument("--mode", choices=["embedded", "redis"], default="embedded")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="server for the scratch database",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--start-rate", type=float, default=1.0, help="first step, messages/s")
    parser.add_argument("--max-steps", type=int, default=14)
    parser.add_argument(
        "--step",
        type=float,
        default=3.0,
        help="measured seconds per step (at least 8 messages' worth)",
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent before measuring")
    parser.add_argument("--text-bytes", type=int, default=200, help="message text size")
    parser.add_argument("--log-dir", help="keep the servers' logs there")
    args = parser.parse_args(argv)
    if not 1 <= args.subscribers <= 10000:
        parser.error("--subscribers must be in [1, 10000]")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
