"""The one RewardsService: composes the gRPC methods of the five contexts
(orders, points, coupons, referral, mall) and of the operator dashboards
(analytics), six mixins, each mapped in its own servicer."""

from __future__ import annotations

from loyalty.rewards.v1 import rewards_pb2_grpc
from servicekit.db import Database

from .analytics.servicer import AnalyticsRpcs
from .coupons.handlers import TemplateCache
from .coupons.servicer import CouponRpcs
from .mall.handlers import PointsMall
from .mall.servicer import MallRpcs
from .orders.handlers import RewardsHandlers
from .orders.servicer import OrderRpcs
from .points.servicer import PointsRpcs
from .referral.handlers import Referrals
from .referral.servicer import ReferralRpcs


class RewardsServicer(
    OrderRpcs,
    PointsRpcs,
    CouponRpcs,
    ReferralRpcs,
    MallRpcs,
    AnalyticsRpcs,
    rewards_pb2_grpc.RewardsServiceServicer,
):
    def __init__(
        self, db: Database, handlers: RewardsHandlers, referrals: Referrals, mall: PointsMall
    ) -> None:
        self._db = db
        self._handlers = handlers
        self._points = handlers.points
        self._coupon_policy = handlers.coupon_policy
        self._issue_templates = TemplateCache()
        self._referrals = referrals
        self._mall = mall
