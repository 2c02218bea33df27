"""Demo data: the default tier programme and the plan's 30-day tracking programme
(idempotent; safe to run on every start of a demo)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from servicekit.demo import Activity
from servicekit.events import ReceivedEvent, make_envelope
from servicekit.protos import timestamp

from . import repository as repo
from .batch import recompute
from .domain import (
    Benefits,
    Ladder,
    PeriodUnit,
    ProgrammeRules,
    QualifyingMetric,
    Tier,
    TierProgramme,
)
from .handlers import DEFAULT_PROGRAMME_ID, TieringHandlers

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


# ---- demo activity (make run; servicekit/demo.py) ---------------------------------


async def seed_demo_activity(
    db: Database, activity: Activity, order_ids: dict[str, uuid.UUID], now: datetime
) -> bool:
    """The demo members as tiering would have followed them: their
    registration (profiles, with the registration store), each demo order through the OrderCompleted
    handler in time order (rewards' order ids: the events rewards' outbox still
    holds for them then find them counted), with the nightly recompute a
    month and a week ago between them, so RFM segments and stages exist, some
    moved, and the last week's orders moved tiers since. False (nothing
    done) when the demo orders are already here."""
    demo = [o for o in activity.orders if o.pos_transaction_id in order_ids]
    if not demo:
        return False
    async with db.reading() as uow:
        if await uow.conn.fetchval(
            "SELECT 1 FROM tiering.orders WHERE order_id = $1",
            str(order_ids[demo[0].pos_transaction_id]),
        ):
            return False
    async with db.unit_of_work() as uow:
        # With the registration store member's MemberZoneSet would have given.
        await uow.conn.execute(
            "INSERT INTO tiering.member_profiles (member_id, registered_at, registration_store_id)"
            " SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::text[])"
            " ON CONFLICT DO NOTHING",
            [m.member_id for m in activity.members],
            [m.registered_at for m in activity.members],
            [m.store_id for m in activity.members],
        )
    handlers = TieringHandlers(lambda: now)
    # Time passes: the orders up to each recompute, the recompute (a month and
    # a week ago, as the nightly batch would have), then the rest, whose tier
    # moves are the "since the last recompute" ones.
    runs = [now - timedelta(days=30), now - timedelta(days=7)]
    for o in demo:
        while runs and o.ordered_at >= runs[0]:
            await recompute(db, now=runs.pop(0), workers=1)
        order_id = str(order_ids[o.pos_transaction_id])
        payload = events_pb2.OrderCompleted(
            order_id=order_id,
            member_id=str(o.member_id),
            store_id=o.store_id,
            pos_transaction_id=o.pos_transaction_id,
            paid_amount_fen=o.paid_fen,
            ordered_at=timestamp(o.ordered_at),
        )
        envelope = make_envelope("rewards", payload, str(o.member_id))
        envelope.occurred_at.CopyFrom(timestamp(o.ordered_at))
        async with db.unit_of_work() as uow:
            await handlers.on_order_completed(
                uow, ReceivedEvent("demo-seed", order_id, envelope, payload)
            )
    for at in runs:
        await recompute(db, now=at, workers=1)
    return True
