"""Fixtures shared by the rewards integration modules: a seeded Database and a
plain asyncpg connection, one each per module (a module that defines its own
`db` or `conn` keeps it: module fixtures override these), and the ledger audit
after every rewards module and every other module that wrote the journal
(`ledger_audit`); and the event modules' `redis`,
on one Redis and on a cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.redis_client import RedisClient, create_redis
from services.rewards.points.audit import audit_ledger
from services.rewards.seed import seed_demo

from ..harness import Infra, own_database


@pytest.fixture(scope="module")
async def db(request: pytest.FixtureRequest, infra: Infra) -> AsyncIterator[Database]:
    # A module may size the pool with DB_POOL_MAX (default 32).
    pool = await create_pool(infra.database_url, 1, getattr(request.module, "DB_POOL_MAX", 32))
    async with pool.acquire() as c:
        await seed_demo(c)
    database = Database(pool, "rewards", "rewards")
    yield database
    await database.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    """servicekit's client on one Redis, then on a Redis Cluster (tests/conftest.py
    `redis_url`), for the event modules; a module with its own `redis` keeps it."""
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield c
    await c.close()


async def journal_mark(c: asyncpg.Connection) -> tuple[int, bool] | None:
    """Where the journal's sequence stands (None: no rewards schema yet). Every
    journal row takes a number from it, so a module that wrote one moved it;
    reading it is one row, whatever the journal's size."""
    if await c.fetchval("SELECT to_regclass('rewards.points_transactions_seq') IS NULL"):
        return None
    row = await c.fetchrow("SELECT last_value, is_called FROM rewards.points_transactions_seq")
    assert row is not None
    return row["last_value"], row["is_called"]


@pytest.fixture(scope="module", autouse=True)
async def ledger_audit(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Once a module is done, the whole points ledger must audit clean (every
    invariant, every member: what `python -m services.rewards audit` checks),
    whatever the module's own tests asserted: after every rewards module, and
    after any other module that wrote the journal (journeys' and guides'
    coupons and points go through rewards). A module that wrote no journal row
    pays one sequence read before and after, not the audit."""
    infra = request.getfixturevalue("infra")
    rewards_module = request.module.__name__.rsplit(".", 1)[-1].startswith("test_rewards_")
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        before = await journal_mark(c)
    finally:
        await c.close()
    yield
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        after = await journal_mark(c)
        if after is None or not (rewards_module or after != before):
            return
        report = await audit_ledger(c)
    finally:
        await c.close()
    assert report.ok, report


@pytest.fixture
async def scratch_url(infra: Infra) -> AsyncIterator[str]:
    """A database of its own (the harness's own_database), for a migration
    run over existing rows or a test that must not share the module's."""
    async with own_database(infra, prefix="scratch") as url:
        yield url
