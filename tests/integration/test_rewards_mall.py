"""The points mall against real PostgreSQL: stock never oversold under 500
concurrent exchanges, points debited exactly once per exchange through the
ledger, per-member limits, idempotent retries, and all-or-nothing when the
item cannot be issued.

Use cases are called directly, one unit of work per call (as the servicer does).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from servicekit.db import Connection, Database
from servicekit.errors import Conflict, DomainError, FailedPrecondition, InvalidArgument, NotFound
from services.rewards.coupons import repository as coupon_repository
from services.rewards.coupons.domain import Kind, Limits, Status, Terms
from services.rewards.coupons.handlers import issue_coupon
from services.rewards.mall.domain import ItemKind, ItemSpec, ItemStatus
from services.rewards.mall.handlers import Exchange, PointsMall
from services.rewards.points.audit import audit_ledger
from services.rewards.points.handlers import PointsLedger

NOW = datetime(2026, 5, 1, 4, 0, tzinfo=UTC)


class Refusing:
    """A coupon issuer that refuses (a paused template, say) after the points
    were debited: the whole exchange must roll back."""

    calls = 0

    async def __call__(self, conn: Connection, **kwargs: Any) -> Any:
        self.calls += 1
        raise FailedPrecondition("template is paused", code="TEMPLATE_PAUSED", field="template_id")


class Issuing:
    """Stands in for coupon_service.issue_coupon where only the mall is under test."""

    async def __call__(self, conn: Connection, **kwargs: Any) -> Any:
        class Issued:
            coupon_id = str(uuid.uuid4())

        return Issued()


class Mall:
    def __init__(self, db: Database, issuer: Any = None) -> None:
        self.db = db
        self.points = PointsLedger()
        self.mall = PointsMall(self.points, issuer or Issuing())

    async def credit(self, member: str, points: int) -> None:
        async with self.db.unit_of_work() as uow:
            (
                await self.points.adjust(
                    uow, member, points, "ops", "test credit", f"credit-{uuid.uuid4()}", NOW
                )
            ).unwrap()

    async def item(self, **overrides: Any) -> uuid.UUID:
        fields: dict[str, Any] = {
            "name": "Tote bag",
            "kind": ItemKind.GOODS,
            "points_price": 50,
            "cash_fen": 0,
            "stock_total": 100,
            "per_member_limit": 0,
            "sku": "TOTE-01",
        } | overrides
        async with self.db.unit_of_work() as uow:
            row = await self.mall.create_item(uow, ItemSpec(**fields), ItemStatus.ACTIVE)
        return row.item_id

    async def exchange(self, member: str, item: uuid.UUID, key: str) -> Exchange:
        async with self.db.unit_of_work() as uow:
            return await self.mall.exchange(uow, member, item, key, NOW)


def new_member() -> str:
    return str(uuid.uuid4())


async def available(conn: asyncpg.Connection, member: str) -> int:
    value = await conn.fetchval(
        "SELECT available FROM rewards.points_balances WHERE member_id = $1", uuid.UUID(member)
    )
    return int(value or 0)


async def redeem_count(conn: asyncpg.Connection, member: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE member_id = $1 AND kind = 'redeem'",
            uuid.UUID(member),
        )
    )


async def test_500_concurrent_exchanges_of_stock_100_sell_exactly_100(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    item = await mall.item(stock_total=100, points_price=10)
    # 50 members, 10 tries each: per-member limits off, the stock is the only bound.
    members = [new_member() for _ in range(50)]
    for m in members:
        await mall.credit(m, 1_000)
    results = await asyncio.gather(
        *(mall.exchange(members[i % 50], item, f"k-{i}") for i in range(500)),
        return_exceptions=True,
    )
    done = [r for r in results if isinstance(r, Exchange)]
    refused = [r for r in results if isinstance(r, DomainError)]
    assert len(done) == 100 and len(refused) == 400, [
        r for r in results if not isinstance(r, Exchange | DomainError)
    ]
    assert {r.code for r in refused} == {"MALL_ITEM_OUT_OF_STOCK"}
    assert (
        await conn.fetchval("SELECT stock_remaining FROM rewards.mall_items WHERE id = $1", item)
        == 0
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM rewards.mall_exchanges WHERE item_id = $1", item)
        == 100
    )
    # Points debited exactly 100 times, 10 each, and the journal balances.
    debits = sum([await redeem_count(conn, m) for m in members])
    spent = sum([1_000 - await available(conn, m) for m in members])
    assert (debits, spent) == (100, 1_000)
    report = await audit_ledger(conn, members)
    assert report.ok, report


async def test_per_member_limit_holds_under_32_concurrent_exchanges(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall, member = Mall(db), new_member()
    item = await mall.item(per_member_limit=2, points_price=5)
    await mall.credit(member, 1_000)
    results = await asyncio.gather(
        *(mall.exchange(member, item, f"lim-{i}") for i in range(32)), return_exceptions=True
    )
    assert sum(isinstance(r, Exchange) for r in results) == 2
    assert {r.code for r in results if isinstance(r, DomainError)} == {"MALL_MEMBER_LIMIT_REACHED"}
    assert await available(conn, member) == 990
    assert await redeem_count(conn, member) == 2


async def test_retries_under_one_key_exchange_once(db: Database, conn: asyncpg.Connection) -> None:
    mall, member = Mall(db), new_member()
    item = await mall.item(points_price=30)
    await mall.credit(member, 100)
    results = await asyncio.gather(*(mall.exchange(member, item, "once") for _ in range(16)))
    assert len({r.exchange_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert await available(conn, member) == 70
    assert results[0].fulfilment == "pending" and results[0].sku == "TOTE-01"
    other = await mall.item(points_price=30)
    with pytest.raises(Conflict) as caught:
        await mall.exchange(member, other, "once")
    assert (caught.value.code, caught.value.field) == ("IDEMPOTENCY_KEY_REUSED", "exchange_key")


async def test_failed_issuance_leaves_points_stock_and_count_untouched(
    db: Database, conn: asyncpg.Connection
) -> None:
    issuer = Refusing()
    mall, member = Mall(db, issuer), new_member()
    item = await mall.item(
        kind=ItemKind.COUPON,
        sku="",
        coupon_template_id="MJ99-30",
        stock_total=5,
        per_member_limit=1,
    )
    await mall.credit(member, 500)
    for _ in range(2):  # the retry meets the same refusal, and still nothing is written
        with pytest.raises(FailedPrecondition) as caught:
            await mall.exchange(member, item, "fails")
        assert caught.value.code == "TEMPLATE_PAUSED"
    assert issuer.calls == 2
    assert await available(conn, member) == 500
    assert await redeem_count(conn, member) == 0
    row = await conn.fetchrow(
        "SELECT stock_remaining, (SELECT count(*) FROM rewards.mall_member_counts WHERE item_id = $1)"
        " AS counts, (SELECT count(*) FROM rewards.mall_exchanges WHERE item_id = $1) AS exchanges"
        " FROM rewards.mall_items WHERE id = $1",
        item,
    )
    assert tuple(row) == (5, 0, 0)


async def test_coupon_item_issues_the_coupon_in_the_exchange(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall, member = Mall(db), new_member()
    # Points only (a cash part takes two steps: test_rewards_mall_payment.py).
    item = await mall.item(kind=ItemKind.COUPON, sku="", coupon_template_id="MJ99-30")
    await mall.credit(member, 100)
    done = await mall.exchange(member, item, "coupon")
    assert done.fulfilment == "issued" and done.coupon_id and done.cash_fen == 0


async def test_not_enough_points_refuses_and_keeps_the_stock(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall, member = Mall(db), new_member()
    item = await mall.item(points_price=80, stock_total=1)
    await mall.credit(member, 50)
    with pytest.raises(FailedPrecondition) as caught:
        await mall.exchange(member, item, "poor")
    assert caught.value.code == "INSUFFICIENT_POINTS"
    assert (
        await conn.fetchval("SELECT stock_remaining FROM rewards.mall_items WHERE id = $1", item)
        == 1
    )
    # Once affordable, the same key goes through: the refusal wrote nothing.
    await mall.credit(member, 50)
    assert (await mall.exchange(member, item, "poor")).points == 80


async def test_items_off_sale_are_refused_with_their_reason(db: Database) -> None:
    mall, member = Mall(db), new_member()
    await mall.credit(member, 500)
    unknown = uuid.uuid4()
    with pytest.raises(NotFound) as nf:
        await mall.exchange(member, unknown, "x")
    assert nf.value.code == "UNKNOWN_MALL_ITEM"
    later = await mall.item(starts_at=NOW + timedelta(days=1))
    with pytest.raises(FailedPrecondition) as window:
        await mall.exchange(member, later, "w")
    assert window.value.code == "MALL_ITEM_OUT_OF_WINDOW"
    paused = await mall.item()
    async with db.unit_of_work() as uow:
        await mall.mall.set_status(uow, paused, ItemStatus.PAUSED)
    with pytest.raises(FailedPrecondition) as not_active:
        await mall.exchange(member, paused, "p")
    assert not_active.value.code == "MALL_ITEM_NOT_ACTIVE"
    async with db.unit_of_work() as uow:
        await mall.mall.set_status(uow, paused, ItemStatus.ENDED)
    with pytest.raises(FailedPrecondition) as final:
        async with db.unit_of_work() as uow:
            await mall.mall.set_status(uow, paused, ItemStatus.ACTIVE)
    assert final.value.code == "INVALID_STATUS_TRANSITION"


async def test_resizing_stock_keeps_what_was_sold(db: Database, conn: asyncpg.Connection) -> None:
    mall, member = Mall(db), new_member()
    item = await mall.item(stock_total=3, points_price=1)
    await mall.credit(member, 10)
    await mall.exchange(member, item, "a")
    await mall.exchange(member, item, "b")
    spec = ItemSpec("Tote bag", ItemKind.GOODS, 1, 0, 10, 0, sku="TOTE-01")
    async with db.unit_of_work() as uow:
        grown = await mall.mall.update_item(uow, item, spec)
    assert (grown.spec.stock_total, grown.stock_remaining) == (10, 8)
    with pytest.raises(FailedPrecondition) as caught:
        async with db.unit_of_work() as uow:
            await mall.mall.update_item(
                uow, item, spec.__class__(**{**spec.__dict__, "stock_total": 1})
            )
    assert (caught.value.code, caught.value.field) == ("STOCK_BELOW_EXCHANGED", "stock_total")


async def test_bad_items_are_refused_naming_the_field(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    before = await conn.fetchval("SELECT count(*) FROM rewards.mall_items")
    for overrides, code in [
        ({"points_price": 0}, "INVALID_POINTS_PRICE"),
        ({"stock_total": -1}, "INVALID_STOCK"),
        ({"sku": ""}, "SKU_REQUIRED"),
        ({"kind": ItemKind.COUPON}, "COUPON_TEMPLATE_ID_REQUIRED"),
        ({"name": " "}, "NAME_REQUIRED"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            await mall.item(**overrides)
        assert caught.value.code == code
    with pytest.raises(NotFound) as unknown:
        await mall.item(kind=ItemKind.COUPON, sku="", coupon_template_id="NO-SUCH-TEMPLATE")
    assert (unknown.value.code, unknown.value.field) == ("UNKNOWN_TEMPLATE", "coupon_template_id")
    assert await conn.fetchval("SELECT count(*) FROM rewards.mall_items") == before


async def coupon_template(conn: asyncpg.Connection, stock: int) -> str:
    """A template of coupon_service's own, with little stock."""
    template_id = f"MALL-{uuid.uuid4().hex[:8].upper()}"
    terms = Terms(
        name="¥20 off", kind=Kind.AMOUNT_OFF, threshold_fen=2000, discount_fen=2000, valid_days=30
    )
    await coupon_repository.seed_templates(conn, [(template_id, terms, Limits(total_stock=stock))])
    return template_id


