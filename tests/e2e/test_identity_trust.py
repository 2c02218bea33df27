"""Identity trust boundaries through the real gateway (issue 15, items 5, 6, 7,
9, 13, 15): a mini-program client speaks only for its own WeChat apps; a
phone binding is proven by WeChat (the local fake) or stays unverified; every
audit record names the authenticated principal, never a body field; the
gateway's member caches follow an unmerge or an erasure on the next request;
placeholder unionids are absent; bind-phone never answers with another
member; a refreshed member code scans (item 10); a quarantine is reported
(item 14)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from gateway.app import Gateway
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth
from gateway.auth.model import (
    ADMIN_MEMBERS,
    ADMIN_REWARDS,
    MEMBER_ANY,
    PII_READ,
    ClientKind,
)
from gateway.wechat_fake import FakeWeChatServer
from loyalty.events.v1 import events_pb2
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.errors import InvalidArgument
from servicekit.server import ServiceApp
from services.member.metrics import MemberMetrics
from tests.harness import Infra, eventually
from tests.integration.test_member_oneid import member_stream

pytestmark = pytest.mark.e2e

APP = "wx-shop"
OTHER_APP = "wx-other"
STORE = "SH001"


def key() -> str:
    return str(uuid.uuid4())


def new_phone() -> str:
    return f"137{uuid.uuid4().int % 10**8:08d}"


def url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.http_port}"


@pytest.fixture(scope="module")
async def mp_key(client_admin: ClientAdmin) -> IssuedKey:
    """A mini-program backend registered for wx-shop only."""
    return await client_admin.create(
        ClientKind.MINIPROGRAM_BACKEND, "identity mini-program", app_ids=[APP]
    )


@pytest.fixture
async def mp(gateway: Gateway, mp_key: IssuedKey) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=url(gateway), timeout=10, auth=HmacAuth(mp_key.key_id, mp_key.secret)
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def console_key(client_admin: ClientAdmin) -> IssuedKey:
    return await client_admin.create(
        ClientKind.OPERATOR_CONSOLE,
        "identity console",
        client_id=f"console-{uuid.uuid4().hex[:8]}",
        scopes=[MEMBER_ANY, ADMIN_MEMBERS, ADMIN_REWARDS, PII_READ],
        rate_per_second=1000.0,
        burst=1000,
    )


@pytest.fixture
async def console(gateway: Gateway, console_key: IssuedKey) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=url(gateway), timeout=10, auth=HmacAuth(console_key.key_id, console_key.secret)
    ) as client:
        yield client


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    yield conn
    await conn.close()


async def login(
    client: httpx.AsyncClient, openid: str, unionid: str | None = None, app: str = APP
) -> str:
    body = {"request_key": key(), "app_id": app, "openid": openid}
    if unionid is not None:
        body["unionid"] = unionid
    reply = await client.post("/v1/members/identify", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["member"]["member_id"])


def me(openid: str, app: str = APP) -> dict[str, str]:
    return {"X-Member-Appid": app, "X-Member-Openid": openid}


# ---- item 5: a mini-program client speaks only for its own apps ------------------


async def test_a_miniprogram_client_is_refused_for_another_app(
    mp: httpx.AsyncClient, http: httpx.AsyncClient
) -> None:
    openid = f"o-{uuid.uuid4().hex[:12]}"
    member_id = await login(mp, openid)
    # The other app's openid exists (a login through a client of that app) ...
    other = f"o-{uuid.uuid4().hex[:12]}"
    other_member = await login(http, other, app=OTHER_APP)
    # ... but this client may neither log it in nor act for it.
    refused = await mp.post(
        "/v1/members/identify",
        json={"request_key": key(), "app_id": OTHER_APP, "openid": other},
    )
    assert refused.status_code == 403, refused.text
    assert (refused.json()["code"], refused.json()["field"]) == ("APP_NOT_BOUND", "app_id")
    acting = await mp.get(f"/v1/members/{other_member}/points", headers=me(other, OTHER_APP))
    assert acting.status_code == 403
    assert (acting.json()["code"], acting.json()["field"]) == ("APP_NOT_BOUND", "x-member-appid")
    bind = await mp.post(
        "/v1/members/bind-phone",
        json={"request_key": key(), "app_id": OTHER_APP, "openid": other, "phone": new_phone()},
    )
    assert bind.status_code == 403 and bind.json()["code"] == "APP_NOT_BOUND"
    # Its own app still works.
    own = await mp.get(f"/v1/members/{member_id}/points", headers=me(openid))
    assert own.status_code == 200, own.text


async def test_registration_binds_miniprogram_clients_to_apps(client_admin: ClientAdmin) -> None:
    with pytest.raises(InvalidArgument) as missing:
        await client_admin.create(ClientKind.MINIPROGRAM_BACKEND, "no apps")
    assert missing.value.code == "APP_IDS_REQUIRED"
    with pytest.raises(InvalidArgument) as wrong_kind:
        await client_admin.create(ClientKind.OPERATOR_CONSOLE, "console", app_ids=[APP])
    assert wrong_kind.value.code == "APP_IDS_FOR_MINIPROGRAM_ONLY"
    issued = await client_admin.create(
        ClientKind.MINIPROGRAM_BACKEND, "two apps", app_ids=[OTHER_APP, APP, APP]
    )
    (row,) = [c for c in await client_admin.list() if c.client_id == issued.client_id]
    assert row.app_ids == sorted([APP, OTHER_APP])
    assert await client_admin.set_apps(issued.client_id, [OTHER_APP]) == [OTHER_APP]


# ---- item 6: phone binding proven by WeChat, or unverified -----------------------


async def test_a_wechat_code_proves_the_phone_and_merges(
    mp: httpx.AsyncClient, pos: pos_pb2_grpc.PosServiceStub, wechat: FakeWeChatServer
) -> None:
    openid = f"o-{uuid.uuid4().hex[:12]}"
    member_id = await login(mp, openid)
    phone = new_phone()
    at_till = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    tokens_before = wechat.fake.token_requests
    code = wechat.fake.issue_code(APP, phone)
    bound = await mp.post(
        "/v1/members/bind-phone",
        json={"request_key": key(), "app_id": APP, "openid": openid, "code": code},
    )
    assert bound.status_code == 200, bound.text
    assert bound.json()["member"]["member_id"] == member_id
    assert bound.json()["merged_member_ids"] == [at_till.member_id]
    assert bound.json()["conflict"] is None
    # The code is single-use (WeChat's rule): a replay under a new key is refused.
    replay = await mp.post(
        "/v1/members/bind-phone",
        json={"request_key": key(), "app_id": APP, "openid": openid, "code": code},
    )
    assert replay.status_code == 422
    assert (replay.json()["code"], replay.json()["field"]) == ("PHONE_CODE_INVALID", "code")
    # A code WeChat issued to another app proves nothing here.
    foreign = wechat.fake.issue_code(OTHER_APP, phone)
    other_app = await mp.post(
        "/v1/members/bind-phone",
        json={"request_key": key(), "app_id": APP, "openid": openid, "code": foreign},
    )
    assert other_app.status_code == 422 and other_app.json()["code"] == "PHONE_CODE_INVALID"
    # The access token is cached: at most one token request for all of the above.
    assert wechat.fake.token_requests - tokens_before <= 1


async def test_an_expired_access_token_is_refreshed_once(
    mp: httpx.AsyncClient, wechat: FakeWeChatServer
) -> None:
    openid = f"o-{uuid.uuid4().hex[:12]}"
    await login(mp, openid)
    await mp.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": APP,
            "openid": openid,
            "code": wechat.fake.issue_code(APP, new_phone()),
        },
    )
    wechat.fake.expire_tokens()
    before = wechat.fake.token_requests
    bound = await mp.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": APP,
            "openid": openid,
            "code": wechat.fake.issue_code(APP, new_phone()),
        },
    )
    assert bound.status_code == 200, bound.text
    assert wechat.fake.token_requests == before + 1


async def test_an_app_without_wechat_credentials_cannot_prove_phones(
    http: httpx.AsyncClient, wechat: FakeWeChatServer
) -> None:
    reply = await http.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": "wx-unknown",
            "openid": f"o-{uuid.uuid4().hex[:12]}",
            "code": wechat.fake.issue_code("wx-unknown", new_phone()),
        },
    )
    assert reply.status_code == 403
    assert (reply.json()["code"], reply.json()["field"]) == ("WECHAT_APP_NOT_CONFIGURED", "app_id")
    both = await http.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": APP,
            "openid": "o-x",
            "code": "c",
            "phone": new_phone(),
        },
    )
    assert both.status_code == 422 and both.json()["code"] == "CODE_OR_PHONE_REQUIRED"


async def test_an_asserted_phone_is_unverified_and_takes_over_nobody(
    mp: httpx.AsyncClient, pos: pos_pb2_grpc.PosServiceStub, wechat: FakeWeChatServer
) -> None:
    """A compromised backend declaring a victim's phone gets neither the
    victim's member nor a merge: the phone is attach-only."""
    victim_openid = f"o-{uuid.uuid4().hex[:12]}"
    victim = await login(mp, victim_openid)
    phone = new_phone()
    bound = await mp.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": APP,
            "openid": victim_openid,
            "code": wechat.fake.issue_code(APP, phone),
        },
    )
    assert bound.status_code == 200, bound.text
    # The attacker's openid was never seen: it must not land on the victim.
    attacker_openid = f"o-{uuid.uuid4().hex[:12]}"
    taken = await mp.post(
        "/v1/members/bind-phone",
        json={"request_key": key(), "app_id": APP, "openid": attacker_openid, "phone": phone},
    )
    assert taken.status_code == 200, taken.text
    body = taken.json()
    assert body["member"]["member_id"] != victim
    assert body["merged_member_ids"] == []
    assert body["conflict"] == "PHONE_OWNED_ELSEWHERE"
    assert body["member"]["phone_masked"] == ""
    # The attacker cannot act as the victim with its own openid.
    as_victim = await mp.get(f"/v1/members/{victim}/points", headers=me(attacker_openid))
    assert as_victim.status_code == 403
    # An unowned asserted phone is attached, unverified: a later WeChat-proven
    # binding of the same phone by someone else is not blocked by it.
    lone = f"o-{uuid.uuid4().hex[:12]}"
    lone_member = await login(mp, lone)
    spare = new_phone()
    attached = await mp.post(
        "/v1/members/bind-phone",
        json={"request_key": key(), "app_id": APP, "openid": lone, "phone": spare},
    )
    assert attached.json()["member"]["member_id"] == lone_member
    assert attached.json()["conflict"] is None


