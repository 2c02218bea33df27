"""Points lots partitioned by month of expires_at and lot movements by month of
their transaction (migration 0020): spends, the expiry job, refunds and holds
across partitions, the lots' expiry floor that bounds the spend's read (EXPLAIN
(FORMAT JSON) pruning), the migration of existing rows, and the detach guard.
Each test has a rewards database of its own (the floor and checkpoints are
ledger-wide); the clock is the database's, so a shifted clock changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from alembic import command

from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.errors import DomainError
from servicekit.migrations import alembic_config
from servicekit.partitions import (
    PartitionedTable,
    create_month,
    detach_partition,
    ensure_partitions,
    month_start,
)
from services.rewards.partitions import JOURNAL, LOT_MOVEMENTS, LOTS
from services.rewards.points import repository as ledger
from services.rewards.points.audit import audit_ledger, checks
from services.rewards.points.checkpoint import write_checkpoint
from services.rewards.points.domain import ExpiryKind, ExpiryPolicy, LedgerPolicy
from services.rewards.points.jobs import expire_due
from services.rewards.seed import seed_demo

from .test_rewards_ledger import Ledger
from .test_rewards_partitions import (
    SPEND_SQL,
    explain,
    explain_generic,
    relations,
    subplans_removed,
)


def utc(year: int, month: int, day: int = 1) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def days(n: int) -> LedgerPolicy:
    return LedgerPolicy(expiry=ExpiryPolicy(ExpiryKind.DAYS, n))


@dataclass
class LotsDb:
    db: Database
    conn: asyncpg.Connection
    now: datetime  # the database's clock at the start


@pytest.fixture
async def lots_db(scratch_url: str) -> AsyncIterator[LotsDb]:
    await asyncio.to_thread(command.upgrade, alembic_config("rewards", scratch_url), "head")
    pool = await create_pool(scratch_url, 1, 4)
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        await seed_demo(conn)
        now: datetime = await conn.fetchval("SELECT now()")
        yield LotsDb(Database(pool, "rewards", "rewards"), conn, now)
    finally:
        await conn.close()
        await pool.close()


async def lot_partition(conn: asyncpg.Connection, lot: str | uuid.UUID) -> str:
    name: str = await conn.fetchval(
        "SELECT tableoid::regclass::text FROM rewards.points_lots WHERE id = $1",
        uuid.UUID(str(lot)),
    )
    return name


async def floor(conn: asyncpg.Connection) -> datetime:
    at: datetime = await conn.fetchval("SELECT expires_from FROM rewards.points_lot_expiry_floor")
    return at


async def member_lots(conn: asyncpg.Connection, member: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, points, remaining, status, expires_at, tableoid::regclass::text AS part"
        " FROM rewards.points_lots WHERE member_id = $1 ORDER BY expires_at",
        uuid.UUID(member),
    )


async def audit_clean(conn: asyncpg.Connection) -> None:
    report = await audit_ledger(conn)
    assert report.ok, report
    full = await audit_ledger(conn, full=True)
    assert full.ok, full


async def two_lots(t: LotsDb, member: str) -> tuple[Ledger, Ledger]:
    """100 points lapsing in 10 days and 50 lapsing in 70 (two months' partitions)."""
    soon, late = Ledger(t.db, days(10)), Ledger(t.db, days(70))
    await late.earn(member, 5_000, t.now)
    await soon.earn(member, 10_000, t.now)
    return soon, late


def lots_partition(at: datetime) -> str:
    return "rewards." + LOTS.partition_name(month_start(at))


async def test_a_spend_across_two_lot_partitions_takes_the_soonest_expiring_first(
    lots_db: LotsDb,
) -> None:
    t, member = lots_db, str(uuid.uuid4())
    soon, _ = await two_lots(t, member)
    lots = await member_lots(t.conn, member)
    assert [r["part"] for r in lots] == [
        lots_partition(t.now + timedelta(days=10)),
        lots_partition(t.now + timedelta(days=70)),
    ]
    spent = await soon.call("redeem", member, 120, "k-" + member, "", t.now + timedelta(days=1))
    assert spent.lots == [(str(lots[0]["id"]), 100), (str(lots[1]["id"]), 20)]
    assert spent.available == 30
    # The movements are in their transaction's month, with its time.
    moves = await t.conn.fetch(
        "SELECT m.created_at, k.created_at AS txn_at, m.tableoid::regclass::text AS part"
        " FROM rewards.points_lot_movements m"
        " JOIN rewards.points_transaction_keys k ON k.id = m.transaction_id"
        " WHERE m.transaction_id = $1",
        uuid.UUID(spent.transaction_id),
    )
    assert len(moves) == 2
    for m in moves:
        assert m["created_at"] == m["txn_at"]
        assert m["part"] == "rewards." + LOT_MOVEMENTS.partition_name(month_start(m["txn_at"]))
    await audit_clean(t.conn)


async def test_an_expiry_change_moves_the_lot_to_its_month_and_its_key_stays(
    lots_db: LotsDb,
) -> None:
    """An UPDATE of expires_at (an operator's correction, a test's setup) moves
    the lot to its new month's partition: the key trigger lets the move
    through (the old row is gone), while a second lot with the id still fails."""
    t, member = lots_db, str(uuid.uuid4())
    _, late = await two_lots(t, member)
    lots = await member_lots(t.conn, member)
    later = lots[1]
    sooner = t.now + timedelta(days=5)
    moved = await t.conn.execute(
        "UPDATE rewards.points_lots SET expires_at = $2 WHERE id = $1", later["id"], sooner
    )
    assert moved == "UPDATE 1"
    after = {r["id"]: r["part"] for r in await member_lots(t.conn, member)}
    assert after[later["id"]] == lots_partition(sooner)
    assert (
        await t.conn.fetchval(
            "SELECT count(*) FROM rewards.points_lot_keys WHERE id = $1", later["id"]
        )
        == 1
    )
    with pytest.raises(asyncpg.UniqueViolationError) as again:
        await t.conn.execute(
            "INSERT INTO rewards.points_lots (id, member_id, transaction_id, root_lot_id,"
            " points, remaining, status, earned_at, expires_at)"
            " SELECT $1, member_id, transaction_id, $1, 1, 1, 'active', now(), '2099-01-01'"
            " FROM rewards.points_lots WHERE id = $1",
            later["id"],
        )
    assert again.value.constraint_name == "pk_points_lot_keys"
    # The moved lot is spent first now (it lapses soonest) and the ledger holds.
    spent = await late.call("redeem", member, 60, "k-" + member, "", t.now + timedelta(days=1))
    assert spent.lots[0] == (str(later["id"]), 50)
    await audit_clean(t.conn)


async def test_the_expiry_job_expires_lots_in_every_partition_and_raises_the_floor(
    lots_db: LotsDb,
) -> None:
    t, member = lots_db, str(uuid.uuid4())
    soon, _ = await two_lots(t, member)
    later = t.now + timedelta(days=100)
    assert await expire_due(t.db, soon.points, later) == 1
    assert [(r["status"], r["remaining"]) for r in await member_lots(t.conn, member)] == [
        ("expired", 0),
        ("expired", 0),
    ]
    # No lot holds points: the floor rises to a month before the job's clock.
    assert await floor(t.conn) == later - ledger.FLOOR_MARGIN
    # A lot written below it (earned on an old date) lowers it, and is spendable.
    other = str(uuid.uuid4())
    await soon.earn(other, 3_000, t.now)
    assert await floor(t.conn) == t.now + timedelta(days=10)
    spent = await soon.call("redeem", other, 30, "k-" + other, "", t.now + timedelta(days=1))
    assert spent.available == 0
    await audit_clean(t.conn)


async def test_a_refund_reverses_a_lot_in_an_older_partition(lots_db: LotsDb) -> None:
    t, member = lots_db, str(uuid.uuid4())
    soon, late = Ledger(t.db, days(10)), Ledger(t.db, days(70))
    txn = f"P-{uuid.uuid4().hex[:12]}"
    await soon.earn(member, 10_000, t.now, txn=txn)  # 100 in the older partition
    await late.earn(member, 5_000, t.now)  # 50 in the newer one
    refund = await soon.call("refund_order", "SH001", txn, txn + "-r", 10_000, t.now)
    assert (refund.points_due, refund.points_reversed, refund.available) == (100, 100, 50)
    lots = await member_lots(t.conn, member)
    assert [(r["part"], r["remaining"]) for r in lots] == [
        (lots_partition(t.now + timedelta(days=10)), 0),
        (lots_partition(t.now + timedelta(days=70)), 50),
    ]
    await audit_clean(t.conn)


async def test_holds_across_partitions_and_the_void_of_a_lapsed_lot(lots_db: LotsDb) -> None:
    t, member = lots_db, str(uuid.uuid4())
    soon, _ = await two_lots(t, member)
    first = await soon.call("hold", member, 120, "h1-" + member, "", t.now + timedelta(days=1))
    lots = await member_lots(t.conn, member)
    assert [r["remaining"] for r in lots] == [0, 30]
    await soon.call("void_hold", first.hold_id, t.now + timedelta(days=1))
    assert [(r["remaining"], r["expires_at"]) for r in await member_lots(t.conn, member)] == [
        (r["points"], r["expires_at"]) for r in lots
    ]
    # The soon lot is wholly held when it lapses: the job has nothing of it to
    # expire, and raises the floor past it (the other lot is later still).
    held = await soon.call("hold", member, 120, "h2-" + member, "", t.now + timedelta(days=9))
    after = t.now + timedelta(days=50)
    await expire_due(t.db, soon.points, after)
    assert await floor(t.conn) == after - ledger.FLOOR_MARGIN > lots[0]["expires_at"]
    # The void gives the lapsed lot its 100 back, and they lapse at once: the
    # spend's read, bounded by the floor, still finds the lot.
    voided = await soon.call("void_hold", held.hold_id, after)
    assert voided.available == 50
    assert [(r["status"], r["remaining"]) for r in await member_lots(t.conn, member)] == [
        ("expired", 0),
        ("active", 50),
    ]
    await audit_clean(t.conn)


async def test_the_spend_read_prunes_the_lots_before_the_floor(lots_db: LotsDb) -> None:
    t, member = lots_db, str(uuid.uuid4())
    for month in (1, 2, 3):  # partitions of lots that lapsed long ago
        await create_month(t.conn, LOTS, utc(2019, month))
    await two_lots(t, member)
    async with t.db.unit_of_work() as uow:
        await ledger.raise_expiry_floor(uow.conn, t.now)
        balance, at = await ledger.lock_member_with_floor(uow.conn, uuid.UUID(member))
    assert balance is not None and at == await floor(t.conn)
    old = {LOTS.partition_name(utc(2019, m)) for m in (1, 2, 3)}
    custom = relations(await explain(t.conn, ledger.OPEN_LOTS_SQL, uuid.UUID(member), at))
    assert custom and not old & set(custom)
    assert all(r.startswith("points_lots_") for r in custom)
    generic = await explain_generic(
        t.conn, ledger.OPEN_LOTS_SQL, ("uuid", "timestamptz"), member, at.isoformat()
    )
    assert subplans_removed(generic) >= 3
    assert not old & set(relations(generic))
    # The audit's and the refund's movement reads start at their bound.
    await create_month(t.conn, LOT_MOVEMENTS, utc(2019, 1))
    since = month_start(t.now)
    audit_lots = checks(since)[3]
    scanned = set(relations(await explain(t.conn, audit_lots, None)))
    assert LOT_MOVEMENTS.partition_name(utc(2019, 1)) not in scanned
    assert LOT_MOVEMENTS.partition_name(since) in scanned
    refund = relations(await explain(t.conn, ledger.ORDER_REDEMPTION_LOTS_SQL, uuid.uuid4(), since))
    assert LOT_MOVEMENTS.partition_name(utc(2019, 1)) not in refund


# ---- the migration over existing rows -------------------------------------

OLD_CREDIT_SQL = """
WITH t AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, idempotency_key, amount, rule, created_at, operator_id, reason)
    VALUES ($1, $2, 'adjust', $3, $4, '{}', $5, 'lots-test', 'before the partitioning')
    RETURNING id
), e AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT id, 'member_wallet', $2, $4 FROM t
    UNION ALL SELECT id, 'adjustments', NULL, -$4 FROM t
), l AS (
    INSERT INTO rewards.points_lots
        (id, member_id, transaction_id, root_lot_id, points, remaining, status, earned_at,
         expires_at, created_at)
    SELECT $6, $2, id, $6, $4, $4, 'active', $5, $7, $5 FROM t
)
INSERT INTO rewards.points_balances AS b (member_id, available) VALUES ($2, $4)
ON CONFLICT (member_id) DO UPDATE SET available = b.available + $4
"""


async def test_the_migration_moves_deployed_lots_and_movements_into_partitions(
    scratch_url: str,
) -> None:
    def migrate(revision: str) -> None:
        command.upgrade(alembic_config("rewards", scratch_url), revision)

    await asyncio.to_thread(migrate, "0019_rewards_member_stores")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        member = uuid.uuid4()
        lots = [uuid.uuid4() for _ in range(3)]
        spends = []
        for i, (lot, earned, expires) in enumerate(
            zip(
                lots,
                (utc(2025, 1, 5), utc(2025, 2, 5), utc(2025, 2, 6)),
                (utc(2025, 6, 30), utc(2025, 9, 30), utc(2100, 1, 1)),
                strict=True,
            )
        ):
            await conn.execute(
                OLD_CREDIT_SQL, uuid.uuid4(), member, f"old:{i}", 40, earned, lot, expires
            )
        for i, (lot, at) in enumerate(((lots[0], utc(2025, 3, 2)), (lots[1], utc(2025, 4, 2)))):
            spends.append(uuid.uuid4())
            await conn.execute(SPEND_SQL, spends[-1], member, f"spend:{i}", 15, at, lot)
        before_moves = await conn.fetch(
            "SELECT id, transaction_id, lot_id, amount FROM rewards.points_lot_movements ORDER BY id"
        )
        before_lots = await conn.fetch("SELECT * FROM rewards.points_lots ORDER BY id")
        await asyncio.to_thread(migrate, "head")

        after_lots = await conn.fetch(
            "SELECT *, tableoid::regclass::text AS part FROM rewards.points_lots ORDER BY id"
        )
        assert [{k: v for k, v in r.items() if k != "part"} for r in after_lots] == [
            dict(r) for r in before_lots
        ]
        parts = {r["id"]: r["part"] for r in after_lots}
        assert [parts[lot] for lot in lots] == [
            "rewards.points_lots_p202506",
            "rewards.points_lots_p202509",
            "rewards.points_lots_p210001",
        ]
        assert sorted(
            await conn.fetch("SELECT id, expires_at FROM rewards.points_lot_keys")
        ) == sorted((r["id"], r["expires_at"]) for r in before_lots)
        moves = await conn.fetch(
            "SELECT id, transaction_id, lot_id, amount, created_at,"
            " tableoid::regclass::text AS part FROM rewards.points_lot_movements ORDER BY id"
        )
        assert [tuple(m.values())[:4] for m in moves] == [tuple(m.values()) for m in before_moves]
        assert [(m["created_at"], m["part"]) for m in moves] == [
            (utc(2025, 3, 2), "rewards.points_lot_movements_p202503"),
            (utc(2025, 4, 2), "rewards.points_lot_movements_p202504"),
        ]
        # The floor starts at the earliest expiry of a lot holding points.
        assert await floor(conn) == utc(2025, 6, 30)
        await audit_clean(conn)

        # The guarantees hold on the converted rows: a lot id once, whatever
        # the partition; a movement needs a lot; ids continue; a movement
        # written without its time takes its transaction's.
        with pytest.raises(asyncpg.UniqueViolationError) as again:
            await conn.execute(
                "INSERT INTO rewards.points_lots (id, member_id, transaction_id, root_lot_id,"
                " points, remaining, status, earned_at, expires_at)"
                " SELECT $1, member_id, transaction_id, $1, 1, 1, 'active', now(), '2099-01-01'"
                " FROM rewards.points_lots WHERE id = $1",
                lots[0],
            )
        assert again.value.constraint_name == "pk_points_lot_keys"
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO rewards.points_lot_movements (transaction_id, lot_id, amount)"
                " VALUES ($1, $2, -1)",
                spends[0],
                uuid.uuid4(),
            )
        fresh = await conn.fetchrow(
            "INSERT INTO rewards.points_lot_movements (transaction_id, lot_id, amount)"
            " VALUES ($1, $2, 1) RETURNING id",
            spends[0],
            lots[0],
        )
        assert fresh is None  # the row kept is the one the default's trigger wrote
        row = await conn.fetchrow(
            "SELECT id, created_at, tableoid::regclass::text AS part"
            " FROM rewards.points_lot_movements WHERE transaction_id = $1 AND amount = 1",
            spends[0],
        )
        assert row["id"] > max(m["id"] for m in moves)
        assert (row["created_at"], row["part"]) == (
            utc(2025, 3, 2),
            "rewards.points_lot_movements_p202503",
        )
        # Movements stay append-only in every partition.
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute(
                "DELETE FROM rewards.points_lot_movements WHERE id = $1", moves[0]["id"]
            )
        # And back: the plain tables with the same rows, ids continuing.
        kept = await conn.fetch(
            "SELECT id, transaction_id, lot_id, amount FROM rewards.points_lot_movements"
            " ORDER BY id"
        )
        await asyncio.to_thread(
            command.downgrade,
            alembic_config("rewards", scratch_url),
            "0019_rewards_member_stores",
        )
        assert [dict(r) for r in await conn.fetch(
            "SELECT * FROM rewards.points_lots ORDER BY id"
        )] == [dict(r) for r in before_lots]  # fmt: skip
        assert (
            await conn.fetch(
                "SELECT id, transaction_id, lot_id, amount FROM rewards.points_lot_movements"
                " ORDER BY id"
            )
            == kept
        )
        next_id = await conn.fetchval(
            "INSERT INTO rewards.points_lot_movements (transaction_id, lot_id, amount)"
            " VALUES ($1, $2, 1) RETURNING id",
            spends[0],
            lots[0],
        )
        assert next_id > kept[-1]["id"]
        await asyncio.to_thread(migrate, "head")
        assert (
            await conn.fetchval("SELECT count(*) FROM rewards.points_lot_movements")
            == len(kept) + 1
        )
    finally:
        await conn.close()


