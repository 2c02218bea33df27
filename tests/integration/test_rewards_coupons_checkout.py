"""Coupons at checkout through the rewards gRPC API against real PostgreSQL:
preview, lock (32 racing orders lock once), CompleteOrder with coupons (32
concurrent retries redeem once; another order gets a clear conflict), release,
refund restoring the coupon, wallet pagination, expiry, merge, reports, and bad
input refused with nothing written."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TypeAlias

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from redis.asyncio import Redis

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import error_info
from servicekit.events import ENVELOPE_FIELD, make_envelope, stream_name
from services.rewards.coupons import handlers as coupon_service
from services.rewards.coupons.jobs import expire_coupons
from services.rewards.seed import seed_demo

from ..harness import Infra, eventually

Stub: TypeAlias = rewards_pb2_grpc.RewardsServiceStub
STORE = common_pb2.CHANNEL_STORE


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    await seed_demo(conn)
    yield conn
    await conn.close()


@pytest.fixture(scope="module")
async def stub(rewards_channel: grpc.aio.Channel, db: asyncpg.Connection) -> Stub:
    return rewards_pb2_grpc.RewardsServiceStub(rewards_channel)


async def rpc_error(call: object) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    code, field = error_info(caught.value)
    return caught.value.code(), code, field


def terms(**kw: object) -> rewards_pb2.CouponTerms:
    base: dict[str, object] = {
        "name": "满99减30",
        "kind": "amount_off",
        "threshold_fen": 9900,
        "discount_fen": 3000,
        "valid_days": 30,
    }
    return rewards_pb2.CouponTerms(**(base | kw))  # type: ignore[arg-type]


async def template(stub: Stub, limits: rewards_pb2.CouponLimits | None = None, **kw: object) -> str:
    template_id = f"C-{uuid.uuid4().hex[:10]}"
    await stub.CreateCouponTemplate(
        rewards_pb2.CreateCouponTemplateRequest(
            template_id=template_id,
            terms=terms(**kw),
            limits=limits or rewards_pb2.CouponLimits(),
            status="active",
            created_by="ops@brand",
        )
    )
    return template_id


async def coupon(stub: Stub, template_id: str, member: str) -> rewards_pb2.Coupon:
    return await stub.IssueCoupon(
        rewards_pb2.IssueCouponRequest(
            template_id=template_id,
            member_id=member,
            reason="operator_grant",
            issue_key=uuid.uuid4().hex,
            issued_by="ops@brand",
        )
    )


LINES = [
    rewards_pb2.OrderLine(
        sku="MILK-TEA", name="奶茶", category="tea", quantity=2, paid_amount_fen=3600
    ),
    rewards_pb2.OrderLine(
        sku="FRUIT-TEA", name="果茶", category="tea", quantity=3, paid_amount_fen=6600
    ),
]  # gross 10200 fen


def order(
    member: str, codes: list[str], paid: int, txn: str = "", points: int = 0
) -> rewards_pb2.CompleteOrderRequest:
    return rewards_pb2.CompleteOrderRequest(
        store_id="SH001",
        pos_transaction_id=txn or f"CO-{uuid.uuid4().hex[:12]}",
        member_id=member,
        channel=STORE,
        paid_amount_fen=paid,
        gross_amount_fen=10200,
        lines=LINES,
        coupon_codes=codes,
        points_to_redeem=points,
    )


async def test_preview_lists_each_coupon_with_its_discount_and_the_best(stub: Stub) -> None:
    member = str(uuid.uuid4())
    mj = await coupon(stub, await template(stub), member)
    pct = await coupon(
        stub,
        await template(
            stub,
            name="8折",
            kind="percent_off",
            percent=20,
            cap_fen=1500,
            threshold_fen=0,
            discount_fen=0,
        ),
        member,
    )
    far = await coupon(
        stub, await template(stub, name="满200减50", threshold_fen=20000, discount_fen=5000), member
    )
    online = await coupon(stub, await template(stub, name="外卖券", channels=["online"]), member)
    p = await stub.PreviewCheckout(
        rewards_pb2.PreviewCheckoutRequest(
            store_id="SH001",
            channel=STORE,
            member_id=member,
            lines=LINES,
            gross_amount_fen=10200,
        )
    )
    offers = {o.code: o for o in p.coupons}
    assert (offers[mj.code].applicable, offers[mj.code].discount_fen) == (True, 3000)
    # 20% of 10200 is 2040, capped at 1500.
    assert offers[pct.code].discount_fen == 1500
    assert (offers[far.code].applicable, offers[far.code].reason) == (False, "BELOW_THRESHOLD")
    assert offers[online.code].reason == "CHANNEL_NOT_ELIGIBLE"
    assert p.best_code == mj.code and list(p.applied_codes) == [mj.code]
    assert (p.coupon_discount_fen, p.payable_fen) == (3000, 7200)
    # 1 point per whole yuan paid.
    assert p.points_to_earn == 72
    assert p.coupons[0].code == mj.code


async def test_32_orders_racing_for_one_coupon_lock_it_once(stub: Stub) -> None:
    member = str(uuid.uuid4())
    c = await coupon(stub, await template(stub), member)

    async def lock(n: int) -> object:
        try:
            return await stub.LockCoupon(
                rewards_pb2.LockCouponRequest(
                    code=c.code, member_id=member, store_id="SH001", pos_transaction_id=f"RACE-{n}"
                )
            )
        except grpc.aio.AioRpcError as e:
            return error_info(e)[0]

    results = await asyncio.gather(*(lock(n) for n in range(32)))
    won = [r for r in results if isinstance(r, rewards_pb2.Coupon)]
    assert len(won) == 1
    assert set(r for r in results if isinstance(r, str)) == {"COUPON_LOCKED"}
    winner_txn = next(
        f"RACE-{n}" for n, r in enumerate(results) if isinstance(r, rewards_pb2.Coupon)
    )
    # The same order locking again is idempotent; release frees it for another.
    again = await stub.LockCoupon(
        rewards_pb2.LockCouponRequest(
            code=c.code, member_id=member, store_id="SH001", pos_transaction_id=winner_txn
        )
    )
    assert again.status == "locked"
    released = await stub.ReleaseCoupon(
        rewards_pb2.ReleaseCouponRequest(
            code=c.code, store_id="SH001", pos_transaction_id=winner_txn
        )
    )
    assert released.status == "available"
    other = await stub.LockCoupon(
        rewards_pb2.LockCouponRequest(
            code=c.code.lower(), member_id=member, store_id="SH001", pos_transaction_id="OTHER"
        )
    )
    assert other.status == "locked"


async def test_32_concurrent_retries_of_one_redemption_redeem_once(
    stub: Stub, db: asyncpg.Connection
) -> None:
    member = str(uuid.uuid4())
    template_id = await template(stub)
    c = await coupon(stub, template_id, member)
    request = order(member, [c.code], paid=7200)
    replies = await asyncio.gather(*(stub.CompleteOrder(request) for _ in range(32)))
    assert len({r.order_id for r in replies}) == 1
    assert sum(not r.replayed for r in replies) == 1
    assert {(r.coupon_discount_fen, r.points_earned) for r in replies} == {(3000, 72)}
    row = await db.fetchrow(
        "SELECT status, discount_fen FROM rewards.coupons WHERE code = $1", c.code
    )
    assert (row["status"], row["discount_fen"]) == ("used", 3000)
    # Another order with the same coupon: a clear conflict, nothing written.
    status, code, field = await rpc_error(stub.CompleteOrder(order(member, [c.code], paid=7200)))
    assert (status, code, field) == (
        grpc.StatusCode.ABORTED,
        "COUPON_ALREADY_USED",
        "coupon_codes[0]",
    )
    report = await stub.GetCouponReport(rewards_pb2.GetCouponReportRequest(template_id=template_id))
    assert (report.issued, report.redeemed, report.redemption_rate_bp, report.discount_fen) == (
        1,
        1,
        10_000,
        3000,
    )


async def test_a_coupon_locked_by_another_order_is_refused_at_completion(stub: Stub) -> None:
    member = str(uuid.uuid4())
    c = await coupon(stub, await template(stub), member)
    await stub.LockCoupon(
        rewards_pb2.LockCouponRequest(
            code=c.code, member_id=member, store_id="SH001", pos_transaction_id="HOLDER"
        )
    )
    assert (await rpc_error(stub.CompleteOrder(order(member, [c.code], 7200))))[1] == (
        "COUPON_LOCKED"
    )
    done = await stub.CompleteOrder(order(member, [c.code], 7200, txn="HOLDER"))
    assert done.coupon_discount_fen == 3000


async def test_bad_checkout_input_is_refused_and_writes_nothing(
    stub: Stub, db: asyncpg.Connection
) -> None:
    member, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    c = await coupon(stub, await template(stub), member)
    # Paid amount disagrees with gross - discount.
    status, code, field = await rpc_error(stub.CompleteOrder(order(member, [c.code], 10200)))
    assert (status, code, field) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAID_AMOUNT_MISMATCH",
        "paid_amount_fen",
    )
    # Another member's code.
    status, code, field = await rpc_error(stub.CompleteOrder(order(stranger, [c.code], 7200)))
    assert (status, code, field) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_COUPON", "coupon_codes[0]")
    # Lines that do not add up to the gross amount.
    bad = order(member, [c.code], 7200)
    bad.gross_amount_fen = 10300
    assert (await rpc_error(stub.CompleteOrder(bad)))[1:] == ("LINES_TOTAL_MISMATCH", "lines")
    status, code, field = await rpc_error(
        stub.PreviewCheckout(
            rewards_pb2.PreviewCheckoutRequest(
                store_id="SH001",
                channel=STORE,
                member_id=member,
                lines=LINES,
                gross_amount_fen=9999,
            )
        )
    )
    assert (code, field) == ("CART_TOTAL_MISMATCH", "gross_amount_fen")
    paused = await template(stub)
    await stub.SetCouponTemplateStatus(
        rewards_pb2.SetCouponTemplateStatusRequest(template_id=paused, status="paused")
    )
    assert (await rpc_error(coupon(stub, paused, member)))[1] == "TEMPLATE_PAUSED"
    assert (await rpc_error(coupon(stub, "NOPE", member)))[1] == "UNKNOWN_TEMPLATE"
    row = await db.fetchrow("SELECT status, order_id FROM rewards.coupons WHERE code = $1", c.code)
    assert (row["status"], row["order_id"]) == ("available", None)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.orders WHERE member_id = $1", uuid.UUID(member)
        )
        == 0
    )


async def test_refund_in_full_restores_a_restorable_coupon(stub: Stub) -> None:
    member = str(uuid.uuid4())
    keep = await coupon(stub, await template(stub, restore_on_refund=True, stackable=True), member)
    done = await stub.CompleteOrder(order(member, [keep.code], 7200, txn="R-1"))
    assert done.coupon_discount_fen == 3000
    partial = await stub.RefundOrder(
        rewards_pb2.RefundOrderRequest(
            store_id="SH001",
            pos_transaction_id="R-1",
            refund_transaction_id="R-1-a",
            refunded_amount_fen=1000,
        )
    )
    assert [(c.restored, c.reason) for c in partial.coupons] == [(False, "PARTIAL_REFUND")]
    full_refund = rewards_pb2.RefundOrderRequest(
        store_id="SH001",
        pos_transaction_id="R-1",
        refund_transaction_id="R-1-b",
        refunded_amount_fen=6200,
    )
    full = await stub.RefundOrder(full_refund)
    assert [(c.code, c.restored) for c in full.coupons] == [(keep.code, True)]
    # The POS retries the refund: the same answer, the coupon restored once.
    retried = await stub.RefundOrder(full_refund)
    assert retried.replayed
    assert [(c.code, c.restored) for c in retried.coupons] == [(keep.code, True)]
    wallet = await stub.ListMemberCoupons(
        rewards_pb2.ListMemberCouponsRequest(member_id=member, statuses=["available"])
    )
    assert [c.code for c in wallet.coupons] == [keep.code]
    # Not restorable by its template: says so.
    other = await coupon(stub, await template(stub), member)
    await stub.CompleteOrder(order(member, [other.code], 7200, txn="R-2"))
    refused = await stub.RefundOrder(
        rewards_pb2.RefundOrderRequest(
            store_id="SH001",
            pos_transaction_id="R-2",
            refund_transaction_id="R-2-a",
            refunded_amount_fen=7200,
        )
    )
    assert [(c.restored, c.reason) for c in refused.coupons] == [(False, "NOT_RESTORABLE")]


async def test_wallet_filters_and_pages_with_a_cursor(stub: Stub) -> None:
    member = str(uuid.uuid4())
    template_id = await template(stub)
    codes = [(await coupon(stub, template_id, member)).code for _ in range(5)]
    await stub.CompleteOrder(order(member, [codes[0]], 7200))
    seen, cursor = [], ""
    while True:
        page = await stub.ListMemberCoupons(
            rewards_pb2.ListMemberCouponsRequest(
                member_id=member, statuses=["available"], page_size=2, cursor=cursor
            )
        )
        seen += [c.code for c in page.coupons]
        cursor = page.next_cursor
        if not cursor:
            break
    assert seen == codes[:0:-1]
    used = await stub.ListMemberCoupons(
        rewards_pb2.ListMemberCouponsRequest(member_id=member, statuses=["used"])
    )
    assert [(c.code, c.discount_fen, c.terms.name) for c in used.coupons] == [
        (codes[0], 3000, "满99减30")
    ]
    assert (
        await rpc_error(
            stub.ListMemberCoupons(
                rewards_pb2.ListMemberCouponsRequest(member_id=member, statuses=["lost"])
            )
        )
    )[1:] == ("UNKNOWN_STATUS", "statuses[0]")


async def test_expiry_lazily_and_by_the_job(
    stub: Stub, rewards_app: object, db: asyncpg.Connection
) -> None:
    member = str(uuid.uuid4())
    c = await coupon(stub, await template(stub, valid_days=0, valid_hours=1), member)
    # Pretend the hour is over: the wallet reads it expired before any job ran.
    # (Moved back from its own times, not the database's now(): the service's
    # clock is the one that counts, and under make test-shifted they differ.)
    await db.execute(
        "UPDATE rewards.coupons SET issued_at = issued_at - interval '2 hours',"
        " valid_from = valid_from - interval '2 hours',"
        " expires_at = expires_at - interval '2 hours'"
        " WHERE code = $1",
        c.code,
    )
    wallet = await stub.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=member))
    assert [w.status for w in wallet.coupons] == ["expired"]
    assert (
        await rpc_error(
            stub.LockCoupon(
                rewards_pb2.LockCouponRequest(
                    code=c.code, member_id=member, store_id="SH001", pos_transaction_id="LATE"
                )
            )
        )
    )[1] == ("COUPON_EXPIRED")
    assert await expire_coupons(rewards_app.db, datetime.now(UTC)) >= 1  # type: ignore[attr-defined]
    assert (
        await db.fetchval("SELECT status FROM rewards.coupons WHERE code = $1", c.code) == "expired"
    )


async def test_merge_moves_coupons_and_unmerge_moves_them_back(
    stub: Stub, db: asyncpg.Connection
) -> None:
    survivor, absorbed = str(uuid.uuid4()), str(uuid.uuid4())
    template_id = await template(stub)
    mine = await coupon(stub, template_id, absorbed)
    async with db.transaction():
        await coupon_service.merge(db, "M-1", survivor, absorbed)
        await coupon_service.merge(db, "M-1", survivor, absorbed)
    wallet = await stub.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=survivor))
    assert [c.code for c in wallet.coupons] == [mine.code]
    async with db.transaction():
        await coupon_service.unmerge(db, survivor, absorbed)
    wallet = await stub.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=absorbed))
    assert [c.code for c in wallet.coupons] == [mine.code]


async def test_first_order_coupon_applies_only_to_the_first_order(stub: Stub) -> None:
    member = str(uuid.uuid4())
    half = await coupon_for(stub, "FIRST-CUP-HALF", member)
    p = await stub.PreviewCheckout(
        rewards_pb2.PreviewCheckoutRequest(
            store_id="SH001", channel=STORE, member_id=member, lines=LINES, gross_amount_fen=10200
        )
    )
    # Half of the dearest cup (2200), capped at 1500 -> 1100.
    assert {o.code: o.discount_fen for o in p.coupons}[half.code] == 1100
    await stub.CompleteOrder(order(member, [half.code], 9100))
    again = await coupon(
        stub,
        await template(
            stub, name="首单", kind="first_order_price", percent=50, threshold_fen=0, discount_fen=0
        ),
        member,
    )
    p = await stub.PreviewCheckout(
        rewards_pb2.PreviewCheckoutRequest(
            store_id="SH001", channel=STORE, member_id=member, lines=LINES, gross_amount_fen=10200
        )
    )
    assert {o.code: o.reason for o in p.coupons}[again.code] == "NOT_FIRST_ORDER"


async def coupon_for(stub: Stub, template_id: str, member: str) -> rewards_pb2.Coupon:
    return await stub.IssueCoupon(
        rewards_pb2.IssueCouponRequest(
            template_id=template_id,
            member_id=member,
            reason="registration",
            issue_key=f"reg:{member}",
        )
    )


async def test_a_lapsed_lock_frees_the_coupon_for_another_order(
    stub: Stub, db: asyncpg.Connection
) -> None:
    member = str(uuid.uuid4())
    c = await coupon(stub, await template(stub), member)
    await stub.LockCoupon(
        rewards_pb2.LockCouponRequest(
            code=c.code, member_id=member, store_id="SH001", pos_transaction_id="ABANDONED"
        )
    )
    # The abandoned sale's lock runs out (REWARDS_COUPON_LOCK_SECONDS later; moved
    # back from its own time, not the database's now(), which is not the service's).
    await db.execute(
        "UPDATE rewards.coupons SET locked_until = locked_until - interval '1 day' WHERE code = $1",
        c.code,
    )
    wallet = await stub.ListMemberCoupons(
        rewards_pb2.ListMemberCouponsRequest(member_id=member, statuses=["available"])
    )
    assert [w.code for w in wallet.coupons] == [c.code]
    done = await stub.CompleteOrder(order(member, [c.code], 7200))
    assert done.coupon_discount_fen == 3000


async def test_expiring_coupons_are_announced_once(
    stub: Stub, rewards_app: object, db: asyncpg.Connection
) -> None:
    from services.rewards.coupons.handlers import CouponPolicy
    from services.rewards.coupons.jobs import announce_expiring_coupons

    member = str(uuid.uuid4())
    soon = await coupon(stub, await template(stub, valid_days=2), member)
    later = await coupon(stub, await template(stub, valid_days=20), member)
    policy = CouponPolicy(expiring_soon_days=3)
    database = rewards_app.db  # type: ignore[attr-defined]
    assert await announce_expiring_coupons(database, policy, datetime.now(UTC)) >= 1
    notified = {
        r["code"]
        for r in await db.fetch(
            "SELECT code FROM rewards.coupons WHERE member_id = $1"
            " AND expiry_notified_at IS NOT NULL",
            uuid.UUID(member),
        )
    }
    assert notified == {soon.code}
    assert later.code not in notified
    # A second run announces nothing new for this member.
    await announce_expiring_coupons(database, policy, datetime.now(UTC))
    assert (
        await db.fetchval(
            "SELECT count(*) FROM rewards.coupons WHERE member_id = $1"
            " AND expiry_notified_at IS NOT NULL",
            uuid.UUID(member),
        )
        == 1
    )


async def test_member_merged_and_unmerged_events_move_coupons(
    stub: Stub, infra: Infra, rewards_app: object
) -> None:
    survivor, absorbed = str(uuid.uuid4()), str(uuid.uuid4())
    template_id = await template(stub)
    theirs = await coupon(stub, template_id, absorbed)
    mine = await coupon(stub, template_id, survivor)
    redis = Redis.from_url(infra.redis_url)

    async def publish(payload: Message) -> None:
        envelope = make_envelope("member", payload, survivor)
        await redis.xadd(
            stream_name(infra.namespace, "member"),
            {ENVELOPE_FIELD: envelope.SerializeToString()},
        )

    async def wallet(member: str) -> set[str]:
        reply = await stub.ListMemberCoupons(rewards_pb2.ListMemberCouponsRequest(member_id=member))
        return {c.code for c in reply.coupons}

    try:
        merge_id = str(uuid.uuid4())
        # Delivered twice (two event ids): moved once, nothing lost.
        for _ in range(2):
            await publish(
                events_pb2.MemberMerged(
                    merge_id=merge_id, survivor_member_id=survivor, absorbed_member_id=absorbed
                )
            )

        async def merged() -> bool:
            return await wallet(survivor) == {theirs.code, mine.code}

        await eventually(merged)
        await publish(
            events_pb2.MemberUnmerged(
                merge_id=merge_id, survivor_member_id=survivor, restored_member_id=absorbed
            )
        )

        async def unmerged() -> bool:
            return await wallet(absorbed) == {theirs.code}

        await eventually(unmerged)
        assert await wallet(survivor) == {mine.code}
    finally:
        await redis.aclose()


async def test_templates_list_by_id_with_a_cursor_and_version_over_grpc(stub: Stub) -> None:
    ids = sorted([await template(stub) for _ in range(3)])
    seen: list[str] = []
    cursor = ""
    while True:
        page = await stub.ListCouponTemplates(
            rewards_pb2.ListCouponTemplatesRequest(status="active", page_size=2, cursor=cursor)
        )
        seen += [t.template_id for t in page.templates]
        assert all(t.status == "active" for t in page.templates)
        cursor = page.next_cursor
        if not cursor:
            break
    assert [i for i in seen if i in ids] == ids
    assert seen == sorted(seen)
    v2 = await stub.NewCouponTemplateVersion(
        rewards_pb2.NewCouponTemplateVersionRequest(
            template_id=ids[0], terms=terms(discount_fen=2000), expected_version=1
        )
    )
    got = await stub.GetCouponTemplate(rewards_pb2.GetCouponTemplateRequest(template_id=ids[0]))
    assert (v2.version, got.version, got.terms.discount_fen) == (2, 2, 2000)
    status, code, field = await rpc_error(
        stub.NewCouponTemplateVersion(
            rewards_pb2.NewCouponTemplateVersionRequest(
                template_id=ids[0], terms=terms(kind="percent_off", percent=10)
            )
        )
    )
    assert (status, code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "KIND_CHANGED", "kind")
