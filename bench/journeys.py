"""`python -m bench.journeys`: the engagement scheduler draining N due steps.

Seeds a throwaway database (migrated engagement schema) with N due timers:
every member is enrolled in two journeys whose first step is a targeted WeCom
send, so each member's daily "1 targeted" budget is contested by two steps
(priority must win), and 10% of members have no marketing consent (their sends
must be suppressed). Then --workers sweepers (the service's own Scheduler, as
concurrent tasks on one pool) run until nothing is due while --dispatchers
dispatchers (the service's own, with the real WeCom provider) deliver the
sends through the WeCom fake (devtools/provider_fakes, in this process: its
CPU is counted too) until nothing is pending; the figure is due steps per
second including that dispatch. `--dispatchers 0` measures sweeping alone.
The result is checked in SQL and against the fake:

- every due step ran (no timer left, every enrollment completed);
- zero duplicate sends (at most one send row per enrollment and step);
- zero cap violations (at most one targeted send per member per local day);
- zero sends without consent;
- every send the sweep decided is settled: delivered, or `unknown` when the
  fake answered after the time-out (a loaded machine); WeCom tasks created are
  at least the delivered and at most delivered + unknown (never twice). A
  WeCom send is delivered when its task's result says the staff member sent
  it: after the timed run the fake's staff send every task and the results
  job (wecom_results.py) settles them.

Prints a table and writes bench/results/journeys-<UTC timestamp>.json.
Counts are a flag (--steps); report the size you ran. The machine may be
shared: the figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from devtools import embedded
from devtools.provider_fakes.stack import build_stack
from servicekit.db import Database, asyncpg_dsn, create_pool, with_database
from servicekit.migrations import upgrade
from services.engagement.channels import Dispatcher
from services.engagement.domain import FakeClock, QuietHours
from services.engagement.ports import LocalConsent
from services.engagement.providers import build_providers
from services.engagement.scheduler import JourneyCache, Scheduler
from services.engagement.settings import EngagementSettings
from services.engagement.wecom_results import build_wecom_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
# 10:00 in Shanghai: outside quiet hours, so every step is decided now.
NOW = datetime(2030, 3, 4, 2, 0, tzinfo=UTC)


def journey(journey_id: str, priority: int) -> dict[str, Any]:
    return {
        "id": journey_id,
        "priority": priority,
        "entry": {"event": "page_view"},
        "start": "s",
        "steps": {
            "s": {
                "type": "send",
                "channel": "wecom",
                "template": f"{journey_id}-offer",
                "text": "An offer for you",
                "class": "targeted",
                "next": "end",
            },
            "end": {"type": "exit"},
        },
    }


JOURNEYS = [journey("bench-low", 10), journey("bench-high", 90)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.journeys", description=__doc__)
    p.add_argument("--steps", type=int, default=1_000_000, help="due steps (1,000,000)")
    p.add_argument("--workers", type=int, default=4, help="concurrent sweepers (4)")
    p.add_argument("--batch", type=int, default=1000, help="steps claimed per transaction (1000)")
    p.add_argument("--no-consent-percent", type=int, default=10, help="members without consent")
    p.add_argument(
        "--dispatchers", type=int, default=2, help="dispatchers through the fakes (2; 0 = none)"
    )
    p.add_argument("--target-seconds", type=float, default=120.0)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--keep-database", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 2 or args.workers < 1 or args.batch < 1:
        p.error("--steps >= 2, --workers >= 1, --batch >= 1")
    return args


def say(message: str) -> None:
    print(f"bench.journeys | {message}", flush=True)


async def seed(conn: asyncpg.Connection, steps: int, no_consent_percent: int) -> int:
    members = [uuid.uuid4() for _ in range(steps // 2)]
    for n, doc in enumerate(JOURNEYS):
        await conn.execute(
            "INSERT INTO engagement.journeys (journey_id, version, definition, priority,"
            " entry_event) VALUES ($1, 1, $2::jsonb, $3, 'page_view')",
            doc["id"],
            json.dumps(doc),
            doc["priority"],
        )
        await conn.execute(
            "INSERT INTO engagement.journey_state (journey_id, live_version, entry_event, status)"
            " VALUES ($1, 1, 'page_view', 'active')",
            doc["id"],
        )
        del n
    await conn.copy_records_to_table(
        "member_facts",
        schema_name="engagement",
        columns=["member_id"],
        records=[(m,) for m in members],
    )
    cutoff = len(members) * no_consent_percent // 100
    await conn.copy_records_to_table(
        "consents",
        schema_name="engagement",
        columns=["member_id", "channel", "granted", "source", "updated_at"],
        records=[(m, "wecom", True, "bench", NOW) for m in members[cutoff:]],
    )
    due = NOW - timedelta(minutes=1)
    enrollments, timers = [], []
    for m in members:
        for doc in JOURNEYS:
            e = uuid.uuid4()
            enrollments.append((e, doc["id"], 1, m, "active", "treatment", 0, 7, due))
            timers.append((e, doc["id"], "s", due, doc["priority"]))
    await conn.copy_records_to_table(
        "enrollments",
        schema_name="engagement",
        columns=[
            "enrollment_id",
            "journey_id",
            "version",
            "member_id",
            "status",
            "grp",
            "seq",
            "conversion_days",
            "entered_at",
        ],
        records=enrollments,
    )
    await conn.copy_records_to_table(
        "timers",
        schema_name="engagement",
        columns=["enrollment_id", "journey_id", "step_id", "due_at", "priority"],
        records=timers,
    )
    # The WeCom contact of each member (what member would answer at send time).
    await conn.copy_records_to_table(
        "channel_addresses",
        schema_name="engagement",
        columns=["member_id", "channel", "address"],
        records=[(m, "wecom", f"wm-{m.hex[:16]}") for m in members],
    )
    await conn.execute("ANALYZE engagement.timers; ANALYZE engagement.enrollments;")
    return len(timers)


async def verify(conn: asyncpg.Connection) -> dict[str, int]:
    q = conn.fetchval
    return {
        "timers_left": await q("SELECT count(*) FROM engagement.timers"),
        "enrollments_not_completed": await q(
            "SELECT count(*) FROM engagement.enrollments WHERE status <> 'completed'"
        ),
        "send_rows": await q("SELECT count(*) FROM engagement.sends"),
        "sent": await q(
            "SELECT count(*) FROM engagement.sends WHERE status IN ('pending', 'sending',"
            " 'delivered', 'failed', 'unknown')"
        ),
        "delivered": await q("SELECT count(*) FROM engagement.sends WHERE status = 'delivered'"),
        # A slow answer on a loaded machine is `unknown` (at most once), not an error.
        "unknown": await q("SELECT count(*) FROM engagement.sends WHERE status = 'unknown'"),
        "not_settled": await q(
            "SELECT count(*) FROM engagement.sends WHERE status IN ('pending', 'sending', 'failed')"
        ),
        "capped": await q("SELECT count(*) FROM engagement.sends WHERE status = 'capped'"),
        "suppressed": await q("SELECT count(*) FROM engagement.sends WHERE status = 'suppressed'"),
        "duplicate_sends": await q(
            "SELECT count(*) FROM (SELECT enrollment_id, step_id FROM engagement.sends"
            " GROUP BY 1, 2 HAVING count(*) > 1) d"
        ),
        "cap_violations": await q(
            "SELECT count(*) FROM (SELECT member_id, local_day FROM engagement.sends"
            " WHERE status IN ('pending', 'sending', 'delivered') AND message_class = 'targeted'"
            " GROUP BY 1, 2 HAVING count(*) > 1) v"
        ),
        "sent_without_consent": await q(
            "SELECT count(*) FROM engagement.sends s"
            " WHERE s.status IN ('pending', 'sending', 'delivered') AND NOT EXISTS"
            " (SELECT 1 FROM engagement.consents c WHERE c.member_id = s.member_id"
            "  AND c.channel = s.channel AND c.granted)"
        ),
        # A lower-priority send that kept the slot. Without dispatch it must be
        # zero; with dispatch running alongside, a low send already delivered
        # before the high one was decided keeps its slot (docs/journeys.md:
        # "once delivered, a message is not taken back"), so it is reported.
        "low_priority_won": await q(
            "SELECT count(*) FROM engagement.sends s WHERE s.journey_id = 'bench-low'"
            " AND s.status IN ('pending', 'sending', 'delivered')"
        ),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"bench_journeys_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(asyncpg_dsn(base))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(base, name)
    try:
        await asyncio.to_thread(upgrade, "engagement", url)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        t0 = time.perf_counter()
        steps = await seed(conn, args.steps, args.no_consent_percent)
        say(f"seeded {steps:,} due steps in {time.perf_counter() - t0:.1f}s")
        pool = await create_pool(url, args.workers, args.workers + args.dispatchers + 1)
        db = Database(pool, "engagement", "engagement")
        clock = FakeClock(NOW)
        journeys = JourneyCache()
        sweepers = [
            Scheduler(
                db,
                clock,
                LocalConsent(),
                QuietHours(),
                journeys,
                batch_size=args.batch,
                wecom_sender="fallback-staff",
            )
            for _ in range(args.workers)
        ]
        fakes = build_stack(clock=lambda: clock.now().timestamp(), strict=False)
        await fakes.server.start()
        redis_url = os.environ.get("REDIS_URL")
        servers = (
            None if redis_url else await asyncio.to_thread(embedded.start, "bench", base, None)
        )
        redis = Redis.from_url(redis_url or (servers.redis_url if servers else ""))
        # As many connections as calls in flight (dispatchers x their batch).
        connections = max(1, args.dispatchers) * 200
        client = httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_connections=connections))
        settings = EngagementSettings(**fakes.settings(), redis_namespace=f"bench-{name}")
        providers = build_providers(settings, client, redis, clock)
        dispatchers = [
            Dispatcher(db, clock, providers, {}, batch_size=200) for _ in range(args.dispatchers)
        ]
        swept = asyncio.Event()

        async def sweep(s: Scheduler) -> None:
            await s.run_until_idle(max_batches=10**9)

        async def dispatch(d: Dispatcher) -> None:
            while True:
                n = await d.dispatch_once()
                if n == 0:
                    if swept.is_set() and await d.dispatch_once() == 0:
                        waiting = await pool.fetchval(
                            "SELECT count(*) FROM engagement.sends WHERE status = 'pending'"
                        )
                        if not waiting:
                            return
                        # Retries wait out their back-off on the service clock.
                        clock.advance(timedelta(minutes=10))
                    await asyncio.sleep(0.01)

        async def sweep_all() -> None:
            await asyncio.gather(*(sweep(s) for s in sweepers))
            swept.set()

        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            await asyncio.gather(sweep_all(), *(dispatch(d) for d in dispatchers))
            elapsed = time.perf_counter() - t0
            # This process's CPU (sweepers, dispatchers, providers and the fakes;
            # PostgreSQL's is not counted): steadier than wall time on a shared machine.
            cpu = time.process_time() - cpu0
            # The staff members send every task (the fake's confirm) and the
            # results job settles them, after the timed run.
            for msgid in list(fakes.wecom.tasks):
                fakes.wecom.confirm(msgid)
            results = build_wecom_results(settings, db, clock, providers)
            assert results is not None
            while await results.settle_once():
                pass
        finally:
            await client.aclose()
            await redis.aclose()
            await fakes.server.stop()
            if servers is not None:
                await asyncio.to_thread(servers.stop)
        await db.close()
        checks = await verify(conn)
        checks["provider_tasks"] = len(fakes.wecom.tasks)
        await conn.close()
    finally:
        if not args.keep_database:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    processed = sum(s.stats.steps for s in sweepers)
    ok = (
        checks["timers_left"] == 0
        and checks["enrollments_not_completed"] == 0
        and checks["duplicate_sends"] == 0
        and checks["cap_violations"] == 0
        and checks["sent_without_consent"] == 0
        and (args.dispatchers > 0 or checks["low_priority_won"] == 0)
        and (
            args.dispatchers == 0
            or (
                checks["not_settled"] == 0
                and checks["delivered"] + checks["unknown"] == checks["sent"]
                # Each send reached the provider at most once.
                and checks["delivered"]
                <= checks["provider_tasks"]
                <= checks["delivered"] + checks["unknown"]
            )
        )
    )
    return {
        "scenario": "journeys",
        "at": datetime.now(UTC).isoformat(),
        "steps": steps,
        "processed": processed,
        "workers": args.workers,
        "batch": args.batch,
        "dispatchers": args.dispatchers,
        "seconds": round(elapsed, 2),
        "process_cpu_seconds": round(cpu, 2),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "steps_per_second": round(processed / elapsed, 1) if elapsed else None,
        "target_seconds": args.target_seconds,
        "within_target": elapsed <= args.target_seconds * steps / 1_000_000,
        "checks": checks,
        # Batches rolled back by lock conflicts and swept again (not errors).
        "batch_conflicts": sum(s.stats.conflicts for s in sweepers),
        "correct": ok,
        "cpus": os.cpu_count(),
        "note": "shared machine; figures are noisy",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = asyncio.run(run(args))
    print()
    print(f"{'due steps':<28}{result['steps']:>14,}")
    print(f"{'sweepers x batch':<28}{result['workers']:>8} x {result['batch']:<4}")
    print(f"{'dispatchers (via fakes)':<28}{result['dispatchers']:>14}")
    print(f"{'seconds':<28}{result['seconds']:>14}")
    print(f"{'steps/s':<28}{result['steps_per_second']:>14,}")
    print(f"{'process CPU seconds':<28}{result['process_cpu_seconds']:>14}")
    print(f"{'load average (1 min)':<28}{result['load_average_1m']:>14}")
    print(f"{'batch conflicts (retried)':<28}{result['batch_conflicts']:>14,}")
    for key, value in result["checks"].items():
        print(f"{key:<28}{value:>14,}")
    scaled = args.target_seconds * result["steps"] / 1_000_000
    print(
        f"{'target (scaled to size)':<28}{scaled:>13.1f}s  {'met' if result['within_target'] else 'MISSED'}"
    )
    print(f"{'correct':<28}{result['correct']!s:>14}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"journeys-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
