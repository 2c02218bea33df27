"""Coupons end to end through the gateway: an operator creates a claimable
template, a member claims it in the mini-program, the till previews the cart,
locks the coupon, completes the sale with it (a retry replays), refunds it in
full and gets the coupon back; the operator's report counts it all."""

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
LINES = [
    pos_pb2.OrderLine(sku="MILK", name="奶茶", category="tea", quantity=2, paid_amount_fen=3600),
    pos_pb2.OrderLine(sku="FRUIT", name="果茶", category="tea", quantity=3, paid_amount_fen=6600),
]  # 10200 fen before coupons


async def enrol(pos: Pos) -> str:
    phone = f"135{random.randrange(10**8):08d}"
    reply = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    return str(reply.member_id)


async def test_claim_preview_lock_redeem_refund_report(
    pos: Pos, http: httpx.AsyncClient, demo_stores: list[str]
) -> None:
    template_id = f"E2E-{uuid.uuid4().hex[:8]}"
    created = await http.post(
        "/v1/admin/coupon-templates",
        json={
            "template_id": template_id,
            "terms": {
                "name": "满99减30",
                "kind": "amount_off",
                "threshold_fen": 9900,
                "discount_fen": 3000,
                "valid_days": 30,
                "claimable": True,
                "restore_on_refund": True,
            },
            "limits": {"total_stock": 10, "per_member_limit": 1},
            "status": "active",
        },
    )
    assert created.status_code == 201, created.text
    assert (created.json()["version"], created.json()["remaining_stock"]) == (1, 10)
    bad = await http.post(
        "/v1/admin/coupon-templates",
        json={
            "template_id": "E2E-BAD",
            "terms": {"name": "x", "kind": "percent_off", "valid_days": 1},
        },
    )
    assert (bad.status_code, bad.json()["field"]) == (422, "percent")

    member = await enrol(pos)
    claim = {"template_id": template_id, "issue_key": "claim-1"}
    claimed = await http.post(f"/v1/members/{member}/coupons", json=claim)
    assert claimed.status_code == 201, claimed.text
    again = await http.post(f"/v1/members/{member}/coupons", json=claim)
    assert again.json()["replayed"] is True and again.json()["code"] == claimed.json()["code"]
    second = await http.post(
        f"/v1/members/{member}/coupons", json={"template_id": template_id, "issue_key": "2"}
    )
    assert (second.status_code, second.json()["code"]) == (409, "MEMBER_LIMIT_REACHED")
    # The longest key that fits once namespaced per member is taken; one more
    # character is refused here, naming the field, not by rewards after the prefix.
    for length, status in ((85, 409), (86, 422)):
        sized = await http.post(
            f"/v1/members/{member}/coupons",
            json={"template_id": template_id, "issue_key": "k" * length},
        )
        assert sized.status_code == status, sized.text
    # The gateway's own validation (rewards would say INVALID_ISSUE_KEY).
    assert (sized.json()["code"], sized.json()["field"]) == ("INVALID_ARGUMENT", "issue_key")
    code = claimed.json()["code"]

    wallet = (await http.get(f"/v1/members/{member}/coupons?status=available")).json()
    assert [c["code"] for c in wallet["coupons"]] == [code]

    preview = await pos.PreviewCheckout(
        pos_pb2.PreviewCheckoutRequest(
            store_id=STORE, member_id=member, lines=LINES, gross_amount_fen=10200
        ),
        timeout=10,
    )
    assert (preview.best_code, preview.coupon_discount_fen, preview.payable_fen) == (
        code,
        3000,
        7200,
    )

    txn = f"CP-{uuid.uuid4().hex[:10]}"
    lock = pos_pb2.LockCouponRequest(
        store_id=STORE, pos_transaction_id=txn, member_id=member, code=code
    )
    assert (await pos.LockCoupon(lock, timeout=10)).status == "locked"
    other = pos_pb2.LockCouponRequest(
        store_id=STORE, pos_transaction_id=txn + "-other", member_id=member, code=code
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pos.LockCoupon(other, timeout=10)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert error_info(caught.value) == ("COUPON_LOCKED", "code")

    sale = pos_pb2.CompleteOrderRequest(
        store_id=STORE,
        pos_transaction_id=txn,
        member_id=member,
        paid_amount_fen=7200,
        gross_amount_fen=10200,
        lines=LINES,
        coupon_codes=[code],
    )
    done = await pos.CompleteOrder(sale, timeout=10)
    assert (done.coupon_discount_fen, done.points_earned, done.replayed) == (3000, 72, False)
    retry = await pos.CompleteOrder(sale, timeout=10)
    assert (retry.replayed, retry.order_id, retry.coupon_discount_fen) == (
        True,
        done.order_id,
        3000,
    )

    refund = await pos.RefundOrder(
        pos_pb2.RefundOrderRequest(
            store_id=STORE,
            pos_transaction_id=txn,
            refund_transaction_id=txn + "-R",
            refunded_amount_fen=7200,
        ),
        timeout=10,
    )
    assert [(c.code, c.restored) for c in refund.coupons] == [(code, True)]

    report = (await http.get(f"/v1/admin/coupon-templates/{template_id}/report")).json()
    assert (report["issued"], report["remaining_stock"]) == (1, 9)

    paused = await http.put(
        f"/v1/admin/coupon-templates/{template_id}/status", json={"status": "paused"}
    )
    assert paused.json()["status"] == "paused"
    granted = await http.post(
        "/v1/admin/coupons:issue",
        json={
            "template_id": template_id,
            "member_id": member,
            "issue_key": "g1",
        },
    )
    assert (granted.status_code, granted.json()["code"]) == (409, "TEMPLATE_PAUSED")
