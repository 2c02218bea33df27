"""The coupon stock race of a claim whose first shard was empty, forced step by
step on two connections (no sleeps): the unit another claim held on that
shard, and gave back by rolling back, is still taken (services/rewards/coupons/
repository.py `take_stock`: the shard tried first goes last, waiting for its
holder). Before that, such a claim answered OUT_OF_STOCK with a unit left, and
a stock of 100 issued 98."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from servicekit.db import asyncpg_dsn
from services.rewards.coupons import handlers as svc
from services.rewards.coupons import repository as crepo
from services.rewards.coupons.domain import Kind, Limits, Status, Terms
from services.rewards.seed import seed_demo

from ..harness import Infra

TERMS = Terms(
    name="满99减30", kind=Kind.AMOUNT_OFF, threshold_fen=9900, discount_fen=3000, valid_days=3
)
SHARDS = 2


@pytest.fixture
async def two(infra: Infra) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    dsn = asyncpg_dsn(infra.database_url)
    a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    await seed_demo(a)
    yield a, b
    await a.close()
    await b.close()


async def one_unit_in_shard_0(conn: asyncpg.Connection) -> str:
    template_id = f"R-{uuid.uuid4().hex[:10]}"
    limits = Limits(total_stock=1, stock_shards=SHARDS)
    async with conn.transaction():
        await svc.create_template(conn, template_id, TERMS, limits, Status.ACTIVE, "test")
        # Where the one unit lies is the race's point: shard 0, the shard the claim tried first.
        await conn.execute(
            "UPDATE rewards.coupon_stock SET remaining = CASE shard WHEN 0 THEN 1 ELSE 0 END"
            " WHERE template_id = $1",
            template_id,
        )
    return template_id


async def waits_for_a_lock(observer: asyncpg.Connection, pid: int) -> None:
    """Returns once backend `pid` is blocked on a lock. Another process's state
    has no event to await: PostgreSQL's own view of it is polled, and the test
    goes on only when it says so (no timing is assumed)."""
    while not await observer.fetchval(  # noqa: ASYNC110
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
    ):
        await asyncio.sleep(0.01)


async def test_a_unit_given_back_on_the_first_shard_is_taken_after_waiting(
    infra: Infra, two: tuple[asyncpg.Connection, asyncpg.Connection]
) -> None:
    holder, claim = two
    template_id = await one_unit_in_shard_0(holder)
    observer = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        # 1. Another claim takes shard 0's last unit and holds it (not committed).
        holding = holder.transaction()
        await holding.start()
        assert await holder.fetchval(
            "UPDATE rewards.coupon_stock SET remaining = remaining - 1"
            " WHERE template_id = $1 AND shard = 0 AND remaining > 0 RETURNING true",
            template_id,
        )
        # 2. The claim found shard 0 (its first) empty meanwhile, and looks for
        #    a unit elsewhere: shard 1 is empty, so it must come back to shard 0
        #    and wait for the holder.
        trying = claim.transaction()
        await trying.start()
        taking = asyncio.ensure_future(crepo.take_stock(claim, template_id, SHARDS, skip=0))
        blocked = asyncio.ensure_future(waits_for_a_lock(observer, claim.get_server_pid()))
        done, _ = await asyncio.wait({taking, blocked}, return_when=asyncio.FIRST_COMPLETED)
        blocked.cancel()
        assert blocked in done, (
            f"the claim gave up ({taking.result()!r}) without waiting for shard 0's holder"
        )
        # 3. The holder rolls back (a deadlock retried, a later refusal): the unit is back.
        await holding.rollback()
        assert await taking is True
        await trying.commit()
    finally:
        await observer.close()
    remaining = await holder.fetchval(
        "SELECT sum(remaining)::bigint FROM rewards.coupon_stock WHERE template_id = $1",
        template_id,
    )
    assert remaining == 0
