"""The pool's release (servicekit/db.py): a connection whose session state was
changed and marked (session_state_changed) comes back reset; every other
release skips asyncpg's reset query (its round trip was paid by every unit of
work in every process); a transaction left open is still rolled back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from servicekit.db import create_pool, session_state_changed

from ..harness import Infra


@pytest.fixture
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    # One connection: each acquire gets the one released before.
    created = await create_pool(infra.database_url, 1, 1)
    yield created
    await created.close()


async def test_a_marked_session_is_reset_on_release(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        default = await conn.fetchval("SHOW work_mem")
        session_state_changed(conn)
        await conn.execute("SET work_mem = '7MB'")
        assert await conn.fetchval("SELECT pg_try_advisory_lock(424242)")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW work_mem") == default
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND pid = pg_backend_pid() AND objid = 424242"
        )
        assert held == 0


async def test_an_unmarked_release_sends_no_reset_query(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        before = await conn.fetchval("SHOW work_mem")
        # Unmarked on purpose: the setting outlives the release, so no reset ran.
        await conn.execute("SET work_mem = '9MB'")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW work_mem") == "9MB"
        # Put back by hand (marked: this release resets it).
        session_state_changed(conn)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SHOW work_mem") == before


async def test_a_transaction_left_open_is_rolled_back(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
