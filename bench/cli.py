"""`python -m bench` (or `make bench`): the POS checkout path under open-loop load,
next to two baselines measured in the same run, on the same machine, at the
same rate.

1. Starts its own platform as real processes (the five services and the
   gateway, exactly as `make run` does), on free loopback ports, against fresh
   embedded PostgreSQL/Redis under .data/bench, or against DATABASE_URL /
   REDIS_URL in a throwaway database and Redis namespace (both removed at the
   end).
2. Seeds the demo brand, identifies a pool of members through the gateway.
3. Drives PosService.CompleteOrder (a unique pos_transaction_id each) at
   --rate per second for --duration seconds, after a warm-up.
4. Baseline (a): an empty grpc.aio unary call to a trivial server in its own
   process (bench/echo_server.py): the floor of one gRPC hop here.
5. Baseline (b): rewards' CompleteOrder SQL issued straight through one
   asyncpg pool (bench/sql_baseline.py): the floor the database sets.
6. Prints a table and the ratios, and writes everything to
   bench/results/<UTC timestamp>.json.

Optionally (--probe) it steps the rate up to find the highest rate the slice
sustains (achieved >= 95% of offered, errors <= 0.5%, p99 within --slo-ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform as pyplatform
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc

from devtools import devrun, embedded, supervisor
from servicekit.db import asyncpg_dsn, with_database
from servicekit.events import field_text
from servicekit.settings import ServiceSettings

from .cpu import CpuMeter, cpu_table
from .echo_server import METHOD as ECHO_METHOD
from .loadgen import RunResult, open_loop
from .stepping import Criteria, geometric_rates, step_line, step_up

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
BENCH_DATA = embedded.DATA_DIR / "bench"
PAID_FEN = 3200
GROSS_FEN = 3600
# Rate and burst that never throttle a benchmark (limits are checked, not hit).
UNLIMITED_RATE = 1_000_000.0


class UnexpectedReply(Exception):
    """A successful call whose answer shows it did not do the work measured."""


# ------------------------------------------------------------------ arguments


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Open-loop benchmark of POS CompleteOrder through the gateway, with baselines.",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="arrivals per second (200)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (3)")
    parser.add_argument("--members", type=int, default=100, help="member pool size (100)")
    parser.add_argument("--store-id", default=devrun.DEMO_STORE, help="demo store (SH001)")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="per-request deadline, seconds (5)"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="measure only the slice (faster)"
    )
    parser.add_argument(
        "--probe", action="store_true", help="then step the rate up to find the slice's maximum"
    )
    parser.add_argument("--probe-seconds", type=float, default=5.0, help="seconds per step (5)")
    parser.add_argument("--probe-factor", type=float, default=1.5, help="rate step factor (1.5)")
    parser.add_argument("--probe-max-rate", type=float, default=5000.0, help="stop here (5000)")
    parser.add_argument(
        "--slo-ms", type=float, default=250.0, help="probe: p99 must stay under this (250)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    args = parser.parse_args(argv)
    for name in ("rate", "duration", "timeout", "probe_seconds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if args.members < 1:
        parser.error("--members must be at least 1")
    if args.probe_factor <= 1:
        parser.error("--probe-factor must be above 1")
    return args


def say(message: str) -> None:
    print(f"bench | {message}", flush=True)


# ------------------------------------------------------------- infrastructure


LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}


def require_local(url: str, variable: str) -> None:
    """The benchmark loads what it points at: only servers on this machine."""
    parts = urlsplit(url)
    hosts = [parts.hostname or ""]
    # libpq also takes the host as a query parameter (unix socket directories).
    hosts += [q.split("=", 1)[1] for q in parts.query.split("&") if q.startswith("host=")]
    for host in hosts:
        if not (host in LOCAL_HOSTS or host.startswith(("/", "127."))):
            raise supervisor.DevrunError(
                f"{variable} points at {host}; the benchmark only runs against this machine"
                " (loopback or a unix socket). Unset it to use embedded servers."
            )


@dataclass
class BenchInfra:
    """Fresh data for one run, and how to remove it afterwards."""

    database_url: str
    redis_url: str
    namespace: str
    note: str
    servers: embedded.EmbeddedServers | None = None
    # Set when the database is a throwaway one on DATABASE_URL's server.
    admin_url: str | None = None
    # Set when Redis is shared (REDIS_URL): delete the run's namespace after.
    shared_redis: bool = False

    @classmethod
    async def start(cls, run_id: str) -> BenchInfra:
        given_db = os.environ.get("DATABASE_URL") or None
        given_redis = os.environ.get("REDIS_URL") or None
        if given_db:
            require_local(given_db, "DATABASE_URL")
        if given_redis:
            require_local(given_redis, "REDIS_URL")
        servers = None
        if not given_db or not given_redis:
            # Fresh embedded data every run: results never depend on leftovers.
            for part, given in (("pg", given_db), ("redis", given_redis)):
                if not given:
                    await asyncio.to_thread(shutil.rmtree, BENCH_DATA / part, True)
            say("starting embedded servers under .data/bench ...")
            servers = await asyncio.to_thread(embedded.start, "bench", given_db, given_redis)
        note = ", ".join(
            (
                "PostgreSQL from DATABASE_URL" if given_db else "embedded PostgreSQL",
                "Redis from REDIS_URL" if given_redis else "embedded Redis",
            )
        )
        infra = cls(
            database_url=given_db or servers.database_url,  # type: ignore[union-attr]
            redis_url=given_redis or servers.redis_url,  # type: ignore[union-attr]
            namespace=f"bench-{run_id}",
            note=note,
            servers=servers,
            shared_redis=bool(given_redis),
        )
        if given_db:
            # A throwaway database on the given server, dropped at the end.
            name = f"loyalty_bench_{run_id.replace('-', '_').lower()}"
            try:
                admin = await asyncpg.connect(asyncpg_dsn(given_db))
                try:
                    await admin.execute(f'CREATE DATABASE "{name}"')
                finally:
                    await admin.close()
            except BaseException:
                await infra.cleanup()
                raise
            infra.admin_url = given_db
            infra.database_url = with_database(given_db, name)
        return infra

    async def cleanup(self) -> None:
        if self.shared_redis:
            from redis.asyncio import Redis

            redis = Redis.from_url(self.redis_url)
            try:
                keys = [k async for k in redis.scan_iter(match=f"{self.namespace}:*", count=1000)]
                if keys:
                    await redis.delete(*keys)
            finally:
                await redis.aclose()
        if self.admin_url is not None:
            name = urlsplit(self.database_url).path.lstrip("/")
            admin = await asyncpg.connect(asyncpg_dsn(self.admin_url))
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()
        if self.servers is not None:
            await asyncio.to_thread(self.servers.stop)


async def server_version(database_url: str) -> str:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


# --------------------------------------------------------------------- phases


def demo_phone(i: int) -> str:
    """Distinct, valid mainland mobile numbers (139 + 8 digits), stable across runs."""
    return f"139{(20_000_000 + i * 7_919) % 100_000_000:08d}"


async def register_pos_key(infra: BenchInfra, store_id: str) -> str:
    """A POS key for the store, without a client limit: the bench measures
    the door's cost, not its throttling (docs/api.md, "Rate limits")."""
    from gateway.auth.admin import ClientAdmin
    from gateway.auth.crypto import SecretBox
    from gateway.auth.model import ClientKind
    from gateway.settings import GatewaySettings
    from servicekit.db import create_pool
    from servicekit.redis_client import create_redis

    pool = await create_pool(infra.database_url, min_size=1, max_size=1)
    redis = create_redis(infra.redis_url)
    box = SecretBox(GatewaySettings().auth_secret_key)
    try:
        issued = await ClientAdmin(pool, redis, box, infra.namespace).create(
            ClientKind.POS,
            f"bench till {store_id}",
            store_id=store_id,
            rate_per_second=UNLIMITED_RATE,
            burst=int(UNLIMITED_RATE),
        )
    finally:
        await redis.aclose()
        await pool.close()
    return issued.api_key


