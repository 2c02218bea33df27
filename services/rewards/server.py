"""Wiring of the rewards service into the shared server shell."""

from __future__ import annotations

import logging
from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loyalty.events.v1 import events_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.consumer import EventConsumer, Subscription
from servicekit.server import ServiceApp
from servicekit.settings import ServiceSettings

from .consumers import MemberEvents, OrderEvents, on_member_erased, on_tier_changed, on_zone_set
from .coupons.handlers import CouponPolicy, issue_coupon
from .mall.handlers import PointsMall
from .members import MemberDirectory, MemberGrpc
from .orders.domain import DEFAULT_MAX_PAID_AMOUNT_FEN, OrderLimits
from .orders.handlers import RewardsHandlers
from .partitions import partitioned_tables
from .points.domain import ExpiryPolicy, LedgerPolicy, ShortfallPolicy
from .points.earning import parse_rules
from .points.handlers import PointsLedger
from .referral.domain import parse_referral_rules
from .referral.handlers import Referrals
from .schema import SCHEMA
from .servicer import RewardsServicer

NAME = "rewards"
log = logging.getLogger(__name__)


class RewardsSettings(BaseSettings):
    """Business limits of the rewards service (REWARDS_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="REWARDS_", extra="ignore", frozen=True)

    # An order paying more than this is refused (ORDER_AMOUNT_TOO_LARGE).
    max_order_amount_fen: int = DEFAULT_MAX_PAID_AMOUNT_FEN
    # When a lot lapses: days:N, end_of_month:N or end_of_year:N after earning.
    points_expiry: str = "end_of_year:1"
    # Days earned points stay pending (the refund window); 0: spendable at once.
    points_pending_days: int = 0
    # A refund of points already spent: "debt" (repaid by later earns) or "report".
    refund_shortfall: ShortfallPolicy = ShortfallPolicy.DEBT
    # PointsExpiringSoon this many days ahead.
    expiring_soon_days: int = 30
    hold_ttl_seconds: int = 900
    # A points-plus-cash mall exchange waits this long for its payment, then
    # the release job gives its points and stock back.
    mall_payment_ttl_seconds: int = 900
    # Earning rules as JSON (see earning.parse_rules); empty: the defaults
    # (1 point per whole yuan, mini-program x2, default action caps).
    earning_rules: str = ""
    # The referral programme as JSON (see referral.parse_referral_rules);
    # empty: the defaults (the "referral" action's points to the inviter on
    # the invitee's first order, 20 rewarded referrals per inviter per month).
    referral_rules: str = ""
    # A coupon locked to an order is free again after this unless the order completes.
    coupon_lock_seconds: int = 900
    # What one point is worth at the till, in fen (CompleteOrder with coupons
    # checks paid = gross - coupons - points x this).
    points_value_fen: int = 1
    # CouponExpiringSoon this many days ahead.
    coupon_expiring_soon_days: int = 3
    # The member service (gRPC target): AdjustPoints and bulk earn refuse an id
    # it does not know (UNKNOWN_MEMBER) or erased. Empty: not asked (only
    # rewards' own erasure marks apply); set in every deployment.
    # MEMBER_ADDR / MEMBER_TIMEOUT_SECONDS, the names every service uses.
    member_addr: str = Field(default="", validation_alias="MEMBER_ADDR")
    member_timeout_seconds: float = Field(default=2.0, validation_alias="MEMBER_TIMEOUT_SECONDS")

    def member_directory(self) -> MemberDirectory | None:
        if not self.member_addr.strip():
            return None
        return MemberGrpc(self.member_addr.strip(), self.member_timeout_seconds)

    def points_ledger(self) -> PointsLedger:
        return PointsLedger(
            self.ledger_policy(), parse_rules(self.earning_rules), self.member_directory()
        )

    def coupon_policy(self) -> CouponPolicy:
        return CouponPolicy(
            lock_ttl=timedelta(seconds=self.coupon_lock_seconds),
            fen_per_point=self.points_value_fen,
            expiring_soon_days=self.coupon_expiring_soon_days,
        )

    def points_mall(self, points: PointsLedger) -> PointsMall:
        return PointsMall(
            points, issue_coupon, payment_ttl=timedelta(seconds=self.mall_payment_ttl_seconds)
        )

    def ledger_policy(self) -> LedgerPolicy:
        return LedgerPolicy(
            expiry=ExpiryPolicy.parse(self.points_expiry),
            pending_days=self.points_pending_days,
            shortfall=self.refund_shortfall,
            expiring_soon_days=self.expiring_soon_days,
            hold_ttl=timedelta(seconds=self.hold_ttl_seconds),
        )


def build(settings: ServiceSettings, rewards: RewardsSettings | None = None) -> ServiceApp:
    rewards = rewards or RewardsSettings()
    points = rewards.points_ledger()
    if points.directory is None:
        log.warning("MEMBER_ADDR is unset: adjustments and bulk earns are not checked")
    handlers = RewardsHandlers(
        OrderLimits(max_paid_amount_fen=rewards.max_order_amount_fen),
        points=points,
        coupon_policy=rewards.coupon_policy(),
    )
    consumers = MemberEvents(points)
    referrals = Referrals(points, parse_referral_rules(rewards.referral_rules), issue_coupon)
    mall = rewards.points_mall(points)
    orders = OrderEvents(referrals)

    def wire(app: ServiceApp) -> None:
        assert app.db is not None and app.server is not None and app.redis is not None
        rewards_pb2_grpc.add_RewardsServiceServicer_to_server(
            RewardsServicer(app.db, handlers, referrals, mall), app.server
        )
        app.partition(*partitioned_tables(settings))
        app.add_consumer(
            EventConsumer(
                "rewards-ledger-events",
                app.db,
                app.redis,
                settings.redis_namespace,
                [
                    Subscription("member", events_pb2.MemberMerged, consumers.on_merged),
                    Subscription("member", events_pb2.MemberUnmerged, consumers.on_unmerged),
                    Subscription("member", events_pb2.MemberErased, on_member_erased),
                    Subscription("member", events_pb2.MemberZoneSet, on_zone_set),
                    Subscription("tiering", events_pb2.TierChanged, on_tier_changed),
                    # Its own stream: an invitee's first order rewards the referral.
                    Subscription(
                        "rewards",
                        events_pb2.OrderCompleted,
                        orders.on_order_completed,
                        batch=orders.on_orders_completed,
                    ),
                ],
                max_attempts=settings.event_max_attempts,
                retry_after_ms=settings.event_retry_after_ms,
            )
        )
        # Merges move balances after member's epoch moved: the gateway's cached
        # member views go again once applied (not its referral orders: every order).
        app.consumers[-1].bumps_member_views = frozenset(
            m.DESCRIPTOR.full_name
            for m in (events_pb2.MemberMerged, events_pb2.MemberUnmerged, events_pb2.MemberErased)
        )

    return ServiceApp(
        NAME,
        settings,
        services=[rewards_pb2.DESCRIPTOR.services_by_name["RewardsService"]],
        wire=wire,
        schema=SCHEMA,
    )
