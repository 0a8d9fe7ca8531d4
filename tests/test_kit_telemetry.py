"""Request ids, W3C trace context, JSON log lines and the Prometheus histogram."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from kit_support import build_app, serve

from services.kit.settings import Settings
from services.kit.telemetry import JsonFormatter

TRACE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
log = logging.getLogger("onecluster.kittest.handler")


def make_router() -> APIRouter:
    router = APIRouter()

    @router.get("/items/{item_id}")
    async def read(item_id: str) -> dict[str, Any]:
        log.warning("reading %s", item_id)
        return {"id": item_id}

    return router


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(build_app(settings, [make_router()])) as c:
        yield c


class JsonLines(logging.Handler):
    """Formats each record as it is emitted, while the request's context is live."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def json_lines() -> Iterator[JsonLines]:
    handler = JsonLines()
    logger = logging.getLogger("onecluster")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/1", headers={"X-Request-ID": "abc-123:retry.2"})
    assert response.headers["x-request-id"] == "abc-123:retry.2"


@pytest.mark.parametrize(
    "sent", [None, "", "has spaces", "x" * 129, "inject\u00e9".encode(), "a;b", "line\tbreak"]
)
async def test_request_id_is_generated_when_absent_or_malformed(
    client: httpx.AsyncClient, sent: str | bytes | None
) -> None:
    raw = sent.encode() if isinstance(sent, str) else sent
    headers = {} if raw is None else {b"X-Request-ID": raw}
    response = await client.get("/items/1", headers=headers)
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)
    assert generated != sent
    other = await client.get("/items/1", headers=headers)
    assert other.headers["x-request-id"] != generated  # fresh each time


async def test_traceparent_is_continued_with_a_new_span(client: httpx.AsyncClient) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    sent = f"00-{trace_id}-{parent}-01"
    response = await client.get("/items/1", headers={"traceparent": sent})
    match = TRACE.match(response.headers["traceparent"])
    assert match is not None
    assert match.group(1) == trace_id
    assert match.group(2) != parent
    assert match.group(3) == "01"
    # An unsampled caller stays unsampled.
    unsampled = await client.get("/items/1", headers={"traceparent": f"00-{trace_id}-{parent}-00"})
    assert unsampled.headers["traceparent"].endswith("-00")


@pytest.mark.parametrize(
    "sent",
    [
        None,
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    ],
)
async def test_traceparent_is_started_when_absent_or_invalid(
    client: httpx.AsyncClient, sent: str | None
) -> None:
    headers = {} if sent is None else {"traceparent": sent}
    response = await client.get("/items/1", headers=headers)
    match = TRACE.match(response.headers["traceparent"])
    assert match is not None
    assert match.group(1) != "0" * 32
    assert sent is None or match.group(1) not in sent.lower()


async def test_log_lines_carry_the_request_id_and_trace(
    client: httpx.AsyncClient, json_lines: JsonLines
) -> None:
    response = await client.get("/items/7", headers={"X-Request-ID": "trace-me"})
    mine = [line for line in json_lines.lines if line.get("request_id") == "trace-me"]
    handler_line = next(line for line in mine if line["msg"] == "reading 7")
    access_line = next(line for line in mine if line["logger"] == "onecluster.kittest.access")
    for line in (handler_line, access_line):
        assert line["traceparent"] == response.headers["traceparent"]
    assert access_line["status"] == 200
    assert access_line["path"] == "/items/7"
    assert access_line["method"] == "GET"
    # Outside a request nothing is stamped.
    logging.getLogger("onecluster.kittest.handler").warning("outside")
    assert "request_id" not in json_lines.lines[-1]


async def test_metrics_label_requests_by_route_template(client: httpx.AsyncClient) -> None:
    await client.get("/items/42")
    await client.get("/items/unique-raw-value-9f3e")
    await client.get("/no-such-route-7c1d")
    response = await client.get("/metrics")
    assert response.status_code == 200
    text = response.text
    series = [
        line
        for line in text.splitlines()
        if line.startswith("http_request_duration_seconds_count") and 'service="kittest"' in line
    ]
    assert any('route="/items/{item_id}"' in s and 'status="200"' in s for s in series), series
    assert any('route="unmatched"' in s and 'status="404"' in s for s in series), series
    assert "unique-raw-value-9f3e" not in text
    assert "no-such-route-7c1d" not in text
    assert 'route="/items/42"' not in text


async def test_domain_counters_count_only_what_commits(tmp_path) -> None:
    from prometheus_client import Counter

    from services.kit.db import Database
    from services.kit.telemetry import count_on_commit

    counter = Counter("kit_test_commits_total", "test counter", ["outcome"])
    db = Database(f"sqlite:///{tmp_path / 'c.sqlite3'}", schema="kit")
    try:
        async with db.session_scope() as session:
            count_on_commit(session, counter.labels("kept"), 3)
        try:
            async with db.session_scope() as session:
                count_on_commit(session, counter.labels("lost"), 5)
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
    finally:
        await db.engine.dispose()
    assert counter.labels("kept")._value.get() == 3
    assert counter.labels("lost")._value.get() == 0
