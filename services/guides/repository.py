"""The SQL of the guides service (asyncpg, schema-qualified)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from servicekit.db import Connection

S = "guides"


@dataclass(frozen=True)
class StaffRow:
    staff_id: str
    name: str
    store_id: str
    role: str
    status: str
    staff_code: str
    updated_by: str
    updated_at: datetime


def _staff(r: Any) -> StaffRow:
    return StaffRow(**dict(r))


_STAFF_COLS = "staff_id, name, store_id, role, status, staff_code, updated_by, updated_at"


async def get_staff(conn: Connection, staff_id: str, lock: bool = False) -> StaffRow | None:
    r = await conn.fetchrow(
        f"SELECT {_STAFF_COLS} FROM {S}.staff WHERE staff_id = $1"
        + (" FOR UPDATE" if lock else ""),
        staff_id,
    )
    return _staff(r) if r else None


async def staff_by_code(conn: Connection, code: str) -> StaffRow | None:
    r = await conn.fetchrow(f"SELECT {_STAFF_COLS} FROM {S}.staff WHERE staff_code = $1", code)
    return _staff(r) if r else None


async def list_staff(conn: Connection, store_id: str) -> list[StaffRow]:
    rows = await conn.fetch(
        f"SELECT {_STAFF_COLS} FROM {S}.staff WHERE $1 = '' OR store_id = $1 ORDER BY staff_id",
        store_id,
    )
    return [_staff(r) for r in rows]


async def upsert_staff(conn: Connection, s: StaffRow) -> StaffRow:
    r = await conn.fetchrow(
        f"INSERT INTO {S}.staff ({_STAFF_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (staff_id) DO UPDATE SET name = EXCLUDED.name,"
        " store_id = EXCLUDED.store_id, role = EXCLUDED.role, status = EXCLUDED.status,"
        " staff_code = EXCLUDED.staff_code, updated_by = EXCLUDED.updated_by,"
        f" updated_at = EXCLUDED.updated_at RETURNING {_STAFF_COLS}",
        s.staff_id,
        s.name,
        s.store_id,
        s.role,
        s.status,
        s.staff_code,
        s.updated_by,
        s.updated_at,
    )
    return _staff(r)


async def audit(
    conn: Connection, actor: str, action: str, subject: str, detail: dict[str, Any], at: datetime
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.audit (at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5)",
        at,
        actor,
        action,
        subject,
        json.dumps(detail),
    )


async def audit_of(conn: Connection, subject: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT at, actor, action, detail FROM {S}.audit WHERE subject = $1 ORDER BY id", subject
    )
    return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]


# ---------------------------------------------------------------- callbacks


async def remember_signature(conn: Connection, signature: str, at: datetime) -> bool:
    """False when this signature was accepted before (a replay)."""
    return bool(
        await conn.fetchval(
            f"INSERT INTO {S}.callback_signatures (msg_signature, seen_at) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING true",
            signature,
            at,
        )
    )


async def enqueue_callback(
    conn: Connection, key: str, event: str, change_type: str, message: str, at: datetime
) -> bool:
    return bool(
        await conn.fetchval(
            f"INSERT INTO {S}.callback_inbox (dedup_key, event, change_type, message,"
            " received_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $5)"
            " ON CONFLICT DO NOTHING RETURNING true",
            key,
            event,
            change_type,
            message,
            at,
        )
    )


async def claim_callback(conn: Connection, now: datetime) -> Any:
    """The oldest due pending callback, locked for this transaction."""
    return await conn.fetchrow(
        f"SELECT dedup_key, message, attempts FROM {S}.callback_inbox"
        " WHERE status = 'pending' AND next_attempt_at <= $1"
        " ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        now,
    )


async def finish_callback(conn: Connection, key: str, status: str) -> None:
    await conn.execute(
        f"UPDATE {S}.callback_inbox SET status = $2, attempts = attempts + 1 WHERE dedup_key = $1",
        key,
        status,
    )


async def fail_callback(
    conn: Connection, key: str, error: str, status: str, next_at: datetime
) -> None:
    await conn.execute(
        f"UPDATE {S}.callback_inbox SET attempts = attempts + 1, last_error = $2,"
        " status = $3, next_attempt_at = $4 WHERE dedup_key = $1",
        key,
        error[:500],
        status,
        next_at,
    )


async def callback_status(conn: Connection, key: str) -> Any:
    return await conn.fetchrow(
        f"SELECT status, attempts, last_error FROM {S}.callback_inbox WHERE dedup_key = $1", key
    )


# ---------------------------------------------------------------- contacts and bindings


async def upsert_contact(
    conn: Connection, external_userid: str, member_id: uuid.UUID, at: datetime
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.contacts (external_userid, member_id, updated_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (external_userid) DO UPDATE SET member_id = EXCLUDED.member_id,"
        " updated_at = EXCLUDED.updated_at",
        external_userid,
        member_id,
        at,
    )


async def contact_member(conn: Connection, external_userid: str) -> uuid.UUID | None:
    value = await conn.fetchval(
        f"SELECT member_id FROM {S}.contacts WHERE external_userid = $1", external_userid
    )
    return value  # type: ignore[no-any-return]


async def link_contact(conn: Connection, external_userid: str, staff_id: str, at: datetime) -> None:
    await conn.execute(
        f"INSERT INTO {S}.contact_links (external_userid, staff_id, added_at) VALUES ($1, $2, $3)"
        " ON CONFLICT (external_userid, staff_id) DO UPDATE SET removed_at = NULL",
        external_userid,
        staff_id,
        at,
    )


async def unlink_contact(
    conn: Connection, external_userid: str, staff_id: str, at: datetime
) -> None:
    await conn.execute(
        f"UPDATE {S}.contact_links SET removed_at = $3"
        " WHERE external_userid = $1 AND staff_id = $2 AND removed_at IS NULL",
        external_userid,
        staff_id,
        at,
    )


async def customers_of(conn: Connection, staff_id: str) -> list[tuple[str, uuid.UUID]]:
    """(external_userid, member_id) of the staff member's current WeCom contacts."""
    rows = await conn.fetch(
        f"SELECT l.external_userid, c.member_id FROM {S}.contact_links l"
        f" JOIN {S}.contacts c USING (external_userid)"
        " WHERE l.staff_id = $1 AND l.removed_at IS NULL ORDER BY l.external_userid",
        staff_id,
    )
    return [(r["external_userid"], r["member_id"]) for r in rows]


