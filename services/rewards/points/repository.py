"""SQL of the points ledger (asyncpg): the member lock, lots, the one generic
posting statement, idempotent requests, holds, refunds, history.

Every write that moves points goes through `post`, one statement that (1)
moves the member's balance with the limit in its WHERE clause (a balance can
never go below zero, and a failed limit writes nothing: every other part of the
statement hangs off the balance row it returns), (2) inserts the transaction
and its entries (the caller builds entries that sum to zero; the audit checks
it), (3) moves lot remainders and records each lot movement, (4) creates new
lots. Callers hold the member's lock (`lock_member`, SELECT ... FOR UPDATE on
the balance row) while they read lots and decide, so what they decided on is
what they write.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from servicekit.db import Connection

from .domain import Lot


@dataclass(frozen=True)
class Balance:
    available: int = 0
    pending: int = 0
    held: int = 0
    debt: int = 0
    lifetime_earned: int = 0


@dataclass(frozen=True)
class BalanceDelta:
    available: int = 0
    pending: int = 0
    held: int = 0
    debt: int = 0
    lifetime_earned: int = 0


@dataclass(frozen=True)
class Entry:
    account: str
    member_id: uuid.UUID | None
    amount: int


@dataclass(frozen=True)
class LotChange:
    lot_id: uuid.UUID
    delta: int
    status: str | None = None


@dataclass(frozen=True)
class NewLot:
    lot_id: uuid.UUID
    points: int
    status: str
    earned_at: datetime
    expires_at: datetime
    activates_at: datetime | None = None
    origin_lot_id: uuid.UUID | None = None
    root_lot_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Posting:
    transaction_id: uuid.UUID
    member_id: uuid.UUID
    kind: str
    idempotency_key: str
    amount: int
    entries: Sequence[Entry]
    balance: BalanceDelta
    lot_changes: Sequence[LotChange] = ()
    new_lots: Sequence[NewLot] = ()
    rule: dict[str, object] = field(default_factory=dict)
    order_id: uuid.UUID | None = None
    reference: str | None = None
    operator_id: str | None = None
    reason: str | None = None
    counterpart_member_id: uuid.UUID | None = None


BALANCE_COLUMNS = "available, pending, held, debt, lifetime_earned"


def _balance(row: Any) -> Balance:
    return Balance(
        row["available"], row["pending"], row["held"], row["debt"], row["lifetime_earned"]
    )


async def ensure_account(conn: Connection, member_id: uuid.UUID) -> None:
    await conn.execute(
        "INSERT INTO rewards.points_balances (member_id) VALUES ($1) ON CONFLICT DO NOTHING",
        member_id,
    )


async def lock_member(conn: Connection, member_id: uuid.UUID) -> Balance | None:
    """The member's lock: every change to a member's lots and balance holds it."""
    row = await conn.fetchrow(
        f"SELECT {BALANCE_COLUMNS} FROM rewards.points_balances WHERE member_id = $1 FOR UPDATE",
        member_id,
    )
    return _balance(row) if row else None


# The member's lock, with the lots' expiry floor: no lot expiring before it
# holds points (points_lot_expiry_floor, migration 0020), so the spend's read
# of the member's lots (`open_lots`) is bounded by it and the partitions of
# lots that expired long ago are pruned. Read with the lock: no statement added.
LOCK_WITH_FLOOR_SQL = f"""
SELECT {BALANCE_COLUMNS}, f.expires_from
FROM rewards.points_balances, rewards.points_lot_expiry_floor f
WHERE member_id = $1 FOR UPDATE OF points_balances
"""


async def lock_member_with_floor(
    conn: Connection, member_id: uuid.UUID
) -> tuple[Balance | None, datetime | None]:
    """`lock_member`, and the lots' expiry floor (None: the member has no account)."""
    row = await conn.fetchrow(LOCK_WITH_FLOOR_SQL, member_id)
    if row is None:
        return None, None
    return _balance(row), row["expires_from"]


async def read_balance(conn: Connection, member_id: uuid.UUID) -> Balance | None:
    row = await conn.fetchrow(
        f"SELECT {BALANCE_COLUMNS} FROM rewards.points_balances WHERE member_id = $1", member_id
    )
    return _balance(row) if row else None