def pos_channel(pos_target: str, store_id: str, api_key: str) -> grpc.aio.Channel:
    """A channel whose calls carry the store's key (x-store-id / x-api-key)."""
    from gateway.auth.client import StoreKeyInterceptor

    interceptors = [StoreKeyInterceptor(store_id, api_key)] if api_key else None
    return grpc.aio.insecure_channel(pos_target, interceptors=interceptors)


async def identify_pool(pos_target: str, store_id: str, count: int, api_key: str = "") -> list[str]:
    from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc

    gate = asyncio.Semaphore(16)
    async with pos_channel(pos_target, store_id, api_key) as channel:
        stub = pos_pb2_grpc.PosServiceStub(channel)

        async def one(i: int) -> str:
            async with gate:
                reply = await stub.IdentifyMember(
                    pos_pb2.IdentifyMemberRequest(store_id=store_id, phone=demo_phone(i)),
                    timeout=10,
                )
                return str(reply.member_id)

        return list(await asyncio.gather(*(one(i) for i in range(count))))


@contextlib.asynccontextmanager
async def started(
    children: list[supervisor.Child], log_dir: Path
) -> AsyncIterator[supervisor.Platform]:
    platform = supervisor.Platform(children, log_dir=log_dir)
    try:
        await platform.spawn()
        took = await platform.wait_ready(90)
        say(f"{', '.join(c.name for c in children)} ready in {took:.1f}s (logs: {log_dir})")
        yield platform
    finally:
        await platform.stop()