async def test_real_coupon_issuance_bounds_the_exchange(
    db: Database, conn: asyncpg.Connection
) -> None:
    # The mall has 10 units but the coupon template only 3: the 7 exchanges
    # whose issuance is refused give their stock and points back.
    mall = Mall(db, issue_coupon)
    template = await coupon_template(conn, stock=3)
    item = await mall.item(
        kind=ItemKind.COUPON, sku="", coupon_template_id=template, stock_total=10, points_price=20
    )
    members = [new_member() for _ in range(10)]
    for m in members:
        await mall.credit(m, 100)
    results = await asyncio.gather(
        *(mall.exchange(m, item, "real") for m in members), return_exceptions=True
    )
    done = [r for r in results if isinstance(r, Exchange)]
    assert len(done) == 3, results
    assert {r.code for r in results if isinstance(r, DomainError)} == {"OUT_OF_STOCK"}
    owners = await conn.fetch(
        "SELECT member_id::text FROM rewards.coupons WHERE id = ANY($1::uuid[])",
        [uuid.UUID(d.coupon_id) for d in done],
    )
    assert {r["member_id"] for r in owners} == {d.member_id for d in done}
    assert (
        await conn.fetchval("SELECT stock_remaining FROM rewards.mall_items WHERE id = $1", item)
        == 7
    )
    balances = [await available(conn, m) for m in members]
    assert sorted(balances) == [80] * 3 + [100] * 7
    report = await audit_ledger(conn, members)
    assert report.ok, report


