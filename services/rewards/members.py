"""Rewards' local projection of members, which checkout, the ledger and the
coupon wallet all read: the tier tiering last reported (and its points
multiplier) and the members erased. Written by the consumers of TierChanged
and MemberErased (consumers.py); SQL only (asyncpg, schema-qualified). And
which ids are members' at all: the member service answers (MemberGrpc)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import grpc

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.clients import create_channel
from servicekit.db import Connection
from servicekit.errors import DomainError, FailedPrecondition, NotFound, Unavailable

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


async def record_registration_store(conn: Connection, member_id: uuid.UUID, store_id: str) -> None:
    """The member's registration store as member's MemberZoneSet states it
    (the effective value; empty: none, the latest order's store stands in)."""
    await conn.execute(
        "INSERT INTO rewards.member_stores AS m (member_id, registration_store_id)"
        " VALUES ($1, NULLIF($2::text, '')) ON CONFLICT (member_id) DO UPDATE"
        " SET registration_store_id = excluded.registration_store_id",
        member_id,
        store_id,
    )


async def record_order_store(
    conn: Connection, member_id: uuid.UUID, store_id: str, ordered_at: datetime
) -> None:
    """The store of the member's latest order (an older one, replayed late,
    changes nothing)."""
    await conn.execute(
        "INSERT INTO rewards.member_stores AS m (member_id, order_store_id, order_store_at)"
        " VALUES ($1, $2, $3) ON CONFLICT (member_id) DO UPDATE"
        " SET order_store_id = excluded.order_store_id, order_store_at = excluded.order_store_at"
        " WHERE m.order_store_at IS NULL OR m.order_store_at <= excluded.order_store_at",
        member_id,
        store_id,
        ordered_at,
    )


async def record_order_stores(
    conn: Connection, stores: list[tuple[uuid.UUID, str, datetime]]
) -> None:
    """`record_order_store` for (member, store, ordered_at) of distinct members."""
    if len(stores) == 1:
        await record_order_store(conn, *stores[0])
    elif stores:
        await conn.execute(
            "INSERT INTO rewards.member_stores AS m (member_id, order_store_id, order_store_at)"
            " SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[])"
            " ON CONFLICT (member_id) DO UPDATE"
            " SET order_store_id = excluded.order_store_id,"
            "  order_store_at = excluded.order_store_at"
            " WHERE m.order_store_at IS NULL OR m.order_store_at <= excluded.order_store_at",
            [m for m, _, _ in stores],
            [s for _, s, _ in stores],
            [at for _, _, at in stores],
        )


async def is_erased(conn: Connection, member_id: uuid.UUID) -> bool:
    erased: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.erased_members WHERE member_id = $1)", member_id
    )
    return erased


async def record_erasure(conn: Connection, member_ids: list[uuid.UUID], erased_at: datetime) -> int:
    """Record erased members once (a redelivered event keeps the first time);
    returns how many were new. Waits for the explicit credits in flight for
    them (hold_members) and makes later ones wait for this commit, so none
    reads the mark before it is there and writes after it."""
    keys = sorted({_lock_key(m) for m in member_ids})
    await conn.execute(
        "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k ORDER BY k", keys
    )
    rows = await conn.fetch(
        "INSERT INTO rewards.erased_members (member_id, erased_at)"
        " SELECT DISTINCT unnest($1::uuid[]), $2::timestamptz"
        " ON CONFLICT (member_id) DO NOTHING RETURNING member_id",
        member_ids,
        erased_at,
    )
    return len(rows)


# ---- which ids are members' (the member service decides) -------------------
#
# Rewards keeps no registry of members, so an explicit credit (AdjustPoints,
# bulk earn) asks the member service, as POS CompleteOrder's gateway check
# does: an id member does not know is refused UNKNOWN_MEMBER, an erased one
# MEMBER_ERASED; an absorbed id is fine (rewards credits its survivor through
# the merges in force). Asked before the member locks are taken: one
# ResolveMemberIds call (one query on member) per 1,000 distinct ids, so a bulk
# batch (at most 1,000 lines) costs member one call, not one per line.

