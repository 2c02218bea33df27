"""Tables partitioned by month, or by day (PostgreSQL declarative RANGE
partitioning on a timestamptz column): partitions made ahead, rows that landed
in the default partition moved into their period, old partitions detached into
an archive schema unless the table's policy refuses, or dropped past a
retention (docs/operations.md "Partitioned tables").

Monthly partitions are named `<table>_pYYYYMM` and cover [first of the month,
first of the next) in UTC, daily ones `<table>_pYYYYMMDD` [midnight, next
midnight) UTC; `<table>_default` catches a row no partition covers, so an
insert never fails for want of a partition.

Locks (each partition is one short transaction, `lock_timeout` bounded so a
long transaction on the table makes the job give up and retry, not queue the
traffic behind it):
- a new partition is built standalone (`LIKE` the parent), then `ATTACH`ed:
  SHARE ROW EXCLUSIVE first on every table the parent's foreign keys
  reference (the attach clones them; writes to those tables wait for the
  partition's transaction), SHARE UPDATE EXCLUSIVE on the parent (reads and
  writes go on) and ACCESS
  EXCLUSIVE on the default partition while PostgreSQL checks it holds no row
  of the new range (an index-less scan of the default: keep it empty);
- rows moved out of the default partition: its triggers are disabled for the
  move inside the transaction (ALTER TABLE: SHARE ROW EXCLUSIVE, so no write
  can reach it meanwhile), then enabled again before commit;
- detach: ACCESS EXCLUSIVE on the parent for the catalogue change only;
- drop (tables whose rows are worthless past a retention, `drop_after`): the
  same lock, detach and DROP in one transaction: the retention's DELETE
  batches (and their vacuum) become a catalogue change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg

from .errors import DomainError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# A job that cannot get its lock within this gives up (and the next run retries).
LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class PartitionedTable:
    schema: str
    table: str
    column: str  # the partition key, timestamptz
    # Why no partition may ever be detached (e.g. the ledger audit reads every
    # row), or None: partitions ending keep_months before this month may be.
    never_detach: str | None = None
    keep_months: int = 12
    # The key is written by PostgreSQL (DEFAULT now()): partitions are made
    # ahead of the database's clock, not the application's.
    database_clock: bool = True
    # Run inside the detach's transaction before the keep_months check: raises
    # a DomainError to refuse (e.g. no balance checkpoint covers the partition
    # yet) and may record the detach in the same transaction.
    detach_guard: Callable[[asyncpg.Connection, Partition], Awaitable[None]] | None = None
    # Rows worthless after this (dedupe keys, replay answers): a partition
    # whose whole range is older is dropped by `ensure_partitions`, not archived.
    # None: nothing is dropped (the default; detach stays the operator's).
    drop_after: timedelta | None = None
    granularity: Literal["month", "day"] = "month"
    # Periods made ahead, overriding the keeper's (months) for this table.
    ahead: int | None = None
    # Rows in the default partition whose period is already past drop_after
    # (late first deliveries, keys without a time) stay there, and are
    # deleted once this column is older than drop_after. None: they are moved
    # into their period like any stray.
    default_expiry_column: str | None = None
    # A table of keys kept from before the partitioning, probed by an insert
    # trigger `<legacy>_check` (servicekit/partition_migrations.py), retired
    # once every row of it is past drop_after (by processed_at).
    legacy: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def default(self) -> str:
        return f"{self.table}_default"

    def partition_name(self, period: datetime) -> str:
        if self.granularity == "day":
            return f"{self.table}_p{period:%Y%m%d}"
        return f"{self.table}_p{period:%Y%m}"

    def period_start(self, at: datetime) -> datetime:
        if self.granularity == "day":
            at = at.astimezone(UTC)
            return datetime(at.year, at.month, at.day, tzinfo=UTC)
        return month_start(at)

    def add_periods(self, period: datetime, n: int) -> datetime:
        if self.granularity == "day":
            return period + timedelta(days=n)
        return add_months(period, n)


# Days of processed_events partitions made ahead (the keeper runs at start-up,
# every PARTITIONS_INTERVAL_SECONDS and daily by CronJob).
DEDUPE_AHEAD_DAYS = 3


def processed_events(schema: str, retention: timedelta) -> PartitionedTable:
    """A service's consumer dedupe log, partitioned by day of the event's own
    occurred_at (servicekit/partition_migrations.py DedupeByEventTime): the
    primary key (consumer, event_id, occurred_at) holds the partition key, so
    a redelivery (same occurred_at) lands in the first delivery's partition
    and conflicts there. A day past PROCESSED_EVENTS_RETENTION_HOURS is
    dropped whole; events already that old at first delivery land in the
    default partition and are deleted there by processed_at."""
    return PartitionedTable(
        schema,
        "processed_events",
        "occurred_at",
        drop_after=retention,
        granularity="day",
        ahead=DEDUPE_AHEAD_DAYS,
        default_expiry_column="processed_at",
        legacy="processed_events_legacy",
    )


@dataclass(frozen=True)
class Partition:
    name: str
    # None for the default partition.
    lower: datetime | None
    upper: datetime | None
    rows: int | None = None  # estimated (pg_class.reltuples), filled by list_partitions


@dataclass
class EnsureReport:
    table: str
    created: list[str] = field(default_factory=list)
    # Rows moved out of the default partition, per partition that took them.
    moved: dict[str, int] = field(default_factory=dict)
    # Rows still in the default partition after the run (0 unless a move failed).
    strays_left: int = 0
    # Partitions dropped as past the table's drop_after.
    dropped: list[str] = field(default_factory=list)
    # Rows deleted from the default partition as past drop_after (expire_default).
    default_expired: int = 0
    # The legacy keys' table and trigger dropped (retire_legacy).
    legacy_retired: bool = False


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def add_months(month: datetime, n: int) -> datetime:
    index = month.year * 12 + month.month - 1 + n
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


LIST_SQL = """
SELECT c.relname AS name,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz
           AS lower,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz
           AS upper,
       greatest(c.reltuples, 0)::bigint AS rows
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = $1::regclass
ORDER BY lower NULLS FIRST
"""


async def list_partitions(conn: asyncpg.Connection, table: PartitionedTable) -> list[Partition]:
    """The table's partitions, the default first, then by range."""
    rows = await conn.fetch(LIST_SQL, table.qualified)
    return [Partition(r["name"], r["lower"], r["upper"], r["rows"]) for r in rows]


