"""The journal partitioned by month (migration 0013, servicekit/partitions.py):
keys stay unique across partitions, partitions are made ahead, strays in the
default partition are moved into their month, detach refuses what the ledger
audit needs and archives what a table's policy lets go, and the refund path's
journal reads and the audit's are planned on exactly the partitions expected
(EXPLAIN (FORMAT JSON))."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from alembic import command

from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.errors import DomainError
from servicekit.migrations import alembic_config
from servicekit.partitions import (
    PartitionedTable,
    PartitionKeeper,
    add_months,
    detach_partition,
    ensure_partitions,
    list_partitions,
    month_start,
)
from servicekit.server import ServiceApp
from services.rewards.partitions import JOURNAL
from services.rewards.points import repository as ledger
from services.rewards.points.audit import audit_ledger, checks
from services.rewards.points.checkpoint import open_transactions_before, write_checkpoint
from services.rewards.points.handlers import PointsLedger

from ..harness import Infra

# One complete posting (journal row, balanced entries, a lot, the balance),
# so the ledger audit holds over rows written at any time, in any partition.
ADJUST_SQL = """
WITH t AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, idempotency_key, amount, rule, created_at, operator_id, reason)
    VALUES ($1, $2, 'adjust', $3, $4, '{}', $5, 'partition-test', 'written in a given month')
    RETURNING id
), e AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT id, 'member_wallet', $2, $4 FROM t
    UNION ALL SELECT id, 'adjustments', NULL, -$4 FROM t
), l AS (
    INSERT INTO rewards.points_lots
        (id, member_id, transaction_id, root_lot_id, points, remaining, status, earned_at,
         expires_at)
    SELECT $6, $2, id, $6, $4, $4, 'active', $5, '2100-01-01' FROM t
)
INSERT INTO rewards.points_balances AS b (member_id, available) VALUES ($2, $4)
ON CONFLICT (member_id) DO UPDATE SET available = b.available + $4
"""


async def adjust(
    conn: asyncpg.Connection, member: uuid.UUID, key: str, at: datetime, points: int = 5
) -> uuid.UUID:
    txn = uuid.uuid4()
    await conn.execute(ADJUST_SQL, txn, member, key, points, at, uuid.uuid4())
    return txn


async def partition_of(conn: asyncpg.Connection, txn: uuid.UUID) -> str:
    name: str = await conn.fetchval(
        "SELECT tableoid::regclass::text FROM rewards.points_transactions WHERE id = $1", txn
    )
    return name


async def db_now(conn: asyncpg.Connection) -> datetime:
    now: datetime = await conn.fetchval("SELECT now()")
    return now


def plan_nodes(plan: Any) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, parents before children."""
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.get("Plans", [])))


def relations(plan: Any) -> list[str]:
    """Every relation an EXPLAIN (FORMAT JSON) plan scans."""
    return [n["Relation Name"] for n in plan_nodes(plan) if "Relation Name" in n]


def executed(plan: Any) -> list[str]:
    """Relations an EXPLAIN ANALYZE plan actually scanned (pruned at executor
    start or never run: no loops)."""
    return [
        n["Relation Name"]
        for n in plan_nodes(plan)
        if "Relation Name" in n and n.get("Actual Loops", 0) > 0
    ]


def subplans_removed(plan: Any) -> int:
    return sum(n.get("Subplans Removed", 0) for n in plan_nodes(plan))


async def explain(conn: asyncpg.Connection, sql: str, *args: object) -> Any:
    return json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))


async def explain_generic(
    conn: asyncpg.Connection, sql: str, types: tuple[str, ...], *args: object
) -> Any:
    """The plan of the statement prepared once and run with the generic plan
    (what a prepared statement settles on after its first executions)."""
    literals = ", ".join(f"'{a}'::{t}" for a, t in zip(args, types, strict=True))
    async with conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE partition_probe ({', '.join(types)}) AS {sql}")
        try:
            return json.loads(
                await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE partition_probe ({literals})")
            )
        finally:
            await conn.execute("DEALLOCATE partition_probe")


