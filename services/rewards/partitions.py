"""The rewards tables partitioned by time, and what may be detached from them
(servicekit/partitions.py does the work; docs/operations.md "Partitioned tables").

The points journal (`points_transactions`, by month of `created_at`): a
partition may be detached (archived) only when
- a balance checkpoint (points/checkpoint.py) covers it: the ledger audit
  re-sums the journal from the latest checkpoint, so it no longer reads it;
- it ended more than `keep_months` (12) months ago: the refund horizon. A
  refund of an order whose journal rows were archived is refused with
  REFUND_JOURNAL_ARCHIVED (the refund reads the order's earn and redemption
  lots through the journal), never computed from a partial journal.
The detach is recorded in points_journal_archive in the same transaction.

Issued coupons (`coupons`, by month of `expires_at`, migration 0017): a
partition holds the coupons that expire in its month. It may be detached only
when
- it ended more than `keep_months` (12) months ago: its coupons expired over a
  year ago, so any order they were used on is older than the refund horizon
  (a refund restores a coupon only while it is unexpired anyway);
- every coupon in it is terminal (used, expired or revoked): none is still
  `available` or `locked`, i.e. the expiry job (`expire-coupons`) has marked
  them, checked inside the detach's transaction (PARTITION_HAS_LIVE_COUPONS).
The coupons' keys (coupon_keys) stay: their codes and issue keys remain taken,
and an IssueCoupon replay of an archived coupon's key is COUPON_ARCHIVED.
Partitions are kept 12 months ahead (`ahead`): coupons valid up to a year
land in a partition of their own month; a longer validity lands in the default
and the keeper moves it into its month.

Orders (`orders`, by month of `created_at`, migration 0018; their keys stay
in order_keys): the journal's two conditions. The audit checks settled orders from the latest
checkpoint's as_of on (against their earns), and a refund reads its order: a
refund of an order whose partition was archived is refused with
REFUND_ORDER_ARCHIVED (its key is still there). Tiering keeps its own
projection of orders and never reads this table.

The points lots (`points_lots`, by month of `expires_at`) and lot movements
(`points_lot_movements`, by month of their transaction's `created_at`;
migration 0020): a partition may be detached only when
- a balance checkpoint covers it (the audit sums lots from the checkpoint's
  openings and movements since it);
- every journal partition before its end is archived already: refunds of the
  orders that earned or spent those lots (all written before the lots
  expired; a movement's time is its transaction's) are then refused with
  REFUND_JOURNAL_ARCHIVED, never computed without their lots or movements;
- lots only: every lot in it is terminal (spent, expired, moved or reversed:
  nothing remaining, no clawback open);
- it ended more than `keep_months` (12) months ago, as for the journal.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from servicekit.errors import DomainError
from servicekit.partitions import Partition, PartitionedTable, list_partitions, processed_events
from servicekit.settings import ServiceSettings

from .schema import SCHEMA


async def audit_reads_no_more(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse a partition no balance checkpoint covers: the ledger audit reads
    the journal and the orders from the latest checkpoint's as_of on."""
    covered = await conn.fetchval("SELECT max(as_of) FROM rewards.points_checkpoints")
    assert partition.upper is not None and partition.lower is not None
    if covered is None or partition.upper > covered:
        since = "no checkpoint yet" if covered is None else f"checkpointed to {covered:%Y-%m-%d}"
        raise DomainError(
            f"{partition.name} ends {partition.upper:%Y-%m-%d}: the ledger audit still reads it"
            f" ({since}; python -m services.rewards checkpoint)",
            code="PARTITION_NEEDED_BY_AUDIT",
            field="partition",
        )


