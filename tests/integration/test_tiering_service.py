"""Tiering service against real PostgreSQL and Redis: the OrderCompleted consumer,
GetMemberSpend, the demo seed and programme versions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.errors import error_info
from servicekit.events import ENVELOPE_FIELD, dead_letter_stream, make_envelope, stream_name
from servicekit.protos import timestamp as ts
from services.tiering import repository as repo
from services.tiering.domain import QualifyingMetric, TierProgramme
from services.tiering.seed import DEMO_PROGRAMME, seed_demo

from ..harness import Infra, eventually
from . import test_tiering_tiers as tiers

# The same fixtures as test_tiering_tiers; pytest finds them as module attributes.
redis, conn, stub = tiers.redis, tiers.conn, tiers.stub


def order(member_id: str, paid_fen: int, ordered_at: datetime) -> events_pb2.EventEnvelope:
    return make_envelope(
        "rewards",
        events_pb2.OrderCompleted(
            order_id=str(uuid.uuid4()),
            member_id=member_id,
            store_id="store-001",
            paid_amount_fen=paid_fen,
            gross_amount_fen=paid_fen,
            ordered_at=ts(ordered_at),
        ),
        member_id,
    )


async def publish(redis: Redis, infra: Infra, envelope: events_pb2.EventEnvelope) -> str:
    entry_id = await redis.xadd(
        stream_name(infra.namespace, "rewards"), {ENVELOPE_FIELD: envelope.SerializeToString()}
    )
    return entry_id.decode()


def _id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, seq = text.split("-")
    return int(ms), int(seq)


async def consumed(
    redis: Redis, infra: Infra, entry_ids: list[str], group: str = "tiering"
) -> bool:
    """The group has read every entry and acknowledged it (handled or dropped)."""
    stream = stream_name(infra.namespace, "rewards")
    groups = [g for g in await redis.xinfo_groups(stream) if g["name"].decode() == group]
    if not groups or _id(groups[0]["last-delivered-id"]) < max(_id(e) for e in entry_ids):
        return False
    for entry_id in entry_ids:
        if await redis.xpending_range(stream, group, min=entry_id, max=entry_id, count=1):
            return False
    return True


async def spend(
    stub: tiering_pb2_grpc.TieringServiceStub, member_id: str
) -> tiering_pb2.MemberSpend:
    return await stub.GetMemberSpend(tiering_pb2.GetMemberSpendRequest(member_id=member_id))


async def test_order_completed_counts_once_despite_redelivery(
    stub: tiering_pb2_grpc.TieringServiceStub,
    redis: Redis,
    infra: Infra,
    conn: asyncpg.Connection,
) -> None:
    member_id = str(uuid.uuid4())
    ordered_at = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    envelope = order(member_id, 2_800, ordered_at)

    await publish(redis, infra, envelope)
    first = await eventually(lambda: _order_count_is(stub, member_id, 1), timeout=10)
    assert first.total_paid_fen == 2_800
    assert first.last_order_at.ToDatetime(tzinfo=UTC) == ordered_at

    # The same envelope twice more, as a relay that crashed before deleting would send it.
    again = [await publish(redis, infra, envelope) for _ in range(2)]
    await eventually(lambda: consumed(redis, infra, again))
    after = await spend(stub, member_id)
    assert (after.total_paid_fen, after.order_count) == (2_800, 1)
    recorded = await conn.fetchval(
        "SELECT count(*) FROM tiering.processed_events WHERE consumer = 'tiering' AND event_id = $1",
        uuid.UUID(envelope.event_id),
    )
    assert recorded == 1


async def _order_count_is(
    stub: tiering_pb2_grpc.TieringServiceStub, member_id: str, count: int
) -> tiering_pb2.MemberSpend | None:
    reply = await spend(stub, member_id)
    return reply if reply.order_count == count else None


async def test_late_offline_order_adds_spend_but_keeps_latest_order_time(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    member_id = str(uuid.uuid4())
    newer = datetime(2026, 5, 2, 9, 0, tzinfo=UTC)
    await publish(redis, infra, order(member_id, 1_500, newer))
    # A POS replays an order taken offline the day before.
    await publish(redis, infra, order(member_id, 2_100, newer - timedelta(days=1)))
    reply = await eventually(lambda: _order_count_is(stub, member_id, 2))
    assert reply.total_paid_fen == 3_600
    assert reply.last_order_at.ToDatetime(tzinfo=UTC) == newer


async def test_tier_follows_the_seeded_ladder(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    member_id = str(uuid.uuid4())
    at = datetime(2026, 4, 1, tzinfo=UTC)
    await publish(redis, infra, order(member_id, 49_999, at))
    reply = await eventually(lambda: _order_count_is(stub, member_id, 1))
    assert (reply.tier_code, reply.tier_name) == ("regular", "普通会员")

    await publish(redis, infra, order(member_id, 1, at))
    reply = await eventually(lambda: _order_count_is(stub, member_id, 2))
    assert (reply.total_paid_fen, reply.tier_code, reply.tier_name) == (50_000, "svip", "SVIP")

    await publish(redis, infra, order(member_id, 100_000, at))
    reply = await eventually(lambda: _order_count_is(stub, member_id, 3))
    assert (reply.total_paid_fen, reply.tier_code, reply.tier_name) == (150_000, "vip", "VIP")


async def test_unknown_member_has_zero_spend(stub: tiering_pb2_grpc.TieringServiceStub) -> None:
    member_id = str(uuid.uuid4())
    reply = await spend(stub, member_id)
    assert reply.member_id == member_id
    assert (reply.total_paid_fen, reply.order_count) == (0, 0)
    assert not reply.HasField("last_order_at")
    assert reply.tier_code == "regular"


@pytest.mark.parametrize("bad", ["", "42", "not-a-uuid"])
async def test_malformed_member_id_is_invalid_argument(
    stub: tiering_pb2_grpc.TieringServiceStub, bad: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await spend(stub, bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value) == ("INVALID_MEMBER_ID", "member_id")


async def test_malformed_order_event_is_dead_lettered(
    stub: tiering_pb2_grpc.TieringServiceStub, redis: Redis, infra: Infra
) -> None:
    bad = order("not-a-uuid", 1_000, datetime(2026, 1, 1, tzinfo=UTC))
    entry_id = await publish(redis, infra, bad)
    dlq = dead_letter_stream(infra.namespace, "rewards", "tiering")

    async def parked() -> Any:
        for _, fields in await redis.xrange(dlq):
            if fields[b"source_id"].decode() == entry_id:
                return fields
        return None

    fields = await eventually(parked, timeout=15)
    assert b"'not-a-uuid' is not a UUID" in fields[b"error"]
    assert int(fields[b"attempts"]) == 3  # event_max_attempts in the test settings
    assert await consumed(redis, infra, [entry_id])


async def test_seed_is_idempotent(conn: asyncpg.Connection) -> None:
    await seed_demo(conn)
    await seed_demo(conn)
    rows = await conn.fetch(
        "SELECT version, qualifying_metric, window_months FROM tiering.tier_programmes"
        " WHERE programme_id = 'default'"
    )
    assert [tuple(r) for r in rows] == [(1, "paid_spend", 12)]
    stored = await repo.programme_at(conn, "default", datetime.now(UTC))
    assert stored == DEMO_PROGRAMME


async def test_new_programme_version_applies_from_its_effective_date(
    conn: asyncpg.Connection,
) -> None:
    programme_id = f"test-{uuid.uuid4().hex[:8]}"
    v1 = TierProgramme(
        programme_id,
        1,
        datetime(2025, 1, 1, tzinfo=UTC),
        QualifyingMetric.PAID_SPEND,
        12,
        DEMO_PROGRAMME.ladder,
    )
    v2 = TierProgramme(
        programme_id,
        2,
        datetime(2025, 7, 1, tzinfo=UTC),
        QualifyingMetric.ORDER_COUNT,
        6,
        DEMO_PROGRAMME.ladder,
    )
    assert await repo.insert_programme(conn, v1)
    assert await repo.insert_programme(conn, v2)
    assert await repo.programme_at(conn, programme_id, datetime(2024, 12, 31, tzinfo=UTC)) is None
    assert await repo.programme_at(conn, programme_id, datetime(2025, 6, 30, tzinfo=UTC)) == v1
    assert await repo.programme_at(conn, programme_id, datetime(2025, 7, 1, tzinfo=UTC)) == v2
    # A written version is immutable: re-inserting it changes nothing.
    changed = TierProgramme(
        programme_id, 1, v1.effective_from, QualifyingMetric.ORDER_COUNT, 3, v1.ladder
    )
    assert not await repo.insert_programme(conn, changed)
    assert await repo.programme_at(conn, programme_id, datetime(2025, 6, 30, tzinfo=UTC)) == v1
