"""The gateway's POS interceptors build their wrapper once per method
(gateway/wrapped.py) and still wrap each call: the same wrapper for the same
handler beneath, a new one for another, and every call goes through it."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway.metrics import GatewayMetrics, GrpcObserver
from gateway.pos import MessageSizeInterceptor
from servicekit.errors import InvalidArgument

METHOD = "/loyalty.pos.v1.PosService/IdentifyMember"


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _handler(reply: str) -> grpc.RpcMethodHandler:
    async def call(request: Any, context: Any) -> str:
        return reply

    return grpc.unary_unary_rpc_method_handler(call, request_deserializer=bytes)


async def test_a_wrapper_is_built_once_per_method_and_handler() -> None:
    metrics = GatewayMetrics()
    chain = [GrpcObserver(metrics), MessageSizeInterceptor(4)]
    first, second = _handler("a"), _handler("b")
    beneath = [first]

    async def run(method: str) -> grpc.RpcMethodHandler:
        async def innermost(details: Any) -> grpc.RpcMethodHandler:
            return beneath[0]

        async def middle(details: Any) -> grpc.RpcMethodHandler:
            return await chain[1].intercept_service(innermost, details)

        return await chain[0].intercept_service(middle, _Details(method))

    once, again = await run(METHOD), await run(METHOD)
    assert once is again and once is not first
    other_method = await run("/loyalty.pos.v1.PosService/CompleteOrder")
    assert other_method is not once
    beneath[0] = second
    replaced = await run(METHOD)
    assert replaced is not once
    # Each call still goes through both wrappers: the size check, the observation.
    assert await replaced.unary_unary(b"ok", None) == "b"
    too_large = replaced.request_deserializer(b"12345")
    with pytest.raises(InvalidArgument) as refused:
        await replaced.unary_unary(too_large, None)
    assert refused.value.code == "MESSAGE_TOO_LARGE"
    counted = metrics.registry.get_sample_value(
        "gateway_requests_total",
        {"protocol": "grpc", "client": "anonymous", "route": METHOD, "status": "OK"},
    )
    assert counted == 1
