"""Session fixtures: real infrastructure, and each service started in-process on port 0."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest

from servicekit.server import ServiceApp

from .harness import Infra, ServiceClock, start_infra, stop_infra, wait_until_serving
from .redis_servers import RedisClusterServers

# Services record no spans without an exporter (servicekit/telemetry.py); the
# tracing tests attach in-memory exporters to the provider, so record them here.
os.environ.setdefault("OTEL_TRACES_SAMPLER", "always_on")
# The suite runs with the repository's development keys: development, not
# production (servicekit/safety.py). Child processes the tests start inherit it.
os.environ.setdefault("LOYALTY_ENV", "development")
# An error code the registry (servicekit/error_codes.py) does not hold, or holds
# under another status, fails the test that raises it.
os.environ.setdefault("LOYALTY_STRICT_ERROR_CODES", "1")

HANG_REPORT_AFTER_SECONDS = 120


# A session fixture's stop (services, gateway, infrastructure) takes a few
# seconds at most; longer, and where every task waits is printed.
STOP_REPORT_AFTER_SECONDS = 30


def _dump_tasks(what: str) -> None:
    tasks = asyncio.all_tasks()
    print(f"\n=== {what}; {len(tasks)} asyncio tasks:", file=sys.stderr)
    for task in tasks:
        print(f"--- {task!r}", file=sys.stderr)
        # grpc's Cython coroutines have no Python frames to walk (and walking
        # them has hung); their repr above says enough.
        if inspect.iscoroutine(task.get_coro()):
            task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


@pytest.fixture(autouse=True)
async def report_hung_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Print where every task waits if a test hangs (pytest-timeout then ends the run)."""
    handle = asyncio.get_running_loop().call_later(
        HANG_REPORT_AFTER_SECONDS,
        _dump_tasks,
        f"{request.node.nodeid} still running after {HANG_REPORT_AFTER_SECONDS}s",
    )
    yield
    handle.cancel()


async def stopping(what: str, stop: Awaitable[None]) -> None:
    """Await a session fixture's stop; report the tasks if it hangs."""
    handle = asyncio.get_running_loop().call_later(
        STOP_REPORT_AFTER_SECONDS,
        _dump_tasks,
        f"{what} still stopping after {STOP_REPORT_AFTER_SECONDS}s",
    )
    try:
        await stop
    finally:
        handle.cancel()


@pytest.fixture(scope="session")
async def infra() -> AsyncIterator[Infra]:
    started = await start_infra()
    yield started
    await stopping("infrastructure", stop_infra(started))


@pytest.fixture(scope="session")
async def redis_cluster() -> AsyncIterator[RedisClusterServers]:
    """A private three-node Redis Cluster, started for the first test that asks."""
    cluster = RedisClusterServers()
    await cluster.start()
    yield cluster
    await stopping("redis cluster", cluster.stop())


# The suites of the Redis access layer (events, gateway door, member cache)
# run on one Redis and on a Redis Cluster: a module's `redis_url` fixture.
REDIS_KINDS = ["single", "cluster"]


@pytest.fixture(params=REDIS_KINDS)
def redis_url(request: pytest.FixtureRequest, infra: Infra) -> str:
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        return cluster.url
    return infra.redis_url


async def _serve(app: ServiceApp) -> AsyncIterator[ServiceApp]:
    port = await app.start()
    await wait_until_serving(f"127.0.0.1:{port}")
    yield app
    await stopping(f"service {app.name}", app.stop())


@pytest.fixture(scope="session")
def member_clock() -> ServiceClock:
    """The member service's velocity watch reads it (tests pin it)."""
    return ServiceClock()


@pytest.fixture(scope="session")
async def member_app(infra: Infra, member_clock: ServiceClock) -> AsyncIterator[ServiceApp]:
    from services.member.server import build

    async for app in _serve(build(infra.service_settings(), clock=member_clock)):
        yield app


@pytest.fixture(scope="session")
async def rewards_app(infra: Infra) -> AsyncIterator[ServiceApp]:
    from services.rewards.server import build

    async for app in _serve(build(infra.service_settings())):
        yield app


@pytest.fixture(scope="session")
def tiering_clock() -> ServiceClock:
    return ServiceClock()


@pytest.fixture(scope="session")
async def tiering_app(infra: Infra, tiering_clock: ServiceClock) -> AsyncIterator[ServiceApp]:
    from services.tiering.server import build

    async for app in _serve(build(infra.service_settings(), clock=tiering_clock)):
        yield app


@pytest.fixture(scope="session")
async def provider_fakes() -> AsyncIterator[Any]:
    """The channel providers' fakes (devtools/provider_fakes), lenient: every
    openid has credit, every WeCom contact is a customer."""
    from devtools.provider_fakes.stack import build_stack

    stack = build_stack(strict=False)
    await stack.server.start()
    yield stack
    await stack.server.stop()


@pytest.fixture(scope="session")
async def engagement_app(infra: Infra, provider_fakes: Any) -> AsyncIterator[ServiceApp]:
    from services.engagement.server import build
    from services.engagement.settings import EngagementSettings

    settings = {**infra.service_settings().model_dump(), **provider_fakes.settings()}
    async for app in _serve(build(EngagementSettings(**settings))):
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


@pytest.fixture(scope="session")
def guides_clock() -> ServiceClock:
    return ServiceClock()


@pytest.fixture(scope="session")
def fake_wecom():  # type: ignore[no-untyped-def]
    """WeCom's server API, in memory (services/guides/wecom.py); tests add users and contacts."""
    from services.guides.wecom import FakeWeCom

    return FakeWeCom()


@pytest.fixture(scope="session")
async def guides_app(
    infra: Infra,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    guides_clock: ServiceClock,
    fake_wecom: object,
) -> AsyncIterator[ServiceApp]:
    from services.guides.server import build
    from services.guides.settings import GuidesSettings
    from services.guides.wecom import FakeWeCom

    assert isinstance(fake_wecom, FakeWeCom)
    settings = GuidesSettings(
        # A small pool: the suite shares PostgreSQL's 100 connections with four other services.
        **infra.service_settings(db_pool_max=5).model_dump(),
        member_addr=f"127.0.0.1:{member_app.port}",
        rewards_addr=f"127.0.0.1:{rewards_app.port}",
        wecom_corp_id=fake_wecom.corp_id,
        wecom_secret=fake_wecom.secret,
        callback_poll_seconds=0.05,
        tag_refresh_hours=0,
        # Guide tasks gather for an hour: the task test moves the clock past it.
        task_gather_seconds=3600,
        task_poll_seconds=0.2,
    )
    app = build(settings, clock=guides_clock, wecom_transport=fake_wecom.transport())
    async for served in _serve(app):
        yield served


@pytest.fixture(scope="session")
async def guides_channel(guides_app: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with _channel(guides_app) as channel:
        yield channel
