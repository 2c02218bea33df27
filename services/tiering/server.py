"""Wiring of the tiering service into the shared server shell."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from loyalty.events.v1 import events_pb2
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.consumer import EventConsumer, Subscription
from servicekit.server import ServiceApp, stop_tasks
from servicekit.settings import ServiceSettings

from .benefits import BenefitDispatcher, RewardsCoupons, run_forever
from .handlers import Clock, TieringHandlers
from .partitions import partitioned_tables
from .schema import SCHEMA
from .servicer import TieringServicer
from .settings import TieringSettings

NAME = "tiering"


def build(settings: ServiceSettings, clock: Clock | None = None) -> ServiceApp:
    s = TieringSettings(**settings.model_dump())
    handlers = TieringHandlers(
        clock,
        programme_id=s.tiering_programme_id,
        growth_max_age=timedelta(hours=s.tiering_growth_max_age_hours),
    )

    def wire(app: ServiceApp) -> None:
        assert app.db is not None and app.redis is not None and app.server is not None
        tiering_pb2_grpc.add_TieringServiceServicer_to_server(
            TieringServicer(app.db, handlers), app.server
        )
        app.add_consumer(
            EventConsumer(
                NAME,
                app.db,
                app.redis,
                settings.redis_namespace,
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
                    Subscription("member", events_pb2.MemberMerged, handlers.on_member_merged),
                    Subscription("member", events_pb2.MemberUnmerged, handlers.on_member_unmerged),
                    Subscription("member", events_pb2.MemberErased, handlers.on_member_erased),
                    Subscription("member", events_pb2.BirthdaySet, handlers.on_birthday_set),
                    Subscription("member", events_pb2.MemberZoneSet, handlers.on_zone_set),
                ],
                max_attempts=settings.event_max_attempts,
                retry_after_ms=settings.event_retry_after_ms,
            )
        )
        # Its projections are part of the gateway's cached member views.
        app.consumers[-1].bumps_member_views = True

    app = TieringApp(
        NAME,
        settings,
        services=[tiering_pb2.DESCRIPTOR.services_by_name["TieringService"]],
        wire=wire,
        schema=SCHEMA,
    )
    app.handlers = handlers
    app.tiering = s
    # Partitions past their retention dropped, instead of rows pruned.
    app.partition(*partitioned_tables(s))
    return app


class TieringApp(ServiceApp):
    """The shared shell plus the tier benefits loop (grants sent to rewards),
    started and stopped with the server; the loop runs only when REWARDS_ADDR
    is set."""

    handlers: TieringHandlers
    tiering: TieringSettings
    coupons: RewardsCoupons | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._benefit_tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        port = await super().start()
        s = self.tiering
        if s.rewards_addr.strip():
            assert self.db is not None
            self.coupons = RewardsCoupons(s.rewards_addr, s.rewards_timeout_seconds)
            self._benefit_tasks.append(
                asyncio.create_task(
                    run_forever(
                        self.db,
                        BenefitDispatcher(self.db, self.coupons),
                        self.handlers.programme_id,
                        self.handlers.now,
                        s.tiering_benefits_poll_seconds,
                    ),
                    name="tier-benefits",
                )
            )
        return port

    async def stop(self) -> None:
        await stop_tasks(self.name, self._benefit_tasks)
        self._benefit_tasks.clear()
        if self.coupons is not None:
            await self.coupons.close()
        await super().stop()
