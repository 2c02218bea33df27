"""The engagement tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables").

- processed_events (the consumers' dedupe log), by day of the event's own
  occurred_at, days dropped past PROCESSED_EVENTS_RETENTION_HOURS (migration 0012);
- sends (one row per message a journey step writes), by month of created_at
  (migration 0013). A send key stays unique across partitions through
  send_keys (written by the claim_send_keys trigger in the insert's
  statement), which also routes the writes by key (outcomes, SMS receipts,
  credit epochs, WeCom task results) to the one partition holding the send;
  dispatch reads the partial indexes (pending, sending) of each partition,
  the cap holder and the dashboard ranges read only the months they cover.
  A partition may be detached (archived) once it ended more than
  SENDS_RETENTION_MONTHS (13) months before the current month and none of its
  sends is pending, sending or unknown (a report may still settle an unknown
  SMS; an operator still has to look at it); its keys leave send_keys in the
  same transaction. Never dropped by the keeper: detach is the operator's (or
  the CronJob's) and the archive keeps the rows.

Not partitioned, and why: cap_usage, enrollments and timers are per member
(and day) and bounded by the journeys; parked_events expire after
ENGAGEMENT_PARKED_TTL_DAYS.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from servicekit.errors import DomainError
from servicekit.partitions import Partition, PartitionedTable, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA
from .settings import engagement_settings

# A send in one of these may still change: the dispatcher, a delivery report
# or an operator needs its row.
OPEN_STATUSES = ("pending", "sending", "unknown")


async def sends_detach_guard(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse a sends partition holding a send not settled yet; delete its
    keys from send_keys (in the detach's transaction: a refusal after this,
    e.g. PARTITION_TOO_RECENT, rolls the delete back)."""
    assert partition.lower is not None and partition.upper is not None
    open_sends = await conn.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.{partition.name} WHERE status = ANY($1::text[])",
        list(OPEN_STATUSES),
    )
    if open_sends:
        raise DomainError(
            f"{partition.name} still holds {open_sends} sends pending, sending or unknown:"
            " settle them first (docs/journeys.md, Operators)",
            code="PARTITION_HAS_OPEN_SENDS",
            field="partition",
        )
    await conn.execute(
        f"DELETE FROM {SCHEMA}.send_keys WHERE created_at >= $1 AND created_at < $2",
        partition.lower,
        partition.upper,
    )


def sends_table(retention_months: int) -> PartitionedTable:
    return PartitionedTable(
        SCHEMA,
        "sends",
        "created_at",
        keep_months=retention_months,
        # created_at is the scheduler's clock (the service's), not now().
        database_clock=False,
        detach_guard=sends_detach_guard,
    )


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    s = engagement_settings(settings)
    return [
        processed_events(SCHEMA, timedelta(hours=s.processed_events_retention_hours)),
        sends_table(s.sends_retention_months),
    ]
