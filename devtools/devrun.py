"""The whole platform on one machine: `python -m devtools.devrun run|migrate|seed|bench`.

`run` (what `make run` calls) needs nothing installed but Python: without
DATABASE_URL / REDIS_URL it starts embedded PostgreSQL and Redis with their data
under .data/run (kept across restarts), migrates every schema, seeds the demo
brand, then starts the five services and the gateway as real child processes,
exactly as they run in production (`python -m services.<name>`, `python -m
gateway`), each in its own process group so Ctrl-C reaches only this supervisor,
which then stops them in order: SIGTERM, a grace period, then SIGKILL.

The same process supervision (`Platform`) starts the system under test for the
benchmark (bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import grpc

from servicekit.db import asyncpg_dsn
from servicekit.settings import DEV_ENV_FILE

from . import embedded
from .supervisor import (
    LOOPBACK,
    ROOT,
    SERVICES,
    STOP_GRACE_SECONDS,
    DevrunError,
    Platform,
    check_ports_free,
    child_env,
    platform_children,
    ports_from_env,
    say,
)

DEMO_STORE = "SH001"
DEMO_PHONE = "13912345678"
# The demo mini-program: its client may assert only this app's openids, and
# the local fake WeChat (gateway/wechat_fake.py) accepts phone codes
# `dev-<phone>` for it.
DEMO_APP_ID = "wx-shop"
# The console's demo operator: every role; a new one-time password each run.
DEMO_OPERATOR = "demo-admin"
T = TypeVar("T")

# ---------------------------------------------------------------- infrastructure


@dataclass
class Infra:
    database_url: str
    redis_url: str
    # What the banner says about where the data lives.
    note: str
    servers: embedded.EmbeddedServers | None = None

    def stop(self) -> None:
        if self.servers is not None:
            self.servers.stop()


def write_dev_env(database_url: str, redis_url: str, namespace: str) -> None:
    """Tell the operator commands of this checkout where `make run`'s servers are
    (servicekit/settings.py reads the file when the variables are unset)."""
    DEV_ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by `make run` while it runs; removed when it stops.",
        f"DATABASE_URL={database_url}",
        f"REDIS_URL={redis_url}",
        f"REDIS_NAMESPACE={namespace}",
    ]
    DEV_ENV_FILE.write_text("\n".join(lines) + "\n")


def start_infra(purpose: str, env: Mapping[str, str]) -> Infra:
    """Servers from DATABASE_URL / REDIS_URL, or embedded ones for what is unset."""
    database_url = env.get("DATABASE_URL") or None
    redis_url = env.get("REDIS_URL") or None
    if database_url and redis_url:
        return Infra(database_url, redis_url, "PostgreSQL and Redis from DATABASE_URL / REDIS_URL")
    missing = " and ".join(
        n for n, v in (("PostgreSQL", database_url), ("Redis", redis_url)) if not v
    )
    where = f"{embedded.DATA_DIR.relative_to(ROOT)}/{purpose}"
    say(f"starting embedded {missing} (data under {where}) ...")
    servers = embedded.start(purpose, database_url, redis_url)
    return Infra(
        servers.database_url, servers.redis_url, f"embedded {missing}, data in {where}", servers
    )


def migrate(database_url: str) -> None:
    # Imported here: Alembic is only needed by this step.
    from servicekit.migrations import upgrade_all

    upgrade_all(database_url)


async def seed(database_url: str) -> None:
    """The demo brand (stores, earn rules, tiers, store staff); safe to repeat."""
    import asyncpg

    from services.guides.seed import seed_demo as seed_guides
    from services.rewards.seed import seed_demo as seed_rewards
    from services.tiering.seed import seed_demo as seed_tiering

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        for step in (seed_rewards, seed_tiering, seed_guides):
            async with conn.transaction():
                await step(conn)
    finally:
        await conn.close()


async def seed_activity(database_url: str, now: datetime | None = None) -> None:
    """The demo brand's last 90 days (servicekit/demo.py), so every dashboard
    has something on first start: members, orders and points through rewards'
    ledger, coupons issued and redeemed, referrals, tiers and lifecycle moves
    (two tiering recomputes), a journey with a holdout. Each service's seed
    writes its own schema; idempotent (a second run adds nothing). Not part of
    `seed` (benchmarks and the fault suite start from the bare brand)."""
    from servicekit.db import Database, create_pool
    from servicekit.demo import activity
    from services.engagement.seed import seed_demo_journey
    from services.member.seed import seed_demo_members
    from services.rewards.seed import DEMO_STORES, seed_demo_activity
    from services.tiering.seed import seed_demo_activity as seed_tiering_activity

    now = now or datetime.now(UTC)
    demo = activity(now, [s.store_id for s in DEMO_STORES])
    pool = await create_pool(database_url, 1, 4)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await seed_demo_members(conn, demo.members)
        order_ids = await seed_demo_activity(Database(pool, "rewards", "rewards"), demo)
        await seed_tiering_activity(Database(pool, "tiering", "tiering"), demo, order_ids, now)
        async with pool.acquire() as conn, conn.transaction():
            await seed_demo_journey(conn, demo, now)
    finally:
        await pool.close()


# -------------------------------------------------------------------------- run


@contextlib.contextmanager
def _signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Handle SIGINT/SIGTERM in the loop instead of dying, so shutdown happens in order."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _python_for_display() -> str:
    exe = Path(sys.executable)
    return str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else sys.executable


@dataclass
class DemoKeys:
    """Keys `make run` registers (fresh ones each run: a secret is shown once)."""

    pos_api_key: str
    operator_key_id: str
    operator_secret: str
    miniprogram_key_id: str
    miniprogram_secret: str


async def demo_clients(database_url: str, redis_url: str, namespace: str) -> DemoKeys:
    """A POS for the demo store, an operator console and a mini-program backend."""
    from gateway.auth.admin import ClientAdmin
    from gateway.auth.crypto import SecretBox
    from gateway.auth.model import ClientKind
    from gateway.settings import GatewaySettings
    from servicekit.db import create_pool
    from servicekit.redis_client import create_redis

    pool = await create_pool(database_url, min_size=1, max_size=1)
    redis = create_redis(redis_url)
    admin = ClientAdmin(pool, redis, SecretBox(GatewaySettings().auth_secret_key), namespace)
    try:
        pos = await admin.fresh_key(
            ClientKind.POS,
            f"demo POS {DEMO_STORE}",
            f"demo-pos-{DEMO_STORE.lower()}",
            store_id=DEMO_STORE,
        )
        operator = await admin.fresh_key(
            ClientKind.OPERATOR_CONSOLE, "demo operator console", "demo-operator"
        )
        miniprogram = await admin.fresh_key(
            ClientKind.MINIPROGRAM_BACKEND,
            "demo mini-program backend",
            "demo-miniprogram",
            app_ids=[DEMO_APP_ID],
        )
    finally:
        await redis.aclose()
        await pool.close()
    return DemoKeys(
        pos.api_key, operator.key_id, operator.secret, miniprogram.key_id, miniprogram.secret
    )


@dataclass
class ConsoleSetup:
    """The console's gateway clients (one per role) and its demo operator."""

    gateway_clients_json: str
    operator: str
    one_time_password: str


