"""`python -m bench.ledger`: the points ledger under load, each figure next to
the raw-asyncpg baseline of the same SQL, measured in the same run.

1. Earn throughput through the rewards service: `--workers` clients call
   RewardsService.CompleteOrder back to back (closed loop, a unique order each)
   for `--duration` seconds; earns/s = completed orders per second. Baseline:
   the same statements (claim, earn, outbox) through one asyncpg pool with the
   same number of workers (bench/sql_baseline.py).
2. Checkout with points through the gateway: PosService.CompleteOrder that
   earns and redeems `--redeem` points, open loop at `--rate` per second;
   latency percentiles from the scheduled send time. Baseline: the same SQL
   (claim, member lock + lazy expiry + redemption posting, earn, outbox) at the
   same rate through asyncpg.

Members are funded first (one large order each) so redemptions never run dry.
The platform runs as real processes (as `make run`), against embedded servers
or DATABASE_URL/REDIS_URL (a throwaway database and namespace); JSON goes to
bench/results/ledger-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform as pyplatform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from devtools import devrun, supervisor
from servicekit.settings import ServiceSettings

from .cli import (
    BENCH_DATA,
    RESULTS_DIR,
    BenchInfra,
    identify_pool,
    measure,
    platform_env,
    pos_channel,
    ratio,
    register_pos_key,
    run_and_report,
    say,
    server_version,
    started,
    table,
)
from .loadgen import RunResult
from .sql_baseline import RewardsSqlBaseline

FUND_FEN = 1_000_000  # ¥10,000: 10,000 points per member before measuring


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--workers", type=int, default=64, help="earn clients (64)")
    parser.add_argument("--earn-seconds", type=float, default=10.0, help="earn run (10)")
    parser.add_argument("--rate", type=float, default=1000.0, help="checkouts/s (1000)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds (15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds (3)")
    parser.add_argument("--members", type=int, default=200, help="member pool (200)")
    parser.add_argument("--redeem", type=int, default=5, help="points per checkout (5)")
    parser.add_argument("--store-id", default=devrun.DEMO_STORE)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (5)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("workers", "earn_seconds", "rate", "duration", "members", "redeem"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


async def closed_loop(
    name: str, call: Callable[[int], Awaitable[object]], workers: int, seconds: float
) -> dict[str, Any]:
    """`workers` callers back to back for `seconds`: completions per second."""
    counter = iter(range(10**12))
    done = errors = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                await call(next(counter))
            except Exception:
                errors += 1
            else:
                done += 1
                latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None
    result = {
        "name": name,
        "workers": workers,
        "elapsed_s": round(elapsed, 2),
        "ok": done,
        "errors": errors,
        "per_s": round(done / elapsed, 1),
        "p99_ms": round(p99, 2) if p99 is not None else None,
    }
    say(f"  {name}: {result['per_s']}/s ({done} ok, {errors} errors, p99 {result['p99_ms']} ms)")
    return result


def earn_call(
    stub: Any, store_id: str, members: list[str], tag: str, timeout: float, paid: int = 3200
) -> Callable[[int], Awaitable[object]]:
    from loyalty.common.v1 import common_pb2
    from loyalty.rewards.v1 import rewards_pb2

    def call(i: int) -> Awaitable[object]:
        return stub.CompleteOrder(  # type: ignore[no-any-return]
            rewards_pb2.CompleteOrderRequest(
                store_id=store_id,
                pos_transaction_id=f"{tag}-{i}",
                member_id=members[i % len(members)],
                channel=common_pb2.CHANNEL_STORE,
                paid_amount_fen=paid,
                gross_amount_fen=paid + 400,
            ),
            timeout=timeout,
        )

    return call


def checkout_call(
    stub: Any, store_id: str, members: list[str], tag: str, redeem: int, timeout: float
) -> Callable[[int], Awaitable[object]]:
    from loyalty.pos.v1 import pos_pb2

    def call(i: int) -> Awaitable[object]:
        return stub.CompleteOrder(  # type: ignore[no-any-return]
            pos_pb2.CompleteOrderRequest(
                store_id=store_id,
                pos_transaction_id=f"{tag}-{i}",
                member_id=members[i % len(members)],
                paid_amount_fen=3200,
                gross_amount_fen=3600,
                points_to_redeem=redeem,
            ),
            timeout=timeout,
        )

    # A checkout that cannot redeem fails (FAILED_PRECONDITION), counted as an error.
    return call


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loyalty.pos.v1 import pos_pb2_grpc
    from loyalty.rewards.v1 import rewards_pb2_grpc

    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    infra = await BenchInfra.start(run_id)
    pool_size = ServiceSettings().db_pool_max
    report: dict[str, Any] = {"run_id": run_id, "started_at": started_at.isoformat()}
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        ports = supervisor.free_ports()
        base = platform_env(infra)
        pos_target = f"{supervisor.LOOPBACK}:{ports['pos']}"
        rewards_target = f"{supervisor.LOOPBACK}:{ports['rewards']}"
        api_key = await register_pos_key(infra, args.store_id)
        async with started(supervisor.platform_children(ports, base), log_dir):
            members = await identify_pool(pos_target, args.store_id, args.members, api_key)
            async with (
                grpc.aio.insecure_channel(rewards_target) as rch,
                pos_channel(pos_target, args.store_id, api_key) as pch,
            ):
                rewards = rewards_pb2_grpc.RewardsServiceStub(rch)
                pos = pos_pb2_grpc.PosServiceStub(pch)
                fund = earn_call(rewards, args.store_id, members, f"{run_id}-fund", 30, FUND_FEN)
                await asyncio.gather(*(fund(i) for i in range(len(members))))
                say(f"funded {len(members)} members")

                say(f"earns through rewards: {args.workers} workers, {args.earn_seconds:g}s ...")
                earn = earn_call(rewards, args.store_id, members, f"{run_id}-e", args.timeout)
                await closed_loop("warm-up", earn, args.workers, min(args.warmup, 3))
                earn = earn_call(rewards, args.store_id, members, f"{run_id}-E", args.timeout)
                earns = await closed_loop(
                    "earn via rewards gRPC", earn, args.workers, args.earn_seconds
                )

                def pos_for(phase: str) -> Callable[[int], Awaitable[object]]:
                    return checkout_call(
                        pos, args.store_id, members, f"{run_id}-c{phase}", args.redeem, args.timeout
                    )

                checkout = await measure("POS CompleteOrder + redeem via gateway", pos_for, args)

        sql_earn = await RewardsSqlBaseline.connect(
            infra.database_url, args.store_id, members, f"{run_id}-sql-e", pool_size
        )
        try:
            say("baseline: earn SQL via asyncpg ...")
            earn_sql = await closed_loop(
                "earn SQL via asyncpg",
                lambda i: sql_earn.complete_order(f"{run_id}-sql-e-{i}", i),
                args.workers,
                args.earn_seconds,
            )
        finally:
            await sql_earn.close()
        sql_checkout = await RewardsSqlBaseline.connect(
            infra.database_url,
            args.store_id,
            members,
            f"{run_id}-sql-c",
            pool_size,
            points_to_redeem=args.redeem,
        )
        try:
            checkout_sql = await measure(
                "baseline: checkout + redeem SQL via asyncpg", sql_checkout.call_for, args
            )
        finally:
            await sql_checkout.close()

        results: list[RunResult] = [checkout, checkout_sql]
        report.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "config": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": pyplatform.platform(),
                    "python": pyplatform.python_version(),
                    "postgres": await server_version(infra.database_url),
                    "infrastructure": infra.note,
                },
                "earn_throughput": {
                    "service": earns,
                    "sql_baseline": earn_sql,
                    "service_over_baseline": ratio(earns["per_s"], earn_sql["per_s"]),
                    "target_per_s": 5000,
                },
                "checkout_with_points": {
                    "service": checkout.summary(),
                    "sql_baseline": checkout_sql.summary(),
                    "p99_ratio": ratio(
                        checkout.latency_ms()["p99"], checkout_sql.latency_ms()["p99"]
                    ),
                    "target_p99_ms": 30,
                },
                "logs": str(log_dir),
            }
        )
        report["_table"] = table(results)
        return report
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        done = run_and_report(run, args, lambda r: f"ledger-{r['run_id'].split('-')[0]}.json")
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    if done is None:
        return 1
    report, path = done
    e = report["earn_throughput"]
    c = report["checkout_with_points"]
    print(
        f"earns/s via rewards: {e['service']['per_s']} (SQL baseline {e['sql_baseline']['per_s']},"
        f" ratio x{e['service_over_baseline']}; target >= {e['target_per_s']})"
    )
    print(
        f"checkout + redeem p99: {c['service']['latency_ms']['p99']} ms at {args.rate:g}/s"
        f" (SQL baseline {c['sql_baseline']['latency_ms']['p99']} ms, ratio x{c['p99_ratio']};"
        f" target <= {c['target_p99_ms']} ms)"
    )
    print(f"{os.cpu_count()} CPUs, shared machine: figures are noisy. results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
