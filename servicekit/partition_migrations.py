"""Migration steps that turn a plain table into a RANGE-partitioned one
(servicekit/partitions.py keeps it afterwards) and back.

processed_events: by day of the event's own time (DedupeByEventTime below):
its key gains that time, so no trigger is needed.

MonthlyConversion: by month, for a table whose unique key does not carry the
time and no fixed time comes with each write of a key: member.identify_requests
(a request key's retries carry no time of their own). With `key_table` set
(engagement.sends), the key's uniqueness is a narrow unpartitioned table of
(key, partition column) written by the BEFORE INSERT trigger in the same
statement (as rewards' points_transaction_keys, migration 0013), which also
routes a lookup by key to its one partition; without, the first_only trigger
below.

PostgreSQL's unique indexes on a partitioned table must contain the partition
key, so the key's uniqueness across partitions is kept by a BEFORE INSERT row
trigger ("first only"): it takes a transaction-scoped advisory lock on the
key, then looks the key up in every partition; a row whose key is there
already is not inserted (the trigger returns NULL), exactly what the callers'
`INSERT ... ON CONFLICT DO NOTHING RETURNING` expects (no row back). The lock
makes two transactions writing the same key wait for each other as the unique
index did (the second sees the first's row once it commits), whichever
partition each row goes to (a month's boundary between them). One lock per row
written, held to commit: a transaction writing thousands of rows can exhaust
the shared lock table (`out of shared memory`); the consumers write at most a
batch (100) per transaction, bulk loads must be chunked (docs/operations.md).

Existing rows are moved in the migration's transaction (ACCESS EXCLUSIVE on
the table throughout: writers and readers wait): the table is renamed, the
partitioned one created LIKE it with a partition per month the rows cover,
three months ahead and a default, rows copied set-based, the old table
dropped, then the primary key (the key plus the partition column), indexes and
the trigger built once over the copied rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from alembic import op

# Months made ahead by the migration; the service's keeper continues.
AHEAD_MONTHS = 3


def monthly_partitions_sql(schema: str, table: str, column: str, source: str) -> str:
    """A DO block making `schema.table`'s monthly partitions (`<table>_pYYYYMM`,
    UTC months) from the first month `source`'s rows cover (or this month) to
    AHEAD_MONTHS ahead of the database's clock: the conversion's partitions,
    made before its rows are copied in."""
    return f"""
DO $$
DECLARE
    first_month date := date_trunc('month', least(
        (SELECT min({column}) FROM {schema}.{source}), now()) AT TIME ZONE 'UTC')::date;
    last_month date := (date_trunc('month', now() AT TIME ZONE 'UTC')
        + interval '{AHEAD_MONTHS} months')::date;
    m date := first_month;
