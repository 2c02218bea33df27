"""processed_events of member, engagement, tiering, guides and rewards,
partitioned by day of the event's own occurred_at, and member's
identify_requests, by month with its first_only trigger
(servicekit/partition_migrations.py, services/<name>/partitions.py): a
redelivery (same occurred_at) conflicts in its day's partition by the primary
key alone, across a day's boundary and under a race; events without a time or
already past the retention at first delivery stay in the default partition
and expire there by processed_at; days past the retention are dropped by the
keeper; the keys' lookups read only the partitions still attached (EXPLAIN);
the CLI runs; the migrations move existing rows in and back out."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from alembic import command
from google.protobuf import timestamp_pb2

from loyalty.engagement.v1 import engagement_pb2
from loyalty.events.v1 import events_pb2
from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.migrations import alembic_config
from servicekit.partitions import (
    PartitionedTable,
    add_months,
    ensure_partitions,
    list_partitions,
    month_start,
    processed_events,
)
from servicekit.settings import ServiceSettings
from servicekit.tables import NO_EVENT_TIME, event_time
from services.engagement.servicer import EngagementServicer
from services.member import oneid_repository
from services.member.partitions import partitioned_tables as member_tables
from services.rewards.partitions import partitioned_tables as rewards_tables

from ..harness import Infra
from .test_rewards_partitions import db_now, plan_nodes, relations

SERVICES = ("member", "engagement", "tiering", "guides")
DEDUPED = (*SERVICES, "rewards")
RETENTION = timedelta(hours=168)

# What the consumer writes (servicekit/consumer.py): a row back the first time only.
RECORD = (
    "INSERT INTO {schema}.processed_events (consumer, event_id, occurred_at, processed_at)"
    " VALUES ($1, $2, $3, coalesce($4, now())) ON CONFLICT DO NOTHING RETURNING true"
)


def day_of(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, at.day, tzinfo=UTC)


async def record(
    conn: asyncpg.Connection,
    schema: str,
    consumer: str,
    event: uuid.UUID,
    occurred: datetime,
    processed: datetime | None = None,
) -> bool:
    return bool(
        await conn.fetchval(RECORD.format(schema=schema), consumer, event, occurred, processed)
    )


async def partition_of(
    conn: asyncpg.Connection, schema: str, consumer: str, event: uuid.UUID
) -> list[str]:
    rows = await conn.fetch(
        f"SELECT tableoid::regclass::text AS part FROM {schema}.processed_events"
        " WHERE consumer = $1 AND event_id = $2",
        consumer,
        event,
    )
    return [r["part"] for r in rows]


async def triggers_on(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
        table,
    )
    return [r["tgname"] for r in rows]


@pytest.mark.parametrize("schema", DEDUPED)
async def test_a_redelivery_conflicts_in_its_events_day_without_a_trigger(
    conn: asyncpg.Connection, schema: str
) -> None:
    kind = await conn.fetchval(
        "SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", f"{schema}.processed_events"
    )
    assert kind == "p"  # partitioned
    triggers = await conn.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
        f"{schema}.processed_events",
    )
    assert triggers == 0  # the primary key alone keeps the key unique
    consumer, event = f"dedupe-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    occurred = await db_now(conn) - timedelta(minutes=5)
    assert await record(conn, schema, consumer, event, occurred)
    assert not await record(conn, schema, consumer, event, occurred)
    assert await partition_of(conn, schema, consumer, event) == [
        f"{schema}.processed_events_p{occurred:%Y%m%d}"
    ]
    # Another consumer group records the same event for itself.
    assert await record(conn, schema, f"{consumer}-other", event, occurred)


async def test_a_redelivery_across_a_day_boundary_lands_in_the_first_deliverys_day(
    conn: asyncpg.Connection,
) -> None:
    """Delivered at 23:59:59 UTC, redelivered after midnight: the partition is
    chosen by occurred_at (the same on both), not by the processing time."""
    table = processed_events("tiering", RETENTION)
    today = day_of(await db_now(conn))
    occurred = today - timedelta(seconds=1.5)
    consumer, event = f"midnight-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    assert await record(conn, "tiering", consumer, event, occurred, today - timedelta(seconds=1))
    # Yesterday's partition (made by the keeper, the row moved in if it was a stray).
    await ensure_partitions(conn, table, ahead=0)
    assert not await record(
        conn, "tiering", consumer, event, occurred, today + timedelta(seconds=1)
    )
    assert await partition_of(conn, "tiering", consumer, event) == [
        f"tiering.processed_events_p{occurred:%Y%m%d}"
    ]


async def test_a_bulk_load_of_20000_keys_in_one_statement(conn: asyncpg.Connection) -> None:
    """No lock per row any more: the trigger design ran out of shared memory
    (one advisory lock per row, held to commit) on this."""
    consumer = f"bulk-{uuid.uuid4().hex[:8]}"
    occurred = await db_now(conn)
    status = await conn.execute(
        "INSERT INTO member.processed_events (consumer, event_id, occurred_at)"
        " SELECT $1, gen_random_uuid(), $2 FROM generate_series(1, 20000)"
        " ON CONFLICT DO NOTHING",
        consumer,
        occurred,
    )
    assert status == "INSERT 0 20000"
    await conn.execute("DELETE FROM member.processed_events WHERE consumer = $1", consumer)


def test_the_event_time_is_the_envelopes_occurred_at_or_a_fixed_epoch() -> None:
    at = datetime(2026, 3, 4, 23, 59, 59, 500000, tzinfo=UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    assert event_time(events_pb2.EventEnvelope(event_id="e", occurred_at=stamp)) == at
    # Old envelopes without one: the same fixed time on every delivery.
    assert event_time(events_pb2.EventEnvelope(event_id="e")) == NO_EVENT_TIME


async def blocked(
    observer: asyncpg.Connection, waiter: asyncpg.Connection, waiting: asyncio.Future[Any]
) -> None:
    """Until the waiter's statement waits on a lock (not a timed assertion)."""
    while not await observer.fetchval(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
        waiter.get_server_pid(),
    ):
        assert not waiting.done(), "the second writer did not wait for the first"
        await asyncio.sleep(0.02)