async def _now(conn: asyncpg.Connection, table: PartitionedTable, clock: datetime) -> datetime:
    if table.database_clock:
        db_now: datetime = await conn.fetchval("SELECT now()")
        return db_now
    return clock


async def stray_months(conn: asyncpg.Connection, table: PartitionedTable) -> dict[datetime, int]:
    """Rows in the default partition, by the period (month or day) they belong to."""
    rows = await conn.fetch(
        f"SELECT date_trunc('{table.granularity}', {table.column} AT TIME ZONE 'UTC') AS month,"
        f" count(*) AS n FROM {table.schema}.{table.default} GROUP BY 1 ORDER BY 1"
    )
    return {r["month"].replace(tzinfo=UTC): r["n"] for r in rows}


async def movable_strays(
    conn: asyncpg.Connection, table: PartitionedTable, now: datetime
) -> dict[datetime, int]:
    """stray_months, less the periods a table with a default_expiry_column
    keeps in the default: those already past drop_after, whose partition would
    be dropped at once, and the rows' keys with it while a redelivery may
    still come (they are deleted by expire_default instead)."""
    strays = await stray_months(conn, table)
    if table.default_expiry_column is None or table.drop_after is None:
        return strays
    cutoff = now - table.drop_after
    return {p: n for p, n in strays.items() if table.add_periods(p, 1) > cutoff}


# Tables the parent's own foreign keys reference (not a partition's inherited
# copies, not itself), in a fixed order (lock order).
REFERENCED_SQL = """
SELECT DISTINCT confrelid::regclass::text AS name FROM pg_constraint
WHERE conrelid = $1::regclass AND contype = 'f' AND conparentid = 0 AND confrelid <> conrelid
ORDER BY 1
"""


