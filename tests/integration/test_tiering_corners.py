"""Tiering's corners against real PostgreSQL, through the real handlers (the
consumer's code path: each event in its own unit of work) on a programme of the
test's own, with an injected clock so every story is told on fixed dates:
versions that change mid-year, grace in the projection, one programme per
brand chosen by setting, the age bound of growth actions."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from loyalty.events.v1 import events_pb2
from servicekit.db import Database, asyncpg_dsn, create_pool, with_database
from servicekit.errors import InvalidArgument
from servicekit.events import ReceivedEvent, make_envelope
from servicekit.migrations import upgrade
from servicekit.protos import timestamp as ts
from servicekit.server import ServiceApp
from services.tiering import repository as repo
from services.tiering.domain import (
    Benefits,
    Ladder,
    ProgrammeRules,
    QualifyingMetric,
    Tier,
    TierProgramme,
)
from services.tiering.handlers import TieringHandlers
from services.tiering.settings import TieringSettings

from ..harness import Infra, eventually, wait_until_serving

SH = ZoneInfo("Asia/Shanghai")
DEMO_LADDER = Ladder(
    (
        Tier("regular", "普通会员", 0, Benefits()),
        Tier("svip", "SVIP", 50_000, Benefits(12_000), retention=30_000),
        Tier("vip", "VIP", 150_000, Benefits(15_000), retention=100_000),
    )
)


def at(y: int, m: int, d: int, h: int = 12) -> datetime:
    return datetime(y, m, d, h, tzinfo=SH)


def version(
    pid: str,
    number: int,
    effective_from: datetime,
    ladder: Ladder = DEMO_LADDER,
    **rules: Any,
) -> TierProgramme:
    return TierProgramme(
        pid,
        number,
        effective_from,
        QualifyingMetric.PAID_SPEND,
        12,
        ladder,
        ProgrammeRules(**rules),
    )


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 4)
    database = Database(pool, "tiering", "tiering")
    yield database
    await database.close()


@pytest.fixture(scope="module")
async def rewards_app(infra: Infra) -> AsyncIterator[ServiceApp]:
    """This module's own rewards server (it overrides the session's): its
    event consumer and relay are stopped when the module ends, while the
    session's Redis is certainly still up. With the session's server they ran
    until the session's teardown, where under load a consumer still reading
    could outlive its stop and see the Redis socket go away (an error in
    teardown)."""
    from services.rewards.server import build

    app = build(infra.service_settings())
    port = await app.start()
    await wait_until_serving(f"127.0.0.1:{port}")
    yield app
    await app.stop()


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Brand:
    """One programme of the test's own, its handlers and its clock."""

    db: Database
    programme_id: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:10]}")
    clock: Clock = field(default_factory=lambda: Clock(at(2024, 1, 1)))

    def __post_init__(self) -> None:
        self.handlers = TieringHandlers(self.clock, programme_id=self.programme_id)

    async def add_version(self, programme: TierProgramme) -> None:
        async with self.db.unit_of_work() as uow:
            assert await repo.insert_programme(uow.conn, programme)

    async def order(self, member: uuid.UUID, fen: int, when: datetime, oid: str = "") -> str:
        oid = oid or str(uuid.uuid4())
        self.clock.now = max(self.clock.now, when)
        payload = events_pb2.OrderCompleted(
            order_id=oid,
            member_id=str(member),
            store_id="SH001",
            paid_amount_fen=fen,
            gross_amount_fen=fen,
            ordered_at=ts(when),
        )
        async with self.db.unit_of_work() as uow:
            await self.handlers.on_order_completed(uow, received("rewards", payload, member))
        return oid

    async def refund(self, member: uuid.UUID, oid: str, fen: int, when: datetime) -> None:
        self.clock.now = max(self.clock.now, when)
        payload = events_pb2.OrderRefunded(
            refund_id=f"rf-{uuid.uuid4()}",
            order_id=oid,
            member_id=str(member),
            store_id="SH001",
            refunded_amount_fen=fen,
            refunded_at=ts(when),
        )
        async with self.db.unit_of_work() as uow:
            await self.handlers.on_order_refunded(uow, received("rewards", payload, member))

    async def tier(self, member: uuid.UUID, when: datetime) -> Any:
        self.clock.now = when
        async with self.db.reading() as uow:
            return await self.handlers.member_tier(uow, str(member))

    async def history(self, member: uuid.UUID) -> list[tuple[str, str, str, int]]:
        async with self.db.reading() as uow:
            rows = await repo.history(uow.conn, member, 100)
        return [(r.from_tier, r.to_tier, r.reason, r.programme_version) for r in reversed(rows)]


