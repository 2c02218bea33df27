"""Idempotency field by field (issue 13, item 7) for the requests
test_rewards_money.py's `test_every_field_of_*` does not cover: a settled
order (CompleteOrder), a non-order earn action, a mall exchange and a referral
accept. Each is made once, replayed unchanged (the first answer comes back),
then replayed with one field changed at a time: every change that would alter
the effect is refused, and nothing more is written."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from servicekit.db import Database
from servicekit.errors import Conflict
from services.rewards.coupons.handlers import issue_coupon
from services.rewards.kernel import Channel, OrderLine, OrderRequest
from services.rewards.mall.domain import ItemKind, ItemSpec, ItemStatus
from services.rewards.mall.handlers import PointsMall
from services.rewards.orders.handlers import RewardsHandlers
from services.rewards.points.handlers import PointsLedger

from .test_rewards_referral import Programme

NOW = datetime(2026, 5, 1, 4, 0, tzinfo=UTC)


async def assert_key_reused(call: Any, field: str) -> None:
    with pytest.raises(Conflict) as reused:
        await call
    assert (reused.value.code, reused.value.field) == ("IDEMPOTENCY_KEY_REUSED", field)


async def count(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await conn.fetchval(sql, *args))


async def test_every_field_of_a_completed_order_is_in_its_idempotency_hash(
    db: Database, conn: asyncpg.Connection
) -> None:
    handlers = RewardsHandlers(points=PointsLedger())
    member, other = str(uuid.uuid4()), str(uuid.uuid4())

    async def complete(order: OrderRequest) -> Any:
        settlement = handlers.prepare_order(order, NOW)
        async with db.unit_of_work() as uow:
            return (await handlers.complete_order(uow, settlement, NOW)).unwrap()

    # Points to spend, so a changed points_to_redeem is a valid request.
    await complete(
        OrderRequest(
            store_id="SH001",
            pos_transaction_id=f"I-{uuid.uuid4().hex[:16]}",
            member_id=member,
            channel=Channel.STORE,
            paid_amount_fen=50_000,
            ordered_at=NOW - timedelta(hours=1),
        )
    )
    lines = (
        OrderLine("TEA-01", "大红袍", "tea", 1, 6_000),
        OrderLine("CUP-01", "杯子", "ware", 2, 4_000),
    )
    base = OrderRequest(
        store_id="SH001",
        pos_transaction_id=f"I-{uuid.uuid4().hex[:16]}",
        member_id=member,
        channel=Channel.STORE,
        paid_amount_fen=10_000,
        gross_amount_fen=10_000,
        lines=lines,
        ordered_at=NOW - timedelta(minutes=5),
    )
    first = await complete(base)
    again = await complete(base)
    assert again.replayed and again.order_id == first.order_id
    orders_before = await count(
        conn, "SELECT count(*) FROM rewards.orders WHERE member_id = $1", uuid.UUID(member)
    )
    changes: dict[str, Any] = {
        "member_id": other,
        "channel": Channel.MINI_PROGRAM,
        "paid_amount_fen": 9_000,
        "gross_amount_fen": 12_000,
        "lines": (lines[0], replace(lines[1], quantity=3)),
        "ordered_at": base.ordered_at + timedelta(minutes=1),  # type: ignore[operator]
        "points_to_redeem": 10,
        "coupon_codes": ("CPNFIELDTEST01",),
    }
    for field, value in changes.items():
        changed = replace(base, **{field: value})
        if field == "paid_amount_fen":  # the lines add up to what was paid
            changed = replace(changed, gross_amount_fen=0, lines=())
        await assert_key_reused(complete(changed), "pos_transaction_id")
    # The line order is part of the body too (a reordered body is another body).
    await assert_key_reused(complete(replace(base, lines=lines[::-1])), "pos_transaction_id")
    assert orders_before == await count(
        conn, "SELECT count(*) FROM rewards.orders WHERE member_id = $1", uuid.UUID(member)
    )
    assert (
        await count(
            conn, "SELECT count(*) FROM rewards.orders WHERE member_id = $1", uuid.UUID(other)
        )
        == 0
    )


async def test_every_field_of_an_earn_action_is_in_its_idempotency_hash(
    db: Database, conn: asyncpg.Connection
) -> None:
    points = PointsLedger()
    member, other = str(uuid.uuid4()), str(uuid.uuid4())
    key = f"act-{uuid.uuid4().hex}"

    async def action(member_id: str = member, name: str = "check_in") -> Any:
        async with db.unit_of_work() as uow:
            return (await points.record_action(uow, member_id, name, key, NOW)).unwrap()

    first = await action()
    assert (await action()).transaction_id == first.transaction_id
    for change in ({"member_id": other}, {"name": "review"}):
        await assert_key_reused(action(**change), "idempotency_key")
    # Nothing more was earned by anyone.
    earned = await conn.fetch(
        "SELECT member_id, count(*) AS n FROM rewards.points_transactions"
        " WHERE member_id = ANY($1::uuid[]) GROUP BY member_id",
        [uuid.UUID(member), uuid.UUID(other)],
    )
    assert {str(r["member_id"]): r["n"] for r in earned} == {member: 1}


async def test_every_field_of_a_mall_exchange_is_in_its_idempotency_hash(
    db: Database, conn: asyncpg.Connection
) -> None:
    points = PointsLedger()
    mall = PointsMall(points, issue_coupon)
    member, other = str(uuid.uuid4()), str(uuid.uuid4())
    async with db.unit_of_work() as uow:
        for m in (member, other):
            (await points.adjust(uow, m, 500, "ops", "credit", f"c-{m}", NOW)).unwrap()
        items = [
            (
                await mall.create_item(
                    uow,
                    ItemSpec(
                        name=f"Cup {n}",
                        kind=ItemKind.GOODS,
                        sku=f"CUP-{n}",
                        points_price=50,
                        cash_fen=0,
                        stock_total=10,
                        per_member_limit=0,
                    ),
                    ItemStatus.ACTIVE,
                )
            ).item_id
            for n in range(2)
        ]

    async def exchange(member_id: str = member, item_id: uuid.UUID = items[0]) -> Any:
        async with db.unit_of_work() as uow:
            return await mall.exchange(uow, member_id, item_id, "x-1", NOW)

    first = await exchange()
    again = await exchange()
    assert again.replayed and again.exchange_id == first.exchange_id
    await assert_key_reused(exchange(item_id=items[1]), "exchange_key")
    stock = await conn.fetch(
        "SELECT id, stock_remaining FROM rewards.mall_items WHERE id = ANY($1::uuid[])", items
    )
    assert {r["id"]: r["stock_remaining"] for r in stock} == {items[0]: 9, items[1]: 10}
    # The key is the member's own: another member's exchange with it is theirs.
    theirs = await exchange(member_id=other)
    assert not theirs.replayed and theirs.exchange_id != first.exchange_id


async def test_a_referral_accept_is_linked_once_whatever_a_repeat_carries(
    db: Database, conn: asyncpg.Connection
) -> None:
    """A referral has no idempotency key: the invitee is linked once (unique
    invitee) and what decides the effect is whose code it is. Another inviter's
    code is refused (ALREADY_REFERRED); a repeat of the same code with another
    device, registration time or identifier hashes replays the referral and
    writes nothing (its evidence was judged at the first accept)."""
    programme = Programme(db)
    inviter, stranger, invitee = (str(uuid.uuid4()) for _ in range(3))
    code, other_code = await programme.code(inviter), await programme.code(stranger)
    first = await programme.accept(invitee, code, device="dev-1")

    async def written() -> tuple[int, int]:
        referrals = await count(
            conn,
            "SELECT count(*) FROM rewards.referrals WHERE invitee_id = $1",
            uuid.UUID(invitee),
        )
        prints = await count(
            conn,
            "SELECT count(*) FROM rewards.referral_fingerprints WHERE member_id = $1",
            uuid.UUID(invitee),
        )
        return referrals, prints

    before = await written()
    assert before == (1, 1)
    with pytest.raises(Conflict) as other:
        await programme.accept(invitee, other_code, device="dev-1")
    assert (other.value.code, other.value.field) == ("ALREADY_REFERRED", "invite_code")
    for change in (
        {"device": "dev-2"},
        {"registered": NOW - timedelta(days=30)},
        {"now": NOW + timedelta(days=10)},
    ):
        again = await programme.accept(invitee, code, **({"device": "dev-1"} | change))
        assert again.replayed and again.referral_id == first.referral_id
    async with db.unit_of_work() as uow:
        hashed = await programme.referrals.accept(
            uow,
            invitee,
            code,
            invitee_registered_at=NOW - timedelta(minutes=3),
            device_id="dev-1",
            identifier_hashes=["a" * 64],
            now=NOW,
        )
    assert hashed.replayed and hashed.referral_id == first.referral_id
    assert await written() == before
