"""Wiring of the guides service into the shared server shell, plus its
background loops: the WeCom callback inbox, the WeCom tag pushes and the
rule-tag batch on its cadence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from zoneinfo import ZoneInfo

import httpx

from loyalty.events.v1 import events_pb2
from loyalty.guides.v1 import guides_pb2, guides_pb2_grpc
from servicekit.consumer import EventConsumer, Subscription
from servicekit.db import Database
from servicekit.redis_client import create_redis
from servicekit.retention import Retention
from servicekit.server import ServiceApp
from servicekit.settings import ServiceSettings

from . import tag_batch
from .domain import parse_rules
from .handlers import Clock, GuidesHandlers
from .partitions import partitioned_tables
from .ports import CouponIssuer, MemberDirectory, MemberGrpc, RewardsCoupons
from .retries import RetryPolicy
from .schema import SCHEMA
from .servicer import GuidesServicer
from .settings import GuidesSettings, guides_settings
from .wecom import FAKE_BASE, FAKE_URL, FakeWeCom, WeComApi
from .wecom_crypto import WeComCrypto

log = logging.getLogger(__name__)

NAME = "guides"


class GuidesApp(ServiceApp):
    """The shell, with the loops that drain the callback inbox and the tag pushes."""

    handlers: GuidesHandlers
    fake_wecom: FakeWeCom | None = None

    async def start(self) -> int:
        port = await super().start()
        s = self.settings
        assert isinstance(s, GuidesSettings)
        self._tasks.append(
            asyncio.create_task(
                self._drain(self.handlers.process_next_callback, s.callback_poll_seconds),
                name="callbacks",
            )
        )
        self._tasks.append(
            asyncio.create_task(
                self._drain(self.handlers.push_next_tags, s.callback_poll_seconds),
                name="tag-pushes",
            )
        )
        self._tasks.append(
            asyncio.create_task(
                self._drain(self.handlers.send_next_task, s.callback_poll_seconds),
                name="guide-tasks",
            )
        )
        self._tasks.append(
            asyncio.create_task(
                self._drain(self.handlers.track_sent_tasks, s.task_poll_seconds),
                name="task-results",
            )
        )
        if s.tag_refresh_hours > 0:
            self._tasks.append(
                asyncio.create_task(self._tag_batches(s.tag_refresh_hours * 3600), name="tag-batch")
            )
        return port

    async def _drain(self, step: Callable[[Database], Awaitable[bool]], poll: float) -> None:
        assert self.db is not None
        while True:
            try:
                while await step(self.db):
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("guides: background step failed; retrying")
            await asyncio.sleep(poll)

    async def _tag_batches(self, every: float) -> None:
        assert self.db is not None
        while True:
            await asyncio.sleep(every)
            try:
                # One replica at a time, once per period (tag_batch.py).
                result = await tag_batch.run_alone(
                    self.handlers, self.db, every=timedelta(seconds=every * 0.9)
                )
                log.info("rule tags refreshed: %s", result)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rule-tag batch failed")

    async def stop(self) -> None:
        await super().stop()
        await self.handlers.wecom.close()
        await self.handlers.members.close()
        if self.handlers.coupons is not None:
            await self.handlers.coupons.close()


def build(
    settings: ServiceSettings,
    clock: Clock | None = None,
    wecom_transport: httpx.AsyncBaseTransport | None = None,
    members: MemberDirectory | None = None,
    coupons: CouponIssuer | None = None,
) -> GuidesApp:
    s = guides_settings(settings)
    # Bad keys or rules stop the process here, before it serves anything.
    crypto = WeComCrypto(s.wecom_callback_token, s.wecom_encoding_aes_key, s.wecom_corp_id)
    rules = parse_rules(s.attribution_rules)
    fake = None
    base = s.wecom_api_base
    if base == FAKE_BASE and wecom_transport is None:
        fake = FakeWeCom(corp_id=s.wecom_corp_id, secret=s.wecom_secret)
        wecom_transport = fake.transport()
    # The corp token lives in Redis, one for every replica (servicekit/wecom.py);
    # the client has its own small Redis connection: it is built before the app's.
    wecom = WeComApi(
        FAKE_URL if base == FAKE_BASE else base,
        s.wecom_corp_id,
        s.wecom_secret,
        create_redis(s.redis_url),
        s.redis_namespace,
        clock,
        s.wecom_store_attr,
        s.wecom_role_attr,
        transport=wecom_transport,
        owns_redis=True,
    )
    handlers = GuidesHandlers(
        crypto,
        wecom,
        members or MemberGrpc(s.member_addr, s.member_timeout_seconds),
        corp_id=s.wecom_corp_id,
        link_secret=s.guide_link_secret.encode(),
        rules=rules,
        window=timedelta(days=s.attribution_window_days),
        tz=ZoneInfo(s.brand_timezone),
        callback_max_age=timedelta(seconds=s.callback_max_age_seconds),
        callback_max_attempts=s.callback_max_attempts,
        tag_window=timedelta(days=s.tag_window_days),
        clock=clock,
        coupons=coupons or RewardsCoupons(s.rewards_addr, s.rewards_timeout_seconds),
        session_secret=s.workstation_secret.encode(),
        session_ttl=timedelta(minutes=s.workstation_session_minutes),
        task_gather=timedelta(seconds=s.task_gather_seconds),
        retry=RetryPolicy(
            task_max_attempts=s.task_max_attempts, task_life=timedelta(hours=s.task_life_hours)
        ),
    )

    def wire(app: ServiceApp) -> None:
        assert app.db is not None and app.redis is not None and app.server is not None
        guides_pb2_grpc.add_GuidesServiceServicer_to_server(
            GuidesServicer(app.db, handlers), app.server
        )
        app.add_consumer(
            EventConsumer(
                NAME,
                app.db,
                app.redis,
                s.redis_namespace,
                [
                    Subscription(
                        "rewards",
                        events_pb2.OrderCompleted,
                        handlers.on_order_completed,
                        batch=handlers.on_orders_completed,
                    ),
                    Subscription("rewards", events_pb2.OrderRefunded, handlers.on_order_refunded),
                    Subscription(
                        "member", events_pb2.MemberRegistered, handlers.on_member_registered
                    ),
                    Subscription(
                        "engagement", events_pb2.JourneyTagged, handlers.on_journey_tagged
                    ),
                    Subscription("member", events_pb2.MemberMerged, handlers.on_member_merged),
                    Subscription("member", events_pb2.MemberUnmerged, handlers.on_member_unmerged),
                    Subscription("tiering", events_pb2.TierChanged, handlers.on_tier_changed),
                    Subscription(
                        "engagement",
                        events_pb2.GuideTaskRequested,
                        handlers.on_guide_task_requested,
                    ),
                ],
                max_attempts=s.event_max_attempts,
                retry_after_ms=s.event_retry_after_ms,
            )
        )

    app = GuidesApp(
        NAME,
        s,
        services=[guides_pb2.DESCRIPTOR.services_by_name["GuidesService"]],
        wire=wire,
        schema=SCHEMA,
    )
    app.handlers = handlers
    app.fake_wecom = fake
    # Replays older than the age limit are refused anyway: keep signatures a day.
    app.retentions.append(Retention(f"{SCHEMA}.callback_signatures", "seen_at", timedelta(days=1)))
    # Partitions past their retention dropped, instead of rows pruned.
    app.partition(*partitioned_tables(s))
    return app
