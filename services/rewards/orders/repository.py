"""SQL of stores and orders (asyncpg; statements are schema-qualified). The
local projection of members the contexts share (tier, erasure) is
`services/rewards/members.py`.

Every function takes a plain asyncpg connection, so the benchmark runs the
very statements the service runs. A plain order (no points or coupons spent,
no daily cap) is first tried without BEGIN and COMMIT: the member read
(members.order_member, skipped when the id's last order was settled this way)
and `settle_order`, one statement doing all of the below, which writes
nothing unless it settles (then the transaction decides). CompleteOrder is
otherwise, inside one transaction:

1. `claim_member_order` - one statement: the member read (holder, tier,
                      erasure: members.order_member) and `claim_order`'s
                      claim, made only for a member not erased.
   `claim_order`    - the claim alone: the key INSERT ... SELECT FROM stores ...
                      ON CONFLICT DO NOTHING into order_keys, then the order
                      from it, RETURNING: settles the order only for an active
                      store, and the unique (store_id, pos_transaction_id) key
                      picks exactly one winner among concurrent retries (losers
                      wait, then get no row), whatever month's partition holds
                      the first.
   (when the order spends points: the member's lock, lazy expiry, and one
   `ledger.post` statement for the redemption; see points/handlers.py)
2. `record_earning` - one CTE statement: ledger transaction + its entries + the
                      lot + balance upsert (repaying debt first) + the order's
                      balance-after + the outbox row of OrderCompleted.

A call that claims nothing runs `find_order` instead: the winner's row (a
replay, or a different body: conflict) or the store's status (unknown/closed),
found through order_keys (its created_at prunes the order's partitions).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from servicekit.db import Connection

from ..kernel import OrderLine
from ..members import ORDER_MEMBER_SQL, MemberState, OrderMember
from ..merges import HOLDER_SQL


@dataclass(frozen=True)
class NewOrder:
    order_id: uuid.UUID
    store_id: str
    pos_transaction_id: str
    member_id: uuid.UUID
    channel: str
    paid_amount_fen: int
    gross_amount_fen: int | None
    lines: tuple[OrderLine, ...]
    ordered_at: datetime
    request_hash: bytes
    points_earned: int
    points_redeemed: int = 0


@dataclass(frozen=True)
class Earning:
    """The ledger side of a settled order."""

    transaction_id: uuid.UUID
    member_id: uuid.UUID
    order_id: uuid.UUID
    idempotency_key: str
    points: int
    rule: dict[str, object]
    # The lot the points land in, and its clock.
    lot_id: uuid.UUID
    earned_at: datetime
    expires_at: datetime
    # Set when points stay pending until then (refund window).
    activates_at: datetime | None = None
    # The order's OrderCompleted outbox row (event id, type, envelope),
    # written by the same statement.
    event: tuple[str, str, bytes] | None = None


@dataclass(frozen=True)
class BalanceRecord:
    member_id: str
    available: int
    lifetime_earned: int


@dataclass(frozen=True)
class SettledOrder:
    order_id: str
    request_hash: bytes
    points_earned: int
    points_balance_after: int
    points_redeemed: int = 0
    status: str = "settled"
    rejection: dict[str, str] | None = None
    coupon_discount_fen: int = 0


@dataclass(frozen=True)
class OrderLookup:
    """What exists under an idempotency key: the store's status and the order, if any."""

    store_status: str | None
    order: SettledOrder | None


@dataclass(frozen=True)
class StoreRecord:
    store_id: str
    name: str
    city: str
    address: str
    latitude: Decimal
    longitude: Decimal
    status: str
    time_zone: str = "Asia/Shanghai"


def lines_json(lines: tuple[OrderLine, ...]) -> str:
    return json.dumps(
        [
            {
                "sku": line.sku,
                "name": line.name,
                "category": line.category,
                "quantity": line.quantity,
                "paid_amount_fen": line.paid_amount_fen,
            }
            for line in lines
        ],
        ensure_ascii=False,
        separators=(",", ":"),
    )


