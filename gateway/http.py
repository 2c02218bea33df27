"""HTTP/JSON API for mini-program backends and operators (FastAPI).

Every response has an explicit pydantic model: int64 stays a JSON integer,
names stay snake_case, times are RFC 3339 (never json_format.MessageToDict,
which turns int64 into strings and names into camelCase). Every error is
application/problem+json (gateway/errors.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi._compat import get_definitions, get_flat_models_from_fields, get_model_name_map
from fastapi.openapi.utils import get_fields_from_routes, get_openapi
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.server import tracing_recorded

from .api import (
    analytics,
    centre,
    coupons,
    engagement,
    events,
    guides,
    mall,
    members,
    points,
    referrals,
    stores,
    tiers,
)
from .api.common import problem_response
from .auth.door import Door
from .clients import Downstreams
from .errors import PROBLEM_JSON, Problem, install_http_handlers, problem
from .member_views import GatewayViews, MemberWriteBumps
from .metrics import GatewayMetrics, HttpObserver

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class BodyLimitMiddleware:
    """Reads the request body up to `max_bytes`, before authentication or any
    route: a larger one is refused with 413 BODY_TOO_LARGE, from its
    Content-Length without reading it, or as soon as the stream passes the
    limit. The body read is handed on as one message."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self._max):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away: nothing to serve.
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            413,
            "BODY_TOO_LARGE",
            f"the request body is larger than {self._max} bytes",
        )
        # The rest of the body is not read: close rather than drain it.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


MEMBER_ID_EXAMPLE = "0b6a3c1e-5d7f-4b8e-9a2c-1f3e5d7a9b0c"

MemberId = Annotated[
    uuid.UUID,
    Path(description="The member's id (a UUID)", examples=[MEMBER_ID_EXAMPLE]),
]


class Liveness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    # One entry per deployed downstream (engagement only where it runs).
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "downstreams": {
                        "engagement": "SERVING",
                        "member": "SERVING",
                        "rewards": "SERVING",
                        "tiering": "SERVING",
                    },
                }
            ]
        }
    )

    status: str = Field(examples=["ready"])
    downstreams: dict[str, str] = Field(
        description="Health status of each downstream service",
        examples=[{"member": "SERVING", "rewards": "SERVING", "tiering": "SERVING"}],
    )


