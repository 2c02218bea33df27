"""SQL of the guide's workstation (asyncpg, schema-qualified): a member's
recent orders as the sidebar shows them, and the notes guides write on members.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .repository import S


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
