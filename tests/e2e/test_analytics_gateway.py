"""The dashboards' routes end to end (gateway -> services -> PostgreSQL): a
viewer holding only admin:analytics reads every dashboard and nothing else; a
client with every other operator scope is refused them; bad ranges and
filters are named; a region resolves to its stores and the numbers of orders
settled at a store of its own come back exact."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from gateway.api.analytics import STORE_SCOPE
from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin
from gateway.auth.client import HmacAuth
from gateway.auth.model import (
    ADMIN_ANALYTICS,
    ADMIN_GUIDES,
    ADMIN_JOURNEYS,
    ADMIN_MEMBERS,
    ADMIN_REWARDS,
    ADMIN_TIERS,
    MEMBER_ANY,
    ClientKind,
)
from loyalty.pos.v1 import pos_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.metrics_definitions import definitions
from servicekit.server import ServiceApp
from services.tiering.seed import seed_demo as seed_tiering

from ..harness import Infra, eventually
from .conftest import gateway_settings
from .doors import UNLIMITED
from .test_pos_slice import complete, identify, new_phone

pytestmark = pytest.mark.e2e

DASHBOARDS = (
    "overview",
    "tiers",
    "segments",
    "lifecycle",
    "points",
    "coupons",
    "referral",
    "journeys",
)
# A range long before any test's data (the per-day series are all zeros).
OLD = {"from": "2001-02-01", "to": "2001-02-07"}


@pytest.fixture(scope="module")
async def analytics_gateway(
    infra: Infra,
    gateway: Gateway,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    engagement_app: ServiceApp,
) -> AsyncIterator[Gateway]:
    """The session gateway's door (same client store) in front of every service
    the dashboards ask, engagement included (the session gateway goes without)."""
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{tiering_app.port}",
            engagement_addr=f"127.0.0.1:{engagement_app.port}",
            auth_enabled=True,
            auth_secret_key=gateway.settings.auth_secret_key,
            database_url=infra.database_url,
            redis_url=infra.redis_url,
            redis_namespace=infra.namespace,
        )
    )
    await gw.start()
    yield gw
    await gw.stop()


async def _client(
    gateway: Gateway, client_admin: ClientAdmin, scopes: tuple[str, ...]
) -> AsyncIterator[httpx.AsyncClient]:
    key = await client_admin.create(
        ClientKind.OPERATOR_CONSOLE,
        f"analytics {uuid.uuid4().hex[:6]}",
        scopes=scopes,
        **UNLIMITED,  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.http_port}",
        timeout=10,
        auth=HmacAuth(key.key_id, key.secret),
    ) as client:
        yield client


@pytest.fixture(scope="module")
async def viewer(
    analytics_gateway: Gateway, client_admin: ClientAdmin
) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(analytics_gateway, client_admin, (ADMIN_ANALYTICS,)):
        yield client


@pytest.fixture(scope="module")
async def marketer(
    analytics_gateway: Gateway, client_admin: ClientAdmin
) -> AsyncIterator[httpx.AsyncClient]:
    """Every operator scope but the dashboards'."""
    scopes = (MEMBER_ANY, ADMIN_MEMBERS, ADMIN_REWARDS, ADMIN_TIERS, ADMIN_JOURNEYS, ADMIN_GUIDES)
    async for client in _client(analytics_gateway, client_admin, scopes):
        yield client


async def test_a_viewer_reads_every_dashboard_and_nothing_else(
    viewer: httpx.AsyncClient, demo_stores: list[str]
) -> None:
    for name in DASHBOARDS:
        reply = await viewer.get(f"/v1/admin/analytics/{name}", params=OLD)
        assert reply.status_code == 200, (name, reply.text)
        body = reply.json()
        assert body["filter"] == {
            "from": "2001-02-01",
            "to": "2001-02-07",
            "store": None,
            "region": None,
            "store_ids": None,
            "time_zone": "Asia/Shanghai",
            "store_filter": STORE_SCOPE[name][0],
            "store_filter_applies_to": STORE_SCOPE[name][1],
        }
        assert body["definitions"] == definitions(name) and body["definitions"]
    overview = (await viewer.get("/v1/admin/analytics/overview", params=OLD)).json()
    assert overview["members"]["new"] == 0 and overview["orders"]["orders"] == 0
    assert [d["day"] for d in overview["orders"]["by_day"]] == [
        f"2001-02-0{n}" for n in range(1, 8)
    ]
    assert overview["orders"]["repurchase_rate"] == 0.0
    points = (await viewer.get("/v1/admin/analytics/points", params=OLD)).json()
    assert len(points["by_day"]) == 7 and points["points_value_fen"] == 1
    assert points["liability"]["outstanding_fen"] == points["liability"]["outstanding_points"]
    journeys = (await viewer.get("/v1/admin/analytics/journeys", params=OLD)).json()
    assert journeys["journeys"] == []
    # Read-only: the operator routes of other areas stay closed to a viewer.
    for path in ("/v1/admin/stores", "/v1/admin/merge-reviews", "/v1/admin/coupon-templates"):
        refused = await viewer.get(path)
        assert refused.status_code == 403 and refused.json()["code"] == "SCOPE_MISSING", path


