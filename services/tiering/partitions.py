"""The tiering tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables").

processed_events (the consumer's dedupe log), by month of processed_at, partitions
dropped past PROCESSED_EVENTS_RETENTION_HOURS (migration 0010).

Not partitioned, and why: orders and growth_ledger grow per order, but are
updated in place (refunds; merges move and erasure clears member_id) and
keyed by order id and (kind, ref) without time, and the recompute reads each
member's whole window: they need a decided retention (how far back a tier
looks) before partitioning pays. member_spend, member_profiles and
member_tiers hold one row per member; tier_history, stage_transitions and
benefit_grants grow per tier change, not per event; recompute work is per run.
"""

from __future__ import annotations

from datetime import timedelta

from servicekit.partitions import PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    return [processed_events(SCHEMA, timedelta(hours=settings.processed_events_retention_hours))]