LOT_COLUMNS = "id, remaining, status, expires_at, activates_at, earned_at"


def _lot(row: Any) -> Lot:
    return Lot(
        row["id"],
        row["remaining"],
        row["status"],
        row["expires_at"],
        row["activates_at"],
        row["earned_at"],
    )


OPEN_LOTS_SQL = f"""
SELECT {LOT_COLUMNS} FROM rewards.points_lots
WHERE member_id = $1 AND status IN ('active', 'pending') AND remaining > 0
  AND expires_at >= $2
ORDER BY expires_at, earned_at, id
"""


async def open_lots(conn: Connection, member_id: uuid.UUID, floor: datetime) -> list[Lot]:
    """The member's lots that still hold points (call under the member's lock),
    those expired but not yet marked included: `floor` is the lots' expiry
    floor read with the lock (`lock_member_with_floor`), below which no lot
    holds points; the lots' partitions before it are pruned."""
    rows = await conn.fetch(OPEN_LOTS_SQL, member_id, floor)
    return [_lot(r) for r in rows]


async def lots_by_id(conn: Connection, lot_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Any]:
    rows = await conn.fetch(
        "SELECT id, member_id, remaining, points, status, expires_at, activates_at, earned_at,"
        " root_lot_id, clawback FROM rewards.points_lots WHERE id = ANY($1::uuid[])",
        list(lot_ids),
    )
    return {r["id"]: r for r in rows}


async def live_lot(conn: Connection, root_lot_id: uuid.UUID) -> Any:
    """The lot that holds a chain's points now (a merge moves points to a new lot)."""
    return await conn.fetchrow(
        "SELECT id, member_id, remaining, points, status, expires_at, clawback"
        " FROM rewards.points_lots WHERE root_lot_id = $1 AND status IN ('active', 'pending')"
        " ORDER BY created_at DESC, id LIMIT 1",
        root_lot_id,
    )


POST_SQL = """
WITH bal AS (
    UPDATE rewards.points_balances
    SET available = available + $7::bigint, pending = pending + $8::bigint,
        held = held + $9::bigint, debt = debt + $10::bigint,
        lifetime_earned = lifetime_earned + $11::bigint, updated_at = now()
    WHERE member_id = $2::uuid
      AND available + $7::bigint >= 0 AND pending + $8::bigint >= 0
      AND held + $9::bigint >= 0 AND debt + $10::bigint >= 0
    RETURNING available, pending, held, debt, lifetime_earned
), txn AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, order_id, idempotency_key, amount, rule, reference,
         operator_id, reason, counterpart_member_id)
    SELECT $1::uuid, $2::uuid, $3::text, $4::uuid, $5::text, $6::bigint, $12::jsonb,
           $13::text, $14::text, $15::text, $16::uuid
    FROM bal
    RETURNING id
), entries AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT txn.id, e.account, e.member_id, e.amount
    FROM txn, unnest($17::text[], $18::uuid[], $19::bigint[]) AS e(account, member_id, amount)
), lots AS (
    UPDATE rewards.points_lots l
    SET remaining = l.remaining + c.delta, status = coalesce(c.status, l.status)
    FROM unnest($20::uuid[], $21::bigint[], $22::text[]) AS c(lot_id, delta, status)
    WHERE l.id = c.lot_id AND EXISTS (SELECT 1 FROM txn)
), moves AS (
    INSERT INTO rewards.points_lot_movements (transaction_id, lot_id, amount, created_at)
    SELECT txn.id, c.lot_id, c.delta, now()
    FROM txn, unnest($20::uuid[], $21::bigint[]) AS c(lot_id, delta)
    WHERE c.delta <> 0
), new_lots AS (
    INSERT INTO rewards.points_lots
        (id, member_id, transaction_id, origin_lot_id, root_lot_id, order_id, points,
         remaining, status, earned_at, activates_at, expires_at)
    SELECT n.id, $2::uuid, txn.id, n.origin, coalesce(n.root, n.id), $4::uuid, n.points,
           n.points, n.status, n.earned_at, n.activates_at, n.expires_at
    FROM txn, unnest($23::uuid[], $24::uuid[], $25::uuid[], $26::bigint[], $27::text[],
                     $28::timestamptz[], $29::timestamptz[], $30::timestamptz[])
         AS n(id, origin, root, points, status, earned_at, activates_at, expires_at)
)
SELECT available, pending, held, debt, lifetime_earned FROM bal
"""


