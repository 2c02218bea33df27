"""Every word an operator reads comes from the one catalogue (console/i18n.py).

Every page of the console is rendered through the real app in zh-CN (the
default) and in English, with a fake gateway answering each route the console
calls (the shapes of docs/api.md) and in-memory stand-ins for the session
store and the accounts table. The test fails when a page shows a catalogue key
(a missing entry), an English text of the catalogue on the Chinese page, or
any English word that is neither the data the gateway answered (ids, codes) nor
part of the Chinese catalogue itself (RFM, JSON, ...): so a string added to a
template or chart without the catalogue fails here. Codes the charts draw
(tiers, segments, stages, channels, refusals) must have words in both languages.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from console.app import build
from console.charts import CHARTS, DASHBOARDS, KPIS
from console.i18n import CATALOGUE, CODES, SERIES
from console.roles import Role
from console.sessions import COOKIE, SessionStore
from console.settings import ConsoleSettings
from servicekit.error_codes import ERROR_CODES
from servicekit.metrics_definitions import METRICS, definitions

MEMBER = "0b6a3c1e-6c1f-4f7e-9a59-2f1d8c1e0a11"
OTHER = "7d3f8a2b-1c4e-4b6a-8f0e-3a2b1c4d5e6f"
REVIEW = "5e1f2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"
DAYS = ("2026-11-01", "2026-11-02")


def analytics(name: str) -> dict[str, Any]:
    """One dashboard's answer, as docs/api.md "Analytics" shows it."""
    answers: dict[str, dict[str, Any]] = {
        "overview": {
            "members": {
                "total": 1260,
                "new": 310,
                "new_by_day": [{"key": d, "count": 9} for d in DAYS],
                "new_by_channel": [
                    {"key": c, "count": 10} for c in ("mini-program", "pos", "wecom", "delivery")
                ],
                "new_by_store": [{"key": "SH001", "count": 120}],
            },
            "orders": {
                "orders": 820,
                "spend_fen": 2460000,
                "buyers": 400,
                "repeat_buyers": 150,
                "repurchase_rate": 0.375,
                "active_members_30d": 380,
                "by_day": [{"day": d, "orders": 31, "spend_fen": 93000} for d in DAYS],
                "by_store": [{"store_id": "SH001", "orders": 500, "spend_fen": 1500000}],
            },
        },
        "tiers": {
            "distribution": [{"key": t, "count": 9} for t in ("regular", "svip", "vip")],
            "in_grace": 8,
            "movements": {
                "since": "2026-11-30T18:00:00Z",
                "up": 12,
                "down": 3,
                "kept": 1245,
                "flows": [
                    {"from_tier": "regular", "to_tier": "svip", "members": 12},
                    {"from_tier": "vip", "to_tier": "svip", "members": 3},
                ],
            },
            "by_day": [{"day": d, "up": 2, "down": 0} for d in DAYS],
            "projections": [
                {"tier": t, "members": 300, "at_risk": 40, "near_next": 11}
                for t in ("regular", "svip", "vip")
            ],
        },
        "segments": {
            "rfm": [{"r": 5, "f": 4, "members": 30, "avg_spend_fen": 12800}],
            "segments": [{"key": s, "count": 4} for s in CODES["segment"]],
        },
        "lifecycle": {
            "stages": [{"key": s, "count": 3} for s in CODES["stage"]],
            "transitions": [
                {"day": DAYS[1], "from_stage": "new", "to_stage": "growing", "members": 5},
                {"day": DAYS[1], "from_stage": "active", "to_stage": "silent", "members": 2},
            ],
        },
        "points": {
            "points_value_fen": 1,
            "liability": {
                "as_of": "2026-12-01T02:00:00Z",
                "outstanding_points": 182000,
                "outstanding_fen": 182000,
                "pending_points": 3200,
                "pending_fen": 3200,
                "expiring_30d_points": 5400,
                "expiring_30d_fen": 5400,
            },
            "by_day": [{"day": d, "earned": 930, "spent": 200, "expired": 0} for d in DAYS],
        },
        "coupons": {
            "templates": [
                {
                    "template_id": "welcome-5off",
                    "name": "新人立减5元",
                    "issued": 300,
                    "locked": 2,
                    "redeemed": 120,
                    "expired": 40,
                    "redemption_rate": 0.4,
                    "discount_fen": 60000,
                }
            ],
            "by_day": [
                {"day": d, "issued": 10, "redeemed": 4, "redemption_rate": 0.4} for d in DAYS
            ],
            "by_store": [{"store_id": "SH001", "redeemed": 70, "discount_fen": 35000}],
        },
        "referral": {
            "invites": 60,
            "accepted": 40,
            "first_orders": 25,
            "inviters": 25,
            "fission_ratio": 1.6,
            "top_inviters": [{"member_id": MEMBER, "accepted": 6, "first_orders": 4}],
            "abuse_refusals": 3,
            "refusals_by_reason": [{"key": "FINGERPRINT_ALREADY_USED", "count": 3}],
        },
        "journeys": {
            "journeys": [
                {
                    "journey_id": "welcome",
                    "status": "active",
                    "entered": 50,
                    "converted": 21,
                    "treated": 45,
                    "holdout": 5,
                    "treated_converted": 20,
                    "holdout_converted": 1,
                    "steps": [
                        {
                            "step_id": "hello",
                            "entered": 45,
                            "converted": 20,
                            "sent": {s: 1 for s in CODES["send_status"]},
                        }
                    ],
                    "lift": {
                        "treated_rate": 0.444,
                        "holdout_rate": 0.2,
                        "lift": 0.244,
                        "ci_low": -0.13,
                        "ci_high": 0.62,
                    },
                }
            ]
        },
    }
    return {
        "filter": {"from": DAYS[0], "to": DAYS[1], "store_filter": "applied"},
        **answers[name],
        # The API answers the English definitions; the console shows the session's.
        "definitions": definitions(name),
    }


