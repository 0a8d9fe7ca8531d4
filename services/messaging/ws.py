"""The WebSocket endpoint ``/v1/ws``: a versioned JSON frame protocol (see PROTOCOL.md).

The token never travels in the URL: the client's first frame is ``auth``; it may send
``auth`` again with a fresh token at any time, and a socket whose token runs out
without one is closed with 4001. Frames are handled one at a time per socket, so a
client's sends are answered in the order it sent them. Everything the server pushes
goes through the connection's bounded queue (see ``fanout``) and is written by the
socket's own writer task: a frame that cannot be written within
``messaging_send_timeout`` (the client stopped reading) ends the socket with 4008.

A close frame queues behind whatever the socket still has to write, so closing a slow
consumer waits up to ``CLOSE_WAIT`` seconds for the client to read that far; after
that the server stops waiting and lets the connection go.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from services.kit.auth import Principal, TokenVerifier
from services.kit.errors import (
    Conflict,
    Forbidden,
    InsufficientScope,
    InvalidState,
    NotFound,
    Problem,
    RateLimited,
    Unauthorized,
    Unprocessable,
)
from services.kit.settings import Settings
from services.messaging import service
from services.messaging.counters import OPEN_SOCKETS, frames_delivered
from services.messaging.fanout import (
    CLOSE_FORBIDDEN,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHENTICATED,
    Connection,
    Hub,
    encode,
    frame,
)
from services.messaging.schemas import MessageCreate, MessageUpdate

log = logging.getLogger("onecluster.messaging.ws")
router = APIRouter()
PROTOCOL_VERSION = 1
CLOSE_WAIT = 30.0
ERROR_CODES: list[tuple[type[Problem], str]] = [
    (service.NotAMember, "not_a_member"),
    (service.MessageTooLarge, "message_too_large"),
    (InsufficientScope, "insufficient_scope"),
    (Forbidden, "forbidden"),
    (NotFound, "not_found"),
    (InvalidState, "invalid_state"),
    (Conflict, "conflict"),
    (Unprocessable, "invalid"),
    (RateLimited, "rate_limited"),
    (Unauthorized, "auth_failed"),
]


class FrameError(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


def error_frame(code: str, message: str, ref: Any = None, **extra: Any) -> dict[str, Any]:
    out = frame("error", code=code, message=message, **extra)
    if ref is not None:
        out["ref"] = ref
    return out


def problem_frame(problem: Problem, ref: Any) -> dict[str, Any]:
    code = next((c for cls, c in ERROR_CODES if isinstance(problem, cls)), "bad_request")
    extra = {k: v for k, v in problem.extra.items() if k in ("unknown", "state", "max_bytes")}
    if isinstance(problem, RateLimited):
        extra["retry_after"] = int(problem.headers.get("Retry-After", "1"))
    return error_frame(code, problem.detail or problem.title, ref, **extra)


def parse(text: str, max_bytes: int) -> dict[str, Any]:
    if len(text.encode("utf-8")) > max_bytes:
        raise FrameError("frame_too_large", f"Frames are at most {max_bytes} bytes.")
    try:
        data = json.loads(text)
    except ValueError:
        raise FrameError("malformed_frame", "A frame is one JSON object.") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise FrameError("malformed_frame", "A frame is a JSON object with a string `type`.")
    if data.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise FrameError("unsupported_version", f"This server speaks v{PROTOCOL_VERSION}.")
    return data


async def verify(websocket: WebSocket, token: Any) -> Principal:
    if not isinstance(token, str) or not token:
        raise Unauthorized("The auth frame needs a token.")
    verifier: TokenVerifier = websocket.app.state.verifier
    principal = await verifier.verify(token)
    if principal.kind != "user" or principal.firm_id is None:
        raise Forbidden("Messaging needs a user's token acting for a firm.")
    if not principal.has("messaging:read"):
        raise InsufficientScope("Missing scope: messaging:read.")
    return principal


@router.websocket("/v1/ws")
async def socket(websocket: WebSocket) -> None:
    """Accept, then serve until the socket ends (``messaging_websocket_connections``)."""
    await websocket.accept()
    OPEN_SOCKETS.inc()
    try:
        await _serve(websocket)
    finally:
        OPEN_SOCKETS.dec()


async def _serve(websocket: WebSocket) -> None:
    settings: Settings = websocket.app.state.settings
    hub: Hub = websocket.app.state.hub
    try:
        first = await asyncio.wait_for(websocket.receive_text(), settings.messaging_auth_timeout)
        data = parse(first, settings.messaging_max_frame_bytes)
        if data["type"] != "auth":
            raise Unauthorized("The first frame must be `auth`.")
        principal = await verify(websocket, data.get("token"))
    except TimeoutError:
        await _close(websocket, CLOSE_UNAUTHENTICATED, "no auth frame in time")
        return
    except (WebSocketDisconnect, RuntimeError):
        return
    except (FrameError, Unauthorized) as exc:
        await _close(websocket, CLOSE_UNAUTHENTICATED, _reason(exc))
        return
    except Forbidden as exc:
        await _close(websocket, CLOSE_FORBIDDEN, _reason(exc))
        return
    conn = hub.connect(principal)
    conn.push(_authenticated(principal, data))
    writer = asyncio.create_task(_write(websocket, conn))
    reader = asyncio.create_task(_read(websocket, conn))
    try:
        await asyncio.wait(
            {reader, writer, asyncio.create_task(conn.done.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        hub.disconnect(conn)
        conn.sender = None
        tasks = [t for t in (reader, writer, conn.sending) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await _close(websocket, conn.close_code, conn.close_reason)


def _authenticated(principal: Principal, data: dict[str, Any]) -> dict[str, Any]:
    out = frame(
        "authenticated",
        user_id=principal.subject,
        firm_id=principal.firm_id,
        expires_at=principal.expires_at,
    )
    if data.get("id") is not None:
        out["ref"] = data["id"]
    return out


def _reason(exc: Exception) -> str:
    text = exc.message if isinstance(exc, FrameError) else str(exc)
    return text[:120]


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code, reason), CLOSE_WAIT)


async def _write(websocket: WebSocket, conn: Connection) -> None:
    """Write what queued up while the socket was busy (see ``fanout``): frames pushed
    while this task waits on an empty queue are written by the pusher directly."""
    timeout = conn.hub.settings.messaging_send_timeout
    conn.sender = websocket.send_text
    try:
        while True:
            if conn.queue.empty():
                conn.idle = True
                try:
                    payload = await conn.queue.get()
                finally:
                    conn.idle = False
            else:
                payload = conn.queue.get_nowait()
            if conn.sending is not None:  # a direct write still waits: keep the order
                await asyncio.wait({conn.sending})
                if conn.closed:
                    return
            text = encode(payload)  # once per fan-out, not once per subscriber
            try:
                async with asyncio.timeout(timeout):  # no task per frame, unlike wait_for
                    await websocket.send_text(text)
            except TimeoutError:
                conn.fail(CLOSE_SLOW_CONSUMER, "slow consumer")
                return
            frames_delivered(str(payload.get("type", ""))).inc()
    except (WebSocketDisconnect, RuntimeError, OSError):
        conn.fail(1000, "")


async def _read(websocket: WebSocket, conn: Connection) -> None:
    settings: Settings = websocket.app.state.settings
    while not conn.closed:
        try:
            text = await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            conn.fail(1000, "")
            return
        ref: Any = None
        try:
            data = parse(text, settings.messaging_max_frame_bytes)
            ref = data.get("id")
            await handle(websocket, conn, data)
        except FrameError as exc:
            conn.push(error_frame(exc.code, exc.message, ref, **exc.extra))
        except Problem as exc:
            conn.push(problem_frame(exc, ref))
        except ValidationError as exc:
            errors = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()]
            conn.push(
                error_frame("invalid", "The frame does not match its schema.", ref, errors=errors)
            )
        except Exception:
            log.exception("messaging frame failed")
            conn.push(error_frame("internal", "The frame could not be handled.", ref))


def _require(conn: Connection, scope: str) -> None:
    if not conn.principal.has(scope):
        raise InsufficientScope(f"Missing scope: {scope}.")


def _channel_id(data: dict[str, Any]) -> str:
    channel_id = data.get("channel_id")
    if not isinstance(channel_id, str) or not 0 < len(channel_id) <= 64:
        raise FrameError("invalid", "`channel_id` is a string id.")
    return channel_id


def _body(data: dict[str, Any], *skip: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("v", "type", "id", *skip)}


async def handle(websocket: WebSocket, conn: Connection, data: dict[str, Any]) -> None:
    """Handle one client frame; errors become error frames (see ``_read``)."""
    kind, ref = data["type"], data.get("id")
    settings: Settings = websocket.app.state.settings
    hub: Hub = websocket.app.state.hub
    db = websocket.app.state.db
    if kind == "auth":
        principal = await verify(websocket, data.get("token"))
        if (principal.subject, principal.firm_id) != (conn.principal.subject, conn.caller.firm_id):
            raise FrameError("auth_mismatch", "A socket keeps its user and firm.")
        conn.principal = principal
        conn.push(_authenticated(principal, data))
    elif kind == "ping":
        hub.touch(conn)
        conn.push(frame("pong", ref=ref) if ref is not None else frame("pong"))
    elif kind == "typing":
        channel_id = _channel_id(data)
        if channel_id not in conn.subs:  # subscribed: access was checked then
            async with db.read_scope() as session:
                await service.channel_access(session, conn.caller, channel_id)
        hub.typing(conn, channel_id)
    elif kind == "subscribe":
        _require(conn, "messaging:read")
        since = data.get("since_seq")
        if since is not None and (
            not isinstance(since, int) or isinstance(since, bool) or since < 0
        ):
            raise FrameError("invalid", "`since_seq` is a non-negative integer.")
        await hub.subscribe(conn, _channel_id(data), since)
    elif kind == "unsubscribe":
        channel_id = _channel_id(data)
        sub = conn.subs.get(channel_id)
        if sub is not None:
            hub.unsubscribe(sub)
        conn.push(frame("unsubscribed", channel_id=channel_id, reason="requested"))
    elif kind == "send":
        _require(conn, "messaging:write")
        channel_id = _channel_id(data)
        body = MessageCreate.model_validate(_body(data, "channel_id"))
        await _send_rate(websocket, conn)
        async with db.session_scope() as session:
            message, created = await service.post_message(
                session,
                conn.caller,
                channel_id,
                text=body.text,
                client_message_id=body.client_message_id,
                mention_user_ids=body.mentions.user_ids,
                mention_firm_ids=body.mentions.firm_ids,
                attachments=body.attachments,
                max_bytes=settings.messaging_max_message_bytes,
            )
        conn.push(_ack(ref, message, created))
    elif kind == "edit":
        _require(conn, "messaging:write")
        channel_id = _channel_id(data)
        update = MessageUpdate.model_validate(_body(data, "channel_id", "message_id"))
        async with db.session_scope() as session:
            message = await service.edit_message(
                session,
                conn.caller,
                channel_id,
                str(data.get("message_id", "")),
                text=update.text,
                max_bytes=settings.messaging_max_message_bytes,
            )
        conn.push(_ack(ref, message, False))
    elif kind == "delete":
        _require(conn, "messaging:write")
        channel_id = _channel_id(data)
        async with db.session_scope() as session:
            message = await service.delete_message(
                session, conn.caller, channel_id, str(data.get("message_id", ""))
            )
        conn.push(_ack(ref, message, False))
    else:
        raise FrameError("unknown_type", f"Unknown frame type {kind!r}.")


def _ack(ref: Any, message: Any, created: bool) -> dict[str, Any]:
    out = frame(
        "ack",
        channel_id=message.channel_id,
        message_id=message.id,
        seq=message.seq,
        client_message_id=message.client_message_id,
        created=created,
    )
    if ref is not None:
        out["ref"] = ref
    return out


async def _send_rate(websocket: WebSocket, conn: Connection) -> None:
    settings: Settings = websocket.app.state.settings
    limiter = websocket.app.state.rate_limiter
    retry = await limiter.hit(
        f"messaging-send:{conn.caller.user_id}", settings.messaging_send_rate_per_minute, 60
    )
    if retry:
        raise RateLimited(retry, "Sending too fast.")
