"""The tiering tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables").

processed_events (the consumer's dedupe log), by month of processed_at, partitions
dropped past PROCESSED_EVENTS_RETENTION_HOURS (migration 0010).

Not partitioned, and why: member_spend, member_profiles, member_tiers and the
segment/lifecycle tables hold one row per member (they grow with members, not
with traffic); recompute runs and their work rows are per batch run and small;
benefit grants are per member and tier change, kept for the member's history.
"""

from __future__ import annotations

from datetime import timedelta

from servicekit.partitions import PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    return [processed_events(SCHEMA, timedelta(hours=settings.processed_events_retention_hours))]
