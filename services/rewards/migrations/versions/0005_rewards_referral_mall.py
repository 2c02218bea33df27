"""rewards: referral (invite codes, referrals, rewards per step, abuse
fingerprints, per-inviter counters) and the points mall (items, per-member
counts, exchanges)

Revision ID: 0005_rewards_referral_mall
Revises: 0004_rewards_coupons
Create Date: 2026-11-25 12:24:11.577435
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_rewards_referral_mall"
down_revision: str | None = "0004_rewards_coupons"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "invite_codes",
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_invite_codes")),
        sa.UniqueConstraint("code", name=op.f("uq_invite_codes_code")),
        schema="rewards",
    )
    op.create_table(
        "mall_items",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("coupon_template_id", sa.Text(), nullable=True),
        sa.Column("sku", sa.Text(), nullable=True),
        sa.Column("points_price", sa.BigInteger(), nullable=False),
        sa.Column("cash_fen", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("stock_total", sa.BigInteger(), nullable=False),
        sa.Column("stock_remaining", sa.BigInteger(), nullable=False),
        sa.Column("per_member_limit", sa.Integer(), server_default="0", nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.Text(), server_default="draft", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.CheckConstraint("kind IN ('coupon', 'goods')", name=op.f("ck_mall_items_kind_known")),
        sa.CheckConstraint(
            "status IN ('draft', 'active', 'paused', 'ended')",
            name=op.f("ck_mall_items_status_known"),
        ),
        sa.CheckConstraint(
            "points_price > 0 AND cash_fen >= 0", name=op.f("ck_mall_items_price_positive")
        ),
        sa.CheckConstraint(
            "stock_remaining BETWEEN 0 AND stock_total", name=op.f("ck_mall_items_stock_in_range")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mall_items")),
        sa.UniqueConstraint("seq", name=op.f("uq_mall_items_seq")),
        schema="rewards",
    )
    op.create_table(
        "referral_counters",
        sa.Column("inviter_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rewarded", sa.Integer(), nullable=False),
        sa.CheckConstraint("rewarded >= 0", name=op.f("ck_referral_counters_rewarded_nonnegative")),
        sa.PrimaryKeyConstraint("inviter_id", "period_start", name=op.f("pk_referral_counters")),
        schema="rewards",
    )
    op.create_table(
        "referral_fingerprints",
        sa.Column("fingerprint", sa.LargeBinary(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "role IN ('inviter', 'invitee')", name=op.f("ck_referral_fingerprints_role_known")
        ),
        sa.PrimaryKeyConstraint(
            "fingerprint", "member_id", "role", name=op.f("pk_referral_fingerprints")
        ),
        schema="rewards",
    )
    op.create_table(
        "referrals",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("inviter_id", sa.Uuid(), nullable=False),
        sa.Column("invitee_id", sa.Uuid(), nullable=False),
        sa.Column("invite_code", sa.Text(), nullable=False),
        sa.Column("invitee_registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_order_id", sa.Uuid(), nullable=True),
        sa.Column("first_order_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.CheckConstraint("inviter_id <> invitee_id", name=op.f("ck_referrals_not_self")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_referrals")),
        sa.UniqueConstraint("invitee_id", name=op.f("uq_referrals_invitee_id")),
        sa.UniqueConstraint("seq", name=op.f("uq_referrals_seq")),
        schema="rewards",
    )
    op.create_index(
        op.f("ix_referrals_accepted_at"),
        "referrals",
        ["accepted_at"],
        unique=False,
        schema="rewards",
    )
    op.create_index(
        op.f("ix_referrals_inviter_id_seq"),
        "referrals",
        ["inviter_id", "seq"],
        unique=False,
        schema="rewards",
    )
    op.create_table(
        "mall_exchanges",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("exchange_key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(), nullable=False),
        sa.Column("item_id", sa.Uuid(), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("cash_fen", sa.BigInteger(), nullable=False),
        sa.Column("points_transaction_id", sa.Uuid(), nullable=False),
        sa.Column("coupon_id", sa.Text(), nullable=True),
        sa.Column("sku", sa.Text(), nullable=True),
        sa.Column("fulfilment", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.CheckConstraint(
            "fulfilment IN ('issued', 'pending', 'shipped')",
            name=op.f("ck_mall_exchanges_fulfilment_known"),
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["rewards.mall_items.id"],
            name=op.f("fk_mall_exchanges_item_id_mall_items"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mall_exchanges")),
        sa.UniqueConstraint(
            "member_id", "exchange_key", name=op.f("uq_mall_exchanges_member_id_exchange_key")
        ),
        sa.UniqueConstraint("seq", name=op.f("uq_mall_exchanges_seq")),
        schema="rewards",
    )
    op.create_index(
        op.f("ix_mall_exchanges_member_id_seq"),
        "mall_exchanges",
        ["member_id", "seq"],
        unique=False,
        schema="rewards",
    )
    op.create_table(
        "mall_member_counts",
        sa.Column("item_id", sa.Uuid(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("exchanged", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "exchanged >= 0", name=op.f("ck_mall_member_counts_exchanged_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["rewards.mall_items.id"],
            name=op.f("fk_mall_member_counts_item_id_mall_items"),
        ),
        sa.PrimaryKeyConstraint("item_id", "member_id", name=op.f("pk_mall_member_counts")),
        schema="rewards",
    )
    op.create_table(
        "referral_rewards",
        sa.Column("referral_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("coupon_id", sa.Text(), nullable=True),
        sa.Column("points", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("points_transaction_id", sa.Text(), nullable=True),
        sa.Column(
            "refusals", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "role IN ('inviter', 'invitee')", name=op.f("ck_referral_rewards_role_known")
        ),
        sa.CheckConstraint(
            "status IN ('granted', 'partial', 'refused')",
            name=op.f("ck_referral_rewards_status_known"),
        ),
        sa.CheckConstraint(
            "step IN ('registration', 'first_order')", name=op.f("ck_referral_rewards_step_known")
        ),
        sa.ForeignKeyConstraint(
            ["referral_id"],
            ["rewards.referrals.id"],
            name=op.f("fk_referral_rewards_referral_id_referrals"),
        ),
        sa.PrimaryKeyConstraint("referral_id", "step", "role", name=op.f("pk_referral_rewards")),
        schema="rewards",
    )


def downgrade() -> None:
    op.drop_table("referral_rewards", schema="rewards")
    op.drop_table("mall_member_counts", schema="rewards")
    op.drop_index(
        op.f("ix_mall_exchanges_member_id_seq"), table_name="mall_exchanges", schema="rewards"
    )
    op.drop_table("mall_exchanges", schema="rewards")
    op.drop_index(op.f("ix_referrals_inviter_id_seq"), table_name="referrals", schema="rewards")
    op.drop_index(op.f("ix_referrals_accepted_at"), table_name="referrals", schema="rewards")
    op.drop_table("referrals", schema="rewards")
    op.drop_table("referral_fingerprints", schema="rewards")
    op.drop_table("referral_counters", schema="rewards")
    op.drop_table("mall_items", schema="rewards")
    op.drop_table("invite_codes", schema="rewards")