# ---- item 15: bind-phone never answers with another member ----------------------


async def test_bind_phone_of_another_member_answers_the_callers_own(
    mp: httpx.AsyncClient, wechat: FakeWeChatServer
) -> None:
    """Two WeChat users (two unionids) prove one family phone: merging would
    give one member two unionids, so it goes to review, and the second caller
    still gets its own member, with a named conflict."""
    t = uuid.uuid4().hex[:10]
    first = await login(mp, f"oa-{t}", f"ua-{t}")
    phone = new_phone()
    await mp.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": APP,
            "openid": f"oa-{t}",
            "code": wechat.fake.issue_code(APP, phone),
        },
    )
    second = await login(mp, f"ob-{t}", f"ub-{t}")
    reply = await mp.post(
        "/v1/members/bind-phone",
        json={
            "request_key": key(),
            "app_id": APP,
            "openid": f"ob-{t}",
            "code": wechat.fake.issue_code(APP, phone),
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["member"]["member_id"] == second != first
    assert body["conflict"] == "PHONE_OWNED_ELSEWHERE"
    assert body["review_id"]
    assert body["member"]["phone_masked"] == ""
    assert body["ignored"] == [{"field": "phone", "reason": "OWNED_ELSEWHERE"}]
    assert first not in str(body)


# ---- item 13: placeholder unionids are absent -------------------------------------


@pytest.mark.parametrize("placeholder", ["", "undefined", "null", "  NULL "])
async def test_placeholder_unionid_is_absent(mp: httpx.AsyncClient, placeholder: str) -> None:
    openid = f"o-{uuid.uuid4().hex[:12]}"
    reply = await mp.post(
        "/v1/members/identify",
        json={"request_key": key(), "app_id": APP, "openid": openid, "unionid": placeholder},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["created"] and reply.json()["ignored"] == []
    # The same person logs in later with a real unionid: the same member.
    again = await login(mp, openid, f"u-{uuid.uuid4().hex[:12]}")
    assert again == reply.json()["member"]["member_id"]


# ---- item 7: the audit principal is who signed --------------------------------------


async def test_audit_records_name_the_authenticated_principal(
    console: httpx.AsyncClient,
    http: httpx.AsyncClient,
    console_key: IssuedKey,
    trusted_key: IssuedKey,
    db: asyncpg.Connection,
) -> None:
    t = uuid.uuid4().hex[:10]
    a = await login(http, f"oa-{t}")
    b = await login(http, f"ob-{t}")
    user = {"X-Operator-User": "li.wei"}
    who = f"{console_key.client_id}/li.wei"
    # A body that still names someone else changes nothing.
    merged = await console.post(
        "/v1/admin/members/merge",
        json={"member_ids": [a, b], "reason": "ticket 9", "operator": "someone-else"},
        headers=user,
    )
    assert merged.status_code == 200, merged.text
    (merge_id,) = [m["merge_id"] for m in merged.json()["merges"]]
    assert await db.fetchval("SELECT actor FROM member.merges WHERE id = $1", merge_id) == who
    undone = await console.post(
        f"/v1/admin/merges/{merge_id}/unmerge", json={"reason": "wrong"}, headers=user
    )
    assert undone.status_code == 200, undone.text
    assert await db.fetchval("SELECT unmerged_by FROM member.merges WHERE id = $1", merge_id) == who
    pii = await console.get(
        f"/v1/admin/members/{a}/pii",
        params={"purpose": "call back", "accessor": "someone-else"},
        headers=user,
    )
    assert pii.status_code == 200, pii.text
    accessors = await db.fetch(
        "SELECT accessor, purpose FROM member.pii_access_log WHERE member_id = $1", a
    )
    assert [(r["accessor"], r["purpose"]) for r in accessors] == [(who, "call back")]
    # Without the header: the client id alone (the ops tooling of the suite).
    adjusted = await http.post(
        f"/v1/admin/members/{a}/points/adjustments",
        json={"points": 5, "reason": "goodwill", "idempotency_key": key()},
    )
    assert adjusted.status_code == 200, adjusted.text
    assert (
        await db.fetchval(
            "SELECT operator_id FROM rewards.points_transactions WHERE id = $1",
            uuid.UUID(adjusted.json()["transaction_id"]),
        )
        == trusted_key.client_id
    )
    erased = await console.post(
        f"/v1/admin/members/{b}/erase", json={"reason": "PIPL #9"}, headers=user
    )
    assert erased.status_code == 200, erased.text
    erasure = await db.fetchval(
        "SELECT accessor FROM member.pii_access_log WHERE member_id = $1 AND purpose LIKE"
        " 'erasure:%'",
        b,
    )
    assert erasure == who


async def test_a_coupon_grant_records_the_principal(
    console: httpx.AsyncClient,
    http: httpx.AsyncClient,
    console_key: IssuedKey,
    db: asyncpg.Connection,
) -> None:
    template_id = f"ID-{uuid.uuid4().hex[:8]}"
    created = await console.post(
        "/v1/admin/coupon-templates",
        json={
            "template_id": template_id,
            "terms": {
                "name": "sorry",
                "kind": "amount_off",
                "threshold_fen": 0,
                "discount_fen": 500,
                "valid_days": 30,
            },
            "limits": {"total_stock": 10, "per_member_limit": 2},
            "status": "active",
        },
        headers={"X-Operator-User": "wang"},
    )
    assert created.status_code == 201, created.text
    member = await login(http, f"o-{uuid.uuid4().hex[:12]}")
    granted = await console.post(
        "/v1/admin/coupons:issue",
        json={"template_id": template_id, "member_id": member, "issue_key": key()},
        headers={"X-Operator-User": "wang"},
    )
    assert granted.status_code == 201, granted.text
    issued_by = await db.fetchval(
        "SELECT issued_by FROM rewards.coupons WHERE code = $1", granted.json()["code"]
    )
    assert issued_by == f"{console_key.client_id}/wang"
    # Who made the template version is the principal too.
    assert (
        await db.fetchval(
            "SELECT created_by FROM rewards.coupon_template_versions WHERE template_id = $1",
            template_id,
        )
        == f"{console_key.client_id}/wang"
    )
    # A body naming the operator is refused (these bodies forbid unknown fields).
    named = await console.post(
        "/v1/admin/coupons:issue",
        json={
            "template_id": template_id,
            "member_id": member,
            "issue_key": key(),
            "operator_id": "ops@brand",
        },
    )
    assert named.status_code == 422


async def test_only_a_console_asserts_an_operator_user(
    http: httpx.AsyncClient, console: httpx.AsyncClient
) -> None:
    member = await login(http, f"o-{uuid.uuid4().hex[:12]}")
    refused = await http.get(
        f"/v1/admin/members/{member}/pii",
        params={"purpose": "x"},
        headers={"X-Operator-User": "li.wei"},
    )
    assert refused.status_code == 403
    assert refused.json()["code"] == "OPERATOR_USER_NOT_ALLOWED"
    malformed = await console.get(
        f"/v1/admin/members/{member}/pii",
        params={"purpose": "x"},
        headers={"X-Operator-User": "li wei/admin"},
    )
    assert malformed.status_code == 422 and malformed.json()["code"] == "INVALID_OPERATOR_USER"


async def test_an_operator_user_rewritten_in_transit_breaks_the_signature(
    http: httpx.AsyncClient, console: httpx.AsyncClient
) -> None:
    """X-Operator-User names who is audited, so it is signed: a proxy that rewrites it
    after the console signed gets 401, never an audit record under another name."""
    member = await login(http, f"o-{uuid.uuid4().hex[:12]}")
    pii = f"/v1/admin/members/{member}/pii"
    untouched = await console.get(
        pii, params={"purpose": "x"}, headers={"X-Operator-User": "li.wei"}
    )
    assert untouched.status_code == 200, untouched.text

    async def rewrite(request: httpx.Request) -> None:  # runs after the signing
        request.headers["X-Operator-User"] = "mallory"

    async with httpx.AsyncClient(
        base_url=console.base_url, auth=console.auth, event_hooks={"request": [rewrite]}
    ) as tampered:
        reply = await tampered.get(
            pii, params={"purpose": "x"}, headers={"X-Operator-User": "li.wei"}
        )
    assert reply.status_code == 401
    assert reply.json()["code"] == "SIGNATURE_INVALID"


# ---- item 9: the gateway's member caches follow unmerge and erasure ----------------


async def test_an_unmerge_takes_effect_on_the_next_request(
    mp: httpx.AsyncClient, console: httpx.AsyncClient
) -> None:
    t = uuid.uuid4().hex[:10]
    a = await login(mp, f"oa-{t}")
    b_openid = f"ob-{t}"
    b = await login(mp, b_openid)
    merged = await console.post(
        # "operator" is ignored now; it lets this test run on the code before the fix.
        "/v1/admin/members/merge",
        json={"member_ids": [a, b], "reason": "same person", "operator": "x"},
    )
    assert merged.status_code == 200, merged.text
    (merge_id,) = [m["merge_id"] for m in merged.json()["merges"]]
    # b's openid now speaks for the survivor a, and for b's old id: both cached.
    assert (await mp.get(f"/v1/members/{a}/points", headers=me(b_openid))).status_code == 200
    assert (await mp.get(f"/v1/members/{b}/points", headers=me(f"oa-{t}"))).status_code == 200
    undone = await console.post(
        f"/v1/admin/merges/{merge_id}/unmerge", json={"reason": "x", "operator": "x"}
    )
    assert undone.status_code == 200, undone.text
    # The very next requests: b's openid is b's again, and a's openid not b's.
    after = await mp.get(f"/v1/members/{a}/points", headers=me(b_openid))
    assert after.status_code == 403 and after.json()["code"] == "MEMBER_MISMATCH"
    root = await mp.get(f"/v1/members/{b}/points", headers=me(f"oa-{t}"))
    assert root.status_code == 403 and root.json()["code"] == "MEMBER_MISMATCH"
    assert (await mp.get(f"/v1/members/{b}/points", headers=me(b_openid))).status_code == 200


async def test_an_erasure_takes_effect_on_the_next_request(
    mp: httpx.AsyncClient, console: httpx.AsyncClient
) -> None:
    openid = f"o-{uuid.uuid4().hex[:12]}"
    member = await login(mp, openid)
    assert (await mp.get(f"/v1/members/{member}/points", headers=me(openid))).status_code == 200
    erased = await console.post(
        f"/v1/admin/members/{member}/erase", json={"reason": "PIPL", "operator": "x"}
    )
    assert erased.status_code == 200, erased.text
    after = await mp.get(f"/v1/members/{member}/points", headers=me(openid))
    assert after.status_code == 403 and after.json()["code"] == "MEMBER_MISMATCH"


# ---- item 10: member code, one scan each -----------------------------------------------


async def test_a_refreshed_member_code_scans_after_the_last_one_did(
    mp: httpx.AsyncClient, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    """The mini-program refreshes right after a scan: the new code is another
    one, and it scans (it used to be the same code for 30 s, refused as used)."""
    openid = f"o-{uuid.uuid4().hex[:12]}"
    member = await login(mp, openid)
    for _ in range(2):
        shown = await mp.post(f"/v1/members/{member}/member-code", headers=me(openid))
        assert shown.status_code == 200, shown.text
        scanned = await pos.IdentifyMember(
            pos_pb2.IdentifyMemberRequest(store_id=STORE, member_code=shown.json()["code"]),
            timeout=10,
        )
        assert scanned.member_id == member


# ---- item 14: quarantine is reported -------------------------------------------------


async def test_a_phone_typed_for_many_members_is_quarantined_and_reported(
    mp: httpx.AsyncClient, member_app: ServiceApp, infra: Infra
) -> None:
    """A staff phone asserted for member after member: the 4th crosses the
    threshold (3); the member service emits IdentifierQuarantined and counts
    it once, so an alert can fire."""
    metrics: MemberMetrics = member_app.member_metrics  # type: ignore[attr-defined]

    def counted() -> float:
        labels = {"identifier_type": "phone"}
        value = metrics.registry.get_sample_value("member_identifiers_quarantined_total", labels)
        return value or 0.0

    before = counted()
    phone = new_phone()
    for n in range(5):
        openid = f"o{n}-{uuid.uuid4().hex[:10]}"
        await login(mp, openid)
        bound = await mp.post(
            "/v1/members/bind-phone",
            json={"request_key": key(), "app_id": APP, "openid": openid, "phone": phone},
        )
        assert bound.status_code == 200, bound.text
    assert counted() == before + 1
    masked = f"{phone[:3]}****{phone[-4:]}"

    async def published() -> bool:
        found = await member_stream(infra, events_pb2.IdentifierQuarantined)
        return [e.linked_members for e in found if e.value_masked == masked] == [4]

    await eventually(published)


async def test_the_clients_command_binds_apps(infra: Infra) -> None:
    """`python -m gateway clients create --kind miniprogram_backend` needs
    --app-id; `set-apps` rebinds."""
    env = {
        **os.environ,
        "DATABASE_URL": infra.database_url,
        "REDIS_URL": infra.redis_url,
        "REDIS_NAMESPACE": infra.namespace,
    }

    async def clients(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "clients",
            *argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        return proc.returncode or 0, out.decode(), err.decode()

    client_id = f"mp-cli-{uuid.uuid4().hex[:6]}"
    code, _, err = await clients(
        "create", "--kind", "miniprogram_backend", "--name", "cli", "--client-id", client_id
    )
    assert code == 1 and json.loads(err)["error"]["code"] == "APP_IDS_REQUIRED"
    code, out, err = await clients(
        "create",
        "--kind",
        "miniprogram_backend",
        "--name",
        "cli",
        "--client-id",
        client_id,
        "--app-id",
        APP,
    )
    assert code == 0, err
    assert json.loads(out)["client_id"] == client_id
    code, out, err = await clients("set-apps", client_id, "--app-id", OTHER_APP)
    assert code == 0, err
    assert json.loads(out) == {"client_id": client_id, "app_ids": [OTHER_APP]}
