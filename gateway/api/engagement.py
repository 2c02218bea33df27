"""Engagement routes: mini-program event ingestion and unsubscribe; operators
publish, pause and resume journeys, read their metrics and their sends (by
status and provider code, and the unknown ones), and list, replay or expire
parked events; the SMS provider's delivery reports (engagement service)."""

from __future__ import annotations

import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.engagement.v1 import engagement_pb2
from loyalty.member.v1 import member_pb2
from servicekit.errors import PermissionDenied
from servicekit.protos import to_datetime

from .common import (
    MEMBER_ERRORS,
    MEMBER_ID_EXAMPLE,
    MemberId,
    downstreams,
    optional_timestamp,
    problem_response,
)

router = APIRouter()

JourneyId = Annotated[
    str,
    Path(
        description="The journey's id",
        examples=["cart-abandoned"],
        pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$",
    ),
]

JOURNEY_ERRORS: dict[int | str, dict[str, Any]] = {
    422: problem_response("Invalid journey definition; `field` names the culprit"),
    404: problem_response("No such journey"),
    503: problem_response("The engagement service is unavailable; retry later"),
}

Channel = Literal["wecom", "sms", "miniprogram", "app_push"]


class MemberEvent(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "event_id": "6f1c2a1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f",
                    "type": "subscription_tap",
                    "attributes": {
                        "template": "order-ready",
                        "openid": "o6_bmjrPTlm6_2sgVt7hMZOPfL2M",
                    },
                }
            ]
        }
    )

    event_id: uuid.UUID = Field(description="Chosen by the caller; a retry with it is harmless")
    type: Literal[
        "cart_abandoned", "page_view", "check_in", "subscription_tap", "location_reported"
    ] = Field(
        description="location_reported takes attributes latitude, longitude and consent "
        '("true" keeps it for store offers; anything else deletes the last one)'
    )
    attributes: dict[str, str] = Field(default_factory=dict, max_length=20)
    occurred_at: datetime | None = Field(default=None, description="RFC 3339; now when absent")


class EventAccepted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"parked": False, "duplicate": False, "enrolled_journeys": ["cart-abandoned"]},
                {"parked": True, "duplicate": False, "enrolled_journeys": []},
            ]
        }
    )

    parked: bool = Field(description="The member is not known yet; kept and replayed later")
    duplicate: bool = Field(description="This event_id was already accepted")
    enrolled_journeys: list[str]


class Unsubscribe(BaseModel):
    channels: list[Channel] = Field(
        default_factory=list, description="Channels to stop; empty means all"
    )


ALL_CHANNELS = ("wecom", "sms", "miniprogram", "app_push")
MEMBER_CONSENT_CHANNELS = {
    "wecom": member_pb2.CONSENT_CHANNEL_WECOM,
    "sms": member_pb2.CONSENT_CHANNEL_SMS,
    "miniprogram": member_pb2.CONSENT_CHANNEL_MINI_PROGRAM,
    "app_push": member_pb2.CONSENT_CHANNEL_APP_PUSH,
}
# Where member's consent history says the refusal came from.
UNSUBSCRIBE_SOURCE = "mini-program:unsubscribe"


class Unsubscribed(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"member_id": MEMBER_ID_EXAMPLE, "channels": ["sms"]}]}
    )

    member_id: str
    channels: list[str] = Field(
        description="Every channel the member now refuses marketing on, as the member "
        "service records it (this request's and earlier refusals)"
    )


class Published(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"journey_id": "cart-abandoned", "version": 3}]}
    )

    journey_id: str
    version: int


class JourneyStatus(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"journey_id": "cart-abandoned", "status": "paused", "live_version": 3}]
        }
    )

    journey_id: str
    status: str = Field(examples=["active", "paused"])
    live_version: int


class StepMetrics(BaseModel):
    step_id: str
    sent: int
    delivered: int
    failed: int
    capped: int
    suppressed: int
    dropped: int


class Lift(BaseModel):
    treated_rate: float
    holdout_rate: float
    lift: float = Field(description="treated_rate - holdout_rate")
    ci_low: float = Field(description="95% confidence interval, low end")
    ci_high: float


class VariantMetrics(BaseModel):
    variant: str
    entered: int
    converted: int
    lift: Lift | None = Field(description="This branch against the holdout; null without one")


