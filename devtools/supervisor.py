"""Process supervision for running the platform on one machine: free ports,
the child processes (`python -m services.<name>`, `python -m gateway`), their
readiness probes, prefixed logs, and an ordered stop (SIGTERM, a grace period,
then SIGKILL). `make run` (devrun.py) and the benchmark (bench/) start the
platform through `Platform`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.provider_fakes.stack import engagement_environment

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("member", "tiering", "engagement", "rewards", "guides")
DEFAULT_PORTS = {
    "member": 50051,
    "tiering": 50052,
    "engagement": 50053,
    "rewards": 50054,
    "guides": 50055,
    "pos": 50050,
    "http": 8080,
    "metrics": 9464,
    "wechat": 8099,
    "console": 8090,
    "providers": 8098,
}
# Environment variables that override the ports above. The gateway reads
# POS_GRPC_PORT and HTTP_PORT itself; the services all read GRPC_PORT, so each
# gets its own name here.
PORT_ENV = {
    "member": "MEMBER_GRPC_PORT",
    "tiering": "TIERING_GRPC_PORT",
    "engagement": "ENGAGEMENT_GRPC_PORT",
    "rewards": "REWARDS_GRPC_PORT",
    "guides": "GUIDES_GRPC_PORT",
    "pos": "POS_GRPC_PORT",
    "http": "HTTP_PORT",
    "metrics": "METRICS_PORT",
    "wechat": "WECHAT_FAKE_PORT",
    "console": "CONSOLE_PORT",
    "providers": "PROVIDER_FAKES_PORT",
}
LOOPBACK = "127.0.0.1"
# The local fake WeChat's apps (gateway/wechat_fake.py): the gateway verifies
# the demo mini-program's phone codes against it.
DEMO_WECHAT_APPS = '{"wx-shop": "dev-only-wechat-app-secret"}'
# The token of the SMS delivery-report URL the provider fakes push to (dev only).
DEMO_SMS_RECEIPT_TOKEN = "dev-only-sms-receipt-token"
# A service drains for shutdown_grace_seconds (10 by default) after SIGTERM;
# give it that plus a margin before SIGKILL.
STOP_GRACE_SECONDS = 15.0


class DevrunError(RuntimeError):
    """A failure to report in one line, without a traceback."""


# --------------------------------------------------------------------------- ports


# Ports handed out come from below the kernel's ephemeral range: a port the OS
# hands out for port 0 is one the children's own outgoing connections (to
# PostgreSQL, Redis, each other) may take as their source port before the
# child binds it ("Failed to bind", seen in the benchmark). Never twice in one
# process, either.
PORT_FLOOR = 10_000
_handed_out: set[int] = set()


def ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; else 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = LOOPBACK, ceiling: int = 65_536) -> int:
    """A port free right now below `ceiling` and the ephemeral range, not handed
    out before by this process (the caller's child binds it next)."""
    top = min(ceiling, ephemeral_low())
    if top - PORT_FLOOR >= 1_000:
        for _ in range(200):
            port = random.randrange(PORT_FLOOR, top)
            if port not in _handed_out and not port_in_use(port, host):
                _handed_out.add(port)
                return port
    # No room below the ephemeral range (an unusual kernel setting): the OS's pick.
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
    # Development keys and AUTH_ENABLED=false on loopback are fine here only
    # (servicekit/safety.py refuses them in production, the default).
    env.setdefault("LOYALTY_ENV", "development")
    # Children print as they go, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    # No load balancer on one machine: drain at once on SIGTERM.
    env.setdefault("SHUTDOWN_DELAY_SECONDS", "0")
    return env


def platform_children(
    ports: Mapping[str, int],
    base_env: Mapping[str, str],
    python: str = sys.executable,
    console_env: Mapping[str, str] | None = None,
) -> list[Child]:
    """The five services and the gateway, wired to each other on loopback; and
    the operator console (a client of the gateway) when `console_env` is given."""
    children = []
    # Every process learns every service's address (engagement calls rewards, ...).
    addresses = {f"{name.upper()}_ADDR": f"{LOOPBACK}:{ports[name]}" for name in SERVICES}
    # Engagement sends through the channel providers' fakes (devtools/provider_fakes),
    # the same code a production send runs.
    fakes = f"http://{LOOPBACK}:{ports['providers']}"
    channels = engagement_environment(fakes)
    for name in SERVICES:
        target = f"{LOOPBACK}:{ports[name]}"
        extra = channels if name == "engagement" else {}
        env = child_env(
            base_env, GRPC_HOST=LOOPBACK, GRPC_PORT=str(ports[name]), **addresses, **extra
        )
        children.append(Child(name, [python, "-m", f"services.{name}"], env, grpc_target=target))
    receipts = (
        f"http://{LOOPBACK}:{ports['http']}/v1/callbacks/sms/aliyun?token={DEMO_SMS_RECEIPT_TOKEN}"
    )
    children.append(
        Child(
            "providers",
            [
                python,
                "-m",
                "devtools.provider_fakes",
                "--port",
                str(ports["providers"]),
                "--report-url",
                receipts,
            ],
            child_env(base_env),
            http_ready=(LOOPBACK, ports["providers"], "/healthz"),
        )
    )
    wechat_apps = base_env.get("WECHAT_APPS") or DEMO_WECHAT_APPS
    children.append(
        Child(
            "wechat-fake",
            [python, "-m", "gateway.wechat_fake", "--port", str(ports["wechat"])],
            child_env(base_env, WECHAT_APPS=wechat_apps),
            http_ready=(LOOPBACK, ports["wechat"], "/healthz"),
        )
    )
    gateway_env = child_env(
        base_env,
        WECHAT_API_BASE=f"http://{LOOPBACK}:{ports['wechat']}",
        WECHAT_APPS=wechat_apps,
        SMS_RECEIPT_TOKEN=DEMO_SMS_RECEIPT_TOKEN,
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
    if console_env is not None:
        env = child_env(
            base_env,
            CONSOLE_HOST=LOOPBACK,
            CONSOLE_PORT=str(ports["console"]),
            CONSOLE_GATEWAY_URL=f"http://{LOOPBACK}:{ports['http']}",
            **console_env,
        )
        children.append(
            Child(
                "console",
                [python, "-m", "console"],
                env,
                http_ready=(LOOPBACK, ports["console"], "/healthz"),
                tier=2,
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
