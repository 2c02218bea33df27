"""SQL of referral (asyncpg; statements are schema-qualified).

The guarantees live in single statements:
- an invitee is linked once: INSERT ... ON CONFLICT (invitee_id) DO NOTHING;
- a reward per (referral, step, side) once: its primary key, claimed first;
- the inviter's cap: a conditional UPDATE/UPSERT ... WHERE <still allowed>
  RETURNING, so concurrent callers queue on the row and the loser gets no row,
  never a negative count.
Members are read through the merges in force (../merges.py).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from ..merges import CLUSTER_CTE, HOLDERS_CTE, MAX_MERGE_DEPTH


async def invite_code_of(conn: Connection, cluster: list[uuid.UUID]) -> Any:
    """The code of a merged person: the holder's own (cluster[0]) if it has
    one, else the oldest code any merged member shared."""
    return await conn.fetchrow(
        "SELECT member_id, code, created_at FROM rewards.invite_codes"
        " WHERE member_id = ANY($1::uuid[])"
        " ORDER BY member_id = $2 DESC, created_at, code LIMIT 1",
        cluster,
        cluster[0],
    )


async def insert_invite_code(conn: Connection, member_id: uuid.UUID, code: str) -> Any:
    """The new row, or None when the member already has one or the code is taken."""
    return await conn.fetchrow(
        "INSERT INTO rewards.invite_codes (member_id, code) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING member_id, code, created_at",
        member_id,
        code,
    )


async def inviter_of_code(conn: Connection, code: str) -> uuid.UUID | None:
    """The code's maker (whoever holds the maker after a merge: `holder_of`)."""
    value = await conn.fetchval("SELECT member_id FROM rewards.invite_codes WHERE code = $1", code)
    return value  # type: ignore[no-any-return]


async def insert_refusal(
    conn: Connection,
    code: str,
    invite_code: str,
    inviter: uuid.UUID | None,
    invitee: uuid.UUID,
    at: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO rewards.referral_refusals (code, invite_code, inviter_id, invitee_id,"
        " refused_at) VALUES ($1, $2, $3, $4, $5)",
        code,
        invite_code,
        inviter,
        invitee,
        at,
    )


REFERRAL_COLUMNS = (
    "id, inviter_id, invitee_id, invite_code, invitee_registered_at, accepted_at,"
    " first_order_id, first_order_at, seq"
)


async def referral_of_invitee(conn: Connection, cluster: list[uuid.UUID]) -> Any:
    """The person's referral: the first one accepted by any of its merged members."""
    return await conn.fetchrow(
        f"SELECT {REFERRAL_COLUMNS} FROM rewards.referrals WHERE invitee_id = ANY($1::uuid[])"
        " ORDER BY seq LIMIT 1",
        cluster,
    )


async def insert_referral(
    conn: Connection,
    referral_id: uuid.UUID,
    inviter_id: uuid.UUID,
    invitee_id: uuid.UUID,
    code: str,
    registered_at: datetime,
    now: datetime,
) -> Any:
    """The new referral, or None when the invitee is already linked (a
    concurrent accept waits for the winner's commit, then gets None)."""
    return await conn.fetchrow(
        "INSERT INTO rewards.referrals"
        " (id, inviter_id, invitee_id, invite_code, invitee_registered_at, accepted_at)"
        f" VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (invitee_id) DO NOTHING"
        f" RETURNING {REFERRAL_COLUMNS}",
        referral_id,
        inviter_id,
        invitee_id,
        code,
        registered_at,
        now,
    )


async def mark_first_order(
    conn: Connection, invitee_id: uuid.UUID, order_id: uuid.UUID, at: datetime
) -> Any:
    """The referral whose invitee just completed a first order; None when the
    person (the member and everyone merged into it) was not invited or already
    had a first order under any of its ids: a person's first order is one.
    One statement: it runs for every completed order."""
    return await conn.fetchrow(
        f"WITH RECURSIVE {CLUSTER_CTE}, person AS (SELECT DISTINCT member_id FROM down)"
        " UPDATE rewards.referrals SET first_order_id = $2, first_order_at = $3"
        " WHERE id = (SELECT id FROM rewards.referrals"
        "  WHERE invitee_id IN (SELECT member_id FROM person) ORDER BY seq LIMIT 1)"
        # Re-checked on the row a concurrent redelivery just updated (the
        # subqueries below keep the statement's snapshot): one grant, ever.
        " AND first_order_id IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM rewards.referrals"
        "  WHERE invitee_id IN (SELECT member_id FROM person) AND first_order_id IS NOT NULL)"
        f" RETURNING {REFERRAL_COLUMNS}",
        invitee_id,
        order_id,
        at,
    )


async def awaiting_first_order(conn: Connection, members: list[uuid.UUID]) -> set[uuid.UUID]:
    """Of these members, those whose person (the member and everyone merged
    into it) was invited and has a referral without a first order: the only
    ones `mark_first_order` can change."""
    rows = await conn.fetch(
        "WITH RECURSIVE down(root, member_id, depth) AS ("
        " SELECT m, m, 0 FROM unnest($1::uuid[]) AS m"
        " UNION"
        " SELECT down.root, mm.absorbed_id, down.depth + 1 FROM down"
        "  JOIN rewards.member_merges mm"
        "  ON mm.survivor_id = down.member_id AND mm.unmerged_at IS NULL"
        f" WHERE down.depth < {MAX_MERGE_DEPTH})"
        " SELECT DISTINCT root FROM down JOIN rewards.referrals r"
        "  ON r.invitee_id = down.member_id AND r.first_order_id IS NULL",
        members,
    )
    return {r["root"] for r in rows}


async def has_settled_orders(conn: Connection, cluster: list[uuid.UUID]) -> bool:
    value = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.orders"
        " WHERE member_id = ANY($1::uuid[]) AND status = 'settled')",
        cluster,
    )
    return bool(value)