CallFor = Callable[[str], Callable[[int], Awaitable[object]]]


async def events_behind(
    conn: asyncpg.Connection,
    redis: Any,
    namespace: str,
    producers: Collection[str] | None = None,
    groups: Collection[str] | None = None,
) -> int:
    """Unpublished outbox rows of every producer (or of `producers`) plus
    consumer groups (or those named in `groups`) of this namespace's streams
    that have not read or acknowledged everything: 0 when every event so far
    reached every consumer (also the tests' wait for quiet, which names the
    running services: a test's own group left behind is not theirs to wait for)."""
    # Every producer's outbox: an event still unpublished has no stream entry
    # yet, so the streams alone would say "caught up" before the relay ran.
    outboxes = [
        schema
        for schema in await conn.fetchval(
            "SELECT array_agg(table_schema::text) FROM information_schema.tables"
            " WHERE table_name = 'outbox'"
        )
        or []
        if producers is None or schema in producers
    ]
    behind = 0
    if outboxes:
        behind = int(
            await conn.fetchval(
                "SELECT "
                + " + ".join(
                    f"(SELECT count(*) FROM {schema}.outbox WHERE published_at IS NULL)"
                    for schema in outboxes
                )
            )
        )
    # Streams only: the relay's `:head` hash and `:replay` list live beside them.
    async for key in redis.scan_iter(match=f"{namespace}:events:*", count=100, _type="STREAM"):
        if b":dlq:" in key:  # dead letters are nobody's to consume
            continue
        last = (await redis.xinfo_stream(key))["last-generated-id"]
        for group in await redis.xinfo_groups(key):
            if groups is not None and field_text(group["name"]) not in groups:
                continue
            if group["pending"] or group["last-delivered-id"] != last:
                behind += 1
    return behind


async def events_drained(infra: BenchInfra, timeout: float = 180.0) -> float:
    """Wait until every producer's outbox is published and every consumer
    group has read and acknowledged every event of this run's streams; the
    seconds it took. Enrolling the member pool
    publishes an event per member that tiering and engagement then process:
    measured meanwhile, the first row would time that backlog, not the call."""
    from redis.asyncio import Redis

    redis = Redis.from_url(infra.redis_url)
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    started_at = time.monotonic()
    try:
        while True:
            behind = await events_behind(conn, redis, infra.namespace)
            if not behind:
                return time.monotonic() - started_at
            if time.monotonic() - started_at > timeout:
                raise supervisor.DevrunError(
                    f"{behind} unpublished events or consumer groups still behind"
                    f" after {timeout:.0f}s"
                )
            await asyncio.sleep(0.5)
    finally:
        await redis.aclose()
        await conn.close()


