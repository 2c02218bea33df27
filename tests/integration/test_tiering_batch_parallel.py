"""The batch recompute's chunking and parallel workers change nothing in the
result: two copies of one generated brand, one recomputed serially in a single
chunk, the other in many small chunks on two connections, end with the same
tiers, profiles, history and events. The envelopes the batch builds in SQL are
the ones protobuf builds. One recompute at a time."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from google.protobuf import any_pb2

from bench.tiering import _next_year, load
from loyalty.events.v1 import events_pb2
from servicekit.db import Database, asyncpg_dsn, create_pool, with_database
from servicekit.migrations import upgrade
from servicekit.protos import timestamp
from services.tiering import outbox_sql
from services.tiering.batch import LOCK_KEY, RecomputeBusy, RunResult, recompute

from ..harness import Infra

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MEMBERS, ORDERS = 600, 6_000
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
async def brands(infra: Infra) -> AsyncIterator[tuple[Database, Database]]:
    """Two databases holding the same generated brand (the second a copy of the first)."""
    names = [f"loyalty_test_brand_{uuid.uuid4().hex[:8]}_{side}" for side in "ab"]
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    dbs: list[Database] = []
    try:
        await admin.execute(f'CREATE DATABASE "{names[0]}"')
        first = with_database(infra.admin_url, names[0])
        await asyncio.to_thread(upgrade, "tiering", first)
        await load(first, MEMBERS, ORDERS, NOW, seed=11)
        # Some variety the generator lacks: overrides that expired yesterday.
        c = await asyncpg.connect(asyncpg_dsn(first))
        await c.execute(
            "UPDATE tiering.member_tiers SET override_tier = 'vip', tier_code = 'vip',"
            " override_until = $1, override_reason = 'test' WHERE member_id IN"
            " (SELECT member_id FROM tiering.member_tiers ORDER BY member_id LIMIT 7)",
            NOW - timedelta(days=1),
        )
        # And members tiering knows without a profile yet (the run creates them).
        await c.execute(
            "DELETE FROM tiering.member_profiles WHERE member_id IN (SELECT member_id"
            " FROM tiering.member_profiles ORDER BY member_id OFFSET 200 LIMIT 100)"
        )
        await c.close()
        await admin.execute(f'CREATE DATABASE "{names[1]}" TEMPLATE "{names[0]}"')
        for name in names:
            pool = await create_pool(with_database(infra.admin_url, name), 1, 2)
            dbs.append(Database(pool, "tiering", "tiering"))
        yield dbs[0], dbs[1]
    finally:
        for db in dbs:
            await db.close()
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def state(db: Database) -> dict[str, Any]:
    """Everything the recompute writes, comparable across two databases."""
    async with db.pool.acquire() as c:
        # Every column but updated_at (the clock's now()).
        tiers = await c.fetch(
            "SELECT member_id, programme_id, programme_version, tier_code, base_tier,"
            " earned_tier, period_start, period_end, peak, grace_until, override_tier,"
            " override_until, override_reason, evaluated_at"
            " FROM tiering.member_tiers ORDER BY member_id"
        )
        profiles = await c.fetch(
            "SELECT member_id, r_score, f_score, m_score, segment, segment_group, stage,"
            " relative_tier FROM tiering.member_profiles ORDER BY member_id"
        )
        history = await c.fetch(
            "SELECT member_id, from_tier, to_tier, reason, figures, changed_at"
            " FROM tiering.tier_history"
        )
        outbox = await c.fetch("SELECT event_id, event_type, envelope FROM tiering.outbox")
    events: Counter[tuple[Any, ...]] = Counter()
    for row in outbox:
        envelope = events_pb2.EventEnvelope.FromString(row["envelope"])
        assert envelope.event_id == str(row["event_id"])
        assert envelope.event_type == row["event_type"] and envelope.producer == "tiering"
        payload = getattr(events_pb2, envelope.event_type.rsplit(".", 1)[1])()
        assert envelope.payload.Unpack(payload)
        assert payload.member_id == envelope.member_id
        events[(envelope.event_type, payload.SerializeToString(deterministic=True))] += 1
    return {
        "tiers": [tuple(r) for r in tiers],
        "profiles": [tuple(r) for r in profiles],
        "history": Counter(tuple(r) for r in history),
        "events": events,
        "event_ids": len({r["event_id"] for r in outbox}) == len(outbox),
    }


def summary(result: RunResult) -> tuple[Any, ...]:
    return (
        result.members,
        result.tier_changes,
        result.segment_changes,
        result.stage_changes,
        result.distribution,
    )


async def test_parallel_chunks_give_exactly_the_serial_result(
    brands: tuple[Database, Database],
) -> None:
    serial, parallel = brands
    for as_of in (NOW, NOW + timedelta(minutes=1), _next_year(NOW)):
        one = await recompute(serial, now=as_of, chunk_size=1_000_000, workers=1)
        many = await recompute(parallel, now=as_of, chunk_size=37, workers=2)
        assert one.chunks == 1 and many.chunks == MEMBERS // 37 + 1
        assert summary(one) == summary(many), as_of
    a, b = await state(serial), await state(parallel)
    # The data exercised every kind of change.
    assert {t for t, _ in a["events"]} == {
        "loyalty.events.v1.TierChanged",
        "loyalty.events.v1.SegmentChanged",
        "loyalty.events.v1.LifecycleStageChanged",
    }
    assert {r[3] for r in a["history"]} >= {"upgrade", "retained", "override_expired"}
    for key in ("tiers", "profiles", "history", "events"):
        assert a[key] == b[key], key
    assert a["event_ids"] and b["event_ids"]


async def test_a_second_recompute_at_once_is_refused(
    brands: tuple[Database, Database],
) -> None:
    db = brands[0]
    async with db.pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            with pytest.raises(RecomputeBusy, match="another tiering recompute is running"):
                await recompute(db, now=NOW, workers=1)
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    assert (await recompute(db, now=NOW + timedelta(minutes=2), workers=1)).members == MEMBERS


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("lost", "champions"),
        ("", "new"),  # an empty string field
        ("沉睡", "潜力培育"),  # UTF-8: bytes, not characters, are counted
        ("x" * 200, "y" * 20_000),  # two- and three-byte lengths
    ],
)
async def test_sql_built_envelopes_are_what_protobuf_builds(
    brands: tuple[Database, Database], old: str, new: str
) -> None:
    changed_at = datetime(2026, 12, 31, 16, 0, 0, 123456, tzinfo=UTC)
    kind = outbox_sql.change_kind(events_pb2.SegmentChanged, changed_at)
    before, after = outbox_sql.pair_sql("$1::bytea", "$2::bytea", "$3::bytea", "$4", "$5")
    envelope_sql = outbox_sql.row_sql(before, "$6::text", "$7::text", after)
    event_id, member = str(uuid.uuid4()), str(uuid.uuid4())
    async with brands[0].pool.acquire() as c:
        raw = await c.fetchval(
            f"SELECT {envelope_sql}",
            kind.head,
            kind.any_head,
            kind.payload_tail,
            old,
            new,
            event_id,
            member,
        )
    built = events_pb2.EventEnvelope.FromString(raw)
    expected = events_pb2.EventEnvelope.FromString(kind.head)
    expected.event_id = event_id
    expected.member_id = member
    change = events_pb2.SegmentChanged(
        member_id=member, from_segment=old, to_segment=new, changed_at=timestamp(changed_at)
    )
    packed = any_pb2.Any()
    packed.Pack(change)
    expected.payload.CopyFrom(packed)
    # Any.value is bytes and SQL writes the payload's fields in another order:
    # compare the unpacked payload, and the envelope without it.
    payload = events_pb2.SegmentChanged()
    assert built.payload.type_url == packed.type_url and built.payload.Unpack(payload)
    assert payload == change
    built.ClearField("payload")
    expected.ClearField("payload")
    assert built == expected
    assert expected.event_type == "loyalty.events.v1.SegmentChanged"
    assert expected.producer == "tiering" and expected.HasField("occurred_at")


async def test_a_chunk_aborted_by_a_deadlock_is_run_again(
    brands: tuple[Database, Database], caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer transaction locks two members in the opposite order to the
    chunk's (it handles several events in one transaction): PostgreSQL aborts
    the chunk, which runs again once the other transaction is done."""
    db = brands[1]
    as_of = _next_year(NOW) + timedelta(days=1)
    async with db.pool.acquire() as c:
        low, high = [
            r["member_id"]
            for r in await c.fetch(
                "SELECT member_id FROM tiering.member_tiers ORDER BY member_id LIMIT 2"
            )
        ]
        # Both due in the next run: their overrides expire.
        await c.execute(
            "UPDATE tiering.member_tiers SET override_tier = 'vip', tier_code = 'vip',"
            " override_until = $2, override_reason = 'deadlock test'"
            " WHERE member_id = ANY($1::uuid[])",
            [low, high],
            as_of - timedelta(hours=1),
        )
    caplog.set_level("WARNING", logger="services.tiering.batch")
    # The pool's second connection (the recompute uses one).
    async with db.pool.acquire() as other:
        tx = other.transaction()
        await tx.start()
        # This side waits longer before checking for a deadlock: the chunk is the victim.
        await other.execute("SET LOCAL deadlock_timeout = '20s'")
        await other.execute(
            "SELECT 1 FROM tiering.member_tiers WHERE member_id = $1 FOR UPDATE", high
        )
        run = asyncio.create_task(recompute(db, now=as_of, chunk_size=1_000_000, workers=1))

        async def chunk_waits() -> bool:
            # Activity is snapshotted once per transaction: take a fresh one.
            await other.execute("SELECT pg_stat_clear_snapshot()")
            return bool(
                await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE OF t%'"
                )
            )

        for _ in range(200):
            if run.done():
                run.result()  # raises what stopped it
                raise AssertionError("the recompute ended without waiting")
            if await chunk_waits():
                break
            await asyncio.sleep(0.05)
        else:
            activity = await other.fetch(
                "SELECT pid, state, wait_event_type, wait_event, left(query, 80) AS q"
                " FROM pg_stat_activity WHERE datname = current_database()"
            )
            raise AssertionError(f"the chunk never waited for the locked member: {activity}")
        # The chunk holds `low` (it locks in member order) and waits for `high`.
        await other.execute(
            "SELECT 1 FROM tiering.member_tiers WHERE member_id = $1 FOR UPDATE", low
        )
        await tx.rollback()
        await asyncio.wait_for(run, 30)
    assert any("deadlock" in r.getMessage() for r in caplog.records)
    async with db.pool.acquire() as c:
        rows = await c.fetch(
            "SELECT override_tier FROM tiering.member_tiers WHERE member_id = ANY($1::uuid[])",
            [low, high],
        )
    assert [r["override_tier"] for r in rows] == [None, None]
