"""SMS and WeCom sends get their address from the member service at send time:
the phone / external_userid reach the provider, every read is in member's
pii_access_log with the send key as purpose, and engagement stores none of it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import grpc
import httpx
import pytest
from redis.asyncio import Redis

from devtools.provider_fakes.stack import build_stack
from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.db import Database, asyncpg_dsn
from servicekit.server import ServiceApp
from services.engagement import facts_repository as facts_repo
from services.engagement.channels import Delivery, Dispatcher
from services.engagement.domain import FakeClock, QuietHours
from services.engagement.ports import MemberAddresses
from services.engagement.providers import build_providers
from services.engagement.settings import EngagementSettings
from tests.harness import Infra

from .test_engagement_journeys import ALL, Env, _pause_all, db, make_env, send
from .test_member_oneid import PHONE, ident, identify, mobile, tag

__all__ = ["db"]  # the module-scoped pool fixture, shared with the journeys tests

# Tuesday 2030-06-04 10:00 in Shanghai: no quiet hours.
NOON = datetime(2030, 6, 4, 2, 0, tzinfo=UTC)
WECOM = pb.IDENTIFIER_TYPE_WECOM_EXTERNAL_USERID


@pytest.fixture
async def env(db: Database) -> AsyncIterator[Env]:
    await _pause_all(db)
    yield make_env(db, FakeClock(NOON), QuietHours())
    await _pause_all(db)


@pytest.fixture
async def member_stub(member_app: ServiceApp) -> AsyncIterator[member_pb2_grpc.MemberServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{member_app.port}") as channel:
        yield member_pb2_grpc.MemberServiceStub(channel)


@pytest.fixture
async def addresses(member_app: ServiceApp) -> AsyncIterator[MemberAddresses]:
    port = MemberAddresses(f"127.0.0.1:{member_app.port}", 5.0)
    yield port
    await port.close()


async def enrolled_member(
    env: Env, stub: member_pb2_grpc.MemberServiceStub, *idents: pb.Identifier
) -> str:
    member = (await identify(stub, *idents)).member.member_id
    async with env.db.unit_of_work() as uow:
        await env.handlers.ingest(uow, "member_registered", member, {})
        await env.handlers.set_consent(uow, member, ALL, True, "test")
    return member


async def audit(infra: Infra, member: str) -> list[tuple[str, str, list[str]]]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        rows = await conn.fetch(
            "SELECT accessor, purpose, fields FROM member.pii_access_log WHERE member_id = $1"
            " ORDER BY id",
            uuid.UUID(member),
        )
    finally:
        await conn.close()
    return [(r["accessor"], r["purpose"], list(r["fields"])) for r in rows]


async def test_sms_and_wecom_sends_read_the_address_from_member_audited(
    env: Env,
    infra: Infra,
    member_stub: member_pb2_grpc.MemberServiceStub,
    addresses: MemberAddresses,
) -> None:
    await env.publish(
        {
            "id": "reach",
            "priority": 50,
            "entry": {"event": "cart_abandoned"},
            "start": "sms",
            "steps": {
                "sms": send("sms", "SMS_OFFER", "wecom", cls="transactional", channel="sms"),
                "wecom": send("wecom", "cart-wecom", "end", cls="transactional"),
                "end": {"type": "exit"},
            },
        }
    )
    phone = mobile()
    external = f"wm-{tag()}"
    member = await enrolled_member(
        env, member_stub, ident(PHONE, phone, verified=True), ident(WECOM, external)
    )
    async with env.db.unit_of_work() as uow:  # guides' GuideBound: the WeCom sender
        await facts_repo.set_guide(uow.conn, uuid.UUID(member), "guide-wang")
    await env.event("cart_abandoned", member)
    await env.scheduler.run_until_idle()
    keys = {
        r["channel"]: r["send_key"]
        for r in await env.db.pool.fetch(
            "SELECT channel, send_key FROM engagement.sends WHERE member_id = $1",
            uuid.UUID(member),
        )
    }
    assert set(keys) == {"sms", "wecom"}
    # The provider fakes (devtools/provider_fakes) behind the real providers.
    fakes = build_stack(clock=lambda: env.clock.now().timestamp(), strict=False)
    await fakes.server.start()
    redis = Redis.from_url(infra.redis_url)
    client = httpx.AsyncClient()
    try:
        settings = EngagementSettings(**fakes.settings(), redis_namespace=f"{infra.namespace}:a")
        providers = build_providers(settings, client, redis, env.clock)
        dispatcher = Dispatcher(
            env.db, env.clock, providers, {}, batch_size=500, resolver=addresses
        )
        while await dispatcher.dispatch_once():
            pass
    finally:
        await client.aclose()
        await redis.aclose()
        await fakes.server.stop()
    sms = {a.out_id: a for a in fakes.sms.accepted}
    assert sms[keys["sms"]].phone == phone
    tasks = [t["body"] for t in fakes.wecom.tasks.values()]
    assert [t["external_userid"] for t in tasks] == [[external]]
    statuses = await env.db.pool.fetch(
        "SELECT channel, status FROM engagement.sends WHERE member_id = $1 ORDER BY channel",
        uuid.UUID(member),
    )
    # The SMS waits for its delivery report; the WeCom task was created and
    # waits for the staff member to send it.
    assert [(r["channel"], r["status"]) for r in statuses] == [
        ("sms", "sending"),
        ("wecom", "sending"),
    ]
    # Each read is audited in member, naming the send it was for.
    assert sorted(await audit(infra, member)) == sorted(
        [
            ("engagement", f"journey message {keys['sms']} via sms", ["phone"]),
            ("engagement", f"journey message {keys['wecom']} via wecom", ["identities"]),
        ]
    )
    # Engagement kept neither the phone nor the external_userid anywhere.
    stored = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.channel_addresses WHERE member_id = $1",
        uuid.UUID(member),
    )
    assert stored == 0


async def test_no_address_or_an_unknown_member_fails_the_send_with_the_reason(
    member_stub: member_pb2_grpc.MemberServiceStub, addresses: MemberAddresses
) -> None:
    # A member with a card only has no phone and no WeCom contact.
    member = (await identify(member_stub, ident(pb.IDENTIFIER_TYPE_POS_CARD, f"c-{tag()}"))).member
    for channel in ("sms", "wecom"):
        got = await addresses.resolve(member.member_id, channel, f"k:{channel}")
        assert got == Delivery("failed", reason="NO_ADDRESS")
    unknown = await addresses.resolve(str(uuid.uuid4()), "sms", "k:unknown")
    assert isinstance(unknown, Delivery) and unknown.status == "failed"
    assert unknown.reason and unknown.reason != "NO_ADDRESS"


async def test_member_service_down_is_retried() -> None:
    port = MemberAddresses("127.0.0.1:1", 0.5)
    try:
        got = await port.resolve(str(uuid.uuid4()), "sms", "k:down")
    finally:
        await port.close()
    assert isinstance(got, Delivery) and got.status == "retry"
