"""The POS badge (GetMemberTierBadge) against real PostgreSQL, through the real
handlers on a programme of the test's own with an injected clock: it answers
what the member centre's full view answers, from the tier row and M(now) while
no boundary has passed, and from the facts otherwise (a member never
evaluated, a period end, a version published after its cache was filled)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime

import pytest

from loyalty.tiering.v1 import tiering_pb2
from servicekit.db import Database, create_pool
from services.tiering.handlers import TierBadge
from services.tiering.servicer import TieringServicer

from ..harness import Infra
from .test_tiering_corners import DEMO_LADDER, Brand, at, version


@pytest.fixture(scope="module")
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 4)
    database = Database(pool, "tiering", "tiering")
    yield database
    await database.close()


async def badge(brand: Brand, member: uuid.UUID, when: datetime) -> TierBadge:
    brand.clock.now = when
    async with brand.db.reading() as uow:
        found = await brand.handlers.member_tier_badge(uow, str(member))
    full = await brand.tier(member, when)
    # The same answer as the member centre's, whichever way it was reached.
    assert (found.tier, found.programme_version) == (full.effective, full.programme.version)
    return found


async def test_badge_answers_what_the_full_view_answers(db: Database) -> None:
    brand = Brand(db)
    await brand.add_version(version(brand.programme_id, 1, at(2024, 1, 1), grace_days=30))
    member = uuid.uuid4()
    # Never evaluated and no facts: the base tier, without the full view.
    never = await badge(brand, member, at(2025, 2, 1))
    assert (never.tier.code, never.quick) == ("regular", True)
    # A fact the consumer has not evaluated yet (no tier row): the full view.
    raw = uuid.uuid4()
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            "INSERT INTO tiering.orders (order_id, member_id, ordered_at, paid_fen, growth)"
            " VALUES ($1, $2, $3, 60000, 600)",
            f"raw-{uuid.uuid4()}",
            raw,
            at(2025, 1, 20),
        )
    pending = await badge(brand, raw, at(2025, 2, 1))
    assert (pending.tier.code, pending.quick) == ("svip", False)

    await brand.order(member, 60_000, at(2025, 3, 1))
    mid = await badge(brand, member, at(2025, 3, 2))
    assert (mid.tier.code, mid.quick) == ("svip", True)

    # A fact in the table the tier row has not seen yet counts at once
    # (M(now) is read with the row).
    async with db.unit_of_work() as uow:
        await uow.conn.execute(
            "INSERT INTO tiering.orders (order_id, member_id, ordered_at, paid_fen, growth)"
            " VALUES ($1, $2, $3, 100000, 1000)",
            f"raw-{uuid.uuid4()}",
            member,
            at(2025, 3, 3),
        )
    seen = await badge(brand, member, at(2025, 3, 4))
    assert (seen.tier.code, seen.quick) == ("vip", True)

    # The period ended (calendar year): retention is judged from the facts.
    judged = await badge(brand, member, at(2026, 1, 2))
    assert (judged.tier.code, judged.quick) == ("vip", False)


async def test_a_version_published_after_the_cache_was_filled_is_seen(db: Database) -> None:
    brand = Brand(db)
    await brand.add_version(version(brand.programme_id, 1, at(2024, 1, 1)))
    member = uuid.uuid4()
    await brand.order(member, 160_000, at(2025, 3, 1))
    assert (await badge(brand, member, at(2025, 3, 2))).tier.code == "vip"
    # v2 renames the top tier from 1 June; the badge's cached versions lack it.
    renamed = replace(DEMO_LADDER.tiers[2], code="black", name="黑金")
    ladder = replace(DEMO_LADDER, tiers=(*DEMO_LADDER.tiers[:2], renamed))
    await brand.add_version(version(brand.programme_id, 2, at(2025, 6, 1, 0), ladder))
    after = await badge(brand, member, at(2025, 6, 2))
    assert (after.tier.code, after.programme_version) == ("black", 2)
    # Reloaded: the next read knows both versions.
    assert (await badge(brand, member, at(2025, 6, 3))).tier.name == "黑金"


async def test_the_servicer_replies_with_code_name_and_version(db: Database) -> None:
    brand = Brand(db)
    await brand.add_version(version(brand.programme_id, 1, at(2024, 1, 1)))
    member = uuid.uuid4()
    await brand.order(member, 60_000, at(2025, 3, 1))
    brand.clock.now = at(2025, 3, 2)
    servicer = TieringServicer(db, brand.handlers)
    reply = await servicer.GetMemberTierBadge(
        tiering_pb2.GetMemberTierRequest(member_id=str(member)),
        None,  # type: ignore[arg-type]
    )
    assert (reply.member_id, reply.tier_code, reply.tier_name, reply.programme_version) == (
        str(member),
        "svip",
        "SVIP",
        1,
    )
