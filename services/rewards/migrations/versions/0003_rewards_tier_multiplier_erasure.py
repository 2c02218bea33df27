"""rewards: the tier multiplier from TierChanged on member_tiers; erased members

The CHECK on member_tiers.points_multiplier_bp is written by hand (Alembic
never compares CHECK constraints): keep it identical to
services/rewards/schema.py.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 11:55:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "member_tiers",
        sa.Column("points_multiplier_bp", sa.Integer(), nullable=True),
        schema="rewards",
    )
    op.create_check_constraint(
        op.f("ck_member_tiers_multiplier_positive"),
        "member_tiers",
        "points_multiplier_bp IS NULL OR points_multiplier_bp > 0",
        schema="rewards",
    )
    op.create_table(
        "erased_members",
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_erased_members")),
        schema="rewards",
    )


def downgrade() -> None:
    op.drop_table("erased_members", schema="rewards")
    op.drop_constraint(
        op.f("ck_member_tiers_multiplier_positive"), "member_tiers", schema="rewards", type_="check"
    )
    op.drop_column("member_tiers", "points_multiplier_bp", schema="rewards")
