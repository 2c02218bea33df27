"""Tier routes (tiering service): the member centre (tier, benefits, growth,
progress, projection, history, growth actions) and operators (programme
versions and simulations, overrides, the distribution report)."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from loyalty.tiering.v1 import tiering_pb2
from servicekit.protos import timestamp, to_datetime

from .common import (
    MEMBER_ERRORS,
    MEMBER_ID_EXAMPLE,
    MemberId,
    downstreams,
    optional_timestamp,
    problem_response,
    utc,
)

router = APIRouter()

PROGRAMME_ERRORS: dict[int | str, dict[str, Any]] = {
    422: problem_response("The programme is invalid; `field` names the entry at fault"),
    404: problem_response("No such programme"),
    503: problem_response("The tiering service is unavailable; retry later"),
}
ProgrammeId = Annotated[
    str, Path(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$", examples=["default"])
]


class Benefits(BaseModel):
    points_multiplier_bp: int = Field(description="10000 = 1.0x earn, 15000 = 1.5x")
    birthday_coupon_template: str | None
    upgrade_gift_coupon_template: str | None
    free_delivery: bool
    priority: int


class TierInfo(BaseModel):
    code: str
    name: str
    threshold: int = Field(description="Metric value that reaches the tier")
    retention: int = Field(description="Metric value that keeps it at the period end (保级)")
    benefits: Benefits


class MemberTier(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "tier": {"code": "svip", "name": "SVIP", "threshold": 50000},
                    "qualifying_metric": "paid_spend",
                    "metric_value": 58000,
                    "period_last_day": "2026-12-31",
                    "keep_needed": 12000,
                    "projection": "¥120 more by 31 Dec keeps SVIP; ¥920 more reaches VIP",
                }
            ]
        }
    )

    member_id: str
    programme_id: str
    programme_version: int
    tier: TierInfo = Field(description="Effective tier: earned, raised by an active override")
    earned_tier: str
    qualifying_metric: str = Field(examples=["paid_spend"])
    metric_value: int = Field(description="Over the rolling window now (fen, orders or growth)")
    growth_value: int = Field(description="Growth value (成长值) over the window; not spendable")
    progress_bp: int = Field(description="From this tier's threshold to the next, 0-10000")
    period_last_day: date = Field(description="Last local day of the current period")
    keep_needed: int = Field(description="Still needed by period_last_day to keep the tier")
    next_tier: TierInfo | None
    next_needed: int
    projection: str
    override_tier: str | None
    override_until: datetime | None
    override_reason: str | None
    grace_until: datetime | None


class HistoryEntry(BaseModel):
    from_tier: str
    to_tier: str
    reason: str = Field(examples=["upgrade"])
    figures: dict[str, Any] = Field(description="The figures behind the decision")
    programme_version: int
    changed_at: datetime


class TierHistory(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entries": [
                        {
                            "from_tier": "vip",
                            "to_tier": "svip",
                            "reason": "upgrade",
                            "figures": {"metric": "paid_spend", "value": 50200, "threshold": 50000},
                            "programme_version": 3,
                            "changed_at": "2026-11-25T04:12:31Z",
                        }
                    ]
                }
            ]
        }
    )

    entries: list[HistoryEntry]


class GrowthActionIn(BaseModel):
    action: Literal["check_in", "review", "referral"]
    reference_id: str = Field(min_length=1, max_length=128)
    occurred_at: datetime | None = None


class GrowthActionOut(BaseModel):
    awarded: int
    capped: bool = Field(description="The per-day/per-month cap refused the award")
    replayed: bool = Field(description="This reference was recorded before")


class ProgrammeIn(BaseModel):
    effective_from: datetime = Field(description="Applies from here; not in the past")
    qualifying_metric: Literal["growth_value", "paid_spend", "order_count"]
    window_months: int = Field(description="Rolling window of the metric, 1-36")
    ladder: list[dict[str, Any]] = Field(
        description="Ordered tiers: {code, name, threshold, retention?, benefits}",
        examples=[[{"code": "regular", "name": "普通会员", "threshold": 0}]],
    )
    rules: dict[str, Any] = Field(
        description="{period: {unit, length}, downgrade, grace_days, timezone, growth, segments}",
        examples=[{"period": {"unit": "month", "length": 12}, "grace_days": 14}],
    )
    note: str = Field(default="", max_length=500)


class ProgrammeOut(BaseModel):
    programme_id: str
    version: int
    effective_from: datetime
    qualifying_metric: str
    window_months: int
    ladder: list[dict[str, Any]]
    rules: dict[str, Any]
    note: str


class Movement(BaseModel):
    from_tier: str
    to_tier: str
    members: int


class Simulation(BaseModel):
    members: int
    upgrades: int = Field(description="Would move up at once")
    kept_by_retention: int = Field(description="Below the draft's level, above its retention bar")
    at_risk: int = Field(description="Would drop at their period end unless they qualify")
    movements: list[Movement]


class OverrideIn(BaseModel):
    tier_code: str = Field(min_length=1, max_length=32)
    until: datetime
    reason: str = Field(min_length=1, max_length=256)


class Bucket(BaseModel):
    dimension: str = Field(examples=["stage"])
    value: str = Field(examples=["active"])
    members: int
    change: int = Field(description="Since the previous run")


class Distribution(BaseModel):
    run_id: int
    as_of: datetime | None
    members: int
    tier_changes: int
    segment_changes: int
    stage_changes: int
    buckets: list[Bucket]


def _tier(info: tiering_pb2.TierInfo) -> TierInfo:
    b = info.benefits
    return TierInfo(
        code=info.code,
        name=info.name,
        threshold=info.threshold,
        retention=info.retention,
        benefits=Benefits(
            points_multiplier_bp=b.points_multiplier_bp,
            birthday_coupon_template=b.birthday_coupon_template or None,
            upgrade_gift_coupon_template=b.upgrade_gift_coupon_template or None,
            free_delivery=b.free_delivery,
            priority=b.priority,
        ),
    )


def member_tier(reply: tiering_pb2.MemberTier) -> MemberTier:
    """The MemberTier reply as the API shows it (also in the member centre, api/centre.py)."""
    return MemberTier(
        member_id=reply.member_id,
        programme_id=reply.programme_id,
        programme_version=reply.programme_version,
        tier=_tier(reply.tier),
        earned_tier=reply.earned_tier,
        qualifying_metric=reply.qualifying_metric,
        metric_value=reply.metric_value,
        growth_value=reply.growth_value,
        progress_bp=reply.progress_bp,
        period_last_day=date.fromisoformat(reply.period_last_day),
        keep_needed=reply.keep_needed,
        next_tier=_tier(reply.next_tier) if reply.HasField("next_tier") else None,
        next_needed=reply.next_needed,
        projection=reply.projection,
        override_tier=reply.override_tier or None,
        override_until=to_datetime(reply.override_until),
        override_reason=reply.override_reason or None,
        grace_until=to_datetime(reply.grace_until),
    )


def _programme_out(reply: tiering_pb2.Programme) -> ProgrammeOut:
    return ProgrammeOut(
        programme_id=reply.programme_id,
        version=reply.version,
        effective_from=utc(reply.effective_from),
        qualifying_metric=reply.qualifying_metric,
        window_months=reply.window_months,
        ladder=json.loads(reply.ladder_json),
        rules=json.loads(reply.rules_json),
        note=reply.note,
    )


def _programme_in(programme_id: str, body: ProgrammeIn) -> tiering_pb2.Programme:
    return tiering_pb2.Programme(
        programme_id=programme_id,
        effective_from=timestamp(body.effective_from),
        qualifying_metric=body.qualifying_metric,
        window_months=body.window_months,
        ladder_json=json.dumps(body.ladder, ensure_ascii=False),
        rules_json=json.dumps(body.rules, ensure_ascii=False),
        note=body.note,
    )


# ---- member centre ----------------------------------------------------------------------


@router.get(
    "/v1/members/{member_id}/tier",
    response_model=MemberTier,
    tags=["tiers"],
    summary="Tier, benefits, growth value, progress and what keeps or lifts the tier",
    responses=MEMBER_ERRORS,
)
async def get_tier(member_id: MemberId, request: Request) -> MemberTier:
    return member_tier(await downstreams(request).tiering.get_member_tier(str(member_id)))


@router.get(
    "/v1/members/{member_id}/tier/history",
    response_model=TierHistory,
    tags=["tiers"],
    summary="Every tier change with its reason and figures, newest first",
    responses=MEMBER_ERRORS,
)
async def get_tier_history(
    member_id: MemberId,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> TierHistory:
    reply = await downstreams(request).tiering.get_tier_history(str(member_id), limit)
    return TierHistory(
        entries=[
            HistoryEntry(
                from_tier=e.from_tier,
                to_tier=e.to_tier,
                reason=e.reason,
                figures=json.loads(e.figures_json or "{}"),
                programme_version=e.programme_version,
                changed_at=utc(e.changed_at),
            )
            for e in reply.entries
        ]
    )


@router.post(
    "/v1/members/{member_id}/growth-actions",
    response_model=GrowthActionOut,
    tags=["tiers"],
    summary="Growth value for a check-in, review or referral (capped, idempotent)",
    responses=MEMBER_ERRORS,
)
async def record_growth_action(
    member_id: MemberId, body: GrowthActionIn, request: Request
) -> GrowthActionOut:
    grpc_request = tiering_pb2.RecordGrowthActionRequest(
        member_id=str(member_id),
        action=body.action,
        reference_id=body.reference_id,
        occurred_at=optional_timestamp(body.occurred_at),
    )
    reply = await downstreams(request).tiering.record_growth_action(grpc_request)
    return GrowthActionOut(awarded=reply.awarded, capped=reply.capped, replayed=reply.replayed)


# ---- operators ----------------------------------------------------------------------------


@router.get(
    "/v1/admin/tier-programmes/{programme_id}",
    response_model=ProgrammeOut,
    tags=["admin"],
    summary="The programme version in force (now, or at `at`)",
    responses=PROGRAMME_ERRORS,
)
async def get_programme(
    programme_id: ProgrammeId, request: Request, at: datetime | None = None
) -> ProgrammeOut:
    grpc_request = tiering_pb2.GetProgrammeRequest(
        programme_id=programme_id, at=optional_timestamp(at)
    )
    return _programme_out(await downstreams(request).tiering.get_programme(grpc_request))


@router.post(
    "/v1/admin/tier-programmes/{programme_id}/versions",
    response_model=ProgrammeOut,
    status_code=201,
    tags=["admin"],
    summary="Publish a new version, applying from its effective_from",
    responses=PROGRAMME_ERRORS,
)
async def publish_programme(
    programme_id: ProgrammeId, body: ProgrammeIn, request: Request
) -> ProgrammeOut:
    reply = await downstreams(request).tiering.publish_programme(_programme_in(programme_id, body))
    return _programme_out(reply)


@router.post(
    "/v1/admin/tier-programmes/{programme_id}/simulations",
    response_model=Simulation,
    tags=["admin"],
    summary="What a draft version would change for today's members (nothing is stored)",
    responses=PROGRAMME_ERRORS,
)
async def simulate_programme(
    programme_id: ProgrammeId, body: ProgrammeIn, request: Request
) -> Simulation:
    reply = await downstreams(request).tiering.simulate_programme(_programme_in(programme_id, body))
    return Simulation(
        members=reply.members,
        upgrades=reply.upgrades,
        kept_by_retention=reply.kept_by_retention,
        at_risk=reply.at_risk,
        movements=[
            Movement(from_tier=m.from_tier, to_tier=m.to_tier, members=m.members)
            for m in reply.movements
        ],
    )


@router.put(
    "/v1/admin/members/{member_id}/tier-override",
    response_model=MemberTier,
    tags=["admin"],
    summary="Put a tier floor on a member until a date, with a reason",
    responses=MEMBER_ERRORS,
)
async def set_override(member_id: MemberId, body: OverrideIn, request: Request) -> MemberTier:
    reply = await downstreams(request).tiering.set_tier_override(
        tiering_pb2.SetTierOverrideRequest(
            member_id=str(member_id),
            tier_code=body.tier_code,
            until=timestamp(body.until),
            reason=body.reason,
        )
    )
    return member_tier(reply)


@router.delete(
    "/v1/admin/members/{member_id}/tier-override",
    response_model=MemberTier,
    tags=["admin"],
    summary="Lift a member's tier floor",
    responses=MEMBER_ERRORS,
)
async def lift_override(
    member_id: MemberId,
    request: Request,
    reason: Annotated[str, Query(min_length=1, max_length=256)],
) -> MemberTier:
    reply = await downstreams(request).tiering.set_tier_override(
        tiering_pb2.SetTierOverrideRequest(member_id=str(member_id), reason=reason)
    )
    return member_tier(reply)


@router.get(
    "/v1/admin/reports/tier-distribution",
    response_model=Distribution,
    tags=["admin"],
    summary="Members per tier, segment and stage after the latest batch, with movement",
)
async def distribution(request: Request) -> Distribution:
    reply = await downstreams(request).tiering.get_distribution_report()
    return Distribution(
        run_id=reply.run_id,
        as_of=to_datetime(reply.as_of),
        members=reply.members,
        tier_changes=reply.tier_changes,
        segment_changes=reply.segment_changes,
        stage_changes=reply.stage_changes,
        buckets=[
            Bucket(dimension=b.dimension, value=b.value, members=b.members, change=b.change)
            for b in reply.buckets
        ],
    )
