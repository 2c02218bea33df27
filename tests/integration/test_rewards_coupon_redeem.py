"""CompleteOrder with several coupons, through the rewards gRPC API against
real PostgreSQL: the coupons are used by one statement (coupon rows, their
CouponRedeemed outbox rows and the order's discount), so either all of them
are used, each with its share and its event, or the order is refused and
none is."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TypeAlias

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import error_info
from servicekit.events import ENVELOPE_FIELD, stream_name
from services.rewards.seed import seed_demo

from ..harness import Infra

Stub: TypeAlias = rewards_pb2_grpc.RewardsServiceStub
LINES = [
    rewards_pb2.OrderLine(
        sku="MILK-TEA", name="奶茶", category="tea", quantity=2, paid_amount_fen=3600
    ),
    rewards_pb2.OrderLine(
        sku="FRUIT-TEA", name="果茶", category="tea", quantity=3, paid_amount_fen=6600
    ),
]  # gross 10200 fen


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    # The demo brand: store SH001.
    await seed_demo(conn)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
def stub(rewards_channel: grpc.aio.Channel, db: asyncpg.Connection) -> Stub:
    return rewards_pb2_grpc.RewardsServiceStub(rewards_channel)


async def stackable_coupon(stub: Stub, member: str, threshold_fen: int, discount_fen: int) -> str:
    template_id = f"S-{uuid.uuid4().hex[:10]}"
    await stub.CreateCouponTemplate(
        rewards_pb2.CreateCouponTemplateRequest(
            template_id=template_id,
            terms=rewards_pb2.CouponTerms(
                name=f"满{threshold_fen // 100}减{discount_fen // 100}",
                kind="amount_off",
                threshold_fen=threshold_fen,
                discount_fen=discount_fen,
                valid_days=30,
                stackable=True,
            ),
            limits=rewards_pb2.CouponLimits(),
            status="active",
        )
    )
    issued = await stub.IssueCoupon(
        rewards_pb2.IssueCouponRequest(
            template_id=template_id,
            member_id=member,
            reason="operator_grant",
            issue_key=uuid.uuid4().hex,
        )
    )
    return str(issued.code)


def order(member: str, codes: list[str], paid: int) -> rewards_pb2.CompleteOrderRequest:
    return rewards_pb2.CompleteOrderRequest(
        store_id="SH001",
        pos_transaction_id=f"ST-{uuid.uuid4().hex[:12]}",
        member_id=member,
        channel=common_pb2.CHANNEL_STORE,
        paid_amount_fen=paid,
        gross_amount_fen=10200,
        lines=LINES,
        coupon_codes=codes,
    )


async def redeemed_events(infra: Infra, db: asyncpg.Connection, order_id: str) -> dict[str, int]:
    """CouponRedeemed of an order, coupon id -> discount: still in the outbox or
    already relayed to the stream (by event id: one caught in between counts once)."""
    envelopes = [
        events_pb2.EventEnvelope.FromString(r["envelope"])
        for r in await db.fetch(
            "SELECT envelope FROM rewards.outbox WHERE event_type = $1",
            events_pb2.CouponRedeemed.DESCRIPTOR.full_name,
        )
    ]
    redis = Redis.from_url(infra.redis_url)
    try:
        entries = await redis.xrange(stream_name(infra.namespace, "rewards"))
    finally:
        await redis.aclose()
    envelopes += [events_pb2.EventEnvelope.FromString(f[ENVELOPE_FIELD]) for _, f in entries]
    by_event: dict[str, tuple[str, int]] = {}
    for envelope in envelopes:
        event = events_pb2.CouponRedeemed()
        if envelope.payload.Unpack(event) and event.order_id == order_id:
            by_event[envelope.event_id] = (event.coupon_id, event.discount_fen)
    assert len(by_event) == len(dict(by_event.values())), "one event per coupon"
    return dict(by_event.values())


async def test_two_stacked_coupons_are_used_together_each_with_its_event(
    stub: Stub, db: asyncpg.Connection, infra: Infra
) -> None:
    member = str(uuid.uuid4())
    big = await stackable_coupon(stub, member, 9900, 3000)
    small = await stackable_coupon(stub, member, 5000, 1000)
    done = await stub.CompleteOrder(order(member, [big, small], 10200 - 4000))
    assert done.coupon_discount_fen == 4000
    rows = await db.fetch(
        "SELECT id, code, status, order_id, discount_fen FROM rewards.coupons"
        " WHERE code = ANY($1::text[])",
        [big, small],
    )
    assert {(r["code"], r["status"], str(r["order_id"]), r["discount_fen"]) for r in rows} == {
        (big, "used", done.order_id, 3000),
        (small, "used", done.order_id, 1000),
    }
    assert (
        await db.fetchval(
            "SELECT coupon_discount_fen FROM rewards.orders WHERE id = $1",
            uuid.UUID(done.order_id),
        )
        == 4000
    )
    assert await redeemed_events(infra, db, done.order_id) == {
        str(r["id"]): r["discount_fen"] for r in rows
    }


async def test_one_coupon_already_used_refuses_the_order_and_uses_neither(
    stub: Stub, db: asyncpg.Connection
) -> None:
    member = str(uuid.uuid4())
    big = await stackable_coupon(stub, member, 9900, 3000)
    small = await stackable_coupon(stub, member, 5000, 1000)
    first = await stub.CompleteOrder(order(member, [small], 10200 - 1000))
    assert first.coupon_discount_fen == 1000
    refused = order(member, [big, small], 10200 - 4000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CompleteOrder(refused)
    assert caught.value.code() is grpc.StatusCode.ABORTED
    assert error_info(caught.value) == ("COUPON_ALREADY_USED", "coupon_codes[1]")
    assert await db.fetchval("SELECT status FROM rewards.coupons WHERE code = $1", big) == (
        "available"
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.orders WHERE store_id = 'SH001'"
            " AND pos_transaction_id = $1 AND status = 'settled'",
            refused.pos_transaction_id,
        )
        == 0
    )
