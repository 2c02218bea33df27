"""The operator console in a real browser (Playwright driving Debian's
chromium), in front of the e2e services and a gateway with the session
gateway's door: log in, every dashboard renders and its charts carry exactly
the numbers the analytics API answers for the same filter (on the demo
brand's 90 days, devtools.devrun.seed_activity, in a database of the module's
own with services of its own: every chart draws, brand-wide and with a store
filter on every dashboard), a merge review
approved from the queue leaves it (audited under the operator's name), a
viewer sees no action and a forged POST is refused 403 (and the gateway
refuses the viewer's client the route anyway). Each test saves a screenshot
of its page under tests/e2e/console-screenshots/ (git-ignored);
CONSOLE_DOCS_SCREENSHOTS=1 also writes the dashboards' to docs/console/."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

from console import users
from console.charts import DASHBOARDS, pick
from console.roles import SCOPES, Role
from console.server import ConsoleServer
from console.settings import ConsoleSettings, GatewayKey
from devtools.devrun import seed, seed_activity
from gateway.api.analytics import STORE_SCOPE
from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth
from gateway.auth.model import ClientKind
from gateway.wechat_fake import FakeWeChatServer
from loyalty.events.v1 import events_pb2
from loyalty.pos.v1 import pos_pb2_grpc
from servicekit.consumer import EventConsumer, Subscription
from servicekit.db import Database, UnitOfWork, asyncpg_dsn, create_pool
from servicekit.deadletters import redrive_audit_stream
from servicekit.events import (
    ENVELOPE_FIELD,
    ReceivedEvent,
    dead_letter_stream,
    make_envelope,
    stream_name,
)
from servicekit.migrations import SERVICES
from servicekit.redis_client import create_redis
from servicekit.server import ServiceApp

from ..harness import Infra, ServiceClock, eventually, own_database, wait_until_serving
from .conftest import WECHAT_APPS, gateway_settings
from .doors import UNLIMITED
from .test_engagement_gateway import check_in_journey
from .test_member_identity_gateway import key, login
from .test_pos_slice import complete, identify, new_phone

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(__file__).resolve().parent / "console-screenshots"
DOCS_SHOTS = ROOT / "docs" / "console"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "console-e2e-password"


@pytest.fixture(scope="module")
async def console_gateway(
    infra: Infra,
    gateway: Gateway,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    engagement_app: ServiceApp,
    wechat: FakeWeChatServer,
) -> AsyncIterator[Gateway]:
    """The session gateway's door (same client store) in front of every service
    the console's pages ask, engagement included (the session gateway goes without)."""
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{tiering_app.port}",
            engagement_addr=f"127.0.0.1:{engagement_app.port}",
            wechat_api_base=wechat.base_url,
            wechat_apps=WECHAT_APPS,
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


@pytest.fixture(scope="module")
async def role_clients(client_admin: ClientAdmin) -> dict[str, IssuedKey]:
    """One operator_console client per role, holding only that role's scopes."""
    issued: dict[str, IssuedKey] = {}
    for role in Role:
        issued[role.value] = await client_admin.create(
            ClientKind.OPERATOR_CONSOLE,
            f"console {role.value}",
            client_id=f"console-{role.value.replace('_', '-')}-{uuid.uuid4().hex[:4]}",
            scopes=SCOPES[role],
            **UNLIMITED,  # type: ignore[arg-type]
        )
    return issued


@pytest.fixture(scope="module")
def role_keys(role_clients: dict[str, IssuedKey]) -> dict[str, GatewayKey]:
    return {r: GatewayKey(key_id=k.key_id, secret=k.secret) for r, k in role_clients.items()}


