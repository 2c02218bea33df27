"""`make bench BENCH_ARGS='scaleout ...'`: the checkout path with 1, then 2
processes each of the gateway and rewards, to see whether throughput grows
with processes (issue 19, "horizontal scale measured").

For each replica count N, a fresh platform (as `make bench` starts it) runs
N gateway processes (each on its own ports) and N rewards processes. Every
service reaches rewards through one `ipv4:` target listing the N rewards
ports, balanced round robin by gRPC (servicekit/clients.py's service
config, the same policy a headless Service gets in Kubernetes); the load
generator spreads its POS calls over the N gateways the same way
(client-side round robin). The other services stay single processes.

The open-loop rate then steps up (--rates) until p99 passes --slo-ms or the
achieved rate falls under 95% of the offered (bench/stepping.py); the knee is the last rate
that held. Reported per N: the knee, the knee per gateway+rewards process
pair, and CPU ms per order by process at each step (bench/cpu.py), both
as measured and marginal: before the steps each configuration sits idle
for --idle-seconds, and each process's idle CPU per second is subtracted
over every step's wall time (consumers' blocking reads, relays and metrics
sampling cost the same whatever the rate, and a second process doubles
them). On a machine with fewer cores than processes, a second process
cannot add throughput, only show what it costs: compare the knee per pair
across machines, and the marginal CPU per order everywhere: if it does not
grow with N, throughput grows with cores, and the marginal total in ms is
the cores 1,000 orders/s need.
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
from servicekit.clients import SERVICE_CONFIG

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
    register_pos_key,
    run_and_report,
    say,
    server_version,
    slice_call,
    started,
)
from .cpu import cpu_table, marginal
from .loadgen import RunResult, open_loop
from .stepping import Criteria, step_line, step_up

# A step holds while it achieves 95% of the offered rate (and p99 and no errors).
ACHIEVED_TOLERANCE = 0.05


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench scaleout",
        description="Checkout with 1 and 2 processes of gateway and rewards: knee and CPU per order.",
    )
    parser.add_argument(
        "--replicas", default="1,2", help="process counts of gateway and rewards to run (1,2)"
    )
    parser.add_argument(
        "--rates", default="40,60,90,135,200,300", help="open-loop steps, orders/s (40,...,300)"
    )
    parser.add_argument("--step-seconds", type=float, default=8.0, help="seconds per step (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument("--members", type=int, default=100, help="member pool size (100)")
    parser.add_argument("--store-id", default=devrun.DEMO_STORE, help="demo store (SH001)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request deadline (5 s)")
    parser.add_argument("--slo-ms", type=float, default=30.0, help="p99 a step must keep (30)")
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="idle CPU measured first, per config (5)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    try:
        args.replica_counts = [int(n) for n in args.replicas.split(",")]
        args.rate_steps = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error("--replicas and --rates are comma-separated numbers")
    if any(n < 1 for n in args.replica_counts) or any(r <= 0 for r in args.rate_steps):
        parser.error("replica counts must be at least 1 and rates positive")
    if args.step_seconds <= 0 or args.warmup < 0 or args.members < 1 or args.idle_seconds <= 0:
        parser.error(
            "--step-seconds and --idle-seconds must be positive, --warmup not negative,"
            " --members >= 1"
        )
    return args


def round_robin_target(ports: list[int]) -> str:
    """One gRPC target over several loopback ports (round robin by SERVICE_CONFIG)."""
    if len(ports) == 1:
        return f"{supervisor.LOOPBACK}:{ports[0]}"
    return "ipv4:" + ",".join(f"{supervisor.LOOPBACK}:{p}" for p in ports)


def replicated_children(
    replicas: int, base_env: dict[str, str]
) -> tuple[list[supervisor.Child], list[int]]:
    """The platform with `replicas` rewards and gateway processes; the POS ports."""
    ports = supervisor.free_ports()
    children = supervisor.platform_children(ports, base_env)
    rewards_ports = [ports["rewards"], *(supervisor.free_port() for _ in range(replicas - 1))]
    rewards_addr = round_robin_target(rewards_ports)
    for child in children:
        child.env["REWARDS_ADDR"] = rewards_addr
    rewards = next(c for c in children if c.name == "rewards")
    gateway = next(c for c in children if c.name == "gateway")
    extra: list[supervisor.Child] = []
    for i, port in enumerate(rewards_ports[1:], start=2):
        extra.append(
            supervisor.Child(
                f"rewards-{i}",
                rewards.argv,
                dict(rewards.env, GRPC_PORT=str(port)),
                grpc_target=f"{supervisor.LOOPBACK}:{port}",
            )
        )
    pos_ports = [ports["pos"]]
    for i in range(2, replicas + 1):
        http, pos, metrics = (supervisor.free_port() for _ in range(3))
        pos_ports.append(pos)
        extra.append(
            supervisor.Child(
                f"gateway-{i}",
                gateway.argv,
                dict(
                    gateway.env,
                    HTTP_PORT=str(http),
                    POS_GRPC_PORT=str(pos),
                    METRICS_PORT=str(metrics),
                ),
                http_ready=(supervisor.LOOPBACK, http, "/readyz"),
                tier=1,
            )
        )
    return [*children, *extra], pos_ports


async def one_config(
    replicas: int, args: argparse.Namespace, run_id: str, log_dir: Path
) -> dict[str, Any]:
    """A fresh platform with `replicas` gateway and rewards processes, stepped up."""
    from gateway.auth.client import StoreKeyInterceptor
    from loyalty.pos.v1 import pos_pb2_grpc

    infra = await BenchInfra.start(f"{run_id}-x{replicas}")
    try:
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        pg_version = await server_version(infra.database_url)
        api_key = await register_pos_key(infra, args.store_id)
        children, pos_ports = replicated_children(replicas, platform_env(infra))
        async with started(children, log_dir / f"x{replicas}") as platform:
            target = round_robin_target(pos_ports)
            members = await identify_pool(target, args.store_id, args.members, api_key)
            await events_drained(infra)
            async with (
                grpc.aio.insecure_channel(
                    target,
                    interceptors=[StoreKeyInterceptor(args.store_id, api_key)],
                    options=[("grpc.service_config", SERVICE_CONFIG)],
                ) as channel,
                metered(platform, infra) as meter,
            ):
                stub = pos_pb2_grpc.PosServiceStub(channel)
                idle = await meter.idle(args.idle_seconds)

                def call_for(phase: str) -> Callable[[int], Awaitable[object]]:
                    return slice_call(
                        stub, args.store_id, members, f"{run_id}-x{replicas}-{phase}", args.timeout
                    )

                if args.warmup > 0:
                    await open_loop(
                        "warm-up",
                        call_for("w"),
                        args.rate_steps[0],
                        args.warmup,
                        timeout=backstop(args),
                    )

                async def run_step(n: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
                    before = await meter.snapshot()
                    result = await open_loop(
                        f"x{replicas} at {rate:g}/s",
                        call_for(f"s{n}"),
                        rate,
                        args.step_seconds,
                        timeout=backstop(args),
                    )
                    cpu = await meter.per_call(before, result.ok)
                    result.cpu_ms_per_call = cpu
                    summary = result.summary()
                    summary["cpu_ms_per_call_marginal"] = marginal(
                        cpu, idle, time.monotonic() - before.at, result.ok
                    )
                    return result, summary

                criteria = Criteria(args.slo_ms, achieved_tolerance=ACHIEVED_TOLERANCE)
                stepped = await step_up(
                    args.rate_steps,
                    run_step,
                    criteria,
                    on_step=lambda step, _: say(f"  x{replicas} {step_line(step, criteria)}"),
                    # The consumers' backlog of this step is not the next step's.
                    between=lambda: events_drained(infra),
                )
                knee = stepped.knee
        return {
            "replicas": replicas,
            "machine": machine(infra, pg_version),
            "idle_cpu_ms_per_s": {name: round(1000.0 * s, 2) for name, s in idle.items()},
            "knee_per_s": knee,
            "knee_per_process_pair_per_s": None if knee is None else round(knee / replicas, 1),
            "steps": stepped.summaries,
        }
    finally:
        await infra.cleanup()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    run_id = "scaleout-" + started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    configs = []
    for replicas in args.replica_counts:
        say(f"{replicas} gateway + {replicas} rewards process(es) ...")
        configs.append(await one_config(replicas, args, run_id, log_dir))
    rows = [
        (name, step[key])
        for config in configs
        for step in config["steps"]
        for key, name in (
            ("cpu_ms_per_call", step["name"]),
            ("cpu_ms_per_call_marginal", f"{step['name']} marginal"),
        )
        if step.get(key)
    ]
    lines = [f"p99 target {args.slo_ms:g} ms; knee = the last step that held it"]
    for config in configs:
        lines.append(
            f"x{config['replicas']}: knee {config['knee_per_s']}/s,"
            f" per gateway+rewards pair {config['knee_per_process_pair_per_s']}/s;"
            f" idle CPU ms/s {config['idle_cpu_ms_per_s']}"
        )
    return {
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "config": {
            "rates": args.rate_steps,
            "step_seconds": args.step_seconds,
            "slo_p99_ms": args.slo_ms,
            "members": args.members,
            "open_loop": True,
        },
        "configs": configs,
        "_table": "\n".join(lines) + "\n\n" + cpu_table(rows),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    done = run_and_report(run, args, lambda report: f"{report['run_id']}.json")
    return 0 if done is not None else 1