async def test_two_transactions_racing_on_one_key(infra: Infra) -> None:
    """The first writer's row is uncommitted when the second looks: the
    second waits for it on the unique index, then skips."""
    first = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    second = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        consumer, event = f"race-{uuid.uuid4().hex[:8]}", uuid.uuid4()
        occurred = await db_now(first)
        tx = first.transaction()
        await tx.start()
        assert await record(first, "tiering", consumer, event, occurred)
        racing = asyncio.ensure_future(record(second, "tiering", consumer, event, occurred))
        await blocked(first, second, racing)
        await tx.commit()
        assert await racing is False
        assert (
            await first.fetchval(
                "SELECT count(*) FROM tiering.processed_events WHERE consumer = $1", consumer
            )
            == 1
        )
    finally:
        await first.close()
        await second.close()


async def test_a_failed_first_writer_leaves_the_key_to_the_second(infra: Infra) -> None:
    first = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    second = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        consumer, event = f"rollback-{uuid.uuid4().hex[:8]}", uuid.uuid4()
        occurred = await db_now(first)
        tx = first.transaction()
        await tx.start()
        assert await record(first, "guides", consumer, event, occurred)
        racing = asyncio.ensure_future(record(second, "guides", consumer, event, occurred))
        await blocked(first, second, racing)
        await tx.rollback()  # the first handler failed: the event is not processed
        assert await racing is True
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("occurred", ["no time", "older than the retention"])
async def test_events_past_the_retention_at_first_delivery_stay_in_the_default_and_expire(
    conn: asyncpg.Connection, occurred: str
) -> None:
    """An envelope without occurred_at (the fixed epoch), or an event first
    delivered after its day was dropped (an offline order, a replay): the
    default partition holds its key, redeliveries conflict there, the keeper
    neither moves it into a partition of its own (one it would drop at once)
    nor counts it as a stray, and deletes it once processed_at is past the
    retention."""
    table = processed_events("engagement", RETENTION)
    now = await db_now(conn)
    at = NO_EVENT_TIME if occurred == "no time" else now - RETENTION - timedelta(days=3)
    consumer, event = f"late-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    assert await record(conn, "engagement", consumer, event, at)
    assert await partition_of(conn, "engagement", consumer, event) == [
        "engagement.processed_events_default"
    ]
    report = await ensure_partitions(conn, table, ahead=0)
    assert table.partition_name(day_of(at)) not in report.created
    assert report.strays_left == 0
    assert await partition_of(conn, "engagement", consumer, event) == [
        "engagement.processed_events_default"
    ]
    assert not await record(conn, "engagement", consumer, event, at)
    # Processed (recorded) longer ago than the retention: the keeper deletes it.
    await conn.execute(
        "UPDATE engagement.processed_events SET processed_at = $3"
        " WHERE consumer = $1 AND event_id = $2",
        consumer,
        event,
        now - RETENTION - timedelta(minutes=1),
    )
    report = await ensure_partitions(conn, table, ahead=0)
    assert report.default_expired >= 1
    assert await partition_of(conn, "engagement", consumer, event) == []


