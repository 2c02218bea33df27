"""The member tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables"), both by month, migration 0008:

- processed_events (the consumers' dedupe log), by processed_at; partitions
  dropped past PROCESSED_EVENTS_RETENTION_HOURS;
- identify_requests (IdentifyMember's request-key replay), by created_at;
  partitions dropped past IDENTIFY_REQUEST_RETENTION_DAYS. A request key stays
  unique across partitions by the first_only trigger
  (servicekit/partition_migrations.py).

Not partitioned, and why: pii_access_log and consent_records are audit
evidence kept for the member's life (erasure deletes by member, not by age);
profile_observations, identities, identifier_links, merges and the review and
velocity tables grow with members and merges, not with calls.
"""

from __future__ import annotations

from datetime import timedelta

from servicekit.partitions import PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA
from .settings import member_settings


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    s = member_settings(settings)
    return [
        processed_events(SCHEMA, timedelta(hours=s.processed_events_retention_hours)),
        PartitionedTable(
            SCHEMA,
            "identify_requests",
            "created_at",
            drop_after=timedelta(days=s.identify_request_retention_days),
        ),
    ]
