"""The domain brief's journeys, end to end on the real schema with a controllable
clock; caps, quiet hours, pause/resume, holdout, consent, versions, parking,
merge/unmerge/erase, and a crash in the middle of a batch.

The clock lives in 2030 so the session's engagement service (real clock)
never finds these timers due. Every journey is paused when its test ends, so
later tests' events do not enter it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest

from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import Database, create_pool
from servicekit.errors import InvalidArgument, NotFound
from servicekit.server import ServiceApp
from services.engagement import repository as repo
from services.engagement import scheduler_repository as scheduler_repo
from services.engagement.channels import (
    Delivery,
    Dispatcher,
    LocalSink,
    Outbound,
)
from services.engagement.domain import FakeClock, QuietHours
from services.engagement.fulfilment import RewardDispatcher
from services.engagement.handlers import EngagementHandlers
from services.engagement.ports import LocalConsent, RewardsGrpc
from services.engagement.scheduler import JourneyCache, Scheduler
from tests.harness import Infra

ALL = ["wecom", "sms", "miniprogram", "app_push"]
# Monday 2030-03-04 10:00 in Shanghai.
START = datetime(2030, 3, 4, 2, 0, tzinfo=UTC)


@dataclass
class Env:
    db: Database
    clock: FakeClock
    handlers: EngagementHandlers
    scheduler: Scheduler
    journeys: JourneyCache
    tag: str

    def jid(self, name: str) -> str:
        return f"{name}-{self.tag}"

    async def publish(self, doc: dict[str, Any]) -> int:
        doc = {**doc, "id": self.jid(doc["id"])}
        async with self.db.unit_of_work() as uow:
            return (await self.handlers.publish(uow, json.dumps(doc))).version

    async def member(self, consent: bool = True) -> str:
        m = str(uuid.uuid4())
        async with self.db.unit_of_work() as uow:
            await self.handlers.ingest(uow, "member_registered", m, {})
            if consent:
                await self.handlers.set_consent(uow, m, ALL, True, "test")
        return m

    async def event(self, name: str, member: str, **attrs: str) -> list[str]:
        async with self.db.unit_of_work() as uow:
            return (await self.handlers.ingest(uow, name, member, attrs)).enrolled

    async def advance(self, **delta: float) -> int:
        self.clock.advance(timedelta(**delta))
        return await self.scheduler.run_until_idle()

    async def sends(self, member: str, status: str | None = None) -> list[tuple[str, str, str]]:
        rows = await self.db.pool.fetch(
            "SELECT journey_id, template, status FROM engagement.sends WHERE member_id = $1"
            " ORDER BY created_at, send_key",
            uuid.UUID(member),
        )
        return [
            (r["journey_id"], r["template"], r["status"])
            for r in rows
            if status is None or r["status"] == status
        ]

    async def templates(self, member: str) -> list[str]:
        return [t for _, t, s in await self.sends(member) if s == "pending"]


def make_env(db: Database, clock: FakeClock, quiet: QuietHours, batch: int = 200) -> Env:
    journeys = JourneyCache()
    return Env(
        db,
        clock,
        EngagementHandlers(clock, quiet, journeys),
        Scheduler(
            db,
            clock,
            LocalConsent(),
            quiet,
            journeys,
            batch_size=batch,
            wecom_sender="fallback-staff",
        ),
        journeys,
        uuid.uuid4().hex[:6],
    )


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 6)
    database = Database(pool, "engagement", "engagement")
    yield database
    await database.close()


async def _pause_all(db: Database) -> None:
    async with db.unit_of_work() as uow:
        for r in await uow.conn.fetch("SELECT journey_id FROM engagement.journey_state"):
            await repo.set_journey_status(uow.conn, r["journey_id"], "paused")


@pytest.fixture
async def env(db: Database) -> AsyncIterator[Env]:
    await _pause_all(db)  # journeys other tests published must not take our events
    yield make_env(db, FakeClock(START), QuietHours())
    await _pause_all(db)


@pytest.fixture
async def loud(db: Database) -> AsyncIterator[Env]:
    """No quiet hours: for tests about caps at midnight."""
    await _pause_all(db)
    yield make_env(db, FakeClock(START), QuietHours(time(0, 0), time(0, 0)))
    await _pause_all(db)


def send(
    step: str, template: str, nxt: str, cls: str = "targeted", channel: str = "wecom", **kw: Any
) -> dict[str, Any]:
    return {
        "type": "send",
        "channel": channel,
        "template": template,
        "class": cls,
        "next": nxt,
        **CONTENT[channel],
        **kw,
    }


# Provider content of each channel (templates.py), fit for every member.
CONTENT: dict[str, dict[str, Any]] = {
    "wecom": {"text": "A message from your store"},
    "sms": {"params": {}},
    "miniprogram": {"data": {"thing1": "Your offer", "date2": "{today}"}, "page": "pages/index"},
    "app_push": {"title": "Hello", "body": "A message from your store"},
}


NEW_MEMBER = {
    "id": "new-member-7d",
    "priority": 80,
    "entry": {"event": "member_registered"},
    "goal": {"event": "order_completed", "within_days": 7},
    "holdout_percent": 0,
    "start": "welcome",
    "steps": {
        "welcome": send("welcome", "welcome-task", "pack"),
        "pack": {"type": "issue_coupon", "coupon": "NEW-MEMBER-PACK", "next": "d3"},
        "d3": {"type": "wait", "duration": "3d", "next": "reminder"},
        "reminder": send("reminder", "day3-reminder", "d7"),
        "d7": {"type": "wait", "duration": "4d", "next": "care"},
        "care": send("care", "day7-care", "end", cls="general"),
        "end": {"type": "exit"},
    },
}


async def test_new_member_seven_days(env: Env) -> None:
    await env.publish(NEW_MEMBER)
    m = await env.member()
    await env.scheduler.run_until_idle()
    assert await env.templates(m) == ["welcome-task"]
    coupons = await env.db.pool.fetch(
        "SELECT kind, coupon, status FROM engagement.reward_requests WHERE member_id = $1",
        uuid.UUID(m),
    )
    assert [(r["kind"], r["coupon"], r["status"]) for r in coupons] == [
        ("coupon", "NEW-MEMBER-PACK", "pending")
    ]
    await env.advance(days=2, hours=23)
    assert await env.templates(m) == ["welcome-task"]
    await env.advance(hours=1)
    assert await env.templates(m) == ["welcome-task", "day3-reminder"]
    await env.advance(days=4)
    assert await env.templates(m) == ["welcome-task", "day3-reminder", "day7-care"]
    row = await env.db.pool.fetchrow(
        "SELECT status FROM engagement.enrollments WHERE member_id = $1", uuid.UUID(m)
    )
    assert row["status"] == "completed"


FIRST_ORDER = {
    "id": "first-order",
    "priority": 70,
    "entry": {"event": "first_order"},
    "start": "m1",
    "steps": {
        "m1": send("m1", "thanks-first-cup", "w1"),
        "w1": {"type": "wait", "duration": "1d", "next": "m2"},
        "m2": send("m2", "how-was-it", "w2"),
        "w2": {"type": "wait", "duration": "2d", "next": "m3"},
        "m3": send("m3", "second-cup-offer", "end"),
        "end": {"type": "exit"},
    },
}


async def test_first_order_three_wecom_messages_on_the_first_order_only(env: Env) -> None:
    await env.publish(FIRST_ORDER)
    m = await env.member()
    assert env.jid("first-order") in await env.event("order_completed", m, order_id="o1")
    assert await env.event("order_completed", m, order_id="o2") == []
    await env.scheduler.run_until_idle()
    await env.advance(days=1)
    await env.advance(days=2)
    sends = await env.sends(m)
    assert [t for _, t, _ in sends] == ["thanks-first-cup", "how-was-it", "second-cup-offer"]
    assert {s for *_, s in sends} == {"pending"}


CART = {
    "id": "cart",
    "priority": 60,
    "entry": {"event": "cart_abandoned"},
    "goal": {"event": "order_completed", "within_days": 1},
    "reentry": {"policy": "after_exit"},
    "start": "wait",
    "steps": {
        "wait": {"type": "wait", "duration": "2h", "next": "remind"},
        "remind": send("remind", "cart-discount", "end", drop_if_late="6h"),
        "end": {"type": "exit"},
    },
}


async def test_cart_abandoned_two_hours_and_the_goal_exits(env: Env) -> None:
    await env.publish(CART)
    a, b = await env.member(), await env.member()
    await env.event("cart_abandoned", a)
    await env.event("cart_abandoned", a)  # one live enrollment per member per journey
    await env.event("cart_abandoned", b)
    await env.advance(hours=1, minutes=59)
    assert await env.sends(a) == []
    await env.event("order_completed", b, order_id="ob")  # b converts before the reminder
    await env.advance(minutes=1)
    assert await env.templates(a) == ["cart-discount"]
    assert await env.sends(b) == []
    count = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.enrollments WHERE member_id = $1", uuid.UUID(a)
    )
    assert count == 1


WAKE_UP = {
    "id": "silent-wake-up",
    "priority": 40,
    "entry": {"event": "lifecycle_stage_changed", "where": {"to_stage": "silent"}},
    "goal": {"event": "order_completed", "within_days": 30},
    "reentry": {"policy": "after_days", "days": 30},
    "start": "nudge",
    "steps": {
        "nudge": send("nudge", "we-miss-you", "wait", cls="general"),
        "wait": {"type": "wait", "duration": "3d", "next": "nudge"},
    },
}


async def test_silent_wake_up_every_three_days_until_an_order(env: Env) -> None:
    await env.publish(WAKE_UP)
    m = await env.member()
    assert await env.event("lifecycle_stage_changed", m, to_stage="active") == []
    assert await env.event("lifecycle_stage_changed", m, to_stage="silent")
    await env.scheduler.run_until_idle()
    await env.advance(days=3)
    await env.advance(days=3)
    assert await env.templates(m) == ["we-miss-you"] * 3
    await env.event("order_completed", m, order_id="o")
    await env.advance(days=3)
    await env.advance(days=3)
    assert len(await env.templates(m)) == 3
    # Converted: the conversion is measured for the journey.
    metrics = await metrics_of(env, "silent-wake-up")
    assert metrics.treated_converted == 1 and metrics.sent == 3


async def metrics_of(env: Env, name: str) -> Any:
    async with env.db.unit_of_work() as uow:
        return await env.handlers.metrics(uow, env.jid(name))


async def test_birthday_month_and_expiring_points(env: Env) -> None:
    await env.publish(
        {
            "id": "birthday",
            "priority": 90,
            "entry": {"event": "birthday_month"},
            "reentry": {"policy": "after_days", "days": 300},
            "start": "gift",
            "steps": {
                "gift": {"type": "issue_coupon", "coupon": "BIRTHDAY-DRINK", "next": "bonus"},
                "bonus": {"type": "award_points", "points": 100, "next": "tell"},
                "tell": send("tell", "happy-birthday", "end", cls="general"),
                "end": {"type": "exit"},
            },
        }
    )
    await env.publish(
        {
            "id": "points-expiring",
            "priority": 50,
            "entry": {"event": "points_expiring_soon"},
            "reentry": {"policy": "after_exit"},
            "start": "notice",
            "steps": {
                "notice": send(
                    "notice", "points-expiring", "end", cls="transactional", channel="sms"
                ),
                "end": {"type": "exit"},
            },
        }
    )
    m = await env.member()
    await env.event("birthday_month", m)
    await env.event("points_expiring_soon", m, points="120")
    await env.scheduler.run_until_idle()
    assert sorted(await env.templates(m)) == ["happy-birthday", "points-expiring"]
    rewards = await env.db.pool.fetch(
        "SELECT kind, coupon, points FROM engagement.reward_requests WHERE member_id = $1"
        " ORDER BY kind",
        uuid.UUID(m),
    )
    assert [(r["kind"], r["coupon"], r["points"]) for r in rewards] == [
        ("coupon", "BIRTHDAY-DRINK", 0),
        ("points", "", 100),
    ]
    # Transactional messages ignore quiet hours and caps: 23:00 local, same day.
    env.clock.set(datetime(2030, 3, 4, 15, 0, tzinfo=UTC))
    await env.event("points_expiring_soon", m, points="80")
    await env.scheduler.run_until_idle()
    assert (await env.templates(m)).count("points-expiring") == 2


def one_shot(name: str, priority: int, template: str, cls: str = "targeted") -> dict[str, Any]:
    return {
        "id": name,
        "priority": priority,
        "entry": {"event": "page_view"},
        "reentry": {"policy": "after_exit"},
        "start": "s",
        "steps": {"s": send("s", template, "end", cls=cls), "end": {"type": "exit"}},
    }


async def test_caps_priority_wins_and_the_budget_resets_at_local_midnight(loud: Env) -> None:
    env = loud
    env.clock.set(datetime(2030, 3, 4, 15, 30, tzinfo=UTC))  # 23:30 Shanghai
    await env.publish(one_shot("low", 10, "low-value"))
    await env.publish(one_shot("high", 90, "high-value"))
    await env.publish(one_shot("general", 10, "general-news", cls="general"))
    m = await env.member()
    await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    sends = {t: s for _, t, s in await env.sends(m)}
    # 1 targeted + 1 general per day: the valuable targeted one wins.
    assert sends == {"high-value": "pending", "low-value": "capped", "general-news": "pending"}
    # Same local day, still capped.
    await env.advance(minutes=29)
    await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    assert [s for _, t, s in await env.sends(m)].count("pending") == 2
    # After local midnight the budget is new.
    await env.advance(minutes=2)
    await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    assert [s for _, t, s in await env.sends(m)].count("pending") == 4
    used = await env.db.pool.fetch(
        "SELECT local_day, message_class, used FROM engagement.cap_usage WHERE member_id = $1",
        uuid.UUID(m),
    )
    assert all(r["used"] <= 1 for r in used) and len(used) == 4


async def test_a_later_more_valuable_send_takes_the_slot_until_delivered(loud: Env) -> None:
    env = loud
    env.clock.set(datetime(2030, 3, 4, 2, 0, tzinfo=UTC))
    await env.publish({**one_shot("pre-low", 10, "low"), "entry": {"event": "page_view"}})
    await env.publish({**one_shot("pre-high", 90, "high"), "entry": {"event": "check_in"}})
    await env.publish({**one_shot("pre-top", 95, "top"), "entry": {"event": "cart_abandoned"}})
    m = await env.member()
    await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    await env.advance(minutes=5)
    await env.event("check_in", m)
    await env.scheduler.run_until_idle()
    assert {t: s for _, t, s in await env.sends(m)} == {"low": "capped", "high": "pending"}
    # Once a provider has it, it is not taken back: the next one is capped.
    dispatcher = Dispatcher(env.db, env.clock, {"wecom": LocalSink("wecom")}, {})
    while await dispatcher.dispatch_once():
        pass
    await env.event("cart_abandoned", m)
    await env.scheduler.run_until_idle()
    assert {t: s for _, t, s in await env.sends(m)} == {
        "low": "capped",
        "high": "delivered",
        "top": "capped",
    }


async def test_caps_hold_under_concurrent_sweepers(loud: Env) -> None:
    env = loud
    env.clock.set(datetime(2030, 3, 4, 4, 0, tzinfo=UTC))
    for n in range(6):
        await env.publish(one_shot(f"race{n}", n, f"race-{n}"))
    members = [await env.member() for _ in range(20)]
    for m in members:
        await env.event("page_view", m)
    sweepers = [
        Scheduler(
            env.db,
            env.clock,
            LocalConsent(),
            QuietHours(time(0), time(0)),
            env.journeys,
            batch_size=7,
            wecom_sender="fallback-staff",
        )
        for _ in range(4)
    ]
    await asyncio.gather(*(s.run_until_idle() for s in sweepers))
    for m in members:
        statuses = [s for _, _, s in await env.sends(m)]
        assert statuses.count("pending") == 1 and statuses.count("capped") == 5


async def test_quiet_hours_defer_then_release_in_the_morning(env: Env) -> None:
    await env.publish(CART)
    m = await env.member()
    env.clock.set(datetime(2030, 3, 4, 12, 0, tzinfo=UTC))  # 20:00 Shanghai
    await env.event("cart_abandoned", m)
    await env.advance(hours=2)  # 22:00: quiet
    assert await env.sends(m) == []
    timer = await env.db.pool.fetchval(
        "SELECT due_at FROM engagement.timers t JOIN engagement.enrollments e USING"
        " (enrollment_id) WHERE e.member_id = $1",
        uuid.UUID(m),
    )
    assert datetime(2030, 3, 5, 1, 0, tzinfo=UTC) <= timer < datetime(2030, 3, 5, 1, 30, tzinfo=UTC)
    env.clock.set(datetime(2030, 3, 5, 0, 59, tzinfo=UTC))  # 08:59
    await env.scheduler.run_until_idle()
    assert await env.sends(m) == []
    await env.advance(minutes=31)  # 09:30
    assert await env.templates(m) == ["cart-discount"]


async def test_paused_then_resumed_journey_drops_stale_steps(env: Env) -> None:
    await env.publish(CART)
    m = await env.member()
    await env.event("cart_abandoned", m)
    async with env.db.unit_of_work() as uow:
        await env.handlers.set_status(uow, env.jid("cart"), "paused")
    await env.advance(days=2)
    assert await env.sends(m) == []
    async with env.db.unit_of_work() as uow:
        await env.handlers.set_status(uow, env.jid("cart"), "active")
    await env.scheduler.run_until_idle()
    assert await env.sends(m) == [(env.jid("cart"), "cart-discount", "dropped")]
    assert (await metrics_of(env, "cart")).dropped == 1


async def test_holdout_members_receive_nothing_and_lift_is_measured(env: Env) -> None:
    await env.publish({**CART, "id": "cart-holdout", "holdout_percent": 50})
    members = [await env.member() for _ in range(30)]
    for m in members:
        await env.event("cart_abandoned", m)
    await env.advance(hours=2)
    groups = {
        str(r["member_id"]): r["grp"]
        for r in await env.db.pool.fetch(
            "SELECT member_id, grp FROM engagement.enrollments WHERE journey_id = $1",
            env.jid("cart-holdout"),
        )
    }
    assert set(groups.values()) == {"holdout", "treatment"}
    for m in members:
        sent = await env.templates(m)
        assert sent == ([] if groups[m] == "holdout" else ["cart-discount"])
    treated = [m for m in members if groups[m] == "treatment"]
    held = [m for m in members if groups[m] == "holdout"]
    # Chosen conversions: 6 treated members and 1 holdout member order.
    for m in treated[:6] + held[:1]:
        await env.event("order_completed", m, order_id=m)
    metrics = await metrics_of(env, "cart-holdout")
    assert (metrics.treated, metrics.holdout) == (len(treated), len(held))
    assert (metrics.treated_converted, metrics.holdout_converted) == (6, 1)
    assert_lift(metrics.lift, 6, len(treated), 1, len(held))


def assert_lift(found: Any, conv: int, n: int, held_conv: int, held_n: int) -> None:
    """The lift reported is the difference of the two conversion rates with a
    95% Wald interval (computed here from the counts, independently)."""
    p1, p0 = conv / n, held_conv / held_n
    half = 1.96 * math.sqrt(p1 * (1 - p1) / n + p0 * (1 - p0) / held_n)
    assert found is not None
    assert found.treated_rate == pytest.approx(p1)
    assert found.holdout_rate == pytest.approx(p0)
    assert found.lift == pytest.approx(p1 - p0)
    assert found.ci_low == pytest.approx(p1 - p0 - half)
    assert found.ci_high == pytest.approx(p1 - p0 + half)


async def test_consent_unsubscribe_credits_and_non_personalised(env: Env) -> None:
    await env.publish(
        {
            "id": "consent",
            "priority": 10,
            "entry": {"event": "check_in"},
            "reentry": {"policy": "after_exit"},
            "start": "mp",
            "steps": {
                "mp": send("mp", "mp-tpl", "wc", cls="transactional", channel="miniprogram"),
                "wc": send("wc", "for-you", "end", personalised=True, fallback_template="for-all"),
                "end": {"type": "exit"},
            },
        }
    )
    no_consent = await env.member(consent=False)
    await env.event("check_in", no_consent)
    tapped = await env.member()
    await env.event("subscription_tap", tapped, template="mp-tpl", openid="o-1")
    async with env.db.unit_of_work() as uow:
        await env.handlers.set_non_personalised(uow, tapped, True)
    await env.event("check_in", tapped)
    await env.scheduler.run_until_idle()
    assert {s for *_, s in await env.sends(no_consent)} == {"suppressed"}
    assert [(t, s) for _, t, s in await env.sends(tapped)] == [
        ("mp-tpl", "pending"),
        ("for-all", "pending"),
    ]
    # One tap, one send: the second run finds no credit.
    env.clock.advance(timedelta(days=1))
    await env.event("check_in", tapped)
    await env.scheduler.run_until_idle()
    assert ("mp-tpl", "suppressed") in [(t, s) for _, t, s in await env.sends(tapped)]
    # Unsubscribed (member's ConsentChanged): nothing more on that channel.
    await _refuse(env, tapped, "wecom")
    env.clock.advance(timedelta(days=1))
    await env.event("check_in", tapped)
    await env.scheduler.run_until_idle()
    assert [(t, s) for _, t, s in await env.sends(tapped)][-1] == ("for-all", "suppressed")


async def test_members_in_flight_stay_on_their_version(env: Env) -> None:
    v1 = await env.publish(CART)
    a = await env.member()
    await env.event("cart_abandoned", a)
    changed = json.loads(json.dumps(CART))
    changed["steps"]["remind"]["template"] = "cart-discount-v2"
    v2 = await env.publish(changed)
    assert (v1, v2) == (1, 2)
    b = await env.member()
    await env.event("cart_abandoned", b)
    await env.advance(hours=2)
    assert await env.templates(a) == ["cart-discount"]
    assert await env.templates(b) == ["cart-discount-v2"]


async def test_events_for_unknown_members_are_parked_then_replayed(env: Env) -> None:
    await env.publish(CART)
    m = str(uuid.uuid4())
    async with env.db.unit_of_work() as uow:
        result = await env.handlers.ingest(uow, "cart_abandoned", m, {})
    assert result.parked
    parked = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.parked_events WHERE member_id = $1", uuid.UUID(m)
    )
    assert parked == 1
    async with env.db.unit_of_work() as uow:
        await env.handlers.ingest(uow, "member_registered", m, {})
        await env.handlers.set_consent(uow, m, ALL, True, "test")
    await env.advance(hours=2)
    assert await env.templates(m) == ["cart-discount"]


async def test_the_journey_list_pages_by_id_with_live_version_channels_and_counts(
    env: Env,
) -> None:
    await env.publish(CART)
    renamed = json.loads(json.dumps(CART))
    renamed["name"] = "Cart abandoned"
    renamed["steps"]["remind"] = send("remind", "cart-sms", "end", channel="sms")
    renamed["steps"]["wait"]["next"] = "push"
    renamed["steps"]["push"] = send("push", "cart-push", "remind", channel="app_push")
    assert await env.publish(renamed) == 2
    await env.publish({**one_shot("zz-one", 10, "one"), "id": "zz-one"})
    for _ in range(2):
        await env.event("cart_abandoned", await env.member())
    async with env.db.unit_of_work() as uow:
        await env.handlers.set_status(uow, env.jid("zz-one"), "paused")

    # Every journey once, by id, however small the pages.
    seen: list[Any] = []
    token = ""
    while True:
        async with env.db.reading() as uow:
            rows, token = await env.handlers.list_journeys(uow, 2, token)
        assert len(rows) <= 2
        seen.extend(rows)
        if not token:
            break
    ids = [r.journey_id for r in seen]
    assert ids == sorted(set(ids))
    ours = {r.journey_id: r for r in seen if r.journey_id.endswith(env.tag)}
    cart, one = ours[env.jid("cart")], ours[env.jid("zz-one")]
    assert (cart.name, cart.live_version, cart.status) == ("Cart abandoned", 2, "active")
    assert cart.channels == ["app_push", "sms"]
    assert (cart.entered, cart.active) == (2, 2)
    # No name: its id; paused shows as paused.
    assert (one.name, one.live_version, one.status) == (env.jid("zz-one"), 1, "paused")
    assert one.channels == ["wecom"] and (one.entered, one.active) == (0, 0)

    for size, token, field in ((0, "not a journey id!", "page_token"), (501, "", "page_size")):
        with pytest.raises(InvalidArgument) as info:
            async with env.db.reading() as uow:
                await env.handlers.list_journeys(uow, size, token)
        assert info.value.field == field


async def test_bad_input_writes_nothing(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        await env.publish({**CART, "entry": {"event": "cart_abandonned"}})
    assert info.value.code == "UNKNOWN_EVENT"
    assert (
        await env.db.pool.fetchval(
            "SELECT count(*) FROM engagement.journeys WHERE journey_id = $1", env.jid("cart")
        )
        == 0
    )
    with pytest.raises(InvalidArgument):
        await env.event("cart_abandoned", "not-a-uuid")
    with pytest.raises(InvalidArgument):
        await env.event("teleported", str(uuid.uuid4()))
    # Checked before parking, so a parked event always replays cleanly.
    stranger = str(uuid.uuid4())
    with pytest.raises(InvalidArgument) as tap:
        await env.event("subscription_tap", stranger)
    assert tap.value.field == "attributes.template"
    parked = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.parked_events WHERE member_id = $1", uuid.UUID(stranger)
    )
    assert parked == 0


async def test_merge_moves_enrollments_and_caps_unmerge_moves_them_back_erase_stops(
    loud: Env,
) -> None:
    env = loud
    await env.publish(CART)
    await env.publish(one_shot("merge-pv", 90, "pv"))
    survivor, absorbed = await env.member(), await env.member()
    await env.event("page_view", absorbed)  # absorbed used today's targeted budget
    await env.scheduler.run_until_idle()
    await env.event("cart_abandoned", absorbed)
    async with env.db.unit_of_work() as uow:
        await env.handlers.on_merged(uow, "mg-1", survivor, absorbed)
    # The person's cart reminder follows the survivor, and today's cap counts.
    await env.advance(hours=2)
    assert [(t, s) for _, t, s in await env.sends(survivor)] == [
        ("pv", "pending"),
        ("cart-discount", "capped"),
    ]
    async with env.db.unit_of_work() as uow:
        await env.handlers.on_unmerged(uow, "mg-1", survivor, absorbed)
    assert await env.sends(survivor) == []
    assert len(await env.sends(absorbed)) == 2
    await env.event("cart_abandoned", absorbed)
    async with env.db.unit_of_work() as uow:
        await env.handlers.on_erased(uow, [absorbed])
    await env.advance(hours=3)
    assert await env.sends(absorbed) == []
    left = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.member_facts WHERE member_id = $1", uuid.UUID(absorbed)
    )
    assert left == 0


class ScriptedProvider:
    """Answers each call with the next of `replies` (the last one repeats) and
    records who it was for; "only" limits it to this test's members."""

    def __init__(self, channel: str, replies: list[Delivery], only: set[str]) -> None:
        self.channel = channel
        self.replies = replies
        self.only = only
        self.calls: list[Outbound] = []

    async def send(self, message: Outbound) -> Delivery:
        if message.member_id not in self.only:
            return Delivery("failed", reason="ANOTHER_TESTS_SEND")
        self.calls.append(message)
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