async def test_a_day_without_a_partition_yet_is_made_and_its_rows_moved(
    conn: asyncpg.Connection,
) -> None:
    """An event dated past the days made ahead (a producer's clock ahead)
    lands in the default; the keeper makes its day and moves it there, and
    the redelivery then conflicts in that day."""
    table = processed_events("guides", RETENTION)
    at = day_of(await db_now(conn)) + timedelta(days=40, hours=3)
    consumer, event = f"ahead-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    assert await record(conn, "guides", consumer, event, at)
    report = await ensure_partitions(conn, table, ahead=0)
    name = table.partition_name(day_of(at))
    # Only this day: under a shifted clock the session's own events can land in
    # another day without a partition, which the same run moves too.
    assert report.moved.get(name) == 1, report.moved
    assert await partition_of(conn, "guides", consumer, event) == [f"guides.{name}"]
    assert not await record(conn, "guides", consumer, event, at)


async def test_a_day_is_dropped_once_wholly_past_the_retention_and_a_replay_is_new(
    conn: asyncpg.Connection,
) -> None:
    now = await db_now(conn)
    yesterday = day_of(now) - timedelta(days=1)
    consumer, event = f"drop-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    assert await record(conn, "member", consumer, event, yesterday + timedelta(hours=2))
    # The retention reaching into yesterday: its partition is made (the row
    # moved there if it was a stray) and kept.
    keep = processed_events("member", (now - day_of(now)) + timedelta(hours=1))
    report = await ensure_partitions(conn, keep, ahead=1)
    assert keep.partition_name(yesterday) not in report.dropped
    assert keep.partition_name(yesterday) in {p.name for p in await list_partitions(conn, keep)}
    assert await partition_of(conn, "member", consumer, event) == [
        f"member.{keep.partition_name(yesterday)}"
    ]
    # Yesterday wholly past the retention: dropped with its rows, not pruned.
    drop = processed_events("member", (now - day_of(now)) - timedelta(seconds=1))
    report = await ensure_partitions(conn, drop, ahead=1)
    assert drop.partition_name(yesterday) in report.dropped
    assert drop.partition_name(day_of(now)) not in report.dropped
    assert await partition_of(conn, "member", consumer, event) == []
    # A replay after the drop is processed again, as after the pruner's
    # DELETE before; its key then stays in the default for the retention.
    assert await record(conn, "member", consumer, event, yesterday + timedelta(hours=2))
    assert await partition_of(conn, "member", consumer, event) == [
        "member.processed_events_default"
    ]
    assert not await record(conn, "member", consumer, event, yesterday + timedelta(hours=2))
    assert drop.partition_name(yesterday) not in (await ensure_partitions(conn, drop, 1)).created
    await ensure_partitions(conn, keep, ahead=1)  # yesterday back for the other tests
    await conn.execute("DELETE FROM member.processed_events WHERE consumer = $1", consumer)


