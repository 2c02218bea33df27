"""Referral routes (rewards service): the member's invite code, accepting an
invite, the inviter's invitees and their rewards; the fission report for
operators. Rules and abuse refusals: docs/referral-and-mall.md."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.rewards.v1 import rewards_pb2
from servicekit.protos import timestamp

from .common import (
    MEMBER_ERRORS,
    MEMBER_ID_EXAMPLE,
    MemberId,
    downstreams,
    optional_utc,
    problem_response,
    utc,
)

router = APIRouter()

REFERRAL_ERRORS = MEMBER_ERRORS | {
    409: problem_response(
        "Refused: SELF_REFERRAL, REFERRAL_CYCLE, INVITEE_ALREADY_MEMBER, FINGERPRINT_ALREADY_USED,"
        " ALREADY_REFERRED (another inviter's invite was accepted before)"
    ),
}


class InviteCode(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "code": "7KQ2MXRT",
                    "created_at": "2026-05-01T04:00:00Z",
                }
            ]
        }
    )

    member_id: str
    code: str = Field(description="8 characters, no 0/O/1/I/L/U; stable once made")
    created_at: datetime


class AcceptInvite(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"invite_code": "7KQ2MXRT", "device_id": "wx-device-9f2c"}]
        },
    )

    invite_code: str = Field(min_length=1, max_length=32)
    device_id: str = Field(
        default="", max_length=128, description="The invitee's device; hashed, never stored raw"
    )


# Examples of what the API answers (times come back in UTC), under the
# programme of docs/referral-and-mall.md: the invitee's FIRST-CUP-HALF coupon
# at registration, the inviter's INVITE-20 coupon and the "referral" action's
# points at the invitee's first order.
INVITER_ID_EXAMPLE = "3e5a7c9b-2d4f-4a6c-8e0b-5d7f9a1c3e5b"
INVITEE_ID_EXAMPLE = "6b8d0f2a-4c6e-4b8d-9f1a-3c5e7a9b1d3f"
ACCEPTED_EXAMPLE: JsonDict = {
    "referral_id": "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
    "inviter_member_id": INVITER_ID_EXAMPLE,
    "invitee_member_id": MEMBER_ID_EXAMPLE,
    "accepted_at": "2026-05-02T01:14:09Z",
    "first_order_at": None,
    "rewards": [
        {
            "step": "registration",
            "role": "invitee",
            "member_id": MEMBER_ID_EXAMPLE,
            "status": "granted",
            "coupon_id": "c0d1e2f3-a4b5-4c6d-8e7f-9a0b1c2d3e4f",
            "points": 0,
            "refusal_codes": [],
        }
    ],
    "replayed": False,
}
REWARDED_EXAMPLE: JsonDict = {
    "referral_id": "f7e6d5c4-b3a2-4918-8776-655443322110",
    "inviter_member_id": MEMBER_ID_EXAMPLE,
    "invitee_member_id": INVITEE_ID_EXAMPLE,
    "accepted_at": "2026-05-01T09:30:51Z",
    "first_order_at": "2026-05-01T10:02:17Z",
    "rewards": [
        {
            "step": "registration",
            "role": "invitee",
            "member_id": INVITEE_ID_EXAMPLE,
            "status": "granted",
            "coupon_id": "d4c3b2a1-f0e9-4d8c-b7a6-5f4e3d2c1b0a",
            "points": 0,
            "refusal_codes": [],
        },
        {
            "step": "first_order",
            "role": "inviter",
            "member_id": MEMBER_ID_EXAMPLE,
            "status": "granted",
            "coupon_id": "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9",
            "points": 100,
            "refusal_codes": [],
        },
    ],
    "replayed": False,
}
CAPPED_EXAMPLE: JsonDict = {
    "referral_id": "0a9b8c7d-6e5f-4a3b-9c1d-e2f3a4b5c6d7",
    "inviter_member_id": MEMBER_ID_EXAMPLE,
    "invitee_member_id": "9c1e3a5b-7d9f-4b1d-a3c5-e7f9b1d3f5a7",
    "accepted_at": "2026-05-28T12:45:00Z",
    "first_order_at": "2026-05-29T03:10:42Z",
    "rewards": [
        {
            "step": "registration",
            "role": "invitee",
            "member_id": "9c1e3a5b-7d9f-4b1d-a3c5-e7f9b1d3f5a7",
            "status": "granted",
            "coupon_id": "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9",
            "points": 0,
            "refusal_codes": [],
        },
        {
            "step": "first_order",
            "role": "inviter",
            "member_id": MEMBER_ID_EXAMPLE,
            "status": "refused",
            "coupon_id": None,
            "points": 0,
            "refusal_codes": ["INVITER_REWARD_CAP_REACHED"],
        },
    ],
    "replayed": False,
}


class ReferralReward(BaseModel):
    step: str = Field(examples=["first_order"], description="registration or first_order")
    role: str = Field(examples=["inviter"], description="inviter or invitee")
    member_id: str
    status: str = Field(examples=["granted"], description="granted, partial or refused")
    coupon_id: str | None
    points: int
    refusal_codes: list[str] = Field(examples=[["INVITER_REWARD_CAP_REACHED"]])


class Referral(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ACCEPTED_EXAMPLE]})

    referral_id: str
    inviter_member_id: str
    invitee_member_id: str
    accepted_at: datetime
    first_order_at: datetime | None = Field(description="The invitee's first completed order")
    rewards: list[ReferralReward]
    replayed: bool = Field(description="True when this repeats an accept made earlier")


class Referrals(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"referrals": [CAPPED_EXAMPLE, REWARDED_EXAMPLE], "next_cursor": "2207"}]
        }
    )

    referrals: list[Referral]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class FissionReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "from": "2026-05-01T00:00:00+08:00",
                    "to": "2026-06-01T00:00:00+08:00",
                    "inviters": 100,
                    "invitees": 180,
                    "fission_coefficient": 1.8,
                    "second_generation_invitees": 54,
                    "second_generation_spread": 0.3,
                    "seed_inviters": 40,
                    "seed_invitees": 120,
                }
            ]
        },
    )

    from_: datetime = Field(alias="from")
    to: datetime
    inviters: int
    invitees: int
    fission_coefficient: float = Field(description="Invitees per inviter")
    second_generation_invitees: int = Field(
        description="Invitees brought in (by the period's end) by the period's invitees"
    )
    second_generation_spread: float = Field(description="Second generation per invitee")
    seed_inviters: int = Field(description="The period's inviters never invited themselves")
    seed_invitees: int = Field(description="Invitees the seed inviters brought in")


def referral_model(r: rewards_pb2.Referral) -> Referral:
    return Referral(
        referral_id=r.referral_id,
        inviter_member_id=r.inviter_member_id,
        invitee_member_id=r.invitee_member_id,
        accepted_at=utc(r.accepted_at),
        first_order_at=optional_utc(r, "first_order_at"),
        rewards=[
            ReferralReward(
                step=w.step,
                role=w.role,
                member_id=w.member_id,
                status=w.status,
                coupon_id=w.coupon_id or None,
                points=w.points,
                refusal_codes=list(w.refusal_codes),
            )
            for w in r.rewards
        ],
        replayed=r.replayed,
    )


@router.get(
    "/v1/members/{member_id}/invite-code",
    response_model=InviteCode,
    tags=["referral"],
    summary="The member's invite code (made on first ask)",
    responses=MEMBER_ERRORS,
)
async def get_invite_code(
    member_id: MemberId,
    request: Request,
    device_id: Annotated[str, Query(max_length=128, description="The inviter's device")] = "",
) -> InviteCode:
    services = downstreams(request)
    # Rewards makes a code for any id it is given: only members get one.
    await services.member.get_member(str(member_id))
    reply = await services.rewards.call(
        "GetInviteCode",
        rewards_pb2.GetInviteCodeRequest(member_id=str(member_id), device_id=device_id),
    )
    return InviteCode(member_id=reply.member_id, code=reply.code, created_at=utc(reply.created_at))


@router.post(
    "/v1/members/{member_id}/referral",
    response_model=Referral,
    tags=["referral"],
    summary="Accept an invite: link this (newly registered) member to the inviter, once",
    responses=REFERRAL_ERRORS,
)
async def accept_invite(member_id: MemberId, body: AcceptInvite, request: Request) -> Referral:
    services = downstreams(request)
    # Rewards judges "already a member" by when member registered the invitee,
    # and "one phone or unionid behind many invitees" by their keyed hashes.
    member, fingerprints = await asyncio.gather(
        services.member.get_member(str(member_id)),
        services.member.abuse_fingerprints(str(member_id)),
    )
    reply = await services.rewards.call(
        "AcceptReferral",
        rewards_pb2.AcceptReferralRequest(
            invitee_member_id=str(member_id),
            invite_code=body.invite_code,
            device_id=body.device_id,
            invitee_registered_at=member.registered_at,
            identifier_hashes=fingerprints,
        ),
        {"invitee_member_id": "member_id"},
    )
    return referral_model(reply)


@router.get(
    "/v1/members/{member_id}/referral",
    response_model=Referral,
    tags=["referral"],
    summary="The member's own referral as an invitee, with its rewards' status",
    responses=MEMBER_ERRORS | {404: problem_response("NOT_REFERRED: nobody invited this member")},
)
async def get_own_referral(member_id: MemberId, request: Request) -> Referral:
    reply = await downstreams(request).rewards.call(
        "GetInviteeReferral", rewards_pb2.GetInviteeReferralRequest(member_id=str(member_id))
    )
    return referral_model(reply)


@router.get(
    "/v1/members/{member_id}/referrals",
    response_model=Referrals,
    tags=["referral"],
    summary="The member's invitees and each reward's status, newest first",
    responses=MEMBER_ERRORS,
)
async def list_referrals(
    member_id: MemberId,
    request: Request,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str, Query(max_length=20)] = "",
) -> Referrals:
    reply = await downstreams(request).rewards.call(
        "ListReferrals",
        rewards_pb2.ListReferralsRequest(
            inviter_member_id=str(member_id), page_size=page_size, cursor=cursor
        ),
        {"inviter_member_id": "member_id"},
    )
    return Referrals(
        referrals=[referral_model(r) for r in reply.referrals],
        next_cursor=reply.next_cursor or None,
    )


@router.get(
    "/v1/admin/referrals/fission",
    response_model=FissionReport,
    response_model_by_alias=True,
    tags=["admin"],
    summary="Fission coefficient and second-generation spread of a period",
    responses={422: problem_response("Malformed period")},
)
async def fission_report(
    request: Request,
    from_: Annotated[AwareDatetime, Query(alias="from", description="Start (inclusive)")],
    to: Annotated[AwareDatetime, Query(description="End (exclusive)")],
) -> FissionReport:
    fission = rewards_pb2.GetFissionReportRequest(to=timestamp(to))
    getattr(fission, "from").CopyFrom(timestamp(from_))
    reply = await downstreams(request).rewards.call("GetFissionReport", fission)
    return FissionReport.model_validate(
        {
            "from": from_,
            "to": to,
            "inviters": reply.inviters,
            "invitees": reply.invitees,
            "fission_coefficient": reply.fission_coefficient,
            "second_generation_invitees": reply.second_generation_invitees,
            "second_generation_spread": reply.second_generation_spread,
            "seed_inviters": reply.seed_inviters,
            "seed_invitees": reply.seed_invitees,
        }
    )