# A cart-abandoned journey with a 10% holdout and an A/B split of its reminder
# (docs/journeys.md); rates and intervals as services/engagement/domain.lift
# computes them from these counts (rounded here).
JOURNEY_METRICS_EXAMPLE: JsonDict = {
    "journey_id": "cart-abandoned",
    "status": "active",
    "live_version": 3,
    "entered": 2000,
    "active": 40,
    "treated": 1800,
    "holdout": 200,
    "treated_converted": 378,
    "holdout_converted": 30,
    "sent": 1628,
    "capped": 75,
    "suppressed": 38,
    "dropped": 19,
    "steps": [
        {
            "step_id": "remind-a",
            "sent": 820,
            "delivered": 790,
            "failed": 10,
            "capped": 35,
            "suppressed": 20,
            "dropped": 5,
        },
        {
            "step_id": "remind-b",
            "sent": 808,
            "delivered": 795,
            "failed": 8,
            "capped": 40,
            "suppressed": 18,
            "dropped": 14,
        },
    ],
    "variants": [
        {
            "variant": "A",
            "entered": 880,
            "converted": 211,
            "lift": {
                "treated_rate": 0.2398,
                "holdout_rate": 0.15,
                "lift": 0.0898,
                "ci_low": 0.0328,
                "ci_high": 0.1467,
            },
        },
        {
            "variant": "B",
            "entered": 880,
            "converted": 167,
            "lift": {
                "treated_rate": 0.1898,
                "holdout_rate": 0.15,
                "lift": 0.0398,
                "ci_low": -0.0161,
                "ci_high": 0.0956,
            },
        },
    ],
    "lift": {
        "treated_rate": 0.21,
        "holdout_rate": 0.15,
        "lift": 0.06,
        "ci_low": 0.0071,
        "ci_high": 0.1129,
    },
}


class JourneyMetrics(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOURNEY_METRICS_EXAMPLE]})

    journey_id: str
    status: str
    live_version: int
    entered: int
    active: int
    treated: int
    holdout: int
    treated_converted: int
    holdout_converted: int
    sent: int
    capped: int
    suppressed: int
    dropped: int
    steps: list[StepMetrics]
    variants: list[VariantMetrics]
    lift: Lift | None = Field(description="Null until both treated and holdout have members")


@router.post(
    "/v1/members/{member_id}/events",
    response_model=EventAccepted,
    status_code=202,
    tags=["engagement"],
    summary="Report a mini-program event (cart abandoned, page view, check-in, subscription "
    "tap, location)",
    responses=MEMBER_ERRORS,
)
async def ingest_event(member_id: MemberId, event: MemberEvent, request: Request) -> EventAccepted:
    reply = await downstreams(request).engagement.ingest_event(
        engagement_pb2.IngestEventRequest(
            event_id=str(event.event_id),
            member_id=str(member_id),
            event=event.type,
            attributes=event.attributes,
            occurred_at=optional_timestamp(event.occurred_at),
        )
    )
    return EventAccepted(
        parked=reply.parked,
        duplicate=reply.duplicate,
        enrolled_journeys=list(reply.enrolled_journeys),
    )


@router.post(
    "/v1/members/{member_id}/unsubscribe",
    response_model=Unsubscribed,
    tags=["engagement"],
    summary="Stop marketing messages on some or all channels (recorded in the member's "
    "consent history)",
    responses=MEMBER_ERRORS,
)
async def unsubscribe(
    member_id: MemberId, request: Request, body: Unsubscribe | None = None
) -> Unsubscribed:
    channels: list[str] = [str(c) for c in body.channels] if body else []
    # Consent is member's (one record, with its history): the refusal is
    # recorded there, and engagement follows member's ConsentChanged events
    # (it re-checks consent when each message is delivered).
    profile: member_pb2.Profile | None = None
    for channel in dict.fromkeys(channels or ALL_CHANNELS):
        profile = await downstreams(request).member.call(
            "SetConsent",
            member_pb2.SetConsentRequest(
                member_id=str(member_id),
                purpose=member_pb2.CONSENT_PURPOSE_MARKETING,
                channel=MEMBER_CONSENT_CHANNELS[channel],
                granted=False,
                source=UNSUBSCRIBE_SOURCE,
                actor="member",
            ),
        )
    assert profile is not None
    # The answer is member's record, not an echo of the request.
    refused = {
        c.channel
        for c in profile.consents
        if c.purpose == member_pb2.CONSENT_PURPOSE_MARKETING and not c.granted and c.source
    }
    return Unsubscribed(
        member_id=str(member_id),
        channels=[c for c in ALL_CHANNELS if MEMBER_CONSENT_CHANNELS[c] in refused],
    )


