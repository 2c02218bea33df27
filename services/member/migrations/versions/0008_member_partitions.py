"""member: processed_events (the consumers' dedupe log) is RANGE-partitioned by
day of the event's own occurred_at (a new column, in the primary key: unique as
on the plain table, no trigger); days past PROCESSED_EVENTS_RETENTION_HOURS are
dropped instead of rows deleted in batches. identify_requests (IdentifyMember's
request-key replay) is partitioned by month of created_at, request_key unique
across partitions by the first_only trigger (a request's retries carry no time
of their own), months past IDENTIFY_REQUEST_RETENTION_DAYS dropped
(servicekit/partition_migrations.py; docs/operations.md "Partitioned tables").

Revision ID: 0008_member_partitions
Revises: 0007_member_analytics
Create Date: 2026-12-05 00:00:00.000000
"""

from collections.abc import Sequence

from servicekit import partition_migrations as pm

revision: str = "0008_member_partitions"
down_revision: str | None = "0007_member_analytics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    pm.processed_events("member"),
    pm.MonthlyConversion(
        "member",
        "identify_requests",
        "created_at",
        ("request_key",),
        plain_only_indexes=(("ix_identify_requests_created_at", "created_at"),),
    ),
)


def upgrade() -> None:
    for table in TABLES:
        table.upgrade()


def downgrade() -> None:
    for table in reversed(TABLES):
        table.downgrade()
