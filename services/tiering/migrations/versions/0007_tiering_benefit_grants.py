"""tiering: tier benefit grants (upgrade gift, birthday coupon) issued through
rewards, and the member's birthday month/day (from member's BirthdaySet)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 18:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "benefit_grants",
        sa.Column("grant_key", sa.Text(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("tier_code", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("coupon_id", sa.Text(), nullable=True),
        sa.Column("failure", sa.Text(), nullable=True),
        sa.Column(
            "next_attempt_at", sa.DateTime(timezone=True), server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "kind IN ('upgrade_gift', 'birthday')", name=op.f("ck_benefit_grants_kind_known")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'issued', 'failed')",
            name=op.f("ck_benefit_grants_status_known"),
        ),
        sa.PrimaryKeyConstraint("grant_key", name=op.f("pk_benefit_grants")),
        schema="tiering",
    )
    op.create_index(
        op.f("ix_benefit_grants_pending"),
        "benefit_grants",
        ["next_attempt_at"],
        unique=False,
        schema="tiering",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.add_column(
        "member_profiles", sa.Column("birth_month", sa.SmallInteger(), nullable=True),
        schema="tiering",
    )
    op.add_column(
        "member_profiles", sa.Column("birth_day", sa.SmallInteger(), nullable=True),
        schema="tiering",
    )


def downgrade() -> None:
    op.drop_column("member_profiles", "birth_day", schema="tiering")
    op.drop_column("member_profiles", "birth_month", schema="tiering")
    op.drop_index(
        op.f("ix_benefit_grants_pending"), table_name="benefit_grants", schema="tiering"
    )
    op.drop_table("benefit_grants", schema="tiering")
