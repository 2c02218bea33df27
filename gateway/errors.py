"""The one place where failures become what callers see.

Downstream gRPC failures become a `DownstreamError` (a servicekit DomainError),
so the POS server's DomainErrorInterceptor re-raises them with the same status
code and the same ErrorInfo {reason=code, metadata.field}, and the HTTP app
renders them as `application/problem+json` with the status from `HTTP_STATUS`.

What may leave: the downstream's message only when it carries our ErrorInfo
(the services wrote it for callers); otherwise a generic message. A dead or
slow downstream is UNAVAILABLE, never a hang and never its address.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from servicekit.error_codes import HTTP_STATUS  # gRPC status -> HTTP; unlisted: 500
from servicekit.errors import (
    CONNECTION_ERRORS,
    ERROR_DOMAIN,
    RETRY_AFTER_SECONDS,
    UNAVAILABLE_CODE,
    DomainError,
    error_info,
    is_connection_error,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

TITLES: dict[int, str] = {
    401: "Unauthenticated",
    403: "Permission denied",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
    504: "Gateway timeout",
}

# A downstream that did not answer in time is, to our caller, unavailable.
_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Statuses a service returns on purpose (with ErrorInfo) and that pass through
# unchanged; INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS... never do.
_PASS_THROUGH = frozenset(HTTP_STATUS) - _UNAVAILABLE

UNAVAILABLE_MESSAGE = "a backing service is unavailable; retry later"
# What protobuf raises when a Python int does not fit the message's int field.
PROTOBUF_RANGE_ERROR = "Value out of range"
INTERNAL_MESSAGE = "internal error"


class DownstreamError(DomainError):
    """A downstream failure, already translated for the gateway's callers."""

    def __init__(
        self, status: grpc.StatusCode, message: str, *, code: str, field: str = ""
    ) -> None:
        self.status = status  # before the registry check in DomainError
        super().__init__(message, code=code, field=field)


def _carries_error_info(error: grpc.aio.AioRpcError) -> bool:
    try:
        proto = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details do not match the status: not ours
        return False
    if proto is None:
        return False
    for detail in proto.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return True
    return False


def _rename(field: str, message: str, fields: Mapping[str, str]) -> tuple[str, str]:
    """The caller's names for a downstream field ("identifiers[0].value" -> "phone"),
    in the field and in the message that mentions it. An `inner` ending in "."
    is a prefix to replace ("programme." -> "": the caller sent its contents)."""
    for inner, outer in fields.items():
        prefix = inner.endswith(".") and field.startswith(inner)
        if prefix or field == inner or field.startswith(f"{inner}."):
            renamed = outer + field[len(inner) :]
            return renamed, message.replace(field, renamed)
    return field, message


def from_rpc_error(
    error: grpc.aio.AioRpcError, service: str, fields: Mapping[str, str] | None = None
) -> DownstreamError:
    """Translate a failed downstream call; `fields` renames downstream request
    fields to the names the gateway's caller used."""
    status = error.code()
    if status in _UNAVAILABLE:
        log.warning("%s: %s (%s)", service, status.name, error.details())
        return DownstreamError(
            grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE, code="DEPENDENCY_UNAVAILABLE"
        )
    if status in _PASS_THROUGH and _carries_error_info(error):
        code, field = error_info(error)
        field, message = _rename(field, error.details() or status.name, fields or {})
        return DownstreamError(status, message, code=code, field=field)
    log.error("%s failed: %s %s", service, status.name, error.details())
    return DownstreamError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, code="INTERNAL")


# ---- HTTP: application/problem+json (RFC 9457) -------------------------------


class Problem(BaseModel):
    """Every HTTP error body."""

    type: str = Field(
        description="URI naming the problem type", examples=["urn:loyalty:problem:INVALID_ARGUMENT"]
    )
    title: str = Field(examples=["Invalid request"])
    status: int = Field(examples=[422])
    code: str = Field(
        description="Stable machine-readable code; safe to switch on", examples=["INVALID_ARGUMENT"]
    )
    detail: str = Field(examples=["member_id: Input should be a valid UUID"])
    field: str = Field(
        default="",
        description="The request field at fault; empty when not about one field",
        examples=["member_id"],
    )