class CountingProvider:
    """A provider that counts calls (providers have no idempotency key)."""

    channel = "wecom"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.sink = LocalSink("wecom")

    async def send(self, message: Outbound) -> Delivery:
        self.calls.append(message.send_key)
        return await self.sink.send(message)


async def test_crash_mid_batch_loses_no_step_and_sends_nothing_twice(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.publish(CART)
    members = [await env.member() for _ in range(120)]
    for m in members:
        await env.event("cart_abandoned", m)
    env.clock.advance(timedelta(hours=2))
    crashing = Scheduler(
        env.db,
        env.clock,
        LocalConsent(),
        QuietHours(),
        env.journeys,
        batch_size=50,
        wecom_sender="fallback-staff",
    )
    real_move = scheduler_repo.move_timers
    calls = 0

    async def crash_on_second_batch(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            await real_move(*args)  # part of the batch's writes happened...
            raise asyncio.CancelledError  # ...then the worker is killed
        await real_move(*args)

    monkeypatch.setattr(scheduler_repo, "move_timers", crash_on_second_batch)
    with pytest.raises(asyncio.CancelledError):
        for _ in range(5):
            await crashing.sweep_once()
    monkeypatch.setattr(scheduler_repo, "move_timers", real_move)
    # A fresh worker (the restart) finishes the job.
    await Scheduler(
        env.db, env.clock, LocalConsent(), QuietHours(), env.journeys, wecom_sender="fallback-staff"
    ).run_until_idle()
    keys = await env.db.pool.fetch(
        "SELECT member_id, count(*) AS n FROM engagement.sends WHERE journey_id = $1"
        " GROUP BY member_id",
        env.jid("cart"),
    )
    assert len(keys) == 120 and all(r["n"] == 1 for r in keys)

    # The dispatcher dies after the provider accepted, before recording it.
    provider = CountingProvider()
    dispatcher = Dispatcher(env.db, env.clock, {"wecom": provider}, {}, batch_size=500)
    real_record = scheduler_repo.record_outcomes

    async def die(*args: Any) -> None:
        if not provider.calls:  # sends refused before delivery are recorded as usual
            return await real_record(*args)
        raise asyncio.CancelledError

    monkeypatch.setattr(scheduler_repo, "record_outcomes", die)
    with pytest.raises(asyncio.CancelledError):
        await dispatcher.dispatch_once()
    monkeypatch.setattr(scheduler_repo, "record_outcomes", real_record)
    ours = {
        r["send_key"]
        for r in await env.db.pool.fetch(
            "SELECT send_key FROM engagement.sends WHERE journey_id = $1", env.jid("cart")
        )
    }
    assert len([k for k in provider.calls if k in ours]) == 120
    # The lease expires: nobody knows whether the provider took them, and it
    # has no idempotency key, so they are `unknown` and never sent again.
    env.clock.advance(timedelta(minutes=2))
    while await dispatcher.dispatch_once():
        pass
    called = [k for k in provider.calls if k in ours]
    assert len(called) == 120 and len(set(called)) == 120
    unknown = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.sends WHERE journey_id = $1 AND status = 'unknown'"
        " AND reason = 'LEASE_EXPIRED'",
        env.jid("cart"),
    )
    assert unknown == 120


async def test_dispatcher_retries_with_backoff_then_records_delivery(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.publish(
        {
            "id": "push-retry",
            "priority": 10,
            "entry": {"event": "check_in"},
            "start": "s",
            "steps": {
                "s": send("s", "push-tpl", "end", cls="transactional", channel="app_push"),
                "end": {"type": "exit"},
            },
        }
    )
    m = await env.member()
    await env.event("check_in", m)
    await env.scheduler.run_until_idle()
    mine = await env.db.pool.fetchval(
        "SELECT send_key FROM engagement.sends WHERE member_id = $1", uuid.UUID(m)
    )
    provider = ScriptedProvider(
        "app_push",
        [
            Delivery("retry", reason="HTTP 503", code="HTTP_503"),
            Delivery("retry", reason="HTTP 503", code="HTTP_503"),
            Delivery("delivered", provider_ref="push-1"),
        ],
        {m},
    )
    dispatcher = Dispatcher(env.db, env.clock, {"app_push": provider}, {})

    async def state() -> tuple[str, int, str | None]:
        row = await env.db.pool.fetchrow(
            "SELECT status, attempts, provider_ref FROM engagement.sends WHERE member_id = $1",
            uuid.UUID(m),
        )
        return row["status"], row["attempts"], row["provider_ref"]

    await dispatcher.dispatch_once()
    assert (await state())[:2] == ("pending", 1)
    await dispatcher.dispatch_once()  # not due yet: backoff
    assert (await state())[1] == 1
    env.clock.advance(timedelta(seconds=5))
    await dispatcher.dispatch_once()
    assert (await state())[:2] == ("pending", 2)
    env.clock.advance(timedelta(seconds=10))
    await dispatcher.dispatch_once()
    assert await state() == ("delivered", 3, "push-1")
    assert [c.send_key for c in provider.calls] == [mine] * 3


NO_ACTION_48H = {
    "id": "no-action-48h",
    "priority": 30,
    "entry": {"event": "member_registered"},
    "start": "wait",
    "steps": {
        "wait": {
            "type": "wait",
            "event": "order_completed",
            "timeout": "48h",
            "on_event": "end",
            "next": "tier",
        },
        "tier": {
            "type": "branch",
            "cases": [
                {"if": {"fact": "tier", "op": "in", "value": ["SVIP", "VIP"]}, "next": "vip"}
            ],
            "next": "recommend",
        },
        "vip": send("vip", "vip-recommendation", "end", personalised=True),
        "recommend": send("recommend", "recommendation", "end"),
        "end": {"type": "exit"},
    },
}


async def test_wait_for_an_event_with_a_timeout_and_a_branch_on_tier(env: Env) -> None:
    await env.publish(NO_ACTION_48H)
    ordered, silent, vip = await env.member(), await env.member(), await env.member()
    await env.event("tier_changed", vip, to_tier="SVIP")
    await env.scheduler.run_until_idle()
    await env.advance(hours=20)
    await env.event("order_completed", ordered, order_id="o")
    await env.scheduler.run_until_idle()
    await env.advance(hours=28)
    assert await env.sends(ordered) == []
    assert await env.templates(silent) == ["recommendation"]
    assert await env.templates(vip) == ["vip-recommendation"]


async def test_ab_split_variants_are_measured_against_the_holdout(env: Env) -> None:
    await env.publish(
        {
            "id": "ab",
            "priority": 20,
            "entry": {"event": "page_view"},
            "holdout_percent": 20,
            "goal": {"event": "order_completed", "within_days": 3},
            "start": "split",
            "steps": {
                "split": {
                    "type": "split",
                    "branches": [
                        {"name": "A", "percent": 50, "next": "a"},
                        {"name": "B", "percent": 50, "next": "b"},
                    ],
                },
                "a": send("a", "copy-a", "end"),
                "b": send("b", "copy-b", "end"),
                "end": {"type": "exit"},
            },
        }
    )
    members = [await env.member() for _ in range(40)]
    for m in members:
        await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    for m in members[:12]:
        await env.event("order_completed", m, order_id=f"ab-{m}")
    metrics = await metrics_of(env, "ab")
    variants = {v.variant: v for v in metrics.variants}
    assert set(variants) == {"A", "B"}
    assert sum(v.entered for v in variants.values()) == metrics.treated
    assert metrics.treated + metrics.holdout == 40
    for name, v in variants.items():
        templates = [
            t for m in members for t in await env.templates(m) if t == f"copy-{name.lower()}"
        ]
        assert len(templates) == v.entered
        converted = [m for m in members[:12] if f"copy-{name.lower()}" in await env.templates(m)]
        assert v.converted == len(converted)
        assert_lift(v.lift, v.converted, v.entered, metrics.holdout_converted, metrics.holdout)
    unsent = [m for m in members[:12] if not await env.templates(m)]
    assert metrics.holdout_converted == len(unsent)


async def test_reward_steps_reach_the_rewards_service_once(
    env: Env, rewards_app: ServiceApp
) -> None:
    port = RewardsGrpc(f"127.0.0.1:{rewards_app.port}", 5.0)
    stub = rewards_pb2_grpc.RewardsServiceStub(port._channel)
    gift, limited = f"BDAY-{env.tag}", f"ONCE-{env.tag}"
    for template_id, limits in (
        (gift, rewards_pb2.CouponLimits(total_stock=100)),
        (limited, rewards_pb2.CouponLimits(per_member_limit=1)),
    ):
        await stub.CreateCouponTemplate(
            rewards_pb2.CreateCouponTemplateRequest(
                template_id=template_id,
                terms=rewards_pb2.CouponTerms(
                    name="birthday drink", kind="amount_off", discount_fen=1000, valid_days=30
                ),
                limits=limits,
                status="active",
                created_by="test",
            )
        )
    await env.publish(
        {
            "id": "reward",
            "priority": 10,
            "entry": {"event": "birthday_month"},
            "start": "points",
            "steps": {
                "points": {"type": "award_points", "points": 88, "next": "coupon"},
                "coupon": {"type": "issue_coupon", "coupon": gift, "next": "once"},
                "once": {"type": "issue_coupon", "coupon": limited, "next": "again"},
                # The member already has the one this template allows: refused.
                "again": {"type": "issue_coupon", "coupon": limited, "next": "ghost"},
                "ghost": {"type": "issue_coupon", "coupon": f"NONE-{env.tag}", "next": "end"},
                "end": {"type": "exit"},
            },
        }
    )
    m = await env.member()
    await env.event("birthday_month", m)
    await env.scheduler.run_until_idle()
    fulfil = RewardDispatcher(env.db, env.clock, port, batch_size=500)

    async def drain() -> None:
        while await fulfil.dispatch_once():
            pass

    async def requests() -> list[tuple[str, str, str, str]]:
        rows = await env.db.pool.fetch(
            "SELECT kind, coupon, status, reason FROM engagement.reward_requests"
            " WHERE member_id = $1 ORDER BY request_key",
            uuid.UUID(m),
        )
        # A done request's reason is rewards' reference (coupon or transaction id).
        return [
            (r["kind"], r["coupon"], r["status"], "" if r["status"] == "done" else r["reason"])
            for r in rows
        ]

    async def wallet() -> list[str]:
        reply = await stub.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=m))
        return sorted(c.template_id for c in reply.coupons)

    try:
        await drain()
        # Issued once each; a refusal rewards decided fails the step with its
        # code (the two requests for the limited template race: one wins).
        assert sorted(await requests()) == sorted(
            [
                ("points", "", "done", ""),
                ("coupon", gift, "done", ""),
                ("coupon", limited, "done", ""),
                ("coupon", limited, "failed", "MEMBER_LIMIT_REACHED"),
                ("coupon", f"NONE-{env.tag}", "failed", "UNKNOWN_TEMPLATE"),
            ]
        )
        assert await wallet() == sorted([gift, limited])
        balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=m))
        assert balance.available == 88
        # A redelivery (e.g. a crash before the status was recorded) is a replay:
        # the same issue / idempotency key, nothing given twice.
        await env.db.pool.execute(
            "UPDATE engagement.reward_requests SET status = 'pending', next_attempt_at = $2"
            " WHERE member_id = $1 AND status = 'done'",
            uuid.UUID(m),
            env.clock.now(),
        )
        await drain()
        assert sorted(r[2] for r in await requests()) == ["done"] * 3 + ["failed"] * 2
        assert await wallet() == sorted([gift, limited])
        balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=m))
        assert balance.available == 88
    finally:
        await port.close()