def journal_partitions(names: list[str]) -> set[str]:
    return {n for n in names if n.startswith("points_transactions_")}


async def test_keys_stay_unique_across_partitions(conn: asyncpg.Connection) -> None:
    # The journal's unique indexes are per partition; the key table is what
    # keeps one idempotency key (and one id) per journal, whatever the month.
    now = await db_now(conn)
    next_month = add_months(month_start(now), 1) + timedelta(days=3)
    key = f"partition-test:{uuid.uuid4()}"
    first = await adjust(conn, uuid.uuid4(), key, now)
    assert await partition_of(conn, first) == "rewards." + JOURNAL.partition_name(month_start(now))
    with pytest.raises(asyncpg.UniqueViolationError) as again:
        await adjust(conn, uuid.uuid4(), key, next_month)
    assert again.value.constraint_name == "uq_points_transaction_keys_idempotency_key"
    with pytest.raises(asyncpg.UniqueViolationError) as same_id:
        await conn.execute(
            "INSERT INTO rewards.points_transactions"
            " (id, member_id, kind, idempotency_key, amount, rule, created_at)"
            " VALUES ($1, $2, 'earn', $3, 1, '{}', $4)",
            first,
            uuid.uuid4(),
            f"partition-test:{uuid.uuid4()}",
            next_month,
        )
    assert same_id.value.constraint_name == "pk_points_transaction_keys"
    # Nothing of the refused writes is left: one journal row, one key.
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE idempotency_key = $1", key
        )
        == 1
    )
    row = await ledger.transaction_with_key(conn, key)
    assert row["id"] == first and row["created_at"] == now


async def test_ensure_makes_partitions_ahead_of_the_database_clock(
    conn: asyncpg.Connection,
) -> None:
    # created_at is written by PostgreSQL: partitions follow its clock, not the
    # application's (which `make test-shifted` moves a year ahead).
    now = await db_now(conn)
    report = await ensure_partitions(conn, JOURNAL, ahead=5, clock=now + timedelta(days=365))
    expected = {JOURNAL.partition_name(add_months(month_start(now), i)) for i in range(6)}
    names = {p.name for p in await list_partitions(conn, JOURNAL)}
    assert expected <= names
    assert set(report.created) <= expected and report.strays_left == 0
    assert JOURNAL.partition_name(add_months(month_start(now), 12)) not in names
    # Again: nothing to do.
    assert (await ensure_partitions(conn, JOURNAL, ahead=5)).created == []


async def test_ensure_moves_strays_from_the_default_partition(conn: asyncpg.Connection) -> None:
    member = uuid.uuid4()
    june, july = datetime(2019, 6, 5, tzinfo=UTC), datetime(2019, 7, 20, tzinfo=UTC)
    keys = [f"partition-test:{uuid.uuid4()}" for _ in range(3)]
    txns = [
        await adjust(conn, member, keys[0], june),
        await adjust(conn, member, keys[1], june + timedelta(days=1)),
        await adjust(conn, member, keys[2], july),
    ]
    for txn in txns:
        assert await partition_of(conn, txn) == "rewards.points_transactions_default"
    report = await ensure_partitions(conn, JOURNAL, ahead=0)
    assert report.moved == {"points_transactions_p201906": 2, "points_transactions_p201907": 1}
    assert report.strays_left == 0
    assert [await partition_of(conn, t) for t in txns] == [
        "rewards.points_transactions_p201906",
        "rewards.points_transactions_p201906",
        "rewards.points_transactions_p201907",
    ]
    # The moved rows keep their keys, the journal stays append-only in their new
    # partition, and the ledger still audits clean for the member.
    with pytest.raises(asyncpg.UniqueViolationError):
        await adjust(conn, uuid.uuid4(), keys[0], datetime(2019, 8, 1, tzinfo=UTC))
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await conn.execute(
            "UPDATE rewards.points_transactions_p201906 SET amount = 1 WHERE id = $1", txns[0]
        )
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await conn.execute("DELETE FROM rewards.points_transactions_p201907")
    assert (await audit_ledger(conn, [str(member)])).ok
    # The default partition's triggers are back on after the move.
    assert await conn.fetchval(
        "SELECT bool_and(tgenabled = 'O') FROM pg_trigger"
        " WHERE tgrelid = 'rewards.points_transactions_default'::regclass AND NOT tgisinternal"
    )


