"""The rewards routes of issue 13, item 24, end to end through the gateway:
non-order earning actions and the two-phase points hold (hold, post, void)
for the mini-program, the invitee's own referral status, an operator revoking
an issued coupon and changing a template's stock and limits (never below what
was issued)."""

from __future__ import annotations

import random
import uuid

import httpx
import pytest

from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc

pytestmark = pytest.mark.e2e

STORE = "SH001"
Pos = pos_pb2_grpc.PosServiceStub


async def enrol(pos: Pos, paid_fen: int = 0) -> str:
    phone = f"135{random.randrange(10**8):08d}"
    reply = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    if paid_fen:
        await pos.CompleteOrder(
            pos_pb2.CompleteOrderRequest(
                store_id=STORE,
                pos_transaction_id=f"RR-{uuid.uuid4().hex[:12]}",
                member_id=reply.member_id,
                paid_amount_fen=paid_fen,
            ),
            timeout=10,
        )
    return str(reply.member_id)


async def available(http: httpx.AsyncClient, member: str) -> int:
    return int((await http.get(f"/v1/members/{member}/points")).json()["available"])


async def test_actions_and_two_phase_holds_for_the_mini_program(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    member = await enrol(pos, 10_000)  # 100 points
    key = f"ci-{uuid.uuid4().hex[:8]}"
    checked_in = await http.post(
        f"/v1/members/{member}/points/actions", json={"action": "check_in", "idempotency_key": key}
    )
    assert checked_in.status_code == 200, checked_in.text
    earned = checked_in.json()["points"]
    assert earned > 0 and await available(http, member) == 100 + earned
    again = await http.post(
        f"/v1/members/{member}/points/actions", json={"action": "check_in", "idempotency_key": key}
    )
    assert again.json()["replayed"] is True and await available(http, member) == 100 + earned
    # Referral points are the programme's to grant, not the member's to claim.
    claimed = await http.post(
        f"/v1/members/{member}/points/actions",
        json={"action": "referral", "idempotency_key": key + "-r"},
    )
    assert claimed.status_code == 422

    base = f"/v1/members/{member}/points/holds"
    held = await http.post(base, json={"points": 30, "idempotency_key": "h-" + key})
    assert held.status_code == 200, held.text
    hold = held.json()
    assert hold["hold_status"] == "held" and hold["available"] == 70 + earned
    posted = await http.post(f"{base}/{hold['hold_id']}/post")
    assert posted.status_code == 200 and posted.json()["hold_status"] == "posted"
    assert (await http.post(f"{base}/{hold['hold_id']}/post")).json()["replayed"] is True
    voided_late = await http.post(f"{base}/{hold['hold_id']}/void")
    assert voided_late.status_code == 409 and voided_late.json()["code"] == "HOLD_POSTED"

    second = (await http.post(base, json={"points": 20, "idempotency_key": "h2-" + key})).json()
    # Another member cannot touch it through their own path.
    other = await enrol(pos)
    foreign = await http.post(f"/v1/members/{other}/points/holds/{second['hold_id']}/void")
    assert foreign.status_code == 404 and foreign.json()["code"] == "UNKNOWN_HOLD"
    voided = await http.post(f"{base}/{second['hold_id']}/void")
    assert voided.status_code == 200 and voided.json()["hold_status"] == "voided"
    assert await available(http, member) == 70 + earned
    too_much = await http.post(base, json={"points": 10_000, "idempotency_key": "h3-" + key})
    assert too_much.status_code == 409 and too_much.json()["code"] == "INSUFFICIENT_POINTS"


async def test_an_invitee_reads_its_own_referral(pos: Pos, http: httpx.AsyncClient) -> None:
    inviter, invitee, loner = await enrol(pos), await enrol(pos), await enrol(pos)
    code = (await http.get(f"/v1/members/{inviter}/invite-code")).json()["code"]
    accepted = await http.post(f"/v1/members/{invitee}/referral", json={"invite_code": code})
    assert accepted.status_code == 200, accepted.text
    mine = await http.get(f"/v1/members/{invitee}/referral")
    assert mine.status_code == 200, mine.text
    assert mine.json()["inviter_member_id"] == inviter
    assert mine.json()["referral_id"] == accepted.json()["referral_id"]
    nobody = await http.get(f"/v1/members/{loner}/referral")
    assert nobody.status_code == 404 and nobody.json()["code"] == "NOT_REFERRED"


async def test_operators_revoke_coupons_and_change_template_limits(
    http: httpx.AsyncClient,
) -> None:
    template_id = f"T-{uuid.uuid4().hex[:10]}"
    created = await http.post(
        "/v1/admin/coupon-templates",
        json={
            "template_id": template_id,
            "status": "active",
            "terms": {
                "name": "满99减30",
                "kind": "amount_off",
                "threshold_fen": 9900,
                "discount_fen": 3000,
                "valid_days": 30,
            },
            "limits": {"total_stock": 10, "stock_shards": 2},
        },
    )
    assert created.status_code == 201, created.text
    codes = []
    for n in range(3):
        granted = await http.post(
            "/v1/admin/coupons:issue",
            json={
                "template_id": template_id,
                "member_id": str(uuid.uuid4()),
                "issue_key": f"{template_id}-{n}",
            },
        )
        assert granted.status_code == 201, granted.text
        codes.append(granted.json()["code"])
    limits = f"/v1/admin/coupon-templates/{template_id}/limits"
    below = await http.put(limits, json={"total_stock": 2, "stock_shards": 2})
    assert below.status_code == 409 and below.json()["code"] == "STOCK_BELOW_ISSUED"
    assert below.json()["field"] == "total_stock"
    changed = await http.put(
        limits, json={"total_stock": 5, "per_member_limit": 1, "stock_shards": 4}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["remaining_stock"] == 2
    assert changed.json()["limits"]["per_member_limit"] == 1

    revoke = f"/v1/admin/coupons/{codes[0]}/revoke"
    body = {"reason": "issued in error"}
    revoked = await http.post(revoke, json=body)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    assert (await http.post(revoke, json=body)).json()["replayed"] is True
    unknown = await http.post("/v1/admin/coupons/ZZZZZZZZZZZZZ/revoke", json=body)
    assert unknown.status_code == 404 and unknown.json()["code"] == "UNKNOWN_COUPON"
