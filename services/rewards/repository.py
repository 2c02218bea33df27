"""SQL of the rewards service (asyncpg; statements are schema-qualified).

Every function takes a plain asyncpg connection, so the benchmark runs the
very statements the service runs. CompleteOrder is, inside one transaction:

1. `claim_order`    - INSERT ... SELECT FROM stores ... ON CONFLICT DO NOTHING
                      RETURNING: settles the order only for an active store, and
                      the unique (store_id, pos_transaction_id) key picks exactly
                      one winner among concurrent retries (losers wait, then get
                      no row).
2. `record_earning` - one CTE statement: ledger transaction + its two entries +
                      balance upsert + the order's balance-after.
3. the outbox INSERT of OrderCompleted (`UnitOfWork.emit`).

A call that claims nothing runs `find_order` instead: the winner's row (a
replay, or a different body: conflict) or the store's status (unknown/closed).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from servicekit.db import Connection

from .domain import OrderLine


@dataclass(frozen=True)
class NewOrder:
    order_id: uuid.UUID
    store_id: str
    pos_transaction_id: str
    member_id: uuid.UUID
    channel: str
    paid_amount_fen: int
    gross_amount_fen: int | None
    lines: tuple[OrderLine, ...]
    ordered_at: datetime
    request_hash: bytes
    points_earned: int


@dataclass(frozen=True)
class Earning:
    """The ledger side of a settled order."""

    transaction_id: uuid.UUID
    member_id: uuid.UUID
    order_id: uuid.UUID
    idempotency_key: str
    points: int
    rule: dict[str, object]


@dataclass(frozen=True)
class BalanceRecord:
    member_id: str
    available: int
    lifetime_earned: int


@dataclass(frozen=True)
class SettledOrder:
    order_id: str
    request_hash: bytes
    points_earned: int
    points_balance_after: int


@dataclass(frozen=True)
class OrderLookup:
    """What exists under an idempotency key: the store's status and the order, if any."""

    store_status: str | None
    order: SettledOrder | None


@dataclass(frozen=True)
class StoreRecord:
    store_id: str
    name: str
    city: str
    address: str
    latitude: Decimal
    longitude: Decimal
    status: str


@dataclass(frozen=True)
class CouponTemplateRecord:
    template_id: str
    name: str
    kind: str
    spec: dict[str, object]
    total_stock: int | None
    status: str
    valid_days: int | None