async def test_cli_ensures_and_lists(infra: Infra) -> None:
    env = {**os.environ, "DATABASE_URL": infra.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.rewards", "partitions", "ensure", "--ahead", "4",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    reports = {r["table"]: r for r in json.loads(out)}
    assert set(reports) == {
        "rewards.points_transactions",
        "rewards.orders",
        "rewards.points_lots",
        "rewards.points_lot_movements",
        "rewards.processed_events",
        "rewards.coupons",
    }
    assert all(r["strays_left"] == 0 for r in reports.values())


async def test_detach_refuses_every_partition_the_audit_needs(
    conn: asyncpg.Connection, infra: Infra
) -> None:
    now = await db_now(conn)
    before = await list_partitions(conn, JOURNAL)
    oldest = next(p for p in before if p.lower is not None)
    for name, code in (
        (oldest.name, "PARTITION_NEEDED_BY_AUDIT"),
        (JOURNAL.partition_name(month_start(now)), "PARTITION_NEEDED_BY_AUDIT"),
        ("points_transactions_default", "PARTITION_IS_DEFAULT"),
        ("points_transactions_p190001", "UNKNOWN_PARTITION"),
    ):
        with pytest.raises(DomainError) as refused:
            await detach_partition(conn, JOURNAL, name, clock=now + timedelta(days=3650))
        assert refused.value.code == code, name
    assert await list_partitions(conn, JOURNAL) == before
    # The operator's command says the same, and exits 1.
    env = {**os.environ, "DATABASE_URL": infra.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.rewards", "partitions", "detach", oldest.name,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert json.loads(err)["error"]["code"] == "PARTITION_NEEDED_BY_AUDIT"


@pytest.fixture
async def probe(conn: asyncpg.Connection) -> AsyncIterator[PartitionedTable]:
    """A partitioned table whose policy lets old partitions go (the mechanism
    the journal's policy refuses), with the application's clock as its key's."""
    await conn.execute("DROP SCHEMA IF EXISTS partition_probe, partition_probe_archive CASCADE")
    await conn.execute("CREATE SCHEMA partition_probe")
    await conn.execute(
        "CREATE TABLE partition_probe.sends (at timestamptz NOT NULL, n int NOT NULL)"
        " PARTITION BY RANGE (at)"
    )
    await conn.execute(
        "CREATE TABLE partition_probe.sends_default PARTITION OF partition_probe.sends DEFAULT"
    )
    yield PartitionedTable("partition_probe", "sends", "at", keep_months=2, database_clock=False)
    await conn.execute("DROP SCHEMA partition_probe, partition_probe_archive CASCADE")


async def test_detach_archives_a_partition_older_than_the_policy_keeps(
    conn: asyncpg.Connection, probe: PartitionedTable
) -> None:
    today = datetime(2026, 6, 15, tzinfo=UTC)
    await conn.execute(
        "INSERT INTO partition_probe.sends SELECT $1::timestamptz + n * interval '1 hour', n"
        " FROM generate_series(1, 10) n",
        datetime(2026, 1, 10, tzinfo=UTC),
    )
    report = await ensure_partitions(conn, probe, ahead=1, clock=today)
    assert report.created == ["sends_p202601", "sends_p202606", "sends_p202607"]
    assert report.moved == {"sends_p202601": 10}
    with pytest.raises(DomainError) as recent:
        await detach_partition(conn, probe, "sends_p202606", clock=today)
    assert recent.value.code == "PARTITION_TOO_RECENT"
    archived = await detach_partition(conn, probe, "sends_p202601", clock=today)
    assert archived == "partition_probe_archive.sends_p202601"
    assert await conn.fetchval("SELECT count(*) FROM partition_probe_archive.sends_p202601") == 10
    assert await conn.fetchval("SELECT count(*) FROM partition_probe.sends") == 0
    assert [p.name for p in await list_partitions(conn, probe)] == [
        "sends_default",
        "sends_p202606",
        "sends_p202607",
    ]


async def test_refund_reads_prune_the_journal_before_the_order(conn: asyncpg.Connection) -> None:
    # An old partition with rows (the planner keeps empty ones out of nothing).
    await adjust(
        conn, uuid.uuid4(), f"partition-test:{uuid.uuid4()}", datetime(2018, 2, 3, tzinfo=UTC)
    )
    await ensure_partitions(conn, JOURNAL, ahead=3)
    attached = {p.name for p in await list_partitions(conn, JOURNAL)}
    assert "points_transactions_p201802" in attached
    now = await db_now(conn)
    since = now - timedelta(minutes=5)
    newer = {
        p.name for p in await list_partitions(conn, JOURNAL) if p.upper is None or p.upper > since
    }
    order = uuid.uuid4()
    for sql in (ledger.ORDER_LOT_SQL, ledger.ORDER_REDEMPTION_LOTS_SQL):
        # The plan for the values given (asyncpg's first executions): pruned at planning.
        scanned = journal_partitions(relations(await explain(conn, sql, order, since)))
        assert scanned and scanned <= newer, scanned
        assert "points_transactions_p201802" not in scanned
        # The generic plan a prepared statement ends up with: pruned at executor start.
        plan = await explain_generic(conn, sql, ("uuid", "timestamptz"), order, since)
        assert subplans_removed(plan) >= len(attached - newer) > 0
        assert "points_transactions_p201802" not in journal_partitions(relations(plan))
    # The key lookups (merges, unmerges) never touch the journal's partitions.
    plan = await explain(
        conn,
        "SELECT id, created_at FROM rewards.points_transaction_keys WHERE idempotency_key = $1",
        "merge:x",
    )
    assert relations(plan) == ["points_transaction_keys"]


async def test_the_audit_reads_every_partition_so_none_is_detachable(
    conn: asyncpg.Connection,
) -> None:
    attached = {p.name for p in await list_partitions(conn, JOURNAL)}
    member = [uuid.uuid4()]
    for sql in checks(None):
        scanned = journal_partitions(relations(await explain(conn, sql, member)))
        if "points_transactions" not in sql:
            continue
        # Without a checkpoint, balances are the sum of the whole journal:
        # every partition is read, which the detach command's refusal protects.
        assert scanned == attached, sql


async def test_the_rewards_service_keeps_partitions_ahead_from_start_up(
    rewards_app: ServiceApp, infra: Infra
) -> None:
    # The service wires the journal into its keeper, which runs at start-up.
    assert [t.qualified for t in rewards_app.partitioned] == [
        "rewards.points_transactions",
        "rewards.orders",
        "rewards.points_lots",
        "rewards.points_lot_movements",
        "rewards.processed_events",
        "rewards.coupons",
    ]
    # The dedupe log is the keeper's, not the pruner's (servicekit/server.py).
    assert "rewards.processed_events" not in {r.table for r in rewards_app.pruner_retentions}
    assert "partitions" in {t.get_name() for t in rewards_app._tasks if not t.done()}
    pool = await create_pool(infra.database_url, 1, 1)
    try:
        keeper = PartitionKeeper(pool, rewards_app.partitioned, ahead=8, interval_seconds=3600)
        report, *_ = await keeper.ensure_once()
        async with pool.acquire() as c:
            now = await db_now(c)
            names = {p.name for p in await list_partitions(c, JOURNAL)}
    finally:
        await pool.close()
    assert report.strays_left == 0
    assert {JOURNAL.partition_name(add_months(month_start(now), i)) for i in range(9)} <= names


async def test_migration_moves_a_deployed_journal_into_partitions(scratch_url: str) -> None:
    def migrate(revision: str) -> None:
        command.upgrade(alembic_config("rewards", scratch_url), revision)

    await asyncio.to_thread(migrate, "0012_rewards_durable_events")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        member = uuid.uuid4()
        written = [
            (uuid.uuid4(), f"old:{i}", datetime(2025, month, 10, tzinfo=UTC))
            for i, month in enumerate((3, 3, 4))
        ]
        for txn, key, at in written:
            await conn.execute(
                "INSERT INTO rewards.points_transactions"
                " (id, member_id, kind, idempotency_key, amount, rule, created_at)"
                " VALUES ($1, $2, 'earn', $3, 10, '{}', $4)",
                txn,
                member,
                key,
                at,
            )
            await conn.execute(
                "INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)"
                " VALUES ($1, 'member_wallet', $2, 10), ($1, 'issued_liability', NULL, -10)",
                txn,
                member,
            )
        seqs = await conn.fetch("SELECT id, seq FROM rewards.points_transactions ORDER BY seq")
        await asyncio.to_thread(migrate, "head")
        rows = await conn.fetch(
            "SELECT id, seq, tableoid::regclass::text AS part FROM rewards.points_transactions"
            " ORDER BY seq"
        )
        # Same rows, same sequence numbers, each in its month.
        assert [(r["id"], r["seq"]) for r in rows] == [(r["id"], r["seq"]) for r in seqs]
        assert [r["part"] for r in rows] == [
            "rewards.points_transactions_p202503",
            "rewards.points_transactions_p202503",
            "rewards.points_transactions_p202504",
        ]
        keys = await conn.fetch(
            "SELECT id, idempotency_key, created_at FROM rewards.points_transaction_keys"
            " ORDER BY idempotency_key"
        )
        assert [tuple(k) for k in keys] == written
        # The guarantees hold on the converted data: a used key is refused in
        # any month, new rows continue the sequence, entries need a journal key.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO rewards.points_transactions"
                " (id, member_id, kind, idempotency_key, amount, rule)"
                " VALUES ($1, $2, 'earn', 'old:2', 10, '{}')",
                uuid.uuid4(),
                member,
            )
        fresh = await conn.fetchval(
            "INSERT INTO rewards.points_transactions"
            " (id, member_id, kind, idempotency_key, amount, rule)"
            " VALUES ($1, $2, 'earn', 'new:1', 10, '{}') RETURNING seq",
            uuid.uuid4(),
            member,
        )
        assert fresh > max(r["seq"] for r in rows)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)"
                " VALUES ($1, 'member_wallet', $2, 1)",
                uuid.uuid4(),
                member,
            )
    finally:
        await conn.close()


