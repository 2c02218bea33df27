"""Member profile routes (member service; spend from tiering)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from servicekit.protos import to_datetime

from .common import MEMBER_ERRORS, MEMBER_ID_EXAMPLE, MemberId, downstreams, utc

router = APIRouter()


class Member(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "member_number": "M00001024",
                    "phone_masked": "139****5678",
                    "registered_at": "2025-03-08T06:30:00Z",
                }
            ]
        }
    )

    member_id: str
    member_number: str = Field(description="Short human-facing member number")
    phone_masked: str = Field(description="Masked phone, empty when none is known")
    registered_at: datetime = Field(description="RFC 3339, UTC")


class MemberSpend(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "total_paid_fen": 3200,
                    "order_count": 1,
                    "last_order_at": "2025-03-08T06:31:00Z",
                    "tier_code": "SVIP",
                    "tier_name": "SVIP",
                }
            ]
        }
    )

    member_id: str
    total_paid_fen: int = Field(description="Everything the member paid, in fen (1/100 yuan)")
    order_count: int
    last_order_at: datetime | None = Field(description="RFC 3339, UTC; null before any order")
    tier_code: str | None = Field(
        description="Tier the current programme gives for these totals; null when none applies"
    )
    tier_name: str | None = None


@router.get(
    "/v1/members/{member_id}",
    response_model=Member,
    tags=["members"],
    summary="A member's profile",
    responses=MEMBER_ERRORS,
)
async def get_member(member_id: MemberId, request: Request) -> Member:
    reply = await downstreams(request).member.get_member(str(member_id))
    return Member(
        member_id=reply.member_id,
        member_number=reply.member_number,
        phone_masked=reply.phone_masked,
        registered_at=utc(reply.registered_at),
    )


@router.get(
    "/v1/members/{member_id}/spend",
    response_model=MemberSpend,
    tags=["members"],
    summary="What the member has spent, as tiering counts it",
    responses=MEMBER_ERRORS,
)
async def get_spend(member_id: MemberId, request: Request) -> MemberSpend:
    reply = await downstreams(request).tiering.get_member_spend(str(member_id))
    return MemberSpend(
        member_id=reply.member_id or str(member_id),
        total_paid_fen=reply.total_paid_fen,
        order_count=reply.order_count,
        last_order_at=to_datetime(reply.last_order_at),
        tier_code=reply.tier_code or None,
        tier_name=reply.tier_name or None,
    )