async def post(conn: Connection, p: Posting) -> Balance | None:
    """Write one ledger transaction; None (and nothing written) when a balance
    limit would be crossed or the member has no account."""
    # The first line of defence; the database refuses an unbalanced
    # transaction at commit (migration 0009) and the audit checks it again.
    if sum(e.amount for e in p.entries) != 0:
        raise ValueError(f"entries of {p.kind} transaction {p.transaction_id} do not sum to zero")
    b = p.balance
    row = await conn.fetchrow(
        POST_SQL,
        p.transaction_id,
        p.member_id,
        p.kind,
        p.order_id,
        p.idempotency_key,
        p.amount,
        b.available,
        b.pending,
        b.held,
        b.debt,
        b.lifetime_earned,
        json.dumps(p.rule, sort_keys=True),
        p.reference,
        p.operator_id,
        p.reason,
        p.counterpart_member_id,
        [e.account for e in p.entries],
        [e.member_id for e in p.entries],
        [e.amount for e in p.entries],
        [c.lot_id for c in p.lot_changes],
        [c.delta for c in p.lot_changes],
        [c.status for c in p.lot_changes],
        [n.lot_id for n in p.new_lots],
        [n.origin_lot_id for n in p.new_lots],
        [n.root_lot_id for n in p.new_lots],
        [n.points for n in p.new_lots],
        [n.status for n in p.new_lots],
        [n.earned_at for n in p.new_lots],
        [n.activates_at for n in p.new_lots],
        [n.expires_at for n in p.new_lots],
    )
    return _balance(row) if row else None


async def shift_balance(conn: Connection, member_id: uuid.UUID, d: BalanceDelta) -> Balance | None:
    """Move the balance of the other member of a merge (same limits as `post`)."""
    row = await conn.fetchrow(
        "UPDATE rewards.points_balances"
        " SET available = available + $2, pending = pending + $3, held = held + $4,"
        " debt = debt + $5, updated_at = now()"
        " WHERE member_id = $1 AND available + $2 >= 0 AND pending + $3 >= 0"
        " AND held + $4 >= 0 AND debt + $5 >= 0"
        f" RETURNING {BALANCE_COLUMNS}",
        member_id,
        d.available,
        d.pending,
        d.held,
        d.debt,
    )
    return _balance(row) if row else None


# ---- idempotent requests ------------------------------------------------------


@dataclass(frozen=True)
class StoredRequest:
    operation: str
    request_hash: bytes
    outcome: str | None
    response: dict[str, Any] | None


async def claim_request(
    conn: Connection, key: str, operation: str, request_hash: bytes
) -> StoredRequest | None:
    """Claim an idempotency key; None when claimed now, else what is stored under it.

    Concurrent claims of one key wait on the unique index for the winner's
    commit, then read its stored outcome: one key, one effect.
    """
    claimed = await conn.fetchval(
        "INSERT INTO rewards.ledger_requests (idempotency_key, operation, request_hash)"
        " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
        key,
        operation,
        request_hash,
    )
    if claimed:
        return None
    row = await conn.fetchrow(
        "SELECT operation, request_hash, outcome, response FROM rewards.ledger_requests"
        " WHERE idempotency_key = $1",
        key,
    )
    assert row is not None, "a conflicting key is committed"
    return StoredRequest(
        row["operation"],
        bytes(row["request_hash"]),
        row["outcome"],
        json.loads(row["response"]) if row["response"] else None,
    )


async def release_request(conn: Connection, key: str) -> None:
    """Give a claimed key back (nothing is stored under it): the next call with
    it runs afresh. Concurrent claimers waiting on the key then claim it."""
    await conn.execute("DELETE FROM rewards.ledger_requests WHERE idempotency_key = $1", key)


async def finish_request(
    conn: Connection, key: str, outcome: str, response: dict[str, Any]
) -> None:
    await conn.execute(
        "UPDATE rewards.ledger_requests SET outcome = $2, response = $3::jsonb"
        " WHERE idempotency_key = $1",
        key,
        outcome,
        json.dumps(response, sort_keys=True, default=str),
    )


