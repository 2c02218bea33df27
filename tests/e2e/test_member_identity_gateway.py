"""OneID through the gateway: mini-program login and phone binding, POS
identify by phone, member code and card, profile and consent, and the
operator routes (review queue, unmerge, erase, audited PII read)."""

from __future__ import annotations

import random
import uuid

import grpc
import httpx
import pytest

from gateway.wechat_fake import FakeWeChatServer
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info

pytestmark = pytest.mark.e2e

STORE = "SH001"
Pos = pos_pb2_grpc.PosServiceStub


def new_phone() -> str:
    return f"139{random.randrange(10**8):08d}"


def key() -> str:
    return str(uuid.uuid4())


async def login(http: httpx.AsyncClient, openid: str, unionid: str | None = None) -> dict:
    body = {"request_key": key(), "app_id": "wx-shop", "openid": openid}
    if unionid:
        body["unionid"] = unionid
    reply = await http.post("/v1/members/identify", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_login_bind_phone_then_pos_finds_the_same_member(
    http: httpx.AsyncClient, pos: Pos, wechat: FakeWeChatServer
) -> None:
    t = uuid.uuid4().hex[:10]
    phone = new_phone()
    first = await login(http, f"o-{t}", f"u-{t}")
    assert first["created"]
    member_id = first["member"]["member_id"]
    # The POS saw this number first: a member of its own.
    at_till = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    assert at_till.member_id != member_id
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
    body = bound.json()
    # The login member is the older one: it survives, the POS member is absorbed.
    assert body["member"]["member_id"] == member_id
    assert body["merged_member_ids"] == [at_till.member_id]
    assert body["member"]["phone_masked"] == f"{phone[:3]}****{phone[-4:]}"
    again = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    assert again.member_id == member_id and not again.created


async def test_login_refuses_a_missing_request_key(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/members/identify", json={"app_id": "wx", "openid": "o-1"})
    assert reply.status_code == 422
    assert reply.json()["field"] == "request_key"
    junk = await http.post(
        "/v1/members/identify", json={"request_key": key(), "app_id": "wx", "openid": "null"}
    )
    assert junk.status_code == 422
    assert (junk.json()["code"], junk.json()["field"]) == ("EMPTY_IDENTIFIER", "openid")


async def test_pos_member_code_once_and_card_enrolment(http: httpx.AsyncClient, pos: Pos) -> None:
    member_id = (await login(http, f"o-{uuid.uuid4().hex[:10]}"))["member"]["member_id"]
    code = (await http.post(f"/v1/members/{member_id}/member-code")).json()
    assert len(code["code"]) == 20
    scanned = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, member_code=code["code"]), timeout=10
    )
    assert scanned.member_id == member_id and not scanned.created
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pos.IdentifyMember(
            pos_pb2.IdentifyMemberRequest(store_id=STORE, member_code=code["code"]), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value) == ("MEMBER_CODE_USED", "member_code")
    card = f"CARD{random.randrange(10**9)}"
    enrolled = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, card=card), timeout=10
    )
    assert enrolled.created
    found = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, card=card), timeout=10
    )
    assert found.member_id == enrolled.member_id and not found.created


