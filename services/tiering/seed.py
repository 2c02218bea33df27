"""Demo data: the default tier programme and the plan's 30-day tracking programme
(idempotent; safe to run on every start of a demo)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from . import repository as repo
from .domain import (
    Benefits,
    Ladder,
    PeriodUnit,
    ProgrammeRules,
    QualifyingMetric,
    Tier,
    TierProgramme,
)
from .handlers import DEFAULT_PROGRAMME_ID

# 普通会员 → SVIP at ¥500 → VIP at ¥1500 of paid spend over 12 months; kept
# (保级) at ¥300 / ¥1000 by the end of the calendar year.
DEMO_PROGRAMME = TierProgramme(
    programme_id=DEFAULT_PROGRAMME_ID,
    version=1,
    effective_from=datetime(2024, 1, 1, tzinfo=UTC),
    qualifying_metric=QualifyingMetric.PAID_SPEND,
    window_months=12,
    ladder=Ladder(
        (
            Tier("regular", "普通会员", 0, Benefits(points_multiplier_bp=10_000)),
            Tier(
                "svip",
                "SVIP",
                50_000,
                Benefits(points_multiplier_bp=12_000, birthday_coupon_template="birthday-drink"),
                retention=30_000,
            ),
            Tier(
                "vip",
                "VIP",
                150_000,
                Benefits(
                    points_multiplier_bp=15_000,
                    birthday_coupon_template="birthday-drink-and-gift",
                    free_delivery=True,
                    upgrade_gift_coupon_template="vip-welcome-gift",
                    priority=1,
                ),
                retention=100_000,
            ),
        )
    ),
)

# The plan's dynamic adjustment: growth stages 探索者 → 进阶者 → 达人 on orders in
# a one-month window, tracked in 30-day periods; a member ordering less than
# once in a period drops one level; upgrades are immediate.
PLAN_PROGRAMME = TierProgramme(
    programme_id="plan-30d",
    version=1,
    effective_from=datetime(2024, 1, 1, tzinfo=UTC),
    qualifying_metric=QualifyingMetric.ORDER_COUNT,
    window_months=1,
    ladder=Ladder(
        (
            Tier("explorer", "探索者", 0, Benefits()),
            Tier("advanced", "进阶者", 4, Benefits(points_multiplier_bp=11_000), retention=1),
            Tier(
                "expert",
                "达人",
                8,
                Benefits(points_multiplier_bp=12_000, free_delivery=True),
                retention=1,
            ),
        )
    ),
    rules=ProgrammeRules(period_unit=PeriodUnit.DAY, period_length=30),
)


async def seed_demo(conn: asyncpg.Connection) -> None:
    """Insert the demo programmes unless those versions already exist."""
    await repo.insert_programme(conn, DEMO_PROGRAMME)
    await repo.insert_programme(conn, PLAN_PROGRAMME)
