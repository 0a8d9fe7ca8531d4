"""``Idempotency-Key`` for POST requests, as an ASGI middleware over a service's own table.

Semantics (the ones Stripe and the IETF draft settled on):

* same principal + key + same request → the first response is replayed, with
  ``Idempotent-Replayed: true``, and nothing runs again;
* same principal + key + another request (method, path, query or body) → 422;
* a second request while the first is still running → 409;
* keys expire after ``ONECLUSTER_IDEMPOTENCY_TTL`` (24 h);
* only outcomes that the same request would get again are kept: 2xx, and 400/422 (the
  body itself is wrong). Anything that may change on retry — 401 (a fresh token), 403,
  404 (a read model catching up), 409, 429, 5xx — releases the key, so the request may be
  retried with it;
* a response marked ``Cache-Control: no-store`` (it carries a secret, e.g. a new client
  secret) is recorded without its body: a replay answers 409 instead of handing the
  secret out again;
* anonymous callers are keyed by their address; OAuth protocol endpoints (``/oauth/``)
  are left alone — their clients authenticate with Basic and their replay rules are the
  protocol's (codes and refresh tokens are single-use).

The key row is claimed in its own short transaction before the handler runs, so two
replicas racing on one key meet at the table's primary key.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import JSON as SQLJSON
from sqlmodel import Field, LargeBinary, SQLModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.kit.db import UTCDateTime
from services.kit.errors import (
    BadRequest,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    IdempotentSecretWithheld,
    Problem,
    Unauthorized,
    problem_response,
)

log = logging.getLogger("onecluster.idempotency")
MAX_KEY_LENGTH = 255
MAX_STORED_BODY = 1_000_000
LOCK_SECONDS = 60
KEPT_ERRORS = frozenset({400, 422})  # the request itself is wrong: a retry gets the same
SKIPPED_PREFIXES = ("/oauth/",)
SECRET_WITHHELD = "x-onecluster-secret-withheld"


class IdempotencyFields(SQLModel):
    """Columns of every service's ``idempotency_keys`` table."""

    principal: str = Field(primary_key=True, max_length=80)
    key: str = Field(primary_key=True, max_length=MAX_KEY_LENGTH)
    request_hash: str = Field(max_length=64)
    state: str = Field(max_length=16)  # running | done
    locked_until: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(index=True, sa_type=UTCDateTime)
    response_status: int | None = None
    response_headers: list[list[str]] | None = Field(default=None, sa_type=SQLJSON)
    response_body: bytes | None = Field(default=None, sa_type=LargeBinary)


def _now() -> datetime:
    return datetime.now(UTC)


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        key = None
        for name, value in scope["headers"]:
            if name.lower() == b"idempotency-key":
                key = value.decode("latin-1").strip()
                break
        if key is None or scope["path"].startswith(SKIPPED_PREFIXES):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        try:
            if not key or len(key) > MAX_KEY_LENGTH:
                raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.")
            body = await _read_body(receive)
            principal = await _principal_of(scope, state)
        except Problem as problem:
            await problem_response(problem)(scope, receive, send)
            return
        digest = hashlib.sha256()
        target = scope["path"].encode() + b"?" + scope.get("query_string", b"")
        digest.update(scope["method"].encode() + b" " + target + b"\n")
        digest.update(body)
        request_hash = digest.hexdigest()
        store = _Store(state.db, state.models.idempotency, state.settings.idempotency_ttl)
        try:
            replay = await store.claim(principal, key, request_hash)
        except Problem as problem:
            await problem_response(problem)(scope, receive, send)
            return
        if replay is not None:
            await _send_replay(replay, scope, receive, send)
            return

        captured: dict[str, Any] = {"status": 500, "headers": [], "body": bytearray()}

        body_sent = False

        async def replay_receive() -> Message:
            # The body once; after it, the client's own messages (a response that listens
            # for the disconnect must wait for it, not be handed empty bodies forever).
            nonlocal body_sent
            if body_sent:
                return await receive()
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["headers"] = [
                    [k.decode("latin-1"), v.decode("latin-1")]
                    for k, v in message.get("headers", [])
                ]
            elif (
                message["type"] == "http.response.body" and len(captured["body"]) <= MAX_STORED_BODY
            ):
                captured["body"].extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, capture_send)
        finally:
            try:
                status = captured["status"]
                if not (200 <= status < 300 or status in KEPT_ERRORS) or (
                    len(captured["body"]) > MAX_STORED_BODY
                ):
                    await store.release(principal, key)
                else:
                    if _no_store(captured["headers"]):
                        captured["body"] = bytearray()
                        captured["headers"] = [[SECRET_WITHHELD, "1"]]
                    await store.complete(principal, key, captured)
            except Exception:
                log.exception("could not record the idempotent response for key %s", key)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _principal_of(scope: Scope, state: Any) -> str:
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                raise Unauthorized("Use the Bearer scheme.", error="invalid_request")
            principal = await state.verifier.verify(token.strip())
            return f"{principal.kind}:{principal.subject}"
    client = scope.get("client")
    return f"anonymous:{client[0] if client else 'unknown'}"


