"""Property: any sequence of exchanges (with repeated keys), credits, stock
resizes and pauses on one mall item agrees with a plain model of the rules —
every exchange succeeds or is refused exactly when the model says, with its
code — and after every step the stock sold, the per-member counts, the
exchanges and the points debited all agree, and the ledger audit is clean."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.errors import DomainError
from services.rewards.mall.domain import ItemKind, ItemSpec, ItemStatus
from services.rewards.mall.handlers import PointsMall
from services.rewards.points.audit import audit_ledger
from services.rewards.points.handlers import PointsLedger

from ..harness import Infra

NOW = datetime(2026, 7, 1, 4, 0, tzinfo=UTC)
PRICE = 30
LIMIT = 2


async def no_coupons(conn: object, **kwargs: object) -> object:
    raise AssertionError("a goods item issues no coupon")


@pytest.fixture(scope="module")
async def env(infra: Infra) -> AsyncIterator[tuple[Database, asyncpg.Connection]]:
    pool = await create_pool(infra.database_url, 1, 4)
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield Database(pool, "rewards", "rewards"), conn
    await conn.close()
    await pool.close()


@dataclass
class Model:
    total: int
    status: ItemStatus = ItemStatus.ACTIVE
    balance: list[int] = field(default_factory=lambda: [0, 0, 0])
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    keys: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def sold(self) -> int:
        return sum(self.counts)

    def refusal(self, member: int) -> str | None:
        if self.status is not ItemStatus.ACTIVE:
            return "MALL_ITEM_NOT_ACTIVE"
        if self.sold >= self.total:
            return "MALL_ITEM_OUT_OF_STOCK"
        if self.counts[member] >= LIMIT:
            return "MALL_MEMBER_LIMIT_REACHED"
        if self.balance[member] < PRICE:
            return "INSUFFICIENT_POINTS"
        return None


op = st.one_of(
    st.tuples(st.just("exchange"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("credit"), st.integers(0, 2), st.integers(1, 80)),
    st.tuples(st.just("resize"), st.just(0), st.integers(0, 6)),
    st.tuples(st.just("toggle"), st.just(0), st.just(0)),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(total=st.integers(0, 5), ops=st.lists(op, min_size=1, max_size=20))
async def test_random_sequences_agree_with_the_model(
    env: tuple[Database, asyncpg.Connection], total: int, ops: list[tuple[str, int, int]]
) -> None:
    db, conn = env
    points = PointsLedger()
    mall = PointsMall(points, no_coupons)
    members = [str(uuid.uuid4()) for _ in range(3)]
    spec = ItemSpec("Cup", ItemKind.GOODS, PRICE, 0, total, LIMIT, sku="CUP-1")
    async with db.unit_of_work() as uow:
        item = (await mall.create_item(uow, spec, ItemStatus.ACTIVE)).item_id
    model = Model(total)

    for n, (kind, a, b) in enumerate(ops):
        if kind == "exchange":
            key = f"k{b}"
            replay = model.keys.get((a, b))
            expected = None if replay else model.refusal(a)
            try:
                async with db.unit_of_work() as uow:
                    done = await mall.exchange(uow, members[a], item, key, NOW)
            except DomainError as refused:
                assert refused.code == expected, (n, kind, model)
            else:
                assert expected is None, (n, kind, model, expected)
                assert done.replayed == (replay is not None)
                if replay:
                    assert done.exchange_id == replay
                else:
                    model.keys[(a, b)] = done.exchange_id
                    model.counts[a] += 1
                    model.balance[a] -= PRICE
        elif kind == "credit":
            async with db.unit_of_work() as uow:
                (
                    await points.adjust(uow, members[a], b, "ops", "prop", f"c-{uuid.uuid4()}", NOW)
                ).unwrap()
            model.balance[a] += b
        elif kind == "resize":
            try:
                async with db.unit_of_work() as uow:
                    await mall.update_item(
                        uow, item, ItemSpec(**{**spec.__dict__, "stock_total": b})
                    )
            except DomainError as refused:
                assert refused.code == "STOCK_BELOW_EXCHANGED" and b < model.sold
            else:
                assert b >= model.sold
                model.total = b
        else:
            wanted = ItemStatus.PAUSED if model.status is ItemStatus.ACTIVE else ItemStatus.ACTIVE
            async with db.unit_of_work() as uow:
                await mall.set_status(uow, item, wanted)
            model.status = wanted

        row = await conn.fetchrow(
            "SELECT stock_total, stock_remaining FROM rewards.mall_items WHERE id = $1", item
        )
        assert (row["stock_total"], row["stock_total"] - row["stock_remaining"]) == (
            model.total,
            model.sold,
        )
        for i, m in enumerate(members):
            member = uuid.UUID(m)
            exchanged = await conn.fetchval(
                "SELECT count(*) FROM rewards.mall_exchanges WHERE member_id = $1", member
            )
            counted = await conn.fetchval(
                "SELECT coalesce(sum(exchanged), 0) FROM rewards.mall_member_counts"
                " WHERE member_id = $1",
                member,
            )
            available = await conn.fetchval(
                "SELECT coalesce(max(available), 0) FROM rewards.points_balances"
                " WHERE member_id = $1",
                member,
            )
            assert (exchanged, counted, available) == (
                model.counts[i],
                model.counts[i],
                model.balance[i],
            )
    report = await audit_ledger(conn, members)
    assert report.ok, report
