"""guides: processed_events (the consumers' dedupe log) is RANGE-partitioned by day of
the event's own occurred_at (a new column, in the primary key: unique as on the
plain table, no trigger); days past PROCESSED_EVENTS_RETENTION_HOURS are dropped
instead of rows deleted in batches (servicekit/partition_migrations.py
DedupeByEventTime says how and what it locks; docs/operations.md "Partitioned tables").

Revision ID: 0007_guides_partitions
Revises: 0006_guides_merge_moves
Create Date: 2026-12-05 00:00:00.000000
"""

from collections.abc import Sequence

from servicekit import partition_migrations as pm

revision: str = "0007_guides_partitions"
down_revision: str | None = "0006_guides_merge_moves"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (pm.processed_events("guides"),)


def upgrade() -> None:
    for table in TABLES:
        table.upgrade()


def downgrade() -> None:
    for table in reversed(TABLES):
        table.downgrade()
