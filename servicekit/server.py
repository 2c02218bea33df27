"""The shell every domain service runs in: a grpc.aio server with health,
reflection, tracing and error mapping, its database and Redis, the outbox
relay and event consumers, and graceful shutdown on SIGTERM.

A service supplies only `wire(app)`, which registers its servicers and
consumers once `app.db` and `app.redis` exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from .clients import SERVER_KEEPALIVE_OPTIONS
from .consumer import EventConsumer
from .db import Database, create_pool
from .dependencies import UP_STATUSES, DependencyWatch, ping
from .errors import to_rpc_status
from .events import stream_name
from .interceptors import (
    Behaviour,
    DomainErrorInterceptor,
    UnaryInterceptor,
    wrap_at_registration,
)
from .logs import configure_logging
from .metrics import ServiceMetrics
from .outbox import OutboxRelay
from .partitions import PartitionedTable, PartitionKeeper
from .redis_client import RedisClient, create_redis
from .retention import Pruner, Retention
from .schemacheck import SchemaGate
from .settings import ServiceSettings
from .telemetry import configure_tracing, tracing_recorded

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


_HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Health service names under which a service reports each dependency's state.
DEPENDENCY_PREFIX = "loyalty.dependency."

# The health name of the liveness probe: SERVING while the process's event loop
# answers, whatever its dependencies or schema (those are readiness: restarting
# every pod while PostgreSQL is down or a migration is pending helps nobody).
LIVENESS = "liveness"


def _traced(details: grpc.HandlerCallDetails) -> bool:
    """Every call but health probes. The library's filters.health_check() does
    the same with isinstance checks against typing Protocols, measured at ~4% of
    the gateway's CPU."""
    return not details.method.startswith(_HEALTH_PREFIX)


# A drained server stops once no call has arrived for QUIET_SECONDS, waiting
# at most QUIET_MAX_SECONDS for such a moment (Drain.drain).
QUIET_SECONDS = 0.1
QUIET_MAX_SECONDS = 1.0


class Drain(UnaryInterceptor):
    """Graceful shutdown of unary calls, ahead of grpc.aio's own.

    `server.stop(grace)` alone cancelled accepted calls: under a burst, POS
    calls still in their handlers when the server's shutdown completed were
    answered CANCELLED, which a POS may not retry (issue 14: 14 / 44 / 144 of
    bursts of 20 / 60 / 150). So the process drains here first:

    1. `drain()`: calls in progress finish (within the grace); a call arriving
       now is held, not refused, so its caller does not come straight back
       (a refused till retries at once: a storm that never lets the server
       go quiet).
    2. It then waits for a moment without arrivals (at most a second): grpc
       core cancels the calls it received but has not handed to Python yet
       when the server stops (CANCELLED at the caller), so the server stops
       when that queue is most likely empty.
    3. The owner starts `server.stop()` (no new calls: the callers get
       UNAVAILABLE), then `release()`: the held calls are answered
       UNAVAILABLE `SHUTTING_DOWN` with a zero retry delay (retry at once,
       on another instance), never CANCELLED.

    Health checks pass (they report NOT_SERVING); streams (Watch, reflection)
    are left to `server.stop(grace)`."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._released = asyncio.Event()
        self._last_call = 0.0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # Wrapped on every call, as before the per-method cache: with the
        # cache, shutdown bursts saw CANCELLED answers in two suite runs
        # (cause not found); the drain is the one interceptor not worth it.
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap_handler(handler_call_details.method, handler)

    def wrap(self, method: str, inner: Behaviour) -> Behaviour | None:
        if method.startswith(_HEALTH_PREFIX):
            return None

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._last_call = asyncio.get_running_loop().time()
            if self.draining:
                await self._released.wait()
                status = to_rpc_status(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; retry",
                    "SHUTTING_DOWN",
                    retry_after_seconds=0,
                )
                context.set_code(status.code)
                context.set_details(status.details)
                context.set_trailing_metadata(status.trailing_metadata)
                return None
            self._in_flight += 1
            self._idle.clear()
            try:
                return await inner(request, context)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        return unary_unary

    async def drain(self, timeout: float) -> bool:
        """Hold new unary calls; wait up to `timeout` for those in progress,
        then for a quiet moment. False if calls were still in progress."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d calls still in progress after %.1fs", self._in_flight, timeout)
            return False
        give_up = min(deadline, loop.time() + QUIET_MAX_SECONDS)
        # Polled: the arrivals are what is measured, no event marks their absence.
        while (quiet := loop.time() - self._last_call) < QUIET_SECONDS and loop.time() < give_up:  # noqa: ASYNC110
            await asyncio.sleep(min(QUIET_SECONDS - quiet, give_up - loop.time()))
        return True

    def release(self) -> None:
        """Answer the held calls (call once the server's stop has begun)."""
        self._released.set()


