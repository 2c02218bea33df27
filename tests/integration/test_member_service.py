"""Member service against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import random
import uuid

import grpc
import pytest

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.errors import error_info


def random_mobile() -> str:
    return f"139{random.randrange(10**8):08d}"


def phone_request(phone: str) -> member_pb2.IdentifyMemberRequest:
    return member_pb2.IdentifyMemberRequest(
        identifiers=[member_pb2.Identifier(type=member_pb2.IDENTIFIER_TYPE_PHONE, value=phone)],
        source="test",
        # A fresh key per call: each is a new request, not a retry.
        request_key=str(uuid.uuid4()),
    )


async def test_identify_by_phone_creates_then_finds(member_channel: grpc.aio.Channel) -> None:
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    phone = random_mobile()
    first = await stub.IdentifyMember(phone_request(phone))
    assert first.created
    assert first.member.phone_masked == f"{phone[:3]}****{phone[-4:]}"
    # The same number written another way is the same member.
    again = await stub.IdentifyMember(phone_request(f"+86 {phone[:3]} {phone[3:7]} {phone[7:]}"))
    assert not again.created
    assert again.member.member_id == first.member.member_id


async def test_concurrent_identify_creates_one_member(member_channel: grpc.aio.Channel) -> None:
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    phone = random_mobile()
    replies = await asyncio.gather(*(stub.IdentifyMember(phone_request(phone)) for _ in range(16)))
    assert len({r.member.member_id for r in replies}) == 1
    assert sum(r.created for r in replies) == 1


@pytest.mark.parametrize("bad", ["12345", "not-a-phone", "", "null"])
async def test_malformed_phone_is_invalid_argument(
    member_channel: grpc.aio.Channel, bad: str
) -> None:
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.IdentifyMember(phone_request(bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    code, field = error_info(caught.value)
    assert code in {"INVALID_PHONE", "EMPTY_IDENTIFIER"}
    assert field == "identifiers[0].value"


async def test_unknown_member_is_not_found(member_channel: grpc.aio.Channel) -> None:
    stub = member_pb2_grpc.MemberServiceStub(member_channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetMember(
            member_pb2.GetMemberRequest(member_id="00000000-0000-0000-0000-000000000001")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value) == ("UNKNOWN_MEMBER", "member_id")
