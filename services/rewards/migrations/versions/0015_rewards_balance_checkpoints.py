"""rewards: balance checkpoints, so the ledger audit re-sums the journal from
the latest month boundary instead of the first transaction, and journal
partitions older than it can be archived (docs/operations.md "Partitioned
tables").

- points_checkpoints: one row per month boundary (`as_of`) checkpointed;
- points_checkpoint_balances: each member's journal figures at `as_of` (the
  sums of the entries of every transaction written before it), omitted when
  all zero;
- points_checkpoint_lots: each lot's opening value at `as_of` (its points if
  it was created before, plus its movements before), omitted when zero;
- points_journal_archive: the journal partitions detached, so a refund of an
  order whose journal rows went with them is refused by name.

All four are append-only (the journal's trigger). New tables only: no lock on
existing ones.

Revision ID: 0015_rewards_balance_checkpoints
Revises: 0014_rewards_analytics
Create Date: 2026-12-04 23:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015_rewards_balance_checkpoints"
down_revision: str | None = "0014_rewards_analytics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "points_checkpoints",
    "points_checkpoint_balances",
    "points_checkpoint_lots",
    "points_journal_archive",
)


def upgrade() -> None:
    op.execute(
        "CREATE TABLE rewards.points_checkpoints ("
        " as_of timestamptz NOT NULL CONSTRAINT pk_points_checkpoints PRIMARY KEY,"
        " previous timestamptz,"
        " members bigint NOT NULL, lots bigint NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        " CONSTRAINT ck_points_checkpoints_month_boundary"
        " CHECK (as_of = date_trunc('month', as_of AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'),"
        " CONSTRAINT ck_points_checkpoints_after_previous"
        " CHECK (previous IS NULL OR previous < as_of))"
    )
    op.execute(
        "CREATE TABLE rewards.points_checkpoint_balances ("
        " as_of timestamptz NOT NULL CONSTRAINT fk_points_checkpoint_balances_as_of_points_checkpoints"
        " REFERENCES rewards.points_checkpoints (as_of),"
        " member_id uuid NOT NULL,"
        " available bigint NOT NULL, pending bigint NOT NULL, held bigint NOT NULL,"
        " debt bigint NOT NULL, lifetime_earned bigint NOT NULL,"
        " CONSTRAINT pk_points_checkpoint_balances PRIMARY KEY (as_of, member_id))"
    )
    op.execute(
        "CREATE TABLE rewards.points_checkpoint_lots ("
        " as_of timestamptz NOT NULL CONSTRAINT fk_points_checkpoint_lots_as_of_points_checkpoints"
        " REFERENCES rewards.points_checkpoints (as_of),"
        " lot_id uuid NOT NULL, opening bigint NOT NULL,"
        " CONSTRAINT pk_points_checkpoint_lots PRIMARY KEY (as_of, lot_id))"
    )
    op.execute(
        "CREATE TABLE rewards.points_journal_archive ("
        " partition text NOT NULL CONSTRAINT pk_points_journal_archive PRIMARY KEY,"
        " lower timestamptz NOT NULL, upper timestamptz NOT NULL,"
        " archived_at timestamptz NOT NULL DEFAULT now(),"
        " CONSTRAINT ck_points_journal_archive_range CHECK (lower < upper))"
    )
    op.execute("CREATE INDEX ix_points_journal_archive_upper ON rewards.points_journal_archive (upper)")
    for table in TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON rewards.{table}"
            " FOR EACH ROW EXECUTE FUNCTION rewards.forbid_journal_change()"
        )


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP TABLE rewards.{table}")