async def test_refused_personalisation_without_a_fallback_is_recorded_as_suppressed(
    loud: Env,
) -> None:
    env = loud
    await env.publish(
        {
            "id": "np",
            "priority": 10,
            "entry": {"event": "check_in"},
            "start": "mp",
            "steps": {
                # A capped-class subscription message: the cap is checked before
                # the credit, so a capped message never burns the member's tap.
                "mp": send("mp", "mp-offer", "pick", channel="miniprogram"),
                "pick": send("pick", "picked-for-you", "end", cls="general", personalised=True),
                "end": {"type": "exit"},
            },
        }
    )
    await env.publish(one_shot("np-first", 99, "first"))
    m = await env.member()
    async with env.db.unit_of_work() as uow:
        await env.handlers.set_non_personalised(uow, m, True)
    await env.event("subscription_tap", m, template="mp-offer")
    await env.event("page_view", m)  # takes today's targeted budget
    await env.scheduler.run_until_idle()
    await env.event("check_in", m)
    await env.scheduler.run_until_idle()
    rows = await env.db.pool.fetch(
        "SELECT template, status, reason FROM engagement.sends WHERE member_id = $1"
        " ORDER BY created_at, send_key",
        uuid.UUID(m),
    )
    assert {(r["template"], r["status"], r["reason"]) for r in rows} == {
        ("first", "pending", ""),
        ("mp-offer", "capped", "DAILY_CAP"),
        ("picked-for-you", "suppressed", "NON_PERSONALISED"),
    }
    credits = await env.db.pool.fetchval(
        "SELECT credits FROM engagement.subscription_credits WHERE member_id = $1", uuid.UUID(m)
    )
    assert credits == 1


