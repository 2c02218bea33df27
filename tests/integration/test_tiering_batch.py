"""The batch recompute against real PostgreSQL: period ends decided in SQL chunks
agree with a recompute from the facts, only changed rows are written, events only
for members whose result moved, the distribution report, the command line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.server import ServiceApp
from services.tiering import repository as repo
from services.tiering.batch import recompute
from services.tiering.domain import SegmentRules
from services.tiering.evaluation import replay
from services.tiering.segments import classify, segment_sql, stage, stage_sql

from ..harness import Infra, ServiceClock, eventually
from . import test_tiering_tiers as tiers
from .test_tiering_tiers import events_of, order, publish, ts

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The same fixtures as test_tiering_tiers; pytest finds them as module attributes.
redis, conn, stub = tiers.redis, tiers.conn, tiers.stub


async def stored_tier(conn: asyncpg.Connection, member: str) -> str | None:
    value = await conn.fetchval(
        "SELECT tier_code FROM tiering.member_tiers WHERE member_id = $1", uuid.UUID(member)
    )
    return str(value) if value is not None else None


SH_2024_12_20 = datetime(2024, 12, 20, 4, tzinfo=UTC)
SH_2025_06_01 = datetime(2025, 6, 1, 4, tzinfo=UTC)
# The story below is told as of this day, whatever today is: the service and the
# batch read the same pinned clock.
AS_OF_2026_03_01 = datetime(2026, 3, 1, 4, tzinfo=UTC)


async def test_batch_decides_period_ends_as_a_full_recompute_would(
    stub: tiering_pb2_grpc.TieringServiceStub,
    tiering_app: ServiceApp,
    redis: Redis,
    infra: Infra,
    conn: asyncpg.Connection,
    tiering_clock: ServiceClock,
) -> None:
    with tiering_clock.pinned(AS_OF_2026_03_01):
        await _period_ends_story(stub, tiering_app, redis, infra, conn, AS_OF_2026_03_01)


async def _period_ends_story(
    stub: tiering_pb2_grpc.TieringServiceStub,
    tiering_app: ServiceApp,
    redis: Redis,
    infra: Infra,
    conn: asyncpg.Connection,
    now: datetime,
) -> None:
    assert tiering_app.db is not None
    # Downgraded at 1 Jan 2026: SVIP since June 2025, only ¥120 left in the window.
    dropped = str(uuid.uuid4())
    await order(redis, infra, dropped, 40_000, SH_2024_12_20)
    await eventually(lambda: _stored_is(conn, dropped, "regular"))
    await order(redis, infra, dropped, 12_000, SH_2025_06_01)
    # Kept at 1 Jan 2026 (M = ¥600), then dropped at 1 Jan 2027? not yet: kept now.
    kept = str(uuid.uuid4())
    await order(redis, infra, kept, 60_000, SH_2025_06_01)
    # Two period ends since its last evaluation (2024 order, nothing after).
    lapsed = str(uuid.uuid4())
    await order(redis, infra, lapsed, 160_000, SH_2024_12_20)
    for member, code in ((dropped, "svip"), (kept, "svip"), (lapsed, "vip")):
        await eventually(lambda m=member, c=code: _stored_is(conn, m, c))

    result = await recompute(tiering_app.db, now=now, chunk_size=7)
    assert result.chunks >= 1 and result.members >= 3

    programme = await repo.programme_at(conn, "default", now)
    assert programme is not None
    # One level down per period end (the demo programme's rule).
    for member, code in ((dropped, "regular"), (kept, "svip"), (lapsed, "svip")):
        assert await stored_tier(conn, member) == code, member
        key = uuid.UUID(member)
        locked = await repo.lock_tier_state(conn, key)
        assert locked is not None
        orders, growth = await repo.load_facts(conn, key)
        assert locked[0] == replay(programme, orders, growth, now).state, member

    history = await stub.GetTierHistory(tiering_pb2.GetTierHistoryRequest(member_id=lapsed))
    assert [(e.from_tier, e.to_tier, e.reason) for e in history.entries] == [
        ("vip", "svip", "downgrade"),  # 1 Jan 2026: nothing left in the window
        ("vip", "vip", "retained"),  # 1 Jan 2025: ¥1,600 >= the ¥1,000 bar
        ("regular", "vip", "upgrade"),
    ]
    figures = json.loads(history.entries[0].figures_json)
    assert (figures["metric"], figures["retention_bar"], figures["period_end"]) == (
        0,
        100_000,
        "2025-12-31",
    )
    dropped_events = [
        events_pb2.TierChanged.FromString(raw)
        for raw in await eventually(lambda: _n_events(redis, infra, dropped, 2))
    ]
    # Upgrade by the event path, downgrade by the batch: each carries its new
    # tier's multiplier.
    assert [(e.to_tier, e.points_multiplier_bp) for e in dropped_events] == [
        ("svip", 12_000),
        ("regular", 10_000),
    ]

    # Nothing is due any more: a second run changes no tier.
    again = await recompute(tiering_app.db, now=now + timedelta(seconds=1))
    assert again.tier_changes == 0


async def _stored_is(conn: asyncpg.Connection, member: str, code: str) -> bool:
    return await stored_tier(conn, member) == code


async def _n_events(redis: Redis, infra: Infra, member: str, n: int) -> list[bytes] | None:
    found = await events_of(redis, infra, member, "TierChanged")
    return found if len(found) >= n else None


async def test_segments_and_stages_change_events_and_report(
    stub: tiering_pb2_grpc.TieringServiceStub,
    tiering_app: ServiceApp,
    redis: Redis,
    infra: Infra,
    conn: asyncpg.Connection,
) -> None:
    assert tiering_app.db is not None
    now = datetime.now(UTC)
    newcomer, sleeper = str(uuid.uuid4()), str(uuid.uuid4())
    await publish(
        redis,
        infra,
        "member",
        events_pb2.MemberRegistered(
            member_id=newcomer, source="mini_program", registered_at=ts(now - timedelta(days=2))
        ),
        newcomer,
    )
    await order(redis, infra, sleeper, 3_000, now - timedelta(days=200))
    await eventually(lambda: _stored_is(conn, sleeper, "regular"))

    async def registered() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT registered_at IS NOT NULL FROM tiering.member_profiles"
                " WHERE member_id = $1",
                uuid.UUID(newcomer),
            )
        )

    await eventually(registered)
    first = await recompute(tiering_app.db, now=now)
    rows = {
        str(r["member_id"]): (r["segment"], r["segment_group"], r["stage"], r["xmin"])
        for r in await conn.fetch(
            "SELECT member_id, segment, segment_group, stage, xmin::text AS xmin"
            " FROM tiering.member_profiles WHERE member_id = ANY($1::uuid[])",
            [uuid.UUID(newcomer), uuid.UUID(sleeper)],
        )
    }
    assert rows[newcomer][:3] == ("prospect", "potential_nurture", "new")
    assert rows[sleeper][:3] == ("lost", "dormant", "churned")

    # A rerun with nothing new rewrites no row (same xmin) and emits nothing.
    rerun = await recompute(tiering_app.db, now=now + timedelta(seconds=1))
    assert (rerun.segment_changes, rerun.stage_changes) == (0, 0)
    xmin = await conn.fetchval(
        "SELECT xmin::text FROM tiering.member_profiles WHERE member_id = $1",
        uuid.UUID(sleeper),
    )
    assert xmin == rows[sleeper][3]

    # Others buy a little in the RFM window; the sleeper comes back biggest and
    # latest: active, and out of 沉睡 (dormant).
    others = [str(uuid.uuid4()) for _ in range(4)]
    for n, other in enumerate(others):
        await order(redis, infra, other, 1_000 * (n + 1), now - timedelta(days=10 + n))
    await order(redis, infra, sleeper, 90_000, now - timedelta(minutes=5))
    # The sleeper's registration store (member's MemberZoneSet): the store its
    # figures count under, over its orders' SH001 (metrics_definitions.MEMBER_STORE).
    await publish(
        redis,
        infra,
        "member",
        events_pb2.MemberZoneSet(member_id=sleeper, registration_store_id="BJ001"),
        sleeper,
    )
    await eventually(lambda: _stored_is(conn, sleeper, "svip"))
    for other in others:
        await eventually(lambda m=other: _stored_is(conn, m, "regular"))

    async def stores_known() -> bool:
        found = await conn.fetchrow(
            "SELECT registration_store_id, order_store_id FROM tiering.member_profiles"
            " WHERE member_id = $1",
            uuid.UUID(sleeper),
        )
        return found is not None and tuple(found) == ("BJ001", "SH001")

    await eventually(stores_known)
    moved = await recompute(tiering_app.db, now=now + timedelta(seconds=2))
    assert moved.segment_changes >= 1 and moved.stage_changes >= 1
    # The lifecycle dashboard's transitions: as many as the stage events, at
    # the run's as_of; the rerun that moved nothing recorded none.
    transitions = {
        (r["from_stage"], r["to_stage"]): r["n"]
        for r in await conn.fetch(
            "SELECT from_stage, to_stage, sum(members)::bigint AS n"
            " FROM tiering.stage_transitions WHERE as_of = $1 GROUP BY 1, 2",
            now + timedelta(seconds=2),
        )
    }
    assert sum(transitions.values()) == moved.stage_changes
    assert transitions[("churned", "active")] >= 1
    # Counted under each member's store: the sleeper's move under BJ001 alone.
    by_store = await conn.fetch(
        "SELECT from_stage, to_stage, members FROM tiering.stage_transitions"
        " WHERE as_of = $1 AND store_id = 'BJ001'",
        now + timedelta(seconds=2),
    )
    assert [tuple(r) for r in by_store] == [("churned", "active", 1)]
    assert not await conn.fetchval(
        "SELECT count(*) FROM tiering.stage_transitions WHERE as_of = $1",
        now + timedelta(seconds=1),
    )
    stage_events = await eventually(
        lambda: _kind(redis, infra, sleeper, "LifecycleStageChanged"), timeout=10
    )
    change = events_pb2.LifecycleStageChanged.FromString(stage_events[0])
    assert (change.from_stage, change.to_stage) == ("churned", "active")
    seg = events_pb2.SegmentChanged.FromString(
        (await eventually(lambda: _kind(redis, infra, sleeper, "SegmentChanged")))[0]
    )
    assert seg.from_segment == "lost" and seg.to_segment != "lost"
    # Newcomer: no event for a first classification, none since.
    assert await events_of(redis, infra, newcomer, "LifecycleStageChanged") == []

    report = await stub.GetDistributionReport(tiering_pb2.GetDistributionReportRequest())
    assert report.run_id == moved.run_id and report.run_id > first.run_id
    stage = {b.value: b for b in report.buckets if b.dimension == "stage"}
    assert stage["active"].members >= 1 and stage["active"].change >= 1
    assert {b.dimension for b in report.buckets} >= {"tier", "segment", "segment_group", "stage"}
    assert sum(b.members for b in report.buckets if b.dimension == "stage") == report.members


async def _kind(redis: Redis, infra: Infra, member: str, kind: str) -> list[bytes] | None:
    return await events_of(redis, infra, member, kind) or None


async def test_command_line_recompute_shows_progress_and_report(
    stub: tiering_pb2_grpc.TieringServiceStub, infra: Infra
) -> None:
    env = {**os.environ, "DATABASE_URL": infra.database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.tiering",
        "recompute",
        "--chunk-size",
        "5",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    assert "100.0%" in err.decode() and "members" in err.decode()
    text = out.decode()
    assert text.startswith("run ") and "distribution after run" in text
    assert "stage" in text and "tier" in text


async def test_sql_rendering_of_the_rules_matches_python(conn: asyncpg.Connection) -> None:
    combos = [(r, f, m, n) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)
              for n in (1, 2)]  # fmt: skip
    rows = await conn.fetch(
        f"SELECT r, f, m, n, {segment_sql('r', 'f', 'm', 'n')} AS s,"
        f" {segment_sql('r', 'f', 'm', 'n', 'group')} AS g"
        " FROM unnest($1::int[], $2::int[], $3::int[], $4::int[]) AS t(r, f, m, n)",
        *[list(col) for col in zip(*combos, strict=True)],
    )
    assert {(r["r"], r["f"], r["m"], r["n"]): (r["s"], r["g"]) for r in rows} == {
        c: classify(*c) for c in combos
    }
    rules = SegmentRules()
    days = [None, 0, 6, 7, 29, 30, 89, 90, 400]
    pairs = [(a, b) for a in days for b in days]
    rows = await conn.fetch(
        f"SELECT d_reg, d_order, {stage_sql(rules, 'd_reg', 'd_order')} AS stage"
        " FROM unnest($1::int[], $2::int[]) AS t(d_reg, d_order)",
        [a for a, _ in pairs],
        [b for _, b in pairs],
    )
    assert {(r["d_reg"], r["d_order"]): r["stage"] for r in rows} == {
        p: stage(rules, *p) for p in pairs
    }
