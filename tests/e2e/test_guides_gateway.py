"""The guide routes through a gateway with the guides service deployed: WeCom's
callback door (public, WeCom-signed), staff admin, bindings, tags and reports
(signed operator requests with admin:guides)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import grpc
import httpx
import pytest

from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth
from gateway.auth.model import ADMIN_MEMBERS, GUIDES_WORKSTATION, ClientKind
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.server import ServiceApp
from services.guides.wecom import FakeWeCom
from tests.conftest import stopping
from tests.harness import Infra, ServiceClock, eventually
from tests.integration.guides_support import contact_event, signed_callback, uid, wecom_crypto

from .conftest import gateway_settings
from .doors import UNLIMITED


@pytest.fixture(scope="module")
async def guides_gateway(
    infra: Infra,
    gateway: Gateway,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    guides_app: ServiceApp,
) -> AsyncIterator[Gateway]:
    # The session gateway's door store (same database, Redis namespace and secret).
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr="",
            guides_addr=f"127.0.0.1:{guides_app.port}",
            auth_enabled=True,
            database_url=infra.database_url,
            redis_url=infra.redis_url,
            redis_namespace=infra.namespace,
        )
    )
    await gw.start()
    yield gw
    await stopping("guides gateway", gw.stop())


@pytest.fixture(scope="module")
async def ops(guides_gateway: Gateway, trusted_key: IssuedKey) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{guides_gateway.http_port}",
        timeout=10,
        auth=HmacAuth(trusted_key.key_id, trusted_key.secret),
        headers={"Idempotency-Key": "unset"},
    ) as client:
        yield client


def _idem() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def test_wecom_callback_door_and_admin_routes(
    guides_gateway: Gateway,
    trusted_key: IssuedKey,
    ops: httpx.AsyncClient,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
) -> None:
    base = f"http://127.0.0.1:{guides_gateway.http_port}"
    crypto = wecom_crypto(fake_wecom.corp_id)
    staff_id = uid("g")
    put = await ops.put(
        f"/v1/admin/staff/{staff_id}",
        json={"name": "小李", "store_id": "SH002", "role": "guide"},
        headers=_idem(),
    )
    assert put.status_code == 200, put.text
    # Audited under the authenticated client, never a body field.
    assert put.json()["staff_code"] == staff_id
    assert put.json()["updated_by"] == trusted_key.client_id
    bad = await ops.put(
        f"/v1/admin/staff/{uid('g')}",
        json={"name": "x", "store_id": "SH002", "role": "cashier"},
        headers=_idem(),
    )
    assert bad.status_code == 422

    # WeCom's URL check and an event, with no client credentials at all.
    async with httpx.AsyncClient(base_url=base, timeout=10) as wecom:
        echo = crypto.encrypt(b"echo-42")
        ts = str(int(guides_clock().timestamp()))
        query = {"msg_signature": crypto.signature(ts, "n1", echo), "timestamp": ts, "nonce": "n1"}
        check = await wecom.get(f"/v1/wecom/callback?{urlencode({**query, 'echostr': echo})}")
        assert (check.status_code, check.text) == (200, "echo-42")
        ext = uid("wm")
        fake_wecom.add_contact(ext, "顾客")
        now = guides_clock()
        cb = signed_callback(crypto, contact_event("add_external_contact", staff_id, ext, now), now)
        params = urlencode(
            {"msg_signature": cb.msg_signature, "timestamp": cb.timestamp, "nonce": cb.nonce}
        )
        sent = await wecom.post(
            f"/v1/wecom/callback?{params}", content=cb.body, headers={"Content-Type": "text/xml"}
        )
        assert (sent.status_code, sent.text) == (200, "success")
        again = await wecom.post(
            f"/v1/wecom/callback?{params}", content=cb.body, headers={"Content-Type": "text/xml"}
        )
        assert (again.status_code, again.text) == (200, "success")
        forged = await wecom.post(
            f"/v1/wecom/callback?{params}",
            content=cb.body.replace(b"]]></Encrypt>", b"A]]></Encrypt>"),
            headers={"Content-Type": "text/xml"},
        )
        assert forged.status_code == 403 and forged.json()["code"] == "BAD_SIGNATURE"

    import asyncpg

    from servicekit.db import asyncpg_dsn

    infra_url = guides_gateway.settings.database_url
    conn = await asyncpg.connect(asyncpg_dsn(infra_url))
    try:
        member_id = str(
            await eventually(
                lambda: conn.fetchval(
                    "SELECT member_id FROM guides.contacts WHERE external_userid = $1", ext
                )
            )
        )
    finally:
        await conn.close()

    async def guide_is_set() -> bool:
        r = await ops.get(f"/v1/admin/members/{member_id}/guide")
        return r.status_code == 200 and r.json()["staff_id"] == staff_id

    await eventually(guide_is_set)
    tag = await ops.put(f"/v1/admin/members/{member_id}/tags/早餐党", headers=_idem())
    assert tag.status_code == 200 and [t["tag"] for t in tag.json()["tags"]] == ["早餐党"]
    untag = await ops.delete(f"/v1/admin/members/{member_id}/tags/早餐党", headers=_idem())
    assert untag.status_code == 200 and untag.json()["tags"] == []
    link = await ops.post(f"/v1/admin/staff/{staff_id}/guide-link", headers=_idem())
    assert link.status_code == 200 and link.json()["guide_ref"].startswith(f"{staff_id}.")
    day = guides_clock().date().isoformat()
    funnel = await ops.get(
        "/v1/admin/reports/private-domain-funnel",
        params={"from_day": "2020-01-01", "to_day": day, "group_by": "guide"},
    )
    assert funnel.status_code == 200
    assert "rows" in funnel.json()
    unknown = await ops.get(f"/v1/admin/orders/{uuid.uuid4()}/attribution")
    assert unknown.status_code == 404 and unknown.json()["code"] == "UNKNOWN_ORDER"


async def test_guide_routes_need_admin_guides(
    guides_gateway: Gateway, client_admin: ClientAdmin
) -> None:
    key = await client_admin.create(
        ClientKind.OPS_TOOLING,
        "members only",
        scopes=(ADMIN_MEMBERS,),
        **UNLIMITED,  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{guides_gateway.http_port}",
        timeout=10,
        auth=HmacAuth(key.key_id, key.secret),
    ) as client:
        refused = await client.get("/v1/admin/staff")
    assert refused.status_code == 403


async def test_workstation_through_the_gateway(
    guides_gateway: Gateway,
    ops: httpx.AsyncClient,
    client_admin: ClientAdmin,
    fake_wecom: FakeWeCom,
    guides_clock: ServiceClock,
    rewards_channel: grpc.aio.Channel,
    member_channel: grpc.aio.Channel,
) -> None:
    from services.guides import domain

    staff_id = uid("g")
    store = uid("WG")
    assert (
        await ops.put(
            f"/v1/admin/staff/{staff_id}",
            json={"name": "小周", "store_id": store, "role": "guide"},
            headers=_idem(),
        )
    ).status_code == 200
    members = member_pb2_grpc.MemberServiceStub(member_channel)
    member = (
        await members.IdentifyMember(
            member_pb2.IdentifyMemberRequest(
                identifiers=[
                    member_pb2.Identifier(
                        type=member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID,
                        value=uid("o6_"),
                        verified=True,
                    )
                ],
                source="mini-program",
                request_key=uid("k"),
            ),
            timeout=5,
        )
    ).member.member_id
    foreign = str(uuid.uuid4())
    bound = await ops.put(
        f"/v1/admin/members/{member}/guide",
        json={"staff_id": staff_id, "reason": "test"},
        headers=_idem(),
    )
    assert bound.status_code == 200 and bound.json()["history"][0]["reason"] == "operator:test"
    month = domain.budget_month(guides_clock(), domain.ZoneInfo("Asia/Shanghai"))
    for scope, owner in (("staff", staff_id), ("store", store)):
        r = await ops.put(
            f"/v1/admin/coupon-budgets/{scope}/{owner}/{month}",
            json={"coupons": 1},
            headers=_idem(),
        )
        assert r.status_code == 200 and r.json()["coupons"] == 1
    template_id = uid("WSG-")
    await rewards_pb2_grpc.RewardsServiceStub(rewards_channel).CreateCouponTemplate(
        rewards_pb2.CreateCouponTemplateRequest(
            template_id=template_id,
            terms=rewards_pb2.CouponTerms(
                name="赠饮", kind="amount_off", discount_fen=500, valid_days=7
            ),
            limits=rewards_pb2.CouponLimits(),
            status="active",
        ),
        timeout=10,
    )

    key = await client_admin.create(
        ClientKind.OPS_TOOLING,
        "wecom sidebar",
        scopes=(GUIDES_WORKSTATION,),
        **UNLIMITED,  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{guides_gateway.http_port}",
        timeout=10,
        auth=HmacAuth(key.key_id, key.secret),
    ) as sidebar:
        fake_wecom.oauth_codes["sidebar-code"] = staff_id
        opened = await sidebar.post(
            "/v1/workstation/session", json={"code": "sidebar-code"}, headers=_idem()
        )
        assert opened.status_code == 200, opened.text
        session = {"X-Workstation-Session": opened.json()["token"]}
        again = await sidebar.post(
            "/v1/workstation/session", json={"code": "sidebar-code"}, headers=_idem()
        )
        assert again.status_code == 403 and again.json()["code"] == "INVALID_OAUTH_CODE"

        view = await sidebar.get(f"/v1/workstation/members/{member}", headers=session)
        assert view.status_code == 200, view.text
        body = view.json()
        assert (body["relation"], body["guide_staff_id"]) == ("bound", staff_id)
        assert "silent_30_days" in body["suggested_actions"] and "tiering" in body["degraded"]
        refused = await sidebar.get(f"/v1/workstation/members/{foreign}", headers=session)
        assert refused.status_code == 403 and refused.json()["code"] == "NOT_YOUR_CUSTOMER"
        no_session = await sidebar.get(f"/v1/workstation/members/{member}")
        assert no_session.status_code == 422

        tagged = await sidebar.put(
            f"/v1/workstation/members/{member}/tags/少冰", headers={**session, **_idem()}
        )
        assert tagged.status_code == 200 and tagged.json()["tags"][0]["set_by"] == staff_id
        note = await sidebar.post(
            f"/v1/workstation/members/{member}/notes",
            json={"text": "周末来"},
            headers={**session, **_idem()},
        )
        assert note.status_code == 200 and note.json()["staff_id"] == staff_id
        grant = {"template_id": template_id, "grant_key": "first"}
        granted = await sidebar.post(
            f"/v1/workstation/members/{member}/coupons", json=grant, headers={**session, **_idem()}
        )
        assert granted.status_code == 200, granted.text
        assert (granted.json()["staff_remaining"], granted.json()["replayed"]) == (0, False)
        over = await sidebar.post(
            f"/v1/workstation/members/{member}/coupons",
            json={**grant, "grant_key": "second"},
            headers={**session, **_idem()},
        )
        assert over.status_code == 429 and over.json()["code"] == "BUDGET_EXHAUSTED"
        view = (await sidebar.get(f"/v1/workstation/members/{member}", headers=session)).json()
        assert [c["template_id"] for c in view["coupons"]] == [template_id]
        assert [n["text"] for n in view["notes"]] == ["周末来"]
        tasks = await sidebar.get("/v1/workstation/tasks", headers=session)
        assert tasks.status_code == 200 and tasks.json() == {"tasks": []}


async def test_community_routes(
    guides_gateway: Gateway, ops: httpx.AsyncClient, fake_wecom: FakeWeCom
) -> None:
    store, chat = uid("GC"), uid("wrGW")
    put = await ops.put(
        f"/v1/admin/communities/{chat}",
        json={
            "name": "VIP群",
            "store_id": store,
            "audience": "vip",
            "tiers": ["VIP"],
        },
        headers=_idem(),
    )
    assert put.status_code == 200 and put.json()["tiers"] == ["VIP"]
    bad = await ops.put(
        f"/v1/admin/communities/{chat}",
        json={"name": "x", "store_id": store, "audience": "gold"},
        headers=_idem(),
    )
    assert bad.status_code == 422
    listed = await ops.get("/v1/admin/communities", params={"store_id": store})
    assert [c["chat_id"] for c in listed.json()["communities"]] == [chat]
    fake_wecom.groups[chat] = {uid("wm"): 1}
    synced = await ops.post("/v1/admin/communities:sync", headers=_idem())
    assert synced.status_code == 200 and synced.json()["joined"] >= 1
    gaps = await ops.get(f"/v1/admin/stores/{store}/community-gaps")
    assert gaps.status_code == 200 and gaps.json() == {"invite": [], "misfits": []}
    report = await ops.get(
        f"/v1/admin/communities/{chat}/report",
        params={"from_day": "1970-01-01", "to_day": "2100-01-01"},
    )
    assert report.status_code == 200 and (report.json()["members"], report.json()["joins"]) == (
        1,
        1,
    )
