"""`python -m bench checkout-coupon`: the POS checkout with a coupon, through the gateway.

One checkout is what a till does when the member shows a coupon:
PosService.PreviewCheckout with the code (the exact discount, what to charge),
then PosService.CompleteOrder with the same code and the payable amount
(redeems it once, settles the order, earns points). Both calls go through the
POS gRPC door of the gateway with a store key (as bench/cli.py's checkout),
open loop at `--rate` checkouts/s (bench/loadgen.py: latency from the
scheduled start of the preview to the end of the completion). Budget: p99
<= 30 ms at 1,000 orders/s (docs/operations.md).

Measured in the same run, at the same rate, one after the other:
1. "no coupon": the same two calls for members without coupons (the preview
   finds none, the order redeems none): the checkout as it is without coupons;
2. "with coupon": each checkout uses its own coupon (a 满30减5 issued before
   the run; each member holds two, as a wallet does).
Every reply is checked: the discount taken is the coupon's, the payable the
preview quoted is what was paid.

Platform as real processes (as `make run`), against embedded servers or
DATABASE_URL/REDIS_URL (a throwaway database); JSON to
bench/results/checkout-coupon-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from devtools import devrun, supervisor
from servicekit.db import Database, create_pool

from .cli import (
    BENCH_DATA,
    GROSS_FEN,
    RESULTS_DIR,
    BenchInfra,
    UnexpectedReply,
    events_drained,
    identify_pool,
    platform_env,
    pos_channel,
    register_pos_key,
    run_and_report,
    say,
    started,
)
from .loadgen import RunResult, open_loop, percentile

# 满30减5 on the bench's one-line cart of GROSS_FEN (36 yuan).
THRESHOLD_FEN = 3000
DISCOUNT_FEN = 500
COUPONS_PER_MEMBER = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench checkout-coupon", description=__doc__)
    parser.add_argument("--rate", type=float, default=300.0, help="checkouts/s offered (300)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured run first (2)")
    parser.add_argument("--store-id", default=devrun.DEMO_STORE)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (5)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("rate", "seconds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def cart(code: str = "") -> dict[str, Any]:
    from loyalty.common.v1 import common_pb2
    from loyalty.pos.v1 import pos_pb2

    return {
        "channel": common_pb2.CHANNEL_STORE,
        "gross_amount_fen": GROSS_FEN,
        # Amounts before coupons (they add up to the gross).
        "lines": [
            pos_pb2.OrderLine(
                sku="MT-001",
                name="Jasmine milk tea",
                category="milk_tea",
                quantity=1,
                paid_amount_fen=GROSS_FEN,
            )
        ],
        "coupon_codes": [code] if code else [],
    }


def checkout_call(
    stub: Any,
    store_id: str,
    tag: str,
    timeout: float,
    wallet: Callable[[int], tuple[str, str]],
    discount_fen: int,
    steps: dict[str, list[float]] | None = None,
) -> Callable[[int], Awaitable[object]]:
    """Checkout i: preview, then complete at the payable the preview quoted.
    `steps` collects each call's own duration (from its send, not the schedule)."""
    from loyalty.pos.v1 import pos_pb2

    async def call(i: int) -> object:
        member_id, code = wallet(i)
        began = time.perf_counter()
        preview = await stub.PreviewCheckout(
            pos_pb2.PreviewCheckoutRequest(store_id=store_id, member_id=member_id, **cart(code)),
            timeout=timeout,
        )
        if preview.coupon_discount_fen != discount_fen:
            raise UnexpectedReply(f"preview discount {preview.coupon_discount_fen}")
        previewed = time.perf_counter()
        reply = await stub.CompleteOrder(
            pos_pb2.CompleteOrderRequest(
                store_id=store_id,
                pos_transaction_id=f"{tag}-{i}",
                member_id=member_id,
                paid_amount_fen=preview.payable_fen,
                **cart(code),
            ),
            timeout=timeout,
        )
        if reply.replayed or reply.coupon_discount_fen != discount_fen or reply.points_earned <= 0:
            raise UnexpectedReply(
                f"replayed={reply.replayed} discount={reply.coupon_discount_fen}"
                f" points={reply.points_earned}"
            )
        if steps is not None:
            steps["PreviewCheckout"].append(previewed - began)
            steps["CompleteOrder"].append(time.perf_counter() - previewed)
        return reply

    return call


def own_ms(seconds: list[float]) -> dict[str, float | None]:
    ordered = sorted(seconds)
    return {
        p: None if (v := percentile(ordered, q)) is None else round(v * 1000, 2)
        for p, q in (("p50", 50), ("p99", 99))
    }


