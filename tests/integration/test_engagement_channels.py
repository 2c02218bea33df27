"""Channel sends through the real provider code against the local provider fakes
(devtools/provider_fakes): WeChat subscribe messages (shared token, refreshed
once across replicas, 43101, rate limits), WeCom tasks and their results,
Aliyun SMS (signature, per-phone guard, delivery reports applied once), app
push, and the at-most-once rule for uncertain outcomes (time-out, dropped
connection, a dispatcher killed mid-call), on the real schema with a
controllable clock."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from devtools.provider_fakes.stack import FakeStack, build_stack
from servicekit.db import Database
from servicekit.errors import InvalidArgument
from services.engagement import cli
from services.engagement import facts_repository as facts_repo
from services.engagement import scheduler_repository as scheduler_repo
from services.engagement.channels import Dispatcher
from services.engagement.domain import FakeClock, QuietHours
from services.engagement.ports import LocalConsent
from services.engagement.providers import TokenError, build_providers
from services.engagement.scheduler import Scheduler
from services.engagement.settings import EngagementSettings
from services.engagement.wecom_results import WeComResults
from tests.harness import Infra

from .test_engagement_journeys import ALL, Env, _pause_all, _Stores, db, make_env

__all__ = ["db"]

# The WeCom userid of the staff member who is the test members' exclusive guide.
GUIDE = "guide-li"
# Wednesday 2030-07-03 11:00 in Shanghai: no quiet hours.
NOON = datetime(2030, 7, 3, 3, 0, tzinfo=UTC)


@dataclass
class Rig:
    env: Env
    fakes: FakeStack
    redis: Redis
    namespace: str
    settings: EngagementSettings
    clients: list[httpx.AsyncClient]

    def dispatcher(self, timeout: float = 5.0, **kw: Any) -> Dispatcher:
        """One replica: its own HTTP client and token caches, the shared Redis."""
        client = httpx.AsyncClient(timeout=timeout)
        self.clients.append(client)
        providers = build_providers(self.settings, client, self.redis, self.env.clock)
        return Dispatcher(self.env.db, self.env.clock, providers, {}, batch_size=500, **kw)

    async def journey(
        self, name: str, channel: str, entry: str = "check_in", **content: Any
    ) -> None:
        content.setdefault("template", f"{name}-template")
        await self.env.publish(
            {
                "id": name,
                "priority": 50,
                "entry": {"event": entry},
                "start": "s",
                "steps": {
                    "s": {
                        "type": "send",
                        "channel": channel,
                        "class": "transactional",
                        "next": "end",
                        **content,
                    },
                    "end": {"type": "exit"},
                },
            }
        )

    async def member(
        self,
        openid: str = "",
        template: str = "",
        phone: str = "",
        event: str = "check_in",
        **attrs: str,
    ) -> str:
        m = str(uuid.uuid4())
        async with self.env.db.unit_of_work() as uow:
            await self.env.handlers.ingest(uow, "member_registered", m, {})
            await self.env.handlers.set_consent(uow, m, ALL, True, "test")
            if openid:
                await self.env.handlers.ingest(
                    uow, "subscription_tap", m, {"template": template, "openid": openid}
                )
            if phone:  # what member would answer; here a stored address
                await facts_repo.set_address(uow.conn, uuid.UUID(m), "sms", phone)
        await self.env.event(event, m, **attrs)
        await self.env.scheduler.run_until_idle()
        return m

    async def wecom_member(self, external: str, guide: str = "") -> str:
        """A consenting member with a WeCom contact id and (when given) an
        exclusive guide, as guides' GuideBound leaves it (facts_repo.set_guide)."""
        m = str(uuid.uuid4())
        async with self.env.db.unit_of_work() as uow:
            await self.env.handlers.ingest(uow, "member_registered", m, {})
            await self.env.handlers.set_consent(uow, m, ALL, True, "test")
            await facts_repo.set_address(uow.conn, uuid.UUID(m), "wecom", external)
            if guide:
                await facts_repo.set_guide(uow.conn, uuid.UUID(m), guide)
        return m

    async def send_row(self, member: str) -> dict[str, Any]:
        row = await self.env.db.pool.fetchrow(
            "SELECT send_key, status, reason, error_code, provider_ref, attempts,"
            " next_attempt_at, receipt_at FROM engagement.sends WHERE member_id = $1",
            uuid.UUID(member),
        )
        assert row is not None
        return dict(row)