def received(producer: str, payload: Any, member: uuid.UUID) -> ReceivedEvent:
    envelope = make_envelope(producer, payload, str(member))
    return ReceivedEvent(f"{producer}-stream", "0-1", envelope, payload)


# ---- 10: each period under the version in force then -----------------------------------


async def test_refund_after_a_version_change_does_not_rewrite_history(db: Database) -> None:
    """The reproduction of issue 13 item 10: an SVIP who kept SVIP across a
    version change (v2 raises the SVIP bar to ¥800) dropped to regular
    mid-period on a ¥10 refund, because the refund replayed everything under
    v2. The ¥600 that made the member SVIP was judged under v1; it stands."""
    brand = Brand(db)
    raised = Ladder(
        (
            DEMO_LADDER.tiers[0],
            Tier("svip", "SVIP", 80_000, Benefits(12_000), retention=60_000),
            Tier("vip", "VIP", 200_000, Benefits(15_000), retention=150_000),
        )
    )
    await brand.add_version(version(brand.programme_id, 1, at(2024, 1, 1)))
    await brand.add_version(version(brand.programme_id, 2, at(2025, 7, 1, 0), raised))
    member = uuid.uuid4()
    first = await brand.order(member, 60_000, at(2025, 3, 1))
    assert (await brand.tier(member, at(2025, 3, 2))).effective.code == "svip"
    await brand.order(member, 5_000, at(2025, 7, 10))  # evaluated under v2: SVIP kept
    await brand.refund(member, first, 1_000, at(2025, 8, 1))
    view = await brand.tier(member, at(2025, 8, 2))
    assert (view.effective.code, view.programme.version) == ("svip", 2)
    # Nothing was re-decided: the upgrade under v1, and no refund downgrade.
    assert await brand.history(member) == [("regular", "svip", "upgrade", 1)]

    # A late (offline) order dated before the change is replayed the same way.
    late = uuid.uuid4()
    await brand.order(late, 55_000, at(2025, 6, 20))
    await brand.order(late, 1_000, at(2025, 7, 20))
    await brand.order(late, 2_000, at(2025, 6, 25))  # replayed into the past
    assert (await brand.tier(late, at(2025, 7, 21))).effective.code == "svip"
    assert [h[2] for h in await brand.history(late)] == ["upgrade"]


async def test_a_period_end_before_the_version_change_is_decided_under_the_old_version(
    db: Database,
) -> None:
    """v1's year ends on 31 Dec 2025 (bar ¥300); v2 starts on 1 Feb 2026 with a
    ¥600 bar. A member not evaluated between the two keeps SVIP at the 2025
    period end under v1's bar, and v2 takes over with SVIP kept."""
    brand = Brand(db)
    raised = Ladder(
        (
            DEMO_LADDER.tiers[0],
            Tier("svip", "SVIP", 80_000, Benefits(12_000), retention=60_000),
            Tier("vip", "VIP", 200_000, Benefits(15_000), retention=150_000),
        )
    )
    await brand.add_version(version(brand.programme_id, 1, at(2024, 1, 1)))
    await brand.add_version(version(brand.programme_id, 2, at(2026, 2, 1, 0), raised))
    member = uuid.uuid4()
    await brand.order(member, 50_000, at(2025, 9, 1))
    await brand.order(member, 100, at(2026, 2, 10))
    view = await brand.tier(member, at(2026, 2, 11))
    assert view.effective.code == "svip"
    assert await brand.history(member) == [
        ("regular", "svip", "upgrade", 1),
        ("svip", "svip", "retained", 1),  # 31 Dec 2025: ¥500 >= v1's ¥300
    ]
    # Nothing left in the window at the 2025 period end: v1 drops the member
    # then; the version change a month later must not carry SVIP into 2026.
    lapsed = uuid.uuid4()
    await brand.order(lapsed, 50_000, at(2024, 6, 1))
    await brand.order(lapsed, 100, at(2026, 2, 10))
    assert (await brand.tier(lapsed, at(2026, 2, 11))).effective.code == "regular"
    assert [h[1:] for h in await brand.history(lapsed)] == [
        ("svip", "upgrade", 1),
        ("svip", "retained", 1),  # 31 Dec 2024
        ("regular", "downgrade", 1),  # 31 Dec 2025, under v1
    ]


