"""Template variables filled by what the real events carry, over the real bus:
the producers' own protos (rewards' PointsExpiringSoon, CouponExpiringSoon and
OrderCompleted, member's NicknameSet, guides' GuideBound, tiering's
TierChanged) reach the session's engagement service, and the sends its
sweepers write carry every variable of templates.TRIGGER_VARIABLES rendered
(dates in the member's zone, the store's name as rewards knows it, the WeCom
sender = the member's guide). On main, server.py kept only a few fields of each
event, so these rendered MISSING_VARIABLE."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.server import ServiceApp
from tests.harness import Infra, eventually

from .test_engagement_events import publish
from .test_member_oneid import CARD, ident, identify, tag

# 16:00 UTC on the 30th is midnight on the 31st in Shanghai (the default zone).
EXPIRES = datetime(2031, 1, 30, 16, 0, tzinfo=UTC)


class _Stores:
    """Rewards' stores as engagement's StoreZones port reads them (GetStore)."""

    async def zone_of(self, store_id: str) -> str:
        return ""

    async def name_of(self, store_id: str) -> str:
        return {"SH-RENDER": "Jing'an Temple"}.get(store_id, "")


def _ts(at: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(at)
    return out


def _journey(jid: str, entry: str, channel: str, **content: Any) -> str:
    return json.dumps(
        {
            "id": jid,
            "priority": 50,
            "entry": {"event": entry},
            "start": "tell",
            "steps": {
                "tell": {
                    "type": "send",
                    "channel": channel,
                    "class": "transactional",
                    "template": f"{jid}-t",
                    "next": "end",
                    **content,
                },
                "end": {"type": "exit"},
            },
        }
    )


async def _payloads(app: ServiceApp, member: str, count: int) -> dict[str, Any] | None:
    assert app.db is not None
    rows = await app.db.pool.fetch(
        "SELECT journey_id, payload, status, error_code FROM engagement.sends"
        " WHERE member_id = $1 AND journey_id LIKE 'render-%'",
        uuid.UUID(member),
    )
    if len(rows) < count:
        return None
    return {
        r["journey_id"].rsplit("-", 1)[0]: (
            json.loads(r["payload"]) if isinstance(r["payload"], str) else r["payload"],
            r["error_code"],
        )
        for r in rows
    }


async def test_real_bus_events_fill_every_variable_their_trigger_supplies(
    infra: Infra, engagement_app: ServiceApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert engagement_app.db is not None
    handlers: Any = getattr(engagement_app, "handlers")  # noqa: B009 (EngagementApp)
    monkeypatch.setattr(handlers, "stores", _Stores())
    t = tag()
    async with engagement_app.db.unit_of_work() as uow:
        for name, entry, channel, content in [
            (
                "render-points",
                "points_expiring_soon",
                "app_push",
                {
                    "title": "Hi {nickname:10}",
                    "body": "{points} of your {points_balance} points lapse on"
                    " {points_expire_on} ({tier})",
                },
            ),
            (
                "render-coupon",
                "coupon_expiring_soon",
                "sms",
                {
                    "template": "SMS_OFFER",
                    "params": {
                        "name": "{coupon_name:20}",
                        "id": "{coupon_id:30}",
                        "on": "{coupon_expire_on}",
                    },
                },
            ),
            (
                "render-order",
                "order_completed",
                "wecom",
                {"text": "Thanks for visiting {store_name} ({store_id}), {nickname}"},
            ),
        ]:
            doc = _journey(f"{name}-{t}", entry, channel, **content)
            await handlers.publish(uow, doc)
    m = str(uuid.uuid4())
    await publish(infra, "member", events_pb2.MemberRegistered(member_id=m, source="pos"), m)
    await publish(infra, "member", events_pb2.NicknameSet(member_id=m, nickname="小林"), m)
    await publish(infra, "tiering", events_pb2.TierChanged(member_id=m, to_tier="GOLD"), m)
    bound = events_pb2.GuideBound(member_id=m, to_staff_id="guide-chen", reason="wecom_add")
    await publish(infra, "guides", bound, m)

    async def known() -> bool:
        row = await engagement_app.db.pool.fetchrow(  # type: ignore[union-attr]
            "SELECT nickname, tier, guide_userid FROM engagement.member_facts WHERE member_id = $1",
            uuid.UUID(m),
        )
        return row is not None and tuple(row) == ("小林", "GOLD", "guide-chen")

    await eventually(known, timeout=15)
    # The producers' events, as rewards emits them.
    expiring = events_pb2.PointsExpiringSoon(
        member_id=m, points=120, expires_at=_ts(EXPIRES), points_balance=860
    )
    coupon = events_pb2.CouponExpiringSoon(
        coupon_id="c-7f3a",
        member_id=m,
        template_id="tmpl-tea",
        name="Oolong milk tea voucher",
        expires_at=_ts(EXPIRES),
    )
    order = events_pb2.OrderCompleted(order_id=f"o-{t}", member_id=m, store_id="SH-RENDER")
    for event in (expiring, coupon, order):
        await publish(infra, "rewards", event, m)
    sends = await eventually(lambda: _payloads(engagement_app, m, 3), timeout=20)
    points, points_code = sends["render-points"]
    assert points_code != "MISSING_VARIABLE"
    assert (points["title"], points["body"]) == (
        "Hi 小林",
        "120 of your 860 points lapse on 2031-01-31 (GOLD)",
    )
    coupon_payload, _ = sends["render-coupon"]
    assert coupon_payload["params"] == {
        "name": "Oolong milk tea vouc",
        "id": "c-7f3a",
        "on": "2031-01-31",
    }
    wecom, _ = sends["render-order"]
    assert wecom["text"] == "Thanks for visiting Jing'an Temple (SH-RENDER), 小林"
    # Sent by the member's exclusive guide (GuideBound), not WECOM_SENDER.
    assert wecom["sender"] == "guide-chen"

    # Erased: the content rendered for the person (nickname, balance) goes too.
    await publish(infra, "member", events_pb2.MemberErased(member_ids=[m]), m)

    async def wiped() -> bool:
        rows = await engagement_app.db.pool.fetch(  # type: ignore[union-attr]
            "SELECT member_id, payload::text AS payload FROM engagement.sends"
            " WHERE journey_id LIKE $1",
            f"render-%-{t}",
        )
        return len(rows) == 3 and all(r["member_id"] is None and r["payload"] == "{}" for r in rows)

    assert await eventually(wiped, timeout=15)


async def test_the_nickname_set_at_member_reaches_engagement(
    member_app: ServiceApp, engagement_app: ServiceApp, member_channel: grpc.aio.Channel
) -> None:
    """member's own code path: UpdateProfile(nickname) announces NicknameSet."""
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    member = (await identify(stub, ident(CARD, f"nick-{tag()}"))).member.member_id

    async def nickname() -> str | None:
        row = await engagement_app.db.pool.fetchrow(  # type: ignore[union-attr]
            "SELECT nickname FROM engagement.member_facts WHERE member_id = $1",
            uuid.UUID(member),
        )
        return row["nickname"] if row is not None else None

    await stub.UpdateProfile(
        pb.UpdateProfileRequest(member_id=member, nickname="Lin", source="mini-program")
    )
    assert await eventually(lambda: _is(nickname, "Lin"), timeout=15)
    await stub.UpdateProfile(
        pb.UpdateProfileRequest(member_id=member, nickname="", source="mini-program")
    )
    assert await eventually(lambda: _is(nickname, ""), timeout=15)