@router.post(
    "/v1/admin/journeys",
    response_model=Published,
    status_code=201,
    tags=["journeys"],
    summary="Publish a journey definition as its next version (docs/journeys.md)",
    responses=JOURNEY_ERRORS,
)
async def publish_journey(
    request: Request,
    definition: Annotated[
        dict[str, Any],
        Body(examples=[{"id": "cart-abandoned", "entry": {"event": "cart_abandoned"}}]),
    ],
) -> Published:
    reply = await downstreams(request).engagement.publish_journey(json.dumps(definition))
    return Published(journey_id=reply.journey_id, version=reply.version)


class JourneySummary(BaseModel):
    journey_id: str
    name: str = Field(description="The live version's name (its id when it has none)")
    live_version: int
    status: Literal["active", "paused"]
    channels: list[str] = Field(description="Channels of the live version's send steps")
    entered: int = Field(description="Enrolments of every version")
    active: int = Field(description="Enrolments still in progress")
    updated_at: datetime | None = Field(description="Last publish, pause or resume (UTC)")


class JourneyList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "journeys": [
                        {
                            "journey_id": "cart-abandoned",
                            "name": "Cart abandoned",
                            "live_version": 3,
                            "status": "active",
                            "channels": ["miniprogram", "sms"],
                            "entered": 1204,
                            "active": 87,
                            "updated_at": "2026-05-06T11:03:52Z",
                        }
                    ],
                    "next_page_token": None,
                }
            ]
        }
    )

    journeys: list[JourneySummary]
    next_page_token: str | None = Field(None, description="Pass as `page_token` for the next page")


@router.get(
    "/v1/admin/journeys",
    response_model=JourneyList,
    tags=["journeys"],
    summary="Every journey by id: live version, status, channels, enrolments",
    responses={
        422: problem_response("Bad page size or token; `field` names it"),
        503: problem_response("The engagement service is unavailable; retry later"),
    },
)
async def list_journeys(
    request: Request,
    page_size: Annotated[int, Query(ge=1, le=500)] = 100,
    page_token: Annotated[str, Query(max_length=64)] = "",
) -> JourneyList:
    reply = await downstreams(request).engagement.list_journeys(
        engagement_pb2.ListJourneysRequest(page_size=page_size, page_token=page_token)
    )
    return JourneyList(
        journeys=[
            JourneySummary(
                journey_id=j.journey_id,
                name=j.name,
                live_version=j.live_version,
                status=j.status,  # type: ignore[arg-type]
                channels=list(j.channels),
                entered=j.entered,
                active=j.active,
                updated_at=to_datetime(j.updated_at),
            )
            for j in reply.journeys
        ],
        next_page_token=reply.next_page_token or None,
    )


class LaunchNearStore(BaseModel):
    store_id: str = Field(min_length=1, max_length=32, examples=["SH001"])
    radius_m: int = Field(default=3000, ge=1, le=50_000, description="Metres (3 km default)")


class Launched(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "journey_id": "near-sh001-latte",
                    "store_id": "SH001",
                    "audience": 412,
                    "entered": 389,
                }
            ]
        }
    )

    journey_id: str
    store_id: str
    audience: int = Field(description="Members with a fresh, consented location in the radius")
    entered: int = Field(description="Of those, how many entered the journey")


@router.post(
    "/v1/admin/journeys/{journey_id}/launch-near-store",
    response_model=Launched,
    tags=["journeys"],
    summary="Enter a near_store journey for members within the radius of a store",
    responses=JOURNEY_ERRORS,
)
async def launch_near_store(
    journey_id: JourneyId, body: LaunchNearStore, request: Request
) -> Launched:
    ds = downstreams(request)
    store = await ds.rewards.get_store(body.store_id)
    reply = await ds.engagement.launch_near_store(
        engagement_pb2.LaunchNearStoreRequest(
            journey_id=journey_id,
            store_id=store.store_id,
            latitude=store.latitude,
            longitude=store.longitude,
            radius_m=body.radius_m,
        )
    )
    return Launched(
        journey_id=journey_id,
        store_id=store.store_id,
        audience=reply.audience,
        entered=reply.entered,
    )