def test_the_monthly_api_is_unchanged() -> None:
    """The rewards journal's calls (no granularity given) stay monthly."""
    journal = PartitionedTable("rewards", "points_transactions", "created_at")
    at = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
    assert journal.partition_name(journal.period_start(at)) == "points_transactions_p202612"
    assert journal.add_periods(month_start(at), 1) == datetime(2027, 1, 1, tzinfo=UTC)
    daily = processed_events("rewards", RETENTION)
    assert daily.partition_name(daily.period_start(at)) == "processed_events_p20261231"
    assert daily.add_periods(daily.period_start(at), 1) == datetime(2027, 1, 1, tzinfo=UTC)


async def test_identify_request_keys_stay_unique_across_months(conn: asyncpg.Connection) -> None:
    key = f"partition-test:{uuid.uuid4()}"
    member = str(uuid.uuid4())
    assert await oneid_repository.save_request(conn, key, b"h" * 32, member, True, {})
    now = await db_now(conn)
    # The same key once the month turned (a row written with next month's time):
    # taken, whichever partition would hold it.
    await conn.execute(
        "INSERT INTO member.identify_requests"
        " (request_key, request_hash, member_id, created, outcome, created_at)"
        " VALUES ($1, $2, $3, false, '{}', $4)",
        key,
        b"x" * 32,
        uuid.uuid4(),
        add_months(month_start(now), 1),
    )
    assert not await oneid_repository.save_request(
        conn, key, b"y" * 32, str(uuid.uuid4()), False, {}
    )
    prior, _ = await oneid_repository.preflight(conn, key, [])
    assert prior is not None and prior.member_id == member
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM member.identify_requests WHERE request_key = $1", key
        )
        == 1
    )


async def test_key_lookups_read_only_the_attached_partitions(conn: asyncpg.Connection) -> None:
    """The consumer's cursor walk and IdentifyMember's replay lookup carry no
    time, so what bounds them is the drop: each reads the attached partitions
    only (the replay lookup by index on the key), a dropped one no longer."""
    now = await db_now(conn)
    for table in member_tables(ServiceSettings()):
        await ensure_partitions(conn, table, ahead=1)
    plans = {
        # The consumer's cursor walk (the insert's conflict check is the
        # primary key of the one day partition its occurred_at picks).
        "processed_events": await conn.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT seq FROM member.processed_events"
            " WHERE consumer = 'member' AND producer = 'rewards' AND seq > 5 ORDER BY seq LIMIT 10"
        ),
        "identify_requests": await conn.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT r.outcome FROM member.identify_requests r"
            " WHERE r.request_key = $1",
            "some-key",
        ),
    }
    for name, raw in plans.items():
        plan = json.loads(raw)
        scanned = set(relations(plan))
        attached = {
            p.name
            for p in await list_partitions(conn, PartitionedTable("member", name, "processed_at"))
        }
        assert scanned <= attached
        this = f"{now:%Y%m%d}" if name == "processed_events" else f"{month_start(now):%Y%m}"
        assert f"{name}_p{this}" in scanned
        assert f"{name}_p201906" not in scanned
        if name == "identify_requests":
            # By the key's index (the primary key leads with it), not a whole-table scan.
            assert not [n for n in plan_nodes(plan) if n.get("Node Type") == "Seq Scan"], (
                name,
                plan,
            )


@pytest.mark.parametrize("service", SERVICES)
def test_the_services_keep_their_partitions_instead_of_pruning(service: str) -> None:
    build = importlib.import_module(f"services.{service}.server").build
    app = build(ServiceSettings())
    expected = {f"{service}.processed_events"}
    if service == "member":
        expected.add("member.identify_requests")
    # Detached past their retention by the operator, never dropped.
    detached = {"engagement.sends", "tiering.orders"}
    if service == "engagement":
        expected.add("engagement.sends")
    if service == "tiering":
        expected.add("tiering.orders")
    assert {t.qualified for t in app.partitioned} == expected
    # The pruner's ctid batches are wrong on a partitioned table: not given them.
    assert not expected & {r.table for r in app.retentions}
    assert f"{service}.outbox" in {r.table for r in app.retentions}
    assert all((t.drop_after is None) == (t.qualified in detached) for t in app.partitioned)


