"""The member centre in one round trip: what the mini-program's member page
shows (tier, benefits, progress, projection and the points summary), fanned
out by the gateway to tiering and rewards side by side.

One call instead of two halves the door's work per page view (signature,
nonce, rate-limit token, member assertion) and the page waits for the slower
service once. The two halves stay available on their own routes
(`/points/summary`, `/tier`).

Degraded like the POS replies (docs/api.md, "Degraded answers"): when one of
the two services does not answer, its half is null and `degraded` names it;
only when neither answers is the page a 503. Any other failure (an unknown
member, no programme in force, a malformed id) is the route's error as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..clients import Downstreams
from ..errors import DownstreamError
from .common import MEMBER_ERRORS, MEMBER_ID_EXAMPLE, MemberId, downstreams
from .points import PointsSummary, points_summary
from .tiers import MemberTier, member_tier

router = APIRouter()

T = TypeVar("T")

CENTRE_EXAMPLE: dict[str, Any] = {
    "member_id": MEMBER_ID_EXAMPLE,
    "tier": {
        "member_id": MEMBER_ID_EXAMPLE,
        "programme_id": "default",
        "programme_version": 1,
        "tier": {
            "code": "svip",
            "name": "SVIP",
            "threshold": 50000,
            "retention": 30000,
            "benefits": {
                "points_multiplier_bp": 12000,
                "birthday_coupon_template": "birthday-svip",
                "upgrade_gift_coupon_template": None,
                "free_delivery": True,
                "priority": 1,
            },
        },
        "earned_tier": "svip",
        "qualifying_metric": "paid_spend",
        "metric_value": 52000,
        "growth_value": 520,
        "progress_bp": 200,
        "period_last_day": "2026-12-31",
        "keep_needed": 0,
        "next_tier": {
            "code": "vip",
            "name": "VIP",
            "threshold": 150000,
            "retention": 100000,
            "benefits": {
                "points_multiplier_bp": 15000,
                "birthday_coupon_template": "birthday-vip",
                "upgrade_gift_coupon_template": "upgrade-vip",
                "free_delivery": True,
                "priority": 2,
            },
        },
        "next_needed": 98000,
        "projection": "¥980 more reaches VIP",
        "override_tier": None,
        "override_until": None,
        "override_reason": None,
        "grace_until": None,
    },
    "points": {
        "member_id": MEMBER_ID_EXAMPLE,
        "available": 320,
        "lifetime_earned": 1280,
        "pending": 18,
        "held": 0,
        "debt": 0,
        "expiring_soon": [{"points": 40, "expires_at": "2026-12-31T15:59:59Z"}],
    },
    "degraded": [],
}


class MemberCentre(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CENTRE_EXAMPLE]})

    member_id: str
    tier: MemberTier | None = Field(
        description="As GET /v1/members/{member_id}/tier; null when tiering did not answer"
    )
    points: PointsSummary | None = Field(
        description="As GET /v1/members/{member_id}/points/summary; null when rewards did "
        "not answer"
    )
    degraded: list[str] = Field(
        description='Services that did not answer, whose part is null (e.g. ["tiering"]); '
        "empty when everything answered",
        examples=[[]],
    )


class _Unanswered:
    """A half whose service did not answer (UNAVAILABLE, deadline passed, not deployed)."""

    def __init__(self, error: DownstreamError) -> None:
        self.error = error


async def _half(read: Callable[[], Awaitable[T]]) -> T | _Unanswered:
    """One half of the page: its reply, or the marker of a service that did not
    answer (to degrade). Other failures propagate."""
    try:
        return await read()
    except DownstreamError as exc:
        if exc.status == grpc.StatusCode.UNAVAILABLE:
            return _Unanswered(exc)
        raise


async def member_centre(down: Downstreams, member_id: str) -> MemberCentre:
    async def tier() -> MemberTier:
        return member_tier(await down.tiering.get_member_tier(member_id))

    # Side by side; gather waits for both (return_exceptions), so no call is
    # left running when the other half failed.
    tiers, points = await asyncio.gather(
        _half(tier), _half(lambda: points_summary(down, member_id)), return_exceptions=True
    )
    # A real error (no programme in force, a malformed id, ...) answers the request.
    if isinstance(tiers, BaseException):
        raise tiers
    if isinstance(points, BaseException):
        raise points
    if isinstance(tiers, _Unanswered) and isinstance(points, _Unanswered):
        raise tiers.error
    return MemberCentre(
        member_id=member_id,
        tier=None if isinstance(tiers, _Unanswered) else tiers,
        points=None if isinstance(points, _Unanswered) else points,
        degraded=[
            name
            for name, result in (("rewards", points), ("tiering", tiers))
            if isinstance(result, _Unanswered)
        ],
    )


@router.get(
    "/v1/members/{member_id}/centre",
    response_model=MemberCentre,
    tags=["members"],
    summary="The member centre page in one call: tier, benefits, progress, projection and "
    "points summary (each half degraded to null when its service does not answer)",
    responses=MEMBER_ERRORS,
)
async def get_member_centre(member_id: MemberId, request: Request) -> MemberCentre:
    return await member_centre(downstreams(request), str(member_id))
