"""`make run`'s demo activity (devtools/devrun.py seed_activity) leaves every
dashboard something to show, through the services' own paths (the points
ledger audits clean), and a second run adds nothing. A database of its own;
the clock is pinned (the history is relative to it)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from devtools.devrun import seed, seed_activity
from servicekit.analytics import DayRange
from servicekit.db import asyncpg_dsn, with_database
from servicekit.demo import MEMBERS
from servicekit.migrations import SERVICES, upgrade
from services.engagement.analytics import journey_funnels
from services.member.analytics import member_counts
from services.rewards.analytics import repository as rewards
from services.rewards.points.audit import audit_ledger
from services.tiering import analytics as tiering
from services.tiering.repository import programme_at

from ..harness import Infra

NOW = datetime(2026, 6, 15, 4, 0, tzinfo=UTC)
LAST_90_DAYS = DayRange((NOW - timedelta(days=89)).date(), NOW.date(), "Asia/Shanghai", None)


@pytest.fixture(scope="module")
async def seeded(infra: Infra) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    name = f"demo_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(infra.admin_url, name)
    for service in SERVICES:
        await asyncio.to_thread(upgrade, service, url)
    await seed(url)
    await seed_activity(url, NOW)
    c = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield url, c
    finally:
        await c.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_every_dashboard_has_something(
    seeded: tuple[str, asyncpg.Connection],
) -> None:
    _, conn = seeded
    r = LAST_90_DAYS
    members = await member_counts(conn, r)
    assert members.total == members.new_members == MEMBERS
    assert len(members.new_by_channel) >= 3 and len(members.new_by_store) == 4
    assert sum(1 for _, n in members.new_by_day if n) > 30

    orders = await rewards.order_analytics(conn, r)
    assert orders["orders"] > 300 and orders["spend_fen"] > 0
    assert 0 < orders["repeat_buyers"] < orders["buyers"] and orders["active_members_30d"] > 0
    assert len(orders["by_store"]) == 4

    points = await rewards.points_analytics(conn, r, NOW)
    assert points["outstanding_points"] > 0
    assert sum(d["earned"] for d in points["by_day"]) > 0
    assert sum(d["spent"] for d in points["by_day"]) > 0

    coupons = await rewards.coupon_analytics(conn, r, NOW)
    [welcome] = [t for t in coupons["templates"] if t["template_id"] == "MJ99-30"]
    assert welcome["issued"] == MEMBERS
    assert welcome["redeemed"] > 0 and welcome["expired"] > 0
    assert coupons["by_store"] and sum(d["redeemed"] for d in coupons["by_day"]) > 0

    referral = await rewards.referral_analytics(conn, r)
    assert referral["accepted"] > 10 and referral["first_orders"] > 0
    assert referral["inviters"] > 5 and referral["top_inviters"]
    assert referral["abuse_refusals"] > 0 and len(referral["refusals_by_reason"]) == 2

    programme = await programme_at(conn, "default", NOW)
    tiers = await tiering.tier_figures(conn, r, "default", programme, NOW)
    assert {k for k, _ in tiers.distribution} >= {"regular", "svip", "vip"}
    # A member has a tier from their first order on.
    buyers = await conn.fetchval("SELECT count(DISTINCT member_id) FROM rewards.orders")
    assert sum(n for _, n in tiers.distribution) == buyers
    assert tiers.movements_since == NOW - timedelta(days=7)
    assert tiers.up + tiers.down > 0 and tiers.flows
    assert any(d["up"] for d in tiers.by_day)
    assert any(p["at_risk"] or p["near_next"] for p in tiers.projections)

    segments = await tiering.segment_figures(conn, r)
    assert len(segments["rfm"]) > 5 and segments["segments"]
    assert len(segments["stages"]) >= 3 and segments["transitions"]

    [journey] = await journey_funnels(conn, r)
    assert journey.journey_id == "demo-welcome"
    assert journey.holdout > 0 and journey.treated > journey.holdout
    assert journey.treated_converted > 0 and journey.lift is not None
    assert [s.step_id for s in journey.steps] == ["welcome", "nudge"]
    assert journey.steps[0].sent["delivered"] > 0 and journey.steps[0].sent["failed"] > 0

    # Each service knows the demo members' stores (MEMBER_STORE): a store's
    # share of every per-member dashboard is some, not all, of the brand's.
    sh = DayRange(r.first, r.last, r.time_zone, ["SH001"])
    one = await tiering.tier_figures(conn, sh, "default", programme, NOW)
    assert 0 < sum(n for _, n in one.distribution) < sum(n for _, n in tiers.distribution)
    seg = await tiering.segment_figures(conn, sh)
    assert 0 < sum(c["members"] for c in seg["rfm"]) < sum(c["members"] for c in segments["rfm"])
    assert 0 < len(seg["transitions"])
    owed = await rewards.points_analytics(conn, sh, NOW)
    assert 0 < owed["outstanding_points"] < points["outstanding_points"]
    issued = await rewards.coupon_analytics(conn, sh, NOW)
    assert (
        0
        < sum(t["issued"] for t in issued["templates"])
        < sum(t["issued"] for t in coupons["templates"])
    )
    invited = await rewards.referral_analytics(conn, sh)
    assert 0 < invited["accepted"] < referral["accepted"]
    [entered] = await journey_funnels(conn, sh)
    assert 0 < entered.entered < journey.entered


async def test_the_history_went_through_the_ledger_and_a_rerun_adds_nothing(
    seeded: tuple[str, asyncpg.Connection],
) -> None:
    url, conn = seeded
    report = await audit_ledger(conn)
    assert report.ok, report

    async def counts() -> tuple[int, ...]:
        return tuple(
            await conn.fetchrow(
                "SELECT (SELECT count(*) FROM member.members),"
                " (SELECT count(*) FROM rewards.orders),"
                " (SELECT count(*) FROM rewards.points_transactions),"
                " (SELECT count(*) FROM rewards.coupons),"
                " (SELECT count(*) FROM rewards.referrals),"
                " (SELECT count(*) FROM tiering.orders),"
                " (SELECT count(*) FROM tiering.recompute_runs),"
                " (SELECT count(*) FROM engagement.enrollments),"
                " (SELECT count(*) FROM engagement.sends),"
                " (SELECT count(*) FROM engagement.member_facts)"
            )
            or ()
        )

    before = await counts()
    await seed_activity(url, NOW + timedelta(hours=1))
    assert await counts() == before
