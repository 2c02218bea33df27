"""Tables partitioned by month (PostgreSQL declarative RANGE partitioning on a
timestamptz column): partitions made ahead, rows that landed in the default
partition moved into their month, old partitions detached into an archive
schema unless the table's policy refuses (docs/operations.md "Partitioned
tables").

Partitions are named `<table>_pYYYYMM` and cover [first of the month, first of
the next) in UTC; `<table>_default` catches a row no partition covers, so an
insert never fails for want of a partition.

Locks (each partition is one short transaction, `lock_timeout` bounded so a
long transaction on the table makes the job give up and retry, not queue the
traffic behind it):
- a new partition is built standalone (`LIKE` the parent), then `ATTACH`ed:
  SHARE UPDATE EXCLUSIVE on the parent (reads and writes go on) and ACCESS
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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

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
    # Rows worthless after this (dedupe keys, replay answers): a partition
    # whose whole range is older is dropped by `ensure_partitions`, not archived.
    # None: nothing is dropped (the default; detach stays the operator's).
    drop_after: timedelta | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def default(self) -> str:
        return f"{self.table}_default"

    def partition_name(self, month: datetime) -> str:
        return f"{self.table}_p{month:%Y%m}"


def processed_events(schema: str, retention: timedelta) -> PartitionedTable:
    """A service's consumer dedupe log, partitioned by month of processed_at
    (servicekit/partition_migrations.py): a partition whose whole month is
    older than PROCESSED_EVENTS_RETENTION_HOURS is dropped, so rows live
    between the retention and the retention plus a month."""
    return PartitionedTable(schema, "processed_events", "processed_at", drop_after=retention)


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
    """Rows in the default partition, by the month they belong to."""
    rows = await conn.fetch(
        f"SELECT date_trunc('month', {table.column} AT TIME ZONE 'UTC') AS month, count(*) AS n"
        f" FROM {table.schema}.{table.default} GROUP BY 1 ORDER BY 1"
    )
    return {r["month"].replace(tzinfo=UTC): r["n"] for r in rows}


async def create_month(
    conn: asyncpg.Connection, table: PartitionedTable, month: datetime
) -> int | None:
    """Build the month's partition beside the table, move its strays out of the
    default partition into it, attach it; one transaction. Rows moved, or None
    when another run (a replica, the CronJob) made it first."""
    name = table.partition_name(month)
    lower, upper = month, add_months(month, 1)
    qualified = f"{table.schema}.{name}"
    default = f"{table.schema}.{table.default}"
    in_range = f"{table.column} >= $1 AND {table.column} < $2"
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # Runs of the job (every replica at start-up, the CronJob) take turns.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table.qualified)
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified):
            return None
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
    """Partitions for this month and `ahead` months after it, and for every
    month that has rows in the default partition (moved there)."""
    if ahead < 0:
        raise InvalidArgument("ahead must be 0 or more months", code="INVALID_AHEAD", field="ahead")
    now = await _now(conn, table, clock or datetime.now(UTC))
    report = EnsureReport(table.qualified)
    existing = {p.lower for p in await list_partitions(conn, table) if p.lower is not None}
    this_month = month_start(now)
    wanted = {add_months(this_month, i) for i in range(ahead + 1)}
    wanted |= set(await stray_months(conn, table))
    for month in sorted(wanted - existing):
        moved = await create_month(conn, table, month)
        if moved is None:
            continue
        name = table.partition_name(month)
        report.created.append(name)
        if moved:
            report.moved[name] = moved
    report.strays_left = sum((await stray_months(conn, table)).values())
    if table.drop_after is not None:
        report.dropped = await drop_expired(conn, table, now)
    return report


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
    if partition.upper > keep_from:
        raise DomainError(
            f"{name} ends {partition.upper:%Y-%m-%d}, inside the {table.keep_months} months"
            f" kept (from {keep_from:%Y-%m-%d})",
            code="PARTITION_TOO_RECENT",
            field="partition",
        )
    archive = f"{table.schema}_archive"
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
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
                    if report.created or report.strays_left or report.dropped:
                        log.info("partitions: %s", report)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Postgres away, schema not migrated yet, a lock not granted:
                # the default partition keeps inserts working; retry later.
                log.exception("partitions: ensure failed; retrying in %.0fs", self._interval)
            await asyncio.sleep(self._interval)