async def invited_by(
    conn: Connection, invitees: list[uuid.UUID], inviters: list[uuid.UUID]
) -> bool:
    """Any member of the first cluster was invited by any of the second's."""
    value = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.referrals"
        " WHERE invitee_id = ANY($1::uuid[]) AND inviter_id = ANY($2::uuid[]))",
        invitees,
        inviters,
    )
    return bool(value)


async def lock_fingerprints(conn: Connection, prints: list[bytes]) -> None:
    """Serialise accepts sharing a device or identifier (sorted: no deadlock)."""
    for fp in prints:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('referral-fp:' || encode($1, 'hex'), 0))",
            fp,
        )


async def shares_fingerprint(
    conn: Connection, cluster: list[uuid.UUID], prints: list[bytes]
) -> bool:
    value = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.referral_fingerprints"
        " WHERE member_id = ANY($1::uuid[]) AND fingerprint = ANY($2::bytea[]))",
        cluster,
        prints,
    )
    return bool(value)


async def invitees_on_fingerprints(
    conn: Connection, prints: list[bytes], except_member: uuid.UUID
) -> int:
    """Other invitees behind the most used of these fingerprints."""
    value = await conn.fetchval(
        "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n"
        " FROM rewards.referral_fingerprints"
        " WHERE fingerprint = ANY($1::bytea[]) AND role = 'invitee' AND member_id <> $2"
        " GROUP BY fingerprint) AS per_print",
        prints,
        except_member,
    )
    return int(value)


async def record_fingerprints(
    conn: Connection, member_id: uuid.UUID, role: str, prints: list[bytes]
) -> None:
    await conn.executemany(
        "INSERT INTO rewards.referral_fingerprints (fingerprint, member_id, role)"
        " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        [(fp, member_id, role) for fp in prints],
    )


async def forget_fingerprints(conn: Connection, member_ids: list[uuid.UUID]) -> None:
    """An erased member's fingerprints (their referrals, money-like, stay)."""
    await conn.execute(
        "DELETE FROM rewards.referral_fingerprints WHERE member_id = ANY($1::uuid[])", member_ids
    )


async def claim_reward(
    conn: Connection, referral_id: uuid.UUID, step: str, role: str, member_id: uuid.UUID
) -> bool:
    """Claim one (referral, step, side); False when it was granted (or refused) before."""
    value = await conn.fetchval(
        "INSERT INTO rewards.referral_rewards (referral_id, step, role, member_id, status)"
        " VALUES ($1, $2, $3, $4, 'refused') ON CONFLICT DO NOTHING RETURNING true",
        referral_id,
        step,
        role,
        member_id,
    )
    return bool(value)