# The order's key first (order_keys: unique (store_id, pos_transaction_id)
# whatever partition holds the order), then the order itself, in one
# statement: concurrent retries wait on the key's unique index and the losers
# get no row, as on the plain table. Both take created_at from this
# transaction's now(): the order's partition (the key trigger on orders finds
# this very key and writes nothing more).
CLAIM_ORDER_SQL = """
WITH k AS (
    INSERT INTO rewards.order_keys (id, store_id, pos_transaction_id, created_at)
    SELECT $1::uuid, s.store_id, $3::text, now()
    FROM rewards.stores s
    WHERE s.store_id = $2::text AND s.status = 'active'
    ON CONFLICT (store_id, pos_transaction_id) DO NOTHING
    RETURNING id, store_id, pos_transaction_id, created_at
)
INSERT INTO rewards.orders (
    id, store_id, pos_transaction_id, member_id, channel, paid_amount_fen,
    gross_amount_fen, lines, ordered_at, request_hash, points_earned, points_redeemed,
    created_at)
SELECT k.id, k.store_id, k.pos_transaction_id, $4::uuid, $5::text, $6::bigint,
       $7::bigint, $8::jsonb, $9::timestamptz, $10::bytea, $11::bigint, $12::bigint,
       k.created_at
FROM k
RETURNING id
"""

# Checkout's first statement: the member read (members.ORDER_MEMBER_SQL:
# the holder of the id sent, its tier and multiplier, both ids' erasure) and
# CLAIM_ORDER_SQL's claim in one round trip. The claim is made only for a
# member neither erased nor held by an erased one, so an erased member's order
# writes nothing, as when the read went first; the order is the holder's
# (merges). $1 is the id the till sent (HOLDER_SQL's parameter).
CLAIM_MEMBER_ORDER_SQL = f"""
WITH m AS ({ORDER_MEMBER_SQL}
), k AS (
    INSERT INTO rewards.order_keys (id, store_id, pos_transaction_id, created_at)
    SELECT $2::uuid, s.store_id, $4::text, now()
    FROM rewards.stores s, m
    WHERE s.store_id = $3::text AND s.status = 'active' AND NOT m.erased AND NOT m.sent_erased
    ON CONFLICT (store_id, pos_transaction_id) DO NOTHING
    RETURNING id, store_id, pos_transaction_id, created_at
), o AS (
    INSERT INTO rewards.orders (
        id, store_id, pos_transaction_id, member_id, channel, paid_amount_fen,
        gross_amount_fen, lines, ordered_at, request_hash, points_earned, points_redeemed,
        created_at)
    SELECT k.id, k.store_id, k.pos_transaction_id, m.holder, $5::text, $6::bigint,
           $7::bigint, $8::jsonb, $9::timestamptz, $10::bytea, $11::bigint, $12::bigint,
           k.created_at
    FROM k, m
    RETURNING id
)
SELECT m.holder, m.tier_code, m.points_multiplier_bp, m.erased, m.sent_erased,
       EXISTS (SELECT 1 FROM o) AS claimed
FROM m
"""


@dataclass(frozen=True)
class MemberClaim:
    """What CLAIM_MEMBER_ORDER_SQL found and did: the member as checkout
    reads it, and whether the order was claimed (False: erased, a replay, or
    the store unknown or closed)."""

    member: OrderMember
    claimed: bool


async def claim_member_order(conn: Connection, order: NewOrder) -> MemberClaim:
    """members.order_member of `order.member_id` (the id sent) and, unless it
    or its holder is erased, claim_order of the order for the holder: one
    round trip for checkout's first two."""
    row = await conn.fetchrow(
        CLAIM_MEMBER_ORDER_SQL,
        order.member_id,
        order.order_id,
        order.store_id,
        order.pos_transaction_id,
        order.channel,
        order.paid_amount_fen,
        order.gross_amount_fen,
        lines_json(order.lines),
        order.ordered_at,
        order.request_hash,
        order.points_earned,
        order.points_redeemed,
    )
    assert row is not None  # the holder chain starts at $1: always one row
    member = OrderMember(
        row["holder"],
        MemberState(row["tier_code"], row["points_multiplier_bp"], row["erased"]),
        row["sent_erased"],
    )
    return MemberClaim(member, row["claimed"])