@pytest.fixture
async def rig(db: Database, infra: Infra) -> AsyncIterator[Rig]:
    await _pause_all(db)
    clock = FakeClock(NOON)
    fakes = build_stack(clock=lambda: clock.now().timestamp())
    fakes.wechat.faults.slow_seconds = 1.0
    await fakes.server.start()
    namespace = f"{infra.namespace}:channels:{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(infra.redis_url)
    settings = EngagementSettings(
        **{
            **fakes.settings(),
            "redis_namespace": namespace,
            "redis_url": infra.redis_url,
            "sms_phone_limits": "1/60,2/3600",
        }
    )
    rig = Rig(make_env(db, clock, QuietHours()), fakes, redis, namespace, settings, [])
    yield rig
    for c in rig.clients:
        await c.aclose()
    await redis.aclose()
    await fakes.server.stop()
    await _pause_all(db)


EXPIRING = "points_expiring_soon"
# As server.py maps rewards' PointsExpiringSoon: an instant, rendered as the
# date in the member's zone (Shanghai: 2030-07-31).
EXPIRY = {"event": EXPIRING, "expires_at": "2030-07-30T16:00:00+00:00"}
MP = {
    "template": "tmpl-points-expiring",
    "data": {"thing1": "Points expiring", "number2": "{points}", "date3": "{points_expire_on}"},
    "page": "pages/points/index?from=journey",
}


async def test_token_expiry_mid_run_two_replicas_refresh_it_once(rig: Rig) -> None:
    await rig.journey("mp-expiry", "miniprogram", entry=EXPIRING, **MP)
    members = []
    for _ in range(12):
        openid = f"o-{uuid.uuid4().hex[:10]}"
        rig.fakes.wechat.grant(openid, "tmpl-points-expiring")
        members.append(await rig.member(openid, "tmpl-points-expiring", **EXPIRY, points="120"))
    first, rest = members[0], members[1:]
    # Replica A sends one message: the first token is fetched.
    a, b = rig.dispatcher(), rig.dispatcher()
    await rig.env.db.pool.execute(
        "UPDATE engagement.sends SET next_attempt_at = $2 WHERE member_id <> $1"
        " AND status = 'pending' AND journey_id = $3",
        uuid.UUID(first),
        NOON + timedelta(seconds=1),
        rig.env.jid("mp-expiry"),
    )
    await a.dispatch_once()
    assert (await rig.send_row(first))["status"] == "delivered"
    assert rig.fakes.wechat.wechat.stable_token_requests == 1
    sent = rig.fakes.wechat.sent[-1]
    assert sent["data"] == {
        "thing1": {"value": "Points expiring"},
        "number2": {"value": "120"},
        "date3": {"value": "2030-07-31"},
    }
    assert sent["page"] == "pages/points/index?from=journey"
    assert sent["miniprogram_state"] == "formal"
    # The token expires at WeChat; both replicas hit 42001 in the same instant.
    token = next(iter(rig.fakes.wechat.wechat._tokens))
    rig.fakes.wechat.wechat.expire_token(token)
    rig.env.clock.advance(timedelta(seconds=2))
    # Each replica leases its own half (SKIP LOCKED), concurrently.
    a._batch = b._batch = 6
    await asyncio.gather(a.dispatch_once(), b.dispatch_once())
    statuses = [(await rig.send_row(m))["status"] for m in rest]
    assert statuses == ["delivered"] * len(rest)
    # One refresh for both replicas and all their concurrent sends.
    assert rig.fakes.wechat.wechat.stable_token_requests == 2
    assert len(rig.fakes.wechat.sent) == 12


async def test_no_credit_at_wechat_marks_no_credit_and_consumes_nothing(rig: Rig) -> None:
    await rig.journey("mp-credit", "miniprogram", entry=EXPIRING, **MP)
    openid = f"o-{uuid.uuid4().hex[:10]}"  # never granted at the fake: WeChat says 43101
    m = await rig.member(openid, "tmpl-points-expiring", **EXPIRY, points="5")
    await rig.dispatcher().dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["error_code"]) == ("no_credit", "43101")
    assert rig.fakes.wechat.sent == []
    credits = await rig.env.db.pool.fetchval(
        "SELECT credits FROM engagement.subscription_credits WHERE member_id = $1",
        uuid.UUID(m),
    )
    assert credits == 0


