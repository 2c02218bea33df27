"""SQL of the points mall (asyncpg; statements are schema-qualified).

Mall stock and the per-member limit are each changed by a conditional
UPDATE/UPSERT ... WHERE <still allowed> RETURNING, so concurrent exchanges queue
on the row and the loser gets no row, never a negative count.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .domain import ItemKind, ItemSpec, ItemStatus

ITEM_COLUMNS = (
    "id, name, kind, coupon_template_id, sku, points_price, cash_fen, stock_total,"
    " stock_remaining, per_member_limit, starts_at, ends_at, status, created_at, updated_at, seq"
)


@dataclass(frozen=True)
class ItemRow:
    item_id: uuid.UUID
    spec: ItemSpec
    stock_remaining: int
    status: ItemStatus
    created_at: datetime
    updated_at: datetime
    seq: int


def _item(row: Any) -> ItemRow:
    return ItemRow(
        item_id=row["id"],
        spec=ItemSpec(
            name=row["name"],
            kind=ItemKind(row["kind"]),
            points_price=row["points_price"],
            cash_fen=row["cash_fen"],
            stock_total=row["stock_total"],
            per_member_limit=row["per_member_limit"],
            coupon_template_id=row["coupon_template_id"] or "",
            sku=row["sku"] or "",
            starts_at=row["starts_at"],
            ends_at=row["ends_at"],
        ),
        stock_remaining=row["stock_remaining"],
        status=ItemStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        seq=row["seq"],
    )


async def insert_item(
    conn: Connection, item_id: uuid.UUID, spec: ItemSpec, status: ItemStatus
) -> ItemRow:
    row = await conn.fetchrow(
        "INSERT INTO rewards.mall_items (id, name, kind, coupon_template_id, sku, points_price,"
        " cash_fen, stock_total, stock_remaining, per_member_limit, starts_at, ends_at, status)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12)"
        f" RETURNING {ITEM_COLUMNS}",
        item_id,
        spec.name,
        spec.kind.value,
        spec.coupon_template_id or None,
        spec.sku or None,
        spec.points_price,
        spec.cash_fen,
        spec.stock_total,
        spec.per_member_limit,
        spec.starts_at,
        spec.ends_at,
        status.value,
    )
    return _item(row)


async def item(conn: Connection, item_id: uuid.UUID, *, lock: bool = False) -> ItemRow | None:
    row = await conn.fetchrow(
        f"SELECT {ITEM_COLUMNS} FROM rewards.mall_items WHERE id = $1"
        # NO KEY: an operator's change does not wait for exchanges in flight
        # (their foreign keys hold KEY SHARE); their stock UPDATE checks the version.
        + (" FOR NO KEY UPDATE" if lock else ""),
        item_id,
    )
    return _item(row) if row else None


async def update_item(conn: Connection, item_id: uuid.UUID, spec: ItemSpec) -> ItemRow | None:
    """Rewrite an item; the stock already exchanged stays exchanged (None when
    the new total is below it; the caller holds the row lock)."""
    row = await conn.fetchrow(
        "UPDATE rewards.mall_items SET name = $2, points_price = $3, cash_fen = $4,"
        " stock_remaining = $5 - (stock_total - stock_remaining), stock_total = $5,"
        " per_member_limit = $6, starts_at = $7, ends_at = $8, coupon_template_id = $9,"
        " sku = $10, kind = $11, updated_at = now()"
        " WHERE id = $1 AND $5 >= stock_total - stock_remaining"
        f" RETURNING {ITEM_COLUMNS}",
        item_id,
        spec.name,
        spec.points_price,
        spec.cash_fen,
        spec.stock_total,
        spec.per_member_limit,
        spec.starts_at,
        spec.ends_at,
        spec.coupon_template_id or None,
        spec.sku or None,
        spec.kind.value,
    )
    return _item(row) if row else None


async def set_item_status(conn: Connection, item_id: uuid.UUID, status: ItemStatus) -> ItemRow:
    row = await conn.fetchrow(
        "UPDATE rewards.mall_items SET status = $2, updated_at = now() WHERE id = $1"
        f" RETURNING {ITEM_COLUMNS}",
        item_id,
        status.value,
    )
    return _item(row)


async def list_items(
    conn: Connection, before: int | None, limit: int, on_sale_at: datetime | None
) -> list[ItemRow]:
    """Newest first; with `on_sale_at`, only items a member can exchange then."""
    rows = await conn.fetch(
        f"SELECT {ITEM_COLUMNS} FROM rewards.mall_items"
        " WHERE ($1::bigint IS NULL OR seq < $1)"
        " AND ($3::timestamptz IS NULL OR (status = 'active'"
        "  AND (starts_at IS NULL OR starts_at <= $3) AND (ends_at IS NULL OR ends_at > $3)))"
        " ORDER BY seq DESC LIMIT $2",
        before,
        limit,
        on_sale_at,
    )
    return [_item(r) for r in rows]


async def take_stock(
    conn: Connection, item_id: uuid.UUID, now: datetime, version: datetime
) -> bool:
    """Take one unit of the item, still as of `version` (its updated_at) and on
    sale now; False when sold out, off sale or changed meanwhile."""
    value = await conn.fetchval(
        "UPDATE rewards.mall_items SET stock_remaining = stock_remaining - 1"
        " WHERE id = $1 AND status = 'active' AND stock_remaining > 0 AND updated_at = $3"
        " AND (starts_at IS NULL OR starts_at <= $2) AND (ends_at IS NULL OR ends_at > $2)"
        " RETURNING true",
        item_id,
        now,
        version,
    )
    return bool(value)


async def count_member_exchange(
    conn: Connection, item_id: uuid.UUID, cluster: list[uuid.UUID], limit: int
) -> bool:
    """Count one exchange of the item by the person if under the limit (0:
    none): the holder's (cluster[0]) row plus what merged members exchanged
    before the merge."""
    value = await conn.fetchval(
        "WITH earlier AS (SELECT coalesce(sum(exchanged), 0) AS n FROM rewards.mall_member_counts"
        "  WHERE item_id = $1 AND member_id = ANY($4::uuid[]) AND member_id <> $2)"
        " INSERT INTO rewards.mall_member_counts AS c (item_id, member_id, exchanged)"
        " SELECT $1, $2, 1 FROM earlier WHERE $3 = 0 OR earlier.n < $3"
        " ON CONFLICT (item_id, member_id) DO UPDATE SET exchanged = c.exchanged + 1"
        " WHERE $3 = 0 OR c.exchanged + (SELECT n FROM earlier) < $3"
        " RETURNING exchanged",
        item_id,
        cluster[0],
        limit,
        cluster,
    )
    return value is not None


EXCHANGE_COLUMNS = (
    "id, member_id, exchange_key, request_hash, item_id, points, cash_fen,"
    " points_transaction_id, coupon_id, sku, fulfilment, created_at, seq,"
    " carrier, tracking_number, shipped_at, hold_id, payment_due_at, payment_reference,"
    " paid_at, released_at, counted_member_id, reversed_at, reversed_by, reversal_reason"
)


async def exchange_by_key(conn: Connection, member_id: uuid.UUID, key: str) -> Any:
    return await conn.fetchrow(
        f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges"
        " WHERE member_id = $1 AND exchange_key = $2",
        member_id,
        key,
    )


async def insert_exchange(conn: Connection, values: dict[str, Any]) -> Any:
    """The new exchange, or None when the key was used (a concurrent retry
    waits for the winner's commit, then gets None)."""
    return await conn.fetchrow(
        "INSERT INTO rewards.mall_exchanges (id, member_id, exchange_key, request_hash, item_id,"
        " points, cash_fen, points_transaction_id, coupon_id, sku, fulfilment, hold_id,"
        " payment_due_at, counted_member_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        f" ON CONFLICT (member_id, exchange_key) DO NOTHING RETURNING {EXCHANGE_COLUMNS}",
        values["id"],
        values["member_id"],
        values["exchange_key"],
        values["request_hash"],
        values["item_id"],
        values["points"],
        values["cash_fen"],
        values["points_transaction_id"],
        values["coupon_id"],
        values["sku"],
        values["fulfilment"],
        values.get("hold_id"),
        values.get("payment_due_at"),
        values.get("counted_member_id"),
    )


async def exchanges_of(
    conn: Connection,
    cluster: list[uuid.UUID] | None,
    before: int | None,
    limit: int,
    fulfilment: str | None = None,
) -> list[Any]:
    """Newest first: a person's (cluster) or, with None, every member's."""
    return list(
        await conn.fetch(
            f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges"
            " WHERE ($1::uuid[] IS NULL OR member_id = ANY($1::uuid[]))"
            " AND ($2::bigint IS NULL OR seq < $2) AND ($4::text IS NULL OR fulfilment = $4)"
            " ORDER BY seq DESC LIMIT $3",
            cluster,
            before,
            limit,
            fulfilment,
        )
    )


async def exchange(conn: Connection, exchange_id: uuid.UUID) -> Any:
    return await conn.fetchrow(
        f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges WHERE id = $1", exchange_id
    )


async def ship_exchange(
    conn: Connection, exchange_id: uuid.UUID, carrier: str, tracking: str, at: datetime
) -> Any:
    """pending -> shipped; None when the exchange is not pending goods."""
    return await conn.fetchrow(
        "UPDATE rewards.mall_exchanges SET fulfilment = 'shipped', carrier = $2,"
        " tracking_number = $3, shipped_at = $4 WHERE id = $1 AND fulfilment = 'pending'"
        f" RETURNING {EXCHANGE_COLUMNS}",
        exchange_id,
        carrier,
        tracking,
        at,
    )


async def lock_exchange(conn: Connection, exchange_id: uuid.UUID) -> Any:
    """The exchange, locked: a confirmation, a release and a reversal of one
    exchange run one at a time."""
    return await conn.fetchrow(
        f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges WHERE id = $1 FOR UPDATE",
        exchange_id,
    )


async def exchange_by_payment(conn: Connection, reference: str) -> Any:
    return await conn.fetchrow(
        f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges WHERE payment_reference = $1",
        reference,
    )


async def confirm_payment(
    conn: Connection,
    exchange_id: uuid.UUID,
    reference: str,
    at: datetime,
    fulfilment: str,
    coupon_id: str | None,
) -> Any:
    return await conn.fetchrow(
        "UPDATE rewards.mall_exchanges SET payment_reference = $2, paid_at = $3,"
        " fulfilment = $4, coupon_id = $5 WHERE id = $1 AND fulfilment = 'awaiting_payment'"
        f" RETURNING {EXCHANGE_COLUMNS}",
        exchange_id,
        reference,
        at,
        fulfilment,
        coupon_id,
    )


async def due_unpaid(conn: Connection, now: datetime, limit: int) -> list[uuid.UUID]:
    rows = await conn.fetch(
        "SELECT id FROM rewards.mall_exchanges WHERE fulfilment = 'awaiting_payment'"
        " AND payment_due_at <= $1 ORDER BY payment_due_at LIMIT $2",
        now,
        limit,
    )
    return [r["id"] for r in rows]


async def give_back(conn: Connection, item_id: uuid.UUID, counted: uuid.UUID | None) -> None:
    """One unit of stock and the member's count back (a release or a reversal)."""
    await conn.execute(
        "UPDATE rewards.mall_items SET stock_remaining = stock_remaining + 1"
        " WHERE id = $1 AND stock_remaining < stock_total",
        item_id,
    )
    if counted is not None:
        await conn.execute(
            "UPDATE rewards.mall_member_counts SET exchanged = exchanged - 1"
            " WHERE item_id = $1 AND member_id = $2 AND exchanged > 0",
            item_id,
            counted,
        )


async def mark_released(conn: Connection, exchange_id: uuid.UUID, at: datetime) -> Any:
    return await conn.fetchrow(
        "UPDATE rewards.mall_exchanges SET fulfilment = 'released', released_at = $2"
        f" WHERE id = $1 AND fulfilment = 'awaiting_payment' RETURNING {EXCHANGE_COLUMNS}",
        exchange_id,
        at,
    )


async def mark_reversed(
    conn: Connection,
    exchange_id: uuid.UUID,
    at: datetime,
    operator: str,
    reason: str,
    transaction_id: uuid.UUID,
) -> Any:
    return await conn.fetchrow(
        "UPDATE rewards.mall_exchanges SET fulfilment = 'reversed', reversed_at = $2,"
        " reversed_by = $3, reversal_reason = $4, reversal_transaction_id = $5"
        " WHERE id = $1 AND reversed_at IS NULL"
        " AND fulfilment IN ('issued', 'pending', 'shipped')"
        f" RETURNING {EXCHANGE_COLUMNS}",
        exchange_id,
        at,
        operator,
        reason,
        transaction_id,
    )