# Writes to the order its own claim made, in the claim's transaction: its
# created_at is this transaction's now() (CLAIM_ORDER_SQL), which prunes every
# other partition at executor start, in the generic plan too.
THIS_TRANSACTIONS_ORDER = "created_at = now()"


async def claim_order(conn: Connection, order: NewOrder) -> bool:
    """Insert the order if its key is free and its store is active; True if inserted."""
    inserted = await conn.fetchval(
        CLAIM_ORDER_SQL,
        order.order_id,
        order.store_id,
        order.pos_transaction_id,
        order.member_id,
        order.channel,
        order.paid_amount_fen,
        order.gross_amount_fen,
        lines_json(order.lines),
        order.ordered_at,
        order.request_hash,
        order.points_earned,
        order.points_redeemed,
    )
    return inserted is not None


async def reject_order(conn: Connection, order_id: uuid.UUID, rejection: dict[str, str]) -> None:
    """Store a refusal on the claimed order: retries of the same body replay it."""
    await conn.execute(
        "UPDATE rewards.orders SET status = 'rejected', points_earned = 0, points_redeemed = 0,"
        f" rejection = $2::jsonb WHERE id = $1 AND {THIS_TRANSACTIONS_ORDER}",
        order_id,
        json.dumps(rejection, sort_keys=True),
    )


# The journal entries of an earning's `txn` (wallet or pending, less the debt
# it repays, which `calc` gives), for RECORD_EARNING_SQL and SETTLE_ORDER_SQL;
# {pending} is the statement's "points start pending" parameter.
_EARN_ENTRIES_SQL = """), entries AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT id, CASE WHEN {pending}::bool THEN 'member_pending' ELSE 'member_wallet' END, member_id,
           amount - calc.repay
    FROM txn, calc WHERE amount > calc.repay
    UNION ALL
    SELECT id, 'member_debt', member_id, calc.repay FROM txn, calc WHERE calc.repay > 0
    UNION ALL
    SELECT id, 'issued_liability', NULL, -amount FROM txn
"""


# Entries are derived from the one amount in a single statement, so they sum
# to zero by construction. The balance row is locked first (`cur`): debt left
# by an earlier refund is repaid out of this earn before anything is credited,
# and the rest becomes a lot (pending during the refund window, if configured)
# with its expiry. A zero-point order writes no transaction but still upserts
# the balance (to return it) and records balance-after on the order.
RECORD_EARNING_SQL = f"""
WITH cur AS (
    SELECT debt FROM rewards.points_balances WHERE member_id = $2::uuid FOR UPDATE
), calc AS (
    SELECT CASE WHEN $8::bool THEN 0
                ELSE least(coalesce((SELECT debt FROM cur), 0), $5::bigint) END AS repay
), txn AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, order_id, idempotency_key, amount, rule)
    SELECT $1::uuid, $2::uuid, 'earn', $3::uuid, $4::text, $5::bigint, $6::jsonb
    WHERE $5::bigint > 0
    RETURNING id, member_id, amount
{_EARN_ENTRIES_SQL.format(pending="$8")}), lot AS (
    INSERT INTO rewards.points_lots
        (id, member_id, transaction_id, root_lot_id, order_id, points, remaining, status,
         earned_at, activates_at, expires_at)
    SELECT $7::uuid, member_id, id, $7::uuid, $3::uuid, amount - calc.repay,
           amount - calc.repay, CASE WHEN $8::bool THEN 'pending' ELSE 'active' END,
           $9::timestamptz, $10::timestamptz, $11::timestamptz
    FROM txn, calc WHERE amount > calc.repay
), balance AS (
    INSERT INTO rewards.points_balances AS b
        (member_id, available, pending, lifetime_earned, updated_at)
    VALUES ($2::uuid,
            CASE WHEN $8::bool THEN 0 ELSE $5::bigint END,
            CASE WHEN $8::bool THEN $5::bigint ELSE 0 END,
            $5::bigint, now())
    ON CONFLICT (member_id) DO UPDATE
    SET available = b.available + EXCLUDED.available - (SELECT repay FROM calc),
        pending = b.pending + EXCLUDED.pending,
        debt = b.debt - (SELECT repay FROM calc),
        lifetime_earned = b.lifetime_earned + EXCLUDED.lifetime_earned,
        updated_at = EXCLUDED.updated_at
    RETURNING available, lifetime_earned
), event AS (
    INSERT INTO rewards.outbox (event_id, event_type, envelope)
    SELECT $12::uuid, $13::text, $14::bytea WHERE $12::uuid IS NOT NULL
), settled AS (
    -- The final points (tier multiplier, daily cap) replace the claim's estimate.
    UPDATE rewards.orders
    SET points_balance_after = (SELECT available FROM balance), points_earned = $5::bigint
    WHERE id = $3::uuid AND {THIS_TRANSACTIONS_ORDER}
    RETURNING id
)
SELECT available, lifetime_earned, EXISTS (SELECT 1 FROM settled) AS settled FROM balance
"""


