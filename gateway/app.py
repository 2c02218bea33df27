"""The gateway process: uvicorn (HTTP) and a grpc.aio server (POS) on one
event loop, sharing one set of downstream channels.

`build(settings)` makes a Gateway; `await gateway.start()` binds both ports
(port 0 picks a free one; the bound ports are `http_port` and
`pos_grpc_port`); `await gateway.stop()` drains gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Iterator

import grpc
import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2

from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.dependencies import DependencyWatch, Probe, ping
from servicekit.proxies import uvicorn_proxy_options
from servicekit.redis_client import preload_scripts
from servicekit.safety import refuse_unsafe
from servicekit.server import (
    Drain,
    add_health_and_reflection,
    create_grpc_server,
    serve_until_signalled,
    stop_server,
)
from servicekit.telemetry import configure_tracing

from .auth.door import Door
from .clients import Downstreams
from .http import create_app
from .known_members import KnownMembers
from .member_views import GatewayViews
from .metrics import GatewayMetrics, GrpcObserver, pos_client_of
from .offline import OfflinePolicy
from .pos import MessageSizeInterceptor, PosServicer
from .safety import production_problems
from .settings import GatewaySettings

log = logging.getLogger(__name__)

NAME = "gateway"
POS_SERVICE = pos_pb2.DESCRIPTOR.services_by_name["PosService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# The POS port's gRPC receive limit, as a multiple of POS_MAX_MESSAGE_BYTES:
# between the two a message is read and refused as MESSAGE_TOO_LARGE.
POS_HARD_LIMIT_FACTOR = 4


def pos_server_credentials(s: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS for the POS port when a certificate and key are configured; with a
    client CA, client certificates are required (mTLS). None: plaintext."""
    if not (s.pos_tls_cert_file or s.pos_tls_key_file or s.pos_tls_client_ca_file):
        return None
    if not (s.pos_tls_cert_file and s.pos_tls_key_file):
        raise ValueError(
            "POS TLS needs both POS_TLS_CERT_FILE and POS_TLS_KEY_FILE"
            " (POS_TLS_CLIENT_CA_FILE only adds client certificates)"
        )
    with open(s.pos_tls_key_file, "rb") as key, open(s.pos_tls_cert_file, "rb") as cert:
        pair = (key.read(), cert.read())
    client_ca = None
    if s.pos_tls_client_ca_file:
        with open(s.pos_tls_client_ca_file, "rb") as ca:
            client_ca = ca.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Gateway owns SIGTERM, so
    the gRPC and HTTP sides drain together and in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind_tcp(host: str, port: int) -> socket.socket:
    """Bind before serving, so port 0 resolves to a known port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        # Made in start(): grpc.aio channels belong to the loop they are made on.
        self.downstreams: Downstreams | None = None
        self.http_app: FastAPI | None = None
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.drain = Drain()
        self.http_server: _EmbeddedUvicorn | None = None
        self.http_port = 0
        self.pos_grpc_port = 0
        # Per gateway, not the process-global registry: tests run several.
        self.metrics = GatewayMetrics()
        self.metrics_port = 0
        # Credentials, scopes, rate limits, idempotency (gateway/auth); None
        # only when auth is disabled for a benchmark baseline.
        self.door: Door | None = None
        self.member_views: GatewayViews | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.dependencies: DependencyWatch | None = None
        self._stopped = False

    async def start(self) -> None:
        s = self.settings
        configure_tracing(NAME, s.otel_traces_exporter)
        self.downstreams = Downstreams(s)
        try:
            if s.auth_enabled:
                self.door = Door(s, self.downstreams)
                await self.door.open()
            self.member_views = await self._member_views()
            self.http_app = create_app(
                self.downstreams,
                metrics=self.metrics,
                door=self.door,
                max_body_bytes=s.http_max_body_bytes,
                member_views=self.member_views,
            )
            await self._watch_dependencies(self.downstreams)
            self.metrics_port = self.metrics.start(s.metrics_host, s.metrics_port)
            await self._start_grpc(self.downstreams)
            await self._start_http(self.http_app)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "gateway serving HTTP on %s:%d, POS gRPC on %s:%d, metrics on %s:%d",
            s.http_host,
            self.http_port,
            s.pos_grpc_host,
            self.pos_grpc_port,
            s.metrics_host,
            self.metrics_port,
        )

    async def _member_views(self) -> GatewayViews | None:
        """In the door's Redis, filed under member's identity epoch (so only
        with the known-member check on, which needs the same epoch)."""
        s = self.settings
        if self.door is None or s.member_view_ttl_seconds <= 0 or s.known_member_ttl_seconds <= 0:
            return None
        views = GatewayViews(
            self.door.redis,
            s.redis_namespace,
            s.member_view_ttl_seconds,
            s.member_view_timezone,
            metrics=self.metrics,
        )
        await preload_scripts(self.door.redis, views.views.scripts, "gateway member views")
        return views

    async def _watch_dependencies(self, downstreams: Downstreams) -> None:
        """Probe every dependency now and then periodically: for /readyz/detail
        and metrics only (readiness is the gateway's own: gateway/http.py)."""
        assert self.http_app is not None
        probes: dict[str, Probe] = dict(downstreams.probes())
        door = self.door
        if door is not None:
            probes["redis"] = lambda: ping(door.redis.ping)
            if door.pool is not None:
                pool = door.pool
                probes["postgres"] = lambda: ping(lambda: pool.fetchval("SELECT 1"))
        watch = DependencyWatch(
            probes,
            self.settings.dependency_check_interval_seconds,
            self.settings.readiness_timeout_seconds,
            registry=self.metrics.registry,
        )
        await watch.check()
        self.dependencies = watch
        self.http_app.state.dependencies = watch
        self._watch_task = asyncio.create_task(watch.run(), name="dependencies")

    async def _start_grpc(self, downstreams: Downstreams) -> None:
        s = self.settings
        server = create_grpc_server(
            s.max_connection_age_ms,
            s.shutdown_grace_seconds,
            # The door inside the observer: refused calls are counted too. The
            # size check first: an oversized message is refused by name.
            [
                GrpcObserver(
                    self.metrics,
                    pos_client_of(self.door.registry) if self.door and self.door.registry else None,
                ),
                MessageSizeInterceptor(s.pos_max_message_bytes),
                *([self.door.pos_interceptor()] if self.door else []),
            ],
            drain=self.drain,
            # gRPC's own limit, past which it answers RESOURCE_EXHAUSTED unnamed.
            max_receive_message_bytes=POS_HARD_LIMIT_FACTOR * s.pos_max_message_bytes,
        )
        offline = OfflinePolicy(
            max_batch=s.offline_max_batch, max_age_hours=s.offline_max_age_hours
        )
        # The door's Redis holds the identity epoch the member check is cached under.
        known = (
            KnownMembers(self.door.redis, s.redis_namespace, s.known_member_ttl_seconds)
            if self.door and s.known_member_ttl_seconds > 0
            else None
        )
        pos_pb2_grpc.add_PosServiceServicer_to_server(
            PosServicer(downstreams, offline, known, self.member_views), server
        )
        # Health is registered NOT_SERVING and flipped once the server is up.
        await add_health_and_reflection(server, self.health, [POS_SERVICE], NOT_SERVING)
        address = f"{s.pos_grpc_host}:{s.pos_grpc_port}"
        credentials = pos_server_credentials(s)
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
        if port == 0:
            raise OSError(f"cannot bind POS gRPC on {s.pos_grpc_host}:{s.pos_grpc_port}")
        self.grpc_server = server
        self.pos_grpc_port = port
        await server.start()
        for svc in ("", POS_SERVICE):
            await self.health.set(svc, SERVING)

    async def _start_http(self, app: FastAPI) -> None:
        s = self.settings
        sock = _bind_tcp(s.http_host, s.http_port)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            host=s.http_host,
            port=self.http_port,
            # Channels live in the Gateway, not in an ASGI lifespan.
            lifespan="off",
            # Keep the process's logging configuration (JSON with trace ids).
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=s.shutdown_grace_seconds,  # type: ignore[arg-type]
            server_header=False,
            **uvicorn_proxy_options(s.trusted_proxies),
        )
        server = _EmbeddedUvicorn(config)
        self.http_server = server
        self._http_task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        while not server.started:
            if self._http_task.done():
                # Surface why uvicorn gave up (it exits via SystemExit on startup errors).
                self._http_task.result()
                raise RuntimeError("HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Graceful: NOT_SERVING and /readyz 503 first; after the shutdown
        delay (balancers stop sending) both servers drain together: new POS
        calls are refused with UNAVAILABLE (never CANCELLED) and HTTP stops
        accepting, while calls in progress finish within the grace; then the
        downstream channels close."""
        if self._stopped:
            return
        self._stopped = True
        if self.http_app is not None:
            self.http_app.state.draining = True
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_seconds > 0 and self.grpc_server is not None:
            await asyncio.sleep(self.settings.shutdown_delay_seconds)
        grace = self.settings.shutdown_grace_seconds
        drains: list[Awaitable[object]] = []
        if self.grpc_server is not None:
            drains.append(stop_server(self.grpc_server, self.drain, grace))
        if self.http_server is not None and self._http_task is not None:
            self.http_server.should_exit = True
            drains.append(self._http_task)
        results = await asyncio.gather(*drains, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.warning("gateway drain: %r", result)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self.downstreams is not None:
            await self.downstreams.close()
        if self.door is not None:
            await self.door.close()
        # Last: the drained requests' figures stay scrapable until the end.
        self.metrics.stop()
        log.info("gateway stopped")

    async def run_until_signalled(self) -> None:
        # serve_until_signalled freezes the startup heap once serving (servicekit).
        await serve_until_signalled(NAME, self.start, self.stop)


def build(settings: GatewaySettings) -> Gateway:
    # Nothing is bound or served with a development secret in production.
    refuse_unsafe(NAME, settings.loyalty_env, production_problems(settings))
    return Gateway(settings)