@pytest.fixture(scope="module")
async def console(
    infra: Infra, console_gateway: Gateway, role_keys: dict[str, GatewayKey]
) -> AsyncIterator[ConsoleServer]:
    server = ConsoleServer(
        ConsoleSettings(
            database_url=infra.database_url,
            redis_url=infra.redis_url,
            redis_namespace=infra.namespace,
            console_host="127.0.0.1",
            console_port=0,
            console_gateway_url=f"http://127.0.0.1:{console_gateway.http_port}",
            console_gateway_clients=role_keys,
            log_json=False,
        )
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def operators(infra: Infra) -> dict[str, str]:
    """Role -> the username of an operator holding only that role (password PASSWORD)."""
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    names: dict[str, str] = {}
    try:
        for role in (*Role, "admin"):
            name = f"{role}-{uuid.uuid4().hex[:6]}"
            roles = [r.value for r in Role] if role == "admin" else [str(role)]
            await users.create(conn, name, roles)
            await users.set_password(conn, name, PASSWORD)
            names[str(role)] = name
    finally:
        await conn.close()
    return names


@pytest.fixture(scope="module")
async def activity(pos: pos_pb2_grpc.PosServiceStub) -> list[tuple[str, str]]:
    """Members (id, phone) and orders at two stores, so the overview and points have numbers."""
    members = []
    for i in range(4):
        phone = new_phone()
        reply = await identify(pos, phone, store_id="SH001" if i % 2 else "SH002")
        member_id = reply.member_id
        members.append((member_id, phone))
        for paid in (1800, 3200)[: 1 + i % 2]:
            await complete(pos, member_id, paid, store_id="SH001" if i % 2 else "SH002")
    return members


@dataclass
class Demo:
    """The demo brand's 90 days (devtools.devrun.seed_activity) in a database of
    the module's own, behind services, a gateway and a console of their own, so
    every dashboard has data and no other module's numbers move."""

    console: ConsoleServer
    gateway: Gateway


async def _serve_demo(app: ServiceApp) -> ServiceApp:
    port = await app.start()
    await wait_until_serving(f"127.0.0.1:{port}")
    return app


@pytest.fixture(scope="module")
async def demo(
    infra: Infra,
    gateway: Gateway,
    provider_fakes: Any,
    role_keys: dict[str, GatewayKey],
) -> AsyncIterator[Demo]:
    from services.engagement.server import build as build_engagement
    from services.engagement.settings import EngagementSettings
    from services.member.server import build as build_member
    from services.rewards.server import build as build_rewards
    from services.tiering.server import build as build_tiering

    async with own_database(infra, *SERVICES, prefix="console_demo") as url:
        await seed(url)
        # Relative to the clock the services and the console read (the real one).
        await seed_activity(url, datetime.now(UTC))
        # Its own event namespace: the session's consumers never see these events.
        settings = infra.service_settings(
            database_url=url, redis_namespace=f"{infra.namespace}-demo", db_pool_max=3
        )
        engagement = EngagementSettings(**{**settings.model_dump(), **provider_fakes.settings()})
        apps: list[ServiceApp] = []
        try:
            for app in (
                build_member(settings, clock=ServiceClock()),
                build_rewards(settings),
                build_tiering(settings, clock=ServiceClock()),
                build_engagement(engagement),
            ):
                apps.append(await _serve_demo(app))
            member, rewards, tiering, journeys = apps
            gw = build(
                gateway_settings(
                    member_addr=f"127.0.0.1:{member.port}",
                    rewards_addr=f"127.0.0.1:{rewards.port}",
                    tiering_addr=f"127.0.0.1:{tiering.port}",
                    engagement_addr=f"127.0.0.1:{journeys.port}",
                    auth_enabled=True,
                    auth_secret_key=gateway.settings.auth_secret_key,
                    # The session's client store: the console's role clients are there.
                    database_url=infra.database_url,
                    redis_url=infra.redis_url,
                    redis_namespace=infra.namespace,
                )
            )
            await gw.start()
            try:
                server = ConsoleServer(
                    ConsoleSettings(
                        database_url=infra.database_url,
                        redis_url=infra.redis_url,
                        redis_namespace=infra.namespace,
                        console_host="127.0.0.1",
                        console_port=0,
                        console_gateway_url=f"http://127.0.0.1:{gw.http_port}",
                        console_gateway_clients=role_keys,
                        log_json=False,
                    )
                )
                await server.start()
                try:
                    yield Demo(server, gw)
                finally:
                    await server.stop()
            finally:
                await gw.stop()
        finally:
            for app in reversed(apps):
                await app.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


async def signed_in_page(browser: Browser, console: ConsoleServer, username: str) -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    await page.goto(f"{console.url}/login")
    await page.fill("input[name=username]", username)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_url(re.compile(r"/dashboards/overview"))
    return page


async def screenshot(page: Page, name: str, *, docs: bool = False) -> None:
    SHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if docs and os.environ.get("CONSOLE_DOCS_SCREENSHOTS"):
        DOCS_SHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(DOCS_SHOTS / f"{name}.png"), full_page=True)


