"""End to end: a customer is added on WeCom by guide G of store S, buys at the
till with G's staff code, then through G's shared link; each order is
attributed per the rules, summed per guide, store and day; a refund reverses
it. Orders go through the gateway's POS door and rewards; attribution arrives
at the guides service on rewards' OrderCompleted / OrderRefunded events."""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest

from loyalty.common.v1 import common_pb2
from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.db import asyncpg_dsn
from services.guides.wecom import FakeWeCom
from tests.harness import Infra, ServiceClock, eventually
from tests.integration.guides_support import add_customer, new_staff, uid, wecom_crypto

STORE = "SH001"


def txn() -> str:
    return f"T-{uuid.uuid4().hex[:12]}"


async def attribution(
    stub: guides_pb2_grpc.GuidesServiceStub, order_id: str
) -> guides_pb2.OrderAttribution | None:
    try:
        return await stub.GetOrderAttribution(guides_pb2.OrderRef(order_id=order_id), timeout=5)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


async def test_guide_attribution_end_to_end(
    pos: pos_pb2_grpc.PosServiceStub,
    guides_channel: grpc.aio.Channel,
    member_channel: grpc.aio.Channel,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    infra: Infra,
) -> None:
    stub = guides_pb2_grpc.GuidesServiceStub(guides_channel)
    members = member_pb2_grpc.MemberServiceStub(member_channel)
    guide = await new_staff(stub, STORE, code=uid("G"))
    # The customer logged into the mini-program (unionid), then was added by G at the till.
    unionid = uid("o6_")
    member = (
        await members.IdentifyMember(
            member_pb2.IdentifyMemberRequest(
                identifiers=[
                    member_pb2.Identifier(
                        type=member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID, value=unionid, verified=True
                    )
                ],
                source="mini-program",
                request_key=uid("k"),
            ),
            timeout=5,
        )
    ).member.member_id
    ext = uid("wm")
    fake_wecom.add_contact(ext, "顾客", unionid)
    await add_customer(stub, wecom_crypto(fake_wecom.corp_id), guides_clock, guide.staff_id, ext)

    async def bound() -> bool:
        b = await stub.GetBinding(guides_pb2.MemberRef(member_id=member), timeout=5)
        return b.staff_id == guide.staff_id

    await eventually(bound)

    till = await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=(till_txn := txn()),
            member_id=member,
            paid_amount_fen=1800,
            gross_amount_fen=1800,
            lines=[
                pos_pb2.OrderLine(
                    sku="T1",
                    name="多肉葡萄",
                    category="fruit_tea",
                    quantity=1,
                    paid_amount_fen=1800,
                )
            ],
            staff_code=guide.staff_code,
        ),
        timeout=10,
    )
    link = await stub.SignGuideLink(guides_pb2.StaffRef(staff_id=guide.staff_id), timeout=5)
    online = await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id="SH002",
            pos_transaction_id=txn(),
            member_id=member,
            paid_amount_fen=2600,
            gross_amount_fen=2600,
            channel=common_pb2.CHANNEL_MINI_PROGRAM,
            guide_ref=link.guide_ref,
        ),
        timeout=10,
    )
    # A forged link and no staff code: the member's binding still attributes it.
    forged = await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id="SH003",
            pos_transaction_id=txn(),
            member_id=member,
            paid_amount_fen=900,
            gross_amount_fen=900,
            guide_ref=link.guide_ref[:-2] + "xx",
        ),
        timeout=10,
    )
    # Someone else's order, with no guide anywhere: nobody gets it.
    stranger = (
        await pos.IdentifyMember(
            pos_pb2.IdentifyMemberRequest(store_id=STORE, phone="+8613912345678"), timeout=10
        )
    ).member_id
    unguided = await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=txn(),
            member_id=stranger,
            paid_amount_fen=1000,
            gross_amount_fen=1000,
        ),
        timeout=10,
    )

    got = {}
    for name, reply in (("till", till), ("online", online), ("forged", forged), ("none", unguided)):
        got[name] = await eventually(lambda r=reply: attribution(stub, r.order_id), timeout=15)
    assert (got["till"].rule, got["till"].staff_id, got["till"].store_id) == (
        "staff_code",
        guide.staff_id,
        STORE,
    )
    # Credited to the guide's own store, whichever store the order was picked up at.
    assert (got["online"].rule, got["online"].staff_id, got["online"].store_id) == (
        "guide_link",
        guide.staff_id,
        STORE,
    )
    assert (got["forged"].rule, got["forged"].staff_id) == ("binding", guide.staff_id)
    assert (got["none"].rule, got["none"].staff_id) == ("", "")

    day = got["till"].day
    report = await stub.GuideDailyReport(
        guides_pb2.GuideDailyReportRequest(from_day=day, to_day=day, staff_id=guide.staff_id),
        timeout=5,
    )
    assert [
        (r.staff_id, r.store_id, r.orders, r.paid_amount_fen, r.net_amount_fen) for r in report.rows
    ] == [(guide.staff_id, STORE, 3, 1800 + 2600 + 900, 1800 + 2600 + 900)]

    # The till order is refunded in full: its attribution is reversed.
    await pos.RefundOrder(
        pos_pb2.RefundOrderRequest(
            store_id=STORE,
            pos_transaction_id=till_txn,
            refund_transaction_id=txn(),
            refunded_amount_fen=1800,
        ),
        timeout=10,
    )

    async def reversed_() -> bool:
        a = await attribution(stub, till.order_id)
        return a is not None and a.refunded_amount_fen == 1800

    await eventually(reversed_, timeout=15)
    after = await stub.GuideDailyReport(
        guides_pb2.GuideDailyReportRequest(from_day=day, to_day=day, staff_id=guide.staff_id),
        timeout=5,
    )
    assert [
        (r.orders, r.paid_amount_fen, r.refunded_amount_fen, r.net_amount_fen) for r in after.rows
    ] == [(2, 5300, 1800, 2600 + 900)]

    # The funnel: registered, added on WeCom and ordered twice, under guide G.
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        row = await conn.fetchrow(
            "SELECT first_staff_id, wecom_added_at IS NOT NULL AS added,"
            " repurchased_at IS NOT NULL AS again FROM guides.funnel WHERE member_id = $1",
            uuid.UUID(member),
        )
    finally:
        await conn.close()
    assert (row["first_staff_id"], row["added"], row["again"]) == (guide.staff_id, True, True)


@pytest.mark.parametrize("bad", ["2026-13-01", "yesterday"])
async def test_daily_report_rejects_bad_days(guides_channel: grpc.aio.Channel, bad: str) -> None:
    stub = guides_pb2_grpc.GuidesServiceStub(guides_channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GuideDailyReport(
            guides_pb2.GuideDailyReportRequest(from_day=bad, to_day="2026-01-01"), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