async def move_link(
    conn: Connection, external_userid: str, from_staff: str, to_staff: str, at: datetime
) -> None:
    await unlink_contact(conn, external_userid, from_staff, at)
    await link_contact(conn, external_userid, to_staff, at)


async def links_of_member(conn: Connection, member_id: uuid.UUID) -> list[tuple[str, str]]:
    """(staff_id, external_userid) of every live WeCom contact of the member."""
    rows = await conn.fetch(
        f"SELECT l.staff_id, l.external_userid FROM {S}.contact_links l"
        f" JOIN {S}.contacts c USING (external_userid)"
        " WHERE c.member_id = $1 AND l.removed_at IS NULL ORDER BY 1, 2",
        member_id,
    )
    return [(r["staff_id"], r["external_userid"]) for r in rows]


@dataclass(frozen=True)
class BindingRow:
    member_id: uuid.UUID
    staff_id: str
    store_id: str
    bound_at: datetime


async def get_binding(
    conn: Connection, member_id: uuid.UUID, lock: bool = False
) -> BindingRow | None:
    r = await conn.fetchrow(
        f"SELECT member_id, staff_id, store_id, bound_at FROM {S}.bindings WHERE member_id = $1"
        + (" FOR UPDATE" if lock else ""),
        member_id,
    )
    return BindingRow(**dict(r)) if r else None