# ---- holds ------------------------------------------------------------------


async def insert_hold(
    conn: Connection,
    hold_id: uuid.UUID,
    member_id: uuid.UUID,
    points: int,
    reference: str | None,
    expires_at: datetime,
    transaction_id: uuid.UUID,
) -> None:
    await conn.execute(
        "INSERT INTO rewards.points_holds"
        " (id, member_id, points, status, reference, expires_at, transaction_id)"
        " VALUES ($1, $2, $3, 'held', $4, $5, $6)",
        hold_id,
        member_id,
        points,
        reference,
        expires_at,
        transaction_id,
    )


async def get_hold(conn: Connection, hold_id: uuid.UUID) -> Any:
    return await conn.fetchrow(
        "SELECT id, member_id, points, status, reference, expires_at, transaction_id,"
        " resolution_transaction_id FROM rewards.points_holds WHERE id = $1",
        hold_id,
    )


async def resolve_hold(
    conn: Connection, hold_id: uuid.UUID, status: str, transaction_id: uuid.UUID, now: datetime
) -> bool:
    """Move a hold out of 'held' exactly once; False when it was already resolved."""
    done = await conn.fetchval(
        "UPDATE rewards.points_holds SET status = $2, resolution_transaction_id = $3,"
        " resolved_at = $4 WHERE id = $1 AND status = 'held' RETURNING true",
        hold_id,
        status,
        transaction_id,
        now,
    )
    return bool(done)


async def hold_takes(conn: Connection, transaction_id: uuid.UUID) -> list[tuple[uuid.UUID, int]]:
    """The lots a hold took from, and how much (as positive amounts)."""
    rows = await conn.fetch(
        "SELECT lot_id, (-sum(amount))::bigint AS points FROM rewards.points_lot_movements"
        " WHERE transaction_id = $1 GROUP BY lot_id ORDER BY lot_id",
        transaction_id,
    )
    return [(r["lot_id"], r["points"]) for r in rows]


async def held_from_lot(conn: Connection, lot_id: uuid.UUID) -> int:
    """Points open holds took from a lot (call under the member's lock)."""
    value = await conn.fetchval(
        "SELECT coalesce(sum(-m.amount), 0)::bigint FROM rewards.points_holds h"
        " JOIN rewards.points_lot_movements m ON m.transaction_id = h.transaction_id"
        " WHERE h.status = 'held' AND m.lot_id = $1",
        lot_id,
    )
    return int(value)


async def change_clawback(conn: Connection, changes: dict[uuid.UUID, int]) -> None:
    """Add to (or, negative, settle) what refunds claim back from lots' held points."""
    await conn.execute(
        "UPDATE rewards.points_lots l SET clawback = l.clawback + c.delta"
        " FROM unnest($1::uuid[], $2::bigint[]) AS c(lot_id, delta) WHERE l.id = c.lot_id",
        list(changes),
        list(changes.values()),
    )


async def timed_out_holds(conn: Connection, now: datetime, limit: int) -> list[uuid.UUID]:
    rows = await conn.fetch(
        "SELECT id FROM rewards.points_holds WHERE status = 'held' AND expires_at <= $1"
        " ORDER BY expires_at LIMIT $2",
        now,
        limit,
    )
    return [r["id"] for r in rows]


# ---- refunds ----------------------------------------------------------------


async def lock_order(conn: Connection, store_id: str, pos_transaction_id: str) -> Any:
    """The order, locked: refunds of one order run one at a time. Found through
    its key (order_keys), whose created_at prunes the order's other partitions."""
    return await conn.fetchrow(
        "SELECT o.id, o.member_id, o.paid_amount_fen, o.points_earned, o.points_redeemed,"
        " o.status, o.ordered_at, o.created_at"
        " FROM rewards.order_keys k JOIN rewards.orders o"
        " ON o.id = k.id AND o.created_at = k.created_at"
        " WHERE k.store_id = $1 AND k.pos_transaction_id = $2 FOR UPDATE OF o",
        store_id,
        pos_transaction_id,
    )


