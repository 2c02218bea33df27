"""Graceful shutdown of a service (servicekit.server.ServiceApp.stop): unary
calls in progress finish, calls arriving during the drain are refused with
UNAVAILABLE (never CANCELLED), and a consumer applies and acknowledges the
read it is in the middle of before the process closes its pools.

The subject is a bare ServiceApp on the tiering schema with a test method and
a test consumer of its own (its own producer stream and group)."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter

import grpc
import pytest

from loyalty.events.v1 import events_pb2
from servicekit import server as server_module
from servicekit.consumer import EventConsumer, Subscription
from servicekit.db import UnitOfWork
from servicekit.events import ENVELOPE_FIELD, ReceivedEvent, make_envelope, stream_name
from servicekit.redis_client import create_redis
from servicekit.server import ServiceApp

from ..harness import Infra, eventually, wait_until_serving

SLOW_SECONDS = 0.4


@pytest.fixture(params=["traced", "untraced", "at_registration"])
def chain(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tests record spans (tests/conftest.py): a server then has the
    OpenTelemetry interceptor too, and create_grpc_server(at_registration=True)
    falls back to grpc.aio's interceptor path. Deployed
    (OTEL_TRACES_EXPORTER=none) it has not; with `at_registration` its chain
    is then no grpc.aio interceptor at all. The drain is checked all three
    ways (the last: what a service would run with registration turned on)."""
    if request.param != "traced":
        monkeypatch.setattr("servicekit.server.tracing_recorded", lambda: False)
    if request.param == "at_registration":
        monkeypatch.setattr(
            "servicekit.server.create_grpc_server",
            functools.partial(server_module.create_grpc_server, at_registration=True),
        )
    return str(request.param)


async def test_calls_in_progress_finish_and_new_ones_are_unavailable(
    infra: Infra, chain: str
) -> None:
    started = 0

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal started
        started += 1
        await asyncio.sleep(SLOW_SECONDS)
        return b"done"

    def wire(app: ServiceApp) -> None:
        assert app.server is not None
        app.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)}
                )
            ]
        )

    app = ServiceApp("kit", infra.service_settings(shutdown_grace_seconds=5.0), [], wire, "tiering")
    port = await app.start()
    # Registration wraps the server's handler registration (wrap_at_registration).
    assert ("add_generic_rpc_handlers" in vars(app.server)) == (chain == "at_registration")
    codes: Counter[str] = Counter()
    try:
        await wait_until_serving(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test.Slow/Call")

            async def one(delay: float) -> None:
                await asyncio.sleep(delay)
                try:
                    await call(b"x", timeout=10)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

            burst = [asyncio.create_task(one(0.003 * i)) for i in range(100)]
            await eventually(lambda: started >= 20)
            await app.stop()
            await asyncio.gather(*burst)
    finally:
        await app.stop()
    assert codes["CANCELLED"] == 0, codes
    assert codes["OK"] == started, codes  # every call that began was answered
    assert codes["UNAVAILABLE"] == 100 - started, codes
    assert codes["UNAVAILABLE"] > 0, codes


async def test_a_consumer_applies_and_acknowledges_its_read_before_the_process_stops(
    infra: Infra,
) -> None:
    producer, group = f"kit-{uuid.uuid4().hex[:8]}", f"stopgroup-{uuid.uuid4().hex[:8]}"
    in_handler = asyncio.Event()
    applied: list[str] = []

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        in_handler.set()
        await asyncio.sleep(SLOW_SECONDS)  # stop() arrives now
        applied.append(event.envelope.event_id)

    def wire(app: ServiceApp) -> None:
        assert app.db is not None and app.redis is not None
        app.add_consumer(
            EventConsumer(
                group,
                app.db,
                app.redis,
                infra.namespace,
                [Subscription(producer, events_pb2.OrderCompleted, handler)],
                block_ms=50,
            )
        )

    app = ServiceApp("kit", infra.service_settings(), [], wire, "tiering")
    await app.start()
    stream = stream_name(infra.namespace, producer)
    envelope = make_envelope(producer, events_pb2.OrderCompleted(order_id="o-stop"), "")
    try:
        assert app.redis is not None
        await app.redis.xadd(stream, {ENVELOPE_FIELD: envelope.SerializeToString()})
        await asyncio.wait_for(in_handler.wait(), timeout=10)
        await app.stop()
    finally:
        await app.stop()
    assert applied == [envelope.event_id]
    redis = create_redis(infra.redis_url)
    try:
        assert int((await redis.xpending(stream, group))["pending"]) == 0
    finally:
        await redis.aclose()
