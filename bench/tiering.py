"""`python -m bench.tiering`: the full batch recompute (tiers + RFM + lifecycle
stages) over a generated brand, timed.

Builds a throwaway database (migrated tiering schema), loads --members members
and --orders orders with COPY (binary, in batches; the orders' indexes are
dropped during the load and rebuilt after, as any bulk load does), then times
three runs of `services.tiering.batch.recompute`:

1. first:      every member still on the base tier and unclassified, so every
               qualifying member is upgraded (history rows, TierChanged) and
               everyone is scored, segmented and staged for the first time;
2. steady:     the same data a minute later: the GROUP BYs run, nothing is due,
               no row is written (the nightly case);
3. period end: as of 1 January next year (Asia/Shanghai): every member above
               the base tier reaches a period end (retention or downgrade).

Orders are spread over the last 18 months with a skewed number per member
(a few heavy buyers, many light ones), ¥8-¥60 each, a few larger.

Prints a table and writes bench/results/tiering-<UTC timestamp>.json. The
target in the issue is <= 30 s for 1,000,000 members / 10,000,000 orders on
this machine; sizes are flags so a smaller run can be extrapolated (say which).
The machine may be shared: figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from servicekit.db import Database, asyncpg_dsn, create_pool, with_database
from servicekit.migrations import upgrade
from servicekit.partitions import ensure_partitions
from services.tiering.batch import RunResult, recompute
from services.tiering.evaluation import period_bounds
from services.tiering.partitions import orders_table
from services.tiering.seed import DEMO_PROGRAMME, seed_demo

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SH = ZoneInfo("Asia/Shanghai")
BATCH = 100_000
SPAN_DAYS = 540


def _member_ids(n: int, rng: random.Random) -> list[uuid.UUID]:
    return [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(n)]


def _orders(
    members: list[uuid.UUID], n: int, now: datetime, rng: random.Random
) -> Iterator[list[tuple[Any, ...]]]:
    """Batches of order records; member choice skewed (r^2) toward the low ids."""
    m = len(members)
    end = now.timestamp() - 60
    span = SPAN_DAYS * 86_400
    rand = rng.random
    fromts = datetime.fromtimestamp
    for start in range(0, n, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, n)):
            r = rand()
            paid = 800 + int(rand() * 5_200) if r > 0.02 else 10_000 + int(rand() * 40_000)
            batch.append(
                (
                    f"o{i}",
                    members[int(m * r * r)],
                    fromts(end - rand() * span, UTC),
                    paid,
                    0,
                    paid // 100,
                )
            )
        yield batch


async def load(url: str, members: int, orders: int, now: datetime, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    timings: dict[str, float] = {}
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await seed_demo(conn)
        tick = time.perf_counter()
        ids = _member_ids(members, rng)
        registered = [
            (mid, now - timedelta(days=rng.random() * (700 if rng.random() > 0.01 else 6)))
            for mid in ids
        ]
        await conn.copy_records_to_table(
            "member_profiles",
            schema_name="tiering",
            columns=["member_id", "registered_at"],
            records=registered,
        )
        timings["copy_members"] = time.perf_counter() - tick

        tick = time.perf_counter()
        await conn.execute("ALTER TABLE tiering.orders DROP CONSTRAINT pk_orders")
        await conn.execute("DROP INDEX tiering.ix_orders_member_time_amounts")
        done = 0
        for batch in _orders(ids, orders, now, rng):
            await conn.copy_records_to_table(
                "orders",
                schema_name="tiering",
                columns=[
                    "order_id",
                    "member_id",
                    "ordered_at",
                    "paid_fen",
                    "refunded_fen",
                    "growth",
                ],
                records=batch,
            )
            done += len(batch)
            sys.stderr.write(f"\r  loading orders {done:,}/{orders:,}")
        sys.stderr.write("\n")
        timings["copy_orders"] = time.perf_counter() - tick
        tick = time.perf_counter()
        # Orders are partitioned by month of ordered_at (migration 0011): the
        # months the load covers are made and its rows moved out of the default
        # (the claim_order_keys trigger wrote their keys during the copy).
        await ensure_partitions(conn, orders_table(), 0, clock=now)
        await conn.execute("SET maintenance_work_mem = '256MB'")
        await conn.execute(
            "ALTER TABLE tiering.orders ADD CONSTRAINT pk_orders PRIMARY KEY (order_id, ordered_at)"
        )
        await conn.execute(
            "CREATE INDEX ix_orders_member_time_amounts ON tiering.orders"
            " (member_id, ordered_at) INCLUDE (paid_fen, refunded_fen)"
        )
        timings["index_orders"] = time.perf_counter() - tick

        tick = time.perf_counter()
        # What the OrderCompleted consumer would have kept, derived set-based.
        await conn.execute(
            "INSERT INTO tiering.member_spend (member_id, total_paid_fen, order_count,"
            " last_order_at) SELECT member_id, sum(paid_fen), count(*), max(ordered_at)"
            " FROM tiering.orders GROUP BY member_id"
        )
        start, end = period_bounds(DEMO_PROGRAMME, now)
        await conn.execute(
            "INSERT INTO tiering.member_tiers (member_id, programme_id, programme_version,"
            " tier_code, base_tier, earned_tier, period_start, period_end, peak, evaluated_at)"
            " SELECT member_id, 'default', $1, 'regular', 'regular', 'regular', $2, $3, 0, $4"
            " FROM tiering.member_profiles",
            DEMO_PROGRAMME.version,
            start,
            end,
            now - timedelta(days=1),
        )
        await conn.execute("VACUUM ANALYZE tiering.orders")
        await conn.execute("VACUUM ANALYZE tiering.member_tiers")
        await conn.execute("VACUUM ANALYZE tiering.member_profiles")
        await conn.execute("VACUUM ANALYZE tiering.member_spend")
        timings["derive_state"] = time.perf_counter() - tick
    finally:
        await conn.close()
    return timings


def _row(name: str, result: RunResult) -> dict[str, Any]:
    return {
        "run": name,
        "seconds": round(result.seconds, 2),
        "members": result.members,
        "chunks": result.chunks,
        "tier_changes": result.tier_changes,
        "segment_changes": result.segment_changes,
        "stage_changes": result.stage_changes,
        "phases": {k: round(v, 2) for k, v in result.phases.items()},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    admin_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"loyalty_bench_tiering_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(asyncpg_dsn(admin_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = with_database(admin_url, name)
    try:
        await asyncio.to_thread(upgrade, "tiering", url)
        now = datetime.now(UTC).replace(microsecond=0)
        print(f"loading {args.members:,} members / {args.orders:,} orders into {name} ...")
        tick = time.perf_counter()
        load_timings = await load(url, args.members, args.orders, now, args.seed)
        load_seconds = time.perf_counter() - tick
        pool = await create_pool(url, min_size=1, max_size=max(args.workers, 1))
        db = Database(pool, "tiering", "tiering")
        rows = []
        try:
            for label, as_of in (
                ("first", now),
                ("steady", now + timedelta(minutes=1)),
                ("period end", _next_year(now)),
            ):
                result = await recompute(
                    db, now=as_of, chunk_size=args.chunk_size, workers=args.workers
                )
                rows.append(_row(label, result))
                print(f"  {label}: {result.seconds:.1f}s")
            outbox = await pool.fetchval("SELECT count(*) FROM tiering.outbox")
            history = await pool.fetchval("SELECT count(*) FROM tiering.tier_history")
            distribution = result.distribution
        finally:
            await db.close()
        return {
            "scenario": "tiering full recompute (tiers + RFM + lifecycle)",
            "database": "DATABASE_URL" if "DATABASE_URL" in os.environ else "default",
            "members": args.members,
            "orders": args.orders,
            "chunk_size": args.chunk_size,
            "workers": args.workers,
            "load_average": os.getloadavg(),
            "load_seconds": round(load_seconds, 1),
            "load": {k: round(v, 1) for k, v in load_timings.items()},
            "runs": rows,
            "events_written": outbox,
            "history_rows": history,
            "distribution_after": distribution,
            "target_seconds": 30,
            "note": "shared 2-core machine; figures are noisy",
        }
    finally:
        if not args.keep:
            admin = await asyncpg.connect(asyncpg_dsn(admin_url))
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


def _next_year(now: datetime) -> datetime:
    local = now.astimezone(SH)
    return datetime(local.year + 1, 1, 1, 1, 0, tzinfo=SH)


def _print(report: dict[str, Any]) -> None:
    print()
    print(
        f"tiering recompute: {report['members']:,} members, {report['orders']:,} orders"
        f" (load {report['load_seconds']}s: {report['load']})"
    )
    print(f"  {'run':<11} {'seconds':>8} {'tiers':>9} {'segments':>9} {'stages':>9}  phases")
    for r in report["runs"]:
        print(
            f"  {r['run']:<11} {r['seconds']:>8.1f} {r['tier_changes']:>9,}"
            f" {r['segment_changes']:>9,} {r['stage_changes']:>9,}  {r['phases']}"
        )
    worst = max(r["seconds"] for r in report["runs"])
    scale = 1_000_000 / max(report["members"], 1)
    print(
        f"  slowest run {worst:.1f}s (target <= {report['target_seconds']}s at 1M/10M;"
        f" linear scale-up from this size x{scale:.0f}: ~{worst * scale:.0f}s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiering", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--orders", type=int, default=10_000_000)
    parser.add_argument("--chunk-size", type=int, default=50_000)
    parser.add_argument(
        "--workers", type=int, default=2, help="connections taking chunks side by side"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args(argv)
    if args.members < 1 or args.orders < 0 or args.chunk_size < 1 or args.workers < 1:
        parser.error(
            "--members, --chunk-size and --workers must be at least 1, --orders at least 0"
        )
    report = asyncio.run(run(args))
    _print(report)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"tiering-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    print(f"  written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
