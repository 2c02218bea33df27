"""Demo brand data: a few stores in Shanghai and Hangzhou and two coupon templates.

`seed_demo` upserts, so running it again (every `make run`, every test
session) leaves the same rows; it never touches orders or the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from .coupons import repository as coupon_repository
from .coupons.domain import Kind, Limits, Terms
from .orders import repository as repo
from .orders.repository import StoreRecord

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
