"""Rewards service against real PostgreSQL and Redis: settlement, idempotency,
concurrency, refusals that write nothing, the ledger audit and the event."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2
from redis.asyncio import Redis

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import error_info
from servicekit.events import ENVELOPE_FIELD, stream_name
from services.rewards.points.audit import audit_ledger
from services.rewards.seed import seed_demo

from ..harness import Infra, eventually

CLOSED_STORE = "ZZ900"
ORDERED_AT = datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    await seed_demo(conn)
    await conn.execute(
        "INSERT INTO rewards.stores (store_id, name, city, address, latitude, longitude, status)"
        " VALUES ($1, '已闭店', '上海', '上海市黄浦区南京东路1号', 31.240000, 121.490000, 'closed')"
        " ON CONFLICT (store_id) DO NOTHING",
        CLOSED_STORE,
    )
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
async def stub(
    rewards_channel: grpc.aio.Channel, db: asyncpg.Connection
) -> rewards_pb2_grpc.RewardsServiceStub:
    return rewards_pb2_grpc.RewardsServiceStub(rewards_channel)


@pytest.fixture(scope="module")
async def redis(infra: Infra) -> AsyncIterator[Redis]:
    client = Redis.from_url(infra.redis_url)
    yield client
    await client.aclose()


def new_member() -> str:
    return str(uuid.uuid4())


def new_txn() -> str:
    return f"POS-{uuid.uuid4().hex[:16]}"


def order_request(
    member_id: str,
    txn: str | None = None,
    *,
    store_id: str = "SH001",
    paid: int = 2_800,
    gross: int | None = None,
    lines: list[rewards_pb2.OrderLine] | None = None,
    channel: int = common_pb2.CHANNEL_STORE,
) -> rewards_pb2.CompleteOrderRequest:
    ordered_at = timestamp_pb2.Timestamp()
    ordered_at.FromDatetime(ORDERED_AT)
    if lines is None:
        lines = [
            rewards_pb2.OrderLine(
                sku="MT-01", name="芝芝莓莓", category="tea", quantity=1, paid_amount_fen=paid - 900
            ),
            rewards_pb2.OrderLine(
                sku="TP-02", name="波波", category="topping", quantity=3, paid_amount_fen=900
            ),
        ]
    return rewards_pb2.CompleteOrderRequest(
        store_id=store_id,
        pos_transaction_id=new_txn() if txn is None else txn,
        member_id=member_id,
        channel=channel,  # type: ignore[arg-type]
        paid_amount_fen=paid,
        # By default a list price a little above what was paid.
        gross_amount_fen=paid + 400 if gross is None else gross,
        lines=lines,
        ordered_at=ordered_at,
    )


async def table_counts(db: asyncpg.Connection) -> dict[str, int]:
    counts = {}
    for table in ("orders", "points_transactions", "points_entries", "points_balances"):
        counts[table] = await db.fetchval(f"SELECT count(*) FROM rewards.{table}")
    return counts


async def order_events(redis: Redis, infra: Infra, order_id: str) -> list[events_pb2.EventEnvelope]:
    found = []
    for _, fields in await redis.xrange(stream_name(infra.namespace, "rewards")):
        envelope = events_pb2.EventEnvelope()
        envelope.ParseFromString(fields[ENVELOPE_FIELD])
        if envelope.event_type != "loyalty.events.v1.OrderCompleted":
            continue
        payload = events_pb2.OrderCompleted()
        assert envelope.payload.Unpack(payload)
        if payload.order_id == order_id:
            found.append(envelope)
    return found


async def test_order_settles_and_credits_points(
    stub: rewards_pb2_grpc.RewardsServiceStub, db: asyncpg.Connection
) -> None:
    member = new_member()
    first = await stub.CompleteOrder(order_request(member, paid=2_850, gross=3_200))
    assert (first.points_earned, first.points_balance, first.replayed) == (28, 28, False)
    uuid.UUID(first.order_id)
    second = await stub.CompleteOrder(order_request(member, store_id="HZ001", paid=10_000))
    assert (second.points_earned, second.points_balance) == (100, 128)

    balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=member))
    assert (balance.member_id, balance.available, balance.lifetime_earned) == (member, 128, 128)

    row = await db.fetchrow("SELECT * FROM rewards.orders WHERE id = $1", uuid.UUID(first.order_id))
    assert row["store_id"] == "SH001"
    assert row["channel"] == "store"
    assert (row["paid_amount_fen"], row["gross_amount_fen"]) == (2_850, 3_200)
    assert row["ordered_at"] == ORDERED_AT
    assert row["points_earned"] == 28 and row["points_balance_after"] == 28
    assert len(row["request_hash"]) == 32
    assert '"name":"芝芝莓莓"' in row["lines"].replace(" ", "")

    txn = await db.fetchrow(
        "SELECT * FROM rewards.points_transactions WHERE order_id = $1", uuid.UUID(first.order_id)
    )
    assert (txn["kind"], txn["amount"], str(txn["member_id"])) == ("earn", 28, member)
    assert '"base_1pt_per_yuan"' in txn["rule"]
    entries = await db.fetch(
        "SELECT account, member_id, amount FROM rewards.points_entries"
        " WHERE transaction_id = $1 ORDER BY account",
        txn["id"],
    )
    assert [(e["account"], e["amount"]) for e in entries] == [
        ("issued_liability", -28),
        ("member_wallet", 28),
    ]
    assert (await audit_ledger(db, [member])).ok


async def test_retry_replays_the_first_result(
    stub: rewards_pb2_grpc.RewardsServiceStub, db: asyncpg.Connection
) -> None:
    member = new_member()
    request = order_request(member)
    first = await stub.CompleteOrder(request)
    again = await stub.CompleteOrder(request)
    assert again.replayed and not first.replayed
    assert (again.order_id, again.points_earned, again.points_balance) == (
        first.order_id,
        first.points_earned,
        first.points_balance,
    )
    # A later order moves the balance; a retry of the first still reports its own result.
    later = await stub.CompleteOrder(order_request(member, paid=5_000))
    assert later.points_balance == first.points_balance + 50
    late_retry = await stub.CompleteOrder(request)
    assert late_retry.replayed and late_retry.points_balance == first.points_balance

    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE member_id = $1",
            uuid.UUID(member),
        )
        == 2
    )
    balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=member))
    assert balance.available == first.points_earned + 50
    assert (await audit_ledger(db, [member])).ok


async def test_concurrent_identical_calls_accrue_once(
    stub: rewards_pb2_grpc.RewardsServiceStub,
    db: asyncpg.Connection,
    redis: Redis,
    infra: Infra,
) -> None:
    member = new_member()
    request = order_request(member, paid=4_321, gross=0, lines=[])
    replies = await asyncio.gather(*(stub.CompleteOrder(request) for _ in range(32)))

    assert len({r.order_id for r in replies}) == 1
    assert sum(not r.replayed for r in replies) == 1
    assert {(r.points_earned, r.points_balance) for r in replies} == {(43, 43)}
    order_id = uuid.UUID(replies[0].order_id)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.orders WHERE store_id = 'SH001' AND pos_transaction_id = $1",
            request.pos_transaction_id,
        )
        == 1
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE member_id = $1",
            uuid.UUID(member),
        )
        == 1
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.points_entries e JOIN rewards.points_transactions t"
            " ON t.id = e.transaction_id WHERE t.order_id = $1",
            order_id,
        )
        == 2
    )
    assert (
        await db.fetchval(
            "SELECT available FROM rewards.points_balances WHERE member_id = $1", uuid.UUID(member)
        )
        == 43
    )
    assert (await audit_ledger(db, [member])).ok

    # Exactly one event: published once the outbox has drained, and only once.
    await eventually(lambda: order_events(redis, infra, str(order_id)))
    await eventually(
        lambda: _outbox_empty(db),
    )
    assert len(await order_events(redis, infra, str(order_id))) == 1


async def _outbox_empty(db: asyncpg.Connection) -> bool:
    """Everything published (published rows are kept for replays)."""
    return await db.fetchval("SELECT count(*) FROM rewards.outbox WHERE published_at IS NULL") == 0


async def test_same_key_with_another_body_is_aborted(
    stub: rewards_pb2_grpc.RewardsServiceStub, db: asyncpg.Connection
) -> None:
    member = new_member()
    txn = new_txn()
    first = await stub.CompleteOrder(order_request(member, txn))
    for changed in (
        order_request(member, txn, paid=2_900),
        order_request(new_member(), txn),
        order_request(member, txn, channel=common_pb2.CHANNEL_MINI_PROGRAM),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CompleteOrder(changed)
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert error_info(caught.value) == ("IDEMPOTENCY_KEY_REUSED", "pos_transaction_id")
    # The same transaction id at another store is another order.
    elsewhere = await stub.CompleteOrder(order_request(member, txn, store_id="SH002"))
    assert elsewhere.order_id != first.order_id and not elsewhere.replayed
    balance = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=member))
    assert balance.available == 2 * first.points_earned
    assert (await audit_ledger(db, [member])).ok


def _line(quantity: int, paid: int) -> rewards_pb2.OrderLine:
    return rewards_pb2.OrderLine(sku="MT-01", name="奶茶", quantity=quantity, paid_amount_fen=paid)


BAD_REQUESTS = {
    "negative amount": (
        {"paid": -100, "gross": 0, "lines": []},
        grpc.StatusCode.INVALID_ARGUMENT,
        "NEGATIVE_AMOUNT",
        "paid_amount_fen",
    ),
    "absurd amount": (
        {"paid": 100_000_000, "gross": 0, "lines": []},
        grpc.StatusCode.INVALID_ARGUMENT,
        "ORDER_AMOUNT_TOO_LARGE",
        "paid_amount_fen",
    ),
    "line sum mismatch": (
        {"paid": 2_800, "lines": [_line(1, 1_000), _line(2, 1_000)]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "LINES_TOTAL_MISMATCH",
        "lines",
    ),
    "zero quantity": (
        {"paid": 2_800, "lines": [_line(0, 2_800)]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_QUANTITY",
        "lines[0].quantity",
    ),
    "gross below paid": (
        {"paid": 2_800, "gross": 2_000},
        grpc.StatusCode.INVALID_ARGUMENT,
        "GROSS_BELOW_PAID",
        "gross_amount_fen",
    ),
    "empty transaction id": (
        {"txn": ""},
        grpc.StatusCode.INVALID_ARGUMENT,
        "POS_TRANSACTION_ID_REQUIRED",
        "pos_transaction_id",
    ),
    "overlong transaction id": (
        {"txn": "X" * 65},
        grpc.StatusCode.INVALID_ARGUMENT,
        "POS_TRANSACTION_ID_TOO_LONG",
        "pos_transaction_id",
    ),
    "bad member id": (
        {"member": "member-42"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_MEMBER_ID",
        "member_id",
    ),
    "no channel": (
        {"channel": common_pb2.CHANNEL_UNSPECIFIED},
        grpc.StatusCode.INVALID_ARGUMENT,
        "CHANNEL_REQUIRED",
        "channel",
    ),
    "unknown channel": (
        {"channel": 99},
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_CHANNEL",
        "channel",
    ),
    "unknown store": (
        {"store_id": "NOPE01"},
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_STORE",
        "store_id",
    ),
    "closed store": (
        {"store_id": CLOSED_STORE},
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_STORE",
        "store_id",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_orders_are_refused_and_write_nothing(
    stub: rewards_pb2_grpc.RewardsServiceStub, db: asyncpg.Connection, case: str
) -> None:
    changes, status, code, field = BAD_REQUESTS[case]
    member = str(changes.pop("member", new_member()))
    txn = changes.pop("txn", None)
    request = order_request(member, new_txn() if txn is None else str(txn), **changes)  # type: ignore[arg-type]
    before = await table_counts(db)
    outbox_before = await db.fetchval("SELECT count(*) FROM rewards.outbox")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CompleteOrder(request)
    assert caught.value.code() == status
    assert error_info(caught.value) == (code, field)

    assert await table_counts(db) == before
    # The relay may drain the outbox meanwhile, never fill it from a refusal.
    assert await db.fetchval("SELECT count(*) FROM rewards.outbox") <= outbox_before
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.orders WHERE pos_transaction_id = $1",
            request.pos_transaction_id,
        )
        == 0
    )


async def test_zero_point_order_settles_without_a_ledger_transaction(
    stub: rewards_pb2_grpc.RewardsServiceStub, db: asyncpg.Connection
) -> None:
    member = new_member()
    request = order_request(member, paid=99, gross=0, lines=[])
    first = await stub.CompleteOrder(request)
    assert (first.points_earned, first.points_balance, first.replayed) == (0, 0, False)
    assert (await stub.CompleteOrder(request)).replayed
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.points_transactions WHERE member_id = $1",
            uuid.UUID(member),
        )
        == 0
    )
    assert (await audit_ledger(db, [member])).ok


async def test_order_completed_event_reaches_the_stream(
    stub: rewards_pb2_grpc.RewardsServiceStub, redis: Redis, infra: Infra
) -> None:
    member = new_member()
    request = order_request(
        member,
        store_id="SH003",
        paid=1_500,
        gross=1_800,
        lines=[],
        channel=common_pb2.CHANNEL_MINI_PROGRAM,
    )
    reply = await stub.CompleteOrder(request)
    envelopes = await eventually(lambda: order_events(redis, infra, reply.order_id))
    assert len(envelopes) == 1
    envelope = envelopes[0]
    assert (envelope.producer, envelope.member_id) == ("rewards", member)
    event = events_pb2.OrderCompleted()
    envelope.payload.Unpack(event)
    assert event.member_id == member
    assert (event.store_id, event.pos_transaction_id) == ("SH003", request.pos_transaction_id)
    assert event.channel == common_pb2.CHANNEL_MINI_PROGRAM
    # Mini-program orders earn double (the default earning rules).
    assert (event.paid_amount_fen, event.gross_amount_fen, event.points_earned) == (
        1_500,
        1_800,
        30,
    )
    assert event.ordered_at.ToDatetime(tzinfo=UTC) == ORDERED_AT


async def test_balance_of_a_member_without_ledger_is_zero(
    stub: rewards_pb2_grpc.RewardsServiceStub,
) -> None:
    member = new_member()
    reply = await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=member))
    assert (reply.member_id, reply.available, reply.lifetime_earned) == (member, 0, 0)
    for bad in ("", "nope"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetPointsBalance(rewards_pb2.GetPointsBalanceRequest(member_id=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[1] == "member_id"


async def test_get_store(stub: rewards_pb2_grpc.RewardsServiceStub) -> None:
    store = await stub.GetStore(rewards_pb2.GetStoreRequest(store_id="SH001"))
    assert (store.name, store.city, store.status) == ("静安寺店", "上海", "active")
    assert store.address.startswith("上海市静安区")
    assert 31.0 < store.latitude < 31.5 and 121.2 < store.longitude < 121.7
    closed = await stub.GetStore(rewards_pb2.GetStoreRequest(store_id=CLOSED_STORE))
    assert closed.status == "closed"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetStore(rewards_pb2.GetStoreRequest(store_id="NOPE01"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value) == ("UNKNOWN_STORE", "store_id")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetStore(rewards_pb2.GetStoreRequest(store_id=""))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value) == ("STORE_ID_REQUIRED", "store_id")


async def test_whole_ledger_audits_clean_and_audit_catches_drift(
    stub: rewards_pb2_grpc.RewardsServiceStub, db: asyncpg.Connection
) -> None:
    await stub.CompleteOrder(order_request(new_member()))
    assert (await audit_ledger(db)).ok
    # A balance the journal does not explain must be reported.
    stray = new_member()
    async with db.transaction():
        await db.execute(
            "INSERT INTO rewards.points_balances (member_id, available, lifetime_earned)"
            " VALUES ($1, 7, 7)",
            uuid.UUID(stray),
        )
        report = await audit_ledger(db)
        assert not report.ok
        assert [m.member_id for m in report.balance_mismatches] == [stray]
        assert (
            report.balance_mismatches[0].available,
            report.balance_mismatches[0].journal_available,
        ) == (7, 0)
        await db.execute(
            "DELETE FROM rewards.points_balances WHERE member_id = $1", uuid.UUID(stray)
        )
    assert (await audit_ledger(db)).ok
