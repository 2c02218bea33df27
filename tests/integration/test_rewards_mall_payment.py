"""Points-plus-cash mall exchanges against real PostgreSQL (issue 13, item 2):
reserve (points held, stock and count taken), confirm with the payment
reference (points spent, coupon issued, once per reference), time-out release
(points, stock and count back), concurrency of confirmations and releases, and
the operator's reversal of a completed exchange (once). The ledger audit runs
over every member at the end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from servicekit.db import Database
from servicekit.errors import Conflict, DomainError, FailedPrecondition, NotFound
from services.rewards.coupons.handlers import issue_coupon
from services.rewards.mall.domain import ItemKind, ItemSpec, ItemStatus
from services.rewards.mall.handlers import Exchange, PointsMall
from services.rewards.mall.jobs import release_unpaid
from services.rewards.points.audit import audit_ledger
from services.rewards.points.handlers import PointsLedger

NOW = datetime(2026, 5, 1, 4, 0, tzinfo=UTC)
TTL = timedelta(minutes=15)
MEMBERS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
async def audited(conn: asyncpg.Connection) -> AsyncIterator[None]:
    yield
    report = await audit_ledger(conn, MEMBERS)
    assert report.ok, report


class Mall:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.points = PointsLedger()
        self.mall = PointsMall(self.points, issue_coupon, payment_ttl=TTL)

    async def member(self, points: int) -> str:
        member = str(uuid.uuid4())
        MEMBERS.append(member)
        async with self.db.unit_of_work() as uow:
            (
                await self.points.adjust(uow, member, points, "ops", "credit", f"c-{member}", NOW)
            ).unwrap()
        return member

    async def item(self, **overrides: Any) -> uuid.UUID:
        fields: dict[str, Any] = {
            "name": "满99减30 + ¥9.90",
            "kind": ItemKind.COUPON,
            "coupon_template_id": "MJ99-30",
            "points_price": 50,
            "cash_fen": 990,
            "stock_total": 10,
            "per_member_limit": 1,
        } | overrides
        async with self.db.unit_of_work() as uow:
            row = await self.mall.create_item(uow, ItemSpec(**fields), ItemStatus.ACTIVE)
        return row.item_id

    async def exchange(self, member: str, item: uuid.UUID, key: str = "k") -> Exchange:
        async with self.db.unit_of_work() as uow:
            return await self.mall.exchange(uow, member, item, key, NOW)

    async def confirm(
        self,
        exchange: Exchange,
        reference: str,
        at: datetime = NOW,
        member: str = "",
        paid: int | None = None,
    ) -> Exchange:
        async with self.db.unit_of_work() as uow:
            return await self.mall.confirm_payment(
                uow, exchange.exchange_id, reference, at, member_id=member, paid_amount_fen=paid
            )

    async def reverse(self, exchange: Exchange, at: datetime = NOW) -> Exchange:
        async with self.db.unit_of_work() as uow:
            return await self.mall.reverse(uow, exchange.exchange_id, "ops-li", "returned", at)


async def points_of(conn: asyncpg.Connection, member: str) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT available, held FROM rewards.points_balances WHERE member_id = $1",
        uuid.UUID(member),
    )
    assert row is not None
    return row["available"], row["held"]


async def stock_and_count(conn: asyncpg.Connection, item: uuid.UUID) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT stock_remaining, (SELECT coalesce(sum(exchanged), 0) FROM"
        " rewards.mall_member_counts WHERE item_id = $1) AS counted"
        " FROM rewards.mall_items WHERE id = $1",
        item,
    )
    assert row is not None
    return row["stock_remaining"], int(row["counted"])


async def fulfilment(conn: asyncpg.Connection, exchange: Exchange) -> str:
    value = await conn.fetchval(
        "SELECT fulfilment FROM rewards.mall_exchanges WHERE id = $1",
        uuid.UUID(exchange.exchange_id),
    )
    return str(value)


async def coupons_of(conn: asyncpg.Connection, member: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT status FROM rewards.coupons WHERE member_id = $1", uuid.UUID(member)
    )
    return [r["status"] for r in rows]


async def test_a_cash_part_reserves_then_delivers_on_the_confirmed_payment(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    member, item = await mall.member(80), await mall.item()
    reserved = await mall.exchange(member, item)
    # Reserved: points held, stock and count taken, nothing delivered yet.
    assert reserved.fulfilment == "awaiting_payment" and not reserved.coupon_id
    assert reserved.payment_due_at == NOW + TTL and reserved.hold_id
    assert await points_of(conn, member) == (30, 50)
    assert await stock_and_count(conn, item) == (9, 1)
    assert await coupons_of(conn, member) == []
    # A retry of the exchange replays the reservation.
    assert (await mall.exchange(member, item)).exchange_id == reserved.exchange_id
    paid = await mall.confirm(reserved, "wxpay-1", NOW + timedelta(minutes=5), member)
    assert paid.fulfilment == "issued" and paid.coupon_id and paid.payment_reference == "wxpay-1"
    assert await points_of(conn, member) == (30, 0)
    assert await coupons_of(conn, member) == ["available"]
    # The same notification again replays; another reference is a conflict.
    again = await mall.confirm(reserved, "wxpay-1", NOW + timedelta(minutes=6))
    assert again.replayed and again.coupon_id == paid.coupon_id
    with pytest.raises(Conflict) as other:
        await mall.confirm(reserved, "wxpay-2")
    assert (other.value.code, other.value.field) == (
        "PAYMENT_ALREADY_CONFIRMED",
        "payment_reference",
    )
    # One payment pays one exchange.
    second = await mall.exchange(await mall.member(60), item, "k2")
    with pytest.raises(Conflict) as used:
        await mall.confirm(second, "wxpay-1")
    assert used.value.code == "PAYMENT_REFERENCE_USED"
    # Another member's exchange is not found for this member.
    with pytest.raises(NotFound) as foreign:
        await mall.confirm(second, "wxpay-3", member=member)
    assert foreign.value.code == "UNKNOWN_MALL_EXCHANGE"
    assert await coupons_of(conn, member) == ["available"]


async def payment_reference_of(conn: asyncpg.Connection, exchange: Exchange) -> str | None:
    value = await conn.fetchval(
        "SELECT payment_reference FROM rewards.mall_exchanges WHERE id = $1",
        uuid.UUID(exchange.exchange_id),
    )
    return None if value is None else str(value)


async def test_a_payment_of_another_amount_is_refused_and_changes_nothing(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    member, item = await mall.member(80), await mall.item()  # 50 points + 990 fen
    reserved = await mall.exchange(member, item)
    at = NOW + timedelta(minutes=1)
    for wrong in (989, 991, 0, 99_000):
        with pytest.raises(FailedPrecondition) as mismatch:
            await mall.confirm(reserved, f"wxpay-short-{wrong}", at, member, paid=wrong)
        assert (mismatch.value.code, mismatch.value.field) == (
            "PAYMENT_AMOUNT_MISMATCH",
            "paid_amount_fen",
        )
        # Nothing changed: still awaiting payment, points held, stock and count
        # taken, no coupon, the reference not kept (it may pay another exchange).
        assert await fulfilment(conn, reserved) == "awaiting_payment"
        assert await payment_reference_of(conn, reserved) is None
        assert await points_of(conn, member) == (30, 50)
        assert await stock_and_count(conn, item) == (9, 1)
        assert await coupons_of(conn, member) == []
    # The right amount delivers; a replay with another amount is refused too
    # (and leaves the delivery as it was), with the right one or none it replays.
    paid = await mall.confirm(reserved, "wxpay-exact", at, member, paid=990)
    assert paid.fulfilment == "issued" and paid.payment_reference == "wxpay-exact"
    with pytest.raises(FailedPrecondition) as replayed_short:
        await mall.confirm(reserved, "wxpay-exact", at, member, paid=1)
    assert replayed_short.value.code == "PAYMENT_AMOUNT_MISMATCH"
    assert (await mall.confirm(reserved, "wxpay-exact", at, member, paid=990)).replayed
    assert (await mall.confirm(reserved, "wxpay-exact", at, member)).replayed
    assert await points_of(conn, member) == (30, 0)
    assert await coupons_of(conn, member) == ["available"]
    # A refused reference was never stored: it can pay another exchange.
    other_member = await mall.member(60)
    other = await mall.exchange(other_member, item, "k-other")
    done = await mall.confirm(other, "wxpay-short-989", at, other_member, paid=990)
    assert done.fulfilment == "issued"


async def test_an_unpaid_exchange_is_released_at_its_deadline_once(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    member, item = (
        await mall.member(80),
        await mall.item(kind=ItemKind.GOODS, sku="CUP-1", coupon_template_id=""),
    )
    reserved = await mall.exchange(member, item)
    # (Other tests' reservations share the database: this one's state is checked.)
    await release_unpaid(db, mall.mall, NOW + TTL - timedelta(seconds=1))
    assert await fulfilment(conn, reserved) == "awaiting_payment"
    late = NOW + TTL
    assert await release_unpaid(db, mall.mall, late) >= 1
    assert await fulfilment(conn, reserved) == "released"
    assert await points_of(conn, member) == (80, 0)
    assert await stock_and_count(conn, item) == (10, 0)
    await release_unpaid(db, mall.mall, late + timedelta(hours=1))
    assert await points_of(conn, member) == (80, 0)
    assert await stock_and_count(conn, item) == (10, 0)
    with pytest.raises(FailedPrecondition) as timed_out:
        await mall.confirm(reserved, "wxpay-late", late + timedelta(minutes=1))
    assert timed_out.value.code == "PAYMENT_TIMED_OUT"
    # The per-member limit is free again: the member may exchange anew.
    anew = await mall.exchange(member, item, "k-again")
    assert anew.fulfilment == "awaiting_payment"
    # A payment arriving after the deadline but before the job is refused too.
    with pytest.raises(FailedPrecondition) as due:
        await mall.confirm(anew, "wxpay-4", NOW + TTL)
    assert due.value.code == "PAYMENT_TIMED_OUT"


async def test_concurrent_confirmations_and_the_release_settle_once(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    item = await mall.item(stock_total=40, per_member_limit=0)
    # 16 notifications of one payment at once: one delivery, the rest replay.
    member = await mall.member(50)
    reserved = await mall.exchange(member, item)
    results = await asyncio.gather(
        *(mall.confirm(reserved, "wxpay-same") for _ in range(16)), return_exceptions=True
    )
    assert all(isinstance(r, Exchange) for r in results), results
    assert sum(not r.replayed for r in results if isinstance(r, Exchange)) == 1
    assert await coupons_of(conn, member) == ["available"]
    # Different references at once: exactly one wins.
    member2 = await mall.member(50)
    reserved2 = await mall.exchange(member2, item)
    results = await asyncio.gather(
        *(mall.confirm(reserved2, f"wxpay-{n}-{member2}") for n in range(8)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Exchange) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, Exchange))
    # A confirmation racing the release at the deadline: one of the two.
    member3 = await mall.member(50)
    reserved3 = await mall.exchange(member3, item)
    at = NOW + TTL - timedelta(microseconds=1)
    confirmed, _ = await asyncio.gather(
        mall.confirm(reserved3, f"wxpay-race-{member3}", at),
        release_unpaid(db, mall.mall, NOW + TTL),
        return_exceptions=True,
    )
    if isinstance(confirmed, Exchange):
        assert await fulfilment(conn, reserved3) == "issued"
        assert await points_of(conn, member3) == (0, 0)
    else:
        assert isinstance(confirmed, DomainError)
        assert await fulfilment(conn, reserved3) == "released"
        assert await points_of(conn, member3) == (50, 0)
    stock, counted = await stock_and_count(conn, item)
    assert stock + counted == 40


async def test_an_operator_reverses_a_completed_exchange_once(
    db: Database, conn: asyncpg.Connection
) -> None:
    mall = Mall(db)
    member, item = await mall.member(80), await mall.item()
    reserved = await mall.exchange(member, item)
    with pytest.raises(FailedPrecondition) as early:
        await mall.reverse(reserved)
    assert early.value.code == "EXCHANGE_NOT_COMPLETED"
    await mall.confirm(reserved, f"wxpay-r-{member}")
    reversed_ = await mall.reverse(reserved)
    assert reversed_.fulfilment == "reversed" and reversed_.reversed_by == "ops-li"
    assert await points_of(conn, member) == (80, 0)
    assert await stock_and_count(conn, item) == (10, 0)
    assert await coupons_of(conn, member) == ["revoked"]
    again = await mall.reverse(reserved)
    assert again.replayed and await points_of(conn, member) == (80, 0)
    assert await stock_and_count(conn, item) == (10, 0)
    # A coupon in use (locked at a till) cannot be taken back: refused, nothing moves.
    other = await mall.member(80)
    done = await mall.exchange(other, item, "k-used")
    paid = await mall.confirm(done, f"wxpay-u-{other}")
    await conn.execute(
        "UPDATE rewards.coupons SET status = 'locked', locked_until = $2 WHERE id = $1",
        uuid.UUID(paid.coupon_id),
        NOW + timedelta(hours=1),
    )
    with pytest.raises(FailedPrecondition) as used:
        await mall.reverse(done)
    assert used.value.code == "COUPON_NOT_REVOCABLE"
    assert await points_of(conn, other) == (30, 0)
