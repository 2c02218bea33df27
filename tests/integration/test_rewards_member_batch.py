"""A bulk earn checks its ids with one ResolveMemberIds call on member, not
one GetMember per id (issue 19's bulk figure): a batch of 1,000 lines is one
call, and ids past member's cap of 1,000 per call are split. Against the real
member service and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.db import Database
from servicekit.server import ServiceApp
from services.rewards.members import MemberGrpc
from services.rewards.points.bulk import bulk_earn
from services.rewards.points.handlers import PointsLedger

from .test_rewards_bulk_earn import T0, journal_count, line
from .test_rewards_ledger import DAYS30, balance


class CountingStub:
    """The real stub, counting the calls made through it by method."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await method(*args, **kwargs)

        return call


@pytest.fixture
async def counted(member_app: ServiceApp) -> AsyncIterator[tuple[MemberGrpc, CountingStub]]:
    d = MemberGrpc(f"127.0.0.1:{member_app.port}", 10.0)
    counter = CountingStub(d._member())
    d._stub = counter  # type: ignore[assignment]
    yield d, counter
    await d.close()


async def enrol(member_channel: grpc.aio.Channel) -> str:
    reply = await member_pb2_grpc.MemberServiceStub(member_channel).IdentifyMember(
        pb.IdentifyMemberRequest(
            identifiers=[pb.Identifier(type=pb.IDENTIFIER_TYPE_POS_CARD, value=uuid.uuid4().hex)],
            source="test",
            request_key=str(uuid.uuid4()),
        ),
        timeout=10,
    )
    return str(reply.member.member_id)


async def test_a_batch_of_1000_lines_is_one_call_to_member(
    db: Database,
    conn: asyncpg.Connection,
    member_channel: grpc.aio.Channel,
    counted: tuple[MemberGrpc, CountingStub],
) -> None:
    directory, counter = counted
    known = [await enrol(member_channel) for _ in range(3)]
    unknown = [str(uuid.uuid4()) for _ in range(997)]
    lines = [line(m, 1) for m in known] + [line(m, 1) for m in unknown]
    async with db.unit_of_work() as uow:
        results = await bulk_earn(
            uow.conn, PointsLedger(DAYS30, directory=directory), lines, "ops-1", T0
        )
    assert [r.outcome for r in results] == ["applied"] * 3 + ["refused"] * 997
    assert {r.code for r in results[3:]} == {"UNKNOWN_MEMBER"}
    assert counter.calls == Counter({"ResolveMemberIds": 1})
    assert [(await balance(conn, m))["available"] for m in known] == [1, 1, 1]
    assert await journal_count(conn, *unknown) == 0


async def test_more_ids_than_members_cap_are_split(
    counted: tuple[MemberGrpc, CountingStub],
) -> None:
    directory, counter = counted
    ids = [uuid.uuid4() for _ in range(1001)]
    refused = await directory.refusals(ids + ids[:5])  # duplicates asked once
    assert set(refused) == set(ids)
    assert {e.code for e in refused.values()} == {"UNKNOWN_MEMBER"}
    assert counter.calls == Counter({"ResolveMemberIds": 2})


async def test_a_directory_made_before_the_serving_loop_runs_answers_on_it(
    member_app: ServiceApp,
) -> None:
    """As `python -m services.rewards` does: build() (which makes the
    directory) runs before uvloop.run / asyncio.run starts the serving loop."""
    target = f"127.0.0.1:{member_app.port}"
    unknown = uuid.uuid4()

    def process() -> str:
        default = asyncio.new_event_loop()  # a main thread's default loop
        asyncio.set_event_loop(default)
        directory = MemberGrpc(target, 10.0)  # at build time

        async def serve() -> str:
            try:
                return (await directory.refusals([unknown]))[unknown].code
            finally:
                await directory.close()

        try:
            return asyncio.run(serve())
        finally:
            default.close()

    assert await asyncio.to_thread(process) == "UNKNOWN_MEMBER"