ROUTES: dict[str, Any] = {
    "/v1/admin/merge-reviews": {
        "reviews": [
            {
                "review_id": REVIEW,
                "created_at": "2026-11-30T08:00:00Z",
                "member_ids": [MEMBER, OTHER],
                "evidence": ["138****0000"],
                "reason": "SAME_DEVICE",
                "detail": "",
            }
        ]
    },
    "/v1/admin/quarantined-identifiers": {
        "identifiers": [
            {
                "type": "openid",
                "namespace": "wx-shop",
                "value_masked": "oW3x****9Q",
                "linked_members": 7,
                "quarantined_at": "2026-11-30T08:00:00Z",
            }
        ]
    },
    f"/v1/members/{MEMBER}": {
        "member_id": MEMBER,
        "member_number": "800001",
        "phone_masked": "138****0000",
        "registered_at": "2026-11-01T08:00:00Z",
    },
    "/v1/admin/coupon-templates": {
        "templates": [
            {
                "template_id": "welcome-5off",
                "status": "active",
                "terms": {"name": "新人立减5元", "threshold_fen": 2000, "discount_fen": 500},
                "limits": {"total_stock": 100},
                "remaining_stock": 60,
            }
        ]
    },
    "/v1/admin/journeys": {
        "journeys": [
            {
                "journey_id": "welcome",
                "name": "新人欢迎",
                "live_version": 1,
                "status": "active",
                "channels": ["wecom"],
                "entered": 50,
                "active": 3,
            }
        ],
        "next_page_token": "t2",
    },
    "/v1/admin/journeys/welcome/metrics": {
        "journey_id": "welcome",
        "live_version": 1,
        "status": "active",
        "entered": 50,
        "sent": 40,
        "treated_converted": 20,
        "treated": 45,
        "holdout_converted": 1,
        "holdout": 5,
    },
    "/v1/admin/parked-events": {
        "events": [
            {
                "member_id": MEMBER,
                "event": "order_completed",
                "reason": "MEMBER_NOT_FOUND",
                "parked_at": "2026-11-30T08:00:00Z",
            }
        ]
    },
    "/v1/admin/dead-letters": {
        "dead_letters": [
            {
                "event_id": "e1",
                "stream": "loyalty:events:member",
                "group": "engagement",
                "id": "1700000000000-0",
                "event_type": "member_registered",
                "error": "TIMEOUT",
                "attempts": 5,
                "dead_lettered_at": "2026-11-30T08:00:00Z",
            }
        ]
    },
}


class FakeGateway:
    """The gateway as the console calls it (console/gateway_client.Gateway.call)."""

    async def call(self, role: Any, operator: str, method: str, path: str, **_: Any) -> Any:
        if path.startswith("/v1/admin/analytics/"):
            return analytics(path.rsplit("/", 1)[1])
        return ROUTES[path]

    async def aclose(self) -> None:
        pass


