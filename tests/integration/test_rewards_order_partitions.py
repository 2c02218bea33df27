"""rewards.orders partitioned by month of created_at (migration 0018): one
order per (store, POS transaction) and per id whatever the month (order_keys),
the foreign keys on the key table, reads pruned through the key's created_at,
the migration of a deployed table, and the keeper, detach policy and CLI
(docs/operations.md "Partitioned tables")."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from alembic import command

from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.errors import DomainError
from servicekit.migrations import alembic_config
from servicekit.partitions import (
    add_months,
    detach_partition,
    ensure_partitions,
    list_partitions,
    month_start,
)
from services.rewards.orders import repository as orders
from services.rewards.partitions import ORDERS
from services.rewards.points import repository as ledger
from services.rewards.points.audit import audit_ledger
from services.rewards.points.checkpoint import write_checkpoint
from services.rewards.points.handlers import PointsLedger

from .test_rewards_partitions import (
    db_now,
    executed,
    explain,
    explain_generic,
    relations,
    seed_history,
    subplans_removed,
    utc,
)

STORE = "OPART1"

INSERT_ORDER_SQL = """
INSERT INTO rewards.orders (id, store_id, pos_transaction_id, member_id, channel,
    paid_amount_fen, ordered_at, request_hash, points_earned, points_balance_after, created_at)
