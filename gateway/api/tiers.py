"""Tier routes (tiering service): the member centre (tier, benefits, growth,
progress, projection, history, growth actions) and operators (programme
versions and simulations, overrides, the distribution report)."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

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


# Examples of what the API answers, on the demo programme of docs/tiers.md
# (paid spend in fen over 12 months; SVIP from ¥500, VIP from ¥1,500).
SVIP_EXAMPLE: JsonDict = {
    "code": "svip",
    "name": "SVIP",
    "threshold": 50000,
    "retention": 30000,
    "benefits": {
        "points_multiplier_bp": 12000,
        "birthday_coupon_template": "birthday-drink",
        "upgrade_gift_coupon_template": None,
        "free_delivery": False,
        "priority": 0,
    },
}
VIP_EXAMPLE: JsonDict = {
    "code": "vip",
    "name": "VIP",
    "threshold": 150000,
    "retention": 100000,
    "benefits": {
        "points_multiplier_bp": 15000,
        "birthday_coupon_template": "birthday-drink-and-gift",
        "upgrade_gift_coupon_template": "vip-welcome-gift",
        "free_delivery": True,
        "priority": 1,
    },
}
# ¥580 in the window, of which ¥180 still counts on 31 Dec: ¥120 more keeps
# SVIP (bar ¥300), ¥920 more reaches VIP; 8% of the way from SVIP to VIP.
MEMBER_TIER_EXAMPLE: JsonDict = {
    "member_id": MEMBER_ID_EXAMPLE,
    "programme_id": "default",
    "programme_version": 3,
    "tier": SVIP_EXAMPLE,
    "earned_tier": "svip",
    "qualifying_metric": "paid_spend",
    "metric_value": 58000,
    "growth_value": 612,
    "progress_bp": 800,
    "period_last_day": "2026-12-31",
    "keep_needed": 12000,
    "next_tier": VIP_EXAMPLE,
    "next_needed": 92000,
    "projection": "¥120 more by 31 Dec keeps SVIP; ¥920 more reaches VIP",
    "override_tier": None,
    "override_until": None,
    "override_reason": None,
    "grace_until": None,
}
# The same member with a VIP floor until the end of August: the tier shown is
# VIP, the top one, so there is no next tier.
OVERRIDDEN_TIER_EXAMPLE: JsonDict = {
    **MEMBER_TIER_EXAMPLE,
    "tier": VIP_EXAMPLE,
    "progress_bp": 10000,
    "keep_needed": 82000,
    "next_tier": None,
    "next_needed": 0,
    "projection": "¥820 more by 31 Dec keeps VIP",
    "override_tier": "vip",
    "override_until": "2026-08-31T15:59:59Z",
    "override_reason": "complaint #8812: VIP for the summer",
}


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
        json_schema_extra={"examples": [MEMBER_TIER_EXAMPLE, OVERRIDDEN_TIER_EXAMPLE]}
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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"awarded": 5, "capped": False, "replayed": False},
                # The day's check-in was already awarded.
                {"awarded": 0, "capped": True, "replayed": False},
                # A retry of a recorded reference_id awards nothing again.
                {"awarded": 0, "capped": False, "replayed": True},
            ]
        }
    )

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
    # As stored: every benefit of every tier, defaults included; `retention`
    # only where the tier sets one.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "programme_id": "default",
                    "version": 4,
                    "effective_from": "2026-12-31T16:00:00Z",
                    "qualifying_metric": "paid_spend",
                    "window_months": 12,
                    "ladder": [
                        {
                            "code": "regular",
                            "name": "普通会员",
                            "threshold": 0,
                            "benefits": {
                                "points_multiplier_bp": 10000,
                                "birthday_coupon_template": None,
                                "free_delivery": False,
                                "upgrade_gift_coupon_template": None,
                                "priority": 0,
                            },
                        },
                        {
                            "code": "svip",
                            "name": "SVIP",
                            "threshold": 50000,
                            "benefits": {
                                "points_multiplier_bp": 12000,
                                "birthday_coupon_template": "birthday-drink",
                                "free_delivery": False,
                                "upgrade_gift_coupon_template": None,
                                "priority": 0,
                            },
                            "retention": 30000,
                        },
                        {
                            "code": "vip",
                            "name": "VIP",
                            "threshold": 150000,
                            "benefits": {
                                "points_multiplier_bp": 15000,
                                "birthday_coupon_template": "birthday-drink-and-gift",
                                "free_delivery": True,
                                "upgrade_gift_coupon_template": "vip-welcome-gift",
                                "priority": 1,
                            },
                            "retention": 100000,
                        },
                    ],
                    "rules": {
                        "period": {"unit": "month", "length": 12},
                        "downgrade": "one_level",
                        "grace_days": 14,
                        "timezone": "Asia/Shanghai",
                        "growth": {
                            "order_fen_per_point": 100,
                            "order_cap": 0,
                            "actions": {
                                "check_in": {"points": 5, "cap": 1, "per": "day"},
                                "referral": {"points": 50, "cap": 10, "per": "month"},
                                "review": {"points": 10, "cap": 3, "per": "day"},
                            },
                        },
                        "segments": {
                            "rfm_window_months": 3,
                            "new_days": 7,
                            "growing_days": 30,
                            "silent_days": 30,
                            "churned_days": 90,
                            "relative_top_pct": 15,
                            "relative_next_pct": 30,
                        },
                    },
                    "note": "2027: 14 days of grace",
                }
            ]
        }
    )

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
    # A draft lowering SVIP to ¥400 and raising VIP to ¥2,000: (current tier,
    # tier the draft gives today) for everyone, the unmoved included.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "members": 870380,
                    "upgrades": 9310,
                    "kept_by_retention": 870,
                    "at_risk": 250,
                    "movements": [
                        {"from_tier": "regular", "to_tier": "regular", "members": 812400},
                        {"from_tier": "regular", "to_tier": "svip", "members": 9310},
                        {"from_tier": "svip", "to_tier": "svip", "members": 41500},
                        {"from_tier": "vip", "to_tier": "svip", "members": 1120},
                        {"from_tier": "vip", "to_tier": "vip", "members": 6050},
                    ],
                }
            ]
        }
    )

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
    # Every dimension counts every member (870,380; 1,420 more than at the
    # previous run); values in order within a dimension.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "run_id": 412,
                    "as_of": "2026-05-06T18:00:00Z",
                    "members": 870380,
                    "tier_changes": 8412,
                    "segment_changes": 31655,
                    "stage_changes": 18204,
                    "buckets": [
                        {
                            "dimension": "tier",
                            "value": "regular",
                            "members": 821720,
                            "change": -6770,
                        },
                        {"dimension": "tier", "value": "svip", "members": 42610, "change": 8260},
                        {"dimension": "tier", "value": "vip", "members": 6050, "change": -70},
                        {
                            "dimension": "segment",
                            "value": "at_risk",
                            "members": 61240,
                            "change": 2130,
                        },
                        {
                            "dimension": "segment",
                            "value": "cant_lose",
                            "members": 9870,
                            "change": 410,
                        },
                        {
                            "dimension": "segment",
                            "value": "champions",
                            "members": 48310,
                            "change": -620,
                        },
                        {
                            "dimension": "segment",
                            "value": "hibernating",
                            "members": 88120,
                            "change": 3050,
                        },
                        {
                            "dimension": "segment",
                            "value": "lost",
                            "members": 203400,
                            "change": 1220,
                        },
                        {
                            "dimension": "segment",
                            "value": "loyal",
                            "members": 71560,
                            "change": -1340,
                        },
                        {"dimension": "segment", "value": "new", "members": 22930, "change": -4100},
                        {
                            "dimension": "segment",
                            "value": "potential",
                            "members": 96210,
                            "change": 880,
                        },
                        {
                            "dimension": "segment",
                            "value": "prospect",
                            "members": 268740,
                            "change": -210,
                        },
                        {
                            "dimension": "segment_group",
                            "value": "dormant",
                            "members": 291520,
                            "change": 4270,
                        },
                        {
                            "dimension": "segment_group",
                            "value": "high_value_core",
                            "members": 129740,
                            "change": -1550,
                        },
                        {
                            "dimension": "segment_group",
                            "value": "potential_nurture",
                            "members": 449120,
                            "change": -1300,
                        },
                        {
                            "dimension": "stage",
                            "value": "active",
                            "members": 186420,
                            "change": -2310,
                        },
                        {
                            "dimension": "stage",
                            "value": "churned",
                            "members": 402880,
                            "change": 7570,
                        },
                        {
                            "dimension": "stage",
                            "value": "growing",
                            "members": 41370,
                            "change": -1080,
                        },
                        {"dimension": "stage", "value": "new", "members": 9940, "change": -3890},
                        {
                            "dimension": "stage",
                            "value": "silent",
                            "members": 229770,
                            "change": 1130,
                        },
                        {
                            "dimension": "relative_tier",
                            "value": "regular",
                            "members": 777740,
                            "change": 850,
                        },
                        {
                            "dimension": "relative_tier",
                            "value": "svip",
                            "members": 61760,
                            "change": 380,
                        },
                        {
                            "dimension": "relative_tier",
                            "value": "vip",
                            "members": 30880,
                            "change": 190,
                        },
                    ],
                },
                # Before the first batch run.
                {
                    "run_id": 0,
                    "as_of": None,
                    "members": 0,
                    "tier_changes": 0,
                    "segment_changes": 0,
                    "stage_changes": 0,
                    "buckets": [],
                },
            ]
        }
    )

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
