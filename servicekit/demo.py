"""The demo brand's activity for `make run` (devtools/devrun.py seed): who
registered over the last 90 days, where and how, and what they ordered, as
plain values relative to the application's clock. Each service's seed module
writes its own part from these values (member: members; rewards: orders
through its ledger, coupons, referrals; tiering: facts and two recomputes;
engagement: a journey with a holdout), so no seed writes another's schema.

Deterministic: member ids are uuid5 of their number, the choices come from a
seeded generator, so every service derives the same people."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

HISTORY_DAYS = 90
MEMBERS = 200
DEMO_NAMESPACE = uuid.UUID("7d1c5a52-18a0-4c39-9d0b-6f1e2a3b4c5d")
# The demo orders' POS transaction ids start with this (the seed's marker too).
ORDER_PREFIX = "DEMO-"
SHANGHAI = ZoneInfo("Asia/Shanghai")
CHANNELS = (("mini-program", 50), ("pos", 30), ("wecom", 15), ("delivery", 5))


@dataclass(frozen=True)
class DemoMember:
    number: int
    member_id: uuid.UUID
    registered_at: datetime
    store_id: str
    channel: str


@dataclass(frozen=True)
class DemoOrder:
    pos_transaction_id: str
    member_id: uuid.UUID
    store_id: str
    ordered_at: datetime
    paid_fen: int
    # With the member's welcome coupon (满99减30: gross 12000, paid 9000).
    with_coupon: bool
    points_to_redeem: int


@dataclass(frozen=True)
class Activity:
    members: list[DemoMember]
    orders: list[DemoOrder]


def member_id(number: int) -> uuid.UUID:
    return uuid.uuid5(DEMO_NAMESPACE, f"demo-member-{number}")


def activity(now: datetime, store_ids: list[str]) -> Activity:
    rnd = random.Random(18)
    channels = [c for c, _ in CHANNELS]
    weights = [w for _, w in CHANNELS]
    today = now.astimezone(SHANGHAI).replace(hour=0, minute=0, second=0, microsecond=0)
    members: list[DemoMember] = []
    orders: list[DemoOrder] = []
    for n in range(1, MEMBERS + 1):
        day = today - timedelta(days=rnd.randrange(HISTORY_DAYS))
        registered = day + timedelta(hours=rnd.randint(9, 21), minutes=rnd.randrange(60))
        registered = min(registered, now - timedelta(hours=1))
        store = rnd.choice(store_ids)
        members.append(
            DemoMember(n, member_id(n), registered, store, rnd.choices(channels, weights)[0])
        )
        # Most buy a little; one in ten is a regular; three spend their way to VIP.
        if n <= 3:
            count, low, high = 26, 6000, 7000
        elif rnd.random() < 0.1:
            count, low, high = rnd.randint(10, 16), 3000, 6000
        else:
            count, low, high = rnd.choices((0, 1, 2, 3, 4), (20, 35, 25, 12, 8))[0], 1500, 4500
        span = max((now - registered).total_seconds(), 3600.0)
        times = sorted(registered + timedelta(seconds=rnd.uniform(60, span)) for _ in range(count))
        for k, at in enumerate(times):
            # The first order within the coupon's 30 days, one time in three, uses it.
            coupon = k == 0 and at - registered < timedelta(days=30) and rnd.random() < 0.35
            orders.append(
                DemoOrder(
                    f"{ORDER_PREFIX}{n:04d}-{k:02d}",
                    member_id(n),
                    store if rnd.random() < 0.7 else rnd.choice(store_ids),
                    at,
                    9000 if coupon else rnd.randint(low, high) // 100 * 100,
                    coupon,
                    # Regulars spend points now and then (earned 1 a yuan before).
                    50 if k >= 4 and rnd.random() < 0.3 else 0,
                )
            )
    orders.sort(key=lambda o: o.ordered_at)
    return Activity(members, orders)