async def order_archived(conn: Connection, store_id: str, pos_transaction_id: str) -> bool:
    """Whether the order has a key but no row in the attached partitions: its
    partition was detached (archived; an order is never deleted)."""
    archived: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.order_keys k WHERE k.store_id = $1"
        " AND k.pos_transaction_id = $2 AND NOT EXISTS (SELECT 1 FROM rewards.orders o"
        " WHERE o.id = k.id AND o.created_at = k.created_at))",
        store_id,
        pos_transaction_id,
    )
    return archived


async def refunds_so_far(conn: Connection, order_id: uuid.UUID) -> tuple[int, int, int, int]:
    """Fen refunded, points reversed (due), points restored and refunds so far."""
    row = await conn.fetchrow(
        "SELECT coalesce(sum(refunded_amount_fen), 0) AS fen, coalesce(sum(points_due), 0) AS pts,"
        " coalesce(sum(points_restored), 0) AS restored, count(*) AS n"
        " FROM rewards.refunds WHERE order_id = $1",
        order_id,
    )
    assert row is not None
    return int(row["fen"]), int(row["pts"]), int(row["restored"]), int(row["n"])


# An order's earn and redemption are journalled by the transaction that
# claimed the order (or a later one), so never before the order's created_at
# (both are the database's now()): the bound prunes the journal's older
# partitions from a refund's reads.
ORDER_REDEMPTION_LOTS_SQL = """
SELECT m.lot_id, -m.amount AS points, l.earned_at, l.expires_at, l.root_lot_id
FROM rewards.points_transactions t
JOIN rewards.points_lot_movements m ON m.transaction_id = t.id
JOIN rewards.points_lots l ON l.id = m.lot_id
WHERE t.order_id = $1 AND t.kind = 'redeem' AND t.created_at >= $2 AND m.created_at >= $2
ORDER BY l.expires_at DESC, l.id
"""

ORDER_LOT_SQL = """
SELECT l.id FROM rewards.points_lots l
JOIN rewards.points_transactions t ON t.id = l.transaction_id
WHERE t.order_id = $1 AND t.kind = 'earn' AND t.created_at >= $2 AND l.origin_lot_id IS NULL
"""


async def order_redemption_lots(
    conn: Connection, order_id: uuid.UUID, order_created_at: datetime
) -> list[Any]:
    """The lots an order's redemption spent from, latest-expiring first."""
    return await conn.fetch(ORDER_REDEMPTION_LOTS_SQL, order_id, order_created_at)


async def order_lot(conn: Connection, order_id: uuid.UUID, order_created_at: datetime) -> Any:
    """The lot the order's earn created (its root; `live_lot` finds where it is now)."""
    return await conn.fetchrow(ORDER_LOT_SQL, order_id, order_created_at)


async def journal_archived(conn: Connection, at: datetime) -> bool:
    """Whether the journal partition holding rows written at `at` was detached
    (points_journal_archive: a handful of rows, one per archived month)."""
    archived: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM rewards.points_journal_archive"
        " WHERE upper > $1 AND lower <= $1)",
        at,
    )
    return archived


async def transaction_with_key(conn: Connection, idempotency_key: str) -> Any:
    """The journal transaction written under a key (id, created_at), or None:
    the key table answers without searching the journal's partitions."""
    return await conn.fetchrow(
        "SELECT id, created_at FROM rewards.points_transaction_keys WHERE idempotency_key = $1",
        idempotency_key,
    )


async def insert_refund(conn: Connection, values: dict[str, Any]) -> None:
    columns = ", ".join(values)
    params = ", ".join(f"${n}" for n in range(1, len(values) + 1))
    await conn.execute(
        f"INSERT INTO rewards.refunds ({columns}) VALUES ({params})", *values.values()
    )


# ---- caps -------------------------------------------------------------------