def expected_chart(kind: str, items: list[dict[str, Any]], shown: dict[str, Any]) -> None:
    """The chart's numbers are the API's, item for item (computed here from the
    answer, not by the console's code)."""
    if kind == "sankey":
        assert shown["links"] == [[i["from_tier"], i["to_tier"], i["members"]] for i in items]
        return
    if kind == "heatmap":
        assert shown["points"] == [
            [i["r"], i["f"], i["members"], i["avg_spend_fen"]] for i in items
        ]
        return
    if kind == "pivot":
        totals: dict[tuple[str, str], int] = {}
        for i in items:
            pair = (f"{i['from_stage']}→{i['to_stage']}", str(i["day"]))
            totals[pair] = totals.get(pair, 0) + i["members"]
        got = {
            (name, day): value
            for name, values in shown["series"].items()
            for day, value in zip(shown["x"], values, strict=True)
            if value
        }
        assert got == totals
        return
    assert len(shown["x"]) == len(items)
    for x, item in zip(shown["x"], items, strict=True):
        assert x in {str(v) for v in item.values()}
    for field, values in shown["series"].items():
        assert values == [pick(i, field) for i in items], field


async def _dashboard_matches_the_api(
    page: Page, console: ConsoleServer, api: httpx.AsyncClient, name: str, query: str = ""
) -> dict[str, Any]:
    """Open one dashboard (with an optional query: a store filter) and hold every
    chart and headline figure against the API's answer for the page's filter;
    every chart must draw (the demo activity gives each data). The answer."""
    await page.goto(f"{console.url}/dashboards/{name}{query}")
    await page.wait_for_selector("body[data-charts-ready='1']")
    assert await page.locator("#dashboard-error").count() == 0
    filters = {
        f: await page.input_value(f"#filters input[name={f}]")
        for f in ("from", "to", "store", "region")
    }
    reply = await api.get(
        f"/v1/admin/analytics/{name}", params={k: v for k, v in filters.items() if v}
    )
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    charts = page.locator(".chart")
    assert await charts.count() >= 1, name
    for index in range(await charts.count()):
        chart = charts.nth(index)
        source = await chart.get_attribute("data-source")
        kind = await chart.get_attribute("data-kind")
        shown = json.loads(await chart.get_attribute("data-chart") or "")
        assert source and kind
        expected_chart(kind, pick(answer, source) or [], shown)
        assert await chart.get_attribute("data-rendered") == "chart", (name, query, source)
        # ECharts draws on a canvas (a heatmap or a large series adds layers).
        assert await chart.locator("canvas").count() >= 1, (name, query, source)
    for kpi in await page.locator(".kpi").all():
        path = await kpi.get_attribute("data-path")
        assert path and await kpi.get_attribute("data-value") == str(pick(answer, path))
    return answer


