"""SQL of guide tasks (asyncpg, schema-qualified): a journey's request gathered
into the day's task of one guide and step, its target customers, claiming a
task to send, the sent tasks to track, and a guide's task list.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from servicekit.db import Connection

from .repository import S


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
            f" FROM {S}.guide_tasks WHERE staff_id = $1 AND status IN ('open', 'sent')"
            " ORDER BY created_at DESC LIMIT 50",
            staff_id,
        )
    )


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
