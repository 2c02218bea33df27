"""Guides follows MemberUnmerged (issue 20): what a OneID merge moved here
(WeCom contacts, attributed orders, notes, tags, the exclusive guide) goes
back to the restored member, exactly that and no more, and a second copy of
the event moves nothing. On the real database, with a pinned clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from servicekit.events import ReceivedEvent, make_envelope
from services.guides.handlers import GuidesHandlers

from ..harness import Infra, ServiceClock
from .guides_support import guides_handlers

T0 = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def clock() -> ServiceClock:
    return ServiceClock()


@pytest.fixture(scope="module")
async def guides(
    infra: Infra, clock: ServiceClock
) -> AsyncIterator[tuple[GuidesHandlers, Database]]:
    async with guides_handlers(infra, clock) as pair:
        yield pair


def received(payload: object, member_id: str) -> ReceivedEvent:
    # A fresh envelope (event id) each time: what a redelivery after a replay carries.
    envelope = make_envelope("member", payload, member_id)  # type: ignore[arg-type]
    return ReceivedEvent("s", "0-1", envelope, payload)  # type: ignore[arg-type]


async def merge(
    h: GuidesHandlers, db: Database, merge_id: str, survivor: uuid.UUID, absorbed: uuid.UUID
) -> None:
    payload = events_pb2.MemberMerged(
        merge_id=merge_id,
        survivor_member_id=str(survivor),
        absorbed_member_id=str(absorbed),
        rule="identify:phone",
    )
    async with db.unit_of_work() as uow:
        await h.on_member_merged(uow, received(payload, str(survivor)))


async def unmerge(
    h: GuidesHandlers, db: Database, merge_id: str, survivor: uuid.UUID, restored: uuid.UUID
) -> None:
    payload = events_pb2.MemberUnmerged(
        merge_id=merge_id, survivor_member_id=str(survivor), restored_member_id=str(restored)
    )
    async with db.unit_of_work() as uow:
        await h.on_member_unmerged(uow, received(payload, str(survivor)))


async def state(db: Database, member: uuid.UUID) -> dict[str, object]:
    """What guides holds for one member."""
    async with db.reading() as uow:
        c = uow.conn
        binding = await c.fetchrow(
            "SELECT staff_id, bound_at FROM guides.bindings WHERE member_id = $1", member
        )
        return {
            "contacts": sorted(
                r["external_userid"]
                for r in await c.fetch(
                    "SELECT external_userid FROM guides.contacts WHERE member_id = $1", member
                )
            ),
            "orders": sorted(
                str(r["order_id"])
                for r in await c.fetch(
                    "SELECT order_id FROM guides.orders WHERE member_id = $1", member
                )
            ),
            "notes": sorted(
                r["text"]
                for r in await c.fetch("SELECT text FROM guides.notes WHERE member_id = $1", member)
            ),
            "tags": sorted(
                (r["tag"], r["source"])
                for r in await c.fetch(
                    "SELECT tag, source FROM guides.member_tags WHERE member_id = $1", member
                )
            ),
            "guide": (binding["staff_id"], binding["bound_at"]) if binding else None,
        }


async def seed_member(
    db: Database, member: uuid.UUID, contact: str, order_id: uuid.UUID, note: str
) -> None:
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            "INSERT INTO guides.contacts (external_userid, member_id) VALUES ($1, $2)",
            contact,
            member,
        )
        await uow.conn.execute(
            "INSERT INTO guides.orders (order_id, member_id, store_id, channel, paid_amount_fen,"
            " ordered_at, categories, staff_id, attributed_store_id, rule, day)"
            " VALUES ($1, $2, 'SH001', 'store', 3200, $3, '[]', '', '', '', $4)",
            order_id,
            member,
            T0,
            T0.date(),
        )
        await uow.conn.execute(
            "INSERT INTO guides.notes (member_id, staff_id, text, created_at)"
            " VALUES ($1, 'g', $2, $3)",
            member,
            note,
            T0,
        )


async def test_an_unmerge_moves_back_exactly_what_the_merge_moved(
    guides: tuple[GuidesHandlers, Database], clock: ServiceClock
) -> None:
    h, db = guides
    t = uuid.uuid4().hex[:8]
    first_guide, second_guide, later_guide = f"g1-{t}", f"g2-{t}", f"g3-{t}"
    survivor, absorbed = uuid.uuid4(), uuid.uuid4()
    with clock.pinned(T0):
        async with db.unit_of_work() as uow:
            for staff, store in (
                (first_guide, "SH001"),
                (second_guide, "SH002"),
                (later_guide, "SH003"),
            ):
                await h.upsert_staff(uow, staff, "导购", store, "guide", "", "op")
    # The absorbed member bound first (so the merged person keeps its guide).
    with clock.pinned(T0 + timedelta(minutes=1)):
        async with db.unit_of_work() as uow:
            await h.reassign_guide(uow, str(absorbed), first_guide, "op", "")
    with clock.pinned(T0 + timedelta(minutes=2)):
        async with db.unit_of_work() as uow:
            await h.reassign_guide(uow, str(survivor), second_guide, "op", "")
            await h.set_tag(uow, str(absorbed), "夜猫子", True, "op")
            await h.set_tag(uow, str(absorbed), "会员日", True, "op")
            await h.set_tag(uow, str(survivor), "会员日", True, "op")
            await h.set_tag(uow, str(survivor), "咖啡控", True, "op")
    await seed_member(db, absorbed, f"wa-{t}", uuid.uuid4(), f"absorbed-{t}")
    await seed_member(db, survivor, f"ws-{t}", uuid.uuid4(), f"survivor-{t}")
    before = {m: await state(db, m) for m in (survivor, absorbed)}
    merge_id = str(uuid.uuid4())

    with clock.pinned(T0 + timedelta(days=1)):
        await merge(h, db, merge_id, survivor, absorbed)
    merged = await state(db, survivor)
    assert merged["contacts"] == sorted([f"wa-{t}", f"ws-{t}"])
    assert merged["guide"] is not None and merged["guide"][0] == first_guide  # type: ignore[index]
    assert ("夜猫子", "manual") in merged["tags"]  # type: ignore[operator]
    assert await state(db, absorbed) == {
        "contacts": [],
        "orders": [],
        "notes": [],
        "tags": [],
        "guide": None,
    }
    # After the merge, the survivor gains a contact of its own: it stays.
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            "INSERT INTO guides.contacts (external_userid, member_id) VALUES ($1, $2)",
            f"wn-{t}",
            survivor,
        )

    with clock.pinned(T0 + timedelta(days=2)):
        await unmerge(h, db, merge_id, survivor, absorbed)
    after = {m: await state(db, m) for m in (survivor, absorbed)}
    assert after[absorbed] == before[absorbed]
    assert after[survivor] == before[survivor] | {"contacts": sorted([f"wn-{t}", f"ws-{t}"])}

    # A second copy of the event (replayed after a gap) moves nothing.
    async with db.reading() as uow:
        history = await uow.conn.fetchval(
            "SELECT count(*) FROM guides.binding_history WHERE member_id = ANY($1::uuid[])",
            [survivor, absorbed],
        )
    with clock.pinned(T0 + timedelta(days=3)):
        await unmerge(h, db, merge_id, survivor, absorbed)
    assert {m: await state(db, m) for m in (survivor, absorbed)} == after
    async with db.reading() as uow:
        assert (
            await uow.conn.fetchval(
                "SELECT count(*) FROM guides.binding_history WHERE member_id = ANY($1::uuid[])",
                [survivor, absorbed],
            )
            == history
        )


async def test_a_guide_the_merge_gave_a_guideless_survivor_is_taken_back(
    guides: tuple[GuidesHandlers, Database], clock: ServiceClock
) -> None:
    h, db = guides
    t = uuid.uuid4().hex[:8]
    guide = f"g-{t}"
    survivor, absorbed = uuid.uuid4(), uuid.uuid4()
    with clock.pinned(T0):
        async with db.unit_of_work() as uow:
            await h.upsert_staff(uow, guide, "导购", "SH001", "guide", "", "op")
            await h.reassign_guide(uow, str(absorbed), guide, "op", "")
    merge_id = str(uuid.uuid4())
    with clock.pinned(T0 + timedelta(hours=1)):
        await merge(h, db, merge_id, survivor, absorbed)
    assert (await state(db, survivor))["guide"] is not None
    with clock.pinned(T0 + timedelta(hours=2)):
        await unmerge(h, db, merge_id, survivor, absorbed)
    assert (await state(db, survivor))["guide"] is None
    assert (await state(db, absorbed))["guide"] == (guide, T0)