def backstop(args: argparse.Namespace) -> float:
    """The generator's own limit: a little past the gRPC deadline, so a slow call
    is reported by gRPC as DEADLINE_EXCEEDED rather than cancelled by the client
    (the SQL baseline has no deadline of its own and ends here)."""
    return args.timeout + 1.0


async def measure(
    name: str, call_for: CallFor, args: argparse.Namespace, meter: CpuMeter | None = None
) -> RunResult:
    """Warm-up at the same rate (discarded), then the measured run.

    `call_for(phase)` gives the request function for one phase, so each phase
    can use its own unique keys. With a `meter`, the measured run also reports
    CPU ms per call by process.
    """
    if args.warmup > 0:
        warm = await open_loop(
            f"{name} warm-up", call_for("w"), args.rate, args.warmup, timeout=backstop(args)
        )
        if warm.ok == 0:
            raise supervisor.DevrunError(f"{name}: every warm-up request failed: {warm.errors}")
    say(f"measuring {name}: {args.rate:g}/s for {args.duration:g}s ...")
    before = await meter.snapshot() if meter is not None else None
    result = await open_loop(name, call_for("m"), args.rate, args.duration, timeout=backstop(args))
    if meter is not None and before is not None:
        result.cpu_ms_per_call = await meter.per_call(before, result.ok)
    lat = result.latency_ms()
    say(
        f"  {result.ok} ok, errors {result.errors or 'none'},"
        f" p50 {lat['p50']} ms, p99 {lat['p99']} ms"
    )
    return result


async def measure_echo(args: argparse.Namespace, log_dir: Path) -> RunResult:
    """The empty-gRPC baseline: an echo server in its own process, measured
    like the slice (the floor of one hop on this machine)."""
    echo_port = supervisor.free_port()
    echo = supervisor.Child(
        "echo",
        [sys.executable, "-m", "bench.echo_server", "--port", str(echo_port)],
        supervisor.child_env(os.environ),
        grpc_target=f"{supervisor.LOOPBACK}:{echo_port}",
    )
    async with (
        started([echo], log_dir) as platform,
        metered(platform) as meter,
        grpc.aio.insecure_channel(f"{supervisor.LOOPBACK}:{echo_port}") as channel,
    ):
        ping = channel.unary_unary(ECHO_METHOD)

        def echo_call(i: int) -> Awaitable[object]:
            return ping(b"", timeout=args.timeout)  # type: ignore[no-any-return]

        return await measure("baseline: empty gRPC unary", lambda _: echo_call, args, meter)


@contextlib.asynccontextmanager
async def metered(
    platform: supervisor.Platform | None, infra: BenchInfra | None = None
) -> AsyncIterator[CpuMeter]:
    """A CPU meter over the platform's processes (and, given `infra`, its
    database's backends and Redis)."""
    processes = {
        c.name: c.proc.pid for c in (platform.children if platform else []) if c.proc is not None
    }
    meter = await CpuMeter.open(
        processes,
        infra.database_url if infra else None,
        infra.redis_url if infra else None,
    )
    try:
        yield meter
    finally:
        await meter.close()


def platform_env(infra: BenchInfra) -> dict[str, str]:
    """The environment of the platform's children: this run's data only. The
    bench drives one store at hundreds of orders a second (a real store does
    about one a minute), so the per-store bucket is opened wide; the Redis
    round trip that checks it is still paid."""
    return supervisor.child_env(
        os.environ,
        DATABASE_URL=infra.database_url,
        REDIS_URL=infra.redis_url,
        REDIS_NAMESPACE=infra.namespace,
        STORE_RATE_PER_SECOND=str(UNLIMITED_RATE),
        STORE_BURST=str(int(UNLIMITED_RATE)),
    )


