"""engagement.sends partitioned by month of created_at (migration 0013,
services/engagement/partitions.py): a send key stays unique across months
through send_keys (a step replayed in another month is not sent twice, also
under a race); dispatch, SMS receipts, credit epochs, WeCom task reads and the
cap holder stay right across a month's boundary; receipts go to the send's one
partition by its key, the cap holder and the dashboard range read only the
months they cover (EXPLAIN); the migration moves deployed rows in and back
out; a partition is detached only past SENDS_RETENTION_MONTHS and with no send
pending, sending or unknown, its keys leaving send_keys with it.

Every time here is fixed (2031): nothing depends on today's date; the module
has a database of its own, so the dispatcher's reads see only its rows."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from alembic import command

from servicekit.analytics import DayRange
from servicekit.db import asyncpg_dsn
from servicekit.errors import DomainError
from servicekit.migrations import alembic_config
from servicekit.partitions import detach_partition, ensure_partitions, list_partitions
from servicekit.settings import ServiceSettings
from services.engagement import analytics
from services.engagement import scheduler_repository as repo
from services.engagement.partitions import partitioned_tables, sends_table
from services.engagement.settings import EngagementSettings

from ..harness import Infra, own_database
from .test_partitioned_dedupe import blocked
from .test_rewards_partitions import (
    executed,
    explain,
    explain_generic,
    relations,
    subplans_removed,
)

SENDS = sends_table(13)
JUNE_END = datetime(2031, 6, 30, 23, 59, 59, tzinfo=UTC)
JULY_START = datetime(2031, 7, 1, 0, 0, 1, tzinfo=UTC)


def utc(year: int, month: int, day: int = 1, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


@pytest.fixture(scope="module")
async def url(infra: Infra) -> AsyncIterator[str]:
    async with own_database(infra, "engagement", prefix="sends") as u:
        yield u


@pytest.fixture
async def db(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    # Months of 2031 around the boundary the tests write across.
    await ensure_partitions(conn, SENDS, 3, clock=utc(2031, 5, 15))
    await conn.execute("TRUNCATE engagement.sends, engagement.send_keys")
    try:
        yield conn
    finally:
        await conn.close()


def row(
    key: str,
    at: datetime,
    *,
    member: uuid.UUID | None = None,
    status: str = "pending",
    channel: str = "sms",
    priority: int = 10,
    day: date | None = None,
    journey: str = "welcome",
) -> repo.SendRow:
    return repo.SendRow(
        send_key=key,
        enrollment_id=uuid.uuid4(),
        journey_id=journey,
        version=1,
        step_id="hello",
        member_id=member or uuid.uuid4(),
        channel=channel,
        template="t",
        message_class="targeted",
        priority=priority,
        local_day=day or at.date(),
        status=status,
        reason="",
        variant=None,
        created_at=at,
    )


async def where(conn: asyncpg.Connection, key: str) -> list[tuple[str, datetime]]:
    rows = await conn.fetch(
        "SELECT tableoid::regclass::text AS part, created_at FROM engagement.sends"
        " WHERE send_key = $1",
        key,
    )
    return [(r["part"], r["created_at"]) for r in rows]


async def test_a_step_replayed_in_another_month_is_not_written_twice(
    db: asyncpg.Connection,
) -> None:
    key = f"{uuid.uuid4()}:0"
    await repo.insert_sends(db, [row(key, JUNE_END)])
    # The same step run again after midnight of the 1st (a redelivered timer):
    # its row would go to July's partition, whose own unique index cannot see June's.
    await repo.insert_sends(db, [row(key, JULY_START, status="capped")])
    await repo.insert_sends(db, [row(key, JUNE_END)])  # and in the same month
    assert await where(db, key) == [("engagement.sends_p203106", JUNE_END)]
    assert await db.fetchval(
        "SELECT created_at FROM engagement.send_keys WHERE send_key = $1", key
    ) == (JUNE_END)
    # One statement holding the key twice, in two months: one row.
    other = f"{uuid.uuid4()}:0"
    await repo.insert_sends(db, [row(other, JULY_START), row(other, JUNE_END)])
    assert len(await where(db, other)) == 1


async def test_two_schedulers_racing_on_one_key_across_months(url: str) -> None:
    """The first writer (June) has not committed when the second (July)
    writes: the second waits on send_keys' unique index, then skips; a
    first writer that rolls back leaves the key to the second."""
    first = await asyncpg.connect(asyncpg_dsn(url))
    second = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for outcome in ("commit", "rollback"):
            key = f"{uuid.uuid4()}:0"
            tx = first.transaction()
            await tx.start()
            await repo.insert_sends(first, [row(key, JUNE_END)])
            racing = asyncio.ensure_future(repo.insert_sends(second, [row(key, JULY_START)]))
            await blocked(first, second, racing)
            await (tx.commit() if outcome == "commit" else tx.rollback())
            await racing
            expected = (
                [("engagement.sends_p203106", JUNE_END)]
                if outcome == "commit"
                else [("engagement.sends_p203107", JULY_START)]
            )
            assert await where(first, key) == expected, outcome
    finally:
        await first.close()
        await second.close()


async def test_dispatch_receipts_and_credit_epochs_across_a_month_boundary(
    db: asyncpg.Connection,
) -> None:
    june, july = f"{uuid.uuid4()}:0", f"{uuid.uuid4()}:0"
    await repo.insert_sends(db, [row(june, JUNE_END), row(july, JULY_START)])
    now = JULY_START + timedelta(minutes=5)
    leased = await repo.lease_pending_sends(db, now, now + timedelta(minutes=1), 10)
    assert {s.send_key for s in leased} == {june, july}
    # Both accepted by the SMS provider: waiting for their reports.
    await repo.record_outcomes(
        db,
        [
            repo.Outcome(k, "sending", repo.ACCEPTED, f"biz-{k}", "", now + timedelta(hours=72))
            for k in (june, july)
        ],
        now,
    )
    await repo.set_credit_epoch(db, june, 3)
    # The reports come three days later, one of them twice.
    later = now + timedelta(days=3)
    receipts = [
        repo.Receipt(june, f"biz-{june}", True, reported_at=later),
        repo.Receipt(july, f"biz-{july}", False, "MOBILE_NOT_ON_SERVICE", later),
    ]
    assert await repo.apply_receipts(db, receipts, later) == 2
    assert await repo.apply_receipts(db, receipts, later) == 0
    rows = {
        r["send_key"]: r
        for r in await db.fetch(
            "SELECT send_key, status, error_code, credit_epoch, tableoid::regclass::text AS part"
            " FROM engagement.sends"
        )
    }
    assert (rows[june]["status"], rows[june]["credit_epoch"]) == ("delivered", 3)
    assert (rows[july]["status"], rows[july]["error_code"]) == ("failed", "MOBILE_NOT_ON_SERVICE")
    assert rows[june]["part"] == "engagement.sends_p203106"
    assert rows[july]["part"] == "engagement.sends_p203107"


async def test_in_flight_sends_and_wecom_tasks_across_a_month_boundary(
    db: asyncpg.Connection,
) -> None:
    lost, task = f"{uuid.uuid4()}:0", f"{uuid.uuid4()}:0"
    await repo.insert_sends(db, [row(lost, JUNE_END), row(task, JULY_START, channel="wecom")])
    now = JULY_START + timedelta(minutes=5)
    await repo.lease_pending_sends(db, now, now + timedelta(minutes=1), 10)
    # The WeCom task was created; the other dispatcher died during its call.
    await repo.record_outcomes(
        db, [repo.Outcome(task, "sending", repo.TASK_CREATED, "msg-1", "", now)], now
    )
    later = now + timedelta(minutes=2)
    assert await repo.expire_in_flight(db, later, [], 10) == 1
    tasks = await repo.lease_wecom_tasks(db, later, later + timedelta(minutes=1), 10)
    assert [t.send_key for t in tasks] == [task]
    await repo.postpone_wecom_tasks(db, [task], later + timedelta(minutes=10))
    status = dict(
        await db.fetch(
            "SELECT send_key, status || ' ' || reason || ' '"
            " || coalesce(next_attempt_at::text, '') FROM engagement.sends"
        )
    )
    assert status[lost] == "unknown LEASE_EXPIRED "
    assert status[task].startswith("sending TASK_CREATED ")
    assert await db.fetchval(
        "SELECT next_attempt_at FROM engagement.sends WHERE send_key = $1", task
    ) == later + timedelta(minutes=10)


async def test_the_cap_holder_is_found_across_a_month_boundary(db: asyncpg.Connection) -> None:
    """A member in UTC+8: its local 1 July began at 16:00 UTC on 30 June, so the
    day's slot holder was written in June's partition."""
    member = uuid.uuid4()
    holder = f"{uuid.uuid4()}:0"
    day = date(2031, 7, 1)
    await repo.insert_sends(
        db, [row(holder, utc(2031, 6, 30, 17), member=member, priority=10, day=day)]
    )
    freed = await repo.preempt_holders(db, [(member, day, "targeted", 50)], JULY_START)
    assert freed == {(str(member), day, "targeted")}
    assert await db.fetchval(
        "SELECT status || ' ' || reason FROM engagement.sends WHERE send_key = $1", holder
    ) == ("capped PREEMPTED")
    # The bounds hold every zone's send of the day (UTC-12 .. UTC+14).
    since, until = repo.local_days_bounds([day])
    assert since <= datetime(2031, 6, 30, 10, tzinfo=UTC)
    assert until > datetime(2031, 7, 2, 12, tzinfo=UTC)


async def test_time_bounded_and_keyed_reads_prune_partitions(db: asyncpg.Connection) -> None:
    # Something in every month, so no partition is empty for the planner.
    for month in (5, 6, 7, 8):
        await repo.insert_sends(db, [row(f"{uuid.uuid4()}:0", utc(2031, month, 10))])
    await db.execute("ANALYZE engagement.sends")
    parts = {p.name for p in await list_partitions(db, SENDS)}
    assert {"sends_p203105", "sends_p203106", "sends_p203107", "sends_p203108"} <= parts

    # The journeys dashboard over July (local days of UTC+8): the sends of the
    # enrollments entered in July, written then or later (steps come days
    # after entry), from June's last day on (the day's margin): the months
    # before the range are not read.
    july = DayRange(date(2031, 7, 1), date(2031, 7, 31), "Asia/Shanghai", None)
    plan = await explain(db, analytics._SQL, july.start, july.end, False, [])
    scanned = {r for r in relations(plan) if r.startswith("sends")}
    assert scanned == {"sends_p203106", "sends_p203107", "sends_p203108", "sends_default"}, scanned

    # The cap holder of 1 July, as a prepared statement runs it (generic plan):
    # every month but June and July removed at the executor's start.
    since, until = repo.local_days_bounds([date(2031, 7, 1)])
    holder = (
        "SELECT send_key FROM engagement.sends WHERE member_id = $1 AND local_day = $2"
        " AND status = 'pending' AND created_at >= $3 AND created_at < $4"
    )
    plan = await explain_generic(
        db, holder, ("uuid", "date", "timestamptz", "timestamptz"),
        uuid.uuid4(), date(2031, 7, 1), since.isoformat(), until.isoformat(),
    )  # fmt: skip
    kept = {r for r in relations(plan) if r.startswith("sends")}
    assert kept == {"sends_p203106", "sends_p203107"}, kept
    assert subplans_removed(plan) >= 3

    # Writes by send key: send_keys says which partition; only that one is
    # read, the others pruned as the statement runs (never executed). The key
    # is in the last month, so a scan in partition order would read the others.
    key = f"{uuid.uuid4()}:0"
    await repo.insert_sends(db, [row(key, utc(2031, 8, 20), status="unknown")])
    plan = await explain_analyze(
        db,
        repo.APPLY_RECEIPTS_SQL,
        [key], ["biz-1"], [True], [""], [None], utc(2031, 8, 23),
    )  # fmt: skip
    assert {n for n in executed(plan) if n.startswith("sends_p")} == {"sends_p203108"}, plan
    plan = await explain_analyze(db, repo.SET_CREDIT_EPOCH_SQL, key, 2)
    assert {n for n in executed(plan) if n.startswith("sends_p")} == {"sends_p203108"}, plan
    # (EXPLAIN ANALYZE ran them: the send was settled by its report.)
    assert await db.fetchval(
        "SELECT status || ' ' || credit_epoch FROM engagement.sends WHERE send_key = $1", key
    ) == ("delivered 2")


async def explain_analyze(conn: asyncpg.Connection, sql: str, *args: object) -> Any:
    return json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))


async def test_detach_refuses_open_sends_and_recent_months_and_takes_the_keys(
    db: asyncpg.Connection,
) -> None:
    settled, pending = f"{uuid.uuid4()}:0", f"{uuid.uuid4()}:0"
    await repo.insert_sends(
        db, [row(settled, utc(2031, 6, 3), status="capped"), row(pending, utc(2031, 6, 4))]
    )
    a_year_later = utc(2032, 8, 2)  # June 2031 ends 13 months before August 2032
    with pytest.raises(DomainError) as refused:
        await detach_partition(db, SENDS, "sends_p203106", clock=a_year_later)
    assert refused.value.code == "PARTITION_HAS_OPEN_SENDS"
    for status in ("sending", "unknown"):
        await db.execute(
            "UPDATE engagement.sends SET status = $2 WHERE send_key = $1", pending, status
        )
        with pytest.raises(DomainError) as refused:
            await detach_partition(db, SENDS, "sends_p203106", clock=a_year_later)
        assert refused.value.code == "PARTITION_HAS_OPEN_SENDS", status
    await db.execute("UPDATE engagement.sends SET status = 'failed' WHERE send_key = $1", pending)
    # Settled, but within the months kept: refused, and its keys stay.
    with pytest.raises(DomainError) as refused:
        await detach_partition(db, SENDS, "sends_p203106", clock=utc(2032, 7, 15))
    assert refused.value.code == "PARTITION_TOO_RECENT"
    assert await db.fetchval("SELECT count(*) FROM engagement.send_keys") == 2
    archived = await detach_partition(db, SENDS, "sends_p203106", clock=a_year_later)
    assert archived == "engagement_archive.sends_p203106"
    assert await db.fetchval("SELECT count(*) FROM engagement_archive.sends_p203106") == 2
    assert await db.fetchval("SELECT count(*) FROM engagement.send_keys") == 0
    assert "sends_p203106" not in {p.name for p in await list_partitions(db, SENDS)}
    await db.execute("DROP TABLE engagement_archive.sends_p203106")


def test_the_service_keeps_sends_by_month_with_the_retention_setting() -> None:
    tables = {t.qualified: t for t in partitioned_tables(ServiceSettings())}
    sends = tables["engagement.sends"]
    assert (sends.granularity, sends.keep_months, sends.drop_after) == ("month", 13, None)
    assert sends.detach_guard is not None
    kept = {
        t.qualified: t for t in partitioned_tables(EngagementSettings(sends_retention_months=25))
    }
    assert kept["engagement.sends"].keep_months == 25


async def test_migration_moves_deployed_sends_into_partitions_and_back(infra: Infra) -> None:
    async with own_database(infra, prefix="sends_migration") as scratch:

        def migrate(revision: str, down: bool = False) -> None:
            cfg = alembic_config("engagement", scratch)
            (command.downgrade if down else command.upgrade)(cfg, revision)

        await asyncio.to_thread(migrate, "0012_engagement_partitions")
        conn = await asyncpg.connect(asyncpg_dsn(scratch))
        try:
            written = [
                (f"{uuid.uuid4()}:{i}", at, status)
                for i, (at, status) in enumerate(
                    [
                        (utc(2025, 3, 10), "delivered"),
                        (utc(2025, 3, 31, 23), "unknown"),
                        (utc(2025, 4, 1), "pending"),
                    ]
                )
            ]
            for key, at, status in written:
                await conn.execute(
                    "INSERT INTO engagement.sends (send_key, enrollment_id, journey_id, version,"
                    " step_id, member_id, channel, template, message_class, priority, local_day,"
                    " status, next_attempt_at, created_at, updated_at) VALUES ($1, $2, 'j', 1,"
                    " 's', $3, 'sms', 't', 'targeted', 10, $4, $5, $6, $6, $6)",
                    key, uuid.uuid4(), uuid.uuid4(), at.date(), status, at,
                )  # fmt: skip
            before = await conn.fetch("SELECT * FROM engagement.sends ORDER BY send_key")
            await asyncio.to_thread(migrate, "head")
            placed = {
                r["send_key"]: r["part"]
                for r in await conn.fetch(
                    "SELECT send_key, tableoid::regclass::text AS part FROM engagement.sends"
                )
            }
            assert [placed[k] for k, _, _ in written] == [
                "engagement.sends_p202503",
                "engagement.sends_p202503",
                "engagement.sends_p202504",
            ]
            after = await conn.fetch("SELECT * FROM engagement.sends ORDER BY send_key")
            assert [dict(r) for r in after] == [dict(r) for r in before]
            keys = await conn.fetch(
                "SELECT send_key, created_at FROM engagement.send_keys ORDER BY send_key"
            )
            assert [tuple(k) for k in keys] == sorted((k, at) for k, at, _ in written)
            # A deployed key replayed now is not written again; the dispatcher
            # still finds the deployed pending send by its partial index.
            await repo.insert_sends(conn, [row(written[2][0], utc(2031, 1, 1))])
            assert await conn.fetchval("SELECT count(*) FROM engagement.sends") == 3
            leased = await repo.lease_pending_sends(conn, utc(2025, 4, 2), utc(2025, 4, 3), 10)
            assert [s.send_key for s in leased] == [written[2][0]]
            await asyncio.to_thread(migrate, "0012_engagement_partitions", True)
            assert await conn.fetchval("SELECT to_regclass('engagement.send_keys')") is None
            assert not await conn.fetchval(
                "SELECT relkind = 'p' FROM pg_class WHERE oid = 'engagement.sends'::regclass"
            )
            assert await conn.fetchval("SELECT count(*) FROM engagement.sends") == 3
            pk = await conn.fetchval(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'pk_sends'"
            )
            assert pk == "PRIMARY KEY (send_key)"
        finally:
            await conn.close()
