"""Live delivery of committed channel events to this replica's WebSocket subscribers.

The database is the truth; a notification only says "channel C has an event at seq N"
(with the event's frame, so the common case needs no read). After a commit the writing
replica delivers to its own sockets and publishes the notification on Redis pub/sub
(``<prefix>:messaging:fanout``); every other replica delivers it to theirs. Embedded
mode has no Redis and needs nothing more: everything is in this process.

Each subscription remembers the last seq it sent. A notification whose seq is not
``last + 1`` (a lost or reordered notification, a replica that came up late) makes the
subscription read the missing range from ``channel_events`` before it sends anything
newer, so a subscriber gets every event once and in order. Pub/sub is at most once, so
a periodic sweep compares each subscribed channel's ``last_seq`` with what was sent and
fetches what a lost notification (or a writer that died between commit and publish)
left behind; a Redis reconnect triggers the same check at once.

Writing and backpressure: each socket has a bounded queue of frames
(``messaging_send_queue``) and its own writer task. A frame for a socket whose writer is
idle (nothing queued, nothing being written) is written at once, in the caller's task:
the socket's send runs eagerly and, for a client that keeps up, completes without ever
waiting, so fanning a message out to 1,000 sockets is one loop of writes rather than
1,000 task switches. If that send has to wait (the client's TCP window is full) it is
finished by a task of its own, and later frames queue behind it. Live delivery never
waits, so one socket can never hold up another or the notification listener. A client
that does not read fills its TCP window, then a write waits longer than
``messaging_send_timeout``, or the queue overflows: either way the socket is closed with
4008 ("slow consumer"). A replay (subscribe, gap fill) does wait for room in the queue,
within the same timeout, since it runs in the subscription's own task.

Access: an access change announced by the read model (a firm left a cluster, a user
left a firm or was deactivated) re-checks the subscriptions it may end at once (frame
``unsubscribed``, reason ``access_revoked``) and closes with 4002 the sockets whose token
membership deny-listed; the sweep also closes sockets whose token was deny-listed for
any other reason, or expired (4001).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from starlette.websockets import WebSocketDisconnect

from services.kit.auth import DenyList, MemoryDenyList, Principal
from services.kit.db import Database
from services.kit.settings import Settings
from services.messaging import presence, service
from services.messaging.counters import RESYNCS, SLOW_CONSUMER_DISCONNECTS, frames_delivered
from services.messaging.models import Channel

log = logging.getLogger("onecluster.messaging.fanout")

CLOSE_SERVICE_RESTART = 1012
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOKEN_REVOKED = 4002
CLOSE_SLOW_CONSUMER = 4008
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
REPLAY_BATCH = 500


def frame(kind: str, **fields: Any) -> dict[str, Any]:
    return {"v": 1, "type": kind, **fields}


class SharedFrame(dict[str, Any]):
    """A frame fanned out to many sockets: encoded to JSON once, by the first writer."""

    _text: str | None = None

    def encoded(self) -> str:
        if self._text is None:
            self._text = json.dumps(self, separators=(",", ":"))
        return self._text


def encode(payload: dict[str, Any]) -> str:
    """The JSON text of a frame (a shared frame's cached one)."""
    if isinstance(payload, SharedFrame):
        return payload.encoded()
    return json.dumps(payload, separators=(",", ":"))


@dataclass(eq=False)
class Subscription:
    conn: Connection
    channel_id: str
    cluster_id: str
    last: int
    target: int = 0
    catching_up: bool = False
    task: asyncio.Task[None] | None = None

    def offer(self, seq: int, payload: dict[str, Any]) -> None:
        """A live event: send it if it is the next one, else fetch the gap first."""
        if seq <= self.last or self.conn.closed:
            return
        if seq == self.last + 1 and not self.catching_up:
            self.last = seq
            self.conn.push(payload)
            return
        self.behind(seq)

    def behind(self, seq: int) -> None:
        """The channel has reached ``seq``: catch up from the database."""
        self.target = max(self.target, seq)
        if not self.catching_up and self.target > self.last:
            self.catching_up = True
            self.task = asyncio.create_task(self._catch_up())

    async def _catch_up(self) -> None:
        hub = self.conn.hub
        try:
            while self.last < self.target and not self.conn.closed:
                if self.target - self.last > hub.settings.messaging_replay_limit:
                    RESYNCS.labels("live").inc()
                    self.conn.push(
                        frame(
                            "resync_required",
                            channel_id=self.channel_id,
                            since_seq=self.last,
                            last_seq=self.target,
                        )
                    )
                    hub.unsubscribe(self)
                    return
                async with hub.db.read_scope() as session:
                    frames = await service.channel_events(
                        session, self.channel_id, self.last, self.target, REPLAY_BATCH
                    )
                if not frames or self.conn.subs.get(self.channel_id) is not self:
                    return  # not committed yet as far as this read saw, or unsubscribed
                for payload in frames:
                    if payload["seq"] == self.last + 1:
                        self.last = payload["seq"]
                        if not await self.conn.put(payload):
                            return
        except Exception:
            log.exception("catch-up of %s failed; the sweep retries", self.channel_id)
        finally:
            self.catching_up = False


Sender = Callable[[str], Coroutine[Any, Any, None]]
"""Writes one text frame to a socket (``WebSocket.send_text``)."""


def run_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` in the caller's task until it first waits; None if it finished.

    When it has to wait, a task takes over at that point and drives it to the end (what
    ``Task`` does for a coroutine it started itself; Python 3.12's eager tasks do the
    same). Exceptions of the synchronous part are raised here, later ones by the task.
    """
    try:
        awaited = coro.send(None)
    except StopIteration:
        return None
    task = asyncio.ensure_future(_drive(coro, awaited))
    # Cancelled before its first step, the task never enters ``_drive``: close ``coro``
    # then, so it unwinds all the same (a no-op once it has finished).
    task.add_done_callback(lambda _: coro.close())
    return task


async def _drive(coro: Coroutine[Any, Any, None], awaited: Any) -> None:
    """Resume ``coro`` each time what it waits on (a future, or None for a bare yield)
    is done; a cancellation of this task is thrown into it, so it unwinds."""
    while True:
        try:
            if awaited is None:
                await asyncio.sleep(0)
            else:
                awaited._asyncio_future_blocking = False
                await awaited
        except BaseException as exc:  # its own failure or our cancellation: raise it there
            try:
                awaited = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            awaited = coro.send(None)
        except StopIteration:
            return


@dataclass(eq=False)
class Connection:
    """One authenticated socket: its principal, subscriptions and outgoing queue.

    ``sender`` is set by the socket's handler once its writer runs; until then (and in
    tests without a socket) every frame goes through ``queue``. ``idle`` is true while
    the writer waits on an empty queue; ``sending`` is the task finishing a direct
    write that had to wait.
    """

    hub: Hub
    principal: Principal
    caller: service.Caller
    queue: asyncio.Queue[dict[str, Any]]
    sender: Sender | None = None
    idle: bool = False
    sending: asyncio.Task[None] | None = None
    subs: dict[str, Subscription] = field(default_factory=dict)
    closed: bool = False
    close_code: int = 1000
    close_reason: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    socket_id: str = field(default_factory=lambda: secrets.token_hex(8))
    present_in: set[str] = field(default_factory=set)
    typing_at: dict[str, float] = field(default_factory=dict)

    @property
    def presence_entry(self) -> str:
        return presence.entry(self.caller.user_id, self.caller.firm_id, self.socket_id)

    def push(self, payload: dict[str, Any]) -> None:
        """Send a frame without waiting: written now when the socket is idle, else
        queued; a full queue means a slow consumer (4008)."""
        if self.closed:
            return
        idle = self.idle and self.sending is None and self.queue.empty()
        if idle and self.sender is not None:
            self._write_now(payload)
            return
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.fail(CLOSE_SLOW_CONSUMER, "slow consumer")

    def _write_now(self, payload: dict[str, Any]) -> None:
        assert self.sender is not None
        try:
            rest = run_eagerly(self.sender(encode(payload)))
        except Exception as exc:  # the client went away (or the socket broke)
            self.lost(exc)
            return
        delivered = frames_delivered(str(payload.get("type", "")))
        if rest is None:
            delivered.inc()
            return
        # The write must wait for the client: time it out, and let later frames queue
        # behind it; it counts as delivered once it is written.
        self.sending = rest
        watchdog = asyncio.get_running_loop().call_later(
            self.hub.settings.messaging_send_timeout, self._write_timed_out, rest
        )
        rest.add_done_callback(lambda task: self._written(task, watchdog, delivered))

    def _write_timed_out(self, task: asyncio.Task[None]) -> None:
        if not task.done():
            self.fail(CLOSE_SLOW_CONSUMER, "slow consumer")
            task.cancel()

    def _written(
        self, task: asyncio.Task[None], watchdog: asyncio.TimerHandle, delivered: Any
    ) -> None:
        watchdog.cancel()
        if self.sending is task:
            self.sending = None
        if task.cancelled():
            return
        if task.exception() is not None:
            self.lost(task.exception())
        else:
            delivered.inc()

    def lost(self, exc: BaseException | None) -> None:
        """A write failed: the socket is gone (anything else is logged too)."""
        gone = (WebSocketDisconnect, RuntimeError, OSError)
        if exc is not None and not isinstance(exc, gone):
            log.warning("socket write failed: %r", exc)
        self.fail(1000, "")

    async def put(self, payload: dict[str, Any]) -> bool:
        """Queue a frame, waiting for room up to the send timeout (replays); False if closed."""
        if self.closed:
            return False
        try:
            await asyncio.wait_for(
                self.queue.put(payload), self.hub.settings.messaging_send_timeout
            )
        except TimeoutError:
            self.fail(CLOSE_SLOW_CONSUMER, "slow consumer")
            return False
        return not self.closed

    def fail(self, code: int, reason: str) -> None:
        """End the connection with ``code``; the socket's handler closes it."""
        if self.closed:
            return
        self.closed, self.close_code, self.close_reason = True, code, reason
        if code == CLOSE_SLOW_CONSUMER:
            SLOW_CONSUMER_DISCONNECTS.inc()
        if code >= 4000 or code == CLOSE_SERVICE_RESTART:
            log.info("closing the socket of %s with %s (%s)", self.principal.subject, code, reason)
        for sub in list(self.subs.values()):
            self.hub.unsubscribe(sub)
        self.done.set()


class Hub:
    """This replica's sockets and subscriptions, and the notification transport."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        redis: Redis | None,
        denylist: DenyList | None = None,
    ) -> None:
        self.db = db
        self.denylist: DenyList = denylist or MemoryDenyList()
        self.settings = settings
        self.redis = redis
        self.channel = f"{settings.redis_prefix}:messaging:fanout"
        self.connections: set[Connection] = set()
        self.by_channel: dict[str, set[Subscription]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.presence: presence.PresenceStore = (
            presence.MemoryPresence()
            if redis is None
            else presence.RedisPresence(redis, settings.redis_prefix)
        )
        self._present: dict[str, set[tuple[str, str]]] = {}
        self.node = secrets.token_hex(8)
        """This replica's id on ephemeral notes, which it delivers itself at once."""

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        self.db.after_commit.append(self.after_commit)
        self._spawn(self._sweep())
        self._spawn(self._heartbeat())
        if self.redis is not None:
            self._spawn(self._listen())

    async def stop(self) -> None:
        """Close every socket with 1012 (service restart): clients reconnect elsewhere."""
        self._stopping = True
        for conn in list(self.connections):
            conn.fail(CLOSE_SERVICE_RESTART, "server restart")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.after_commit in self.db.after_commit:
            self.db.after_commit.remove(self.after_commit)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections and subscriptions -------------------------------------------------
    def connect(self, principal: Principal) -> Connection:
        conn = Connection(
            self,
            principal,
            service.caller_of(principal),
            asyncio.Queue(maxsize=self.settings.messaging_send_queue),
        )
        self.connections.add(conn)
        return conn

    def disconnect(self, conn: Connection) -> None:
        conn.fail(conn.close_code if conn.closed else 1000, conn.close_reason)
        self.connections.discard(conn)

    async def subscribe(self, conn: Connection, channel_id: str, since: int | None) -> None:
        """Replay the events after ``since``, then stream live; raises NotFound for no access."""
        old = conn.subs.get(channel_id)
        if old is not None:
            self.unsubscribe(old, leave=False)
        sub = Subscription(conn, channel_id, "", last=since or 0, catching_up=True)
        # Registered before the channel is read: a notification that arrives meanwhile
        # only raises the target, so nothing between the read and now is missed.
        conn.subs[channel_id] = sub
        self.by_channel.setdefault(channel_id, set()).add(sub)
        try:
            async with self.db.read_scope() as session:
                access = await service.channel_access(session, conn.caller, channel_id)
        except BaseException:
            self.unsubscribe(sub)
            raise
        last = access.channel.last_seq
        sub.cluster_id = access.channel.cluster_id
        start = last if since is None else since
        if start > last or last - start > self.settings.messaging_replay_limit:
            self.unsubscribe(sub)
            RESYNCS.labels("subscribe").inc()
            conn.push(
                frame("resync_required", channel_id=channel_id, since_seq=start, last_seq=last)
            )
            return
        sub.last = start
        conn.push(frame("subscribed", channel_id=channel_id, since_seq=start, last_seq=last))
        sub.catching_up = False
        sub.behind(max(last, sub.target))
        await self._enter(conn, sub.cluster_id)

    def unsubscribe(self, sub: Subscription, *, leave: bool = True) -> None:
        if sub.conn.subs.get(sub.channel_id) is sub:
            del sub.conn.subs[sub.channel_id]
        if leave and not self._stopping and sub.cluster_id in sub.conn.present_in:
            self._spawn(self._leave(sub.conn, sub.cluster_id))
        subs = self.by_channel.get(sub.channel_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.by_channel[sub.channel_id]
        if sub.task is not None and not sub.task.done() and sub.task is not asyncio.current_task():
            sub.task.cancel()

    # -- presence and typing (ephemeral: never stored) -----------------------------------
    async def _enter(self, conn: Connection, cluster_id: str) -> None:
        """Mark the socket present in the cluster; announce the user if they were not."""
        if cluster_id in conn.present_in or conn.closed:
            return
        conn.present_in.add(cluster_id)
        try:
            before = presence.present(await self.presence.live(cluster_id))
            await self.presence.mark(
                cluster_id, [conn.presence_entry], self.settings.messaging_presence_ttl
            )
        except Exception as exc:  # presence is best effort: delivery goes on
            log.warning("presence mark: %r", exc)
            return
        pair = (conn.caller.user_id, conn.caller.firm_id)
        self._present.setdefault(cluster_id, set()).add(pair)
        if pair not in before:
            self.announce(self._presence_note(cluster_id, pair, "online"))

    async def _leave(self, conn: Connection, cluster_id: str) -> None:
        """The socket left the cluster (closed, or no channel of it left): drop its mark."""
        if not conn.closed and any(s.cluster_id == cluster_id for s in conn.subs.values()):
            return
        if cluster_id not in conn.present_in:
            return
        conn.present_in.discard(cluster_id)
        try:
            await self.presence.drop(cluster_id, conn.presence_entry)
            after = presence.present(await self.presence.live(cluster_id))
        except Exception as exc:
            log.warning("presence drop: %r", exc)
            return
        pair = (conn.caller.user_id, conn.caller.firm_id)
        if pair not in after:
            self._present.get(cluster_id, set()).discard(pair)
            self.announce(self._presence_note(cluster_id, pair, "offline"))

    @staticmethod
    def _presence_note(cluster_id: str, pair: tuple[str, str], status: str) -> dict[str, Any]:
        return {
            "k": "p",
            "frame": frame(
                "presence",
                cluster_id=cluster_id,
                user_id=pair[0],
                firm_id=pair[1],
                status=status,
            ),
        }

    def touch(self, conn: Connection) -> None:
        """A client heartbeat (``ping``): refresh the socket's presence marks now."""
        if conn.present_in:
            self._spawn(self._refresh([conn]))

    async def _refresh(self, conns: list[Connection]) -> None:
        by_cluster: dict[str, list[str]] = {}
        for conn in conns:
            if not conn.closed:
                for cluster_id in conn.present_in:
                    by_cluster.setdefault(cluster_id, []).append(conn.presence_entry)
        for cluster_id, entries in by_cluster.items():
            await self.presence.mark(cluster_id, entries, self.settings.messaging_presence_ttl)

    async def _heartbeat(self) -> None:
        """Refresh this replica's marks; announce users whose marks expired elsewhere."""
        while not self._stopping:
            await asyncio.sleep(self.settings.messaging_presence_ttl / 3)
            try:
                await self._refresh(list(self.connections))
                watched = {s.cluster_id for c in self.connections for s in c.subs.values()}
                for cluster_id in watched | set(self._present):
                    now = set(presence.present(await self.presence.live(cluster_id)))
                    for pair in self._present.get(cluster_id, set()) - now:
                        self.announce(self._presence_note(cluster_id, pair, "offline"))
                    if cluster_id in watched:
                        self._present[cluster_id] = now
                    else:
                        self._present.pop(cluster_id, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence heartbeat: %r", exc)

    def typing(self, conn: Connection, channel_id: str) -> bool:
        """Tell the channel's other subscribers; False when rate-limited (dropped)."""
        now = time.monotonic()
        last = conn.typing_at.get(channel_id)
        if last is not None and now - last < self.settings.messaging_typing_interval:
            return False
        conn.typing_at[channel_id] = now
        payload = frame(
            "typing",
            channel_id=channel_id,
            user_id=conn.caller.user_id,
            firm_id=conn.caller.firm_id,
        )
        self.announce({"k": "t", "frame": payload})
        return True

    def announce(self, note: dict[str, Any]) -> None:
        """Deliver an ephemeral note here and to every other replica."""
        self.deliver(note)
        if self.redis is not None:
            self._spawn(self._publish({**note, "o": self.node}))

    # -- notifications -----------------------------------------------------------------
    def after_commit(self, session: AsyncSession) -> None:
        """Announce what a committed transaction did (events, access changes)."""
        notes = [{"k": "e", "frame": f} for f in session.info.pop(service.EVENTS_KEY, [])]
        notes += [{"k": "a", "scope": s} for s in session.info.pop(service.ACCESS_KEY, [])]
        for note in notes:
            self.deliver(note)
            if self.redis is not None:
                self._spawn(self._publish(note))

    async def _publish(self, note: dict[str, Any]) -> None:
        assert self.redis is not None
        try:
            await self.redis.publish(self.channel, json.dumps(note, separators=(",", ":")))
        except Exception as exc:  # the sweep delivers what this notification would have
            log.warning("fan-out publish failed: %r", exc)

    def deliver(self, note: dict[str, Any]) -> None:
        if note.get("k") == "e":
            payload = SharedFrame(note["frame"])
            for sub in list(self.by_channel.get(payload["channel_id"], ())):
                sub.offer(int(payload["seq"]), payload)
        elif note.get("k") == "a":
            self._spawn(self._recheck(note["scope"]))
        elif note.get("k") == "p":
            payload = SharedFrame(note["frame"])
            for conn in list(self.connections):
                if any(s.cluster_id == payload["cluster_id"] for s in conn.subs.values()):
                    conn.push(payload)
        elif note.get("k") == "t":
            payload = SharedFrame(note["frame"])
            for sub in list(self.by_channel.get(payload["channel_id"], ())):
                if sub.conn.caller.user_id != payload["user_id"]:
                    sub.conn.push(payload)

    async def _recheck(self, scope: dict[str, str]) -> None:
        """Drop the subscriptions an access change ended (left the cluster, firm, channel).

        A change about a user or a firm first closes (4002) the sockets of its users whose
        token membership deny-listed with it (removed from the firm, deactivated).
        """
        if "user_id" in scope or "firm_id" in scope:
            await self._close_revoked(
                [
                    c
                    for c in self.connections
                    if scope.get("user_id", c.caller.user_id) == c.caller.user_id
                    and scope.get("firm_id", c.caller.firm_id) == c.caller.firm_id
                ]
            )
        matches: Callable[[Subscription], bool] = lambda sub: all(  # noqa: E731
            value
            == {
                "user_id": sub.conn.caller.user_id,
                "firm_id": sub.conn.caller.firm_id,
                "cluster_id": sub.cluster_id,
                "channel_id": sub.channel_id,
            }.get(key)
            for key, value in scope.items()
        )
        affected = [s for subs in self.by_channel.values() for s in subs if matches(s)]
        for sub in affected:
            async with self.db.read_scope() as session:
                readable = await service.readable_channels(
                    session, sub.conn.caller, [sub.channel_id]
                )
            if sub.channel_id not in readable and sub.conn.subs.get(sub.channel_id) is sub:
                self.unsubscribe(sub)
                sub.conn.push(
                    frame("unsubscribed", channel_id=sub.channel_id, reason="access_revoked")
                )

    async def _listen(self) -> None:
        assert self.redis is not None
        backoff = 0.1
        while not self._stopping:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.sweep_soon()  # whatever was published while we were not listening
                backoff = 0.1
                while not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        try:
                            note = json.loads(message["data"])
                            if note.get("o") != self.node:  # ours was delivered already
                                self.deliver(note)
                        except (ValueError, KeyError, TypeError, AttributeError):
                            log.warning("ignoring a malformed fan-out notification")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fan-out listener: %r; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def sweep_soon(self) -> None:
        self._spawn(self.sweep_once())

    async def _sweep(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.settings.messaging_sweep_interval)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fan-out sweep: %r", exc)

    async def _close_revoked(self, conns: list[Connection]) -> None:
        """Close (4002) the sockets whose token is on the deny-list."""
        live = [c for c in conns if not c.closed]
        for start in range(0, len(live), 64):
            chunk = live[start : start + 64]
            denied = await asyncio.gather(*(self.denylist.contains(c.principal.jti) for c in chunk))
            for conn, revoked in zip(chunk, denied, strict=True):
                if revoked:
                    conn.fail(CLOSE_TOKEN_REVOKED, "token revoked")

    async def sweep_once(self) -> None:
        """Catch subscriptions up with their channels; end sockets whose token ran out."""
        now = time.time()
        for conn in list(self.connections):
            if conn.principal.expires_at < now:
                conn.fail(CLOSE_TOKEN_EXPIRED, "token expired")
        channel_ids = list(self.by_channel)
        for start in range(0, len(channel_ids), 500):
            chunk = channel_ids[start : start + 500]
            async with self.db.read_scope() as session:
                rows = (
                    await session.execute(
                        sa.select(col(Channel.id), col(Channel.last_seq)).where(
                            col(Channel.id).in_(chunk)
                        )
                    )
                ).all()
            for channel_id, last_seq in rows:
                for sub in list(self.by_channel.get(channel_id, ())):
                    if last_seq > sub.last:
                        sub.behind(int(last_seq))
        try:
            await self._close_revoked(list(self.connections))
        except Exception as exc:  # Redis away: the next sweep checks again
            log.warning("deny-list check: %r", exc)