async def finish_reward(
    conn: Connection,
    referral_id: uuid.UUID,
    step: str,
    role: str,
    *,
    status: str,
    coupon_id: str | None,
    points: int,
    points_transaction_id: str | None,
    refusals: list[dict[str, str]],
) -> None:
    await conn.execute(
        "UPDATE rewards.referral_rewards SET status = $4, coupon_id = $5, points = $6,"
        " points_transaction_id = $7, refusals = $8::jsonb"
        " WHERE referral_id = $1 AND step = $2 AND role = $3",
        referral_id,
        step,
        role,
        status,
        coupon_id,
        points,
        points_transaction_id,
        json.dumps(refusals),
    )


async def count_inviter_reward(
    conn: Connection, cluster: list[uuid.UUID], period_start: datetime, cap: int
) -> bool:
    """Count one inviter reward in the period if under the cap; False past it.
    The count is the person's: the holder's (cluster[0]) row, where new
    rewards are counted, plus what merged members earned before the merge
    (their rows no longer change, so the holder's row lock serialises it)."""
    value = await conn.fetchval(
        "WITH earlier AS (SELECT coalesce(sum(rewarded), 0) AS n FROM rewards.referral_counters"
        "  WHERE inviter_id = ANY($4::uuid[]) AND inviter_id <> $1 AND period_start = $2)"
        " INSERT INTO rewards.referral_counters AS c (inviter_id, period_start, rewarded)"
        " SELECT $1, $2, 1 FROM earlier WHERE earlier.n < $3"
        " ON CONFLICT (inviter_id, period_start) DO UPDATE SET rewarded = c.rewarded + 1"
        " WHERE c.rewarded + (SELECT n FROM earlier) < $3"
        " RETURNING rewarded",
        cluster[0],
        period_start,
        cap,
        cluster,
    )
    return value is not None


async def referrals_of_inviter(
    conn: Connection, cluster: list[uuid.UUID], before: int | None, limit: int
) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {REFERRAL_COLUMNS} FROM rewards.referrals"
            " WHERE inviter_id = ANY($1::uuid[]) AND ($2::bigint IS NULL OR seq < $2)"
            " ORDER BY seq DESC LIMIT $3",
            cluster,
            before,
            limit,
        )
    )


async def rewards_of(conn: Connection, referral_ids: list[uuid.UUID]) -> list[Any]:
    return list(
        await conn.fetch(
            "SELECT referral_id, step, role, member_id, status, coupon_id, points,"
            " points_transaction_id, refusals, created_at FROM rewards.referral_rewards"
            " WHERE referral_id = ANY($1::uuid[]) ORDER BY created_at, step, role",
            referral_ids,
        )
    )


async def fission_counts(
    conn: Connection, start: datetime, end: datetime
) -> tuple[int, int, int, int, int]:
    """Inviters and invitees of referrals accepted in [start, end); the
    invitees those invitees brought in by `end` (the second generation); the
    period's inviters never invited before `end` (seeds) and their invitees."""
    # Over people, not ids: each referral's sides resolved to their holders.
    row = await conn.fetchrow(
        f"WITH RECURSIVE {HOLDERS_CTE},"
        " people AS (SELECT coalesce(hi.holder, r.inviter_id) AS inviter_id,"
        "  coalesce(he.holder, r.invitee_id) AS invitee_id, r.accepted_at"
        "  FROM rewards.referrals r LEFT JOIN holders hi ON hi.member_id = r.inviter_id"
        "  LEFT JOIN holders he ON he.member_id = r.invitee_id WHERE r.accepted_at < $2),"
        " first AS (SELECT inviter_id, invitee_id FROM people WHERE accepted_at >= $1)"
        " SELECT (SELECT count(DISTINCT inviter_id) FROM first) AS inviters,"
        "  (SELECT count(*) FROM first) AS invitees,"
        "  (SELECT count(*) FROM people r JOIN first f ON r.inviter_id = f.invitee_id)"
        "   AS second_generation,"
        "  (SELECT count(DISTINCT inviter_id) FROM first f WHERE NOT EXISTS"
        "   (SELECT 1 FROM people p WHERE p.invitee_id = f.inviter_id)) AS seed_inviters,"
        "  (SELECT count(*) FROM first f WHERE NOT EXISTS"
        "   (SELECT 1 FROM people p WHERE p.invitee_id = f.inviter_id)) AS seed_invitees",
        start,
        end,
    )
    assert row is not None
    return (
        int(row["inviters"]),
        int(row["invitees"]),
        int(row["second_generation"]),
        int(row["seed_inviters"]),
        int(row["seed_invitees"]),
    )
