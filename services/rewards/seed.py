"""Demo brand data: a few stores in Shanghai and Hangzhou and two coupon templates.

`seed_demo` upserts, so running it again (every `make run`, every test
session) leaves the same rows; it never touches orders or the ledger.
`seed_demo_activity` (make run only) gives the demo members 90 days of
history through rewards' own ledger and coupon paths.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import asyncpg

from servicekit.db import Database
from servicekit.demo import ORDER_PREFIX, Activity, DemoOrder

from .coupons import repository as coupon_repository
from .coupons.domain import Kind, Limits, Terms
from .coupons.handlers import BulkItem, issue_coupons
from .kernel import Channel, OrderLine
from .orders import repository as repo
from .orders.domain import OrderRequest
from .orders.handlers import RewardsHandlers
from .orders.repository import StoreRecord
from .points.earning import parse_rules
from .points.handlers import PointsLedger
from .server import RewardsSettings

DEMO_STORES = [
    StoreRecord(
        store_id="SH001",
        name="静安寺店",
        city="上海",
        address="上海市静安区南京西路1618号",
        latitude=Decimal("31.223200"),
        longitude=Decimal("121.446900"),
        status="active",
    ),
    StoreRecord(
        store_id="SH002",
        name="陆家嘴国金中心店",
        city="上海",
        address="上海市浦东新区世纪大道8号",
        latitude=Decimal("31.236500"),
        longitude=Decimal("121.501900"),
        status="active",
    ),
    StoreRecord(
        store_id="SH003",
        name="徐家汇港汇店",
        city="上海",
        address="上海市徐汇区虹桥路1号",
        latitude=Decimal("31.195200"),
        longitude=Decimal("121.437000"),
        status="active",
    ),
    StoreRecord(
        store_id="HZ001",
        name="湖滨银泰店",
        city="杭州",
        address="杭州市上城区延安路258号",
        latitude=Decimal("30.259000"),
        longitude=Decimal("120.166000"),
        status="active",
    ),
]


@dataclass(frozen=True)
class DemoTemplate:
    template_id: str
    terms: Terms
    limits: Limits


DEMO_COUPON_TEMPLATES = [
    DemoTemplate(
        "MJ99-30",
        Terms(
            name="满99减30",
            kind=Kind.AMOUNT_OFF,
            threshold_fen=9900,
            discount_fen=3000,
            valid_days=30,
        ),
        Limits(total_stock=100_000, stock_shards=8),
    ),
    DemoTemplate(
        "FIRST-CUP-HALF",
        # Half price on the first cup, at most ¥15 off; part of the new-member
        # pack, which is valid for 3 days.
        Terms(
            name="首杯半价",
            kind=Kind.FIRST_ORDER_PRICE,
            percent=50,
            cap_fen=1500,
            valid_days=3,
            new_members_only=True,
        ),
        Limits(per_member_limit=1),
    ),
    # The demo tier programme's benefits (services/tiering/seed.py), which
    # tiering issues through rewards: a birthday drink for SVIP, a drink and a
    # gift for VIP, and a welcome gift when a member reaches VIP.
    DemoTemplate(
        "birthday-drink",
        Terms(
            name="生日饮品",
            kind=Kind.FREE_ITEM,
            categories=("drink",),
            max_price_fen=3500,
            valid_days=30,
        ),
        Limits(),
    ),
    DemoTemplate(
        "birthday-drink-and-gift",
        Terms(
            name="生日饮品+礼物",
            kind=Kind.FREE_ITEM,
            categories=("drink", "gift"),
            valid_days=30,
        ),
        Limits(),
    ),
    DemoTemplate(
        "vip-welcome-gift",
        Terms(
            name="VIP 升级礼: 满50减20",
            kind=Kind.AMOUNT_OFF,
            threshold_fen=5000,
            discount_fen=2000,
            valid_days=30,
        ),
        Limits(),
    ),
]


async def seed_demo(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await repo.upsert_stores(conn, DEMO_STORES)
        await coupon_repository.seed_templates(
            conn, [(t.template_id, t.terms, t.limits) for t in DEMO_COUPON_TEMPLATES]
        )


# ---- demo activity (make run; servicekit/demo.py) ---------------------------------

WELCOME_TEMPLATE = "MJ99-30"
WELCOME_GROSS_FEN = 12_000


async def seed_demo_activity(db: Database, activity: Activity) -> dict[str, uuid.UUID]:
    """The demo members' history through rewards' own paths: a welcome coupon
    issued to each at registration (the bulk issue path), every order settled
    by the ledger as the till would (points earned, points and coupons spent),
    referrals among them with the refusals the rules would have made, and
    their stores (registration, latest order) for the dashboards. Times
    are the history's (the orders', the coupons'). Idempotent: a second run finds demo
    orders settled and adds nothing. Answers the demo orders' ids by
    POS transaction id (tiering's and engagement's seeds take them from here)."""
    if not activity.orders:
        return {}
    async with db.reading() as uow:
        if await uow.conn.fetchval(
            "SELECT 1 FROM rewards.orders WHERE pos_transaction_id LIKE $1 LIMIT 1",
            f"{ORDER_PREFIX}%",
        ):
            return await _demo_order_ids(uow.conn)
    settings = RewardsSettings()
    points = PointsLedger(settings.ledger_policy(), parse_rules(settings.earning_rules))
    handlers = RewardsHandlers(points=points, coupon_policy=settings.coupon_policy())
    codes = await _issue_welcome_coupons(db, activity)
    for o in activity.orders:
        code = codes.get(o.member_id) if o.with_coupon else None
        gross = WELCOME_GROSS_FEN if code else o.paid_fen + o.points_to_redeem
        request = OrderRequest(
            store_id=o.store_id,
            pos_transaction_id=o.pos_transaction_id,
            member_id=str(o.member_id),
            channel=Channel.STORE,
            paid_amount_fen=o.paid_fen,
            gross_amount_fen=gross,
            # With coupons the lines carry amounts before them, else what was paid.
            lines=(OrderLine("TEA-01", "招牌奶茶", "drink", 1, gross if code else o.paid_fen),),
            ordered_at=o.ordered_at,
            points_to_redeem=o.points_to_redeem,
            coupon_codes=(code,) if code else (),
        )
        settlement = handlers.prepare_order(request, o.ordered_at)
        async with db.unit_of_work() as uow:
            outcome = await handlers.complete_order(uow, settlement, o.ordered_at)
        outcome.unwrap()
    async with db.unit_of_work() as uow:
        await _seed_referrals(uow.conn, activity)
        # The members' stores as member's MemberZoneSet and rewards' own
        # OrderCompleted would have left them (the dashboards' MEMBER_STORE).
        await uow.conn.execute(
            "INSERT INTO rewards.member_stores (member_id, registration_store_id)"
            " SELECT * FROM unnest($1::uuid[], $2::text[]) ON CONFLICT DO NOTHING",
            [m.member_id for m in activity.members],
            [m.store_id for m in activity.members],
        )
        await uow.conn.execute(
            "UPDATE rewards.member_stores ms SET order_store_id = o.store_id,"
            " order_store_at = o.ordered_at FROM (SELECT DISTINCT ON (member_id) member_id,"
            " store_id, ordered_at FROM rewards.orders WHERE status = 'settled'"
            " AND member_id = ANY($1::uuid[]) ORDER BY member_id, ordered_at DESC) o"
            " WHERE ms.member_id = o.member_id",
            [m.member_id for m in activity.members],
        )
        return await _demo_order_ids(uow.conn)


async def _demo_order_ids(conn: asyncpg.Connection) -> dict[str, uuid.UUID]:
    rows = await conn.fetch(
        "SELECT pos_transaction_id, id FROM rewards.orders WHERE pos_transaction_id LIKE $1",
        f"{ORDER_PREFIX}%",
    )
    return {r["pos_transaction_id"]: r["id"] for r in rows}


async def _issue_welcome_coupons(db: Database, activity: Activity) -> dict[uuid.UUID, str]:
    """One 满99减30 per member, issued when they registered (the bulk path,
    one item each: its time is the batch's)."""
    codes: dict[uuid.UUID, str] = {}
    for m in activity.members:
        async with db.unit_of_work() as uow:
            [result] = await issue_coupons(
                uow.conn,
                template_id=WELCOME_TEMPLATE,
                reason="registration",
                items=[BulkItem(m.member_id, f"demo-welcome:{m.member_id}")],
                now=m.registered_at,
                issued_by="demo-seed",
            )
        if result.coupon is not None:
            codes[m.member_id] = result.coupon.code
    return codes


# Refusals a referral programme makes (docs/referral-and-mall.md), for the
# demo's abuse chart: the inviter's monthly cap, a merge that found both sides
# to be one person.
DEMO_REFUSALS = ("INVITER_REWARD_CAP_REACHED", "SELF_REFERRAL")


async def _seed_referrals(conn: asyncpg.Connection, activity: Activity) -> None:
    """Every fifth member invited by an earlier one (twelve inviters), accepted
    when they registered, first order linked when they made one; a few
    reward refusals. Rewards granted are not invented: only refusals are rows."""
    members = sorted(activity.members, key=lambda m: m.registered_at)
    inviters = members[:12]
    first_orders: dict[uuid.UUID, DemoOrder] = {}
    for o in activity.orders:
        first_orders.setdefault(o.member_id, o)
    rows = []
    for n, invitee in enumerate(members[12::5]):
        inviter = inviters[n % len(inviters)]
        if inviter.registered_at >= invitee.registered_at:
            continue
        first = first_orders.get(invitee.member_id)
        rows.append((inviter, invitee, first))
    await conn.executemany(
        "INSERT INTO rewards.invite_codes (member_id, code, created_at) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        [
            (i.member_id, f"D{i.number:05d}", i.registered_at + timedelta(hours=1))
            for i in {r[0].member_id: r[0] for r in rows}.values()
        ],
    )
    for n, (inviter, invitee, first) in enumerate(rows):
        referral_id = uuid.uuid5(invitee.member_id, "demo-referral")
        await conn.execute(
            "INSERT INTO rewards.referrals (id, inviter_id, invitee_id, invite_code,"
            " invitee_registered_at, accepted_at, first_order_id, first_order_at)"
            " SELECT $1, $2, $3, $4, $5, $5, o.id, o.ordered_at FROM (SELECT 1) x"
            " LEFT JOIN rewards.orders o ON o.store_id = $6 AND o.pos_transaction_id = $7"
            " ON CONFLICT DO NOTHING",
            referral_id,
            inviter.member_id,
            invitee.member_id,
            f"D{inviter.number:05d}",
            invitee.registered_at,
            first.store_id if first else "",
            first.pos_transaction_id if first else "",
        )
        if n % 4 == 3:
            code = DEMO_REFUSALS[n % 8 // 4]
            await conn.execute(
                "INSERT INTO rewards.referral_rewards (referral_id, step, role, member_id,"
                " status, refusals, created_at) VALUES ($1, 'registration', 'inviter', $2,"
                " 'refused', $3::jsonb, $4) ON CONFLICT DO NOTHING",
                referral_id,
                inviter.member_id,
                json.dumps([{"code": code, "message": "demo"}]),
                invitee.registered_at,
            )
