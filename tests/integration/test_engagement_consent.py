"""Consent is member's: engagement keeps a projection of member's
ConsentChanged events (last write wins by recorded_at), and the send-time
check reads it. End to end over the real bus: member's withdrawal suppresses
engagement's next send."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.db import Database
from servicekit.errors import FailedPrecondition, NotFound
from servicekit.events import ENVELOPE_FIELD, make_envelope, stream_name
from servicekit.server import ServiceApp
from services.engagement import repository as repo
from services.engagement.domain import FakeClock, QuietHours
from services.engagement.handlers import EngagementHandlers
from services.engagement.ports import LocalConsent, MemberConsent
from services.engagement.scheduler import JourneyCache, Scheduler
from tests.harness import Infra, eventually

from .test_member_oneid import CARD, ident, identify, tag

# In 2030, so the session's engagement service (real clock) never finds our timers due.
START = datetime(2030, 3, 4, 2, 0, tzinfo=UTC)


async def _pause_all(db: Database) -> None:
    async with db.unit_of_work() as uow:
        for r in await uow.conn.fetch("SELECT journey_id FROM engagement.journey_state"):
            await repo.set_journey_status(uow.conn, r["journey_id"], "paused")


async def consent_row(db: Database, member: str, channel: str) -> Any:
    return await db.pool.fetchrow(
        "SELECT granted, source, updated_at FROM engagement.consents"
        " WHERE member_id = $1 AND channel = $2",
        uuid.UUID(member),
        channel,
    )


async def wait_consent(db: Database, member: str, channel: str, granted: bool) -> Any:
    async def check() -> Any:
        row = await consent_row(db, member, channel)
        return row if row is not None and row["granted"] is granted else None

    return await eventually(check)


async def publish_twice(infra: Infra, db: Database, payload: events_pb2.ConsentChanged) -> None:
    """The same envelope twice (a redelivery), then wait until it was handled."""
    envelope = make_envelope("member", payload, payload.member_id)
    redis = Redis.from_url(infra.redis_url)
    try:
        for _ in range(2):
            await redis.xadd(
                stream_name(infra.namespace, "member"),
                {ENVELOPE_FIELD: envelope.SerializeToString()},
            )
    finally:
        await redis.aclose()

    async def handled() -> bool:
        return bool(
            await db.pool.fetchval(
                "SELECT true FROM engagement.processed_events WHERE event_id::text = $1",
                envelope.event_id,
            )
        )

    await eventually(handled)


async def set_consent(stub: Any, member: str, channel: int, granted: bool, **kw: Any) -> None:
    await stub.SetConsent(
        pb.SetConsentRequest(
            member_id=member,
            purpose=kw.get("purpose", pb.CONSENT_PURPOSE_MARKETING),
            channel=channel,
            granted=granted,
            source="mini-program",
            actor="member",
        )
    )


async def test_member_withdrawal_suppresses_the_send(
    infra: Infra,
    member_app: ServiceApp,
    engagement_app: ServiceApp,
    member_channel: grpc.aio.Channel,
) -> None:
    db = engagement_app.db
    assert db is not None
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    await _pause_all(db)
    clock = FakeClock(START)
    journeys = JourneyCache()
    handlers = EngagementHandlers(clock, QuietHours(), journeys)
    scheduler = Scheduler(
        db, clock, LocalConsent(), QuietHours(), journeys, wecom_sender="fallback-staff"
    )
    journey_id = f"consent-bus-{uuid.uuid4().hex[:6]}"
    doc = {
        "id": journey_id,
        "priority": 10,
        "entry": {"event": "check_in"},
        "reentry": {"policy": "after_exit"},
        "start": "sms",
        "steps": {
            "sms": {
                "type": "send",
                "channel": "sms",
                "template": "sms-offer",
                "params": {},
                "class": "targeted",
                "next": "mp",
            },
            "mp": {
                "type": "send",
                "channel": "wecom",
                "template": "wecom-offer",
                "text": "A new offer for you",
                "class": "general",
                "next": "end",
            },
            "end": {"type": "exit"},
        },
    }
    try:
        async with db.unit_of_work() as uow:
            await handlers.publish(uow, json.dumps(doc))
        member = (await identify(stub, ident(CARD, f"eb-{tag()}"))).member.member_id
        await set_consent(stub, member, pb.CONSENT_CHANNEL_SMS, True)
        await wait_consent(db, member, "sms", True)
        await set_consent(stub, member, pb.CONSENT_CHANNEL_WECOM, True)
        await wait_consent(db, member, "wecom", True)

        async def check_in() -> list[tuple[str, str, str | None]]:
            async with db.unit_of_work() as uow:
                await handlers.ingest(uow, "check_in", member, {})
            await scheduler.run_until_idle()
            rows = await db.pool.fetch(
                "SELECT template, status, reason FROM engagement.sends WHERE member_id = $1"
                " AND journey_id = $2 ORDER BY created_at, send_key",
                uuid.UUID(member),
                journey_id,
            )
            return [(r["template"], r["status"], r["reason"]) for r in rows]

        sent = await check_in()
        assert [(t, s) for t, s, _ in sent] == [
            ("sms-offer", "pending"),
            ("wecom-offer", "pending"),
        ]

        # Withdrawn at member: engagement's next SMS is suppressed, the other channel still goes.
        await set_consent(stub, member, pb.CONSENT_CHANNEL_SMS, False)
        row = await wait_consent(db, member, "sms", False)
        assert row["source"] == "member:mini-program"
        clock.advance(timedelta(days=1))
        sent = await check_in()
        assert sent[2:] == [
            ("sms-offer", "suppressed", "NO_CONSENT"),
            ("wecom-offer", "pending", ""),
        ]
    finally:
        await _pause_all(db)


def _stamp(at: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(at)
    return ts


async def test_an_older_choice_never_overwrites_a_newer_one(
    infra: Infra, engagement_app: ServiceApp
) -> None:
    db = engagement_app.db
    assert db is not None
    member = str(uuid.uuid4())
    now = datetime.now(UTC).replace(microsecond=0)

    def changed(channel: str, granted: bool, at: datetime, purpose: str = "marketing") -> Any:
        return events_pb2.ConsentChanged(
            member_id=member,
            purpose=purpose,
            channel=channel,
            granted=granted,
            source="operator",
            recorded_at=_stamp(at),
        )

    await publish_twice(infra, db, changed("wecom", False, now))
    assert (await consent_row(db, member, "wecom"))["granted"] is False
    # Recorded earlier, delivered later: ignored.
    await publish_twice(infra, db, changed("wecom", True, now - timedelta(seconds=5)))
    row = await consent_row(db, member, "wecom")
    assert row["granted"] is False and row["updated_at"] == now
    # "" is every channel; newer than the WeCom refusal, so it replaces it.
    await publish_twice(infra, db, changed("", True, now + timedelta(seconds=5)))
    for channel in ("wecom", "sms", "miniprogram", "app_push"):
        assert (await consent_row(db, member, channel))["granted"] is True
    # Personalisation refused -> the non-personalised choice, also last write wins.
    await publish_twice(infra, db, changed("", False, now, "personalisation"))
    await publish_twice(infra, db, changed("", True, now - timedelta(seconds=1), "personalisation"))
    assert await db.pool.fetchval(
        "SELECT non_personalised FROM engagement.preferences WHERE member_id = $1",
        uuid.UUID(member),
    )


async def test_unsubscribe_through_engagement_is_recorded_by_member(
    member_app: ServiceApp, engagement_app: ServiceApp, member_channel: grpc.aio.Channel
) -> None:
    """Engagement's Unsubscribe / SetConsent / SetNonPersonalised record the
    choice at member (history kept, ConsentChanged emitted) and apply member's
    answer to the projection at once; without member they refuse."""
    db = engagement_app.db
    assert db is not None
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    member = (await identify(stub, ident(CARD, f"eu-{tag()}"))).member.member_id
    recorder = MemberConsent(f"127.0.0.1:{member_app.port}", 5.0)
    handlers = EngagementHandlers(FakeClock(START), QuietHours(), JourneyCache(), recorder)
    try:
        async with db.unit_of_work() as uow:
            await handlers.record_consent(uow, member, ["sms", "wecom"], True, "mini-program")
        async with db.unit_of_work() as uow:
            await handlers.unsubscribe(uow, member, ["sms"])
        async with db.unit_of_work() as uow:
            await handlers.record_non_personalised(uow, member, True, "mini-program")
        history = await stub.ListConsentHistory(pb.ListConsentHistoryRequest(member_id=member))
        assert [
            (pb.ConsentChannel.Name(r.channel), r.granted, r.source) for r in history.records
        ] == [
            ("CONSENT_CHANNEL_SMS", True, "mini-program"),
            ("CONSENT_CHANNEL_WECOM", True, "mini-program"),
            ("CONSENT_CHANNEL_SMS", False, "engagement:unsubscribe"),
            ("CONSENT_CHANNEL_ALL", False, "mini-program"),
        ]
        # Applied here at once, with member's time (the event that follows is a no-op).
        sms = await consent_row(db, member, "sms")
        assert sms["granted"] is False and sms["source"] == "member:engagement:unsubscribe"
        assert sms["updated_at"] == history.records[2].recorded_at.ToDatetime(tzinfo=UTC)
        assert (await consent_row(db, member, "wecom"))["granted"] is True
        assert await db.pool.fetchval(
            "SELECT non_personalised FROM engagement.preferences WHERE member_id = $1",
            uuid.UUID(member),
        )
        # Member's refusal is engagement's: an unknown member, nothing written.
        stranger = str(uuid.uuid4())
        with pytest.raises(NotFound):
            async with db.unit_of_work() as uow:
                await handlers.unsubscribe(uow, stranger, [])
        assert await consent_row(db, stranger, "sms") is None
        unwired = EngagementHandlers(FakeClock(START), QuietHours(), JourneyCache())
        with pytest.raises(FailedPrecondition) as info:
            async with db.unit_of_work() as uow:
                await unwired.unsubscribe(uow, member, ["wecom"])
        assert info.value.code == "MEMBER_NOT_CONFIGURED"
    finally:
        await recorder.close()
