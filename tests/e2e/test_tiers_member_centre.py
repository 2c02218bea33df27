"""Tiers end to end through the gateway: the POS sees the tier at identify, an
order upgrades the member, the member centre shows tier, growth, progress and
projection; operators publish, simulate, override and read the distribution."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from gateway.app import build
from servicekit.db import asyncpg_dsn
from servicekit.server import ServiceApp
from services.tiering.seed import DEMO_PROGRAMME, seed_demo
from tests.harness import Infra, eventually

from .conftest import closed_port, gateway_settings
from .test_pos_slice import Pos, assert_problem, complete, identify, new_phone

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
async def seeded(infra: Infra) -> AsyncIterator[None]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        await seed_demo(conn)
    finally:
        await conn.close()
    yield


async def test_pos_sees_the_tier_and_the_member_centre_explains_it(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    phone = new_phone()
    member = await identify(pos, phone)
    assert (member.tier_code, member.tier_name) == ("regular", "普通会员")
    await complete(pos, member.member_id, paid_fen=52_000)

    async def upgraded() -> dict | None:
        reply = await http.get(f"/v1/members/{member.member_id}/tier")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        return body if body["tier"]["code"] == "svip" else None

    body = await eventually(upgraded, timeout=15)
    assert (await identify(pos, phone)).tier_name == "SVIP"
    assert body["metric_value"] == 52_000 and type(body["metric_value"]) is int
    assert body["growth_value"] == 520
    assert body["tier"]["benefits"]["points_multiplier_bp"] == 12_000
    assert body["next_tier"]["code"] == "vip" and body["next_needed"] == 98_000
    assert body["projection"].endswith("¥980 more reaches VIP")
    assert body["period_last_day"].endswith("-12-31")

    # The member centre page in one call: the same tier and the points summary.
    centre = await http.get(f"/v1/members/{member.member_id}/centre")
    assert centre.status_code == 200, centre.text
    page = centre.json()
    assert page["member_id"] == member.member_id and page["degraded"] == []
    assert page["tier"] == body
    summary = (await http.get(f"/v1/members/{member.member_id}/points/summary")).json()
    assert page["points"] == summary
    assert page["points"]["lifetime_earned"] == 520
    assert_problem(
        await http.get("/v1/members/not-a-uuid/centre"), 422, "INVALID_ARGUMENT", "member_id"
    )

    history = (await http.get(f"/v1/members/{member.member_id}/tier/history")).json()
    assert [(e["from_tier"], e["to_tier"], e["reason"]) for e in history["entries"]] == [
        ("regular", "svip", "upgrade")
    ]
    assert history["entries"][0]["figures"]["threshold"] == 50_000

    action = await http.post(
        f"/v1/members/{member.member_id}/growth-actions",
        json={"action": "check_in", "reference_id": "day-1"},
    )
    assert action.status_code == 200, action.text
    assert action.json() == {"awarded": 5, "capped": False, "replayed": False}
    bad = await http.post(
        f"/v1/members/{member.member_id}/growth-actions",
        json={"action": "dance", "reference_id": "x"},
    )
    assert_problem(bad, 422, "INVALID_ARGUMENT", "action")


def programme_body(**changes: object) -> dict:
    body: dict = {
        "effective_from": (datetime.now(UTC) + timedelta(days=60)).isoformat(),
        "qualifying_metric": "paid_spend",
        "window_months": 12,
        "ladder": DEMO_PROGRAMME.ladder.to_json(),
        "rules": {"period": {"unit": "month", "length": 12}},
        "note": "next year",
    }
    body.update(changes)
    return body


async def test_operators_publish_simulate_override_and_report(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    pid = "e2e-" + datetime.now(UTC).strftime("%H%M%S%f")
    ladder = json.loads(json.dumps(DEMO_PROGRAMME.ladder.to_json()))
    ladder[2]["threshold"], ladder[2]["retention"] = 40_000, 20_000
    bad = await http.post(
        f"/v1/admin/tier-programmes/{pid}/versions", json=programme_body(ladder=ladder)
    )
    body = assert_problem(bad, 422, "INVALID_PROGRAMME", "ladder[2].threshold")
    assert "ascending" in body["detail"] and "programme." not in body["detail"]
    never = await http.post(
        f"/v1/admin/tier-programmes/{pid}/versions",
        json=programme_body(rules={"period": {"unit": "month", "length": 0}}),
    )
    assert_problem(never, 422, "INVALID_PROGRAMME", "rules.period.length")
    assert (await http.get(f"/v1/admin/tier-programmes/{pid}")).status_code == 404

    published = await http.post(f"/v1/admin/tier-programmes/{pid}/versions", json=programme_body())
    assert published.status_code == 201, published.text
    assert published.json()["version"] == 1 and published.json()["rules"]["grace_days"] == 0

    simulated = await http.post(
        "/v1/admin/tier-programmes/default/simulations", json=programme_body()
    )
    assert simulated.status_code == 200, simulated.text
    report = simulated.json()
    assert set(report) == {"members", "upgrades", "kept_by_retention", "at_risk", "movements"}

    phone = new_phone()
    member = await identify(pos, phone)
    until = (datetime.now(UTC) + timedelta(days=7)).isoformat()
    put = await http.put(
        f"/v1/admin/members/{member.member_id}/tier-override",
        json={"tier_code": "vip", "until": until, "reason": "influencer trial"},
    )
    assert put.status_code == 200, put.text
    assert (put.json()["tier"]["code"], put.json()["override_reason"]) == (
        "vip",
        "influencer trial",
    )
    # The till sees the floor too.
    assert (await identify(pos, phone)).tier_code == "vip"
    lifted = await http.delete(
        f"/v1/admin/members/{member.member_id}/tier-override", params={"reason": "trial over"}
    )
    assert lifted.json()["tier"]["code"] == "regular"
    unknown = await http.put(
        f"/v1/admin/members/{member.member_id}/tier-override",
        json={"tier_code": "gold", "until": until, "reason": "x"},
    )
    assert_problem(unknown, 422, "UNKNOWN_TIER", "tier_code")

    dist = await http.get("/v1/admin/reports/tier-distribution")
    assert dist.status_code == 200, dist.text
    assert set(dist.json()) >= {"run_id", "buckets", "members"}


# ---- the member centre degraded -------------------------------------------------------


@pytest.fixture
async def centre_without(
    request: pytest.FixtureRequest,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP door of a gateway whose `request.param` services are stopped
    (their addresses are ports nothing listens on)."""
    addrs = {
        "member_addr": f"127.0.0.1:{member_app.port}",
        "rewards_addr": f"127.0.0.1:{rewards_app.port}",
        "tiering_addr": f"127.0.0.1:{tiering_app.port}",
    }
    for service in request.param:
        addrs[f"{service}_addr"] = f"127.0.0.1:{closed_port()}"
    gw = build(gateway_settings(**addrs))
    await gw.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30
        ) as http:
            yield http
    finally:
        await gw.stop()


