"""What the guides service needs of other services: OneID identify of a WeCom
customer through the member service's RPCs, and coupons a guide grants through
rewards' IssueCoupon."""

from __future__ import annotations

import hashlib
from typing import Protocol

import grpc

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.clients import create_channel
from servicekit.errors import FailedPrecondition, Unavailable


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


class CouponIssuer(Protocol):
    async def issue(
        self, template_id: str, member_id: str, issue_key: str, issued_by: str
    ) -> tuple[str, str]: ...

    async def close(self) -> None: ...


class RewardsCoupons:
    """Issues a guide's coupon through rewards' IssueCoupon (idempotent on the issue key)."""

    def __init__(self, target: str, timeout: float) -> None:
        self._channel = create_channel(target)
        self._stub = rewards_pb2_grpc.RewardsServiceStub(self._channel)
        self._timeout = timeout

    async def issue(
        self, template_id: str, member_id: str, issue_key: str, issued_by: str
    ) -> tuple[str, str]:
        """(coupon id, code); a refusal (no such template, out of stock, the
        member's limit) is FAILED_PRECONDITION COUPON_REFUSED, an outage UNAVAILABLE."""
        try:
            coupon = await self._stub.IssueCoupon(
                rewards_pb2.IssueCouponRequest(
                    template_id=template_id,
                    member_id=member_id,
                    reason="operator_grant",
                    issue_key=issue_key,
                    issued_by=issued_by,
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    f"rewards service: {exc.code().name}", code="REWARDS_UNAVAILABLE"
                ) from None
            raise FailedPrecondition(
                f"rewards refused the coupon: {exc.details()}",
                code="COUPON_REFUSED",
                field="template_id",
            ) from None
        return coupon.coupon_id, coupon.code

    async def close(self) -> None:
        await self._channel.close()