def problem(status: int, code: str, detail: str, field: str = "", **extra: Any) -> JSONResponse:
    body = Problem(
        type=f"urn:loyalty:problem:{code}",
        title=TITLES.get(status, "Error"),
        status=status,
        code=code,
        detail=detail,
        field=field,
    ).model_dump()
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def domain_problem(exc: DomainError) -> JSONResponse:
    status = HTTP_STATUS.get(exc.status)
    if status is None:
        return problem(500, "INTERNAL", INTERNAL_MESSAGE)
    response = problem(status, exc.code, exc.message, exc.field)
    retry_after_ms = getattr(exc, "retry_after_ms", None)
    if isinstance(retry_after_ms, int):
        # Whole seconds, rounded up: a client waiting that long is admitted.
        response.headers["Retry-After"] = str(max(1, -(-retry_after_ms // 1000)))
    elif status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def unavailable_problem() -> JSONResponse:
    """A connection-level failure of the gateway's own PostgreSQL or Redis."""
    response = problem(503, UNAVAILABLE_CODE, UNAVAILABLE_MESSAGE)
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def _field_of(loc: Sequence[int | str]) -> str:
    # ("path", "member_id") -> "member_id"; ("body", "lines", 0, "sku") -> "lines[0].sku"
    parts = list(loc[1:] if loc and loc[0] in ("path", "query", "header", "body") else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _path_of(doc: Any, value: int, at: str = "") -> str | None:
    """The request field ("lines[0].quantity") holding the integer `value`, first in order."""
    if isinstance(doc, dict):
        for key, item in doc.items():
            found = _path_of(item, value, f"{at}.{key}" if at else str(key))
            if found is not None:
                return found
    elif isinstance(doc, list):
        for n, item in enumerate(doc):
            found = _path_of(item, value, f"{at}[{n}]")
            if found is not None:
                return found
    elif isinstance(doc, int) and not isinstance(doc, bool) and doc == value:
        return at
    return None


async def _out_of_range_field(request: Request, message: str) -> str:
    """The field whose number protobuf refused: its message ("Value out of range:
    N") names the value only, so the value is looked up in what the caller sent
    (query, path, JSON body). Empty when it cannot be told."""
    try:
        value = int(message.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return ""
    for name, raw in [*request.query_params.multi_items(), *request.path_params.items()]:
        try:
            if int(str(raw)) == value:
                return str(name)
        except ValueError:
            continue
    try:
        doc = json.loads(await request.body() or b"null")
    except (ValueError, RuntimeError):
        return ""
    return _path_of(doc, value) or ""


def install_http_handlers(app: FastAPI) -> None:
    """FastAPI's own errors (validation, unknown route) speak problem+json too."""

    async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DomainError)
        return domain_problem(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field_of(first.get("loc", ()))
        detail = f"{field}: {first['msg']}" if field else str(first["msg"])
        return problem(422, "INVALID_ARGUMENT", detail, field)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        detail = exc.detail if isinstance(exc.detail, str) else TITLES.get(exc.status_code, "")
        return problem(exc.status_code, code, detail)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_connection_error(exc):
            log.warning("%s %s: dependency unavailable: %r", request.method, request.url.path, exc)
            return unavailable_problem()
        if isinstance(exc, ValueError) and str(exc).startswith(PROTOBUF_RANGE_ERROR):
            # A request number the route's model left unbounded, too large for
            # the downstream field (int32/int64): the caller's mistake, not ours.
            field = await _out_of_range_field(request, str(exc))
            detail = (
                f"{field} is out of range" if field else "a number in the request is out of range"
            )
            return problem(422, "OUT_OF_RANGE", detail, field)
        # Logged here with the stack; the caller learns nothing internal.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return problem(500, "INTERNAL", INTERNAL_MESSAGE)

    app.add_exception_handler(DomainError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # ValueError also gets its own handler: Starlette runs handlers of specific
    # classes inside the middleware stack (idempotency and metrics then see a
    # normal 422), but the catch-all Exception handler at the outermost layer,
    # after every middleware has been unwound by the exception.
    app.add_exception_handler(ValueError, on_unexpected)
    # Connection-level failures of PostgreSQL and Redis, inside the middleware
    # stack too: 503 with Retry-After, like a downstream that is unavailable.
    for error_class in CONNECTION_ERRORS:
        app.add_exception_handler(error_class, on_unexpected)
    app.add_exception_handler(Exception, on_unexpected)
