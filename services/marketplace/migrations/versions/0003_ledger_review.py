"""ledger (accounts, postings, lines, settlements), clusters read model, review columns

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 14:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import services.kit.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _str(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column("id", _str(40), nullable=False),
        sa.Column("operator_firm_id", _str(40), nullable=False),
        sa.Column("event_id", _str(40), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "ledger_accounts",
        sa.Column("id", _str(40), nullable=False),
        sa.Column("cluster_id", _str(40), nullable=False),
        sa.Column("firm_id", _str(40), nullable=False),
        sa.Column("kind", _str(16), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("created_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind = 'issuance' OR balance >= 0", name="ck_ledger_accounts_not_negative"
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("cluster_id", "firm_id", "kind"),
    )
    with op.batch_alter_table("ledger_accounts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_accounts_firm_id"), ["firm_id"], unique=False)

    op.create_table(
        "ledger_postings",
        sa.Column("id", _str(40), nullable=False),
        sa.Column("cluster_id", _str(40), nullable=False),
        sa.Column("kind", _str(24), nullable=False),
        sa.Column("task_id", _str(40), nullable=True),
        sa.Column("contract_id", _str(40), nullable=True),
        sa.Column("memo", _str(500), nullable=False),
        sa.Column("created_by", _str(64), nullable=True),
        sa.Column("reference", _str(120), nullable=True),
        sa.Column("created_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("reference"),
    )
    with op.batch_alter_table("ledger_postings", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_postings_cluster_id"), ["cluster_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_ledger_postings_task_id"), ["task_id"], unique=False)

    op.create_table(
        "ledger_lines",
        sa.Column("id", _str(40), nullable=False),
        sa.Column("posting_id", _str(40), nullable=False),
        sa.Column("account_id", _str(40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("created_at", services.kit.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["ledger_accounts.id"]),
        sa.ForeignKeyConstraint(["posting_id"], ["ledger_postings.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "seq"),
    )
    with op.batch_alter_table("ledger_lines", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_lines_posting_id"), ["posting_id"], unique=False
        )

    op.create_table(
        "ledger_settlements",
        sa.Column("kind", _str(24), nullable=False),
        sa.Column("assignment_id", _str(40), nullable=False),
        sa.Column("posting_id", _str(40), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["posting_id"], ["ledger_postings.id"]),
        sa.PrimaryKeyConstraint("kind", "assignment_id"),
    )
    with op.batch_alter_table("ledger_settlements", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_settlements_posting_id"), ["posting_id"], unique=False
        )

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("escrow_outstanding", sa.BigInteger(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("review_due_at", services.kit.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("reviewed_at", services.kit.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("reviewed_by", _str(64), nullable=True))
        batch_op.add_column(sa.Column("reject_reason", _str(2000), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_assignments_review_due_at"), ["review_due_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assignments_review_due_at"))
        batch_op.drop_column("reject_reason")
        batch_op.drop_column("reviewed_by")
        batch_op.drop_column("reviewed_at")
        batch_op.drop_column("review_due_at")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("escrow_outstanding")
    op.drop_table("ledger_settlements")
    op.drop_table("ledger_lines")
    op.drop_table("ledger_postings")
    op.drop_table("ledger_accounts")
    op.drop_table("clusters")