async def issue_wallets(
    database_url: str, template_id: str, count: int, tag: str, member_ids: list[str]
) -> list[tuple[str, str]]:
    """`count` coupons, COUPONS_PER_MEMBER per member, issued through the use
    case itself (in-process: setup, not measured); (member, code) pairs. The
    members are real (enrolled at the till): checkout refuses unknown ids."""
    from services.rewards.coupons import handlers as svc

    members = [uuid.UUID(m) for m in member_ids]
    assert len(members) * COUPONS_PER_MEMBER >= count, "enough members for the wallets"
    pool = await create_pool(database_url, 8, 8)
    db = Database(pool, "rewards", "rewards")
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> tuple[str, str]:
        member = members[i // COUPONS_PER_MEMBER]
        async with gate, db.unit_of_work() as uow:
            c = await svc.issue_coupon(
                uow.conn,
                template_id=template_id,
                member_id=member,
                reason="operator_grant",
                issue_key=f"{tag}-{i}",
                now=datetime.now(UTC),
                savepoint=False,
            )
        return c.member_id, c.code

    try:
        pairs = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await db.close()
    # Spread each member's coupons apart in time: one order per member at once.
    return pairs[0::COUPONS_PER_MEMBER] + pairs[1::COUPONS_PER_MEMBER]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loyalty.pos.v1 import pos_pb2_grpc
    from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc

    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    infra = await BenchInfra.start(run_id)
    report: dict[str, Any] = {"run_id": run_id, "started_at": started_at.isoformat()}
    per_phase = int(args.rate * args.seconds) + 1
    per_warmup = int(args.rate * args.warmup) + 1
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        ports = supervisor.free_ports()
        pos_target = f"{supervisor.LOOPBACK}:{ports['pos']}"
        api_key = await register_pos_key(infra, args.store_id)
        children = supervisor.platform_children(ports, platform_env(infra))
        template_id = f"BENCH-CHK-{run_id[-6:]}"
        async with started(children, BENCH_DATA / "logs" / run_id):
            rewards_target = f"{supervisor.LOOPBACK}:{ports['rewards']}"
            async with grpc.aio.insecure_channel(rewards_target) as rewards_channel:
                await rewards_pb2_grpc.RewardsServiceStub(rewards_channel).CreateCouponTemplate(
                    rewards_pb2.CreateCouponTemplateRequest(
                        template_id=template_id,
                        terms=rewards_pb2.CouponTerms(
                            name="bench 满30减5",
                            kind="amount_off",
                            threshold_fen=THRESHOLD_FEN,
                            discount_fen=DISCOUNT_FEN,
                            valid_days=30,
                        ),
                        limits=rewards_pb2.CouponLimits(stock_shards=1),
                        status="active",
                    )
                )
            wanted = -(-(per_phase + per_warmup) // COUPONS_PER_MEMBER)
            say(f"enrolling {wanted} members at the till ...")
            # CompleteOrder refuses member ids member does not know.
            pool = await identify_pool(pos_target, args.store_id, wanted, api_key)
            say(f"issuing {per_phase + per_warmup} coupons ...")
            wallets = await issue_wallets(
                infra.database_url, template_id, per_phase + per_warmup, f"{run_id}-issue", pool
            )
            warm_wallets, measured_wallets = wallets[:per_warmup], wallets[per_warmup:]
            async with pos_channel(pos_target, args.store_id, api_key) as channel:
                stub = pos_pb2_grpc.PosServiceStub(channel)

                def plain(i: int) -> tuple[str, str]:
                    # An enrolled member, without a coupon on this checkout.
                    return pool[i % len(pool)], ""

                results: list[RunResult] = []
                step_ms: dict[str, dict[str, dict[str, float | None]]] = {}
                for name, warm, measured, discount in (
                    ("checkout, no coupon", plain, plain, 0),
                    (
                        "checkout, with coupon",
                        lambda i: warm_wallets[i],
                        lambda i: measured_wallets[i],
                        DISCOUNT_FEN,
                    ),
                ):
                    if args.warmup:
                        await open_loop(
                            f"{name} warm-up",
                            checkout_call(
                                stub,
                                args.store_id,
                                f"{run_id}-w{discount}",
                                args.timeout,
                                warm,
                                discount,
                            ),
                            args.rate,
                            args.warmup,
                            timeout=args.timeout + 1.0,
                        )
                    # Not while the consumers still work off the issued
                    # coupons' or the previous row's events.
                    await events_drained(infra)
                    say(f"measuring {name}: {args.rate:g}/s for {args.seconds:g}s ...")
                    steps: dict[str, list[float]] = {"PreviewCheckout": [], "CompleteOrder": []}
                    result = await open_loop(
                        name,
                        checkout_call(
                            stub,
                            args.store_id,
                            f"{run_id}-m{discount}",
                            args.timeout,
                            measured,
                            discount,
                            steps,
                        ),
                        args.rate,
                        args.seconds,
                        timeout=args.timeout + 1.0,
                    )
                    lat = result.latency_ms()
                    say(
                        f"  {result.ok} ok, errors {result.errors or 'none'}, p50 {lat['p50']}"
                        f" ms, p99 {lat['p99']} ms, p99.9 {lat['p99.9']} ms"
                    )
                    results.append(result)
                    step_ms[name] = {k: own_ms(v) for k, v in steps.items()}
        report.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "config": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "cpus": os.cpu_count(),
                "load_average_at_end": os.getloadavg(),
                "infrastructure": infra.note,
                "runs": [r.summary() for r in results],
                # Each call's own duration (from its send), successful checkouts only.
                "calls_ms": step_ms,
            }
        )
        return report
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    done = run_and_report(
        run, args, lambda r: f"checkout-coupon-{r['run_id'].split('-')[0]}.json", default=str
    )
    if done is None:
        return 1
    report, path = done
    print(
        f"\n{'PreviewCheckout + CompleteOrder':<24}{'offered':>8}{'achieved':>10}{'errors':>7}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}"
    )
    for s in report["runs"]:
        lat = s["latency_ms"]
        errors = sum(s["errors_by_status"].values())
        print(
            f"{s['name']:<24}{s['offered_rate_per_s']:>8g}{s['achieved_rate_per_s']:>10.0f}"
            f"{errors:>7}{lat['p50'] or 0:>9.1f}{lat['p99'] or 0:>9.1f}{lat['p99.9'] or 0:>10.1f}"
        )
    print(
        f"{os.cpu_count()} CPUs, load average {report['load_average_at_end'][0]:.1f} at the end"
        f" (shared machine: figures are noisy). results: {path}"
    )
    for name, calls in report["calls_ms"].items():
        print(
            f"  {name}: "
            + ", ".join(f"{k} p50 {v['p50']} / p99 {v['p99']} ms" for k, v in calls.items())
        )
    ok = all(not s["errors_by_status"] for s in report["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
