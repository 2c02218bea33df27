"""The birthday-month entry: member publishes BirthdaySet (month and day, never
the year), engagement keeps a small projection, and a daily difference enters
the members whose birthday month has started, once per month, on the local
day (Asia/Shanghai), with a controllable clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.db import Database
from servicekit.errors import InvalidArgument
from servicekit.server import ServiceApp
from services.engagement.domain import FakeClock, QuietHours
from tests.harness import Infra, eventually

from .test_engagement_journeys import Env, _pause_all, db, make_env, send
from .test_member_oneid import CARD, ident, identify, member_stream, tag

__all__ = ["db"]  # the module-scoped pool fixture, shared with the journeys tests

# 2030-02-28 23:30 in Shanghai: the last evening before March starts locally.
EVE = datetime(2030, 2, 28, 15, 30, tzinfo=UTC)
BIRTHDAY = {
    "id": "birthday-month",
    "priority": 90,
    "entry": {"event": "birthday_month"},
    "reentry": {"policy": "after_days", "days": 300},
    "start": "tell",
    "steps": {
        "tell": send("tell", "happy-birthday", "end", cls="general"),
        "end": {"type": "exit"},
    },
}


@pytest.fixture
async def env(db: Database) -> AsyncIterator[Env]:
    await _pause_all(db)
    yield make_env(db, FakeClock(EVE), QuietHours())
    await _pause_all(db)


async def birthday(env: Env, member: str, month: int, day: int) -> None:
    async with env.db.unit_of_work() as uow:
        await env.handlers.on_birthday_set(uow, member, month, day)


async def enter_all(env: Env) -> int:
    total = 0
    while True:
        async with env.db.unit_of_work() as uow:
            n = await env.handlers.enter_birthday_month(uow, limit=50)
        if n == 0:
            return total
        total += n


async def entered(env: Env, member: str) -> int:
    return int(
        await env.db.pool.fetchval(
            "SELECT count(*) FROM engagement.enrollments WHERE member_id = $1 AND journey_id = $2",
            uuid.UUID(member),
            env.jid("birthday-month"),
        )
    )


async def test_members_enter_when_their_birthday_month_starts_locally_once(env: Env) -> None:
    await env.publish(BIRTHDAY)
    march, april, later = await env.member(), await env.member(), await env.member()
    await birthday(env, march, 3, 15)
    await birthday(env, april, 4, 2)
    # 23:30 on 28 February in Shanghai (already 1 March nowhere that matters): nobody.
    await enter_all(env)
    assert [await entered(env, m) for m in (march, april, later)] == [0, 0, 0]
    # 00:05 on 1 March local (still 28 February in UTC): March's members enter.
    env.clock.set(datetime(2030, 2, 28, 16, 5, tzinfo=UTC))
    await enter_all(env)
    assert [await entered(env, m) for m in (march, april, later)] == [1, 0, 0]
    # The next day's run is a difference: nothing new, nobody enters twice.
    env.clock.set(datetime(2030, 3, 2, 2, 0, tzinfo=UTC))
    assert await enter_all(env) == 0
    # A birthday set mid-month in the current month enters on the next run.
    await birthday(env, later, 3, 20)
    assert await enter_all(env) == 1
    assert [await entered(env, m) for m in (march, april, later)] == [1, 0, 1]
    env.clock.set(datetime(2030, 3, 9, 2, 0, tzinfo=UTC))
    await env.scheduler.run_until_idle()
    assert await env.templates(march) == ["happy-birthday"]
    # April: April's member; the next March, March's members again.
    env.clock.set(datetime(2030, 4, 1, 2, 0, tzinfo=UTC))
    await enter_all(env)
    assert [await entered(env, m) for m in (march, april, later)] == [1, 1, 1]
    env.clock.set(datetime(2031, 3, 1, 2, 0, tzinfo=UTC))
    await enter_all(env)
    assert [await entered(env, m) for m in (march, april, later)] == [2, 1, 2]


async def test_a_cleared_or_erased_birthday_never_enters(env: Env) -> None:
    await env.publish(BIRTHDAY)
    cleared, erased = await env.member(), await env.member()
    await birthday(env, cleared, 5, 1)
    await birthday(env, erased, 5, 9)
    await birthday(env, cleared, 0, 0)
    async with env.db.unit_of_work() as uow:
        await env.handlers.on_erased(uow, [erased])
    env.clock.set(datetime(2030, 5, 1, 2, 0, tzinfo=UTC))
    await enter_all(env)
    assert [await entered(env, m) for m in (cleared, erased)] == [0, 0]
    rows = await env.db.pool.fetchval(
        "SELECT count(*) FROM engagement.member_birthdays WHERE member_id = ANY($1::uuid[])",
        [uuid.UUID(cleared), uuid.UUID(erased)],
    )
    assert rows == 0


async def test_merge_keeps_the_survivors_birthday_and_never_enters_twice(env: Env) -> None:
    await env.publish(BIRTHDAY)
    survivor, absorbed, lone = await env.member(), await env.member(), await env.member()
    await birthday(env, survivor, 3, 1)
    await birthday(env, absorbed, 7, 7)
    await birthday(env, lone, 3, 3)
    env.clock.set(datetime(2030, 3, 1, 2, 0, tzinfo=UTC))
    await enter_all(env)
    async with env.db.unit_of_work() as uow:
        await env.handlers.on_merged(uow, f"mg-{uuid.uuid4()}", survivor, absorbed)
    rows = await env.db.pool.fetch(
        "SELECT member_id, month, day FROM engagement.member_birthdays"
        " WHERE member_id = ANY($1::uuid[])",
        [uuid.UUID(survivor), uuid.UUID(absorbed)],
    )
    assert [(str(r["member_id"]), r["month"], r["day"]) for r in rows] == [(survivor, 3, 1)]
    assert await enter_all(env) == 0


@pytest.mark.parametrize(("month", "day"), [(13, 1), (0, 5), (3, 0), (2, 32), (-1, 1)])
async def test_an_impossible_birthday_is_refused(env: Env, month: int, day: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await birthday(env, str(uuid.uuid4()), month, day)
    assert caught.value.code == "INVALID_BIRTHDAY"


async def test_member_publishes_month_and_day_and_engagement_keeps_them(
    infra: Infra, member_app: ServiceApp, engagement_app: ServiceApp
) -> None:
    assert engagement_app.db is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{member_app.port}") as ch:
        stub = member_pb2_grpc.MemberServiceStub(ch)
        member = (await identify(stub, ident(CARD, f"bd-{tag()}"))).member.member_id
        await stub.UpdateProfile(
            pb.UpdateProfileRequest(member_id=member, birthday="1994-05-17", source="mini-program")
        )

        async def published() -> list[events_pb2.BirthdaySet] | None:
            found = await member_stream(infra, events_pb2.BirthdaySet)
            mine = [e for e in found if e.member_id == member]
            return mine or None

        [event] = await eventually(published)
        # Month and day, nothing that carries the year.
        assert (event.month, event.day) == (5, 17)
        assert "1994" not in str(event)

        async def projected() -> tuple[int, int] | None:
            row = await engagement_app.db.pool.fetchrow(  # type: ignore[union-attr]
                "SELECT month, day FROM engagement.member_birthdays WHERE member_id = $1",
                uuid.UUID(member),
            )
            return (row["month"], row["day"]) if row else None

        assert await eventually(projected) == (5, 17)
        # Clearing the birthday forgets it.
        await stub.UpdateProfile(
            pb.UpdateProfileRequest(member_id=member, birthday="", source="mini-program")
        )

        async def forgotten() -> bool:
            return await projected() is None

        await eventually(forgotten)
