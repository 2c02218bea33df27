"""Balance checkpoints: each member's journal figures, and each lot's opening
value, at a month boundary (`python -m services.rewards checkpoint`, monthly).

A checkpoint is summed from the previous one plus the journal between the two
(one month of partitions read), and written only when the ledger audit (from
the previous checkpoint, in the same snapshot) is clean. The audit then re-sums
from the latest checkpoint, and journal partitions wholly before it may be
detached (services/rewards/partitions.py).

What it gives up: a journal row before the checkpoint that is changed after it
is no longer re-read by the audit (the journal is append-only by trigger, and a
backdated row still shows as a balance mismatch, since points_balances moved).

Boundary safety: journal rows take created_at from their transaction's start
(now()), so a transaction started before the boundary could still commit rows
dated before it. The checkpoint refuses while any such transaction is open,
checked before its snapshot is taken: none can start later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from servicekit.errors import FailedPrecondition, InvalidArgument
from servicekit.partitions import month_start

from .audit import LATEST_CHECKPOINT_SQL, audit_ledger

# $1: the new as_of; $2: the previous checkpoint's (NULL: none). Journal rows
# in [$2, $1) are read through their partitions (pruned).
WRITE_SQL = """
WITH since AS (SELECT coalesce($2::timestamptz, '-infinity') AS at),
window_txns AS (
    SELECT t.id, t.member_id, t.kind, t.amount
    FROM rewards.points_transactions t
    WHERE t.created_at >= (SELECT at FROM since) AND t.created_at < $1::timestamptz
), balances AS (
    SELECT member_id, sum(available) AS available, sum(pending) AS pending,
           sum(held) AS held, sum(debt) AS debt, sum(earned) AS lifetime_earned
    FROM (
        SELECT member_id, available, pending, held, debt, lifetime_earned AS earned
        FROM rewards.points_checkpoint_balances WHERE as_of = $2::timestamptz
        UNION ALL
        SELECT e.member_id,
               coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_wallet'), 0),
               coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_pending'), 0),
               coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_held'), 0),
               -coalesce(sum(e.amount) FILTER (WHERE e.account = 'member_debt'), 0),
               0
        FROM window_txns w JOIN rewards.points_entries e ON e.transaction_id = w.id
        WHERE e.member_id IS NOT NULL
        GROUP BY e.member_id
        UNION ALL
        SELECT member_id, 0, 0, 0, 0, sum(amount) FROM window_txns WHERE kind = 'earn'
        GROUP BY member_id
    ) s
    GROUP BY member_id
    HAVING sum(available) <> 0 OR sum(pending) <> 0 OR sum(held) <> 0 OR sum(debt) <> 0
        OR sum(earned) <> 0
), lots AS (
    SELECT lot_id, sum(v) AS opening
    FROM (
        SELECT lot_id, opening AS v FROM rewards.points_checkpoint_lots
        WHERE as_of = $2::timestamptz
        UNION ALL
        SELECT l.id, l.points FROM window_txns w JOIN rewards.points_lots l ON l.transaction_id = w.id
        UNION ALL
        SELECT m.lot_id, m.amount
        FROM window_txns w JOIN rewards.points_lot_movements m ON m.transaction_id = w.id
        -- A movement's time is its transaction's: one month of partitions read.
        WHERE m.created_at >= (SELECT at FROM since) AND m.created_at < $1::timestamptz
    ) s
    GROUP BY lot_id
    HAVING sum(v) <> 0
), header AS (
    INSERT INTO rewards.points_checkpoints (as_of, previous, members, lots)
    SELECT $1::timestamptz, $2::timestamptz, (SELECT count(*) FROM balances),
           (SELECT count(*) FROM lots)
    RETURNING members, lots
), written_balances AS (
    INSERT INTO rewards.points_checkpoint_balances
        (as_of, member_id, available, pending, held, debt, lifetime_earned)
    SELECT $1::timestamptz, member_id, available, pending, held, debt, lifetime_earned
    FROM balances
), written_lots AS (
    INSERT INTO rewards.points_checkpoint_lots (as_of, lot_id, opening)
    SELECT $1::timestamptz, lot_id, opening FROM lots
)
SELECT members, lots FROM header
"""

# Other sessions' transactions open since before the boundary (their rows
# could still commit dated before it); autovacuum and other workers write none.
OPEN_BEFORE_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start < $1
  AND backend_type = 'client backend'
"""


async def open_transactions_before(conn: asyncpg.Connection, at: datetime) -> int:
    """Other sessions' transactions on this database open since before `at`."""
    count: int = await conn.fetchval(OPEN_BEFORE_SQL, at)
    return count


@dataclass(frozen=True)
class Checkpoint:
    as_of: datetime
    previous: datetime | None
    members: int
    lots: int


async def write_checkpoint(conn: asyncpg.Connection, as_of: datetime | None = None) -> Checkpoint:
    """Checkpoint the ledger at `as_of` (a month boundary, UTC; by default the
    start of the database's current month)."""
    now: datetime = await conn.fetchval("SELECT now()")
    if as_of is None:
        as_of = month_start(now)
    if as_of.tzinfo is None or month_start(as_of) != as_of:
        raise InvalidArgument(
            f"{as_of.isoformat()} is not the first instant of a month (UTC)",
            code="CHECKPOINT_NOT_MONTH_BOUNDARY",
            field="as_of",
        )
    if as_of > now:
        raise InvalidArgument(
            f"{as_of:%Y-%m-%d} is after the database's clock ({now.isoformat()})",
            code="CHECKPOINT_IN_FUTURE",
            field="as_of",
        )
    # Checkpoint runs take turns (the CronJob, an operator by hand).
    await conn.execute("SELECT pg_advisory_lock(hashtext('rewards.points_checkpoints'))")
    try:
        open_before = await open_transactions_before(conn, as_of)
        if open_before:
            raise FailedPrecondition(
                f"{open_before} transaction(s) started before {as_of:%Y-%m-%d} are still open",
                code="CHECKPOINT_OPEN_TRANSACTIONS",
            )
        async with conn.transaction(isolation="repeatable_read"):
            previous: datetime | None = await conn.fetchval(LATEST_CHECKPOINT_SQL)
            if previous is not None and previous >= as_of:
                raise FailedPrecondition(
                    f"the ledger is checkpointed at {previous:%Y-%m-%d} already",
                    code="CHECKPOINT_EXISTS",
                )
            report = await audit_ledger(conn)
            if not report.ok:
                raise FailedPrecondition(
                    f"the ledger audit is not clean ({len(report.unbalanced_transactions)}"
                    f" unbalanced transactions, {len(report.balance_mismatches)} balances,"
                    f" {len(report.order_mismatches)} orders, {len(report.lot_mismatches)} lots)",
                    code="CHECKPOINT_AUDIT_FAILED",
                )
            row = await conn.fetchrow(WRITE_SQL, as_of, previous)
        # The audit reads them from now on: planned with their real size.
        await conn.execute(
            "ANALYZE rewards.points_checkpoints, rewards.points_checkpoint_balances,"
            " rewards.points_checkpoint_lots"
        )
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('rewards.points_checkpoints'))")
    return Checkpoint(as_of, previous, row["members"], row["lots"])
