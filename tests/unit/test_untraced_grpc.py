"""A server and channel built without the OpenTelemetry interceptors (what
every process gets when no span is recorded) still map domain errors and
answer; the test session itself records spans (OTEL_TRACES_SAMPLER), so the
traced path is what the other tests exercise."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from servicekit.clients import create_channel
from servicekit.errors import NotFound, error_info
from servicekit.server import create_grpc_server, tracing_recorded

METHOD = "/test.Untraced/Call"


async def _call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"missing":
        raise NotFound("nothing here", code="NOT_FOUND", field="request")
    return b"ok:" + request


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Untraced", {"Call": grpc.unary_unary_rpc_method_handler(_call)}
    )


async def test_an_untraced_server_answers_and_maps_domain_errors() -> None:
    server = create_grpc_server(60_000, 0.5, traced=False)
    server.add_generic_rpc_handlers([_handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}", traced=False)
    try:
        call: Any = channel.unary_unary(METHOD)
        assert await call(b"x", timeout=5) == b"ok:x"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"missing", timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value) == ("NOT_FOUND", "request")
    finally:
        await channel.close()
        await server.stop(None)


def test_the_test_session_records_spans() -> None:
    # tests/conftest.py sets OTEL_TRACES_SAMPLER; a process that configured
    # tracing with it keeps the interceptors.
    from servicekit.telemetry import configure_tracing

    configure_tracing("test")
    assert tracing_recorded()
