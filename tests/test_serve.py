"""`onecluster serve` as a user runs it: a real uvicorn process on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import requires_postgres, requires_redis
from tests.served import ROOT, free_port, serve_platform, served_process

CONTRACT = ROOT.parent / "shared" / "checks" / "public_contract.py"


@pytest.fixture
def served(tmp_path: Path, database_url: str | None, redis_prefix: str) -> Iterator[str]:
    with serve_platform(tmp_path, database_url, redis_prefix) as base:
        yield base


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


def test_more_than_one_worker_needs_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONECLUSTER_")}
    env.update({"ONECLUSTER_ENV": "test", "ONECLUSTER_SECRET_KEY": "served-test-secret"})
    command = [sys.executable, "-m", "api.cli", "serve", "--workers", "2"]
    command += ["--port", str(free_port()), "--data-dir", str(tmp_path / "var")]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "needs Redis" in result.stderr
    assert not (tmp_path / "var").exists()  # refused before touching any database


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@requires_postgres
@requires_redis
@pytest.mark.slow
def test_workers_share_one_port_as_replicas(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    """``serve --workers 2`` on a fresh database: migrated once by the parent, then two
    worker processes answer on one port; a token issued by either verifies on both, so
    the whole public contract passes through them."""
    with served_process(tmp_path, database_url, redis_prefix, args=("--workers", "2")) as (
        base,
        proc,
    ):
        workers = [pid for pid in _children(proc.pid) if b"spawn_main" in _cmdline(pid)]
        assert len(workers) == 2, workers
        log = (tmp_path / "server.log").read_text()
        assert log.count("membership: at heads") == 1  # one migration, by the parent
        assert "2 workers" in log
        if not CONTRACT.exists():
            pytest.skip("the shared contract check is not beside the repository")
        result = subprocess.run(
            [sys.executable, str(CONTRACT), base], capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert proc.poll() is None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
