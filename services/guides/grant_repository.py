"""SQL of coupon grants (asyncpg, schema-qualified): the monthly coupon budgets
of a guide and of a store (set, take one, give one back, what remains) and the
grants themselves under their idempotency key.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .repository import S


async def set_budget(conn: Connection, scope: str, owner: str, month: str, coupons: int) -> Any:
    """A budget may not go below what is already used (the CHECK refuses it)."""
    return await conn.fetchrow(
        f"INSERT INTO {S}.budgets (scope, owner_id, month, coupons) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (scope, owner_id, month) DO UPDATE SET coupons = EXCLUDED.coupons"
        " RETURNING scope, owner_id, month, coupons, used",
        scope,
        owner,
        month,
        coupons,
    )


async def take_budget(conn: Connection, scope: str, owner: str, month: str) -> int | None:
    """One coupon off the budget, or None when none is left (or none is set).
    The row lock and the re-checked WHERE make concurrent takers queue, never
    overdraw."""
    value = await conn.fetchval(
        f"UPDATE {S}.budgets SET used = used + 1"
        " WHERE scope = $1 AND owner_id = $2 AND month = $3 AND used < coupons"
        " RETURNING coupons - used",
        scope,
        owner,
        month,
    )
    return value  # type: ignore[no-any-return]


async def give_back_budget(conn: Connection, scope: str, owner: str, month: str) -> None:
    await conn.execute(
        f"UPDATE {S}.budgets SET used = used - 1"
        " WHERE scope = $1 AND owner_id = $2 AND month = $3 AND used > 0",
        scope,
        owner,
        month,
    )


async def remaining(conn: Connection, scope: str, owner: str, month: str) -> int:
    value = await conn.fetchval(
        f"SELECT coupons - used FROM {S}.budgets WHERE scope = $1 AND owner_id = $2 AND month = $3",
        scope,
        owner,
        month,
    )
    return int(value or 0)


async def get_grant(conn: Connection, key: str, lock: bool = False) -> Any:
    return await conn.fetchrow(
        f"SELECT grant_key, staff_id, store_id, member_id, template_id, month, status,"
        f" coupon_id, coupon_code FROM {S}.grants WHERE grant_key = $1"
        + (" FOR UPDATE" if lock else ""),
        key,
    )


async def upsert_grant(
    conn: Connection,
    key: str,
    staff_id: str,
    store_id: str,
    member_id: uuid.UUID,
    template_id: str,
    month: str,
    at: datetime,
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.grants (grant_key, staff_id, store_id, member_id, template_id, month,"
        " status, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'reserved', $7)"
        " ON CONFLICT (grant_key) DO UPDATE SET status = 'reserved', month = EXCLUDED.month",
        key,
        staff_id,
        store_id,
        member_id,
        template_id,
        month,
        at,
    )


async def finish_grant(
    conn: Connection, key: str, status: str, coupon_id: str = "", code: str = ""
) -> None:
    await conn.execute(
        f"UPDATE {S}.grants SET status = $2, coupon_id = $3, coupon_code = $4 WHERE grant_key = $1",
        key,
        status,
        coupon_id,
        code,
    )
