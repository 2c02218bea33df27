"""`python -m bench partitions`: a large points journal, partitioned by month,
and the checkout and audit statements planned and timed at that size.

1. Load: `--rows` journal rows (and their keys and two entries each, the
   shape of an earn) spread over `--months` monthly partitions ending this
   month, `--members` members, with generate_series in chunks of `--chunk`
   rows. Bulk load writes the key rows itself with triggers off
   (session_replication_role = replica) and builds the secondary indexes
   after the rows, as a restore would; rows stop at half of `--budget`
   seconds and the run reports the size it reached.
2. Checkout: the earn statement (orders/repository.RECORD_EARNING_SQL: journal
   row through the key trigger, entries, lot, balance) for `--samples` new
   orders, mean and p99 ms; the refund's journal reads (points/repository
   ORDER_LOT_SQL, ORDER_REDEMPTION_LOTS_SQL) and the key lookup with EXPLAIN
   (ANALYZE): partitions in the plan, time.
3. Audit: a balance checkpoint at this month's start (`write_checkpoint`:
   seconds, PostgreSQL backend CPU), then `audit_ledger` for one member from
   the checkpoint and from the first transaction, alternating (mean ms of
   each, their ratio), with the partitions the unbalanced check reads either
   way; the oldest partition detached (refused inside the kept months);
   `--full-audit` also times the whole audit before and after the checkpoint.

Against embedded PostgreSQL (fresh under .data/bench) or a throwaway database
on DATABASE_URL (loopback only); JSON to bench/results/partitions-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from servicekit.db import asyncpg_dsn
from servicekit.errors import DomainError
from servicekit.migrations import upgrade
from servicekit.partitions import (
    add_months,
    create_month,
    detach_partition,
    list_partitions,
    month_start,
)
from services.rewards.orders import repository as orders
from services.rewards.partitions import JOURNAL
from services.rewards.points import repository as ledger
from services.rewards.points.audit import audit_ledger, checks
from services.rewards.points.checkpoint import write_checkpoint

from .cli import RESULTS_DIR, BenchInfra, say, server_version
from .cpu import process_cpu_seconds

STORE = "BENCH01"

LOAD_KEYS = """
INSERT INTO rewards.points_transaction_keys (id, idempotency_key, created_at)
SELECT lpad(to_hex(g), 32, '0')::uuid, 'bench:' || g,
       $3::timestamptz + (g % $5) * interval '1 month' + (g / $5) * $4::interval
FROM generate_series($1::bigint, $2::bigint) g
"""

LOAD_JOURNAL = """
INSERT INTO rewards.points_transactions
    (id, member_id, kind, idempotency_key, amount, rule, created_at, seq)
SELECT lpad(to_hex(g), 32, '0')::uuid, md5('m' || (g % $5))::uuid, 'earn', 'bench:' || g, 10,
       '{"rule": "bench"}',
       $3::timestamptz + (g % $6) * interval '1 month' + (g / $6) * $4::interval, g
FROM generate_series($1::bigint, $2::bigint) g
"""

# Secondary indexes are dropped for the load and built after it (as a restore
# does); the primary keys and the key table's unique index stay.
SECONDARY_INDEXES = (
    ("ix_points_transactions_member_id", "points_transactions (member_id)"),
    ("ix_points_transactions_order_id", "points_transactions (order_id)"),
    ("ix_points_transactions_counterpart_member_id", "points_transactions (counterpart_member_id)"),
    ("ix_points_transactions_member_id_seq", "points_transactions (member_id, seq)"),
    ("ix_points_entries_transaction_id", "points_entries (transaction_id)"),
    ("ix_points_entries_member_id", "points_entries (member_id)"),
)

LOAD_ENTRIES = """
INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
SELECT lpad(to_hex(g), 32, '0')::uuid, a.account,
       CASE WHEN a.account = 'member_wallet' THEN md5('m' || (g % $3))::uuid END, a.amount
