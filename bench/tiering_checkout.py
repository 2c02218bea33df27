"""`python -m bench tiering_checkout`: POS checkout p99 before and during the
full tiering recompute (the issue's "checkout p99 under load during the
recompute no worse than 2x its normal value").

1. A throwaway database (DATABASE_URL's server, or embedded), every service
   migrated and seeded, then the tiering brand of `bench.tiering` COPY-loaded
   (--members / --orders, default 1M / 10M).
2. The platform as real processes (`make run`'s).
3. Before: rewards' CompleteOrder (the checkout's settlement: order, journal,
   balance, outbox in one transaction) at --rate per second for --duration
   seconds (open loop, after a warm-up), called on the rewards service itself:
   what the recompute competes with is the database and the CPU, and the
   gateway's own cost does not change with it (the gateway now needs POS store
   keys, which bench.cli does not send yet).
4. During: the batch recompute runs as its own process
   (`python -m services.tiering recompute`: first as of now, then steady (a
   minute later, nothing due: the nightly case) once per `--workers` value, then
   as of the next period end), while the same checkout load runs in 2-second
   slices until it finishes; only slices that started while it ran are counted.
5. After: the same load again. Normal = before and after together (one
   window alone can catch another process's burst on a shared machine).
6. Prints the p99s and the ratio during / normal per recompute; writes
   bench/results/tiering-checkout-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc

from devtools import devrun, supervisor
from servicekit.db import asyncpg_dsn

from .cli import (
    GROSS_FEN,
    PAID_FEN,
    RESULTS_DIR,
    ROOT,
    BenchInfra,
    UnexpectedReply,
    backstop,
    measure,
    platform_env,
    say,
)
from .loadgen import RunResult, open_loop
from .tiering import _next_year, load

SLICE_S = 2.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench tiering_checkout", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--members", type=int, default=1_000_000, help="tiering members loaded")
    parser.add_argument("--orders", type=int, default=10_000_000, help="tiering orders loaded")
    parser.add_argument("--rate", type=float, default=100.0, help="checkouts per second")
    parser.add_argument("--duration", type=float, default=20.0, help="normal phase, seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="gRPC deadline, seconds")
    parser.add_argument("--pool", type=int, default=200, help="members who check out")
    parser.add_argument("--store-id", default="SH001")
    parser.add_argument("--chunk-size", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--pause-ms", type=int, default=0, help="the recompute's sleep between chunks"
    )
    parser.add_argument(
        "--workers",
        default="2,1",
        help="the recompute's connections, comma-separated: the first runs the first and"
        " the period-end recomputes; the steady recompute runs once per value (A/B)",
    )
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error("--workers: comma-separated integers, e.g. 2,1")
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers: each at least 1")
    if args.members < 1 or args.orders < 0 or args.rate <= 0 or args.duration <= 0:
        parser.error("--members, --rate and --duration must be positive, --orders >= 0")
    return args


def checkout_call(
    stub: Any, store_id: str, members: list[str], tag: str, timeout: float
) -> Callable[[int], Awaitable[object]]:
    from loyalty.common.v1 import common_pb2
    from loyalty.rewards.v1 import rewards_pb2

    async def call(i: int) -> object:
        reply = await stub.CompleteOrder(
            rewards_pb2.CompleteOrderRequest(
                store_id=store_id,
                pos_transaction_id=f"{tag}-{i}",
                member_id=members[i % len(members)],
                channel=common_pb2.CHANNEL_STORE,
                paid_amount_fen=PAID_FEN,
                gross_amount_fen=GROSS_FEN,
                lines=[
                    rewards_pb2.OrderLine(
                        sku="MT-001",
                        name="Jasmine milk tea",
                        category="milk_tea",
                        quantity=1,
                        paid_amount_fen=PAID_FEN,
                    )
                ],
            ),
            timeout=timeout,
        )
        if reply.replayed or reply.points_earned <= 0:
            raise UnexpectedReply(f"replayed={reply.replayed} points={reply.points_earned}")
        return reply

    return call


def merged(name: str, rate: float, parts: list[RunResult]) -> RunResult:
    out = RunResult(name, rate, sum(p.duration_s for p in parts))
    for p in parts:
        out.scheduled += p.scheduled
        out.latencies += p.latencies
        out.statuses.update(p.statuses)
        out.send_lags += p.send_lags
        out.elapsed_s += p.elapsed_s
    return out


async def during_recompute(
    label: str,
    as_of: datetime,
    call_for: Callable[[str], Callable[[int], Awaitable[object]]],
    args: argparse.Namespace,
    env: dict[str, str],
    database_url: str,
    workers: int,
) -> tuple[RunResult, float, str]:
    """Checkout slices while `python -m services.tiering recompute` runs: from
    its recompute_runs row (the process's start-up is not counted) to its end."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    last_run = await conn.fetchval("SELECT coalesce(max(run_id), 0) FROM tiering.recompute_runs")
    command = [
        sys.executable,
        "-m",
        "services.tiering",
        "recompute",
        "--quiet",
        "--chunk-size",
        str(args.chunk_size),
        "--pause-ms",
        str(args.pause_ms),
        "--workers",
        str(workers),
        "--as-of",
        as_of.isoformat(),
    ]
    say(f"recompute ({label}) with checkout at {args.rate:g}/s alongside ...")
    process = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    done = asyncio.create_task(process.communicate())
    try:
        while not done.done():
            started = await conn.fetchval(
                "SELECT count(*) FROM tiering.recompute_runs WHERE run_id > $1", last_run
            )
            if started:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    tick = time.perf_counter()
    parts: list[RunResult] = []
    n = 0
    while not done.done():
        parts.append(
            await open_loop(
                f"during {label}",
                call_for(f"{label}-{n}"),
                args.rate,
                SLICE_S,
                timeout=backstop(args),
            )
        )
        n += 1
    output, _ = await done
    seconds = time.perf_counter() - tick
    if process.returncode != 0:
        raise supervisor.DevrunError(f"recompute failed:\n{output.decode(errors='replace')}")
    lines = output.decode(errors="replace").strip().splitlines()
    # The CLI's "run N: ..." line (warnings, e.g. a chunk retried, come before it).
    summary = [line for line in lines if line.startswith("run ")] or lines or [""]
    for line in lines:
        if not line.startswith("run ") and "attempt" in line:
            say(f"  recompute: {line}")
    say(f"  {summary[0]} ({seconds:.1f}s wall)")
    during = merged(f"checkout during recompute ({label})", args.rate, parts)
    # Said as it is measured: a later phase that fails does not lose this one.
    lat = during.latency_ms()
    say(f"  checkout during it: p50 {lat['p50']} ms, p99 {lat['p99']} ms")
    return during, seconds, summary[0]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = ROOT / ".data" / "bench" / "logs" / run_id
    infra = await BenchInfra.start(run_id)
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        now = datetime.now(UTC).replace(microsecond=0)
        say(f"loading {args.members:,} tiering members / {args.orders:,} orders ...")
        loaded = await load(infra.database_url, args.members, args.orders, now, args.seed)
        ports = supervisor.free_ports()
        env = platform_env(infra)
        rewards_target = f"{supervisor.LOOPBACK}:{ports['rewards']}"
        platform = supervisor.Platform(supervisor.platform_children(ports, env), log_dir=log_dir)
        try:
            await platform.spawn()
            await platform.wait_ready(90)
            members = [str(uuid.uuid4()) for _ in range(args.pool)]
            async with grpc.aio.insecure_channel(rewards_target) as channel:
                from loyalty.rewards.v1 import rewards_pb2_grpc

                stub = rewards_pb2_grpc.RewardsServiceStub(channel)

                def call_for(phase: str) -> Callable[[int], Awaitable[object]]:
                    return checkout_call(
                        stub, args.store_id, members, f"{run_id}-{phase}", args.timeout
                    )

                before = await measure("checkout, before", call_for, args)
                runs = []
                # First and period end once (they change the data); the steady
                # recompute (the nightly case, nothing due) once per --workers value.
                main = args.workers[0]
                plan = [("first", now, main)]
                plan += [
                    ("steady", now + timedelta(minutes=1 + i), w)
                    for i, w in enumerate(args.workers)
                ]
                plan.append(("period end", _next_year(now), main))
                for label, as_of, workers in plan:
                    # Unique per run: the phase names the checkout's order ids.
                    name = f"{label} (workers {workers})"
                    during, seconds, summary = await during_recompute(
                        name, as_of, call_for, args, env, infra.database_url, workers
                    )
                    runs.append((name, during, seconds, summary))
                # Its own keys: the before phase's would replay.
                after = await measure("checkout, after", lambda ph: call_for(f"after-{ph}"), args)
        finally:
            await platform.stop()
        # Normal = the load before and after the recomputes together: on a shared
        # machine one window alone can catch someone else's burst.
        normal = merged("checkout, normal (before + after)", args.rate, [before, after])
        p99 = normal.latency_ms()["p99"]
        return {
            "scenario": "checkout (rewards CompleteOrder) p99 before and during the tiering"
            " recompute",
            "run_id": run_id,
            "infrastructure": infra.note,
            "members": args.members,
            "orders": args.orders,
            "rate_per_s": args.rate,
            "recompute_pause_ms": args.pause_ms,
            "recompute_workers": args.workers,
            "load_average_end": os.getloadavg(),
            "load_seconds": {k: round(v, 1) for k, v in loaded.items()},
            "normal": normal.summary(),
            "before": before.summary(),
            "after": after.summary(),
            "during": [
                {
                    "recompute": label,
                    "recompute_wall_seconds": round(seconds, 1),
                    "recompute_summary": summary,
                    "checkout": during.summary(),
                    "p99_ratio": (
                        round(during.latency_ms()["p99"] / p99, 2)  # type: ignore[operator]
                        if p99 and during.latency_ms()["p99"]
                        else None
                    ),
                }
                for label, during, seconds, summary in runs
            ],
            "target": "p99 during <= 2x normal",
        }
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report = asyncio.run(run(args))
    print()
    print(
        f"checkout at {report['rate_per_s']:g}/s, tiering {report['members']:,} members /"
        f" {report['orders']:,} orders"
    )
    print(f"  {'phase':<34} {'p50 ms':>8} {'p99 ms':>8} {'errors':>8}  ratio p99")
    for key in ("before", "after", "normal"):
        lat = report[key]["latency_ms"]
        print(f"  {key:<34} {lat['p50']:>8} {lat['p99']:>8} {'-':>8}")
    for d in report["during"]:
        lat = d["checkout"]["latency_ms"]
        errors = sum(d["checkout"]["errors_by_status"].values())
        name = f"during {d['recompute']} ({d['recompute_wall_seconds']}s)"
        print(f"  {name:<34} {lat['p50']:>8} {lat['p99']:>8} {errors:>8}  x{d['p99_ratio']}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"tiering-checkout-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    print(f"  written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
