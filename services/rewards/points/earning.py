"""Earning rules as configuration (pure, no I/O).

Points for an order = base points of the eligible amount (whole yuan after the
rounding rule, times the base rate; excluded categories such as delivery fees
or gift cards earn nothing), times the channel multiplier (mini-program orders
earn double) and the member's tier multiplier (basis points, 10000 = x1), plus
the bonus of every campaign whose window, stores and categories match, capped
per member per business day. Non-order actions (check-in, review, tea-residue
recycling, referral) earn fixed points with a cap on how often per period.

Everything that decided the amount is returned as a document and stored on the
ledger transaction (`rule`), so each transaction says why it earned what it did.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from servicekit.errors import InvalidArgument

from ..kernel import OrderRequest
from .domain import BUSINESS_TZ

BP = 10_000  # basis points: 10000 = x1
FEN_PER_YUAN = 100


class Rounding(enum.StrEnum):
    FLOOR = "floor"  # only whole yuan earn: ¥9.99 -> 9 yuan
    HALF_UP = "half_up"  # ¥9.50 -> 10 yuan


@dataclass(frozen=True)
class EarningRule:
    """Points for an amount paid: whole yuan (after rounding) times a base rate.

    The name is recorded on every ledger transaction, so a later change of rule
    (tier or channel multipliers, campaigns) stays traceable per transaction.
    """

    name: str
    points_per_yuan: int = 1
    rounding: Rounding = Rounding.FLOOR

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an earning rule needs a name")
        if self.points_per_yuan < 0:
            raise ValueError("points_per_yuan must be >= 0")

    def points_for(self, paid_amount_fen: int) -> int:
        if paid_amount_fen < 0:
            raise ValueError("paid_amount_fen must be >= 0")
        if self.rounding is Rounding.FLOOR:
            yuan = paid_amount_fen // FEN_PER_YUAN
        else:
            yuan = (paid_amount_fen + FEN_PER_YUAN // 2) // FEN_PER_YUAN
        return yuan * self.points_per_yuan

    def describe(self) -> dict[str, object]:
        """What the ledger stores about the rule that produced a transaction."""
        return {
            "name": self.name,
            "points_per_yuan": self.points_per_yuan,
            "rounding": self.rounding.value,
        }


# 1 point per whole ¥1 paid (the plan's default).
BASE_EARNING_RULE = EarningRule(name="base_1pt_per_yuan")


class Period(enum.StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def period_start(period: Period, at: datetime) -> datetime:
    """The start (a China Standard Time midnight) of the period holding `at`."""
    local = at.astimezone(BUSINESS_TZ)
    day = datetime(local.year, local.month, local.day, tzinfo=BUSINESS_TZ)
    if period is Period.WEEK:
        return day - timedelta(days=local.weekday())
    if period is Period.MONTH:
        return day.replace(day=1)
    return day


@dataclass(frozen=True)
class Campaign:
    """Extra points on matching lines inside a time window: a multiplier of
    `multiplier_bp` turns each eligible point into that many (20000 = double,
    so the bonus is one extra point per base point)."""

    name: str
    starts_at: datetime
    ends_at: datetime
    multiplier_bp: int
    # Empty: every store / every category.
    stores: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()

    def applies(self, order: OrderRequest, at: datetime) -> bool:
        return self.starts_at <= at < self.ends_at and (
            not self.stores or order.store_id in self.stores
        )


@dataclass(frozen=True)
class ActionRule:
    points: int
    period: Period = Period.DAY
    # How many times per period the action earns.
    max_per_period: int = 1


@dataclass(frozen=True)
class OrderPoints:
    points: int
    rule: dict[str, object]


@dataclass(frozen=True)
class EarningRules:
    base: EarningRule = BASE_EARNING_RULE
    channel_multiplier_bp: Mapping[str, int] = field(
        default_factory=lambda: {"mini_program": 2 * BP}
    )
    # Tier code -> multiplier; an unknown or absent tier is the base tier.
    tier_multiplier_bp: Mapping[str, int] = field(default_factory=dict)
    base_tier: str = "base"
    campaigns: tuple[Campaign, ...] = ()
    excluded_categories: frozenset[str] = frozenset()
    # Points from orders per member per business day; None: no cap.
    daily_cap: int | None = None
    actions: Mapping[str, ActionRule] = field(
        default_factory=lambda: {
            "check_in": ActionRule(5, Period.DAY, 1),
            "review": ActionRule(20, Period.DAY, 3),
            "tea_residue": ActionRule(10, Period.WEEK, 2),
            "referral": ActionRule(100, Period.MONTH, 10),
        }
    )

    @property
    def needs_tier(self) -> bool:
        return bool(self.tier_multiplier_bp)

    def order_points(
        self, order: OrderRequest, at: datetime, tier: str | None, tier_bp: int | None = None
    ) -> OrderPoints:
        """Points of an order before the daily cap, and the document saying why.

        `tier_bp` is the multiplier tiering sent with the member's tier
        (TierChanged); without it the configured multiplier of the tier code
        applies."""
        if order.lines:
            eligible = [
                line for line in order.lines if line.category not in self.excluded_categories
            ]
            eligible_fen = sum(line.paid_amount_fen for line in eligible)
        else:
            eligible, eligible_fen = [], order.paid_amount_fen
        base = self.base.points_for(eligible_fen)
        channel = order.channel.value if order.channel else ""
        channel_bp = self.channel_multiplier_bp.get(channel, BP)
        tier_code = tier or self.base_tier
        tier_bp_source = "tiering" if tier_bp else "config"
        if not tier_bp:
            tier_bp = self.tier_multiplier_bp.get(tier_code, BP)
        points = base * channel_bp * tier_bp // (BP * BP)
        bonuses = []
        for campaign in self.campaigns:
            if not campaign.applies(order, at):
                continue
            if order.lines:
                fen = sum(
                    line.paid_amount_fen
                    for line in eligible
                    if not campaign.categories or line.category in campaign.categories
                )
            else:
                fen = eligible_fen if not campaign.categories else 0
            bonus = self.base.points_for(fen) * (campaign.multiplier_bp - BP) // BP
            if bonus > 0:
                bonuses.append({"campaign": campaign.name, "bonus": bonus})
                points += bonus
        rule: dict[str, object] = self.base.describe() | {
            "eligible_fen": eligible_fen,
            "excluded_fen": order.paid_amount_fen - eligible_fen,
            "base_points": base,
            "channel": channel,
            "channel_bp": channel_bp,
            "tier": tier_code,
            "tier_bp": tier_bp,
            "tier_bp_source": tier_bp_source,
        }
        if bonuses:
            rule["campaigns"] = bonuses
        return OrderPoints(points, rule)

    def action(self, name: str) -> ActionRule:
        rule = self.actions.get(name)
        if rule is None:
            raise InvalidArgument(
                f"action {name!r} earns no points; known: {', '.join(sorted(self.actions))}",
                code="UNKNOWN_ACTION",
                field="action",
            )
        return rule


def parse_rules(doc: str) -> EarningRules:
    """Rules from JSON configuration (REWARDS_EARNING_RULES); empty: the defaults.

    {"points_per_yuan": 1, "rounding": "floor",
     "channel_multiplier_bp": {"mini_program": 20000},
     "tier_multiplier_bp": {"gold": 15000}, "base_tier": "base",
     "excluded_categories": ["delivery_fee"], "daily_cap": 500,
     "campaigns": [{"name": "summer", "starts_at": "...", "ends_at": "...",
                    "multiplier_bp": 30000, "stores": ["SH001"], "categories": ["tea"]}],
     "actions": {"check_in": {"points": 5, "period": "day", "max_per_period": 1}}}
    """
    if not doc.strip():
        return EarningRules()
    raw: dict[str, Any] = json.loads(doc)
    defaults = EarningRules()
    base = EarningRule(
        name=raw.get("name", BASE_EARNING_RULE.name),
        points_per_yuan=int(raw.get("points_per_yuan", 1)),
        rounding=Rounding(raw.get("rounding", "floor")),
    )
    return EarningRules(
        base=base,
        channel_multiplier_bp={
            k: int(v)
            for k, v in raw.get("channel_multiplier_bp", defaults.channel_multiplier_bp).items()
        },
        tier_multiplier_bp={k: int(v) for k, v in raw.get("tier_multiplier_bp", {}).items()},
        base_tier=raw.get("base_tier", defaults.base_tier),
        campaigns=tuple(
            Campaign(
                name=c["name"],
                starts_at=datetime.fromisoformat(c["starts_at"]),
                ends_at=datetime.fromisoformat(c["ends_at"]),
                multiplier_bp=int(c["multiplier_bp"]),
                stores=frozenset(c.get("stores", ())),
                categories=frozenset(c.get("categories", ())),
            )
            for c in raw.get("campaigns", ())
        ),
        excluded_categories=frozenset(raw.get("excluded_categories", ())),
        daily_cap=raw.get("daily_cap"),
        actions={
            name: ActionRule(
                int(a["points"]), Period(a.get("period", "day")), int(a.get("max_per_period", 1))
            )
            for name, a in raw.get("actions", {}).items()
        }
        or defaults.actions,
    )
