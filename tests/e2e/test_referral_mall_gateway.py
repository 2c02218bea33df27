"""Referral and the points mall end to end through the gateway: an invite
code, an invitee accepting it, the invitee's first POS order rewarding the
inviter through rewards' own OrderCompleted, and that inviter spending the
points in the mall (a real coupon from a demo template, a goods item sold
out); operators' item management and fission report."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.db import asyncpg_dsn
from services.rewards.referral.domain import fingerprint
from tests.harness import Infra, eventually

pytestmark = pytest.mark.e2e

STORE = "SH001"
Pos = pos_pb2_grpc.PosServiceStub


async def enrol(pos: Pos) -> str:
    phone = f"136{random.randrange(10**8):08d}"
    reply = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    return str(reply.member_id)


async def order(pos: Pos, member: str, paid_fen: int) -> None:
    await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=f"RM-{uuid.uuid4().hex[:12]}",
            member_id=member,
            paid_amount_fen=paid_fen,
        ),
        timeout=10,
    )


async def test_invite_first_order_reward_then_mall(
    pos: Pos, http: httpx.AsyncClient, demo_stores: list[str], infra: Infra
) -> None:
    started = datetime.now(UTC) - timedelta(minutes=1)
    inviter, invitee = await enrol(pos), await enrol(pos)

    code = (await http.get(f"/v1/members/{inviter}/invite-code")).json()["code"]
    stranger = await http.get(f"/v1/members/{uuid.uuid4()}/invite-code")
    assert stranger.status_code == 404
    again = await http.get(f"/v1/members/{inviter}/invite-code")
    assert again.json()["code"] == code

    accepted = await http.post(
        f"/v1/members/{invitee}/referral", json={"invite_code": code, "device_id": "dev-" + invitee}
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["inviter_member_id"] == inviter
    # The gateway handed rewards the invitee's phone as member's keyed hash
    # (never the number): a second invitee on that phone would be refused.
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        phone_hash = await conn.fetchval(
            "SELECT value_hash FROM member.identities WHERE member_id = $1 AND id_type = 'phone'",
            uuid.UUID(invitee),
        )
        recorded = await conn.fetchval(
            "SELECT count(*) FROM rewards.referral_fingerprints"
            " WHERE member_id = $1 AND role = 'invitee' AND fingerprint = $2",
            uuid.UUID(invitee),
            fingerprint("identifier", f"IDENTIFIER_TYPE_PHONE:{bytes(phone_hash).hex()}"),
        )
    finally:
        await conn.close()
    assert recorded == 1
    retry = await http.post(
        f"/v1/members/{invitee}/referral", json={"invite_code": code, "device_id": "dev-" + invitee}
    )
    assert retry.json()["replayed"] is True
    own = await http.post(f"/v1/members/{inviter}/referral", json={"invite_code": code})
    assert own.status_code == 409 and own.json()["code"] == "SELF_REFERRAL"
    bad = await http.post(f"/v1/members/{invitee}/referral", json={"invite_code": "ILO0"})
    assert bad.status_code == 422 and bad.json()["field"] == "invite_code"

    # The invitee's first order at the till rewards the inviter (default
    # programme: the "referral" action's 100 points), through the event stream.
    await order(pos, invitee, 3_200)

    async def first_order_rewarded() -> dict[str, object] | None:
        listing = (await http.get(f"/v1/members/{inviter}/referrals")).json()
        (referral,) = listing["referrals"]
        return referral if referral["first_order_at"] else None

    referral = await eventually(first_order_rewarded)
    (reward,) = [r for r in referral["rewards"] if r["step"] == "first_order"]
    assert (reward["role"], reward["status"], reward["points"]) == ("inviter", "granted", 100)
    assert (await http.get(f"/v1/members/{inviter}/points")).json()["available"] == 100

    # Operators put a coupon and a one-off goods item on sale.
    coupon_item = await http.post(
        "/v1/admin/mall/items",
        json={
            "name": "满99减30",
            "kind": "coupon",
            "coupon_template_id": "MJ99-30",
            "points_price": 40,
            "stock_total": 10,
            "per_member_limit": 1,
            "status": "active",
        },
    )
    assert coupon_item.status_code == 201, coupon_item.text
    goods = await http.post(
        "/v1/admin/mall/items",
        json={
            "name": "Tote",
            "kind": "goods",
            "sku": "TOTE-01",
            "points_price": 50,
            "cash_fen": 990,
            "stock_total": 1,
            "status": "active",
        },
    )
    goods_id = goods.json()["item_id"]
    catalogue = (await http.get("/v1/mall/items", params={"page_size": 100})).json()
    assert goods_id in {i["item_id"] for i in catalogue["items"]}

    got_coupon = await http.post(
        f"/v1/members/{inviter}/mall/exchanges",
        json={"item_id": coupon_item.json()["item_id"], "exchange_key": "c-1"},
    )
    assert got_coupon.status_code == 200, got_coupon.text
    assert got_coupon.json()["fulfilment"] == "issued" and got_coupon.json()["coupon_id"]
    limit = await http.post(
        f"/v1/members/{inviter}/mall/exchanges",
        json={"item_id": coupon_item.json()["item_id"], "exchange_key": "c-2"},
    )
    assert limit.status_code == 409 and limit.json()["code"] == "MALL_MEMBER_LIMIT_REACHED"

    body = {"item_id": goods_id, "exchange_key": "g-1"}
    first = await http.post(f"/v1/members/{inviter}/mall/exchanges", json=body)
    replay = await http.post(f"/v1/members/{inviter}/mall/exchanges", json=body)
    assert first.status_code == 200 and replay.json()["replayed"] is True
    assert replay.json()["exchange_id"] == first.json()["exchange_id"]
    # Points plus cash: reserved until the backend confirms the payment.
    assert first.json()["cash_fen"] == 990 and first.json()["fulfilment"] == "awaiting_payment"
    pay_path = f"/v1/members/{inviter}/mall/exchanges/{first.json()['exchange_id']}/payment"
    # A payment of another amount than the cash part is refused, nothing changed.
    short = await http.post(
        pay_path, json={"payment_reference": "wxpay-e2e-1", "paid_amount_fen": 99}
    )
    assert short.status_code == 409, short.text
    assert (short.json()["code"], short.json()["field"]) == (
        "PAYMENT_AMOUNT_MISMATCH",
        "paid_amount_fen",
    )
    negative = await http.post(
        pay_path, json={"payment_reference": "wxpay-e2e-1", "paid_amount_fen": -990}
    )
    assert negative.status_code == 422, negative.text
    assert (await http.get(f"/v1/members/{inviter}/points")).json()["available"] == 10
    waiting = (await http.get(f"/v1/members/{inviter}/mall/exchanges")).json()["exchanges"]
    assert {e["exchange_id"]: e["fulfilment"] for e in waiting}[
        first.json()["exchange_id"]
    ] == "awaiting_payment"
    paid = await http.post(
        pay_path, json={"payment_reference": "wxpay-e2e-1", "paid_amount_fen": 990}
    )
    assert paid.status_code == 200, paid.text
    assert paid.json()["fulfilment"] == "pending" and paid.json()["paid_at"]
    assert (await http.post(pay_path, json={"payment_reference": "wxpay-e2e-1"})).json()[
        "replayed"
    ] is True
    other_payment = await http.post(pay_path, json={"payment_reference": "wxpay-e2e-2"})
    assert other_payment.status_code == 409
    assert other_payment.json()["code"] == "PAYMENT_ALREADY_CONFIRMED"
    sold_out = await http.post(
        f"/v1/members/{invitee}/mall/exchanges", json={"item_id": goods_id, "exchange_key": "g-1"}
    )
    assert sold_out.status_code == 409 and sold_out.json()["code"] == "MALL_ITEM_OUT_OF_STOCK"
    assert (await http.get(f"/v1/members/{inviter}/points")).json()["available"] == 10

    # Operators ship the goods from their queue, once.
    queue = (await http.get("/v1/admin/mall/exchanges", params={"fulfilment": "pending"})).json()
    assert first.json()["exchange_id"] in {e["exchange_id"] for e in queue["exchanges"]}
    parcel = {"carrier": "SF Express", "tracking_number": "SF1234567890"}
    ship_path = f"/v1/admin/mall/exchanges/{first.json()['exchange_id']}/ship"
    shipped = await http.post(ship_path, json=parcel)
    assert shipped.status_code == 200, shipped.text
    assert shipped.json()["fulfilment"] == "shipped" and shipped.json()["shipped_at"]
    assert (await http.post(ship_path, json=parcel)).json()["replayed"] is True
    other = await http.post(ship_path, json=parcel | {"tracking_number": "SF0"})
    assert other.status_code == 409 and other.json()["code"] == "ALREADY_SHIPPED"
    not_goods = await http.post(
        f"/v1/admin/mall/exchanges/{got_coupon.json()['exchange_id']}/ship", json=parcel
    )
    assert not_goods.status_code == 409 and not_goods.json()["code"] == "NOT_GOODS"
    # An operator takes the coupon exchange back, once: its 40 points return.
    before = (await http.get(f"/v1/members/{inviter}/points")).json()["available"]
    reverse_path = f"/v1/admin/mall/exchanges/{got_coupon.json()['exchange_id']}/reverse"
    reversal = {"reason": "wrong item"}
    taken_back = await http.post(reverse_path, json=reversal)
    assert taken_back.status_code == 200, taken_back.text
    assert taken_back.json()["fulfilment"] == "reversed"
    assert (await http.post(reverse_path, json=reversal)).json()["replayed"] is True
    after = (await http.get(f"/v1/members/{inviter}/points")).json()["available"]
    assert after == before + 40

    mine = (await http.get(f"/v1/members/{inviter}/mall/exchanges", params={"page_size": 1})).json()
    assert len(mine["exchanges"]) == 1 and mine["next_cursor"]
    rest = await http.get(
        f"/v1/members/{inviter}/mall/exchanges",
        params={"page_size": 1, "cursor": mine["next_cursor"]},
    )
    assert rest.json()["exchanges"][0]["exchange_id"] != mine["exchanges"][0]["exchange_id"]

    ended = await http.put(f"/v1/admin/mall/items/{goods_id}/status", json={"status": "ended"})
    assert ended.json()["status"] == "ended"
    revived = await http.put(f"/v1/admin/mall/items/{goods_id}/status", json={"status": "active"})
    assert revived.status_code == 409 and revived.json()["code"] == "INVALID_STATUS_TRANSITION"

    report = await http.get(
        "/v1/admin/referrals/fission",
        params={
            "from": started.isoformat(),
            "to": (datetime.now(UTC) + timedelta(minutes=1)).isoformat(),
        },
    )
    assert report.status_code == 200, report.text
    assert report.json()["invitees"] >= 1 and report.json()["inviters"] >= 1
    assert report.json()["seed_inviters"] >= 1