# ---- balance checkpoints (migration 0015, points/checkpoint.py) ---------------

SPEND_SQL = """
WITH t AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, idempotency_key, amount, rule, created_at)
    VALUES ($1, $2, 'redeem', $3, $4, '{}', $5)
    RETURNING id
), e AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT id, 'member_wallet', $2, -$4 FROM t UNION ALL SELECT id, 'redeemed', NULL, $4 FROM t
), m AS (
    INSERT INTO rewards.points_lot_movements (transaction_id, lot_id, amount)
    SELECT id, $6, -$4 FROM t
), l AS (
    UPDATE rewards.points_lots SET remaining = remaining - $4 WHERE id = $6
)
UPDATE rewards.points_balances SET available = available - $4 WHERE member_id = $2
"""

# A settled order and its earn (one transaction: the same created_at).
ORDER_EARN_SQL = """
WITH o AS (
    INSERT INTO rewards.orders
        (id, store_id, pos_transaction_id, member_id, channel, paid_amount_fen, ordered_at,
         request_hash, points_earned, points_balance_after, created_at)
    VALUES ($1, 'CKPT1', $2, $3, 'store', $4 * 100, $5, $6, $4, 0, $5)
    RETURNING id
), t AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, order_id, idempotency_key, amount, rule, created_at)
    SELECT $7, $3, 'earn', id, 'earn:' || id, $4, '{}', $5 FROM o
    RETURNING id
), e AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT id, 'member_wallet', $3, $4 FROM t UNION ALL SELECT id, 'issued_liability', NULL, -$4 FROM t
), l AS (
    INSERT INTO rewards.points_lots
        (id, member_id, transaction_id, root_lot_id, order_id, points, remaining, status,
         earned_at, expires_at)
    SELECT $8, $3, t.id, $8, $1, $4, $4, 'active', $5, '2100-01-01' FROM t
)
INSERT INTO rewards.points_balances AS b (member_id, available, lifetime_earned) VALUES ($3, $4, $4)
ON CONFLICT (member_id) DO UPDATE
SET available = b.available + $4, lifetime_earned = b.lifetime_earned + $4
"""


