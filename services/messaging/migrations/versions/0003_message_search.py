"""message search: the PostgreSQL full-text index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 16:00:00

PostgreSQL: a GIN index on ``to_tsvector('simple', text)`` (the expression the search
query uses), so edits and tombstones are re-indexed by PostgreSQL itself.

SQLite (embedded mode) needs nothing here: its FTS5 table is a derived index that the
service creates and fills at startup (``services/messaging/search.py``).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE INDEX ix_messages_text_search ON messages "
            "USING gin (to_tsvector('simple'::regconfig, text))"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_messages_text_search")