async def record_earning(conn: Connection, earning: Earning) -> BalanceRecord:
    """Journal the points of a just-claimed order and move the balance, in one statement."""
    row = await conn.fetchrow(
        RECORD_EARNING_SQL,
        earning.transaction_id,
        earning.member_id,
        earning.order_id,
        earning.idempotency_key,
        earning.points,
        json.dumps(earning.rule, sort_keys=True),
        earning.lot_id,
        earning.activates_at is not None,
        earning.earned_at,
        earning.activates_at,
        earning.expires_at,
        *(earning.event or (None, None, None)),
    )
    assert row is not None
    # The order is this transaction's own claim (THIS_TRANSACTIONS_ORDER).
    assert row["settled"], f"order {earning.order_id} was not claimed by this transaction"
    return BalanceRecord(str(earning.member_id), row["available"], row["lifetime_earned"])


# HOLDER_SQL of the id the till sent ($21 in SETTLE_ORDER_SQL).
SENT_HOLDER_SQL = HOLDER_SQL.replace("$1::uuid", "$21::uuid")
assert SENT_HOLDER_SQL.count("$21::uuid") == 1 and "$1::" not in SENT_HOLDER_SQL

# CompleteOrder in one statement, outside a transaction (handlers.
# complete_order_now): CLAIM_ORDER_SQL's key, then RECORD_EARNING_SQL's
# journal, entries, lot, balance and OrderCompleted, all FROM the key's row,
# so a key already taken (a replay, or a concurrent retry that won: losers
# wait on the key's unique index, then get no row), a store not active, an
# erased id (the one sent or its holder, $4) or a member no longer as the
# order was priced (`g`: the holder of the id sent ($21) is $4, and $4's tier
# row is absent ($23 false) or is ($24, $25)) writes nothing and returns no
# row: the statement settles exactly what the member read it was priced on
# would have. The order goes in last with its final points and balance-after (a
# statement's CTEs do not see each other's rows: nothing to update).
SETTLE_ORDER_SQL = f"""
WITH g AS (
    SELECT NOT EXISTS (SELECT 1 FROM rewards.erased_members e
                       WHERE e.member_id IN ($4::uuid, $21::uuid))
       AND ({SENT_HOLDER_SQL}) = $4::uuid
       AND EXISTS (SELECT 1 FROM rewards.member_tiers t WHERE t.member_id = $4::uuid)
           = $23::bool
       AND NOT EXISTS (SELECT 1 FROM rewards.member_tiers t WHERE t.member_id = $4::uuid
                       AND (t.tier_code, t.points_multiplier_bp)
                           IS DISTINCT FROM ($24::text, $25::int)) AS member_as_priced
), k AS (
    INSERT INTO rewards.order_keys (id, store_id, pos_transaction_id, created_at)
    SELECT $1::uuid, s.store_id, $3::text, now()
    FROM rewards.stores s, g
    WHERE s.store_id = $2::text AND s.status = 'active' AND g.member_as_priced
    ON CONFLICT (store_id, pos_transaction_id) DO NOTHING
    RETURNING id, store_id, pos_transaction_id, created_at
), cur AS (
    SELECT debt FROM rewards.points_balances
    WHERE member_id = $4::uuid AND EXISTS (SELECT 1 FROM k) FOR UPDATE
), calc AS (
    SELECT CASE WHEN $15::bool THEN 0
                ELSE least(coalesce((SELECT debt FROM cur), 0), $10::bigint) END AS repay
), txn AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, order_id, idempotency_key, amount, rule)
    SELECT $11::uuid, $4::uuid, 'earn', k.id, $12::text, $10::bigint, $13::jsonb
    FROM k WHERE $10::bigint > 0
    RETURNING id, member_id, amount
{_EARN_ENTRIES_SQL.format(pending="$15")}), lot AS (
    INSERT INTO rewards.points_lots
        (id, member_id, transaction_id, root_lot_id, order_id, points, remaining, status,
         earned_at, activates_at, expires_at)
    SELECT $14::uuid, member_id, id, $14::uuid, $1::uuid, amount - calc.repay,
           amount - calc.repay, CASE WHEN $15::bool THEN 'pending' ELSE 'active' END,
           $9::timestamptz, $16::timestamptz, $17::timestamptz
    FROM txn, calc WHERE amount > calc.repay
), balance AS (
    INSERT INTO rewards.points_balances AS b
        (member_id, available, pending, lifetime_earned, updated_at)
    SELECT $4::uuid,
           CASE WHEN $15::bool THEN 0 ELSE $10::bigint END,
           CASE WHEN $15::bool THEN $10::bigint ELSE 0 END,
           $10::bigint, now()
    FROM k
    ON CONFLICT (member_id) DO UPDATE
    SET available = b.available + EXCLUDED.available - (SELECT repay FROM calc),
        pending = b.pending + EXCLUDED.pending,
        debt = b.debt - (SELECT repay FROM calc),
        lifetime_earned = b.lifetime_earned + EXCLUDED.lifetime_earned,
        updated_at = EXCLUDED.updated_at
    RETURNING available, lifetime_earned
), event AS (
    INSERT INTO rewards.outbox (event_id, event_type, envelope)
    SELECT $18::uuid, $19::text, $20::bytea FROM k
), o AS (
    INSERT INTO rewards.orders (
        id, store_id, pos_transaction_id, member_id, channel, paid_amount_fen,
        gross_amount_fen, lines, ordered_at, request_hash, points_earned, points_redeemed,
        points_balance_after, created_at)
    SELECT k.id, k.store_id, k.pos_transaction_id, $4::uuid, $5::text, $6::bigint,
           $7::bigint, $8::jsonb, $9::timestamptz, $22::bytea, $10::bigint, 0,
           (SELECT available FROM balance), k.created_at
    FROM k
    RETURNING id
)
SELECT available, lifetime_earned FROM balance WHERE EXISTS (SELECT 1 FROM o)
"""