async def console_setup(database_url: str, redis_url: str, namespace: str) -> ConsoleSetup:
    """Registers the console's per-role gateway clients (each holding only its
    role's scopes, docs/console.md) and gives the demo operator a one-time password."""
    import json

    import asyncpg

    from console import users
    from console.roles import SCOPES, Role
    from gateway.auth.admin import ClientAdmin
    from gateway.auth.crypto import SecretBox
    from gateway.auth.model import ClientKind
    from gateway.settings import GatewaySettings
    from servicekit.db import create_pool
    from servicekit.redis_client import create_redis

    pool = await create_pool(database_url, min_size=1, max_size=1)
    redis = create_redis(redis_url)
    admin = ClientAdmin(pool, redis, SecretBox(GatewaySettings().auth_secret_key), namespace)
    clients: dict[str, dict[str, str]] = {}
    try:
        for role in Role:
            issued = await admin.fresh_key(
                ClientKind.OPERATOR_CONSOLE,
                f"console, role {role.value}",
                f"console-{role.value.replace('_', '-')}",
                scopes=SCOPES[role],
            )
            clients[role.value] = {"key_id": issued.key_id, "secret": issued.secret}
    finally:
        await redis.aclose()
        await pool.close()
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        password = await users.reset(conn, DEMO_OPERATOR, [r.value for r in Role])
    finally:
        await conn.close()
    return ConsoleSetup(json.dumps(clients), DEMO_OPERATOR, password)


async def identify_demo_member(pos_target: str, api_key: str) -> str:
    """Identify (enrol on first run) the demo member through the gateway, as a POS would."""
    from gateway.auth.client import StoreKeyInterceptor
    from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc

    interceptors = [StoreKeyInterceptor(DEMO_STORE, api_key)]
    async with grpc.aio.insecure_channel(pos_target, interceptors=interceptors) as channel:
        reply = await pos_pb2_grpc.PosServiceStub(channel).IdentifyMember(
            pos_pb2.IdentifyMemberRequest(store_id=DEMO_STORE, phone=DEMO_PHONE), timeout=10
        )
    return str(reply.member_id)


