"""Domain errors and their one mapping to gRPC status codes.

Business code raises these; the server interceptor turns them into a status
code, a readable message and a machine-readable detail (ErrorInfo with the
stable code and the offending field). Nothing else may leave a service: any
other exception becomes INTERNAL with a generic message (and is logged).
"""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "loyalty"


class DomainError(Exception):
    status = grpc.StatusCode.FAILED_PRECONDITION
    default_code = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, code: str | None = None, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field


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


def parse_member_id(value: str, field: str = "member_id") -> uuid.UUID:
    """A member id from a request, or InvalidArgument naming `field`."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(
            f"{field} is not a member id", code="INVALID_MEMBER_ID", field=field
        ) from None


def to_rpc_status(status: grpc.StatusCode, message: str, code: str, field: str = "") -> grpc.Status:
    """Build a grpc.Status carrying google.rpc.ErrorInfo {reason=code, metadata.field}."""
    info = error_details_pb2.ErrorInfo(reason=code, domain=ERROR_DOMAIN)
    if field:
        info.metadata["field"] = field
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=status.value[0], message=message, details=[detail])
    return rpc_status.to_status(proto)


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