def gateway_without_auth(ports: dict[str, int], base_env: dict[str, str]) -> supervisor.Child:
    """A second gateway in front of the same services, with AUTH_ENABLED=false:
    the same call through it is the baseline of the door's overhead."""
    addresses = {
        f"{name.upper()}_ADDR": f"{supervisor.LOOPBACK}:{ports[name]}"
        for name in supervisor.SERVICES
    }
    env = supervisor.child_env(
        base_env,
        AUTH_ENABLED="false",
        HTTP_HOST=supervisor.LOOPBACK,
        HTTP_PORT=str(ports["http_noauth"]),
        POS_GRPC_HOST=supervisor.LOOPBACK,
        POS_GRPC_PORT=str(ports["pos_noauth"]),
        METRICS_PORT=str(ports["metrics_noauth"]),
        **addresses,
    )
    return supervisor.Child(
        "gateway-noauth",
        [sys.executable, "-m", "gateway"],
        env,
        http_ready=(supervisor.LOOPBACK, ports["http_noauth"], "/readyz"),
        tier=1,
    )


def machine(infra: BenchInfra, pg_version: str) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": pyplatform.platform(),
        "python": pyplatform.python_version(),
        "grpcio": grpc.__version__,
        "postgres": pg_version,
        "infrastructure": infra.note,
    }


def slice_call(
    stub: Any, store_id: str, members: list[str], tag: str, timeout: float
) -> Callable[[int], Awaitable[object]]:
    from loyalty.common.v1 import common_pb2
    from loyalty.pos.v1 import pos_pb2

    async def call(i: int) -> object:
        request = pos_pb2.CompleteOrderRequest(
            store_id=store_id,
            pos_transaction_id=f"{tag}-{i}",
            member_id=members[i % len(members)],
            paid_amount_fen=PAID_FEN,
            gross_amount_fen=GROSS_FEN,
            lines=[
                pos_pb2.OrderLine(
                    sku="MT-001",
                    name="Jasmine milk tea",
                    category="milk_tea",
                    quantity=1,
                    paid_amount_fen=PAID_FEN,
                )
            ],
            channel=common_pb2.CHANNEL_STORE,
        )
        reply = await stub.CompleteOrder(request, timeout=timeout)
        if reply.replayed or reply.points_earned <= 0:
            # Every key is new: a replay or no points would mean the run measured
            # something other than a settlement.
            raise UnexpectedReply(f"replayed={reply.replayed} points={reply.points_earned}")
        return reply

    return call


