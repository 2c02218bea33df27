"""SQL of member tags (asyncpg, schema-qualified): a member's tags (manual,
rule, journey), adding and removing one, the orders and tags the rule tags are
computed from, the members a rule-tag batch visits, and the queue of tag
changes to mark on WeCom.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .repository import S


async def recent_orders_and_tags(
    conn: Connection, member_id: uuid.UUID, since: datetime
) -> tuple[list[Any], list[tuple[str, str]]]:
    """The orders not wholly refunded since `since` (the rule tags' window) and
    the member's tags as (tag, source): one statement, under the member's lock
    (lock_member) taken by an earlier statement, so both are read after it."""
    rows = await conn.fetch(
        "SELECT t.tags, t.sources, o.order_id, o.store_id, o.channel,"
        " o.paid_amount_fen - o.refunded_amount_fen AS paid, o.ordered_at, o.categories"
        f" FROM (SELECT ARRAY(SELECT tag FROM {S}.member_tags WHERE member_id = $1"
        "  ORDER BY tag, source) AS tags,"
        f"  ARRAY(SELECT source FROM {S}.member_tags WHERE member_id = $1"
        "  ORDER BY tag, source) AS sources) t"
        f" LEFT JOIN {S}.orders o ON o.member_id = $1 AND o.ordered_at >= $2"
        " AND o.refunded_amount_fen < o.paid_amount_fen ORDER BY o.ordered_at",
        member_id,
        since,
    )
    tags = list(zip(rows[0]["tags"], rows[0]["sources"], strict=True))
    return [r for r in rows if r["order_id"] is not None], tags


async def recent_orders_and_tags_of(
    conn: Connection, member_ids: list[uuid.UUID], since: datetime
) -> dict[uuid.UUID, tuple[list[Any], list[tuple[str, str]]]]:
    """recent_orders_and_tags for several members in one statement (each
    member's lock taken by an earlier statement)."""
    rows = await conn.fetch(
        "SELECT m.member_id, t.tags, t.sources, o.order_id, o.store_id, o.channel,"
        " o.paid_amount_fen - o.refunded_amount_fen AS paid, o.ordered_at, o.categories"
        " FROM unnest($1::uuid[]) AS m(member_id)"
        # An aggregate: read once per member, not once per order row.
        " CROSS JOIN LATERAL (SELECT"
        "  coalesce(array_agg(tag ORDER BY tag, source), '{}') AS tags,"
        "  coalesce(array_agg(source ORDER BY tag, source), '{}') AS sources"
        f"  FROM {S}.member_tags WHERE member_id = m.member_id) t"
        # Each member's orders by (member_id, ordered_at), as the one-member
        # read; OFFSET 0 keeps the planner from flattening it into a hash
        # join over every order in the window (seen on young tables).
        " LEFT JOIN LATERAL (SELECT o.order_id, o.store_id, o.channel, o.paid_amount_fen,"
        "  o.refunded_amount_fen, o.ordered_at, o.categories"
        f"  FROM {S}.orders o WHERE o.member_id = m.member_id AND o.ordered_at >= $2"
        "  AND o.refunded_amount_fen < o.paid_amount_fen OFFSET 0) o ON true"
        " ORDER BY m.member_id, o.ordered_at",
        member_ids,
        since,
    )
    out: dict[uuid.UUID, tuple[list[Any], list[tuple[str, str]]]] = {}
    for r in rows:
        orders, _ = out.setdefault(
            r["member_id"], ([], list(zip(r["tags"], r["sources"], strict=True)))
        )
        if r["order_id"] is not None:
            orders.append(r)
    return out


async def members_for_tag_batch(conn: Connection, since: datetime) -> list[uuid.UUID]:
    """Members with orders in the window, or with rule tags to reconsider."""
    rows = await conn.fetch(
        f"SELECT member_id FROM {S}.orders WHERE ordered_at >= $1"
        f" UNION SELECT member_id FROM {S}.member_tags WHERE source = 'rule' ORDER BY 1",
        since,
    )
    return [r["member_id"] for r in rows]


async def tags_of(conn: Connection, member_id: uuid.UUID) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT tag, source, set_by, set_at FROM {S}.member_tags WHERE member_id = $1"
            " ORDER BY tag, source",
            member_id,
        )
    )


async def add_tag(
    conn: Connection, member_id: uuid.UUID, tag: str, source: str, by: str, at: datetime
) -> bool:
    return bool(
        await conn.fetchval(
            f"INSERT INTO {S}.member_tags (member_id, tag, source, set_by, set_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true",
            member_id,
            tag,
            source,
            by,
            at,
        )
    )


async def remove_tag(conn: Connection, member_id: uuid.UUID, tag: str, source: str) -> bool:
    return bool(
        await conn.fetchval(
            f"DELETE FROM {S}.member_tags WHERE member_id = $1 AND tag = $2 AND source = $3"
            " RETURNING true",
            member_id,
            tag,
            source,
        )
    )


async def enqueue_tag_push(
    conn: Connection,
    member_id: uuid.UUID,
    added: list[str],
    removed: list[str],
    at: datetime | None = None,
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.tag_pushes (member_id, added, removed, next_attempt_at)"
        " VALUES ($1, $2, $3, COALESCE($4, now()))",
        member_id,
        added,
        removed,
        at,
    )