async def lock_member(conn: Connection, member_id: uuid.UUID) -> None:
    """Serialises binding changes of one member (the row may not exist yet)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))", str(member_id)
    )


async def lock_member_binding(conn: Connection, member_id: uuid.UUID) -> BindingRow | None:
    """lock_member and get_binding in one statement (a consumed order: issue 19)."""
    r = await conn.fetchrow(
        "WITH l AS MATERIALIZED"
        " (SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 7)))"
        f" SELECT b.member_id, b.staff_id, b.store_id, b.bound_at FROM l"
        f" LEFT JOIN {S}.bindings b ON b.member_id = $1",
        member_id,
    )
    return BindingRow(**dict(r)) if r is not None and r["member_id"] is not None else None


async def set_binding(
    conn: Connection,
    member_id: uuid.UUID,
    from_staff: str,
    staff: StaffRow,
    reason: str,
    actor: str,
    at: datetime,
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.bindings (member_id, staff_id, store_id, bound_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE SET"
        " staff_id = EXCLUDED.staff_id, store_id = EXCLUDED.store_id, bound_at = EXCLUDED.bound_at",
        member_id,
        staff.staff_id,
        staff.store_id,
        at,
    )
    await conn.execute(
        f"INSERT INTO {S}.binding_history (member_id, from_staff_id, to_staff_id, reason, actor,"
        " changed_at) VALUES ($1, $2, $3, $4, $5, $6)",
        member_id,
        from_staff,
        staff.staff_id,
        reason,
        actor,
        at,
    )


async def binding_history(conn: Connection, member_id: uuid.UUID) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT from_staff_id, to_staff_id, reason, actor, changed_at"
            f" FROM {S}.binding_history WHERE member_id = $1 ORDER BY id DESC",
            member_id,
        )
    )


# ---------------------------------------------------------------- orders and attribution


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


async def members_for_tag_batch(conn: Connection, since: datetime) -> list[uuid.UUID]:
    """Members with orders in the window, or with rule tags to reconsider."""
    rows = await conn.fetch(
        f"SELECT member_id FROM {S}.orders WHERE ordered_at >= $1"
        f" UNION SELECT member_id FROM {S}.member_tags WHERE source = 'rule' ORDER BY 1",
        since,
    )
    return [r["member_id"] for r in rows]


# ---------------------------------------------------------------- tags


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
    conn: Connection, member_id: uuid.UUID, added: list[str], removed: list[str]
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.tag_pushes (member_id, added, removed) VALUES ($1, $2, $3)",
        member_id,
        added,
        removed,
    )


async def claim_tag_push(conn: Connection, max_attempts: int) -> Any:
    return await conn.fetchrow(
        f"SELECT id, member_id, added, removed FROM {S}.tag_pushes"
        " WHERE done_at IS NULL AND attempts < $1 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
        max_attempts,
    )


async def finish_tag_push(conn: Connection, push_id: int, error: str, at: datetime) -> None:
    await conn.execute(
        f"UPDATE {S}.tag_pushes SET attempts = attempts + 1, last_error = $2,"
        " done_at = CASE WHEN $2 = '' THEN $3::timestamptz END WHERE id = $1",
        push_id,
        error[:500],
        at,
    )


# ---------------------------------------------------------------- funnel


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


# ---------------------------------------------------------------- workstation


async def member_orders(conn: Connection, member_id: uuid.UUID, limit: int) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT order_id, store_id, channel, paid_amount_fen, refunded_amount_fen, ordered_at"
            f" FROM {S}.orders WHERE member_id = $1 ORDER BY ordered_at DESC LIMIT $2",
            member_id,
            limit,
        )
    )


async def add_note(
    conn: Connection, member_id: uuid.UUID, staff_id: str, text: str, at: datetime
) -> None:
    await conn.execute(
        f"INSERT INTO {S}.notes (member_id, staff_id, text, created_at) VALUES ($1, $2, $3, $4)",
        member_id,
        staff_id,
        text,
        at,
    )


async def notes_of(conn: Connection, member_id: uuid.UUID, limit: int = 20) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT text, staff_id, created_at FROM {S}.notes WHERE member_id = $1"
            " ORDER BY id DESC LIMIT $2",
            member_id,
            limit,
        )
    )


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


# ---------------------------------------------------------------- OneID merges


async def merge_member_rows(
    conn: Connection, merge_id: str, survivor: uuid.UUID, absorbed: uuid.UUID
) -> None:
    """What the absorbed member held here now belongs to the survivor: WeCom
    contacts, orders (attribution stays with its guide), tags, notes. Each
    moved row is recorded under the merge (merge_moves) for its unmerge."""
    contacts = await conn.fetch(
        f"UPDATE {S}.contacts SET member_id = $1 WHERE member_id = $2 RETURNING external_userid",
        survivor,
        absorbed,
    )
    orders = await conn.fetch(
        f"UPDATE {S}.orders SET member_id = $1 WHERE member_id = $2 RETURNING order_id",
        survivor,
        absorbed,
    )
    notes = await conn.fetch(
        f"UPDATE {S}.notes SET member_id = $1 WHERE member_id = $2 RETURNING id", survivor, absorbed
    )
    tags = await conn.fetch(
        f"SELECT tag, source, set_by, set_at FROM {S}.member_tags WHERE member_id = $1", absorbed
    )
    added = {
        (r["tag"], r["source"])
        for r in await conn.fetch(
            f"INSERT INTO {S}.member_tags (member_id, tag, source, set_by, set_at)"
            f" SELECT $1, tag, source, set_by, set_at FROM {S}.member_tags WHERE member_id = $2"
            " ON CONFLICT DO NOTHING RETURNING tag, source",
            survivor,
            absorbed,
        )
    }
    await conn.execute(f"DELETE FROM {S}.member_tags WHERE member_id = $1", absorbed)
    moves: list[tuple[str, str, dict[str, Any]]] = [
        *[("contact", r["external_userid"], {}) for r in contacts],
        *[("order", str(r["order_id"]), {}) for r in orders],
        *[("note", str(r["id"]), {}) for r in notes],
        *[
            (
                "tag",
                f"{r['source']}:{r['tag']}",
                {
                    "tag": r["tag"],
                    "source": r["source"],
                    "set_by": r["set_by"],
                    "set_at": r["set_at"].isoformat(),
                    "added_to_survivor": (r["tag"], r["source"]) in added,
                },
            )
            for r in tags
        ],
    ]
    await record_merge_moves(conn, merge_id, moves)


async def record_merge_moves(
    conn: Connection, merge_id: str, moves: list[tuple[str, str, dict[str, Any]]]
) -> None:
    await conn.executemany(
        f"INSERT INTO {S}.merge_moves (merge_id, kind, ref, detail) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        [(merge_id, kind, ref, json.dumps(detail)) for kind, ref, detail in moves],
    )


async def merge_moves(conn: Connection, merge_id: str) -> dict[str, list[tuple[str, Any]]]:
    """What the merge moved, by kind: [(ref, detail)]."""
    rows = await conn.fetch(
        f"SELECT kind, ref, detail FROM {S}.merge_moves WHERE merge_id = $1 ORDER BY kind, ref",
        merge_id,
    )
    out: dict[str, list[tuple[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["kind"], []).append((r["ref"], json.loads(r["detail"])))
    return out


async def unmerge_member_rows(
    conn: Connection,
    moves: dict[str, list[tuple[str, Any]]],
    survivor: uuid.UUID,
    restored: uuid.UUID,
) -> None:
    """Move back to the restored member exactly the contacts, orders, notes and
    tags its merge moved, where they still sit with the survivor."""
    refs = {kind: [ref for ref, _ in moves.get(kind, [])] for kind in ("contact", "order", "note")}
    await conn.execute(
        f"UPDATE {S}.contacts SET member_id = $1 WHERE member_id = $2"
        " AND external_userid = ANY($3::text[])",
        restored,
        survivor,
        refs["contact"],
    )
    await conn.execute(
        f"UPDATE {S}.orders SET member_id = $1 WHERE member_id = $2 AND order_id = ANY($3::uuid[])",
        restored,
        survivor,
        [uuid.UUID(r) for r in refs["order"]],
    )
    await conn.execute(
        f"UPDATE {S}.notes SET member_id = $1 WHERE member_id = $2 AND id = ANY($3::bigint[])",
        restored,
        survivor,
        [int(r) for r in refs["note"]],
    )
    for _, tag in moves.get("tag", []):
        set_at = datetime.fromisoformat(tag["set_at"])
        await conn.execute(
            f"INSERT INTO {S}.member_tags (member_id, tag, source, set_by, set_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            restored,
            tag["tag"],
            tag["source"],
            tag["set_by"],
            set_at,
        )
        if tag["added_to_survivor"]:
            # Only the copy the merge made: a tag set on the survivor since stays.
            await conn.execute(
                f"DELETE FROM {S}.member_tags WHERE member_id = $1 AND tag = $2 AND source = $3"
                " AND set_by = $4 AND set_at = $5",
                survivor,
                tag["tag"],
                tag["source"],
                tag["set_by"],
                set_at,
            )


async def forget_merge_moves(conn: Connection, merge_id: str) -> None:
    """The unmerge is applied: a later copy of its event finds nothing to move."""
    await conn.execute(f"DELETE FROM {S}.merge_moves WHERE merge_id = $1", merge_id)


async def restore_binding(
    conn: Connection,
    member_id: uuid.UUID,
    from_staff: str,
    staff_id: str,
    store_id: str,
    bound_at: datetime,
    actor: str,
    at: datetime,
) -> None:
    """Put back a binding as it was (its own bound_at: who bound first still
    counts); the history records the change at `at`."""
    await conn.execute(
        f"INSERT INTO {S}.bindings (member_id, staff_id, store_id, bound_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE SET"
        " staff_id = EXCLUDED.staff_id, store_id = EXCLUDED.store_id, bound_at = EXCLUDED.bound_at",
        member_id,
        staff_id,
        store_id,
        bound_at,
    )
    await conn.execute(
        f"INSERT INTO {S}.binding_history (member_id, from_staff_id, to_staff_id, reason, actor,"
        " changed_at) VALUES ($1, $2, $3, 'unmerge', $4, $5)",
        member_id,
        from_staff,
        staff_id,
        actor,
        at,
    )


async def drop_binding(
    conn: Connection, member_id: uuid.UUID, from_staff: str, actor: str, at: datetime
) -> None:
    """The member had no guide before the merge gave it one: none again."""
    await delete_binding(conn, member_id)
    await conn.execute(
        f"INSERT INTO {S}.binding_history (member_id, from_staff_id, to_staff_id, reason, actor,"
        " changed_at) VALUES ($1, $2, '', 'unmerge', $3, $4)",
        member_id,
        from_staff,
        actor,
        at,
    )


async def delete_binding(conn: Connection, member_id: uuid.UUID) -> None:
    await conn.execute(f"DELETE FROM {S}.bindings WHERE member_id = $1", member_id)


# ---------------------------------------------------------------- communities

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


# ---------------------------------------------------------------- guide tasks


async def open_task(
    conn: Connection,
    staff_id: str,
    journey_id: str,
    step_id: str,
    day: date,
    title: str,
    script: str,
    at: datetime,
) -> uuid.UUID:
    """The day's open task of this guide and journey step (made if none)."""
    await conn.execute(
        f"INSERT INTO {S}.guide_tasks (task_id, staff_id, journey_id, step_id, day, title, script,"
        " status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8)"
        " ON CONFLICT (staff_id, journey_id, step_id, day) WHERE status = 'open' DO NOTHING",
        uuid.uuid4(),
        staff_id,
        journey_id,
        step_id,
        day,
        title,
        script,
        at,
    )
    value = await conn.fetchval(
        f"SELECT task_id FROM {S}.guide_tasks WHERE staff_id = $1 AND journey_id = $2"
        " AND step_id = $3 AND day = $4 AND status = 'open'",
        staff_id,
        journey_id,
        step_id,
        day,
    )
    return value  # type: ignore[no-any-return]


