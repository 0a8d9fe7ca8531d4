"""`onecluster serve` as a user runs it: a real uvicorn process on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT.parent / "shared" / "checks" / "public_contract.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONECLUSTER_")}
    env.update(
        {
            "ONECLUSTER_ENV": "test",
            "ONECLUSTER_SECRET_KEY": "serve-test-secret",
            "ONECLUSTER_REDIS_PREFIX": redis_prefix,
        }
    )
    if database_url:
        env["ONECLUSTER_DATABASE_URL"] = database_url
    if os.environ.get("ONECLUSTER_TEST_REDIS_URL"):
        env["ONECLUSTER_REDIS_URL"] = os.environ["ONECLUSTER_TEST_REDIS_URL"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "api.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "var"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode() if proc.stdout else "exited")
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_serve_answers_and_passes_the_public_contract(served: str, tmp_path: Path) -> None:
    discovery = httpx.get(served + "/.well-known/openid-configuration").json()
    assert discovery["issuer"] == served
    assert httpx.get(served + "/v1/clusters").status_code == 401
    if not CONTRACT.exists():
        pytest.skip("the shared contract check is not beside the repository")
    result = subprocess.run(
        [sys.executable, str(CONTRACT), served], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
