"""Demo journey for `make run` (servicekit/demo.py): "demo-welcome", a welcome
message on registration and a nudge three days later, 10% holdout, with the
demo members' enrollments, sends and conversions (an order within 7 days of
entry, from rewards' demo orders) as the scheduler would have left them.
Idempotent: once the journey exists, nothing is added."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from servicekit.demo import Activity, DemoMember

from .journey import parse_journey

JOURNEY_ID = "demo-welcome"
CONVERSION_DAYS = 7
NUDGE_AFTER = timedelta(days=3)
DEFINITION: dict[str, Any] = {
    "id": JOURNEY_ID,
    "name": "新会员欢迎",
    "priority": 50,
    "entry": {"event": "member_registered", "where": {}},
    "goal": {"event": "order_completed", "within_days": CONVERSION_DAYS},
    "holdout_percent": 10,
    "start": "welcome",
    "steps": {
        "welcome": {
            "type": "send",
            "channel": "wecom",
            "template": "welcome",
            "class": "targeted",
            # The guide's 1-to-1 WeCom message (docs/journeys.md, WeCom).
            "text": "欢迎加入！首杯立减券已放入您的卡包，到店出示会员码即可使用。",
            "next": "wait",
        },
        "wait": {"type": "wait", "duration": "72h", "next": "nudge"},
        "nudge": {
            "type": "send",
            "channel": "wecom",
            "template": "first-cup-nudge",
            "class": "targeted",
            "text": "您的首杯立减券还在等您，这周来店里尝尝新品吧。",
            "next": "end",
        },
        "end": {"type": "exit"},
    },
}


def _status(m: DemoMember, step: str) -> str:
    """Where a send ended: mostly delivered; a few the caps, consent or the
    provider stopped (stable per member)."""
    n = m.number + (7 if step == "nudge" else 0)
    if n % 17 == 0:
        return "failed"
    if n % 13 == 0:
        return "capped"
    if n % 11 == 0:
        return "suppressed"
    return "delivered"


async def seed_demo_journey(conn: asyncpg.Connection, activity: Activity, now: datetime) -> None:
    journey = parse_journey(DEFINITION)  # the definition the scheduler will load
    published = await conn.fetchval(
        "INSERT INTO engagement.journeys (journey_id, version, definition, priority, entry_event,"
        " published_at) VALUES ($1, 1, $2::jsonb, $3, $4, $5) ON CONFLICT DO NOTHING"
        " RETURNING true",
        JOURNEY_ID,
        json.dumps(DEFINITION),
        journey.priority,
        journey.entry_event,
        now - timedelta(days=95),
    )
    if not published:
        return  # seeded before: its history stays as it was
    # The members as engagement knows them (no MemberRegistered went out for
    # history): their store; their order counts come with OrderCompleted.
    await conn.execute(
        "INSERT INTO engagement.member_facts (member_id, store_id)"
        " SELECT * FROM unnest($1::uuid[], $2::text[]) ON CONFLICT DO NOTHING",
        [m.member_id for m in activity.members],
        [m.store_id for m in activity.members],
    )
    await conn.execute(
        "INSERT INTO engagement.journey_state (journey_id, live_version, entry_event, status)"
        " VALUES ($1, 1, $2, 'active') ON CONFLICT DO NOTHING",
        JOURNEY_ID,
        journey.entry_event,
    )
    first_order: dict[uuid.UUID, datetime] = {}
    for o in activity.orders:
        first_order.setdefault(o.member_id, o.ordered_at)
    enrollments, sends = [], []
    for m in activity.members:
        entered = m.registered_at + timedelta(minutes=1)
        window_end = entered + timedelta(days=CONVERSION_DAYS)
        if window_end > now:
            continue  # still live: the scheduler's, not history
        bought = first_order.get(m.member_id)
        converted = bought if bought is not None and entered < bought <= window_end else None
        holdout = m.number % 10 == 0
        eid = uuid.uuid5(m.member_id, JOURNEY_ID)
        enrollments.append(
            (
                eid,
                m.member_id,
                "converted" if converted else "completed",
                "holdout" if holdout else "treatment",
                entered,
                converted or window_end,
                converted,
            )
        )
        if holdout:
            continue
        steps = [("welcome", entered)]
        if converted is None or converted > entered + NUDGE_AFTER:
            steps.append(("nudge", entered + NUDGE_AFTER))
        for seq, (step, at) in enumerate(steps):
            sends.append((f"{eid}:{seq}", eid, step, m.member_id, at.date(), _status(m, step), at))
    await conn.executemany(
        "INSERT INTO engagement.enrollments (enrollment_id, journey_id, version, member_id,"
        " status, grp, conversion_days, entered_at, ended_at, converted_at)"
        f" VALUES ($1, '{JOURNEY_ID}', 1, $2, $3, $4, {CONVERSION_DAYS}, $5, $6, $7)"
        " ON CONFLICT DO NOTHING",
        enrollments,
    )
    await conn.executemany(
        "INSERT INTO engagement.sends (send_key, enrollment_id, journey_id, version, step_id,"
        " member_id, channel, template, message_class, priority, local_day, status,"
        f" created_at, updated_at) VALUES ($1, $2, '{JOURNEY_ID}', 1, $3, $4, 'wecom', $3,"
        " 'targeted', 50, $5, $6, $7, $7) ON CONFLICT DO NOTHING",
        sends,
    )