async def settle_order(
    conn: Connection,
    order: NewOrder,
    earning: Earning,
    sent_member_id: uuid.UUID,
    priced_on: MemberState,
) -> BalanceRecord | None:
    """claim_order and record_earning in one statement, on a connection
    outside a transaction (it commits alone). `order.member_id` is the holder
    a member read found, `sent_member_id` the id the till sent, `priced_on`
    the holder's state the points were priced on; the order spends no points.
    None: nothing written (the key is taken, the store is not active, either
    id is erased, or the holder or its tier is no longer the one read)."""
    assert earning.event is not None and not order.points_redeemed
    row = await conn.fetchrow(
        SETTLE_ORDER_SQL,
        order.order_id,
        order.store_id,
        order.pos_transaction_id,
        order.member_id,
        order.channel,
        order.paid_amount_fen,
        order.gross_amount_fen,
        lines_json(order.lines),
        order.ordered_at,
        earning.points,
        earning.transaction_id,
        earning.idempotency_key,
        json.dumps(earning.rule, sort_keys=True),
        earning.lot_id,
        earning.activates_at is not None,
        earning.activates_at,
        earning.expires_at,
        *earning.event,
        sent_member_id,
        order.request_hash,
        priced_on.tier_code is not None,
        priced_on.tier_code,
        priced_on.multiplier_bp,
    )
    if row is None:
        return None
    return BalanceRecord(str(order.member_id), row["available"], row["lifetime_earned"])