async def journal_detach_guard(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse a journal partition no checkpoint covers; record the detach."""
    await audit_reads_no_more(conn, partition)
    assert partition.upper is not None and partition.lower is not None
    await conn.execute(
        "INSERT INTO rewards.points_journal_archive (partition, lower, upper) VALUES ($1, $2, $3)",
        partition.name,
        partition.lower,
        partition.upper,
    )


async def coupons_detach_guard(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse a coupons partition holding a coupon not yet terminal."""
    live = await conn.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.{partition.name} WHERE status IN ('available', 'locked')"
    )
    if live:
        raise DomainError(
            f"{partition.name} holds {live} coupons still available or locked:"
            " run `python -m services.rewards expire-coupons` first",
            code="PARTITION_HAS_LIVE_COUPONS",
            field="partition",
        )


# The coupons' expires_at is the application's (issue time + validity).
COUPONS = PartitionedTable(
    SCHEMA,
    "coupons",
    "expires_at",
    database_clock=False,
    detach_guard=coupons_detach_guard,
    ahead=12,
)

JOURNAL = PartitionedTable(
    SCHEMA, "points_transactions", "created_at", detach_guard=journal_detach_guard
)

ORDERS = PartitionedTable(SCHEMA, "orders", "created_at", detach_guard=audit_reads_no_more)


async def _journal_archived_before(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse a lots or movements partition ending after a checkpoint, or
    while a journal partition before its end is still attached."""
    assert partition.upper is not None
    covered = await conn.fetchval("SELECT max(as_of) FROM rewards.points_checkpoints")
    if covered is None or partition.upper > covered:
        since = "no checkpoint yet" if covered is None else f"checkpointed to {covered:%Y-%m-%d}"
        raise DomainError(
            f"{partition.name} ends {partition.upper:%Y-%m-%d}: the ledger audit still reads it"
            f" ({since}; python -m services.rewards checkpoint)",
            code="PARTITION_NEEDED_BY_AUDIT",
            field="partition",
        )
    attached = [
        p.name
        for p in await list_partitions(conn, JOURNAL)
        if p.lower is not None and p.lower < partition.upper
    ]
    if attached:
        raise DomainError(
            f"{partition.name} ends {partition.upper:%Y-%m-%d}: refunds of orders in"
            f" {', '.join(attached)} (still attached) read it; archive those first",
            code="PARTITION_NEEDED_BY_REFUNDS",
            field="partition",
        )


async def lots_detach_guard(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse a lots partition holding a live lot, or one the audit or a refund
    still reads."""
    await _journal_archived_before(conn, partition)
    live = await conn.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.{partition.name} WHERE remaining > 0 OR clawback > 0"
    )
    if live:
        raise DomainError(
            f"{partition.name} has {live} lots still holding points (run the expiry job)",
            code="PARTITION_HAS_LIVE_LOTS",
            field="partition",
        )


async def movements_detach_guard(conn: asyncpg.Connection, partition: Partition) -> None:
    """Refuse a movements partition the audit or a refund still reads."""
    await _journal_archived_before(conn, partition)


# Lots expire up to two years ahead (the default policy, end_of_year:1):
# partitions are made that far ahead, so a new lot lands in its month's.
LOTS_AHEAD_MONTHS = 27

LOTS = PartitionedTable(
    SCHEMA,
    "points_lots",
    "expires_at",
    detach_guard=lots_detach_guard,
    ahead=LOTS_AHEAD_MONTHS,
)
LOT_MOVEMENTS = PartitionedTable(
    SCHEMA, "points_lot_movements", "created_at", detach_guard=movements_detach_guard
)


def partitioned_tables(settings: ServiceSettings) -> list[PartitionedTable]:
    """The journal, the orders (migration 0018), the lots and their movements
    (migration 0020), the consumers' dedupe log by day of the event's time
    (migration 0016; days past PROCESSED_EVENTS_RETENTION_HOURS are dropped)
    and the issued coupons by month of expiry (migration 0017): what the
    service's keeper and `python -m services.rewards partitions`
    (servicekit/partitions_cli.py) keep."""
    return [
        JOURNAL,
        ORDERS,
        LOTS,
        LOT_MOVEMENTS,
        processed_events(SCHEMA, timedelta(hours=settings.processed_events_retention_hours)),
        COUPONS,
    ]
