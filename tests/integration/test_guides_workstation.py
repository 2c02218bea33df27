"""The guide's workstation: WeCom OAuth sessions, who a guide may see, tags
and notes audited under the staff member, and coupon grants from per-guide and
per-store budgets that never overdraw under 50 concurrent grants (real
rewards service issuing, real database)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import grpc
import pytest

from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from services.guides import domain
from services.guides.wecom import FakeWeCom

from ..harness import Infra, ServiceClock
from .guides_support import new_staff, rpc_reason, uid


@pytest.fixture(scope="module")
def stub(guides_channel: grpc.aio.Channel) -> guides_pb2_grpc.GuidesServiceStub:
    return guides_pb2_grpc.GuidesServiceStub(guides_channel)


@pytest.fixture(scope="module")
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield c
    await c.close()


async def session(stub: guides_pb2_grpc.GuidesServiceStub, fake: FakeWeCom, staff_id: str) -> str:
    code = uid("code")
    fake.oauth_codes[code] = staff_id
    reply = await stub.OpenWorkstation(guides_pb2.OpenWorkstationRequest(code=code), timeout=5)
    assert reply.staff_id == staff_id
    return reply.token


async def bind(stub: guides_pb2_grpc.GuidesServiceStub, staff_id: str) -> str:
    member = str(uuid.uuid4())
    await stub.ReassignGuide(
        guides_pb2.ReassignGuideRequest(member_id=member, staff_id=staff_id, actor="op"), timeout=5
    )
    return member


async def test_oauth_sessions_and_who_a_guide_sees(
    stub: guides_pb2_grpc.GuidesServiceStub,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    conn: asyncpg.Connection,
) -> None:
    store = uid("WS")
    me = await new_staff(stub, store)
    colleague = await new_staff(stub, store)
    elsewhere = await new_staff(stub, uid("WS"))
    token = await session(stub, fake_wecom, me.staff_id)
    mine, theirs, foreign = (
        await bind(stub, me.staff_id),
        await bind(stub, colleague.staff_id),
        await bind(stub, elsewhere.staff_id),
    )
    view = await stub.GetWorkstationMember(
        guides_pb2.WorkstationMemberRequest(token=token, member_id=mine), timeout=5
    )
    assert (view.relation, view.guide_staff_id) == ("bound", me.staff_id)
    other = await stub.GetWorkstationMember(
        guides_pb2.WorkstationMemberRequest(token=token, member_id=theirs), timeout=5
    )
    assert other.relation == "store"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetWorkstationMember(
            guides_pb2.WorkstationMemberRequest(token=token, member_id=foreign), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_reason(err.value) == "NOT_YOUR_CUSTOMER"

    # Tag and note, audited under the guide.
    tags = await stub.SetWorkstationTag(
        guides_pb2.WorkstationTagRequest(token=token, member_id=mine, tag="少糖", present=True),
        timeout=5,
    )
    assert [(t.tag, t.set_by) for t in tags.tags] == [("少糖", me.staff_id)]
    await stub.AddWorkstationNote(
        guides_pb2.WorkstationNoteRequest(token=token, member_id=mine, text="喜欢少冰"), timeout=5
    )
    view = await stub.GetWorkstationMember(
        guides_pb2.WorkstationMemberRequest(token=token, member_id=mine), timeout=5
    )
    assert [n.text for n in view.notes] == ["喜欢少冰"] and [t.tag for t in view.tags] == ["少糖"]
    actors = {
        (r["action"], r["actor"])
        for r in await conn.fetch(
            "SELECT action, actor FROM guides.audit WHERE subject = $1", f"member:{mine}"
        )
    }
    assert {
        ("tag_added", me.staff_id),
        ("note_added", me.staff_id),
        ("member_viewed", me.staff_id),
    } <= actors

    # A code works once; a non-staff code, a forged or an expired token do not.
    for code, who in (("used", None), ("stranger", "not-staff-" + uid(""))):
        if who:
            fake_wecom.oauth_codes[code] = who
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.OpenWorkstation(guides_pb2.OpenWorkstationRequest(code=code), timeout=5)
        assert bad.value.code() == grpc.StatusCode.PERMISSION_DENIED
    forged = token.rsplit(".", 1)[0] + ".AAAA"
    with pytest.raises(grpc.aio.AioRpcError) as bad_token:
        await stub.GetWorkstationMember(
            guides_pb2.WorkstationMemberRequest(token=forged, member_id=mine), timeout=5
        )
    assert rpc_reason(bad_token.value) == "INVALID_SESSION"
    with guides_clock.pinned(guides_clock() + timedelta(hours=3)):
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await stub.GetWorkstationMember(
                guides_pb2.WorkstationMemberRequest(token=token, member_id=mine), timeout=5
            )
    assert rpc_reason(expired.value) == "SESSION_EXPIRED"


async def _template(rewards_channel: grpc.aio.Channel) -> str:
    template_id = uid("WS-GIFT-")
    await rewards_pb2_grpc.RewardsServiceStub(rewards_channel).CreateCouponTemplate(
        rewards_pb2.CreateCouponTemplateRequest(
            template_id=template_id,
            terms=rewards_pb2.CouponTerms(
                name="导购赠饮券",
                kind="amount_off",
                threshold_fen=0,
                discount_fen=500,
                valid_days=7,
            ),
            limits=rewards_pb2.CouponLimits(),
            status="active",
        ),
        timeout=10,
    )
    return template_id


async def test_budgets_hold_under_50_concurrent_grants(
    stub: guides_pb2_grpc.GuidesServiceStub,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    conn: asyncpg.Connection,
    rewards_channel: grpc.aio.Channel,
) -> None:
    template_id = await _template(rewards_channel)
    store = uid("WB")
    a, b = await new_staff(stub, store), await new_staff(stub, store)
    month = domain.budget_month(guides_clock(), domain.ZoneInfo("Asia/Shanghai"))
    for scope, owner, coupons in (
        ("staff", a.staff_id, 30),
        ("staff", b.staff_id, 30),
        ("store", store, 40),
    ):
        await stub.SetBudget(
            guides_pb2.SetBudgetRequest(
                scope=scope, owner_id=owner, month=month, coupons=coupons, actor="op"
            ),
            timeout=5,
        )

    async def storm(staff_id: str) -> tuple[list[guides_pb2.GrantCouponResponse], list[str]]:
        token = await session(stub, fake_wecom, staff_id)
        members = [await bind(stub, staff_id) for _ in range(50)]

        async def grant(member: str) -> guides_pb2.GrantCouponResponse | str:
            try:
                return await stub.GrantCoupon(
                    guides_pb2.GrantCouponRequest(
                        token=token, member_id=member, template_id=template_id, grant_key=uid("k")
                    ),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:
                return rpc_reason(exc)

        results = await asyncio.gather(*(grant(m) for m in members))
        return [r for r in results if not isinstance(r, str)], [
            r for r in results if isinstance(r, str)
        ]

    granted_a, refused_a = await storm(a.staff_id)
    assert len(granted_a) == 30 and set(refused_a) == {"BUDGET_EXHAUSTED"}
    assert len({g.coupon_id for g in granted_a}) == 30
    # The store had 40: guide B gets the last 10, though B's own budget is 30.
    granted_b, refused_b = await storm(b.staff_id)
    assert len(granted_b) == 10 and len(refused_b) == 40
    used = {
        (r["scope"], r["owner_id"]): r["used"]
        for r in await conn.fetch(
            "SELECT scope, owner_id, used FROM guides.budgets WHERE month = $1 AND owner_id = ANY($2)",
            month,
            [a.staff_id, b.staff_id, store],
        )
    }
    assert used == {("staff", a.staff_id): 30, ("staff", b.staff_id): 10, ("store", store): 40}
    issued = await conn.fetchval(
        "SELECT count(*) FROM rewards.coupons WHERE template_id = $1", template_id
    )
    assert issued == 40


async def test_a_grant_retried_is_replayed_and_a_refused_one_gives_the_budget_back(
    stub: guides_pb2_grpc.GuidesServiceStub,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    rewards_channel: grpc.aio.Channel,
) -> None:
    template_id = await _template(rewards_channel)
    store = uid("WR")
    g = await new_staff(stub, store)
    month = domain.budget_month(guides_clock(), domain.ZoneInfo("Asia/Shanghai"))
    for scope, owner in (("staff", g.staff_id), ("store", store)):
        await stub.SetBudget(
            guides_pb2.SetBudgetRequest(
                scope=scope, owner_id=owner, month=month, coupons=5, actor="op"
            ),
            timeout=5,
        )
    token = await session(stub, fake_wecom, g.staff_id)
    member = await bind(stub, g.staff_id)
    request = guides_pb2.GrantCouponRequest(
        token=token, member_id=member, template_id=template_id, grant_key="once"
    )
    first = await stub.GrantCoupon(request, timeout=10)
    again = await stub.GrantCoupon(request, timeout=10)
    assert (again.coupon_id, again.replayed, again.staff_remaining) == (first.coupon_id, True, 4)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GrantCoupon(
            guides_pb2.GrantCouponRequest(
                token=token, member_id=member, template_id="NO-SUCH-TEMPLATE", grant_key="nope"
            ),
            timeout=10,
        )
    assert rpc_reason(refused.value) == "COUPON_REFUSED"
    third = await stub.GrantCoupon(
        guides_pb2.GrantCouponRequest(
            token=token, member_id=member, template_id=template_id, grant_key="two"
        ),
        timeout=10,
    )
    assert (third.staff_remaining, third.store_remaining) == (3, 3)
    with pytest.raises(grpc.aio.AioRpcError) as below:
        await stub.SetBudget(
            guides_pb2.SetBudgetRequest(
                scope="staff", owner_id=g.staff_id, month=month, coupons=1, actor="op"
            ),
            timeout=5,
        )
    assert rpc_reason(below.value) == "BUDGET_BELOW_USED"
