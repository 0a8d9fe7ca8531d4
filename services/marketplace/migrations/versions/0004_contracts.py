"""bids, contracts, the quality gate and gold scoring

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-27 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import services.kit.db

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bids",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("vendor_firm_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("price_per_annotation", sa.Integer(), nullable=False),
        sa.Column("daily_capacity", sa.Integer(), nullable=False),
        sa.Column("note", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("decline_reason", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=True),
        sa.Column("contract_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("created_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("bids", schema=None) as batch_op:
        batch_op.create_index(
            "ix_bids_task_vendor", ["task_id", "vendor_firm_id", "state"], unique=False
        )

    op.create_table(
        "contracts",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("bid_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("vendor_firm_id", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("price_per_annotation", sa.Integer(), nullable=False),
        sa.Column("quota", sa.Integer(), nullable=False),
        sa.Column("daily_capacity", sa.Integer(), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("awarded_by", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("terminated_at", services.kit.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["bid_id"], ["bids.id"]),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("contracts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_contracts_task_vendor", ["task_id", "vendor_firm_id", "state"], unique=False
        )

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("min_gold_accuracy", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("gold_min_answers", sa.Integer(), nullable=False, server_default="3")
        )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        # The default only filled existing rows; the model supplies it from now on.
        batch_op.alter_column("gold_min_answers", server_default=None)

    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gold_correct", sa.Boolean(), nullable=True))
        batch_op.create_index(
            "ix_assignments_firm_reputation",
            ["annotator_firm_id", "status", "gold", "gold_correct", "expires_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_index("ix_assignments_firm_reputation")
        batch_op.drop_column("gold_correct")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("gold_min_answers")
        batch_op.drop_column("min_gold_accuracy")
    with op.batch_alter_table("contracts", schema=None) as batch_op:
        batch_op.drop_index("ix_contracts_task_vendor")
    op.drop_table("contracts")
    with op.batch_alter_table("bids", schema=None) as batch_op:
        batch_op.drop_index("ix_bids_task_vendor")
    op.drop_table("bids")
