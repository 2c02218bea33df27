"""rewards: the journal's balance enforced by the database; a refund of an
order nothing was paid on; points a refund claims back from open holds

- A deferred constraint trigger on points_entries checks, at commit, that the
  entries of every transaction touched sum to zero (the Python check and the
  audit stay as further lines; `python -O` removes neither this).
- refunds.refunded_amount_fen may be 0 (an order paid entirely with coupons or
  points is refunded in full with amount 0; the handler allows 0 only then).
- points_lots.clawback: points a refund could not take from the lot because an
  open hold had them; a void of that hold reverses them instead of giving them
  back, a post settles the claim (the refund's debt or shortfall stands).

Revision ID: 0009_rewards_money_corners
Revises: 0008_rewards_event_pruning
Create Date: 2026-12-04 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_rewards_money_corners"
down_revision: str | None = "0008_rewards_event_pruning"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BALANCED = """
CREATE FUNCTION rewards.check_transaction_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total numeric;
BEGIN
    SELECT sum(amount) INTO total FROM rewards.points_entries
    WHERE transaction_id = NEW.transaction_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'points transaction % does not balance: its entries sum to %',
            NEW.transaction_id, total
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'points_entries_balanced';
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.execute(BALANCED)
    # Deferred to commit, so a transaction's entries may be written by several
    # statements; checked once per entry row (a few index lookups per posting).
    op.execute(
        "CREATE CONSTRAINT TRIGGER points_entries_balanced AFTER INSERT"
        " ON rewards.points_entries DEFERRABLE INITIALLY DEFERRED"
        " FOR EACH ROW EXECUTE FUNCTION rewards.check_transaction_balanced()"
    )
    op.drop_constraint("ck_refunds_refunded_amount_positive", "refunds", schema="rewards")
    op.create_check_constraint(
        op.f("ck_refunds_refunded_amount_nonnegative"),
        "refunds",
        "refunded_amount_fen >= 0",
        schema="rewards",
    )
    op.add_column(
        "points_lots",
        sa.Column("clawback", sa.BigInteger(), server_default="0", nullable=False),
        schema="rewards",
    )
    op.create_check_constraint(
        op.f("ck_points_lots_clawback_nonnegative"),
        "points_lots",
        "clawback >= 0",
        schema="rewards",
    )


def downgrade() -> None:
    op.drop_constraint("ck_points_lots_clawback_nonnegative", "points_lots", schema="rewards")
    op.drop_column("points_lots", "clawback", schema="rewards")
    op.drop_constraint("ck_refunds_refunded_amount_nonnegative", "refunds", schema="rewards")
    op.create_check_constraint(
        op.f("ck_refunds_refunded_amount_positive"),
        "refunds",
        "refunded_amount_fen > 0",
        schema="rewards",
    )
    op.execute("DROP TRIGGER IF EXISTS points_entries_balanced ON rewards.points_entries")
    op.execute("DROP FUNCTION IF EXISTS rewards.check_transaction_balanced()")