class FakeRedis:
    """The few commands the session store uses, in memory."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    async def get(self, key: str) -> Any:
        return self.data.get(key)

    async def set(self, key: str, value: str, ex: int | None = None) -> None:
        self.data[key] = value

    async def delete(self, key: str) -> int:
        return 1 if self.data.pop(key, None) is not None else 0

    async def sadd(self, key: str, member: str) -> None:
        self.data.setdefault(key, set()).add(member)

    async def expire(self, key: str, seconds: int) -> None:
        pass

    async def smembers(self, key: str) -> set[str]:
        return set(self.data.get(key, set()))


class FakeConn:
    async def fetchval(self, query: str, *args: Any) -> Any:
        assert "FROM console.operators" in query
        return [r.value for r in Role]  # users.state: enabled, every role


class FakePool:
    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConn]:
        yield FakeConn()


class Visible(HTMLParser):
    """The text an operator reads: text nodes (not scripts) and the title /
    placeholder attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        for name, value in attrs:
            if name in ("title", "placeholder") and value:
                self.texts.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.texts.append(data.strip())


def visible(html: str) -> list[str]:
    parser = Visible()
    parser.feed(html)
    return parser.texts


def data_words() -> set[str]:
    """Words of what the gateway answered (ids, codes, names): data, not UI text."""
    words: set[str] = {"i18n", "tester", "SH001"}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            words.update(re.findall(r"[A-Za-z][A-Za-z_\-]*", value))

    walk(ROUTES)
    for name in DASHBOARDS:
        answer = analytics(name)
        del answer["definitions"]
        walk(answer)
    return words


def chinese_catalogue_words() -> set[str]:
    """ASCII words the Chinese texts themselves use (RFM, JSON, UUID, VIP, ...)."""
    texts = [zh for zh, _ in (*CATALOGUE.values(), *SERIES.values())]
    texts += [zh for words in CODES.values() for zh, _ in words.values()]
    texts += [m.name_zh for m in METRICS] + [m.definition_zh for m in METRICS]
    return {w for t in texts for w in re.findall(r"[A-Za-z][A-Za-z_\-]*", t)}


def english_texts() -> set[str]:
    """Every English text of the catalogue that differs from its Chinese one."""
    pairs = [*CATALOGUE.values(), *SERIES.values()]
    pairs += [p for words in CODES.values() for p in words.values()]
    pairs += [(m.name_zh, m.name) for m in METRICS]
    pairs += [(m.definition_zh, m.definition) for m in METRICS]
    return {en for zh, en in pairs if en != zh and len(en) > 3}


KEY_PREFIXES = sorted({key.split(".", 1)[0] for key in CATALOGUE})
MISSING_KEY = re.compile(rf"\b(?:{'|'.join(KEY_PREFIXES)})\.[a-z0-9_.\-]+\b")


@pytest.fixture
async def console() -> Any:
    settings = ConsoleSettings(
        database_url="postgresql://unused/unused",
        redis_url="redis://unused:1/0",
        console_gateway_url="http://unused:9",
    )
    app = build(settings, clock=lambda: 1_900_000_000.0)
    state = app.state.console
    redis = FakeRedis()
    state.pool = FakePool()
    state.redis = redis
    state.sessions = SessionStore(
        redis,  # type: ignore[arg-type]
        "test",
        idle_seconds=600,
        absolute_seconds=3600,
        clock=lambda: 1_900_000_000.0,
    )
    state.gateway = FakeGateway()
    return app


async def pages(app: Any, locale: str) -> dict[str, httpx.Response]:
    """Every page (and every form error the console itself writes) in this locale."""
    store: SessionStore = app.state.console.sessions
    session = await store.new(
        username="i18n.tester", roles=tuple(r.value for r in Role), locale=locale
    )
    anonymous = await store.new(locale=locale)
    transport = httpx.ASGITransport(app=app)
    shown: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
        client.cookies.set(COOKIE, anonymous.session_id)
        shown["login"] = await client.get("/login")
        shown["sign in first"] = await client.post(f"/merge-reviews/{REVIEW}/approve")
        client.cookies.clear()
        client.cookies.set(COOKIE, session.session_id)
        token = session.csrf_token
        gets = {
            "password": "/account/password",
            "merge reviews": f"/merge-reviews?done={REVIEW}",
            "quarantine": "/quarantine",
            "member": f"/members?member_id={MEMBER}",
            "member id not a uuid": "/members?member_id=abc",
            "coupons": "/coupons",
            "journeys": "/journeys?journey_id=welcome",
            "events": "/events?replayed=1",
            "dead letters": "/dead-letters?redriven=1700000000001-0",
            "unknown dashboard": "/dashboards/nope",
            **{
                f"dashboard {d}": f"/dashboards/{d}?from={DAYS[0]}&to={DAYS[1]}" for d in DASHBOARDS
            },
        }
        for name, path in gets.items():
            shown[name] = await client.get(path)
        posts = {
            "short password": ("/account/password", {"password": "short"}),
            "points not a number": (f"/members/{MEMBER}/points-adjustments", {"points": "x"}),
            "no purpose": (f"/members/{MEMBER}/unmask", {"purpose": " "}),
            "find without value": ("/members/lookup", {"kind": "phone", "value": ""}),
            "coupon amounts": ("/coupons", {"discount_yuan": "1.234"}),
            "journey json": ("/journeys", {"definition": "{"}),
            "no csrf token": ("/coupons", {}),
        }
        for name, (path, form) in posts.items():
            data = form if name == "no csrf token" else {"csrf_token": token, **form}
            shown[name] = await client.post(path, data=data)
    return shown