def banner(
    ports: Mapping[str, int],
    infra: Infra,
    member_id: str | None,
    note: str,
    keys: DemoKeys,
    console: ConsoleSetup | None = None,
) -> str:
    py = _python_for_display()
    http = f"http://{LOOPBACK}:{ports['http']}"
    pos = f"{LOOPBACK}:{ports['pos']}"
    cli = f"{py} -m gateway.pos_cli --target {pos} --api-key {keys.pos_api_key}"
    # Every HTTP call is signed (docs/api.md, "Authentication"); this signs and sends.
    signed = (
        f"{py} -m gateway.auth.client --key-id {keys.operator_key_id}"
        f" --secret {keys.operator_secret} GET"
    )
    mid = member_id or "<member_id from the identify call>"
    lines = [
        "",
        f"The loyalty platform is up ({infra.note}).",
        "",
        f"  gateway HTTP    {http}   (API docs {http}/docs, spec {http}/openapi.json)",
        f"  gateway POS     {pos}   (gRPC loyalty.pos.v1.PosService)",
    ]
    if console is not None:
        lines += [
            f"  console         http://{LOOPBACK}:{ports['console']}   (operator console:"
            f" user {console.operator}, one-time password {console.one_time_password})",
        ]
    lines += [
        f"  {name:<15} {LOOPBACK}:{ports[name]}   (gRPC, health + reflection)" for name in SERVICES
    ]
    lines += [
        f"  PostgreSQL      {infra.database_url}",
        f"  Redis           {infra.redis_url}",
        f"  # operator commands of this checkout (python -m services.rewards audit, python -m"
        f" gateway clients ...) reach these through {DEV_ENV_FILE.relative_to(ROOT)}"
        if DEV_ENV_FILE.is_relative_to(ROOT)
        else f"  # operator commands reach these through {DEV_ENV_FILE}",
    ]
    lines += ["", "Try it (copy-paste):"]
    if member_id is None:
        lines += [f"  # identifying the demo member failed ({note}); step 1 gives the member id"]
    else:
        lines += [f"  # demo member {DEMO_PHONE} is {member_id}"]
    lines += [
        f"  {cli} identify --store-id {DEMO_STORE} --phone {DEMO_PHONE}",
        f"  {cli} complete-order --store-id {DEMO_STORE} --pos-transaction-id "
        f"T{int(time.time())} --member-id {mid} --paid-fen 3200",
        "  # run the same complete-order again: it replays (idempotent), no extra points",
        "  # HTTP calls are signed; as the demo operator console:",
        f"  {signed} {http}/v1/members/{mid}/points",
        f"  {signed} {http}/v1/members/{mid}",
        f"  {signed} {http}/v1/members/{mid}/spend",
        f"  curl -s {http}/readyz   # probes need no key",
        "  # demo mini-program backend (acts for the member it asserts with X-Member-Openid):",
        f"  #   key id {keys.miniprogram_key_id}  secret {keys.miniprogram_secret}",
        f"  #   app {DEMO_APP_ID} only; bind a phone with the local fake WeChat's code:",
        f"  {py} -m gateway.auth.client --key-id {keys.miniprogram_key_id} --secret "
        f"{keys.miniprogram_secret} --header 'Idempotency-Key: bind-1' --json "
        f'\'{{"request_key":"bind-1","app_id":"{DEMO_APP_ID}","openid":"o-demo",'
        f'"code":"dev-{DEMO_PHONE}"}}\' POST {http}/v1/members/bind-phone',
        "  # a journey through the channel providers' fakes (the production send path):",
        f"  {py} -m gateway.auth.client --key-id {keys.operator_key_id} --secret "
        f'{keys.operator_secret} --json "$(cat devtools/provider_fakes/demo_journey.json)" '
        f"POST {http}/v1/admin/journeys",
        f"  {py} -m gateway.auth.client --key-id {keys.miniprogram_key_id} --secret "
        f"{keys.miniprogram_secret} --header 'X-Member-Appid: {DEMO_APP_ID}' "
        "--header 'X-Member-Openid: o-demo' --json "
        f'\'{{"event_id":"\'$({py} -c "import uuid; print(uuid.uuid4())")\'",'
        '"type":"check_in","attributes":{"store_id":"SH001"}}\' '
        f"POST {http}/v1/members/{mid}/events",
        f"  {signed} {http}/v1/admin/journeys/demo-check-in/sends"
        "   # app_push delivered; sms sending, then delivered by its report",
        "  # more clients: python -m gateway clients create --help",
        "",
        "Ctrl-C to stop.",
        "",
    ]
    return "\n".join(lines)


