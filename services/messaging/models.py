"""Messaging tables: the read model of membership, channels, their events and messages.

The read model (``clusters``, ``cluster_members``, ``firm_members``) is written only by
``consumers.py`` from membership's events; each row keeps the id of the event that last
wrote it, so redelivered and out-of-order events converge (as in the marketplace).

A channel numbers everything that happens in it — a post, an edit, a delete — with one
gap-free ``seq`` (``channels.last_seq``, taken under the channel's row lock). The
``channel_events`` log keeps one row per seq, so a reconnecting client can be given
every event after the last one it saw; a message's own ``seq`` is that of its post.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import registry
from sqlmodel import JSON, Field, SQLModel

from services.kit.db import UTCDateTime, utcnow
from services.kit.idempotency import IdempotencyFields
from services.kit.outbox import OutboxFields, ProcessedEventFields
from services.kit.readmodel import KnownClusterMemberFields, KnownFirmMemberFields


class MessagingBase(SQLModel, registry=registry()):
    pass


def _ts(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kw)


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime)


# -- read model (from membership events) ---------------------------------------------
class KnownCluster(MessagingBase, table=True):
    __tablename__ = "clusters"
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    operator_firm_id: str = Field(max_length=40)
    event_id: str = Field(max_length=40)


class KnownClusterMember(KnownClusterMemberFields, MessagingBase, table=True):
    __tablename__ = "cluster_members"


class KnownFirmMember(KnownFirmMemberFields, MessagingBase, table=True):
    __tablename__ = "firm_members"


# -- channels ------------------------------------------------------------------------
class Channel(MessagingBase, table=True):
    """A cluster's general channel, a topic channel, a private channel or a conversation."""

    __tablename__ = "channels"
    __table_args__ = (sa.UniqueConstraint("cluster_id", "direct_key"),)
    id: str = Field(primary_key=True, max_length=40)
    cluster_id: str = Field(max_length=40, index=True)
    kind: str = Field(max_length=16)  # general | public | private | direct | thread
    name: str = Field(max_length=80)
    topic: str = Field(default="", max_length=250)
    created_by: str | None = Field(default=None, max_length=40)
    direct_key: str | None = Field(default=None, max_length=64)
    """Digest of a conversation's sorted user ids (one conversation per set of people),
    ``general``, or ``task:<task id>`` for a task's thread."""
    last_seq: int = 0
    """The channel's last event seq (post, edit or delete), gap-free."""
    created_at: datetime = _created()


class ChannelMember(MessagingBase, table=True):
    """A user in a public, private or direct channel, acting for one firm of the cluster.

    The general channel has no rows: every active user of an active member firm is in it.
    """

    __tablename__ = "channel_members"
    channel_id: str = Field(primary_key=True, foreign_key="channels.id", max_length=40)
    user_id: str = Field(primary_key=True, max_length=40, index=True)
    firm_id: str = Field(max_length=40, index=True)
    role: str = Field(default="member", max_length=16)  # admin | member
    joined_at: datetime = _created()


class ChannelFirm(MessagingBase, table=True):
    """A firm whose users are in a task's thread (the requester, each contracted vendor).

    Threads have firm-level membership: every active user of the firm reads and posts
    there while the firm is an active member of the cluster.
    """

    __tablename__ = "channel_firms"
    channel_id: str = Field(primary_key=True, foreign_key="channels.id", max_length=40)
    firm_id: str = Field(primary_key=True, max_length=40, index=True)
    role: str = Field(max_length=16)  # requester | vendor
    added_at: datetime = _created()


class ReadMarker(MessagingBase, table=True):
    """The last seq a user has read in a channel; it only moves forward."""

    __tablename__ = "read_markers"
    channel_id: str = Field(primary_key=True, foreign_key="channels.id", max_length=40)
    user_id: str = Field(primary_key=True, max_length=40)
    seq: int = 0
    updated_at: datetime = _created()


# -- messages ------------------------------------------------------------------------
class Message(MessagingBase, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        sa.UniqueConstraint("channel_id", "seq"),
        sa.UniqueConstraint("sender_id", "client_message_id"),
        # full-text search on PostgreSQL (SQLite: the FTS5 table of ``search.py``)
        sa.Index(
            "ix_messages_text_search",
            sa.text("to_tsvector('simple'::regconfig, text)"),
            postgresql_using="gin",
        ).ddl_if(dialect="postgresql"),
    )
    id: str = Field(primary_key=True, max_length=40)
    channel_id: str = Field(foreign_key="channels.id", max_length=40)
    seq: int
    sender_id: str = Field(max_length=40)
    sender_firm_id: str = Field(max_length=40)
    client_message_id: str | None = Field(default=None, max_length=64)
    text: str = Field(default="", sa_type=sa.Text)
    mentioned_user_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    mentioned_firm_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    attachments: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    created_at: datetime = _created()
    edited_at: datetime | None = _ts(default=None)
    deleted_at: datetime | None = _ts(default=None)
    deleted_by: str | None = Field(default=None, max_length=40)


class MessageEdit(MessagingBase, table=True):
    """A message's text before one edit (its history, oldest first by seq)."""

    __tablename__ = "message_edits"
    id: str = Field(primary_key=True, max_length=40)
    message_id: str = Field(foreign_key="messages.id", max_length=40, index=True)
    seq: int
    """The seq of the edit event that replaced this text."""
    previous_text: str = Field(sa_type=sa.Text)
    edited_at: datetime = _created()


class ChannelEvent(MessagingBase, table=True):
    """One row per channel seq: what happened at that seq, to which message."""

    __tablename__ = "channel_events"
    channel_id: str = Field(primary_key=True, foreign_key="channels.id", max_length=40)
    seq: int = Field(primary_key=True)
    kind: str = Field(max_length=16)  # posted | edited | deleted
    message_id: str = Field(foreign_key="messages.id", max_length=40)


class Mention(MessagingBase, table=True):
    """Who a message mentions, for per-user mention counts."""

    __tablename__ = "mentions"
    __table_args__ = (sa.Index("ix_mentions_target", "target_id", "channel_id", "seq"),)
    message_id: str = Field(primary_key=True, foreign_key="messages.id", max_length=40)
    target_id: str = Field(primary_key=True, max_length=40)
    """A user id or a firm id (ids carry their kind as a prefix)."""
    channel_id: str = Field(max_length=40)
    seq: int


class MessagingOutbox(OutboxFields, MessagingBase, table=True):
    __tablename__ = "outbox"


class MessagingIdempotencyKey(IdempotencyFields, MessagingBase, table=True):
    __tablename__ = "idempotency_keys"


class MessagingProcessedEvent(ProcessedEventFields, MessagingBase, table=True):
    __tablename__ = "processed_events"


metadata = MessagingBase.metadata
