"""The ledger's gRPC API on the running rewards service: status codes and
error fields, history pagination, expiring points, liability, actions; and the
events it consumes (MemberMerged, TierChanged) through Redis Streams."""

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
from servicekit.db import Database, asyncpg_dsn, create_pool
from servicekit.errors import error_info
from servicekit.events import ENVELOPE_FIELD, make_envelope, stream_name
from services.rewards.kernel import Channel, OrderRequest
from services.rewards.orders.handlers import RewardsHandlers
from services.rewards.points.audit import audit_ledger
from services.rewards.points.earning import EarningRules
from services.rewards.points.handlers import PointsLedger
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


async def earn(stub: Stub, member: str, paid: int, days_ago: int = 0, txn: str = "") -> str:
    ordered_at = timestamp_pb2.Timestamp()
    ordered_at.FromDatetime(datetime.now(UTC) - timedelta(days=days_ago))
    txn = txn or f"A-{uuid.uuid4().hex[:16]}"
    await stub.CompleteOrder(
        rewards_pb2.CompleteOrderRequest(
            store_id="SH001",
            pos_transaction_id=txn,
            member_id=member,
            channel=common_pb2.CHANNEL_STORE,
            paid_amount_fen=paid,
            ordered_at=ordered_at,
        )
    )
    return txn


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_redeem_hold_post_void_through_grpc(stub: Stub, db: asyncpg.Connection) -> None:
    member = str(uuid.uuid4())
    await earn(stub, member, 10_000)
    spent = await stub.RedeemPoints(
        rewards_pb2.RedeemPointsRequest(member_id=member, points=30, idempotency_key="g1" + member)
    )
    assert spent.available == 70 and spent.lots[0].points == -30
    held = await stub.HoldPoints(
        rewards_pb2.HoldPointsRequest(member_id=member, points=20, idempotency_key="g2" + member)
    )
    assert held.hold_status == "held" and held.hold_expires_at.seconds > 0
    posted = await stub.PostHold(rewards_pb2.HoldRequest(hold_id=held.hold_id))
    assert posted.hold_status == "posted"
    error = await rpc_error(stub.VoidHold(rewards_pb2.HoldRequest(hold_id=held.hold_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error) == ("HOLD_POSTED", "hold_id")
    balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=member))
    assert (balance.available, balance.held, balance.lifetime_earned) == (50, 0, 100)
    # A void gives the points back: its lots carry positive amounts.
    again = await stub.HoldPoints(
        rewards_pb2.HoldPointsRequest(member_id=member, points=10, idempotency_key="g5" + member)
    )
    assert again.available == 40 and [lot.points for lot in again.lots] == [-10]
    voided = await stub.VoidHold(rewards_pb2.HoldRequest(hold_id=again.hold_id))
    assert voided.hold_status == "voided" and voided.available == 50
    assert [lot.points for lot in voided.lots] == [10]

    error = await rpc_error(
        stub.RedeemPoints(
            rewards_pb2.RedeemPointsRequest(
                member_id=member, points=51, idempotency_key="g3" + member
            )
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error) == ("INSUFFICIENT_POINTS", "points")
    error = await rpc_error(
        stub.RedeemPoints(
            rewards_pb2.RedeemPointsRequest(
                member_id=member, points=31, idempotency_key="g1" + member
            )
        )
    )
    assert error.code() == grpc.StatusCode.ABORTED
    error = await rpc_error(stub.PostHold(rewards_pb2.HoldRequest(hold_id=str(uuid.uuid4()))))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(
        stub.HoldPoints(
            rewards_pb2.HoldPointsRequest(
                member_id=member, points=1, idempotency_key="g4", ttl_seconds=-1
            )
        )
    )
    assert error_info(error) == ("INVALID_TTL", "ttl_seconds")
    assert (await audit_ledger(db, [member])).ok


async def test_refund_through_grpc(stub: Stub, db: asyncpg.Connection) -> None:
    member = str(uuid.uuid4())
    txn = await earn(stub, member, 4_000)
    reply = await stub.RefundOrder(
        rewards_pb2.RefundOrderRequest(
            store_id="SH001",
            pos_transaction_id=txn,
            refund_transaction_id=txn + "-R",
            refunded_amount_fen=1_000,
        )
    )
    assert (reply.points_due, reply.points_reversed, reply.available) == (10, 10, 30)
    for request, code, field in (
        (
            rewards_pb2.RefundOrderRequest(
                store_id="SH001",
                pos_transaction_id=txn,
                refund_transaction_id=txn + "-X",
                refunded_amount_fen=3_001,
            ),
            "REFUND_EXCEEDS_ORDER",
            "refunded_amount_fen",
        ),
        (
            rewards_pb2.RefundOrderRequest(
                store_id="SH001",
                pos_transaction_id="nope",
                refund_transaction_id=txn + "-Y",
                refunded_amount_fen=1,
            ),
            "UNKNOWN_ORDER",
            "pos_transaction_id",
        ),
        (
            rewards_pb2.RefundOrderRequest(
                store_id="SH001",
                pos_transaction_id=txn,
                refund_transaction_id=txn + "-Z",
                refunded_amount_fen=0,
            ),
            "INVALID_AMOUNT",
            "refunded_amount_fen",
        ),
        (
            rewards_pb2.RefundOrderRequest(
                store_id="SH001",
                pos_transaction_id=txn,
                refund_transaction_id=txn + "-R",
                refunded_amount_fen=2_000,
            ),
            "IDEMPOTENCY_KEY_REUSED",
            "refund_transaction_id",
        ),
    ):
        assert error_info(await rpc_error(stub.RefundOrder(request))) == (code, field)
    assert (await audit_ledger(db, [member])).ok


async def test_checkout_with_points_through_grpc(stub: Stub, db: asyncpg.Connection) -> None:
    member = str(uuid.uuid4())
    await earn(stub, member, 10_000)
    request = rewards_pb2.CompleteOrderRequest(
        store_id="SH002",
        pos_transaction_id=f"A-{uuid.uuid4().hex[:16]}",
        member_id=member,
        channel=common_pb2.CHANNEL_STORE,
        paid_amount_fen=1_000,
        points_to_redeem=40,
    )
    reply = await stub.CompleteOrder(request)
    assert (reply.points_redeemed, reply.points_earned, reply.points_balance) == (40, 10, 70)
    again = await stub.CompleteOrder(request)
    assert again.replayed and again.points_redeemed == 40
    request.pos_transaction_id += "-big"
    request.points_to_redeem = 1_000
    error = await rpc_error(stub.CompleteOrder(request))
    assert error_info(error) == ("INSUFFICIENT_POINTS", "points_to_redeem")
    request.points_to_redeem = -1
    request.pos_transaction_id += "-neg"
    assert error_info(await rpc_error(stub.CompleteOrder(request))) == (
        "INVALID_POINTS",
        "points_to_redeem",
    )
    assert (await audit_ledger(db, [member])).ok


async def test_history_pages_with_a_cursor(stub: Stub, db: asyncpg.Connection) -> None:
    member = str(uuid.uuid4())
    for n in range(5):
        await earn(stub, member, 1_000 * (n + 1))
    await stub.AdjustPoints(
        rewards_pb2.AdjustPointsRequest(
            member_id=member,
            points=-3,
            operator_id="op-1",
            reason="typo",
            idempotency_key="h" + member,
        )
    )
    seen = []
    cursor = ""
    while True:
        page = await stub.GetPointsHistory(
            rewards_pb2.GetPointsHistoryRequest(member_id=member, page_size=4, cursor=cursor)
        )
        seen += page.lines
        cursor = page.next_cursor
        if not cursor:
            break
    assert [line.kind for line in seen] == ["adjust"] + ["earn"] * 5
    assert [line.amount for line in seen] == [-3, 50, 40, 30, 20, 10]
    assert [line.balance_after for line in seen] == [147, 150, 100, 60, 30, 10]
    assert (seen[0].operator_id, seen[0].reason) == ("op-1", "typo")
    assert seen[1].order_id and seen[1].lots  # the lot it created
    error = await rpc_error(
        stub.GetPointsHistory(rewards_pb2.GetPointsHistoryRequest(member_id=member, cursor="x"))
    )
    assert error_info(error) == ("INVALID_CURSOR", "cursor")
    error = await rpc_error(
        stub.GetPointsHistory(rewards_pb2.GetPointsHistoryRequest(member_id=member, page_size=500))
    )
    assert error_info(error) == ("INVALID_PAGE_SIZE", "page_size")


async def test_expiring_points_and_liability(stub: Stub, db: asyncpg.Connection) -> None:
    member = str(uuid.uuid4())
    await earn(stub, member, 2_000)
    year_end = await stub.GetExpiringPoints(
        rewards_pb2.GetExpiringPointsRequest(member_id=member, days=800)
    )
    assert [b.points for b in year_end.batches] == [20]
    none_soon = await stub.GetExpiringPoints(
        rewards_pb2.GetExpiringPointsRequest(member_id=member, days=1)
    )
    assert list(none_soon.batches) == []
    # The member centre's one call: the balance and the same batches.
    summary = await stub.GetPointsSummary(
        rewards_pb2.GetExpiringPointsRequest(member_id=member, days=800)
    )
    balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=member))
    assert summary.balance == balance and summary.balance.available == 20
    assert list(summary.expiring_soon) == list(year_end.batches)
    stranger = await stub.GetPointsSummary(
        rewards_pb2.GetExpiringPointsRequest(member_id=str(uuid.uuid4()))
    )
    assert stranger.balance.available == 0 and not stranger.expiring_soon
    bad = await rpc_error(
        stub.GetPointsSummary(rewards_pb2.GetExpiringPointsRequest(member_id="nobody"))
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    liability = await stub.GetPointsLiability(rewards_pb2.GetPointsLiabilityRequest())
    assert liability.available >= 20
    # Entries sum to zero: what members hold is what was issued, less redeemed
    # and expired, plus adjustments.
    assert liability.available + liability.pending + liability.held - liability.debt == (
        liability.issued - liability.redeemed - liability.expired + liability.adjusted
    )
    assert liability.members_with_points >= 1


async def test_actions_earn_within_their_caps(stub: Stub, db: asyncpg.Connection) -> None:
    member = str(uuid.uuid4())
    first = await stub.RecordAction(
        rewards_pb2.RecordActionRequest(
            member_id=member, action="check_in", idempotency_key="c1" + member
        )
    )
    assert (first.points, first.available) == (5, 5)
    replay = await stub.RecordAction(
        rewards_pb2.RecordActionRequest(
            member_id=member, action="check_in", idempotency_key="c1" + member
        )
    )
    assert replay.replayed and replay.transaction_id == first.transaction_id
    error = await rpc_error(
        stub.RecordAction(
            rewards_pb2.RecordActionRequest(
                member_id=member, action="check_in", idempotency_key="c2" + member
            )
        )
    )
    assert error_info(error) == ("ACTION_CAP_REACHED", "action")
    error = await rpc_error(
        stub.RecordAction(
            rewards_pb2.RecordActionRequest(
                member_id=member, action="dance", idempotency_key="c3" + member
            )
        )
    )
    assert error_info(error) == ("UNKNOWN_ACTION", "action")
    assert (await audit_ledger(db, [member])).ok


async def publish(redis: Redis, infra: Infra, producer: str, payload: Message, member: str) -> str:
    envelope = make_envelope(producer, payload, member)
    await redis.xadd(
        stream_name(infra.namespace, producer), {ENVELOPE_FIELD: envelope.SerializeToString()}
    )
    return envelope.event_id


async def test_member_merged_event_moves_lots_once(
    stub: Stub, db: asyncpg.Connection, redis: Redis, infra: Infra
) -> None:
    survivor, absorbed = str(uuid.uuid4()), str(uuid.uuid4())
    await earn(stub, survivor, 1_000)
    await earn(stub, absorbed, 3_000)
    merged = events_pb2.MemberMerged(
        merge_id=str(uuid.uuid4()), survivor_member_id=survivor, absorbed_member_id=absorbed
    )
    # Delivered twice (two event ids): moved once.
    await publish(redis, infra, "member", merged, survivor)
    await publish(redis, infra, "member", merged, survivor)

    async def survivor_has_all() -> bool:
        b = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=survivor))
        return b.available == 40

    await eventually(survivor_has_all)
    unmerged = events_pb2.MemberUnmerged(
        merge_id=merged.merge_id, survivor_member_id=survivor, restored_member_id=absorbed
    )
    await publish(redis, infra, "member", unmerged, survivor)

    async def restored() -> bool:
        b = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=absorbed))
        return b.available == 30

    await eventually(restored)
    moves = await db.fetchval(
        "SELECT count(*) FROM rewards.points_transactions WHERE idempotency_key LIKE $1",
        f"%merge:{merged.merge_id}",
    )
    assert moves == 2
    assert (await audit_ledger(db, [survivor, absorbed])).ok


