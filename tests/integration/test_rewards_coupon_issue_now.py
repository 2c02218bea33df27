"""IssueCoupon's path (handlers.issue_coupon_now): with the template cached, a
clean issue is ONE statement outside any transaction; everything else (a
replay, a refusal, a template changed since it was cached, an erased member)
writes nothing there and goes through issue_coupon in a transaction. The
promises are the transactional path's: coupons == stock taken <= stock,
counters and CouponIssued rows exactly those of the coupons written, one
coupon per issue key.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest

from servicekit.db import Database, create_pool
from servicekit.errors import Conflict, DomainError, FailedPrecondition
from services.rewards.coupons import handlers as svc
from services.rewards.coupons import repository as crepo
from services.rewards.coupons.domain import Limits, Status
from services.rewards.members import record_erasure

from ..harness import Infra
from .test_rewards_coupon_issue_rpc import MJ, T0, make_template, written


@pytest.fixture(scope="module")
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(infra.database_url, 1, 40)
    yield p
    await p.close()


@pytest.fixture
def db(pool: asyncpg.Pool) -> Database:
    return Database(pool, "rewards", "rewards")


async def issue(
    db: Database,
    templates: svc.TemplateCache,
    template_id: str,
    member: uuid.UUID,
    key: str | None = None,
    now: datetime = T0,
) -> svc.IssuedCoupon:
    return await svc.issue_coupon_now(
        db,
        templates,
        template_id=template_id,
        member_id=member,
        reason="operator_grant",
        issue_key=key or uuid.uuid4().hex,
        now=now,
    )


async def warm(db: Database, templates: svc.TemplateCache, template_id: str) -> None:
    """One issue through the transactional path, which caches the template."""
    await issue(db, templates, template_id, uuid.uuid4())
    assert templates[template_id].row_xmin is not None


async def test_a_cached_clean_issue_is_one_statement(pool: asyncpg.Pool, infra: Infra) -> None:
    template_id = await make_template(
        pool, Limits(total_stock=10, per_member_limit=1, daily_budget=10, stock_shards=1)
    )
    templates = svc.TemplateCache()
    statements: list[str] = []

    def log(record: asyncpg.connection.LoggedQuery) -> None:
        statements.append(record.query)

    # One connection, so the logger sees every statement of the issue.
    one = await create_pool(infra.database_url, 1, 1)
    single = Database(one, "rewards", "rewards")
    try:
        await warm(single, templates, template_id)
        async with one.acquire() as conn:
            conn.add_query_logger(log)
        coupon = await issue(single, templates, template_id, uuid.uuid4())
        async with one.acquire() as conn:
            conn.remove_query_logger(log)
    finally:
        await one.close()
    assert statements == [crepo.ONE_STATEMENT_ISSUE_SQL]
    assert not coupon.replayed
    assert await written(pool, infra, template_id) == (2, 8, 2, 2)


async def test_stock_of_100_over_16_shards_claimed_by_500_issues_exactly_100(
    pool: asyncpg.Pool, db: Database, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=100, stock_shards=16))
    templates = svc.TemplateCache()
    await warm(db, templates, template_id)
    results = await asyncio.gather(
        *(issue(db, templates, template_id, uuid.uuid4()) for _ in range(500)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, svc.IssuedCoupon)]
    refused = [r for r in results if isinstance(r, DomainError)]
    assert len(won) + len(refused) == 500, [r for r in results if isinstance(r, Exception)][:3]
    assert len(won) == 99
    assert {e.code for e in refused} == {"OUT_OF_STOCK"}
    # No coupon, count or event of a refused claim survives.
    assert await written(pool, infra, template_id) == (100, 0, 0, 100)


async def test_member_limit_refusals_in_one_statement_leave_nothing(
    pool: asyncpg.Pool, db: Database, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=50, per_member_limit=2))
    templates = svc.TemplateCache()
    await warm(db, templates, template_id)
    member = uuid.uuid4()
    results = await asyncio.gather(
        *(issue(db, templates, template_id, member) for _ in range(32)), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, svc.IssuedCoupon)]
    assert len(won) == 2
    assert {r.code for r in results if isinstance(r, DomainError)} == {"MEMBER_LIMIT_REACHED"}
    # The warm-up's coupon and the member's two.
    assert await written(pool, infra, template_id) == (3, 47, 3, 3)


async def test_daily_budget_refusal_leaves_nothing(
    pool: asyncpg.Pool, db: Database, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=50, daily_budget=3))
    templates = svc.TemplateCache()
    await warm(db, templates, template_id)
    results = await asyncio.gather(
        *(issue(db, templates, template_id, uuid.uuid4()) for _ in range(10)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, svc.IssuedCoupon) for r in results) == 2
    assert {r.code for r in results if isinstance(r, DomainError)} == {"DAILY_BUDGET_EXHAUSTED"}
    assert await written(pool, infra, template_id) == (3, 47, 0, 3)


async def test_retries_replay_and_a_reused_key_writes_nothing(
    pool: asyncpg.Pool, db: Database, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=5, per_member_limit=1))
    templates = svc.TemplateCache()
    await warm(db, templates, template_id)
    member, key = uuid.uuid4(), f"k-{template_id}"
    first = await issue(db, templates, template_id, member, key)
    again = await asyncio.gather(
        *(issue(db, templates, template_id, member, key) for _ in range(5))
    )
    assert {(c.coupon_id, c.replayed) for c in again} == {(first.coupon_id, True)}
    with pytest.raises(Conflict) as err:
        await issue(db, templates, template_id, uuid.uuid4(), key)
    assert err.value.code == "IDEMPOTENCY_KEY_REUSED"
    assert await written(pool, infra, template_id) == (2, 3, 2, 2)


async def test_a_template_changed_after_caching_is_read_again(
    pool: asyncpg.Pool, db: Database, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=20))
    templates = svc.TemplateCache()
    await warm(db, templates, template_id)
    async with pool.acquire() as conn, conn.transaction():
        await svc.set_template_status(conn, template_id, Status.PAUSED)
    with pytest.raises(FailedPrecondition) as err:
        await issue(db, templates, template_id, uuid.uuid4())
    assert err.value.code == "TEMPLATE_PAUSED"
    async with pool.acquire() as conn, conn.transaction():
        await svc.set_template_status(conn, template_id, Status.ACTIVE)
        await svc.new_template_version(conn, template_id, MJ, "test")
    coupon = await issue(db, templates, template_id, uuid.uuid4())
    assert coupon.template_version == 2
    # A per-member limit added since: the cached row had none.
    async with pool.acquire() as conn, conn.transaction():
        await svc.set_template_limits(conn, template_id, Limits(total_stock=20, per_member_limit=1))
    member = uuid.uuid4()
    await issue(db, templates, template_id, member)
    with pytest.raises(FailedPrecondition) as err:
        await issue(db, templates, template_id, member)
    assert err.value.code == "MEMBER_LIMIT_REACHED"
    assert (await written(pool, infra, template_id))[:2] == (3, 17)


async def test_a_member_erased_after_caching_gets_nothing(
    pool: asyncpg.Pool, db: Database, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=5))
    templates = svc.TemplateCache()
    await warm(db, templates, template_id)
    member = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await record_erasure(conn, [member], T0)
    with pytest.raises(FailedPrecondition) as err:
        await issue(db, templates, template_id, member)
    assert err.value.code == "MEMBER_ERASED"
    assert await written(pool, infra, template_id) == (1, 4, 0, 1)
