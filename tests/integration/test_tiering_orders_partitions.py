"""tiering.orders (the projection the tier metric and RFM read) partitioned by
month of ordered_at (migration 0011, services/tiering/partitions.py): an order
id stays unique across months through order_keys (an order replayed with a
time in another month is counted once); a refund finds its order in its
month, reading only that partition (EXPLAIN ANALYZE); the recompute's window
read skips the months before the window (EXPLAIN, generic plan); the
migration moves deployed rows in and back out; a partition is detached only
past TIERING_ORDERS_RETENTION_MONTHS and every stored programme's windows,
its keys leaving order_keys with it.

Order times are fixed (2031) where the clock does not matter; the detach
guard judges by the database's clock, so its partitions are placed relative
to it. The module has a database of its own."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from alembic import command

from servicekit.db import asyncpg_dsn
from servicekit.errors import DomainError
from servicekit.migrations import alembic_config
from servicekit.partitions import (
    add_months,
    create_month,
    detach_partition,
    ensure_partitions,
    list_partitions,
    month_start,
)
from servicekit.settings import ServiceSettings
from services.tiering import repository as repo
from services.tiering.batch import _aggregate_sql
from services.tiering.partitions import orders_table, partitioned_tables
from services.tiering.settings import TieringSettings

from ..harness import Infra, own_database
from .test_rewards_partitions import executed, explain_generic, relations, subplans_removed

ORDERS = orders_table()
JUNE_END = datetime(2031, 6, 30, 23, 59, 59, tzinfo=UTC)
JULY_START = datetime(2031, 7, 1, 0, 0, 1, tzinfo=UTC)


def utc(year: int, month: int, day: int = 1) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


@pytest.fixture(scope="module")
async def url(infra: Infra) -> AsyncIterator[str]:
    async with own_database(infra, "tiering", prefix="tier_orders") as u:
        yield u


@pytest.fixture
async def db(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    await ensure_partitions(conn, ORDERS, 3, clock=utc(2031, 5, 15))
    await conn.execute(
        "TRUNCATE tiering.orders, tiering.order_keys, tiering.member_spend,"
        " tiering.growth_ledger, tiering.tier_programmes"
    )
    try:
        yield conn
    finally:
        await conn.close()


async def record(conn: asyncpg.Connection, order: str, member: uuid.UUID, at: datetime) -> bool:
    return await repo.record_order(conn, order, member, at, 10_000, 100, at.date())


async def where(conn: asyncpg.Connection, order: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT tableoid::regclass::text AS part FROM tiering.orders WHERE order_id = $1", order
    )
    return [r["part"] for r in rows]


async def test_an_order_replayed_in_another_month_is_counted_once(db: asyncpg.Connection) -> None:
    member, order = uuid.uuid4(), f"o-{uuid.uuid4()}"
    assert await record(db, order, member, JUNE_END)
    # The same order again, its time corrected past midnight of the 1st: its
    # row would go to July, whose own unique index cannot see June's.
    assert not await record(db, order, member, JULY_START)
    assert not await record(db, order, member, JUNE_END)
    assert await where(db, order) == ["tiering.orders_p203106"]
    spend = await db.fetchrow(
        "SELECT total_paid_fen, order_count FROM tiering.member_spend WHERE member_id = $1", member
    )
    assert (spend["total_paid_fen"], spend["order_count"]) == (10_000, 1)
    assert await db.fetchval(
        "SELECT count(*) FROM tiering.growth_ledger WHERE member_id = $1", member
    ) == (1)


async def test_a_refund_reads_only_its_orders_month(db: asyncpg.Connection) -> None:
    member = uuid.uuid4()
    for month in (5, 6, 7):
        await record(db, f"o-{uuid.uuid4()}", member, utc(2031, month, 10))
    order = f"o-{uuid.uuid4()}"
    await record(db, order, member, utc(2031, 8, 20))  # the last month: a scan in order reads all
    plan = json.loads(
        await db.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {repo.LOCK_ORDER_SQL.replace('$1', repr(order))}"
        )
    )
    assert {n for n in executed(plan) if n.startswith("orders_p")} == {"orders_p203108"}, plan
    async with db.transaction():
        locked = await repo.lock_order(db, order)
        assert locked is not None and locked.ordered_at == utc(2031, 8, 20)
        await repo.set_order_refund(db, order, 4_000, 60)
    assert await db.fetchval(
        "SELECT refunded_fen FROM tiering.orders WHERE order_id = $1", order
    ) == (4_000)
    assert await repo.lock_order(db, "o-unknown") is None


async def test_the_recompute_reads_only_the_windows_months(db: asyncpg.Connection) -> None:
    member = uuid.uuid4()
    for month in (5, 6, 7, 8):
        await record(db, f"o-{uuid.uuid4()}", member, utc(2031, month, 10))
    await db.execute("ANALYZE tiering.orders")
    # An RFM window of one month ending 15 August 2031: July and August.
    now = utc(2031, 8, 15)
    (sql, (tier_lo, rfm_lo, at)), *_ = _aggregate_sql(None, 1, now)
    plan = await explain_generic(
        db, sql, ("uuid", "uuid", "timestamptz", "timestamptz", "timestamptz"),
        uuid.UUID(int=0), uuid.UUID(int=2**128 - 1),
        tier_lo.isoformat(), rfm_lo.isoformat(), at.isoformat(),
    )  # fmt: skip
    kept = {r for r in relations(plan) if r.startswith("orders")}
    assert kept == {"orders_p203107", "orders_p203108"}, kept
    assert subplans_removed(plan) >= 2


async def test_detach_needs_the_retention_and_every_programmes_window(
    db: asyncpg.Connection,
) -> None:
    now: datetime = await db.fetchval("SELECT now()")
    # Months relative to the database's clock (the guard's): 40 and 20 back.
    old, recent = add_months(month_start(now), -40), add_months(month_start(now), -20)
    for month in (old, recent):
        await create_month(db, ORDERS, month)
    member = uuid.uuid4()
    await record(db, "o-old", member, old.replace(day=5))
    await record(db, "o-recent", member, recent.replace(day=5))
    short = orders_table(retention_months=12)
    name_old, name_recent = ORDERS.partition_name(old), ORDERS.partition_name(recent)
    # A 24-month programme reads the recent month: refused however short the
    # retention; an RFM window of 30 months likewise.
    await programme(db, "p1", window=24)
    with pytest.raises(DomainError) as refused:
        await detach_partition(db, short, name_recent, clock=now)
    assert refused.value.code == "PARTITION_IN_TIER_WINDOW"
    await db.execute("TRUNCATE tiering.tier_programmes")
    await programme(db, "p2", window=6, rfm=30)
    with pytest.raises(DomainError) as refused:
        await detach_partition(db, short, name_recent, clock=now)
    assert refused.value.code == "PARTITION_IN_TIER_WINDOW"
    # Outside the windows but inside the 36 months kept by default: refused,
    # and its key stays.
    await db.execute("TRUNCATE tiering.tier_programmes")
    await programme(db, "p3", window=12)
    with pytest.raises(DomainError) as refused:
        await detach_partition(db, ORDERS, name_recent, clock=now)
    assert refused.value.code == "PARTITION_TOO_RECENT"
    assert await db.fetchval("SELECT count(*) FROM tiering.order_keys") == 2
    # Past both: archived, its key gone with it.
    archived = await detach_partition(db, ORDERS, name_old, clock=now)
    assert archived == f"tiering_archive.{name_old}"
    keys = [r["order_id"] for r in await db.fetch("SELECT order_id FROM tiering.order_keys")]
    assert keys == ["o-recent"]
    assert name_old not in {p.name for p in await list_partitions(db, ORDERS)}
    await db.execute(f"DROP TABLE tiering_archive.{name_old}")
    await db.execute(f"DROP TABLE tiering.{name_recent}")


async def programme(
    conn: asyncpg.Connection, programme_id: str, window: int, rfm: int | None = None
) -> None:
    rules = {"segments": {"rfm_window_months": rfm}} if rfm else {}
    await conn.execute(
        "INSERT INTO tiering.tier_programmes (programme_id, version, effective_from,"
        " qualifying_metric, window_months, ladder, rules)"
        " VALUES ($1, 1, $2, 'paid_spend', $3, '[]', $4::jsonb)",
        programme_id,
        utc(2020, 1),
        window,
        json.dumps(rules),
    )


def test_the_service_keeps_orders_by_month_with_the_retention_setting() -> None:
    tables = {t.qualified: t for t in partitioned_tables(ServiceSettings())}
    orders = tables["tiering.orders"]
    assert (orders.granularity, orders.keep_months, orders.drop_after) == ("month", 36, None)
    assert orders.detach_guard is not None
    kept = {
        t.qualified: t
        for t in partitioned_tables(TieringSettings(tiering_orders_retention_months=24))
    }
    assert kept["tiering.orders"].keep_months == 24


async def test_migration_moves_deployed_orders_into_partitions_and_back(infra: Infra) -> None:
    async with own_database(infra, prefix="tier_orders_migration") as scratch:

        def migrate(revision: str, down: bool = False) -> None:
            cfg = alembic_config("tiering", scratch)
            (command.downgrade if down else command.upgrade)(cfg, revision)

        await asyncio.to_thread(migrate, "0010_tiering_partitions")
        conn = await asyncpg.connect(asyncpg_dsn(scratch))
        try:
            member = uuid.uuid4()
            written = [("o-1", utc(2025, 3, 10)), ("o-2", utc(2025, 3, 31)), ("o-3", utc(2025, 4))]
            for order, at in written:
                await conn.execute(
                    "INSERT INTO tiering.orders (order_id, member_id, ordered_at, paid_fen,"
                    " refunded_fen, growth) VALUES ($1, $2, $3, 500, 100, 5)",
                    order,
                    member,
                    at,
                )
            before = await conn.fetch("SELECT * FROM tiering.orders ORDER BY order_id")
            await asyncio.to_thread(migrate, "head")
            assert [p for o, _ in written for p in await where(conn, o)] == [
                "tiering.orders_p202503",
                "tiering.orders_p202503",
                "tiering.orders_p202504",
            ]
            after = await conn.fetch("SELECT * FROM tiering.orders ORDER BY order_id")
            assert [dict(r) for r in after] == [dict(r) for r in before]
            keys = await conn.fetch("SELECT order_id, ordered_at FROM tiering.order_keys")
            assert sorted(tuple(k) for k in keys) == written
            # A deployed order replayed later is not counted again.
            assert not await record(conn, "o-3", member, utc(2031, 1, 1))
            await asyncio.to_thread(migrate, "0010_tiering_partitions", True)
            assert await conn.fetchval("SELECT to_regclass('tiering.order_keys')") is None
            assert await conn.fetchval("SELECT count(*) FROM tiering.orders") == 3
            pk = await conn.fetchval(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conname = 'pk_orders' AND connamespace = 'tiering'::regnamespace"
            )
            assert pk == "PRIMARY KEY (order_id)"
        finally:
            await conn.close()
