"""Domain logic of messaging: channels, membership of channels, messages, read markers.

Functions take the session first and only ``flush()``; the request's session dependency
owns the transaction. Who may do what is decided from the local read model of
membership (``clusters``, ``cluster_members``, ``firm_members``), never from
membership's database. Messaging is for people: integrator clients get 403.

Ordering: every post, edit and delete takes the channel's next ``seq`` with ``UPDATE
channels SET last_seq = last_seq + 1 … RETURNING last_seq`` after locking the channel
row (``SELECT … FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` serialises writers on
SQLite), so seqs are gap-free and a rolled-back transaction gives its seq back. Live
fan-out is told after commit (``session.info``, read by ``fanout.Hub``): a notification
exists only for what committed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from api.events import MessagePostedV1
from services.kit.auth import Principal
from services.kit.db import utcnow
from services.kit.errors import Conflict, Forbidden, InvalidState, NotFound, Problem, Unprocessable
from services.kit.ids import new_id
from services.kit.outbox import emit
from services.kit.telemetry import count_on_commit
from services.messaging.counters import MESSAGES_POSTED
from services.messaging.models import (
    Channel,
    ChannelEvent,
    ChannelFirm,
    ChannelMember,
    KnownCluster,
    KnownClusterMember,
    KnownFirmMember,
    Mention,
    Message,
    MessageEdit,
    MessagingOutbox,
    ReadMarker,
)
from services.messaging.schemas import Attachment, ChannelOut, MentionsOut, MessageOut

FIRM_ADMINS = frozenset({"owner", "admin"})
OPEN_KINDS = ("general", "public")  # readable by every user of every member firm
FIXED_KINDS = ("general", "direct", "thread")  # nobody joins, leaves or invites
SYSTEM = "system"
"""The sender id (and sender firm id) of messages the platform posts from events."""
ACCESS_KEY = "messaging_access"
EVENTS_KEY = "messaging_events"


class NotAMember(Problem):
    status, slug, title = 403, "not-a-channel-member", "Join the channel first"


class MessageTooLarge(Problem):
    status, slug, title = 413, "message-too-large", "Message too large"


@dataclass(frozen=True)
class Caller:
    user_id: str
    firm_id: str


@dataclass
class ChannelAccess:
    """A channel as one caller may use it: read it, post in it, administer it."""

    channel: Channel
    caller: Caller
    member: ChannelMember | None
    may_post: bool
    admin: bool


# -- after-commit notes (read by the fan-out) ----------------------------------------
def announce_access_change(session: AsyncSession, **scope: str) -> None:
    """After commit, every replica re-checks the subscriptions this change may end."""
    session.info.setdefault(ACCESS_KEY, []).append(dict(scope))


def _announce_event(session: AsyncSession, frame: dict[str, Any]) -> None:
    session.info.setdefault(EVENTS_KEY, []).append(frame)


# -- access --------------------------------------------------------------------------
def caller_of(principal: Principal) -> Caller:
    """The user and acting firm of a token; clients are refused (messaging is for people)."""
    if principal.kind != "user" or principal.firm_id is None:
        raise Forbidden("Messaging needs a user's token acting for a firm.")
    return Caller(principal.subject, principal.firm_id)


async def in_cluster(session: AsyncSession, caller: Caller, cluster_id: str) -> bool:
    """Whether the caller is an active user of an active member firm of the cluster."""
    row = (
        await session.execute(
            sa.select(sa.literal(1))
            .select_from(KnownFirmMember)
            .join(
                KnownClusterMember,
                sa.and_(
                    col(KnownClusterMember.firm_id) == col(KnownFirmMember.firm_id),
                    col(KnownClusterMember.cluster_id) == cluster_id,
                    col(KnownClusterMember.active),
                ),
            )
            .where(
                col(KnownFirmMember.firm_id) == caller.firm_id,
                col(KnownFirmMember.user_id) == caller.user_id,
                col(KnownFirmMember.active),
            )
        )
    ).first()
    return row is not None


async def channel_access(
    session: AsyncSession, principal: Principal | Caller, channel_id: str
) -> ChannelAccess:
    """The channel and what the caller may do in it; 404 for anyone who may not read it."""
    caller = principal if isinstance(principal, Caller) else caller_of(principal)
    channel = await session.get(Channel, channel_id)
    if channel is None or not await in_cluster(session, caller, channel.cluster_id):
        raise NotFound("No channel with this id.")
    if channel.kind == "thread":
        firm = await session.get(ChannelFirm, (channel_id, caller.firm_id))
        if firm is None:
            raise NotFound("No channel with this id.")
        admin = firm.role == "requester" and await _firm_admin(session, caller)
        return ChannelAccess(channel, caller, None, may_post=True, admin=admin)
    member = await session.get(ChannelMember, (channel_id, caller.user_id))
    if member is not None and member.firm_id != caller.firm_id:
        member = None  # the user joined acting for another of their firms
    if channel.kind not in OPEN_KINDS and member is None:
        raise NotFound("No channel with this id.")
    admin = member is not None and member.role == "admin"
    if channel.kind == "general":
        admin = await _cluster_admin(session, caller, channel.cluster_id)
    return ChannelAccess(
        channel,
        caller,
        member,
        may_post=channel.kind == "general" or member is not None,
        admin=admin,
    )


async def _firm_admin(session: AsyncSession, caller: Caller) -> bool:
    member = await session.get(KnownFirmMember, (caller.firm_id, caller.user_id))
    return member is not None and member.active and member.role in FIRM_ADMINS


async def _cluster_admin(session: AsyncSession, caller: Caller, cluster_id: str) -> bool:
    """The operator firm's owners and admins run the cluster's general channel."""
    cluster = await session.get(KnownCluster, cluster_id)
    if cluster is None or cluster.operator_firm_id != caller.firm_id:
        return False
    member = await session.get(KnownFirmMember, (caller.firm_id, caller.user_id))
    return member is not None and member.active and member.role in FIRM_ADMINS


async def _lock_channel(session: AsyncSession, channel_id: str) -> None:
    """Hold the channel's row lock until commit (a no-op render on SQLite)."""
    await session.execute(
        sa.select(col(Channel.id)).where(col(Channel.id) == channel_id).with_for_update()
    )


