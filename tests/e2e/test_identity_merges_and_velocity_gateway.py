"""Through the gateway: a merge made by phone binding is named in the answer,
listed for the operator (automatic, masked evidence) and undone by its id
(issue 13 item 27); a phone typed at the tills of too many stores within the
window is flagged once and listed for the operator, masked, while every till
is still served (issue 13 item 31)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from gateway.wechat_fake import FakeWeChatServer
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc

from ..harness import ServiceClock

pytestmark = pytest.mark.e2e

Pos = pos_pb2_grpc.PosServiceStub
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def new_phone() -> str:
    return f"139{random.randrange(10**8):08d}"


def key() -> str:
    return str(uuid.uuid4())


async def test_a_bind_phone_merge_is_named_listed_and_undone_by_its_id(
    http: httpx.AsyncClient, pos: Pos, wechat: FakeWeChatServer
) -> None:
    t = uuid.uuid4().hex[:10]
    phone = new_phone()
    login = await http.post(
        "/v1/members/identify",
        json={"request_key": key(), "app_id": "wx-shop", "openid": f"o-{t}"},
    )
    member_id = login.json()["member"]["member_id"]
    at_till = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id="SH001", phone=phone), timeout=10
    )
    bound = await http.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": "wx-shop",
            "openid": f"o-{t}",
            "code": wechat.fake.issue_code("wx-shop", phone),
        },
    )
    assert bound.status_code == 200, bound.text
    (merge,) = bound.json()["merges"]
    assert (merge["absorbed_member_id"], merge["rule"]) == (at_till.member_id, "identify:phone")

    listed = await http.get(f"/v1/admin/members/{member_id}/merges")
    assert listed.status_code == 200, listed.text
    (record,) = listed.json()["merges"]
    assert record["merge_id"] == merge["merge_id"]
    assert (record["automatic"], record["status"], record["unmerged_at"]) == (True, "active", None)
    assert record["actor"] == "mini-program:wx-shop"
    assert f"phone:{phone[:3]}****{phone[-4:]} (verified)" in record["evidence"]
    assert not any(phone in e for e in record["evidence"])

    undone = await http.post(
        f"/v1/admin/merges/{merge['merge_id']}/unmerge", json={"reason": "wrong person"}
    )
    assert undone.status_code == 200, undone.text
    assert undone.json()["restored"]["member_id"] == at_till.member_id
    after = (await http.get(f"/v1/admin/members/{at_till.member_id}/merges")).json()["merges"]
    assert [(m["merge_id"], m["status"], m["unmerge_reason"]) for m in after] == [
        (merge["merge_id"], "unmerged", "wrong person")
    ]
    bad = await http.get("/v1/admin/members/not-a-member/merges")
    assert bad.status_code == 422


async def test_a_phone_at_six_stores_in_a_minute_is_flagged_once_and_listed_masked(
    http: httpx.AsyncClient, pos: Pos, member_clock: ServiceClock
) -> None:
    t = random.randrange(10**6)
    stores = [f"VF{t:06d}{n}" for n in range(6)]
    for store in stores:
        created = await http.put(
            f"/v1/admin/stores/{store}",
            json={
                "name": "快闪店",
                "city": "上海",
                "address": "上海市黄浦区南京东路1号",
                "time_zone": "Asia/Shanghai",
                "latitude": 31.24,
                "longitude": 121.49,
            },
        )
        assert created.status_code == 200, created.text
    phone = new_phone()
    member_ids = set()
    for n, store in enumerate(stores):
        with member_clock.pinned(T0 + timedelta(seconds=10 * n)):
            answer = await pos.IdentifyMember(
                pos_pb2.IdentifyMemberRequest(store_id=store, phone=phone), timeout=10
            )
        member_ids.add(answer.member_id)
    # Flag, never block: every till got the one member.
    assert len(member_ids) == 1

    masked = f"{phone[:3]}****{phone[-4:]}"
    mine = []
    cursor = None
    while True:
        params = {"page_size": 100} | ({"cursor": cursor} if cursor else {})
        page = await http.get("/v1/admin/velocity-flags", params=params)
        assert page.status_code == 200, page.text
        mine += [f for f in page.json()["flags"] if f["value_masked"] == masked]
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    assert [(f["type"], f["store_count"], f["store_ids"], f["member_id"]) for f in mine] == [
        ("phone", 5, sorted(stores[:5]), member_ids.pop())
    ]
    assert phone not in str(mine)
    bad = await http.get("/v1/admin/velocity-flags", params={"cursor": "not-ours"})
    assert (bad.status_code, bad.json()["code"], bad.json()["field"]) == (
        422,
        "INVALID_PAGE_TOKEN",
        "cursor",
    )
