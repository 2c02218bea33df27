"""SQL of referral and the points mall (asyncpg; statements are schema-qualified).

The guarantees live in single statements:
- an invitee is linked once: INSERT ... ON CONFLICT (invitee_id) DO NOTHING;
- a reward per (referral, step, side) once: its primary key, claimed first;
- the inviter's cap, mall stock and the per-member limit: conditional
  UPDATE/UPSERT ... WHERE <still allowed> RETURNING, so concurrent callers
  queue on the row and the loser gets no row, never a negative count.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection

from .mall import ItemKind, ItemSpec, ItemStatus

# ---- OneID merges ---------------------------------------------------------------
# Referral and mall state stays on the member id it was written for; reads go
# through the merges in force. A member's *holder* follows absorbed -> survivor
# to the member who holds the person now; a holder's *cluster* is itself and
# everyone merged into it, directly or through a chain. An unmerge closes the
# merge row and every read resolves as before the merge.
MAX_MERGE_DEPTH = 32

HOLDER_SQL = (
    "WITH RECURSIVE up(member_id, depth) AS ("
    " SELECT $1::uuid, 0"
    " UNION ALL"
    " SELECT m.survivor_id, up.depth + 1 FROM up CROSS JOIN LATERAL"
    "  (SELECT survivor_id FROM rewards.member_merges"
    "   WHERE absorbed_id = up.member_id AND unmerged_at IS NULL"
    "   ORDER BY merged_at DESC LIMIT 1) m"
    f" WHERE up.depth < {MAX_MERGE_DEPTH})"
    " SELECT member_id FROM up ORDER BY depth DESC LIMIT 1"
)

# `down`: $1 and every member merged into it (a CTE of WITH RECURSIVE).
CLUSTER_CTE = (
    "down(member_id, depth) AS ("
    " SELECT $1::uuid, 0"
    " UNION"
    " SELECT m.absorbed_id, down.depth + 1 FROM down JOIN rewards.member_merges m"
    "  ON m.survivor_id = down.member_id AND m.unmerged_at IS NULL"
    f" WHERE down.depth < {MAX_MERGE_DEPTH})"
)

# Every merged member's holder, for reports over many members at once.
HOLDERS_CTE = (
    "chain(member_id, holder, depth) AS ("
    " SELECT absorbed_id, survivor_id, 1 FROM rewards.member_merges WHERE unmerged_at IS NULL"
    " UNION ALL"
    " SELECT c.member_id, m.survivor_id, c.depth + 1 FROM chain c"
    "  JOIN rewards.member_merges m ON m.absorbed_id = c.holder AND m.unmerged_at IS NULL"
    f"  WHERE c.depth < {MAX_MERGE_DEPTH}),"
    " holders AS (SELECT DISTINCT ON (member_id) member_id, holder FROM chain"
    "  ORDER BY member_id, depth DESC)"
)


async def record_merge(
    conn: Connection, merge_id: str, absorbed: uuid.UUID, survivor: uuid.UUID, at: datetime
) -> None:
    """MemberMerged, once per merge id (a replay changes nothing)."""
    await conn.execute(
        "INSERT INTO rewards.member_merges (merge_id, absorbed_id, survivor_id, merged_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (merge_id) DO NOTHING",
        merge_id,
        absorbed,
        survivor,
        at,
    )


async def record_unmerge(conn: Connection, merge_id: str, at: datetime) -> None:
    await conn.execute(
        "UPDATE rewards.member_merges SET unmerged_at = $2"
        " WHERE merge_id = $1 AND unmerged_at IS NULL",
        merge_id,
        at,
    )


async def holder_of(conn: Connection, member_id: uuid.UUID) -> uuid.UUID:
    """The member who holds `member_id`'s person now (itself when not merged away)."""
    value = await conn.fetchval(HOLDER_SQL, member_id)
    return value  # type: ignore[no-any-return]


async def person_of(conn: Connection, member_id: uuid.UUID) -> list[uuid.UUID]:
    """The person behind `member_id`: its holder first, then every member
    merged into the holder (directly or through a chain)."""
    holder = await holder_of(conn, member_id)
    rows = await conn.fetch(
        f"WITH RECURSIVE {CLUSTER_CTE} SELECT DISTINCT member_id FROM down", holder
    )
    return [holder, *sorted(r["member_id"] for r in rows if r["member_id"] != holder)]


# ---- referral ----------------------------------------------------------------


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


# ---- points mall -------------------------------------------------------------

