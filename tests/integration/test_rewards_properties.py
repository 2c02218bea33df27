"""Property: any sequence of earn / redeem / hold / post / void / refund /
expire / merge / unmerge / adjust on two members keeps every ledger invariant
(audit after every step), never goes negative, and refuses cleanly."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.errors import DomainError
from services.rewards.orders.domain import Channel, OrderRequest
from services.rewards.orders.handlers import RewardsHandlers
from services.rewards.points.audit import audit_ledger
from services.rewards.points.domain import ExpiryKind, ExpiryPolicy, LedgerPolicy
from services.rewards.points.handlers import PointsLedger
from services.rewards.points.jobs import expire_due
from services.rewards.seed import seed_demo

from ..harness import Infra

T0 = datetime(2024, 1, 10, tzinfo=UTC)
POLICY = LedgerPolicy(expiry=ExpiryPolicy(ExpiryKind.DAYS, 20), pending_days=2)


@pytest.fixture(scope="module")
async def env(infra: Infra) -> AsyncIterator[tuple[Database, asyncpg.Connection]]:
    pool = await create_pool(infra.database_url, 1, 4)
    async with pool.acquire() as c:
        await seed_demo(c)
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield Database(pool, "rewards", "rewards"), conn
    await conn.close()
    await pool.close()


op = st.one_of(
    st.tuples(st.just("earn"), st.integers(0, 1), st.integers(0, 20_000)),
    st.tuples(st.just("redeem"), st.integers(0, 1), st.integers(1, 150)),
    st.tuples(st.just("hold"), st.integers(0, 1), st.integers(1, 150)),
    st.tuples(st.just("post"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("void"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("refund"), st.integers(0, 5), st.integers(1, 20_000)),
    st.tuples(st.just("adjust"), st.integers(0, 1), st.integers(-50, 50).filter(bool)),
    st.tuples(st.just("wait"), st.integers(1, 12), st.just(0)),
    st.tuples(st.just("expire"), st.just(0), st.just(0)),
    st.tuples(st.just("merge"), st.just(0), st.just(0)),
    st.tuples(st.just("unmerge"), st.just(0), st.just(0)),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(op, min_size=1, max_size=25))
async def test_random_sequences_keep_the_ledger_sound(
    env: tuple[Database, asyncpg.Connection], ops: list[tuple[str, int, int]]
) -> None:
    db, conn = env
    points = PointsLedger(POLICY)
    handlers = RewardsHandlers(points=points)
    members = [str(uuid.uuid4()), str(uuid.uuid4())]
    orders: list[str] = []
    holds: list[str] = []
    merges: list[str] = []
    now = T0

    async def run(method: Any, *args: Any) -> Any:
        """One unit of work; a refusal is fine (the audit says nothing leaked)."""
        try:
            async with db.unit_of_work() as uow:
                outcome = await method(uow, *args)
            return outcome.unwrap() if hasattr(outcome, "unwrap") else outcome
        except DomainError:
            return None

    for n, (kind, a, b) in enumerate(ops):
        key = f"{members[0]}-{n}"
        if kind == "earn":
            txn = f"P-{uuid.uuid4().hex[:16]}"
            settlement = handlers.prepare_order(
                OrderRequest(
                    "SH001",
                    txn,
                    members[a],
                    Channel.STORE,
                    b,
                    ordered_at=now,
                    # Some checkouts also spend points (refunds give them back).
                    points_to_redeem=(b // 7) % 40 if b % 3 == 0 else 0,
                )
            )
            await run(handlers.complete_order, settlement, now)
            orders.append(txn)
        elif kind == "redeem":
            await run(points.redeem, members[a], b, key, "", now)
        elif kind == "hold":
            held = await run(points.hold, members[a], b, key, "", now, timedelta(days=3))
            if held is not None:
                holds.append(held.hold_id)
        elif kind in ("post", "void") and holds:
            method = points.post_hold if kind == "post" else points.void_hold
            await run(method, holds[a % len(holds)], now)
        elif kind == "refund" and orders:
            await run(points.refund_order, "SH001", orders[a % len(orders)], key, b, now)
        elif kind == "adjust":
            await run(points.adjust, members[a], b, "op", "prop", key, now)
        elif kind == "wait":
            now += timedelta(days=a)
        elif kind == "expire":
            await expire_due(db, points, now)
        elif kind == "merge":
            merges.append(str(uuid.uuid4()))
            await run(points.merge, merges[-1], members[0], members[1], now)
        elif kind == "unmerge" and merges:
            await run(points.unmerge, merges.pop(), members[0], members[1], now)
        report = await audit_ledger(conn, members)
        assert report.ok, (n, kind, a, b, report)
