"""`make bench BENCH_ARGS='knees'`: the latency knee of each hot path, and p99
at 70% of it (issue 19: "p99 <= 30 ms up to 70% of the measured knee on this
machine, for each path; report the knee").

One platform start (as `make bench`: real processes, a throwaway database and
Redis namespace), then for each path in --paths, one after the other:

- checkout: POS CompleteOrder through the gateway (a new transaction each);
- identify: POS IdentifyMember of a known member through the gateway;
- member-centre: `GET /v1/members/{id}/centre` over HTTP through the gateway,
  signed by a mini-program backend and member-asserted;
- coupon-issue: RewardsService.IssueCoupon from one sharded template, a new
  member and issue key each (as bench/coupons.py);
- empty-grpc, only when named (not in `all`): an empty unary call to the echo
  server in its own process (bench/echo_server.py), the same-run floor; each
  path's knee is reported over its knee too.

For each: an unmeasured warm-up at the first rate, then the open-loop rate
(bench/loadgen.py) steps up geometrically (--start-rate x --factor ...) until
a rate's p99 passes --slo-ms, it has an error, or it achieves less than 98%
of the offered rate, in each of 1 + --retries runs (one run can fail on
another process's burst on a shared machine). When the first rate fails, the
rate steps down (x 1/factor^2, to --min-rate) until one holds. The knee is
the highest rate that held with no lower rate failing (bench/stepping.py,
shared with scaleout and the checkout probe). Then --check-seconds at
--check-fraction (70%) of the knee: its p99 (target <= --slo-ms, no errors,
achieved within 2%) and CPU ms per call by process (bench/cpu.py), as
measured and marginal (each process's idle CPU, measured once before the
paths, taken off).

Consumers' backlogs are drained between steps and before each check, so a
step does not pay for the one before. The knee is this machine's, at this
moment: on a shared machine it moves with the load (the report records the
load average at the start and end of each path). JSON to
bench/results/knees-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx

from devtools import devrun, supervisor

from .cli import (
    BENCH_DATA,
    RESULTS_DIR,
    BenchInfra,
    backstop,
    events_drained,
    identify_pool,
    machine,
    metered,
    platform_env,
    pos_channel,
    register_pos_key,
    run_and_report,
    say,
    server_version,
    slice_call,
    started,
)
from .coupons import create_template
from .cpu import CpuMeter, cpu_table, marginal
from .echo_server import METHOD as ECHO_METHOD
from .identify import pos_identify_call
from .loadgen import RunResult, open_loop
from .member_centre import centre_call, enrol, register_miniprogram, signed_get
from .stepping import (
    Criteria,
    Step,
    falling_rates,
    geometric_rates,
    holds,
    step_line,
    step_up,
)

PATHS = ("checkout", "identify", "member-centre", "coupon-issue")
# The floor, asked for by name (not in `all`): an empty unary call to a trivial
# gRPC server in its own process (bench/echo_server.py). Its knee in the same
# run says how much of a path's knee the machine itself sets.
EMPTY = "empty-grpc"
LABELS = {
    EMPTY: "empty gRPC unary (echo server)",
    "checkout": "POS CompleteOrder via gateway",
    "identify": "POS IdentifyMember via gateway",
    "member-centre": "member centre GET .../centre",
    "coupon-issue": "rewards IssueCoupon",
}
# Achieved must be within 2% of offered for a step (and the check) to hold.
ACHIEVED_TOLERANCE = 0.02
STOCK_SHARDS = 16

CallFor = Callable[[str], Callable[[int], Awaitable[object]]]


def parse_paths(text: str) -> list[str]:
    """`--paths`: comma-separated names from PATHS and EMPTY (`all`: PATHS), in
    the order given."""
    names: list[str] = []
    for name in (n.strip().replace("_", "-") for n in text.split(",") if n.strip()):
        names += PATHS if name == "all" else [name]
    unknown = [n for n in names if n not in (*PATHS, EMPTY)]
    if unknown or not names:
        raise ValueError(
            f"unknown path(s) {', '.join(unknown) or '(none given)'}; choose from"
            f" {', '.join(PATHS)}, {EMPTY} or all"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench knees",
        description="The latency knee of each hot path, then p99 and CPU per call at 70% of it.",
    )
    parser.add_argument(
        "--paths",
        default="all",
        help=f"comma-separated, of {', '.join(PATHS)} (all) and {EMPTY} (the floor)",
    )
    parser.add_argument("--slo-ms", type=float, default=30.0, help="p99 a step must keep (30)")
    parser.add_argument("--start-rate", type=float, default=25.0, help="first step, calls/s (25)")
    parser.add_argument("--factor", type=float, default=1.25, help="rate step factor (1.25)")
    parser.add_argument("--max-rate", type=float, default=3000.0, help="last step at most (3000)")
    parser.add_argument(
        "--min-rate",
        type=float,
        default=5.0,
        help="when the first step fails, step down (x 1/factor^2) to this (5)",
    )
    parser.add_argument("--step-seconds", type=float, default=4.0, help="seconds per step (4)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument(
        "--retries", type=int, default=1, help="runs more of a rate that failed, once drained (1)"
    )
    parser.add_argument(
        "--check-fraction", type=float, default=0.7, help="check at this x the knee (0.7)"
    )
    parser.add_argument(
        "--check-seconds", type=float, default=10.0, help="seconds of the check (10)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=3.0, help="idle CPU measured first (3)"
    )
    parser.add_argument("--members", type=int, default=100, help="member pool size (100)")
    parser.add_argument("--store-id", default=devrun.DEMO_STORE, help="demo store (SH001)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request deadline (5 s)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    try:
        args.path_names = parse_paths(args.paths)
    except ValueError as exc:
        parser.error(f"--paths: {exc}")
    for name in (
        "slo_ms",
        "start_rate",
        "step_seconds",
        "check_seconds",
        "idle_seconds",
        "timeout",
    ):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not args.factor > 1:
        parser.error(f"--factor must be above 1, got {args.factor:g}")
    if args.max_rate < args.start_rate:
        parser.error(f"--max-rate ({args.max_rate:g}) is below --start-rate ({args.start_rate:g})")
    if not 0 < args.check_fraction <= 1:
        parser.error(f"--check-fraction must be in (0, 1], got {args.check_fraction:g}")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.members < 1:
        parser.error("--members must be at least 1")
    if args.retries < 0:
        parser.error(f"--retries must not be negative, got {args.retries}")
    if not 0 < args.min_rate <= args.start_rate:
        parser.error(f"--min-rate must be in (0, --start-rate], got {args.min_rate:g}")
    args.rates = geometric_rates(args.start_rate, args.factor, args.max_rate)
    # Coarser going down: below the first rate the knee is already a failure on this machine.
    args.rates_below = falling_rates(args.start_rate, args.factor**2, args.min_rate)
    return args


def check_rate(knee: float | None, fraction: float) -> float | None:
    """The rate of the check: `fraction` of the knee, at least 0.1/s (None without a knee)."""
    return None if knee is None else max(round(knee * fraction, 1), 0.1)


@dataclass
class Target:
    name: str
    call_for: CallFor


def coupon_stock(args: argparse.Namespace) -> int:
    """Enough for every issue the run could offer (warm-up, every step and retry, check), twice."""
    stepped = (sum(args.rates) + sum(args.rates_below)) * args.step_seconds * (1 + args.retries)
    per_path = args.start_rate * args.warmup + stepped
    per_path += args.max_rate * args.check_fraction * args.check_seconds
    return int(2 * per_path) + 1000


async def coupon_caller(stub: Any, run_id: str, stock: int, timeout: float) -> CallFor:
    """A template with `stock` over STOCK_SHARDS rows; IssueCoupon from it."""
    from loyalty.rewards.v1 import rewards_pb2

    template_id = f"KNEES-{run_id[-6:]}"
    await create_template(stub, template_id, stock, STOCK_SHARDS, timeout=30)

    def call_for(phase: str) -> Callable[[int], Awaitable[object]]:
        def call(i: int) -> Awaitable[object]:
            return stub.IssueCoupon(  # type: ignore[no-any-return]
                rewards_pb2.IssueCouponRequest(
                    template_id=template_id,
                    member_id=str(uuid.uuid4()),
                    reason="operator_grant",
                    issue_key=f"{run_id}-{phase}-{i}",
                ),
                timeout=timeout,
            )

        return call

    return call_for


async def knee_of(
    target: Target,
    args: argparse.Namespace,
    meter: CpuMeter,
    idle: dict[str, float],
    infra: BenchInfra,
) -> dict[str, Any]:
    """Step `target` up to its knee, then check p99 and CPU at a fraction of it."""
    criteria = Criteria(args.slo_ms, achieved_tolerance=ACHIEVED_TOLERANCE)
    load_before = os.getloadavg()
    label = LABELS[target.name]
    say(f"{target.name}: stepping from {args.rates[0]:g}/s x{args.factor:g} ...")
    if args.warmup > 0:
        await open_loop(
            f"{target.name} warm-up",
            target.call_for("w"),
            args.rates[0],
            args.warmup,
            timeout=backstop(args),
        )
        await events_drained(infra)

    async def run_step(n: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
        result = await open_loop(
            f"{target.name} {rate:g}/s",
            target.call_for(f"s{n}"),
            rate,
            args.step_seconds,
            timeout=backstop(args),
        )
        return result, result.summary()

    stepped = await step_up(
        args.rates,
        run_step,
        criteria,
        retries=args.retries,
        below=args.rates_below,
        on_step=lambda step, _: say(f"  {target.name} {step_line(step, criteria)}"),
        between=lambda: events_drained(infra),
    )
    knee = stepped.knee
    rate = check_rate(knee, args.check_fraction)
    check: dict[str, Any] | None = None
    if rate is not None:
        # The failed step's backlog is not the check's.
        await events_drained(infra)
        say(f"  {target.name}: knee {knee:g}/s; checking {rate:g}/s for {args.check_seconds:g}s")
        before = await meter.snapshot()
        result = await open_loop(
            f"{label} at {rate:g}/s",
            target.call_for("c"),
            rate,
            args.check_seconds,
            timeout=backstop(args),
        )
        result.cpu_ms_per_call = await meter.per_call(before, result.ok)
        check = result.summary()
        check["cpu_ms_per_call_marginal"] = marginal(
            result.cpu_ms_per_call, idle, time.monotonic() - before.at, result.ok
        )
        check["met"] = holds(Step.of(result), criteria)
        checked = step_line(Step.of(result), criteria, "target met", "target NOT met")
        say(f"  {target.name} check {checked}")
    else:
        say(f"  {target.name}: no knee ({stepped.stopped_by}); no check")
    await events_drained(infra)
    return {
        "path": target.name,
        "label": label,
        "criteria": criteria.describe(),
        "knee_per_s": knee,
        "stopped_by": stepped.stopped_by,
        "steps": stepped.summaries,
        "check_rate_per_s": rate,
        "check": check,
        "target_met": bool(check and check["met"]),
        "load_average": {"start": load_before, "end": os.getloadavg()},
    }


def knees_table(paths: list[dict[str, Any]], slo_ms: float, fraction: float) -> str:
    head = (
        f"{'path':15} {'knee/s':>8} {'steps':>5} {'check/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'achieved/s':>10} {'errors':>6} {'knee/empty':>10}"
        f"  p99 <= {slo_ms:g} ms at {fraction:g} x knee"
    )
    lines = [head, "-" * len(head)]

    def fmt(v: float | None, width: int, spec: str = ".1f") -> str:
        return f"{'-' if v is None else format(v, spec):>{width}}"

    for p in paths:
        c = p["check"] or {}
        lat = c.get("latency_ms", {})
        errors = sum(c["errors_by_status"].values()) if c else None
        lines.append(
            f"{p['path']:15} {fmt(p['knee_per_s'], 8)} {len(p['steps']):>5}"
            f" {fmt(p['check_rate_per_s'], 8)} {fmt(lat.get('p50'), 8, '.2f')}"
            f" {fmt(lat.get('p99'), 8, '.2f')} {fmt(c.get('achieved_rate_per_s'), 10)}"
            f" {fmt(errors, 6, 'd')} {fmt(p.get('knee_over_empty_grpc'), 10, '.3f')}"
            f"  {'met' if p['target_met'] else 'NOT met'}"
        )
        load = p.get("load_average")
        during = f"; load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}" if load else ""
        lines.append(f"{'':15} stopped by {p['stopped_by']}{during}")
    rows: list[tuple[str, dict[str, float]]] = []
    for p in paths:
        if p["check"]:
            rows.append(
                (f"{p['path']} at {p['check_rate_per_s']:g}/s", p["check"]["cpu_ms_per_call"])
            )
            rows.append((f"{p['path']} marginal", p["check"]["cpu_ms_per_call_marginal"]))
    return "\n".join(lines) + ("\n\n" + cpu_table(rows) if rows else "")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.auth.client import HmacAuth
    from loyalty.pos.v1 import pos_pb2_grpc
    from loyalty.rewards.v1 import rewards_pb2_grpc

    started_at = datetime.now(UTC)
    run_id = "knees-" + started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    wanted = args.path_names
    infra = await BenchInfra.start(run_id)
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        pg_version = await server_version(infra.database_url)
        ports = supervisor.free_ports()
        pos_target = f"{supervisor.LOOPBACK}:{ports['pos']}"
        base_url = f"http://{supervisor.LOOPBACK}:{ports['http']}"
        api_key = await register_pos_key(infra, args.store_id)
        key_id, secret = await register_miniprogram(infra)
        children = supervisor.platform_children(ports, platform_env(infra))
        echo_port = supervisor.free_port()
        echo_target = f"{supervisor.LOOPBACK}:{echo_port}"
        if EMPTY in wanted:
            children.append(
                supervisor.Child(
                    "echo",
                    [sys.executable, "-m", "bench.echo_server", "--port", str(echo_port)],
                    supervisor.child_env(os.environ),
                    grpc_target=echo_target,
                )
            )
        async with (
            started(children, log_dir) as platform,
            metered(platform, infra) as meter,
            pos_channel(pos_target, args.store_id, api_key) as pos_ch,
            grpc.aio.insecure_channel(f"{supervisor.LOOPBACK}:{ports['rewards']}") as rewards_ch,
            # Lazy: connects on the first call, if the empty path is asked for.
            grpc.aio.insecure_channel(echo_target) as echo_ch,
            aiohttp.ClientSession(
                base_url=base_url, connector=aiohttp.TCPConnector(limit=256)
            ) as http,
        ):
            pos = pos_pb2_grpc.PosServiceStub(pos_ch)
            targets: dict[str, Target] = {}
            if {"checkout", "identify"} & set(wanted):
                members = await identify_pool(pos_target, args.store_id, args.members, api_key)
                say(f"identified {len(members)} members at {args.store_id}")
                targets["checkout"] = Target(
                    "checkout",
                    lambda phase: slice_call(
                        pos, args.store_id, members, f"{run_id}-{phase}", args.timeout
                    ),
                )
                targets["identify"] = Target(
                    "identify",
                    lambda _: pos_identify_call(pos, args.store_id, members, args.timeout),
                )
            if "member-centre" in wanted:
                async with httpx.AsyncClient(
                    base_url=base_url, auth=HmacAuth(key_id, secret), timeout=30
                ) as setup:
                    readers = await enrol(setup, args.members, run_id)
                say(f"enrolled {len(readers)} mini-program members")
                signed = signed_get(http, key_id, secret, args.timeout)
                targets["member-centre"] = Target(
                    "member-centre", lambda _: centre_call(signed, readers)
                )
            if "coupon-issue" in wanted:
                rewards = rewards_pb2_grpc.RewardsServiceStub(rewards_ch)
                issue = await coupon_caller(rewards, run_id, coupon_stock(args), args.timeout)
                targets["coupon-issue"] = Target("coupon-issue", issue)
            if EMPTY in wanted:
                ping = echo_ch.unary_unary(ECHO_METHOD)

                def empty_call(i: int) -> Awaitable[object]:
                    return ping(b"", timeout=args.timeout)  # type: ignore[no-any-return]

                targets[EMPTY] = Target(EMPTY, lambda _: empty_call)
            took = await events_drained(infra)
            say(f"consumers caught up with the set-up's events in {took:.1f}s")
            idle = await meter.idle(args.idle_seconds)
            paths = [await knee_of(targets[name], args, meter, idle, infra) for name in wanted]
        floor = next((p["knee_per_s"] for p in paths if p["path"] == EMPTY), None)
        for p in paths:
            p["knee_over_empty_grpc"] = (
                round(p["knee_per_s"] / floor, 3) if floor and p["knee_per_s"] else None
            )
        return {
            "run_id": run_id,
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "config": {
                "paths": wanted,
                "rates": args.rates,
                "rates_below": args.rates_below,
                "factor": args.factor,
                "step_seconds": args.step_seconds,
                "retries": args.retries,
                "warmup_s": args.warmup,
                "check_fraction": args.check_fraction,
                "check_seconds": args.check_seconds,
                "slo_p99_ms": args.slo_ms,
                "members": args.members,
                "timeout_s": args.timeout,
                "open_loop": True,
                "latency_from": "scheduled send time",
            },
            "machine": machine(infra, pg_version),
            "idle_cpu_ms_per_s": {name: round(1000.0 * s, 2) for name, s in idle.items()},
            "paths": paths,
            "target": {
                "p99_ms_at_most": args.slo_ms,
                "at_fraction_of_knee": args.check_fraction,
                "met": {p["path"]: p["target_met"] for p in paths if p["path"] != EMPTY},
            },
            "_table": knees_table(paths, args.slo_ms, args.check_fraction),
        }
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    began = time.monotonic()
    done = run_and_report(
        run, args, lambda r: f"{r['run_id']}.json", prog="bench knees", ensure_ascii=False
    )
    if done is None:
        return 1
    report, path = done
    target = report["target"]
    print(
        f"target p99 <= {target['p99_ms_at_most']:g} ms at {target['at_fraction_of_knee']:g} x"
        " the knee: "
        + ", ".join(f"{name} {'met' if met else 'NOT met'}" for name, met in target["met"].items())
    )
    print(
        f"{report['machine']['cpus']} CPUs, load average {os.getloadavg()[0]:.1f} at the end;"
        f" results: {path} ({time.monotonic() - began:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
