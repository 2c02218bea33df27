"""Rule tags on generated orders (the incremental path on each order event
equals the nightly batch, and both equal the pure rules), and the
private-domain funnel report, on the real database with a pinned clock."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from servicekit.events import ReceivedEvent, make_envelope
from servicekit.protos import timestamp
from services.guides import domain
from services.guides import repository as repo
from services.guides import tag_repository as tag_repo
from services.guides.handlers import GuidesHandlers

from ..harness import Infra, ServiceClock
from .guides_support import guides_handlers

NOW = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
TZ = ZoneInfo("Asia/Shanghai")
CATEGORIES = ["fruit_tea", "milk_tea", "coffee", "lemon_tea"]
STORES = ["SH001", "SH002", "SH003"]
CHANNELS = [common_pb2.CHANNEL_STORE, common_pb2.CHANNEL_MINI_PROGRAM, common_pb2.CHANNEL_DELIVERY]


@pytest.fixture(scope="module")
def clock() -> ServiceClock:
    return ServiceClock()


@pytest.fixture(scope="module")
async def handlers(
    infra: Infra, clock: ServiceClock
) -> AsyncIterator[tuple[GuidesHandlers, Database]]:
    async with guides_handlers(infra, clock) as pair:
        yield pair


def _event(payload: object, member_id: str) -> ReceivedEvent:
    envelope = make_envelope("rewards", payload, member_id)  # type: ignore[arg-type]
    return ReceivedEvent("s", "0-1", envelope, payload)  # type: ignore[arg-type]


def _order(rng: random.Random, member_id: str) -> events_pb2.OrderCompleted:
    at = NOW - timedelta(days=rng.randint(0, 120), minutes=rng.randint(0, 24 * 60))
    lines = [
        events_pb2.OrderCompletedLine(
            sku=f"S{n}",
            category=rng.choice(CATEGORIES),
            quantity=rng.randint(1, 3),
            paid_amount_fen=500,
        )
        for n in range(rng.randint(0, 3))
    ]
    return events_pb2.OrderCompleted(
        order_id=str(uuid.uuid4()),
        member_id=member_id,
        store_id=rng.choice(STORES),
        channel=rng.choice(CHANNELS),
        paid_amount_fen=rng.choice([900, 1500, 2200, 2800, 3500, 4200]),
        ordered_at=timestamp(at),
        lines=lines,
    )


async def _rule_tags(db: Database, member_ids: list[uuid.UUID]) -> dict[uuid.UUID, set[str]]:
    async with db.reading() as uow:
        return {
            m: {r["tag"] for r in await tag_repo.tags_of(uow.conn, m) if r["source"] == "rule"}
            for m in member_ids
        }


async def test_incremental_rule_tags_equal_the_batch_and_the_rules(
    handlers: tuple[GuidesHandlers, Database], clock: ServiceClock
) -> None:
    h, db = handlers
    rng = random.Random(20260630)
    members = [uuid.uuid4() for _ in range(40)]
    sent: dict[uuid.UUID, list[events_pb2.OrderCompleted]] = {m: [] for m in members}
    with clock.pinned(NOW):
        for _ in range(300):
            m = rng.choice(members)
            order = _order(rng, str(m))
            sent[m].append(order)
            async with db.unit_of_work() as uow:
                await h.on_order_completed(uow, _event(order, str(m)))
        # Some orders refunded in full: they stop counting.
        refunded: set[str] = set()
        for m in members[:10]:
            if sent[m]:
                order = sent[m][0]
                refunded.add(order.order_id)
                refund = events_pb2.OrderRefunded(
                    refund_id=str(uuid.uuid4()),
                    order_id=order.order_id,
                    member_id=str(m),
                    refunded_amount_fen=order.paid_amount_fen,
                    refunded_at=timestamp(NOW),
                )
                async with db.unit_of_work() as uow:
                    await h.on_order_refunded(uow, _event(refund, str(m)))
        incremental = await _rule_tags(db, members)

        expected = {}
        for m in members:
            facts = [
                domain.OrderFact(
                    o.order_id, o.store_id,
                    {1: "store", 2: "mini_program", 3: "delivery"}[o.channel],
                    o.paid_amount_fen, o.ordered_at.ToDatetime(tzinfo=UTC),
                    tuple(_cats(o)),
                )
                for o in sent[m]
                if o.order_id not in refunded
                and NOW - o.ordered_at.ToDatetime(tzinfo=UTC) <= timedelta(days=90)
            ]  # fmt: skip
            expected[m] = set(domain.rule_tags(facts, TZ, h.tag_rules))
        assert incremental == expected
        assert sum(1 for tags in expected.values() if tags) > 20, "the data exercises the rules"

        # Forget them, and let the batch rebuild: the same tags.
        async with db.unit_of_work() as uow:
            await uow.conn.execute(
                "DELETE FROM guides.member_tags WHERE source = 'rule' AND member_id = ANY($1::uuid[])",
                members,
            )
        result = await h.run_tag_batch(db)
        assert result.members >= len([m for m in members if expected[m]])
        assert await _rule_tags(db, members) == expected

    # A year later nothing is recent: the batch takes every rule tag away.
    with clock.pinned(NOW + timedelta(days=365)):
        await h.run_tag_batch(db)
        assert all(not tags for tags in (await _rule_tags(db, members)).values())


def _cats(o: events_pb2.OrderCompleted) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for line in o.lines:
        out[line.category] = out.get(line.category, 0) + line.quantity
    return sorted(out.items())


async def test_funnel_by_store_guide_and_channel(
    handlers: tuple[GuidesHandlers, Database], clock: ServiceClock
) -> None:
    h, db = handlers
    day = datetime(2026, 7, 15, 2, 0, tzinfo=UTC)
    store = f"F{uuid.uuid4().hex[:6]}"
    guide = repo.StaffRow(
        f"fg{uuid.uuid4().hex[:6]}",
        "导购",
        store,
        "guide",
        "active",
        f"FC{uuid.uuid4().hex[:6]}",
        "t",
        day,
    )
    async with db.unit_of_work() as uow:
        await repo.upsert_staff(uow.conn, guide)
    channel = f"poster-{uuid.uuid4().hex[:6]}"
    members = [uuid.uuid4() for _ in range(5)]
    with clock.pinned(day):
        for n, m in enumerate(members):
            async with db.unit_of_work() as uow:
                reg = events_pb2.MemberRegistered(
                    member_id=str(m), source=channel, registered_at=timestamp(day)
                )
                await h.on_member_registered(uow, _event(reg, str(m)))
                if n < 3:  # three added on WeCom by the guide
                    await h._bind_first(uow, m, guide, day)
                for k in range([0, 2, 1, 1, 0][n]):  # orders: 0, 2, 1, 1, 0
                    order = events_pb2.OrderCompleted(
                        order_id=str(uuid.uuid4()), member_id=str(m), store_id=store,
                        paid_amount_fen=1000, ordered_at=timestamp(day + timedelta(hours=k + 1)),
                    )  # fmt: skip
                    await h.on_order_completed(uow, _event(order, str(m)))
        async with db.reading() as uow:
            by_channel = await h.funnel_report(uow, "2026-07-15", "2026-07-15", "channel")
            by_guide = await h.funnel_report(uow, "2026-07-15", "2026-07-15", "guide")
            by_store = await h.funnel_report(uow, "2026-07-15", "2026-07-15", "store")
            before = await h.funnel_report(uow, "2026-07-14", "2026-07-14", "channel")
    row = {r["grp"]: r for r in by_channel}[channel]
    assert (row["registered"], row["added"], row["first_order"], row["repurchased"]) == (5, 3, 3, 1)
    g = {r["grp"]: r for r in by_guide}[guide.staff_id]
    assert (g["registered"], g["added"], g["first_order"], g["repurchased"]) == (3, 3, 2, 1)
    assert {r["grp"]: r for r in by_store}[store]["registered"] == 3
    assert channel not in {r["grp"] for r in before}


async def test_a_journey_tag_the_model_cannot_hold_is_audited_not_retried(
    handlers: tuple[GuidesHandlers, Database],
) -> None:
    h, db = handlers
    member = str(uuid.uuid4())
    async with db.unit_of_work() as uow:
        await h.on_journey_tagged(
            uow, _event(events_pb2.JourneyTagged(member_id=member, tag="x" * 40), member)
        )
        await h.on_journey_tagged(
            uow, _event(events_pb2.JourneyTagged(member_id=member, tag="早鸟"), member)
        )
    async with db.reading() as uow:
        tags = await tag_repo.tags_of(uow.conn, uuid.UUID(member))
        refused = await uow.conn.fetchval(
            "SELECT detail->>'code' FROM guides.audit WHERE subject = $1 AND action = 'tag_refused'",
            f"member:{member}",
        )
    assert [(t["tag"], t["source"]) for t in tags] == [("早鸟", "journey")]
    assert refused == "INVALID_TAG"


async def test_an_order_delivered_again_changes_no_funnel_and_the_tag_refresh_holds_the_lock(
    handlers: tuple[GuidesHandlers, Database], clock: ServiceClock
) -> None:
    """The order and its funnel step are one statement (issue 19): the same
    order again is no repurchase, the next one is; and the member's lock,
    taken with the binding's read, is the same lock (key) that lock_member
    takes, held to the end of the transaction."""
    h, db = handlers
    m = uuid.uuid4()
    day = datetime(2026, 7, 20, 2, 0, tzinfo=UTC)

    def order(k: int) -> events_pb2.OrderCompleted:
        return events_pb2.OrderCompleted(
            order_id=str(uuid.UUID(int=m.int ^ k)), member_id=str(m), store_id="SH001",
            paid_amount_fen=1000, ordered_at=timestamp(day + timedelta(hours=k)),
        )  # fmt: skip

    async def funnel() -> tuple[object, object]:
        row = await db.pool.fetchrow(
            "SELECT first_order_id, repurchased_at FROM guides.funnel WHERE member_id = $1", m
        )
        return (row["first_order_id"], row["repurchased_at"])

    with clock.pinned(day + timedelta(days=1)):
        for _ in range(2):
            async with db.unit_of_work() as uow:
                await h.on_order_completed(uow, _event(order(1), str(m)))
        assert await funnel() == (uuid.UUID(int=m.int ^ 1), None)
        async with db.unit_of_work() as uow:
            await h.on_order_completed(uow, _event(order(2), str(m)))
            async with db.pool.acquire() as other, other.transaction():
                taken = await other.fetchval(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended($1::text, 7))", str(m)
                )
            assert taken is False
    assert await funnel() == (uuid.UUID(int=m.int ^ 1), day + timedelta(hours=2))
