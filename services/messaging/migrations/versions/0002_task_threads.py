"""task threads: firms of a thread channel

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 16:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import services.kit.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "channel_firms",
        sa.Column("channel_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("firm_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("added_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["channel_id"], ["channels.id"]),
        sa.PrimaryKeyConstraint("channel_id", "firm_id"),
    )
    with op.batch_alter_table("channel_firms", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_channel_firms_firm_id"), ["firm_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("channel_firms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_channel_firms_firm_id"))
    op.drop_table("channel_firms")
