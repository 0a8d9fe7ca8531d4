"""HTTP routes of messaging: channels, conversations, messages, read markers.

Actions are ``POST …/{id}:verb`` (``:join``, ``:leave``). The WebSocket endpoint is in
``ws.py``; a message sent here reaches subscribers exactly like one sent there.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from api.events import ChannelKind
from services.kit.errors import responses
from services.kit.pagination import Page, PageParams, encode_cursor
from services.kit.ratelimit import enforce
from services.messaging import presence, search, service
from services.messaging.deps import MessagingReader, MessagingWriter, SessionDep
from services.messaging.models import ChannelMember
from services.messaging.schemas import (
    ChannelCreate,
    ChannelOut,
    ChannelUpdate,
    ConversationCreate,
    EditOut,
    MemberAdd,
    MemberOut,
    MessageCreate,
    MessageOut,
    MessagePage,
    MessageUpdate,
    PresenceOut,
    PresentUser,
    ReadMarkerIn,
    ReadMarkerOut,
)

router = APIRouter(prefix="/v1")
ERR = responses(400, 401, 403, 404, 409, 422, 429)
Id = Annotated[str, Path(min_length=1, max_length=64)]
Seq = Annotated[int | None, Query(ge=0, description="a channel seq")]


async def _one(session: SessionDep, access: service.ChannelAccess) -> ChannelOut:
    return (await service.describe_channels(session, access.caller, [access.channel]))[0]


def _member_out(member: ChannelMember) -> MemberOut:
    return MemberOut(
        user_id=member.user_id,
        firm_id=member.firm_id,
        role=member.role,
        joined_at=member.joined_at,
    )


# -- channels ------------------------------------------------------------------------
@router.post(
    "/channels",
    status_code=201,
    response_model=ChannelOut,
    tags=["channels"],
    summary="Create a public or private channel in one of your firm's clusters",
    responses=ERR,
)
async def create_channel(
    body: ChannelCreate, session: SessionDep, principal: MessagingWriter
) -> ChannelOut:
    access = await service.create_channel(
        session,
        principal,
        cluster_id=body.cluster_id,
        kind=body.kind,
        name=body.name,
        topic=body.topic,
    )
    return await _one(session, access)


@router.get(
    "/channels",
    response_model=Page[ChannelOut],
    tags=["channels"],
    summary="Channels you can read, with your unread and mention counts",
    responses=ERR,
)
async def list_channels(
    session: SessionDep,
    principal: MessagingReader,
    page: PageParams,
    cluster_id: Annotated[str | None, Query(max_length=64)] = None,
    kind: ChannelKind | None = None,
) -> Page[ChannelOut]:
    rows = await service.list_channels(
        session, principal, cluster_id=cluster_id, kind=kind, limit=page.limit, after=page.after
    )
    more = len(rows) > page.limit
    items = rows[: page.limit]
    return Page[ChannelOut](
        items=items, next_cursor=encode_cursor(items[-1].id) if more and items else None
    )


@router.get(
    "/channels/{channel_id}",
    response_model=ChannelOut,
    tags=["channels"],
    summary="One channel",
    responses=ERR,
)
async def get_channel(
    channel_id: Id, session: SessionDep, principal: MessagingReader
) -> ChannelOut:
    return await _one(session, await service.channel_access(session, principal, channel_id))


@router.patch(
    "/channels/{channel_id}",
    response_model=ChannelOut,
    tags=["channels"],
    summary="Rename a channel or change its topic (its admins)",
    responses=ERR,
)
async def update_channel(
    channel_id: Id, body: ChannelUpdate, session: SessionDep, principal: MessagingWriter
) -> ChannelOut:
    fields = {name: getattr(body, name) for name in body.model_fields_set}
    access = await service.update_channel(session, principal, channel_id, fields=fields)
    return await _one(session, access)


@router.post(
    "/channels/{channel_id}:join",
    response_model=ChannelOut,
    tags=["channels"],
    summary="Join a public channel",
    responses=ERR,
)
async def join_channel(
    channel_id: Id, session: SessionDep, principal: MessagingWriter
) -> ChannelOut:
    return await _one(session, await service.join_channel(session, principal, channel_id))


@router.post(
    "/channels/{channel_id}:leave",
    response_model=ChannelOut,
    tags=["channels"],
    summary="Leave a public or private channel",
    responses=ERR,
)
async def leave_channel(
    channel_id: Id, session: SessionDep, principal: MessagingWriter
) -> ChannelOut:
    access = await service.leave_channel(session, principal, channel_id)
    if access.channel.kind == "private":
        return ChannelOut(
            id=access.channel.id,
            cluster_id=access.channel.cluster_id,
            kind="private",
            name=access.channel.name,
            topic=access.channel.topic,
            created_at=access.channel.created_at,
            last_seq=access.channel.last_seq,
            joined=False,
        )
    return await _one(session, access)


@router.get(
    "/channels/{channel_id}/members",
    response_model=Page[MemberOut],
    tags=["channels"],
    summary="The channel's people (the general channel: every member firm's users)",
    responses=ERR,
)
async def list_members(
    channel_id: Id, session: SessionDep, principal: MessagingReader, page: PageParams
) -> Page[MemberOut]:
    rows = await service.list_members(
        session, principal, channel_id, limit=page.limit, after=page.after
    )
    more = len(rows) > page.limit
    items = [
        MemberOut(user_id=u, firm_id=f, role=r, joined_at=j) for u, f, r, j in rows[: page.limit]
    ]
    return Page[MemberOut](
        items=items, next_cursor=encode_cursor(items[-1].user_id) if more and items else None
    )


@router.post(
    "/channels/{channel_id}/members",
    status_code=201,
    response_model=MemberOut,
    tags=["channels"],
    summary="Add a user of a member firm to a public or private channel",
    responses=ERR,
)
async def add_member(
    channel_id: Id, body: MemberAdd, session: SessionDep, principal: MessagingWriter
) -> MemberOut:
    member = await service.add_member(session, principal, channel_id, body.user_id)
    return _member_out(member)


@router.post(
    "/conversations",
    status_code=201,
    response_model=ChannelOut,
    tags=["channels"],
    summary="Open the direct conversation with users of the cluster (200 if it exists)",
    responses=ERR,
)
async def create_conversation(
    body: ConversationCreate, response: Response, session: SessionDep, principal: MessagingWriter
) -> ChannelOut:
    access, created = await service.create_conversation(
        session, principal, cluster_id=body.cluster_id, user_ids=body.user_ids
    )
    if not created:
        response.status_code = 200
    return await _one(session, access)


# -- messages ------------------------------------------------------------------------
@router.get(
    "/channels/{channel_id}/messages",
    response_model=MessagePage,
    tags=["messages"],
    summary="History by seq: after_seq pages forward, before_seq (or neither) back",
    responses=ERR,
)
async def list_messages(
    channel_id: Id,
    session: SessionDep,
    principal: MessagingReader,
    after_seq: Seq = None,
    before_seq: Seq = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> MessagePage:
    rows, more, last_seq = await service.list_messages(
        session, principal, channel_id, after_seq=after_seq, before_seq=before_seq, limit=limit
    )
    return MessagePage(
        items=[service.message_out(m) for m in rows], has_more=more, last_seq=last_seq
    )


@router.post(
    "/channels/{channel_id}/messages",
    status_code=201,
    response_model=MessageOut,
    tags=["messages"],
    summary="Post a message (200 with the same message for a repeated client_message_id)",
    responses={**ERR, **responses(413)},
)
async def post_message(
    channel_id: Id,
    body: MessageCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    principal: MessagingWriter,
) -> MessageOut:
    settings = request.app.state.settings
    await enforce(
        request.app.state.rate_limiter,
        f"messaging-send:{principal.subject}",
        settings.messaging_send_rate_per_minute,
    )
    message, created = await service.post_message(
        session,
        principal,
        channel_id,
        text=body.text,
        client_message_id=body.client_message_id,
        mention_user_ids=body.mentions.user_ids,
        mention_firm_ids=body.mentions.firm_ids,
        attachments=body.attachments,
        max_bytes=settings.messaging_max_message_bytes,
    )
    if not created:
        response.status_code = 200
    return service.message_out(message)


@router.patch(
    "/channels/{channel_id}/messages/{message_id}",
    response_model=MessageOut,
    tags=["messages"],
    summary="Edit your message; the earlier text is kept in its history",
    responses={**ERR, **responses(413)},
)
async def edit_message(
    channel_id: Id,
    message_id: Id,
    body: MessageUpdate,
    request: Request,
    session: SessionDep,
    principal: MessagingWriter,
) -> MessageOut:
    message = await service.edit_message(
        session,
        principal,
        channel_id,
        message_id,
        text=body.text,
        max_bytes=request.app.state.settings.messaging_max_message_bytes,
    )
    return service.message_out(message)


@router.delete(
    "/channels/{channel_id}/messages/{message_id}",
    response_model=MessageOut,
    tags=["messages"],
    summary="Delete a message (author or channel admin): a tombstone stays in its place",
    responses=ERR,
)
async def delete_message(
    channel_id: Id, message_id: Id, session: SessionDep, principal: MessagingWriter
) -> MessageOut:
    message = await service.delete_message(session, principal, channel_id, message_id)
    return service.message_out(message)


@router.get(
    "/channels/{channel_id}/messages/{message_id}/edits",
    response_model=list[EditOut],
    tags=["messages"],
    summary="A message's earlier texts, oldest first",
    responses=ERR,
)
async def message_edits(
    channel_id: Id, message_id: Id, session: SessionDep, principal: MessagingReader
) -> list[EditOut]:
    edits = await service.message_edits(session, principal, channel_id, message_id)
    return [EditOut(seq=e.seq, previous_text=e.previous_text, edited_at=e.edited_at) for e in edits]


@router.post(
    "/channels/{channel_id}/read-marker",
    response_model=ReadMarkerOut,
    tags=["messages"],
    summary="Mark the channel read up to a seq (a marker never moves back)",
    responses=ERR,
)
async def set_read_marker(
    channel_id: Id, body: ReadMarkerIn, session: SessionDep, principal: MessagingReader
) -> ReadMarkerOut:
    seq = await service.set_read_marker(session, principal, channel_id, body.seq)
    return ReadMarkerOut(channel_id=channel_id, seq=seq)


@router.get(
    "/messages/search",
    response_model=Page[MessageOut],
    tags=["messages"],
    summary="Search the messages of the channels you can read, newest first",
    description=(
        'Web-search syntax: words (all must match), `"a phrase"`, `or`, `-word`. '
        "Tokens match literally (English, pinyin and Chinese alike); deleted messages are "
        "never found; an edited message is found by its current text."
    ),
    responses=ERR,
)
async def search_messages(
    session: SessionDep,
    principal: MessagingReader,
    page: PageParams,
    q: Annotated[str, Query(min_length=1, max_length=200, description="search terms")],
    channel_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> Page[MessageOut]:
    rows = await search.search_messages(
        session, principal, q, channel_id=channel_id, limit=page.limit, after=page.after
    )
    more = len(rows) > page.limit
    items = rows[: page.limit]
    return Page[MessageOut](
        items=[service.message_out(m) for m in items],
        next_cursor=encode_cursor(items[-1].id) if more and items else None,
    )


@router.get(
    "/clusters/{cluster_id}/presence",
    response_model=PresenceOut,
    tags=["channels"],
    summary="Users and firms of the cluster online now (members of the cluster only)",
    description=(
        "A user is online while one of their sockets is subscribed to a channel of the "
        "cluster; changes also arrive as `presence` frames on the WebSocket."
    ),
    responses=ERR,
)
async def cluster_presence(
    cluster_id: Id, request: Request, session: SessionDep, principal: MessagingReader
) -> PresenceOut:
    hub = request.app.state.hub
    service.caller_of(principal)
    pairs = presence.present(await hub.presence.live(cluster_id))
    users = await service.present_members(session, principal, cluster_id, pairs)
    return PresenceOut(
        cluster_id=cluster_id,
        users=[PresentUser(user_id=u, firm_id=f) for u, f in users],
        firm_ids=sorted({f for _, f in users}),
    )
