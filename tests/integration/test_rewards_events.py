"""Rewards consuming tiering's multiplier (TierChanged.points_multiplier_bp)
and OneID erasures (MemberErased)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from redis.asyncio import Redis

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import error_info
from servicekit.events import ENVELOPE_FIELD, make_envelope, stream_name
from services.rewards.points.audit import audit_ledger
from services.rewards.seed import seed_demo

from ..harness import Infra, eventually

Stub: TypeAlias = rewards_pb2_grpc.RewardsServiceStub


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    await seed_demo(conn)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
async def stub(rewards_channel: grpc.aio.Channel, db: asyncpg.Connection) -> Stub:
    return rewards_pb2_grpc.RewardsServiceStub(rewards_channel)


@pytest.fixture(scope="module")
async def redis(infra: Infra) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url)
    yield client
    await client.aclose()


async def publish(redis: Redis, infra: Infra, producer: str, payload: Message, member: str) -> str:
    envelope = make_envelope(producer, payload, member)
    await redis.xadd(
        stream_name(infra.namespace, producer), {ENVELOPE_FIELD: envelope.SerializeToString()}
    )
    return envelope.event_id


async def processed(db: asyncpg.Connection, event_id: str) -> None:
    await eventually(
        lambda: db.fetchval(
            "SELECT true FROM rewards.processed_events WHERE event_id = $1", uuid.UUID(event_id)
        )
    )


def ts(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def order(member: str, paid: int) -> rewards_pb2.CompleteOrderRequest:
    return rewards_pb2.CompleteOrderRequest(
        store_id="SH001",
        pos_transaction_id=f"EV-{uuid.uuid4().hex[:16]}",
        member_id=member,
        channel=common_pb2.CHANNEL_STORE,
        paid_amount_fen=paid,
        ordered_at=ts(datetime.now(UTC)),
    )


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_tier_multiplier_from_the_event_drives_earning(
    infra: Infra, db: asyncpg.Connection, redis: Redis, stub: Stub
) -> None:
    # The service runs without configured tier multipliers: only the event's counts.
    member = str(uuid.uuid4())
    now = datetime.now(UTC)
    changed = events_pb2.TierChanged(
        member_id=member,
        from_tier="base",
        to_tier="gold",
        changed_at=ts(now),
        points_multiplier_bp=15_000,
    )
    await processed(db, await publish(redis, infra, "tiering", changed, member))
    # 25.99 yuan -> 25 base points (floor) -> x1.5 = 37.5 -> 37.
    earned = await stub.CompleteOrder(order(member, 2_599))
    assert earned.points_earned == 37
    rule = await db.fetchval(
        "SELECT rule FROM rewards.points_transactions WHERE order_id = $1",
        uuid.UUID(earned.order_id),
    )
    assert '"tier_bp": 15000' in rule and '"tier_bp_source": "tiering"' in rule

    # A late, older event (another multiplier) overwrites neither tier nor multiplier.
    older = events_pb2.TierChanged(
        member_id=member,
        to_tier="diamond",
        changed_at=ts(now - timedelta(days=1)),
        points_multiplier_bp=30_000,
    )
    await processed(db, await publish(redis, infra, "tiering", older, member))
    row = await db.fetchrow(
        "SELECT tier_code, points_multiplier_bp FROM rewards.member_tiers WHERE member_id = $1",
        uuid.UUID(member),
    )
    assert (row["tier_code"], row["points_multiplier_bp"]) == ("gold", 15_000)
    assert (await stub.CompleteOrder(order(member, 2_599))).points_earned == 37

    # A newer event without a multiplier (an older producer) falls back to the
    # configuration, which here knows no tier multipliers: x1.
    plain = events_pb2.TierChanged(
        member_id=member, to_tier="silver", changed_at=ts(now + timedelta(seconds=1))
    )
    await processed(db, await publish(redis, infra, "tiering", plain, member))
    assert (await stub.CompleteOrder(order(member, 2_599))).points_earned == 25
    assert (await audit_ledger(db, [member])).ok


async def test_member_erased_is_recorded_once_and_refuses_later_writes(
    infra: Infra, db: asyncpg.Connection, redis: Redis, stub: Stub
) -> None:
    member, never_seen, bystander = (str(uuid.uuid4()) for _ in range(3))
    await stub.CompleteOrder(order(member, 5_000))
    await stub.CompleteOrder(order(bystander, 1_000))
    erased_at = datetime.now(UTC).replace(microsecond=0)
    erased = events_pb2.MemberErased(member_ids=[member, never_seen], erased_at=ts(erased_at))
    await processed(db, await publish(redis, infra, "member", erased, member))
    # Redelivered under another event id, later: nothing changes.
    again = events_pb2.MemberErased(
        member_ids=[member, never_seen], erased_at=ts(erased_at + timedelta(hours=1))
    )
    await processed(db, await publish(redis, infra, "member", again, member))
    rows = await db.fetch(
        "SELECT member_id, erased_at FROM rewards.erased_members WHERE member_id = ANY($1)",
        [uuid.UUID(m) for m in (member, never_seen, bystander)],
    )
    assert {r["member_id"]: r["erased_at"] for r in rows} == {
        uuid.UUID(member): erased_at,
        uuid.UUID(never_seen): erased_at,
    }

    # Financial records stay and stay readable.
    balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=member))
    assert balance.available == 50

    writes = [
        stub.CompleteOrder(order(member, 1_000)),
        stub.RedeemPoints(
            rewards_pb2.RedeemPointsRequest(member_id=member, points=10, idempotency_key="er1")
        ),
        stub.HoldPoints(
            rewards_pb2.HoldPointsRequest(member_id=member, points=10, idempotency_key="er2")
        ),
        stub.AdjustPoints(
            rewards_pb2.AdjustPointsRequest(
                member_id=member,
                points=5,
                operator_id="op-1",
                reason="goodwill",
                idempotency_key="er3",
            )
        ),
        stub.RecordAction(
            rewards_pb2.RecordActionRequest(
                member_id=never_seen, action="check_in", idempotency_key="er4"
            )
        ),
    ]
    for call in writes:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(error) == ("MEMBER_ERASED", "member_id")
    # Nothing was written for them: no new order, journal row, account or request.
    members = [uuid.UUID(member), uuid.UUID(never_seen)]
    assert (
        await db.fetchval("SELECT count(*) FROM rewards.orders WHERE member_id = ANY($1)", members)
        == 1
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE member_id = ANY($1)", members
        )
        == 1
    )
    assert not await db.fetchval(
        "SELECT count(*) FROM rewards.points_balances WHERE member_id = $1", members[1]
    )
    assert not await db.fetchval(
        "SELECT count(*) FROM rewards.ledger_requests WHERE idempotency_key LIKE '%:er_'"
    )
    # Other members are unaffected.
    assert (await stub.CompleteOrder(order(bystander, 1_000))).points_earned == 10
    assert (await audit_ledger(db, [member, bystander])).ok