async def test_without_admin_analytics_every_dashboard_is_refused(
    marketer: httpx.AsyncClient,
) -> None:
    assert (await marketer.get("/v1/admin/stores")).status_code == 200
    for name in DASHBOARDS:
        refused = await marketer.get(f"/v1/admin/analytics/{name}", params=OLD)
        assert refused.status_code == 403, name
        assert refused.json()["code"] == "SCOPE_MISSING"


@pytest.mark.parametrize(
    ("params", "status", "code", "field"),
    [
        ({"to": "2026-01-01"}, 422, "INVALID_ARGUMENT", "from"),
        ({"from": "2026-01-01"}, 422, "INVALID_ARGUMENT", "to"),
        ({"from": "2026-13-01", "to": "2026-12-31"}, 422, "INVALID_DATE", "from"),
        ({"from": "2026-01-01", "to": "2026-1-31"}, 422, "INVALID_DATE", "to"),
        ({"from": "2026-02-01", "to": "2026-01-31"}, 422, "INVALID_RANGE", "to"),
        ({"from": "2025-01-01", "to": "2026-01-02"}, 422, "RANGE_TOO_LONG", "to"),
        ({**OLD, "store": "NOPE404"}, 404, "UNKNOWN_STORE", "store"),
        ({**OLD, "region": "不存在市"}, 404, "UNKNOWN_REGION", "region"),
    ],
)
async def test_bad_filters_are_named(
    viewer: httpx.AsyncClient,
    demo_stores: list[str],
    params: dict[str, str],
    status: int,
    code: str,
    field: str,
) -> None:
    for name in ("overview", "journeys"):
        reply = await viewer.get(f"/v1/admin/analytics/{name}", params=params)
        assert reply.status_code == status, reply.text[:300]
        assert (reply.json()["code"], reply.json()["field"]) == (code, field)


async def test_every_dashboard_says_what_the_store_filter_narrows(
    viewer: httpx.AsyncClient, demo_stores: list[str]
) -> None:
    """A store filter is never silently ignored: a dashboard whose figures have
    no store dimension says it does not apply, one that narrows some figures
    names them."""
    said = {}
    for name in DASHBOARDS:
        reply = await viewer.get(f"/v1/admin/analytics/{name}", params=OLD | {"store": "SH001"})
        assert reply.status_code == 200, (name, reply.text)
        f = reply.json()["filter"]
        assert f["store_ids"] == ["SH001"]
        said[name] = (f["store_filter"], f["store_filter_applies_to"])
    # Every dashboard applies it now: per-member figures by the member's store
    # (servicekit/metrics_definitions.py MEMBER_STORE).
    assert said == dict.fromkeys(DASHBOARDS, ("applied", []))