async def test_tier_changes_feed_the_tier_multiplier(
    infra: Infra, db: asyncpg.Connection, redis: Redis, rewards_channel: grpc.aio.Channel
) -> None:
    member = str(uuid.uuid4())
    changed_at = timestamp_pb2.Timestamp()
    changed_at.FromDatetime(datetime.now(UTC))
    await publish(
        redis,
        infra,
        "tiering",
        events_pb2.TierChanged(
            member_id=member, from_tier="base", to_tier="gold", changed_at=changed_at
        ),
        member,
    )

    async def projected() -> object:
        return await db.fetchval(
            "SELECT tier_code FROM rewards.member_tiers WHERE member_id = $1", uuid.UUID(member)
        )

    assert await eventually(projected) == "gold"
    # A late, older event does not overwrite the newer tier.
    older = timestamp_pb2.Timestamp()
    older.FromDatetime(datetime.now(UTC) - timedelta(days=1))
    late = await publish(
        redis,
        infra,
        "tiering",
        events_pb2.TierChanged(member_id=member, from_tier="x", to_tier="silver", changed_at=older),
        member,
    )

    await eventually(
        lambda: db.fetchval(
            "SELECT true FROM rewards.processed_events WHERE event_id = $1", uuid.UUID(late)
        )
    )
    assert await projected() == "gold"
    # Checkout with tier multipliers configured reads the projection.
    pool = await create_pool(infra.database_url, 1, 2)
    try:
        handlers = RewardsHandlers(
            points=PointsLedger(
                rules=EarningRules(tier_multiplier_bp={"gold": 15_000}, daily_cap=40)
            )
        )
        database = Database(pool, "rewards", "rewards")
        results = []
        for paid in (2_000, 2_000):
            settlement = handlers.prepare_order(
                OrderRequest("SH001", f"TIER-{uuid.uuid4().hex[:12]}", member, Channel.STORE, paid)
            )
            async with database.unit_of_work() as uow:
                results.append((await handlers.complete_order(uow, settlement)).unwrap())
    finally:
        await pool.close()
    # 20 base x1.5 = 30; the daily cap of 40 leaves 10 for the second order.
    assert [r.points_earned for r in results] == [30, 10]
    rule = await db.fetchval(
        "SELECT rule FROM rewards.points_transactions t JOIN rewards.orders o ON o.id = t.order_id"
        " WHERE o.id = $1",
        uuid.UUID(results[1].order_id),
    )
    assert '"capped_from": 30' in rule and '"tier": "gold"' in rule
    assert (await audit_ledger(db, [member])).ok
