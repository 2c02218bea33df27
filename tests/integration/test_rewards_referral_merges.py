"""Referral and mall state follows OneID merges, against real PostgreSQL.

Rewards records MemberMerged / MemberUnmerged (through its consumer's
handlers, as delivered) and resolves members through the merges in force: an
absorbed member's invite code credits the survivor, a person is referred and
rewarded for a first order once whatever ids it had, a merge that reveals a
self-referral grants nothing more, per-person caps and mall limits count every
merged id, reports count people; an unmerge gives everything back.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from servicekit.errors import Conflict, DomainError
from servicekit.events import ReceivedEvent, make_envelope
from servicekit.protos import timestamp
from services.rewards import merges
from services.rewards.consumers import MemberEvents
from services.rewards.points.handlers import PointsLedger
from services.rewards.referral import repository as repo

from .test_rewards_mall import Mall
from .test_rewards_referral import NOW, Programme, new_member


async def merge(db: Database, survivor: str, absorbed: str) -> str:
    merge_id = str(uuid.uuid4())
    payload = events_pb2.MemberMerged(
        merge_id=merge_id,
        survivor_member_id=survivor,
        absorbed_member_id=absorbed,
        merged_at=timestamp(NOW),
    )
    event = ReceivedEvent("test", "1-0", make_envelope("member", payload, survivor), payload)
    for _ in range(2):  # a redelivery changes nothing
        async with db.unit_of_work() as uow:
            await MemberEvents(PointsLedger()).on_merged(uow, event)
    return merge_id


async def unmerge(db: Database, merge_id: str, survivor: str, restored: str) -> None:
    payload = events_pb2.MemberUnmerged(
        merge_id=merge_id,
        survivor_member_id=survivor,
        restored_member_id=restored,
        unmerged_at=timestamp(NOW + timedelta(hours=1)),
    )
    event = ReceivedEvent("test", "2-0", make_envelope("member", payload, survivor), payload)
    async with db.unit_of_work() as uow:
        await MemberEvents(PointsLedger()).on_unmerged(uow, event)


async def holder(db: Database, member: str) -> str:
    async with db.unit_of_work() as uow:
        return str(await merges.holder_of(uow.conn, uuid.UUID(member)))


async def invitees_of(p: Programme, inviter: str) -> set[str]:
    async with p.db.unit_of_work() as uow:
        views, _ = await p.referrals.list_of_inviter(uow, inviter, None, 50)
    return {v.invitee_id for v in views}


async def test_an_absorbed_members_code_credits_the_survivor_until_unmerged(db: Database) -> None:
    p, absorbed, survivor = Programme(db), new_member(), new_member()
    shared = await p.code(absorbed)
    merge_id = await merge(db, survivor, absorbed)
    assert await holder(db, absorbed) == survivor

    # The survivor never asked for a code: the person's code is the one it shared.
    assert await p.code(survivor) == shared
    x = new_member()
    await p.accept(x, shared)
    assert await invitees_of(p, survivor) == {x}

    await unmerge(db, merge_id, survivor, absorbed)
    assert await holder(db, absorbed) == absorbed
    # The referral went back with the code; the survivor now gets its own code.
    assert await invitees_of(p, absorbed) == {x}
    assert await invitees_of(p, survivor) == set()
    assert await p.code(survivor) != shared


async def test_a_person_is_referred_once_and_rewarded_for_one_first_order(
    db: Database, conn: asyncpg.Connection
) -> None:
    p = Programme(db)
    inviter_1, inviter_2, person, alias = (new_member() for _ in range(4))
    first = await p.accept(person, await p.code(inviter_1))
    await p.accept(alias, await p.code(inviter_2))
    await merge(db, person, alias)

    # Another invite for the merged person: already referred, whatever the id.
    with pytest.raises(Conflict) as caught:
        await p.accept(person, await p.code(new_member()))
    assert caught.value.code == "ALREADY_REFERRED"

    # Orders under the merged person: the first referral's first-order step, once.
    granted = await p.order_event(person, await p.order(person))
    assert granted is not None and granted.referral_id == first.referral_id
    assert await p.order_event(person, await p.order(person)) is None
    first_orders = await conn.fetchval(
        "SELECT count(*) FROM rewards.referrals WHERE invitee_id = ANY($1::uuid[])"
        " AND first_order_id IS NOT NULL",
        [uuid.UUID(person), uuid.UUID(alias)],
    )
    assert first_orders == 1


async def test_an_absorbed_invitees_first_order_rewards_the_survivor(db: Database) -> None:
    p, inviter, survivor, absorbed = Programme(db), new_member(), new_member(), new_member()
    await p.accept(absorbed, await p.code(inviter))
    await merge(db, survivor, absorbed)
    granted = await p.order_event(survivor, await p.order(survivor))
    assert granted is not None
    invitee_rewards = [r for r in granted.rewards if r.step == "first_order"]
    assert {(r.role, r.member_id, r.status) for r in invitee_rewards} == {
        ("inviter", inviter, "granted"),
        ("invitee", survivor, "granted"),
    }


async def test_a_merge_that_reveals_a_self_referral_grants_nothing_more(db: Database) -> None:
    p, inviter, second_account = Programme(db), new_member(), new_member()
    original = await p.accept(second_account, await p.code(inviter))
    # The invitee turns out to be the inviter's own second account.
    await merge(db, inviter, second_account)
    refused = await p.order_event(inviter, await p.order(inviter))
    assert refused is not None
    steps = [r for r in refused.rewards if r.step == "first_order"]
    assert {r.status for r in steps} == {"refused"}
    assert {r.refusals[0]["code"] for r in steps} == {"SELF_REFERRAL"}
    assert not any(r.points for r in steps)
    # Accepting the person's own code again links nothing new.
    again = await p.accept(inviter, await p.code(second_account))
    assert again.replayed and again.referral_id == original.referral_id
    # Nor anyone else's: the merged person is already referred.
    with pytest.raises(DomainError) as caught:
        await p.accept(inviter, await p.code(new_member()))
    assert caught.value.code == "ALREADY_REFERRED"


async def test_the_inviter_cap_counts_every_merged_id(db: Database) -> None:
    survivor, absorbed = uuid.uuid4(), uuid.uuid4()
    period = NOW.replace(day=1, hour=0)
    async with db.unit_of_work() as uow:
        assert await repo.count_inviter_reward(uow.conn, [absorbed], period, 3)
        assert await repo.count_inviter_reward(uow.conn, [absorbed], period, 3)
    await merge(db, str(survivor), str(absorbed))
    async with db.unit_of_work() as uow:
        person = await merges.person_of(uow.conn, absorbed)
        assert person == [survivor, absorbed]
        # Two before the merge + one now = the cap of 3; the fourth is refused.
        assert await repo.count_inviter_reward(uow.conn, person, period, 3)
        assert not await repo.count_inviter_reward(uow.conn, person, period, 3)


async def test_mall_limits_and_history_are_per_person(db: Database) -> None:
    mall, survivor, absorbed = Mall(db), new_member(), new_member()
    item = await mall.item(per_member_limit=2, points_price=5)
    await mall.credit(absorbed, 100)
    await mall.credit(survivor, 100)
    first = await mall.exchange(absorbed, item, "before-merge-1")
    await mall.exchange(absorbed, item, "before-merge-2")
    merge_id = await merge(db, survivor, absorbed)

    with pytest.raises(DomainError) as caught:
        await mall.exchange(survivor, item, "after-merge")
    assert caught.value.code == "MALL_MEMBER_LIMIT_REACHED"
    async with db.unit_of_work() as uow:
        history, _ = await mall.mall.exchanges_of(uow, survivor, None, 10)
    assert first.exchange_id in {e.exchange_id for e in history}

    await unmerge(db, merge_id, survivor, absorbed)
    # Apart again: the survivor's own allowance is untouched.
    await mall.exchange(survivor, item, "after-unmerge")


async def test_fission_counts_people_not_ids(db: Database) -> None:
    p = Programme(db)
    start = NOW - timedelta(minutes=1)
    end = NOW + timedelta(minutes=1)
    async with db.unit_of_work() as uow:
        before = await p.referrals.fission(uow, start, end)
    main_id, alias = new_member(), new_member()
    await p.accept(new_member(), await p.code(main_id))
    await p.accept(new_member(), await p.code(alias))
    async with db.unit_of_work() as uow:
        apart = await p.referrals.fission(uow, start, end)
    await merge(db, main_id, alias)
    async with db.unit_of_work() as uow:
        merged = await p.referrals.fission(uow, start, end)
    assert apart.inviters - before.inviters == 2
    assert merged.inviters - before.inviters == 1
    assert merged.invitees - before.invitees == 2
