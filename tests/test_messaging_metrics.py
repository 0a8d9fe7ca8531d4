"""Messaging's domain metrics over real sockets: served ``onecluster serve``, scraped /metrics.

The open-socket gauge goes up on accept and back down however a socket ends (the client
closes, the server closes an unauthenticated one); posted messages count once per
committed message (a repeated ``client_message_id`` adds nothing); frames written and
resyncs are counted by type and by where they happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from services.messaging.client import MessagingClient
from tests.messaging_support import replica, scrape, served_world, token, value

pytestmark = pytest.mark.slow


async def until(base: str, name: str, expected: float, **labels: str) -> float:
    """The metric once it equals ``expected`` (bounded wait), else its last value."""
    deadline = time.monotonic() + 20
    while True:
        got = value(await scrape(base), name, **labels)
        if got == expected or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


GAUGE = "messaging_websocket_connections"
POSTED = "messaging_messages_posted_total"
FRAMES = "messaging_frames_delivered_total"
RESYNCS = "messaging_resyncs_total"


async def test_socket_gauge_and_delivery_counters_move_with_real_sockets(
    tmp_path: Path, database_url: str | None, redis_prefix: str
) -> None:
    env = {"ONECLUSTER_MESSAGING_AUTH_TIMEOUT": "1"}
    with replica(tmp_path, "a", database_url, redis_prefix, env) as (base, _):
        http, w, general = await served_world(base, "metrics")
        async with contextlib.aclosing(http):
            before = await scrape(base)
            open0 = value(before, GAUGE)
            sx = MessagingClient(base, token(w, "sx"))
            nm = MessagingClient(base, token(w, "nm"))
            await sx.open()
            await nm.open()
            assert await until(base, GAUGE, open0 + 2) == open0 + 2
            assert (await nm.subscribe(general))["type"] == "subscribed"

            await sx.send(general, "hello", client_message_id="m-1")
            assert (await sx.recv_until("ack"))["created"] is True
            await sx.send(general, "hello", client_message_id="m-1")  # the same message
            assert (await sx.recv_until("ack"))["created"] is False
            assert (await nm.recv_until("event"))["message"]["text"] == "hello"
            expected_posted = value(before, POSTED, channel_kind="general") + 1
            assert await until(base, POSTED, expected_posted, channel_kind="general") == (
                expected_posted
            )
            events = value(before, FRAMES, type="event") + 1
            assert await until(base, FRAMES, events, type="event") == events
            assert (
                value(await scrape(base), FRAMES, type="ack")
                >= value(before, FRAMES, type="ack") + 2
            )

            ahead = await nm.subscribe(general, since_seq=500)
            assert ahead["type"] == "resync_required"
            resyncs = value(before, RESYNCS, at="subscribe") + 1
            assert await until(base, RESYNCS, resyncs, at="subscribe") == resyncs

            # a socket that never authenticates is closed by the server (4401) ...
            silent = MessagingClient(base, "")
            await silent.open(authenticate=False)
            with pytest.raises(ConnectionClosed):
                await silent.recv(wait=10)
            assert silent.close_code == 4401
            # ... and clients close theirs: the gauge is back where it was
            await sx.close()
            await nm.close()
            assert await until(base, GAUGE, open0) == open0