def lines_json(lines: tuple[OrderLine, ...]) -> str:
    return json.dumps(
        [
            {
                "sku": line.sku,
                "name": line.name,
                "category": line.category,
                "quantity": line.quantity,
                "paid_amount_fen": line.paid_amount_fen,
            }
            for line in lines
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )


CLAIM_ORDER_SQL = """
INSERT INTO rewards.orders (
    id, store_id, pos_transaction_id, member_id, channel, paid_amount_fen,
    gross_amount_fen, lines, ordered_at, request_hash, points_earned)
SELECT $1::uuid, s.store_id, $3::text, $4::uuid, $5::text, $6::bigint,
       $7::bigint, $8::jsonb, $9::timestamptz, $10::bytea, $11::bigint
FROM rewards.stores s
WHERE s.store_id = $2::text AND s.status = 'active'
ON CONFLICT (store_id, pos_transaction_id) DO NOTHING
RETURNING id
"""


async def claim_order(conn: Connection, order: NewOrder) -> bool:
    """Insert the order if its key is free and its store is active; True if inserted."""
    inserted = await conn.fetchval(
        CLAIM_ORDER_SQL,
        order.order_id,
        order.store_id,
        order.pos_transaction_id,
        order.member_id,
        order.channel,
        order.paid_amount_fen,
        order.gross_amount_fen,
        lines_json(order.lines),
        order.ordered_at,
        order.request_hash,
        order.points_earned,
    )
    return inserted is not None


# Entries are derived from the one amount in a single statement, so they sum
# to zero by construction; a zero-point order writes no transaction but still
# upserts the balance (to return it) and records balance-after on the order.
RECORD_EARNING_SQL = """
WITH txn AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, order_id, idempotency_key, amount, rule)
    SELECT $1::uuid, $2::uuid, 'earn', $3::uuid, $4::text, $5::bigint, $6::jsonb
    WHERE $5::bigint > 0
    RETURNING id, member_id, amount
), entries AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT id, 'member_wallet', member_id, amount FROM txn
    UNION ALL
    SELECT id, 'issued_liability', NULL, -amount FROM txn
), balance AS (
    INSERT INTO rewards.points_balances AS b (member_id, available, lifetime_earned, updated_at)
    VALUES ($2::uuid, $5::bigint, $5::bigint, now())
    ON CONFLICT (member_id) DO UPDATE
    SET available = b.available + EXCLUDED.available,
        lifetime_earned = b.lifetime_earned + EXCLUDED.lifetime_earned,
        updated_at = EXCLUDED.updated_at
    RETURNING available, lifetime_earned
), settled AS (
    UPDATE rewards.orders SET points_balance_after = (SELECT available FROM balance)
    WHERE id = $3::uuid
)
SELECT available, lifetime_earned FROM balance
"""


async def record_earning(conn: Connection, earning: Earning) -> BalanceRecord:
    """Journal the points of a just-claimed order and move the balance, in one statement."""
    row = await conn.fetchrow(
        RECORD_EARNING_SQL,
        earning.transaction_id,
        earning.member_id,
        earning.order_id,
        earning.idempotency_key,
        earning.points,
        json.dumps(earning.rule, sort_keys=True),
    )
    assert row is not None
    return BalanceRecord(str(earning.member_id), row["available"], row["lifetime_earned"])


FIND_ORDER_SQL = """
SELECT s.status AS store_status, o.id, o.request_hash, o.points_earned, o.points_balance_after
FROM (SELECT $1::text AS store_id, $2::text AS pos_transaction_id) AS q
LEFT JOIN rewards.stores s ON s.store_id = q.store_id
LEFT JOIN rewards.orders o
    ON o.store_id = q.store_id AND o.pos_transaction_id = q.pos_transaction_id
"""


async def find_order(conn: Connection, store_id: str, pos_transaction_id: str) -> OrderLookup:
    row = await conn.fetchrow(FIND_ORDER_SQL, store_id, pos_transaction_id)
    assert row is not None  # the VALUES side always yields one row
    order = None
    if row["id"] is not None:
        order = SettledOrder(
            order_id=str(row["id"]),
            request_hash=bytes(row["request_hash"]),
            points_earned=row["points_earned"],
            points_balance_after=row["points_balance_after"],
        )
    return OrderLookup(row["store_status"], order)


async def get_balance(conn: Connection, member_id: str) -> BalanceRecord | None:
    row = await conn.fetchrow(
        "SELECT available, lifetime_earned FROM rewards.points_balances WHERE member_id = $1",
        uuid.UUID(member_id),
    )
    if row is None:
        return None
    return BalanceRecord(member_id, row["available"], row["lifetime_earned"])


async def get_store(conn: Connection, store_id: str) -> StoreRecord | None:
    row = await conn.fetchrow(
        "SELECT store_id, name, city, address, latitude, longitude, status"
        " FROM rewards.stores WHERE store_id = $1",
        store_id,
    )
    return StoreRecord(**dict(row)) if row else None


async def upsert_stores(conn: Connection, stores: list[StoreRecord]) -> None:
    """Insert or refresh stores; unchanged rows are left alone (no dead tuples)."""
    await conn.executemany(
        "INSERT INTO rewards.stores AS s"
        " (store_id, name, city, address, latitude, longitude, status)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (store_id) DO UPDATE SET"
        " name = EXCLUDED.name, city = EXCLUDED.city, address = EXCLUDED.address,"
        " latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude, status = EXCLUDED.status"
        " WHERE (s.name, s.city, s.address, s.latitude, s.longitude, s.status)"
        " IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.city, EXCLUDED.address,"
        " EXCLUDED.latitude, EXCLUDED.longitude, EXCLUDED.status)",
        [
            (s.store_id, s.name, s.city, s.address, s.latitude, s.longitude, s.status)
            for s in stores
        ],
    )


async def upsert_coupon_templates(conn: Connection, templates: list[CouponTemplateRecord]) -> None:
    await conn.executemany(
        "INSERT INTO rewards.coupon_templates AS t"
        " (template_id, name, kind, spec, total_stock, status, valid_days)"
        " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)"
        " ON CONFLICT (template_id) DO UPDATE SET"
        " name = EXCLUDED.name, kind = EXCLUDED.kind, spec = EXCLUDED.spec,"
        " total_stock = EXCLUDED.total_stock, status = EXCLUDED.status,"
        " valid_days = EXCLUDED.valid_days"
        " WHERE (t.name, t.kind, t.spec, t.total_stock, t.status, t.valid_days)"
        " IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.kind, EXCLUDED.spec,"
        " EXCLUDED.total_stock, EXCLUDED.status, EXCLUDED.valid_days)",
        [
            (
                t.template_id,
                t.name,
                t.kind,
                json.dumps(t.spec, sort_keys=True),
                t.total_stock,
                t.status,
                t.valid_days,
            )
            for t in templates
        ],
    )
