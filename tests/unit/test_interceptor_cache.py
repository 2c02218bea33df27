"""servicekit's server interceptors wrap a method's handler once, not on every
call (grpc.aio runs intercept_service per call: issue 19's per-call Python),
and never serve a stale wrapping when the inner handler changes."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from servicekit.interceptors import DomainErrorInterceptor, UnaryInterceptor
from servicekit.metrics import ServiceMetrics
from servicekit.server import Drain


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class Context:
    def code(self) -> grpc.StatusCode | None:
        return None


def interceptors() -> list[UnaryInterceptor]:
    return [Drain(), DomainErrorInterceptor(), ServiceMetrics("cached").interceptor()]  # type: ignore[list-item]


def handler_answering(value: str) -> grpc.RpcMethodHandler:
    async def behaviour(request: Any, context: Any) -> str:
        return value

    return grpc.unary_unary_rpc_method_handler(behaviour)


@pytest.mark.parametrize(
    "interceptor",
    [i for i in interceptors() if not isinstance(i, Drain)],  # Drain wraps per call
    ids=lambda i: type(i).__name__,
)
async def test_a_method_is_wrapped_once(interceptor: UnaryInterceptor) -> None:
    handler = handler_answering("a")

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return handler

    first = await interceptor.intercept_service(continuation, Details("/x.S/M"))  # type: ignore[arg-type]
    second = await interceptor.intercept_service(continuation, Details("/x.S/M"))  # type: ignore[arg-type]
    assert first is second
    assert first is not handler
    assert await first.unary_unary(b"", Context()) == "a"


@pytest.mark.parametrize("interceptor", interceptors(), ids=lambda i: type(i).__name__)
async def test_a_new_inner_handler_is_wrapped_anew(interceptor: UnaryInterceptor) -> None:
    handlers = iter([handler_answering("old"), handler_answering("new")])

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return next(handlers)

    await interceptor.intercept_service(continuation, Details("/x.S/M"))  # type: ignore[arg-type]
    newer = await interceptor.intercept_service(continuation, Details("/x.S/M"))  # type: ignore[arg-type]
    assert await newer.unary_unary(b"", Context()) == "new"


async def test_unknown_methods_are_not_remembered() -> None:
    interceptor = DomainErrorInterceptor()

    async def continuation(details: Any) -> None:
        return None

    for i in range(3):
        got = await interceptor.intercept_service(continuation, Details(f"/x.S/Made{i}"))  # type: ignore[arg-type]
        assert got is None
    assert interceptor._wrapped == {}


async def test_health_calls_pass_through_drain_and_metrics_unwrapped() -> None:
    handler = handler_answering("ok")

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return handler

    for interceptor in (Drain(), ServiceMetrics("h").interceptor()):
        got = await interceptor.intercept_service(  # type: ignore[attr-defined]
            continuation, Details("/grpc.health.v1.Health/Check")
        )
        assert got is handler


async def test_servicekit_server_applies_its_chain_to_registered_and_generic_handlers() -> None:
    """create_grpc_server with servicekit's own interceptors applies them as
    handlers are registered (no grpc.aio interceptor path per call): a
    DomainError still becomes its status, the metrics observe every call, and
    Drain counts the calls in flight."""
    from servicekit.errors import NotFound
    from servicekit.server import create_grpc_server

    metrics = ServiceMetrics("registered")
    drain = Drain()
    seen_in_flight: list[int] = []

    async def ok(request: bytes, context: Any) -> bytes:
        seen_in_flight.append(drain.in_flight)
        return b"ok"

    async def fail(request: bytes, context: Any) -> bytes:
        raise NotFound("no such thing")

    server = create_grpc_server(
        60_000, 0.5, [metrics.interceptor()], traced=False, drain=drain, at_registration=True
    )
    server.add_registered_method_handlers(
        "t.Registered", {"Ok": grpc.unary_unary_rpc_method_handler(ok)}
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.Generic", {"Fail": grpc.unary_unary_rpc_method_handler(fail)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary("/t.Registered/Ok")(b"") == b"ok"
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/t.Generic/Fail")(b"")
    finally:
        await server.stop(None)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "no such thing"
    assert seen_in_flight == [1]
    handled = {
        (s.labels["grpc_method"], s.labels["grpc_code"]): s.value
        for family in metrics.registry.collect()
        if family.name == "grpc_server_handled"
        for s in family.samples
        if s.name == "grpc_server_handled_total"
    }
    assert handled == {("Ok", "OK"): 1.0, ("Fail", "NOT_FOUND"): 1.0}
