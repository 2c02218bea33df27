"""Connection-level failures of PostgreSQL and Redis become UNAVAILABLE with a
retry hint (servicekit/errors.py): through the gRPC interceptor every service
and the POS server use, and through the gateway's HTTP error handlers."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from google.rpc import error_details_pb2, status_pb2
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.errors import install_http_handlers
from servicekit.interceptors import DomainErrorInterceptor

CONNECTION_FAILURES = [
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.InterfaceError("connection is closed"),
    ConnectionRefusedError(111, "Connect call failed"),
    RedisConnectionError("Connection closed by server."),
]


class FakeContext:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: Any = ()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, md: Any) -> None:
        self.trailing = md


async def _call_failing(exc: BaseException) -> FakeContext:
    async def behaviour(request: Any, context: Any) -> Any:
        raise exc

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(behaviour)

    class Details:
        method = "/loyalty.test/Call"

    details: Any = Details()
    handler = await DomainErrorInterceptor().intercept_service(continuation, details)
    context = FakeContext()
    await handler.unary_unary(object(), context)
    return context


def _retry_delay_ms(context: FakeContext) -> int | None:
    for key, value in context.trailing:
        if key == "grpc-status-details-bin":
            proto = status_pb2.Status.FromString(value)
            for detail in proto.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return int(info.retry_delay.ToMilliseconds())
    return None


@pytest.mark.parametrize("exc", CONNECTION_FAILURES, ids=lambda e: type(e).__name__)
async def test_connection_failures_are_unavailable_with_a_retry_hint(exc: BaseException) -> None:
    context = await _call_failing(exc)
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert _retry_delay_ms(context) == 1000


async def test_a_bug_is_still_internal() -> None:
    context = await _call_failing(KeyError("oops"))
    assert context.code == grpc.StatusCode.INTERNAL
    assert _retry_delay_ms(context) is None


@pytest.mark.parametrize("exc", CONNECTION_FAILURES, ids=lambda e: type(e).__name__)
def test_http_routes_answer_503_with_retry_after(exc: BaseException) -> None:
    app = FastAPI()
    install_http_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["code"] == "DEPENDENCY_UNAVAILABLE"