async def test_every_page_in_chinese_shows_only_catalogue_text(console: Any) -> None:
    # Error codes are shown beside the text (the gateway's and the console's own).
    allowed = data_words() | chinese_catalogue_words() | set(ERROR_CODES)
    english = english_texts()
    shown = await pages(console, "zh-CN")
    statuses = {name: reply.status_code for name, reply in shown.items()}
    assert statuses["dashboard overview"] == 200 and statuses["member id not a uuid"] == 400
    assert statuses["coupon amounts"] == 400 and statuses["no csrf token"] == 403
    header = re.sub(r"<[^>]+>", "", shown["dashboard overview"].text)
    assert "(查看者、营销、会员管理员、敏感信息查看者)" in header
    problems: dict[str, list[str]] = {}
    for name, reply in shown.items():
        texts = visible(reply.text)
        found = [m for t in texts for m in MISSING_KEY.findall(t)]
        found += [t for t in texts if t in english or any(e in t for e in english if " " in e)]
        found += [
            w
            for t in texts
            for w in re.findall(r"[A-Za-z][A-Za-z_\-]*", t)
            if len(w) > 1 and w not in allowed
        ]
        if found:
            problems[name] = found
    assert not problems, problems


async def test_every_page_in_english_has_no_missing_key(console: Any) -> None:
    shown = await pages(console, "en")
    problems = {
        name: found
        for name, reply in shown.items()
        if (found := [m for t in visible(reply.text) for m in MISSING_KEY.findall(t)])
    }
    assert not problems, problems
    dashboard = shown["dashboard journeys"].text
    assert "lift (95% CI)" in dashboard and "Journey welcome: funnel per step" in dashboard
    # The header names the operator's roles as words, in the session's language.
    assert "(Viewer, Marketer, Member admin, PII reader)" in re.sub(r"<[^>]+>", "", dashboard)


async def test_definitions_under_the_charts_are_in_the_sessions_language(console: Any) -> None:
    zh = (await pages(console, "zh-CN"))["dashboard overview"].text
    en = (await pages(console, "en"))["dashboard overview"].text
    by_key = {m.key: m for m in METRICS}
    assert by_key["repurchase_rate"].definition_zh in zh
    assert by_key["repurchase_rate"].definition not in zh
    assert by_key["repurchase_rate"].definition in en


async def test_codes_the_charts_draw_have_words_in_both_languages_and_stay_codes_in_data(
    console: Any,
) -> None:
    shown = await pages(console, "zh-CN")
    checked = 0
    for name in DASHBOARDS:
        html = shown[f"dashboard {name}"].text
        labels = json.loads(
            re.search(r'id="code-labels">(.*?)</script>', html, re.S).group(1)  # type: ignore[union-attr]
        )
        for kind, raw in re.findall(r'data-codes="(\w+)" data-chart="([^"]*)"', html):
            data = json.loads(raw.replace("&#34;", '"').replace("&quot;", '"'))
            codes = set(data.get("x", []))
            codes |= {c for link in data.get("links", []) for c in link[:2]}
            if "series" in data and any("→" in s for s in data["series"]):
                codes = {c for s in data["series"] for c in s.split("→")}
            for code in codes:
                # The page draws it as a word; the data attribute keeps the code.
                assert labels[kind].get(code, code) != code, (kind, code)
                assert code in CODES[kind], (kind, code)
                zh, en = CODES[kind][code]
                assert zh and en
                checked += 1
    assert checked >= 20
    # Every send status the journeys' funnel draws has its series label.
    assert all(f"sent.{s}" in SERIES for s in CODES["send_status"])


def test_charts_and_figures_name_catalogue_keys() -> None:
    for name in DASHBOARDS:
        for kpi in KPIS[name]:
            assert kpi.label in CATALOGUE, (name, kpi)
        for chart in CHARTS[name]:
            assert chart.title in CATALOGUE, (name, chart)
    assert "chart.journeys.journey" in CATALOGUE