async def test_rate_limited_sends_back_off_then_go(rig: Rig) -> None:
    await rig.journey("mp-rate", "miniprogram", entry=EXPIRING, **MP)
    openid = f"o-{uuid.uuid4().hex[:10]}"
    rig.fakes.wechat.grant(openid, "tmpl-points-expiring")
    m = await rig.member(openid, "tmpl-points-expiring", **EXPIRY, points="5")
    rig.fakes.wechat.faults.add("rate_limit")
    d = rig.dispatcher()
    await d.dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["error_code"]) == ("pending", "45009")
    assert row["next_attempt_at"] == NOON + timedelta(seconds=5)
    await d.dispatch_once()  # not due yet
    assert (await rig.send_row(m))["attempts"] == 1
    rig.env.clock.advance(timedelta(seconds=5))
    await d.dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["attempts"]) == ("delivered", 2)
    assert len(rig.fakes.wechat.sent) == 1


@pytest.mark.parametrize("fault", ["slow", "drop"])
async def test_an_uncertain_outcome_is_unknown_and_never_resent(rig: Rig, fault: str) -> None:
    await rig.journey(
        f"push-{fault}", "app_push", entry=EXPIRING, title="Hi", body="Your points: {points}"
    )
    rig.fakes.push.faults.slow_seconds = 1.0
    rig.fakes.push.faults.add(fault)
    m = await rig.member(event=EXPIRING, points="42")
    d = rig.dispatcher(timeout=0.3)
    await d.dispatch_once()
    row = await rig.send_row(m)
    assert row["status"] == "unknown"
    assert row["error_code"] in ("ReadTimeout", "RemoteProtocolError")
    # The provider did take it: resending would have sent it twice.
    assert [s["body"] for s in rig.fakes.push.sent] == ["Your points: 42"]
    rig.env.clock.advance(timedelta(days=1))
    while await d.dispatch_once():
        pass
    assert (await rig.send_row(m))["status"] == "unknown"
    assert len(rig.fakes.push.sent) == 1
    # Operators see it.
    unknown = await scheduler_repo.unknown_sends(
        rig.env.db.pool, rig.env.jid(f"push-{fault}"), None, 10
    )
    assert [u.send_key for u in unknown] == [row["send_key"]]


async def test_a_channel_configured_to_resend_uncertain_outcomes_does(rig: Rig) -> None:
    await rig.journey("push-resend", "app_push", title="Hi", body="Hello")
    rig.fakes.push.faults.add("drop")
    m = await rig.member()
    d = rig.dispatcher(resend_unknown=frozenset({"app_push"}))
    await d.dispatch_once()
    assert (await rig.send_row(m))["status"] == "pending"
    rig.env.clock.advance(timedelta(seconds=5))
    await d.dispatch_once()
    assert (await rig.send_row(m))["status"] == "delivered"
    assert len(rig.fakes.push.sent) == 2  # the price of resending: twice


async def test_a_dispatcher_killed_mid_call_leaves_the_send_unknown(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.journey("push-crash", "app_push", title="Hi", body="Hello")
    m = await rig.member()
    d = rig.dispatcher()
    real = scheduler_repo.record_outcomes

    async def die(*args: Any) -> None:
        raise asyncio.CancelledError  # killed after the provider answered

    monkeypatch.setattr(scheduler_repo, "record_outcomes", die)
    with pytest.raises(asyncio.CancelledError):
        await d.dispatch_once()
    monkeypatch.setattr(scheduler_repo, "record_outcomes", real)
    assert (await rig.send_row(m))["status"] == "sending"
    rig.env.clock.advance(timedelta(minutes=2))  # the lease runs out
    await d.dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["reason"]) == ("unknown", "LEASE_EXPIRED")
    while await d.dispatch_once():
        pass
    assert len(rig.fakes.push.sent) == 1