def _status(reply: engagement_pb2.JourneyStatus) -> JourneyStatus:
    return JourneyStatus(
        journey_id=reply.journey_id, status=reply.status, live_version=reply.live_version
    )


@router.post(
    "/v1/admin/journeys/{journey_id}/pause",
    response_model=JourneyStatus,
    tags=["journeys"],
    summary="Pause a journey: its steps stop running",
    responses=JOURNEY_ERRORS,
)
async def pause_journey(journey_id: JourneyId, request: Request) -> JourneyStatus:
    return _status(await downstreams(request).engagement.pause_journey(journey_id))


@router.post(
    "/v1/admin/journeys/{journey_id}/resume",
    response_model=JourneyStatus,
    tags=["journeys"],
    summary="Resume a journey; stale steps that say drop_if_late are dropped",
    responses=JOURNEY_ERRORS,
)
async def resume_journey(journey_id: JourneyId, request: Request) -> JourneyStatus:
    return _status(await downstreams(request).engagement.resume_journey(journey_id))


@router.get(
    "/v1/admin/journeys/{journey_id}/metrics",
    response_model=JourneyMetrics,
    tags=["journeys"],
    summary="Entered, sent, capped, suppressed, converted; holdout lift and A/B branches",
    responses=JOURNEY_ERRORS,
)
async def journey_metrics(journey_id: JourneyId, request: Request) -> JourneyMetrics:
    m = await downstreams(request).engagement.journey_metrics(journey_id)
    return JourneyMetrics(
        journey_id=m.journey_id,
        status=m.status,
        live_version=m.live_version,
        entered=m.entered,
        active=m.active,
        treated=m.treated,
        holdout=m.holdout,
        treated_converted=m.treated_converted,
        holdout_converted=m.holdout_converted,
        sent=m.sent,
        capped=m.capped,
        suppressed=m.suppressed,
        dropped=m.dropped,
        steps=[
            StepMetrics(
                step_id=s.step_id,
                sent=s.sent,
                delivered=s.delivered,
                failed=s.failed,
                capped=s.capped,
                suppressed=s.suppressed,
                dropped=s.dropped,
            )
            for s in m.steps
        ],
        variants=[
            VariantMetrics(
                variant=v.variant,
                entered=v.entered,
                converted=v.converted,
                lift=_lift(v.lift) if v.has_lift else None,
            )
            for v in m.variants
        ],
        lift=_lift(m.lift) if m.has_lift else None,
    )


def _lift(m: engagement_pb2.Lift) -> Lift:
    return Lift(
        treated_rate=m.treated_rate,
        holdout_rate=m.holdout_rate,
        lift=m.lift,
        ci_low=m.ci_low,
        ci_high=m.ci_high,
    )


# ---- parked events (operators) ---------------------------------------------------


class ParkedEvent(BaseModel):
    id: int
    member_id: str
    event: str
    attributes: dict[str, str]
    occurred_at: datetime | None
    reason: str = Field(description="Why it was parked, e.g. UNKNOWN_MEMBER")
    parked_at: datetime | None


class ParkedEvents(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "id": 41,
                            "member_id": MEMBER_ID_EXAMPLE,
                            "event": "cart_abandoned",
                            "attributes": {},
                            "occurred_at": "2026-12-01T02:00:00Z",
                            "reason": "UNKNOWN_MEMBER",
                            "parked_at": "2026-12-01T02:00:01Z",
                        }
                    ],
                    "next_page_token": None,
                }
            ]
        }
    )

    events: list[ParkedEvent]
    next_page_token: str | None = Field(description="Null on the last page")


class Replayed(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"replayed": 2, "enrolled_journeys": ["cart-abandoned"]}]}
    )

    replayed: int
    enrolled_journeys: list[str]


class ExpireParked(BaseModel):
    older_than_days: int | None = Field(
        default=None, ge=1, le=3650, description="Default: the service's ENGAGEMENT_PARKED_TTL_DAYS"
    )


class Expired(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"expired": 12}]})

    expired: int


