"""SQL the guides service's subjects all use (asyncpg, schema-qualified): the
staff directory's rows (by id, by staff code, by store; upsert), the audit log,
and the per-member advisory lock that serialises a member's binding, tags and
merges.

Each subject's own SQL is beside it: callback_repository.py (the WeCom callback
inbox), binding_repository.py (contacts, their links to staff, the exclusive
guide and its history), attribution_repository.py (orders, refunds, the daily
report, the funnel), tag_repository.py, merge_repository.py (OneID merges and
unmerges), workstation_repository.py (orders and notes a guide sees),
grant_repository.py (coupon budgets and grants), community_repository.py and
task_repository.py (guide tasks).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
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


async def lock_member(conn: Connection, member_id: uuid.UUID) -> None:
    """Serialises binding changes of one member (the row may not exist yet)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))", str(member_id)
    )