async def test_members_near_a_store_with_consented_locations_enter(env: Env) -> None:
    await env.publish(
        {
            "id": "near-store",
            "priority": 50,
            "entry": {"event": "near_store"},
            "reentry": {"policy": "after_days", "days": 7},
            "start": "offer",
            "steps": {
                "offer": send("offer", "store-offer", "end", cls="general"),
                "end": {"type": "exit"},
            },
        }
    )
    # The Jing'an store (SH001).
    store = (31.2232, 121.4469)
    near, far, refused, stale = [await env.member() for _ in range(4)]
    await env.event(
        "location_reported", near, latitude="31.2300", longitude="121.4550", consent="true"
    )
    await env.event(
        "location_reported", far, latitude="31.2363", longitude="121.5010", consent="true"
    )
    await env.event(
        "location_reported", refused, latitude="31.2232", longitude="121.4469", consent="true"
    )
    await env.event("location_reported", refused, latitude="31.2232", longitude="121.4469")
    env.clock.advance(timedelta(days=-8))
    await env.event(
        "location_reported", stale, latitude="31.2232", longitude="121.4470", consent="true"
    )
    env.clock.advance(timedelta(days=8))
    with pytest.raises(InvalidArgument) as info:
        await env.event("location_reported", near, latitude="131", longitude="0", consent="true")
    assert info.value.code == "INVALID_LOCATION"

    async def launch() -> tuple[int, int]:
        async with env.db.unit_of_work() as uow:
            audience = await env.handlers.near_store_audience(
                uow, env.jid("near-store"), *store, 3_000
            )
        async with env.db.unit_of_work() as uow:
            entered = await env.handlers.enter_near_store(
                uow, env.jid("near-store"), "SH001", audience
            )
        return len(audience), entered

    assert await launch() == (1, 1)
    assert await launch() == (1, 0)  # re-entry after 7 days only
    await env.scheduler.run_until_idle()
    assert await env.templates(near) == ["store-offer"]
    for m in (far, refused, stale):
        assert await env.sends(m) == []
    with pytest.raises(InvalidArgument):
        async with env.db.unit_of_work() as uow:
            await env.handlers.near_store_audience(uow, env.jid("near-store"), *store, 0)


