"""The rewards tables partitioned by time, and what may be detached from them
(servicekit/partitions.py does the work; docs/operations.md "Partitioned tables").

The points journal (`points_transactions`, by month of `created_at`) is never
detached: the ledger audit (points/audit.py) re-derives every balance from the
whole journal (invariant 3 sums every entry since the first transaction), checks
every transaction balances (1) and every settled order against its earn (6), so
every partition of the journal, the default included, is one it needs.
"""

from __future__ import annotations

from datetime import timedelta

from servicekit.partitions import PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA

JOURNAL = PartitionedTable(
    SCHEMA,
    "points_transactions",
    "created_at",
    never_detach=(
        "the ledger audit re-derives every balance from the whole journal"
        " (python -m services.rewards audit): archiving it needs a balance checkpoint first"
    ),
)

# The consumers' dedupe log, by day of the event's time (migration 0017); days
# past PROCESSED_EVENTS_RETENTION_HOURS are dropped.
DEDUPE = processed_events(
    SCHEMA, timedelta(hours=ServiceSettings().processed_events_retention_hours)
)

PARTITIONED_TABLES = (JOURNAL, DEDUPE)
# Months of partitions made ahead at start-up and by the CronJob.
DEFAULT_AHEAD_MONTHS = 3
