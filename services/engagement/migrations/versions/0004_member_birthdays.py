"""birthday month projection for the daily birthday-month entry

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 12:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "member_birthdays",
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("month", sa.Integer(), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("entered_for", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_member_birthdays")),
        schema="engagement",
    )
    op.create_index(
        "ix_member_birthdays_month_entered",
        "member_birthdays",
        ["month", "entered_for"],
        unique=False,
        schema="engagement",
    )


def downgrade() -> None:
    op.drop_index(
        "ix_member_birthdays_month_entered", table_name="member_birthdays", schema="engagement"
    )
    op.drop_table("member_birthdays", schema="engagement")