async def test_consent_withdrawn_between_pending_and_delivery_sends_nothing(rig: Rig) -> None:
    await rig.journey("sms-consent", "sms", template="SMS_OFFER", params={})
    m = await rig.member(phone="13900000001")
    assert (await rig.send_row(m))["status"] == "pending"
    async with rig.env.db.unit_of_work() as uow:
        await facts_repo.set_consent(
            uow.conn, uuid.UUID(m), ["sms"], False, "test", rig.env.clock.now()
        )
    await rig.dispatcher().dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["reason"]) == ("suppressed", "NO_CONSENT")
    assert rig.fakes.sms.requests == 0


async def test_sms_is_signed_accepted_then_settled_once_by_its_report(rig: Rig) -> None:
    await rig.journey(
        "sms-points",
        "sms",
        entry=EXPIRING,
        template="SMS_POINTS_EXPIRING",
        params={"points": "{points}"},
    )
    m = await rig.member(phone="13900000002", event=EXPIRING, points="300")
    await rig.dispatcher().dispatch_once()
    row = await rig.send_row(m)
    accepted = rig.fakes.sms.accepted[-1]
    # The fake checked the signature, timestamp and nonce before accepting.
    assert (row["status"], row["provider_ref"]) == ("sending", accepted.biz_id)
    assert (accepted.out_id, accepted.params) == (row["send_key"], {"points": "300"})
    report = rig.fakes.sms.report(accepted)
    receipt = scheduler_repo.Receipt(report["out_id"], report["biz_id"], report["success"])
    now = rig.env.clock.now()
    async with rig.env.db.unit_of_work() as uow:
        assert await scheduler_repo.apply_receipts(uow.conn, [receipt], now) == 1
    async with rig.env.db.unit_of_work() as uow:  # the provider pushes it again
        assert await scheduler_repo.apply_receipts(uow.conn, [receipt], now) == 0
    row = await rig.send_row(m)
    assert (row["status"], row["receipt_at"]) == ("delivered", now)


async def test_sms_per_phone_guard_holds_the_second_message_before_calling(rig: Rig) -> None:
    await rig.journey("sms-guard", "sms", template="SMS_OFFER", params={})
    await rig.journey("sms-guard2", "sms", template="SMS_OFFER", params={})
    m = str(uuid.uuid4())
    async with rig.env.db.unit_of_work() as uow:
        await rig.env.handlers.ingest(uow, "member_registered", m, {})
        await rig.env.handlers.set_consent(uow, m, ALL, True, "test")
        await facts_repo.set_address(uow.conn, uuid.UUID(m), "sms", "13900000003")
    await rig.env.event("check_in", m)
    await rig.env.scheduler.run_until_idle()
    d = rig.dispatcher()
    await d.dispatch_once()
    rows = await rig.env.db.pool.fetch(
        "SELECT status, reason, next_attempt_at FROM engagement.sends WHERE member_id = $1"
        " ORDER BY status",
        uuid.UUID(m),
    )
    assert [r["status"] for r in rows] == ["pending", "sending"]
    # 1 a minute: the next minute's start, and the provider never saw it.
    assert rows[0]["reason"] == "PHONE_RATE_LIMITED"
    assert rows[0]["next_attempt_at"] == NOON + timedelta(minutes=1)
    assert rig.fakes.sms.requests == 1


async def test_a_receipt_of_failure_records_the_carrier_code(rig: Rig) -> None:
    await rig.journey("sms-fail", "sms", template="SMS_OFFER", params={})
    m = await rig.member(phone="13900000004")
    await rig.dispatcher().dispatch_once()
    report = rig.fakes.sms.report(rig.fakes.sms.accepted[-1], success=False, err_code="MK:0001")
    async with rig.env.db.unit_of_work() as uow:
        receipt = scheduler_repo.Receipt(report["out_id"], report["biz_id"], False, "MK:0001")
        await scheduler_repo.apply_receipts(uow.conn, [receipt], rig.env.clock.now())
    row = await rig.send_row(m)
    assert (row["status"], row["error_code"]) == ("failed", "MK:0001")


async def test_sms_provider_refusals_fail_with_their_code(rig: Rig) -> None:
    await rig.journey("sms-bad", "sms", template="SMS_NOT_REGISTERED", params={})
    m = await rig.member(phone="13900000005")
    await rig.dispatcher().dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["error_code"]) == ("failed", "isv.SMS_TEMPLATE_ILLEGAL")


