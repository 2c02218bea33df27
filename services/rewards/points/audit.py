"""Ledger audit: the invariants of the points journal, checked against the data.

- every transaction has entries, and they sum to zero; member accounts carry a
  member, and (except merges) only the transaction's own member;
- an earn credits its member (wallet, pending or debt repayment) with exactly
  its amount;
- each member's balance (available, pending, held, debt, lifetime_earned)
  equals the journal;
- each member's available equals the points left in their active lots, and
  pending the points left in their pending lots;
- each lot's remaining equals its points plus its movements;
- each member's held equals their open holds;
- each settled order has exactly the earn its points call for and a recorded
  balance-after; refunds never exceed their order, in fen or in points.

Tests call it after every scenario; operators run it as
`python -m services.rewards audit` (read-only, one statement per invariant).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from servicekit.errors import FailedPrecondition

# $1: the members (NULL: everyone); $2: the checkpoint's as_of the journal is
# re-summed from (NULL: the first transaction), a literal too. Journal reads filter on
# created_at >= SINCE, written into the text as a literal by `checks` (it
# changes once a month): the planner prunes partitions and estimates the
# filter from the value, where a parameter's generic plan (after five
# executions) guessed a third of each partition and scanned it by time.
SINCE = "__SINCE__"

UNBALANCED_SQL = f"""
SELECT t.id
FROM rewards.points_transactions t
LEFT JOIN rewards.points_entries e ON e.transaction_id = t.id
WHERE ($1::uuid[] IS NULL OR t.member_id = ANY($1::uuid[])) AND t.created_at >= {SINCE}
GROUP BY t.id, t.kind, t.amount, t.member_id
HAVING count(e.id) = 0
    OR sum(e.amount) <> 0
    OR bool_or(e.account LIKE 'member\\_%' AND e.member_id IS NULL)
    OR (t.kind NOT IN ('merge', 'unmerge')
        AND bool_or(e.account LIKE 'member\\_%' AND e.member_id <> t.member_id))
    OR (t.kind = 'earn'
        AND coalesce(sum(e.amount) FILTER (
            WHERE e.account IN ('member_wallet', 'member_pending', 'member_debt')), 0) <> t.amount)
ORDER BY t.id
"""

# A member's journal figures: the checkpoint's, plus the entries of the
# transactions written since (each entry's time from the key table: one probe,
# where the partitioned journal would take one per partition).
# The last part of both balance checks: the member's stored balance against
# the journal's sums (`journal`, `earned`, defined before it), its lots and holds.
_BALANCE_COMPARISON = """), lots AS (
    SELECT member_id,
           coalesce(sum(remaining) FILTER (WHERE status = 'active'), 0) AS available,
           coalesce(sum(remaining) FILTER (WHERE status = 'pending'), 0) AS pending
    FROM rewards.points_lots
    WHERE $1::uuid[] IS NULL OR member_id = ANY($1::uuid[])
    GROUP BY member_id
), holds AS (
    SELECT member_id, sum(points) AS held FROM rewards.points_holds
    WHERE status = 'held' AND ($1::uuid[] IS NULL OR member_id = ANY($1::uuid[]))
    GROUP BY member_id
), balances AS (
    SELECT member_id, available, pending, held, debt, lifetime_earned
    FROM rewards.points_balances
    WHERE $1::uuid[] IS NULL OR member_id = ANY($1::uuid[])
), everyone AS (
    SELECT member_id FROM balances UNION SELECT member_id FROM journal
    UNION SELECT member_id FROM lots UNION SELECT member_id FROM holds
)
SELECT m.member_id,
       coalesce(b.available, 0) AS available,
       coalesce(j.available, 0) AS journal_available,
       coalesce(l.available, 0) AS lots_available,
       coalesce(b.pending, 0) AS pending,
       coalesce(j.pending, 0) AS journal_pending,
       coalesce(l.pending, 0) AS lots_pending,
       coalesce(b.held, 0) AS held,
       coalesce(j.held, 0) AS journal_held,
       coalesce(h.held, 0) AS holds_held,
       coalesce(b.debt, 0) AS debt,
       coalesce(j.debt, 0) AS journal_debt,
       coalesce(b.lifetime_earned, 0) AS lifetime_earned,
       coalesce(x.earned, 0) AS journal_earned