async def test_a_region_resolves_to_its_stores_and_counts_their_orders(
    infra: Infra,
    http: httpx.AsyncClient,
    viewer: httpx.AsyncClient,
    pos: pos_pb2_grpc.PosServiceStub,
) -> None:
    # A city of this test's own, with two stores: only their orders count.
    city = f"测试市{random.randrange(10**6):06d}"
    stores = [f"AN{random.randrange(10**6):06d}", f"AN{random.randrange(10**6):06d}"]
    for store in stores:
        put = await http.put(
            f"/v1/admin/stores/{store}",
            json={"name": store, "city": city, "latitude": 30.0, "longitude": 120.0},
        )
        assert put.status_code == 200, put.text
    # Tiering's demo programme, so the members get a tier (idempotent).
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        await seed_tiering(conn)
    finally:
        await conn.close()
    a = (await identify(pos, new_phone(), stores[0])).member_id
    b = (await identify(pos, new_phone(), stores[1])).member_id
    earned = 0
    for member, store, fen in ((a, stores[0], 1200), (a, stores[1], 800), (b, stores[1], 500)):
        earned += (await complete(pos, member, fen, store_id=store)).points_earned
    # The days around the services' clock (the same process clock as this test's).
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    span = {"from": (today - timedelta(days=1)).isoformat(), "to": str(today + timedelta(days=1))}

    overview = await viewer.get("/v1/admin/analytics/overview", params=span | {"region": city})
    assert overview.status_code == 200, overview.text
    body = overview.json()
    assert body["filter"]["store_ids"] == sorted(stores)
    orders = body["orders"]
    assert (orders["orders"], orders["spend_fen"], orders["buyers"]) == (3, 2500, 2)
    assert (orders["repeat_buyers"], orders["repurchase_rate"]) == (1, 0.5)
    assert orders["active_members_30d"] == 2
    assert sorted(
        (s["store_id"], s["orders"], s["spend_fen"]) for s in orders["by_store"]
    ) == sorted([(stores[0], 1, 1200), (stores[1], 2, 1300)])
    assert sum(d["orders"] for d in orders["by_day"]) == 3 and len(orders["by_day"]) == 3

    one = await viewer.get("/v1/admin/analytics/overview", params=span | {"store": stores[1]})
    assert one.json()["filter"]["store_ids"] == [stores[1]]
    assert (one.json()["orders"]["orders"], one.json()["orders"]["spend_fen"]) == (2, 1300)
    # A store outside the region: both filters hold, so nothing matches.
    both = await viewer.get(
        "/v1/admin/analytics/overview", params=span | {"store": "SH001", "region": city}
    )
    assert both.json()["filter"]["store_ids"] == []
    assert both.json()["orders"]["orders"] == 0

    # A member accepting their own invite is refused, and counted as abuse.
    async def self_referrals() -> int:
        reply = await viewer.get("/v1/admin/analytics/referral", params=span)
        by_reason = {c["key"]: c["count"] for c in reply.json()["refusals_by_reason"]}
        return by_reason.get("SELF_REFERRAL", 0)

    before = await self_referrals()
    own = (await http.get(f"/v1/members/{a}/invite-code")).json()["code"]
    refused = await http.post(
        f"/v1/members/{a}/referral",
        json={"invite_code": own},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert refused.status_code == 409 and refused.json()["code"] == "SELF_REFERRAL"
    assert await self_referrals() == before + 1

    points = await viewer.get("/v1/admin/analytics/points", params=span | {"region": city})
    assert sum(d["earned"] for d in points.json()["by_day"]) == earned > 0
    assert isinstance(date.fromisoformat(points.json()["by_day"][0]["day"]), date)

    # Per-member dashboards count a member under its store (MEMBER_STORE): a
    # and b enrolled at a till without a registration store, so the store of
    # their latest order stands in: stores[1] for both (a ordered there last).
    async def tier_members(params: dict[str, str]) -> int:
        reply = await viewer.get("/v1/admin/analytics/tiers", params=span | params)
        assert reply.status_code == 200, reply.text
        assert reply.json()["filter"]["store_filter"] == "applied"
        return sum(c["count"] for c in reply.json()["distribution"])

    async def both_counted() -> bool:  # tiering consumes the orders asynchronously
        return await tier_members({"region": city}) == 2

    await eventually(both_counted)
    assert await tier_members({"store": stores[1]}) == 2
    assert await tier_members({"store": stores[0]}) == 0
    assert await tier_members({}) >= 2

    # Rewards counts their points the same way (its own OrderCompleted).
    async def owed(params: dict[str, str]) -> int:
        reply = await viewer.get("/v1/admin/analytics/points", params=span | params)
        liability = reply.json()["liability"]
        return int(liability["outstanding_points"] + liability["pending_points"])

    async def points_counted() -> bool:
        return await owed({"store": stores[1]}) == earned

    await eventually(points_counted)
    assert await owed({"store": stores[0]}) == 0

    # a's registration store, recorded on the profile (member's MemberZoneSet),
    # wins over its latest order's: a now counts under stores[0] everywhere.
    patched = await http.patch(
        f"/v1/members/{a}/profile",
        json={"registration_store_id": stores[0], "source": "store-guide"},
    )
    assert patched.status_code == 200, patched.text

    async def moved() -> bool:
        return (
            await tier_members({"store": stores[0]}) == 1
            and await owed({"store": stores[0]}) == earned - await owed({"store": stores[1]}) > 0
        )

    await eventually(moved)
    assert await tier_members({"store": stores[1]}) == 1
    assert await tier_members({"region": city}) == 2
