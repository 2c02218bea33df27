"""The dashboards' aggregates (each service's analytics module) against real
PostgreSQL with known data: exact numbers, the store filter, empty ranges and
the day boundaries of Asia/Shanghai. The module migrates a database of its own,
so brand-wide figures (liability, tier distribution, RFM) count only the rows
written here. Every time is fixed: nothing depends on today."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from loyalty.common.v1 import common_pb2
from servicekit.analytics import DayRange, day_range
from servicekit.db import asyncpg_dsn, with_database
from servicekit.errors import InvalidArgument
from servicekit.migrations import SERVICES, upgrade
from services.engagement import facts_repository as engagement_facts
from services.engagement import repository as engagement_repo
from services.engagement.analytics import SEND_STATUSES, journey_funnels
from services.engagement.domain import lift
from services.member.analytics import member_counts
from services.rewards import members as rewards_members
from services.rewards.analytics import repository as rewards
from services.tiering import analytics as tiering
from services.tiering import repository as repo
from services.tiering.repository import programme_at
from services.tiering.seed import seed_demo as seed_tiering

from ..harness import Infra, own_database

SH = ZoneInfo("Asia/Shanghai")
FIRST, LAST = date(2025, 3, 1), date(2025, 3, 10)
# "Now" for what is measured against the present (locks, expiry, grace).
NOW = datetime(2025, 3, 10, tzinfo=UTC)


def local(day: int, hour: int = 12, minute: int = 0, month: int = 3) -> datetime:
    return datetime(2025, month, day, hour, minute, tzinfo=SH)


def rng(stores: list[str] | None = None, first: date = FIRST, last: date = LAST) -> DayRange:
    return DayRange(first, last, "Asia/Shanghai", stores)


def days(first: date = FIRST, last: date = LAST) -> list[str]:
    return [(first + timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]


@pytest.fixture(scope="module")
async def conn(infra: Infra) -> AsyncIterator[asyncpg.Connection]:
    name = f"analytics_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(infra.admin_url, name)
    for service in SERVICES:
        await asyncio.to_thread(upgrade, service, url)
    c = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield c
    finally:
        await c.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# ---- the filter ---------------------------------------------------------------------


def test_the_filter_is_checked_by_the_service_too() -> None:
    ok = day_range(common_pb2.AnalyticsFilter(from_day="2025-03-01", to_day="2025-03-10"))
    assert (ok.first, ok.last, ok.store_ids) == (FIRST, LAST, None)
    # The local day 1 March starts at 16:00 UTC on 28 February.
    assert ok.start == datetime(2025, 2, 28, 16, tzinfo=UTC)
    assert ok.end == datetime(2025, 3, 10, 16, tzinfo=UTC)
    none = day_range(
        common_pb2.AnalyticsFilter(from_day="2025-03-01", to_day="2025-03-01", by_store=True)
    )
    assert none.store_ids == []
    for f, code, field in [
        (("2025-3-01", "2025-03-10"), "INVALID_DATE", "from_day"),
        (("2025-03-01", "2025-02-30"), "INVALID_DATE", "to_day"),
        (("2025-03-10", "2025-03-09"), "INVALID_RANGE", "to_day"),
        (("2024-01-01", "2025-01-01"), "RANGE_TOO_LONG", "to_day"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            day_range(common_pb2.AnalyticsFilter(from_day=f[0], to_day=f[1]))
        assert (caught.value.code, caught.value.field) == (code, field)
    # 366 days is the most a range may cover (a leap year).
    assert day_range(common_pb2.AnalyticsFilter(from_day="2024-01-01", to_day="2024-12-31"))


# ---- member -------------------------------------------------------------------------


async def _member(
    conn: asyncpg.Connection,
    registered_at: datetime,
    source: str,
    *,
    status: str = "active",
    merged_into: uuid.UUID | None = None,
    observations: tuple[tuple[str, str, bool, datetime], ...] = (),
) -> uuid.UUID:
    member_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO member.members (id, member_number, registered_at, registration_source,"
        " status, merged_into) VALUES ($1, $2, $3, $4, $5, $6)",
        member_id,
        member_id.hex[:12],
        registered_at,
        source,
        status,
        merged_into,
    )
    for field, value, verified, at in observations:
        await conn.execute(
            "INSERT INTO member.profile_observations (member_id, field, value, source,"
            " verified, observed_at) VALUES ($1, $2, $3, 'test', $4, $5)",
            member_id,
            field,
            value,
            verified,
            at,
        )
    return member_id


async def test_member_counts(conn: asyncpg.Connection) -> None:
    # 02:00 on 1 March in Shanghai is still 28 February in UTC: counted on 1 March.
    m1 = await _member(
        conn,
        local(1, 2),
        "mini-program",
        observations=(
            ("registration_store_id", "SH002", True, local(1, 2)),
            # Newer but unverified: the verified value stays the effective one.
            ("registration_store_id", "SH001", False, local(2)),
        ),
    )
    await _member(
        conn,
        local(5),
        "pos:SH001",
        observations=(
            ("registration_store_id", "SH001", False, local(5)),
            ("acquisition_channel", "wecom", False, local(5)),
        ),
    )
    await _member(
        conn,
        local(20, month=2),
        "pos:SH001",
        observations=(("registration_store_id", "SH001", False, local(20, month=2)),),
    )
    await _member(conn, local(11, 0, 30), "mini-program")  # the day after the range
    await _member(conn, local(10, 23, 59), "mini-program", merged_into=m1)  # merged away
    await _member(conn, local(2), "mini-program", status="erased")

    c = await member_counts(conn, rng())
    assert (c.total, c.new_members) == (3, 2)
    assert [d for d, _ in c.new_by_day] == days()
    assert {d: n for d, n in c.new_by_day if n} == {"2025-03-01": 1, "2025-03-05": 1}
    assert sorted(c.new_by_channel) == [("mini-program", 1), ("wecom", 1)]
    assert sorted(c.new_by_store) == [("SH001", 1), ("SH002", 1)]

    sh001 = await member_counts(conn, rng(["SH001"]))
    assert (sh001.total, sh001.new_members, sh001.new_by_store) == (2, 1, [("SH001", 1)])
    nowhere = await member_counts(conn, rng([]))
    assert (nowhere.total, nowhere.new_members, nowhere.new_by_channel) == (0, 0, [])
    assert len(nowhere.new_by_day) == 10 and not any(n for _, n in nowhere.new_by_day)
    before = await member_counts(conn, rng(first=date(2025, 1, 1), last=date(2025, 1, 31)))
    assert (before.total, before.new_members) == (0, 0)


# ---- rewards ------------------------------------------------------------------------


async def _stores(conn: asyncpg.Connection) -> None:
    await conn.executemany(
        "INSERT INTO rewards.stores (store_id, name, city, address, latitude, longitude)"
        " VALUES ($1, $1, $2, '', 31.2, 121.4) ON CONFLICT DO NOTHING",
        [("SH001", "上海"), ("SH002", "上海"), ("BJ001", "北京")],
    )


async def _order(
    conn: asyncpg.Connection,
    member: uuid.UUID,
    store: str,
    at: datetime,
    paid: int,
    status: str = "settled",
) -> uuid.UUID:
    order_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO rewards.orders (id, store_id, pos_transaction_id, member_id, channel,"
        " paid_amount_fen, ordered_at, request_hash, points_earned, status)"
        " VALUES ($1, $2, $3, $4, 'store', $5, $6, $7, 0, $8)",
        order_id,
        store,
        order_id.hex[:20],
        member,
        paid,
        at,
        hashlib.sha256(order_id.bytes).digest(),
        status,
    )
    return order_id


class Orders:
    a1: uuid.UUID
    a2: uuid.UUID
    b1: uuid.UUID


@pytest.fixture(scope="module")
async def orders(conn: asyncpg.Connection) -> Orders:
    await _stores(conn)
    a, b, c, d, e = (uuid.uuid4() for _ in range(5))
    o = Orders()
    o.a1 = await _order(conn, a, "SH001", local(1, 10), 1000)
    o.a2 = await _order(conn, a, "SH002", local(3, 10), 2000)
    # 00:30 on 4 March in Shanghai (16:30 UTC on the 3rd): a 4 March order.
    o.b1 = await _order(conn, b, "SH001", local(4, 0, 30), 500)
    await _order(conn, c, "SH001", local(15, month=2), 700)  # before: active, not in range
    await _order(conn, d, "SH001", local(10), 900, status="rejected")
    await _order(conn, e, "SH002", local(1, month=1), 800)  # more than 30 days before
    return o


async def test_order_analytics(conn: asyncpg.Connection, orders: Orders) -> None:
    a = await rewards.order_analytics(conn, rng())
    assert {k: a[k] for k in ("orders", "spend_fen", "buyers", "repeat_buyers")} == {
        "orders": 3,
        "spend_fen": 3500,
        "buyers": 2,
        "repeat_buyers": 1,
    }
    assert a["active_members_30d"] == 3
    assert [d["day"] for d in a["by_day"]] == days()
    assert {d["day"]: (d["orders"], d["spend_fen"]) for d in a["by_day"] if d["orders"]} == {
        "2025-03-01": (1, 1000),
        "2025-03-03": (1, 2000),
        "2025-03-04": (1, 500),
    }
    assert a["by_store"] == [
        {"store_id": "SH002", "orders": 1, "spend_fen": 2000},
        {"store_id": "SH001", "orders": 2, "spend_fen": 1500},
    ]
    sh001 = await rewards.order_analytics(conn, rng(["SH001"]))
    assert (sh001["orders"], sh001["spend_fen"], sh001["buyers"], sh001["repeat_buyers"]) == (
        2,
        1500,
        2,
        0,
    )
    assert sh001["active_members_30d"] == 3
    nowhere = await rewards.order_analytics(conn, rng([]))
    assert (nowhere["orders"], nowhere["buyers"], nowhere["by_store"]) == (0, 0, [])
    assert len(nowhere["by_day"]) == 10
    # A one-day range: its last instant is 23:59 local, the next day excluded.
    one = await rewards.order_analytics(conn, rng(first=date(2025, 3, 3), last=date(2025, 3, 3)))
    assert (one["orders"], one["spend_fen"]) == (1, 2000)


async def _txn(
    conn: asyncpg.Connection,
    member: uuid.UUID,
    kind: str,
    amount: int,
    at: datetime,
    order: uuid.UUID | None = None,
) -> uuid.UUID:
    txn = uuid.uuid4()
    await conn.execute(
        "INSERT INTO rewards.points_transactions (id, member_id, kind, order_id,"
        " idempotency_key, amount, rule, created_at) VALUES ($1, $2, $3, $4, $5, $6, '{}', $7)",
        txn,
        member,
        kind,
        order,
        f"test:{txn}",
        amount,
        at,
    )
    return txn


async def _lot(
    conn: asyncpg.Connection,
    txn: uuid.UUID,
    status: str,
    remaining: int,
    expires: datetime,
    member: uuid.UUID | None = None,
) -> None:
    lot = uuid.uuid4()
    await conn.execute(
        "INSERT INTO rewards.points_lots (id, member_id, transaction_id, root_lot_id, points,"
        " remaining, status, earned_at, expires_at) VALUES ($1, $2, $3, $1, 100, $4, $5, $6, $7)",
        lot,
        member or uuid.uuid4(),
        txn,
        remaining,
        status,
        NOW - timedelta(days=60),
        expires,
    )


async def test_points_analytics(conn: asyncpg.Connection, orders: Orders) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    earn = await _txn(conn, a, "earn", 100, local(1, 10), orders.a1)
    await _txn(conn, a, "redeem", 30, local(3, 10), orders.a2)
    await _txn(conn, a, "expire", 20, local(5, 9))
    await _txn(conn, b, "earn", 50, local(5, 10))  # an action: no order, no store
    await _txn(conn, b, "earn", 999, local(12, 10))  # after the range
    await _txn(conn, b, "activate", 10, local(6, 10))  # not a flow
    await conn.executemany(
        "INSERT INTO rewards.points_balances (member_id, available, pending, held)"
        " VALUES ($1, $2, $3, $4)",
        [(a, 70, 10, 0), (b, 5, 0, 3)],
    )
    await _lot(conn, earn, "active", 40, NOW + timedelta(days=10), a)
    await _lot(conn, earn, "active", 30, NOW + timedelta(days=40), a)
    await _lot(conn, earn, "pending", 10, NOW + timedelta(days=5), a)
    await _lot(conn, earn, "active", 0, NOW + timedelta(days=5), a)
    await _lot(conn, earn, "active", 25, NOW - timedelta(days=1), a)

    p = await rewards.points_analytics(conn, rng(), NOW)
    # Held points (an open checkout hold) are still owed: outstanding.
    assert (p["outstanding_points"], p["pending_points"], p["expiring_30d_points"]) == (78, 10, 40)
    assert [d["day"] for d in p["by_day"]] == days()
    flows = {d["day"]: (d["earned"], d["spent"], d["expired"]) for d in p["by_day"]}
    assert {k: v for k, v in flows.items() if v != (0, 0, 0)} == {
        "2025-03-01": (100, 0, 0),
        "2025-03-03": (0, 30, 0),
        "2025-03-05": (50, 0, 20),
    }
    # The store filter: an order's points count under the order's store, the
    # rest (an action, an expiry) and the liability under the member's store
    # (MEMBER_STORE): a registered at SH001, b last ordered at BJ001.
    await rewards_members.record_registration_store(conn, a, "SH001")
    await rewards_members.record_order_store(conn, b, "BJ001", local(1))
    sh001 = await rewards.points_analytics(conn, rng(["SH001"]), NOW)
    assert (sh001["outstanding_points"], sh001["pending_points"]) == (70, 10)
    assert sh001["expiring_30d_points"] == 40
    flows = {d["day"]: (d["earned"], d["spent"], d["expired"]) for d in sh001["by_day"]}
    # a's redemption was on an SH002 order: not here.
    assert {k: v for k, v in flows.items() if v != (0, 0, 0)} == {
        "2025-03-01": (100, 0, 0),
        "2025-03-05": (0, 0, 20),
    }
    bj = await rewards.points_analytics(conn, rng(["BJ001"]), NOW)
    assert (bj["outstanding_points"], bj["pending_points"], bj["expiring_30d_points"]) == (8, 0, 0)
    assert (bj["outstanding_points"], bj["pending_points"]) != (
        p["outstanding_points"],
        p["pending_points"],
    )
    flows = {d["day"]: (d["earned"], d["spent"], d["expired"]) for d in bj["by_day"]}
    assert {k: v for k, v in flows.items() if v != (0, 0, 0)} == {"2025-03-05": (50, 0, 0)}
    sh002 = await rewards.points_analytics(conn, rng(["SH002"]), NOW)
    assert (sh002["outstanding_points"], sh002["expiring_30d_points"]) == (0, 0)
    flows = {d["day"]: (d["earned"], d["spent"], d["expired"]) for d in sh002["by_day"]}
    assert {k: v for k, v in flows.items() if v != (0, 0, 0)} == {"2025-03-03": (0, 30, 0)}


async def _template(conn: asyncpg.Connection, template_id: str, name: str) -> None:
    await conn.execute(
        "INSERT INTO rewards.coupon_templates (template_id, name, kind, spec)"
        " VALUES ($1, $2, 'amount_off', '{}')",
        template_id,
        name,
    )


async def _coupon(
    conn: asyncpg.Connection,
    template_id: str,
    issued: datetime,
    status: str,
    *,
    expires: datetime = NOW + timedelta(days=30),
    locked_until: datetime | None = None,
    order: uuid.UUID | None = None,
    redeemed: datetime | None = None,
    discount: int | None = None,
    member: uuid.UUID | None = None,
) -> None:
    cid = uuid.uuid4()
    member = member or uuid.uuid4()
    await conn.execute(
        # Its key first (coupon_keys: code and issue key unique across partitions).
        "WITH k AS (INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
        " VALUES ($1, $2, $2, $8))"
        " INSERT INTO rewards.coupons (id, code, template_id, template_version, member_id,"
        " reason, issue_key, request_hash, status, issued_at, valid_from, expires_at,"
        " locked_until, order_id, redeemed_at, discount_fen, issued_to)"
        " VALUES ($1, $2, $3, 1, $4, 'operator_grant', $2, $5, $6, $7, $7, $8, $9, $10, $11,"
        " $12, $4)",
        cid,
        cid.hex[:16],
        template_id,
        member,
        hashlib.sha256(cid.bytes).digest(),
        status,
        issued,
        expires,
        locked_until,
        order,
        redeemed,
        discount,
    )


async def test_coupon_analytics(conn: asyncpg.Connection, orders: Orders) -> None:
    await _template(conn, "t-five-off", "立减5元")
    await _template(conn, "t-free-tea", "免费茶饮")
    t1, t2 = "t-five-off", "t-free-tea"
    # m1 registered at SH001, m2 last ordered at BJ001; the others' store is unknown.
    m1, m2 = uuid.uuid4(), uuid.uuid4()
    await rewards_members.record_registration_store(conn, m1, "SH001")
    await rewards_members.record_order_store(conn, m2, "BJ001", local(1))
    await _coupon(
        conn,
        t1,
        local(1, 9),
        "used",
        order=orders.a1,
        redeemed=local(1, 10),
        discount=300,
        member=m1,
    )
    await _coupon(
        conn, t1, local(1, 11), "locked", locked_until=NOW + timedelta(minutes=10), member=m1
    )
    await _coupon(conn, t1, local(2), "available", expires=local(5))  # lapsed: expired
    await _coupon(conn, t1, local(2), "expired", expires=local(6))
    # A lock that lapsed reads as available.
    await _coupon(conn, t1, local(2), "locked", locked_until=NOW - timedelta(minutes=1))
    # Issued before the range, redeemed within it: only in the by-store figures.
    await _coupon(
        conn,
        t1,
        local(1, month=2),
        "used",
        order=orders.a2,
        redeemed=local(3, 10),
        discount=200,
    )
    await _coupon(
        conn,
        t2,
        local(3),
        "used",
        order=orders.b1,
        redeemed=local(4, 0, 30),
        discount=100,
        member=m2,
    )

    c = await rewards.coupon_analytics(conn, rng(), NOW)
    assert c["templates"] == [
        {
            "template_id": t1,
            "name": "立减5元",
            "issued": 5,
            "locked": 1,
            "redeemed": 1,
            "expired": 2,
            "discount_fen": 300,
        },
        {
            "template_id": t2,
            "name": "免费茶饮",
            "issued": 1,
            "locked": 0,
            "redeemed": 1,
            "expired": 0,
            "discount_fen": 100,
        },
    ]
    assert [d["day"] for d in c["by_day"]] == days()
    assert {d["day"]: (d["issued"], d["redeemed"]) for d in c["by_day"] if d["issued"]} == {
        "2025-03-01": (2, 1),
        "2025-03-02": (3, 0),
        "2025-03-03": (1, 1),
    }
    assert c["by_store"] == [
        {"store_id": "SH001", "redeemed": 2, "discount_fen": 400},
        {"store_id": "SH002", "redeemed": 1, "discount_fen": 200},
    ]
    # The store filter: redemptions by the order's store; the funnel and the
    # issuing per day by the coupon member's store (MEMBER_STORE).
    sh002 = await rewards.coupon_analytics(conn, rng(["SH002"]), NOW)
    assert sh002["by_store"] == [{"store_id": "SH002", "redeemed": 1, "discount_fen": 200}]
    assert sh002["templates"] == []
    sh001 = await rewards.coupon_analytics(conn, rng(["SH001"]), NOW)
    assert sh001["templates"] == [
        {
            "template_id": t1,
            "name": "立减5元",
            "issued": 2,
            "locked": 1,
            "redeemed": 1,
            "expired": 0,
            "discount_fen": 300,
        }
    ]
    assert {d["day"]: (d["issued"], d["redeemed"]) for d in sh001["by_day"] if d["issued"]} == {
        "2025-03-01": (2, 1)
    }
    assert sh001["by_store"] == [{"store_id": "SH001", "redeemed": 2, "discount_fen": 400}]
    bj = await rewards.coupon_analytics(conn, rng(["BJ001"]), NOW)
    assert [(t["template_id"], t["issued"], t["redeemed"]) for t in bj["templates"]] == [(t2, 1, 1)]
    assert bj["by_store"] == []
    empty = await rewards.coupon_analytics(
        conn, rng(first=date(2024, 1, 1), last=date(2024, 1, 2)), NOW
    )
    assert (empty["templates"], empty["by_store"], len(empty["by_day"])) == ([], [], 2)


async def test_referral_analytics(conn: asyncpg.Connection) -> None:
    x, y, z = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for member, at in ((x, local(1)), (y, local(2)), (z, local(1, month=2))):
        await conn.execute(
            "INSERT INTO rewards.invite_codes (member_id, code, created_at) VALUES ($1, $2, $3)",
            member,
            member.hex[:8],
            at,
        )

    async def referral(inviter: uuid.UUID, at: datetime, first_order: bool) -> uuid.UUID:
        rid = uuid.uuid4()
        await conn.execute(
            "INSERT INTO rewards.referrals (id, inviter_id, invitee_id, invite_code,"
            " invitee_registered_at, accepted_at, first_order_id, first_order_at)"
            " VALUES ($1, $2, $3, 'code', $4, $4, $5, $6)",
            rid,
            inviter,
            uuid.uuid4(),
            at,
            uuid.uuid4() if first_order else None,
            at + timedelta(days=1) if first_order else None,
        )
        return rid

    r1 = await referral(x, local(1), True)
    r2 = await referral(x, local(2), False)
    r3 = await referral(y, local(5), True)
    r4 = await referral(z, local(10, month=2), False)

    async def reward(rid: uuid.UUID, status: str, codes: list[str], at: datetime) -> None:
        await conn.execute(
            "INSERT INTO rewards.referral_rewards (referral_id, step, role, member_id, status,"
            " refusals, created_at) VALUES ($1, 'registration', 'inviter', $2, $3, $4::jsonb, $5)",
            rid,
            uuid.uuid4(),
            status,
            json.dumps([{"code": c, "message": c.lower()} for c in codes]),
            at,
        )

    await reward(r1, "refused", ["INVITER_REWARD_CAP_REACHED"], local(1))
    await reward(r2, "partial", ["COUPON_OUT_OF_STOCK"], local(2))
    await reward(r3, "granted", [], local(5))
    await reward(r4, "refused", ["SELF_REFERRAL"], local(10, month=2))

    # Refused at acceptance (the accept rolled back; the refusal row stays).
    await conn.execute(
        "INSERT INTO rewards.referral_refusals (code, invite_code, inviter_id, invitee_id,"
        " refused_at) VALUES ('FINGERPRINT_ALREADY_USED', 'code', $1, $2, $3),"
        " ('FINGERPRINT_ALREADY_USED', 'code', $1, $2, $4)",
        x,
        uuid.uuid4(),
        local(6),
        local(11, 0, 1),  # the day after the range
    )
    a = await rewards.referral_analytics(conn, rng())
    assert {k: a[k] for k in ("invites", "accepted", "first_orders", "inviters")} == {
        "invites": 2,
        "accepted": 3,
        "first_orders": 2,
        "inviters": 2,
    }
    assert a["top_inviters"] == [
        {"member_id": str(x), "accepted": 2, "first_orders": 1},
        {"member_id": str(y), "accepted": 1, "first_orders": 1},
    ]
    assert a["abuse_refusals"] == 3
    assert a["refusals_by_reason"] == [
        {"key": "COUPON_OUT_OF_STOCK", "count": 1},
        {"key": "FINGERPRINT_ALREADY_USED", "count": 1},
        {"key": "INVITER_REWARD_CAP_REACHED", "count": 1},
    ]
    empty = await rewards.referral_analytics(
        conn, rng(first=date(2024, 1, 1), last=date(2024, 1, 1))
    )
    assert (empty["accepted"], empty["inviters"], empty["top_inviters"]) == (0, 0, [])

    # The store filter: every referral figure counts under the inviter's store
    # (MEMBER_STORE): x registered at SH001, y last ordered at BJ001, z unknown.
    await rewards_members.record_registration_store(conn, x, "SH001")
    await rewards_members.record_order_store(conn, y, "BJ001", local(1))
    sh = await rewards.referral_analytics(conn, rng(["SH001"]))
    assert {k: sh[k] for k in ("invites", "accepted", "first_orders", "inviters")} == {
        "invites": 1,
        "accepted": 2,
        "first_orders": 1,
        "inviters": 1,
    }
    assert sh["top_inviters"] == [{"member_id": str(x), "accepted": 2, "first_orders": 1}]
    assert sh["abuse_refusals"] == 3
    bj = await rewards.referral_analytics(conn, rng(["BJ001"]))
    assert {k: bj[k] for k in ("invites", "accepted", "first_orders", "inviters")} == {
        "invites": 1,
        "accepted": 1,
        "first_orders": 1,
        "inviters": 1,
    }
    assert (bj["abuse_refusals"], bj["refusals_by_reason"]) == (0, [])


async def test_rewards_member_stores_are_back_filled_from_the_latest_settled_order(
    infra: Infra,
) -> None:
    """Migration 0019 over a deployed rewards schema: each member's store starts
    as its latest settled order's (a rejected order is no order), set-based."""
    async with own_database(infra, prefix="member_stores") as url:
        await asyncio.to_thread(upgrade, "rewards", url, "0018_rewards_order_partitions")
        c = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await _stores(c)
            a, b = uuid.uuid4(), uuid.uuid4()
            await _order(c, a, "SH001", local(1), 100)
            await _order(c, a, "SH002", local(3), 100)
            await _order(c, b, "BJ001", local(2), 100)
            await _order(c, b, "SH001", local(4), 100, status="rejected")
            await asyncio.to_thread(upgrade, "rewards", url)
            rows = await c.fetch(
                "SELECT member_id, registration_store_id, order_store_id, order_store_at"
                " FROM rewards.member_stores"
            )
        finally:
            await c.close()
    assert {r["member_id"]: tuple(r)[1:] for r in rows} == {
        a: (None, "SH002", local(3)),
        b: (None, "BJ001", local(2)),
    }


