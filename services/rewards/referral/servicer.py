"""gRPC methods of referral: protobuf <-> domain mapping only. RewardsServicer
inherits them, so RewardsService stays one service."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from loyalty.rewards.v1 import rewards_pb2
from servicekit.db import Database
from servicekit.errors import DomainError, InvalidArgument
from servicekit.protos import timestamp

from ..wire import optional_time, page, set_time
from .domain import ABUSE_REFUSALS
from .handlers import Referrals, ReferralView


def referral_message(view: ReferralView) -> rewards_pb2.Referral:
    reply = rewards_pb2.Referral(
        referral_id=view.referral_id,
        inviter_member_id=view.inviter_id,
        invitee_member_id=view.invitee_id,
        accepted_at=timestamp(view.accepted_at),
        replayed=view.replayed,
        rewards=[
            rewards_pb2.ReferralReward(
                step=r.step,
                role=r.role,
                member_id=r.member_id,
                status=r.status,
                coupon_id=r.coupon_id,
                points=r.points,
                refusal_codes=[x["code"] for x in r.refusals],
            )
            for r in view.rewards
        ],
    )
    set_time(reply, "first_order_at", view.first_order_at)
    return reply


class ReferralRpcs:
    _db: Database
    _referrals: Referrals

    async def GetInviteCode(
        self, request: rewards_pb2.GetInviteCodeRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.InviteCode:
        async with self._db.unit_of_work() as uow:
            code = await self._referrals.invite_code(uow, request.member_id, request.device_id)
        return rewards_pb2.InviteCode(
            member_id=code.member_id, code=code.code, created_at=timestamp(code.created_at)
        )

    async def AcceptReferral(
        self, request: rewards_pb2.AcceptReferralRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Referral:
        now = datetime.now(UTC)
        try:
            async with self._db.unit_of_work() as uow:
                view = await self._referrals.accept(
                    uow,
                    request.invitee_member_id,
                    request.invite_code,
                    invitee_registered_at=optional_time(request, "invitee_registered_at"),
                    device_id=request.device_id,
                    identifier_hashes=list(request.identifier_hashes),
                    now=now,
                )
        except DomainError as refused:
            if refused.code in ABUSE_REFUSALS:
                async with self._db.unit_of_work() as uow:
                    await self._referrals.record_refusal(
                        uow, request.invitee_member_id, request.invite_code, refused.code, now
                    )
            raise
        return referral_message(view)

    async def ListReferrals(
        self, request: rewards_pb2.ListReferralsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Referrals:
        size, before = page(request.page_size, request.cursor)
        async with self._db.unit_of_work() as uow:
            views, next_seq = await self._referrals.list_of_inviter(
                uow, request.inviter_member_id, before, size
            )
        return rewards_pb2.Referrals(
            referrals=[referral_message(v) for v in views],
            next_cursor=str(next_seq) if next_seq is not None else "",
        )

    async def GetInviteeReferral(
        self, request: rewards_pb2.GetInviteeReferralRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Referral:
        async with self._db.unit_of_work() as uow:
            view = await self._referrals.of_invitee(uow, request.member_id)
        return referral_message(view)

    async def GetFissionReport(
        self, request: rewards_pb2.GetFissionReportRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.FissionReport:
        start, end = optional_time(request, "from"), optional_time(request, "to")
        if start is None or end is None:
            raise InvalidArgument(
                "from and to are required",
                code="PERIOD_REQUIRED",
                field="from" if start is None else "to",
            )
        async with self._db.unit_of_work() as uow:
            fission = await self._referrals.fission(uow, start, end)
        reply = rewards_pb2.FissionReport(
            inviters=fission.inviters,
            invitees=fission.invitees,
            fission_coefficient=fission.coefficient,
            second_generation_invitees=fission.second_generation,
            second_generation_spread=fission.second_generation_spread,
            seed_inviters=fission.seed_inviters,
            seed_invitees=fission.seed_invitees,
        )
        getattr(reply, "from").CopyFrom(timestamp(start))
        reply.to.CopyFrom(timestamp(end))
        return reply
