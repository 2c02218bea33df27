"""SQL of communities, the WeCom customer groups (asyncpg, schema-qualified):
group definitions (audience, tiers), their members joining and leaving, the
members' tiers as tiering announces them, a store's members with their groups,
and a group's report.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .repository import S

_COMMUNITY_COLS = "chat_id, name, store_id, audience, tiers, updated_by"


async def upsert_community(
    conn: Connection,
    chat_id: str,
    name: str,
    store_id: str,
    audience: str,
    tiers: list[str],
    by: str,
) -> Any:
    return await conn.fetchrow(
        f"INSERT INTO {S}.communities ({_COMMUNITY_COLS}) VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (chat_id) DO UPDATE SET name = EXCLUDED.name, store_id = EXCLUDED.store_id,"
        " audience = EXCLUDED.audience, tiers = EXCLUDED.tiers, updated_by = EXCLUDED.updated_by"
        f" RETURNING {_COMMUNITY_COLS}",
        chat_id,
        name,
        store_id,
        audience,
        tiers,
        by,
    )


async def add_community(
    conn: Connection, chat_id: str, store_id: str, audience: str, by: str
) -> None:
    """A group WeCom listed: added once, never over an operator's definition."""
    await conn.execute(
        f"INSERT INTO {S}.communities ({_COMMUNITY_COLS}) VALUES ($1, $1, $2, $3, '{{}}', $4)"
        " ON CONFLICT (chat_id) DO NOTHING",
        chat_id,
        store_id,
        audience,
        by,
    )


async def communities(conn: Connection, store_id: str = "") -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {_COMMUNITY_COLS} FROM {S}.communities WHERE $1 = '' OR store_id = $1"
            " ORDER BY store_id, chat_id",
            store_id,
        )
    )


async def live_group_members(conn: Connection, chat_id: str) -> set[str]:
    rows = await conn.fetch(
        f"SELECT external_userid FROM {S}.community_members WHERE chat_id = $1 AND left_at IS NULL",
        chat_id,
    )
    return {r["external_userid"] for r in rows}


async def join_group(conn: Connection, chat_id: str, ext: str, at: datetime) -> None:
    await conn.execute(
        f"INSERT INTO {S}.community_members (chat_id, external_userid, joined_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (chat_id, external_userid) DO UPDATE SET joined_at = EXCLUDED.joined_at,"
        " left_at = NULL",
        chat_id,
        ext,
        at,
    )


async def leave_group(conn: Connection, chat_id: str, ext: str, at: datetime) -> None:
    await conn.execute(
        f"UPDATE {S}.community_members SET left_at = $3 WHERE chat_id = $1 AND external_userid = $2",
        chat_id,
        ext,
        at,
    )


async def set_member_tier(conn: Connection, member_id: uuid.UUID, tier: str) -> None:
    await conn.execute(
        f"INSERT INTO {S}.member_tiers (member_id, tier) VALUES ($1, $2)"
        " ON CONFLICT (member_id) DO UPDATE SET tier = EXCLUDED.tier",
        member_id,
        tier,
    )


async def store_members(conn: Connection, store_id: str, staff_id: str) -> list[Any]:
    """Members bound in the store (optionally to one guide), with their tier
    and the groups of the store they are in now."""
    return list(
        await conn.fetch(
            f"SELECT b.member_id, b.staff_id, COALESCE(t.tier, '') AS tier,"
            " COALESCE(array_agg(DISTINCT cm.chat_id) FILTER (WHERE cm.chat_id IS NOT NULL),"
            " '{}') AS chats"
            f" FROM {S}.bindings b LEFT JOIN {S}.member_tiers t USING (member_id)"
            f" LEFT JOIN {S}.contacts c ON c.member_id = b.member_id"
            f" LEFT JOIN {S}.community_members cm ON cm.external_userid = c.external_userid"
            f" AND cm.left_at IS NULL AND cm.chat_id IN"
            f" (SELECT chat_id FROM {S}.communities WHERE store_id = $1)"
            " WHERE b.store_id = $1 AND ($2 = '' OR b.staff_id = $2)"
            " GROUP BY b.member_id, b.staff_id, t.tier ORDER BY b.member_id",
            store_id,
            staff_id,
        )
    )


async def community_report(conn: Connection, chat_id: str, start: datetime, end: datetime) -> Any:
    return await conn.fetchrow(
        f"SELECT (SELECT count(*) FROM {S}.community_members WHERE chat_id = $1 AND left_at IS NULL)"
        " AS members,"
        f" (SELECT count(*) FROM {S}.community_members WHERE chat_id = $1"
        " AND joined_at >= $2 AND joined_at < $3) AS joins,"
        f" (SELECT count(*) FROM {S}.community_members WHERE chat_id = $1"
        " AND left_at >= $2 AND left_at < $3) AS leaves,"
        " count(o.order_id) AS orders, COALESCE(sum(o.paid_amount_fen - o.refunded_amount_fen), 0)"
        " ::bigint AS paid"
        f" FROM {S}.orders o WHERE o.ordered_at >= $2 AND o.ordered_at < $3"
        " AND o.refunded_amount_fen < o.paid_amount_fen AND o.member_id IN"
        f" (SELECT c.member_id FROM {S}.community_members cm JOIN {S}.contacts c"
        " USING (external_userid) WHERE cm.chat_id = $1 AND cm.joined_at <= o.ordered_at"
        " AND (cm.left_at IS NULL OR cm.left_at > o.ordered_at))",
        chat_id,
        start,
        end,
    )