async def test_paused_template_refuses_the_exchange_and_keeps_the_points(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall, member = Mall(db, issue_coupon), new_member()
    template = await coupon_template(conn, stock=100)
    item = await mall.item(
        kind=ItemKind.COUPON, sku="", coupon_template_id=template, points_price=20
    )
    await mall.credit(member, 100)
    await coupon_repository.set_status(conn, template, Status.PAUSED)
    with pytest.raises(FailedPrecondition) as caught:
        await mall.exchange(member, item, "paused")
    assert (caught.value.code, caught.value.field) == ("TEMPLATE_PAUSED", "template_id")
    assert await available(conn, member) == 100
    assert await redeem_count(conn, member) == 0
    assert (
        await conn.fetchval("SELECT stock_remaining FROM rewards.mall_items WHERE id = $1", item)
        == 100
    )


async def test_an_item_repriced_mid_exchange_is_refused_and_nothing_is_spent(
    db: Database, conn: asyncpg.Connection
) -> None:
    # The price is read before the points are debited and the stock is taken
    # last, from that same version of the item only: an operator's change in
    # between refuses the exchange instead of selling at the old price.
    member = new_member()

    class RepricingIssuer:
        async def __call__(self, c: Connection, **kwargs: Any) -> Any:
            async with db.unit_of_work() as uow:  # the operator, in another transaction
                await Mall(db).mall.update_item(
                    uow,
                    item,
                    ItemSpec("20 off", ItemKind.COUPON, 99, 0, 5, 0, coupon_template_id="MJ99-30"),
                )
            return await Issuing()(c, **kwargs)

    mall = Mall(db, RepricingIssuer())
    item = await mall.item(
        kind=ItemKind.COUPON, sku="", coupon_template_id="MJ99-30", stock_total=5, points_price=10
    )
    await mall.credit(member, 100)
    with pytest.raises(Conflict) as caught:
        await mall.exchange(member, item, "repriced")
    assert (caught.value.code, caught.value.field) == ("MALL_ITEM_CHANGED", "item_id")
    assert await available(conn, member) == 100 and await redeem_count(conn, member) == 0
    row = await conn.fetchrow(
        "SELECT points_price, stock_remaining FROM rewards.mall_items WHERE id = $1", item
    )
    assert tuple(row) == (99, 5)
