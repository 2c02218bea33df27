"""Prometheus metrics and access logs for every call through the gateway.

One observation per HTTP request (an ASGI middleware) and per POS RPC (a gRPC
server interceptor): a request counter, a latency histogram and an error
counter by stable error code, labelled by protocol, calling client and route
*template* (`/v1/members/{member_id}/points`) or RPC method, never the raw
path, so the series count stays bounded. The same observation becomes one JSON
access-log line (gateway/access_log.py).

Metrics live in a registry per Gateway (tests run several gateways in one
process) and are served on their own port (METRICS_PORT), never on the public
HTTP port.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from threading import Thread
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.errors import DomainError

from . import access_log
from .errors import PROBLEM_JSON
from .wrapped import WrappedHandlers

if TYPE_CHECKING:
    from .auth.registry import CredentialRegistry

ANONYMOUS = "anonymous"
# Requests that matched no route share one label value (a scanner's random
# paths must not become series).
UNMATCHED = "unmatched"

# The authenticated caller of the current POS RPC. The auth interceptor sets it
# (inside this module's interceptor, in the same task); unset means anonymous.
grpc_client_id: ContextVar[str] = ContextVar("grpc_client_id", default=ANONYMOUS)

# Milliseconds matter here: the gateway's targets are p99 <= 10-50 ms.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


@dataclass(frozen=True)
class Observation:
    protocol: str  # "http" or "grpc"
    client: str
    route: str  # route template or full RPC method name
    method: str  # HTTP method, or "POST" for gRPC
    status: str  # HTTP status code or gRPC status name
    code: str  # stable error code; "" on success
    seconds: float
    member_id: str = ""
    store_id: str = ""


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("protocol", "client", "route")
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by outcome status",
            [*labels, "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response sent",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "gateway_errors",
            "Failed requests, by stable error code",
            [*labels, "code"],
            registry=self.registry,
        )
        self.member_view_reads = Counter(
            "gateway_member_view_reads",
            "Identify and member-centre reads by the member views (gateway/member_views.py):"
            " hit = answered from Redis, miss = the services were asked",
            ["view", "outcome"],
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None
        self.port = 0

    def observe(self, obs: Observation) -> None:
        self.requests.labels(obs.protocol, obs.client, obs.route, obs.status).inc()
        self.latency.labels(obs.protocol, obs.client, obs.route).observe(obs.seconds)
        if obs.code:
            self.errors.labels(obs.protocol, obs.client, obs.route, obs.code).inc()
        access_log.write(obs)

    def start(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0: a free port); returns the bound port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ---- HTTP --------------------------------------------------------------------------------


def _problem_code(body: bytes) -> str:
    try:
        code = json.loads(body).get("code", "")
    except (ValueError, AttributeError):
        return ""
    return code if isinstance(code, str) else ""


class HttpObserver:
    """Pure ASGI middleware (no per-request Request objects): one Observation
    per HTTP request. The error code is read from the problem+json body every
    error response carries (gateway/errors.py)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = _Routes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        problem = False
        body = b""

        async def observed_send(message: Message) -> None:
            nonlocal status, problem, body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", ()))
                problem = headers.get(b"content-type", b"").startswith(PROBLEM_JSON.encode())
            elif message["type"] == "http.response.body" and problem:
                body += message.get("body", b"")
            await send(message)

        code = ""
        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            # The server's last-resort handler answers 500 INTERNAL after us.
            status, code = 500, "INTERNAL"
            raise
        finally:
            if status >= 400 and not code:
                code = _problem_code(body) if problem else f"HTTP_{status}"
            self.metrics.observe(_http_observation(scope, status, code, started, self.routes))


