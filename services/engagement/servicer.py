"""gRPC servicer: protobuf <-> domain mapping only."""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc

from loyalty.common.v1 import common_pb2
from loyalty.engagement.v1 import engagement_pb2, engagement_pb2_grpc
from servicekit.analytics import day_range
from servicekit.db import Database
from servicekit.errors import InvalidArgument
from servicekit.protos import timestamp, to_datetime
from servicekit.tables import NO_EVENT_TIME

from .analytics import journey_funnels
from .domain import DEFAULT_RADIUS_M, Lift
from .handlers import SENT_STATUSES, EngagementHandlers
from .scheduler_repository import Receipt

LAUNCH_CHUNK = 500
STEP_STATUSES = ("delivered", "failed", "capped", "suppressed", "dropped")


def lift_message(value: Lift | None) -> engagement_pb2.Lift | None:
    if value is None:
        return None
    return engagement_pb2.Lift(
        treated_rate=value.treated_rate,
        holdout_rate=value.holdout_rate,
        lift=value.lift,
        ci_low=value.ci_low,
        ci_high=value.ci_high,
    )


class EngagementServicer(engagement_pb2_grpc.EngagementServiceServicer):
    def __init__(
        self, db: Database, handlers: EngagementHandlers, parked_ttl_days: int = 30
    ) -> None:
        self._db = db
        self._handlers = handlers
        self._parked_ttl_days = parked_ttl_days

    async def PublishJourney(
        self, request: engagement_pb2.PublishJourneyRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.PublishJourneyResponse:
        async with self._db.unit_of_work() as uow:
            published = await self._handlers.publish(uow, request.definition_json)
        return engagement_pb2.PublishJourneyResponse(
            journey_id=published.journey_id, version=published.version
        )

    async def _status(self, journey_id: str, status: str) -> engagement_pb2.JourneyStatus:
        async with self._db.unit_of_work() as uow:
            await self._handlers.set_status(uow, journey_id, status)
            metrics = await self._handlers.metrics(uow, journey_id)
        return engagement_pb2.JourneyStatus(
            journey_id=journey_id, status=metrics.status, live_version=metrics.live_version
        )

    async def PauseJourney(
        self, request: engagement_pb2.JourneyRef, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.JourneyStatus:
        return await self._status(request.journey_id, "paused")

    async def ResumeJourney(
        self, request: engagement_pb2.JourneyRef, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.JourneyStatus:
        return await self._status(request.journey_id, "active")

    async def GetJourneyAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.JourneyAnalytics:
        r = day_range(request)
        async with self._db.reading() as uow:
            funnels = await journey_funnels(uow.conn, r)
        reply = engagement_pb2.JourneyAnalytics()
        for f in funnels:
            j = reply.journeys.add(
                journey_id=f.journey_id,
                status=f.status,
                entered=f.entered,
                converted=f.converted,
                treated=f.treated,
                holdout=f.holdout,
                treated_converted=f.treated_converted,
                holdout_converted=f.holdout_converted,
                steps=[
                    engagement_pb2.JourneyStepFunnel(
                        step_id=s.step_id,
                        entered=s.entered,
                        sent=[common_pb2.KeyCount(key=k, count=n) for k, n in s.sent.items()],
                        converted=s.converted,
                    )
                    for s in f.steps
                ],
                has_lift=f.lift is not None,
            )
            lifted = lift_message(f.lift)
            if lifted is not None:
                j.lift.CopyFrom(lifted)
        return reply

    async def GetJourneyMetrics(
        self, request: engagement_pb2.JourneyRef, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.JourneyMetrics:
        async with self._db.unit_of_work() as uow:
            m = await self._handlers.metrics(uow, request.journey_id)
        reply = engagement_pb2.JourneyMetrics(
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
                engagement_pb2.StepMetrics(
                    step_id=s.step_id,
                    sent=sum(s.counts.get(k, 0) for k in SENT_STATUSES),
                    **{k: s.counts.get(k, 0) for k in STEP_STATUSES},
                )
                for s in m.steps
            ],
            variants=[
                engagement_pb2.VariantMetrics(
                    variant=v.variant,
                    entered=v.entered,
                    converted=v.converted,
                    lift=lift_message(v.lift),
                    has_lift=v.lift is not None,
                )
                for v in m.variants
            ],
            lift=lift_message(m.lift),
            has_lift=m.lift is not None,
        )
        return reply

    async def IngestEvent(
        self, request: engagement_pb2.IngestEventRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.IngestEventResponse:
        try:
            event_id = uuid.UUID(request.event_id)
        except ValueError:
            raise InvalidArgument(
                "event_id must be a UUID", code="INVALID_EVENT_ID", field="event_id"
            ) from None
        async with self._db.unit_of_work() as uow:
            first = await uow.conn.fetchval(
                "INSERT INTO engagement.processed_events (consumer, event_id, occurred_at)"
                " VALUES ('ingest', $1, $2) ON CONFLICT DO NOTHING RETURNING true",
                event_id,
                # The caller's time, the same on its retries: they conflict in its day.
                to_datetime(request.occurred_at)
                if request.HasField("occurred_at")
                else NO_EVENT_TIME,
            )
            if not first:
                return engagement_pb2.IngestEventResponse(duplicate=True)
            result = await self._handlers.ingest(
                uow,
                request.event,
                request.member_id,
                dict(request.attributes),
                to_datetime(request.occurred_at),
            )
        return engagement_pb2.IngestEventResponse(
            parked=result.parked, enrolled_journeys=result.enrolled
        )

    async def Unsubscribe(
        self, request: engagement_pb2.UnsubscribeRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.UnsubscribeResponse:
        async with self._db.unit_of_work() as uow:
            await self._handlers.unsubscribe(uow, request.member_id, list(request.channels))
        return engagement_pb2.UnsubscribeResponse()

    async def SetConsent(
        self, request: engagement_pb2.SetConsentRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.SetConsentResponse:
        async with self._db.unit_of_work() as uow:
            await self._handlers.record_consent(
                uow,
                request.member_id,
                list(request.channels),
                request.granted,
                request.source or "engagement:api",
            )
        return engagement_pb2.SetConsentResponse()

    async def SetNonPersonalised(
        self, request: engagement_pb2.SetNonPersonalisedRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.SetNonPersonalisedResponse:
        async with self._db.unit_of_work() as uow:
            await self._handlers.record_non_personalised(
                uow, request.member_id, request.non_personalised, "engagement:api"
            )
        return engagement_pb2.SetNonPersonalisedResponse()

    async def LaunchNearStore(
        self, request: engagement_pb2.LaunchNearStoreRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.LaunchNearStoreResponse:
        if not request.store_id.strip():
            raise InvalidArgument("store_id is required", code="MISSING_STORE", field="store_id")
        radius = request.radius_m or DEFAULT_RADIUS_M
        async with self._db.unit_of_work() as uow:
            audience = await self._handlers.near_store_audience(
                uow, request.journey_id, request.latitude, request.longitude, radius
            )
        entered = 0
        # Short transactions: a large audience does not hold one lock set for long.
        for start in range(0, len(audience), LAUNCH_CHUNK):
            async with self._db.unit_of_work() as uow:
                entered += await self._handlers.enter_near_store(
                    uow,
                    request.journey_id,
                    request.store_id,
                    audience[start : start + LAUNCH_CHUNK],
                )
        return engagement_pb2.LaunchNearStoreResponse(audience=len(audience), entered=entered)

    async def ListJourneys(
        self, request: engagement_pb2.ListJourneysRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.ListJourneysResponse:
        async with self._db.reading() as uow:
            rows, token = await self._handlers.list_journeys(
                uow, request.page_size, request.page_token
            )
        return engagement_pb2.ListJourneysResponse(
            journeys=[
                engagement_pb2.JourneySummary(
                    journey_id=r.journey_id,
                    name=r.name,
                    live_version=r.live_version,
                    status=r.status,
                    channels=r.channels,
                    entered=r.entered,
                    active=r.active,
                    updated_at=timestamp(r.updated_at),
                )
                for r in rows
            ],
            next_page_token=token,
        )

    async def ListParkedEvents(
        self, request: engagement_pb2.ListParkedEventsRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.ListParkedEventsResponse:
        async with self._db.unit_of_work() as uow:
            rows, token = await self._handlers.list_parked(
                uow, request.member_id, request.page_size, request.page_token
            )
        return engagement_pb2.ListParkedEventsResponse(
            events=[
                engagement_pb2.ParkedEvent(
                    id=r.id,
                    member_id=str(r.member_id),
                    event=r.event,
                    attributes=r.attributes,
                    occurred_at=timestamp(r.occurred_at),
                    reason=r.reason,
                    parked_at=timestamp(r.parked_at),
                )
                for r in rows
            ],
            next_page_token=token,
        )

    async def ReplayParkedEvents(
        self, request: engagement_pb2.ReplayParkedEventsRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.ReplayParkedEventsResponse:
        async with self._db.unit_of_work() as uow:
            replayed, enrolled = await self._handlers.replay_parked(uow, request.member_id)
        return engagement_pb2.ReplayParkedEventsResponse(
            replayed=replayed, enrolled_journeys=enrolled
        )

    async def ExpireParkedEvents(
        self, request: engagement_pb2.ExpireParkedEventsRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.ExpireParkedEventsResponse:
        days = request.older_than_days or self._parked_ttl_days
        expired = 0
        # Batches in short transactions until nothing older is left.
        while True:
            async with self._db.unit_of_work() as uow:
                n = await self._handlers.expire_parked(uow, timedelta(days=days))
            expired += n
            if n == 0:
                break
        return engagement_pb2.ExpireParkedEventsResponse(expired=expired)

    async def GetJourneySends(
        self, request: engagement_pb2.JourneyRef, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.JourneySends:
        async with self._db.unit_of_work() as uow:
            counts = await self._handlers.journey_sends(uow, request.journey_id)
        return engagement_pb2.JourneySends(
            journey_id=request.journey_id,
            counts=[
                engagement_pb2.SendCount(
                    step_id=c.step_id,
                    channel=c.channel,
                    status=c.status,
                    error_code=c.error_code,
                    count=c.count,
                )
                for c in counts
            ],
        )

    async def ListUnknownSends(
        self, request: engagement_pb2.ListUnknownSendsRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.ListUnknownSendsResponse:
        async with self._db.unit_of_work() as uow:
            rows, token = await self._handlers.unknown_sends(
                uow, request.journey_id, request.page_size, request.page_token
            )
        return engagement_pb2.ListUnknownSendsResponse(
            sends=[
                engagement_pb2.UnknownSend(
                    send_key=r.send_key,
                    step_id=r.step_id,
                    channel=r.channel,
                    member_id=str(r.member_id) if r.member_id else "",
                    reason=r.reason,
                    attempts=r.attempts,
                    updated_at=timestamp(r.updated_at),
                )
                for r in rows
            ],
            next_page_token=token,
        )

    async def ApplySmsReceipts(
        self, request: engagement_pb2.ApplySmsReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> engagement_pb2.ApplySmsReceiptsResponse:
        receipts = [
            Receipt(
                r.out_id,
                r.biz_id,
                r.success,
                r.err_code,
                to_datetime(r.reported_at) if r.HasField("reported_at") else None,
            )
            for r in request.receipts
        ]
        async with self._db.unit_of_work() as uow:
            applied = await self._handlers.apply_sms_receipts(uow, receipts)
        return engagement_pb2.ApplySmsReceiptsResponse(
            applied=applied, ignored=len(receipts) - applied
        )
