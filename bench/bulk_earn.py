"""`python -m bench bulk_earn`: bulk earn throughput in-service (issue 19,
target >= 5,000 earns/s), with CPU per earn.

`--workers` clients call RewardsService.BulkEarnPoints back to back (closed
loop) for `--seconds`, each batch `--batch-size` lines (default 1,000) for
distinct members drawn round-robin from a pool of `--members`, each line its
own idempotency key. earns/s = lines applied per second; CPU ms per earn is
counted from /proc for the rewards process, this run's PostgreSQL backends and
the load generator (bench/cpu.py), and for the member service, which rewards
asks (MEMBER_ADDR, as deployed) whether the batch's ids are members' (one
ResolveMemberIds call per batch): on a loaded shared machine that is the
steadier figure (one core posts at most 1000 / ms earns per second). The pool
is registered at member first (rows written directly: enrolling 50,000 through
IdentifyMember would take minutes and the check reads only the member row).

After the run the whole points ledger is audited (services/rewards/points/
audit.py: every invariant, every member) and the batch first sent is sent
again: it must replay every line and apply none.

Platform as real processes (as `make run`), against embedded servers or
DATABASE_URL/REDIS_URL (a throwaway database); JSON to
bench/results/bulk_earn-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from devtools import devrun, supervisor
from servicekit.db import asyncpg_dsn

from .cli import (
    BENCH_DATA,
    RESULTS_DIR,
    BenchInfra,
    machine,
    platform_env,
    run_and_report,
    say,
    server_version,
    started,
)
from .cpu import CpuMeter

SERVER = "rewards"
MEMBER = "member"
TARGET_PER_S = 5000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench bulk_earn", description=__doc__)
    parser.add_argument("--workers", type=int, default=4, help="concurrent batches (4)")
    parser.add_argument("--batch-size", type=int, default=1000, help="lines per batch (1000)")
    parser.add_argument("--members", type=int, default=50_000, help="member pool (50000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds (15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds (3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-batch deadline (60)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name in ("workers", "batch_size", "members", "seconds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.batch_size > 1000:
        parser.error("--batch-size is at most 1000 (the RPC's limit)")
    return args


def batch(members: list[str], tag: str, n: int, size: int) -> Any:
    from loyalty.rewards.v1 import rewards_pb2

    start = n * size
    return rewards_pb2.BulkEarnPointsRequest(
        operator_id="bench",
        lines=[
            rewards_pb2.BulkEarnLine(
                member_id=members[(start + i) % len(members)],
                points=10,
                reason="bench bulk earn",
                idempotency_key=f"{tag}-{start + i}",
            )
            for i in range(size)
        ],
    )


async def closed_loop(
    stub: Any, members: list[str], tag: str, args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    """`workers` batches in flight back to back for `seconds`."""
    counter = iter(range(10**12))
    applied = batches = errors = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal applied, batches, errors
        while time.perf_counter() < deadline:
            request = batch(members, tag, next(counter), args.batch_size)
            began = time.perf_counter()
            try:
                reply = await stub.BulkEarnPoints(request, timeout=args.timeout)
            except grpc.aio.AioRpcError as exc:
                errors += 1
                say(f"  batch failed: {exc.code().name} {exc.details()}")
                continue
            latencies.append(time.perf_counter() - began)
            batches += 1
            applied += reply.applied

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.workers)))
    elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[int(len(latencies) * p)] * 1000, 1) if latencies else None

    return {
        "elapsed_s": round(elapsed, 2),
        "batches": batches,
        "errors": errors,
        "applied": applied,
        "earns_per_s": round(applied / elapsed, 1),
        "batch_p50_ms": pct(0.5),
        "batch_p99_ms": pct(0.99),
    }


async def register_members(conn: asyncpg.Connection, members: list[str]) -> None:
    """The pool as live members at the member service (rewards refuses ids it
    does not know)."""
    await conn.execute(
        "INSERT INTO member.members (id, member_number, registration_source, registered_at)"
        " SELECT m, nextval('member.member_number_seq')::text, 'bench', now()"
        " FROM unnest($1::uuid[]) AS m",
        [uuid.UUID(m) for m in members],
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loyalty.rewards.v1 import rewards_pb2_grpc
    from services.rewards.points.audit import audit_ledger

    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    infra = await BenchInfra.start(run_id)
    report: dict[str, Any] = {"run_id": run_id, "started_at": started_at.isoformat()}
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        ports = supervisor.free_ports()
        target = f"{supervisor.LOOPBACK}:{ports['rewards']}"
        children = supervisor.platform_children(ports, platform_env(infra))
        members = [str(uuid.uuid4()) for _ in range(args.members)]
        monitor = await asyncpg.connect(asyncpg_dsn(infra.database_url))
        try:
            await register_members(monitor, members)
            async with started(children, log_dir) as platform:
                pids = {
                    c.name: c.proc.pid
                    for c in platform.children
                    if c.name in (SERVER, MEMBER) and c.proc
                }
                meter = CpuMeter(pids, monitor)
                async with grpc.aio.insecure_channel(target) as channel:
                    stub = rewards_pb2_grpc.RewardsServiceStub(channel)
                    if args.warmup:
                        say(f"warm-up {args.warmup:g}s ...")
                        await closed_loop(stub, members, f"{run_id}-w", args, args.warmup)
                    say(
                        f"bulk earn: {args.workers} workers x {args.batch_size} lines,"
                        f" {args.seconds:g}s ..."
                    )
                    before = await meter.snapshot()
                    measured = await closed_loop(stub, members, f"{run_id}-m", args, args.seconds)
                    cpu = await meter.per_call(before, measured["applied"])
                    resent = await stub.BulkEarnPoints(
                        batch(members, f"{run_id}-m", 0, args.batch_size), timeout=args.timeout
                    )
                # Every invariant, every member, once the load has stopped.
                audit = await audit_ledger(monitor)
                await meter.close()
            pg = await server_version(infra.database_url)
        finally:
            if not monitor.is_closed():
                await monitor.close()
        report.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "config": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                },
                "machine": machine(infra, pg),
                "bulk_earn": measured,
                "cpu_ms_per_earn": cpu,
                "target_per_s": TARGET_PER_S,
                "resent_batch": {"applied": resent.applied, "replayed": resent.replayed},
                "audit_ok": audit.ok,
                "logs": str(log_dir),
            }
        )
        return report
    finally:
        await infra.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    done = run_and_report(run, args, lambda r: f"bulk_earn-{r['run_id'].split('-')[0]}.json")
    if done is None:
        return 1
    report, path = done
    m, cpu = report["bulk_earn"], report["cpu_ms_per_earn"]
    print(
        f"bulk earns/s in-service: {m['earns_per_s']} (target >= {report['target_per_s']});"
        f" {m['batches']} batches of {args.batch_size}, {m['errors']} errors,"
        f" batch p50 {m['batch_p50_ms']} ms p99 {m['batch_p99_ms']} ms"
    )
    print(f"CPU ms per earn: {cpu}")
    print(
        f"re-sent batch: {report['resent_batch']}; audit ok: {report['audit_ok']}. results: {path}"
    )
    ok = report["audit_ok"] and report["resent_batch"]["applied"] == 0 and m["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
