"""Operator dashboards (scope admin:analytics, read-only): overview, tiers,
segments, lifecycle, points, coupons, referral, journeys. Every number is an
aggregate computed in SQL by the service owning the data (its Get*Analytics
RPC); the gateway validates the range, resolves the store / region filter to
store codes (rewards owns stores), fans out concurrently and shapes the JSON.
Contract and examples: docs/api.md, "Analytics (operators)"; what each number
means: docs/metrics.md (servicekit/metrics_definitions.py)."""

from __future__ import annotations

import asyncio
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.common.v1 import common_pb2
from loyalty.rewards.v1 import rewards_pb2
from servicekit.analytics import parse_day_range
from servicekit.errors import NotFound
from servicekit.metrics_definitions import definitions

from .common import downstreams, optional_utc, problem_response

router = APIRouter()

# The brand's days: every per-day series and range boundary is a local day here.
BRAND_TIME_ZONE = "Asia/Shanghai"

ANALYTICS_ERRORS: dict[int | str, dict[str, Any]] = {
    422: problem_response(
        "Bad filter; `field` names it: INVALID_DATE (from / to not YYYY-MM-DD),"
        " INVALID_RANGE (to before from), RANGE_TOO_LONG (more than 366 days)"
    ),
    404: problem_response("UNKNOWN_STORE (store), UNKNOWN_REGION (region: no store there)"),
    503: problem_response("A backing service is unavailable; retry later"),
}

FromDay = Annotated[
    str,
    Query(
        alias="from",
        max_length=10,
        description="First day (YYYY-MM-DD, Asia/Shanghai), included",
        examples=["2026-11-01"],
    ),
]
ToDay = Annotated[
    str,
    Query(
        alias="to",
        max_length=10,
        description="Last day (YYYY-MM-DD), included; at most 366 days after from",
        examples=["2026-11-30"],
    ),
]
StoreCode = Annotated[
    str | None, Query(max_length=32, description="Only this store (its code)", examples=["SH001"])
]
Region = Annotated[
    str | None,
    Query(max_length=200, description="Only stores in this city / region", examples=["上海"]),
]


# ---- filter ---------------------------------------------------------------------


class Filter(BaseModel):
    """The request's filter, as resolved (echoed in every answer)."""

    from_day: date = Field(alias="from")
    to_day: date = Field(alias="to")
    store: str | None
    region: str | None
    # The stores the filter resolved to; null = every store (no filter).
    store_ids: list[str] | None
    time_zone: str = BRAND_TIME_ZONE
    # What the store / region filter narrows on this dashboard (STORE_SCOPE):
    # "applied" every number, "partial" only the fields in
    # store_filter_applies_to, "not_applicable" none (no store dimension).
    store_filter: str = "applied"
    store_filter_applies_to: list[str] = []

    model_config = ConfigDict(serialize_by_alias=True)


# Which numbers of each dashboard have a store dimension, as the owning
# service's SQL filters them (by_store / store_ids of AnalyticsFilter): the
# answer says so, so a filtered view never silently shows brand-wide numbers.
STORE_SCOPE: dict[str, tuple[str, list[str]]] = {
    # member: new members by their enrolment store; rewards: orders by store.
    "overview": ("applied", []),
    # rewards: an order's points by the order's store, other points and the
    # liability by the member's store (metrics_definitions.MEMBER_STORE).
    "points": ("applied", []),
    # Issuing and the funnel by the coupon member's store; redemptions by store
    # of the order.
    "coupons": ("applied", []),
    # tiering: per member, by the member's store (metrics_definitions.MEMBER_STORE);
    # lifecycle transitions by the store recorded with them.
    "tiers": ("applied", []),
    "segments": ("applied", []),
    "lifecycle": ("applied", []),
    # Every referral figure by the inviter's store.
    "referral": ("applied", []),
    # engagement: enrollments by their member's store (MEMBER_STORE).
    "journeys": ("applied", []),
}


def parse_range(from_value: str, to_value: str) -> tuple[date, date]:
    return parse_day_range(from_value, to_value, "from", "to")


