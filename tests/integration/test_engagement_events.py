"""The engagement service's consumers, over the real bus: events other services
publish (member, rewards, tiering) change what engagement knows, and identity
events (merge, unmerge, erase) reach its tables."""

from __future__ import annotations

import json
import uuid
from typing import Any

from google.protobuf.message import Message
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from servicekit.events import ENVELOPE_FIELD, make_envelope, stream_name
from servicekit.server import ServiceApp
from tests.harness import Infra, eventually


async def publish(infra: Infra, producer: str, payload: Message, member_id: str = "") -> None:
    redis = Redis.from_url(infra.redis_url)
    try:
        envelope = make_envelope(producer, payload, member_id)
        await redis.xadd(
            stream_name(infra.namespace, producer), {ENVELOPE_FIELD: envelope.SerializeToString()}
        )
    finally:
        await redis.aclose()


async def facts(app: ServiceApp, member: str) -> Any:
    assert app.db is not None
    return await app.db.pool.fetchrow(
        "SELECT tier, stage, order_count FROM engagement.member_facts WHERE member_id = $1",
        uuid.UUID(member),
    )


async def test_events_from_other_services_reach_engagement(
    infra: Infra, engagement_app: ServiceApp
) -> None:
    m = str(uuid.uuid4())
    await publish(infra, "member", events_pb2.MemberRegistered(member_id=m, source="pos"), m)
    await eventually(lambda: facts(engagement_app, m))
    await publish(infra, "rewards", events_pb2.OrderCompleted(order_id="o-1", member_id=m), m)
    await publish(infra, "tiering", events_pb2.TierChanged(member_id=m, to_tier="SVIP"), m)
    await publish(
        infra, "tiering", events_pb2.LifecycleStageChanged(member_id=m, to_stage="active"), m
    )

    async def updated() -> bool:
        row = await facts(engagement_app, m)
        return bool(row["order_count"] == 1 and row["tier"] == "SVIP" and row["stage"] == "active")

    await eventually(updated)
    await publish(infra, "member", events_pb2.MemberErased(member_ids=[m]), m)

    async def gone() -> bool:
        return await facts(engagement_app, m) is None

    await eventually(gone)


async def test_merge_and_unmerge_events_move_send_history(
    infra: Infra, engagement_app: ServiceApp
) -> None:
    assert engagement_app.db is not None
    survivor, absorbed = str(uuid.uuid4()), str(uuid.uuid4())
    enrollment = uuid.uuid4()
    pool = engagement_app.db.pool
    await pool.execute(
        "INSERT INTO engagement.enrollments (enrollment_id, journey_id, version, member_id,"
        " status, grp, conversion_days, entered_at, ended_at)"
        " VALUES ($1, 'merge-bus', 1, $2, 'completed', 'treatment', 7, now(), now())",
        enrollment,
        uuid.UUID(absorbed),
    )

    async def owner() -> str:
        return str(
            await pool.fetchval(
                "SELECT member_id FROM engagement.enrollments WHERE enrollment_id = $1",
                enrollment,
            )
        )

    merge = events_pb2.MemberMerged(
        merge_id="bus-merge-1", survivor_member_id=survivor, absorbed_member_id=absorbed
    )
    await publish(infra, "member", merge, survivor)
    await eventually(lambda: _is(owner, survivor))
    unmerge = events_pb2.MemberUnmerged(
        merge_id="bus-merge-1", survivor_member_id=survivor, restored_member_id=absorbed
    )
    await publish(infra, "member", unmerge, survivor)
    await eventually(lambda: _is(owner, absorbed))


async def _is(read: Any, expected: str) -> bool:
    return bool(await read() == expected)


async def test_coupon_expiring_soon_from_rewards_reaches_engagement(
    infra: Infra, engagement_app: ServiceApp
) -> None:
    """Rewards' CouponExpiringSoon is a journey entry; for a member engagement
    does not know yet it is parked (kept for replay), which shows the route."""
    assert engagement_app.db is not None
    m = str(uuid.uuid4())
    event = events_pb2.CouponExpiringSoon(
        coupon_id="c-1", member_id=m, template_id="MJ99-30", name="满99减30"
    )
    await publish(infra, "rewards", event, m)

    async def parked() -> Any:
        assert engagement_app.db is not None
        return await engagement_app.db.pool.fetchrow(
            "SELECT event, attributes FROM engagement.parked_events WHERE member_id = $1",
            uuid.UUID(m),
        )

    row = await eventually(parked)
    assert row["event"] == "coupon_expiring_soon"
    assert json.loads(row["attributes"])["template_id"] == "MJ99-30"