PARKED_ERRORS: dict[int | str, dict[str, Any]] = {
    422: problem_response("Bad member id, page size or token; `field` names it"),
    404: problem_response("No such member, or nothing parked for it"),
    503: problem_response("The engagement or member service is unavailable; retry later"),
}


@router.get(
    "/v1/admin/parked-events",
    response_model=ParkedEvents,
    tags=["journeys"],
    summary="Events kept for members engagement does not know yet, oldest first",
    responses=PARKED_ERRORS,
)
async def list_parked_events(
    request: Request,
    member_id: Annotated[uuid.UUID | None, Query(description="One member's only")] = None,
    page_size: Annotated[int, Query(ge=1, le=500)] = 100,
    page_token: Annotated[str, Query(max_length=40)] = "",
) -> ParkedEvents:
    reply = await downstreams(request).engagement.list_parked_events(
        engagement_pb2.ListParkedEventsRequest(
            member_id=str(member_id) if member_id else "",
            page_size=page_size,
            page_token=page_token,
        )
    )
    return ParkedEvents(
        events=[
            ParkedEvent(
                id=e.id,
                member_id=e.member_id,
                event=e.event,
                attributes=dict(e.attributes),
                occurred_at=to_datetime(e.occurred_at),
                reason=e.reason,
                parked_at=to_datetime(e.parked_at),
            )
            for e in reply.events
        ],
        next_page_token=reply.next_page_token or None,
    )


@router.post(
    "/v1/admin/parked-events/{member_id}/replay",
    response_model=Replayed,
    tags=["journeys"],
    summary="Replay a member's parked events once the member service confirms the member",
    responses=PARKED_ERRORS,
)
async def replay_parked_events(member_id: MemberId, request: Request) -> Replayed:
    ds = downstreams(request)
    # The member service is the judge of who exists: an unknown or erased id
    # is refused there (404) and its events stay parked until they expire.
    await ds.member.get_member(str(member_id))
    reply = await ds.engagement.replay_parked_events(str(member_id))
    return Replayed(replayed=reply.replayed, enrolled_journeys=list(reply.enrolled_journeys))


@router.post(
    "/v1/admin/parked-events/expire",
    response_model=Expired,
    tags=["journeys"],
    summary="Delete parked events older than a number of days",
    responses=PARKED_ERRORS,
)
async def expire_parked_events(request: Request, body: ExpireParked | None = None) -> Expired:
    days = body.older_than_days if body and body.older_than_days else 0
    reply = await downstreams(request).engagement.expire_parked_events(days)
    return Expired(expired=reply.expired)


# ---- channel sends: what operators see, and the SMS delivery reports --------------


class SendCountRow(BaseModel):
    step_id: str
    channel: str
    status: str = Field(
        description="pending | sending | delivered | failed | no_credit | unknown | capped"
        " | suppressed | dropped (docs/journeys.md, Channels)"
    )
    error_code: str = Field(description="The provider's code (errcode, SMS Code); empty if none")
    count: int


class JourneySendCounts(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "journey_id": "points-expiring",
                    "counts": [
                        {
                            "step_id": "tell",
                            "channel": "miniprogram",
                            "status": "delivered",
                            "error_code": "",
                            "count": 812,
                        },
                        {
                            "step_id": "tell",
                            "channel": "miniprogram",
                            "status": "no_credit",
                            "error_code": "43101",
                            "count": 37,
                        },
                    ],
                }
            ]
        }
    )

    journey_id: str
    counts: list[SendCountRow]


@router.get(
    "/v1/admin/journeys/{journey_id}/sends",
    response_model=JourneySendCounts,
    tags=["journeys"],
    summary="The journey's sends by step, channel, status and provider error code",
    responses=JOURNEY_ERRORS,
)
async def journey_sends(journey_id: JourneyId, request: Request) -> JourneySendCounts:
    reply = await downstreams(request).engagement.journey_sends(journey_id)
    return JourneySendCounts(
        journey_id=reply.journey_id,
        counts=[
            SendCountRow(
                step_id=c.step_id,
                channel=c.channel,
                status=c.status,
                error_code=c.error_code,
                count=c.count,
            )
            for c in reply.counts
        ],
    )


class UnknownSendRow(BaseModel):
    send_key: str
    step_id: str
    channel: str
    member_id: str
    reason: str = Field(description="What left it unknown: a time-out, a dropped connection, ...")
    attempts: int
    updated_at: datetime


