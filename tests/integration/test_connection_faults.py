"""Connection-level failures to PostgreSQL and Redis (servicekit/db.py,
servicekit/errors.py, servicekit/redis_client.py): the server closing pooled
connections (what a restart does to them) costs no request, a connection
broken mid-transaction surfaces as its own error (UNAVAILABLE to callers) and
leaves the pool, and the first command after a Redis restart succeeds.

PostgreSQL is the machine's shared server: a restart is simulated by
pg_terminate_backend on this test's own connections (the same FATAL
"terminating connection due to administrator command" a shutdown sends).
Redis is restarted for real: a redis-server this test starts on a free
loopback port and stops by pid.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator

import asyncpg
import pytest

from devtools.supervisor import free_port
from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.errors import is_connection_error
from servicekit.redis_client import create_redis

from ..harness import Infra

POOL_SIZE = 3


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, POOL_SIZE, POOL_SIZE)
    database = Database(pool, "tiering", "kit-test")
    yield database
    await database.close()


@pytest.fixture
async def admin(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield conn
    await conn.close()


async def _pids(db: Database) -> list[int]:
    conns = [await db.pool.acquire() for _ in range(POOL_SIZE)]
    pids = [c.get_server_pid() for c in conns]
    for c in conns:
        await db.pool.release(c)
    return pids


async def test_units_of_work_right_after_the_server_closed_every_pooled_connection_succeed(
    db: Database, admin: asyncpg.Connection
) -> None:
    """The FATAL a closing server sends reaches connections idle in the pool;
    asyncpg's protocol then expects a ReadyForQuery that never comes, and the
    next BEGIN failed with InternalClientError "cannot switch to state 15;
    another operation (2) is in progress" (INTERNAL to callers) or "connection
    is closed". A unit of work now drops such a connection and takes another."""
    for _ in range(10):
        pids = await _pids(db)
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", pids)

        async def work() -> int:
            async with db.unit_of_work() as uow:
                return int(await uow.conn.fetchval("SELECT 1"))

        assert await asyncio.gather(*(work() for _ in range(POOL_SIZE))) == [1] * POOL_SIZE


async def test_a_connection_broken_mid_transaction_raises_its_own_error_and_leaves_the_pool(
    db: Database, admin: asyncpg.Connection
) -> None:
    with pytest.raises(Exception) as caught:  # the kind is checked below
        async with db.unit_of_work() as uow:
            pid = uow.conn.get_server_pid()
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await uow.conn.fetchval("SELECT pg_sleep(2)")
    # The statement's own failure, not the rollback's "connection is closed"
    # InterfaceError hiding it; either way a connection error (UNAVAILABLE).
    assert "rollback" not in str(caught.value), repr(caught.value)
    assert is_connection_error(caught.value), repr(caught.value)
    assert pid not in await _pids(db)
    async with db.unit_of_work() as uow:
        assert await uow.conn.fetchval("SELECT 1") == 1


def _without_faketime() -> dict[str, str]:
    """redis-server cannot run under libfaketime (the suite may run under
    `faketime '+365d'`): it fails on its own clock calls."""
    return {
        k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")
    }


def _start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_without_faketime(),
    )


async def _wait_redis(url: str) -> None:
    client = create_redis(url)
    try:
        for _ in range(200):
            try:
                await client.ping()
                return
            except Exception:
                await asyncio.sleep(0.02)
        raise AssertionError("redis-server did not start")
    finally:
        await client.aclose()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_the_first_commands_after_a_redis_restart_succeed() -> None:
    """Every pooled connection is stale after a restart ("Connection closed by
    server" on its first use); the client reconnects and retries instead."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory() as workdir:
        server = _start_redis(port, workdir)
        try:
            await _wait_redis(url)
            client = create_redis(url)
            # Several pooled connections, all made before the restart.
            await asyncio.gather(*(client.set(f"k{i}", b"v") for i in range(5)))
            server.terminate()
            server.wait(timeout=10)
            server = _start_redis(port, workdir)
            await _wait_redis(url)
            results = await asyncio.gather(*(client.get(f"k{i}") for i in range(5)))
            assert results == [None] * 5  # restarted empty, and every call answered
            async with client.pipeline(transaction=False) as pipe:
                pipe.set("p", b"1")
                pipe.get("p")
                assert await pipe.execute() == [True, b"1"]
            await client.aclose()
        finally:
            server.terminate()
            server.wait(timeout=10)
