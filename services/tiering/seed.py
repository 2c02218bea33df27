"""Demo data: the default tier programme (idempotent; safe to run on every start of a demo)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from . import repository as repo
from .domain import Benefits, Ladder, QualifyingMetric, Tier, TierProgramme
from .handlers import DEFAULT_PROGRAMME_ID

# 普通会员 → SVIP at ¥500 → VIP at ¥1500 of paid spend over 12 months.
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
            ),
            Tier(
                "vip",
                "VIP",
                150_000,
                Benefits(
                    points_multiplier_bp=15_000,
                    birthday_coupon_template="birthday-drink-and-gift",
                    free_delivery=True,
                ),
            ),
        )
    ),
)


async def seed_demo(conn: asyncpg.Connection) -> None:
    """Insert the demo programme unless that version already exists."""
    await repo.insert_programme(conn, DEMO_PROGRAMME)
