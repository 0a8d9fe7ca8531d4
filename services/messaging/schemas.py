"""API shapes of the messaging service (requests and responses, not the tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AnyUrl, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from api.events import ChannelKind

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80)]
Topic = Annotated[str, StringConstraints(strip_whitespace=True, max_length=250)]
EntityId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ClientMessageId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
]
MediaType = Annotated[
    str,
    StringConstraints(
        max_length=127, pattern=r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$"
    ),
]
MAX_TEXT_CHARS = 1_048_576  # the schema's hard cap; the configured byte limit is checked too
MAX_MENTIONS = 50
MAX_ATTACHMENTS = 10
MAX_PARTICIPANTS = 50


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChannelCreate(Request):
    cluster_id: EntityId
    kind: Literal["public", "private"] = Field(
        description="public: any member firm's user may join; private: by invitation"
    )
    name: Name = Field(examples=["annotation-quality"])
    topic: Topic = ""


class ChannelUpdate(Request):
    name: Name | None = None
    topic: Topic | None = None


class ConversationCreate(Request):
    cluster_id: EntityId
    user_ids: list[EntityId] = Field(
        min_length=1,
        max_length=MAX_PARTICIPANTS - 1,
        description="the other participants (users of member firms of the cluster)",
    )


class MemberAdd(Request):
    user_id: EntityId


class Mentions(Request):
    user_ids: list[EntityId] = Field(default_factory=list, max_length=MAX_MENTIONS)
    firm_ids: list[EntityId] = Field(default_factory=list, max_length=MAX_MENTIONS)


class Attachment(Request):
    """A reference to a file stored elsewhere; the platform stores no bytes."""

    url: AnyUrl = Field(examples=["https://files.example.com/spec.pdf"])
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    size: int = Field(ge=0, le=10 * 1024**3, description="bytes")
    media_type: MediaType = Field(examples=["application/pdf"])

    @field_validator("url")
    @classmethod
    def _https(cls, value: AnyUrl) -> AnyUrl:
        if value.scheme != "https" or not value.host:
            raise ValueError("attachments are https URLs")
        if len(str(value)) > 2000:
            raise ValueError("URL too long")
        return value


class MessageCreate(Request):
    text: str = Field("", max_length=MAX_TEXT_CHARS, description="Markdown")
    client_message_id: ClientMessageId | None = Field(
        None, description="the sender's own id: a retry with the same id returns the same message"
    )
    mentions: Mentions = Field(default_factory=Mentions)
    attachments: list[Attachment] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)


class MessageUpdate(Request):
    text: str = Field(max_length=MAX_TEXT_CHARS, description="Markdown")


class ReadMarkerIn(Request):
    seq: int = Field(ge=0, description="the last seq read; a lower value than stored is ignored")


class ChannelOut(BaseModel):
    id: str
    cluster_id: str
    kind: ChannelKind
    name: str
    topic: str
    created_at: datetime
    last_seq: int = Field(description="the channel's last event seq")
    joined: bool = Field(description="the caller may post here")
    role: Literal["admin", "member"] | None = None
    read_seq: int = 0
    unread_count: int = Field(0, description="others' live messages after read_seq")
    mention_count: int = Field(0, description="of those, the ones mentioning you or your firm")


class MemberOut(BaseModel):
    user_id: str
    firm_id: str
    role: Literal["admin", "member"]
    joined_at: datetime | None = None


class MentionsOut(BaseModel):
    user_ids: list[str]
    firm_ids: list[str]


class AttachmentOut(BaseModel):
    url: str
    name: str
    size: int
    media_type: str


class MessageOut(BaseModel):
    id: str
    channel_id: str
    seq: int = Field(description="the seq of the event that posted it")
    sender_id: str
    sender_firm_id: str
    client_message_id: str | None = None
    text: str
    mentions: MentionsOut
    attachments: list[AttachmentOut]
    created_at: datetime
    edited_at: datetime | None = None
    deleted: bool = False
    deleted_at: datetime | None = None
    system: bool = Field(
        False, description="posted by the platform from an event (sender_id `system`)"
    )


class MessagePage(BaseModel):
    items: list[MessageOut] = Field(description="ascending by seq")
    has_more: bool = Field(description="more messages lie beyond this page in its direction")
    last_seq: int = Field(description="the channel's last seq when the page was read")


class EditOut(BaseModel):
    seq: int = Field(description="the seq of the edit that replaced this text")
    previous_text: str
    edited_at: datetime


class ReadMarkerOut(BaseModel):
    channel_id: str
    seq: int


class PresentUser(BaseModel):
    user_id: str
    firm_id: str = Field(description="the firm the user is acting for on that socket")


class PresenceOut(BaseModel):
    cluster_id: str
    users: list[PresentUser] = Field(description="users with an open socket in the cluster")
    firm_ids: list[str] = Field(description="firms with at least one user present")
