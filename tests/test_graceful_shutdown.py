"""SIGTERM drains a real service process: requests in flight finish, new ones are refused.

One HTTP service (membership) is served by uvicorn in its own process. A request is
left half-sent (its body still arriving) when the process gets SIGTERM; the test then
checks that the server stopped taking connections, that the half-sent request still
completes with its real answer (the user exists afterwards), and that the process exits
cleanly within its grace period.

uvicorn closes the listener as soon as it handles SIGTERM and runs the lifespan shutdown
only once the requests in flight are done, so nothing can ask ``/readyz`` while the
lifespan marks the process as draining. ``serve --shutdown-delay S`` keeps serving for S
seconds after SIGTERM with ``/readyz`` answering 503 ``draining`` (``/healthz`` stays
200: the process is alive), so a load balancer watching readiness stops sending traffic
before connections are refused; the tests below watch that from outside, in one service
and in the all-in-one gateway (each has its own ``/readyz``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import pytest

from tests.served import served_process

pytestmark = pytest.mark.slow


async def test_sigterm_lets_the_request_in_flight_finish(
    tmp_path: Path, redis_prefix: str, database_url: str | None
) -> None:
    with served_process(tmp_path, database_url, redis_prefix, target="membership") as (
        base,
        proc,
    ):
        body = json.dumps(
            {
                "email": "late@drain.example",
                "password": "a long enough password",
                "display_name": "L",
            }
        ).encode()
        half = len(body) // 2
        sent_first_half = asyncio.Event()
        may_finish = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield body[:half]
            sent_first_half.set()
            await may_finish.wait()
            yield body[half:]

        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            in_flight = asyncio.create_task(
                client.post(
                    "/v1/users", content=slow_body(), headers={"content-type": "application/json"}
                )
            )
            await asyncio.wait_for(sent_first_half.wait(), 10)
            await asyncio.sleep(0.3)  # the server has read the headers and waits for the rest
            proc.send_signal(signal.SIGTERM)
            # The listener closes first: a new connection is refused (readiness fails).
            deadline = time.monotonic() + 10
            refused = False
            while time.monotonic() < deadline and not refused:
                try:
                    async with httpx.AsyncClient(timeout=2) as fresh:
                        await fresh.get(base + "/healthz")
                    await asyncio.sleep(0.1)
                except httpx.TransportError:
                    refused = True
            assert refused, "the server kept accepting connections after SIGTERM"
            assert proc.poll() is None, "the server exited with a request in flight"
            may_finish.set()
            response = await asyncio.wait_for(in_flight, 20)
        assert response.status_code == 201, response.text
        assert response.json()["email"] == "late@drain.example"
        code = await asyncio.to_thread(proc.wait, 30)
        # uvicorn re-raises the signal it handled once it has shut down, so the exit
        # status says "terminated by SIGTERM"; what matters is the orderly shutdown.
        assert code in (0, -signal.SIGTERM), code
    log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete." in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


NEW_USER = {"password": "a long enough password", "display_name": "D"}


async def _wait_for_draining(base: str, proc: Popen[bytes], within: float = 10) -> dict[str, Any]:
    """The first ``/readyz`` answer that is not 200 (each asked on a new connection)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited before it reported draining"
        try:
            async with httpx.AsyncClient(timeout=5) as fresh:
                ready = await fresh.get(base + "/readyz")
        except httpx.TransportError as exc:
            raise AssertionError(f"/readyz was refused before it said draining: {exc!r}") from exc
        if ready.status_code != 200:
            assert ready.status_code == 503, ready.text
            body: dict[str, Any] = ready.json()
            return body
        await asyncio.sleep(0.05)
    raise AssertionError("/readyz never stopped answering 200 after SIGTERM")


async def _wait_until_refused(base: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(timeout=2) as fresh:
                await fresh.get(base + "/healthz")
        except httpx.TransportError:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server still accepted connections {within} s after SIGTERM")


def _assert_draining(body: dict[str, Any]) -> None:
    """503 because of the shutdown alone: the database (and Redis) still answer."""
    assert body["status"] == "unavailable", body
    checks = dict(body["checks"])
    assert checks.pop("shutdown") == "draining", body
    assert checks, body
    assert all(value == "ok" for value in checks.values()), body


def _assert_clean_exit(code: int, log_path: Path) -> None:
    # uvicorn re-raises the signal it handled once it has shut down (see above).
    assert code in (0, -signal.SIGTERM), code
    log = log_path.read_text()
    assert "SIGTERM: /readyz answers draining" in log, log[-3000:]
    assert "Application shutdown complete." in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("target", ["membership", "all"])
async def test_sigterm_reports_draining_on_readyz_before_the_listener_closes(
    tmp_path: Path, redis_prefix: str, database_url: str | None, target: str
) -> None:
    """With a shutdown delay, SIGTERM first turns ``/readyz`` into 503 ``draining`` while
    ``/healthz`` stays 200; when the delay is over the listener closes, the request in
    flight still completes, and the process exits cleanly."""
    with served_process(
        tmp_path, database_url, redis_prefix, target=target, args=("--shutdown-delay", "3")
    ) as (base, proc):
        body = json.dumps({"email": "inflight@drain.example", **NEW_USER}).encode()
        sent_first_half = asyncio.Event()
        may_finish = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield body[:10]
            sent_first_half.set()
            await may_finish.wait()
            yield body[10:]

        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            in_flight = asyncio.create_task(
                client.post(
                    "/v1/users", content=slow_body(), headers={"content-type": "application/json"}
                )
            )
            await asyncio.wait_for(sent_first_half.wait(), 10)
            proc.send_signal(signal.SIGTERM)
            _assert_draining(await _wait_for_draining(base, proc))
            async with httpx.AsyncClient(timeout=5) as fresh:
                alive = await fresh.get(base + "/healthz")
            assert alive.status_code == 200, alive.text
            assert alive.json() == {"status": "ok"}
            # The delay ends by itself; then connections are refused, as without one.
            await _wait_until_refused(base, within=30)
            assert proc.poll() is None, "the server exited with a request in flight"
            assert not in_flight.done()
            may_finish.set()
            response = await asyncio.wait_for(in_flight, 20)
        assert response.status_code == 201, response.text
        assert response.json()["email"] == "inflight@drain.example"
        code = await asyncio.to_thread(proc.wait, 30)
    _assert_clean_exit(code, tmp_path / "server.log")


async def test_the_drain_keeps_serving_until_a_second_sigterm_ends_it(
    tmp_path: Path, redis_prefix: str, database_url: str | None
) -> None:
    """While draining, new requests are still served (the load balancer may not have
    noticed yet); a second SIGTERM does not wait for the rest of a long delay."""
    with served_process(
        tmp_path, database_url, redis_prefix, target="membership", args=("--shutdown-delay", "600")
    ) as (base, proc):
        proc.send_signal(signal.SIGTERM)
        _assert_draining(await _wait_for_draining(base, proc))
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            created = await client.post(
                "/v1/users", json={"email": "during@drain.example", **NEW_USER}
            )
            assert created.status_code == 201, created.text
            again = await client.get("/readyz")
            assert again.status_code == 503, again.text
        proc.send_signal(signal.SIGTERM)
        await _wait_until_refused(base, within=30)
        code = await asyncio.to_thread(proc.wait, 30)
    _assert_clean_exit(code, tmp_path / "server.log")