async def _until(stop: asyncio.Event, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None if `stop` is set first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


async def _run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    ports = ports_from_env(env)
    check_ports_free(ports)
    stop = asyncio.Event()
    received: list[int] = []
    platform: Platform | None = None

    def on_signal(sig: int) -> None:
        if stop.is_set() and platform is not None:
            say("second interrupt: killing the children now")
            platform.kill()
        received.append(sig)
        stop.set()

    with _signals(on_signal):
        infra = await asyncio.to_thread(start_infra, "run", env)
        try:
            # Each setup step runs to completion; an interrupt meanwhile ends the run after it.
            say("migrating all schemas ...")
            await asyncio.to_thread(migrate, infra.database_url)
            if stop.is_set():
                return 0
            say("seeding the demo brand ...")
            await seed(infra.database_url)
            say("seeding 90 days of demo activity (first start only) ...")
            await seed_activity(infra.database_url)
            if stop.is_set():
                return 0
            namespace = env.get("REDIS_NAMESPACE", "loyalty")
            write_dev_env(infra.database_url, infra.redis_url, namespace)
            say(f"operator commands in this checkout now reach these servers ({DEV_ENV_FILE})")
            say("registering demo clients (new keys each run) ...")
            keys = await demo_clients(infra.database_url, infra.redis_url, namespace)
            console = await console_setup(infra.database_url, infra.redis_url, namespace)
            base = child_env(
                env,
                DATABASE_URL=infra.database_url,
                REDIS_URL=infra.redis_url,
                REDIS_NAMESPACE=namespace,
                # Readable lines in a terminal; JSON stays the production default.
                LOG_JSON=env.get("LOG_JSON", "false"),
            )
            platform = Platform(
                platform_children(
                    ports,
                    base,
                    console_env={"CONSOLE_GATEWAY_CLIENTS": console.gateway_clients_json},
                )
            )
            await platform.spawn()
            say(f"started {len(platform.children)} processes; waiting until all are ready ...")
            took = await _until(stop, platform.wait_ready(args.timeout))
            if took is None:
                return 0  # interrupted during startup
            say(f"all ready in {took:.1f}s")

            member_id: str | None = None
            note = ""
            try:
                member_id = await identify_demo_member(
                    f"{LOOPBACK}:{ports['pos']}", keys.pos_api_key
                )
            except grpc.aio.AioRpcError as exc:
                note = f"{exc.code().name}: {exc.details()}"
            print(banner(ports, infra, member_id, note, keys, console), flush=True)

            dead = await _until(stop, platform.wait_any_exit())
            if dead is not None:
                raise DevrunError(platform.describe_exit(dead) + "; stopping the rest")
            return 0
        except DevrunError as exc:
            say(f"error: {exc}")  # before the shutdown lines, next to its cause
            return 1
        finally:
            if received:
                name = signal.Signals(received[0]).name
                say(f"{name} received; stopping (SIGTERM, up to {STOP_GRACE_SECONDS:.0f}s grace)")
            if platform is not None:
                await platform.stop()
            DEV_ENV_FILE.unlink(missing_ok=True)
            await asyncio.to_thread(infra.stop)
            say("stopped")


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m devtools.devrun",
        description="Run, migrate, seed or benchmark the platform on this machine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="everything, in the foreground; Ctrl-C stops it")
    run.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for readiness")
    sub.add_parser("migrate", help="migrate every schema (DATABASE_URL or the embedded run data)")
    sub.add_parser("seed", help="seed the demo brand (idempotent)")
    bench = sub.add_parser("bench", help="open-loop benchmark; arguments after -- go to bench")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "bench":
            rest = list(args.bench_args)
            if rest[:1] == ["--"]:
                rest = rest[1:]
            # Its own process, so the benchmark sets up gRPC before it loads.
            os.execv(sys.executable, [sys.executable, "-m", "bench", *rest])
        infra = start_infra("run", os.environ)
        try:
            say("migrating all schemas ...")
            migrate(infra.database_url)
            if args.command == "seed":
                say("seeding the demo brand and its activity ...")
                asyncio.run(seed(infra.database_url))
                asyncio.run(seed_activity(infra.database_url))
            say("done")
        finally:
            infra.stop()
        return 0
    except DevrunError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