async def resolve_filter(
    request: Request,
    from_value: str,
    to_value: str,
    store: str | None,
    region: str | None,
    dashboard: str,
) -> tuple[Filter, common_pb2.AnalyticsFilter]:
    first, last = parse_range(from_value, to_value)
    store_ids: list[str] | None = None
    if store or region:
        reply = await downstreams(request).rewards.call(
            "ListStores", rewards_pb2.ListStoresRequest()
        )
        known = {s.store_id: s for s in reply.stores}
        if store and store not in known:
            raise NotFound(f"no store {store!r}", code="UNKNOWN_STORE", field="store")
        if region and not any(s.city == region for s in known.values()):
            raise NotFound(f"no store in region {region!r}", code="UNKNOWN_REGION", field="region")
        store_ids = sorted(
            code
            for code, s in known.items()
            if (not store or code == store) and (not region or s.city == region)
        )
    scope, applies_to = STORE_SCOPE[dashboard]
    resolved = Filter.model_validate(
        {
            "from": first,
            "to": last,
            "store": store,
            "region": region,
            "store_ids": store_ids,
            "store_filter": scope,
            "store_filter_applies_to": applies_to,
        }
    )
    wire = common_pb2.AnalyticsFilter(
        from_day=first.isoformat(),
        to_day=last.isoformat(),
        time_zone=BRAND_TIME_ZONE,
        by_store=store_ids is not None,
        store_ids=store_ids or [],
    )
    return resolved, wire


# ---- answers ----------------------------------------------------------------------


class Count(BaseModel):
    key: str
    count: int


class Envelope(BaseModel):
    filter: Filter
    definitions: dict[str, str] = Field(
        description="What each number means (docs/metrics.md), by metric key"
    )


def counts(items: Any) -> list[Count]:
    return [Count(key=c.key, count=c.count) for c in items]


FILTER_EXAMPLE: JsonDict = {
    "from": "2026-11-01",
    "to": "2026-11-30",
    "store": None,
    "region": "上海",
    "store_ids": ["SH001", "SH002"],
    "time_zone": BRAND_TIME_ZONE,
    "store_filter": "applied",
    "store_filter_applies_to": [],
}
DEFINITIONS_EXAMPLE: JsonDict = {"repurchase_rate": "Of the members who ordered within ..."}


class MembersBlock(BaseModel):
    total: int
    new: int
    new_by_day: list[Count]
    new_by_channel: list[Count]
    new_by_store: list[Count]


class OrderDay(BaseModel):
    day: date
    orders: int
    spend_fen: int


class OrderStore(BaseModel):
    store_id: str
    orders: int
    spend_fen: int


class OrdersBlock(BaseModel):
    orders: int
    spend_fen: int
    buyers: int
    repeat_buyers: int
    repurchase_rate: float = Field(description="repeat_buyers / buyers, 0..1")
    active_members_30d: int
    by_day: list[OrderDay]
    by_store: list[OrderStore]


