"""Goods exchanges ship once, against real PostgreSQL: pending -> shipped with
carrier and tracking number; the same shipment again replays it, another is a
conflict, a coupon exchange never ships, bad input writes nothing; the
operators' queue lists pending goods across members."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import pytest

from servicekit.db import Database
from servicekit.errors import Conflict, DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.rewards.mall.domain import ItemKind
from services.rewards.mall.handlers import Exchange

from .test_rewards_mall import NOW, Mall, coupon_template, new_member


async def ship(mall: Mall, exchange_id: str, carrier: str, tracking: str) -> Exchange:
    async with mall.db.unit_of_work() as uow:
        return await mall.mall.ship(uow, exchange_id, carrier, tracking, NOW + timedelta(days=1))


async def goods_exchange(mall: Mall) -> Exchange:
    member = new_member()
    await mall.credit(member, 100)
    item = await mall.item(points_price=10)
    return await mall.exchange(member, item, f"goods-{uuid.uuid4().hex[:8]}")


async def test_goods_ship_once_and_a_retry_replays(db: Database) -> None:
    mall = Mall(db)
    bought = await goods_exchange(mall)
    assert (bought.fulfilment, bought.shipped_at) == ("pending", None)

    # Eight operators press "ship" at once with the same parcel: one shipment.
    results = await asyncio.gather(
        *(ship(mall, bought.exchange_id, "SF Express", "SF1234567890") for _ in range(8))
    )
    assert sum(not r.replayed for r in results) == 1
    assert {(r.fulfilment, r.carrier, r.tracking_number) for r in results} == {
        ("shipped", "SF Express", "SF1234567890")
    }
    assert all(r.shipped_at == NOW + timedelta(days=1) for r in results)

    with pytest.raises(Conflict) as caught:
        await ship(mall, bought.exchange_id, "SF Express", "SF0000000000")
    assert caught.value.code == "ALREADY_SHIPPED"


async def test_what_cannot_ship_is_refused_and_nothing_changes(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    member = new_member()
    await mall.credit(member, 100)
    template = await coupon_template(conn, stock=10)
    coupon_item = await mall.item(kind=ItemKind.COUPON, coupon_template_id=template, sku="")
    coupon = await mall.exchange(member, coupon_item, "coupon-1")
    goods = await goods_exchange(mall)
    cases: list[tuple[str, str, str, type[DomainError], str]] = [
        (coupon.exchange_id, "SF", "SF1", FailedPrecondition, "NOT_GOODS"),
        (str(uuid.uuid4()), "SF", "SF1", NotFound, "UNKNOWN_MALL_EXCHANGE"),
        ("not-a-uuid", "SF", "SF1", InvalidArgument, "INVALID_EXCHANGE_ID"),
        (goods.exchange_id, " ", "SF1", InvalidArgument, "CARRIER_REQUIRED"),
        (goods.exchange_id, "SF", "", InvalidArgument, "TRACKING_NUMBER_REQUIRED"),
        (goods.exchange_id, "SF", "SF\x001", InvalidArgument, "INVALID_TRACKING_NUMBER"),
    ]
    for exchange_id, carrier, tracking, error, code in cases:
        with pytest.raises(error) as caught:
            await ship(mall, exchange_id, carrier, tracking)
        assert caught.value.code == code
    states = await conn.fetch(
        "SELECT fulfilment, shipped_at FROM rewards.mall_exchanges WHERE id = ANY($1::uuid[])",
        [uuid.UUID(coupon.exchange_id), uuid.UUID(goods.exchange_id)],
    )
    assert sorted((r["fulfilment"], r["shipped_at"]) for r in states) == [
        ("issued", None),
        ("pending", None),
    ]


async def test_the_queue_lists_pending_goods_across_members(db: Database) -> None:
    mall = Mall(db)
    waiting = [await goods_exchange(mall) for _ in range(3)]
    await ship(mall, waiting[0].exchange_id, "SF Express", "SF-Q-1")
    async with db.unit_of_work() as uow:
        pending, _ = await mall.mall.exchanges_of(uow, "", None, 100, "pending")
        shipped, _ = await mall.mall.exchanges_of(uow, "", None, 100, "shipped")
        with pytest.raises(InvalidArgument) as caught:
            await mall.mall.exchanges_of(uow, "", None, 10, "lost")
    assert caught.value.code == "INVALID_FULFILMENT"
    pending_ids = {e.exchange_id for e in pending}
    assert {w.exchange_id for w in waiting[1:]} <= pending_ids
    assert waiting[0].exchange_id not in pending_ids
    assert waiting[0].exchange_id in {e.exchange_id for e in shipped}
    assert all(e.fulfilment == "pending" for e in pending)