# ---- 11: the projection honours grace ---------------------------------------------------


async def test_projection_in_grace_names_the_grace_deadline(db: Database) -> None:
    """docs/tiers.md's worked example with 14 days of grace: on 5 Jan 2026 the
    member is in grace until 15 Jan; what keeps SVIP is ¥180 (the ¥300 bar
    minus the ¥120 that still counts) by 14 Jan, not "¥300 by 31 Dec"."""
    brand = Brand(db)
    await brand.add_version(version(brand.programme_id, 1, at(2024, 1, 1), grace_days=14))
    member = uuid.uuid4()
    await brand.order(member, 40_000, at(2024, 12, 20))
    await brand.order(member, 12_000, at(2025, 6, 1))
    view = await brand.tier(member, at(2026, 1, 5))
    assert view.effective.code == "svip"
    assert view.state.grace_until == datetime(2026, 1, 15, tzinfo=SH)
    assert view.projection.keep_needed == 18_000
    assert view.projection.message == "¥180 more by 14 Jan keeps SVIP; ¥1380 more reaches VIP"
    # ... and an order of ¥180 before then keeps it for 2026.
    await brand.order(member, 18_000, at(2026, 1, 14))
    view = await brand.tier(member, at(2026, 6, 1))
    assert (view.effective.code, view.state.grace_until) == ("svip", None)


# ---- 12: one programme per brand, chosen by setting ---------------------------------------


