"""`onecluster serve` as a user runs it: a real uvicorn process on a free port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.served import ROOT, serve_platform

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