async def add_target(conn: Connection, task_id: uuid.UUID, member_id: uuid.UUID, ext: str) -> None:
    await conn.execute(
        f"INSERT INTO {S}.task_targets (task_id, member_id, external_userid) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        task_id,
        member_id,
        ext,
    )


async def claim_task(conn: Connection, status: str, created_before: datetime) -> Any:
    return await conn.fetchrow(
        f"SELECT task_id, staff_id, script, msgid FROM {S}.guide_tasks"
        " WHERE status = $1 AND created_at <= $2 ORDER BY created_at LIMIT 1"
        " FOR UPDATE SKIP LOCKED",
        status,
        created_before,
    )


async def task_targets(conn: Connection, task_id: uuid.UUID) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT member_id, external_userid, status FROM {S}.task_targets WHERE task_id = $1"
            " ORDER BY external_userid",
            task_id,
        )
    )


async def set_task(
    conn: Connection, task_id: uuid.UUID, status: str, msgid: str | None = None
) -> None:
    await conn.execute(
        f"UPDATE {S}.guide_tasks SET status = $2, msgid = COALESCE($3, msgid) WHERE task_id = $1",
        task_id,
        status,
        msgid,
    )


async def set_target(conn: Connection, task_id: uuid.UUID, ext: str, status: str) -> None:
    await conn.execute(
        f"UPDATE {S}.task_targets SET status = $3 WHERE task_id = $1 AND external_userid = $2",
        task_id,
        ext,
        status,
    )