async def test_every_dashboard_renders_the_numbers_the_api_answers(
    browser: Browser,
    demo: Demo,
    operators: dict[str, str],
    role_keys: dict[str, GatewayKey],
) -> None:
    """On the demo brand's 90 days every chart of every dashboard draws, with
    exactly the API's numbers, brand-wide and with a store filter on the
    dashboards that apply it."""
    console = demo.console
    page = await signed_in_page(browser, console, operators["viewer"])
    viewer = role_keys["viewer"]
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{demo.gateway.http_port}",
        auth=HmacAuth(viewer.key_id, viewer.secret),
        timeout=10,
    ) as api:
        answers = {}
        for name in DASHBOARDS:
            answers[name] = await _dashboard_matches_the_api(page, console, api, name)
            await screenshot(page, f"dashboard-{name}", docs=True)
        # The journeys page: a funnel per journey and a lift row with its interval.
        assert await page.locator(".chart[data-source^='journeys.']").count() >= 1
        # The lift row shows the API's lift and interval in percentage points.
        [journey] = answers["journeys"]["journeys"]
        assert journey["lift"], journey
        row = await page.locator("table.lift tr").nth(1).inner_text()
        low, high = journey["lift"]["ci_low"] * 100, journey["lift"]["ci_high"] * 100
        assert f"{journey['lift']['lift'] * 100:+.1f}" in row
        assert f"[{low:+.1f}, {high:+.1f}]" in row
        # The store filter reaches the API and narrows per-member dashboards too:
        # each page's numbers are the filtered answer's, and differ from the brand's.
        for name in DASHBOARDS:
            only = await _dashboard_matches_the_api(page, console, api, name, "?store=SH001")
            assert only["filter"]["store_ids"] == ["SH001"]
            assert only["filter"]["store_filter"] == "applied"
            assert await page.locator("#store-filter-notice").count() == 0
            await screenshot(page, f"dashboard-{name}-SH001")
            everywhere = answers[name]
            if name == "overview":
                assert 0 < only["orders"]["orders"] < everywhere["orders"]["orders"]
            elif name == "tiers":
                assert 0 < total(only["distribution"]) < total(everywhere["distribution"])
            elif name == "segments":
                assert 0 < total(only["segments"]) < total(everywhere["segments"])
            elif name == "lifecycle":
                assert 0 < total(only["stages"]) < total(everywhere["stages"])
            elif name == "points":
                o, e = only["liability"], everywhere["liability"]
                assert 0 < o["outstanding_points"] < e["outstanding_points"]
            elif name == "coupons":
                issued = [sum(t["issued"] for t in x["templates"]) for x in (only, everywhere)]
                assert 0 < issued[0] < issued[1]
            elif name == "referral":
                assert 0 < only["accepted"] < everywhere["accepted"]
            else:
                [one], [every] = only["journeys"], everywhere["journeys"]
                assert 0 < one["entered"] < every["entered"]
    await page.close()


def total(counts: list[dict[str, Any]]) -> int:
    return sum(int(c["count"]) for c in counts)


