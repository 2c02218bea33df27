"""`python -m bench member-centre`: the mini-program member centre read, over
HTTP through the gateway, under open-loop load.

Issue 8 asks for p99 <= 50 ms at 1,000 reads/s, and the auth + rate-limit
overhead per call. One read is what the member centre page fetches: `GET
/v1/members/{id}/centre` (tier, benefits, progress, projection and the points
summary in one response; the gateway asks tiering and rewards side by side),
signed by a mini-program backend client that asserts the member
(X-Member-Appid / X-Member-Openid), as in production. Measured in the same
run, at the same rate, on the same machine, one row each:

1. the member centre (one signed call);
2. the same call through a second gateway without the door (AUTH_ENABLED=false,
   no signature, nonce, rate limit or member assertion): the difference is the
   door's overhead (`door_overhead`: latency and gateway CPU per call);
3. the page as two signed calls in parallel, `GET .../points/summary` and
   `GET .../tier` (latency = the slower), what the page did before the
   combined route;
4. the empty-call baseline: `GET /healthz` through the gateway (the HTTP
   floor: client, uvicorn, middleware, no auth, no downstream), run first.

Each row also reports CPU ms per read by process (bench/cpu.py: the gateway,
the services, PostgreSQL backends, Redis, the load generator), the figure that
decides how many cores a rate needs and that barely depends on what else the
machine is doing; the latency percentiles only hold below saturation.

The load generator is Python (aiohttp, HMAC signing per request) on the same
cores as the platform, so the rows include its own cost; compare them with
each other. Not httpx for the load: its connection pool scans every queued
request on each assignment, so the generator itself saturated one core at
~100 reads/s and the bench measured the client (seen with py-spy). Writes
bench/results/member-centre-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from devtools import devrun, supervisor
from servicekit.redis_client import create_redis

from . import member_views
from .cli import (
    BENCH_DATA,
    RESULTS_DIR,
    UNLIMITED_RATE,
    BenchInfra,
    UnexpectedReply,
    auth_overhead,
    gateway_without_auth,
    machine,
    measure,
    metered,
    platform_env,
    run_and_report,
    say,
    server_version,
    started,
    table,
)
from .cpu import LOAD_GENERATOR
from .loadgen import RunResult

APP_ID = "wx-bench"
CENTRE = "member centre (GET .../centre)"
CENTRE_OPEN = "member centre, no door"
TWO_CALLS = "summary + tier (two calls)"
EMPTY = "empty call (GET /healthz)"
NO_DOOR_GATEWAY = "gateway-noauth"
# --centre-only: what the empty-call row gives the consumers otherwise.
SETTLE_SECONDS = 10.0  # bench.cli.gateway_without_auth's child


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench member-centre",
        description="Open-loop benchmark of the mini-program member-centre read, with baseline.",
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="reads per second (1000)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument("--members", type=int, default=200, help="member pool size (200)")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request deadline (5 s)")
    parser.add_argument("--slo-ms", type=float, default=50.0, help="p99 target (50 ms)")
    parser.add_argument(
        "--centre-only",
        action="store_true",
        help="only the member-centre row (quick A/B runs, finding the saturation rate)",
    )
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


async def register_miniprogram(infra: BenchInfra) -> tuple[str, str]:
    """A mini-program backend client without a rate limit (the bench measures
    the read, not throttling): (key id, secret)."""
    from gateway.auth.admin import ClientAdmin
    from gateway.auth.crypto import SecretBox
    from gateway.auth.model import ClientKind
    from gateway.settings import GatewaySettings
    from servicekit.db import create_pool
    from servicekit.redis_client import create_redis

    pool = await create_pool(infra.database_url, min_size=1, max_size=1)
    redis = create_redis(infra.redis_url)
    try:
        issued = await ClientAdmin(
            pool, redis, SecretBox(GatewaySettings().auth_secret_key), infra.namespace
        ).create(
            ClientKind.MINIPROGRAM_BACKEND,
            "bench mini-program backend",
            app_ids=[APP_ID],
            rate_per_second=UNLIMITED_RATE,
            burst=int(UNLIMITED_RATE),
        )
    finally:
        await redis.aclose()
        await pool.close()
    return issued.key_id, issued.secret


def openid(n: int) -> str:
    return f"o-bench-{n:06d}"


async def enrol(http: httpx.AsyncClient, count: int, run_id: str) -> list[str]:
    """Log `count` members in (enrolled on first login); their ids in order."""
    gate = asyncio.Semaphore(16)

    async def one(n: int) -> str:
        async with gate:
            reply = await http.post(
                "/v1/members/identify",
                headers={"Idempotency-Key": f"{run_id}-enrol-{n}"},
                json={"request_key": f"{run_id}-{n}", "app_id": APP_ID, "openid": openid(n)},
            )
        if reply.status_code != 200:
            raise supervisor.DevrunError(f"enrolling a member: {reply.status_code} {reply.text}")
        return str(reply.json()["member"]["member_id"])

    return list(await asyncio.gather(*(one(n) for n in range(count))))


Get = Callable[[str, int], Awaitable[dict[str, Any]]]


def signed_get(http: aiohttp.ClientSession, key_id: str, secret: str, timeout: float) -> Get:
    """GET `path` as the mini-program backend for member n (signed, asserted)."""
    from gateway.auth.crypto import SignedHeaders, sign
    from gateway.auth.http import KEY_ID_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

    deadline = aiohttp.ClientTimeout(total=timeout)

    async def get(path: str, n: int) -> dict[str, Any]:
        # Signed exactly as gateway.auth.client.HmacAuth signs (GET: empty body).
        timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
        headers = {
            "X-Member-Appid": APP_ID,
            "X-Member-Openid": openid(n),
            KEY_ID_HEADER: key_id,
            TIMESTAMP_HEADER: timestamp,
            NONCE_HEADER: nonce,
            SIGNATURE_HEADER: sign(
                secret,
                "GET",
                path,
                timestamp,
                nonce,
                b"",
                SignedHeaders(appid=APP_ID, openid=openid(n)),
            ),
        }
        async with http.get(path, headers=headers, timeout=deadline) as reply:
            if reply.status != 200:
                raise UnexpectedReply(f"{path}: {reply.status}")
            return await reply.json()  # type: ignore[no-any-return]

    return get


def open_get(http: aiohttp.ClientSession, timeout: float) -> Get:
    """GET `path` with no credentials at all (the gateway without the door)."""
    deadline = aiohttp.ClientTimeout(total=timeout)

    async def get(path: str, n: int) -> dict[str, Any]:
        async with http.get(path, timeout=deadline) as reply:
            if reply.status != 200:
                raise UnexpectedReply(f"{path}: {reply.status}")
            return await reply.json()  # type: ignore[no-any-return]

    return get


def centre_call(get: Get, members: list[str]) -> Callable[[int], Awaitable[object]]:
    """One read: the whole page in one call."""

    async def call(i: int) -> object:
        n = i % len(members)
        member_id = members[n]
        page = await get(f"/v1/members/{member_id}/centre", n)
        if page["member_id"] != member_id:
            raise UnexpectedReply("another member's centre")
        if page["degraded"] or page["tier"] is None or page["points"] is None:
            raise UnexpectedReply(f"degraded centre: {page['degraded']}")
        return page

    return call


def two_calls(get: Get, members: list[str]) -> Callable[[int], Awaitable[object]]:
    """One read as the page did it before the combined route: two calls at once."""

    async def call(i: int) -> object:
        n = i % len(members)
        member_id = members[n]
        summary, tier = await asyncio.gather(
            get(f"/v1/members/{member_id}/points/summary", n),
            get(f"/v1/members/{member_id}/tier", n),
        )
        if summary["member_id"] != member_id or tier["member_id"] != member_id:
            raise UnexpectedReply("another member's centre")
        return summary

    return call


def empty_call(http: aiohttp.ClientSession, timeout: float) -> Callable[[int], Awaitable[object]]:
    deadline = aiohttp.ClientTimeout(total=timeout)

    async def call(i: int) -> object:
        async with http.get("/healthz", timeout=deadline) as reply:
            if reply.status != 200:
                raise UnexpectedReply(f"/healthz: {reply.status}")
            return await reply.read()

    return call


def always(
    call: Callable[[int], Awaitable[object]],
) -> Callable[[str], Callable[[int], Awaitable[object]]]:
    """measure()'s call_for: the same call in the warm-up and the measured run."""
    return lambda _phase: call


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from gateway.auth.client import HmacAuth

    started_at = datetime.now(UTC)
    run_id = "member-centre-" + started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    log_dir = BENCH_DATA / "logs" / run_id
    infra = await BenchInfra.start(run_id)
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
        key_id, secret = await register_miniprogram(infra)
        base_url = f"http://{supervisor.LOOPBACK}:{ports['http']}"
        noauth_url = f"http://{supervisor.LOOPBACK}:{ports['http_noauth']}"
        children = [*supervisor.platform_children(ports, base), gateway_without_auth(ports, base)]
        results: list[RunResult] = []
        async with (
            started(children, log_dir) as platform,
            metered(platform, infra) as meter,
            httpx.AsyncClient(
                base_url=base_url, auth=HmacAuth(key_id, secret), timeout=30
            ) as setup,
            aiohttp.ClientSession(
                base_url=base_url, connector=aiohttp.TCPConnector(limit=256)
            ) as load,
            aiohttp.ClientSession(
                base_url=noauth_url, connector=aiohttp.TCPConnector(limit=256)
            ) as open_load,
        ):
            members = await enrol(setup, args.members, run_id)
            say(f"enrolled {len(members)} members")
            signed = signed_get(load, key_id, secret, args.timeout)
            redis = create_redis(infra.redis_url)
            # Enrolling left events for the services' consumers (journeys,
            # tiering): the empty call goes first, so no read row runs while
            # they drain it (the first row's p99 was seconds at 200/s).
            rows = [
                (EMPTY, empty_call(load, args.timeout)),
                (
                    CENTRE,
                    member_views.changing(
                        centre_call(signed, members),
                        members,
                        args.reads_per_change,
                        redis,
                        infra.namespace,
                    ),
                ),
                (CENTRE_OPEN, centre_call(open_get(open_load, args.timeout), members)),
                (TWO_CALLS, two_calls(signed, members)),
            ]
            if args.centre_only:
                await asyncio.sleep(SETTLE_SECONDS)
            views_before = await asyncio.to_thread(member_views.view_reads, ports["metrics"])
            for name, call in rows[1:2] if args.centre_only else rows:
                results.append(await measure(name, always(call), args, meter))
            views_after = await asyncio.to_thread(member_views.view_reads, ports["metrics"])
            await redis.aclose()
        by_name = {r.name: r for r in results}
        centre, centre_open, empty = by_name[CENTRE], by_name.get(CENTRE_OPEN), by_name.get(EMPTY)
        cpu = {r.name: r.cpu_ms_per_call or {} for r in results}
        # The gateway that served each row (the door-less one for its row).
        gateway_ms = {
            name: ms.get(NO_DOOR_GATEWAY if name == CENTRE_OPEN else "gateway", 0.0)
            for name, ms in cpu.items()
        }
        platform_ms = cpu[CENTRE].get("total", 0.0) - cpu[CENTRE].get(LOAD_GENERATOR, 0.0)
        p99 = centre.summary()["latency_ms"]["p99"]
        floor = empty.summary()["latency_ms"]["p99"] if empty else None
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
                "calls_per_read": {CENTRE: 1, CENTRE_OPEN: 1, TWO_CALLS: 2, EMPTY: 1},
                "client": "aiohttp, HMAC-signed, member asserted (none without the door)",
                "reads_per_change": args.reads_per_change,
            },
            # The signed row's reads, warm-up included (the gateway's counter).
            "member_views": member_views.hit_rate(views_before, views_after, "centre"),
            "machine": machine(infra, pg_version),
            "load_average": os.getloadavg(),
            "results": [r.summary() for r in results],
            "gateway_cpu_ms_per_read": gateway_ms,
            "door_overhead": {
                "latency_ms": auth_overhead(centre, centre_open),
                "gateway_cpu_ms": round(gateway_ms[CENTRE] - gateway_ms[CENTRE_OPEN], 3),
            }
            if centre_open
            else None,
            # Every process but the load generator: the cores the target rate needs.
            "platform_cpu_ms_per_read": round(platform_ms, 3),
            "cores_for_target_rate": round(platform_ms * args.rate / 1000, 2),
            "p99_over_empty_call": round(p99 / floor, 2) if p99 and floor else None,
            "target": {
                "p99_ms_at_most": args.slo_ms,
                "at_rate_per_s": args.rate,
                "met": bool(
                    p99 is not None
                    and p99 <= args.slo_ms
                    and centre.achieved_rate >= 0.95 * args.rate
                    and not centre.errors
                ),
            },
        }
        report["_table"] = table(results)
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
        prog="bench member-centre",
        wall_time=False,
        ensure_ascii=False,
    )
    if done is None:
        return 1
    report, path = done
    print(f"member views (centre): {report['member_views']}")
    print(f"member centre p99 / empty call p99: x{report['p99_over_empty_call']}")
    door = report["door_overhead"]
    if door:
        print(
            f"door overhead per call: p50 {door['latency_ms']['p50']} ms, p99"
            f" {door['latency_ms']['p99']} ms, gateway CPU {door['gateway_cpu_ms']} ms"
        )
    print(
        f"platform CPU per member-centre read: {report['platform_cpu_ms_per_read']} ms"
        f" ({report['cores_for_target_rate']} cores at {report['config']['rate_per_s']:g}/s)"
    )
    target = report["target"]
    print(
        f"target p99 <= {target['p99_ms_at_most']} ms at {target['at_rate_per_s']:g}/s through"
        f" the gateway: {'met' if target['met'] else 'NOT met'}"
    )
    print(f"{report['machine']['cpus']} CPUs; results: {path} ({time.monotonic() - began:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