async def test_goal_events_racing_sweepers_neither_deadlock_nor_double_send(env: Env) -> None:
    await env.publish(CART)
    members = [await env.member() for _ in range(40)]
    for m in members:
        await env.event("cart_abandoned", m)
    env.clock.advance(timedelta(hours=2))
    sweepers = [
        Scheduler(
            env.db,
            env.clock,
            LocalConsent(),
            QuietHours(),
            env.journeys,
            batch_size=5,
            wecom_sender="fallback-staff",
        )
        for _ in range(3)
    ]
    results = await asyncio.gather(
        *(s.run_until_idle() for s in sweepers),
        *(env.event("order_completed", m, order_id=f"race-{m}") for m in members),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    assert sum(s.stats.conflicts for s in sweepers) == 0
    for m in members:
        status = await env.db.pool.fetchval(
            "SELECT status FROM engagement.enrollments WHERE member_id = $1", uuid.UUID(m)
        )
        sent = await env.templates(m)
        # Either the reminder went first and the journey completed, or the order won.
        assert (status, sent) in (("completed", ["cart-discount"]), ("converted", []))


async def test_parked_events_replay_when_any_service_introduces_the_member(env: Env) -> None:
    await env.publish(CART)
    m = str(uuid.uuid4())
    assert await env.event("cart_abandoned", m) == []
    # A member who registered before engagement ran: an order is how we meet them.
    async with env.db.unit_of_work() as uow:
        replay = await env.handlers.ingest(uow, "order_completed", m, {"order_id": "first"})
        await env.handlers.set_consent(uow, m, ALL, True, "test")
    # The parked cart event happened first: it is replayed first, and the
    # order that followed is the journey's goal.
    assert env.jid("cart") in replay.enrolled
    status = await env.db.pool.fetchval(
        "SELECT status FROM engagement.enrollments WHERE member_id = $1", uuid.UUID(m)
    )
    assert status == "converted"
    await env.advance(hours=2)
    assert await env.sends(m) == []


async def test_a_failing_step_is_isolated_retried_then_given_up(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.engagement import scheduler as scheduler_module

    await env.publish(CART)
    members = [await env.member() for _ in range(3)]
    poison = members[1]
    for m in members:
        await env.event("cart_abandoned", m)
    real_run = scheduler_module.run

    def flaky_run(*args: Any, **kwargs: Any) -> Any:
        if kwargs["facts"].member_id == poison:
            raise RuntimeError("a template service bug")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(scheduler_module, "run", flaky_run)
    await env.advance(hours=2)
    assert await env.templates(members[0]) == ["cart-discount"]
    assert await env.templates(members[2]) == ["cart-discount"]
    for _ in range(5):
        await env.advance(hours=1)
    status = await env.db.pool.fetchval(
        "SELECT status FROM engagement.enrollments WHERE member_id = $1", uuid.UUID(poison)
    )
    assert status == "failed"
    assert await env.sends(poison) == []


class _GatedConsent:
    """LocalConsent with hooks: a batch holding `gated` waits for `go` and then
    fails (a poison step); a batch holding `signal` sets `go` (another sweeper
    task of the same Scheduler claimed its own step meanwhile)."""

    def __init__(self, gated: str, signal: str) -> None:
        self.gated, self.signal = gated, signal
        self.waiting, self.go = asyncio.Event(), asyncio.Event()
        self._local = LocalConsent()

    async def facts_with_consent(self, conn: Any, member_ids: list[uuid.UUID]) -> Any:
        ids = {str(m) for m in member_ids}
        if self.gated in ids:
            self.waiting.set()
            await self.go.wait()
            raise RuntimeError("poison step")
        if self.signal in ids:
            self.go.set()
        return await self._local.facts_with_consent(conn, member_ids)


async def test_sweeper_tasks_sharing_a_scheduler_isolate_their_own_failing_step(
    env: Env,
) -> None:
    """Two sweeper tasks of one Scheduler (as the server runs them): the task
    whose step fails postpones that step, not the step the other task claimed."""
    await env.publish(CART)
    poison, healthy = await env.member(), await env.member()
    await env.event("cart_abandoned", poison)
    env.clock.advance(timedelta(minutes=1))  # the poison step is due first: claimed first
    await env.event("cart_abandoned", healthy)
    await env.scheduler.run_until_idle()  # both wait for their reminder now
    env.clock.advance(timedelta(hours=2))
    gate = _GatedConsent(poison, healthy)
    shared = Scheduler(
        env.db, env.clock, gate, QuietHours(), env.journeys, wecom_sender="fallback-staff"
    )  # type: ignore[arg-type]
    first = asyncio.create_task(shared.sweep_once(1))
    await gate.waiting.wait()  # the first task holds the poison step
    await shared.sweep_once(1)  # the second task claims and runs the healthy one
    await first

    async def timer(member: str) -> Any:
        return await env.db.pool.fetchrow(
            "SELECT t.step_id, t.attempts, t.due_at FROM engagement.timers t"
            " JOIN engagement.enrollments e USING (enrollment_id) WHERE e.member_id = $1",
            uuid.UUID(member),
        )

    postponed = await timer(poison)
    assert postponed is not None and postponed["attempts"] == 1
    assert postponed["due_at"] > env.clock.now()
    assert await timer(healthy) is None  # ran to the end, untouched by the failure
    assert await env.templates(healthy) == ["cart-discount"]


async def _refuse(env: Env, member: str, channel: str) -> None:
    """The member refuses marketing on a channel (member's ConsentChanged)."""
    async with env.db.unit_of_work() as uow:
        await env.handlers.on_consent_changed(
            uow, member, "marketing", channel, False, "mini-program", env.clock.now()
        )


async def test_consent_is_checked_again_when_a_pending_send_is_delivered(loud: Env) -> None:
    """A send written as pending, or waiting in a retry's back-off, does not go
    out after the member unsubscribes; its cap slot and mini-program credit are
    given back."""
    env = loud
    await env.publish(
        {
            "id": "late-refusal",
            "priority": 10,
            "entry": {"event": "check_in"},
            "reentry": {"policy": "after_exit"},
            "start": "push",
            "steps": {
                "push": send("push", "push-offer", "mp", channel="app_push"),
                "mp": send("mp", "mp-news", "end", cls="transactional", channel="miniprogram"),
                "end": {"type": "exit"},
            },
        }
    )
    waiting, retrying = await env.member(), await env.member()
    for m in (waiting, retrying):
        await env.event("subscription_tap", m, template="mp-news", openid=f"o-{m}")
        await env.event("check_in", m)
    await env.scheduler.run_until_idle()
    assert sorted(t for _, t, s in await env.sends(waiting) if s == "pending") == [
        "mp-news",
        "push-offer",
    ]
    # The providers are down (a definite refusal): back-off.
    down = [Delivery("retry", reason="HTTP 503", code="HTTP_503")]
    push = ScriptedProvider("app_push", down, {waiting, retrying})
    mp = ScriptedProvider("miniprogram", down, {waiting, retrying})
    providers: dict[str, Any] = {"app_push": push, "miniprogram": mp}

    def called() -> list[str]:
        return sorted([c.address for c in push.calls] + [c.address for c in mp.calls])

    dispatcher = Dispatcher(env.db, env.clock, providers, {})
    # `retrying`'s sends were tried once and wait in back-off; `waiting`'s were
    # never tried (its member refuses before the dispatcher runs).
    await _refuse(env, waiting, "")
    push.calls.clear()
    mp.calls.clear()
    await dispatcher.dispatch_once()
    assert called() == sorted([retrying, f"o-{retrying}"])
    await _refuse(env, retrying, "")
    env.clock.advance(timedelta(minutes=5))
    while await dispatcher.dispatch_once():
        pass
    assert called() == sorted([retrying, f"o-{retrying}"])  # nothing after the refusal
    for m in (waiting, retrying):
        rows = await env.db.pool.fetch(
            "SELECT status, reason FROM engagement.sends WHERE member_id = $1", uuid.UUID(m)
        )
        assert {(r["status"], r["reason"]) for r in rows} == {("suppressed", "NO_CONSENT")}
        used = await env.db.pool.fetchval(
            "SELECT sum(used) FROM engagement.cap_usage WHERE member_id = $1", uuid.UUID(m)
        )
        assert used == 0  # the day's targeted slot is free again
        credits = await env.db.pool.fetchval(
            "SELECT credits FROM engagement.subscription_credits WHERE member_id = $1",
            uuid.UUID(m),
        )
        assert credits == 1  # the tap was not spent on a message that never went


async def test_holdout_members_have_one_live_enrollment_like_treated_ones(env: Env) -> None:
    """With after_exit re-entry, a holdout member's repeated events do not
    enter again while its enrollment is live (its goal's window); afterwards
    it may re-enter, as a treated member may after its run ends."""
    await env.publish({**CART, "id": "cart-held", "holdout_percent": 50})
    members = [await env.member() for _ in range(12)]
    for _ in range(3):
        for m in members:
            await env.event("cart_abandoned", m)
        await env.advance(minutes=10)
    rows = await env.db.pool.fetch(
        "SELECT member_id, grp, count(*) AS n FROM engagement.enrollments WHERE journey_id = $1"
        " GROUP BY member_id, grp",
        env.jid("cart-held"),
    )
    groups = {str(r["member_id"]): r["grp"] for r in rows}
    assert set(groups.values()) == {"holdout", "treatment"}
    assert all(r["n"] == 1 for r in rows), [(r["grp"], r["n"]) for r in rows]
    metrics = await metrics_of(env, "cart-held")
    assert (metrics.treated, metrics.holdout) == (
        sum(g == "treatment" for g in groups.values()),
        sum(g == "holdout" for g in groups.values()),
    )
    held = [m for m in members if groups[m] == "holdout"]
    # The goal's window (1 day) ends: the holdout enrollments end, nothing sent.
    await env.advance(days=1)
    for m in held:
        assert await env.sends(m) == []
        status = await env.db.pool.fetchval(
            "SELECT status FROM engagement.enrollments WHERE member_id = $1", uuid.UUID(m)
        )
        assert status == "holdout"
        assert env.jid("cart-held") in await env.event("cart_abandoned", m)


async def test_operators_list_replay_and_expire_parked_events(env: Env, infra: Infra) -> None:
    """Parked events are not kept forever: operators page through them, replay
    a member the member service vouches for, and old ones expire."""
    await env.publish(CART)
    known_later, never = str(uuid.uuid4()), str(uuid.uuid4())
    await env.event("cart_abandoned", known_later)
    await env.event("page_view", known_later, page="menu")
    env.clock.advance(timedelta(days=1))
    await env.event("cart_abandoned", never)

    async def page(member: str = "", size: int = 0, token: str = "") -> Any:
        async with env.db.unit_of_work() as uow:
            return await env.handlers.list_parked(uow, member, size, token)

    mine, token = await page(known_later)
    assert [(r.event, r.attributes) for r in mine] == [
        ("cart_abandoned", {}),
        ("page_view", {"page": "menu"}),
    ]
    assert token == "" and mine[0].parked_at == START
    first, token = await page(known_later, size=1)
    second, last = await page(known_later, size=1, token=token)
    assert [first[0].event, second[0].event, last] == ["cart_abandoned", "page_view", ""]
    for bad in ({"size": 501}, {"token": "x"}):
        with pytest.raises(InvalidArgument) as info:
            await page(known_later, **bad)  # type: ignore[arg-type]
        assert info.value.field in ("page_size", "page_token")

    # The member registered while engagement missed the event: an operator replays.
    async with env.db.unit_of_work() as uow:
        replayed, enrolled = await env.handlers.replay_parked(uow, known_later)
        await env.handlers.set_consent(uow, known_later, ALL, True, "test")
    assert (replayed, enrolled) == (2, [env.jid("cart")])
    assert (await page(known_later))[0] == []
    with pytest.raises(NotFound):
        async with env.db.unit_of_work() as uow:
            await env.handlers.replay_parked(uow, known_later)
    await env.advance(hours=2)
    assert await env.templates(known_later) == ["cart-discount"]

    # Expiry: what was parked more than 30 days ago goes, nothing younger.
    env.clock.set(START + timedelta(days=30, hours=12))
    async with env.db.unit_of_work() as uow:
        await env.handlers.expire_parked(uow, timedelta(days=30))
    assert [r.event for r in (await page(never))[0]] == ["cart_abandoned"]
    env.clock.set(START + timedelta(days=31, hours=1))
    async with env.db.unit_of_work() as uow:
        assert await env.handlers.expire_parked(uow, timedelta(days=30)) >= 1
    assert (await page(never))[0] == []
    with pytest.raises(InvalidArgument):
        async with env.db.unit_of_work() as uow:
            await env.handlers.expire_parked(uow, timedelta(hours=1))

    # The command-line tool reads the same table.
    stray = str(uuid.uuid4())
    await env.event("check_in", stray)
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.engagement", "parked-list", "--member", stray],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": infra.database_url},
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(x["member_id"], x["event"], x["reason"]) for x in lines] == [
        (stray, "check_in", "UNKNOWN_MEMBER")
    ]