async def test_a_store_filter_a_dashboard_cannot_apply_is_said(
    console: ConsoleServer,
    console_gateway: Gateway,
    operators: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over plain HTTP (no browser): with a store filter, each dashboard's page
    says whether the filter applies (gateway STORE_SCOPE), never silently
    showing brand-wide figures as the store's; without one it says nothing.
    Every dashboard applies it (per-member figures by the member's store), so
    the other scopes are set here to see them said."""
    monkeypatch.setitem(STORE_SCOPE, "referral", ("not_applicable", []))
    monkeypatch.setitem(STORE_SCOPE, "points", ("partial", ["by_day.earned"]))
    async with httpx.AsyncClient(base_url=console.url, timeout=30) as client:
        form = await client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token, form.text
        signed = await client.post(
            "/login",
            data={
                "csrf_token": token.group(1),
                "username": operators["viewer"],
                "password": PASSWORD,
                "totp": "",
            },
        )
        assert signed.status_code == 303, signed.text
        said = {}
        for name in DASHBOARDS:
            html = (await client.get(f"/dashboards/{name}", params={"store": "SH001"})).text
            assert 'id="dashboard-error"' not in html, (name, html)
            found = re.search(r'id="store-filter-notice" data-scope="(\w+)"', html)
            said[name] = found.group(1) if found else None
        unfiltered = (await client.get("/dashboards/referral")).text
    assert said == dict.fromkeys(DASHBOARDS, None) | {
        "referral": "not_applicable",
        "points": "partial",
    }
    assert 'id="store-filter-notice"' not in unfiltered


async def merge_review(http: httpx.AsyncClient, wechat: FakeWeChatServer) -> str:
    """Two members with verified phones linked by one unionid: a review (as in
    tests/e2e/test_member_identity_gateway.py)."""
    t = uuid.uuid4().hex[:10]
    await login(http, f"oa-{t}", f"ua-{t}")
    for openid in (f"oa-{t}", f"ob-{t}"):
        if openid.startswith("ob"):
            await login(http, openid)
        await http.post(
            "/v1/members/bind-phone",
            json={
                "request_key": key(),
                "app_id": "wx-shop",
                "openid": openid,
                "code": wechat.fake.issue_code("wx-shop", new_phone()),
            },
        )
    linked = await http.post(
        "/v1/members/identify",
        json={"request_key": key(), "app_id": "wx-shop", "openid": f"ob-{t}", "unionid": f"ua-{t}"},
    )
    review_id = linked.json()["review_id"]
    assert review_id
    return str(review_id)


async def test_a_member_admin_approves_a_merge_review_and_it_leaves_the_queue(
    browser: Browser,
    console: ConsoleServer,
    operators: dict[str, str],
    role_clients: dict[str, IssuedKey],
    http: httpx.AsyncClient,
    wechat: FakeWeChatServer,
) -> None:
    review_id = await merge_review(http, wechat)
    page = await signed_in_page(browser, console, operators["member_admin"])
    await page.goto(f"{console.url}/merge-reviews")
    row = page.locator(f"tr.review[data-review-id='{review_id}']")
    assert await row.count() == 1
    # The evidence shown is masked: no full phone number on the page.
    assert not re.search(r"1\d{10}", await row.inner_text())
    await row.locator("form[action$='/approve'] input[name=note]").fill("same person, new phone")
    await row.locator("button.approve").click()
    await page.wait_for_url(re.compile(r"/merge-reviews\?done="))
    assert await page.locator(f"tr.review[data-review-id='{review_id}']").count() == 0
    await screenshot(page, "merge-review-approved")
    approved = (
        await http.get("/v1/admin/merge-reviews", params={"status": "approved", "page_size": 500})
    ).json()["reviews"]
    (decided,) = [r for r in approved if r["review_id"] == review_id]
    # The audit names the person: the member admin role's client and the operator.
    client_id = role_clients["member_admin"].client_id
    assert decided["decided_by"] == f"{client_id}/{operators['member_admin']}"
    assert decided["note"] == "same person, new phone"
    await page.close()


async def test_a_viewer_sees_no_action_and_a_forged_post_is_refused(
    browser: Browser,
    console: ConsoleServer,
    console_gateway: Gateway,
    operators: dict[str, str],
    role_keys: dict[str, GatewayKey],
    http: httpx.AsyncClient,
    wechat: FakeWeChatServer,
) -> None:
    review_id = await merge_review(http, wechat)
    page = await signed_in_page(browser, console, operators["viewer"])
    # No control of any action anywhere: navigation nor forms.
    for path in ("/dashboards/overview", "/dashboards/coupons"):
        await page.goto(f"{console.url}{path}")
        assert await page.locator("header nav a").count() == 1  # dashboards only
        assert await page.locator("main form[method=post]").count() == 0
    await screenshot(page, "viewer-dashboard")
    # The queue's page itself is refused.
    reply = await page.goto(f"{console.url}/merge-reviews")
    assert reply is not None and reply.status == 403
    # A forged POST from the viewer's own signed-in browser, with a valid CSRF token.
    token = await page.locator("header input[name=csrf_token]").first.get_attribute("value")
    forged = await page.request.post(
        f"{console.url}/merge-reviews/{review_id}/approve",
        form={"csrf_token": token or "", "note": "forged"},
    )
    assert forged.status == 403
    await screenshot(page, "viewer-forged-post")
    # Still pending; and the gateway itself refuses the viewer's client the route.
    pending = (await http.get("/v1/admin/merge-reviews", params={"page_size": 500})).json()
    assert review_id in {r["review_id"] for r in pending["reviews"]}
    viewer = role_keys["viewer"]
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{console_gateway.http_port}",
        auth=HmacAuth(viewer.key_id, viewer.secret),
        timeout=10,
    ) as as_viewer:
        refused = await as_viewer.post(
            f"/v1/admin/merge-reviews/{review_id}/approve", json={"note": "bypassing the console"}
        )
    assert refused.status_code == 403
    assert refused.json()["code"] == "SCOPE_MISSING"
    await page.close()


async def test_a_marketer_creates_pauses_and_restocks_a_coupon_template_in_yuan(
    browser: Browser,
    console: ConsoleServer,
    operators: dict[str, str],
    http: httpx.AsyncClient,
) -> None:
    template_id = f"CONSOLE-{uuid.uuid4().hex[:6].upper()}"
    page = await signed_in_page(browser, console, operators["marketer"])
    # A marketer's controls are coupons, journeys and events; not the member queues.
    nav = await page.locator("header nav a").all_inner_texts()
    assert len(nav) == 4
    assert await page.locator("header nav a[href='/merge-reviews']").count() == 0
    await page.goto(f"{console.url}/coupons")
    form = page.locator("#coupon-form")
    await form.locator("input[name=template_id]").fill(template_id)
    await form.locator("input[name=name]").fill("控制台满20减5.5")
    await form.locator("input[name=threshold_yuan]").fill("20.00")
    await form.locator("input[name=discount_yuan]").fill("5.50")
    await form.locator("input[name=total_stock]").fill("100")
    await form.locator("input[name=status]").check()
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(re.compile(r"/coupons$"))
    row = page.locator(f"tr[data-template-id='{template_id}']")
    assert "¥5.50" in await row.inner_text() and "¥20.00" in await row.inner_text()
    created = (await http.get(f"/v1/admin/coupon-templates/{template_id}")).json()
    assert created["terms"]["discount_fen"] == 550
    assert created["terms"]["threshold_fen"] == 2000
    assert created["status"] == "active" and created["limits"]["total_stock"] == 100
    await row.locator("form[action$='/status'] button").click()
    await page.wait_for_url(re.compile(r"/coupons$"))
    await row.locator("form[action$='/stock'] input[name=total_stock]").fill("60")
    await row.locator("form[action$='/stock'] button").click()
    await page.wait_for_url(re.compile(r"/coupons$"))
    await screenshot(page, "coupons")
    changed = (await http.get(f"/v1/admin/coupon-templates/{template_id}")).json()
    assert changed["status"] == "paused"
    assert changed["limits"]["total_stock"] == 60
    # Three decimals of a yuan are refused, naming the problem; nothing is created.
    await form.locator("input[name=template_id]").fill(f"{template_id}-X")
    await form.locator("input[name=name]").fill("bad")
    await form.locator("input[name=discount_yuan]").fill("5.555")
    await form.locator("button[type=submit]").click()
    assert "INVALID_FORM" in await page.inner_text("main")
    missing = await http.get(f"/v1/admin/coupon-templates/{template_id}-X")
    assert missing.status_code == 404
    await page.close()


async def test_member_admin_adjusts_points_and_only_a_pii_reader_unmasks_the_phone(
    browser: Browser,
    console: ConsoleServer,
    operators: dict[str, str],
    http: httpx.AsyncClient,
    activity: list[tuple[str, str]],
) -> None:
    member_id, phone = activity[0]
    before = (await http.get(f"/v1/members/{member_id}/points")).json()["available"]
    page = await signed_in_page(browser, console, operators["member_admin"])
    # Found by phone: the page of that member opens (by id; the phone is in no URL).
    await page.goto(f"{console.url}/members")
    await page.select_option("#find-form select[name=kind]", "phone")
    await page.fill("#find-form input[name=value]", phone)
    await page.click("#find-form button[type=submit]")
    await page.wait_for_url(re.compile(rf"/members\?member_id={member_id}$"))
    number = await page.inner_text("#member-number")
    await screenshot(page, "member-found-by-phone")
    # ... and by member number; a phone nobody owns is named as such.
    await page.goto(f"{console.url}/members")
    await page.select_option("#find-form select[name=kind]", "member_number")
    await page.fill("#find-form input[name=value]", number)
    await page.click("#find-form button[type=submit]")
    await page.wait_for_url(re.compile(rf"/members\?member_id={member_id}$"))
    await page.goto(f"{console.url}/members")
    await page.fill("#find-form input[name=value]", new_phone())
    await page.click("#find-form button[type=submit]")
    assert "UNKNOWN_IDENTIFIER" in await page.inner_text("main")
    await page.goto(f"{console.url}/members?member_id={member_id}")
    shown = await page.inner_text("#phone")
    assert shown != phone and "*" in shown and shown[-4:] == phone[-4:]
    assert await page.locator("#unmask-form").count() == 0
    await page.fill("#adjust-form input[name=points]", "15")
    await page.fill("#adjust-form input[name=reason]", "goodwill: long queue")
    await page.click("#adjust-form button[type=submit]")
    await page.wait_for_selector("#adjusted")
    after = (await http.get(f"/v1/members/{member_id}/points")).json()["available"]
    assert after == before + 15
    assert str(after) in await page.inner_text("#adjusted")
    await screenshot(page, "member-adjusted")
    await page.close()

    page = await signed_in_page(browser, console, operators["pii_reader"])
    await page.goto(f"{console.url}/members?member_id={member_id}")
    assert await page.locator("#adjust-form").count() == 0
    # The PII reader's client lacks admin:members: no lookup by phone offered,
    # and a forged one is refused before the gateway.
    assert await page.locator("#find-form").count() == 0
    token = await page.locator("header input[name=csrf_token]").first.get_attribute("value")
    forged = await page.request.post(
        f"{console.url}/members/lookup",
        form={"csrf_token": token or "", "kind": "phone", "value": phone},
    )
    assert forged.status == 403
    await page.fill("#unmask-form input[name=purpose]", "member called about points")
    await page.click("#unmask-form button[type=submit]")
    assert await page.inner_text("#phone") == f"+86{phone}"
    await screenshot(page, "member-unmasked")
    await page.close()


async def test_a_marketer_publishes_pauses_and_resumes_a_journey_and_sees_parked_events(
    browser: Browser,
    console: ConsoleServer,
    console_gateway: Gateway,
    operators: dict[str, str],
    trusted_key: IssuedKey,
) -> None:
    journey_id = f"console-{uuid.uuid4().hex[:8]}"
    page = await signed_in_page(browser, console, operators["marketer"])
    await page.goto(f"{console.url}/journeys")
    await page.fill(
        "#journey-form textarea[name=definition]", json.dumps(check_in_journey(journey_id))
    )
    await page.click("#journey-form button[type=submit]")
    await page.wait_for_url(re.compile(rf"/journeys\?journey_id={journey_id}$"))
    assert await page.get_attribute("#journey .status", "data-code") == "active"
    for action, status in (("pause", "paused"), ("resume", "active")):
        await page.click(f"form[action='/journeys/{journey_id}/{action}'] button")
        await page.wait_for_url(re.compile(rf"/journeys\?journey_id={journey_id}$"))
        assert await page.get_attribute("#journey .status", "data-code") == status
    await screenshot(page, "journey")
    # The list: this journey's row with its live version and channel; pause and
    # resume from the row itself.
    await page.goto(f"{console.url}/journeys")
    row = page.locator(f"#journey-list tr[data-journey='{journey_id}']")
    assert await row.locator(".status").get_attribute("data-code") == "active"
    assert "v1" in await row.inner_text()
    assert await row.locator(".channels [data-code]").first.get_attribute("data-code") == "app_push"
    for action, status in (("pause", "paused"), ("resume", "active")):
        await row.locator(f"form[action='/journeys/{journey_id}/{action}'] button").click()
        await page.wait_for_url(re.compile(rf"/journeys\?journey_id={journey_id}$"))
        row = page.locator(f"#journey-list tr[data-journey='{journey_id}']")
        assert await row.locator(".status").get_attribute("data-code") == status
    await screenshot(page, "journey-list")
    # A malformed definition is refused with the reason, nothing published.
    await page.fill("#journey-form textarea[name=definition]", "{not json")
    await page.click("#journey-form button[type=submit]")
    assert "INVALID_JSON" in await page.inner_text("main")

    # An event for a member nobody knows yet is parked; the marketer sees it and
    # its replay is refused by the member service (the member does not exist).
    stranger = str(uuid.uuid4())
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{console_gateway.http_port}",
        auth=HmacAuth(trusted_key.key_id, trusted_key.secret),
        timeout=10,
    ) as api:
        parked = await api.post(
            f"/v1/members/{stranger}/events",
            json={"event_id": str(uuid.uuid4()), "type": "check_in"},
        )
        assert parked.json()["parked"] is True
    await page.goto(f"{console.url}/events")
    assert stranger in await page.inner_text("#events")
    await screenshot(page, "parked-events")
    await page.click(f"form[action='/events/{stranger}/replay'] button")
    assert "UNKNOWN_MEMBER" in await page.inner_text("main")
    await page.goto(f"{console.url}/events")
    assert stranger in await page.inner_text("#events")
    await page.close()


async def test_a_member_admin_replays_a_dead_letter_and_it_is_applied_once(
    browser: Browser,
    console: ConsoleServer,
    operators: dict[str, str],
    role_clients: dict[str, IssuedKey],
    infra: Infra,
) -> None:
    tag = uuid.uuid4().hex[:8]
    producer, group = f"console-{tag}", f"grp-{tag}"
    stream = stream_name(infra.namespace, producer)
    calls: Counter[str] = Counter()
    broken = True

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        calls[event.envelope.event_id] += 1
        if broken:
            raise RuntimeError("tier table missing")

    pool = await create_pool(infra.database_url, 1, 2)
    db = Database(pool, "tiering", "console-dlq")
    redis = create_redis(infra.redis_url)
    consumer = EventConsumer(
        group,
        db,
        redis,
        infra.namespace,
        [Subscription(producer, events_pb2.OrderCompleted, handler)],
        max_attempts=2,
        retry_after_ms=100,
        block_ms=50,
    )
    envelope = make_envelope(producer, events_pb2.OrderCompleted(order_id="o1"), str(uuid.uuid4()))
    await redis.xadd(stream, {ENVELOPE_FIELD: envelope.SerializeToString()})
    task = asyncio.create_task(consumer.run())
    try:
        dlq = dead_letter_stream(infra.namespace, producer, group)
        await eventually(lambda: redis.xrange(dlq), timeout=15)
        # Only the member admin is offered the page.
        page = await signed_in_page(browser, console, operators["marketer"])
        assert await page.locator("header nav a[href='/dead-letters']").count() == 0
        reply = await page.goto(f"{console.url}/dead-letters")
        assert reply is not None and reply.status == 403
        await page.close()

        page = await signed_in_page(browser, console, operators["member_admin"])
        await page.goto(f"{console.url}/dead-letters")
        row = page.locator(f"#dead-letters tr[data-event='{envelope.event_id}']")
        text = await row.inner_text()
        assert stream in text and group in text and "OrderCompleted" in text
        assert "tier table missing" in await row.locator(".error").inner_text()
        await screenshot(page, "dead-letters")
        broken = False  # the cause is fixed
        await row.locator("button[type=submit]").click()
        await page.wait_for_selector("#redriven")
        assert await row.count() == 0
        await eventually(lambda: calls[envelope.event_id] == 3, timeout=15)
        await asyncio.sleep(0.5)  # time for a second delivery to show
        assert calls[envelope.event_id] == 3  # two failures, then applied once
        audit = await redis.xrange(redrive_audit_stream(stream))
        client_id = role_clients["member_admin"].client_id
        assert [f[b"operator"] for _, f in audit] == [
            f"{client_id}/{operators['member_admin']}".encode()
        ]
        await page.close()
    finally:
        consumer.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()
        await db.close()
