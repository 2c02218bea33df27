"""console schema: the audit of operator account changes

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 03:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "operator_audit",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("detail", postgresql.JSONB(), server_default="{}", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_audit")),
        schema="console",
    )
    op.create_index(
        "ix_operator_audit_username_at",
        "operator_audit",
        ["username", "at"],
        unique=False,
        schema="console",
    )


def downgrade() -> None:
    op.drop_index("ix_operator_audit_username_at", table_name="operator_audit", schema="console")
    op.drop_table("operator_audit", schema="console")