async def test_wecom_task_keeps_its_msgid_and_its_result_is_readable(rig: Rig) -> None:
    await rig.journey(
        "wecom-task",
        "wecom",
        template="cart",
        text="Hi, your {tier:16} perks are waiting",
        miniprogram={
            "title": "Open",
            "appid": "wxfakeapp0001",
            "page": "pages/index",
            "pic_media_id": "MEDIA1",
        },
    )
    customer, stranger = f"wm-{uuid.uuid4().hex[:8]}", f"wm-{uuid.uuid4().hex[:8]}"
    rig.fakes.wecom.add_customer(customer, GUIDE)
    members = []
    for external in (customer, stranger):
        m = await rig.wecom_member(external, GUIDE)
        async with rig.env.db.unit_of_work() as uow:
            await rig.env.handlers.ingest(uow, "tier_changed", m, {"to_tier": "GOLD"})
        await rig.env.event("check_in", m)
        members.append(m)
    await rig.env.scheduler.run_until_idle()
    rig.fakes.wecom.faults.add("expired_token")  # the first call finds its token expired
    d = rig.dispatcher()
    await d.dispatch_once()
    ok, refused = [await rig.send_row(m) for m in members]
    # A task exists; the staff member has not sent it: not delivered yet.
    assert (ok["status"], ok["reason"]) == ("sending", "TASK_CREATED")
    assert ok["provider_ref"].startswith("msg")
    assert (refused["status"], refused["error_code"]) == ("failed", "FAIL_LIST")
    task = rig.fakes.wecom.tasks[ok["provider_ref"]]["body"]
    assert task["text"] == {"content": "Hi, your GOLD perks are waiting"}
    assert task["attachments"][0]["miniprogram"]["page"] == "pages/index"
    assert task["sender"] == GUIDE
    wecom = d.providers["wecom"]
    results = await wecom.task_results(ok["provider_ref"])  # type: ignore[attr-defined]
    assert [(r["external_userid"], r["status"]) for r in results] == [(customer, 0)]
    rig.fakes.wecom.confirm(ok["provider_ref"])
    results = await wecom.task_results(ok["provider_ref"])  # type: ignore[attr-defined]
    assert [(r["userid"], r["status"]) for r in results] == [(GUIDE, 1)]


async def test_a_template_the_event_cannot_fill_fails_when_written(rig: Rig) -> None:
    await rig.journey(
        "push-missing", "app_push", entry=EXPIRING, title="Hi", body="Points: {points}"
    )
    m = await rig.member(event=EXPIRING)  # this one carries no points
    row = await rig.send_row(m)
    assert (row["status"], row["error_code"]) == ("failed", "MISSING_VARIABLE")


async def test_app_push_with_a_wrong_token_fails_visibly(rig: Rig) -> None:
    await rig.journey("push-auth", "app_push", title="Hi", body="Hello")
    m = await rig.member()
    rig.fakes.push.token = "rotated"
    await rig.dispatcher().dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["error_code"]) == ("failed", "HTTP_401")


async def test_publishing_an_over_long_thing_is_refused_naming_the_field(rig: Rig) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await rig.journey(
            "mp-long",
            "miniprogram",
            template="tmpl-offer",
            data={"thing1": "A much too long description of the offer", "date2": "{today}"},
        )
    assert caught.value.code == "TEMPLATE_VALUE_TOO_LONG"
    assert caught.value.field == "definition.steps.s.data.thing1"
    published = await rig.env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.journeys WHERE journey_id = $1", rig.env.jid("mp-long")
    )
    assert published == 0