# ---- detach ------------------------------------------------------------------


async def test_a_lot_partition_goes_only_when_covered_archived_and_terminal(
    lots_db: LotsDb,
) -> None:
    t = lots_db
    member, spent_lot, live_lot = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await t.conn.execute(
        OLD_CREDIT_SQL, uuid.uuid4(), member, "d:1", 40, utc(2019, 3, 5), spent_lot,
        utc(2019, 6, 15),
    )  # fmt: skip
    await t.conn.execute(
        OLD_CREDIT_SQL, uuid.uuid4(), member, "d:2", 30, utc(2019, 3, 6), live_lot,
        utc(2019, 6, 20),
    )  # fmt: skip
    await t.conn.execute(SPEND_SQL, uuid.uuid4(), member, "d:3", 40, utc(2019, 4, 2), spent_lot)
    for table in (JOURNAL, LOTS, LOT_MOVEMENTS):
        assert (await ensure_partitions(t.conn, table, ahead=3)).strays_left == 0
    lots_june, moves_april = "points_lots_p201906", "points_lot_movements_p201904"

    async def refused(table: PartitionedTable, name: str) -> str:
        with pytest.raises(DomainError) as caught:
            await detach_partition(t.conn, table, name)
        return str(caught.value.code)

    assert await refused(LOTS, lots_june) == "PARTITION_NEEDED_BY_AUDIT"
    assert await refused(LOT_MOVEMENTS, moves_april) == "PARTITION_NEEDED_BY_AUDIT"
    await write_checkpoint(t.conn, utc(2019, 7))
    # Refunds of the orders of that time read them while their journal is attached.
    assert await refused(LOTS, lots_june) == "PARTITION_NEEDED_BY_REFUNDS"
    assert await refused(LOT_MOVEMENTS, moves_april) == "PARTITION_NEEDED_BY_REFUNDS"
    for name in ("points_transactions_p201903", "points_transactions_p201904"):
        await detach_partition(t.conn, JOURNAL, name)
    # The live lot (never expired: no job ran) keeps its partition.
    assert await refused(LOTS, lots_june) == "PARTITION_HAS_LIVE_LOTS"
    assert (
        await detach_partition(t.conn, LOT_MOVEMENTS, moves_april)
        == "rewards_archive." + moves_april
    )
    await expire_due(t.db, Ledger(t.db).points, t.now)
    assert (
        await t.conn.fetchval("SELECT status FROM rewards.points_lots WHERE id = $1", live_lot)
        == "expired"
    )
    assert await detach_partition(t.conn, LOTS, lots_june) == "rewards_archive." + lots_june
    assert await t.conn.fetchval(f"SELECT count(*) FROM rewards_archive.{lots_june}") == 2
    # The audit from the checkpoint stays clean without them.
    assert (await audit_ledger(t.conn)).ok
