"""rewards: rewards.coupon_issue_refused(text), a function that raises.

The single coupon issue runs as one statement outside any transaction
(coupons/repository.py, ONE_STATEMENT_ISSUE_SQL): its guards (the member's
count, the day's count, a stock shard) are conditional writes in one
statement, and when one of them does not pass, the statement must undo the
others. Calling this function then raises (SQLSTATE P0001, hint
`coupon_issue_refused`), which rolls the whole statement back; the caller
takes the transactional path, which names the refusal.

Revision ID: 0021_rewards_issue_refusal
Revises: 0020_rewards_lot_partitions
Create Date: 2026-12-05 21:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0021_rewards_issue_refusal"
down_revision: str | None = "0020_rewards_lot_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "CREATE FUNCTION rewards.coupon_issue_refused(guard text) RETURNS boolean"
        " LANGUAGE plpgsql VOLATILE AS $$"
        " BEGIN"
        "  RAISE EXCEPTION 'coupon issue refused by its % guard', guard"
        "   USING ERRCODE = 'P0001', HINT = 'coupon_issue_refused';"
        " END $$"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION rewards.coupon_issue_refused(text)")