def test_rewards_keeps_its_dedupe_log_by_partitions() -> None:
    tables = rewards_tables(ServiceSettings())
    dedupe = {t.qualified: t for t in tables}["rewards.processed_events"]
    assert dedupe.granularity == "day" and dedupe.drop_after is not None


@pytest.mark.parametrize("service", ["member", "tiering", "rewards", "engagement"])
async def test_cli_ensures_and_lists(infra: Infra, service: str) -> None:
    env = {**os.environ, "DATABASE_URL": infra.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{service}", "partitions", "ensure", "--ahead", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    reports = json.loads(out)
    assert f"{service}.processed_events" in {r["table"] for r in reports}
    assert all(r["strays_left"] == 0 for r in reports)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{service}", "partitions", "detach", "nope_p201901",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 1
    assert json.loads(err)["error"]["code"] == "UNKNOWN_PARTITION"


async def test_member_migration_moves_rows_into_partitions_and_back(scratch_url: str) -> None:
    def migrate(revision: str, down: bool = False) -> None:
        config = alembic_config("member", scratch_url)
        (command.downgrade if down else command.upgrade)(config, revision)

    await asyncio.to_thread(migrate, "0007_member_analytics")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        today = day_of(await db_now(conn))
        events = [
            ("member", uuid.uuid4(), at)
            for at in (
                datetime(2025, 3, 10, tzinfo=UTC),  # older than the days made: the default
                today - timedelta(days=2, hours=-3),
                today - timedelta(hours=20),
            )
        ]
        await conn.executemany(
            "INSERT INTO member.processed_events (consumer, event_id, processed_at)"
            " VALUES ($1, $2, $3)",
            events,
        )
        await conn.execute(
            "INSERT INTO member.identify_requests"
            " (request_key, request_hash, member_id, created, outcome, created_at)"
            " VALUES ('old-key', $1, $2, true, '{}', '2025-05-02T00:00:00Z')",
            b"h" * 32,
            uuid.uuid4(),
        )
        await asyncio.to_thread(migrate, "head")
        rows = await conn.fetch(
            "SELECT event_id, occurred_at, tableoid::regclass::text AS part"
            " FROM member.processed_events ORDER BY processed_at"
        )
        assert [(r["event_id"], r["occurred_at"], r["part"]) for r in rows] == [
            (events[0][1], events[0][2], "member.processed_events_default"),
            (events[1][1], events[1][2], f"member.processed_events_p{events[1][2]:%Y%m%d}"),
            (events[2][1], events[2][2], f"member.processed_events_p{events[2][2]:%Y%m%d}"),
        ]
        assert (
            await conn.fetchval(
                "SELECT tableoid::regclass::text FROM member.identify_requests"
                " WHERE request_key = 'old-key'"
            )
            == "member.identify_requests_p202505"
        )
        # The converted keys are taken, at any time a redelivery carries (the
        # legacy keys' trigger, until the keeper retires it).
        assert not await record(conn, "member", "member", events[1][1], events[1][2])
        assert not await record(conn, "member", "member", events[0][1], today)
        assert await triggers_on(conn, "member.processed_events") == [
            "processed_events_legacy_check"
        ]
        await asyncio.to_thread(migrate, "0007_member_analytics", True)
        kind = await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = 'member.processed_events'::regclass"
        )
        assert kind == "r"
        assert {
            r["event_id"] for r in await conn.fetch("SELECT event_id FROM member.processed_events")
        } == {e[1] for e in events}
        assert await conn.fetchval("SELECT count(*) FROM member.identify_requests") == 1
        # The plain table's unique key is back.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO member.processed_events (consumer, event_id) VALUES ('member', $1)",
                events[0][1],
            )
        # And up again (the downgrade left nothing behind).
        await asyncio.to_thread(migrate, "head")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("service", "before"),
    [
        ("engagement", "0011_engagement_send_settling"),
        ("tiering", "0009_tiering_analytics"),
        ("guides", "0006_guides_merge_moves"),
        ("rewards", "0014_rewards_analytics"),
    ],
)
async def test_processed_events_migrations_go_up_and_down(
    scratch_url: str, service: str, before: str
) -> None:
    def migrate(revision: str, down: bool = False) -> None:
        config = alembic_config(service, scratch_url)
        (command.downgrade if down else command.upgrade)(config, revision)

    await asyncio.to_thread(migrate, before)
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        event = uuid.uuid4()
        at = await db_now(conn) - timedelta(days=1)
        await conn.execute(
            f"INSERT INTO {service}.processed_events (consumer, event_id, processed_at, seq,"
            " producer) VALUES ('c', $1, $2, 7, 'p')",
            event,
            at,
        )
        await asyncio.to_thread(migrate, "head")
        assert await partition_of(conn, service, "c", event) == [
            f"{service}.processed_events_p{at:%Y%m%d}"
        ]
        # The cursor walk's sequence number came along.
        assert (
            await conn.fetchval(
                f"SELECT seq FROM {service}.processed_events WHERE consumer = 'c' AND producer = 'p'"
            )
            == 7
        )
        assert not await record(conn, service, "c", event, at)
        # Its redelivery carries the event's real time, not the processed_at
        # the copy was given: the legacy keys' trigger still finds it.
        assert not await record(conn, service, "c", event, at - timedelta(seconds=3))
        assert await triggers_on(conn, f"{service}.processed_events") == [
            "processed_events_legacy_check"
        ]
        # Within the retention the keeper keeps the legacy keys ...
        report = await ensure_partitions(conn, processed_events(service, RETENTION), ahead=0)
        assert not report.legacy_retired
        # ... once all are past it, drops them and their trigger.
        report = await ensure_partitions(
            conn, processed_events(service, timedelta(hours=1)), ahead=0
        )
        assert report.legacy_retired
        assert await triggers_on(conn, f"{service}.processed_events") == []
        assert (
            await conn.fetchval("SELECT to_regclass($1)", f"{service}.processed_events_legacy")
            is None
        )
        assert await record(conn, service, "c", uuid.uuid4(), at, at)
        kept = await conn.fetchval(f"SELECT count(*) FROM {service}.processed_events")
        await asyncio.to_thread(migrate, before, True)
        assert (
            await conn.fetchval(
                "SELECT relkind::text FROM pg_class WHERE oid = $1::regclass",
                f"{service}.processed_events",
            )
            == "r"
        )
        assert await conn.fetchval(f"SELECT count(*) FROM {service}.processed_events") == kept
        await asyncio.to_thread(migrate, "head")
    finally:
        await conn.close()