async def stop_server(server: grpc.aio.Server, drain: Drain, grace: float) -> None:
    """Drain, then stop `server` within `grace` in all (the order Drain needs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    await drain.drain(grace)
    stopping = asyncio.ensure_future(server.stop(max(0.1, deadline - loop.time())))
    # Let the stop begin (the server takes no new call) before answering the held ones.
    await asyncio.sleep(0.01)
    drain.release()
    await stopping


# Largest request message a server receives (gRPC's own default, made
# explicit); the gateway's POS port sets its own (gateway/settings.py).
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024


def create_grpc_server(
    max_connection_age_ms: int,
    grace_seconds: float,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    traced: bool | None = None,
    drain: Drain | None = None,
    max_receive_message_bytes: int = MAX_RECEIVE_MESSAGE_BYTES,
    domain_errors: bool = True,
    at_registration: bool = False,
) -> grpc.aio.Server:
    """A grpc.aio server with the interceptors and options every server here uses.
    `interceptors` run inside those (they see DomainErrors before they become
    statuses, within the request's span). `traced` (default: tracing_recorded())
    adds the OpenTelemetry interceptor. With nothing recorded it only made
    unsampled spans: with the client interceptors (clients.create_channel),
    0.5-0.9 ms of the gateway's CPU per POS identify (one server call, three
    client calls; docs/identity.md). Without it, a call's log lines carry no
    trace id. `drain` (a Drain) makes the server's shutdown graceful.
    `domain_errors=False` leaves out the DomainErrorInterceptor (only the
    server benchmark, bench/servers.py, measures a chain without it).
    `at_registration` applies a chain of servicekit's own interceptors as
    handlers are registered instead of through grpc.aio's per-call path
    (wrap_at_registration). Off: its saving has not separated from the
    noise in separate processes (docs/operations.md, Servers). The
    graceful-shutdown flake that was blamed on it came from test servers that
    record spans and so never used it."""
    tracing: list[grpc.aio.ServerInterceptor] = []
    if tracing_recorded() if traced is None else traced:
        # Health probes stay out of traces; the filter also keeps the
        # tracing interceptor away from Watch, which streams with
        # context.write() (the interceptor expects a generator).
        tracing.append(aio_server_interceptor(filter_=_traced))
    chain = [
        # Outermost: a refused call costs nothing else.
        *([drain] if drain is not None else []),
        *tracing,
        *([DomainErrorInterceptor()] if domain_errors else []),
        *interceptors,
    ]
    # servicekit's own interceptors only (the services): applied as handlers
    # are registered, not by grpc.aio's per-call interceptor path (wrap_at_registration).
    registered = at_registration and all(isinstance(i, UnaryInterceptor) for i in chain)
    server = grpc.aio.server(
        interceptors=None if registered else chain,
        options=[
            # Clients reconnect periodically, so a ClusterIP Service spreads
            # long-lived HTTP/2 connections over new pods.
            ("grpc.max_connection_age_ms", max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", int(grace_seconds * 1000)),
            ("grpc.so_reuseport", 0),
            # Accept the clients' keepalive pings (servicekit/clients.py).
            *SERVER_KEEPALIVE_OPTIONS,
            ("grpc.max_receive_message_length", max_receive_message_bytes),
        ],
    )
    if registered:
        wrap_at_registration(server, chain)  # type: ignore[arg-type]
    return server


async def add_health_and_reflection(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    service_names: list[str],
    initial_status: int,
) -> None:
    """The library health servicer and reflection, names taken from descriptors."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for svc in ["", *service_names]:
        await health_servicer.set(svc, initial_status)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )


