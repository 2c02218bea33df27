"""`python -m bench dedupe`: the consumer's dedupe insert on three shapes of
processed_events, A/B in one run, PostgreSQL backend CPU per insert.

Shapes, side by side in one database (member migrated to head):
- `plain`: the table before partitioning, primary key (consumer, event_id),
  the pruner's processed_at index;
- `trigger`: partitioned by month of processed_at with the first_only trigger
  (advisory lock and a key probe per partition per row: the design this
  replaced, servicekit/partition_migrations.py MonthlyConversion), this month,
  three ahead and a default;
- `day`: member.processed_events as migrated, partitioned by day of the
  event's occurred_at, its days of the retention behind and DEDUPE_AHEAD_DAYS
  ahead made, primary key (consumer, event_id, occurred_at), no trigger.

Workload per run: `--events` fresh events written as the consumer does
(`INSERT ... ON CONFLICT DO NOTHING RETURNING true`, a savepoint each, batches
of 100 in one transaction), then the same events again (redeliveries: no row
back). Shapes alternate, `--rounds` times. CPU is the backend's user+system
time from /proc (bench/cpu.py). Against embedded PostgreSQL (fresh under
.data/bench) or a throwaway database on DATABASE_URL (loopback only); JSON to
bench/results/dedupe-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from servicekit.db import asyncpg_dsn
from servicekit.migrations import upgrade
from servicekit.partition_migrations import DedupeByEventTime, MonthlyConversion
from servicekit.partitions import (
    PartitionedTable,
    create_month,
    ensure_partitions,
    processed_events,
)

from .cli import RESULTS_DIR, BenchInfra, say, server_version
from .cpu import process_cpu_seconds

BATCH = 100

COLUMNS = (
    "consumer text NOT NULL, event_id uuid NOT NULL,"
    " processed_at timestamptz NOT NULL DEFAULT now(), producer text, seq bigint,"
    " occurred_at timestamptz NOT NULL"
)


async def make_plain(conn: asyncpg.Connection) -> str:
    await conn.execute(
        f"CREATE TABLE dedupe_bench.plain ({COLUMNS}, PRIMARY KEY (consumer, event_id))"
    )
    await conn.execute("CREATE INDEX ON dedupe_bench.plain (processed_at)")
    await conn.execute("CREATE INDEX ON dedupe_bench.plain (consumer, producer, seq)")
    return "dedupe_bench.plain"


async def make_trigger(conn: asyncpg.Connection) -> str:
    design = MonthlyConversion(
        "dedupe_bench", "bytrigger", "processed_at", ("consumer", "event_id")
    )
    await conn.execute(
        f"CREATE TABLE dedupe_bench.bytrigger ({COLUMNS},"
        " PRIMARY KEY (consumer, event_id, processed_at)) PARTITION BY RANGE (processed_at)"
    )
    await conn.execute("CREATE INDEX ON dedupe_bench.bytrigger (consumer, producer, seq)")
    await conn.execute(
        "CREATE TABLE dedupe_bench.bytrigger_default PARTITION OF dedupe_bench.bytrigger DEFAULT"
    )
    now = datetime.now(UTC)
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    for _ in range(4):
        after = (month + timedelta(days=32)).replace(day=1)
        await conn.execute(
            f"CREATE TABLE dedupe_bench.bytrigger_p{month:%Y%m} PARTITION OF"
            f" dedupe_bench.bytrigger FOR VALUES FROM ('{month.isoformat()}')"
            f" TO ('{after.isoformat()}')"
        )
        month = after
    await conn.execute(design.first_only_sql())
    await conn.execute(
        "CREATE TRIGGER bytrigger_first_only BEFORE INSERT ON dedupe_bench.bytrigger"
        f" FOR EACH ROW EXECUTE FUNCTION {design.trigger_function}()"
    )
    return "dedupe_bench.bytrigger"


async def make_transition(conn: asyncpg.Connection) -> str:
    """`day` as in the retention's first week after migrating a table that had
    rows: the legacy keys (50,000 here) probed by the insert trigger."""
    design = DedupeByEventTime("dedupe_bench", "transition")
    await conn.execute(
        f"CREATE TABLE dedupe_bench.transition ({COLUMNS},"
        " PRIMARY KEY (consumer, event_id, occurred_at)) PARTITION BY RANGE (occurred_at)"
    )
    await conn.execute("CREATE INDEX ON dedupe_bench.transition (consumer, producer, seq)")
    await conn.execute(
        "CREATE TABLE dedupe_bench.transition_default PARTITION OF dedupe_bench.transition DEFAULT"
    )
    table = PartitionedTable("dedupe_bench", "transition", "occurred_at", granularity="day")
    today = table.period_start(datetime.now(UTC))
    for day in range(-7, 4):
        await create_month(conn, table, today + timedelta(days=day))
    await conn.execute(
        "CREATE TABLE dedupe_bench.transition_legacy (consumer text NOT NULL,"
        " event_id uuid NOT NULL, processed_at timestamptz NOT NULL, producer text, seq bigint,"
        " PRIMARY KEY (consumer, event_id))"
    )
    await conn.execute(
        "INSERT INTO dedupe_bench.transition_legacy (consumer, event_id, processed_at)"
        " SELECT 'bench', gen_random_uuid(), now() FROM generate_series(1, 50000)"
    )
    await conn.execute("ANALYZE dedupe_bench.transition_legacy")
    await conn.execute(design._legacy_check_sql())
    await conn.execute(
        "CREATE TRIGGER transition_legacy_check BEFORE INSERT ON dedupe_bench.transition"
        f" FOR EACH ROW EXECUTE FUNCTION {design.legacy}_check()"
    )
    return "dedupe_bench.transition"


async def make_day(conn: asyncpg.Connection) -> str:
    table = processed_events("member", timedelta(hours=168))
    today = table.period_start(datetime.now(UTC))
    for back in range(1, 8):  # the steady state keeps the retention's days behind
        await create_month(conn, table, today - timedelta(days=back))
    await ensure_partitions(conn, table, ahead=0)
    return "member.processed_events"


async def insert_run(conn: asyncpg.Connection, table: str, events: list[Any]) -> tuple[float, int]:
    """Backend CPU seconds for writing `events` as the consumer does; rows recorded."""
    sql = (
        f"INSERT INTO {table} (consumer, event_id, producer, seq, occurred_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true"
    )
    pid = conn.get_server_pid()
    before = process_cpu_seconds(pid)
    recorded = 0
    for start in range(0, len(events), BATCH):
        async with conn.transaction():
            for event_id, seq, occurred in events[start : start + BATCH]:
                async with conn.transaction():
                    if await conn.fetchval(sql, "bench", event_id, "rewards", seq, occurred):
                        recorded += 1
    return process_cpu_seconds(pid) - before, recorded


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench dedupe", description=__doc__)
    parser.add_argument("--events", type=int, default=4000, help="fresh events per run (4000)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the shapes (2)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    infra = await BenchInfra.start(f"dedupe-{run_id}")
    runs: list[dict[str, Any]] = []
    try:
        say("migrating member ...")
        await asyncio.to_thread(upgrade, "member", infra.database_url)
        conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
        try:
            await conn.execute("CREATE SCHEMA dedupe_bench")
            tables = {
                "plain": await make_plain(conn),
                "trigger": await make_trigger(conn),
                "day": await make_day(conn),
                "day+legacy": await make_transition(conn),
            }
            seq = 0
            for round_ in range(args.rounds):
                for shape, table in tables.items():
                    now = datetime.now(UTC)
                    events = []
                    for i in range(args.events):
                        seq += 1
                        # Events of the last minutes, as a consumer keeping up sees them.
                        events.append((uuid.uuid4(), seq, now - timedelta(seconds=i % 600)))
                    fresh_cpu, fresh = await insert_run(conn, table, events)
                    again_cpu, again = await insert_run(conn, table, events)
                    assert fresh == len(events) and again == 0, (shape, fresh, again)
                    row = {
                        "round": round_ + 1,
                        "shape": shape,
                        "fresh_ms_per_insert": round(fresh_cpu * 1000 / len(events), 4),
                        "redelivery_ms_per_insert": round(again_cpu * 1000 / len(events), 4),
                    }
                    say(json.dumps(row))
                    runs.append(row)
        finally:
            await conn.close()
        report = {
            "scenario": "dedupe",
            "run_id": run_id,
            "postgres": await server_version(infra.database_url),
            "database": infra.note,
            "events_per_run": args.events,
            "runs": runs,
        }
    finally:
        await infra.cleanup()
    print(json.dumps(report, indent=2))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"dedupe-{run_id}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"results: {path}")
    return 0


def main(argv: list[str]) -> int:
    return asyncio.run(run(parse_args(argv)))