VALUES ($1, $2, $3, $4, 'store', 100, $5, $6, 0, 0, $5)
"""


async def add_store(conn: asyncpg.Connection, store: str = STORE) -> None:
    await conn.execute(
        "INSERT INTO rewards.stores (store_id, name, city, address, latitude, longitude)"
        " VALUES ($1, 'Partitions', 'Shanghai', '1 Road', 31.2, 121.4) ON CONFLICT DO NOTHING",
        store,
    )


async def insert_order(
    conn: asyncpg.Connection, txn: str, at: datetime, store: str = STORE
) -> uuid.UUID:
    """A settled order earning nothing (consistent for the ledger audit), written
    directly at `at` (its created_at: the partition)."""
    order = uuid.uuid4()
    await conn.execute(INSERT_ORDER_SQL, order, store, txn, uuid.uuid4(), at, b"\0" * 32)
    return order


def new_order(txn: str, at: datetime, store: str = STORE) -> orders.NewOrder:
    return orders.NewOrder(
        uuid.uuid4(), store, txn, uuid.uuid4(), "store", 100, None, (), at, b"\1" * 32, 0
    )


async def partition_of(conn: asyncpg.Connection, order: uuid.UUID) -> str:
    name: str = await conn.fetchval(
        "SELECT tableoid::regclass::text FROM rewards.orders WHERE id = $1", order
    )
    return name


def orders_partitions(names: list[str]) -> set[str]:
    return {n for n in names if n.startswith("orders_")}


async def test_one_order_per_store_and_pos_transaction_across_months(
    conn: asyncpg.Connection,
) -> None:
    await add_store(conn)
    await ensure_partitions(conn, ORDERS, ahead=1)
    now = await db_now(conn)
    next_month = add_months(month_start(now), 1) + timedelta(days=3)
    txn = f"op-{uuid.uuid4().hex[:12]}"
    first = await insert_order(conn, txn, now)
    assert await partition_of(conn, first) == "rewards." + ORDERS.partition_name(month_start(now))
    # The same key in another month's partition: refused by the key table.
    with pytest.raises(asyncpg.UniqueViolationError) as again:
        await insert_order(conn, txn, next_month)
    assert again.value.constraint_name == "uq_order_keys_store_id_pos_transaction_id"
    # The same id under another key, in another month: refused too.
    with pytest.raises(asyncpg.UniqueViolationError) as same_id:
        await conn.execute(
            INSERT_ORDER_SQL, first, STORE, txn + "-b", uuid.uuid4(), next_month, b"\0" * 32
        )
    assert same_id.value.constraint_name == "pk_order_keys"
    # The claim of a used key writes nothing and the replay finds the first order.
    async with conn.transaction():
        assert not await orders.claim_order(conn, new_order(txn, next_month))
        found = await orders.find_order(conn, STORE, txn)
    assert found.order is not None and found.order.order_id == str(first)
    assert found.store_status == "active"
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM rewards.orders WHERE store_id = $1 AND pos_transaction_id = $2",
            STORE,
            txn,
        )
        == 1
    )
    key = await conn.fetchrow("SELECT * FROM rewards.order_keys WHERE id = $1", first)
    assert (key["store_id"], key["pos_transaction_id"], key["created_at"]) == (STORE, txn, now)
    # An order's key never changes; the key table is append-only.
    with pytest.raises(asyncpg.RestrictViolationError):
        await conn.execute(
            "UPDATE rewards.orders SET created_at = $2 WHERE id = $1", first, next_month
        )
    with pytest.raises(asyncpg.RestrictViolationError):
        await conn.execute("DELETE FROM rewards.order_keys WHERE id = $1", first)


async def test_the_claim_writes_key_and_order_in_one_statement(conn: asyncpg.Connection) -> None:
    await add_store(conn)
    txn = f"op-{uuid.uuid4().hex[:12]}"
    order = new_order(txn, await db_now(conn))
    async with conn.transaction():
        assert await orders.claim_order(conn, order)
        # The settlement's writes find the order this transaction claimed.
        await orders.record_earning(
            conn,
            orders.Earning(
                uuid.uuid4(), order.member_id, order.order_id, f"earn:order:{order.order_id}", 0,
                {}, uuid.uuid4(), order.ordered_at, order.ordered_at + timedelta(days=365),
            ),
        )  # fmt: skip
        claimed_at = await db_now(conn)
    row = await conn.fetchrow(
        "SELECT k.created_at AS key_at, o.created_at, o.points_balance_after"
        " FROM rewards.order_keys k JOIN rewards.orders o ON o.id = k.id WHERE k.id = $1",
        order.order_id,
    )
    assert row["key_at"] == row["created_at"] == claimed_at
    assert row["points_balance_after"] == 0
    # A store that is not active claims nothing: neither key nor order.
    await add_store(conn, "OPART2")
    await conn.execute("UPDATE rewards.stores SET status = 'closed' WHERE store_id = 'OPART2'")
    assert not await orders.claim_order(conn, new_order(txn, await db_now(conn), "OPART2"))
    assert not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.order_keys WHERE store_id = 'OPART2')"
    )


async def test_every_foreign_key_to_an_order_is_on_the_key_table(
    conn: asyncpg.Connection,
) -> None:
    referrers = await conn.fetch(
        "SELECT conrelid::regclass::text AS t, confrelid::regclass::text AS target"
        " FROM pg_constraint WHERE contype = 'f' AND conparentid = 0"
        " AND confrelid IN ('rewards.orders'::regclass, 'rewards.order_keys'::regclass)"
    )
    assert {(r["t"], r["target"]) for r in referrers} == {
        ("rewards.coupons", "rewards.order_keys"),
        ("rewards.points_transactions", "rewards.order_keys"),
        ("rewards.refunds", "rewards.order_keys"),
    }
    with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
        await conn.execute(
            "INSERT INTO rewards.points_transactions"
            " (id, member_id, kind, order_id, idempotency_key, amount, rule)"
            " VALUES ($1, $2, 'earn', $3, $4, 1, '{}')",
            uuid.uuid4(),
            uuid.uuid4(),
            uuid.uuid4(),
            f"op:{uuid.uuid4()}",
        )
    assert refused.value.constraint_name == "fk_points_transactions_order_id_order_keys"


async def test_reads_by_key_and_the_claims_writes_prune_partitions(
    conn: asyncpg.Connection,
) -> None:
    await add_store(conn)
    # An old partition with a row (the planner keeps empty ones out of nothing).
    old_txn = f"op-{uuid.uuid4().hex[:12]}"
    old = await insert_order(conn, old_txn, datetime(2018, 2, 3, tzinfo=UTC))
    await ensure_partitions(conn, ORDERS, ahead=3)
    attached = orders_partitions([p.name for p in await list_partitions(conn, ORDERS)])
    assert "orders_p201802" in attached and len(attached) > 3
    # By key (refund, replay): only the order's own partition is scanned,
    # through the key's created_at (a nested loop's parameter: pruned at run time).
    for sql, args in (
        (
            "SELECT o.id FROM rewards.order_keys k JOIN rewards.orders o"
            " ON o.id = k.id AND o.created_at = k.created_at"
            " WHERE k.store_id = $1 AND k.pos_transaction_id = $2 FOR UPDATE OF o",
            (STORE, old_txn),
        ),
        (orders.FIND_ORDER_SQL, (STORE, old_txn)),
    ):
        plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))
        assert orders_partitions(sorted(executed(plan))) == {"orders_p201802"}, sql
    assert (await ledger.lock_order(conn, STORE, old_txn))["id"] == old
    # The claim's own writes (settlement, refusal, coupon discount) name this
    # transaction's now(): every other partition is removed at executor start,
    # in the plan for the values given and in the generic plan alike.
    update = (
        "UPDATE rewards.orders SET points_earned = 0 WHERE id = $1 AND "
        + orders.THIS_TRANSACTIONS_ORDER
    )
    month = ORDERS.partition_name(month_start(await db_now(conn)))
    for plan in (
        await explain(conn, update, old),
        await explain_generic(conn, update, ("uuid",), old),
    ):
        assert subplans_removed(plan) == len(attached) - 1
        assert orders_partitions(relations(plan)) == {month}
    # A time-bounded read (the audit's settled orders since a checkpoint).
    since = month_start(await db_now(conn))
    bounded = "SELECT id FROM rewards.orders WHERE member_id = $1 AND created_at >= $2"
    newer = {
        p.name for p in await list_partitions(conn, ORDERS) if p.upper is None or p.upper > since
    }
    scanned = orders_partitions(relations(await explain(conn, bounded, uuid.uuid4(), since)))
    assert scanned and scanned <= newer and "orders_p201802" not in scanned
    plan = await explain_generic(conn, bounded, ("uuid", "timestamptz"), uuid.uuid4(), since)
    assert subplans_removed(plan) >= len(attached - newer) > 0
    assert "orders_p201802" not in orders_partitions(relations(plan))


# ---- on a database of its own (checkpoints, detach, the migration) -----------


@pytest.fixture
async def ledger_db(scratch_url: str) -> AsyncIterator[asyncpg.Connection]:
    await asyncio.to_thread(command.upgrade, alembic_config("rewards", scratch_url), "head")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        yield conn
    finally:
        await conn.close()


async def refund(scratch_url: str, conn: asyncpg.Connection, refund_id: str, fen: int) -> Any:
    pool = await create_pool(scratch_url, 1, 2)
    db = Database(pool, "rewards", "rewards")
    try:
        async with db.unit_of_work() as uow:
            return await PointsLedger().refund_order(
                uow, "CKPT1", "pos-1", refund_id, fen, await db_now(conn)
            )
    finally:
        await db.close()


async def test_an_order_in_an_older_partition_is_refunded(
    ledger_db: asyncpg.Connection, scratch_url: str
) -> None:
    conn = ledger_db
    seen = await seed_history(conn)  # a settled order (and its earn) in March 2025
    report = await ensure_partitions(conn, ORDERS, ahead=1)
    assert report.moved == {"orders_p202503": 1} and report.strays_left == 0
    assert await partition_of(conn, seen["order"]) == "rewards.orders_p202503"
    outcome = await refund(scratch_url, conn, "refund-1", 1000)
    assert outcome.error is None, outcome.error
    assert outcome.value.order_id == str(seen["order"])
    assert outcome.value.points_reversed == 10
    # The refund's foreign key is the order's key.
    assert await conn.fetchval("SELECT order_id FROM rewards.refunds") == seen["order"]
    assert (await audit_ledger(conn)).ok


async def test_detach_waits_for_the_checkpoint_and_an_archived_order_is_not_refunded(
    ledger_db: asyncpg.Connection, scratch_url: str
) -> None:
    conn = ledger_db
    await seed_history(conn)
    await ensure_partitions(conn, ORDERS, ahead=1)
    with pytest.raises(DomainError) as refused:
        await detach_partition(conn, ORDERS, "orders_p202503")
    assert refused.value.code == "PARTITION_NEEDED_BY_AUDIT"
    await write_checkpoint(conn, utc(2025, 3))
    # March ends after the checkpoint: the audit still reads its settled orders.
    with pytest.raises(DomainError) as refused:
        await detach_partition(conn, ORDERS, "orders_p202503")
    assert refused.value.code == "PARTITION_NEEDED_BY_AUDIT"
    await write_checkpoint(conn, utc(2025, 4))
    # Covered, and more than the 12 months kept (the refund horizon) ago.
    assert (
        await detach_partition(conn, ORDERS, "orders_p202503") == "rewards_archive.orders_p202503"
    )
    # Its key stays: the refund is refused by name, stored and replayed; nothing moves.
    for _ in range(2):
        outcome = await refund(scratch_url, conn, "refund-1", 1000)
        assert outcome.error is not None and outcome.error.code == "REFUND_ORDER_ARCHIVED"
    assert await conn.fetchval("SELECT count(*) FROM rewards.refunds") == 0
    assert await conn.fetchval("SELECT count(*) FROM rewards.order_keys") == 1
    assert (await audit_ledger(conn)).ok


async def test_cli_ensures_lists_and_detaches_orders(scratch_url: str) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config("rewards", scratch_url), "head")
    env = {**os.environ, "DATABASE_URL": scratch_url}

    async def cli(*args: str) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.rewards", "partitions", *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out, err

    code, out, err = await cli("ensure", "--ahead", "5")
    assert code == 0, err.decode()
    reports = {r["table"]: r for r in json.loads(out)}
    assert reports["rewards.orders"]["strays_left"] == 0
    code, out, _ = await cli("list")
    listed = json.loads(out)["rewards.orders"]
    names = [p["name"] for p in listed]
    assert names[0] == "orders_default" and len(names) >= 7
    oldest = names[1]
    code, _, err = await cli("detach", oldest)
    assert code == 1
    assert json.loads(err)["error"]["code"] == "PARTITION_NEEDED_BY_AUDIT"
    code, _, err = await cli("detach", "orders_default")
    assert code == 1 and json.loads(err)["error"]["code"] == "PARTITION_IS_DEFAULT"


async def test_migration_moves_deployed_orders_into_partitions(scratch_url: str) -> None:
    def migrate(revision: str) -> None:
        command.upgrade(alembic_config("rewards", scratch_url), revision)

    # The revision before this one: coupons already partitioned (0017).
    await asyncio.to_thread(migrate, "0017_rewards_coupon_partitions")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        await add_store(conn)
        member = uuid.uuid4()
        written = [
            (uuid.uuid4(), f"old-{i}", datetime(2025, month, 10, tzinfo=UTC))
            for i, month in enumerate((3, 3, 5))
        ]
        for order, txn, at in written:
            await conn.execute(
                INSERT_ORDER_SQL.replace("0, 0, $5", "10, 10, $5"),
                order, STORE, txn, member, at, b"\0" * 32,
            )  # fmt: skip
        # Rows that point at orders: an earn, a refund, a used coupon.
        first = written[0][0]
        earn = uuid.uuid4()
        await conn.execute(
            "INSERT INTO rewards.points_transactions"
            " (id, member_id, kind, order_id, idempotency_key, amount, rule, created_at)"
            " VALUES ($1, $2, 'earn', $3, $4, 10, '{}', $5)",
            earn, member, first, f"earn:order:{first}", written[0][2],
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO rewards.refunds (id, order_id, store_id, refund_transaction_id,"
            " refunded_amount_fen, points_due, points_reversed, points_debt, points_shortfall)"
            " VALUES ($1, $2, $3, 'r-1', 10, 1, 1, 0, 0)",
            uuid.uuid4(), first, STORE,
        )  # fmt: skip
        # The referring keys are found by table, not by name: coupons' (a
        # partitioned table since 0017) under another name, and another
        # partitioned referrer with its partitions' inherited copies.
        await conn.execute(
            "ALTER TABLE rewards.coupons RENAME CONSTRAINT fk_coupons_order_id_orders"
            " TO coupons_order_renamed"
        )
        await conn.execute(
            "CREATE TABLE rewards.parted_referrer (order_id uuid REFERENCES rewards.orders (id),"
            " at timestamptz NOT NULL) PARTITION BY RANGE (at);"
            " CREATE TABLE rewards.parted_referrer_a PARTITION OF rewards.parted_referrer"
            " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
            " CREATE TABLE rewards.parted_referrer_b PARTITION OF rewards.parted_referrer DEFAULT"
        )
        await conn.execute(
            "INSERT INTO rewards.parted_referrer VALUES ($1, '2025-03-10'), ($1, '2027-01-01')",
            first,
        )
        before = await conn.fetch("SELECT * FROM rewards.orders ORDER BY created_at, id")
        await asyncio.to_thread(migrate, "head")
        targets = await conn.fetch(
            "SELECT conrelid::regclass::text AS t, conname, confrelid::regclass::text AS target,"
            " conparentid = 0 AS own FROM pg_constraint WHERE contype = 'f'"
            " AND confrelid IN ('rewards.orders'::regclass, 'rewards.order_keys'::regclass)"
        )
        assert {r["target"] for r in targets} == {"rewards.order_keys"}
        assert {(r["t"], r["conname"]) for r in targets if r["own"]} == {
            (f"rewards.{t}", f"fk_{t}_order_id_order_keys")
            for t in ("coupons", "refunds", "points_transactions", "parted_referrer")
        }
        assert {r["t"] for r in targets if not r["own"]} >= {
            "rewards.parted_referrer_a",
            "rewards.parted_referrer_b",
        }
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO rewards.parted_referrer VALUES ($1, '2025-05-01')", uuid.uuid4()
            )
        await conn.execute("DROP TABLE rewards.parted_referrer")
        rows = await conn.fetch(
            "SELECT *, tableoid::regclass::text AS part FROM rewards.orders ORDER BY created_at, id"
        )
        assert [{k: r[k] for k in r.keys() if k != "part"} for r in rows] == [
            dict(r) for r in before
        ]
        by_id = {r["id"]: r["part"] for r in rows}
        assert by_id == {order: f"rewards.orders_p{at:%Y%m}" for order, _, at in written}
        # Every month from the first row's to three ahead of the clock, and April too.
        now = await db_now(conn)
        names = {p.name for p in await list_partitions(conn, ORDERS)}
        assert {"orders_default", "orders_p202504"} <= names
        assert ORDERS.partition_name(add_months(month_start(now), 3)) in names
        keys = await conn.fetch(
            "SELECT id, pos_transaction_id, created_at FROM rewards.order_keys ORDER BY created_at, id"
        )
        assert {tuple(k) for k in keys} == set(written)
        # The foreign keys hold on the converted data, now through the key table.
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM rewards.refunds r JOIN rewards.order_keys k ON k.id = r.order_id"
            )
            == 1
        )
        with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
            await conn.execute(
                "INSERT INTO rewards.refunds (id, order_id, store_id, refund_transaction_id,"
                " refunded_amount_fen, points_due, points_reversed, points_debt,"
                " points_shortfall) VALUES ($1, $2, $3, 'r-2', 1, 0, 0, 0, 0)",
                uuid.uuid4(), uuid.uuid4(), STORE,
            )  # fmt: skip
        assert refused.value.constraint_name == "fk_refunds_order_id_order_keys"
        # A used key is refused in any month; the claim of a new one works.
        with pytest.raises(asyncpg.UniqueViolationError):
            await insert_order(conn, "old-2", now)
        async with conn.transaction():
            assert await orders.claim_order(conn, new_order("new-1", now))
            assert not await orders.claim_order(conn, new_order("old-0", now))
    finally:
        await conn.close()