async def _is(read: Any, want: str) -> bool:
    return bool(await read() == want)


async def test_a_member_joining_a_community_enters_a_journey_on_community_joined(
    infra: Infra, engagement_app: ServiceApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """guides' CommunityJoined, as guides emits it, enters a community_joined
    journey with the group's store and audience (before, engagement did not
    subscribe to it and the event was not a journey entry)."""
    assert engagement_app.db is not None
    handlers: Any = getattr(engagement_app, "handlers")  # noqa: B009 (EngagementApp)
    monkeypatch.setattr(handlers, "stores", _Stores())
    t = tag()
    doc = json.loads(
        _journey(
            f"render-community-{t}",
            "community_joined",
            "app_push",
            title="Welcome",
            body="Welcome to the {store_name} group",
        )
    )
    doc["entry"]["where"] = {"audience": "vip"}
    async with engagement_app.db.unit_of_work() as uow:
        await handlers.publish(uow, json.dumps(doc))
    joined, general = str(uuid.uuid4()), str(uuid.uuid4())
    for m in (joined, general):
        await publish(infra, "member", events_pb2.MemberRegistered(member_id=m, source="pos"), m)
    # In stream order: the general group's join is consumed before the vip one.
    for m, audience in ((general, "general"), (joined, "vip")):
        event = events_pb2.CommunityJoined(
            member_id=m, chat_id=f"wr-{t}", store_id="SH-RENDER", audience=audience
        )
        await publish(infra, "guides", event, m)
    sends = await eventually(lambda: _payloads(engagement_app, joined, 1), timeout=20)
    payload, _ = sends["render-community"]
    assert payload["body"] == "Welcome to the Jing'an Temple group"
    # The entry's where: the member who joined the general group (consumed
    # first) did not enter.
    entered = await engagement_app.db.pool.fetchval(
        "SELECT count(*) FROM engagement.enrollments WHERE member_id = $1 AND journey_id = $2",
        uuid.UUID(general),
        f"render-community-{t}",
    )
    assert entered == 0
