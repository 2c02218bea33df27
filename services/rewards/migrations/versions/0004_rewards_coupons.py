"""rewards coupons: versioned templates, sharded stock, per-member and per-day
counters, issued coupons; the coupon discount of an order

The foundation's coupon_templates placeholder is extended in place (the demo
rows keep their ids; their terms are re-seeded by seed.py). CHECK constraints
are written by hand (Alembic never compares them): keep them identical to
services/rewards/schema.py.

Revision ID: 0004_rewards_coupons
Revises: 0003
Create Date: 2026-11-25 12:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_rewards_coupons"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = "rewards"


def _check(table: str, name: str, expr: str) -> None:
    op.create_check_constraint(op.f(f"ck_{table}_{name}"), table, expr, schema=S)


def upgrade() -> None:
    # Placeholder columns and states of the foundation give way to versioned terms.
    op.drop_constraint(
        op.f("ck_coupon_templates_valid_days_positive"), "coupon_templates", schema=S, type_="check"
    )
    op.drop_constraint(
        op.f("ck_coupon_templates_status_known"), "coupon_templates", schema=S, type_="check"
    )
    op.execute("UPDATE rewards.coupon_templates SET status = 'ended' WHERE status = 'retired'")
    op.drop_column("coupon_templates", "valid_days", schema=S)
    _check("coupon_templates", "status_known", "status IN ('draft', 'active', 'paused', 'ended')")
    op.add_column(
        "coupon_templates",
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        schema=S,
    )
    op.add_column("coupon_templates", sa.Column("per_member_limit", sa.BigInteger()), schema=S)
    op.add_column("coupon_templates", sa.Column("daily_budget", sa.BigInteger()), schema=S)
    op.add_column(
        "coupon_templates",
        sa.Column("stock_shards", sa.Integer(), server_default="1", nullable=False),
        schema=S,
    )
    op.add_column(
        "coupon_templates",
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        schema=S,
    )
    _check("coupon_templates", "limit_positive", "per_member_limit IS NULL OR per_member_limit > 0")
    _check("coupon_templates", "budget_positive", "daily_budget IS NULL OR daily_budget > 0")
    _check("coupon_templates", "shards_range", "stock_shards BETWEEN 1 AND 64")

    op.create_table(
        "coupon_template_versions",
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("terms", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_by", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["rewards.coupon_templates.template_id"],
            name=op.f("fk_coupon_template_versions_template_id_coupon_templates"),
        ),
        sa.PrimaryKeyConstraint("template_id", "version", name=op.f("pk_coupon_template_versions")),
        schema=S,
    )
    op.create_table(
        "coupon_stock",
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("remaining >= 0", name=op.f("ck_coupon_stock_remaining_nonnegative")),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["rewards.coupon_templates.template_id"],
            name=op.f("fk_coupon_stock_template_id_coupon_templates"),
        ),
        sa.PrimaryKeyConstraint("template_id", "shard", name=op.f("pk_coupon_stock")),
        schema=S,
    )
    op.create_table(
        "coupon_member_counts",
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("issued", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("issued >= 0", name=op.f("ck_coupon_member_counts_issued_nonnegative")),
        sa.PrimaryKeyConstraint("template_id", "member_id", name=op.f("pk_coupon_member_counts")),
        schema=S,
    )
    op.create_table(
        "coupon_daily_counts",
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("issued", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("issued >= 0", name=op.f("ck_coupon_daily_counts_issued_nonnegative")),
        sa.PrimaryKeyConstraint("template_id", "day", name=op.f("pk_coupon_daily_counts")),
        schema=S,
    )
    op.create_table(
        "coupons",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("template_version", sa.Integer(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("issued_by", sa.Text(), server_default="", nullable=False),
        sa.Column("issue_key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.Text(), server_default="available", nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lock_store_id", sa.Text()),
        sa.Column("lock_pos_transaction_id", sa.Text()),
        sa.Column("locked_until", sa.DateTime(timezone=True)),
        sa.Column("order_id", sa.Uuid()),
        sa.Column("redeemed_at", sa.DateTime(timezone=True)),
        sa.Column("discount_fen", sa.BigInteger()),
        sa.Column("issued_to", sa.Uuid(), nullable=False),
        sa.Column("merge_id", sa.Text()),
        sa.Column("expiry_notified_at", sa.DateTime(timezone=True)),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.CheckConstraint(
            "status IN ('available', 'locked', 'used', 'expired')",
            name=op.f("ck_coupons_status_known"),
        ),
        sa.CheckConstraint(
            "(status = 'locked') = (locked_until IS NOT NULL)",
            name=op.f("ck_coupons_locked_has_deadline"),
        ),
        sa.CheckConstraint(
            "status <> 'used' OR (order_id IS NOT NULL AND discount_fen >= 0)",
            name=op.f("ck_coupons_used_has_order"),
        ),
        sa.CheckConstraint("expires_at > valid_from", name=op.f("ck_coupons_validity_window")),
        sa.CheckConstraint(
            "octet_length(request_hash) = 32", name=op.f("ck_coupons_request_hash_sha256")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["rewards.orders.id"], name=op.f("fk_coupons_order_id_orders")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_coupons")),
        sa.UniqueConstraint("code", name=op.f("uq_coupons_code")),
        sa.UniqueConstraint("issue_key", name=op.f("uq_coupons_issue_key")),
        sa.UniqueConstraint("seq", name=op.f("uq_coupons_seq")),
        schema=S,
    )
    op.create_index(
        op.f("ix_coupons_member_id_status_expires_at"),
        "coupons",
        ["member_id", "status", "expires_at"],
        schema=S,
    )
    op.create_index(
        op.f("ix_coupons_status_expires_at"), "coupons", ["status", "expires_at"], schema=S
    )
    op.create_index(
        op.f("ix_coupons_template_id_status"), "coupons", ["template_id", "status"], schema=S
    )
    op.create_index(op.f("ix_coupons_order_id"), "coupons", ["order_id"], schema=S)

    op.add_column(
        "orders",
        sa.Column("coupon_discount_fen", sa.BigInteger(), server_default="0", nullable=False),
        schema=S,
    )
    _check("orders", "coupon_discount_nonnegative", "coupon_discount_fen >= 0")


def downgrade() -> None:
    op.drop_constraint(
        op.f("ck_orders_coupon_discount_nonnegative"), "orders", schema=S, type_="check"
    )
    op.drop_column("orders", "coupon_discount_fen", schema=S)
    for table in (
        "coupons",
        "coupon_daily_counts",
        "coupon_member_counts",
        "coupon_stock",
        "coupon_template_versions",
    ):
        op.drop_table(table, schema=S)
    for name in ("shards_range", "budget_positive", "limit_positive", "status_known"):
        op.drop_constraint(
            op.f(f"ck_coupon_templates_{name}"), "coupon_templates", schema=S, type_="check"
        )
    for column in ("updated_at", "stock_shards", "daily_budget", "per_member_limit", "version"):
        op.drop_column("coupon_templates", column, schema=S)
    op.execute("UPDATE rewards.coupon_templates SET status = 'retired' WHERE status = 'ended'")
    op.add_column("coupon_templates", sa.Column("valid_days", sa.Integer()), schema=S)
    _check("coupon_templates", "valid_days_positive", "valid_days IS NULL OR valid_days > 0")
    _check("coupon_templates", "status_known", "status IN ('draft', 'active', 'paused', 'retired')")