async def test_an_accepted_sms_without_a_report_becomes_unknown_at_the_cutoff(rig: Rig) -> None:
    await rig.journey("sms-silent", "sms", template="SMS_OFFER", params={})
    m = await rig.member(phone="13900000006")
    d = rig.dispatcher(receipt_cutoff=timedelta(hours=72), resend_unknown=frozenset({"sms"}))
    await d.dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["reason"]) == ("sending", "ACCEPTED")
    assert row["next_attempt_at"] == NOON + timedelta(hours=72)
    rig.env.clock.advance(timedelta(hours=72) - timedelta(seconds=1))
    await d.dispatch_once()  # still within the provider's report window
    assert (await rig.send_row(m))["status"] == "sending"
    rig.env.clock.advance(timedelta(seconds=1))
    await d.dispatch_once()
    row = await rig.send_row(m)
    # Unknown even on a channel that resends uncertain calls: the provider took it.
    assert (row["status"], row["reason"], row["next_attempt_at"]) == ("unknown", "NO_RECEIPT", None)
    rig.env.clock.advance(timedelta(days=1))
    while await d.dispatch_once():
        pass
    assert [a.out_id for a in rig.fakes.sms.accepted if a.phone == "13900000006"] == [
        row["send_key"]
    ]
    # Counted and listed for operators like other unknown sends.
    counts = await scheduler_repo.send_counts(rig.env.db.pool, rig.env.jid("sms-silent"))
    assert [(c.status, c.count) for c in counts] == [("unknown", 1)]
    unknown = await scheduler_repo.unknown_sends(
        rig.env.db.pool, rig.env.jid("sms-silent"), None, 10
    )
    assert [(u.send_key, u.reason) for u in unknown] == [(row["send_key"], "NO_RECEIPT")]
    # A report that comes late still says what happened.
    accepted = next(a for a in rig.fakes.sms.accepted if a.out_id == row["send_key"])
    report = rig.fakes.sms.report(accepted)
    receipt = scheduler_repo.Receipt(report["out_id"], report["biz_id"], report["success"])
    async with rig.env.db.unit_of_work() as uow:
        assert await scheduler_repo.apply_receipts(uow.conn, [receipt], rig.env.clock.now()) == 1
    assert (await rig.send_row(m))["status"] == "delivered"


async def test_a_credit_wechat_voided_after_the_send_was_written_is_no_credit_uncalled(
    rig: Rig,
) -> None:
    await rig.journey("mp-void-a", "miniprogram", entry=EXPIRING, **MP)
    await rig.journey("mp-void-b", "miniprogram", entry=EXPIRING, **MP)
    template = "tmpl-points-expiring"
    members, openids = [], []
    for _ in range(2):
        openid = f"o-{uuid.uuid4().hex[:10]}"  # at WeChat: no credit (the taps were used)
        m = str(uuid.uuid4())
        async with rig.env.db.unit_of_work() as uow:
            await rig.env.handlers.ingest(uow, "member_registered", m, {})
            await rig.env.handlers.set_consent(uow, m, ALL, True, "test")
            for _ in range(2):  # two taps counted here: one credit for each journey
                await rig.env.handlers.ingest(
                    uow, "subscription_tap", m, {"template": template, "openid": openid}
                )
        await rig.env.event(EXPIRING, m, expires_at=EXPIRY["expires_at"], points="5")
        members.append(m)
        openids.append(openid)
    await rig.env.scheduler.run_until_idle()
    # Journey b's sends wait a second; both sends of each member hold a credit.
    await rig.env.db.pool.execute(
        "UPDATE engagement.sends SET next_attempt_at = $2 WHERE journey_id = $1",
        rig.env.jid("mp-void-b"),
        NOON + timedelta(seconds=1),
    )
    d = rig.dispatcher()
    while await d.dispatch_once():
        pass
    for m in members:
        rows = await rig.env.db.pool.fetch(
            "SELECT journey_id, status, error_code FROM engagement.sends WHERE member_id = $1"
            " ORDER BY journey_id",
            uuid.UUID(m),
        )
        assert [(r["status"], r["error_code"]) for r in rows] == [
            ("no_credit", "43101"),
            ("pending", ""),
        ]
    # The second member taps again (a fresh credit, here and at WeChat).
    async with rig.env.db.unit_of_work() as uow:
        await rig.env.handlers.ingest(
            uow, "subscription_tap", members[1], {"template": template, "openid": openids[1]}
        )
    rig.fakes.wechat.grant(openids[1], template)
    calls = rig.fakes.wechat.send_requests
    rig.env.clock.advance(timedelta(seconds=1))
    await d.dispatch_once()
    voided, retapped = [
        await rig.env.db.pool.fetchrow(
            "SELECT status, reason FROM engagement.sends WHERE member_id = $1 AND journey_id = $2",
            uuid.UUID(m),
            rig.env.jid("mp-void-b"),
        )
        for m in members
    ]
    # The first member's credit was voided by WeChat's 43101: no call at all.
    assert (voided["status"], voided["reason"]) == ("no_credit", "CREDIT_VOIDED")
    assert retapped["status"] == "delivered"
    assert rig.fakes.wechat.send_requests == calls + 1
    assert [s["touser"] for s in rig.fakes.wechat.sent] == [openids[1]]
    left = await rig.env.db.pool.fetchval(
        "SELECT credits FROM engagement.subscription_credits WHERE member_id = $1",
        uuid.UUID(members[1]),
    )
    assert left == 0


