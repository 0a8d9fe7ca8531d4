"""Logs, request ids, trace context and Prometheus metrics.

Every request gets a request id (the caller's ``X-Request-ID`` when it sends a sane one)
and a W3C ``traceparent`` (continued from the caller's, else started); both are echoed in
the response and stamped on every log line written while the request runs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
traceparent_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "traceparent", default=None
)

HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "HTTP request duration by service, method, route template and status",
    ["service", "method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_IN_FLIGHT = Gauge("http_requests_in_flight", "Requests being served", ["service"])
OUTBOX_PUBLISHED = Counter("outbox_events_published_total", "Events relayed", ["service"])
OUTBOX_DEAD_LETTERED = Counter(
    "outbox_events_dead_lettered_total",
    "Events set aside after MAX_ATTEMPTS consumer failures (last_error says why)",
    ["service"],
)
OUTBOX_BACKLOG = Gauge("outbox_backlog_events", "Unsent outbox events", ["service"])
OUTBOX_OLDEST_AGE = Gauge(
    "outbox_oldest_unsent_age_seconds", "Age of the oldest unsent outbox event", ["service"]
)
CONSUMER_LAG = Gauge(
    "event_consumer_lag_events",
    "Stream entries not yet delivered to the consumer group (-1: Redis cannot tell)",
    ["group", "source"],
)
CONSUMER_PENDING = Gauge(
    "event_consumer_pending_events",
    "Entries delivered to the consumer group and not yet acknowledged",
    ["group", "source"],
)


def count_on_commit(session: Any, counter: Any, amount: float = 1) -> None:
    """Add ``amount`` to ``counter`` (a labelled child) once ``session`` commits.

    Domain counters count what happened, not what was attempted: a transaction that
    rolls back counts nothing. ``Database`` applies the pending counts after a commit.
    """
    if amount:
        session.info.setdefault(PENDING_COUNTS, []).append((counter, amount))


def apply_pending_counts(session: Any) -> None:
    for counter, amount in session.info.pop(PENDING_COUNTS, ()):
        counter.inc(amount)


PENDING_COUNTS = "telemetry_pending_counts"

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        tp = traceparent_var.get()
        if tp:
            out["traceparent"] = tp
        for key in ("service", "method", "path", "status", "duration_ms"):
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def _continue_trace(header: str | None) -> str:
    match = _TRACEPARENT.match(header or "")
    trace_id = match.group(1) if match and match.group(1) != "0" * 32 else secrets.token_hex(16)
    flags = match.group(3) if match else "01"
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


class TelemetryMiddleware:
    """Request id, trace context, duration histogram and one access-log line per request."""

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.service = service
        self.log = logging.getLogger(f"onecluster.{service}.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(8)
        traceparent = _continue_trace(headers.get("traceparent"))
        rid_token = request_id_var.set(request_id)
        tp_token = traceparent_var.set(traceparent)
        scope.setdefault("state", {}).update(request_id=request_id, traceparent=traceparent)
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [
                    (b"x-request-id", request_id.encode()),
                    (b"traceparent", traceparent.encode()),
                ]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        in_flight = HTTP_IN_FLIGHT.labels(self.service)
        in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            in_flight.dec()
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_DURATION.labels(self.service, scope["method"], template, str(status)).observe(
                elapsed
            )
            self.log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "service": self.service,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            request_id_var.reset(rid_token)
            traceparent_var.reset(tp_token)


async def metrics_endpoint(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
