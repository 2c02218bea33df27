"""The tiering tables partitioned by time (servicekit/partitions.py; docs/operations.md
"Partitioned tables").

- processed_events (the consumer's dedupe log), by day of the event's own
  occurred_at, days dropped past PROCESSED_EVENTS_RETENTION_HOURS (migration 0010);
- orders (the projection the tier metric and RFM read), by month of
  ordered_at (migration 0011). An order id stays unique across partitions
  through order_keys (written by the claim_order_keys trigger in the insert's
  statement), which also routes a refund to the order's one partition. The
  recompute, the projection and the dashboards read by member over a window
  ending now: the months before it are pruned. A partition may be detached
  (archived) once it ended more than TIERING_ORDERS_RETENTION_MONTHS (36, the
  longest window a programme can configure) months before the current month
  and before the longest window_months or RFM window of every stored
  programme version (PARTITION_IN_TIER_WINDOW); its keys leave order_keys in
  the same transaction. A refund of an archived order is dead-lettered as an
  unknown order (rewards refuses refunds past 12 months before that).

Not partitioned, and why: growth_ledger grows per order but is keyed by
(kind, ref) without time and read whole per member for growth value;
member_spend, member_profiles and member_tiers hold one row per member;
tier_history, stage_transitions and benefit_grants grow per tier change, not
per event; recompute work is per run.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from servicekit.errors import DomainError
from servicekit.partitions import (
    Partition,
    PartitionedTable,
    add_months,
    month_start,
    processed_events,
)
from servicekit.settings import ServiceSettings

from .domain import MAX_WINDOW_MONTHS
from .schema import SCHEMA
from .settings import tiering_settings

# The longest window any stored programme version reads orders over: its
# qualifying window or its RFM segments' window (3 months when unset).
LONGEST_WINDOW_SQL = f"""
SELECT coalesce(max(greatest(window_months,
    coalesce((rules -> 'segments' ->> 'rfm_window_months')::int, 3))), 0)
FROM {SCHEMA}.tier_programmes
"""


async def orders_detach_guard(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse an orders partition a programme's window still reads (by the
    database's clock); delete its keys from order_keys (in the detach's
    transaction: a later refusal rolls the delete back)."""
    assert partition.lower is not None and partition.upper is not None
    months: int = await conn.fetchval(LONGEST_WINDOW_SQL)
    now = await conn.fetchval("SELECT now()")
    # A window of N months ending now starts N months ago, within that month.
    window_from = add_months(month_start(now), -months)
    if partition.upper > window_from:
        raise DomainError(
            f"{partition.name} ends {partition.upper:%Y-%m-%d}: a tier programme reads orders"
            f" over {months} months (from {window_from:%Y-%m-%d})",
            code="PARTITION_IN_TIER_WINDOW",
            field="partition",
        )
    await conn.execute(
        f"DELETE FROM {SCHEMA}.order_keys WHERE ordered_at >= $1 AND ordered_at < $2",
        partition.lower,
        partition.upper,
    )


def orders_table(retention_months: int = MAX_WINDOW_MONTHS) -> PartitionedTable:
    return PartitionedTable(
        SCHEMA,
        "orders",
        "ordered_at",
        keep_months=retention_months,
        # ordered_at is the order's own time (the POS's), not now().
        database_clock=False,
        detach_guard=orders_detach_guard,
    )


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    s = tiering_settings(settings)
    return [
        processed_events(SCHEMA, timedelta(hours=s.processed_events_retention_hours)),
        orders_table(s.tiering_orders_retention_months),
    ]