def _no_store(headers: list[list[str]]) -> bool:
    return any(k.lower() == "cache-control" and "no-store" in v.lower() for k, v in headers)


async def _send_replay(row: Any, scope: Scope, receive: Receive, send: Send) -> None:
    if any(k == SECRET_WITHHELD for k, _ in (row.response_headers or [])):
        problem = IdempotentSecretWithheld(
            "The first response to this Idempotency-Key carried a secret and is not replayed;"
            " that request did succeed.",
            original_status=row.response_status,
        )
        await problem_response(problem)(scope, receive, send)
        return
    headers = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in (row.response_headers or [])
        if k.lower() not in ("x-request-id", "traceparent", "content-length")
    ]
    body = row.response_body or b""
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": row.response_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Store:
    def __init__(self, db: Any, model: type[IdempotencyFields], ttl: int) -> None:
        self.db = db
        self.model = model
        self.ttl = ttl

    async def claim(self, principal: str, key: str, request_hash: str) -> Any | None:
        """Take the key for this request, or return the stored response to replay."""
        for _ in range(3):
            now = _now()
            try:
                async with self.db.session_scope() as session:
                    row = await session.get(self.model, (principal, key))
                    if row is None:
                        session.add(
                            self.model(
                                principal=principal,
                                key=key,
                                request_hash=request_hash,
                                state="running",
                                locked_until=now + timedelta(seconds=LOCK_SECONDS),
                                expires_at=now + timedelta(seconds=self.ttl),
                            )
                        )
                        await session.flush()
                        return None
                    if row.expires_at <= now:
                        await session.delete(row)
                        await session.flush()
                        continue
                    if row.request_hash != request_hash:
                        raise IdempotencyKeyReused(
                            "This Idempotency-Key was used with a different request."
                        )
                    if row.state == "done":
                        return row
                    if row.locked_until > now:
                        raise IdempotencyInProgress(
                            "A request with this Idempotency-Key is still in progress.",
                            headers={"Retry-After": "1"},
                        )
                    row.locked_until = now + timedelta(seconds=LOCK_SECONDS)
                    return None
            except IntegrityError:
                continue  # another request inserted the key first: look again
        raise IdempotencyInProgress("A request with this Idempotency-Key is in progress.")

    async def complete(self, principal: str, key: str, captured: dict[str, Any]) -> None:
        async with self.db.session_scope() as session:
            await session.execute(
                sa.update(self.model)
                .where(self.model.principal == principal, self.model.key == key)  # type: ignore[arg-type]
                .values(
                    state="done",
                    response_status=captured["status"],
                    response_headers=captured["headers"],
                    response_body=bytes(captured["body"]),
                )
            )

    async def release(self, principal: str, key: str) -> None:
        async with self.db.session_scope() as session:
            await session.execute(
                sa.delete(self.model).where(
                    self.model.principal == principal,  # type: ignore[arg-type]
                    self.model.key == key,  # type: ignore[arg-type]
                )
            )
