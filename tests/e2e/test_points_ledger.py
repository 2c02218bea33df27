"""Points end to end through the gateway: a POS checkout that redeems points,
a refund from the POS, and the mini-program and operator HTTP routes."""

from __future__ import annotations

import random
import uuid

import grpc
import httpx
import pytest

from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info

pytestmark = pytest.mark.e2e

STORE = "SH001"
Pos = pos_pb2_grpc.PosServiceStub


async def member_with_points(pos: Pos, paid_fen: int) -> tuple[str, str]:
    phone = f"137{random.randrange(10**8):08d}"
    member = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    txn = f"P-{uuid.uuid4().hex[:12]}"
    await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=txn,
            member_id=member.member_id,
            paid_amount_fen=paid_fen,
        ),
        timeout=10,
    )
    return member.member_id, txn


async def test_pos_checkout_redeems_and_refunds(pos: Pos, http: httpx.AsyncClient) -> None:
    member, first_txn = await member_with_points(pos, 10_000)  # 100 points
    txn = f"P-{uuid.uuid4().hex[:12]}"
    order = pos_pb2.CompleteOrderRequest(
        store_id=STORE,
        pos_transaction_id=txn,
        member_id=member,
        paid_amount_fen=2_000,
        points_to_redeem=60,
    )
    reply = await pos.CompleteOrder(order, timeout=10)
    # 100 - 60 redeemed + 20 earned.
    assert (reply.points_earned, reply.points_balance) == (20, 60)
    retry = await pos.CompleteOrder(order, timeout=10)
    assert retry.replayed and retry.points_balance == 60

    too_much = pos_pb2.CompleteOrderRequest(
        store_id=STORE,
        pos_transaction_id=txn + "-x",
        member_id=member,
        paid_amount_fen=2_000,
        points_to_redeem=500,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pos.CompleteOrder(too_much, timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value) == ("INSUFFICIENT_POINTS", "points_to_redeem")

    # Refund half of the first order: 50 points come back out of its lot.
    refund = pos_pb2.RefundOrderRequest(
        store_id=STORE,
        pos_transaction_id=first_txn,
        refund_transaction_id=first_txn + "-R1",
        refunded_amount_fen=5_000,
    )
    refunded = await pos.RefundOrder(refund, timeout=10)
    assert (refunded.points_due, refunded.points_reversed, refunded.points_balance) == (50, 40, 20)
    assert refunded.points_debt == 10  # 60 of its 100 were spent: 10 owed
    again = await pos.RefundOrder(refund, timeout=10)
    assert again.replayed and again.refund_id == refunded.refund_id
    refund.refund_transaction_id += "-too-much"
    refund.refunded_amount_fen = 5_001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pos.RefundOrder(refund, timeout=10)
    assert error_info(caught.value) == ("REFUND_EXCEEDS_ORDER", "refunded_amount_fen")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pos.RefundOrder(pos_pb2.RefundOrderRequest(store_id=STORE), timeout=10)
    assert error_info(caught.value) == ("POS_TRANSACTION_ID_REQUIRED", "pos_transaction_id")

    summary = (await http.get(f"/v1/members/{member}/points/summary")).json()
    assert (summary["available"], summary["debt"], summary["pending"]) == (20, 10, 0)

    # Refunding the checkout that used points gives the 60 back and takes its
    # 20; the 10 owed are repaid out of the 60 first (docs/ledger.md, "Debt").
    back = await pos.RefundOrder(
        pos_pb2.RefundOrderRequest(
            store_id=STORE,
            pos_transaction_id=txn,
            refund_transaction_id=txn + "-R",
            refunded_amount_fen=2_000,
        ),
        timeout=10,
    )
    assert (back.points_reversed, back.points_restored, back.points_balance) == (20, 60, 50)
    after = (await http.get(f"/v1/members/{member}/points/summary")).json()
    assert (after["available"], after["debt"]) == (50, 0)

    history = await http.get(f"/v1/members/{member}/points/history", params={"page_size": 2})
    assert history.status_code == 200, history.text
    page = history.json()
    assert [line["kind"] for line in page["lines"]] == ["refund", "refund"]
    assert [line["amount"] for line in page["lines"]] == [30, -40]
    assert [line["balance_after"] for line in page["lines"]] == [50, 20]
    rest = await http.get(
        f"/v1/members/{member}/points/history", params={"cursor": page["next_cursor"]}
    )
    assert [line["kind"] for line in rest.json()["lines"]] == ["earn", "redeem", "earn"]
    assert rest.json()["next_cursor"] is None


async def test_operator_adjustment_expiring_and_liability(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    member, _ = await member_with_points(pos, 3_000)
    body = {
        "points": 15,
        "reason": "store apology",
        "idempotency_key": member,
    }
    reply = await http.post(f"/v1/admin/members/{member}/points/adjustments", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["available"] == 45
    again = await http.post(f"/v1/admin/members/{member}/points/adjustments", json=body)
    assert again.json()["replayed"] is True
    bad = await http.post(
        f"/v1/admin/members/{member}/points/adjustments",
        json=body | {"points": 0, "idempotency_key": "z"},
    )
    assert bad.status_code == 422 and bad.json()["field"] == "points"

    expiring = await http.get(f"/v1/members/{member}/points/expiring", params={"days": 800})
    assert sum(b["points"] for b in expiring.json()["batches"]) == 45
    liability = (await http.get("/v1/admin/points/liability")).json()
    assert liability["available"] >= 45
    # Entries sum to zero: what members hold is what was issued, less redeemed
    # and expired, plus adjustments.
    held_by_members = (
        liability["available"] + liability["pending"] + liability["held"] - liability["debt"]
    )
    assert held_by_members == (
        liability["issued"] - liability["redeemed"] - liability["expired"] + liability["adjusted"]
    )