# ---- tiering ------------------------------------------------------------------------


async def _tier(
    conn: asyncpg.Connection,
    tier: str,
    grace_until: datetime | None = None,
    programme: str = "default",
) -> uuid.UUID:
    member = uuid.uuid4()
    await conn.execute(
        "INSERT INTO tiering.member_tiers (member_id, programme_id, programme_version, tier_code,"
        " base_tier, earned_tier, period_start, period_end, peak, grace_until, evaluated_at)"
        " VALUES ($1, $2, 1, $3, $3, $3, $4, $5, 0, $6, $4)",
        member,
        programme,
        tier,
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
        grace_until,
    )
    return member


async def _history(
    conn: asyncpg.Connection, member: uuid.UUID, from_tier: str, to_tier: str, at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO tiering.tier_history (member_id, from_tier, to_tier, reason, figures,"
        " programme_id, programme_version, changed_at) VALUES ($1, $2, $3, 'upgrade', '{}',"
        " 'default', 1, $4)",
        member,
        from_tier,
        to_tier,
        at,
    )


async def _spend(
    conn: asyncpg.Connection, member: uuid.UUID, at: datetime, paid: int, refunded: int = 0
) -> None:
    await conn.execute(
        "INSERT INTO tiering.orders (order_id, member_id, ordered_at, paid_fen, refunded_fen)"
        " VALUES ($1, $2, $3, $4, $5)",
        uuid.uuid4().hex,
        member,
        at,
        paid,
        refunded,
    )


async def test_tier_analytics(conn: asyncpg.Connection) -> None:
    await seed_tiering(conn)
    programme = await programme_at(conn, "default", NOW)
    t1 = await _tier(conn, "regular")
    t2 = await _tier(conn, "svip")
    t3 = await _tier(conn, "svip", grace_until=NOW + timedelta(days=5))
    t4 = await _tier(conn, "vip")
    await _tier(conn, "vip", grace_until=NOW - timedelta(days=1))  # grace over
    await _tier(conn, "explorer", programme="plan")  # another programme
    await conn.execute(
        "INSERT INTO tiering.recompute_runs (as_of, started_at, finished_at) VALUES"
        " ($1, $1, $1), ($2, $2, $2), ($3, $3, NULL)",
        datetime(2025, 3, 1, tzinfo=UTC),
        datetime(2025, 3, 8, tzinfo=UTC),
        datetime(2025, 3, 9, 12, tzinfo=UTC),
    )
    await _history(conn, t3, "regular", "svip", datetime(2025, 3, 2, 2, tzinfo=UTC))
    await _history(conn, t2, "regular", "svip", datetime(2025, 3, 8, 1, tzinfo=UTC))
    await _history(conn, t4, "regular", "svip", datetime(2025, 3, 8, 2, tzinfo=UTC))
    await _history(conn, t4, "svip", "vip", datetime(2025, 3, 9, tzinfo=UTC))
    await _history(conn, t1, "svip", "regular", datetime(2025, 3, 8, 3, tzinfo=UTC))
    # Paid spend over the 12 months to NOW: t1 within 20% of SVIP's ¥500, t2
    # under SVIP's ¥300 bar, t3 within 20% of VIP's ¥1500, t4 under VIP's ¥1000.
    await _spend(conn, t1, local(15, month=1), 45_000)
    await _spend(conn, t2, local(15, month=1), 25_000, refunded=5_000)
    await _spend(conn, t3, local(15, month=1), 130_000)
    await _spend(conn, t4, local(15, month=1), 90_000)
    await _spend(conn, t4, datetime(2023, 1, 1, tzinfo=UTC), 50_000)  # outside the window

    t = await tiering.tier_figures(conn, rng(), "default", programme, NOW)
    assert t.distribution == [("regular", 1), ("svip", 2), ("vip", 2)]
    assert t.in_grace == 1
    assert t.movements_since == datetime(2025, 3, 8, tzinfo=UTC)
    assert (t.up, t.down, t.kept) == (2, 1, 2)
    assert t.flows == [
        {"from_tier": "regular", "to_tier": "svip", "members": 1},
        {"from_tier": "regular", "to_tier": "vip", "members": 1},
        {"from_tier": "svip", "to_tier": "regular", "members": 1},
    ]
    assert [d["day"] for d in t.by_day] == days()
    assert {d["day"]: (d["up"], d["down"]) for d in t.by_day if d["up"] or d["down"]} == {
        "2025-03-02": (1, 0),
        "2025-03-08": (2, 1),
        "2025-03-09": (1, 0),
    }
    assert t.projections == [
        {"tier": "regular", "members": 1, "at_risk": 0, "near_next": 1},
        {"tier": "svip", "members": 2, "at_risk": 1, "near_next": 1},
        {"tier": "vip", "members": 2, "at_risk": 2, "near_next": 0},
    ]

    # The store filter: each member's store (MEMBER_STORE) is the registration
    # store, else the latest order's. t1, t3 registered at SH001; t2 registered
    # at BJ001 and last ordered at SH001 (the registration store wins); t4 has
    # no registration store and last ordered at SH001 (an earlier order at
    # BJ001). The vip past grace has no store at all: brand-wide only.
    await _store_of(conn, t1, registration="SH001")
    await _store_of(conn, t2, registration="BJ001", order=("SH001", local(1)))
    await _store_of(conn, t3, registration="SH001")
    await _store_of(conn, t4, order=("BJ001", local(1)))
    await _store_of(conn, t4, order=("SH001", local(2)))
    await _store_of(conn, t4, order=("BJ001", local(1, 9)))  # older: the store stays
    sh = await tiering.tier_figures(conn, rng(["SH001"]), "default", programme, NOW)
    assert sh.distribution == [("regular", 1), ("svip", 1), ("vip", 1)]
    assert sh.distribution != t.distribution
    assert sh.in_grace == 1
    # Since the last recompute: t4 regular -> vip (up), t1 svip -> regular (down).
    assert (sh.up, sh.down, sh.kept) == (1, 1, 1)
    assert sh.flows == [
        {"from_tier": "regular", "to_tier": "vip", "members": 1},
        {"from_tier": "svip", "to_tier": "regular", "members": 1},
    ]
    assert {d["day"]: (d["up"], d["down"]) for d in sh.by_day if d["up"] or d["down"]} == {
        "2025-03-02": (1, 0),
        "2025-03-08": (1, 1),
        "2025-03-09": (1, 0),
    }
    assert sh.projections == [
        {"tier": "regular", "members": 1, "at_risk": 0, "near_next": 1},
        {"tier": "svip", "members": 1, "at_risk": 0, "near_next": 1},
        {"tier": "vip", "members": 1, "at_risk": 1, "near_next": 0},
    ]
    bj = await tiering.tier_figures(conn, rng(["BJ001"]), "default", programme, NOW)
    assert bj.distribution == [("svip", 1)]
    assert (bj.in_grace, bj.up, bj.down, bj.kept) == (0, 1, 0, 0)
    nowhere = await tiering.tier_figures(conn, rng([]), "default", programme, NOW)
    assert (nowhere.distribution, nowhere.up, nowhere.projections) == ([], 0, [])


async def _store_of(
    conn: asyncpg.Connection,
    member: uuid.UUID,
    registration: str | None = None,
    order: tuple[str, datetime] | None = None,
) -> None:
    """What tiering's handlers write: the registration store (MemberZoneSet)
    and the latest order's store (OrderCompleted, only moving forward)."""
    if registration is not None:
        await repo.set_registration_store(conn, member, registration)
    if order is not None:
        store, at = order
        assert await repo.record_order(conn, uuid.uuid4().hex, member, at, 0, 0, at.date(), store)


async def test_segment_analytics(conn: asyncpg.Connection) -> None:
    async def profile(r: int | None, f: int | None, segment: str, stage: str) -> uuid.UUID:
        member = uuid.uuid4()
        await conn.execute(
            "INSERT INTO tiering.member_profiles (member_id, r_score, f_score, segment, stage)"
            " VALUES ($1, $2, $3, $4, $5)",
            member,
            r,
            f,
            segment,
            stage,
        )
        return member

    p1 = await profile(5, 4, "champions", "active")
    p2 = await profile(5, 4, "champions", "active")
    p3 = await profile(1, 1, "at_risk", "silent")
    await profile(None, None, "prospect", "new")
    await _spend(conn, p1, local(2), 1000, refunded=200)
    await _spend(conn, p1, local(20, month=2), 5000)  # before the range
    await _spend(conn, p3, local(10, 23), 300)
    await conn.execute(
        "INSERT INTO tiering.stage_transitions (as_of, from_stage, to_stage, members) VALUES"
        " ($1, 'new', 'active', 3), ($1, 'new', 'active', 2), ($2, 'active', 'silent', 1),"
        " ($3, 'new', 'growing', 7)",
        datetime(2025, 3, 2, 2, tzinfo=UTC),
        datetime(2025, 3, 5, 2, tzinfo=UTC),
        datetime(2025, 2, 20, 2, tzinfo=UTC),
    )
    await conn.execute(
        "INSERT INTO tiering.stage_transitions (as_of, from_stage, to_stage, members, store_id)"
        " VALUES ($1, 'new', 'active', 4, 'BJ001'), ($1, 'active', 'silent', 2, 'SH001')",
        datetime(2025, 3, 6, 2, tzinfo=UTC),
    )
    s = await tiering.segment_figures(conn, rng())
    assert s["rfm"] == [
        {"r": 5, "f": 4, "members": 2, "avg_spend_fen": 400},
        {"r": 1, "f": 1, "members": 1, "avg_spend_fen": 300},
    ]
    assert s["segments"] == [
        {"key": "champions", "count": 2},
        {"key": "at_risk", "count": 1},
        {"key": "prospect", "count": 1},
    ]
    assert s["stages"] == [
        {"key": "active", "count": 2},
        {"key": "new", "count": 1},
        {"key": "silent", "count": 1},
    ]
    assert s["transitions"] == [
        {"day": "2025-03-02", "from_stage": "new", "to_stage": "active", "members": 5},
        {"day": "2025-03-05", "from_stage": "active", "to_stage": "silent", "members": 1},
        {"day": "2025-03-06", "from_stage": "new", "to_stage": "active", "members": 4},
        {"day": "2025-03-06", "from_stage": "active", "to_stage": "silent", "members": 2},
    ]

    # By store: p1 and p3 registered at SH001, the second champion at BJ001;
    # the prospect has no store (brand-wide only).
    await repo.set_registration_store(conn, p1, "SH001")
    await repo.set_registration_store(conn, p2, "BJ001")
    await repo.set_registration_store(conn, p3, "SH001")
    sh = await tiering.segment_figures(conn, rng(["SH001"]))
    assert sh["rfm"] == [
        {"r": 5, "f": 4, "members": 1, "avg_spend_fen": 800},
        {"r": 1, "f": 1, "members": 1, "avg_spend_fen": 300},
    ]
    assert sh["rfm"] != s["rfm"]
    assert sh["segments"] == [{"key": "at_risk", "count": 1}, {"key": "champions", "count": 1}]
    assert sh["stages"] == [{"key": "active", "count": 1}, {"key": "silent", "count": 1}]
    assert sh["transitions"] == [
        {"day": "2025-03-06", "from_stage": "active", "to_stage": "silent", "members": 2},
    ]
    bj = await tiering.segment_figures(conn, rng(["BJ001"]))
    assert bj["rfm"] == [{"r": 5, "f": 4, "members": 1, "avg_spend_fen": 0}]
    assert bj["stages"] == [{"key": "active", "count": 1}]
    assert bj["transitions"] == [
        {"day": "2025-03-06", "from_stage": "new", "to_stage": "active", "members": 4},
    ]


# ---- engagement ---------------------------------------------------------------------


async def test_journey_funnels(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO engagement.journey_state (journey_id, live_version, entry_event, status)"
        " VALUES ('welcome', 1, 'member_registered', 'active')"
    )
    seq = 0

    async def enrol(
        grp: str, entered: datetime, converted: bool, steps: list[tuple[str, str]]
    ) -> uuid.UUID:
        nonlocal seq
        eid, member = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO engagement.enrollments (enrollment_id, journey_id, version, member_id,"
            " status, grp, conversion_days, entered_at, converted_at)"
            " VALUES ($1, 'welcome', 1, $2, 'active', $3, 7, $4, $5)",
            eid,
            member,
            grp,
            entered,
            entered + timedelta(days=1) if converted else None,
        )
        for n, (step, status) in enumerate(steps):
            seq += 1
            at = entered + timedelta(minutes=n)
            await conn.execute(
                "INSERT INTO engagement.sends (send_key, enrollment_id, journey_id, version,"
                " step_id, channel, template, message_class, priority, local_day, status,"
                " created_at, updated_at) VALUES ($1, $2, 'welcome', 1, $3, 'sms', 't',"
                " 'marketing', 0, $4, $5, $6, $6)",
                f"{eid}:{n}",
                eid,
                step,
                at.date(),
                status,
                at,
            )
        return member

    a = await enrol("treatment", local(1), True, [("hello", "delivered"), ("nudge", "capped")])
    b = await enrol("treatment", local(2), False, [("hello", "failed")])
    c = await enrol("treatment", local(3), False, [("hello", "no_credit")])
    d = await enrol("holdout", local(3), True, [])
    await enrol("holdout", local(4), False, [])  # no store known: brand-wide only
    await enrol("treatment", local(1, month=2), True, [("hello", "delivered")])  # before

    [j] = await journey_funnels(conn, rng())
    assert (j.journey_id, j.status, j.entered, j.converted) == ("welcome", "active", 5, 2)
    assert (j.treated, j.holdout, j.treated_converted, j.holdout_converted) == (3, 2, 1, 1)
    zero = dict.fromkeys(SEND_STATUSES, 0)
    assert [(s.step_id, s.entered, s.sent, s.converted) for s in j.steps] == [
        ("hello", 3, zero | {"delivered": 1, "failed": 1, "no_credit": 1}, 1),
        ("nudge", 1, zero | {"capped": 1}, 1),
    ]
    assert list(j.steps[0].sent) == list(SEND_STATUSES)
    assert j.lift == lift(1, 3, 1, 2)
    assert j.lift is not None and j.lift.lift == pytest.approx(1 / 3 - 1 / 2)
    assert await journey_funnels(conn, rng(first=date(2024, 1, 1), last=date(2024, 1, 1))) == []

    # The store filter: each member's store (MEMBER_STORE) is the registration
    # store engagement keeps from MemberZoneSet, else its latest order's. a and
    # d registered at SH001; b only ordered there; c registered at BJ001 and
    # ordered at SH001 (the registration store wins).
    for member, registered in ((a, "SH001"), (c, "BJ001"), (d, "SH001")):
        await engagement_facts.set_zone(conn, member, "", registered, "Asia/Shanghai")
    for member in (b, c):
        await engagement_repo.apply_event(
            conn, member, "order_completed", "", ["order_completed"], store_id="SH001"
        )
    [sh] = await journey_funnels(conn, rng(["SH001"]))
    assert (sh.entered, sh.converted) == (3, 2) != (j.entered, j.converted)
    assert (sh.treated, sh.holdout, sh.treated_converted, sh.holdout_converted) == (2, 1, 1, 1)
    assert [(s.step_id, s.entered, s.sent, s.converted) for s in sh.steps] == [
        ("hello", 2, zero | {"delivered": 1, "failed": 1}, 1),
        ("nudge", 1, zero | {"capped": 1}, 1),
    ]
    assert sh.lift == lift(1, 2, 1, 1)
    [bj] = await journey_funnels(conn, rng(["BJ001"]))
    assert (bj.entered, bj.converted, bj.treated, bj.holdout) == (1, 0, 1, 0)
    assert [(s.step_id, s.entered, s.sent) for s in bj.steps] == [
        ("hello", 1, zero | {"no_credit": 1})
    ]
    assert await journey_funnels(conn, rng([])) == []