async def create_month(
    conn: asyncpg.Connection, table: PartitionedTable, month: datetime
) -> int | None:
    """Build the period's (month's or day's) partition beside the table, move
    its strays out of the default partition into it, attach it; one
    transaction. Rows moved, or None when another run (a replica, the CronJob)
    made it first."""
    name = table.partition_name(month)
    lower, upper = month, table.add_periods(month, 1)
    qualified = f"{table.schema}.{name}"
    default = f"{table.schema}.{table.default}"
    in_range = f"{table.column} >= $1 AND {table.column} < $2"
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # Runs of the job (every replica at start-up, the CronJob) take turns.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table.qualified)
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified):
            return None
        # The attach clones the parent's foreign keys, which takes SHARE ROW
        # EXCLUSIVE on each referenced table. Taken first, before the new
        # partition exists and before the default partition's lock: a
        # transaction that wrote a referenced table (a checkout's order, a key
        # table written by trigger) and then reads the parent or writes into
        # the default waits here or finishes first, instead of deadlocking
        # with the attach half-way.
        for referenced in await conn.fetch(REFERENCED_SQL, table.qualified):
            await conn.execute(f"LOCK TABLE {referenced['name']} IN SHARE ROW EXCLUSIVE MODE")
        await conn.execute(
            f"CREATE TABLE {qualified}"
            f" (LIKE {table.qualified} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        # The range as a CHECK: ATTACH then skips scanning the new table.
        await conn.execute(
            f"ALTER TABLE {qualified} ADD CONSTRAINT {name}_range"
            f" CHECK ({table.column} >= '{lower.isoformat()}'"
            f" AND {table.column} < '{upper.isoformat()}')"
        )
        status = await conn.execute(
            f"INSERT INTO {qualified} SELECT * FROM {default} WHERE {in_range}", lower, upper
        )
        moved = int(status.split()[-1])
        if moved:
            # The rows keep their identity (their keys are written already):
            # the default's triggers (append-only, key claim) must not see the move.
            await conn.execute(f"ALTER TABLE {default} DISABLE TRIGGER USER")
            await conn.execute(f"DELETE FROM {default} WHERE {in_range}", lower, upper)
            await conn.execute(f"ALTER TABLE {default} ENABLE TRIGGER USER")
        await conn.execute(
            f"ALTER TABLE {table.qualified} ATTACH PARTITION {qualified}"
            f" FOR VALUES FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')"
        )
        await conn.execute(f"ALTER TABLE {qualified} DROP CONSTRAINT {name}_range")
    return moved


async def ensure_partitions(
    conn: asyncpg.Connection,
    table: PartitionedTable,
    ahead: int,
    clock: datetime | None = None,
) -> EnsureReport:
    """Partitions for this period and `ahead` periods after it (the table's
    own `ahead` when it has one: days for a daily table), and for every
    period that has rows in the default partition (moved there; for a table
    with a default_expiry_column, only periods not yet past drop_after)."""
    if ahead < 0:
        raise InvalidArgument("ahead must be 0 or more months", code="INVALID_AHEAD", field="ahead")
    if table.ahead is not None:
        ahead = table.ahead
    now = await _now(conn, table, clock or datetime.now(UTC))
    report = EnsureReport(table.qualified)
    existing = {p.lower for p in await list_partitions(conn, table) if p.lower is not None}
    this_period = table.period_start(now)
    wanted = {table.add_periods(this_period, i) for i in range(ahead + 1)}
    wanted |= set(await movable_strays(conn, table, now))
    for month in sorted(wanted - existing):
        moved = await create_month(conn, table, month)
        if moved is None:
            continue
        name = table.partition_name(month)
        report.created.append(name)
        if moved:
            report.moved[name] = moved
    report.strays_left = sum((await movable_strays(conn, table, now)).values())
    if table.drop_after is not None:
        report.dropped = await drop_expired(conn, table, now)
        report.default_expired = await expire_default(conn, table, now)
        report.legacy_retired = await retire_legacy(conn, table, now)
    return report


async def retire_legacy(conn: asyncpg.Connection, table: PartitionedTable, now: datetime) -> bool:
    """Drop the legacy keys' table and its insert trigger once none of its
    rows is within drop_after; True when retired by this call."""
    if table.legacy is None or table.drop_after is None:
        return False
    legacy = f"{table.schema}.{table.legacy}"
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table.qualified)
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", legacy):
            return False
        if await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {legacy} WHERE processed_at >= $1)",
            now - table.drop_after,
        ):
            return False
        # CASCADE: the trigger on the parent goes with its function.
        await conn.execute(f"DROP FUNCTION {legacy}_check() CASCADE")
        await conn.execute(f"DROP TABLE {legacy}")
    return True


