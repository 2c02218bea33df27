"""Pure tier rules: programmes, ladders and which tier a metric value reaches. No I/O.

A programme's ladder is stored as JSON (operators edit it); everything read
from storage or an operator goes through `parse_ladder`, which rejects a bad
ladder with a message naming the offending entry instead of guessing.
"""

from __future__ import annotations

import bisect
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Multipliers are integer basis points (10000 = 1.0x): points are integers and
# floats never enter the arithmetic.
BASIS_POINTS = 10_000
MAX_POINTS_MULTIPLIER_BP = 10 * BASIS_POINTS
MAX_WINDOW_MONTHS = 36
TIER_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

TIER_KEYS = frozenset({"code", "name", "threshold", "retention", "benefits"})
BENEFIT_KEYS = frozenset(
    {
        "points_multiplier_bp",
        "birthday_coupon_template",
        "upgrade_gift_coupon_template",
        "free_delivery",
        "priority",
    }
)


class LadderError(ValueError):
    """A ladder or programme that cannot be used; the message names the entry at fault."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        # The programme field at fault ("ladder[1].threshold", "rules.period.length"):
        # given, or read from the message, which always starts with it.
        found = _FIELD_PREFIX.match(message)
        self.field = field or (found.group(0) if found else "")


_FIELD_PREFIX = re.compile(
    r"^(ladder|rules|window_months|qualifying_metric|effective_from)"
    r"(\[\d+\]|\.[a-z_]+)*"
)


class QualifyingMetric(enum.StrEnum):
    GROWTH_VALUE = "growth_value"
    PAID_SPEND = "paid_spend"  # integer fen
    ORDER_COUNT = "order_count"


@dataclass(frozen=True)
class Benefits:
    points_multiplier_bp: int = BASIS_POINTS
    # Coupon template issued in the member's birthday month; None when the tier has none.
    birthday_coupon_template: str | None = None
    free_delivery: bool = False
    # Coupon template issued once when a member reaches the tier by upgrade.
    upgrade_gift_coupon_template: str | None = None
    # Service priority (queue jumping at pickup); higher goes first.
    priority: int = 0

    def to_json(self) -> dict[str, Any]:
        # Every field is a JSON scalar, stored under its own name.
        return asdict(self)


@dataclass(frozen=True)
class Tier:
    code: str
    name: str
    # Lowest metric value that reaches this tier (fen, orders or growth points).
    threshold: int
    benefits: Benefits
    # 保级: the lower bar that keeps the tier at period end; None means the threshold.
    retention: int | None = None

    @property
    def retention_bar(self) -> int:
        return self.threshold if self.retention is None else self.retention

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code,
            "name": self.name,
            "threshold": self.threshold,
            "benefits": self.benefits.to_json(),
        }
        if self.retention is not None:
            out["retention"] = self.retention
        return out


@dataclass(frozen=True)
class Ladder:
    """Tiers in ascending threshold order; the first starts at 0, so everyone has a tier."""

    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        _check_ladder(self.tiers)

    def tier_for(self, metric_value: int) -> Tier:
        """The highest tier whose threshold the value reaches (the base tier below 0)."""
        thresholds = [t.threshold for t in self.tiers]
        index = bisect.bisect_right(thresholds, metric_value) - 1
        return self.tiers[max(index, 0)]

    def rank(self, code: str) -> int:
        """Position of a tier in the ladder, 0 for the base tier."""
        for n, tier in enumerate(self.tiers):
            if tier.code == code:
                return n
        raise KeyError(code)

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.tiers]


class PeriodUnit(enum.StrEnum):
    # Calendar months: periods are aligned blocks of `length` months from 1 January
    # (12 = the natural year, ends 31 Dec; 1 = each calendar month).
    MONTH = "month"
    # Blocks of `length` local days counted from the programme's effective_from day.
    DAY = "day"


class DowngradeRule(enum.StrEnum):
    ONE_LEVEL = "one_level"
    TO_METRIC = "to_metric"  # straight to the tier the metric supports


class TierMode(enum.StrEnum):
    # Thresholds: a tier is reached by the metric (upgrade at once, kept by retention).
    THRESHOLD = "threshold"
    # Relative VIP (the plan's pyramid): the top share of members by the metric
    # holds the top tier, the next share the second, re-ranked at each batch run.
    RELATIVE = "relative"


class GrowthAction(enum.StrEnum):
    CHECK_IN = "check_in"
    REVIEW = "review"
    REFERRAL = "referral"


class CapPer(enum.StrEnum):
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True)
class ActionRule:
    points: int
    cap: int  # awards per member per `per` (local calendar day or month)
    per: CapPer

    def to_json(self) -> dict[str, Any]:
        return {"points": self.points, "cap": self.cap, "per": self.per.value}


DEFAULT_ACTIONS: Mapping[GrowthAction, ActionRule] = {
    GrowthAction.CHECK_IN: ActionRule(5, 1, CapPer.DAY),
    GrowthAction.REVIEW: ActionRule(10, 3, CapPer.DAY),
    GrowthAction.REFERRAL: ActionRule(50, 10, CapPer.MONTH),
}


@dataclass(frozen=True)
class SegmentRules:
    """RFM and lifecycle settings (days are Asia/Shanghai local days by default)."""

    rfm_window_months: int = 3
    new_days: int = 7
    growing_days: int = 30
    silent_days: int = 30
    churned_days: int = 90
    # Relative VIP mode: the top share of members by spend gets the top tier,
    # the next share the second (the plan: 15% VIP, 30% SVIP).
    relative_top_pct: int = 15
    relative_next_pct: int = 30

    def to_json(self) -> dict[str, Any]:
        # Every field is a JSON scalar, stored under its own name.
        return asdict(self)


@dataclass(frozen=True)
class ProgrammeRules:
    period_unit: PeriodUnit = PeriodUnit.MONTH
    period_length: int = 12
    downgrade: DowngradeRule = DowngradeRule.ONE_LEVEL
    grace_days: int = 0
    timezone: str = "Asia/Shanghai"
    # Growth value per order: 1 per `order_fen_per_point` fen paid (100 = 1 per yuan),
    # at most `order_cap` per order (0 = no cap).
    order_fen_per_point: int = 100
    order_cap: int = 0
    actions: Mapping[GrowthAction, ActionRule] = field(
        default_factory=lambda: dict(DEFAULT_ACTIONS)
    )
    segments: SegmentRules = SegmentRules()
    tier_mode: TierMode = TierMode.THRESHOLD

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def to_json(self) -> dict[str, Any]:
        return {
            "period": {"unit": self.period_unit.value, "length": self.period_length},
            "downgrade": self.downgrade.value,
            "grace_days": self.grace_days,
            "timezone": self.timezone,
            "growth": {
                "order_fen_per_point": self.order_fen_per_point,
                "order_cap": self.order_cap,
                "actions": {a.value: r.to_json() for a, r in sorted(self.actions.items())},
            },
            "segments": self.segments.to_json(),
            "tier_mode": self.tier_mode.value,
        }


DEFAULT_RULES = ProgrammeRules()


@dataclass(frozen=True)
class TierProgramme:
    """One version of a tier programme. A later version applies from its
    effective_from; earlier versions stay as they were (history is not rewritten)."""

    programme_id: str
    version: int
    effective_from: datetime
    qualifying_metric: QualifyingMetric
    window_months: int
    ladder: Ladder
    rules: ProgrammeRules = DEFAULT_RULES

    def __post_init__(self) -> None:
        if not self.programme_id.strip():
            raise LadderError("programme_id is empty", "programme_id")
        if self.version < 1:
            raise LadderError(f"version must be 1 or more, got {self.version}", "version")
        if self.effective_from.tzinfo is None:
            raise LadderError("effective_from must carry a time zone")
        if not 1 <= self.window_months <= MAX_WINDOW_MONTHS:
            raise LadderError(
                f"window_months must be between 1 and {MAX_WINDOW_MONTHS}, got {self.window_months}"
            )
        for n, tier in enumerate(self.ladder.tiers[1:], start=1):
            below = self.ladder.tiers[n - 1]
            if (
                tier.retention_bar < below.threshold
                and self.rules.downgrade is DowngradeRule.TO_METRIC
            ):
                # Retention under the tier below would keep a tier the metric
                # says is two levels lower; one_level ladders may do that on purpose.
                raise LadderError(
                    f"ladder[{n}].retention {tier.retention_bar} is below ladder[{n - 1}].threshold"
                    f" {below.threshold}, which the to_metric downgrade rule cannot honour"
                )

        if self.rules.tier_mode is TierMode.RELATIVE and len(self.ladder.tiers) != 3:
            raise LadderError(
                "ladder must have 3 tiers in relative mode (base, the next share, the top"
                f" share), got {len(self.ladder.tiers)}",
                "rules.tier_mode",
            )

    def tier(self, code: str) -> Tier:
        return self.ladder.tiers[self.ladder.rank(code)]


def parse_rules(raw: object) -> ProgrammeRules:
    """Build ProgrammeRules from JSON; absent keys take the defaults."""
    if raw is None:
        return DEFAULT_RULES
    if not isinstance(raw, Mapping):
        raise LadderError(f"rules must be an object, got {type(raw).__name__}")
    _reject_unknown(
        "rules",
        raw,
        frozenset(
            {"period", "downgrade", "grace_days", "timezone", "growth", "segments", "tier_mode"}
        ),
    )
    if "period" not in raw:
        raise LadderError(
            'rules.period is missing: a tier period must end (e.g. {"unit": "month", "length": 12})'
        )
    period = raw["period"]
    if not isinstance(period, Mapping):
        raise LadderError("rules.period must be an object {unit, length}")
    _reject_unknown("rules.period", period, frozenset({"unit", "length"}))
    unit_raw = period.get("unit")
    try:
        unit = PeriodUnit(str(unit_raw))
    except ValueError:
        raise LadderError(
            f"rules.period.unit {unit_raw!r} is not one of month, day: a period must end"
        ) from None
    length = _integer("rules.period.length", period.get("length"))
    if length == 0:
        raise LadderError("rules.period.length must be at least 1: a period of 0 never ends")
    if unit is PeriodUnit.MONTH and 12 % length:
        raise LadderError(
            f"rules.period.length {length} months must divide the year (1, 2, 3, 4, 6 or 12)"
        )
    if unit is PeriodUnit.DAY and length > 3 * 366:
        raise LadderError(f"rules.period.length {length} days is more than 3 years")
    downgrade_raw = raw.get("downgrade", DowngradeRule.ONE_LEVEL.value)
    try:
        downgrade = DowngradeRule(downgrade_raw)
    except ValueError:
        raise LadderError(
            f"rules.downgrade {downgrade_raw!r} is not one of one_level, to_metric"
        ) from None
    grace = _integer("rules.grace_days", raw.get("grace_days", 0))
    period_days = length * 28 if unit is PeriodUnit.MONTH else length
    if grace >= period_days:
        raise LadderError(
            f"rules.grace_days {grace} must be shorter than the period ({period_days} days)"
        )
    timezone = raw.get("timezone", "Asia/Shanghai")
    try:
        ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise LadderError(f"rules.timezone {timezone!r} is not a known time zone") from None
    growth = raw.get("growth", {})
    if not isinstance(growth, Mapping):
        raise LadderError("rules.growth must be an object")
    _reject_unknown(
        "rules.growth", growth, frozenset({"order_fen_per_point", "order_cap", "actions"})
    )
    fen_per_point = _integer(
        "rules.growth.order_fen_per_point", growth.get("order_fen_per_point", 100)
    )
    if fen_per_point == 0:
        raise LadderError("rules.growth.order_fen_per_point must be at least 1")
    order_cap = _integer("rules.growth.order_cap", growth.get("order_cap", 0))
    actions = dict(DEFAULT_ACTIONS)
    raw_actions = growth.get("actions", {})
    if not isinstance(raw_actions, Mapping):
        raise LadderError("rules.growth.actions must be an object")
    for name, spec in raw_actions.items():
        where = f"rules.growth.actions.{name}"
        try:
            action = GrowthAction(name)
        except ValueError:
            raise LadderError(
                f"{where} is not an action; allowed: {[a.value for a in GrowthAction]}"
            ) from None
        if not isinstance(spec, Mapping):
            raise LadderError(f"{where} must be an object {{points, cap, per}}")
        _reject_unknown(where, spec, frozenset({"points", "cap", "per"}))
        try:
            per = CapPer(spec.get("per", "day"))
        except ValueError:
            raise LadderError(f"{where}.per must be day or month") from None
        actions[action] = ActionRule(
            _integer(f"{where}.points", spec.get("points", 0)),
            _integer(f"{where}.cap", spec.get("cap", 0)),
            per,
        )
    mode_raw = raw.get("tier_mode", TierMode.THRESHOLD.value)
    try:
        tier_mode = TierMode(mode_raw)
    except ValueError:
        raise LadderError(
            f"rules.tier_mode {mode_raw!r} is not one of threshold, relative"
        ) from None
    return ProgrammeRules(
        tier_mode=tier_mode,
        period_unit=unit,
        period_length=length,
        downgrade=downgrade,
        grace_days=grace,
        timezone=str(timezone),
        order_fen_per_point=fen_per_point,
        order_cap=order_cap,
        actions=actions,
        segments=_parse_segments(raw.get("segments", {})),
    )


def _parse_segments(raw: object) -> SegmentRules:
    if not isinstance(raw, Mapping):
        raise LadderError("rules.segments must be an object")
    defaults = SegmentRules().to_json()
    _reject_unknown("rules.segments", raw, frozenset(defaults))
    values = {k: _integer(f"rules.segments.{k}", raw.get(k, v)) for k, v in defaults.items()}
    rules = SegmentRules(**values)
    if not 1 <= rules.rfm_window_months <= MAX_WINDOW_MONTHS:
        raise LadderError(
            f"rules.segments.rfm_window_months must be between 1 and {MAX_WINDOW_MONTHS}, "
            f"got {rules.rfm_window_months}"
        )
    if not 0 < rules.new_days <= rules.growing_days:
        raise LadderError("rules.segments.new_days must be at least 1 and not above growing_days")
    if not 0 < rules.silent_days < rules.churned_days:
        raise LadderError("rules.segments.silent_days must be at least 1 and below churned_days")
    if rules.relative_top_pct + rules.relative_next_pct > 100:
        raise LadderError("rules.segments.relative_top_pct + relative_next_pct exceed 100")
    return rules


def parse_metric(raw: str) -> QualifyingMetric:
    try:
        return QualifyingMetric(raw)
    except ValueError:
        allowed = ", ".join(m.value for m in QualifyingMetric)
        raise LadderError(f"qualifying_metric {raw!r} is not one of {allowed}") from None


def parse_ladder(raw: object) -> Ladder:
    """Build a Ladder from its JSON form (a list of tier objects)."""
    if not isinstance(raw, list):
        raise LadderError(f"ladder must be a list of tiers, got {type(raw).__name__}")
    return Ladder(tuple(_parse_tier(n, entry) for n, entry in enumerate(raw)))


def _parse_tier(n: int, entry: object) -> Tier:
    where = f"ladder[{n}]"
    if not isinstance(entry, Mapping):
        raise LadderError(f"{where} must be an object, got {type(entry).__name__}")
    _reject_unknown(where, entry, TIER_KEYS)
    for key in ("code", "name", "threshold"):
        if key not in entry:
            raise LadderError(f"{where}.{key} is missing")
    code, name = entry["code"], entry["name"]
    if not isinstance(code, str) or not TIER_CODE.match(code):
        raise LadderError(
            f"{where}.code must be lower-case letters, digits or _ (at most 32), got {code!r}"
        )
    if not isinstance(name, str) or not name.strip():
        raise LadderError(f"{where}.name must be a non-empty string")
    threshold = _integer(f"{where}.threshold", entry["threshold"])
    benefits = _parse_benefits(f"{where}.benefits", entry.get("benefits", {}))
    retention = None
    if entry.get("retention") is not None:
        retention = _integer(f"{where}.retention", entry["retention"])
        if retention > threshold:
            raise LadderError(
                f"{where}.retention {retention} must not be above its threshold {threshold}"
            )
    return Tier(code, name.strip(), threshold, benefits, retention)


def _parse_benefits(where: str, raw: object) -> Benefits:
    if not isinstance(raw, Mapping):
        raise LadderError(f"{where} must be an object, got {type(raw).__name__}")
    _reject_unknown(where, raw, BENEFIT_KEYS)
    multiplier = _integer(
        f"{where}.points_multiplier_bp", raw.get("points_multiplier_bp", BASIS_POINTS)
    )
    if not BASIS_POINTS <= multiplier <= MAX_POINTS_MULTIPLIER_BP:
        raise LadderError(
            f"{where}.points_multiplier_bp must be between {BASIS_POINTS} (1.0x) and "
            f"{MAX_POINTS_MULTIPLIER_BP}, got {multiplier}"
        )
    template = raw.get("birthday_coupon_template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise LadderError(f"{where}.birthday_coupon_template must be a non-empty string or null")
    free_delivery = raw.get("free_delivery", False)
    if not isinstance(free_delivery, bool):
        raise LadderError(f"{where}.free_delivery must be true or false")
    gift = raw.get("upgrade_gift_coupon_template")
    if gift is not None and (not isinstance(gift, str) or not gift.strip()):
        raise LadderError(
            f"{where}.upgrade_gift_coupon_template must be a non-empty string or null"
        )
    priority = _integer(f"{where}.priority", raw.get("priority", 0))
    return Benefits(
        multiplier,
        template.strip() if template else None,
        free_delivery,
        gift.strip() if gift else None,
        priority,
    )


def _integer(where: str, value: object) -> int:
    # bool is an int in Python; a float threshold is a mistake (money is integer fen).
    if isinstance(value, bool) or not isinstance(value, int):
        raise LadderError(f"{where} must be an integer, got {value!r}")
    if value < 0:
        raise LadderError(f"{where} must not be negative, got {value}")
    return value


def _reject_unknown(where: str, entry: Mapping[str, object], allowed: frozenset[str]) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise LadderError(f"{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")


def _check_ladder(tiers: Sequence[Tier]) -> None:
    if not tiers:
        raise LadderError("ladder has no tiers")
    if tiers[0].threshold != 0:
        raise LadderError(
            f"ladder[0] ({tiers[0].code}) must have threshold 0 so every member has a tier, "
            f"got {tiers[0].threshold}"
        )
    seen: set[str] = set()
    for n, tier in enumerate(tiers):
        if tier.code in seen:
            raise LadderError(f"ladder[{n}].code {tier.code!r} appears twice")
        seen.add(tier.code)
        if n and tier.threshold <= tiers[n - 1].threshold:
            raise LadderError(
                f"ladder[{n}].threshold {tier.threshold} must be above "
                f"ladder[{n - 1}].threshold {tiers[n - 1].threshold} (ascending order)"
            )
