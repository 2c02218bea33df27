"""`python -m bench.identify`: identify of a known member under open-loop load.

Issue 3 asks for POS IdentifyMember of a known member at 3,000 calls/s with
p99 <= 10 ms through the gateway. This module measures, in one run, on the
same machine and at the same rate:

1. POS IdentifyMember (by phone) through the gateway: the real till path
   (the door's Redis round trip; the store, cached in the gateway; member
   ResolveMember, served from member's Redis cache; then rewards' balance and
   tiering's tier side by side);
2. member ResolveMember called directly (one gRPC hop, no gateway): the
   member service's own cost on that path;
3. member IdentifyMember called directly, with a request key: the
   idempotent identify a client with its own key gets (Postgres, one commit);
4. the empty-gRPC baseline (bench/echo_server.py), the floor of one hop.

Each run also reports CPU ms per call by process (bench/cpu.py): on this
shared 2-core machine latency moves with everything else running, CPU per
call much less, and it says how many cores a rate needs.

It starts its own platform exactly as `python -m bench` does (bench/cli.py:
throwaway database and Redis namespace, real processes), enrols a pool of
members first, and writes bench/results/identify-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from devtools import devrun, supervisor
from servicekit.redis_client import create_redis

from . import member_views
from .cli import (
    BENCH_DATA,
    RESULTS_DIR,
    BenchInfra,
    UnexpectedReply,
    demo_phone,
    identify_pool,
    machine,
    measure,
    measure_echo,
    metered,
    platform_env,
    pos_channel,
    ratio,
    ratios,
    register_pos_key,
    run_and_report,
    say,
    server_version,
    started,
    table,
)
from .cpu import LOAD_GENERATOR
from .loadgen import RunResult


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.identify",
        description="Open-loop benchmark of identifying a known member, with baselines.",
    )
    parser.add_argument("--rate", type=float, default=3000.0, help="arrivals per second (3000)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument("--members", type=int, default=200, help="member pool size (200)")
    parser.add_argument("--store-id", default=devrun.DEMO_STORE, help="demo store (SH001)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request deadline (5 s)")
    parser.add_argument("--slo-ms", type=float, default=10.0, help="p99 target (10 ms)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    member_views.add_argument(parser)
    args = parser.parse_args(argv)
    member_views.check(parser.error, args)
    for name in ("rate", "duration", "timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if args.members < 1:
        parser.error("--members must be at least 1")
    return args


def pos_identify_call(
    stub: Any, store_id: str, members: list[str], timeout: float
) -> Callable[[int], Awaitable[object]]:
    from loyalty.pos.v1 import pos_pb2

    async def call(i: int) -> object:
        n = i % len(members)
        reply = await stub.IdentifyMember(
            pos_pb2.IdentifyMemberRequest(store_id=store_id, phone=demo_phone(n)), timeout=timeout
        )
        if reply.created or reply.member_id != members[n]:
            raise UnexpectedReply("a known member was not found as itself")
        return reply

    return call


def member_resolve_call(
    stub: Any, members: list[str], timeout: float
) -> Callable[[int], Awaitable[object]]:
    from loyalty.member.v1 import member_pb2

    async def call(i: int) -> object:
        n = i % len(members)
        reply = await stub.ResolveMember(
            member_pb2.ResolveMemberRequest(
                identifier=member_pb2.Identifier(
                    type=member_pb2.IDENTIFIER_TYPE_PHONE, value=demo_phone(n)
                )
            ),
            timeout=timeout,
        )
        if reply.member_id != members[n]:
            raise UnexpectedReply("a known member was not found as itself")
        return reply

    return call


def member_identify_call(
    stub: Any, members: list[str], tag: str, timeout: float
) -> Callable[[int], Awaitable[object]]:
    from loyalty.member.v1 import member_pb2

    async def call(i: int) -> object:
        n = i % len(members)
        request = member_pb2.IdentifyMemberRequest(
            identifiers=[
                member_pb2.Identifier(type=member_pb2.IDENTIFIER_TYPE_PHONE, value=demo_phone(n))
            ],
            source="bench",
            request_key=f"{tag}-{i}",
        )
        reply = await stub.IdentifyMember(request, timeout=timeout)
        if reply.created or reply.member.member_id != members[n]:
            raise UnexpectedReply("a known member was not found as itself")
        return reply

    return call


def server_cpu_ms(result: RunResult) -> float | None:
    cpu = result.cpu_ms_per_call
    if cpu is None:
        return None
    return round(cpu["total"] - cpu.get(LOAD_GENERATOR, 0.0), 3)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loyalty.member.v1 import member_pb2_grpc
    from loyalty.pos.v1 import pos_pb2_grpc

    started_at = datetime.now(UTC)
    run_id = "identify-" + started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    infra = await BenchInfra.start(run_id)
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        pg_version = await server_version(infra.database_url)
        ports = supervisor.free_ports()
        base = platform_env(infra)
        pos_target = f"{supervisor.LOOPBACK}:{ports['pos']}"
        member_target = f"{supervisor.LOOPBACK}:{ports['member']}"
        results: list[RunResult] = []
        api_key = await register_pos_key(infra, args.store_id)
        async with (
            started(supervisor.platform_children(ports, base), log_dir) as platform,
            metered(platform, infra) as meter,
        ):
            members = await identify_pool(pos_target, args.store_id, args.members, api_key)
            say(f"enrolled {len(members)} members at {args.store_id}")
            redis = create_redis(infra.redis_url)
            async with pos_channel(pos_target, args.store_id, api_key) as channel:
                pos = pos_pb2_grpc.PosServiceStub(channel)
                views_before = await asyncio.to_thread(member_views.view_reads, ports["metrics"])
                results.append(
                    await measure(
                        "POS IdentifyMember via gateway",
                        lambda _: member_views.changing(
                            pos_identify_call(pos, args.store_id, members, args.timeout),
                            members,
                            args.reads_per_change,
                            redis,
                            infra.namespace,
                        ),
                        args,
                        meter,
                    )
                )
                views_after = await asyncio.to_thread(member_views.view_reads, ports["metrics"])
            await redis.aclose()
            async with grpc.aio.insecure_channel(member_target) as channel:
                member = member_pb2_grpc.MemberServiceStub(channel)
                results.append(
                    await measure(
                        "member ResolveMember direct",
                        lambda _: member_resolve_call(member, members, args.timeout),
                        args,
                        meter,
                    )
                )
                results.append(
                    await measure(
                        "member IdentifyMember direct",
                        lambda phase: member_identify_call(
                            member, members, f"{run_id}-{phase}", args.timeout
                        ),
                        args,
                        meter,
                    )
                )
        baseline = await measure_echo(args, log_dir)
        gateway = results[0].summary()
        p99 = gateway["latency_ms"]["p99"]
        report: dict[str, Any] = {
            "run_id": run_id,
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "config": {
                "rate_per_s": args.rate,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "members": args.members,
                "open_loop": True,
                "latency_from": "scheduled send time",
                "redis_cache": True,
                "reads_per_change": args.reads_per_change,
            },
            # Warm-up and measured run together (the gateway's counter).
            "member_views": member_views.hit_rate(views_before, views_after, "identify"),
            "machine": machine(infra, pg_version),
            "results": [r.summary() for r in results],
            "baseline": baseline.summary(),
            "ratios_over_empty_grpc": {
                r.name: ratios(r, [baseline])[baseline.name] for r in results
            },
            # Server-side CPU per call (every process but the load generator)
            # over the empty gRPC server's: what the path costs in hops' worth.
            "server_cpu_ms_per_call": {r.name: server_cpu_ms(r) for r in [*results, baseline]},
            "server_cpu_over_empty_grpc": {
                r.name: ratio(server_cpu_ms(r), server_cpu_ms(baseline)) for r in results
            },
            "target": {
                "p99_ms_at_most": args.slo_ms,
                "at_rate_per_s": args.rate,
                "met": bool(
                    p99 is not None
                    and p99 <= args.slo_ms
                    and results[0].achieved_rate >= 0.95 * args.rate
                    and not results[0].errors
                ),
            },
        }
        report["_table"] = table([*results, baseline])
        return report
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    began = time.monotonic()
    done = run_and_report(
        run,
        args,
        lambda r: f"{r['run_id']}.json",
        prog="bench.identify",
        wall_time=False,
        ensure_ascii=False,
    )
    if done is None:
        return 1
    report, path = done
    print(f"member views (identify): {report['member_views']}")
    for name, r in report["ratios_over_empty_grpc"].items():
        cpu = report["server_cpu_over_empty_grpc"][name]
        print(f"{name} / empty gRPC: p50 x{r['p50']}, p99 x{r['p99']}, server CPU per call x{cpu}")
    target = report["target"]
    print(
        f"target p99 <= {target['p99_ms_at_most']} ms at {target['at_rate_per_s']:g}/s through"
        f" the gateway: {'met' if target['met'] else 'NOT met'}"
    )
    print(f"{report['machine']['cpus']} CPUs; results: {path} ({time.monotonic() - began:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