FROM generate_series($1::bigint, $2::bigint) g,
     (VALUES ('member_wallet', 10), ('issued_liability', -10)) AS a(account, amount)
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench partitions", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000_000, help="journal rows (100M)")
    parser.add_argument("--months", type=int, default=24, help="monthly partitions (24)")
    parser.add_argument("--members", type=int, default=0, help="members (rows / 20)")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="rows per statement")
    parser.add_argument("--budget", type=float, default=900.0, help="load seconds at most")
    parser.add_argument("--samples", type=int, default=200, help="earns and audits timed")
    parser.add_argument("--full-audit", action="store_true", help="also time the whole audit")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("rows", "months", "chunk", "budget", "samples"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    args.members = args.members or max(1, args.rows // 20)
    if args.members > args.rows:
        parser.error("--members must not exceed --rows")
    return args


def relations(plan: Any) -> list[str]:
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            found.append(node["Relation Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return found


async def explain_analyze(conn: asyncpg.Connection, sql: str, *args: object) -> dict[str, Any]:
    plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))
    journal = sorted({r for r in relations(plan) if r.startswith("points_transactions_")})
    return {
        "journal_partitions_in_plan": len(journal),
        "partitions": journal if len(journal) <= 6 else [*journal[:3], "...", *journal[-2:]],
        "execution_ms": round(plan[0]["Execution Time"], 3),
        "planning_ms": round(plan[0]["Planning Time"], 3),
    }


async def load(conn: asyncpg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    now: datetime = await conn.fetchval("SELECT now()")
    first = add_months(month_start(now), -(args.months - 1))
    for i in range(args.months + 1):
        month = add_months(first, i)
        if not await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"rewards.{JOURNAL.partition_name(month)}"
        ):
            await create_month(conn, JOURNAL, month)
    # Row g goes to month g % months (so however far the load gets, every
    # month has rows), spread over the month's first 28 days.
    step = timedelta(days=28) / max(1, args.rows // args.months)
    await conn.execute("SET session_replication_role = replica")
    started = time.perf_counter()
    for name, _ in SECONDARY_INDEXES:
        await conn.execute(f"DROP INDEX rewards.{name}")
    loaded = 0
    # Index builds take about as long again as the rows: half the budget each.
    while loaded < args.rows and time.perf_counter() - started < args.budget / 2:
        lo, hi = loaded + 1, min(args.rows, loaded + args.chunk)
        async with conn.transaction():
            await conn.execute(LOAD_KEYS, lo, hi, first, step, args.months)
            await conn.execute(LOAD_JOURNAL, lo, hi, first, step, args.members, args.months)
            await conn.execute(LOAD_ENTRIES, lo, hi, args.members)
        loaded = hi
        took = time.perf_counter() - started
        say(f"loaded {loaded:,} journal rows in {took:,.0f} s ({loaded / took:,.0f}/s)")
    rows_seconds = time.perf_counter() - started
    for name, on in SECONDARY_INDEXES:
        say(f"building {name} ...")
        await conn.execute(f"CREATE INDEX {name} ON rewards.{on}")
    load_seconds = time.perf_counter() - started
    await conn.execute("SET session_replication_role = origin")
    await conn.execute("SELECT setval('rewards.points_transactions_seq', $1)", loaded + 1)
    # Balances and one lot per member equal to the loaded journal (member j
    # has rows j, j + members, ...; its first is j, or `members` for j = 0),
    # computed, not aggregated: the audit's member checks then hold.
    members = args.members = min(args.members, loaded)
    counts = (
        " FROM (SELECT j, CASE WHEN j = 0 THEN $2 / $1 ELSE ($2 - j) / $1 + 1 END AS c"
        " FROM generate_series(0, $1 - 1) j) x"
    )
    await conn.execute(
        "INSERT INTO rewards.points_balances (member_id, available, lifetime_earned)"
        " SELECT md5('m' || j)::uuid, 10 * c, 10 * c" + counts,
        members,
        loaded,
    )
    await conn.execute(
        "INSERT INTO rewards.points_lots (id, member_id, transaction_id, root_lot_id, points,"
        " remaining, status, earned_at, expires_at)"
        " SELECT md5('lot' || j)::uuid, md5('m' || j)::uuid,"
        " lpad(to_hex(CASE WHEN j = 0 THEN $1 ELSE j END), 32, '0')::uuid,"
        " md5('lot' || j)::uuid, 10 * c, 10 * c, 'active', now(), now() + interval '10 years'"
        + counts,
        members,
        loaded,
    )
    say("analyzing ...")
    await conn.execute("ANALYZE rewards.points_transactions")
    await conn.execute("ANALYZE rewards.points_transaction_keys")
    await conn.execute("ANALYZE rewards.points_entries")
    size = await conn.fetchval(
        "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c"
        " JOIN pg_inherits i ON i.inhrelid = c.oid"
        " WHERE i.inhparent = 'rewards.points_transactions'::regclass"
    )
    return {
        "journal_rows": loaded,
        "entries_rows": loaded * 2,
        "members": args.members,
        "months": args.months,
        "rows_seconds": round(rows_seconds, 1),
        "load_seconds_with_indexes": round(load_seconds, 1),
        "journal_size": size,
        "reached_requested_rows": loaded >= args.rows,
    }


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean_ms": round(statistics.fmean(samples), 3),
        "p50_ms": round(ordered[len(ordered) // 2], 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }


async def checkout(conn: asyncpg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    await conn.execute(
        "INSERT INTO rewards.stores (store_id, name, city, address, latitude, longitude)"
        " VALUES ($1, 'bench', 'bench', '', 31.2, 121.4) ON CONFLICT DO NOTHING",
        STORE,
    )
    times: list[float] = []
    last: tuple[uuid.UUID, datetime] | None = None
    for i in range(args.samples):
        order_id, member = uuid.uuid4(), uuid.uuid4()
        now = datetime.now(UTC)
        async with conn.transaction():
            await orders.claim_order(
                conn,
                orders.NewOrder(
                    order_id, STORE, f"bench-{i}-{order_id}", member, "store", 1000, None, (),
                    now, b"\0" * 32, 10,
                ),
            )  # fmt: skip
            started = time.perf_counter()
            await orders.record_earning(
                conn,
                orders.Earning(
                    uuid.uuid4(), member, order_id, f"earn:{order_id}", 10, {"rule": "bench"},
                    uuid.uuid4(), now, now + timedelta(days=365),
                ),
            )  # fmt: skip
            times.append((time.perf_counter() - started) * 1000)
        last = (order_id, now)
    assert last is not None
    order_id = last[0]
    created = await conn.fetchval("SELECT created_at FROM rewards.orders WHERE id = $1", order_id)
    return {
        "earn_statement": summary(times),
        "refund_order_lot": await explain_analyze(conn, ledger.ORDER_LOT_SQL, order_id, created),
        "refund_redemption_lots": await explain_analyze(
            conn, ledger.ORDER_REDEMPTION_LOTS_SQL, order_id, created
        ),
        "key_lookup": await explain_analyze(
            conn,
            "SELECT id, created_at FROM rewards.points_transaction_keys WHERE idempotency_key = $1",
            f"earn:{order_id}",
        ),
    }


def sample_member(conn_members: int, i: int) -> str:
    return str(i * 7919 % conn_members)


async def audit(conn: asyncpg.Connection, args: argparse.Namespace) -> dict[str, Any]:
    """The member audit from the first transaction, then a balance checkpoint
    at this month's start, then the member audit from it and the full one
    alternating (A/B in one run), and the oldest partition detached."""
    members = [
        str(
            uuid.UUID(
                await conn.fetchval("SELECT md5('m' || $1::text)", sample_member(args.members, i))
            )
        )
        for i in range(args.samples)
    ]
    member_uuid = uuid.UUID(await conn.fetchval("SELECT md5('m1')"))
    result: dict[str, Any] = {
        "unbalanced_check_one_member_no_checkpoint": await explain_analyze(
            conn, checks(None)[0], [member_uuid]
        ),
    }
    if args.full_audit:
        started = time.perf_counter()
        report = await audit_ledger(conn)
        result["whole_audit_no_checkpoint_seconds"] = round(time.perf_counter() - started, 1)
        result["whole_audit_no_checkpoint_ok"] = report.ok
    now: datetime = await conn.fetchval("SELECT now()")
    cpu = await backend_cpu(conn)
    started = time.perf_counter()
    written = await write_checkpoint(conn, month_start(now))
    result["checkpoint"] = {
        "seconds": round(time.perf_counter() - started, 1),
        "postgres_cpu_seconds": round(await backend_cpu(conn) - cpu, 1),
        "members": written.members,
        "lots": written.lots,
        "as_of": written.as_of.isoformat(),
    }
    times: dict[str, list[float]] = {"from_checkpoint": [], "from_first_transaction": []}
    findings = 0
    for member in members:
        for name, full in (("from_checkpoint", False), ("from_first_transaction", True)):
            started = time.perf_counter()
            report = await audit_ledger(conn, [member], full=full)
            times[name].append((time.perf_counter() - started) * 1000)
            findings += 0 if report.ok else 1
    result["member_audit"] = {name: summary(t) for name, t in times.items()}
    result["member_audit"]["ratio_checkpoint_to_full"] = round(
        statistics.fmean(times["from_checkpoint"])
        / statistics.fmean(times["from_first_transaction"]),
        3,
    )
    result["members_with_findings"] = findings
    since = written.as_of
    result["unbalanced_check_one_member_from_checkpoint"] = await explain_analyze(
        conn, checks(since)[0], [member_uuid]
    )
    if args.full_audit:
        started = time.perf_counter()
        report = await audit_ledger(conn)
        result["whole_audit_from_checkpoint_seconds"] = round(time.perf_counter() - started, 1)
        result["whole_audit_from_checkpoint_ok"] = report.ok
    oldest = next(p for p in await list_partitions(conn, JOURNAL) if p.lower is not None)
    started = time.perf_counter()
    try:
        result["detached"] = await detach_partition(conn, JOURNAL, oldest.name)
    except DomainError as exc:  # the kept months (--months <= 12)
        result["detached"] = exc.code
    result["detach_seconds"] = round(time.perf_counter() - started, 2)
    result["audit_ok_after_detach"] = (await audit_ledger(conn)).ok if args.full_audit else None
    return result


async def backend_cpu(conn: asyncpg.Connection) -> float:
    """CPU seconds of this connection's PostgreSQL backend: the checkpoint runs in it."""
    return process_cpu_seconds(await conn.fetchval("SELECT pg_backend_pid()"))


async def run(args: argparse.Namespace) -> int:
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    infra = await BenchInfra.start(f"partitions-{run_id}")
    try:
        say("migrating rewards ...")
        await asyncio.to_thread(upgrade, "rewards", infra.database_url)
        conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
        try:
            loaded = await load(conn, args)
            say("checkout statements ...")
            checkout_figures = await checkout(conn, args)
            say("audit statements ...")
            audit_figures = await audit(conn, args)
            partitions = len(await list_partitions(conn, JOURNAL))
        finally:
            await conn.close()
        report = {
            "scenario": "partitions",
            "run_id": run_id,
            "postgres": await server_version(infra.database_url),
            "database": infra.note,
            "load": loaded,
            "partitions": partitions,
            "checkout": checkout_figures,
            "audit": audit_figures,
        }
    finally:
        await infra.cleanup()
    print(json.dumps(report, indent=2))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"partitions-{run_id}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"results: {path}")
    return 0


def main(argv: list[str]) -> int:
    return asyncio.run(run(parse_args(argv)))
