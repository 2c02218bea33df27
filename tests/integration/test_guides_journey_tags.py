"""One tag model: a journey's `tag` step is recorded by the guides service
(source "journey"), and every change of a member's tags there (manual, rule,
journey) reaches engagement's local copy that journeys branch on."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest

from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from servicekit.db import Database, create_pool
from servicekit.server import ServiceApp
from services.engagement import repository as engagement_repo
from services.engagement.domain import FakeClock, QuietHours
from services.engagement.handlers import EngagementHandlers
from services.engagement.ports import LocalConsent
from services.engagement.scheduler import JourneyCache, Scheduler

from ..harness import Infra, eventually

# A fixed story time far from today, so the session engagement service's own
# sweepers (on the real clock) never take these steps.
START = datetime(2030, 3, 4, 2, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def engagement_db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 4)
    yield Database(pool, "engagement", "engagement")
    await pool.close()


async def engagement_tags(db: Database, member_id: str) -> set[str]:
    rows = await db.pool.fetch(
        "SELECT tag FROM engagement.member_tags WHERE member_id = $1", uuid.UUID(member_id)
    )
    return {r["tag"] for r in rows}


async def guides_tags(
    stub: guides_pb2_grpc.GuidesServiceStub, member_id: str
) -> set[tuple[str, str]]:
    reply = await stub.ListMemberTags(guides_pb2.MemberRef(member_id=member_id), timeout=5)
    return {(t.tag, t.source) for t in reply.tags}


async def test_journey_tag_step_writes_into_the_guides_tag_model(
    engagement_app: ServiceApp,
    guides_app: ServiceApp,
    guides_channel: grpc.aio.Channel,
    engagement_db: Database,
) -> None:
    stub = guides_pb2_grpc.GuidesServiceStub(guides_channel)
    clock = FakeClock(START)
    journeys = JourneyCache()
    handlers = EngagementHandlers(clock, QuietHours(), journeys)
    scheduler = Scheduler(
        engagement_db, clock, LocalConsent(), QuietHours(), journeys, wecom_sender="fallback-staff"
    )
    journey_id = f"tag-vip-{uuid.uuid4().hex[:6]}"
    tag = f"vip-{uuid.uuid4().hex[:4]}"
    doc = {
        "id": journey_id,
        "priority": 10,
        "entry": {"event": "member_registered"},
        "holdout_percent": 0,
        "start": "mark",
        "steps": {"mark": {"type": "tag", "tag": tag, "next": "end"}, "end": {"type": "exit"}},
    }
    async with engagement_db.unit_of_work() as uow:
        await handlers.publish(uow, json.dumps(doc))
    member = str(uuid.uuid4())
    try:
        async with engagement_db.unit_of_work() as uow:
            await handlers.ingest(uow, "member_registered", member, {})
        await scheduler.run_until_idle()
        # The journey's own copy at once; the owner's record through the event.
        assert tag in await engagement_tags(engagement_db, member)
        await eventually(lambda: _has(stub, member, (tag, "journey")), timeout=15)
    finally:
        async with engagement_db.unit_of_work() as uow:
            await engagement_repo.set_journey_status(uow.conn, journey_id, "paused")

    # A guide's manual tag reaches engagement's copy; removing it removes it there.
    await stub.SetManualTag(
        guides_pb2.SetManualTagRequest(member_id=member, tag="早餐党", present=True, actor="g1"),
        timeout=5,
    )
    await eventually(lambda: _copy_is(engagement_db, member, {tag, "早餐党"}), timeout=15)
    await stub.SetManualTag(
        guides_pb2.SetManualTagRequest(member_id=member, tag="早餐党", present=False, actor="g1"),
        timeout=5,
    )
    await eventually(lambda: _copy_is(engagement_db, member, {tag}), timeout=15)


async def _has(stub: guides_pb2_grpc.GuidesServiceStub, member: str, pair: tuple[str, str]) -> bool:
    return pair in await guides_tags(stub, member)


async def _copy_is(db: Database, member: str, tags: set[str]) -> bool:
    return await engagement_tags(db, member) == tags