async def centre_of(pos: Pos, http: httpx.AsyncClient) -> httpx.Response:
    member = await identify(pos, new_phone())
    await complete(pos, member.member_id, paid_fen=1800)
    return await http.get(f"/v1/members/{member.member_id}/centre")


@pytest.mark.parametrize("centre_without", [("tiering",)], indirect=True)
async def test_the_centre_without_tiering_shows_the_points_and_says_so(
    pos: Pos, centre_without: httpx.AsyncClient
) -> None:
    reply = await centre_of(pos, centre_without)
    assert reply.status_code == 200, reply.text
    page = reply.json()
    assert page["tier"] is None and page["degraded"] == ["tiering"]
    assert page["points"]["lifetime_earned"] == 18


@pytest.mark.parametrize("centre_without", [("rewards",)], indirect=True)
async def test_the_centre_without_rewards_shows_the_tier_and_says_so(
    pos: Pos, centre_without: httpx.AsyncClient
) -> None:
    reply = await centre_of(pos, centre_without)
    assert reply.status_code == 200, reply.text
    page = reply.json()
    assert page["points"] is None and page["degraded"] == ["rewards"]
    assert page["tier"]["tier"]["code"] == "regular"


@pytest.mark.parametrize("centre_without", [("tiering", "rewards")], indirect=True)
async def test_the_centre_with_neither_is_unavailable(
    pos: Pos, centre_without: httpx.AsyncClient
) -> None:
    reply = await centre_of(pos, centre_without)
    assert_problem(reply, 503, "DEPENDENCY_UNAVAILABLE")
