"""Points routes (rewards service)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .common import MEMBER_ERRORS, MEMBER_ID_EXAMPLE, MemberId, downstreams

router = APIRouter()


class PointsBalance(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"member_id": MEMBER_ID_EXAMPLE, "available": 32, "lifetime_earned": 120}]
        }
    )

    member_id: str
    available: int = Field(description="Points the member can spend now")
    lifetime_earned: int = Field(description="All points ever earned")


@router.get(
    "/v1/members/{member_id}/points",
    response_model=PointsBalance,
    tags=["points"],
    summary="A member's points balance",
    responses=MEMBER_ERRORS,
)
async def get_points(member_id: MemberId, request: Request) -> PointsBalance:
    reply = await downstreams(request).rewards.get_points_balance(str(member_id))
    return PointsBalance(
        member_id=reply.member_id or str(member_id),
        available=reply.available,
        lifetime_earned=reply.lifetime_earned,
    )