async def _next_seq(session: AsyncSession, channel_id: str) -> int:
    seq = (
        await session.execute(
            sa.update(Channel)
            .where(col(Channel.id) == channel_id)
            .values(last_seq=col(Channel.last_seq) + 1)
            .returning(col(Channel.last_seq)),
            execution_options={"synchronize_session": False},
        )
    ).scalar_one()
    return int(seq)


async def cluster_user_firm(session: AsyncSession, cluster_id: str, user_id: str) -> str | None:
    """The member firm a user belongs to in a cluster (the earliest if several), or None."""
    return (
        await session.execute(
            sa.select(col(KnownFirmMember.firm_id))
            .join(
                KnownClusterMember,
                sa.and_(
                    col(KnownClusterMember.firm_id) == col(KnownFirmMember.firm_id),
                    col(KnownClusterMember.cluster_id) == cluster_id,
                    col(KnownClusterMember.active),
                ),
            )
            .where(col(KnownFirmMember.user_id) == user_id, col(KnownFirmMember.active))
            .order_by(col(KnownFirmMember.firm_id))
            .limit(1)
        )
    ).scalar_one_or_none()


# -- channels ------------------------------------------------------------------------
async def ensure_general_channel(session: AsyncSession, cluster_id: str) -> Channel:
    """The cluster's general channel, created once (``direct_key`` "general" is unique)."""
    existing = (
        await session.execute(
            select(Channel).where(Channel.cluster_id == cluster_id, Channel.kind == "general")
        )
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    channel = Channel(
        id=new_id("chan"),
        cluster_id=cluster_id,
        kind="general",
        name="general",
        direct_key="general",
    )
    session.add(channel)
    await session.flush()
    return channel


async def create_channel(
    session: AsyncSession,
    principal: Principal,
    *,
    cluster_id: str,
    kind: str,
    name: str,
    topic: str,
) -> ChannelAccess:
    """A public or private channel; its creator is its first member and admin."""
    caller = caller_of(principal)
    if not await in_cluster(session, caller, cluster_id):
        raise NotFound("No cluster with this id among your firm's clusters.")
    channel = Channel(
        id=new_id("chan"),
        cluster_id=cluster_id,
        kind=kind,
        name=name,
        topic=topic,
        created_by=caller.user_id,
    )
    member = ChannelMember(
        channel_id=channel.id, user_id=caller.user_id, firm_id=caller.firm_id, role="admin"
    )
    session.add(channel)
    await session.flush()
    session.add(member)
    await session.flush()
    return ChannelAccess(channel, caller, member, may_post=True, admin=True)


async def create_conversation(
    session: AsyncSession, principal: Principal, *, cluster_id: str, user_ids: Sequence[str]
) -> tuple[ChannelAccess, bool]:
    """The direct conversation of the caller and ``user_ids``: one per set of people.

    Returns the conversation and whether it was created now (False: it existed).
    """
    caller = caller_of(principal)
    if not await in_cluster(session, caller, cluster_id):
        raise NotFound("No cluster with this id among your firm's clusters.")
    firms = {caller.user_id: caller.firm_id}
    for user_id in user_ids:
        if user_id in firms:
            continue
        firm_id = await cluster_user_firm(session, cluster_id, user_id)
        if firm_id is None:
            raise NotFound(f"No user {user_id} in this cluster.")
        firms[user_id] = firm_id
    if len(firms) < 2:
        raise Unprocessable("A conversation needs someone besides you.")
    key = hashlib.sha256(",".join(sorted(firms)).encode()).hexdigest()
    existing = (
        await session.execute(
            select(Channel).where(Channel.cluster_id == cluster_id, Channel.direct_key == key)
        )
    ).scalar_one_or_none()
    if existing is not None:
        return await channel_access(session, caller, existing.id), False
    channel = Channel(
        id=new_id("chan"),
        cluster_id=cluster_id,
        kind="direct",
        name="",
        direct_key=key,
        created_by=caller.user_id,
    )
    session.add(channel)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict("The conversation is being created by another request; retry.") from None
    for user_id, firm_id in firms.items():
        session.add(ChannelMember(channel_id=channel.id, user_id=user_id, firm_id=firm_id))
    await session.flush()
    return await channel_access(session, caller, channel.id), True


async def update_channel(
    session: AsyncSession, principal: Principal, channel_id: str, *, fields: dict[str, Any]
) -> ChannelAccess:
    """Rename or re-topic a channel: its admins only."""
    access = await channel_access(session, principal, channel_id)
    if not access.admin:
        raise Forbidden("Only the channel's admins may change it.")
    if access.channel.kind == "direct" and fields.get("name"):
        raise InvalidState("A conversation has no name.", state="direct")
    for name, value in fields.items():
        if value is not None:
            setattr(access.channel, name, value)
    await session.flush()
    return access


async def join_channel(
    session: AsyncSession, principal: Principal, channel_id: str
) -> ChannelAccess:
    """Join a public channel; joining a channel one is already in changes nothing."""
    access = await channel_access(session, principal, channel_id)
    if access.may_post:
        return access
    if access.channel.kind != "public":
        raise InvalidState("Only public channels are joined.", state=access.channel.kind)
    member = ChannelMember(
        channel_id=channel_id, user_id=access.caller.user_id, firm_id=access.caller.firm_id
    )
    old = await session.get(ChannelMember, (channel_id, access.caller.user_id))
    if old is not None:  # joined earlier acting for another firm: now this one
        old.firm_id, old.joined_at, member = access.caller.firm_id, utcnow(), old
    else:
        session.add(member)
    await session.flush()
    access.member, access.may_post = member, True
    return access


async def leave_channel(
    session: AsyncSession, principal: Principal, channel_id: str
) -> ChannelAccess:
    """Leave a public or private channel (not the general one, not a conversation)."""
    access = await channel_access(session, principal, channel_id)
    if access.channel.kind in FIXED_KINDS:
        raise InvalidState(
            "The general channel, conversations and task threads cannot be left.",
            state=access.channel.kind,
        )
    if access.member is not None:
        await session.delete(access.member)
        await session.flush()
        announce_access_change(session, channel_id=channel_id, user_id=access.caller.user_id)
    access.member, access.may_post, access.admin = None, False, False
    return access


async def add_member(
    session: AsyncSession, principal: Principal, channel_id: str, user_id: str
) -> ChannelMember:
    """Invite a user of a member firm into a public or private channel (members only)."""
    access = await channel_access(session, principal, channel_id)
    if access.channel.kind in FIXED_KINDS:
        raise InvalidState(
            "Everyone is in the general channel; a conversation's people and a task "
            "thread's firms are fixed.",
            state=access.channel.kind,
        )
    if access.member is None:
        raise NotAMember("Only the channel's members may invite.")
    firm_id = await cluster_user_firm(session, access.channel.cluster_id, user_id)
    if firm_id is None:
        raise NotFound("No user with this id in the cluster.")
    existing = await session.get(ChannelMember, (channel_id, user_id))
    if existing is not None:
        return existing
    member = ChannelMember(channel_id=channel_id, user_id=user_id, firm_id=firm_id)
    session.add(member)
    await session.flush()
    return member


async def list_members(
    session: AsyncSession, principal: Principal, channel_id: str, *, limit: int, after: str | None
) -> list[tuple[str, str, str, Any]]:
    """(user, firm, role, joined_at) of a channel, by user id; ``limit + 1`` rows."""
    access = await channel_access(session, principal, channel_id)
    if access.channel.kind in ("general", "thread"):
        query: Any = (
            sa.select(
                col(KnownFirmMember.user_id),
                col(KnownFirmMember.firm_id),
                sa.literal("member"),
                sa.null(),
            )
            .join(
                KnownClusterMember,
                sa.and_(
                    col(KnownClusterMember.firm_id) == col(KnownFirmMember.firm_id),
                    col(KnownClusterMember.cluster_id) == access.channel.cluster_id,
                    col(KnownClusterMember.active),
                ),
            )
            .where(col(KnownFirmMember.active))
            .order_by(col(KnownFirmMember.user_id), col(KnownFirmMember.firm_id))
        )
        if access.channel.kind == "thread":
            query = query.where(
                col(KnownFirmMember.firm_id).in_(
                    sa.select(col(ChannelFirm.firm_id)).where(
                        col(ChannelFirm.channel_id) == channel_id
                    )
                )
            )
        if after:
            query = query.where(col(KnownFirmMember.user_id) > after)
    else:
        query = (
            sa.select(
                col(ChannelMember.user_id),
                col(ChannelMember.firm_id),
                col(ChannelMember.role),
                col(ChannelMember.joined_at),
            )
            .where(col(ChannelMember.channel_id) == channel_id)
            .order_by(col(ChannelMember.user_id))
        )
        if after:
            query = query.where(col(ChannelMember.user_id) > after)
    rows = (await session.execute(query.limit(limit + 1))).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


async def readable_channel_ids(session: AsyncSession, caller: Caller) -> Any:
    """A subquery of the ids of every channel the caller can read (None: none at all).

    The same rule as :func:`channel_access`: channels of the clusters the caller's firm
    is an active member of that are open (general, public), that the user is in acting
    for this firm, or task threads the firm is in.
    """
    firm_active = await session.get(KnownFirmMember, (caller.firm_id, caller.user_id))
    if firm_active is None or not firm_active.active:
        return None
    clusters = sa.select(col(KnownClusterMember.cluster_id)).where(
        col(KnownClusterMember.firm_id) == caller.firm_id, col(KnownClusterMember.active)
    )
    mine = sa.select(col(ChannelMember.channel_id)).where(
        col(ChannelMember.user_id) == caller.user_id, col(ChannelMember.firm_id) == caller.firm_id
    )
    threads = sa.select(col(ChannelFirm.channel_id)).where(
        col(ChannelFirm.firm_id) == caller.firm_id
    )
    return (
        sa.select(col(Channel.id))
        .where(col(Channel.cluster_id).in_(clusters))
        .where(
            sa.or_(
                col(Channel.kind).in_(OPEN_KINDS),
                col(Channel.id).in_(mine),
                sa.and_(col(Channel.kind) == "thread", col(Channel.id).in_(threads)),
            )
        )
    )


async def list_channels(
    session: AsyncSession,
    principal: Principal,
    *,
    cluster_id: str | None,
    kind: str | None,
    limit: int,
    after: str | None,
) -> list[ChannelOut]:
    """Channels the caller can read, by id; ``limit + 1`` rows, with unread counts."""
    caller = caller_of(principal)
    readable = await readable_channel_ids(session, caller)
    if readable is None:
        return []
    query = (
        select(Channel)
        .where(col(Channel.id).in_(readable))
        .order_by(col(Channel.id))
        .limit(limit + 1)
    )
    if cluster_id:
        query = query.where(Channel.cluster_id == cluster_id)
    if kind:
        query = query.where(Channel.kind == kind)
    if after:
        query = query.where(col(Channel.id) > after)
    channels = list((await session.execute(query)).scalars())
    return await describe_channels(session, caller, channels)


async def describe_channels(
    session: AsyncSession, caller: Caller, channels: list[Channel]
) -> list[ChannelOut]:
    """Channels with the caller's membership, read marker, unread and mention counts."""
    if not channels:
        return []
    ids = [c.id for c in channels]
    members = {
        m.channel_id: m
        for m in (
            await session.execute(
                select(ChannelMember).where(
                    col(ChannelMember.channel_id).in_(ids),
                    ChannelMember.user_id == caller.user_id,
                    ChannelMember.firm_id == caller.firm_id,
                )
            )
        ).scalars()
    }
    markers = dict(
        (
            await session.execute(
                sa.select(col(ReadMarker.channel_id), col(ReadMarker.seq)).where(
                    col(ReadMarker.channel_id).in_(ids), col(ReadMarker.user_id) == caller.user_id
                )
            )
        ).all()
    )
    marker = sa.func.coalesce(
        sa.select(col(ReadMarker.seq))
        .where(
            col(ReadMarker.channel_id) == col(Message.channel_id),
            col(ReadMarker.user_id) == caller.user_id,
        )
        .scalar_subquery(),
        0,
    )
    unread_filter = (
        col(Message.channel_id).in_(ids),
        col(Message.seq) > marker,
        col(Message.deleted_at).is_(None),
        col(Message.sender_id) != caller.user_id,
    )
    unread = dict(
        (
            await session.execute(
                sa.select(col(Message.channel_id), sa.func.count())
                .where(*unread_filter)
                .group_by(col(Message.channel_id))
            )
        ).all()
    )
    mentioned = dict(
        (
            await session.execute(
                sa.select(col(Message.channel_id), sa.func.count(sa.distinct(col(Message.id))))
                .join(Mention, col(Mention.message_id) == col(Message.id))
                .where(*unread_filter)
                .where(col(Mention.target_id).in_([caller.user_id, caller.firm_id]))
                .group_by(col(Message.channel_id))
            )
        ).all()
    )
    admin_of_general = {
        c.cluster_id: await _cluster_admin(session, caller, c.cluster_id)
        for c in channels
        if c.kind == "general"
    }
    thread_roles = dict(
        (
            await session.execute(
                sa.select(col(ChannelFirm.channel_id), col(ChannelFirm.role)).where(
                    col(ChannelFirm.channel_id).in_(ids), col(ChannelFirm.firm_id) == caller.firm_id
                )
            )
        ).all()
    )
    firm_admin = await _firm_admin(session, caller) if thread_roles else False
    out = []
    for c in channels:
        member = members.get(c.id)
        role: Any = member.role if member else None
        if c.kind == "general":
            role = "admin" if admin_of_general[c.cluster_id] else "member"
        elif c.kind == "thread":
            requester = thread_roles.get(c.id) == "requester"
            role = "admin" if requester and firm_admin else "member"
        out.append(
            ChannelOut(
                id=c.id,
                cluster_id=c.cluster_id,
                kind=c.kind,
                name=c.name,
                topic=c.topic,
                created_at=c.created_at,
                last_seq=c.last_seq,
                joined=c.kind in ("general", "thread") or member is not None,
                role=role,
                read_seq=int(markers.get(c.id, 0)),
                unread_count=int(unread.get(c.id, 0)),
                mention_count=int(mentioned.get(c.id, 0)),
            )
        )
    return out


# -- messages ------------------------------------------------------------------------
def message_out(message: Message) -> MessageOut:
    return MessageOut(
        id=message.id,
        channel_id=message.channel_id,
        seq=message.seq,
        sender_id=message.sender_id,
        sender_firm_id=message.sender_firm_id,
        client_message_id=message.client_message_id,
        text=message.text,
        mentions=MentionsOut(
            user_ids=list(message.mentioned_user_ids), firm_ids=list(message.mentioned_firm_ids)
        ),
        attachments=message.attachments,
        created_at=message.created_at,
        edited_at=message.edited_at,
        deleted=message.deleted_at is not None,
        deleted_at=message.deleted_at,
        system=message.sender_id == SYSTEM,
    )


def event_frame(channel_id: str, seq: int, kind: str, message: Message) -> dict[str, Any]:
    """The WebSocket frame of one channel event (the message as it is now)."""
    return {
        "v": 1,
        "type": "event",
        "channel_id": channel_id,
        "seq": seq,
        "event": kind,
        "message": message_out(message).model_dump(mode="json"),
    }


def _check_size(text: str, max_bytes: int) -> None:
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise MessageTooLarge(
            f"The text is {size} bytes; at most {max_bytes}.", max_bytes=max_bytes
        )


async def _check_mentions(
    session: AsyncSession, access: ChannelAccess, user_ids: list[str], firm_ids: list[str]
) -> dict[str, str]:
    """Mentioned users must be able to read the channel, firms must be cluster members.

    Returns each mentioned user's firm (for the ``message.posted`` event).
    """
    cluster_id = access.channel.cluster_id
    users: dict[str, str] = {}
    bad: list[str] = []
    for user_id in dict.fromkeys(user_ids):
        firm_id: str | None
        if access.channel.kind in OPEN_KINDS:
            firm_id = await cluster_user_firm(session, cluster_id, user_id)
        elif access.channel.kind == "thread":
            firm_id = await _thread_user_firm(session, access.channel, user_id)
        else:
            member = await session.get(ChannelMember, (access.channel.id, user_id))
            firm_id = member.firm_id if member else None
        if firm_id is None:
            bad.append(user_id)
        else:
            users[user_id] = firm_id
    for firm_id in dict.fromkeys(firm_ids):
        row = await session.get(KnownClusterMember, (cluster_id, firm_id))
        if row is None or not row.active:
            bad.append(firm_id)
    if bad:
        raise Unprocessable(
            "Mentions must name members of this channel or firms of this cluster.", unknown=bad
        )
    return users


async def _thread_user_firm(session: AsyncSession, channel: Channel, user_id: str) -> str | None:
    """The firm through which a user is in a task's thread, or None."""
    return (
        await session.execute(
            sa.select(col(KnownFirmMember.firm_id))
            .join(
                ChannelFirm,
                sa.and_(
                    col(ChannelFirm.firm_id) == col(KnownFirmMember.firm_id),
                    col(ChannelFirm.channel_id) == channel.id,
                ),
            )
            .join(
                KnownClusterMember,
                sa.and_(
                    col(KnownClusterMember.firm_id) == col(KnownFirmMember.firm_id),
                    col(KnownClusterMember.cluster_id) == channel.cluster_id,
                    col(KnownClusterMember.active),
                ),
            )
            .where(col(KnownFirmMember.user_id) == user_id, col(KnownFirmMember.active))
            .order_by(col(KnownFirmMember.firm_id))
            .limit(1)
        )
    ).scalar_one_or_none()


async def post_message(
    session: AsyncSession,
    principal: Principal | Caller,
    channel_id: str,
    *,
    text: str,
    client_message_id: str | None,
    mention_user_ids: list[str],
    mention_firm_ids: list[str],
    attachments: list[Attachment],
    max_bytes: int,
) -> tuple[Message, bool]:
    """Post a message; returns it and whether it is new (False: the same client id again)."""
    access = await channel_access(session, principal, channel_id)
    if not access.may_post:
        raise NotAMember("Join the channel to post in it.")
    _check_size(text, max_bytes)
    if not text.strip() and not attachments:
        raise Unprocessable("A message needs text or an attachment.")
    caller = access.caller
    await _lock_channel(session, channel_id)
    if client_message_id is not None:
        existing = (
            await session.execute(
                select(Message).where(
                    Message.sender_id == caller.user_id,
                    Message.client_message_id == client_message_id,
                )
            )
        ).scalar_one_or_none()
        if existing is not None:
            if existing.channel_id != channel_id:
                raise Conflict("This client_message_id was used for another channel.")
            return existing, False
    users = await _check_mentions(session, access, mention_user_ids, mention_firm_ids)
    firm_mentions = list(dict.fromkeys(mention_firm_ids))
    seq = await _next_seq(session, channel_id)
    message = Message(
        id=new_id("msg"),
        channel_id=channel_id,
        seq=seq,
        sender_id=caller.user_id,
        sender_firm_id=caller.firm_id,
        client_message_id=client_message_id,
        text=text,
        mentioned_user_ids=list(users),
        mentioned_firm_ids=firm_mentions,
        attachments=[a.model_dump(mode="json") for a in attachments],
    )
    session.add(message)
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict("This client_message_id is being used by another request.") from None
    session.add(ChannelEvent(channel_id=channel_id, seq=seq, kind="posted", message_id=message.id))
    for target in [*users, *firm_mentions]:
        session.add(
            Mention(message_id=message.id, target_id=target, channel_id=channel_id, seq=seq)
        )
    tied = dict.fromkeys([*firm_mentions, *users.values()])
    tied.pop(caller.firm_id, None)
    emit(
        session,
        MessagingOutbox,
        MessagePostedV1(
            message_id=message.id,
            channel_id=channel_id,
            cluster_id=access.channel.cluster_id,
            channel_kind=access.channel.kind,
            seq=seq,
            sender_id=caller.user_id,
            sender_firm_id=caller.firm_id,
            mentioned_firm_ids=list(tied),
            posted_at=message.created_at,
        ),
    )
    await session.flush()
    count_on_commit(session, MESSAGES_POSTED.labels(access.channel.kind))
    _announce_event(session, event_frame(channel_id, seq, "posted", message))
    return message, True


async def _message_in(session: AsyncSession, channel_id: str, message_id: str) -> Message:
    message = await session.get(Message, message_id)
    if message is None or message.channel_id != channel_id:
        raise NotFound("No message with this id in this channel.")
    return message


async def edit_message(
    session: AsyncSession,
    principal: Principal | Caller,
    channel_id: str,
    message_id: str,
    *,
    text: str,
    max_bytes: int,
) -> Message:
    """Replace a message's text (its author only); the old text goes to its history."""
    access = await channel_access(session, principal, channel_id)
    message = await _message_in(session, channel_id, message_id)
    if message.sender_id != access.caller.user_id:
        raise Forbidden("Only the author may edit a message.")
    if not access.may_post:
        raise NotAMember("Join the channel to edit in it.")
    if message.deleted_at is not None:
        raise InvalidState("The message was deleted.", state="deleted")
    _check_size(text, max_bytes)
    if not text.strip() and not message.attachments:
        raise Unprocessable("A message needs text or an attachment.")
    await _lock_channel(session, channel_id)
    await session.refresh(message)
    if message.deleted_at is not None:
        raise InvalidState("The message was deleted.", state="deleted")
    if message.text == text:
        return message
    seq = await _next_seq(session, channel_id)
    session.add(
        MessageEdit(id=new_id("medit"), message_id=message.id, seq=seq, previous_text=message.text)
    )
    message.text = text
    message.edited_at = utcnow()
    session.add(ChannelEvent(channel_id=channel_id, seq=seq, kind="edited", message_id=message.id))
    await session.flush()
    _announce_event(session, event_frame(channel_id, seq, "edited", message))
    return message


async def delete_message(
    session: AsyncSession, principal: Principal | Caller, channel_id: str, message_id: str
) -> Message:
    """Leave a tombstone (author or channel admin): text, attachments, history and mentions go."""
    access = await channel_access(session, principal, channel_id)
    message = await _message_in(session, channel_id, message_id)
    if message.sender_id != access.caller.user_id and not access.admin:
        raise Forbidden("Only the author or a channel admin may delete a message.")
    await _lock_channel(session, channel_id)
    await session.refresh(message)
    if message.deleted_at is not None:
        return message  # already a tombstone: deleting again changes nothing
    seq = await _next_seq(session, channel_id)
    message.text = ""
    message.attachments = []
    message.mentioned_user_ids = []
    message.mentioned_firm_ids = []
    message.deleted_at = utcnow()
    message.deleted_by = access.caller.user_id
    await session.execute(sa.delete(MessageEdit).where(col(MessageEdit.message_id) == message.id))
    await session.execute(sa.delete(Mention).where(col(Mention.message_id) == message.id))
    session.add(ChannelEvent(channel_id=channel_id, seq=seq, kind="deleted", message_id=message.id))
    await session.flush()
    _announce_event(session, event_frame(channel_id, seq, "deleted", message))
    return message


async def message_edits(
    session: AsyncSession, principal: Principal, channel_id: str, message_id: str
) -> list[MessageEdit]:
    """A message's earlier texts, oldest first."""
    await channel_access(session, principal, channel_id)
    message = await _message_in(session, channel_id, message_id)
    rows = await session.execute(
        select(MessageEdit)
        .where(MessageEdit.message_id == message.id)
        .order_by(col(MessageEdit.seq))
    )
    return list(rows.scalars())


async def list_messages(
    session: AsyncSession,
    principal: Principal,
    channel_id: str,
    *,
    after_seq: int | None,
    before_seq: int | None,
    limit: int,
) -> tuple[list[Message], bool, int]:
    """A page of messages, ascending by seq; and whether more lie in its direction.

    ``after_seq`` pages forward; ``before_seq`` (or neither: the newest) pages back.
    """
    access = await channel_access(session, principal, channel_id)
    query = select(Message).where(Message.channel_id == channel_id)
    if after_seq is not None:
        query = query.where(col(Message.seq) > after_seq)
    if before_seq is not None:
        query = query.where(col(Message.seq) < before_seq)
    forward = after_seq is not None and before_seq is None
    order = col(Message.seq).asc() if forward else col(Message.seq).desc()
    rows = list((await session.execute(query.order_by(order).limit(limit + 1))).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    if not forward:
        rows.reverse()
    return rows, more, access.channel.last_seq


async def channel_events(
    session: AsyncSession, channel_id: str, after_seq: int, up_to: int, limit: int
) -> list[dict[str, Any]]:
    """Frames of the channel's events in (after_seq, up_to], at most ``limit``, in order."""
    rows = (
        await session.execute(
            sa.select(ChannelEvent.seq, ChannelEvent.kind, Message)  # type: ignore[call-overload]
            .join(Message, col(Message.id) == col(ChannelEvent.message_id))
            .where(
                col(ChannelEvent.channel_id) == channel_id,
                col(ChannelEvent.seq) > after_seq,
                col(ChannelEvent.seq) <= up_to,
            )
            .order_by(col(ChannelEvent.seq))
            .limit(limit)
        )
    ).all()
    return [event_frame(channel_id, seq, kind, message) for seq, kind, message in rows]


async def set_read_marker(
    session: AsyncSession, principal: Principal, channel_id: str, seq: int
) -> int:
    """Move the caller's read marker forward to ``seq`` (never back); returns the marker."""
    access = await channel_access(session, principal, channel_id)
    if seq > access.channel.last_seq:
        raise Unprocessable(
            f"seq {seq} is beyond the channel's last seq {access.channel.last_seq}.",
            last_seq=access.channel.last_seq,
        )
    user_id, now = access.caller.user_id, utcnow()
    values = {"channel_id": channel_id, "user_id": user_id, "seq": seq, "updated_at": now}
    table = ReadMarker.__table__  # type: ignore[attr-defined]
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(table).values(**values)
        statement: Any = pg.on_conflict_do_update(
            index_elements=["channel_id", "user_id"],
            set_={"seq": sa.func.greatest(table.c.seq, pg.excluded.seq), "updated_at": now},
        )
    else:
        lite = sqlite.insert(table).values(**values)
        statement = lite.on_conflict_do_update(
            index_elements=["channel_id", "user_id"],
            set_={"seq": sa.func.max(table.c.seq, lite.excluded.seq), "updated_at": now},
        )
    await session.execute(statement)
    stored = await session.execute(
        sa.select(table.c.seq).where(table.c.channel_id == channel_id, table.c.user_id == user_id)
    )
    return int(stored.scalar_one())


async def readable_channels(
    session: AsyncSession, caller: Caller, channel_ids: Sequence[str]
) -> set[str]:
    """Which of ``channel_ids`` the caller may still read (for the fan-out's re-checks)."""
    out = set()
    for channel_id in channel_ids:
        try:
            await channel_access(session, caller, channel_id)
        except NotFound:
            continue
        out.add(channel_id)
    return out


# -- task threads and system messages (from marketplace events) ----------------------
async def ensure_task_thread(
    session: AsyncSession, cluster_id: str, task_id: str, requester_firm_id: str
) -> Channel:
    """A task's thread, created on first need with the requester firm in it."""
    return await ensure_thread(
        session, cluster_id, f"task:{task_id}", f"task {task_id}", requester_firm_id
    )


async def ensure_contract_thread(
    session: AsyncSession, cluster_id: str, contract_id: str, requester_firm_id: str
) -> Channel:
    """A contract's own thread: the requester and that one vendor, nobody else."""
    return await ensure_thread(
        session, cluster_id, f"contract:{contract_id}", f"contract {contract_id}", requester_firm_id
    )


async def ensure_thread(
    session: AsyncSession, cluster_id: str, key: str, name: str, requester_firm_id: str
) -> Channel:
    """The thread known by ``key`` in the cluster, created with the requester firm in it."""
    channel = (
        await session.execute(
            select(Channel).where(Channel.cluster_id == cluster_id, Channel.direct_key == key)
        )
    ).scalar_one_or_none()
    if channel is None:
        channel = Channel(
            id=new_id("chan"),
            cluster_id=cluster_id,
            kind="thread",
            name=name[:80],
            direct_key=key,
        )
        session.add(channel)
        await session.flush()
    await add_thread_firm(session, channel, requester_firm_id, "requester")
    return channel


async def add_thread_firm(session: AsyncSession, channel: Channel, firm_id: str, role: str) -> None:
    """Put a firm's users in a thread (once; a requester stays the requester)."""
    if await session.get(ChannelFirm, (channel.id, firm_id)) is None:
        session.add(ChannelFirm(channel_id=channel.id, firm_id=firm_id, role=role))
        await session.flush()


async def post_system_message(
    session: AsyncSession, channel_id: str, text: str, *, key: str
) -> Message:
    """A message the platform posts (sender ``system``); ``key`` makes it once per cause.

    It takes the channel's next seq like any post and reaches subscribers the same way,
    but it is nobody's conversation, so no ``message.posted`` event is emitted for it.
    """
    await _lock_channel(session, channel_id)
    existing = (
        await session.execute(
            select(Message).where(Message.sender_id == SYSTEM, Message.client_message_id == key)
        )
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    seq = await _next_seq(session, channel_id)
    message = Message(
        id=new_id("msg"),
        channel_id=channel_id,
        seq=seq,
        sender_id=SYSTEM,
        sender_firm_id=SYSTEM,
        client_message_id=key,
        text=text,
    )
    session.add(message)
    await session.flush()
    session.add(ChannelEvent(channel_id=channel_id, seq=seq, kind="posted", message_id=message.id))
    await session.flush()
    channel = await session.get(Channel, channel_id)
    kind = channel.kind if channel is not None else "unknown"
    count_on_commit(session, MESSAGES_POSTED.labels(kind))
    _announce_event(session, event_frame(channel_id, seq, "posted", message))
    return message


async def present_members(
    session: AsyncSession, principal: Principal, cluster_id: str, pairs: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Of the (user, firm) pairs marked present, those still in the cluster; members only.

    Anyone whose firm is not an active member of the cluster gets 404.
    """
    caller = caller_of(principal)
    if not await in_cluster(session, caller, cluster_id):
        raise NotFound("No cluster with this id among your firm's clusters.")
    if not pairs:
        return []
    rows = (
        await session.execute(
            sa.select(col(KnownFirmMember.user_id), col(KnownFirmMember.firm_id))
            .join(
                KnownClusterMember,
                sa.and_(
                    col(KnownClusterMember.firm_id) == col(KnownFirmMember.firm_id),
                    col(KnownClusterMember.cluster_id) == cluster_id,
                    col(KnownClusterMember.active),
                ),
            )
            .where(
                col(KnownFirmMember.active),
                col(KnownFirmMember.user_id).in_(sorted({u for u, _ in pairs})),
            )
        )
    ).all()
    still = {(r[0], r[1]) for r in rows}
    return [pair for pair in pairs if pair in still]
