"""Coupon issuance as the IssueCoupon RPC runs it: in its own transaction,
without a savepoint (`savepoint=False`), so a refusal must roll back the one
issue statement as a whole: the coupon, the counters, the stock shard and the
CouponIssued outbox row. Also: how many statements one issue costs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from servicekit.db import create_pool
from servicekit.errors import Conflict, DomainError
from servicekit.events import ENVELOPE_FIELD, stream_name
from services.rewards.coupons import handlers as svc
from services.rewards.coupons.domain import Kind, Limits, Status, Terms

from ..harness import Infra

T0 = datetime(2026, 3, 1, 4, 0, tzinfo=UTC)
MJ = Terms(
    name="满99减30", kind=Kind.AMOUNT_OFF, threshold_fen=9900, discount_fen=3000, valid_days=30
)


@pytest.fixture(scope="module")
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(infra.database_url, 1, 40)
    yield p
    await p.close()


async def make_template(pool: asyncpg.Pool, limits: Limits) -> str:
    template_id = f"R-{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as conn, conn.transaction():
        await svc.create_template(conn, template_id, MJ, limits, Status.ACTIVE, "test")
    return template_id


async def rpc_issue(
    pool: asyncpg.Pool, template_id: str, member: uuid.UUID, key: str | None = None
) -> svc.IssuedCoupon:
    """What the servicer does: its own transaction, no savepoint."""
    async with pool.acquire() as conn, conn.transaction():
        return await svc.issue_coupon(
            conn,
            template_id=template_id,
            member_id=member,
            reason="operator_grant",
            issue_key=key or uuid.uuid4().hex,
            now=T0,
            savepoint=False,
        )


async def written(
    pool: asyncpg.Pool, infra: Infra, template_id: str
) -> tuple[int, int | None, int, int]:
    """Coupons, stock left, member counts summed, CouponIssued events (still in
    the outbox, or already relayed to the stream when the service runs in this
    session; by event id, so one caught in between counts once)."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM rewards.coupons WHERE template_id = $1) AS coupons,"
        " (SELECT sum(remaining)::bigint FROM rewards.coupon_stock WHERE template_id = $1)"
        " AS remaining,"
        " (SELECT coalesce(sum(issued), 0)::bigint FROM rewards.coupon_member_counts"
        "  WHERE template_id = $1) AS counted",
        template_id,
    )
    assert row is not None
    return (
        row["coupons"],
        row["remaining"],
        row["counted"],
        len(await issued_events(pool, infra, template_id)),
    )


async def issued_events(
    pool: asyncpg.Pool, infra: Infra, template_id: str
) -> list[events_pb2.CouponIssued]:
    envelopes = [
        events_pb2.EventEnvelope.FromString(r["envelope"])
        for r in await pool.fetch(
            "SELECT envelope FROM rewards.outbox WHERE event_type = $1",
            events_pb2.CouponIssued.DESCRIPTOR.full_name,
        )
    ]
    redis = Redis.from_url(infra.redis_url)
    try:
        entries = await redis.xrange(stream_name(infra.namespace, "rewards"))
    finally:
        await redis.aclose()
    envelopes += [events_pb2.EventEnvelope.FromString(f[ENVELOPE_FIELD]) for _, f in entries]
    by_id = {}
    for envelope in envelopes:
        event = events_pb2.CouponIssued()
        if envelope.payload.Unpack(event) and event.template_id == template_id:
            by_id[envelope.event_id] = event
    return list(by_id.values())


async def test_stock_of_100_over_16_shards_claimed_by_500_issues_exactly_100(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    # 16 shards of 6 or 7: most claims near the end find their random shard
    # empty and must fall back to the others for the last units.
    template_id = await make_template(pool, Limits(total_stock=100, stock_shards=16))
    results = await asyncio.gather(
        *(rpc_issue(pool, template_id, uuid.uuid4()) for _ in range(500)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, svc.IssuedCoupon)]
    refused = [r for r in results if isinstance(r, DomainError)]
    assert len(won) + len(refused) == 500, [r for r in results if isinstance(r, Exception)][:3]
    assert len(won) == 100
    assert {e.code for e in refused} == {"OUT_OF_STOCK"}
    # No coupon, count or event of a refused claim survives.
    assert await written(pool, infra, template_id) == (100, 0, 0, 100)


async def test_member_limit_refusals_roll_back_stock_and_event(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=50, per_member_limit=2))
    member = uuid.uuid4()
    results = await asyncio.gather(
        *(rpc_issue(pool, template_id, member) for _ in range(32)), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, svc.IssuedCoupon)]
    assert len(won) == 2
    assert {r.code for r in results if isinstance(r, DomainError)} == {"MEMBER_LIMIT_REACHED"}
    assert await written(pool, infra, template_id) == (2, 48, 2, 2)


async def test_the_event_names_the_coupon_written(pool: asyncpg.Pool, infra: Infra) -> None:
    template_id = await make_template(pool, Limits(total_stock=5))
    coupon = await rpc_issue(pool, template_id, uuid.uuid4())
    events = await issued_events(pool, infra, template_id)
    assert len(events) == 1
    (event,) = events
    assert (event.coupon_id, event.code, event.member_id) == (
        coupon.coupon_id,
        coupon.code,
        coupon.member_id,
    )
    assert event.expires_at.ToDatetime(tzinfo=UTC) == coupon.expires_at


async def test_key_reused_with_another_body_writes_nothing(
    pool: asyncpg.Pool, infra: Infra
) -> None:
    template_id = await make_template(pool, Limits(total_stock=5, per_member_limit=1))
    first = await rpc_issue(pool, template_id, uuid.uuid4(), key=f"k-{template_id}")
    again = await rpc_issue(pool, template_id, uuid.UUID(first.member_id), key=f"k-{template_id}")
    assert (again.coupon_id, again.replayed) == (first.coupon_id, True)
    with pytest.raises(Conflict) as err:
        await rpc_issue(pool, template_id, uuid.uuid4(), key=f"k-{template_id}")
    assert err.value.code == "IDEMPOTENCY_KEY_REUSED"
    assert await written(pool, infra, template_id) == (1, 4, 1, 1)


async def test_one_issue_is_two_statements_inside_its_transaction(pool: asyncpg.Pool) -> None:
    template_id = await make_template(
        pool, Limits(total_stock=10, per_member_limit=1, daily_budget=10, stock_shards=1)
    )
    statements: list[str] = []

    def log(record: asyncpg.connection.LoggedQuery) -> None:
        statements.append(record.query)

    async with pool.acquire() as conn:
        conn.add_query_logger(log)
        async with conn.transaction():
            await svc.issue_coupon(
                conn,
                template_id=template_id,
                member_id=uuid.uuid4(),
                reason="operator_grant",
                issue_key=uuid.uuid4().hex,
                now=T0,
                savepoint=False,
            )
        conn.remove_query_logger(log)
    # BEGIN, the context read, the issue statement, COMMIT.
    assert len(statements) == 4, statements
