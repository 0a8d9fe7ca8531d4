"""Message search over the channels the caller can read.

The query uses web-search syntax on both databases: words (all must match), ``"a
phrase"``, ``or`` between alternatives and ``-word`` to exclude. Matching is literal per
token — no stemming, no stop words — so English words, pinyin and runs of Chinese
characters all match as written (a run of Chinese characters without spaces is one
token: search for the whole run, or write the words apart when posting).

PostgreSQL: ``to_tsvector('simple', text) @@ websearch_to_tsquery('simple', q)`` over
the GIN index of migration 0003; the index follows edits and tombstones by itself.

SQLite (embedded mode): an external-content FTS5 table ``messages_fts`` (tokenizer
``unicode61``) keyed by the message's rowid, kept in step by triggers on insert, update
of ``text`` and delete. It is a derived index: the service creates it at startup when it
is missing and fills it from ``messages`` (``rebuild``), so it never needs a migration of
its own and can be dropped and rebuilt at will. The query is translated to FTS5 syntax
with every term quoted, so no input can be an FTS5 syntax error.

Results: never a tombstone (deleted messages have no text, and are filtered anyway),
never a channel the caller cannot read (the same rule as ``GET /v1/channels``), newest
first by message id (ids are time-ordered), paged with an opaque cursor.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.kit.auth import Principal
from services.kit.db import Database
from services.messaging import service
from services.messaging.models import Message

SQLITE_INDEX = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5("
    "text, content='messages', content_rowid='rowid', tokenize='unicode61')",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_ai AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, text) VALUES (new.rowid, new.text); END",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_ad AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);"
    " END",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_au AFTER UPDATE OF text ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);"
    " INSERT INTO messages_fts(rowid, text) VALUES (new.rowid, new.text); END",
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
]
_TERM = re.compile(r'(-?)"([^"]*)"?|(\S+)')


async def ensure_index(db: Database) -> None:
    """Create and fill the SQLite FTS5 table if it is missing (PostgreSQL: migration 0003)."""
    if db.postgres:
        return
    async with db.engine.begin() as conn:
        exists = (
            await conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages_fts'"
            )
        ).first()
        if exists is None:
            for statement in SQLITE_INDEX:
                await conn.exec_driver_sql(statement)


async def on_startup(app: FastAPI) -> None:
    await ensure_index(app.state.db)


def fts5_query(q: str) -> str | None:
    """Web-search syntax as an FTS5 query (every term quoted); None when nothing to find."""
    groups: list[tuple[list[str], list[str]]] = [([], [])]
    for match in _TERM.finditer(q):
        negate, phrase, word = match.group(1), match.group(2), match.group(3)
        if word is not None and word.lower() == "or":
            groups.append(([], []))
            continue
        if word is not None and word.startswith("-") and len(word) > 1:
            negate, word = "-", word[1:]
        term = phrase if phrase is not None else word or ""
        if not re.search(r"\w", term):
            continue
        quoted = '"' + term.replace('"', '""') + '"'
        groups[-1][1 if negate else 0].append(quoted)
    parts = [
        "(" + " AND ".join(pos) + "".join(f" NOT {n}" for n in neg) + ")"
        for pos, neg in groups
        if pos
    ]
    return " OR ".join(parts) or None


async def search_messages(
    session: AsyncSession,
    principal: Principal,
    q: str,
    *,
    channel_id: str | None,
    limit: int,
    after: str | None,
) -> list[Message]:
    """Messages matching ``q`` that the caller can read, newest first; ``limit + 1`` rows."""
    caller = service.caller_of(principal)
    query = select(Message).where(col(Message.deleted_at).is_(None))
    if channel_id is not None:
        await service.channel_access(session, caller, channel_id)  # 404 if not readable
        query = query.where(Message.channel_id == channel_id)
    else:
        readable = await service.readable_channel_ids(session, caller)
        if readable is None:
            return []
        query = query.where(col(Message.channel_id).in_(readable))
    if session.get_bind().dialect.name == "postgresql":
        simple: Any = sa.literal_column("'simple'::regconfig")
        matched: Any = sa.func.to_tsvector(simple, col(Message.text)).op("@@")(
            sa.func.websearch_to_tsquery(simple, q)
        )
    else:
        fts = fts5_query(q)
        if fts is None:
            return []
        matched = sa.literal_column("messages.rowid").in_(
            sa.text("SELECT rowid FROM messages_fts WHERE messages_fts MATCH :fts").bindparams(
                fts=fts
            )
        )
    query = query.where(matched)
    if after:
        query = query.where(col(Message.id) < after)
    rows = await session.execute(query.order_by(col(Message.id).desc()).limit(limit + 1))
    return list(rows.scalars())