ITEM_COLUMNS = (
    "id, name, kind, coupon_template_id, sku, points_price, cash_fen, stock_total,"
    " stock_remaining, per_member_limit, starts_at, ends_at, status, created_at, updated_at, seq"
)


@dataclass(frozen=True)
class ItemRow:
    item_id: uuid.UUID
    spec: ItemSpec
    stock_remaining: int
    status: ItemStatus
    created_at: datetime
    updated_at: datetime
    seq: int


def _item(row: Any) -> ItemRow:
    return ItemRow(
        item_id=row["id"],
        spec=ItemSpec(
            name=row["name"],
            kind=ItemKind(row["kind"]),
            points_price=row["points_price"],
            cash_fen=row["cash_fen"],
            stock_total=row["stock_total"],
            per_member_limit=row["per_member_limit"],
            coupon_template_id=row["coupon_template_id"] or "",
            sku=row["sku"] or "",
            starts_at=row["starts_at"],
            ends_at=row["ends_at"],
        ),
        stock_remaining=row["stock_remaining"],
        status=ItemStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        seq=row["seq"],
    )


async def insert_item(
    conn: Connection, item_id: uuid.UUID, spec: ItemSpec, status: ItemStatus
) -> ItemRow:
    row = await conn.fetchrow(
        "INSERT INTO rewards.mall_items (id, name, kind, coupon_template_id, sku, points_price,"
        " cash_fen, stock_total, stock_remaining, per_member_limit, starts_at, ends_at, status)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12)"
        f" RETURNING {ITEM_COLUMNS}",
        item_id,
        spec.name,
        spec.kind.value,
        spec.coupon_template_id or None,
        spec.sku or None,
        spec.points_price,
        spec.cash_fen,
        spec.stock_total,
        spec.per_member_limit,
        spec.starts_at,
        spec.ends_at,
        status.value,
    )
    return _item(row)


async def item(conn: Connection, item_id: uuid.UUID, *, lock: bool = False) -> ItemRow | None:
    row = await conn.fetchrow(
        f"SELECT {ITEM_COLUMNS} FROM rewards.mall_items WHERE id = $1"
        # NO KEY: an operator's change does not wait for exchanges in flight
        # (their foreign keys hold KEY SHARE); their stock UPDATE checks the version.
        + (" FOR NO KEY UPDATE" if lock else ""),
        item_id,
    )
    return _item(row) if row else None


async def update_item(conn: Connection, item_id: uuid.UUID, spec: ItemSpec) -> ItemRow | None:
    """Rewrite an item; the stock already exchanged stays exchanged (None when
    the new total is below it; the caller holds the row lock)."""
    row = await conn.fetchrow(
        "UPDATE rewards.mall_items SET name = $2, points_price = $3, cash_fen = $4,"
        " stock_remaining = $5 - (stock_total - stock_remaining), stock_total = $5,"
        " per_member_limit = $6, starts_at = $7, ends_at = $8, coupon_template_id = $9,"
        " sku = $10, kind = $11, updated_at = now()"
        " WHERE id = $1 AND $5 >= stock_total - stock_remaining"
        f" RETURNING {ITEM_COLUMNS}",
        item_id,
        spec.name,
        spec.points_price,
        spec.cash_fen,
        spec.stock_total,
        spec.per_member_limit,
        spec.starts_at,
        spec.ends_at,
        spec.coupon_template_id or None,
        spec.sku or None,
        spec.kind.value,
    )
    return _item(row) if row else None


async def set_item_status(conn: Connection, item_id: uuid.UUID, status: ItemStatus) -> ItemRow:
    row = await conn.fetchrow(
        "UPDATE rewards.mall_items SET status = $2, updated_at = now() WHERE id = $1"
        f" RETURNING {ITEM_COLUMNS}",
        item_id,
        status.value,
    )
    return _item(row)


async def list_items(
    conn: Connection, before: int | None, limit: int, on_sale_at: datetime | None
) -> list[ItemRow]:
    """Newest first; with `on_sale_at`, only items a member can exchange then."""
    rows = await conn.fetch(
        f"SELECT {ITEM_COLUMNS} FROM rewards.mall_items"
        " WHERE ($1::bigint IS NULL OR seq < $1)"
        " AND ($3::timestamptz IS NULL OR (status = 'active'"
        "  AND (starts_at IS NULL OR starts_at <= $3) AND (ends_at IS NULL OR ends_at > $3)))"
        " ORDER BY seq DESC LIMIT $2",
        before,
        limit,
        on_sale_at,
    )
    return [_item(r) for r in rows]


