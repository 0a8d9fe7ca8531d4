"""Start ``onecluster serve`` as a real uvicorn process for tests, and stop it by its handle."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_platform(
    tmp_path: Path,
    database_url: str | None,
    redis_prefix: str,
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """The base URL of a served platform on a free 127.0.0.1 port, ready to answer.

    The environment is the test run's own minus every ``ONECLUSTER_`` variable, plus the
    test database and Redis of this run; the server's output goes to ``server.log``.
    """
    with served_process(tmp_path, database_url, redis_prefix, extra_env) as (base, _):
        yield base


@contextlib.contextmanager
def served_process(
    tmp_path: Path,
    database_url: str | None,
    redis_prefix: str,
    extra_env: dict[str, str] | None = None,
    target: str = "all",
    *,
    name: str = "server",
    ready_within: float = 60,
    args: tuple[str, ...] = (),
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like :func:`serve_platform` for one ``target``, also handing out the process
    (which the test may signal or kill itself); its output goes to ``<name>.log``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONECLUSTER_")}
    env.update(
        {
            "ONECLUSTER_ENV": "test",
            "ONECLUSTER_SECRET_KEY": "served-test-secret",
            "ONECLUSTER_REDIS_PREFIX": redis_prefix,
        }
    )
    if database_url:
        env["ONECLUSTER_DATABASE_URL"] = database_url
    if os.environ.get("ONECLUSTER_TEST_REDIS_URL"):
        env["ONECLUSTER_REDIS_URL"] = os.environ["ONECLUSTER_TEST_REDIS_URL"]
    env.update(extra_env or {})
    log = tmp_path / f"{name}.log"
    command = [sys.executable, "-m", "api.cli", "serve", target, "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "var"), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready:\n" + log.read_text()[-3000:])
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
