"""gRPC methods of the operator dashboards (orders, points, coupons, referral):
protobuf <-> aggregates only. RewardsServicer inherits them."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from loyalty.common.v1 import common_pb2
from loyalty.rewards.v1 import rewards_pb2
from servicekit.analytics import day_range, ratio
from servicekit.db import Database
from servicekit.protos import timestamp

from ..orders.handlers import RewardsHandlers
from . import repository


class AnalyticsRpcs:
    _db: Database
    _handlers: RewardsHandlers

    async def GetOrderAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.OrderAnalytics:
        r = day_range(request)
        async with self._db.reading() as uow:
            a = await repository.order_analytics(uow.conn, r)
        return rewards_pb2.OrderAnalytics(
            orders=a["orders"],
            spend_fen=a["spend_fen"],
            buyers=a["buyers"],
            repeat_buyers=a["repeat_buyers"],
            repurchase_rate=ratio(a["repeat_buyers"], a["buyers"]),
            active_members_30d=a["active_members_30d"],
            by_day=[rewards_pb2.OrderDay(**d) for d in a["by_day"]],
            by_store=[rewards_pb2.OrderStore(**s) for s in a["by_store"]],
        )

    async def GetPointsAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsAnalytics:
        r = day_range(request)
        now = datetime.now(UTC)
        async with self._db.reading() as uow:
            a = await repository.points_analytics(uow.conn, r, now)
        return rewards_pb2.PointsAnalytics(
            points_value_fen=self._handlers.coupon_policy.fen_per_point,
            outstanding_points=a["outstanding_points"],
            pending_points=a["pending_points"],
            expiring_30d_points=a["expiring_30d_points"],
            as_of=timestamp(now),
            by_day=[rewards_pb2.PointsDay(**d) for d in a["by_day"]],
        )

    async def GetCouponAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.CouponAnalytics:
        r = day_range(request)
        async with self._db.reading() as uow:
            a = await repository.coupon_analytics(uow.conn, r, datetime.now(UTC))
        return rewards_pb2.CouponAnalytics(
            templates=[
                rewards_pb2.CouponTemplateFunnel(
                    **t, redemption_rate=ratio(t["redeemed"], t["issued"])
                )
                for t in a["templates"]
            ],
            by_day=[
                rewards_pb2.CouponDay(**d, redemption_rate=ratio(d["redeemed"], d["issued"]))
                for d in a["by_day"]
            ],
            by_store=[rewards_pb2.CouponStore(**s) for s in a["by_store"]],
        )

    async def GetReferralAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.ReferralAnalytics:
        r = day_range(request)
        async with self._db.reading() as uow:
            a = await repository.referral_analytics(uow.conn, r)
        return rewards_pb2.ReferralAnalytics(
            invites=a["invites"],
            accepted=a["accepted"],
            first_orders=a["first_orders"],
            inviters=a["inviters"],
            fission_ratio=ratio(a["accepted"], a["inviters"]),
            top_inviters=[rewards_pb2.TopInviter(**t) for t in a["top_inviters"]],
            abuse_refusals=a["abuse_refusals"],
            refusals_by_reason=[common_pb2.KeyCount(**k) for k in a["refusals_by_reason"]],
        )
