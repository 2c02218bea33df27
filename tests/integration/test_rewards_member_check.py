"""Explicit credits check the member (issue 13 item 3, as POS CompleteOrder
does): AdjustPoints and bulk earn refuse an id the member service does not
know (UNKNOWN_MEMBER) or erased (MEMBER_ERASED), credit an absorbed id to its
survivor, and refuse everything when member cannot answer. Against the real
member service and PostgreSQL; plus an erasure recorded while a bulk earn is
in flight: the earn waits for it and is refused, never credited after it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest

from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.db import Database, asyncpg_dsn
from servicekit.errors import FailedPrecondition, NotFound, Unavailable
from servicekit.server import ServiceApp
from services.rewards import members, merges
from services.rewards.members import MemberGrpc
from services.rewards.points.bulk import bulk_earn
from services.rewards.points.handlers import PointsLedger

from ..harness import Infra
from .test_rewards_bulk_earn import T0, journal_count, line, post
from .test_rewards_ledger import DAYS30, assert_audit, balance

NOW = T0


@pytest.fixture(scope="module")
async def directory(member_app: ServiceApp) -> AsyncIterator[MemberGrpc]:
    d = MemberGrpc(f"127.0.0.1:{member_app.port}", 5.0)
    yield d
    await d.close()


@pytest.fixture(scope="module")
def ledger(directory: MemberGrpc) -> PointsLedger:
    return PointsLedger(DAYS30, directory=directory)


@pytest.fixture(scope="module")
def stub(member_channel: grpc.aio.Channel) -> member_pb2_grpc.MemberServiceStub:
    return member_pb2_grpc.MemberServiceStub(member_channel)


async def enrol(stub: member_pb2_grpc.MemberServiceStub) -> str:
    reply = await stub.IdentifyMember(
        pb.IdentifyMemberRequest(
            identifiers=[pb.Identifier(type=pb.IDENTIFIER_TYPE_POS_CARD, value=uuid.uuid4().hex)],
            source="test",
            request_key=str(uuid.uuid4()),
        ),
        timeout=10,
    )
    return str(reply.member.member_id)


async def erase(stub: member_pb2_grpc.MemberServiceStub, member: str) -> None:
    await stub.EraseMember(
        pb.EraseMemberRequest(member_id=member, operator="t", reason=str(uuid.uuid4())),
        timeout=10,
    )


async def adjust(db: Database, ledger: PointsLedger, member: str, points: int) -> object:
    async with db.unit_of_work() as uow:
        outcome = await ledger.adjust(
            uow, member, points, "ops-1", "goodwill", f"a-{uuid.uuid4().hex}", NOW
        )
    return outcome.unwrap()


async def test_bulk_earn_refuses_ids_member_does_not_know_or_erased(
    db: Database,
    conn: asyncpg.Connection,
    ledger: PointsLedger,
    stub: member_pb2_grpc.MemberServiceStub,
) -> None:
    known, erased, unknown = await enrol(stub), await enrol(stub), str(uuid.uuid4())
    # Erased at member; rewards has not heard of it yet (no MemberErased consumed).
    await erase(stub, erased)
    lines = [line(known, 10), line(unknown, 20), line(erased, 30), line(unknown, 5)]
    results = await post_with(db, ledger, lines)
    assert [(r.outcome, r.code) for r in results] == [
        ("applied", ""),
        ("refused", "UNKNOWN_MEMBER"),
        ("refused", "MEMBER_ERASED"),
        ("refused", "UNKNOWN_MEMBER"),
    ]
    assert unknown in results[1].message
    assert await journal_count(conn, unknown, erased) == 0
    assert (await balance(conn, known))["available"] == 10
    # Refused lines claimed no key: once the member exists, the same line applies.
    await assert_audit(conn, known)


async def post_with(db: Database, ledger: PointsLedger, lines: list) -> list:  # type: ignore[type-arg]
    async with db.unit_of_work() as uow:
        return await bulk_earn(uow.conn, ledger, lines, "ops-1", NOW)


async def test_adjust_refuses_unknown_and_erased_and_credits_a_survivor(
    db: Database,
    conn: asyncpg.Connection,
    ledger: PointsLedger,
    stub: member_pb2_grpc.MemberServiceStub,
) -> None:
    unknown = str(uuid.uuid4())
    with pytest.raises(NotFound) as caught:
        await adjust(db, ledger, unknown, 50)
    assert caught.value.code == "UNKNOWN_MEMBER"
    gone = await enrol(stub)
    await erase(stub, gone)
    with pytest.raises(FailedPrecondition) as erased:
        await adjust(db, ledger, gone, 50)
    assert erased.value.code == "MEMBER_ERASED"
    assert await journal_count(conn, unknown, gone) == 0

    survivor, absorbed = await enrol(stub), await enrol(stub)
    merged = await stub.MergeMembers(
        pb.MergeMembersRequest(member_ids=[survivor, absorbed], operator="ops", reason="same"),
        timeout=10,
    )
    m = merged.merges[0]
    # Rewards' projection of the merge, as the MemberMerged consumer records it.
    async with db.unit_of_work() as uow:
        await merges.record_merge(
            uow.conn,
            m.merge_id,
            uuid.UUID(m.absorbed_member_id),
            uuid.UUID(m.survivor_member_id),
            datetime(2025, 2, 1, tzinfo=UTC),
        )
    result = await adjust(db, ledger, m.absorbed_member_id, 40)
    assert result.member_id == m.survivor_member_id  # type: ignore[attr-defined]
    assert (await balance(conn, m.survivor_member_id))["available"] == 40
    assert await journal_count(conn, m.absorbed_member_id) == 0
    await assert_audit(conn, m.survivor_member_id)


async def test_nothing_is_credited_when_member_cannot_answer(
    db: Database, conn: asyncpg.Connection, infra: Infra
) -> None:
    # A port nobody listens on: member unreachable.
    unreachable = MemberGrpc("127.0.0.1:9", 1.0)
    try:
        blind = PointsLedger(DAYS30, directory=unreachable)
        member = str(uuid.uuid4())
        with pytest.raises(Unavailable) as caught:
            await post_with(db, blind, [line(member, 10)])
        assert caught.value.code == "MEMBER_UNAVAILABLE"
        with pytest.raises(Unavailable):
            await adjust(db, blind, member, 10)
        assert await journal_count(conn, member) == 0
    finally:
        await unreachable.close()


async def waiting_on_lock(conn: asyncpg.Connection, pid: int) -> bool:
    wait: str | None = await conn.fetchval(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
    )
    return wait == "Lock"


async def test_an_erasure_recorded_during_a_bulk_earn_is_waited_for_and_refuses_it(
    db: Database,
    conn: asyncpg.Connection,
    infra: Infra,
    ledger: PointsLedger,
    stub: member_pb2_grpc.MemberServiceStub,
) -> None:
    member = await enrol(stub)
    # The MemberErased consumer's transaction, not yet committed.
    eraser = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        tx = eraser.transaction()
        await tx.start()
        await members.record_erasure(eraser, [uuid.UUID(member)], datetime(2025, 3, 1, tzinfo=UTC))
        earn_pid: list[int] = []

        async def earn() -> list:  # type: ignore[type-arg]
            async with db.unit_of_work() as uow:
                earn_pid.append(uow.conn.get_server_pid())
                return await bulk_earn(uow.conn, ledger, [line(member, 25)], "ops-1", NOW)

        task = asyncio.create_task(earn())
        # The earn reaches the member's hold and waits there for the erasure.
        while not (earn_pid and await waiting_on_lock(conn, earn_pid[0])):
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        await tx.commit()
        results = await task
    finally:
        await eraser.close()
    assert [(r.outcome, r.code) for r in results] == [("refused", "MEMBER_ERASED")]
    assert await journal_count(conn, member) == 0


async def test_a_bulk_earn_in_flight_is_waited_for_by_the_erasure(
    db: Database,
    conn: asyncpg.Connection,
    infra: Infra,
    ledger: PointsLedger,
    stub: member_pb2_grpc.MemberServiceStub,
) -> None:
    member = await enrol(stub)
    eraser = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        async with db.unit_of_work() as uow:
            results = await bulk_earn(uow.conn, ledger, [line(member, 25)], "ops-1", NOW)
            assert [r.outcome for r in results] == ["applied"]

            async def record() -> int:
                async with eraser.transaction():
                    return await members.record_erasure(
                        eraser, [uuid.UUID(member)], datetime(2025, 3, 1, tzinfo=UTC)
                    )

            erasing = asyncio.create_task(record())
            pid = eraser.get_server_pid()
            while not await waiting_on_lock(conn, pid):
                assert not erasing.done(), "the erasure did not wait for the earn in flight"
                await asyncio.sleep(0.01)
        # The earn committed first; the erasure follows it.
        assert await erasing == 1
    finally:
        await eraser.close()
    assert (await balance(conn, member))["available"] == 25
    # From now on the member's credits are refused by rewards' own mark too.
    again = await post(db, [line(member, 5)])
    assert [(r.outcome, r.code) for r in again] == [("refused", "MEMBER_ERASED")]
    await assert_audit(conn, member)
