"""Rewards' local projection of members, which checkout, the ledger and the
coupon wallet all read: the tier tiering last reported (and its points
multiplier) and the members erased. Written by the consumers of TierChanged
and MemberErased (consumers.py); SQL only (asyncpg, schema-qualified)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from servicekit.db import Connection

from .merges import HOLDER_SQL


@dataclass(frozen=True)
class MemberState:
    """What checkout needs about a member besides the order: the tier last
    reported by tiering (and its multiplier, when the event carried one) and
    whether the member was erased."""

    tier_code: str | None
    multiplier_bp: int | None
    erased: bool


@dataclass(frozen=True)
class OrderMember:
    """Checkout's one read: who holds the member id the till sent (itself,
    unless merged away), the holder's state, and whether the id sent was erased."""

    holder: uuid.UUID
    state: MemberState
    sent_erased: bool


ORDER_MEMBER_SQL = (
    f"WITH h AS ({HOLDER_SQL})"
    " SELECT h.member_id AS holder, t.tier_code, t.points_multiplier_bp,"
    " EXISTS (SELECT 1 FROM rewards.erased_members e WHERE e.member_id = h.member_id) AS erased,"
    " EXISTS (SELECT 1 FROM rewards.erased_members e WHERE e.member_id = $1) AS sent_erased"
    " FROM h LEFT JOIN rewards.member_tiers t ON t.member_id = h.member_id"
)


async def order_member(conn: Connection, member_id: uuid.UUID) -> OrderMember:
    """merges.holder_of, member_state of the holder and is_erased of the id
    sent, in one round trip (checkout)."""
    row = await conn.fetchrow(ORDER_MEMBER_SQL, member_id)
    assert row is not None  # the holder chain starts at $1: always one row
    return OrderMember(
        row["holder"],
        MemberState(row["tier_code"], row["points_multiplier_bp"], row["erased"]),
        row["sent_erased"],
    )


async def member_state(conn: Connection, member_id: uuid.UUID) -> MemberState:
    row = await conn.fetchrow(
        "SELECT t.tier_code, t.points_multiplier_bp,"
        " EXISTS (SELECT 1 FROM rewards.erased_members e WHERE e.member_id = $1) AS erased"
        " FROM (SELECT 1) one"
        " LEFT JOIN rewards.member_tiers t ON t.member_id = $1",
        member_id,
    )
    assert row is not None
    return MemberState(row["tier_code"], row["points_multiplier_bp"], row["erased"])


async def record_tier(
    conn: Connection,
    member_id: uuid.UUID,
    tier_code: str,
    changed_at: datetime,
    multiplier_bp: int | None = None,
) -> None:
    """Project a TierChanged event; an older event never overwrites a newer one.
    A newer event without a multiplier clears the stored one (the configured
    multiplier of its tier code applies)."""
    await conn.execute(
        "INSERT INTO rewards.member_tiers AS t"
        " (member_id, tier_code, changed_at, points_multiplier_bp)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE"
        " SET tier_code = EXCLUDED.tier_code, changed_at = EXCLUDED.changed_at,"
        " points_multiplier_bp = EXCLUDED.points_multiplier_bp"
        " WHERE t.changed_at <= EXCLUDED.changed_at",
        member_id,
        tier_code,
        changed_at,
        multiplier_bp,
    )


async def is_erased(conn: Connection, member_id: uuid.UUID) -> bool:
    erased: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.erased_members WHERE member_id = $1)", member_id
    )
    return erased


async def record_erasure(conn: Connection, member_ids: list[uuid.UUID], erased_at: datetime) -> int:
    """Record erased members once (a redelivered event keeps the first time);
    returns how many were new."""
    rows = await conn.fetch(
        "INSERT INTO rewards.erased_members (member_id, erased_at)"
        " SELECT DISTINCT unnest($1::uuid[]), $2::timestamptz"
        " ON CONFLICT (member_id) DO NOTHING RETURNING member_id",
        member_ids,
        erased_at,
    )
    return len(rows)