class DependencyDetail(BaseModel):
    """/readyz/detail: what each dependency answered its last probe."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "dependencies": {
                        "member": "SERVING",
                        "rewards": "SERVING",
                        "tiering": "UNREACHABLE",
                        "postgres": "UP",
                        "redis": "DOWN",
                    },
                    "checked_at": "2026-12-04T17:00:00Z",
                }
            ]
        }
    )

    status: str = Field(description="ready or shutting_down (the gateway's own readiness)")
    dependencies: dict[str, str] = Field(
        description="Per dependency: SERVING / NOT_SERVING / UNREACHABLE (services), UP / DOWN"
    )
    checked_at: datetime | None = Field(description="When the dependencies were last probed")


class NotReady(Problem):
    downstreams: dict[str, str] = Field(
        default_factory=dict,
        examples=[{"member": "SERVING", "rewards": "UNREACHABLE", "tiering": "NOT_SERVING"}],
    )


def create_app(
    downstreams: Downstreams,
    metrics: GatewayMetrics | None = None,
    door: Door | None = None,
    traced: bool | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    member_views: GatewayViews | None = None,
) -> FastAPI:
    """The HTTP app. `app.state.draining = True` makes /readyz answer 503 so a
    load balancer stops sending traffic before the process stops. `traced`
    (default: the process records spans, servicekit.server.tracing_recorded())
    gives every request but the probes a server span."""
    app = FastAPI(
        # FastAPI's own OpenTelemetry layer stays off: tracing is the
        # instrumentor's below (only when spans are recorded), metrics are
        # gateway/metrics.py's, logs are the process's JSON logs.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
        title="Loyalty gateway",
        version="1.0.0",
        description="Membership and loyalty API for the mini-program backend and operators. "
        "Money is integer fen (1/100 yuan); points are integers; errors are "
        "application/problem+json.",
    )
    app.state.downstreams = downstreams
    app.state.draining = False
    # The door's Redis serves the dead-letter routes too (gateway/api/events.py).
    app.state.door = door
    # The member centre's cached reply (gateway/member_views.py); None: off.
    app.state.member_views = member_views
    install_http_handlers(app)

    @app.get("/healthz", response_model=Liveness, tags=["probes"], summary="Liveness")
    async def healthz() -> Liveness:
        return Liveness(status="ok")

    async def dependency_states(request: Request) -> dict[str, str]:
        watch = getattr(request.app.state, "dependencies", None)
        if watch is None:  # an app without its Gateway (tests): ask now
            return await request.app.state.downstreams.health()  # type: ignore[no-any-return]
        return dict(watch.states)

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["probes"],
        summary="Readiness: the gateway itself can serve (not its dependencies)",
        responses={503: problem_response("Shutting down", NotReady)},
    )
    async def readyz(request: Request) -> Readiness | JSONResponse:
        # Only what the gateway needs itself: it is up (listeners bound, the
        # credential cache loaded at start) and not draining. A dependency
        # that is down fails the calls that need it, not the probe: one
        # service's outage must not take every gateway replica out of the
        # balancer (servicekit/dependencies.py). Its state is listed here and
        # on /readyz/detail and the loyalty_dependency_up metric.
        if request.app.state.draining:
            return problem(503, "SHUTTING_DOWN", "the gateway is shutting down")
        states = await dependency_states(request)
        names = set(request.app.state.downstreams.probes())
        return Readiness(
            status="ready", downstreams={k: v for k, v in states.items() if k in names}
        )

    @app.get(
        "/readyz/detail",
        response_model=DependencyDetail,
        tags=["probes"],
        summary="Each dependency's state at its last probe (for dashboards, not probes)",
    )
    async def readyz_detail(request: Request) -> DependencyDetail:
        watch = getattr(request.app.state, "dependencies", None)
        return DependencyDetail(
            status="shutting_down" if request.app.state.draining else "ready",
            dependencies=await dependency_states(request),
            checked_at=watch.checked_at if watch is not None else None,
        )

    # Requests are matched against the routes in order, twice (the door, then
    # the router), so the member centre's reads come first. No two routes
    # share a method and a path (order changes no answer).
    for router in (
        centre.router,
        points.router,
        tiers.router,
        members.router,
        engagement.router,
        referrals.router,
        mall.router,
        coupons.router,
        stores.router,
        guides.router,
        analytics.router,
        events.router,
    ):
        app.include_router(router)
    _serve_problems_in_openapi(app)
    if member_views is not None:
        # Inside the door: only admitted writes reach it.
        app.add_middleware(MemberWriteBumps, views=member_views)
    if door is not None:
        # Inside the metrics observer: refused requests are counted and logged too.
        door.install(app)
    # Outside the door: a body is bounded before it is read for a signature.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if metrics is not None:
        # Inside the tracing middleware below, so access lines carry the trace id.
        app.add_middleware(HttpObserver, metrics=metrics)
    if tracing_recorded() if traced is None else traced:
        # Probes would drown the traces; everything else gets a server span.
        # No spans for the ASGI receive/send messages: three extra spans a request
        # that say nothing the server span does not.
        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="healthz,readyz", exclude_spans=["receive", "send"]
        )
    # Without recorded spans the instrumentation only made unsampled ones, for
    # a third of the app's CPU per request (route lookup over every route,
    # request attributes, a span per request); the access line's trace id
    # goes with it.
    return app


def _declared_schemas(app: FastAPI) -> dict[str, Any]:
    """The routes' component schemas, made by the same calls as get_openapi."""
    fields = get_fields_from_routes(app.routes)
    names = get_model_name_map(get_flat_models_from_fields(fields, known_models=set()))
    _, definitions = get_definitions(
        fields=fields, model_name_map=names, separate_input_output_schemas=True
    )
    return definitions


def _serve_problems_in_openapi(app: FastAPI) -> None:
    """FastAPI documents every response as application/json; error bodies are
    application/problem+json, so say so in /openapi.json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            # get_openapi's last step drops every null of the document, the
            # examples' too (fastapi#5559): `"sku": null` would vanish from a
            # response example. The component schemas as pydantic declares them.
            schema["components"]["schemas"].update(_declared_schemas(app))
            for url, path in schema.get("paths", {}).items():
                for method, operation in path.items():
                    responses = operation.setdefault("responses", {})
                    if url.startswith("/v1/"):
                        _document_common_problems(method, responses)
                    for status, response in responses.items():
                        content = response.get("content", {})
                        if status[0] in "45" and "application/json" in content:
                            content[PROBLEM_JSON] = content.pop("application/json")
                        if status == "422" and PROBLEM_JSON in content:
                            # FastAPI's default 422 body is not what the handler
                            # sends (gateway/errors.py answers every 422 as a Problem).
                            content[PROBLEM_JSON]["schema"] = {
                                "$ref": "#/components/schemas/Problem"
                            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# What any /v1 operation may answer besides its own outcomes: the door's
# refusals, an Idempotency-Key reused with another body or a state conflict
# (mutations), and the platform failing.
_COMMON_PROBLEMS = {
    "401": "Missing, malformed, expired, replayed or revoked credentials",
    "413": "The request body is larger than the gateway accepts (BODY_TOO_LARGE)",
    "403": "The client lacks the scope, or acts for another member or store",
    "429": "Rate limit reached, or too many failed sign-ins from this address; "
    "retry after the Retry-After header",
    "500": "Internal error (nothing internal in the body)",
    "503": "A backing service is unavailable; retry later",
}
_MUTATION_PROBLEMS = {"409": "Idempotency-Key reused with another body, or a conflicting state"}


def _document_common_problems(method: str, responses: dict[str, Any]) -> None:
    common = dict(_COMMON_PROBLEMS)
    if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
        common.update(_MUTATION_PROBLEMS)
    for status, description in common.items():
        responses.setdefault(
            status,
            {
                "description": description,
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            },
        )