class _Stores:
    """Store zones as rewards would answer (a fake StoreZones port)."""

    def __init__(self, zones: dict[str, str]) -> None:
        self.zones = zones

    async def zone_of(self, store_id: str) -> str:
        return self.zones.get(store_id, "")

    async def name_of(self, store_id: str) -> str:
        return f"Store {store_id}" if store_id in self.zones else ""


async def _zone(env: Env, member: str, profile_tz: str, store_id: str = "") -> str:
    async with env.db.unit_of_work() as uow:
        return await env.handlers.on_zone_set(uow, member, profile_tz, store_id)


async def test_a_member_in_another_zone_gets_its_own_local_day_for_caps(loud: Env) -> None:
    """The daily cap turns at the member's midnight: London's midnight is 08:00
    in Shanghai, where the day has long begun."""
    env = loud
    await env.publish(one_shot("zone-cap", 50, "offer"))
    london, shanghai = await env.member(), await env.member()
    assert await _zone(env, london, "Europe/London") == "Europe/London"
    env.clock.set(datetime(2030, 3, 4, 23, 50, tzinfo=UTC))  # London 23:50; Shanghai 07:50 (5th)
    for m in (london, shanghai):
        await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    env.clock.set(datetime(2030, 3, 5, 0, 10, tzinfo=UTC))  # London 00:10 (5th); Shanghai 08:10
    for m in (london, shanghai):
        await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    assert [s for *_, s in await env.sends(london)] == ["pending", "pending"]
    assert [s for *_, s in await env.sends(shanghai)] == ["pending", "capped"]
    days = await env.db.pool.fetch(
        "SELECT local_day FROM engagement.cap_usage WHERE member_id = $1 ORDER BY local_day",
        uuid.UUID(london),
    )
    assert [r["local_day"].isoformat() for r in days] == ["2030-03-04", "2030-03-05"]


