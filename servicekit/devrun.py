"""The whole platform on one machine: `python -m servicekit.devrun run|migrate|seed|bench`.

`run` (what `make run` calls) needs nothing installed but Python: without
DATABASE_URL / REDIS_URL it starts embedded PostgreSQL and Redis with their data
under .data/run (kept across restarts), migrates every schema, seeds the demo
brand, then starts the four services and the gateway as real child processes,
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
import shlex
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import embedded
from .db import asyncpg_dsn

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("member", "tiering", "engagement", "rewards")
DEFAULT_PORTS = {
    "member": 50051,
    "tiering": 50052,
    "engagement": 50053,
    "rewards": 50054,
    "pos": 50050,
    "http": 8080,
    "metrics": 9464,
}
# Environment variables that override the ports above. The gateway reads
# POS_GRPC_PORT and HTTP_PORT itself; the services all read GRPC_PORT, so each
# gets its own name here.
PORT_ENV = {
    "member": "MEMBER_GRPC_PORT",
    "tiering": "TIERING_GRPC_PORT",
    "engagement": "ENGAGEMENT_GRPC_PORT",
    "rewards": "REWARDS_GRPC_PORT",
    "pos": "POS_GRPC_PORT",
    "http": "HTTP_PORT",
    "metrics": "METRICS_PORT",
}
LOOPBACK = "127.0.0.1"
DEMO_STORE = "SH001"
DEMO_PHONE = "13912345678"
# A service drains for shutdown_grace_seconds (10 by default) after SIGTERM;
# give it that plus a margin before SIGKILL.
STOP_GRACE_SECONDS = 15.0


T = TypeVar("T")


class DevrunError(RuntimeError):
    """A failure to report in one line, without a traceback."""


# --------------------------------------------------------------------------- ports


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS reports free right now (the benchmark's children bind it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers bind: connections in TIME_WAIT from a previous run do not
        # count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def ports_from_env(env: Mapping[str, str]) -> dict[str, int]:
    ports = {}
    for key, default in DEFAULT_PORTS.items():
        raw = env.get(PORT_ENV[key], "")
        try:
            ports[key] = int(raw) if raw else default
        except ValueError:
            raise DevrunError(f"{PORT_ENV[key]}={raw!r} is not a port number") from None
    return ports


def free_ports() -> dict[str, int]:
    return {key: free_port() for key in DEFAULT_PORTS}


def check_ports_free(ports: Mapping[str, int]) -> None:
    busy = [
        f"{ports[k]} ({k}; set {PORT_ENV[k]} to move it)" for k in ports if port_in_use(ports[k])
    ]
    if busy:
        raise DevrunError(
            "ports already in use: " + ", ".join(busy) + ". Is another `make run` still up?"
        )


# ------------------------------------------------------------------------ children


@dataclass
class Child:
    """One platform process and how to tell it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    # gRPC target whose health service must report SERVING ...
    grpc_target: str | None = None
    # ... or an HTTP URL path on (host, port) that must answer 200.
    http_ready: tuple[str, int, str] | None = None
    # Higher tiers call lower ones: they stop first, so in-flight calls drain
    # while their dependencies are still up.
    tier: int = 0
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    pump: asyncio.Task[None] | None = field(default=None, repr=False)
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode


def child_env(base: Mapping[str, str], **overrides: str) -> dict[str, str]:
    env = dict(base)
    env.update(overrides)
    # Children print as they go, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    # No load balancer on one machine: drain at once on SIGTERM.
    env.setdefault("SHUTDOWN_DELAY_SECONDS", "0")
    return env