async def test_wecom_sends_are_settled_by_what_the_staff_member_did(rig: Rig) -> None:
    await rig.journey("wecom-settle", "wecom", template="hello", text="Hello")
    members, contacts = [], []
    for _ in range(3):
        external = f"wm-{uuid.uuid4().hex[:8]}"
        rig.fakes.wecom.add_customer(external, GUIDE)
        m = await rig.wecom_member(external, GUIDE)
        await rig.env.event("check_in", m)
        members.append(m)
        contacts.append(external)
    await rig.env.scheduler.run_until_idle()
    d = rig.dispatcher()
    await d.dispatch_once()
    rows = [await rig.send_row(m) for m in members]
    assert {(r["status"], r["reason"]) for r in rows} == {("sending", "TASK_CREATED")}
    results = WeComResults(
        rig.env.db,
        rig.env.clock,
        d.providers["wecom"],  # type: ignore[arg-type]
        task_life=timedelta(hours=24),
        poll=timedelta(minutes=10),
    )
    # Nobody pressed send yet: every send waits, to be read again in 10 minutes.
    await results.settle_once()
    rows = [await rig.send_row(m) for m in members]
    assert [r["status"] for r in rows] == ["sending"] * 3
    assert {r["next_attempt_at"] for r in rows} == {NOON + timedelta(minutes=10)}
    # The dispatcher's lease sweep leaves a waiting task alone.
    rig.env.clock.advance(timedelta(minutes=10))
    await d.dispatch_once()
    assert [(await rig.send_row(m))["status"] for m in members] == ["sending"] * 3
    # The staff member sends the first; WeCom says the second is not their friend.
    rig.fakes.wecom.confirm(rows[0]["provider_ref"])
    rig.fakes.wecom.set_status(rows[1]["provider_ref"], contacts[1], 2)
    await results.settle_once()
    first, second, third = [await rig.send_row(m) for m in members]
    assert (first["status"], first["reason"]) == ("delivered", "SENT_BY_STAFF")
    assert (second["status"], second["error_code"]) == ("failed", "NOT_A_FRIEND")
    assert third["status"] == "sending"
    # The third is never sent within the task's life.
    rig.env.clock.advance(timedelta(hours=24))
    while await results.settle_once():
        pass
    third = await rig.send_row(members[2])
    assert (third["status"], third["error_code"]) == ("failed", "NOT_SENT_BY_STAFF")
    # A settled send is not read or changed again.
    rig.fakes.wecom.confirm(third["provider_ref"])
    rig.env.clock.advance(timedelta(hours=1))
    while await results.settle_once():
        pass
    assert (await rig.send_row(members[2]))["status"] == "failed"
    # Operators see the per-journey outcome on the sends route.
    async with rig.env.db.unit_of_work() as uow:
        counts = await rig.env.handlers.journey_sends(uow, rig.env.jid("wecom-settle"))
    assert sorted((c.status, c.error_code, c.count) for c in counts) == [
        ("delivered", "", 1),
        ("failed", "NOT_A_FRIEND", 1),
        ("failed", "NOT_SENT_BY_STAFF", 1),
    ]


