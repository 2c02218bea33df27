"""`python -m bench mall`: points-mall exchanges of ONE hot item under load.

Every exchange of an item takes its row lock (the conditional stock UPDATE),
then the member's ledger lock, redeems points and writes the exchange, all in
one transaction: exchanges of one item are serialised on that row, so this is
the worst case (a flash sale). `--workers` clients call
RewardsService.ExchangeMallItem back to back (closed loop, unique keys) for
`--seconds` against a goods item with more stock than the run can sell, then
the run checks the promise: stock sold == exchanges written == redemptions.

Platform as real processes (as `make run`), against embedded servers or
DATABASE_URL/REDIS_URL (a throwaway database); JSON to bench/results/mall-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from devtools import devrun, supervisor
from servicekit.db import asyncpg_dsn

from .cli import BENCH_DATA, RESULTS_DIR, BenchInfra, platform_env, run_and_report, say, started
from .ledger import FUND_FEN, closed_loop, earn_call

PRICE = 10


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench mall", description=__doc__)
    parser.add_argument("--workers", type=int, default=32, help="exchange clients (32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured run (10)")
    parser.add_argument("--members", type=int, default=100, help="member pool (100)")
    parser.add_argument("--store-id", default=devrun.DEMO_STORE)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (5)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("workers", "seconds", "members"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc

    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    infra = await BenchInfra.start(run_id)
    report: dict[str, Any] = {"run_id": run_id, "started_at": started_at.isoformat()}
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        ports = supervisor.free_ports()
        rewards_target = f"{supervisor.LOOPBACK}:{ports['rewards']}"
        children = supervisor.platform_children(ports, platform_env(infra))
        async with started(children, BENCH_DATA / "logs" / run_id):
            # Rewards keys everything by member id: no need to enrol through member.
            members = [str(uuid.uuid4()) for _ in range(args.members)]
            async with grpc.aio.insecure_channel(rewards_target) as channel:
                stub = rewards_pb2_grpc.RewardsServiceStub(channel)
                fund = earn_call(stub, args.store_id, members, f"{run_id}-fund", 30, FUND_FEN)
                await asyncio.gather(*(fund(i) for i in range(len(members))))
                item = await stub.CreateMallItem(
                    rewards_pb2.CreateMallItemRequest(
                        item=rewards_pb2.MallItemInput(
                            name="bench cup",
                            kind="goods",
                            sku="BENCH-CUP",
                            points_price=PRICE,
                            stock_total=10_000_000,
                        ),
                        status="active",
                    )
                )

                def exchange(i: int) -> Any:
                    return stub.ExchangeMallItem(
                        rewards_pb2.ExchangeMallItemRequest(
                            member_id=members[i % len(members)],
                            item_id=item.item_id,
                            exchange_key=f"{run_id}-{i}",
                        ),
                        timeout=args.timeout,
                    )

                say(f"exchanges of one item: {args.workers} workers, {args.seconds:g}s ...")
                result = await closed_loop("ExchangeMallItem", exchange, args.workers, args.seconds)
        conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
        try:
            row = await conn.fetchrow(
                "SELECT i.stock_total - i.stock_remaining AS sold,"
                " (SELECT count(*) FROM rewards.mall_exchanges e WHERE e.item_id = i.id) AS exchanges,"
                " (SELECT count(*) FROM rewards.points_transactions t"
                "  WHERE t.kind = 'redeem' AND t.reference = 'mall:' || i.id::text) AS redemptions"
                " FROM rewards.mall_items i WHERE i.id = $1",
                uuid.UUID(item.item_id),
            )
        finally:
            await conn.close()
        check = dict(row) if row else {}
        report.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "config": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "cpus": os.cpu_count(),
                "infrastructure": infra.note,
                "exchanges": result,
                "check": check,
                "consistent": check.get("sold") == check.get("exchanges") == result["ok"]
                and check.get("redemptions") == result["ok"],
            }
        )
        return report
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    done = run_and_report(
        run, args, lambda r: f"mall-{r['run_id'].split('-')[0]}.json", default=str
    )
    if done is None:
        return 1
    report, path = done
    e = report["exchanges"]
    print(
        f"\nexchanges of one item: {e['per_s']}/s, p99 {e['p99_ms']} ms ({e['ok']} ok,"
        f" {e['errors']} errors); sold/exchanges/redemptions {report['check']}:"
        f" {'consistent' if report['consistent'] else 'INCONSISTENT'}"
    )
    print(f"{os.cpu_count()} CPUs, shared machine: figures are noisy. results: {path}")
    return 0 if report["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
