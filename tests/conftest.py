"""Session fixtures: real infrastructure, and each service started in-process on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from servicekit.server import ServiceApp

from .harness import Infra, start_infra, stop_infra, wait_until_serving


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
async def member_channel(member_app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{member_app.port}") as channel:
        yield channel