async def count_against_cap(
    conn: Connection,
    member_id: uuid.UUID,
    counter: str,
    period: datetime,
    points: int,
    cap: int | None,
    max_actions: int | None = None,
) -> tuple[int, bool]:
    """Points granted under a per-period cap, and whether the action is within
    its count; the counter row is locked, so concurrent earns cannot both fit."""
    row = await conn.fetchrow(
        "INSERT INTO rewards.earn_counters AS c (member_id, counter, period_start, points, actions)"
        " VALUES ($1, $2, $3, 0, 0) ON CONFLICT (member_id, counter, period_start)"
        " DO UPDATE SET points = c.points RETURNING points, actions",
        member_id,
        counter,
        period,
    )
    assert row is not None
    if max_actions is not None and row["actions"] >= max_actions:
        return 0, False
    granted = points if cap is None else max(0, min(points, cap - row["points"]))
    await conn.execute(
        "UPDATE rewards.earn_counters SET points = points + $4, actions = actions + 1"
        " WHERE member_id = $1 AND counter = $2 AND period_start = $3",
        member_id,
        counter,
        period,
        granted,
    )
    return granted, True


async def give_back_to_cap(
    conn: Connection,
    member_id: uuid.UUID,
    counter: str,
    period: datetime,
    points: int,
    actions: int,
) -> None:
    """A refund returns what its order counted against a per-period cap."""
    await conn.execute(
        "UPDATE rewards.earn_counters SET points = greatest(0, points - $4),"
        " actions = greatest(0, actions - $5)"
        " WHERE member_id = $1 AND counter = $2 AND period_start = $3",
        member_id,
        counter,
        period,
        points,
        actions,
    )


# ---- jobs -------------------------------------------------------------------


async def members_with_due_lots(conn: Connection, now: datetime, limit: int) -> list[uuid.UUID]:
    rows = await conn.fetch(
        "SELECT DISTINCT member_id FROM rewards.points_lots"
        " WHERE status IN ('active', 'pending') AND remaining > 0"
        " AND (expires_at <= $1 OR (status = 'pending' AND activates_at <= $1))"
        " AND expires_at >= (SELECT expires_from FROM rewards.points_lot_expiry_floor)"
        " LIMIT $2",
        now,
        limit,
    )
    return [r["member_id"] for r in rows]


# How far behind the expiry job's clock the floor stays at least: a lot
# written meanwhile by a concurrent earn dated up to this far back (offline
# orders: OFFLINE_MAX_AGE_HOURS, 72 h) is above it even if the job's snapshot
# missed it; anything older lowers the floor itself (the key trigger).
FLOOR_MARGIN = timedelta(days=31)

RAISE_FLOOR_SQL = """
UPDATE rewards.points_lot_expiry_floor f
SET expires_from = least($1::timestamptz, coalesce((
    SELECT min(l.expires_at) FROM rewards.points_lots l
    WHERE l.status IN ('active', 'pending') AND l.remaining > 0
      AND l.expires_at >= f.expires_from), $1::timestamptz))
WHERE f.expires_from < $1::timestamptz
RETURNING expires_from
"""


async def lower_expiry_floor(conn: Connection, at: datetime) -> None:
    """A lot expiring at `at` holds points again (a void gives a lapsed lot its
    points back): the floor goes down to it (the key trigger does this for a
    new lot)."""
    await conn.execute(
        "UPDATE rewards.points_lot_expiry_floor SET expires_from = $1 WHERE expires_from > $1", at
    )


async def raise_expiry_floor(conn: Connection, now: datetime) -> datetime | None:
    """After the expiry job: raise the lots' expiry floor to the earliest
    expiry of a lot still holding points, at most FLOOR_MARGIN before `now`
    (never lowered here: the key trigger lowers it for a backdated lot).
    The new floor, or None when it was already there."""
    floor: datetime | None = await conn.fetchval(RAISE_FLOOR_SQL, now - FLOOR_MARGIN)
    return floor


async def claim_expiring_soon(
    conn: Connection, now: datetime, horizon: datetime, limit: int
) -> list[Any]:
    """Mark lots lapsing before `horizon` as announced; one row per member and
    expiry instant with the points and the member's available balance. SKIP LOCKED lets two job runs share the work."""
    return await conn.fetch(
        """
        WITH due AS (
            SELECT id FROM rewards.points_lots
            WHERE status IN ('active', 'pending') AND remaining > 0
              AND expiry_notified_at IS NULL AND expires_at > $1 AND expires_at <= $2
            ORDER BY expires_at LIMIT $3
            FOR UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE rewards.points_lots l SET expiry_notified_at = $1
            FROM due WHERE l.id = due.id
            RETURNING l.member_id, l.expires_at, l.remaining
        )
        SELECT m.member_id, m.expires_at, sum(m.remaining)::bigint AS points,
               coalesce(min(b.available), 0)::bigint AS balance
        FROM marked m LEFT JOIN rewards.points_balances b ON b.member_id = m.member_id
        GROUP BY m.member_id, m.expires_at ORDER BY m.member_id, m.expires_at
        """,
        now,
        horizon,
        limit,
    )


