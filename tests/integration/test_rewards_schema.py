"""Rewards schema: migrations match the models, the database guards the ledger,
and the demo seed is idempotent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from servicekit.db import asyncpg_dsn
from servicekit.migrations import pending_changes
from services.rewards.seed import DEMO_COUPON_TEMPLATES, DEMO_STORES, seed_demo

from ..harness import Infra


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield conn
    await conn.close()


async def test_migrations_match_the_models(infra: Infra) -> None:
    assert await asyncio.to_thread(pending_changes, "rewards", infra.database_url) == []


async def _snapshot(db: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    stores = await db.fetch(
        "SELECT *, xmin::text AS version FROM rewards.stores WHERE store_id = ANY($1::text[])"
        " ORDER BY store_id",
        [s.store_id for s in DEMO_STORES],
    )
    templates = await db.fetch(
        "SELECT *, xmin::text AS version FROM rewards.coupon_templates"
        " WHERE template_id = ANY($1::text[]) ORDER BY template_id",
        [t.template_id for t in DEMO_COUPON_TEMPLATES],
    )
    return stores, templates


async def test_seed_is_idempotent(db: asyncpg.Connection) -> None:
    await seed_demo(db)
    first = await _snapshot(db)
    await seed_demo(db)
    # Same rows, not even rewritten (xmin unchanged).
    assert await _snapshot(db) == first
    stores, templates = first
    assert len(stores) == len(DEMO_STORES) >= 3
    jingan = next(s for s in stores if s["store_id"] == "SH001")
    assert (jingan["name"], jingan["city"], jingan["status"]) == ("静安寺店", "上海", "active")
    assert {t["template_id"]: t["kind"] for t in templates} == {
        "MJ99-30": "amount_off",
        "FIRST-CUP-HALF": "first_order_price",
        # The demo tier programmes' benefits (tests/unit/test_demo_seeds.py).
        "birthday-drink": "free_item",
        "birthday-drink-and-gift": "free_item",
        "vip-welcome-gift": "amount_off",
    }
    manjian = next(t for t in templates if t["template_id"] == "MJ99-30")
    assert manjian["name"] == "满99减30"
    assert '"threshold_fen": 9900' in manjian["spec"]
    assert '"discount_fen": 3000' in manjian["spec"]


async def test_seed_restores_edited_demo_rows(db: asyncpg.Connection) -> None:
    await seed_demo(db)
    await db.execute("UPDATE rewards.stores SET name = 'renamed' WHERE store_id = 'SH002'")
    await seed_demo(db)
    assert await db.fetchval("SELECT name FROM rewards.stores WHERE store_id = 'SH002'") == (
        "陆家嘴国金中心店"
    )


async def _journal_row(db: asyncpg.Connection) -> uuid.UUID:
    """A minimal settled order with its earn transaction, written directly."""
    await seed_demo(db)
    member, order_id, txn_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with db.transaction():
        await db.execute(
            "INSERT INTO rewards.orders (id, store_id, pos_transaction_id, member_id, channel,"
            " paid_amount_fen, ordered_at, request_hash, points_earned, points_balance_after)"
            " VALUES ($1, 'SH001', $2, $3, 'store', 500, now(), $4, 5, 5)",
            order_id,
            f"schema-{order_id.hex[:12]}",
            member,
            b"\x00" * 32,
        )
        await db.execute(
            "INSERT INTO rewards.points_transactions"
            " (id, member_id, kind, order_id, idempotency_key, amount, rule)"
            " VALUES ($1, $2, 'earn', $3, $4, 5, '{}')",
            txn_id,
            member,
            order_id,
            f"earn:order:{order_id}",
        )
        await db.execute(
            "INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)"
            " VALUES ($1, 'member_wallet', $2, 5), ($1, 'issued_liability', NULL, -5)",
            txn_id,
            member,
        )
        # Its lot too, so the ledger audit after the module stays clean.
        lot = uuid.uuid4()
        await db.execute(
            "INSERT INTO rewards.points_lots (id, member_id, transaction_id, root_lot_id,"
            " order_id, points, remaining, status, earned_at, expires_at)"
            " VALUES ($1, $2, $3, $1, $4, 5, 5, 'active', now(), now() + interval '1 year')",
            lot,
            member,
            txn_id,
            order_id,
        )
        await db.execute(
            "INSERT INTO rewards.points_balances (member_id, available, lifetime_earned)"
            " VALUES ($1, 5, 5)",
            member,
        )
    return txn_id


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE rewards.points_entries SET amount = amount * 2 WHERE transaction_id = $1",
        "DELETE FROM rewards.points_entries WHERE transaction_id = $1",
        "UPDATE rewards.points_transactions SET amount = 50 WHERE id = $1",
        "DELETE FROM rewards.points_transactions WHERE id = $1",
    ],
)
async def test_journal_is_append_only(db: asyncpg.Connection, statement: str) -> None:
    txn_id = await _journal_row(db)
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await db.execute(statement, txn_id)


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [
        (
            "UPDATE rewards.points_balances SET available = -1 WHERE member_id ="
            " (SELECT member_id FROM rewards.points_transactions WHERE id = $1)",
            "ck_points_balances_available_nonnegative",
        ),
        (
            "INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)"
            " VALUES ($1, 'member_wallet', NULL, 3)",
            "ck_points_entries_wallet_has_member",
        ),
        (
            "INSERT INTO rewards.points_entries (transaction_id, account, amount)"
            " VALUES ($1, 'petty_cash', 3)",
            "ck_points_entries_account_known",
        ),
        (
            "INSERT INTO rewards.points_transactions"
            " (id, member_id, kind, idempotency_key, amount, rule)"
            " VALUES (gen_random_uuid(), gen_random_uuid(), 'earn', 'k-' || $1::uuid::text, 0, '{}')",
            "ck_points_transactions_amount_positive",
        ),
    ],
)
async def test_check_constraints_guard_the_ledger(
    db: asyncpg.Connection, statement: str, constraint: str
) -> None:
    txn_id = await _journal_row(db)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await db.execute(statement, txn_id)
    assert caught.value.constraint_name == constraint


async def test_order_key_is_unique_per_store(db: asyncpg.Connection) -> None:
    txn_id = await _journal_row(db)
    key = await db.fetchrow(
        "SELECT o.store_id, o.pos_transaction_id FROM rewards.orders o"
        " JOIN rewards.points_transactions t ON t.order_id = o.id WHERE t.id = $1",
        txn_id,
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(
            "INSERT INTO rewards.orders (id, store_id, pos_transaction_id, member_id, channel,"
            " paid_amount_fen, ordered_at, request_hash, points_earned)"
            " VALUES (gen_random_uuid(), $1, $2, gen_random_uuid(), 'store', 1, now(), $3, 0)",
            key["store_id"],
            key["pos_transaction_id"],
            b"\x01" * 32,
        )
