"""`python -m bench coupons`: coupon issuance from ONE template, open loop.

Requests arrive at `--rate` per second for `--seconds` (bench/loadgen.py: no
coordinated omission), each RewardsService.IssueCoupon for a distinct member
and issue key, all from one template with a limited stock split over
`--shards` counter rows (the flash-claim case: every claim decrements the
same template's stock). Target: >= 3,000 issues/s. After the run the promise
is checked: coupons written == successful calls == stock taken, never more
than the stock.

Platform as real processes (as `make run`), against embedded servers or
DATABASE_URL/REDIS_URL (a throwaway database); JSON to
bench/results/coupons-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from servicekit import devrun
from servicekit.db import asyncpg_dsn

from .cli import BENCH_DATA, RESULTS_DIR, BenchInfra, platform_env, say, started
from .loadgen import open_loop


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench coupons", description=__doc__)
    parser.add_argument("--rate", type=float, default=3000.0, help="offered issues/s (3000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured run first (2)")
    parser.add_argument("--shards", type=int, default=16, help="stock counter rows (16)")
    parser.add_argument(
        "--stock-factor", type=float, default=2.0, help="stock = rate x seconds x this (2)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (5)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("rate", "seconds", "shards", "stock_factor"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc

    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    infra = await BenchInfra.start(run_id)
    report: dict[str, Any] = {"run_id": run_id, "started_at": started_at.isoformat()}
    stock = int(args.rate * (args.seconds + args.warmup) * args.stock_factor)
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        ports = devrun.free_ports()
        rewards_target = f"{devrun.LOOPBACK}:{ports['rewards']}"
        children = devrun.platform_children(ports, platform_env(infra))
        template_id = f"BENCH-{run_id[-6:]}"
        async with started(children, BENCH_DATA / "logs" / run_id):
            async with grpc.aio.insecure_channel(rewards_target) as channel:
                stub = rewards_pb2_grpc.RewardsServiceStub(channel)
                await stub.CreateCouponTemplate(
                    rewards_pb2.CreateCouponTemplateRequest(
                        template_id=template_id,
                        terms=rewards_pb2.CouponTerms(
                            name="bench 满99减30",
                            kind="amount_off",
                            threshold_fen=9900,
                            discount_fen=3000,
                            valid_days=30,
                        ),
                        limits=rewards_pb2.CouponLimits(
                            total_stock=stock, stock_shards=args.shards, per_member_limit=1
                        ),
                        status="active",
                    )
                )

                def issue(prefix: str) -> Any:
                    def call(i: int) -> Any:
                        return stub.IssueCoupon(
                            rewards_pb2.IssueCouponRequest(
                                template_id=template_id,
                                member_id=str(uuid.uuid4()),
                                reason="operator_grant",
                                issue_key=f"{run_id}-{prefix}-{i}",
                            ),
                            timeout=args.timeout,
                        )

                    return call

                if args.warmup:
                    say(f"warm-up {args.warmup:g}s at {args.rate:g}/s ...")
                    await open_loop("warmup", issue("w"), args.rate, args.warmup)
                say(
                    f"issuing from one template ({args.shards} shards): {args.rate:g}/s"
                    f" for {args.seconds:g}s ..."
                )
                result = await open_loop(
                    "IssueCoupon", issue("m"), args.rate, args.seconds, timeout=args.timeout
                )
        conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM rewards.coupons WHERE template_id = $1) AS coupons,"
                " (SELECT $2 - sum(remaining) FROM rewards.coupon_stock WHERE template_id = $1)"
                " AS stock_taken",
                template_id,
                stock,
            )
        finally:
            await conn.close()
        check = {k: int(v) for k, v in dict(row).items()} if row else {}
        summary = result.summary()
        report.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "config": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "stock": stock,
                "cpus": os.cpu_count(),
                "infrastructure": infra.note,
                "issue": summary,
                "check": check,
                # Warm-up and measured issues both took stock.
                "consistent": check.get("coupons") == check.get("stock_taken")
                and check.get("coupons", stock + 1) <= stock,
            }
        )
        return report
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    began = time.monotonic()
    try:
        report = asyncio.run(run(args))
    except devrun.DevrunError as exc:
        say(f"error: {exc}")
        return 1
    report["wall_time_s"] = round(time.monotonic() - began, 1)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"coupons-{report['run_id'].split('-')[0]}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    s = report["issue"]
    lat = s["latency_ms"]
    print(
        f"\nIssueCoupon from one template: offered {s['offered_rate_per_s']:g}/s, achieved"
        f" {s['achieved_rate_per_s']}/s ({s['ok']} ok, errors {s['errors_by_status']});"
        f" p50 {lat['p50']} ms, p99 {lat['p99']} ms; coupons/stock taken {report['check']}:"
        f" {'consistent' if report['consistent'] else 'INCONSISTENT'}"
    )
    print(f"{os.cpu_count()} CPUs, shared machine: figures are noisy. results: {path}")
    return 0 if report["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
