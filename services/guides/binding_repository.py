"""SQL of contacts and the exclusive guide (asyncpg, schema-qualified): WeCom
external contacts and the member each is, their links to staff (added,
removed, moved on a resigned-staff transfer), the member's binding to one
guide (read, read under the member's lock, set) and its history.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .repository import S, StaffRow


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


async def live_link(conn: Connection, member_id: uuid.UUID, staff_id: str) -> str | None:
    value = await conn.fetchval(
        f"SELECT l.external_userid FROM {S}.contact_links l JOIN {S}.contacts c"
        " USING (external_userid) WHERE c.member_id = $1 AND l.staff_id = $2"
        " AND l.removed_at IS NULL ORDER BY l.added_at DESC LIMIT 1",
        member_id,
        staff_id,
    )
    return value  # type: ignore[no-any-return]


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


async def lock_member_bindings(
    conn: Connection, member_ids: list[uuid.UUID]
) -> dict[uuid.UUID, BindingRow]:
    """lock_member_binding for several members in one statement: the locks
    in id order (volatile functions in the select list run after the ORDER
    BY), then their bindings."""
    rows = await conn.fetch(
        "WITH l AS MATERIALIZED (SELECT m, pg_advisory_xact_lock(hashtextextended(m::text, 7))"
        "  FROM unnest($1::uuid[]) AS m ORDER BY m)"
        f" SELECT b.member_id, b.staff_id, b.store_id, b.bound_at FROM l"
        f" JOIN {S}.bindings b ON b.member_id = l.m",
        member_ids,
    )
    return {r["member_id"]: BindingRow(**dict(r)) for r in rows}


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
