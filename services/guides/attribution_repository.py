"""SQL of orders and their attribution (asyncpg, schema-qualified): an order
consumed with the guide it is attributed to (and the funnel's first order and
repurchase in the same statement), refunds, one order's attribution, the daily
report per day, guide and store, and the funnel (registered, added on WeCom,
first order, repurchase) with its report.
"""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime
from typing import Any

from servicekit.db import Connection

from .repository import S

# First order, then the first order after it (a repurchase).
_FUNNEL_ORDER_CONFLICT = (
    " ON CONFLICT (member_id) DO UPDATE SET"
    " first_order_id = COALESCE(funnel.first_order_id, EXCLUDED.first_order_id),"
    " first_order_at = COALESCE(funnel.first_order_at, EXCLUDED.first_order_at),"
    " repurchased_at = CASE WHEN funnel.first_order_id IS NOT NULL"
    " AND funnel.first_order_id <> EXCLUDED.first_order_id"
    " THEN COALESCE(funnel.repurchased_at, EXCLUDED.first_order_at)"
    " ELSE funnel.repurchased_at END"
)


async def insert_order(
    conn: Connection,
    order_id: uuid.UUID,
    member_id: uuid.UUID,
    store_id: str,
    channel: str,
    paid_amount_fen: int,
    ordered_at: datetime,
    categories: list[tuple[str, int]],
    staff_id: str,
    attributed_store_id: str,
    rule: str,
    day: date,
) -> bool:
    return bool(
        await conn.fetchval(
            f"WITH o AS (INSERT INTO {S}.orders (order_id, member_id, store_id, channel,"
            " paid_amount_fen, ordered_at, categories, staff_id, attributed_store_id, rule, day)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " ON CONFLICT DO NOTHING RETURNING member_id, order_id, ordered_at),"
            # The funnel in the same statement, for a new order only (issue 19).
            f" f AS (INSERT INTO {S}.funnel AS funnel (member_id, first_order_id, first_order_at)"
            f" SELECT member_id, order_id, ordered_at FROM o {_FUNNEL_ORDER_CONFLICT})"
            " SELECT EXISTS (SELECT 1 FROM o)",
            order_id,
            member_id,
            store_id,
            channel,
            paid_amount_fen,
            ordered_at,
            json.dumps(categories),
            staff_id,
            attributed_store_id,
            rule,
            day,
        )
    )


async def insert_orders(conn: Connection, orders: list[tuple[Any, ...]]) -> set[uuid.UUID]:
    """insert_order for orders of distinct members (each a tuple of its
    arguments) in one statement; returns the members whose order is new."""
    if not orders:
        return set()
    cols = list(zip(*orders, strict=True))
    rows = await conn.fetch(
        f"WITH o AS (INSERT INTO {S}.orders (order_id, member_id, store_id, channel,"
        " paid_amount_fen, ordered_at, categories, staff_id, attributed_store_id, rule, day)"
        " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],"
        "  $6::timestamptz[], $7::jsonb[], $8::text[], $9::text[], $10::text[], $11::date[])"
        " ON CONFLICT DO NOTHING RETURNING member_id, order_id, ordered_at),"
        f" f AS (INSERT INTO {S}.funnel AS funnel (member_id, first_order_id, first_order_at)"
        f" SELECT member_id, order_id, ordered_at FROM o {_FUNNEL_ORDER_CONFLICT})"
        " SELECT member_id FROM o",
        *(list(c) for c in cols[:6]),
        [json.dumps(c) for c in cols[6]],
        *(list(c) for c in cols[7:]),
    )
    return {r["member_id"] for r in rows}


async def apply_refund(
    conn: Connection, refund_id: uuid.UUID, order_id: uuid.UUID, amount: int, at: datetime
) -> bool:
    """Books a refund once; the order's refunded amount never exceeds what it paid."""
    first = await conn.fetchval(
        f"INSERT INTO {S}.refunds (refund_id, order_id, amount_fen, refunded_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
        refund_id,
        order_id,
        amount,
        at,
    )
    if not first:
        return False
    await conn.execute(
        f"UPDATE {S}.orders SET refunded_amount_fen ="
        " LEAST(paid_amount_fen, refunded_amount_fen + $2) WHERE order_id = $1",
        order_id,
        amount,
    )
    return True


async def get_order(conn: Connection, order_id: uuid.UUID) -> Any:
    return await conn.fetchrow(
        f"SELECT order_id, member_id, staff_id, attributed_store_id, rule, paid_amount_fen,"
        f" refunded_amount_fen, ordered_at, day FROM {S}.orders WHERE order_id = $1",
        order_id,
    )


async def daily_report(
    conn: Connection, start: date, end: date, store_id: str, staff_id: str
) -> list[Any]:
    """Per day, guide and store: orders not wholly refunded, paid, refunded."""
    return list(
        await conn.fetch(
            f"SELECT day, staff_id, attributed_store_id AS store_id,"
            " count(*) FILTER (WHERE refunded_amount_fen < paid_amount_fen) AS orders,"
            " sum(paid_amount_fen)::bigint AS paid, sum(refunded_amount_fen)::bigint AS refunded"
            f" FROM {S}.orders WHERE staff_id <> '' AND day BETWEEN $1 AND $2"
            " AND ($3 = '' OR attributed_store_id = $3) AND ($4 = '' OR staff_id = $4)"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            start,
            end,
            store_id,
            staff_id,
        )
    )


async def funnel_registered(
    conn: Connection, member_id: uuid.UUID, at: datetime, channel: str
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.funnel (member_id, registered_at, channel) VALUES ($1, $2, $3)"
        " ON CONFLICT (member_id) DO UPDATE SET registered_at = EXCLUDED.registered_at,"
        " channel = EXCLUDED.channel",
        member_id,
        at,
        channel,
    )


async def funnel_added(
    conn: Connection, member_id: uuid.UUID, at: datetime, staff_id: str, store_id: str
) -> None:
    """The first WeCom add counts (the guide and store who acquired the member)."""
    await conn.execute(
        f"INSERT INTO {S}.funnel (member_id, wecom_added_at, first_staff_id, first_store_id)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE SET"
        f" wecom_added_at = EXCLUDED.wecom_added_at, first_staff_id = EXCLUDED.first_staff_id,"
        " first_store_id = EXCLUDED.first_store_id WHERE funnel.wecom_added_at IS NULL",
        member_id,
        at,
        staff_id,
        store_id,
    )


_GROUPS = {
    "store": "COALESCE(NULLIF(first_store_id, ''), '(none)')",
    "guide": "COALESCE(NULLIF(first_staff_id, ''), '(none)')",
    "channel": "COALESCE(NULLIF(channel, ''), '(unknown)')",
}


async def funnel_report(
    conn: Connection, group_by: str, start: datetime, end: datetime
) -> list[Any]:
    group = _GROUPS[group_by]
    return list(
        await conn.fetch(
            f"SELECT {group} AS grp, count(*) AS registered,"
            " count(wecom_added_at) AS added,"
            " count(first_order_at) AS first_order, count(repurchased_at) AS repurchased"
            f" FROM {S}.funnel WHERE registered_at >= $1 AND registered_at < $2"
            " GROUP BY 1 ORDER BY 1",
            start,
            end,
        )
    )