BEGIN
    WHILE m <= last_month LOOP
        EXECUTE format(
            'CREATE TABLE {schema}.%I PARTITION OF {schema}.{table}'
            ' FOR VALUES FROM (%L) TO (%L)',
            '{table}_p' || to_char(m, 'YYYYMM'),
            m::timestamp AT TIME ZONE 'UTC',
            (m + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        m := (m + interval '1 month')::date;
    END LOOP;
END
$$
"""


@dataclass(frozen=True)
class MonthlyConversion:
    schema: str
    table: str
    column: str  # the partition key, timestamptz, NOT NULL
    key: tuple[str, ...]  # unique before; unique across partitions by trigger after
    # Non-unique indexes both shapes carry: (name, columns).
    indexes: tuple[tuple[str, str], ...] = ()
    # Indexes only the plain table had (e.g. the pruner's age index): (name, columns).
    plain_only_indexes: tuple[tuple[str, str], ...] = ()
    # Indexes both shapes carry, defined in full after the table's name
    # (partial, covering): (name, e.g. "(next_attempt_at) WHERE status = 'pending'").
    indexes_sql: tuple[tuple[str, str], ...] = ()
    # The key's uniqueness in a table of its own, (key..., column), primary key
    # the key, written by the claim trigger: an insert of a key already there
    # (in any partition) is skipped, like ON CONFLICT DO NOTHING, with no
    # advisory lock (the key table's unique index makes writers of one key
    # wait for each other). None: the first_only trigger.
    key_table: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def trigger_function(self) -> str:
        if self.key_table is not None:
            return f"{self.schema}.claim_{self.key_table}"
        return f"{self.schema}.{self.table}_first_only"

    @property
    def trigger(self) -> str:
        return f"{self.table}_key" if self.key_table is not None else f"{self.table}_first_only"

    def claim_key_sql(self) -> str:
        assert self.key_table is not None
        columns = ", ".join((*self.key, self.column))
        values = ", ".join(f"NEW.{c}" for c in (*self.key, self.column))
        return f"""
CREATE FUNCTION {self.trigger_function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The key's unique index is here, across every partition: a second writer
    -- of one key waits for the first to commit, then finds it and skips.
    INSERT INTO {self.schema}.{self.key_table} ({columns}) VALUES ({values})
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;  -- the key is taken, in whichever partition: skip, like ON CONFLICT
    END IF;
    RETURN NEW;
END
$$
"""

    def first_only_sql(self) -> str:
        match = " AND ".join(f"{c} = NEW.{c}" for c in self.key)
        lock_key = " || ':' || ".join(f"NEW.{c}::text" for c in self.key)
        return f"""
CREATE FUNCTION {self.trigger_function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Writers of one key take turns (as on a unique index); a fresh snapshot
    -- per statement (READ COMMITTED) then sees the one that committed first.
    PERFORM pg_advisory_xact_lock(hashtextextended('{self.qualified}:' || {lock_key}, 0));
    IF EXISTS (SELECT 1 FROM {self.qualified} WHERE {match}) THEN
        RETURN NULL;  -- the key is taken, in whichever partition: skip, like ON CONFLICT
    END IF;
    RETURN NEW;
END
$$
"""

    def _monthly_partitions_sql(self, source: str) -> str:
        return monthly_partitions_sql(self.schema, self.table, self.column, source)

    def upgrade(self) -> None:
        old = f"{self.table}_unpartitioned"
        op.execute(f"LOCK TABLE {self.qualified} IN ACCESS EXCLUSIVE MODE")
        op.execute(f"ALTER TABLE {self.qualified} RENAME TO {old}")
        op.execute(
            f"CREATE TABLE {self.qualified}"
            f" (LIKE {self.schema}.{old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            f" PARTITION BY RANGE ({self.column})"
        )
        op.execute(
            f"CREATE TABLE {self.schema}.{self.table}_default PARTITION OF {self.qualified} DEFAULT"
        )
        op.execute(self._monthly_partitions_sql(old))
        op.execute(f"INSERT INTO {self.qualified} SELECT * FROM {self.schema}.{old}")
        if self.key_table is not None:
            keyed = ", ".join((*self.key, self.column))
            op.execute(
                f"CREATE TABLE {self.schema}.{self.key_table} AS"
                f" SELECT {keyed} FROM {self.schema}.{old}"
            )
        # Its primary key and indexes go with it (their names are schema-wide).
        op.execute(f"DROP TABLE {self.schema}.{old}")
        op.execute(
            f"ALTER TABLE {self.qualified} ADD CONSTRAINT pk_{self.table}"
            f" PRIMARY KEY ({', '.join((*self.key, self.column))})"
        )
        for name, columns in self.indexes:
            op.execute(f"CREATE INDEX {name} ON {self.qualified} ({columns})")
        for name, definition in self.indexes_sql:
            op.execute(f"CREATE INDEX {name} ON {self.qualified} {definition}")
        if self.key_table is not None:
            keys = f"{self.schema}.{self.key_table}"
            for c in (*self.key, self.column):
                op.execute(f"ALTER TABLE {keys} ALTER COLUMN {c} SET NOT NULL")
            op.execute(
                f"ALTER TABLE {keys} ADD CONSTRAINT pk_{self.key_table}"
                f" PRIMARY KEY ({', '.join(self.key)})"
            )
            # The detach guard deletes a detached partition's keys by range.
            op.execute(f"CREATE INDEX ix_{self.key_table}_{self.column} ON {keys} ({self.column})")
            op.execute(self.claim_key_sql())
        else:
            op.execute(self.first_only_sql())
        # Row-level on the parent: every partition, present and future, has it.
        op.execute(
            f"CREATE TRIGGER {self.trigger} BEFORE INSERT ON {self.qualified}"
            f" FOR EACH ROW EXECUTE FUNCTION {self.trigger_function}()"
        )

    def downgrade(self) -> None:
        parted = f"{self.table}_partitioned"
        op.execute(f"LOCK TABLE {self.qualified} IN ACCESS EXCLUSIVE MODE")
        op.execute(f"ALTER TABLE {self.qualified} RENAME TO {parted}")
        op.execute(f"ALTER TABLE {self.schema}.{parted} DROP CONSTRAINT pk_{self.table}")
        for name, _ in (*self.indexes, *self.indexes_sql):
            op.execute(f"DROP INDEX {self.schema}.{name}")
        op.execute(
            f"CREATE TABLE {self.qualified}"
            f" (LIKE {self.schema}.{parted} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        op.execute(f"INSERT INTO {self.qualified} SELECT * FROM {self.schema}.{parted}")
        op.execute(f"DROP TABLE {self.schema}.{parted}")
        op.execute(f"DROP FUNCTION {self.trigger_function}()")
        if self.key_table is not None:
            op.execute(f"DROP TABLE {self.schema}.{self.key_table}")
        op.execute(
            f"ALTER TABLE {self.qualified} ADD CONSTRAINT pk_{self.table}"
            f" PRIMARY KEY ({', '.join(self.key)})"
        )
        for name, columns in (*self.indexes, *self.plain_only_indexes):
            op.execute(f"CREATE INDEX {name} ON {self.qualified} ({columns})")
        for name, definition in self.indexes_sql:
            op.execute(f"CREATE INDEX {name} ON {self.qualified} {definition}")


# Days of processed_events partitions the migration makes behind now at most
# (older rows go to the default partition and expire there) and ahead.
DEDUPE_DAYS_BEHIND = 35
DEDUPE_DAYS_AHEAD = 3


@dataclass(frozen=True)
class DedupeByEventTime:
    """processed_events (servicekit/tables.py) made RANGE-partitioned by day of
    a new column, occurred_at: the event's own time, which every delivery of an
    event carries unchanged (servicekit/tables.py event_time). The primary key
    (consumer, event_id, occurred_at) contains the partition key, so it is a
    real unique index: ON CONFLICT DO NOTHING works as on the plain table,
    with no trigger and no lock per row.

    The rows already there do not know their event's time: they are copied
    with occurred_at = processed_at, which keeps the cursor walk's sequence
    numbers but not their dedupe (a redelivery of such an event carries its
    real occurred_at). So the old table stays beside it as
    `processed_events_legacy` (its primary key only), probed by a BEFORE
    INSERT row trigger (no lock: nothing writes the legacy table) until the
    keeper finds every legacy row past the retention and drops both
    (servicekit/partitions.py retire_legacy). An empty table (a fresh
    install) leaves no legacy and no trigger."""

    schema: str
    table: str = "processed_events"

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def legacy(self) -> str:
        return f"{self.schema}.{self.table}_legacy"

    def _legacy_check_sql(self) -> str:
        return f"""
CREATE FUNCTION {self.legacy}_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A key recorded before the migration, when rows had no event time.
    IF EXISTS (SELECT 1 FROM {self.legacy}
               WHERE consumer = NEW.consumer AND event_id = NEW.event_id) THEN
        RETURN NULL;  -- like ON CONFLICT DO NOTHING
    END IF;
    RETURN NEW;
END
$$
"""

    def _daily_partitions_sql(self, source: str) -> str:
        name = self.table
        return f"""
DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d date := greatest(least(
        (SELECT min(processed_at) FROM {self.schema}.{source}) AT TIME ZONE 'UTC',
        now() AT TIME ZONE 'UTC')::date, today - {DEDUPE_DAYS_BEHIND});
BEGIN
    WHILE d <= today + {DEDUPE_DAYS_AHEAD} LOOP
        EXECUTE format(
            'CREATE TABLE {self.schema}.%I PARTITION OF {self.qualified}'
            ' FOR VALUES FROM (%L) TO (%L)',
            '{name}_p' || to_char(d, 'YYYYMMDD'),
            d::timestamp AT TIME ZONE 'UTC',
            (d + 1)::timestamp AT TIME ZONE 'UTC');
        d := d + 1;
    END LOOP;
END
$$
"""

    def upgrade(self) -> None:
        old = f"{self.table}_unpartitioned"
        op.execute(f"LOCK TABLE {self.qualified} IN ACCESS EXCLUSIVE MODE")
        op.execute(f"ALTER TABLE {self.qualified} RENAME TO {old}")
        op.execute(
            f"CREATE TABLE {self.qualified}"
            f" (LIKE {self.schema}.{old} INCLUDING DEFAULTS INCLUDING CONSTRAINTS,"
            " occurred_at timestamptz NOT NULL)"
            " PARTITION BY RANGE (occurred_at)"
        )
        op.execute(
            f"CREATE TABLE {self.schema}.{self.table}_default PARTITION OF {self.qualified} DEFAULT"
        )
        op.execute(self._daily_partitions_sql(old))
        op.execute(
            f"INSERT INTO {self.qualified} (consumer, event_id, processed_at, producer, seq,"
            " occurred_at)"
            f" SELECT consumer, event_id, processed_at, producer, seq, processed_at"
            f" FROM {self.schema}.{old}"
        )
        has_rows = (
            op.get_bind()
            .exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM {self.schema}.{old})")
            .scalar()
        )
        if has_rows:
            # Kept for its keys (index names are schema-wide: renamed).
            legacy = f"{self.table}_legacy"
            op.execute(f"ALTER TABLE {self.schema}.{old} RENAME TO {legacy}")
            op.execute(f"ALTER INDEX {self.schema}.pk_{self.table} RENAME TO pk_{legacy}")
            op.execute(
                f"ALTER INDEX {self.schema}.ix_{self.table}_processed_at"
                f" RENAME TO ix_{legacy}_processed_at"
            )
            op.execute(f"DROP INDEX {self.schema}.ix_{self.table}_consumer_producer_seq")
            op.execute(self._legacy_check_sql())
            op.execute(
                f"CREATE TRIGGER {legacy}_check BEFORE INSERT ON {self.qualified}"
                f" FOR EACH ROW EXECUTE FUNCTION {self.legacy}_check()"
            )
        else:
            op.execute(f"DROP TABLE {self.schema}.{old}")
        op.execute(
            f"ALTER TABLE {self.qualified} ADD CONSTRAINT pk_{self.table}"
            " PRIMARY KEY (consumer, event_id, occurred_at)"
        )
        op.execute(
            f"CREATE INDEX ix_{self.table}_consumer_producer_seq"
            f" ON {self.qualified} (consumer, producer, seq)"
        )
        # The default partition's rows (late first deliveries, no event time)
        # are deleted by processed_at (servicekit/partitions.py expire_default).
        op.execute(
            f"CREATE INDEX ix_{self.table}_default_processed_at"
            f" ON {self.schema}.{self.table}_default (processed_at)"
        )

    def downgrade(self) -> None:
        parted = f"{self.table}_partitioned"
        op.execute(f"LOCK TABLE {self.qualified} IN ACCESS EXCLUSIVE MODE")
        op.execute(f"ALTER TABLE {self.qualified} RENAME TO {parted}")
        op.execute(f"ALTER TABLE {self.schema}.{parted} DROP CONSTRAINT pk_{self.table}")
        op.execute(f"DROP INDEX {self.schema}.ix_{self.table}_consumer_producer_seq")
        op.execute(
            f"CREATE TABLE {self.qualified}"
            f" (LIKE {self.schema}.{parted} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        op.execute(f"ALTER TABLE {self.qualified} DROP COLUMN occurred_at")
        op.execute(
            f"ALTER TABLE {self.qualified} ADD CONSTRAINT pk_{self.table}"
            " PRIMARY KEY (consumer, event_id)"
        )
        # One key in two days is possible only from a producer that changed an
        # event's time between deliveries: the first row is kept.
        op.execute(
            f"INSERT INTO {self.qualified} (consumer, event_id, processed_at, producer, seq)"
            f" SELECT consumer, event_id, processed_at, producer, seq FROM {self.schema}.{parted}"
            " ORDER BY processed_at ON CONFLICT DO NOTHING"
        )
        op.execute(f"DROP TABLE {self.schema}.{parted}")
        # The legacy keys, if the keeper has not retired them yet.
        op.execute(f"DROP FUNCTION IF EXISTS {self.legacy}_check() CASCADE")
        op.execute(f"""
DO $$
BEGIN
    IF to_regclass('{self.legacy}') IS NOT NULL THEN
        INSERT INTO {self.qualified} (consumer, event_id, processed_at, producer, seq)
        SELECT consumer, event_id, processed_at, producer, seq FROM {self.legacy}
        ON CONFLICT DO NOTHING;
        DROP TABLE {self.legacy};
    END IF;
END
$$
""")
        op.execute(
            f"CREATE INDEX ix_{self.table}_consumer_producer_seq"
            f" ON {self.qualified} (consumer, producer, seq)"
        )
        op.execute(f"CREATE INDEX ix_{self.table}_processed_at ON {self.qualified} (processed_at)")


def processed_events(schema: str) -> DedupeByEventTime:
    """The consumers' dedupe log (servicekit/tables.py add_event_tables)."""
    return DedupeByEventTime(schema)


def partitions_for_rows_sql(
    schema: str,
    table: str,
    column: str,
    source: str,
    ahead: int = AHEAD_MONTHS,
    rows: str | None = None,
) -> str:
    """A monthly partition of `schema.table` (`<table>_pYYYYMM`, UTC) for every
    month the rows of `schema.source` have in `column` (or `rows`, a query
    whose one column is named `column`, when the times come from a join), and
    for this month and `ahead` after it (by the database's clock). Months with no rows in
    between get none (their rows, if any come, land in the default partition and
    the keeper moves them): for a key that may lie years ahead (a coupon's
    expiry), a partition per month from the oldest row to the newest would be
    mostly empty."""
    return f"""
DO $$
DECLARE
    m date;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', {column} AT TIME ZONE 'UTC')::date
        FROM {f"({rows}) AS rows" if rows else f"{schema}.{source}"}
        UNION
        SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => n))::date
        FROM generate_series(0, {ahead}) AS n
        ORDER BY 1
    LOOP
        EXECUTE format(
            'CREATE TABLE {schema}.%I PARTITION OF {schema}.{table}'
            ' FOR VALUES FROM (%L) TO (%L)',
            '{table}_p' || to_char(m, 'YYYYMM'),
            m::timestamp AT TIME ZONE 'UTC',
            (m + interval '1 month')::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END
$$
"""
