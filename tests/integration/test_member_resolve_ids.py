"""ResolveMemberIds: the state of many member ids in one call (one query),
as GetMember judges each: active, absorbed (with its live survivor, through a
chain of merges), erased (itself or the member it was merged into), unknown;
in request order, duplicates answered each time; more than 1,000 ids refused.
Against the real member service and PostgreSQL."""

from __future__ import annotations

import uuid

import grpc
import pytest

from loyalty.member.v1 import member_pb2 as pb
from loyalty.member.v1 import member_pb2_grpc
from servicekit.errors import error_info

R = pb.ResolvedMemberId


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


async def merge(stub: member_pb2_grpc.MemberServiceStub, *ids: str) -> str:
    """Merge the members; returns the survivor."""
    reply = await stub.MergeMembers(
        pb.MergeMembersRequest(member_ids=list(ids), operator="ops", reason="same"), timeout=10
    )
    return str(reply.merges[0].survivor_member_id)


async def resolve(stub: member_pb2_grpc.MemberServiceStub, *ids: str) -> list[tuple[str, int, str]]:
    reply = await stub.ResolveMemberIds(
        pb.ResolveMemberIdsRequest(member_ids=list(ids)), timeout=10
    )
    return [(m.member_id, m.state, m.survivor_id) for m in reply.members]


async def test_each_state_in_request_order_with_duplicates(
    stub: member_pb2_grpc.MemberServiceStub,
) -> None:
    live, gone, unknown = await enrol(stub), await enrol(stub), str(uuid.uuid4())
    await stub.EraseMember(
        pb.EraseMemberRequest(member_id=gone, operator="t", reason="asked"), timeout=10
    )
    a, b = await enrol(stub), await enrol(stub)
    survivor = await merge(stub, a, b)
    absorbed = b if survivor == a else a
    assert await resolve(stub, unknown, live, gone, absorbed, live, unknown, survivor) == [
        (unknown, R.UNKNOWN, ""),
        (live, R.ACTIVE, ""),
        (gone, R.ERASED, ""),
        (absorbed, R.ABSORBED, survivor),
        (live, R.ACTIVE, ""),
        (unknown, R.UNKNOWN, ""),
        (survivor, R.ACTIVE, ""),
    ]
    assert await resolve(stub) == []


async def test_a_chain_of_merges_answers_the_live_root_as_get_member_does(
    stub: member_pb2_grpc.MemberServiceStub,
) -> None:
    a, b, c = await enrol(stub), await enrol(stub), await enrol(stub)
    await merge(stub, a, b)
    root = await merge(stub, a, c)  # a's cluster (a and b) meets c
    answers = await resolve(stub, a, b, c)
    for asked, state, survivor in answers:
        got = await stub.GetMember(pb.GetMemberRequest(member_id=asked), timeout=10)
        assert got.member_id == root
        if asked == root:
            assert (state, survivor) == (R.ACTIVE, "")
        else:
            assert (state, survivor) == (R.ABSORBED, root)
    assert sum(s == R.ABSORBED for _, s, _ in answers) == 2


async def test_an_id_merged_into_a_member_since_erased_is_erased(
    stub: member_pb2_grpc.MemberServiceStub,
) -> None:
    a, b = await enrol(stub), await enrol(stub)
    survivor = await merge(stub, a, b)
    await stub.EraseMember(
        pb.EraseMemberRequest(member_id=survivor, operator="t", reason="asked"), timeout=10
    )
    assert [s for _, s, _ in await resolve(stub, a, b)] == [R.ERASED, R.ERASED]


async def test_at_most_1000_ids_and_each_an_id(stub: member_pb2_grpc.MemberServiceStub) -> None:
    many = [str(uuid.uuid4()) for _ in range(1000)]
    assert [s for _, s, _ in await resolve(stub, *many)] == [R.UNKNOWN] * 1000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(stub, *many, str(uuid.uuid4()))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value) == ("TOO_MANY_MEMBER_IDS", "member_ids")
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await resolve(stub, many[0], "not-an-id")
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(bad.value) == ("INVALID_MEMBER_ID", "member_ids[1]")
