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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Multipliers are integer basis points (10000 = 1.0x): points are integers and
# floats never enter the arithmetic.
BASIS_POINTS = 10_000
MAX_POINTS_MULTIPLIER_BP = 10 * BASIS_POINTS
MAX_WINDOW_MONTHS = 36
TIER_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

TIER_KEYS = frozenset({"code", "name", "threshold", "benefits"})
BENEFIT_KEYS = frozenset({"points_multiplier_bp", "birthday_coupon_template", "free_delivery"})


class LadderError(ValueError):
    """A ladder or programme that cannot be used; the message names the entry at fault."""


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

    def to_json(self) -> dict[str, Any]:
        return {
            "points_multiplier_bp": self.points_multiplier_bp,
            "birthday_coupon_template": self.birthday_coupon_template,
            "free_delivery": self.free_delivery,
        }


@dataclass(frozen=True)
class Tier:
    code: str
    name: str
    # Lowest metric value that reaches this tier (fen, orders or growth points).
    threshold: int
    benefits: Benefits

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "threshold": self.threshold,
            "benefits": self.benefits.to_json(),
        }


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

    def __post_init__(self) -> None:
        if not self.programme_id.strip():
            raise LadderError("programme_id is empty")
        if self.version < 1:
            raise LadderError(f"version must be 1 or more, got {self.version}")
        if self.effective_from.tzinfo is None:
            raise LadderError("effective_from must carry a time zone")
        if not 1 <= self.window_months <= MAX_WINDOW_MONTHS:
            raise LadderError(
                f"window_months must be between 1 and {MAX_WINDOW_MONTHS}, got {self.window_months}"
            )


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
    return Tier(code, name.strip(), threshold, benefits)


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
    return Benefits(multiplier, template.strip() if template else None, free_delivery)


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