async def test_quiet_hours_follow_the_members_zone_profile_then_store(env: Env) -> None:
    env.handlers.stores = _Stores({"LDN01": "Europe/London", "SH001": "Asia/Shanghai"})
    await env.publish(one_shot("zone-quiet", 50, "offer"))
    by_profile, by_store, shanghai = await env.member(), await env.member(), await env.member()
    assert await _zone(env, by_profile, "Europe/London", "SH001") == "Europe/London"
    assert await _zone(env, by_store, "", "LDN01") == "Europe/London"
    # A zone member would not have accepted (an old value) falls back to the store's.
    assert await _zone(env, shanghai, "Mars/Olympus", "SH001") == "Asia/Shanghai"
    # 14:00 UTC: 22:00 in Shanghai (quiet), 14:00 in London (not).
    env.clock.set(datetime(2030, 3, 4, 14, 0, tzinfo=UTC))
    for m in (by_profile, by_store, shanghai):
        await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    assert await env.templates(by_profile) == ["offer"]
    assert await env.templates(by_store) == ["offer"]
    assert await env.templates(shanghai) == []
    # 02:00 UTC next day: 10:00 in Shanghai (the held one goes), 02:00 in London (quiet).
    env.clock.set(datetime(2030, 3, 5, 2, 0, tzinfo=UTC))
    await env.scheduler.run_until_idle()
    assert await env.templates(shanghai) == ["offer"]
    for m in (by_profile, by_store, shanghai):
        await env.event("page_view", m)
    await env.scheduler.run_until_idle()
    assert await env.templates(by_profile) == ["offer"]  # held until 09:00 London
    held = await env.db.pool.fetchval(
        "SELECT t.due_at FROM engagement.timers t JOIN engagement.enrollments e"
        " USING (enrollment_id) WHERE e.member_id = $1",
        uuid.UUID(by_profile),
    )
    morning = datetime(2030, 3, 5, 9, 0, tzinfo=UTC)  # 09:00 in London (GMT in March)
    assert morning <= held < morning + timedelta(minutes=30)
    env.clock.set(morning + timedelta(minutes=30))
    await env.scheduler.run_until_idle()
    assert await env.templates(by_profile) == ["offer", "offer"]


