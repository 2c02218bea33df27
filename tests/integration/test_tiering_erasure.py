"""MemberErased in tiering against real PostgreSQL and Redis: per-member rows go,
facts stay anonymised so totals still add up, a second erasure changes nothing,
and later events or calls for an erased member change nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.errors import error_info

from ..harness import Infra, eventually
from . import test_tiering_tiers as tiers
from .test_tiering_tiers import order, publish, rpc_error, tier_is, ts

NOW = datetime.now(UTC)
PER_MEMBER = ("member_tiers", "member_spend", "member_profiles")
FACTS = ("orders", "growth_ledger", "tier_history")

# The same fixtures as test_tiering_tiers; pytest finds them as module attributes.
redis, conn, stub = tiers.redis, tiers.conn, tiers.stub


async def processed(conn: asyncpg.Connection, event_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT true FROM tiering.processed_events WHERE event_id = $1", uuid.UUID(event_id)
        )
    )


async def snapshot(conn: asyncpg.Connection, members: list[uuid.UUID], orders: list[str]) -> dict:
    """Everything tiering holds that names these members, and the totals of their facts."""
    out: dict[str, object] = {}
    for table in PER_MEMBER:
        out[table] = await conn.fetchval(
            f"SELECT count(*) FROM tiering.{table} WHERE member_id = ANY($1::uuid[])", members
        )
    for table in FACTS:
        out[table] = await conn.fetchval(
            f"SELECT count(*) FROM tiering.{table}"
            " WHERE member_id = ANY($1::uuid[]) OR merged_from = ANY($1::uuid[])",
            members,
        )
    out["merges"] = await conn.fetchval(
        "SELECT count(*) FROM tiering.member_merges"
        " WHERE survivor_id = ANY($1::uuid[]) OR absorbed_id = ANY($1::uuid[])",
        members,
    )
    out["scoped_refs"] = await conn.fetchval(
        "SELECT count(*) FROM tiering.growth_ledger WHERE split_part(ref, ':', 1) = ANY($1)",
        [str(m) for m in members],
    )
    out["order_totals"] = tuple(
        await conn.fetchrow(
            "SELECT count(*), coalesce(sum(paid_fen), 0), coalesce(sum(growth), 0)"
            " FROM tiering.orders WHERE order_id = ANY($1)",
            orders,
        )
    )
    out["erased"] = await conn.fetchval(
        "SELECT count(*) FROM tiering.erased_members WHERE member_id = ANY($1::uuid[])", members
    )
    return out


async def test_erasure_anonymises_once_and_later_events_change_nothing(
    stub: tiering_pb2_grpc.TieringServiceStub,
    redis: Redis,
    infra: Infra,
    conn: asyncpg.Connection,
) -> None:
    survivor, absorbed, bystander = (str(uuid.uuid4()) for _ in range(3))
    await publish(
        redis,
        infra,
        "member",
        events_pb2.MemberRegistered(member_id=survivor, registered_at=ts(NOW)),
        survivor,
    )
    orders = [
        await order(redis, infra, survivor, 40_000, NOW - timedelta(days=3)),
        await order(redis, infra, absorbed, 12_000, NOW - timedelta(days=2)),
        await order(redis, infra, bystander, 9_000, NOW - timedelta(days=2)),
    ]
    await eventually(lambda: tier_is(stub, absorbed, "regular", 12_000))
    await stub.RecordGrowthAction(
        tiering_pb2.RecordGrowthActionRequest(
            member_id=survivor, action="check_in", reference_id="c1"
        )
    )
    merge = events_pb2.MemberMerged(
        merge_id=str(uuid.uuid4()),
        survivor_member_id=survivor,
        absorbed_member_id=absorbed,
        merged_at=ts(NOW),
    )
    await publish(redis, infra, "member", merge, survivor)
    await eventually(lambda: tier_is(stub, survivor, "svip", 52_000))
    cluster = [uuid.UUID(survivor), uuid.UUID(absorbed)]
    before = await snapshot(conn, cluster, orders[:2])
    assert before["member_tiers"] == 1 and before["tier_history"] >= 2
    assert before["merges"] == 1 and before["scoped_refs"] == 1

    erased = events_pb2.MemberErased(member_ids=[survivor, absorbed], erased_at=ts(NOW))
    first = await publish(redis, infra, "member", erased, survivor)
    await eventually(lambda: processed(conn, first))
    after = await snapshot(conn, cluster, orders[:2])
    # Nothing names the members any more, the order totals are intact.
    assert after == {
        **{table: 0 for table in (*PER_MEMBER, *FACTS)},
        "merges": 0,
        "scoped_refs": 0,
        "order_totals": before["order_totals"],
        "erased": 2,
    }
    assert before["order_totals"][:2] == (2, 52_000)
    anonymous = await conn.fetchval(
        "SELECT count(*) FROM tiering.tier_history WHERE member_id IS NULL AND figures = '{}'"
    )
    assert anonymous >= before["tier_history"]

    # A second erasure (a new event, same cluster) finds nothing left to change.
    second = await publish(redis, infra, "member", erased, survivor)
    await eventually(lambda: processed(conn, second))
    assert await snapshot(conn, cluster, orders[:2]) == after

    # Later events for an erased member are no-ops: an order, a refund of an
    # anonymised order, a registration, a merge.
    late = str(uuid.uuid4())
    late_events = [
        await publish(
            redis,
            infra,
            "rewards",
            events_pb2.OrderCompleted(
                order_id=late,
                member_id=survivor,
                store_id="SH001",
                paid_amount_fen=200_000,
                gross_amount_fen=200_000,
                ordered_at=ts(NOW),
            ),
            survivor,
        ),
        await publish(
            redis,
            infra,
            "rewards",
            events_pb2.OrderRefunded(
                refund_id=f"rf-{uuid.uuid4()}",
                order_id=orders[0],
                member_id=survivor,
                refunded_amount_fen=40_000,
                refunded_at=ts(NOW),
            ),
            survivor,
        ),
        await publish(
            redis,
            infra,
            "member",
            events_pb2.MemberRegistered(member_id=absorbed, registered_at=ts(NOW)),
            absorbed,
        ),
        await publish(
            redis,
            infra,
            "member",
            events_pb2.MemberMerged(
                merge_id=str(uuid.uuid4()),
                survivor_member_id=bystander,
                absorbed_member_id=survivor,
                merged_at=ts(NOW),
            ),
            bystander,
        ),
    ]
    for event_id in late_events:
        await eventually(lambda e=event_id: processed(conn, e))
    assert await snapshot(conn, cluster, orders[:2]) == after
    assert not await conn.fetchval("SELECT true FROM tiering.orders WHERE order_id = $1", late)
    # The bystander kept its own order and nothing of the erased cluster.
    assert await tier_is(stub, bystander, "regular", 9_000)

    # Operator calls that would write for an erased member are refused.
    err = await rpc_error(
        stub.RecordGrowthAction(
            tiering_pb2.RecordGrowthActionRequest(
                member_id=survivor, action="check_in", reference_id="c2"
            )
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err) == ("MEMBER_ERASED", "member_id")
    assert await snapshot(conn, cluster, orders[:2]) == after
