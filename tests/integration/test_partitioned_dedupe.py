"""processed_events of member, engagement, tiering and guides, and member's
identify_requests, partitioned by month (servicekit/partition_migrations.py,
services/<name>/partitions.py): the dedupe key stays unique across partitions
(a month's boundary between a delivery and its redelivery, two transactions
racing on one key), partitions past the table's retention are dropped by the
keeper instead of rows pruned, the keys' lookups read only the partitions
still attached (EXPLAIN), the CLI runs, and the migrations move existing rows
in and back out."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from alembic import command

from servicekit.db import asyncpg_dsn, with_database
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
from services.member import oneid_repository
from services.member.partitions import partitioned_tables as member_tables

from ..harness import Infra
from .test_rewards_partitions import db_now, relations

SERVICES = ("member", "engagement", "tiering", "guides")

# What the consumer writes (servicekit/consumer.py): a row back the first time only.
RECORD = (
    "INSERT INTO {schema}.processed_events (consumer, event_id, processed_at)"
    " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true"
)


def seq_scans(plan: Any) -> list[str]:
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Node Type") == "Seq Scan":
            found.append(node["Relation Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return found


@pytest.mark.parametrize("schema", SERVICES)
async def test_one_event_is_recorded_once_across_months(
    conn: asyncpg.Connection, schema: str
) -> None:
    kind = await conn.fetchval(
        "SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", f"{schema}.processed_events"
    )
    assert kind == "p"  # partitioned
    consumer, event = f"dedupe-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    now = await db_now(conn)
    next_month = add_months(month_start(now), 1) + timedelta(hours=1)
    sql = RECORD.format(schema=schema)
    assert await conn.fetchval(sql, consumer, event, now) is True
    # The redelivery lands in another partition: still skipped, no row back.
    assert await conn.fetchval(sql, consumer, event, next_month) is None
    assert await conn.fetchval(sql, consumer, event, now) is None
    rows = await conn.fetch(
        f"SELECT tableoid::regclass::text AS part FROM {schema}.processed_events"
        " WHERE consumer = $1 AND event_id = $2",
        consumer,
        event,
    )
    assert [r["part"] for r in rows] == [f"{schema}.processed_events_p{month_start(now):%Y%m}"]
    # Another consumer group records the same event for itself.
    assert await conn.fetchval(sql, f"{consumer}-other", event, next_month) is True


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


async def test_two_transactions_racing_on_one_key_across_a_month_boundary(
    infra: Infra,
) -> None:
    """The first writer's row is uncommitted when the second, going to the
    next month's partition, looks: the second waits for it, then skips."""
    first = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    second = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        consumer, event = f"race-{uuid.uuid4().hex[:8]}", uuid.uuid4()
        now = await db_now(first)
        sql = RECORD.format(schema="tiering")
        tx = first.transaction()
        await tx.start()
        assert await first.fetchval(sql, consumer, event, now) is True
        racing = asyncio.ensure_future(
            second.fetchval(sql, consumer, event, add_months(month_start(now), 1))
        )
        await blocked(first, second, racing)
        await tx.commit()
        assert await racing is None
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
        now = await db_now(first)
        sql = RECORD.format(schema="guides")
        tx = first.transaction()
        await tx.start()
        assert await first.fetchval(sql, consumer, event, now) is True
        racing = asyncio.ensure_future(second.fetchval(sql, consumer, event, now))
        await blocked(first, second, racing)
        await tx.rollback()  # the first handler failed: the event is not processed
        assert await racing is True
    finally:
        await first.close()
        await second.close()


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


async def test_partitions_past_retention_are_dropped_not_pruned(conn: asyncpg.Connection) -> None:
    """Rows of long ago (a restored backup, a clock gone wrong) land in the
    default partition; the keeper moves them into their month, then drops the
    month's partition whole as past the retention; recent rows stay."""
    table = processed_events("engagement", timedelta(hours=168))
    consumer = f"drop-{uuid.uuid4().hex[:8]}"
    now = await db_now(conn)
    old = [datetime(2019, 6, 5, tzinfo=UTC), datetime(2019, 6, 20, tzinfo=UTC)]
    sql = RECORD.format(schema="engagement")
    for at in [*old, now]:
        assert await conn.fetchval(sql, consumer, uuid.uuid4(), at)
    report = await ensure_partitions(conn, table, ahead=1)
    assert report.moved == {"processed_events_p201906": 2}
    assert report.dropped == ["processed_events_p201906"]
    assert report.strays_left == 0
    names = {p.name for p in await list_partitions(conn, table)}
    assert "processed_events_p201906" not in names
    assert table.partition_name(month_start(now)) in names
    left = await conn.fetch(
        "SELECT processed_at FROM engagement.processed_events WHERE consumer = $1", consumer
    )
    assert [r["processed_at"] for r in left] == [now]
    # A table without drop_after keeps every partition.
    keep = PartitionedTable("engagement", "processed_events", "processed_at")
    assert (await ensure_partitions(conn, keep, ahead=1)).dropped == []


