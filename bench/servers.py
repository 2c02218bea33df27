"""`python -m bench servers`: which gRPC server, and what servicekit's per-call
plumbing costs (issue 19, "Servers").

Every variant is an empty unary method (bench/echo_server.py) in a process of
its own, driven open-loop at --rate for --duration seconds after a warm-up,
metered by bench/cpu.py (CPU ms per call of the server process and of the load
generator) with p50/p99:

- grpc.aio on uvloop (the baseline every ratio is taken to, the same round),
  and on the default asyncio loop;
- grpc's synchronous server with a thread pool of each --workers size;
- the same with the bridge the services would need (their code is asyncio:
  each call runs a coroutine on one event-loop thread via
  run_coroutine_threadsafe);
- grpc.aio made by servicekit (create_grpc_server's options, servicekit
  imported) with no interceptor;
- grpc.aio with servicekit's interceptor chain (Drain, DomainErrorInterceptor,
  the metrics observer: servicekit.server.create_grpc_server, as the services
  run it), and the chain with each interceptor removed in turn (A/B: what
  that interceptor costs per call).

--rounds N runs every variant N times, the order reversed every other round
(A/B alternating), and reports each round beside its own baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import runpy
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc

from devtools import devrun, supervisor

from .cli import RESULTS_DIR, metered, run_and_report, say, started
from .echo_server import METHOD
from .loadgen import open_loop

BASELINE = "aio uvloop"
CHAIN = "aio + chain"


def variants(workers: list[int]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {
        BASELINE: [],
        "aio asyncio-loop": ["--loop", "asyncio"],
    }
    for n in workers:
        out[f"sync pool {n}"] = ["--server", "sync", "--workers", str(n)]
    for n in workers:
        out[f"sync pool {n} + bridge"] = ["--server", "sync", "--workers", str(n), "--bridge"]
    out["aio servicekit no chain"] = ["--servicekit-server"]
    out[CHAIN] = ["--interceptors", "drain,errors,metrics"]
    out["aio + chain - drain"] = ["--interceptors", "errors,metrics"]
    out["aio + chain - errors"] = ["--interceptors", "drain,metrics"]
    out["aio + chain - metrics"] = ["--interceptors", "drain,errors"]
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench servers", description=__doc__)
    parser.add_argument("--rate", type=float, default=500.0, help="calls per second (500)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds (8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (2)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every variant (2)")
    parser.add_argument(
        "--workers", default="4,16", help="sync server pool sizes, comma separated (4,16)"
    )
    parser.add_argument(
        "--only", default="", help="variants to run, comma separated names (default: all)"
    )
    parser.add_argument(
        "--services",
        action="store_true",
        help="also each service's read, with servicekit's chain and bare (embedded PostgreSQL)",
    )
    parser.add_argument(
        "--service-rate", type=float, default=200.0, help="service reads per second (200)"
    )
    parser.add_argument("--no-echo", action="store_true", help="skip the empty-handler variants")
    parser.add_argument(
        "--in-process",
        type=int,
        default=20_000,
        help="calls through the interceptors alone, in this process, best of 5 (20000; 0: skip)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline (5)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.rounds < 1:
        parser.error("--rate, --duration and --rounds must be positive")
    return args


async def measure_variant(
    name: str, extra: list[str], args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    port = supervisor.free_port()
    child = supervisor.Child(
        "server",
        [sys.executable, "-m", "bench.echo_server", "--port", str(port), *extra],
        supervisor.child_env(os.environ),
        grpc_target=f"{supervisor.LOOPBACK}:{port}",
    )
    async with (
        started([child], log_dir) as platform,
        metered(platform) as meter,
        grpc.aio.insecure_channel(f"{supervisor.LOOPBACK}:{port}") as channel,
    ):
        ping = channel.unary_unary(METHOD)

        def call(i: int) -> Awaitable[object]:
            return ping(b"", timeout=args.timeout)  # type: ignore[no-any-return]

        if args.warmup > 0:
            await open_loop(f"{name} warm-up", call, args.rate, args.warmup)
        before = await meter.snapshot()
        result = await open_loop(name, call, args.rate, args.duration, timeout=args.timeout + 1)
        cpu = await meter.per_call(before, result.ok)
        result.cpu_ms_per_call = cpu
    lat = result.latency_ms()
    say(
        f"  {name}: {result.ok} ok, errors {result.errors or 'none'}, server"
        f" {cpu.get('server', 0):.3f} ms CPU/call, p50 {lat['p50']} p99 {lat['p99']} ms"
    )
    return {"variant": name, "args": extra, **result.summary(), "load_average": os.getloadavg()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    log_dir = Path(RESULTS_DIR / "logs" / f"servers-{run_id}")
    chosen = variants([int(w) for w in args.workers.split(",") if w])
    if args.only:
        wanted = [v.strip() for v in args.only.split(",")]
        unknown = [w for w in wanted if w not in chosen]
        if unknown:
            raise supervisor.DevrunError(f"unknown variants {unknown}; one of {list(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in wanted or k == BASELINE}
    names = [] if args.no_echo else list(chosen)
    rounds: list[list[dict[str, Any]]] = []
    for r in range(args.rounds if names else 0):
        order = names if r % 2 == 0 else list(reversed(names))
        say(f"round {r + 1}/{args.rounds}, load average {os.getloadavg()[0]:.1f}")
        rows = [await measure_variant(n, chosen[n], args, log_dir) for n in order]
        base = next(row for row in rows if row["variant"] == BASELINE)
        base_cpu = base["cpu_ms_per_call"].get("server", 0.0)
        for row in rows:
            cpu = row["cpu_ms_per_call"].get("server", 0.0)
            row["server_cpu_ratio_to_baseline"] = round(cpu / base_cpu, 2) if base_cpu else None
        rounds.append(rows)
    in_process = await chain_in_process(args.in_process) if args.in_process else {}
    services = await measure_services(args, log_dir) if args.services else []
    tables = [table(names, rounds)] if names else []
    if in_process:
        tables.append(
            "interceptors alone, CPU us per call (in-process, best of 5): "
            + ", ".join(f"{k} {v}" for k, v in in_process.items())
        )
    if services:
        tables.append(services_table(services))
    return {
        "run_id": run_id,
        "scenario": "servers",
        "rate_per_s": args.rate,
        "service_rate_per_s": args.service_rate,
        "duration_s": args.duration,
        "rounds": rounds,
        "summary": summary(names, rounds),
        "services": services,
        "interceptors_in_process_us_per_call": in_process,
        "_table": "\n\n".join(tables),
    }


def summary(names: list[str], rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant, the median over rounds of server CPU ms per call and ratio."""
    out: dict[str, Any] = {}
    for name in names:
        rows = [row for rnd in rounds for row in rnd if row["variant"] == name]
        out[name] = {
            "server_cpu_ms_per_call": statistics.median(
                row["cpu_ms_per_call"].get("server", 0.0) for row in rows
            ),
            "ratio_to_baseline": statistics.median(
                row["server_cpu_ratio_to_baseline"] or 0.0 for row in rows
            ),
        }
    return out


