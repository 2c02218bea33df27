"""SQL of the tiering service (asyncpg; statements are schema-qualified)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from servicekit.db import Connection

from .domain import TierProgramme, parse_ladder, parse_metric


@dataclass(frozen=True)
class SpendRecord:
    member_id: str
    total_paid_fen: int
    order_count: int
    last_order_at: datetime | None


async def add_order(
    conn: Connection, member_id: uuid.UUID, paid_fen: int, ordered_at: datetime
) -> None:
    """Count one completed order. last_order_at only moves forward: offline
    orders replayed by a POS arrive after newer ones."""
    await conn.execute(
        "INSERT INTO tiering.member_spend AS s"
        " (member_id, total_paid_fen, order_count, last_order_at, updated_at)"
        " VALUES ($1, $2, 1, $3, now())"
        " ON CONFLICT (member_id) DO UPDATE SET"
        "  total_paid_fen = s.total_paid_fen + excluded.total_paid_fen,"
        "  order_count = s.order_count + 1,"
        "  last_order_at = greatest(s.last_order_at, excluded.last_order_at),"
        "  updated_at = now()",
        member_id,
        paid_fen,
        ordered_at,
    )


async def get_spend(conn: Connection, member_id: uuid.UUID) -> SpendRecord | None:
    row = await conn.fetchrow(
        "SELECT member_id, total_paid_fen, order_count, last_order_at"
        " FROM tiering.member_spend WHERE member_id = $1",
        member_id,
    )
    if row is None:
        return None
    return SpendRecord(
        str(row["member_id"]), row["total_paid_fen"], row["order_count"], row["last_order_at"]
    )


async def programme_at(conn: Connection, programme_id: str, at: datetime) -> TierProgramme | None:
    """The version of a programme in force at `at`: the latest effective_from not after it."""
    row = await conn.fetchrow(
        "SELECT programme_id, version, effective_from, qualifying_metric, window_months,"
        " ladder::text AS ladder FROM tiering.tier_programmes"
        " WHERE programme_id = $1 AND effective_from <= $2"
        " ORDER BY effective_from DESC, version DESC LIMIT 1",
        programme_id,
        at,
    )
    if row is None:
        return None
    return TierProgramme(
        programme_id=row["programme_id"],
        version=row["version"],
        effective_from=row["effective_from"],
        qualifying_metric=parse_metric(row["qualifying_metric"]),
        window_months=row["window_months"],
        ladder=parse_ladder(json.loads(row["ladder"])),
    )


async def insert_programme(conn: Connection, programme: TierProgramme) -> bool:
    """Store a programme version; False when that (programme_id, version) already exists.

    Versions are immutable once written: a change is a new version."""
    inserted = await conn.fetchval(
        "INSERT INTO tiering.tier_programmes"
        " (programme_id, version, effective_from, qualifying_metric, window_months, ladder)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb)"
        " ON CONFLICT (programme_id, version) DO NOTHING RETURNING true",
        programme.programme_id,
        programme.version,
        programme.effective_from,
        programme.qualifying_metric.value,
        programme.window_months,
        json.dumps(programme.ladder.to_json(), ensure_ascii=False),
    )
    return bool(inserted)