async def test_a_month_is_dropped_only_once_wholly_past_the_retention(
    conn: asyncpg.Connection,
) -> None:
    now = await db_now(conn)
    this_month = month_start(now)
    # Retention reaching into last month: last month's partition is kept.
    table = processed_events("guides", (now - this_month) + timedelta(days=2))
    last = add_months(this_month, -1)
    sql = RECORD.format(schema="guides")
    consumer = f"keep-{uuid.uuid4().hex[:8]}"
    await conn.fetchval(sql, consumer, uuid.uuid4(), last + timedelta(days=27))
    report = await ensure_partitions(conn, table, ahead=0)
    assert table.partition_name(last) not in report.dropped
    names = {p.name for p in await list_partitions(conn, table)}
    assert table.partition_name(last) in names


async def test_key_lookups_read_only_the_attached_partitions(conn: asyncpg.Connection) -> None:
    """The dedupe probe and IdentifyMember's replay lookup carry no time, so
    what bounds them is the drop: each reads the attached partitions, by index
    on the key, and a dropped month is no longer among them."""
    now = await db_now(conn)
    for table in member_tables(ServiceSettings()):
        await ensure_partitions(conn, table, ahead=1)
    plans = {
        "processed_events": await conn.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM member.processed_events"
            " WHERE consumer = 'member' AND event_id = $1",
            uuid.uuid4(),
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
        assert f"{name}_p{month_start(now):%Y%m}" in scanned
        assert f"{name}_p201906" not in scanned
        # By the key's index (the primary key leads with it), not a whole-table scan.
        assert not seq_scans(plan), (name, plan)


@pytest.mark.parametrize("service", SERVICES)
def test_the_services_keep_their_partitions_instead_of_pruning(service: str) -> None:
    build = importlib.import_module(f"services.{service}.server").build
    app = build(ServiceSettings())
    expected = {f"{service}.processed_events"}
    if service == "member":
        expected.add("member.identify_requests")
    assert {t.qualified for t in app.partitioned} == expected
    # The pruner's ctid batches are wrong on a partitioned table: not given them.
    assert not expected & {r.table for r in app.retentions}
    assert f"{service}.outbox" in {r.table for r in app.retentions}
    assert all(t.drop_after is not None for t in app.partitioned)


@pytest.mark.parametrize("service", ["member", "tiering"])
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


@pytest.fixture
async def scratch_url(infra: Infra) -> AsyncIterator[str]:
    name = f"partitions_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(infra.database_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_member_migration_moves_rows_into_partitions_and_back(scratch_url: str) -> None:
    def migrate(revision: str, down: bool = False) -> None:
        config = alembic_config("member", scratch_url)
        (command.downgrade if down else command.upgrade)(config, revision)

    await asyncio.to_thread(migrate, "0007_member_analytics")
    conn = await asyncpg.connect(asyncpg_dsn(scratch_url))
    try:
        events = [
            ("member", uuid.uuid4(), datetime(2025, month, day, tzinfo=UTC))
            for month, day in ((3, 10), (3, 11), (4, 10))
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
            "SELECT event_id, tableoid::regclass::text AS part FROM member.processed_events"
            " ORDER BY processed_at"
        )
        assert [(r["event_id"], r["part"]) for r in rows] == [
            (events[0][1], "member.processed_events_p202503"),
            (events[1][1], "member.processed_events_p202503"),
            (events[2][1], "member.processed_events_p202504"),
        ]
        assert (
            await conn.fetchval(
                "SELECT tableoid::regclass::text FROM member.identify_requests"
                " WHERE request_key = 'old-key'"
            )
            == "member.identify_requests_p202505"
        )
        # The converted keys are taken, in any month.
        taken = await conn.fetchval(
            "INSERT INTO member.processed_events (consumer, event_id)"
            " VALUES ('member', $1) ON CONFLICT DO NOTHING RETURNING true",
            events[0][1],
        )
        assert taken is None
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
        await conn.execute(
            f"INSERT INTO {service}.processed_events (consumer, event_id, processed_at)"
            " VALUES ('c', $1, '2025-02-03T04:05:06Z')",
            event,
        )
        await asyncio.to_thread(migrate, "head")
        assert (
            await conn.fetchval(
                f"SELECT tableoid::regclass::text FROM {service}.processed_events"
                " WHERE event_id = $1",
                event,
            )
            == f"{service}.processed_events_p202502"
        )
        assert (
            await conn.fetchval(
                RECORD.format(schema=service), "c", event, datetime(2025, 9, 1, tzinfo=UTC)
            )
            is None
        )
        await asyncio.to_thread(migrate, before, True)
        assert (
            await conn.fetchval(
                "SELECT relkind::text FROM pg_class WHERE oid = $1::regclass",
                f"{service}.processed_events",
            )
            == "r"
        )
        assert await conn.fetchval(f"SELECT count(*) FROM {service}.processed_events") == 1
    finally:
        await conn.close()