async def probe(
    call_for: Callable[[str], Callable[[int], Awaitable[object]]], args: argparse.Namespace
) -> dict[str, Any]:
    """Step the open-loop rate up until the slice stops keeping up."""
    criteria = Criteria(args.slo_ms, achieved_tolerance=0.05, max_error_fraction=0.005)
    first = args.rate * args.probe_factor
    rates = (
        geometric_rates(first, args.probe_factor, args.probe_max_rate)
        if first <= args.probe_max_rate
        else []
    )

    async def run_step(n: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
        result = await open_loop(
            f"probe {rate:.0f}/s",
            call_for(f"p{n}"),
            rate,
            args.probe_seconds,
            timeout=backstop(args),
        )
        return result, result.summary()

    stepped = await step_up(
        rates,
        run_step,
        criteria,
        on_step=lambda step, _: say(f"  probe {step_line(step, criteria)}"),
    )
    best = stepped.knee
    return {
        "criteria": criteria.describe(),
        "max_sustained_rate_per_s": None if best is None else round(best, 1),
        "steps": stepped.summaries,
    }


# -------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def auth_overhead(with_auth: RunResult, without: RunResult) -> dict[str, float | None]:
    """What the door (key check, scope, one Redis round trip) adds per call."""
    a, b = with_auth.summary()["latency_ms"], without.summary()["latency_ms"]
    return {
        q: (round(a[q] - b[q], 3) if a.get(q) is not None and b.get(q) is not None else None)
        for q in ("p50", "p90", "p99")
    }


def table(results: list[RunResult]) -> str:
    head = (
        f"{'':34} {'offered/s':>9} {'achieved/s':>10} {'ok':>6} {'errors':>6}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}"
    )
    rows = [head, "-" * len(head)]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in results:
        lat = r.latency_ms()
        rows.append(
            f"{r.name:34} {r.offered_rate:9.0f} {r.achieved_rate:10.1f} {r.ok:6d}"
            f" {sum(r.errors.values()):6d} {fmt(lat['p50']):>8} {fmt(lat['p99']):>8}"
            f" {fmt(lat['p99.9']):>9} {fmt(lat['max']):>8}"
        )
        for status, count in r.errors.items():
            rows.append(f"{'':36}{status}: {count}")
    with_cpu = [(r.name, r.cpu_ms_per_call) for r in results if r.cpu_ms_per_call is not None]
    if with_cpu:
        rows += ["", cpu_table(with_cpu)]
    return "\n".join(rows)


def ratios(slice_: RunResult, baselines: list[RunResult]) -> dict[str, dict[str, float | None]]:
    s = slice_.latency_ms()
    out = {}
    for b in baselines:
        lat = b.latency_ms()
        out[b.name] = {
            "p50": ratio(s["p50"], lat["p50"]),
            "p99": ratio(s["p99"], lat["p99"]),
            "p99.9": ratio(s["p99.9"], lat["p99.9"]),
        }
    return out


# ----------------------------------------------------------------------- run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    infra = await BenchInfra.start(run_id)
    report: dict[str, Any] = {"run_id": run_id, "started_at": started_at.isoformat()}
    try:
        say("migrating and seeding ...")
        await asyncio.to_thread(devrun.migrate, infra.database_url)
        await devrun.seed(infra.database_url)
        pg_version = await server_version(infra.database_url)

        ports = supervisor.free_ports()
        extra = supervisor.free_ports()
        ports.update(
            http_noauth=extra["http"], pos_noauth=extra["pos"], metrics_noauth=extra["metrics"]
        )
        base = platform_env(infra)
        pos_target = f"{supervisor.LOOPBACK}:{ports['pos']}"
        api_key = await register_pos_key(infra, args.store_id)
        children = [*supervisor.platform_children(ports, base), gateway_without_auth(ports, base)]
        async with started(children, log_dir) as platform, metered(platform, infra) as meter:
            members = await identify_pool(pos_target, args.store_id, args.members, api_key)
            say(f"identified {len(members)} members at {args.store_id}")
            took = await events_drained(infra)
            say(f"consumers caught up with the enrolment events in {took:.1f}s")
            from loyalty.pos.v1 import pos_pb2_grpc

            async with pos_channel(pos_target, args.store_id, api_key) as channel:
                stub = pos_pb2_grpc.PosServiceStub(channel)

                def call_for(phase: str) -> Callable[[int], Awaitable[object]]:
                    return slice_call(
                        stub, args.store_id, members, f"{run_id}-{phase}", args.timeout
                    )

                slice_result = await measure("POS CompleteOrder via gateway", call_for, args, meter)
                if args.probe:
                    say("probing the maximum sustained rate ...")
                    report["probe"] = await probe(call_for, args)
            # The same call, through the gateway without the door, once the
            # first row's events are consumed (it must not pay for them).
            await events_drained(infra)
            noauth_target = f"{supervisor.LOOPBACK}:{ports['pos_noauth']}"
            async with grpc.aio.insecure_channel(noauth_target) as channel:
                open_stub = pos_pb2_grpc.PosServiceStub(channel)

                def open_call_for(phase: str) -> Callable[[int], Awaitable[object]]:
                    return slice_call(
                        open_stub, args.store_id, members, f"{run_id}-open-{phase}", args.timeout
                    )

                noauth_result = await measure(
                    "baseline: same call, gateway auth off", open_call_for, args, meter
                )

        baselines: list[RunResult] = [noauth_result]
        if not args.no_baselines:
            baselines.append(await measure_echo(args, log_dir))

            from .sql_baseline import RewardsSqlBaseline

            sql = await RewardsSqlBaseline.connect(
                infra.database_url,
                args.store_id,
                members,
                f"{run_id}-sql",
                pool_size=ServiceSettings().db_pool_max,
            )
            try:
                async with metered(None, infra) as meter:
                    baselines.append(
                        await measure("baseline: same SQL via asyncpg", sql.call_for, args, meter)
                    )
            finally:
                await sql.close()

        report.update(
            {
                "finished_at": datetime.now(UTC).isoformat(),
                "config": {
                    "rate_per_s": args.rate,
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "members": args.members,
                    "store_id": args.store_id,
                    "timeout_s": args.timeout,
                    "open_loop": True,
                    "latency_from": "scheduled send time",
                },
                "machine": machine(infra, pg_version),
                "slice": slice_result.summary(),
                "baselines": [b.summary() for b in baselines],
                "ratios_slice_over_baseline": ratios(slice_result, baselines),
                "auth_overhead_ms": auth_overhead(slice_result, noauth_result),
                "logs": str(log_dir),
            }
        )
        report["_table"] = table([slice_result, *baselines])
        return report
    finally:
        await infra.cleanup()


def print_report(report: dict[str, Any], path: Path) -> None:
    print()
    print(report.pop("_table"))
    print()
    for name, r in report["ratios_slice_over_baseline"].items():
        print(f"slice / {name}: p50 x{r['p50']}, p99 x{r['p99']}, p99.9 x{r['p99.9']}")
    overhead = report["auth_overhead_ms"]
    print(
        f"auth + rate-limit overhead per call: p50 {overhead['p50']} ms, "
        f"p90 {overhead['p90']} ms, p99 {overhead['p99']} ms"
    )
    if "probe" in report:
        best = report["probe"]["max_sustained_rate_per_s"]
        print(
            f"max sustained rate (probe): {best if best is not None else 'below the first step'}/s"
        )
    machine = report["machine"]
    print(
        f"\n{machine['cpus']} CPUs, Python {machine['python']}, PostgreSQL {machine['postgres']},"
        f" {machine['infrastructure']}; everything on this machine, loopback only."
    )
    print(f"results: {path}")


def run_and_report(
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    args: argparse.Namespace,
    filename: Callable[[dict[str, Any]], str],
    *,
    prog: str = "",
    wall_time: bool = True,
    **dump: Any,
) -> tuple[dict[str, Any], Path] | None:
    """The shared tail of a scenario's main(): run it, write the report (less
    its "_table") as JSON to args.results_dir / filename(report), and print the
    table, if any, between blank lines. None when the run failed (DevrunError,
    reported as "prog: ..." on stderr, or by say() without a prog)."""
    began = time.monotonic()
    try:
        report = asyncio.run(run(args))
    except supervisor.DevrunError as exc:
        if prog:
            print(f"{prog}: {exc}", file=sys.stderr)
        else:
            say(f"error: {exc}")
        return None
    if wall_time:
        report["wall_time_s"] = round(time.monotonic() - began, 1)
    printable = report.pop("_table", None)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / filename(report)
    path.write_text(json.dumps(report, indent=2, **dump) + "\n")
    if printable is not None:
        print()
        print(printable)
        print()
    return report, path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))

    async def guarded() -> dict[str, Any]:
        # SIGTERM ends the run like Ctrl-C does: cleanup still stops every child.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args)

    began = time.monotonic()
    try:
        try:
            import uvloop
        except ImportError:
            report = asyncio.run(guarded())
        else:
            report = uvloop.run(guarded())
    except supervisor.DevrunError as exc:
        say(f"error: {exc}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted")
        return 130
    report["wall_time_s"] = round(time.monotonic() - began, 1)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{report['run_id'].split('-')[0]}.json"
    table_text = report["_table"]
    path.write_text(json.dumps({k: v for k, v in report.items() if k != "_table"}, indent=2) + "\n")
    report["_table"] = table_text
    print_report(report, path)
    return 0
