"""rewards: member_merges, the OneID merges in force, through which referral
and mall reads resolve a member

The CHECK constraint is written by hand (Alembic never compares CHECK
constraints): keep it identical to services/rewards/schema.py.

Revision ID: 0006_rewards_member_merges
Revises: 0005_rewards_referral_mall
Create Date: 2026-11-25 15:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_rewards_member_merges"
down_revision: str | None = "0005_rewards_referral_mall"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "member_merges",
        sa.Column("merge_id", sa.Text(), nullable=False),
        sa.Column("absorbed_id", sa.Uuid(), nullable=False),
        sa.Column("survivor_id", sa.Uuid(), nullable=False),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unmerged_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("absorbed_id <> survivor_id", name=op.f("ck_member_merges_not_self")),
        sa.PrimaryKeyConstraint("merge_id", name=op.f("pk_member_merges")),
        schema="rewards",
    )
    op.create_index(
        op.f("ix_member_merges_absorbed_id_merged_at"),
        "member_merges",
        ["absorbed_id", "merged_at"],
        unique=False,
        schema="rewards",
    )
    op.create_index(
        op.f("ix_member_merges_survivor_id_merged_at"),
        "member_merges",
        ["survivor_id", "merged_at"],
        unique=False,
        schema="rewards",
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_member_merges_survivor_id_merged_at"), table_name="member_merges", schema="rewards"
    )
    op.drop_index(
        op.f("ix_member_merges_absorbed_id_merged_at"), table_name="member_merges", schema="rewards"
    )
    op.drop_table("member_merges", schema="rewards")