class UnknownSends(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "sends": [
                        {
                            "send_key": "9b2f3c1e-5d7a-4e8b-8f0a-1c2d3e4f5a6b:2",
                            "step_id": "tell",
                            "channel": "sms",
                            "member_id": MEMBER_ID_EXAMPLE,
                            "reason": "NO_ANSWER: ReadTimeout",
                            "attempts": 1,
                            "updated_at": "2026-12-04T10:00:05Z",
                        }
                    ],
                    "next_page_token": None,
                }
            ]
        }
    )

    sends: list[UnknownSendRow]
    next_page_token: str | None = None


@router.get(
    "/v1/admin/journeys/{journey_id}/sends/unknown",
    response_model=UnknownSends,
    tags=["journeys"],
    summary="Sends whose outcome nobody knows (never resent automatically), oldest first",
    responses=JOURNEY_ERRORS,
)
async def unknown_sends(
    journey_id: JourneyId,
    request: Request,
    page_size: Annotated[int, Query(ge=1, le=500)] = 100,
    page_token: Annotated[str, Query(max_length=200)] = "",
) -> UnknownSends:
    reply = await downstreams(request).engagement.unknown_sends(
        engagement_pb2.ListUnknownSendsRequest(
            journey_id=journey_id, page_size=page_size, page_token=page_token
        )
    )
    return UnknownSends(
        sends=[
            UnknownSendRow(
                send_key=u.send_key,
                step_id=u.step_id,
                channel=u.channel,
                member_id=u.member_id,
                reason=u.reason,
                attempts=u.attempts,
                updated_at=to_datetime(u.updated_at) or datetime.min.replace(tzinfo=UTC),
            )
            for u in reply.sends
        ],
        next_page_token=reply.next_page_token or None,
    )


class SmsReport(BaseModel):
    """One item of Aliyun's SmsReport push (extra fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    biz_id: str = Field(min_length=1, max_length=64)
    out_id: str = Field(min_length=1, max_length=128)
    success: bool
    err_code: str = Field(default="", max_length=64)
    report_time: str = Field(default="", max_length=32, description="yyyy-MM-dd HH:mm:ss, UTC+8")


MAX_REPORTS = 1000


class SmsReportAck(BaseModel):
    """Aliyun's expected answer (anything else makes it push again)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"code": 0, "msg": "成功", "applied": 1}]}
    )

    code: int
    msg: str
    applied: int = Field(description="Reports that settled a send; repeats change nothing")


@router.post(
    "/v1/callbacks/sms/aliyun",
    tags=["journeys"],
    response_model=SmsReportAck,
    summary="Aliyun SMS delivery reports (SmsReport batch push); answers {code: 0}",
    description="Authenticated by the token in the URL configured at Aliyun "
    "(`SMS_RECEIPT_TOKEN`). Each report settles its send once (matched by OutId and "
    "BizId); a repeated push changes nothing.",
    responses={403: problem_response("Wrong or missing token"), 503: problem_response("Retry")},
)
async def sms_reports(
    request: Request,
    reports: Annotated[list[SmsReport], Body(max_length=MAX_REPORTS)],
    token: Annotated[str, Query(max_length=200)] = "",
) -> SmsReportAck:
    expected = downstreams(request).sms_receipt_token
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise PermissionDenied(
            "the delivery-report token is wrong", code="BAD_CALLBACK_TOKEN", field="token"
        )
    reply = await downstreams(request).engagement.apply_sms_receipts(
        engagement_pb2.ApplySmsReceiptsRequest(
            receipts=[
                engagement_pb2.SmsReceipt(
                    out_id=r.out_id,
                    biz_id=r.biz_id,
                    success=r.success,
                    err_code=r.err_code,
                    reported_at=_report_time(r.report_time),
                )
                for r in reports
            ]
        )
    )
    # Aliyun's expected answer; anything else makes it push again.
    return SmsReportAck(code=0, msg="成功", applied=reply.applied)


def _report_time(text: str) -> Any:
    """Aliyun reports in Beijing time, without a zone."""
    try:
        at = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=_BEIJING)
    except ValueError:
        return None
    return optional_timestamp(at)


_BEIJING = timezone(timedelta(hours=8))