# Member's cap per ResolveMemberIds call (services/member/profile_handlers.py).
RESOLVE_BATCH = 1000

_STATE = member_pb2.ResolvedMemberId


class MemberDirectory(Protocol):
    async def refusals(self, member_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, DomainError]:
        """The ids member refuses, each with its error (UNKNOWN_MEMBER or
        MEMBER_ERASED); raises Unavailable (MEMBER_UNAVAILABLE) when member
        cannot answer, so nothing is credited unchecked."""
        ...


def _refusal(member_id: uuid.UUID, state: int) -> DomainError | None:
    if state in (_STATE.ACTIVE, _STATE.ABSORBED):
        return None
    if state == _STATE.UNKNOWN:
        return NotFound(
            f"member {member_id} does not exist", code="UNKNOWN_MEMBER", field="member_id"
        )
    if state == _STATE.ERASED:
        # As rewards refuses the erased members it knows of.
        return FailedPrecondition(
            f"member {member_id} was erased; no further points can be written",
            code="MEMBER_ERASED",
            field="member_id",
        )
    # A state this build does not know: not credited unchecked.
    raise Unavailable(
        f"the member service answered an unknown state {state} for {member_id}",
        code="MEMBER_UNAVAILABLE",
    )


class MemberGrpc:
    """The member service's ResolveMemberIds (MEMBER_ADDR)."""

    def __init__(self, target: str, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: member_pb2_grpc.MemberServiceStub | None = None

    def _member(self) -> member_pb2_grpc.MemberServiceStub:
        # Opened on first use, on the loop that serves: the service is built
        # (server.build) before that loop runs, and a channel made then is
        # bound to another loop (every call failed "attached to a different
        # loop").
        if self._stub is None:
            self._channel = create_channel(self._target)
            self._stub = member_pb2_grpc.MemberServiceStub(self._channel)
        return self._stub

    async def _states(self, ids: list[uuid.UUID]) -> list[int]:
        try:
            reply = await self._member().ResolveMemberIds(
                member_pb2.ResolveMemberIdsRequest(member_ids=[str(m) for m in ids]),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"the member service is unavailable: {exc.code().name}",
                code="MEMBER_UNAVAILABLE",
            ) from None
        if len(reply.members) != len(ids):
            raise Unavailable(
                f"the member service answered {len(reply.members)} of {len(ids)} ids",
                code="MEMBER_UNAVAILABLE",
            )
        return [r.state for r in reply.members]

    async def refusals(self, member_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, DomainError]:
        ids = sorted(set(member_ids))
        chunks = [ids[n : n + RESOLVE_BATCH] for n in range(0, len(ids), RESOLVE_BATCH)]
        answers = await asyncio.gather(*(self._states(c) for c in chunks))
        refused: dict[uuid.UUID, DomainError] = {}
        for chunk, states in zip(chunks, answers, strict=True):
            for m, state in zip(chunk, states, strict=True):
                error = _refusal(m, state)
                if error is not None:
                    refused[m] = error
        return refused

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _lock_key(member_id: uuid.UUID) -> int:
    """Signed 64-bit advisory lock key of a member id (its first 8 bytes)."""
    return int.from_bytes(member_id.bytes[:8], "big", signed=True)


async def hold_members(conn: Connection, member_ids: Iterable[uuid.UUID]) -> None:
    """Hold the members against an erasure until the transaction ends (shared:
    writers of different members and of the same member do not wait on each
    other). Take it before reading the erasure mark: an erasure being recorded
    then is waited for and seen; one recorded later waits for this write."""
    keys = sorted({_lock_key(m) for m in member_ids})
    if keys:
        await conn.execute(
            "SELECT pg_advisory_xact_lock_shared(k) FROM unnest($1::bigint[]) AS k ORDER BY k",
            keys,
        )
