"""The server shell every service runs in (servicekit.server), with the
engagement service as the subject: health, reflection, readiness without a
database, and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devtools.supervisor import free_port
from servicekit.server import ServiceApp
from services.engagement.server import build

from ..harness import Infra, eventually, wait_until_serving

ENGAGEMENT = "loyalty.engagement.v1.EngagementService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def engagement_channel(engagement_app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{engagement_app.port}") as channel:
        yield channel


@contextlib.asynccontextmanager
async def started(app: ServiceApp) -> AsyncIterator[ServiceApp]:
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def check(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2
    )
    return reply.status


@pytest.mark.parametrize("service", ["", ENGAGEMENT])
async def test_health_is_serving_once_dependencies_answer(
    engagement_channel: grpc.aio.Channel, service: str
) -> None:
    assert await check(engagement_channel, service) == SERVING


async def test_health_of_an_unknown_service_is_not_found(
    engagement_channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(engagement_channel, "loyalty.nope.v1.NopeService")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services(engagement_channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(engagement_channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request])):
        names = {s.name for s in reply.list_services_response.service}
        break
    assert names == {
        ENGAGEMENT,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_service_without_a_database_stays_not_serving(infra: Infra) -> None:
    app = build(infra.service_settings(database_url="postgresql://postgres@127.0.0.1:1/none"))
    async with started(app):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            # Several health polls (every 0.2 s while not ready), none succeeds.
            for _ in range(5):
                assert await check(channel, "") == NOT_SERVING
                assert await check(channel, ENGAGEMENT) == NOT_SERVING
                await asyncio.sleep(0.3)


async def test_service_without_redis_is_ready_and_reports_redis_down(infra: Infra) -> None:
    """Readiness is the database only: without Redis calls still work (events
    wait in the outbox); Redis's state is reported on its own."""
    app = build(infra.service_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    async with started(app):
        target = f"127.0.0.1:{app.port}"
        await wait_until_serving(target, ENGAGEMENT)
        async with grpc.aio.insecure_channel(target) as channel:
            assert await check(channel, "") == SERVING
            assert await check(channel, "loyalty.dependency.postgres") == SERVING
            assert await check(channel, "loyalty.dependency.redis") == NOT_SERVING
        assert app.dependencies is not None
        assert app.dependencies.states == {"postgres": "UP", "redis": "DOWN"}


async def _refused(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as fresh:
        try:
            await check(fresh, "")
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


async def _is_not_serving(app: ServiceApp, service: str) -> bool:
    # Once stop() has begun the server takes no new calls, so the status it
    # reports (to Watch streams already open) is read from the servicer itself.
    reply = await app.health.Check(health_pb2.HealthCheckRequest(service=service), None)
    return bool(reply.status == NOT_SERVING)


async def test_graceful_stop_reports_not_serving_drains_then_refuses(infra: Infra) -> None:
    grace = 5.0
    app = build(infra.service_settings(shutdown_grace_seconds=grace))
    port = await app.start()
    target = f"127.0.0.1:{port}"
    stopping: asyncio.Task[None] | None = None
    try:
        await wait_until_serving(target, ENGAGEMENT)
        async with grpc.aio.insecure_channel(target) as channel:
            # An in-flight call that spans stop(): a reflection stream the client keeps open.
            requests: asyncio.Queue[reflection_pb2.ServerReflectionRequest | None] = asyncio.Queue()

            async def outgoing() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                while (item := await requests.get()) is not None:
                    yield item

            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                outgoing()
            )
            await requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
            assert (await stream.read()).HasField("list_services_response")
            assert await check(channel, "") == SERVING

            loop = asyncio.get_running_loop()
            began = loop.time()
            stopping = asyncio.create_task(app.stop())
            # First, health turns NOT_SERVING for every service...
            for service in ("", ENGAGEMENT):
                await eventually(lambda s=service: _is_not_serving(app, s))  # type: ignore[misc]
            # ...and new connections are refused while in-flight calls drain.
            assert await _refused(target)
            assert not stopping.done()

            # The in-flight call still works during the drain and ends cleanly.
            await requests.put(
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=ENGAGEMENT)
            )
            assert (await stream.read()).HasField("file_descriptor_response")
            await requests.put(None)
            assert await stream.read() is grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK

            # stop() returns as soon as the last call is done, not after the whole grace.
            await asyncio.wait_for(stopping, timeout=grace + 5)
            assert loop.time() - began < grace

        assert await _refused(target)
    finally:
        if stopping is None:
            await app.stop()


async def test_health_watch_sees_not_serving_when_stop_begins(infra: Infra) -> None:
    app = build(infra.service_settings(shutdown_grace_seconds=1.0))
    port = await app.start()
    try:
        await wait_until_serving(f"127.0.0.1:{port}", ENGAGEMENT)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=ENGAGEMENT)
            )
            assert (await asyncio.wait_for(watch.read(), timeout=2)).status == SERVING
            stopping = asyncio.create_task(app.stop())
            assert (await asyncio.wait_for(watch.read(), timeout=2)).status == NOT_SERVING
            await stopping
    finally:
        await app.stop()  # idempotent
