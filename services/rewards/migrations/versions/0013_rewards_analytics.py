"""rewards: indexes for the dashboards' range scans; referral_refusals (invites
refused as abuse at acceptance, for the referral dashboard)

Revision ID: 0013_rewards_analytics
Revises: 0012_rewards_durable_events
Create Date: 2026-12-04 20:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_rewards_analytics"
down_revision: str | None = "0012_rewards_durable_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "rewards"


def upgrade() -> None:
    op.create_table(
        "referral_refusals",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("invite_code", sa.Text(), nullable=False),
        sa.Column("inviter_id", sa.Uuid(), nullable=True),
        sa.Column("invitee_id", sa.Uuid(), nullable=False),
        sa.Column("refused_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_referral_refusals")),
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_referral_refusals_refused_at"), "referral_refusals", ["refused_at"], schema=SCHEMA
    )
    op.create_index(op.f("ix_orders_ordered_at"), "orders", ["ordered_at"], schema=SCHEMA)
    op.create_index(op.f("ix_coupons_issued_at"), "coupons", ["issued_at"], schema=SCHEMA)
    op.create_index(op.f("ix_coupons_redeemed_at"), "coupons", ["redeemed_at"], schema=SCHEMA)
    op.create_index(op.f("ix_points_transactions_created_at"), "points_transactions", ["created_at"], schema=SCHEMA)
    op.create_index(op.f("ix_referral_rewards_created_at"), "referral_rewards", ["created_at"], schema=SCHEMA)
    op.create_index(op.f("ix_invite_codes_created_at"), "invite_codes", ["created_at"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index(op.f("ix_invite_codes_created_at"), table_name="invite_codes", schema=SCHEMA)
    op.drop_index(op.f("ix_referral_rewards_created_at"), table_name="referral_rewards", schema=SCHEMA)
    op.drop_index(op.f("ix_points_transactions_created_at"), table_name="points_transactions", schema=SCHEMA)
    op.drop_index(op.f("ix_coupons_redeemed_at"), table_name="coupons", schema=SCHEMA)
    op.drop_index(op.f("ix_coupons_issued_at"), table_name="coupons", schema=SCHEMA)
    op.drop_index(op.f("ix_orders_ordered_at"), table_name="orders", schema=SCHEMA)
    op.drop_index(
        op.f("ix_referral_refusals_refused_at"), table_name="referral_refusals", schema=SCHEMA
    )
    op.drop_table("referral_refusals", schema=SCHEMA)
