"""`python -m bench coupons`: coupon issuance from ONE template, open loop.

Requests arrive at each `--rate` per second for `--seconds` (bench/loadgen.py:
no coordinated omission), each RewardsService.IssueCoupon for a distinct member
and issue key, all from one template with a limited stock split over
`--shards` counter rows (the flash-claim case: every claim decrements the
same template's stock). Target: >= 3,000 issues/s. Several rates in one run
(`--rate 200 400 800`) show where it stops keeping up.

Bulk mode (`--bulk-rate`, batches per second, each of `--bulk-size` members,
default 4 x 1,000): RewardsService.IssueCoupons from the same template, open
loop, after the single-issue rates; its row reports coupons issued per second
(offered = batches/s x size), the latency of a whole batch and CPU per coupon.
The requests are built before the run, so the client's own cost of building
1,000 items does not count as latency. `--bulk-rate` with no value: no bulk.

At each rate, in the same run and against the same template:
- baseline "in-process": the very use case (handlers.issue_coupon_now, as
  the RPC calls it, the same SQL) called straight through an asyncpg pool of
  the service's size, without gRPC: the floor the database and the domain
  code set;
- baseline "empty gRPC": an empty unary call to a trivial server in its own
  process (bench/echo_server.py): the floor of one gRPC hop here.
CPU is counted per call (bench/cpu.py): every platform process (an issue's
CouponIssued is read by every consumer of rewards' stream: engagement,
guides, tiering and rewards' own), this run's PostgreSQL backends
(pg_stat_activity of its database; the shared WAL writer and checkpointer are
not counted), Redis and the load generator itself; "server" is all of it but
the load generator (the echo server alone for the empty call). `make profile
PROFILE=rewards BENCH_ARGS='coupons ...'` samples the measured issue runs.

After the run the promise is checked: coupons written == stock taken, never
more than the stock.

Platform as real processes (as `make run`), against embedded servers or
DATABASE_URL/REDIS_URL (a throwaway database); JSON to
bench/results/coupons-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from devtools import devrun, supervisor
from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.settings import ServiceSettings

from .cli import BENCH_DATA, RESULTS_DIR, BenchInfra, platform_env, run_and_report, say, started
from .cli import metered as metered_platform
from .cpu import LOAD_GENERATOR, POSTGRES, REDIS, CpuMeter
from .echo_server import METHOD as ECHO_METHOD
from .loadgen import RunResult, open_loop


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench coupons", description=__doc__)
    parser.add_argument(
        "--rate", type=float, nargs="+", default=[3000.0], help="offered issues/s, each (3000)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured run first (2)")
    parser.add_argument("--shards", type=int, default=16, help="stock counter rows (16)")
    parser.add_argument(
        "--stock-factor", type=float, default=2.0, help="stock = calls offered x this (2)"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (5)")
    parser.add_argument("--no-baselines", action="store_true", help="IssueCoupon only")
    parser.add_argument(
        "--bulk-rate",
        type=float,
        nargs="*",
        default=[4.0],
        help="IssueCoupons batches/s offered, each (4); none: no bulk run",
    )
    parser.add_argument("--bulk-size", type=int, default=1000, help="members per batch (1000)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("seconds", "shards", "stock_factor"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if any(r <= 0 for r in args.rate) or any(r <= 0 for r in args.bulk_rate):
        parser.error("--rate and --bulk-rate must be positive")
    if not 1 <= args.bulk_size <= 1000:
        parser.error("--bulk-size must be 1 to 1000 (IssueCoupons' limit)")
    return args


# ---- CPU accounting ------------------------------------------------------------------
# bench.cpu's meter: the platform's processes by name (or the echo server for
# the empty call), this database's PostgreSQL backends, Redis and the load
# generator; SERVER is the sum of all but the load generator.
SERVER = "server"


def with_server(cpu: dict[str, float]) -> dict[str, float]:
    out = dict(cpu)
    if SERVER not in out:
        out[SERVER] = round(out.get("total", 0.0) - out.get(LOAD_GENERATOR, 0.0), 3)
    return out


async def metered(
    meter: CpuMeter, name: str, call: Callable[[int], Awaitable[object]], rate: float, args: Any
) -> tuple[RunResult, dict[str, Any]]:
    before = await meter.snapshot()
    result = await open_loop(name, call, rate, args.seconds, timeout=args.timeout + 1.0)
    cpu = with_server(await meter.per_call(before, result.ok))
    lat = result.latency_ms()
    say(
        f"  {name}: {result.achieved_rate:.0f}/s ok of {rate:g}/s offered, errors"
        f" {result.errors or 'none'}, p50 {lat['p50']} ms, p99 {lat['p99']} ms;"
        f" CPU ms/issue {cpu}"
    )
    return result, cpu


async def measure_echo_cpu(
    monitor: asyncpg.Connection, args: argparse.Namespace, log_dir: Path
) -> tuple[RunResult, dict[str, Any]]:
    """The empty-gRPC baseline (as bench/cli.py's), with the echo server's CPU."""
    port = supervisor.free_port()
    echo = supervisor.Child(
        "echo",
        [sys.executable, "-m", "bench.echo_server", "--port", str(port)],
        supervisor.child_env(os.environ),
        grpc_target=f"{supervisor.LOOPBACK}:{port}",
    )
    async with (
        started([echo], log_dir),
        grpc.aio.insecure_channel(f"{supervisor.LOOPBACK}:{port}") as channel,
    ):
        ping = channel.unary_unary(ECHO_METHOD)

        def call(i: int) -> Awaitable[object]:
            return ping(b"", timeout=args.timeout)  # type: ignore[no-any-return]

        meter = CpuMeter({SERVER: echo.proc.pid} if echo.proc else {}, monitor)
        if args.warmup:
            await open_loop("warm-up", call, args.rate, args.warmup)
        return await metered(meter, "empty gRPC", call, args.rate, args)


# ---- bulk ------------------------------------------------------------------------------


async def run_bulk(
    stub: Any,
    template_id: str,
    prefix: str,
    rate: float,
    args: argparse.Namespace,
    *,
    seconds: float | None = None,
    meter: CpuMeter | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """IssueCoupons batches open loop at `rate` per second; a summary in
    coupons (offered and issued per second, refused), batch latency, and CPU
    per coupon issued when metered."""
    from loyalty.rewards.v1 import rewards_pb2

    seconds = seconds or args.seconds
    total = max(1, round(rate * seconds))
    requests = [
        rewards_pb2.IssueCouponsRequest(
            template_id=template_id,
            reason="operator_grant",
            issued_by="bench",
            items=[
                rewards_pb2.IssueCouponsItem(
                    member_id=str(uuid.uuid4()), issue_key=f"{prefix}-{i}-{k}"
                )
                for k in range(args.bulk_size)
            ],
        )
        for i in range(total)
    ]
    counted = {"issued": 0, "refused": 0}

    async def call(i: int) -> None:
        reply = await stub.IssueCoupons(requests[i], timeout=args.timeout)
        counted["issued"] += reply.issued
        counted["refused"] += reply.refused

    before = await meter.snapshot() if meter else None
    result = await open_loop("IssueCoupons", call, rate, seconds, timeout=args.timeout + 1.0)
    cpu = with_server(await meter.per_call(before, counted["issued"])) if meter and before else None
    summary = result.summary()
    summary.update(
        {
            "batch_size": args.bulk_size,
            "batches_offered_per_s": rate,
            "offered_rate_per_s": rate * args.bulk_size,
            # Coupons, not calls: what a campaign cares about.
            "achieved_rate_per_s": round(counted["issued"] / result.elapsed_s, 1),
            "coupons_issued": counted["issued"],
            "coupons_refused": counted["refused"],
        }
    )
    if meter:
        lat = result.latency_ms()
        say(
            f"  IssueCoupons: {summary['achieved_rate_per_s']:.0f} coupons/s issued of"
            f" {rate * args.bulk_size:g}/s offered ({result.ok} batches ok, errors"
            f" {result.errors or 'none'}, {counted['refused']} refused), batch p50"
            f" {lat['p50']} ms, p99 {lat['p99']} ms; CPU ms/coupon"
            f" {cpu or '?'}"
        )
    return summary, cpu


# ---- the run -------------------------------------------------------------------------


async def create_template(
    stub: Any, template_id: str, stock: int, shards: int, timeout: float | None = None
) -> None:
    """The bench's active template: `stock` coupons over `shards` stock rows, one per member."""
    from loyalty.rewards.v1 import rewards_pb2

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
                total_stock=stock, stock_shards=shards, per_member_limit=1
            ),
            status="active",
        ),
        timeout=timeout,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
    from services.rewards.coupons import handlers as svc

    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    infra = await BenchInfra.start(run_id)
    report: dict[str, Any] = {"run_id": run_id, "started_at": started_at.isoformat()}
    phases = 1 if args.no_baselines else 2
    bulk_coupons = sum(args.bulk_rate) * args.bulk_size * (args.seconds + args.warmup)
    stock = int(
        (sum(args.rate) * (args.seconds + args.warmup) * phases + bulk_coupons) * args.stock_factor
    )
    pool_size = ServiceSettings().db_pool_max
    steps: list[dict[str, Any]] = []
    bulk_steps: list[dict[str, Any]] = []
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        ports = supervisor.free_ports()
        rewards_target = f"{supervisor.LOOPBACK}:{ports['rewards']}"
        children = supervisor.platform_children(ports, platform_env(infra))
        template_id = f"BENCH-{run_id[-6:]}"
        monitor = await asyncpg.connect(asyncpg_dsn(infra.database_url))
        async with (
            started(children, log_dir) as platform,
            metered_platform(platform, infra) as meter,
        ):
            pool = await create_pool(infra.database_url, pool_size, pool_size)
            db = Database(pool, "rewards", "rewards")
            try:
                async with grpc.aio.insecure_channel(rewards_target) as channel:
                    stub = rewards_pb2_grpc.RewardsServiceStub(channel)
                    await create_template(stub, template_id, stock, args.shards)

                    def rpc(prefix: str) -> Callable[[int], Awaitable[object]]:
                        def call(i: int) -> Awaitable[object]:
                            return stub.IssueCoupon(  # type: ignore[no-any-return]
                                rewards_pb2.IssueCouponRequest(
                                    template_id=template_id,
                                    member_id=str(uuid.uuid4()),
                                    reason="operator_grant",
                                    issue_key=f"{run_id}-{prefix}-{i}",
                                ),
                                timeout=args.timeout,
                            )

                        return call

                    templates = svc.TemplateCache()

                    def in_process(prefix: str) -> Callable[[int], Awaitable[object]]:
                        # What the servicer does, minus gRPC and the protobuf mapping.
                        def call(i: int) -> Awaitable[object]:
                            return svc.issue_coupon_now(
                                db,
                                templates,
                                template_id=template_id,
                                member_id=uuid.uuid4(),
                                reason="operator_grant",
                                issue_key=f"{run_id}-{prefix}-{i}",
                                now=datetime.now(UTC),
                            )

                        return call

                    for rate in args.rate:
                        tag = f"{rate:g}"
                        say(f"rate {rate:g}/s ({args.shards} shards), {args.seconds:g}s each ...")
                        if args.warmup:
                            await open_loop("warm-up", rpc(f"w{tag}"), rate, args.warmup)
                        issue, issue_cpu = await metered(
                            meter, "IssueCoupon", rpc(f"m{tag}"), rate, args
                        )
                        step: dict[str, Any] = {
                            "rate": rate,
                            "issue": issue.summary(),
                            "issue_cpu": issue_cpu,
                        }
                        if not args.no_baselines:
                            if args.warmup:
                                await open_loop(
                                    "warm-up", in_process(f"bw{tag}"), rate, args.warmup
                                )
                            base, base_cpu = await metered(
                                meter, "in-process", in_process(f"b{tag}"), rate, args
                            )
                            step["in_process"] = base.summary()
                            step["in_process_cpu"] = base_cpu
                        steps.append(step)
                    for rate in args.bulk_rate:
                        say(
                            f"bulk {rate:g} batches/s x {args.bulk_size}"
                            f" ({rate * args.bulk_size:g} coupons/s offered), {args.seconds:g}s ..."
                        )
                        if args.warmup:
                            await run_bulk(
                                stub,
                                template_id,
                                f"{run_id}-bw{rate:g}",
                                rate,
                                args,
                                seconds=args.warmup,
                            )
                        bulk, bulk_cpu = await run_bulk(
                            stub, template_id, f"{run_id}-bm{rate:g}", rate, args, meter=meter
                        )
                        bulk_steps.append({"bulk": bulk, "bulk_cpu": bulk_cpu})
            finally:
                await db.close()
        if not args.no_baselines:
            for step in steps:
                echo_args = argparse.Namespace(
                    rate=step["rate"],
                    seconds=args.seconds,
                    warmup=args.warmup,
                    timeout=args.timeout,
                )
                echo, echo_cpu = await measure_echo_cpu(monitor, echo_args, log_dir)
                step["empty_grpc"], step["empty_grpc_cpu"] = echo.summary(), echo_cpu
        try:
            row = await monitor.fetchrow(
                "SELECT (SELECT count(*) FROM rewards.coupons WHERE template_id = $1) AS coupons,"
                " (SELECT $2 - sum(remaining) FROM rewards.coupon_stock WHERE template_id = $1)"
                " AS stock_taken",
                template_id,
                stock,
            )
        finally:
            await monitor.close()
        check = {k: int(v) for k, v in dict(row).items()} if row else {}
        report.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "config": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "stock": stock,
                "pool_size": pool_size,
                "cpus": os.cpu_count(),
                "load_average_at_end": os.getloadavg(),
                "infrastructure": infra.note,
                "steps": steps,
                "bulk_steps": bulk_steps,
                "check": check,
                # Warm-ups, baselines and measured issues all took stock.
                "consistent": check.get("coupons") == check.get("stock_taken")
                and check.get("coupons", stock + 1) <= stock,
            }
        )
        return report
    finally:
        await infra.cleanup()