def platform_children(
    ports: Mapping[str, int],
    base_env: Mapping[str, str],
    python: str = sys.executable,
) -> list[Child]:
    """The four services and the gateway, wired to each other on loopback."""
    children = []
    # Every process learns every service's address (engagement calls rewards, ...).
    addresses = {f"{name.upper()}_ADDR": f"{LOOPBACK}:{ports[name]}" for name in SERVICES}
    for name in SERVICES:
        target = f"{LOOPBACK}:{ports[name]}"
        env = child_env(base_env, GRPC_HOST=LOOPBACK, GRPC_PORT=str(ports[name]), **addresses)
        children.append(Child(name, [python, "-m", f"services.{name}"], env, grpc_target=target))
    gateway_env = child_env(
        base_env,
        HTTP_HOST=LOOPBACK,
        HTTP_PORT=str(ports["http"]),
        POS_GRPC_HOST=LOOPBACK,
        POS_GRPC_PORT=str(ports["pos"]),
        METRICS_PORT=str(ports["metrics"]),
        **addresses,
    )
    children.append(
        Child(
            "gateway",
            [python, "-m", "gateway"],
            gateway_env,
            http_ready=(LOOPBACK, ports["http"], "/readyz"),
            tier=1,
        )
    )
    return children


async def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Minimal HTTP/1.0 GET: the supervisor needs no HTTP client library."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"not an HTTP response from {host}:{port}{path}")
    return int(status_line[1]), body