class _Routes:
    """Route templates for requests answered before routing (the door refused
    them): matched here, so a refusal counts against its route. The door's own
    flat route table, built once on first use (every router is included by then)."""

    def __init__(self) -> None:
        self._table: Any = None

    def template(self, scope: Scope) -> str:
        app = scope.get("app")
        if app is None:
            return UNMATCHED
        if self._table is None:
            from .auth.http import RouteTable  # the door imports this module's neighbours

            self._table = RouteTable(app)
        matched = self._table.match(scope.get("method", ""), scope.get("path", ""))
        return str(matched[0]) if matched else UNMATCHED


def _http_observation(
    scope: Scope, status: int, code: str, started: float, routes: _Routes
) -> Observation:
    route = scope.get("route")
    template = getattr(route, "path", None) or routes.template(scope)
    params = scope.get("path_params") or {}
    # The door (gateway/auth/http.py) leaves the authenticated credential here.
    credential = (scope.get("state") or {}).get("credential")
    return Observation(
        protocol="http",
        client=str(getattr(credential, "client_id", "") or ANONYMOUS),
        route=template,
        method=scope.get("method", ""),
        status=str(status),
        code=code,
        seconds=time.perf_counter() - started,
        member_id=_member_id(params.get("member_id")),
    )


def _member_id(raw: object) -> str:
    """A member id is pseudonymous and may be logged; whatever else a caller put
    in its place (a phone, by mistake or not) may not."""
    try:
        return str(uuid.UUID(str(raw)))
    except ValueError:
        return ""


# ---- gRPC --------------------------------------------------------------------------------


ClientOf = Callable[[grpc.aio.ServicerContext], str | None]
_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def pos_client_of(registry: CredentialRegistry) -> ClientOf:
    """The client id of a POS call's key (x-api-key metadata), from the door's
    credential cache; no I/O."""
    # Here, not at the top: the door's modules import the gateway's errors and
    # metrics are imported by the app before the door.
    from .auth.crypto import split_api_key
    from .auth.pos import KEY_METADATA

    def client_of(context: grpc.aio.ServicerContext) -> str | None:
        for key, value in context.invocation_metadata() or ():
            if key == KEY_METADATA and isinstance(value, str):
                credential = registry.get(split_api_key(value)[0])
                return credential.client_id if credential else None
        return None

    return client_of


class GrpcObserver(grpc.aio.ServerInterceptor):
    """One Observation per unary RPC. Sits inside the DomainErrorInterceptor,
    so it sees the DomainError itself (status and code) before it becomes a
    grpc status; anything else is what that interceptor reports as INTERNAL."""

    def __init__(self, metrics: GatewayMetrics, client_of: ClientOf | None = None) -> None:
        self.metrics = metrics
        self.client_of = client_of
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = str(handler_call_details.method)
        if method.startswith("/grpc.health.") or method.startswith("/grpc.reflection."):
            return handler
        return self._wrapped.get(method, handler, lambda h: self._wrap(method, h))

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        assert inner is not None
        metrics = self.metrics
        client_of = self.client_of

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            status, code = grpc.StatusCode.OK, ""
            try:
                return await inner(request, context)
            except DomainError as exc:
                status, code = exc.status, exc.code
                raise
            except grpc.aio.AbortError:
                status = context.code() or grpc.StatusCode.UNKNOWN
                code = status.name
                raise
            except asyncio.CancelledError:
                # The caller went away (or its deadline passed) mid-call.
                status, code = grpc.StatusCode.CANCELLED, "CANCELLED"
                raise
            except BaseException:
                status, code = grpc.StatusCode.INTERNAL, "INTERNAL"
                raise
            finally:
                client = grpc_client_id.get()
                # Only a caller the door let through is named: a refused one
                # could send any key id (one series each).
                if client == ANONYMOUS and client_of is not None and status not in _REFUSED:
                    client = client_of(context) or ANONYMOUS
                metrics.observe(
                    Observation(
                        protocol="grpc",
                        client=client,
                        route=method,
                        method="POST",
                        status=status.name,
                        code=code,
                        seconds=time.perf_counter() - started,
                        store_id=str(getattr(request, "store_id", "")),
                        member_id=_member_id(getattr(request, "member_id", "")),
                    )
                )

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
