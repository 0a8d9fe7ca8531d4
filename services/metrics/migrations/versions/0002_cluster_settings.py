"""cluster settings: what the operator publishes to member firms

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 15:50:00.000000
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
        "cluster_settings",
        sa.Column("cluster_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("members_visible", sa.Boolean(), nullable=False),
        sa.Column("updated_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("cluster_id"),
    )


def downgrade() -> None:
    op.drop_table("cluster_settings")
