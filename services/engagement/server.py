"""Wiring of the engagement service into the shared server shell: the servicer,
the event consumers (member, rewards, tiering), and the background workers
(sweepers that run due steps, a dispatcher that delivers committed sends)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, timedelta
from typing import Any

import httpx
from google.protobuf.message import Message

from loyalty.engagement.v1 import engagement_pb2, engagement_pb2_grpc
from loyalty.events.v1 import events_pb2
from servicekit.consumer import EventConsumer, Subscription
from servicekit.db import UnitOfWork
from servicekit.events import ReceivedEvent
from servicekit.server import ServiceApp, stop_tasks
from servicekit.settings import ServiceSettings

from . import facts_repository as facts_repo
from .channels import Dispatcher, poll_forever
from .domain import Clock, QuietHours, SystemClock
from .fulfilment import RewardDispatcher
from .handlers import EngagementHandlers
from .journey import parse_local_time
from .partitions import partitioned_tables
from .ports import (
    LocalConsent,
    MemberAddresses,
    MemberConsent,
    RewardsGrpc,
    RewardsStoreZones,
)
from .providers import build_providers, resend_unknown
from .scheduler import JourneyCache, Scheduler
from .schema import SCHEMA
from .servicer import EngagementServicer
from .settings import EngagementSettings
from .wecom_results import WeComResults, build_wecom_results

NAME = "engagement"
log = logging.getLogger(__name__)


class EngagementApp(ServiceApp):
    """The shared shell plus the scheduler's workers, stopped with the server."""

    scheduler: Scheduler
    dispatcher: Dispatcher
    handlers: EngagementHandlers
    http_client: httpx.AsyncClient | None = None
    rewards: RewardsGrpc | None = None
    member: MemberAddresses | None = None
    member_consent: MemberConsent | None = None
    store_zones: RewardsStoreZones | None = None
    reward_dispatcher: RewardDispatcher | None = None
    # Settles WeCom sends from their tasks' results (when WeCom is configured).
    wecom_results: WeComResults | None = None

    def __init__(
        self,
        *args: Any,
        workers: bool,
        sweepers: int,
        poll: float,
        dispatch_poll: float,
        birthday_poll: float,
        parked_ttl_days: int = 30,
        parked_expiry_poll: float = 3600.0,
        wecom_results_poll: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._workers = workers
        self._sweepers = sweepers
        self._poll = poll
        self._dispatch_poll = dispatch_poll
        self._birthday_poll = birthday_poll
        self._parked_ttl_days = parked_ttl_days
        self._parked_expiry_poll = parked_expiry_poll
        self._wecom_results_poll = wecom_results_poll
        self._worker_tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        port = await super().start()
        if self._workers:
            for n in range(self._sweepers):
                self._worker_tasks.append(
                    asyncio.create_task(self.scheduler.run(self._poll), name=f"sweeper-{n}")
                )
            self._worker_tasks.append(
                asyncio.create_task(self.dispatcher.run(self._dispatch_poll), name="dispatcher")
            )
            self._worker_tasks.append(
                asyncio.create_task(
                    poll_forever(
                        self.enter_birthdays_once, self._birthday_poll, log, "birthday entry"
                    ),
                    name="birthday-entry",
                )
            )
            self._worker_tasks.append(
                asyncio.create_task(
                    poll_forever(
                        self.expire_parked_once, self._parked_expiry_poll, log, "parked expiry"
                    ),
                    name="parked-expiry",
                )
            )
            if self.wecom_results is not None:
                self._worker_tasks.append(
                    asyncio.create_task(
                        self.wecom_results.run(self._wecom_results_poll), name="wecom-results"
                    )
                )
            if self.reward_dispatcher is not None:
                self._worker_tasks.append(
                    asyncio.create_task(
                        self.reward_dispatcher.run(self._dispatch_poll), name="reward-dispatcher"
                    )
                )
        return port

    async def enter_birthdays_once(self) -> int:
        """One batch of the daily birthday-month entry (a new day or a new birthday)."""
        assert self.db is not None
        async with self.db.unit_of_work() as uow:
            return await self.handlers.enter_birthday_month(uow)

    async def expire_parked_once(self) -> int:
        """Delete one batch of events parked longer than ENGAGEMENT_PARKED_TTL_DAYS."""
        assert self.db is not None
        async with self.db.unit_of_work() as uow:
            n = await self.handlers.expire_parked(uow, timedelta(days=self._parked_ttl_days))
        if n:
            log.info("expired %d parked events (older than %d days)", n, self._parked_ttl_days)
        return n

    async def stop(self) -> None:
        await stop_tasks(self.name, self._worker_tasks)
        self._worker_tasks.clear()
        if self.http_client is not None:
            await self.http_client.aclose()
        if self.rewards is not None:
            await self.rewards.close()
        if self.member is not None:
            await self.member.close()
        if self.member_consent is not None:
            await self.member_consent.close()
        if self.store_zones is not None:
            await self.store_zones.close()
        await super().stop()


def _attrs(msg: Message, *names: str) -> dict[str, str]:
    return {n: str(getattr(msg, n)) for n in names}


def _instant(msg: Message, name: str) -> str:
    """A Timestamp field as UTC RFC 3339 ("" when unset); templates render it as
    a date in the member's zone (`{points_expire_on}`, `{coupon_expire_on}`)."""
    if not msg.HasField(name):
        return ""
    return str(getattr(msg, name).ToDatetime(tzinfo=UTC).isoformat())


# Each bus event -> the attributes a journey it enters sees; templates.py's
# TRIGGER_VARIABLES names the variables these attributes fill (keep in step:
# tests/integration/test_engagement_variables.py publishes real events).
def order_attrs(p: Any) -> dict[str, str]:
    return _attrs(p, "order_id", "store_id")


def points_expiring_attrs(p: Any) -> dict[str, str]:
    return {
        **_attrs(p, "points", "points_balance"),
        "expires_at": _instant(p, "expires_at"),
    }


def coupon_expiring_attrs(p: Any) -> dict[str, str]:
    return {
        **_attrs(p, "coupon_id", "template_id", "name"),
        "expires_at": _instant(p, "expires_at"),
    }


def build_quiet(s: EngagementSettings) -> QuietHours:
    start, end = parse_local_time(s.quiet_start), parse_local_time(s.quiet_end)
    if start is None or end is None:
        raise ValueError("QUIET_START / QUIET_END must be HH:MM")
    return QuietHours(start, end, timedelta(minutes=s.quiet_jitter_minutes))


def build(settings: ServiceSettings, clock: Clock | None = None) -> EngagementApp:
    s = (
        settings
        if isinstance(settings, EngagementSettings)
        else EngagementSettings(**settings.model_dump())
    )
    clock = clock or SystemClock()
    quiet = build_quiet(s)
    journeys = JourneyCache()
    handlers = EngagementHandlers(clock, quiet, journeys)

    def on(
        event: str, member: Callable[[Any], str], attrs: Callable[[Any], dict[str, str]]
    ) -> Callable[[UnitOfWork, ReceivedEvent], Awaitable[None]]:
        async def handle(uow: UnitOfWork, received: ReceivedEvent) -> None:
            payload = received.payload
            # (ingest adds `store_name` for an event naming a store.)
            await handlers.ingest(uow, event, member(payload), attrs(payload))

        return handle

    async def merged(uow: UnitOfWork, received: ReceivedEvent) -> None:
        p: Any = received.payload
        await handlers.on_merged(uow, p.merge_id, p.survivor_member_id, p.absorbed_member_id)

    async def unmerged(uow: UnitOfWork, received: ReceivedEvent) -> None:
        p: Any = received.payload
        await handlers.on_unmerged(uow, p.merge_id, p.survivor_member_id, p.restored_member_id)

    async def consent_changed(uow: UnitOfWork, received: ReceivedEvent) -> None:
        p: Any = received.payload
        await handlers.on_consent_changed(
            uow,
            p.member_id,
            p.purpose,
            p.channel,
            p.granted,
            p.source,
            p.recorded_at.ToDatetime(tzinfo=UTC),
        )

    async def birthday_set(uow: UnitOfWork, received: ReceivedEvent) -> None:
        p: Any = received.payload
        await handlers.on_birthday_set(uow, p.member_id, p.month, p.day)

    async def zone_set(uow: UnitOfWork, received: ReceivedEvent) -> None:
        p: Any = received.payload
        await handlers.on_zone_set(uow, p.member_id, p.time_zone, p.registration_store_id)

    async def erased(uow: UnitOfWork, received: ReceivedEvent) -> None:
        p: Any = received.payload
        await handlers.on_erased(uow, list(p.member_ids))

    async def nickname_set(uow: UnitOfWork, received: ReceivedEvent) -> None:
        p: Any = received.payload
        await facts_repo.set_nickname(uow.conn, uuid.UUID(p.member_id), p.nickname)

    async def guide_bound(uow: UnitOfWork, received: ReceivedEvent) -> None:
        # The guide's staff id is their WeCom userid (guides syncs the
        # directory): the sender of the member's 1-to-1 WeCom messages.
        p: Any = received.payload
        await facts_repo.set_guide(uow.conn, uuid.UUID(p.member_id), p.to_staff_id)

    async def tags_changed(uow: UnitOfWork, received: ReceivedEvent) -> None:
        # Journeys read tags locally; the guides service owns them (docs/guides.md).
        p: Any = received.payload
        await facts_repo.replace_tags(uow.conn, uuid.UUID(p.member_id), list(p.tags))

    def mid(p: Any) -> str:
        return str(p.member_id)

    subscriptions = [
        Subscription(
            "member",
            events_pb2.MemberRegistered,
            on("member_registered", mid, lambda p: _attrs(p, "source")),
        ),
        Subscription("member", events_pb2.MemberMerged, merged),
        Subscription("guides", events_pb2.MemberTagsChanged, tags_changed),
        Subscription("guides", events_pb2.GuideBound, guide_bound),
        Subscription("member", events_pb2.NicknameSet, nickname_set),
        Subscription("member", events_pb2.MemberUnmerged, unmerged),
        Subscription("member", events_pb2.MemberErased, erased),
        Subscription("member", events_pb2.ConsentChanged, consent_changed),
        Subscription("member", events_pb2.BirthdaySet, birthday_set),
        Subscription("member", events_pb2.MemberZoneSet, zone_set),
        Subscription(
            "rewards",
            events_pb2.OrderCompleted,
            on("order_completed", mid, order_attrs),
        ),
        Subscription(
            "rewards",
            events_pb2.PointsExpiringSoon,
            on("points_expiring_soon", mid, points_expiring_attrs),
        ),
        Subscription(
            "rewards",
            events_pb2.CouponExpiringSoon,
            on("coupon_expiring_soon", mid, coupon_expiring_attrs),
        ),
        Subscription(
            "guides",
            events_pb2.CommunityJoined,
            on("community_joined", mid, lambda p: _attrs(p, "chat_id", "store_id", "audience")),
        ),
        Subscription(
            "guides",
            events_pb2.CommunityLeft,
            on("community_left", mid, lambda p: _attrs(p, "chat_id", "store_id", "audience")),
        ),
        Subscription(
            "tiering",
            events_pb2.TierChanged,
            on("tier_changed", mid, lambda p: _attrs(p, "from_tier", "to_tier", "reason")),
        ),
        Subscription(
            "tiering",
            events_pb2.SegmentChanged,
            on("segment_changed", mid, lambda p: _attrs(p, "from_segment", "to_segment")),
        ),
        Subscription(
            "tiering",
            events_pb2.LifecycleStageChanged,
            on("lifecycle_stage_changed", mid, lambda p: _attrs(p, "from_stage", "to_stage")),
        ),
    ]

    def wire(app: ServiceApp) -> None:
        assert isinstance(app, EngagementApp)
        assert app.db is not None and app.redis is not None and app.server is not None
        # One client for every provider; its time-out bounds a call (then: unknown).
        app.http_client = httpx.AsyncClient(timeout=s.provider_timeout_seconds)
        app.handlers = handlers
        if s.member_addr.strip():
            app.member = MemberAddresses(s.member_addr, s.member_timeout_seconds)
            # Consent choices made through engagement are recorded at member.
            app.member_consent = MemberConsent(s.member_addr, s.member_timeout_seconds)
            handlers.consent = app.member_consent
        app.scheduler = Scheduler(
            app.db,
            clock,
            LocalConsent(),
            quiet,
            journeys,
            batch_size=s.engagement_batch_size,
            wecom_sender=s.wecom_sender,
        )
        app.dispatcher = Dispatcher(
            app.db,
            clock,
            build_providers(s, app.http_client, app.redis, clock),
            {
                "wecom": s.wecom_rate_per_second,
                "sms": s.sms_rate_per_second,
                "miniprogram": s.miniprogram_rate_per_second,
                "app_push": s.app_push_rate_per_second,
            },
            resolver=app.member,
            resend_unknown=resend_unknown(s),
            receipt_cutoff=timedelta(hours=s.sms_receipt_cutoff_hours),
        )
        app.wecom_results = build_wecom_results(s, app.db, clock, app.dispatcher.providers)
        if s.rewards_addr.strip():
            app.store_zones = RewardsStoreZones(s.rewards_addr, s.rewards_timeout_seconds)
            handlers.stores = app.store_zones
            app.rewards = RewardsGrpc(s.rewards_addr, s.rewards_timeout_seconds)
            app.reward_dispatcher = RewardDispatcher(app.db, clock, app.rewards)
        engagement_pb2_grpc.add_EngagementServiceServicer_to_server(
            EngagementServicer(app.db, handlers, s.engagement_parked_ttl_days), app.server
        )
        db = app.db

        async def due_backlog() -> float:
            # Steps already due and not yet run: the sweepers are falling behind.
            n = await db.pool.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.timers WHERE NOT paused AND due_at <= $1",
                clock.now(),
            )
            return float(n)

        app.metrics.add_probe(
            "engagement_scheduler_due_timers", "Journey steps due and not yet run", due_backlog
        )
        app.add_consumer(
            EventConsumer(
                NAME,
                app.db,
                app.redis,
                s.redis_namespace,
                subscriptions,
                max_attempts=s.event_max_attempts,
                retry_after_ms=s.event_retry_after_ms,
            )
        )

    app = EngagementApp(
        NAME,
        s,
        services=[engagement_pb2.DESCRIPTOR.services_by_name["EngagementService"]],
        wire=wire,
        schema=SCHEMA,
        workers=s.engagement_workers,
        sweepers=s.engagement_sweepers,
        poll=s.engagement_poll_seconds,
        dispatch_poll=s.engagement_dispatch_poll_seconds,
        birthday_poll=s.engagement_birthday_poll_seconds,
        parked_ttl_days=s.engagement_parked_ttl_days,
        parked_expiry_poll=s.engagement_parked_expiry_poll_seconds,
        wecom_results_poll=s.wecom_results_poll_seconds,
    )
    # Partitions past their retention dropped, instead of rows pruned.
    app.partition(*partitioned_tables(s))
    return app
