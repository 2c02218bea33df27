"""The engagement tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables").

processed_events (the consumers' dedupe log), by month of processed_at, partitions
dropped past PROCESSED_EVENTS_RETENTION_HOURS (migration 0012).

Not partitioned, and why: sends have no retention defined (dashboards,
unknown sends and receipts read them at any age) and their hot writes
(dispatch, receipts, credit epochs, merges) update by send_key or member_id,
which carry no time: partitioned without a drop, each would probe one more
partition every month. Decide how long sends are kept first; the same
conversion (servicekit/partition_migrations.py, key send_key, column
created_at) then applies. cap_usage, enrollments and timers are per member
(and day) and bounded by the journeys; parked_events expire after
ENGAGEMENT_PARKED_TTL_DAYS.
"""

from __future__ import annotations

from datetime import timedelta

from servicekit.partitions import PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    return [processed_events(SCHEMA, timedelta(hours=settings.processed_events_retention_hours))]