# ---- reads ------------------------------------------------------------------


async def expiring_lots(
    conn: Connection, member_id: uuid.UUID, now: datetime, horizon: datetime
) -> list[Any]:
    return await conn.fetch(
        "SELECT expires_at, sum(remaining)::bigint AS points FROM rewards.points_lots"
        " WHERE member_id = $1 AND status IN ('active', 'pending') AND remaining > 0"
        " AND expires_at > $2 AND expires_at <= $3 GROUP BY expires_at ORDER BY expires_at",
        member_id,
        now,
        horizon,
    )


HISTORY_SQL = """
WITH mine AS (
    SELECT t.seq, t.id, t.kind, t.amount, t.order_id, t.reference, t.reason, t.operator_id,
           t.created_at,
           coalesce(sum(e.amount) FILTER (
               WHERE e.account = 'member_wallet' AND e.member_id = $1), 0)::bigint AS delta
    FROM rewards.points_transactions t
    JOIN rewards.points_entries e ON e.transaction_id = t.id
    WHERE t.member_id = $1 OR t.counterpart_member_id = $1
    GROUP BY t.seq, t.id, t.created_at
), running AS (
    SELECT *, sum(delta) OVER (ORDER BY seq)::bigint AS balance_after FROM mine
)
SELECT r.*, coalesce((
    SELECT jsonb_agg(jsonb_build_array(m.lot_id::text, m.amount) ORDER BY m.id)
    FROM rewards.points_lot_movements m WHERE m.transaction_id = r.id), '[]'::jsonb) AS lots,
    coalesce((SELECT jsonb_agg(l.id::text) FROM rewards.points_lots l
              WHERE l.transaction_id = r.id), '[]'::jsonb) AS created_lots
FROM running r
WHERE $2::bigint IS NULL OR r.seq < $2::bigint
ORDER BY r.seq DESC
LIMIT $3
"""


async def history(
    conn: Connection, member_id: uuid.UUID, before_seq: int | None, limit: int
) -> list[Any]:
    """Newest first; `balance_after` is the member's available balance right after."""
    return await conn.fetch(HISTORY_SQL, member_id, before_seq, limit)


LIABILITY_SQL = """
SELECT
    coalesce(sum(available), 0)::bigint AS available,
    coalesce(sum(pending), 0)::bigint AS pending,
    coalesce(sum(held), 0)::bigint AS held,
    coalesce(sum(debt), 0)::bigint AS debt,
    count(*) FILTER (WHERE available + pending + held > 0) AS members_with_points,
    (SELECT coalesce(sum(remaining), 0)::bigint FROM rewards.points_lots
      WHERE status IN ('active', 'pending') AND remaining > 0
        AND expires_at > $1 AND expires_at <= $2) AS expiring_soon
FROM rewards.points_balances
"""

ACCOUNT_TOTALS_SQL = """
SELECT account, sum(amount)::bigint AS total FROM rewards.points_entries
WHERE account IN ('issued_liability', 'redeemed', 'expired', 'adjustments')
GROUP BY account
"""


async def liability(conn: Connection, now: datetime, horizon: datetime) -> dict[str, int]:
    row = await conn.fetchrow(LIABILITY_SQL, now, horizon)
    assert row is not None
    totals = {r["account"]: int(r["total"]) for r in await conn.fetch(ACCOUNT_TOTALS_SQL)}
    result = {k: int(row[k]) for k in row.keys()}
    # Brand-side accounts carry the opposite sign of what members hold.
    result["issued"] = -totals.get("issued_liability", 0)
    result["redeemed"] = totals.get("redeemed", 0)
    result["expired"] = totals.get("expired", 0)
    result["adjusted"] = -totals.get("adjustments", 0)
    return result