async def test_the_wecom_results_command_settles_due_tasks(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    await rig.journey("wecom-cli", "wecom", template="hello", text="Hello")
    external = f"wm-{uuid.uuid4().hex[:8]}"
    rig.fakes.wecom.add_customer(external, GUIDE)
    m = await rig.wecom_member(external, GUIDE)
    await rig.env.event("check_in", m)
    await rig.env.scheduler.run_until_idle()
    await rig.dispatcher().dispatch_once()
    row = await rig.send_row(m)
    rig.fakes.wecom.confirm(row["provider_ref"])
    assert await cli._wecom_results(rig.settings, rig.env.db, rig.env.clock) == 0
    assert '"read": ' in capsys.readouterr().out
    row = await rig.send_row(m)
    assert (row["status"], row["reason"]) == ("delivered", "SENT_BY_STAFF")


async def test_a_wecom_send_goes_from_the_members_guide_and_is_read_per_sender(
    rig: Rig,
) -> None:
    """WeCom reads a task's results per sender: the send goes from the member's
    exclusive guide (not one global WECOM_SENDER, who is not this customer's
    staff member: fail_list), and its result is read through get_groupmsg_task's
    senders, each asked get_groupmsg_send_result with their userid."""
    await rig.journey("wecom-guide", "wecom", template="hello", text="Hello")
    other = "guide-zhao"
    mine, theirs = f"wm-{uuid.uuid4().hex[:8]}", f"wm-{uuid.uuid4().hex[:8]}"
    rig.fakes.wecom.add_customer(mine, GUIDE)
    rig.fakes.wecom.add_customer(theirs, other)
    members = [await rig.wecom_member(mine, GUIDE), await rig.wecom_member(theirs, other)]
    for m in members:
        await rig.env.event("check_in", m)
    await rig.env.scheduler.run_until_idle()
    d = rig.dispatcher()
    await d.dispatch_once()
    rows = [await rig.send_row(m) for m in members]
    assert [(r["status"], r["reason"]) for r in rows] == [("sending", "TASK_CREATED")] * 2
    tasks = [rig.fakes.wecom.tasks[r["provider_ref"]] for r in rows]
    assert [t["body"]["sender"] for t in tasks] == [GUIDE, other]
    assert [sorted(t["senders"]) for t in tasks] == [[GUIDE], [other]]
    # WeCom answers a result only for a named sender.
    wecom = d.providers["wecom"]
    with pytest.raises(TokenError) as caught:
        await wecom.send_result(rows[0]["provider_ref"], "")  # type: ignore[attr-defined]
    assert caught.value.code == "40003"
    assert await wecom.task_senders(rows[1]["provider_ref"]) == [other]  # type: ignore[attr-defined]
    rig.fakes.wecom.confirm(rows[0]["provider_ref"], GUIDE)
    rig.fakes.wecom.confirm(rows[1]["provider_ref"], other)
    results = WeComResults(rig.env.db, rig.env.clock, wecom)  # type: ignore[arg-type]
    await results.settle_once()
    rows = [await rig.send_row(m) for m in members]
    assert [(r["status"], r["reason"]) for r in rows] == [("delivered", "SENT_BY_STAFF")] * 2


async def test_a_member_without_a_guide_goes_from_wecom_sender_and_with_neither_fails(
    rig: Rig,
) -> None:
    await rig.journey("wecom-fallback", "wecom", template="hello", text="Hello")
    contact = f"wm-{uuid.uuid4().hex[:8]}"
    rig.fakes.wecom.add_customer(contact, "fallback-staff")
    # WECOM_SENDER empty and no guide: nobody can send it; failed when written.
    bare = Scheduler(
        rig.env.db, rig.env.clock, LocalConsent(), QuietHours(), rig.env.journeys, wecom_sender=""
    )
    lonely = await rig.wecom_member(contact)
    await rig.env.event("check_in", lonely)
    await bare.run_until_idle()
    row = await rig.send_row(lonely)
    assert (row["status"], row["error_code"]) == ("failed", "NO_WECOM_SENDER")
    # With WECOM_SENDER (the rig's scheduler: "fallback-staff") it goes from them.
    m = await rig.wecom_member(contact)
    await rig.env.event("check_in", m)
    await rig.env.scheduler.run_until_idle()
    await rig.dispatcher().dispatch_once()
    row = await rig.send_row(m)
    assert (row["status"], row["reason"]) == ("sending", "TASK_CREATED")
    assert rig.fakes.wecom.tasks[row["provider_ref"]]["body"]["sender"] == "fallback-staff"


async def test_a_check_in_at_a_store_names_the_store_as_rewards_knows_it(rig: Rig) -> None:
    rig.env.handlers.stores = _Stores({"SH001": "Asia/Shanghai"})
    await rig.journey("push-store", "app_push", title="Hi", body="Welcome to {store_name}")
    m = await rig.member(store_id="SH001")
    payload = await rig.env.db.pool.fetchval(
        "SELECT payload::text FROM engagement.sends WHERE member_id = $1", uuid.UUID(m)
    )
    assert json.loads(payload)["body"] == "Welcome to Store SH001"