def table(names: list[str], rounds: list[list[dict[str, Any]]]) -> str:
    head = (
        f"{'variant':28} {'round':>5} {'load':>5} {'ok/s':>7} {'server ms':>9}"
        f" {'loadgen ms':>10} {'x base':>6} {'p50 ms':>7} {'p99 ms':>8}"
    )
    lines = [head, "-" * len(head)]
    for name in names:
        for i, rnd in enumerate(rounds):
            row = next(r for r in rnd if r["variant"] == name)
            cpu = row["cpu_ms_per_call"]
            lat = row["latency_ms"]
            lines.append(
                f"{name:28} {i + 1:>5} {row['load_average'][0]:>5.1f}"
                f" {row['achieved_rate_per_s']:>7.0f} {cpu.get('server', 0):>9.3f}"
                f" {cpu.get('loadgen', 0):>10.3f} {row['server_cpu_ratio_to_baseline'] or 0:>6.2f}"
                f" {lat['p50'] or 0:>7.2f} {lat['p99'] or 0:>8.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    done = run_and_report(run, args, lambda r: f"servers-{r['run_id']}.json")
    return 0 if done else 1


# ------------------------------------------------- the chain, in one process


class _Context:
    """What the chain asks of a grpc.aio context on a call that succeeds."""

    def code(self) -> None:
        return None


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def _pipeline(interceptors: Any, lookup: Any, details: Any) -> Any:
    """grpc.aio's own walk of the interceptors (grpc/_cython/.../server.pyx.pxi
    _run_interceptor), run on every call."""
    interceptor = next(interceptors, None)
    if interceptor is None:
        return lookup(details)
    return await interceptor.intercept_service(
        functools.partial(_pipeline, interceptors, lookup), details
    )


async def chain_in_process(calls: int) -> dict[str, float]:
    """CPU microseconds per call of servicekit's interceptors alone: grpc.aio's
    interceptor walk and the wrapped handler, around an empty handler, with no
    network and no grpc core (process CPU time, so other work on the machine
    barely matters). Each interceptor alone, the chain, and none."""
    from servicekit.interceptors import DomainErrorInterceptor
    from servicekit.metrics import ServiceMetrics
    from servicekit.server import Drain

    async def empty(request: bytes, context: Any) -> bytes:
        return b""

    handler = grpc.unary_unary_rpc_method_handler(empty)
    method = "/bench.Echo/Ping"
    details = _Details(method)
    context = _Context()

    def lookup(d: Any) -> Any:
        return handler if d.method == method else None

    chains: dict[str, Any] = {
        "none": lambda: [],
        "drain": lambda: [Drain()],
        "errors": lambda: [DomainErrorInterceptor()],
        "metrics": lambda: [ServiceMetrics("bench").interceptor()],
        "chain": lambda: [Drain(), DomainErrorInterceptor(), ServiceMetrics("bench").interceptor()],
    }
    out: dict[str, float] = {}
    for name, make in chains.items():
        interceptors = make()
        best = float("inf")
        for _ in range(5):
            began = time.process_time()
            for _ in range(calls):
                found = await _pipeline(iter(interceptors), lookup, details)
                await found.unary_unary(b"", context)
            best = min(best, time.process_time() - began)
        out[name] = round(1e6 * best / calls, 2)
    return out


# ------------------------------------------------------- the services' reads


def host(module: str, bare: bool) -> None:
    """Serve `module` (e.g. services.member) exactly as its entrypoint does;
    `bare`: its gRPC server without any interceptor (no Drain, no domain-error
    mapping, no metrics observer): the A/B of the chain on a real read."""
    if bare:
        from servicekit import server

        full = server.create_grpc_server

        def without_interceptors(
            max_connection_age_ms: int, grace_seconds: float, *_: Any, **kwargs: Any
        ) -> grpc.aio.Server:
            kwargs.update(interceptors=(), traced=False, drain=None, domain_errors=False)
            return full(max_connection_age_ms, grace_seconds, **kwargs)

        # ServiceApp.start looks the factory up in its module at start.
        server.create_grpc_server = without_interceptors  # type: ignore[assignment]
    sys.argv = [module, "serve"]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def service_reads(member_id: str) -> dict[str, tuple[str, Any, Any]]:
    """Per service, one read RPC the seeded brand answers OK: (method, request, reply type)."""
    from loyalty.engagement.v1 import engagement_pb2
    from loyalty.guides.v1 import guides_pb2
    from loyalty.member.v1 import member_pb2
    from loyalty.rewards.v1 import rewards_pb2
    from loyalty.tiering.v1 import tiering_pb2

    return {
        "member": (
            "/loyalty.member.v1.MemberService/GetMember",
            member_pb2.GetMemberRequest(member_id=member_id),
            member_pb2.Member,
        ),
        "tiering": (
            "/loyalty.tiering.v1.TieringService/GetMemberTier",
            tiering_pb2.GetMemberTierRequest(member_id=member_id),
            tiering_pb2.MemberTier,
        ),
        "rewards": (
            "/loyalty.rewards.v1.RewardsService/GetStore",
            rewards_pb2.GetStoreRequest(store_id=devrun.DEMO_STORE),
            rewards_pb2.Store,
        ),
        "engagement": (
            "/loyalty.engagement.v1.EngagementService/ListJourneys",
            engagement_pb2.ListJourneysRequest(page_size=10),
            engagement_pb2.ListJourneysResponse,
        ),
        "guides": (
            "/loyalty.guides.v1.GuidesService/ListStaff",
            guides_pb2.ListStaffRequest(store_id=devrun.DEMO_STORE),
            guides_pb2.ListStaffResponse,
        ),
    }


async def measure_services(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Each service's read through its real process, with servicekit's chain
    (as the services run) and bare, alternating per round; CPU of that
    service's process and of the database's backends per call."""
    from loyalty.member.v1 import member_pb2

    from .cli import BenchInfra, platform_env

    run_id = f"servers-{uuid.uuid4().hex[:6]}"
    infra = await BenchInfra.start(run_id)
    rows: list[dict[str, Any]] = []
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        base = platform_env(infra)
        member_id = ""
        for r in range(args.rounds):
            order = ["chain", "bare"] if r % 2 == 0 else ["bare", "chain"]
            for chain in order:
                ports = supervisor.free_ports()
                children = [
                    c for c in supervisor.platform_children(ports, base) if c.name in SERVICE_NAMES
                ]
                for c in children:
                    c.argv = [
                        sys.executable, "-m", "bench.servers", "host", f"services.{c.name}",
                        *(["--bare"] if chain == "bare" else []),
                    ]  # fmt: skip
                async with (
                    started(children, log_dir) as platform,
                    metered(platform, infra) as meter,
                ):
                    targets = {c.name: c.grpc_target for c in children}
                    if not member_id:
                        async with grpc.aio.insecure_channel(targets["member"]) as channel:
                            identify = channel.unary_unary(
                                "/loyalty.member.v1.MemberService/IdentifyMember",
                                request_serializer=member_pb2.IdentifyMemberRequest.SerializeToString,
                                response_deserializer=member_pb2.IdentifyMemberResponse.FromString,
                            )
                            reply = await identify(
                                member_pb2.IdentifyMemberRequest(
                                    identifiers=[
                                        member_pb2.Identifier(
                                            type=member_pb2.IDENTIFIER_TYPE_PHONE,
                                            value="+8613900000001",
                                        )
                                    ],
                                    source="bench",
                                    request_key=f"{run_id}-member",
                                ),
                                timeout=args.timeout,
                            )
                            member_id = reply.member.member_id
                    reads = service_reads(member_id)
                    for name in SERVICE_NAMES:
                        method, request, reply_type = reads[name]
                        target = targets[name]
                        assert target is not None
                        async with grpc.aio.insecure_channel(target) as channel:
                            read = channel.unary_unary(
                                method,
                                request_serializer=type(request).SerializeToString,
                                response_deserializer=reply_type.FromString,
                            )

                            def call(
                                i: int, read: Any = read, request: Any = request
                            ) -> Awaitable[object]:
                                return read(request, timeout=args.timeout)  # type: ignore[no-any-return]

                            label = f"{name} {method.rsplit('/', 1)[1]} {chain}"
                            if args.warmup > 0:
                                await open_loop(
                                    f"{label} warm-up", call, args.service_rate, args.warmup
                                )
                            before = await meter.snapshot()
                            result = await open_loop(
                                label,
                                call,
                                args.service_rate,
                                args.duration,
                                timeout=args.timeout + 1,
                            )
                            cpu = await meter.per_call(before, result.ok)
                            result.cpu_ms_per_call = cpu
                        lat = result.latency_ms()
                        say(
                            f"  {label}: {result.ok} ok, errors {result.errors or 'none'},"
                            f" {name} {cpu.get(name, 0):.3f} ms CPU/call, p50 {lat['p50']} p99 {lat['p99']} ms"
                        )
                        rows.append(
                            {
                                "service": name,
                                "method": method,
                                "chain": chain,
                                "round": r + 1,
                                "service_cpu_ms_per_call": cpu.get(name, 0.0),
                                **result.summary(),
                                "load_average": os.getloadavg(),
                            }
                        )
    finally:
        await infra.cleanup()
    return rows


SERVICE_NAMES = ("member", "tiering", "rewards", "engagement", "guides")


def services_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'service read':34} {'chain':>5} {'round':>5} {'load':>5} {'service ms':>10}"
        f" {'pg ms':>6} {'p50 ms':>7} {'p99 ms':>8}"
    )
    lines = [head, "-" * len(head)]
    for row in sorted(
        rows, key=lambda r: (SERVICE_NAMES.index(r["service"]), r["chain"], r["round"])
    ):
        cpu = row["cpu_ms_per_call"]
        lat = row["latency_ms"]
        lines.append(
            f"{row['service'] + ' ' + row['method'].rsplit('/', 1)[1]:34} {row['chain']:>5}"
            f" {row['round']:>5} {row['load_average'][0]:>5.1f}"
            f" {row['service_cpu_ms_per_call']:>10.3f} {cpu.get('pg backends', 0):>6.3f}"
            f" {lat['p50'] or 0:>7.2f} {lat['p99'] or 0:>8.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m bench.servers host services.NAME [--bare]`: a service process of this bench.
    if len(sys.argv) >= 3 and sys.argv[1] == "host":
        host(sys.argv[2], "--bare" in sys.argv[3:])
    else:
        raise SystemExit("usage: python -m bench.servers host services.NAME [--bare]")