async def take_stock(
    conn: Connection, item_id: uuid.UUID, now: datetime, version: datetime
) -> bool:
    """Take one unit of the item, still as of `version` (its updated_at) and on
    sale now; False when sold out, off sale or changed meanwhile."""
    value = await conn.fetchval(
        "UPDATE rewards.mall_items SET stock_remaining = stock_remaining - 1"
        " WHERE id = $1 AND status = 'active' AND stock_remaining > 0 AND updated_at = $3"
        " AND (starts_at IS NULL OR starts_at <= $2) AND (ends_at IS NULL OR ends_at > $2)"
        " RETURNING true",
        item_id,
        now,
        version,
    )
    return bool(value)


async def count_member_exchange(
    conn: Connection, item_id: uuid.UUID, cluster: list[uuid.UUID], limit: int
) -> bool:
    """Count one exchange of the item by the person if under the limit (0:
    none): the holder's (cluster[0]) row plus what merged members exchanged
    before the merge."""
    value = await conn.fetchval(
        "WITH earlier AS (SELECT coalesce(sum(exchanged), 0) AS n FROM rewards.mall_member_counts"
        "  WHERE item_id = $1 AND member_id = ANY($4::uuid[]) AND member_id <> $2)"
        " INSERT INTO rewards.mall_member_counts AS c (item_id, member_id, exchanged)"
        " SELECT $1, $2, 1 FROM earlier WHERE $3 = 0 OR earlier.n < $3"
        " ON CONFLICT (item_id, member_id) DO UPDATE SET exchanged = c.exchanged + 1"
        " WHERE $3 = 0 OR c.exchanged + (SELECT n FROM earlier) < $3"
        " RETURNING exchanged",
        item_id,
        cluster[0],
        limit,
        cluster,
    )
    return value is not None


EXCHANGE_COLUMNS = (
    "id, member_id, exchange_key, request_hash, item_id, points, cash_fen,"
    " points_transaction_id, coupon_id, sku, fulfilment, created_at, seq,"
    " carrier, tracking_number, shipped_at"
)


async def exchange_by_key(conn: Connection, member_id: uuid.UUID, key: str) -> Any:
    return await conn.fetchrow(
        f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges"
        " WHERE member_id = $1 AND exchange_key = $2",
        member_id,
        key,
    )


async def insert_exchange(conn: Connection, values: dict[str, Any]) -> Any:
    """The new exchange, or None when the key was used (a concurrent retry
    waits for the winner's commit, then gets None)."""
    return await conn.fetchrow(
        "INSERT INTO rewards.mall_exchanges (id, member_id, exchange_key, request_hash, item_id,"
        " points, cash_fen, points_transaction_id, coupon_id, sku, fulfilment)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        f" ON CONFLICT (member_id, exchange_key) DO NOTHING RETURNING {EXCHANGE_COLUMNS}",
        values["id"],
        values["member_id"],
        values["exchange_key"],
        values["request_hash"],
        values["item_id"],
        values["points"],
        values["cash_fen"],
        values["points_transaction_id"],
        values["coupon_id"],
        values["sku"],
        values["fulfilment"],
    )


async def exchanges_of(
    conn: Connection,
    cluster: list[uuid.UUID] | None,
    before: int | None,
    limit: int,
    fulfilment: str | None = None,
) -> list[Any]:
    """Newest first: a person's (cluster) or, with None, every member's."""
    return list(
        await conn.fetch(
            f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges"
            " WHERE ($1::uuid[] IS NULL OR member_id = ANY($1::uuid[]))"
            " AND ($2::bigint IS NULL OR seq < $2) AND ($4::text IS NULL OR fulfilment = $4)"
            " ORDER BY seq DESC LIMIT $3",
            cluster,
            before,
            limit,
            fulfilment,
        )
    )


async def exchange(conn: Connection, exchange_id: uuid.UUID) -> Any:
    return await conn.fetchrow(
        f"SELECT {EXCHANGE_COLUMNS} FROM rewards.mall_exchanges WHERE id = $1", exchange_id
    )


async def ship_exchange(
    conn: Connection, exchange_id: uuid.UUID, carrier: str, tracking: str, at: datetime
) -> Any:
    """pending -> shipped; None when the exchange is not pending goods."""
    return await conn.fetchrow(
        "UPDATE rewards.mall_exchanges SET fulfilment = 'shipped', carrier = $2,"
        " tracking_number = $3, shipped_at = $4 WHERE id = $1 AND fulfilment = 'pending'"
        f" RETURNING {EXCHANGE_COLUMNS}",
        exchange_id,
        carrier,
        tracking,
        at,
    )
