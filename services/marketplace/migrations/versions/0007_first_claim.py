"""task_first_claims: when a task's first item was claimed

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 15:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import services.kit.db

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_first_claims",
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("claimer_firm_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("claimed_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("task_id"),
    )


def downgrade() -> None:
    op.drop_table("task_first_claims")
