"""UploadOfflineOrders: a store's offline orders, each settled once, in order,
with a result per order; uploading again after a partial upload is safe."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest
from google.protobuf import timestamp_pb2

from loyalty.pos.v1 import pos_pb2
from servicekit.errors import error_info

from .test_pos_slice import STORE, Pos, identify, new_phone, new_txn, points, rpc_error

pytestmark = pytest.mark.e2e

OUTCOME = pos_pb2.OfflineOrderOutcome


def ts(at: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


def offline_order(
    member_id: str,
    paid_fen: int,
    ago: timedelta = timedelta(hours=1),
    txn: str | None = None,
    store_id: str = "",
    **extra: object,
) -> pos_pb2.OfflineOrder:
    return pos_pb2.OfflineOrder(
        order=pos_pb2.CompleteOrderRequest(
            store_id=store_id,
            pos_transaction_id=txn or new_txn(),
            member_id=member_id,
            paid_amount_fen=paid_fen,
            ordered_at=ts(datetime.now(UTC) - ago),
            **extra,  # type: ignore[arg-type]
        )
    )


async def upload(
    pos: Pos, orders: list[pos_pb2.OfflineOrder], store_id: str = STORE, timeout: float = 30
) -> pos_pb2.UploadOfflineOrdersResponse:
    return await pos.UploadOfflineOrders(
        pos_pb2.UploadOfflineOrdersRequest(store_id=store_id, orders=orders), timeout=timeout
    )


def outcomes(reply: pos_pb2.UploadOfflineOrdersResponse) -> list[str]:
    return [OUTCOME.Name(r.outcome).removeprefix("OFFLINE_ORDER_OUTCOME_") for r in reply.results]


async def test_orders_apply_in_order_and_a_second_upload_replays(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    member = await identify(pos, new_phone())
    orders = [
        offline_order(member.member_id, fen, ago=timedelta(hours=h))
        for fen, h in ((1000, 3), (2000, 2), (500, 1))
    ]
    first = await upload(pos, orders)
    assert outcomes(first) == ["APPLIED"] * 3
    assert (first.applied, first.replayed, first.rejected) == (3, 0, 0)
    assert [r.points_earned for r in first.results] == [10, 20, 5]
    # In order: each balance is the one after that order.
    assert [r.points_balance for r in first.results] == [10, 30, 35]
    assert [r.pos_transaction_id for r in first.results] == [
        o.order.pos_transaction_id for o in orders
    ]

    again = await upload(pos, orders)
    assert outcomes(again) == ["REPLAYED"] * 3
    assert [r.order_id for r in again.results] == [r.order_id for r in first.results]
    assert (await points(http, member.member_id))["available"] == 35


async def settled_balance(http: httpx.AsyncClient, member_id: str) -> int:
    """The member's balance once it stopped moving: three reads 0.3 s apart
    agree. A cut upload's handler may still be settling orders after the POS
    gave up (CI once read 109 points half a second after the cut, and the
    same upload had settled all 120 before the retry reached them)."""
    seen: list[int] = []
    for _ in range(100):
        balance = (await points(http, member_id))["available"]
        assert isinstance(balance, int)
        seen = [*seen[-2:], balance]
        if len(seen) == 3 and len(set(seen)) == 1:
            return balance
        await asyncio.sleep(0.3)
    raise AssertionError(f"the balance kept moving: {seen}")


async def test_a_partial_upload_then_the_whole_batch_counts_each_order_once(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    member = await identify(pos, new_phone())
    orders = [offline_order(member.member_id, 100) for _ in range(120)]
    # A partial upload by construction: the first 40, then the POS goes offline.
    first = await upload(pos, orders[:40])
    assert (first.applied, first.replayed) == (40, 0)
    # The POS loses the connection mid-batch: its deadline cuts the call short
    # (no machine settles 120 orders in 50 ms).
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await upload(pos, orders, timeout=0.05)
    assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    partial = await settled_balance(http, member.member_id)
    assert 40 <= partial <= 120

    whole = await upload(pos, orders)
    assert (whole.applied, whole.replayed) == (120 - partial, partial)
    assert whole.rejected == whole.not_attempted == 0
    assert (await points(http, member.member_id))["available"] == 120


async def test_bad_orders_are_rejected_one_by_one_and_the_rest_apply(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    member = await identify(pos, new_phone())
    m = member.member_id
    orders = [
        offline_order(m, 1000),
        offline_order(m, 1000, ago=timedelta(days=30)),  # outside the 72 h window
        offline_order(m, 1000, store_id="SH002"),  # another store's order
        offline_order(m, -5),  # rewards' own rule
        offline_order(m, 1000, ago=timedelta(hours=-2)),  # the till's clock is wrong
        pos_pb2.OfflineOrder(
            order=pos_pb2.CompleteOrderRequest(
                pos_transaction_id=new_txn(), member_id=m, paid_amount_fen=100
            )
        ),  # no ordered_at
        offline_order(m, 700),
    ]
    reply = await upload(pos, orders)
    assert outcomes(reply) == [
        "APPLIED",
        "REJECTED",
        "REJECTED",
        "REJECTED",
        "REJECTED",
        "REJECTED",
        "APPLIED",
    ]
    rejected = [
        (r.code, r.field)
        for r in reply.results
        if r.outcome == OUTCOME.Value("OFFLINE_ORDER_OUTCOME_REJECTED")
    ]
    assert rejected[0] == ("ORDER_TOO_OLD", "orders[1].order.ordered_at")
    assert rejected[1] == ("STORE_MISMATCH", "orders[2].order.store_id")
    assert rejected[2][1] == "orders[3].order.paid_amount_fen"
    assert rejected[3] == ("ORDERED_AT_IN_FUTURE", "orders[4].order.ordered_at")
    assert rejected[4] == ("ORDERED_AT_REQUIRED", "orders[5].order.ordered_at")
    assert all(r.message for r in reply.results if r.code)
    # Only the two good orders counted.
    assert (await points(http, m))["available"] == 17


async def test_the_batch_itself_is_checked_before_anything_applies(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    member = await identify(pos, new_phone())
    too_many = [offline_order(member.member_id, 100) for _ in range(501)]
    err = await rpc_error(upload(pos, too_many))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("BATCH_TOO_LARGE", "orders")
    err = await rpc_error(upload(pos, []))
    assert error_info(err) == ("ORDERS_REQUIRED", "orders")
    err = await rpc_error(upload(pos, [offline_order(member.member_id, 100)], store_id=""))
    assert error_info(err) == ("STORE_ID_REQUIRED", "store_id")
    assert (await points(http, member.member_id))["available"] == 0
