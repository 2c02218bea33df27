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
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from ..clients import Downstreams
from ..errors import DownstreamError
from ..member_views import CENTRE, GatewayViews, Miss, centre_boundaries
from .common import MEMBER_ERRORS, MEMBER_ID_EXAMPLE, MemberId, downstreams
from .points import POINTS_SUMMARY_EXAMPLE, PointsSummary, points_summary
from .tiers import MEMBER_TIER_EXAMPLE, MemberTier, member_tier

router = APIRouter()

T = TypeVar("T")

# The two halves are their own routes' examples.
CENTRE_EXAMPLE: JsonDict = {
    "member_id": MEMBER_ID_EXAMPLE,
    "tier": MEMBER_TIER_EXAMPLE,
    "points": POINTS_SUMMARY_EXAMPLE,
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
async def get_member_centre(member_id: MemberId, request: Request) -> Any:
    views: GatewayViews | None = request.app.state.member_views
    if views is None:
        return await member_centre(downstreams(request), str(member_id))
    # The member's cached reply while it stands (gateway/member_views.py): the
    # same bytes as the reply it was stored from, so neither service is asked.
    mid = str(member_id)
    epoch = await views.epoch()
    cached = await views.read(mid, CENTRE, epoch)
    if not isinstance(cached, Miss):
        return Response(cached, media_type="application/json")
    read_at = views.now()
    centre = await member_centre(downstreams(request), mid)
    if centre.degraded:  # a half missing is not kept
        return centre
    body = centre.model_dump_json().encode()
    await views.fill(mid, CENTRE, cached, epoch, body, read_at, centre_boundaries(centre))
    return Response(body, media_type="application/json")