async def grpc_serving(target: str, service: str = "") -> bool:
    """Whether `target`'s health service reports `service` ("" = the whole server) SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def child_ready(child: Child) -> bool:
    if child.grpc_target is not None:
        return await grpc_serving(child.grpc_target)
    if child.http_ready is not None:
        host, port, path = child.http_ready
        try:
            status, _ = await http_get(host, port, path)
        except (OSError, TimeoutError, ConnectionError):
            return False
        return status == 200
    return True


# ANSI colours only when a person is watching.
COLOURS = ("36", "32", "33", "35", "34", "31")


def _prefix_writer(stream: IO[str]) -> Callable[[str, int, str], None]:
    colour = stream.isatty() and os.environ.get("NO_COLOR") is None
    width = max(len(n) for n in (*SERVICES, "gateway", "devrun"))

    def write(name: str, index: int, line: str) -> None:
        label = f"{name:>{width}} |"
        if colour:
            label = f"\x1b[{COLOURS[index % len(COLOURS)]}m{label}\x1b[0m"
        stream.write(f"{label} {line}\n")
        stream.flush()

    return write


def say(message: str) -> None:
    """The supervisor's own lines, in the same prefixed format as its children's."""
    _prefix_writer(sys.stdout)("devrun", len(COLOURS) - 1, message)


class Platform:
    """Start, watch and stop a set of child processes.

    Output either goes to the terminal, each line prefixed with the child's name,
    or (log_dir set) to one file per child, so a benchmark's terminal stays clean.
    """

    def __init__(self, children: Sequence[Child], log_dir: Path | None = None) -> None:
        self.children = list(children)
        self.log_dir = log_dir
        self._write = _prefix_writer(sys.stdout)

    async def _pump(self, child: Child, index: int) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        async for raw in child.proc.stdout:
            self._write(child.name, index, raw.decode(errors="replace").rstrip("\n"))

    async def spawn(self) -> None:
        for index, child in enumerate(self.children):
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                # A quick local open; the child writes to it directly.
                child.log_file = open(self.log_dir / f"{child.name}.log", "ab")  # noqa: ASYNC230
                out: Any = child.log_file
            else:
                out = asyncio.subprocess.PIPE
            child.proc = await asyncio.create_subprocess_exec(
                *child.argv,
                cwd=ROOT,
                env=child.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                # Own process group: a terminal's Ctrl-C reaches only the
                # supervisor, which then stops the children in order.
                start_new_session=True,
                limit=1 << 20,  # long log lines (tracebacks in JSON) are fine
            )
            if self.log_dir is None:
                child.pump = asyncio.create_task(self._pump(child, index), name=child.name)

    def exited(self) -> list[Child]:
        return [c for c in self.children if c.returncode is not None]

    def describe_exit(self, child: Child) -> str:
        where = f"; its log: {self.log_dir / (child.name + '.log')}" if self.log_dir else ""
        return f"{child.name} exited with code {child.returncode} ({shlex.join(child.argv)}){where}"

    async def wait_ready(self, timeout: float) -> float:
        """Seconds until every child reported ready; DevrunError if one exits or time runs out."""
        pending = list(self.children)
        started = time.monotonic()
        deadline = started + timeout
        while True:
            dead = self.exited()
            if dead:
                raise DevrunError(self.describe_exit(dead[0]))
            ready = await asyncio.gather(*(child_ready(c) for c in pending))
            pending = [c for c, ok in zip(pending, ready, strict=True) if not ok]
            if not pending:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise DevrunError(f"not ready within {timeout:g}s: {names}")
            await asyncio.sleep(0.2)

    async def wait_any_exit(self) -> Child:
        """The first child to exit (when running normally, that is a failure)."""
        waits = {asyncio.create_task(c.proc.wait()): c for c in self.children if c.proc is not None}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return waits[next(iter(done))]
        finally:
            for task in waits:
                task.cancel()

    def kill(self) -> None:
        for child in self.children:
            if child.proc is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Tier by tier, callers first: SIGTERM, wait up to `grace`, then SIGKILL."""
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            await self._stop_group([c for c in self.children if c.tier == tier], grace)
        for child in self.children:
            if child.pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(child.pump, 2)
            if child.log_file is not None:
                child.log_file.close()

    async def _stop_group(self, group: list[Child], grace: float) -> None:
        running = [c for c in group if c.proc is not None and c.returncode is None]
        for child in running:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(c.proc.wait()) for c in running if c.proc is not None]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=grace)
        if late:
            for child in running:
                if child.returncode is None and child.proc is not None:
                    say(f"{child.name} still running after {grace:.0f}s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
            await asyncio.wait(late)


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
    from .migrations import upgrade_all

    upgrade_all(database_url)


async def seed(database_url: str) -> None:
    """The demo brand (stores, earn rules, tiers); safe to repeat."""
    import asyncpg

    from services.rewards.seed import seed_demo as seed_rewards
    from services.tiering.seed import seed_demo as seed_tiering

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        for step in (seed_rewards, seed_tiering):
            async with conn.transaction():
                await step(conn)
    finally:
        await conn.close()


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

    from .db import create_pool
    from .redis_client import create_redis

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
            ClientKind.MINIPROGRAM_BACKEND, "demo mini-program backend", "demo-miniprogram"
        )
    finally:
        await redis.aclose()
        await pool.close()
    return DemoKeys(
        pos.api_key, operator.key_id, operator.secret, miniprogram.key_id, miniprogram.secret
    )


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
    ports: Mapping[str, int], infra: Infra, member_id: str | None, note: str, keys: DemoKeys
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
    lines += [
        f"  {name:<15} {LOOPBACK}:{ports[name]}   (gRPC, health + reflection)" for name in SERVICES
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
            if stop.is_set():
                return 0
            namespace = env.get("REDIS_NAMESPACE", "loyalty")
            say("registering demo clients (new keys each run) ...")
            keys = await demo_clients(infra.database_url, infra.redis_url, namespace)
            base = child_env(
                env,
                DATABASE_URL=infra.database_url,
                REDIS_URL=infra.redis_url,
                REDIS_NAMESPACE=namespace,
                # Readable lines in a terminal; JSON stays the production default.
                LOG_JSON=env.get("LOG_JSON", "false"),
            )
            platform = Platform(platform_children(ports, base))
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
            print(banner(ports, infra, member_id, note, keys), flush=True)

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
            await asyncio.to_thread(infra.stop)
            say("stopped")


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m servicekit.devrun",
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
                say("seeding the demo brand ...")
                asyncio.run(seed(infra.database_url))
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
