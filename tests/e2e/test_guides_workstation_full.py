"""The guide's workstation view fully populated through the gateway, with the
member, rewards, tiering and guides services all running (issue 20, part 4):
masked phone, tier and what it takes to keep it and reach the next, points
and points about to expire, consent; nothing degraded."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth
from gateway.auth.model import GUIDES_WORKSTATION, ClientKind
from servicekit.db import asyncpg_dsn
from servicekit.server import ServiceApp
from services.guides.wecom import FakeWeCom
from services.tiering.seed import seed_demo
from tests.conftest import stopping
from tests.harness import Infra, eventually
from tests.integration.guides_support import uid

from .conftest import gateway_settings
from .doors import UNLIMITED
from .test_pos_slice import Pos, complete, identify, new_phone

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def full_gateway(
    infra: Infra,
    gateway: Gateway,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    guides_app: ServiceApp,
) -> AsyncIterator[Gateway]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        await seed_demo(conn)
    finally:
        await conn.close()
    # The session gateway's door store (same database, Redis namespace and secret).
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{tiering_app.port}",
            guides_addr=f"127.0.0.1:{guides_app.port}",
            auth_enabled=True,
            database_url=infra.database_url,
            redis_url=infra.redis_url,
            redis_namespace=infra.namespace,
        )
    )
    await gw.start()
    yield gw
    await stopping("full workstation gateway", gw.stop())


def _idem() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def test_the_workstation_view_is_fully_populated(
    full_gateway: Gateway,
    trusted_key: IssuedKey,
    client_admin: ClientAdmin,
    fake_wecom: FakeWeCom,
    pos: Pos,
    infra: Infra,
) -> None:
    base = f"http://127.0.0.1:{full_gateway.http_port}"
    phone = new_phone()
    member = (await identify(pos, phone)).member_id
    await complete(pos, member, paid_fen=52_000)  # ¥520: SVIP in the demo ladder
    staff_id, store = uid("g"), uid("WF")
    async with httpx.AsyncClient(
        base_url=base, timeout=10, auth=HmacAuth(trusted_key.key_id, trusted_key.secret)
    ) as ops:
        staff = await ops.put(
            f"/v1/admin/staff/{staff_id}",
            json={"name": "小林", "store_id": store, "role": "guide"},
            headers=_idem(),
        )
        assert staff.status_code == 200, staff.text
        bound = await ops.put(
            f"/v1/admin/members/{member}/guide",
            json={"staff_id": staff_id, "reason": "e2e"},
            headers=_idem(),
        )
        assert bound.status_code == 200, bound.text
        consent = await ops.put(
            f"/v1/members/{member}/consents",
            json={"purpose": "marketing", "channel": "wecom", "granted": True, "source": "e2e"},
            headers=_idem(),
        )
        assert consent.status_code == 200, consent.text

        async def upgraded() -> bool:
            tier = (await ops.get(f"/v1/members/{member}/tier")).json()
            summary = (await ops.get(f"/v1/members/{member}/points/summary")).json()
            return bool(tier["tier"]["code"] == "svip" and summary["available"] == 520)

        await eventually(upgraded, timeout=20)
    # The order's points lapse in ten days (relative to now: the lot is moved
    # into the 30-day horizon, whatever today is).
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        moved = await conn.execute(
            "UPDATE rewards.points_lots SET expires_at = $2"
            " WHERE member_id = $1 AND status = 'active'",
            uuid.UUID(member),
            # The services' clock (shifted under faketime), not the database's.
            datetime.now(UTC) + timedelta(days=10),
        )
        assert moved == "UPDATE 1"
    finally:
        await conn.close()

    key = await client_admin.create(
        ClientKind.OPS_TOOLING,
        "wecom sidebar (full view)",
        scopes=(GUIDES_WORKSTATION,),
        **UNLIMITED,  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(
        base_url=base, timeout=10, auth=HmacAuth(key.key_id, key.secret)
    ) as sidebar:
        code = uid("code")
        fake_wecom.oauth_codes[code] = staff_id
        opened = await sidebar.post("/v1/workstation/session", json={"code": code}, headers=_idem())
        assert opened.status_code == 200, opened.text
        session = {"X-Workstation-Session": opened.json()["token"]}
        reply = await sidebar.get(f"/v1/workstation/members/{member}", headers=session)
    assert reply.status_code == 200, reply.text
    view = reply.json()
    assert view["degraded"] == []
    assert (view["relation"], view["guide_staff_id"]) == ("bound", staff_id)
    assert view["phone_masked"] == f"{phone[:3]}****{phone[-4:]}"
    tier = view["centre"]["tier"]
    assert tier["tier"]["code"] == "svip"
    # What it takes to reach the next tier, and to keep this one.
    assert (tier["next_tier"]["code"], tier["next_needed"]) == ("vip", 98_000)
    assert tier["keep_needed"] >= 0 and tier["period_last_day"]
    points = view["centre"]["points"]
    assert (points["available"], points["lifetime_earned"]) == (520, 520)
    assert [b["points"] for b in points["expiring_soon"]] == [520]
    assert {"purpose": "marketing", "channel": "wecom", "granted": True} in view["consents"]
    assert view["recent_orders"] == [] or all(
        o["paid_amount_fen"] == 52_000 for o in view["recent_orders"]
    )


async def test_operators_requeue_abandoned_tag_pushes(
    full_gateway: Gateway, trusted_key: IssuedKey, infra: Infra
) -> None:
    """POST /v1/admin/tags:repush: an abandoned push (its attempts used up) is
    due again with a full set of tries, audited under the operator."""
    member = uuid.uuid4()  # no WeCom contact: the push completes with nothing to mark
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        push_id = await conn.fetchval(
            "INSERT INTO guides.tag_pushes (member_id, added, removed, attempts, last_error)"
            " VALUES ($1, '{vip}', '{}', 5, 'WeCom was down') RETURNING id",
            member,
        )
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{full_gateway.http_port}",
            timeout=10,
            auth=HmacAuth(trusted_key.key_id, trusted_key.secret),
        ) as ops:
            reply = await ops.post("/v1/admin/tags:repush", headers=_idem())
        assert reply.status_code == 200, reply.text
        assert reply.json()["requeued"] >= 1

        # The service's push loop takes it again and finishes it.
        async def done() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT done_at IS NOT NULL FROM guides.tag_pushes WHERE id = $1", push_id
                )
            )

        await eventually(done, timeout=15)
        actor = await conn.fetchval(
            "SELECT actor FROM guides.audit WHERE action = 'tags_repushed' ORDER BY id DESC LIMIT 1"
        )
        assert actor == trusted_key.client_id
    finally:
        await conn.close()