async def test_the_brand_programme_is_the_configured_one_and_a_switch_starts_from_the_facts(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIERING_PROGRAMME_ID", "plan-30d")
    assert TieringSettings().tiering_programme_id == "plan-30d"

    spend = Brand(db)
    await spend.add_version(version(spend.programme_id, 1, at(2024, 1, 1)))
    member = uuid.uuid4()
    await spend.order(member, 60_000, at(2025, 3, 1))
    assert (await spend.tier(member, at(2025, 3, 2))).effective.code == "svip"

    # The brand switches to an order-count ladder: the member is judged on it
    # from their facts (one order: the base tier), under its own codes.
    stages = Brand(db)
    await stages.add_version(
        TierProgramme(
            stages.programme_id,
            1,
            at(2024, 1, 1),
            QualifyingMetric.ORDER_COUNT,
            1,
            Ladder(
                (
                    Tier("explorer", "探索者", 0, Benefits()),
                    Tier("advanced", "进阶者", 2, Benefits(), retention=1),
                )
            ),
        )
    )
    await stages.order(member, 1_000, at(2025, 3, 3))
    view = await stages.tier(member, at(2025, 3, 4))
    assert (view.programme.programme_id, view.effective.code) == (stages.programme_id, "advanced")
    async with db.reading() as uow:
        row = await repo.tier_row(uow.conn, member)
    assert row is not None and (row["programme_id"], row["tier_code"]) == (
        stages.programme_id,
        "advanced",
    )


# ---- 15: growth actions have a bounded age -----------------------------------------------


async def test_growth_action_older_than_the_bound_is_refused(db: Database) -> None:
    brand = Brand(db)
    brand.handlers = TieringHandlers(
        brand.clock, programme_id=brand.programme_id, growth_max_age=timedelta(hours=48)
    )
    await brand.add_version(version(brand.programme_id, 1, at(2024, 1, 1)))
    brand.clock.now = at(2025, 5, 10)
    member = str(uuid.uuid4())

    async def check_in(ref: str, when: datetime) -> Any:
        async with db.unit_of_work() as uow:
            return await brand.handlers.record_growth_action(uow, member, "check_in", ref, when)

    with pytest.raises(InvalidArgument) as refused:
        await check_in("backfill-1", at(2025, 5, 8, 11))  # 49 hours ago
    assert (refused.value.code, refused.value.field) == ("OCCURRED_AT_TOO_OLD", "occurred_at")
    assert "48 hours" in str(refused.value)
    async with db.reading() as uow:
        written = await uow.conn.fetchval(
            "SELECT count(*) FROM tiering.growth_ledger WHERE member_id = $1", uuid.UUID(member)
        )
    assert written == 0
    award = await check_in("yesterday", at(2025, 5, 9, 9))  # 27 hours ago: accepted
    assert (award.awarded, award.capped) == (5, False)


# ---- 13: relative VIP as a tier mode -----------------------------------------------------


@pytest.mark.parametrize(
    ("spends", "top", "second"),
    [
        # 20 members: the top 15% is at most 3, top + next 45% at most 9.
        ([900, 800, 800, 700, 700, 700, 600, 600, 600, 600] + [100] * 10, 3, 3),
        # A tie straddling the 15% line: all four fall to the next share.
        ([900, 900, 900, 900, 500, 400, 300, 200, 100, 50] + [10] * 10, 0, 9),
        # Exactly at the line: 3 of 20 is 15%, 9 of 20 is 45%.
        (list(range(2000, 0, -100)), 3, 6),
    ],
)
async def test_relative_mode_assigns_exactly_the_shares_ties_included(
    db: Database, spends: list[int], top: int, second: int
) -> None:
    from services.tiering.batch import recompute
    from services.tiering.domain import SegmentRules, TierMode
    from services.tiering.evaluation import relative_ranks

    brand = Brand(db)
    # The top tier's upgrade gift: granted by the batch for each member ranked in.
    gifted = Ladder(
        (
            *DEMO_LADDER.tiers[:2],
            Tier("vip", "VIP", 150_000, Benefits(upgrade_gift_coupon_template="MJ99-30")),
        )
    )
    await brand.add_version(
        version(
            brand.programme_id,
            1,
            at(2024, 1, 1),
            gifted,
            tier_mode=TierMode.RELATIVE,
            segments=SegmentRules(relative_top_pct=15, relative_next_pct=30),
        )
    )
    members = [uuid.uuid4() for _ in spends]
    for member, yuan in zip(members, spends, strict=True):
        await brand.order(member, yuan * 100, at(2025, 5, 1))
    # One member who bought nothing in the window is never ranked.
    idle = uuid.uuid4()
    await brand.order(idle, 100_000, at(2023, 1, 1))
    expected = relative_ranks(dict(zip(members, spends, strict=True)), 15, 30)
    assert sum(r == 2 for r in expected.values()) == top
    assert sum(r == 1 for r in expected.values()) == second

    # Nothing is upgraded by the event path in relative mode: the ranking decides.
    assert (await brand.tier(members[0], at(2025, 5, 2))).effective.code == "regular"
    await recompute(
        db, now=at(2025, 5, 2), chunk_size=7, workers=2, programme_id=brand.programme_id
    )
    async with db.reading() as uow:
        rows = {
            r["member_id"]: r["tier_code"]
            for r in await uow.conn.fetch(
                "SELECT member_id, tier_code FROM tiering.member_tiers WHERE programme_id = $1",
                brand.programme_id,
            )
        }
    codes = {2: "vip", 1: "svip", 0: "regular"}
    assert {m: rows[m] for m in members} == {m: codes[expected[m]] for m in members}
    assert rows[idle] == "regular"
    async with db.reading() as uow:
        gifts = await uow.conn.fetch(
            "SELECT member_id, tier_code FROM tiering.benefit_grants"
            " WHERE member_id = ANY($1::uuid[])",
            members,
        )
    assert sorted(g["member_id"] for g in gifts) == sorted(m for m in members if expected[m] == 2)
    # Ties share a fate: equal spends, equal tiers.
    for n in range(1, len(members)):
        if spends[n] == spends[n - 1]:
            assert rows[members[n]] == rows[members[n - 1]]
    history = await brand.history(members[0])
    if top:
        assert history[-1][1:3] == ("vip", "relative_upgrade")
    view = await brand.tier(members[0], at(2025, 5, 2, 12))
    assert view.projection.message.endswith(
        "tiers go by rank at each nightly ranking (top 15% VIP, next 30% SVIP)"
    )
    # A second run with nothing new changes nothing.
    again = await recompute(
        db, now=at(2025, 5, 2, 13), chunk_size=7, workers=1, programme_id=brand.programme_id
    )
    assert again.tier_changes == 0


# ---- 14: tier benefits issued through rewards ---------------------------------------------


async def test_upgrade_gift_and_birthday_coupon_are_issued_once_through_rewards(
    db: Database, rewards_app: ServiceApp
) -> None:
    from services.rewards.seed import seed_demo as seed_rewards
    from services.tiering.benefits import (
        BenefitDispatcher,
        RewardsCoupons,
        grant_birthdays,
        run_forever,
    )

    async with db.unit_of_work() as uow:
        await seed_rewards(uow.conn)  # the demo coupon templates (MJ99-30, ...)
    gifted = Ladder(
        (
            DEMO_LADDER.tiers[0],
            Tier(
                "svip",
                "SVIP",
                50_000,
                Benefits(
                    12_000,
                    birthday_coupon_template="MJ99-30",
                    upgrade_gift_coupon_template="MJ99-30",
                ),
                retention=30_000,
            ),
            DEMO_LADDER.tiers[2],
        )
    )
    brand = Brand(db)
    programme = version(brand.programme_id, 1, at(2024, 1, 1), gifted)
    await brand.add_version(programme)
    member = uuid.uuid4()
    await brand.order(member, 40_000, at(2025, 3, 1))
    crossing = await brand.order(member, 12_000, at(2025, 3, 2))
    # Undone by a refund and reached again in the same period: still one gift.
    await brand.refund(member, crossing, 12_000, at(2025, 3, 3))
    await brand.order(member, 15_000, at(2025, 3, 4))

    async def grants() -> list[tuple[str, str, str | None]]:
        async with db.reading() as uow:
            rows = await uow.conn.fetch(
                "SELECT kind, status, coupon_id FROM tiering.benefit_grants"
                " WHERE member_id = $1 ORDER BY kind",
                member,
            )
        return [(r["kind"], r["status"], r["coupon_id"]) for r in rows]

    assert await grants() == [("upgrade_gift", "pending", None)]
    coupons = RewardsCoupons(f"127.0.0.1:{rewards_app.port}", 5.0)
    dispatcher = BenefitDispatcher(db, coupons)
    try:
        # (The shared database may hold other tests' pending grants: the
        # assertions are about this member's.)
        await dispatcher.run_once(at(2025, 3, 5))
        [(kind, status, coupon_id)] = await grants()
        assert (kind, status) == ("upgrade_gift", "issued") and coupon_id
        await dispatcher.run_once(at(2025, 3, 6))  # nothing of this member's left to send
        assert await grants() == [("upgrade_gift", "issued", coupon_id)]
        # A retry after a lost answer carries the same key: rewards replays it.
        key = f"upgrade_gift:{member}:{brand.programme_id}:svip:2025-01-01"
        again = await coupons.issue(key, str(member), "MJ99-30")
        assert (again.status, again.coupon_id) == ("issued", coupon_id)

        # The birthday coupon: in the birthday month, once a year.
        payload = events_pb2.BirthdaySet(member_id=str(member), month=7, day=9)
        async with db.unit_of_work() as uow:
            await brand.handlers.on_birthday_set(uow, received("member", payload, member))
        async with db.unit_of_work() as uow:
            assert await grant_birthdays(uow.conn, programme, at(2025, 6, 30)) == 0
            assert await grant_birthdays(uow.conn, programme, at(2025, 7, 1, 9)) == 1
            assert await grant_birthdays(uow.conn, programme, at(2025, 7, 20)) == 0
        await dispatcher.run_once(at(2025, 7, 1, 10))
        issued = await grants()
        assert [(k, s) for k, s, _ in issued] == [
            ("birthday", "issued"),
            ("upgrade_gift", "issued"),
        ]
        assert issued[0][2] and issued[0][2] != coupon_id

        # The service's loop sends what the event path grants; here an upgrade
        # by an offline order replayed late (a `late_order` change).
        other = uuid.uuid4()
        await brand.order(other, 40_000, at(2025, 3, 10))
        await brand.order(other, 20_000, at(2025, 3, 8))
        assert [h[1:3] for h in await brand.history(other)] == [("svip", "late_order")]
        loop = asyncio.create_task(
            run_forever(db, dispatcher, brand.programme_id, lambda: at(2025, 3, 11), 0.05)
        )

        async def sent() -> bool:
            async with db.reading() as uow:
                status = await uow.conn.fetchval(
                    "SELECT status FROM tiering.benefit_grants WHERE member_id = $1", other
                )
            return bool(status == "issued")

        try:
            await eventually(sent)
        finally:
            # Stopped and awaited: no turn of the loop outlives the test.
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop

        # Erasure forgets the grants (the coupons are rewards' to anonymise).
        erased = events_pb2.MemberErased(member_ids=[str(member)])
        async with db.unit_of_work() as uow:
            await brand.handlers.on_member_erased(uow, received("member", erased, member))
        assert await grants() == []
    finally:
        await coupons.close()


@pytest.fixture
async def own_db(infra: Infra) -> AsyncIterator[Database]:
    """A database of the test's own (tiering's schema): a programme switch
    re-judges every member a database holds."""
    name = f"loyalty_test_switch_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(infra.admin_url, name)
    await asyncio.to_thread(upgrade, "tiering", url)
    pool = await create_pool(url, 1, 4)
    database = Database(pool, "tiering", "tiering")
    yield database
    await database.close()
    admin = await asyncpg.connect(asyncpg_dsn(infra.admin_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_recompute_switch_programme_judges_every_member_under_the_new_one(
    own_db: Database,
) -> None:
    from services.tiering.batch import recompute

    spend = Brand(own_db)
    await spend.add_version(version(spend.programme_id, 1, at(2024, 1, 1)))
    members = [uuid.uuid4() for _ in range(3)]
    for n, member in enumerate(members):
        for k in range(n + 1):
            await spend.order(member, 60_000, at(2025, 3, 1 + k))
    stages = Brand(own_db)
    await stages.add_version(
        TierProgramme(
            stages.programme_id,
            1,
            at(2024, 1, 1),
            QualifyingMetric.ORDER_COUNT,
            1,
            Ladder(
                (
                    Tier("explorer", "探索者", 0, Benefits()),
                    Tier("advanced", "进阶者", 2, Benefits(), retention=1),
                    Tier("expert", "达人", 3, Benefits(), retention=1),
                )
            ),
        )
    )

    async def rows() -> dict[uuid.UUID, tuple[str, str]]:
        async with own_db.reading() as uow:
            found = await uow.conn.fetch(
                "SELECT member_id, programme_id, tier_code FROM tiering.member_tiers"
            )
        return {r["member_id"]: (r["programme_id"], r["tier_code"]) for r in found}

    before = await rows()
    # Without the switch, another programme's rows are not touched.
    await recompute(own_db, now=at(2025, 3, 10), programme_id=stages.programme_id)
    assert await rows() == before
    run = await recompute(
        own_db, now=at(2025, 3, 10), programme_id=stages.programme_id, switch_programme=True
    )
    assert await rows() == {
        members[0]: (stages.programme_id, "explorer"),
        members[1]: (stages.programme_id, "advanced"),
        members[2]: (stages.programme_id, "expert"),
    }
    assert run.tier_changes == 3  # svip -> explorer, vip -> advanced, vip -> expert
    assert [h[1:3] for h in await stages.history(members[2])][-1] == ("expert", "programme_change")
    async with own_db.reading() as uow:
        events = await uow.conn.fetchval(
            "SELECT count(*) FROM tiering.outbox WHERE event_type = 'loyalty.events.v1.TierChanged'"
        )
    assert events >= 3 + 3  # the upgrades by the event path, then the switch
    again = await recompute(
        own_db, now=at(2025, 3, 10, 13), programme_id=stages.programme_id, switch_programme=True
    )
    assert again.tier_changes == 0
