"""HTTP/JSON API for mini-program backends and operators (FastAPI).

Every response has an explicit pydantic model: int64 stays a JSON integer,
names stay snake_case, times are RFC 3339 (never json_format.MessageToDict,
which turns int64 into strings and names into camelCase). Every error is
application/problem+json (gateway/errors.py).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from google.protobuf import timestamp_pb2
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from pydantic import BaseModel, ConfigDict, Field

from servicekit.protos import to_datetime

from .clients import Downstreams
from .errors import PROBLEM_JSON, Problem, install_http_handlers, problem

MEMBER_ID_EXAMPLE = "0b6a3c1e-5d7f-4b8e-9a2c-1f3e5d7a9b0c"

MemberId = Annotated[
    uuid.UUID,
    Path(description="The member's id (a UUID)", examples=[MEMBER_ID_EXAMPLE]),
]


class Liveness(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    downstreams: dict[str, str] = Field(
        description="Health status of each downstream service",
        examples=[{"member": "SERVING", "rewards": "SERVING", "tiering": "SERVING"}],
    )


class NotReady(Problem):
    downstreams: dict[str, str] = Field(
        default_factory=dict,
        examples=[{"member": "SERVING", "rewards": "UNREACHABLE", "tiering": "NOT_SERVING"}],
    )


class PointsBalance(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"member_id": MEMBER_ID_EXAMPLE, "available": 32, "lifetime_earned": 120}]
        }
    )

    member_id: str
    available: int = Field(description="Points the member can spend now")
    lifetime_earned: int = Field(description="All points ever earned")


class Member(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "member_number": "M00001024",
                    "phone_masked": "139****5678",
                    "registered_at": "2025-03-08T06:30:00Z",
                }
            ]
        }
    )

    member_id: str
    member_number: str = Field(description="Short human-facing member number")
    phone_masked: str = Field(description="Masked phone, empty when none is known")
    registered_at: datetime = Field(description="RFC 3339, UTC")


class MemberSpend(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "total_paid_fen": 3200,
                    "order_count": 1,
                    "last_order_at": "2025-03-08T06:31:00Z",
                    "tier_code": "SVIP",
                    "tier_name": "SVIP",
                }
            ]
        }
    )

    member_id: str
    total_paid_fen: int = Field(description="Everything the member paid, in fen (1/100 yuan)")
    order_count: int
    last_order_at: datetime | None = Field(description="RFC 3339, UTC; null before any order")
    tier_code: str | None = Field(
        description="Tier the current programme gives for these totals; null when none applies"
    )
    tier_name: str | None = None


def _problem_response(description: str, model: type[BaseModel] = Problem) -> dict[str, Any]:
    return {"model": model, "description": description}


MEMBER_ERRORS: dict[int | str, dict[str, Any]] = {
    422: _problem_response("Malformed request; `field` names the culprit"),
    404: _problem_response("No such member"),
    503: _problem_response("A backing service is unavailable; retry later"),
}


def _utc(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _downstreams(request: Request) -> Downstreams:
    return request.app.state.downstreams  # type: ignore[no-any-return]


def create_app(downstreams: Downstreams) -> FastAPI:
    """The HTTP app. `app.state.draining = True` makes /readyz answer 503 so a
    load balancer stops sending traffic before the process stops."""
    app = FastAPI(
        title="Loyalty gateway",
        version="1.0.0",
        description="Membership and loyalty API for the mini-program backend and operators. "
        "Money is integer fen (1/100 yuan); points are integers; errors are "
        "application/problem+json.",
    )
    app.state.downstreams = downstreams
    app.state.draining = False
    install_http_handlers(app)

    @app.get("/healthz", response_model=Liveness, tags=["probes"], summary="Liveness")
    async def healthz() -> Liveness:
        return Liveness(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["probes"],
        summary="Readiness: every downstream reports SERVING",
        responses={503: _problem_response("Not ready; lists each downstream's status", NotReady)},
    )
    async def readyz(request: Request) -> Readiness | JSONResponse:
        if request.app.state.draining:
            return problem(503, "SHUTTING_DOWN", "the gateway is shutting down")
        statuses = await _downstreams(request).health()
        down = sorted(name for name, status in statuses.items() if status != "SERVING")
        if down:
            return problem(
                503, "NOT_READY", f"not serving: {', '.join(down)}", downstreams=statuses
            )
        return Readiness(status="ready", downstreams=statuses)

    @app.get(
        "/v1/members/{member_id}",
        response_model=Member,
        tags=["members"],
        summary="A member's profile",
        responses=MEMBER_ERRORS,
    )
    async def get_member(member_id: MemberId, request: Request) -> Member:
        reply = await _downstreams(request).member.get_member(str(member_id))
        return Member(
            member_id=reply.member_id,
            member_number=reply.member_number,
            phone_masked=reply.phone_masked,
            registered_at=_utc(reply.registered_at),
        )

    @app.get(
        "/v1/members/{member_id}/points",
        response_model=PointsBalance,
        tags=["points"],
        summary="A member's points balance",
        responses=MEMBER_ERRORS,
    )
    async def get_points(member_id: MemberId, request: Request) -> PointsBalance:
        reply = await _downstreams(request).rewards.get_points_balance(str(member_id))
        return PointsBalance(
            member_id=reply.member_id or str(member_id),
            available=reply.available,
            lifetime_earned=reply.lifetime_earned,
        )

    @app.get(
        "/v1/members/{member_id}/spend",
        response_model=MemberSpend,
        tags=["members"],
        summary="What the member has spent, as tiering counts it",
        responses=MEMBER_ERRORS,
    )
    async def get_spend(member_id: MemberId, request: Request) -> MemberSpend:
        reply = await _downstreams(request).tiering.get_member_spend(str(member_id))
        return MemberSpend(
            member_id=reply.member_id or str(member_id),
            total_paid_fen=reply.total_paid_fen,
            order_count=reply.order_count,
            last_order_at=to_datetime(reply.last_order_at),
            tier_code=reply.tier_code or None,
            tier_name=reply.tier_name or None,
        )

    _serve_problems_in_openapi(app)
    # Probes would drown the traces; everything else gets a server span.
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz")
    return app


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
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    for status, response in operation.get("responses", {}).items():
                        content = response.get("content", {})
                        if status[0] in "45" and "application/json" in content:
                            content[PROBLEM_JSON] = content.pop("application/json")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