async def expire_default(conn: asyncpg.Connection, table: PartitionedTable, now: datetime) -> int:
    """Delete the default partition's rows whose default_expiry_column is past
    drop_after (the rows a drop cannot reach: the default is never dropped).
    Rows deleted."""
    if table.default_expiry_column is None or table.drop_after is None:
        return 0
    status = await conn.execute(
        f"DELETE FROM {table.schema}.{table.default} WHERE {table.default_expiry_column} < $1",
        now - table.drop_after,
    )
    return int(status.split()[-1])


async def drop_expired(
    conn: asyncpg.Connection, table: PartitionedTable, now: datetime
) -> list[str]:
    """Drop every partition whose whole range is older than the table's
    drop_after (rows the retention would have deleted); the default partition
    never. The partitions dropped."""
    if table.drop_after is None:
        return []
    cutoff = now - table.drop_after
    dropped = []
    for partition in await list_partitions(conn, table):
        if partition.upper is None or partition.upper > cutoff:
            continue
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table.qualified)
            qualified = f"{table.schema}.{partition.name}"
            if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified):
                continue  # another run dropped it first
            await conn.execute(f"ALTER TABLE {table.qualified} DETACH PARTITION {qualified}")
            await conn.execute(f"DROP TABLE {qualified}")
        dropped.append(partition.name)
    return dropped


async def detach_partition(
    conn: asyncpg.Connection,
    table: PartitionedTable,
    name: str,
    clock: datetime | None = None,
) -> str:
    """Detach one partition into the `<schema>_archive` schema (to be dumped and
    dropped by the operator); refuse what the table's policy keeps. Returns the
    archived table's name."""
    partitions = {p.name: p for p in await list_partitions(conn, table)}
    partition = partitions.get(name)
    if partition is None:
        raise NotFound(
            f"{name} is not a partition of {table.qualified}",
            code="UNKNOWN_PARTITION",
            field="partition",
        )
    if partition.upper is None:
        raise DomainError(
            f"{name} is the default partition: it catches rows no partition covers",
            code="PARTITION_IS_DEFAULT",
            field="partition",
        )
    if table.never_detach is not None:
        raise DomainError(
            f"{table.qualified} partitions are never detached: {table.never_detach}",
            code="PARTITION_NEEDED_BY_AUDIT",
            field="partition",
        )
    now = await _now(conn, table, clock or datetime.now(UTC))
    keep_from = add_months(month_start(now), -table.keep_months)
    archive = f"{table.schema}_archive"
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        if table.detach_guard is not None:
            await table.detach_guard(conn, partition)
        if partition.upper > keep_from:
            raise DomainError(
                f"{name} ends {partition.upper:%Y-%m-%d}, inside the {table.keep_months} months"
                f" kept (from {keep_from:%Y-%m-%d})",
                code="PARTITION_TOO_RECENT",
                field="partition",
            )
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{archive}"')
        await conn.execute(f"ALTER TABLE {table.qualified} DETACH PARTITION {table.schema}.{name}")
        await conn.execute(f"ALTER TABLE {table.schema}.{name} SET SCHEMA {archive}")
    return f"{archive}.{name}"


class PartitionKeeper:
    """Background task of a service: partitions ahead at start-up, then every
    interval (the CronJob runs the same command; both are idempotent)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        tables: list[PartitionedTable],
        ahead: int,
        interval_seconds: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self._tables = tables
        self._ahead = ahead
        self._interval = interval_seconds
        self._clock = clock

    async def ensure_once(self) -> list[EnsureReport]:
        reports = []
        async with self._pool.acquire() as conn:
            for table in self._tables:
                reports.append(await ensure_partitions(conn, table, self._ahead, self._clock()))
        return reports

    async def run(self) -> None:
        while True:
            try:
                for report in await self.ensure_once():
                    if (
                        report.created
                        or report.strays_left
                        or report.dropped
                        or report.default_expired
                        or report.legacy_retired
                    ):
                        log.info("partitions: %s", report)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Postgres away, schema not migrated yet, a lock not granted:
                # the default partition keeps inserts working; retry later.
                log.exception("partitions: ensure failed; retrying in %.0fs", self._interval)
            await asyncio.sleep(self._interval)