class CountingIngest:
    """Stands in for the journeys (services/engagement/handlers.py): counts
    what IngestEvent hands on, which is what its dedupe decides."""

    def __init__(self) -> None:
        self.calls = 0

    async def ingest(self, *args: Any) -> Any:
        self.calls += 1
        return SimpleNamespace(parked=False, enrolled=[])


@pytest.mark.parametrize("with_time", [True, False])
async def test_an_ingest_retry_is_a_duplicate_in_its_events_day(
    infra: Infra, with_time: bool
) -> None:
    """IngestEvent's key is recorded at the request's occurred_at (the fixed
    epoch without one): the caller's retry repeats it and is a duplicate."""
    pool = await create_pool(infra.database_url, 1, 2)
    try:
        handlers = CountingIngest()
        servicer = EngagementServicer(
            Database(pool, "engagement", "engagement"),
            handlers,  # type: ignore[arg-type]
        )
        request = engagement_pb2.IngestEventRequest(
            event_id=str(uuid.uuid4()), member_id=str(uuid.uuid4()), event="page_view"
        )
        if with_time:
            request.occurred_at.FromDatetime(datetime.now(UTC) - timedelta(minutes=2))
        first = await servicer.IngestEvent(request, None)  # type: ignore[arg-type]
        retry = await servicer.IngestEvent(request, None)  # type: ignore[arg-type]
        assert not first.duplicate and retry.duplicate
        assert handlers.calls == 1
        async with pool.acquire() as conn:
            occurred = await conn.fetchval(
                "SELECT occurred_at FROM engagement.processed_events"
                " WHERE consumer = 'ingest' AND event_id = $1",
                uuid.UUID(request.event_id),
            )
        assert (occurred == NO_EVENT_TIME) is not with_time
    finally:
        await pool.close()
