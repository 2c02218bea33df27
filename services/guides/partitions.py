"""The guides tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables").

processed_events (the consumers' dedupe log), by month of processed_at, partitions
dropped past PROCESSED_EVENTS_RETENTION_HOURS (migration 0007).

Not partitioned, and why: callback_signatures is pruned daily (a day kept);
funnel, audit and tag_pushes grow per guide action but have no retention
defined, and orders/refunds are read by member at any age; contacts,
bindings and tasks grow with members and staff.
"""

from __future__ import annotations

from datetime import timedelta

from servicekit.partitions import PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    return [processed_events(SCHEMA, timedelta(hours=settings.processed_events_retention_hours))]
