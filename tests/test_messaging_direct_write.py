"""Direct writes of live frames (``services.messaging.fanout``): a frame for an idle socket
is written in the pusher's task; a write that has to wait is finished by a task of its
own, keeps the order of later frames, and ends a client that never catches up with 4008.

The socket here is a stand-in for ``WebSocket.send_text`` whose writes complete at once
or wait on a gate the test opens; the rest (connection, writer task) is the real code.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.kit.auth import Principal
from services.messaging.fanout import CLOSE_SLOW_CONSUMER, Connection, Hub, frame, run_eagerly
from services.messaging.ws import _write
from tests.conftest import make_settings


class FakeSocket:
    """Records the frames written; while ``gate`` is closed, writes wait on it."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def send_text(self, text: str) -> None:
        if not self.gate.is_set():
            self.waiting += 1
            await self.gate.wait()
        self.written.append(text)


def connection(tmp_path: Path, **settings: Any) -> Connection:
    hub = Hub(None, make_settings(tmp_path, None, "direct", **settings), None)  # type: ignore[arg-type]
    principal = Principal("user", "u1", "web", "f1", frozenset(), "jti", int(time.time()) + 600)
    return hub.connect(principal)


def delivered() -> float:
    sample = REGISTRY.get_sample_value("messaging_frames_delivered_total", {"type": "message"})
    return sample or 0.0


def texts(n: int) -> list[dict[str, Any]]:
    return [frame("message", seq=i) for i in range(1, n + 1)]


def seqs(socket: FakeSocket) -> list[int]:
    return [json.loads(t)["seq"] for t in socket.written]


async def test_run_eagerly_finishes_a_coroutine_that_never_waits() -> None:
    done: list[str] = []

    async def quick() -> None:
        done.append("ran")

    assert run_eagerly(quick()) is None
    assert done == ["ran"]  # before any await of ours: it ran in this task


async def test_run_eagerly_hands_a_waiting_coroutine_to_a_task() -> None:
    steps: list[str] = []
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def slow() -> None:
        steps.append("before")
        steps.append(await gate)

    task = run_eagerly(slow())
    assert task is not None and steps == ["before"]
    gate.set_result("after")
    await asyncio.wait_for(task, 1)
    assert steps == ["before", "after"]


def waiter(unwound: list[str]) -> tuple[asyncio.Future[None], Any]:
    """A gate, and a coroutine that waits on it and notes when it unwinds."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait() -> None:
        try:
            await gate
        finally:
            unwound.append("unwound")

    return gate, wait()


async def test_run_eagerly_raises_a_later_failure_from_its_task() -> None:
    unwound: list[str] = []
    gate, coro = waiter(unwound)
    task = run_eagerly(coro)
    assert task is not None
    gate.set_exception(OSError("gone"))
    with pytest.raises(OSError, match="gone"):
        await task
    assert unwound == ["unwound"]


async def test_cancelling_the_task_unwinds_the_coroutine() -> None:
    unwound: list[str] = []
    _, coro = waiter(unwound)
    task = run_eagerly(coro)
    assert task is not None
    task.cancel()  # before the task ran once
    with pytest.raises(asyncio.CancelledError):
        await task
    assert unwound == ["unwound"]


async def test_frames_for_an_idle_socket_are_written_by_the_pusher(tmp_path: Path) -> None:
    conn, socket = connection(tmp_path), FakeSocket()
    writer = asyncio.create_task(_write(socket, conn))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert conn.idle
    for payload in texts(5):
        conn.push(payload)
    assert seqs(socket) == [1, 2, 3, 4, 5]  # written before this task yielded once
    assert conn.queue.empty()
    writer.cancel()


async def test_a_write_that_waits_keeps_later_frames_in_order(tmp_path: Path) -> None:
    conn, socket = connection(tmp_path), FakeSocket()
    writer = asyncio.create_task(_write(socket, conn))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    before = delivered()
    conn.push(texts(1)[0])
    socket.gate.clear()  # the client's window is full from now on
    for payload in texts(6)[1:]:
        conn.push(payload)
    assert conn.sending is not None and conn.queue.qsize() == 4
    assert seqs(socket) == [1] and delivered() == before + 1  # 2 is not written yet
    socket.gate.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(socket.written) == 6:
            break
    assert seqs(socket) == [1, 2, 3, 4, 5, 6] and delivered() == before + 6
    assert conn.sending is None and not conn.closed
    conn.push(frame("message", seq=7))  # idle again: direct
    assert seqs(socket)[-1] == 7
    writer.cancel()


async def test_a_direct_write_that_never_completes_ends_the_socket_with_4008(
    tmp_path: Path,
) -> None:
    conn, socket = connection(tmp_path, messaging_send_timeout=0.3), FakeSocket()
    writer = asyncio.create_task(_write(socket, conn))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    socket.gate.clear()
    before = delivered()
    conn.push(texts(1)[0])
    sending = conn.sending
    assert sending is not None and socket.waiting == 1
    await asyncio.wait_for(conn.done.wait(), 2)
    assert (conn.closed, conn.close_code) == (True, CLOSE_SLOW_CONSUMER)
    await asyncio.sleep(0)
    assert sending.cancelled() and conn.sending is None
    assert delivered() == before  # never written, never counted
    writer.cancel()


async def test_a_socket_that_broke_is_closed_not_raised_into_the_fan_out(
    tmp_path: Path,
) -> None:
    conn = connection(tmp_path)

    async def broken(text: str) -> None:
        raise OSError("connection reset")

    conn.sender, conn.idle = broken, True
    conn.push(frame("message", seq=1))  # no exception reaches the pusher
    assert (conn.closed, conn.close_code) == (True, 1000)