async def tasks_of(conn: Connection, staff_id: str) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT task_id, journey_id, step_id, day, title, script, status, created_at"
            f" FROM {S}.guide_tasks WHERE staff_id = $1 AND status <> 'done'"
            " ORDER BY created_at DESC LIMIT 50",
            staff_id,
        )
    )


async def live_link(conn: Connection, member_id: uuid.UUID, staff_id: str) -> str | None:
    value = await conn.fetchval(
        f"SELECT l.external_userid FROM {S}.contact_links l JOIN {S}.contacts c"
        " USING (external_userid) WHERE c.member_id = $1 AND l.staff_id = $2"
        " AND l.removed_at IS NULL ORDER BY l.added_at DESC LIMIT 1",
        member_id,
        staff_id,
    )
    return value  # type: ignore[no-any-return]


async def sent_task_ids(conn: Connection, limit: int = 500) -> list[uuid.UUID]:
    rows = await conn.fetch(
        f"SELECT task_id FROM {S}.guide_tasks WHERE status = 'sent' ORDER BY created_at LIMIT $1",
        limit,
    )
    return [r["task_id"] for r in rows]


async def lock_sent_task(conn: Connection, task_id: uuid.UUID) -> Any:
    return await conn.fetchrow(
        f"SELECT task_id, staff_id, msgid FROM {S}.guide_tasks WHERE task_id = $1"
        " AND status = 'sent' FOR UPDATE SKIP LOCKED",
        task_id,
    )
