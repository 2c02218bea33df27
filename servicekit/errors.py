"""Domain errors and their one mapping to gRPC status codes.

Business code raises these; the server interceptor turns them into a status
code, a readable message and a machine-readable detail (ErrorInfo with the
stable code and the offending field). Nothing else may leave a service: any
other exception becomes INTERNAL with a generic message (and is logged).
"""

from __future__ import annotations

import json
import sys
import uuid

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import error_codes

ERROR_DOMAIN = "loyalty"


class DomainError(Exception):
    status = grpc.StatusCode.FAILED_PRECONDITION
    default_code = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, code: str | None = None, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field
        # Every code a caller can get is in the registry, with this status.
        error_codes.check(self.code, self.status)


class InvalidArgument(DomainError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    default_code = "INVALID_ARGUMENT"


class NotFound(DomainError):
    status = grpc.StatusCode.NOT_FOUND
    default_code = "NOT_FOUND"


class AlreadyExists(DomainError):
    status = grpc.StatusCode.ALREADY_EXISTS
    default_code = "ALREADY_EXISTS"


class Conflict(DomainError):
    """The request contradicts state (e.g. an idempotency key reused with another body)."""

    status = grpc.StatusCode.ABORTED
    default_code = "CONFLICT"


class FailedPrecondition(DomainError):
    status = grpc.StatusCode.FAILED_PRECONDITION
    default_code = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    status = grpc.StatusCode.PERMISSION_DENIED
    default_code = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_code = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    status = grpc.StatusCode.UNAVAILABLE
    default_code = "UNAVAILABLE"


# Failures of the connection to PostgreSQL or Redis, not of the request: a
# broken socket, a server restarting or shutting down, a pool connection left
# unusable, a failover (writes to a replica). Callers get UNAVAILABLE with a
# retry hint; the connection leaves the pool (servicekit/db.py).
PG_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # ConnectionRefusedError, ConnectionResetError, TimeoutError
    asyncpg.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ReadOnlySQLTransactionError,  # connected to a former primary after a failover
    asyncpg.InterfaceError,  # "connection is closed", "connection was released"
    # A FATAL ErrorResponse (server shutting down) that reached a connection
    # idle in the pool leaves asyncpg's protocol expecting a ReadyForQuery
    # that never comes: the next statement fails with "cannot switch to state
    # N; another operation (2) is in progress" (docs/operations.md).
    asyncpg.InternalClientError,
)
REDIS_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,  # includes BusyLoadingError (a replica loading)
    RedisTimeoutError,
    RedisReadOnlyError,  # a replica after a failover
)
CONNECTION_ERRORS = PG_CONNECTION_ERRORS + REDIS_CONNECTION_ERRORS
# Seconds a caller should wait before retrying a connection-level failure.
RETRY_AFTER_SECONDS = 1
UNAVAILABLE_CODE = "DEPENDENCY_UNAVAILABLE"
UNAVAILABLE_MESSAGE = "a dependency of the service is unavailable; retry later"


def print_refusal(exc: DomainError, **context: object) -> int:
    """An operator command's refusal: `{"error": {code, message, field}, ...context}`
    as one JSON line on stderr; returns the command's exit status (1)."""
    error = {"code": exc.code, "message": exc.message, "field": exc.field}
    print(json.dumps({"error": error, **context}, ensure_ascii=False), file=sys.stderr)
    return 1


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` (or what it was explicitly raised from) is a connection-level failure."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if isinstance(current, CONNECTION_ERRORS):
            return True
        current = current.__cause__
        seen += 1
    return False


def parse_member_id(value: str, field: str = "member_id") -> uuid.UUID:
    """A member id from a request, or InvalidArgument naming `field`."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(
            f"{field} is not a member id", code="INVALID_MEMBER_ID", field=field
        ) from None


def to_rpc_status(
    status: grpc.StatusCode,
    message: str,
    code: str,
    field: str = "",
    retry_after_seconds: float | None = None,
) -> grpc.Status:
    """Build a grpc.Status carrying google.rpc.ErrorInfo {reason=code, metadata.field}
    (and google.rpc.RetryInfo when the caller should retry after a delay)."""
    info = error_details_pb2.ErrorInfo(reason=code, domain=ERROR_DOMAIN)
    if field:
        info.metadata["field"] = field
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if retry_after_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(int(retry_after_seconds * 1000))
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    proto = status_pb2.Status(code=status.value[0], message=message, details=details)
    return rpc_status.to_status(proto)


def unavailable_status() -> grpc.Status:
    """What a caller sees for a connection-level failure: retry in a second."""
    return to_rpc_status(
        grpc.StatusCode.UNAVAILABLE,
        UNAVAILABLE_MESSAGE,
        UNAVAILABLE_CODE,
        retry_after_seconds=RETRY_AFTER_SECONDS,
    )


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> tuple[str, str]:
    """(code, field) from a failed call's status details, or a code named after the status."""
    try:
        proto = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        proto = None
    if proto is not None:
        for detail in proto.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason, info.metadata.get("field", "")
    return error.code().name, ""  # type: ignore[union-attr]