def utc(year: int, month: int, day: int = 1) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


@pytest.fixture
async def ledger_db(scratch_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A migrated rewards database of its own: checkpoints are ledger-wide."""
    await asyncio.to_thread(command.upgrade, alembic_config("rewards", scratch_url), "head")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        yield conn
    finally:
        await conn.close()


async def seed_history(conn: asyncpg.Connection) -> dict[str, Any]:
    """Two members' history over January-March 2025 and this month: credits,
    a spend in February and another today from a January lot (a lot whose
    movements straddle the checkpoints), and a settled order in March."""
    a, b = uuid.uuid4(), uuid.uuid4()
    lot_a = uuid.uuid4()
    await conn.execute(ADJUST_SQL, uuid.uuid4(), a, "ck:a1", 50, utc(2025, 1, 10), lot_a)
    await adjust(conn, b, "ck:b1", utc(2025, 1, 20), points=30)
    await conn.execute(SPEND_SQL, uuid.uuid4(), a, "ck:a2", 20, utc(2025, 2, 3), lot_a)
    await conn.execute(
        "INSERT INTO rewards.stores (store_id, name, city, address, latitude, longitude)"
        " VALUES ('CKPT1', 'Checkpoint', 'Shanghai', '1 Road', 31.2, 121.4)"
    )
    order, earn = uuid.uuid4(), uuid.uuid4()
    await conn.execute(
        ORDER_EARN_SQL, order, "pos-1", a, 40, utc(2025, 3, 15), b"\0" * 32, earn, uuid.uuid4()
    )
    await conn.execute(SPEND_SQL, uuid.uuid4(), a, "ck:a3", 10, await db_now(conn), lot_a)
    await adjust(conn, b, "ck:b2", await db_now(conn), points=5)
    report = await ensure_partitions(conn, JOURNAL, ahead=1)
    assert report.strays_left == 0
    return {"a": a, "b": b, "lot_a": lot_a, "order": order, "earn": earn}


async def test_a_checkpointed_audit_equals_the_full_audit(ledger_db: asyncpg.Connection) -> None:
    conn = ledger_db
    seen = await seed_history(conn)
    a, b = str(seen["a"]), str(seen["b"])
    first = await write_checkpoint(conn, utc(2025, 2))
    assert (first.previous, first.members, first.lots) == (None, 2, 2)
    # The second is summed from the first plus February-March's journal.
    second = await write_checkpoint(conn, utc(2025, 4))
    assert second.previous == utc(2025, 2)
    balances = {
        r["member_id"]: dict(r)
        for r in await conn.fetch(
            "SELECT member_id, available, lifetime_earned FROM rewards.points_checkpoint_balances"
            " WHERE as_of = $1",
            utc(2025, 4),
        )
    }
    assert balances[seen["a"]] | {"member_id": None} == {
        "member_id": None, "available": 50 - 20 + 40, "lifetime_earned": 40,
    }  # fmt: skip
    assert (
        await conn.fetchval(
            "SELECT opening FROM rewards.points_checkpoint_lots WHERE as_of = $1 AND lot_id = $2",
            utc(2025, 4),
            seen["lot_a"],
        )
        == 50 - 20
    )
    for members in ([a], [b], None):
        checkpointed = await audit_ledger(conn, members)
        assert checkpointed.ok and checkpointed == await audit_ledger(conn, members, full=True)
    # Rows written after the checkpoint that are tampered with are found, the
    # same as by the full audit: an entry of today's spend, a lot's remaining.
    spend = await conn.fetchval(
        "SELECT id FROM rewards.points_transactions WHERE idempotency_key = 'ck:a3'"
    )
    await conn.execute("ALTER TABLE rewards.points_entries DISABLE TRIGGER USER")
    await conn.execute(
        "UPDATE rewards.points_entries SET amount = amount - 1"
        " WHERE transaction_id = $1 AND account = 'member_wallet'",
        spend,
    )
    await conn.execute("UPDATE rewards.points_lots SET remaining = remaining + 3 WHERE id = $1",
                       seen["lot_a"])  # fmt: skip
    for members in ([a], None):
        checkpointed = await audit_ledger(conn, members)
        assert checkpointed == await audit_ledger(conn, members, full=True)
        assert checkpointed.unbalanced_transactions == [str(spend)]
        assert checkpointed.lot_mismatches == [str(seen["lot_a"])]
        assert [m.member_id for m in checkpointed.balance_mismatches] == [a]
    # The audit is not clean: no checkpoint is written over it.
    with pytest.raises(DomainError) as refused:
        await write_checkpoint(conn, utc(2025, 6))
    assert refused.value.code == "CHECKPOINT_AUDIT_FAILED"
    assert await conn.fetchval("SELECT max(as_of) FROM rewards.points_checkpoints") == utc(2025, 4)


async def test_a_checkpoint_refuses_a_bad_boundary(ledger_db: asyncpg.Connection) -> None:
    conn = ledger_db
    await seed_history(conn)
    now = await db_now(conn)
    for as_of, code in (
        (utc(2025, 2, 2), "CHECKPOINT_NOT_MONTH_BOUNDARY"),
        (add_months(month_start(now), 1), "CHECKPOINT_IN_FUTURE"),
    ):
        with pytest.raises(DomainError) as refused:
            await write_checkpoint(conn, as_of)
        assert refused.value.code == code
    await write_checkpoint(conn, utc(2025, 3))
    for as_of in (utc(2025, 3), utc(2025, 2)):
        with pytest.raises(DomainError) as refused:
            await write_checkpoint(conn, as_of)
        assert refused.value.code == "CHECKPOINT_EXISTS"
    # Checkpoints are append-only, like the journal.
    with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
        await conn.execute("DELETE FROM rewards.points_checkpoint_balances")


async def test_a_checkpoint_waits_for_transactions_open_since_before_its_boundary(
    ledger_db: asyncpg.Connection, scratch_url: str
) -> None:
    # The guard write_checkpoint runs before its snapshot (CHECKPOINT_OPEN_TRANSACTIONS):
    # a transaction that started before the boundary could still commit rows
    # dated before it. Shown with a boundary just ahead of the open transaction.
    other = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        tx = other.transaction()
        await tx.start()
        started: datetime = await other.fetchval("SELECT now()")
        assert await open_transactions_before(ledger_db, started + timedelta(seconds=1)) == 1
        assert await open_transactions_before(ledger_db, started) == 0
        await tx.commit()
        assert await open_transactions_before(ledger_db, started + timedelta(seconds=1)) == 0
    finally:
        await other.close()


async def test_detach_needs_a_checkpoint_and_an_archived_order_is_not_refunded(
    ledger_db: asyncpg.Connection, scratch_url: str
) -> None:
    conn = ledger_db
    seen = await seed_history(conn)
    with pytest.raises(DomainError) as refused:
        await detach_partition(conn, JOURNAL, "points_transactions_p202501")
    assert refused.value.code == "PARTITION_NEEDED_BY_AUDIT"
    await write_checkpoint(conn, utc(2025, 2))
    # Covered: January goes; February ends after the checkpoint and stays.
    with pytest.raises(DomainError) as refused:
        await detach_partition(conn, JOURNAL, "points_transactions_p202502")
    assert refused.value.code == "PARTITION_NEEDED_BY_AUDIT"
    assert (
        await detach_partition(conn, JOURNAL, "points_transactions_p202501")
        == "rewards_archive.points_transactions_p202501"
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM rewards_archive.points_transactions_p202501") == 2
    )
    # The audit from the checkpoint stays clean; a full one cannot be run.
    assert (await audit_ledger(conn)).ok
    with pytest.raises(DomainError) as full:
        await audit_ledger(conn, full=True)
    assert full.value.code == "AUDIT_JOURNAL_ARCHIVED"
    # The next checkpoint sums from the first, not from the archived rows.
    await write_checkpoint(conn, utc(2025, 4))
    for name in ("points_transactions_p202502", "points_transactions_p202503"):
        await detach_partition(conn, JOURNAL, name)
    assert (await audit_ledger(conn)).ok
    assert [r["partition"] for r in await conn.fetch(
        "SELECT partition FROM rewards.points_journal_archive ORDER BY lower"
    )] == [
        "points_transactions_p202501", "points_transactions_p202502",
        "points_transactions_p202503",
    ]  # fmt: skip
    # The March order's earn is archived: its refund is refused by name (and
    # the retry replays it), the balance untouched.
    before = await conn.fetchrow(
        "SELECT * FROM rewards.points_balances WHERE member_id = $1", seen["a"]
    )
    pool = await create_pool(scratch_url, 1, 2)
    db = Database(pool, "rewards", "rewards")
    try:
        for _ in range(2):
            async with db.unit_of_work() as uow:
                outcome = await PointsLedger().refund_order(
                    uow, "CKPT1", "pos-1", "refund-1", 1000, await db_now(conn)
                )
            assert outcome.error is not None
            assert outcome.error.code == "REFUND_JOURNAL_ARCHIVED"
    finally:
        await db.close()
    assert (
        await conn.fetchrow("SELECT * FROM rewards.points_balances WHERE member_id = $1", seen["a"])
        == before
    )
    assert await conn.fetchval("SELECT count(*) FROM rewards.refunds") == 0
    assert (await audit_ledger(conn)).ok


async def test_the_audit_reads_the_journal_from_the_checkpoint_on(
    conn: asyncpg.Connection,
) -> None:
    # An old partition with rows (the planner keeps empty ones out of nothing).
    await adjust(
        conn, uuid.uuid4(), f"partition-test:{uuid.uuid4()}", datetime(2018, 2, 3, tzinfo=UTC)
    )
    await ensure_partitions(conn, JOURNAL, ahead=3)
    now = await db_now(conn)
    as_of = month_start(now)
    partitions = await list_partitions(conn, JOURNAL)
    since = {p.name for p in partitions if p.upper is None or p.upper > as_of}
    member = [uuid.uuid4()]
    for sql in checks(as_of):
        if "points_transactions" not in sql:
            continue
        scanned = journal_partitions(relations(await explain(conn, sql, member)))
        assert scanned and scanned <= since, sql
        assert "points_transactions_p201802" not in scanned
        plan = await explain_generic(conn, sql, ("uuid[]",), f"{{{member[0]}}}")
        assert "points_transactions_p201802" not in journal_partitions(relations(plan)), sql