class Overview(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "members": {
                        "total": 1260,
                        "new": 310,
                        "new_by_day": [{"key": "2026-11-01", "count": 9}],
                        "new_by_channel": [{"key": "mini-program", "count": 180}],
                        "new_by_store": [{"key": "SH001", "count": 120}],
                    },
                    "orders": {
                        "orders": 820,
                        "spend_fen": 2460000,
                        "buyers": 400,
                        "repeat_buyers": 150,
                        "repurchase_rate": 0.375,
                        "active_members_30d": 380,
                        "by_day": [{"day": "2026-11-01", "orders": 31, "spend_fen": 93000}],
                        "by_store": [{"store_id": "SH001", "orders": 500, "spend_fen": 1500000}],
                    },
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    members: MembersBlock
    orders: OrdersBlock


class TierFlow(BaseModel):
    from_tier: str
    to_tier: str
    members: int


class TierDay(BaseModel):
    day: date
    up: int
    down: int


class TierProjection(BaseModel):
    tier: str
    members: int
    at_risk: int
    near_next: int


class Movements(BaseModel):
    since: datetime | None = Field(description="Start of the last finished recompute run")
    up: int
    down: int
    kept: int
    flows: list[TierFlow]


class Tiers(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "distribution": [
                        {"key": "member", "count": 900},
                        {"key": "svip", "count": 300},
                        {"key": "vip", "count": 60},
                    ],
                    "in_grace": 8,
                    "movements": {
                        "since": "2026-11-30T18:00:00Z",
                        "up": 12,
                        "down": 3,
                        "kept": 1245,
                        "flows": [{"from_tier": "member", "to_tier": "svip", "members": 12}],
                    },
                    "by_day": [{"day": "2026-11-01", "up": 2, "down": 0}],
                    "projections": [
                        {"tier": "svip", "members": 300, "at_risk": 40, "near_next": 11}
                    ],
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    distribution: list[Count]
    in_grace: int
    movements: Movements
    by_day: list[TierDay]
    projections: list[TierProjection]


class RfmCell(BaseModel):
    r: int
    f: int
    members: int
    avg_spend_fen: int


class Segments(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "rfm": [{"r": 5, "f": 4, "members": 30, "avg_spend_fen": 12800}],
                    "segments": [{"key": "champions", "count": 40}],
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    rfm: list[RfmCell]
    segments: list[Count]


class StageTransition(BaseModel):
    day: date
    from_stage: str
    to_stage: str
    members: int


class Lifecycle(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "stages": [{"key": "active", "count": 300}],
                    "transitions": [
                        {
                            "day": "2026-11-02",
                            "from_stage": "new",
                            "to_stage": "active",
                            "members": 5,
                        }
                    ],
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    stages: list[Count]
    transitions: list[StageTransition]


class Liability(BaseModel):
    as_of: datetime | None
    outstanding_points: int
    outstanding_fen: int
    pending_points: int
    pending_fen: int
    expiring_30d_points: int
    expiring_30d_fen: int


class PointsDay(BaseModel):
    day: date
    earned: int
    spent: int
    expired: int


class Points(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "points_value_fen": 1,
                    "liability": {
                        "as_of": "2026-12-01T02:00:00Z",
                        "outstanding_points": 182000,
                        "outstanding_fen": 182000,
                        "pending_points": 3200,
                        "pending_fen": 3200,
                        "expiring_30d_points": 5400,
                        "expiring_30d_fen": 5400,
                    },
                    "by_day": [{"day": "2026-11-01", "earned": 930, "spent": 200, "expired": 0}],
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    points_value_fen: int = Field(description="What one point is worth, in fen")
    liability: Liability
    by_day: list[PointsDay]


class TemplateFunnel(BaseModel):
    template_id: str
    name: str
    issued: int
    locked: int
    redeemed: int
    expired: int
    redemption_rate: float
    discount_fen: int


class CouponDay(BaseModel):
    day: date
    issued: int
    redeemed: int
    redemption_rate: float


class CouponStore(BaseModel):
    store_id: str
    redeemed: int
    discount_fen: int


class Coupons(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "templates": [
                        {
                            "template_id": "welcome-5off",
                            "name": "新人立减5元",
                            "issued": 300,
                            "locked": 2,
                            "redeemed": 120,
                            "expired": 40,
                            "redemption_rate": 0.4,
                            "discount_fen": 60000,
                        }
                    ],
                    "by_day": [
                        {"day": "2026-11-01", "issued": 10, "redeemed": 4, "redemption_rate": 0.4}
                    ],
                    "by_store": [{"store_id": "SH001", "redeemed": 70, "discount_fen": 35000}],
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    templates: list[TemplateFunnel]
    by_day: list[CouponDay]
    by_store: list[CouponStore]


class TopInviter(BaseModel):
    member_id: str
    accepted: int
    first_orders: int


class Referral(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "invites": 60,
                    "accepted": 40,
                    "first_orders": 25,
                    "inviters": 25,
                    "fission_ratio": 1.6,
                    "top_inviters": [
                        {
                            "member_id": "0b6a3c1e-5d7f-4b8e-9a2c-1f3e5d7a9b0c",
                            "accepted": 6,
                            "first_orders": 4,
                        }
                    ],
                    "abuse_refusals": 3,
                    "refusals_by_reason": [{"key": "FINGERPRINT_ALREADY_USED", "count": 3}],
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    invites: int
    accepted: int
    first_orders: int
    inviters: int
    fission_ratio: float
    top_inviters: list[TopInviter]
    abuse_refusals: int
    refusals_by_reason: list[Count]


class Lift(BaseModel):
    treated_rate: float
    holdout_rate: float
    lift: float
    ci_low: float
    ci_high: float


class StepFunnel(BaseModel):
    step_id: str
    entered: int
    sent: dict[str, int] = Field(description="Messages by send status, every status listed")
    converted: int


class JourneyFunnel(BaseModel):
    journey_id: str
    status: str
    entered: int
    converted: int
    treated: int
    holdout: int
    treated_converted: int
    holdout_converted: int
    steps: list[StepFunnel]
    lift: Lift | None = Field(description="Absent until both groups have members")


SENT_EXAMPLE: JsonDict = {
    "pending": 0,
    "delivered": 38,
    "failed": 1,
    "capped": 2,
    "suppressed": 1,
    "dropped": 0,
    "no_credit": 0,
    "unknown": 0,
}


class Journeys(Envelope):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filter": FILTER_EXAMPLE,
                    "journeys": [
                        {
                            "journey_id": "welcome",
                            "status": "active",
                            "entered": 50,
                            "converted": 21,
                            "treated": 45,
                            "holdout": 5,
                            "treated_converted": 20,
                            "holdout_converted": 1,
                            "steps": [
                                {
                                    "step_id": "hello",
                                    "entered": 45,
                                    "sent": SENT_EXAMPLE,
                                    "converted": 20,
                                }
                            ],
                            "lift": {
                                "treated_rate": 0.444,
                                "holdout_rate": 0.2,
                                "lift": 0.244,
                                "ci_low": -0.13,
                                "ci_high": 0.62,
                            },
                        }
                    ],
                    "definitions": DEFINITIONS_EXAMPLE,
                }
            ]
        }
    )

    journeys: list[JourneyFunnel]


# ---- routes -------------------------------------------------------------------------

_ROUTE = {"tags": ["analytics"], "responses": ANALYTICS_ERRORS}


@router.get(
    "/v1/admin/analytics/overview",
    response_model=Overview,
    summary="Members, active members, repurchase rate, orders and spend",
    **_ROUTE,  # type: ignore[arg-type]
)
async def overview(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Overview:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "overview")
    d = downstreams(request)
    members, orders = await asyncio.gather(
        d.member.analytics("GetMemberAnalytics", wire),
        d.rewards.analytics("GetOrderAnalytics", wire),
    )
    return Overview(
        filter=resolved,
        members=MembersBlock(
            total=members.total,
            new=members.new_members,
            new_by_day=counts(members.new_by_day),
            new_by_channel=counts(members.new_by_channel),
            new_by_store=counts(members.new_by_store),
        ),
        orders=OrdersBlock(
            orders=orders.orders,
            spend_fen=orders.spend_fen,
            buyers=orders.buyers,
            repeat_buyers=orders.repeat_buyers,
            repurchase_rate=orders.repurchase_rate,
            active_members_30d=orders.active_members_30d,
            by_day=[
                OrderDay(day=date.fromisoformat(x.day), orders=x.orders, spend_fen=x.spend_fen)
                for x in orders.by_day
            ],
            by_store=[
                OrderStore(store_id=x.store_id, orders=x.orders, spend_fen=x.spend_fen)
                for x in orders.by_store
            ],
        ),
        definitions=definitions("overview"),
    )


@router.get(
    "/v1/admin/analytics/tiers",
    response_model=Tiers,
    summary="Tier distribution, movements since the last recompute, grace, projections",
    **_ROUTE,  # type: ignore[arg-type]
)
async def tiers(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Tiers:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "tiers")
    t = await downstreams(request).tiering.analytics("GetTierAnalytics", wire)
    return Tiers(
        filter=resolved,
        distribution=counts(t.distribution),
        in_grace=t.in_grace,
        movements=Movements(
            since=optional_utc(t, "movements_since"),
            up=t.up,
            down=t.down,
            kept=t.kept,
            flows=[
                TierFlow(from_tier=f.from_tier, to_tier=f.to_tier, members=f.members)
                for f in t.flows
            ],
        ),
        by_day=[TierDay(day=date.fromisoformat(x.day), up=x.up, down=x.down) for x in t.by_day],
        projections=[
            TierProjection(tier=p.tier, members=p.members, at_risk=p.at_risk, near_next=p.near_next)
            for p in t.projections
        ],
        definitions=definitions("tiers"),
    )


@router.get(
    "/v1/admin/analytics/segments",
    response_model=Segments,
    summary="RFM heatmap (R x F: members, average spend) and segments",
    **_ROUTE,  # type: ignore[arg-type]
)
async def segments(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Segments:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "segments")
    s = await downstreams(request).tiering.analytics("GetSegmentAnalytics", wire)
    return Segments(
        filter=resolved,
        rfm=[
            RfmCell(r=c.r, f=c.f, members=c.members, avg_spend_fen=c.avg_spend_fen) for c in s.rfm
        ],
        segments=counts(s.segments),
        definitions=definitions("segments"),
    )


@router.get(
    "/v1/admin/analytics/lifecycle",
    response_model=Lifecycle,
    summary="Lifecycle stages and their transitions per day",
    **_ROUTE,  # type: ignore[arg-type]
)
async def lifecycle(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Lifecycle:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "lifecycle")
    s = await downstreams(request).tiering.analytics("GetSegmentAnalytics", wire)
    return Lifecycle(
        filter=resolved,
        stages=counts(s.stages),
        transitions=[
            StageTransition(
                day=date.fromisoformat(t.day),
                from_stage=t.from_stage,
                to_stage=t.to_stage,
                members=t.members,
            )
            for t in s.transitions
        ],
        definitions=definitions("lifecycle"),
    )


@router.get(
    "/v1/admin/analytics/points",
    response_model=Points,
    summary="Points liability and earned / spent / expired per day",
    **_ROUTE,  # type: ignore[arg-type]
)
async def points(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Points:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "points")
    p = await downstreams(request).rewards.analytics("GetPointsAnalytics", wire)
    value = p.points_value_fen
    return Points(
        filter=resolved,
        points_value_fen=value,
        liability=Liability(
            as_of=optional_utc(p, "as_of"),
            outstanding_points=p.outstanding_points,
            outstanding_fen=p.outstanding_points * value,
            pending_points=p.pending_points,
            pending_fen=p.pending_points * value,
            expiring_30d_points=p.expiring_30d_points,
            expiring_30d_fen=p.expiring_30d_points * value,
        ),
        by_day=[
            PointsDay(
                day=date.fromisoformat(x.day), earned=x.earned, spent=x.spent, expired=x.expired
            )
            for x in p.by_day
        ],
        definitions=definitions("points"),
    )


@router.get(
    "/v1/admin/analytics/coupons",
    response_model=Coupons,
    summary="Coupon funnel per template, redemption rate per day, redemptions by store",
    **_ROUTE,  # type: ignore[arg-type]
)
async def coupons(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Coupons:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "coupons")
    c = await downstreams(request).rewards.analytics("GetCouponAnalytics", wire)
    return Coupons(
        filter=resolved,
        templates=[
            TemplateFunnel(
                template_id=t.template_id,
                name=t.name,
                issued=t.issued,
                locked=t.locked,
                redeemed=t.redeemed,
                expired=t.expired,
                redemption_rate=t.redemption_rate,
                discount_fen=t.discount_fen,
            )
            for t in c.templates
        ],
        by_day=[
            CouponDay(
                day=date.fromisoformat(x.day),
                issued=x.issued,
                redeemed=x.redeemed,
                redemption_rate=x.redemption_rate,
            )
            for x in c.by_day
        ],
        by_store=[
            CouponStore(store_id=x.store_id, redeemed=x.redeemed, discount_fen=x.discount_fen)
            for x in c.by_store
        ],
        definitions=definitions("coupons"),
    )


@router.get(
    "/v1/admin/analytics/referral",
    response_model=Referral,
    summary="Invites, accepted, first orders, fission ratio, top inviters, abuse refusals",
    **_ROUTE,  # type: ignore[arg-type]
)
async def referral(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Referral:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "referral")
    r = await downstreams(request).rewards.analytics("GetReferralAnalytics", wire)
    return Referral(
        filter=resolved,
        invites=r.invites,
        accepted=r.accepted,
        first_orders=r.first_orders,
        inviters=r.inviters,
        fission_ratio=r.fission_ratio,
        top_inviters=[
            TopInviter(member_id=i.member_id, accepted=i.accepted, first_orders=i.first_orders)
            for i in r.top_inviters
        ],
        abuse_refusals=r.abuse_refusals,
        refusals_by_reason=counts(r.refusals_by_reason),
        definitions=definitions("referral"),
    )


@router.get(
    "/v1/admin/analytics/journeys",
    response_model=Journeys,
    summary="Per journey and step: entered, sent by status, converted; holdout lift",
    **_ROUTE,  # type: ignore[arg-type]
)
async def journeys(
    request: Request,
    from_day: FromDay,
    to_day: ToDay,
    store: StoreCode = None,
    region: Region = None,
) -> Journeys:
    resolved, wire = await resolve_filter(request, from_day, to_day, store, region, "journeys")
    j = await downstreams(request).engagement.analytics("GetJourneyAnalytics", wire)
    return Journeys(
        filter=resolved,
        journeys=[
            JourneyFunnel(
                journey_id=x.journey_id,
                status=x.status,
                entered=x.entered,
                converted=x.converted,
                treated=x.treated,
                holdout=x.holdout,
                treated_converted=x.treated_converted,
                holdout_converted=x.holdout_converted,
                steps=[
                    StepFunnel(
                        step_id=s.step_id,
                        entered=s.entered,
                        sent={c.key: c.count for c in s.sent},
                        converted=s.converted,
                    )
                    for s in x.steps
                ],
                lift=Lift(
                    treated_rate=x.lift.treated_rate,
                    holdout_rate=x.lift.holdout_rate,
                    lift=x.lift.lift,
                    ci_low=x.lift.ci_low,
                    ci_high=x.lift.ci_high,
                )
                if x.has_lift
                else None,
            )
            for x in j.journeys
        ],
        definitions=definitions("journeys"),
    )