FIND_ORDER_SQL = """
SELECT s.status AS store_status, o.id, o.request_hash, o.points_earned, o.points_balance_after,
       o.points_redeemed, o.status, o.rejection, o.coupon_discount_fen
FROM (SELECT $1::text AS store_id, $2::text AS pos_transaction_id) AS q
LEFT JOIN rewards.stores s ON s.store_id = q.store_id
LEFT JOIN rewards.order_keys k
    ON k.store_id = q.store_id AND k.pos_transaction_id = q.pos_transaction_id
LEFT JOIN rewards.orders o ON o.id = k.id AND o.created_at = k.created_at
"""


async def find_order(conn: Connection, store_id: str, pos_transaction_id: str) -> OrderLookup:
    row = await conn.fetchrow(FIND_ORDER_SQL, store_id, pos_transaction_id)
    assert row is not None  # the VALUES side always yields one row
    order = None
    if row["id"] is not None:
        order = SettledOrder(
            order_id=str(row["id"]),
            request_hash=bytes(row["request_hash"]),
            points_earned=row["points_earned"],
            points_balance_after=row["points_balance_after"],
            points_redeemed=row["points_redeemed"],
            status=row["status"],
            rejection=json.loads(row["rejection"]) if row["rejection"] else None,
            coupon_discount_fen=row["coupon_discount_fen"],
        )
    return OrderLookup(row["store_status"], order)


async def get_store(conn: Connection, store_id: str) -> StoreRecord | None:
    row = await conn.fetchrow(
        "SELECT store_id, name, city, address, latitude, longitude, status, time_zone"
        " FROM rewards.stores WHERE store_id = $1",
        store_id,
    )
    return StoreRecord(**dict(row)) if row else None


async def list_stores(conn: Connection) -> list[StoreRecord]:
    rows = await conn.fetch(
        "SELECT store_id, name, city, address, latitude, longitude, status, time_zone"
        " FROM rewards.stores ORDER BY store_id"
    )
    return [StoreRecord(**dict(r)) for r in rows]


async def set_store_status(conn: Connection, store_id: str, status: str) -> bool:
    done = await conn.fetchval(
        "UPDATE rewards.stores SET status = $2 WHERE store_id = $1 RETURNING true",
        store_id,
        status,
    )
    return bool(done)


async def upsert_stores(conn: Connection, stores: list[StoreRecord]) -> None:
    """Insert or refresh stores; unchanged rows are left alone (no dead tuples)."""
    await conn.executemany(
        "INSERT INTO rewards.stores AS s"
        " (store_id, name, city, address, latitude, longitude, status, time_zone)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (store_id) DO UPDATE SET"
        " name = EXCLUDED.name, city = EXCLUDED.city, address = EXCLUDED.address,"
        " latitude = EXCLUDED.latitude, longitude = EXCLUDED.longitude, status = EXCLUDED.status,"
        " time_zone = EXCLUDED.time_zone"
        " WHERE (s.name, s.city, s.address, s.latitude, s.longitude, s.status, s.time_zone)"
        " IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.city, EXCLUDED.address,"
        " EXCLUDED.latitude, EXCLUDED.longitude, EXCLUDED.status, EXCLUDED.time_zone)",
        [
            (
                s.store_id,
                s.name,
                s.city,
                s.address,
                s.latitude,
                s.longitude,
                s.status,
                s.time_zone,
            )
            for s in stores
        ],
    )