async def test_a_resumed_journey_drops_a_stale_send_behind_a_branch_and_a_reward(
    env: Env,
) -> None:
    """After a pause, a send reached through a branch and a coupon step is as
    stale as the timer that leads to it: dropped, while the coupon (not a
    message) is still given and the member moves on."""
    await env.publish(
        {
            "id": "resume-deep",
            "priority": 60,
            "entry": {"event": "cart_abandoned"},
            "start": "wait",
            "steps": {
                "wait": {"type": "wait", "duration": "2h", "next": "vip"},
                "vip": {
                    "type": "branch",
                    "cases": [{"if": {"fact": "tier", "op": "eq", "value": "SVIP"}, "next": "end"}],
                    "next": "gift",
                },
                "gift": {"type": "issue_coupon", "coupon": "CART-5", "next": "remind"},
                "remind": send("remind", "cart-discount", "end", drop_if_late="6h"),
                "end": {"type": "exit"},
            },
        }
    )
    m = await env.member()
    await env.event("cart_abandoned", m)
    await env.scheduler.run_until_idle()
    async with env.db.unit_of_work() as uow:
        await env.handlers.set_status(uow, env.jid("resume-deep"), "paused")
    await env.advance(days=2)
    async with env.db.unit_of_work() as uow:
        await env.handlers.set_status(uow, env.jid("resume-deep"), "active")
    await env.scheduler.run_until_idle()
    assert await env.sends(m) == [(env.jid("resume-deep"), "cart-discount", "dropped")]
    coupons = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.reward_requests WHERE member_id = $1", uuid.UUID(m)
    )
    assert coupons == 1
    status = await env.db.pool.fetchval(
        "SELECT status FROM engagement.enrollments WHERE member_id = $1", uuid.UUID(m)
    )
    assert status == "completed"


ORDER_THANKS = {
    "id": "order-thanks",
    "priority": 50,
    "entry": {"event": "order_completed"},
    "holdout_percent": 0,
    "start": "m",
    "steps": {"m": send("m", "thanks-for-the-order", "end"), "end": {"type": "exit"}},
}


async def test_a_journey_published_or_paused_after_orders_were_consumed_counts_from_the_next(
    env: Env,
) -> None:
    """Which journeys an event enters is read with the event's own fact (issue
    19), never cached: a journey published by another replica (another
    handlers object) takes the next order; paused, it takes none; resumed, again."""
    m, n = await env.member(), await env.member()
    assert await env.event("order_completed", m, order_id="o1") == []
    other_replica = make_env(env.db, env.clock, QuietHours())
    other_replica.tag = env.tag
    await other_replica.publish(ORDER_THANKS)
    assert await env.event("order_completed", m, order_id="o2") == [env.jid("order-thanks")]
    async with env.db.unit_of_work() as uow:
        await other_replica.handlers.set_status(uow, env.jid("order-thanks"), "paused")
    assert await env.event("order_completed", n, order_id="o3") == []
    async with env.db.unit_of_work() as uow:
        await other_replica.handlers.set_status(uow, env.jid("order-thanks"), "active")
    assert await env.event("order_completed", n, order_id="o4") == [env.jid("order-thanks")]
    # The orders were counted all along (first_order was the first one's).
    counts = await env.db.pool.fetch(
        "SELECT order_count FROM engagement.member_facts WHERE member_id = ANY($1::uuid[])"
        " ORDER BY member_id",
        [uuid.UUID(m), uuid.UUID(n)],
    )
    assert [r["order_count"] for r in counts] == [2, 2]


ENDS_AT_ONCE = {
    "id": "ends-at-once",
    "priority": 50,
    "entry": {"event": "segment_changed"},
    "goal": {"event": "order_completed", "within_days": 7},
    "holdout_percent": 0,
    "start": "m",
    "steps": {"m": send("m", "hello-segment", "end"), "end": {"type": "exit"}},
}


async def test_an_order_converts_an_enrollment_that_already_ended_within_its_window(
    env: Env,
) -> None:
    """A member whose only enrollment has ended still has one (issue 19's early
    exit skips only members with none): the order converts it."""
    await env.publish(ENDS_AT_ONCE)
    m = await env.member()
    assert await env.event("segment_changed", m, to_segment="gold") == [env.jid("ends-at-once")]
    await env.scheduler.run_until_idle()
    row = await env.db.pool.fetchrow(
        "SELECT status, converted_at FROM engagement.enrollments WHERE member_id = $1",
        uuid.UUID(m),
    )
    assert (row["status"], row["converted_at"]) == ("completed", None)
    env.clock.advance(timedelta(days=2))
    assert await env.event("order_completed", m, order_id="o1") == []
    row = await env.db.pool.fetchrow(
        "SELECT status, converted_at FROM engagement.enrollments WHERE member_id = $1",
        uuid.UUID(m),
    )
    assert (row["status"], row["converted_at"]) == ("completed", env.clock.now())
    facts = await env.db.pool.fetchrow(
        "SELECT segment, order_count FROM engagement.member_facts WHERE member_id = $1",
        uuid.UUID(m),
    )
    assert (facts["segment"], facts["order_count"]) == ("gold", 1)


async def test_an_order_introducing_a_member_replays_its_parked_events_first(env: Env) -> None:
    """The events parked for a member are taken in the introducing event's own
    statement (issue 19): replayed before it, so the order is the parked cart's
    goal, its first_order journey is entered after, and its facts are counted."""
    await env.publish(CART)
    await env.publish(FIRST_ORDER)
    m = str(uuid.uuid4())
    assert await env.event("cart_abandoned", m) == []
    env.clock.advance(timedelta(minutes=5))
    assert await env.event("order_completed", m, order_id="o1") == [
        env.jid("cart"),
        env.jid("first-order"),
    ]
    rows = await env.db.pool.fetch(
        "SELECT journey_id, status FROM engagement.enrollments WHERE member_id = $1",
        uuid.UUID(m),
    )
    assert {r["journey_id"]: r["status"] for r in rows} == {
        env.jid("cart"): "converted",
        env.jid("first-order"): "active",
    }
    assert (
        await env.db.pool.fetchval(
            "SELECT count(*) FROM engagement.parked_events WHERE member_id = $1", uuid.UUID(m)
        )
        == 0
    )
    # A tier change introduces a member the same way, its fact kept.
    n = str(uuid.uuid4())
    assert await env.event("cart_abandoned", n) == []
    assert await env.event("tier_changed", n, to_tier="GOLD") == [env.jid("cart")]
    assert (
        await env.db.pool.fetchval(
            "SELECT tier FROM engagement.member_facts WHERE member_id = $1", uuid.UUID(n)
        )
        == "GOLD"
    )
