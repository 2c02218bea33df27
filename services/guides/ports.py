"""What the guides service needs of other services: OneID identify of a WeCom
customer through the member service's RPCs."""

from __future__ import annotations

import hashlib
from typing import Protocol

import grpc

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.clients import create_channel
from servicekit.errors import Unavailable


class MemberDirectory(Protocol):
    async def identify_wecom(
        self, corp_id: str, external_userid: str, unionid: str, source: str
    ) -> str: ...

    async def close(self) -> None: ...


class MemberGrpc:
    def __init__(self, target: str, timeout: float) -> None:
        self._channel = create_channel(target)
        self._stub = member_pb2_grpc.MemberServiceStub(self._channel)
        self._timeout = timeout

    async def identify_wecom(
        self, corp_id: str, external_userid: str, unionid: str, source: str
    ) -> str:
        """The member behind a WeCom customer: attach or merge per the identity
        policy (the member service decides). The request key makes a retried
        callback find the same answer."""
        identifiers = [
            member_pb2.Identifier(
                type=member_pb2.IDENTIFIER_TYPE_WECOM_EXTERNAL_USERID,
                value=external_userid,
                verified=True,
            )
        ]
        if unionid:
            # WeCom reports the unionid of the customer's WeChat account: proven.
            identifiers.append(
                member_pb2.Identifier(
                    type=member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID, value=unionid, verified=True
                )
            )
        # The same customer, ids and source (the adding staff member) is the
        # same request: a retried callback replays the first answer.
        digest = hashlib.sha256(f"{corp_id}|{external_userid}|{unionid}|{source}".encode())
        key = f"wecom:{digest.hexdigest()}"
        try:
            reply = await self._stub.IdentifyMember(
                member_pb2.IdentifyMemberRequest(
                    identifiers=identifiers, source=source, request_key=key
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"member service: {exc.code().name} {exc.details()}", code="MEMBER_UNAVAILABLE"
            ) from None
        return reply.member.member_id

    async def close(self) -> None:
        await self._channel.close()