def row(name: str, s: dict[str, Any], cpu: dict[str, Any] | None) -> str:
    lat = s["latency_ms"]
    per = cpu or {}
    others = {
        k: v
        for k, v in per.items()
        if k not in (SERVER, POSTGRES, REDIS, LOAD_GENERATOR, "total") and v >= 0.005
    }
    cpu_text = (
        f"  server {per.get(SERVER, 0.0):.2f} ="
        + "".join(f" {k} {v:.2f} +" for k, v in others.items())
        + f" pg {per.get(POSTGRES, 0.0):.2f} + redis {per.get(REDIS, 0.0):.2f};"
        f" client {per.get(LOAD_GENERATOR, 0.0):.2f}"
        if per
        else ""
    )
    errors = sum(s["errors_by_status"].values())
    return (
        f"{name:<13}{s['offered_rate_per_s']:>8g}{s['achieved_rate_per_s']:>10.0f}{errors:>7}"
        f"{lat['p50'] or 0:>10.1f}{lat['p99'] or 0:>10.1f}{cpu_text}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    done = run_and_report(
        run, args, lambda r: f"coupons-{r['run_id'].split('-')[0]}.json", default=str
    )
    if done is None:
        return 1
    report, path = done
    print(
        f"\n{'':<13}{'offered':>8}{'achieved':>10}{'errors':>7}{'p50 ms':>10}{'p99 ms':>10}"
        "  CPU ms per issue"
    )
    for step in report["steps"]:
        print(row("IssueCoupon", step["issue"], step["issue_cpu"]))
        if "in_process" in step:
            print(row("in-process", step["in_process"], step["in_process_cpu"]))
        if "empty_grpc" in step:
            print(row("empty gRPC", step["empty_grpc"], step["empty_grpc_cpu"]))
    for step in report["bulk_steps"]:
        # Rates in coupons/s; latency and errors per batch of bulk_size.
        print(
            row("IssueCoupons", step["bulk"], step["bulk_cpu"])
            + f"  (batches of {step['bulk']['batch_size']}, latency per batch)"
        )
    print(
        f"coupons/stock taken {report['check']}:"
        f" {'consistent' if report['consistent'] else 'INCONSISTENT'}"
    )
    print(
        f"{os.cpu_count()} CPUs, load average {report['load_average_at_end'][0]:.1f} at the end"
        f" (shared machine: figures are noisy). results: {path}"
    )
    return 0 if report["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
