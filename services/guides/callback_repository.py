"""SQL of the WeCom callback inbox (asyncpg, schema-qualified): signatures seen
(replays), the queue of callbacks to process (enqueue, claim, finish, fail with
backoff) and a callback's status.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .repository import S


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
