"""Session fixtures: real infrastructure, and each service started in-process on port 0."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from servicekit.server import ServiceApp

from .harness import Infra, start_infra, stop_infra, wait_until_serving

HANG_REPORT_AFTER_SECONDS = 120


def _dump_tasks(test: str) -> None:
    print(
        f"\n=== {test} still running after {HANG_REPORT_AFTER_SECONDS}s; asyncio tasks:",
        file=sys.stderr,
    )
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


@pytest.fixture(autouse=True)
async def report_hung_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Print where every task waits if a test hangs (pytest-timeout then ends the run)."""
    handle = asyncio.get_running_loop().call_later(
        HANG_REPORT_AFTER_SECONDS, _dump_tasks, request.node.nodeid
    )
    yield
    handle.cancel()


@pytest.fixture(scope="session")
async def infra() -> AsyncIterator[Infra]:
    started = await start_infra()
    yield started
    await stop_infra(started)


async def _serve(app: ServiceApp) -> AsyncIterator[ServiceApp]:
    port = await app.start()
    await wait_until_serving(f"127.0.0.1:{port}")
    yield app
    await app.stop()


@pytest.fixture(scope="session")
async def member_app(infra: Infra) -> AsyncIterator[ServiceApp]:
    from services.member.server import build

    async for app in _serve(build(infra.service_settings())):
        yield app


@pytest.fixture(scope="session")
async def rewards_app(infra: Infra) -> AsyncIterator[ServiceApp]:
    from services.rewards.server import build

    async for app in _serve(build(infra.service_settings())):
        yield app


@pytest.fixture(scope="session")
async def tiering_app(infra: Infra) -> AsyncIterator[ServiceApp]:
    from services.tiering.server import build

    async for app in _serve(build(infra.service_settings())):
        yield app


@pytest.fixture(scope="session")
async def engagement_app(infra: Infra) -> AsyncIterator[ServiceApp]:
    from services.engagement.server import build

    async for app in _serve(build(infra.service_settings())):
        yield app


def _channel(app: ServiceApp) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")


@pytest.fixture(scope="session")
async def rewards_channel(rewards_app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with _channel(rewards_app) as channel:
        yield channel


@pytest.fixture(scope="session")
async def tiering_channel(tiering_app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with _channel(tiering_app) as channel:
        yield channel


@pytest.fixture(scope="session")
async def member_channel(member_app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with _channel(member_app) as channel:
        yield channel
