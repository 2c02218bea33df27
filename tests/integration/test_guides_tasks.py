"""Guide tasks: a journey's `guide_task` step reaches the member's guide as a
WeCom message task (one per guide, step and day), tracked per customer to
completion and listed in the guide's workstation."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.server import ServiceApp
from services.engagement import repository as engagement_repo
from services.engagement.domain import FakeClock, QuietHours
from services.engagement.handlers import EngagementHandlers
from services.engagement.ports import LocalConsent
from services.engagement.scheduler import JourneyCache, Scheduler
from services.guides.wecom import FakeWeCom

from ..harness import Infra, ServiceClock, eventually
from .guides_support import add_customer, new_staff, uid, wecom_crypto

# Far from today: the session engagement service's sweepers never take these steps.
START = datetime(2030, 3, 4, 2, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def engagement_db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 3)
    yield Database(pool, "engagement", "engagement")
    await pool.close()


async def test_a_journey_task_reaches_the_guide_and_is_tracked_to_done(
    engagement_app: ServiceApp,
    guides_app: ServiceApp,
    guides_channel: grpc.aio.Channel,
    engagement_db: Database,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    infra: Infra,
) -> None:
    stub = guides_pb2_grpc.GuidesServiceStub(guides_channel)
    guide = await new_staff(stub, "SH001")
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        exts = [uid("wm"), uid("wm")]
        members = []
        for ext in exts:
            fake_wecom.add_contact(ext, "顾客")
            await add_customer(
                stub, wecom_crypto(fake_wecom.corp_id), guides_clock, guide.staff_id, ext
            )
            members.append(str(await eventually(functools.partial(_member_of, conn, ext))))
        for m in members:

            async def bound(m: str = m) -> bool:
                b = await stub.GetBinding(guides_pb2.MemberRef(member_id=m), timeout=5)
                return b.staff_id == guide.staff_id

            await eventually(bound)
        unguided = str(uuid.uuid4())

        clock = FakeClock(START)
        journeys = JourneyCache()
        handlers = EngagementHandlers(clock, QuietHours(), journeys)
        scheduler = Scheduler(
            engagement_db,
            clock,
            LocalConsent(),
            QuietHours(),
            journeys,
            wecom_sender="fallback-staff",
        )
        journey_id = f"wake-vip-{uuid.uuid4().hex[:6]}"
        doc = {
            "id": journey_id,
            "priority": 10,
            # Not member_registered: the session's engagement service also sees
            # these members register (from the member service) and would enrol
            # them on its own clock, splitting the day's task in two.
            "entry": {"event": "check_in"},
            "holdout_percent": 0,
            "start": "ask",
            "steps": {
                "ask": {
                    "type": "guide_task",
                    "title": "唤醒沉睡VIP",
                    "script": "好久不见，送您一杯",
                    "next": "end",
                },
                "end": {"type": "exit"},
            },
        }
        async with engagement_db.unit_of_work() as uow:
            await handlers.publish(uow, json.dumps(doc))
        try:
            for m in [*members, unguided]:
                async with engagement_db.unit_of_work() as uow:
                    await handlers.ingest(uow, "member_registered", m, {})
                    await handlers.ingest(uow, "check_in", m, {})
            await scheduler.run_until_idle()
        finally:
            async with engagement_db.unit_of_work() as uow:
                await engagement_repo.set_journey_status(uow.conn, journey_id, "paused")

        # Both guided members gather in the guide's open task for the step and day.
        async def gathered() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM guides.task_targets t JOIN guides.guide_tasks g"
                " USING (task_id) WHERE g.journey_id = $1 AND g.status = 'open'",
                journey_id,
            )
            return bool(n == 2)

        await eventually(gathered, timeout=20)
        assert not [t for t in fake_wecom.msg_tasks.values() if t["sender"] == guide.staff_id]
        # An hour on, the task goes to WeCom as one message task.
        with guides_clock.pinned(guides_clock() + timedelta(hours=1, minutes=1)):
            await _sent_and_tracked(
                stub, fake_wecom, guides_clock, conn, guide.staff_id, exts, journey_id, unguided
            )
    finally:
        await conn.close()


async def _sent_and_tracked(
    stub: guides_pb2_grpc.GuidesServiceStub,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    conn: asyncpg.Connection,
    staff_id: str,
    exts: list[str],
    journey_id: str,
    unguided: str,
) -> None:
    async def sent_task() -> dict[str, object] | None:
        for task in fake_wecom.msg_tasks.values():
            if task["sender"] == staff_id and set(task["status"]) == set(exts):
                return task
        return None

    task = await eventually(sent_task, timeout=20)
    assert task["text"] == "好久不见，送您一杯"
    skipped = await eventually(
        lambda: conn.fetchval(
            "SELECT detail->>'reason' FROM guides.audit WHERE subject = $1 AND action = 'task_skipped'",
            f"member:{unguided}",
        )
    )
    assert skipped == "no_guide"

    code = uid("code")
    fake_wecom.oauth_codes[code] = staff_id
    token = (
        await stub.OpenWorkstation(guides_pb2.OpenWorkstationRequest(code=code), timeout=5)
    ).token
    listed = await stub.ListGuideTasks(guides_pb2.ListGuideTasksRequest(token=token), timeout=5)
    mine = [t for t in listed.tasks if t.journey_id == journey_id]
    assert [(t.title, t.status) for t in mine] == [("唤醒沉睡VIP", "sent")]
    assert {(x.external_userid, x.status) for x in mine[0].targets} == {
        (e, "pending") for e in exts
    }

    # The guide sends to one; the other is no longer a contact: done.
    task["status"][exts[0]] = 1  # type: ignore[index]
    task["status"][exts[1]] = 2  # type: ignore[index]

    async def done() -> bool:
        reply = await stub.ListGuideTasks(guides_pb2.ListGuideTasksRequest(token=token), timeout=5)
        return not [t for t in reply.tasks if t.journey_id == journey_id]

    await eventually(done, timeout=15)
    rows = await conn.fetch(
        "SELECT t.external_userid, t.status FROM guides.task_targets t"
        " JOIN guides.guide_tasks g USING (task_id) WHERE g.journey_id = $1",
        journey_id,
    )
    assert {(r["external_userid"], r["status"]) for r in rows} == {
        (exts[0], "sent"),
        (exts[1], "not_contact"),
    }


async def _member_of(conn: asyncpg.Connection, ext: str) -> object:
    return await conn.fetchval(
        "SELECT member_id FROM guides.contacts WHERE external_userid = $1", ext
    )