class ServiceApp:
    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        services: list[ServiceDescriptor],
        wire: Callable[[ServiceApp], None],
        schema: str | None = None,
    ) -> None:
        self.name = name
        self.schema = schema or name
        self.settings = settings
        self.services = services
        self._wire = wire
        self.server: grpc.aio.Server | None = None
        self.db: Database | None = None
        self.redis: RedisClient | None = None
        self.health = health.aio.HealthServicer()
        self.drain = Drain()
        self.dependencies: DependencyWatch | None = None
        self.consumers: list[EventConsumer] = []
        self.relay: OutboxRelay | None = None
        # Tables kept bounded by the pruner; services add their own.
        self.retentions: list[Retention] = [
            Retention(
                f"{self.schema}.processed_events",
                "processed_at",
                timedelta(hours=settings.processed_events_retention_hours),
            ),
            # Published events kept for replays; never the newest, which
            # carries the sequence on (servicekit/outbox.py).
            Retention(
                f"{self.schema}.outbox",
                "published_at",
                timedelta(days=settings.outbox_retention_days),
                where=f"seq < (SELECT max(seq) FROM {self.schema}.outbox)",
            ),
        ]
        # Tables partitioned by time: partitions made ahead at start-up and
        # every interval (servicekit/partitions.py); services add their own.
        self.partitioned: list[PartitionedTable] = []
        self.port = 0
        # Prometheus on its own port (servicekit/metrics.py); services add probes in wire().
        self.metrics = ServiceMetrics(name)
        self.schema_gate: SchemaGate | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = asyncio.Event()

    def partition(self, *tables: PartitionedTable) -> None:
        """Keep these tables' partitions (made ahead, strays moved, expired ones
        dropped) instead of pruning their rows: the pruner's ctid batches are
        wrong on a partitioned table (a ctid is unique per partition only)."""
        names = {t.qualified for t in tables}
        self.retentions = [r for r in self.retentions if r.table not in names]
        self.partitioned.extend(tables)

    @property
    def pruner_retentions(self) -> list[Retention]:
        """The retentions the pruner runs: less the tables kept by partitions
        (also those added to `partitioned` directly, as rewards does)."""
        kept = {t.qualified for t in self.partitioned}
        return [r for r in self.retentions if r.table not in kept]

    @property
    def service_names(self) -> list[str]:
        return [s.full_name for s in self.services]

    def add_consumer(self, consumer: EventConsumer) -> None:
        consumer.configure_gaps(
            self.settings.event_gap_grace_seconds, self.settings.event_check_interval_seconds
        )
        consumer.configure_linger(self.settings.event_linger_ms)
        self.consumers.append(consumer)

    async def start(self) -> int:
        """Bind, start serving (NOT_SERVING until dependencies answer); return the port."""
        s = self.settings
        configure_tracing(self.name, s.otel_traces_exporter)
        # min_size=0: the process starts even while Postgres is down; the health
        # watcher reports NOT_SERVING until it answers.
        pool = await create_pool(s.database_url, 0, s.db_pool_max)
        self.db = Database(pool, self.schema, self.name)
        self.redis = create_redis(s.redis_url)
        self.relay = OutboxRelay(
            self.db,
            self.redis,
            stream_name(s.redis_namespace, self.name),
            batch_size=s.outbox_batch_size,
            poll_interval=s.outbox_poll_interval_seconds,
            coalesce=s.outbox_coalesce_seconds,
        )
        self.server = create_grpc_server(
            s.max_connection_age_ms,
            s.shutdown_grace_seconds,
            [self.metrics.interceptor()],
            drain=self.drain,
        )
        # The schema's own service owns its migrations (the same name for every
        # service; a test app may serve another's schema).
        self.schema_gate = SchemaGate(
            self.schema, self.schema, f"python -m {_entry_package(self.schema)} migrate"
        )
        self._wire(self)
        await add_health_and_reflection(self.server, self.health, self.service_names, NOT_SERVING)
        await self.health.set(LIVENESS, SERVING)
        for dependency in ("postgres", "redis"):
            await self.health.set(f"{DEPENDENCY_PREFIX}{dependency}", NOT_SERVING)
        self.port = self.server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        await self.server.start()
        self._tasks.append(asyncio.create_task(self._watch_health(), name="health"))
        self._tasks.append(asyncio.create_task(self.relay.run(), name="outbox-relay"))
        for consumer in self.consumers:
            self._tasks.append(asyncio.create_task(consumer.run(), name=consumer.group))
        pruner = Pruner(pool, self.pruner_retentions, s.prune_interval_seconds)
        self._tasks.append(asyncio.create_task(pruner.run(), name="pruner"))
        if self.partitioned:
            keeper = PartitionKeeper(
                pool, self.partitioned, s.partitions_ahead_months, s.partitions_interval_seconds
            )
            self._tasks.append(asyncio.create_task(keeper.run(), name="partitions"))
        self._start_metrics()
        log.info("%s listening on %s:%d", self.name, s.grpc_host, self.port)
        return self.port

    async def _dependency_changed(self, name: str, state: str) -> None:
        await self.health.set(
            f"{DEPENDENCY_PREFIX}{name}", SERVING if state in UP_STATUSES else NOT_SERVING
        )

    async def _schema_at_head(self, db: Database) -> bool:
        if self.schema_gate is None:
            return True
        try:
            return await self.schema_gate.ready(db.pool)
        except Exception as exc:  # the database went away between the probes
            log.warning("%s: schema check failed: %r", self.name, exc)
            return False

    def _start_metrics(self) -> None:
        s = self.settings
        assert self.db is not None and self.redis is not None
        port = self.metrics.start(s.metrics_host, s.metrics_port)
        sampler = self.metrics.sample_forever(
            s.metrics_sample_interval_seconds,
            self.db,
            self.redis,
            s.redis_namespace,
            self.consumers,
        )
        self._tasks.append(asyncio.create_task(sampler, name="metrics"))
        log.info("%s metrics on http://%s:%d/metrics", self.name, s.metrics_host, port)

    async def _watch_health(self) -> None:
        """Ready (SERVING) while the database answers: what every call needs.
        Redis is watched and reported (`loyalty.dependency.redis`, metrics)
        but not part of readiness: without it calls still work (events wait
        in the outbox) and a Redis outage must not take every replica out."""
        assert self.db is not None and self.redis is not None
        db, redis = self.db, self.redis
        watch = DependencyWatch(
            {"postgres": lambda: ping(db.ping), "redis": lambda: ping(redis.ping)},
            self.settings.health_check_interval_seconds,
            on_change=self._dependency_changed,
        )
        self.dependencies = watch
        current = None
        while True:
            states = await watch.check()
            database_up = states["postgres"] in UP_STATUSES
            # Never serve against a schema older than this code's head (the gate logs why).
            at_head = database_up and await self._schema_at_head(db)
            status = SERVING if at_head else NOT_SERVING
            if status != current:
                if not database_up:
                    log.warning("%s not ready: its database does not answer", self.name)
                for svc in ["", *self.service_names]:
                    await self.health.set(svc, status)
                current = status
            # Poll quickly until first ready, then at the configured interval.
            await asyncio.sleep(
                self.settings.health_check_interval_seconds if status == SERVING else 0.2
            )

    async def stop(self) -> None:
        """Graceful: NOT_SERVING first, wait for balancers to notice, refuse new
        calls (UNAVAILABLE) and let in-flight ones finish within the grace,
        stop the server; then let the relay finish its batch and the consumers
        apply and acknowledge their read, and only then close resources."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        loop = asyncio.get_running_loop()
        for task in self._tasks:
            if task.get_name() == "health":
                task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_seconds > 0:
            # Let load balancers and watching clients see NOT_SERVING first.
            await asyncio.sleep(self.settings.shutdown_delay_seconds)
        deadline = loop.time() + self.settings.shutdown_grace_seconds
        if self.server is not None:
            await stop_server(self.server, self.drain, self.settings.shutdown_grace_seconds)
        # Background loops leave at their next turn, the work in hand done.
        for consumer in self.consumers:
            consumer.stop()
        if self.relay is not None:
            self.relay.stop()
        loops = [t for t in self._tasks if t.get_name() in self._loop_names()]
        if loops:
            await asyncio.wait(loops, timeout=max(TASK_STOP_SECONDS, deadline - loop.time()))
        await stop_tasks(self.name, self._tasks)
        if self.relay is not None and self.db is not None:
            # Publish what committed during the drain, so nothing waits for a restart.
            with contextlib.suppress(Exception):
                await self.relay.publish_pending()
        if self.redis is not None:
            await self.redis.aclose()
        if self.db is not None:
            await self.db.close()
        self.metrics.stop()
        log.info("%s stopped", self.name)

    def _loop_names(self) -> set[str]:
        return {"outbox-relay", *(c.group for c in self.consumers)}

    async def run_until_signalled(self) -> None:
        await serve_until_signalled(self.name, self.start, self.stop)


def _entry_package(name: str) -> str:
    return "gateway" if name == "gateway" else f"services.{name}"


# How long stopping background tasks may take before the stop goes on without them.
TASK_STOP_SECONDS = 5.0


async def stop_tasks(owner: str, tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait for them, within TASK_STOP_SECONDS.
    A task blocked in a Redis read (XREADGROUP BLOCK) can miss its cancellation
    in redis-py (redis/redis-py#2579, #2028) and would hold the stop forever;
    such a task is reported and left behind: closing the Redis pool next ends
    its read."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=TASK_STOP_SECONDS)
    for task in pending:
        log.warning("%s: task %s did not stop in %.0fs", owner, task.get_name(), TASK_STOP_SECONDS)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("%s: task %s ended with %r", owner, task.get_name(), task.exception())


async def serve_until_signalled(
    name: str, start: Callable[[], Awaitable[object]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start, wait for SIGTERM or SIGINT, then stop (drain): every process's main loop."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    await start()
    freeze_startup_heap(name)
    await signalled.wait()
    log.info("%s received shutdown signal; draining", name)
    await stop()


def freeze_startup_heap(name: str) -> None:
    """Keep a serving process's startup objects (modules, servicers or the
    app and its routes, protobuf, SQLAlchemy and pydantic machinery: 120-160k
    tracked objects) out of every later garbage collection. A full collection
    otherwise walks all of them and stalls every request in flight: 0.3-0.5 s
    each on the loaded 2-core bench machine, 70 ms frozen; all collections of
    the same requests 0.9 s -> 0.3 s (the gateway driven in-process,
    2026-11-25). The requests' own garbage is collected as before. Only for
    processes started by serve_until_signalled: a test process starts many
    servers."""
    gc.collect()
    gc.freeze()
    log.info("%s: startup heap frozen (%d objects)", name, gc.get_freeze_count())


def run_service(build: Callable[[ServiceSettings], ServiceApp], name: str) -> None:
    """Entrypoint body shared by every service's __main__."""
    settings = ServiceSettings()
    configure_logging(name, settings.log_level, settings.log_json)

    async def serve() -> None:
        # Built on the loop that serves: a grpc.aio channel a service makes in
        # build (guides' and rewards' member clients, ...) is bound to the loop
        # current when it is made, and one made before this loop ran failed
        # every call with "attached to a different loop".
        app = build(settings)
        await app.run_until_signalled()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
