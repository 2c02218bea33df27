"""rewards: processed_events (the consumers' dedupe log) is RANGE-partitioned by
day of the event's own occurred_at (a new column, in the primary key: unique as
on the plain table, no trigger); days past PROCESSED_EVENTS_RETENTION_HOURS are
dropped by the partition keeper instead of rows deleted in batches
(servicekit/partition_migrations.py DedupeByEventTime; docs/operations.md
"Partitioned tables").

Revision ID: 0016_rewards_dedupe_partitions
Revises: 0015_rewards_balance_checkpoints
Create Date: 2026-12-05 00:30:00.000000
"""

from collections.abc import Sequence

from servicekit import partition_migrations as pm

revision: str = "0016_rewards_dedupe_partitions"
down_revision: str | None = "0015_rewards_balance_checkpoints"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = pm.processed_events("rewards")


def upgrade() -> None:
    TABLE.upgrade()


def downgrade() -> None:
    TABLE.downgrade()
