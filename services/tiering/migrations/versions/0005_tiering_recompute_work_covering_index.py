"""tiering: the batch's aggregate reads a covering index; its work table is shared, unlogged

- ix_orders_member_time_amounts = ix_orders_member_time (member_id, ordered_at)
  with paid_fen and refunded_fen carried in the leaf: a chunk's GROUP BY over
  its member range is an index-only scan in member order (measured ~5x faster
  than hashing a scan of the table). It serves every query the old index did,
  which is dropped (same number of indexes to maintain per order).
  On a large live table, build it first without blocking writes:
  `CREATE INDEX CONCURRENTLY ix_orders_member_time_amounts ON tiering.orders
  (member_id, ordered_at) INCLUDE (paid_fen, refunded_fen)`; this migration
  then finds it and only drops the old one.
- recompute_work: per-member aggregates of the running recompute, read by all of
  its worker connections (a temporary table is visible to one session only).
  UNLOGGED: no WAL, emptied after a crash, which is fine for a scratch table
  emptied at the start and end of every run.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 15:20:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_orders_member_time_amounts ON tiering.orders"
        " (member_id, ordered_at) INCLUDE (paid_fen, refunded_fen)"
    )
    op.execute("DROP INDEX IF EXISTS tiering.ix_orders_member_time")
    op.execute(
        "CREATE UNLOGGED TABLE tiering.recompute_work ("
        " member_id uuid NOT NULL,"
        " metric bigint NOT NULL DEFAULT 0,"
        " last_at timestamp with time zone,"
        " orders bigint NOT NULL DEFAULT 0,"
        " spend bigint,"
        " CONSTRAINT pk_recompute_work PRIMARY KEY (member_id))"
    )


def downgrade() -> None:
    op.execute("DROP TABLE tiering.recompute_work")
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_orders_member_time ON tiering.orders (member_id, ordered_at)"
    )
    op.execute("DROP INDEX IF EXISTS tiering.ix_orders_member_time_amounts")
