"""tiering: the orders projection (one row per order the tier metric counts) is
RANGE-partitioned by month of ordered_at (the order's own time: a late
offline upload lands in its month); the order id's global uniqueness (an
order counted once, whichever month a replay with a corrected time would
pick) moves to order_keys, a narrow unpartitioned table (order_id,
ordered_at) the BEFORE INSERT trigger claim_order_keys writes in the same
statement: a key already there skips the row, like the ON CONFLICT DO NOTHING
the consumer writes with. order_keys also routes a refund (by order id) to
the order's one partition (docs/operations.md "Partitioned tables";
servicekit/partition_migrations.py MonthlyConversion).

Existing rows are moved in this migration's transaction, set-based (ACCESS
EXCLUSIVE on orders throughout: the order consumer and the recompute wait).

Revision ID: 0011_tiering_orders_partitions
Revises: 0010_tiering_partitions
Create Date: 2026-12-05 04:00:00.000000
"""

from collections.abc import Sequence

from servicekit.partition_migrations import MonthlyConversion

revision: str = "0011_tiering_orders_partitions"
down_revision: str | None = "0010_tiering_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORDERS = MonthlyConversion(
    "tiering",
    "orders",
    "ordered_at",
    key=("order_id",),
    indexes_sql=(
        # Covering: the recompute's per-range GROUP BY is an index-only scan.
        (
            "ix_orders_member_time_amounts",
            "(member_id, ordered_at) INCLUDE (paid_fen, refunded_fen)",
        ),
    ),
    key_table="order_keys",
)


def upgrade() -> None:
    ORDERS.upgrade()


def downgrade() -> None:
    ORDERS.downgrade()
