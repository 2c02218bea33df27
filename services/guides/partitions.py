"""The guides tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables").

processed_events (the consumers' dedupe log), by month of processed_at, partitions
dropped past PROCESSED_EVENTS_RETENTION_HOURS (migration 0007).

NOT_PARTITIONED
"""

from __future__ import annotations

from datetime import timedelta

from servicekit.partitions import PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    return [processed_events(SCHEMA, timedelta(hours=settings.processed_events_retention_hours))]
