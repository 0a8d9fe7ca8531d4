"""A small async client of the WebSocket protocol (see PROTOCOL.md), for tests and benchmarks.

``MessagingClient`` is one socket: authenticate, subscribe, send, read frames.
``follow`` keeps one channel's events flowing across reconnects: when a socket drops it
connects to the next URL and resubscribes with ``since_seq`` = the last seq it saw, and
after ``resync_required`` it refetches over REST, so the caller sees every event once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake


class MessagingClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        max_queue: int | None = 64,
        receive_buffer: int | None = None,
        keepalive: bool = True,
    ) -> None:
        self.url = base_url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/ws"
        self.token = token
        self.max_queue = max_queue
        self.receive_buffer = receive_buffer
        self.keepalive = keepalive
        self.ws: ClientConnection | None = None
        self._ids = itertools.count(1)

    async def open(self, *, authenticate: bool = True) -> dict[str, Any] | None:
        """Connect; with ``authenticate`` send the auth frame and return the answer."""
        sock = None
        if self.receive_buffer is not None:  # a small window: the client reads slowly
            host, _, port = self.url.split("//", 1)[1].split("/", 1)[0].partition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port or 80)))
        self.ws = await connect(
            self.url,
            sock=sock,
            max_queue=self.max_queue,
            max_size=None,
            open_timeout=10,
            ping_interval=20 if self.keepalive else None,
        )
        if not authenticate:
            return None
        await self.send_frame({"type": "auth", "token": self.token})
        return await self.recv()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def __aenter__(self) -> MessagingClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_frame(self, payload: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps({"v": 1, **payload}))

    async def recv(self, wait: float = 10.0) -> dict[str, Any]:
        assert self.ws is not None
        raw = await asyncio.wait_for(self.ws.recv(), wait)
        data: dict[str, Any] = json.loads(raw)
        return data

    async def recv_until(self, kind: str, wait: float = 10.0) -> dict[str, Any]:
        """The next frame of ``kind``, skipping others."""
        while True:
            data = await self.recv(wait)
            if data.get("type") == kind:
                return data

    async def recv_until_reply(self, wait: float = 10.0) -> dict[str, Any]:
        """The next ``ack`` or ``error`` frame (the answer to a send), skipping others."""
        while True:
            data = await self.recv(wait)
            if data.get("type") in ("ack", "error"):
                return data

    async def subscribe(self, channel_id: str, since_seq: int | None = None) -> dict[str, Any]:
        """Subscribe; returns ``subscribed`` or ``resync_required`` (or an error frame)."""
        payload: dict[str, Any] = {"type": "subscribe", "channel_id": channel_id}
        if since_seq is not None:
            payload["since_seq"] = since_seq
        await self.send_frame(payload)
        while True:
            data = await self.recv()
            if data.get("type") in ("subscribed", "resync_required", "error"):
                return data

    async def send(self, channel_id: str, text: str, **fields: Any) -> str:
        """Send a message; returns the frame id the ``ack`` (or error) will carry as ``ref``."""
        frame_id = f"f{next(self._ids)}"
        await self.send_frame(
            {"type": "send", "id": frame_id, "channel_id": channel_id, "text": text, **fields}
        )
        return frame_id

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        assert self.ws is not None
        async for raw in self.ws:
            yield json.loads(raw)

    @property
    def close_code(self) -> int | None:
        return None if self.ws is None else self.ws.close_code


async def follow(
    base_urls: Sequence[str],
    token: Callable[[], str],
    channel_id: str,
    on_event: Callable[[dict[str, Any]], Awaitable[None]],
    *,
    since_seq: int = 0,
    stop: asyncio.Event,
    retry_delay: float = 0.2,
    on_subscribed: Callable[[str, int], None] | None = None,
) -> int:
    """Deliver every event of a channel after ``since_seq`` to ``on_event``, in order, once.

    Connects to the URLs in turn; after a dropped socket it resumes with the last seq it
    delivered. ``on_subscribed(base_url, since_seq)`` is told of every (re)subscription.
    Returns the last seq delivered when ``stop`` is set.
    """
    last = since_seq
    for base in itertools.cycle(base_urls):
        if stop.is_set():
            return last
        client = MessagingClient(base, token())
        try:
            await client.open()
            answer = await client.subscribe(channel_id, last)
            if answer["type"] == "resync_required":
                last = await _refetch(base, token(), channel_id, last, on_event)
                continue
            if answer["type"] != "subscribed":
                raise RuntimeError(f"subscribe failed: {answer}")
            if on_subscribed is not None:
                on_subscribed(base, last)
            async for data in _until(client, stop):
                if data.get("type") == "event" and data["channel_id"] == channel_id:
                    if data["seq"] != last + 1:
                        raise RuntimeError(f"gap: {last} then {data['seq']}")
                    last = data["seq"]
                    await on_event(data)
                elif data.get("type") == "resync_required":
                    last = await _refetch(base, token(), channel_id, last, on_event)
                    break
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, httpx.TransportError):
            await asyncio.sleep(retry_delay)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if stop.is_set():
            return last
    return last


async def _until(client: MessagingClient, stop: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
    while not stop.is_set():
        try:
            yield await client.recv(wait=0.5)
        except TimeoutError:
            continue


async def _refetch(
    base: str,
    token: str,
    channel_id: str,
    last: int,
    on_event: Callable[[dict[str, Any]], Awaitable[None]],
) -> int:
    """Catch up over REST (messages after ``last``); returns the channel's last seq seen."""
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while True:
            page = await http.get(
                f"/v1/channels/{channel_id}/messages",
                params={"after_seq": last, "limit": 100},
                headers=headers,
            )
            page.raise_for_status()
            body = page.json()
            for message in body["items"]:
                await on_event(
                    {
                        "type": "event",
                        "channel_id": channel_id,
                        "seq": message["seq"],
                        "event": "posted",
                        "message": message,
                    }
                )
            if not body["has_more"]:
                return int(body["last_seq"])
            last = body["items"][-1]["seq"]
