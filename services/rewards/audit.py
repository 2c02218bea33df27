"""Ledger audit: the invariants of the points journal, checked against the data.

- every transaction has entries, and they sum to zero;
- an earn transaction credits its member's wallet with exactly its amount;
- each member's balance (available, lifetime_earned) equals the journal;
- each settled order has exactly the earn transaction its points call for,
  and a recorded balance-after.

Tests call it after every scenario; operators can run it against production
(read-only, one statement per invariant).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import asyncpg

UNBALANCED_SQL = """
SELECT t.id
FROM rewards.points_transactions t
LEFT JOIN rewards.points_entries e ON e.transaction_id = t.id
WHERE $1::uuid[] IS NULL OR t.member_id = ANY($1::uuid[])
GROUP BY t.id, t.kind, t.amount, t.member_id
HAVING count(e.id) = 0
    OR sum(e.amount) <> 0
    OR bool_or(e.account = 'member_wallet' AND e.member_id <> t.member_id)
    OR (t.kind = 'earn'
        AND coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_wallet'), 0) <> t.amount)
ORDER BY t.id
"""

BALANCE_SQL = """
WITH journal AS (
    SELECT e.member_id,
           sum(e.amount) AS available,
           coalesce(sum(e.amount) FILTER (WHERE t.kind = 'earn'), 0) AS earned
    FROM rewards.points_entries e
    JOIN rewards.points_transactions t ON t.id = e.transaction_id
    WHERE e.account = 'member_wallet' AND ($1::uuid[] IS NULL OR e.member_id = ANY($1::uuid[]))
    GROUP BY e.member_id
), balances AS (
    SELECT member_id, available, lifetime_earned
    FROM rewards.points_balances
    WHERE $1::uuid[] IS NULL OR member_id = ANY($1::uuid[])
)
SELECT coalesce(b.member_id, j.member_id) AS member_id,
       coalesce(b.available, 0) AS available,
       coalesce(j.available, 0) AS journal_available,
       coalesce(b.lifetime_earned, 0) AS lifetime_earned,
       coalesce(j.earned, 0) AS journal_earned
FROM balances b
FULL JOIN journal j ON j.member_id = b.member_id
WHERE coalesce(b.available, 0) <> coalesce(j.available, 0)
   OR coalesce(b.lifetime_earned, 0) <> coalesce(j.earned, 0)
ORDER BY 1
"""

ORDERS_SQL = """
SELECT o.id
FROM rewards.orders o
LEFT JOIN rewards.points_transactions t ON t.order_id = o.id AND t.kind = 'earn'
WHERE $1::uuid[] IS NULL OR o.member_id = ANY($1::uuid[])
GROUP BY o.id, o.points_earned, o.points_balance_after
HAVING count(t.id) > 1
    OR coalesce(sum(t.amount), 0) <> o.points_earned
    OR o.points_balance_after IS NULL
ORDER BY o.id
"""


@dataclass(frozen=True)
class BalanceMismatch:
    member_id: str
    available: int
    journal_available: int
    lifetime_earned: int
    journal_earned: int


@dataclass(frozen=True)
class LedgerAudit:
    unbalanced_transactions: list[str] = field(default_factory=list)
    balance_mismatches: list[BalanceMismatch] = field(default_factory=list)
    order_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.unbalanced_transactions or self.balance_mismatches or self.order_mismatches
        )


async def audit_ledger(
    conn: asyncpg.Connection, member_ids: list[str] | None = None
) -> LedgerAudit:
    """Check the journal invariants, for some members or (None) for everyone."""
    members = [uuid.UUID(m) for m in member_ids] if member_ids is not None else None
    unbalanced = await conn.fetch(UNBALANCED_SQL, members)
    balances = await conn.fetch(BALANCE_SQL, members)
    orders = await conn.fetch(ORDERS_SQL, members)
    return LedgerAudit(
        unbalanced_transactions=[str(r["id"]) for r in unbalanced],
        balance_mismatches=[
            BalanceMismatch(
                str(r["member_id"]),
                r["available"],
                r["journal_available"],
                r["lifetime_earned"],
                r["journal_earned"],
            )
            for r in balances
        ],
        order_mismatches=[str(r["id"]) for r in orders],
    )