async def test_profile_and_consent_over_http(http: httpx.AsyncClient) -> None:
    member_id = (await login(http, f"o-{uuid.uuid4().hex[:10]}"))["member"]["member_id"]
    patched = await http.patch(
        f"/v1/members/{member_id}/profile",
        json={"nickname": "小满", "birthday": "1998-06-21", "gender": "female", "source": "mp"},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["nickname"] == "小满" and patched.json()["gender"] == "female"
    bad = await http.patch(
        f"/v1/members/{member_id}/profile", json={"birthday": "21/06/1998", "source": "mp"}
    )
    assert bad.status_code == 422 and bad.json()["field"] == "birthday"
    no = await http.put(
        f"/v1/members/{member_id}/consents",
        json={"purpose": "personalisation", "channel": "all", "granted": False, "source": "mp"},
    )
    assert no.status_code == 200 and no.json()["personalisation_allowed"] is False
    history = (await http.get(f"/v1/members/{member_id}/consents/history")).json()
    assert [(r["purpose"], r["granted"], r["actor"]) for r in history["records"]] == [
        ("personalisation", False, "member")
    ]


async def test_operators_review_unmerge_pii_and_erase(
    http: httpx.AsyncClient, wechat: FakeWeChatServer
) -> None:
    t = uuid.uuid4().hex[:10]
    phone_a, phone_b = new_phone(), new_phone()
    a = await login(http, f"oa-{t}", f"ua-{t}")
    await http.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": "wx-shop",
            "openid": f"oa-{t}",
            "code": wechat.fake.issue_code("wx-shop", phone_a),
        },
    )
    b = await login(http, f"ob-{t}")
    await http.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": "wx-shop",
            "openid": f"ob-{t}",
            "code": wechat.fake.issue_code("wx-shop", phone_b),
        },
    )
    # b's openid now shows up with a's unionid: two verified phones -> review.
    linked = await http.post(
        "/v1/members/identify",
        json={"request_key": key(), "app_id": "wx-shop", "openid": f"ob-{t}", "unionid": f"ua-{t}"},
    )
    review_id = linked.json()["review_id"]
    assert review_id
    queue = (await http.get("/v1/admin/merge-reviews", params={"page_size": 500})).json()
    assert review_id in {r["review_id"] for r in queue["reviews"]}
    approved = await http.post(f"/v1/admin/merge-reviews/{review_id}/approve", json={"note": "ok"})
    assert approved.status_code == 200, approved.text
    (merge_id,) = approved.json()["merge_ids"]
    undone = await http.post(f"/v1/admin/merges/{merge_id}/unmerge", json={"reason": "wrong"})
    assert undone.status_code == 200, undone.text
    assert undone.json()["restored"]["member_id"] == b["member"]["member_id"]
    a_id = a["member"]["member_id"]
    pii = await http.get(f"/v1/admin/members/{a_id}/pii", params={"purpose": "call back"})
    assert pii.json()["phone"] == f"+86{phone_a}"
    missing = await http.get(f"/v1/admin/members/{a_id}/pii")
    assert missing.status_code == 422
    erased = await http.post(f"/v1/admin/members/{a_id}/erase", json={"reason": "PIPL #7"})
    assert erased.status_code == 200 and erased.json()["erased_member_ids"] == [a_id]
    gone = await http.get(f"/v1/members/{a_id}")
    assert gone.status_code == 404 and gone.json()["code"] == "MEMBER_ERASED"


async def test_the_quarantine_list_takes_a_cursor(http: httpx.AsyncClient) -> None:
    # Paging itself is proved on the service (test_member_oneid); here the
    # door: the cursor reaches member and a bad one is named as `cursor`.
    first = await http.get("/v1/admin/quarantined-identifiers", params={"page_size": 1})
    assert first.status_code == 200, first.text
    assert set(first.json()) == {"identifiers", "next_cursor"}
    bad = await http.get("/v1/admin/quarantined-identifiers", params={"cursor": "not-ours"})
    assert bad.status_code == 422
    assert (bad.json()["code"], bad.json()["field"]) == ("INVALID_PAGE_TOKEN", "cursor")
    if first.json()["next_cursor"]:
        second = await http.get(
            "/v1/admin/quarantined-identifiers",
            params={"page_size": 1, "cursor": first.json()["next_cursor"]},
        )
        assert second.status_code == 200
        assert second.json()["identifiers"] != first.json()["identifiers"]


async def test_an_operator_finds_a_member_by_phone_or_member_number_masked(
    http: httpx.AsyncClient, pos: Pos
) -> None:
    phone = new_phone()
    at_till = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    by_phone = await http.post("/v1/admin/members/lookup", json={"phone": phone})
    assert by_phone.status_code == 200, by_phone.text
    found = by_phone.json()
    assert found["member_id"] == at_till.member_id
    # Masked: the answer never carries the phone itself.
    assert found["phone_masked"] == f"{phone[:3]}****{phone[-4:]}"
    assert phone not in by_phone.text
    by_number = await http.post(
        "/v1/admin/members/lookup", json={"member_number": found["member_number"]}
    )
    assert by_number.json()["member_id"] == at_till.member_id
    # A phone nobody owns is not enrolled by looking it up.
    stranger = new_phone()
    unknown = await http.post("/v1/admin/members/lookup", json={"phone": stranger})
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "UNKNOWN_IDENTIFIER"
    assert (
        await http.post("/v1/admin/members/lookup", json={"phone": stranger})
    ).status_code == 404
    for body in ({}, {"phone": phone, "member_number": found["member_number"]}):
        refused = await http.post("/v1/admin/members/lookup", json=body)
        assert refused.status_code == 422, refused.text
        assert (refused.json()["code"], refused.json()["field"]) == (
            "PHONE_OR_MEMBER_NUMBER_REQUIRED",
            "phone",
        )
