"""rewards: points-plus-cash mall exchanges in two steps (reserve, then confirm
with the payment reference; a time-out releases), operator reversal of an
exchange, and revoked coupons

- mall_exchanges: hold_id (the points held while payment is pending),
  payment_due_at, payment_reference (unique), paid_at, released_at,
  counted_member_id (whose per-member count the exchange took), reversal
  (reversed_at, reversed_by, reversal_reason, reversal_transaction_id);
  fulfilment gains 'awaiting_payment', 'released' and 'reversed'.
- coupons.status gains 'revoked' (an operator took an issued coupon back),
  with revoked_at, revoked_by and revoke_reason.

Revision ID: 0010_rewards_mall_payment
Revises: 0009_rewards_money_corners
Create Date: 2026-12-04 17:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_rewards_mall_payment"
down_revision: str | None = "0009_rewards_money_corners"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = "rewards"
FULFILMENTS_BEFORE = "('issued', 'pending', 'shipped')"
FULFILMENTS = "('issued', 'pending', 'shipped', 'awaiting_payment', 'released', 'reversed')"
COUPONS_BEFORE = "('available', 'locked', 'used', 'expired')"
COUPONS = "('available', 'locked', 'used', 'expired', 'revoked')"

SHIPPED = (
    "(fulfilment = 'shipped') = (shipped_at IS NOT NULL AND carrier IS NOT NULL"
    " AND tracking_number IS NOT NULL)"
)

COLUMNS = (
    sa.Column("hold_id", sa.Uuid(), nullable=True),
    sa.Column("payment_due_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("payment_reference", sa.Text(), nullable=True),
    sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("counted_member_id", sa.Uuid(), nullable=True),
    sa.Column("reversed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("reversed_by", sa.Text(), nullable=True),
    sa.Column("reversal_reason", sa.Text(), nullable=True),
    sa.Column("reversal_transaction_id", sa.Uuid(), nullable=True),
)

COUPON_COLUMNS = (
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("revoked_by", sa.Text(), nullable=True),
    sa.Column("revoke_reason", sa.Text(), nullable=True),
)


def _recheck(table: str, name: str, condition: str) -> None:
    op.drop_constraint(op.f(f"ck_{table}_{name}"), table, schema=S, type_="check")
    op.create_check_constraint(op.f(f"ck_{table}_{name}"), table, condition, schema=S)


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("mall_exchanges", column, schema=S)
    op.create_index(
        op.f("ix_mall_exchanges_payment_reference"),
        "mall_exchanges",
        ["payment_reference"],
        unique=True,
        schema=S,
    )
    # The release job's queue: awaiting payment, by deadline.
    op.create_index(
        op.f("ix_mall_exchanges_fulfilment_payment_due_at"),
        "mall_exchanges",
        ["fulfilment", "payment_due_at"],
        unique=False,
        schema=S,
    )
    _recheck("mall_exchanges", "fulfilment_known", f"fulfilment IN {FULFILMENTS}")
    # A reversed exchange keeps the shipment it may have had.
    _recheck("mall_exchanges", "shipped_has_shipment", f"fulfilment = 'reversed' OR {SHIPPED}")
    _recheck("coupons", "status_known", f"status IN {COUPONS}")
    for coupon_column in COUPON_COLUMNS:
        op.add_column("coupons", coupon_column, schema=S)


def downgrade() -> None:
    for name in ("revoke_reason", "revoked_by", "revoked_at"):
        op.drop_column("coupons", name, schema=S)
    _recheck("coupons", "status_known", f"status IN {COUPONS_BEFORE}")
    _recheck("mall_exchanges", "shipped_has_shipment", SHIPPED)
    _recheck("mall_exchanges", "fulfilment_known", f"fulfilment IN {FULFILMENTS_BEFORE}")
    op.drop_index(
        op.f("ix_mall_exchanges_fulfilment_payment_due_at"),
        table_name="mall_exchanges",
        schema=S,
    )
    op.drop_index(
        op.f("ix_mall_exchanges_payment_reference"), table_name="mall_exchanges", schema=S
    )
    for name in reversed([c.name for c in COLUMNS]):
        op.drop_column("mall_exchanges", name, schema=S)
