"""Fixtures shared by the rewards integration modules: a seeded Database and a
plain asyncpg connection, one each per module. A module that defines its own
`db` or `conn` keeps it (module fixtures override these)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from servicekit.db import Database, asyncpg_dsn, create_pool
from services.rewards.seed import seed_demo

from ..harness import Infra


@pytest.fixture(scope="module")
async def db(request: pytest.FixtureRequest, infra: Infra) -> AsyncIterator[Database]:
    # A module may size the pool with DB_POOL_MAX (default 32).
    pool = await create_pool(infra.database_url, 1, getattr(request.module, "DB_POOL_MAX", 32))
    async with pool.acquire() as c:
        await seed_demo(c)
    database = Database(pool, "rewards", "rewards")
    yield database
    await database.close()


@pytest.fixture(scope="module")
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield c
    await c.close()