FROM everyone m
LEFT JOIN balances b ON b.member_id = m.member_id
LEFT JOIN journal j ON j.member_id = m.member_id
LEFT JOIN lots l ON l.member_id = m.member_id
LEFT JOIN holds h ON h.member_id = m.member_id
LEFT JOIN earned x ON x.member_id = m.member_id
WHERE coalesce(b.available, 0) <> coalesce(j.available, 0)
   OR coalesce(b.available, 0) <> coalesce(l.available, 0)
   OR coalesce(b.pending, 0) <> coalesce(j.pending, 0)
   OR coalesce(b.pending, 0) <> coalesce(l.pending, 0)
   OR coalesce(b.held, 0) <> coalesce(j.held, 0)
   OR coalesce(b.held, 0) <> coalesce(h.held, 0)
   OR coalesce(b.debt, 0) <> coalesce(j.debt, 0)
   OR coalesce(b.lifetime_earned, 0) <> coalesce(x.earned, 0)
ORDER BY 1
"""


BALANCE_SQL = (
    f"""
WITH journal AS (
    SELECT member_id, sum(available) AS available, sum(pending) AS pending,
           sum(held) AS held, sum(debt) AS debt
    FROM (
        SELECT c.member_id, c.available, c.pending, c.held, c.debt
        FROM rewards.points_checkpoint_balances c
        WHERE c.as_of = $2::timestamptz
          AND ($1::uuid[] IS NULL OR c.member_id = ANY($1::uuid[]))
        UNION ALL
        SELECT e.member_id,
               coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_wallet'), 0),
               coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_pending'), 0),
               coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_held'), 0),
               -coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_debt'), 0)
        FROM rewards.points_entries e
        JOIN rewards.points_transaction_keys k
            ON k.id = e.transaction_id AND k.created_at >= {SINCE}
        WHERE e.member_id IS NOT NULL AND ($1::uuid[] IS NULL OR e.member_id = ANY($1::uuid[]))
        GROUP BY e.member_id
    ) s
    GROUP BY member_id
), earned AS (
    SELECT member_id, sum(earned) AS earned
    FROM (
        SELECT member_id, lifetime_earned AS earned FROM rewards.points_checkpoint_balances
        WHERE as_of = $2::timestamptz AND ($1::uuid[] IS NULL OR member_id = ANY($1::uuid[]))
        UNION ALL
        SELECT member_id, amount FROM rewards.points_transactions
        WHERE kind = 'earn' AND created_at >= {SINCE}
          AND ($1::uuid[] IS NULL OR member_id = ANY($1::uuid[]))
    ) s
    GROUP BY member_id
"""
    + _BALANCE_COMPARISON
)

# A lot's remaining = its opening at the checkpoint (points if created before,
# plus movements before), its points if created since, plus movements since
# (a movement's created_at is its transaction's: the movements' partitions
# before the checkpoint are pruned).
LOTS_SQL = f"""
SELECT l.id
FROM rewards.points_lots l
JOIN rewards.points_transaction_keys lk ON lk.id = l.transaction_id
LEFT JOIN rewards.points_lot_movements m ON m.lot_id = l.id AND m.created_at >= {SINCE}
WHERE $1::uuid[] IS NULL OR l.member_id = ANY($1::uuid[])
GROUP BY l.id, l.points, l.remaining, lk.created_at
HAVING coalesce((SELECT c.opening FROM rewards.points_checkpoint_lots c
                 WHERE c.as_of = $2::timestamptz AND c.lot_id = l.id), 0)
       + CASE WHEN lk.created_at >= {SINCE} THEN l.points ELSE 0 END
       + coalesce(sum(m.amount), 0) <> l.remaining
ORDER BY l.id
"""

# Orders written since the checkpoint against their earn (an order and its earn
# share a transaction, so a created_at); refunds against every order.
ORDERS_SQL = f"""
SELECT o.id
FROM rewards.orders o
LEFT JOIN rewards.points_transactions t
    ON t.order_id = o.id AND t.kind = 'earn' AND t.created_at >= {SINCE}
WHERE ($1::uuid[] IS NULL OR o.member_id = ANY($1::uuid[])) AND o.created_at >= {SINCE}
GROUP BY o.id, o.points_earned, o.points_balance_after, o.status
HAVING count(t.id) > 1
    OR coalesce(sum(t.amount), 0) <> o.points_earned
    OR (o.status = 'settled' AND o.points_balance_after IS NULL)
UNION
SELECT o.id
FROM rewards.orders o
JOIN rewards.refunds r ON r.order_id = o.id
WHERE $1::uuid[] IS NULL OR o.member_id = ANY($1::uuid[])
GROUP BY o.id, o.paid_amount_fen, o.points_earned, o.points_redeemed
HAVING sum(r.refunded_amount_fen) > o.paid_amount_fen OR sum(r.points_due) > o.points_earned
    OR sum(r.points_restored) > o.points_redeemed
ORDER BY 1
"""


CHECKS = (UNBALANCED_SQL, BALANCE_SQL, ORDERS_SQL, LOTS_SQL)


# The checks from the first transaction (no checkpoint yet, or `full`): the
# statements of before checkpoints, whose plans need no time condition (the
# checkpointed ones with the condition dropped planned worse: docs/operations.md).
FULL_UNBALANCED_SQL = """
SELECT t.id
FROM rewards.points_transactions t
LEFT JOIN rewards.points_entries e ON e.transaction_id = t.id
WHERE $1::uuid[] IS NULL OR t.member_id = ANY($1::uuid[])
GROUP BY t.id, t.kind, t.amount, t.member_id
HAVING count(e.id) = 0
    OR sum(e.amount) <> 0
    OR bool_or(e.account LIKE 'member\\_%' AND e.member_id IS NULL)
    OR (t.kind NOT IN ('merge', 'unmerge')
        AND bool_or(e.account LIKE 'member\\_%' AND e.member_id <> t.member_id))
    OR (t.kind = 'earn'
        AND coalesce(sum(e.amount) FILTER (
            WHERE e.account IN ('member_wallet', 'member_pending', 'member_debt')), 0) <> t.amount)
ORDER BY t.id
"""

FULL_BALANCE_SQL = (
    """
WITH journal AS (
    SELECT e.member_id,
           coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_wallet'), 0) AS available,
           coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_pending'), 0) AS pending,
           coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_held'), 0) AS held,
           -coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_debt'), 0) AS debt
    FROM rewards.points_entries e
    WHERE e.member_id IS NOT NULL AND ($1::uuid[] IS NULL OR e.member_id = ANY($1::uuid[]))
    GROUP BY e.member_id
), earned AS (
    SELECT member_id, sum(amount) AS earned FROM rewards.points_transactions
    WHERE kind = 'earn' AND ($1::uuid[] IS NULL OR member_id = ANY($1::uuid[]))
    GROUP BY member_id
"""
    + _BALANCE_COMPARISON
)

FULL_LOTS_SQL = """
SELECT l.id
FROM rewards.points_lots l
LEFT JOIN rewards.points_lot_movements m ON m.lot_id = l.id
WHERE $1::uuid[] IS NULL OR l.member_id = ANY($1::uuid[])
GROUP BY l.id, l.points, l.remaining
HAVING l.points + coalesce(sum(m.amount), 0) <> l.remaining
ORDER BY l.id
"""

FULL_ORDERS_SQL = """
SELECT o.id
FROM rewards.orders o
LEFT JOIN rewards.points_transactions t ON t.order_id = o.id AND t.kind = 'earn'
WHERE $1::uuid[] IS NULL OR o.member_id = ANY($1::uuid[])
GROUP BY o.id, o.points_earned, o.points_balance_after, o.status
HAVING count(t.id) > 1
    OR coalesce(sum(t.amount), 0) <> o.points_earned
    OR (o.status = 'settled' AND o.points_balance_after IS NULL)
UNION
SELECT o.id
FROM rewards.orders o
JOIN rewards.refunds r ON r.order_id = o.id
WHERE $1::uuid[] IS NULL OR o.member_id = ANY($1::uuid[])
GROUP BY o.id, o.paid_amount_fen, o.points_earned, o.points_redeemed
HAVING sum(r.refunded_amount_fen) > o.paid_amount_fen OR sum(r.points_due) > o.points_earned
    OR sum(r.points_restored) > o.points_redeemed
ORDER BY 1
"""

FULL_CHECKS = (FULL_UNBALANCED_SQL, FULL_BALANCE_SQL, FULL_ORDERS_SQL, FULL_LOTS_SQL)


def checks(since: datetime | None) -> tuple[str, ...]:
    """The checks' statements re-summing from `since` (None: the first
    transaction). `since` is written into the text as a literal: $1 (the
    members) is their only parameter."""
    if since is None:
        return FULL_CHECKS
    literal = f"'{since.astimezone(UTC).isoformat()}'::timestamptz"
    return tuple(sql.replace(SINCE, literal).replace("$2::timestamptz", literal) for sql in CHECKS)


@dataclass(frozen=True)
class BalanceMismatch:
    member_id: str
    available: int
    journal_available: int
    lifetime_earned: int
    journal_earned: int
    # Every figure of the member, for the operator reading the report.
    detail: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LedgerAudit:
    unbalanced_transactions: list[str] = field(default_factory=list)
    balance_mismatches: list[BalanceMismatch] = field(default_factory=list)
    order_mismatches: list[str] = field(default_factory=list)
    lot_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.unbalanced_transactions
            or self.balance_mismatches
            or self.order_mismatches
            or self.lot_mismatches
        )


LATEST_CHECKPOINT_SQL = "SELECT max(as_of) FROM rewards.points_checkpoints"


async def audit_ledger(
    conn: asyncpg.Connection, member_ids: list[str] | None = None, *, full: bool = False
) -> LedgerAudit:
    """Check the journal invariants, for some members or (None) for everyone:
    from the latest balance checkpoint (points/checkpoint.py), or (full) from
    the first transaction, which needs every journal partition attached."""
    members = [uuid.UUID(m) for m in member_ids] if member_ids is not None else None
    # One snapshot for all the checks, so concurrent writes never look like
    # drift (inside a caller's transaction, the caller's view is the point).
    if conn.is_in_transaction():
        results = await _run_checks(conn, members, full)
    else:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            results = await _run_checks(conn, members, full)
    unbalanced, balances, orders, lots = results
    return LedgerAudit(
        unbalanced_transactions=[str(r["id"]) for r in unbalanced],
        balance_mismatches=[
            BalanceMismatch(
                str(r["member_id"]),
                r["available"],
                r["journal_available"],
                r["lifetime_earned"],
                r["journal_earned"],
                {k: int(v) for k, v in r.items() if k != "member_id"},
            )
            for r in balances
        ],
        order_mismatches=[str(r["id"]) for r in orders],
        lot_mismatches=[str(r["id"]) for r in lots],
    )


async def _run_checks(
    conn: asyncpg.Connection, members: list[uuid.UUID] | None, full: bool
) -> list[list[asyncpg.Record]]:
    if full:
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM rewards.points_journal_archive)"):
            raise FailedPrecondition(
                "journal partitions are archived: the audit runs from the latest checkpoint",
                code="AUDIT_JOURNAL_ARCHIVED",
            )
        since = None
    else:
        since = await conn.fetchval(LATEST_CHECKPOINT_SQL)
    return [await conn.fetch(sql, members) for sql in checks(since)]
