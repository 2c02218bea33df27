"""RFM segments and lifecycle stages: the rules as data, turned into SQL for the
batch and into Python for tests and single-member views (one source, two
renderings, so they cannot drift). No I/O.

RFM: over the configured window (default the last 3 months), each member with an
order in it gets R (recency of the last order), F (orders) and M (net spend)
scored 1-5 against the quintile cut points of all such members (20th, 40th, 60th,
80th percentiles): score = 1 + the number of cut points strictly below the value
(recency compares the last order time, later = higher). Ties score alike.
Segments are then read off (R, FM) where FM = (F + M + 1) // 2, first match wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .domain import SegmentRules


@dataclass(frozen=True)
class SegmentRule:
    name: str
    group: str
    r_min: int = 1
    r_max: int = 5
    fm_min: int = 1
    fm_max: int = 5
    single_order: bool = False  # exactly one order in the window


# The plan's grouping: 高价值核心 (high-value core), 潜力培育 (potential, nurture), 沉睡 (dormant).
HIGH_VALUE_CORE = "high_value_core"
POTENTIAL_NURTURE = "potential_nurture"
DORMANT = "dormant"
GROUP_LABELS = {HIGH_VALUE_CORE: "高价值核心", POTENTIAL_NURTURE: "潜力培育", DORMANT: "沉睡"}

SEGMENT_RULES: Sequence[SegmentRule] = (
    SegmentRule("champions", HIGH_VALUE_CORE, r_min=4, fm_min=4),
    SegmentRule("new", POTENTIAL_NURTURE, r_min=4, single_order=True),
    SegmentRule("loyal", HIGH_VALUE_CORE, r_min=3, fm_min=3),
    SegmentRule("potential", POTENTIAL_NURTURE, r_min=3),
    SegmentRule("cant_lose", HIGH_VALUE_CORE, r_max=1, fm_min=4),
    SegmentRule("at_risk", POTENTIAL_NURTURE, r_max=2, fm_min=3),
    SegmentRule("hibernating", DORMANT, r_min=2, r_max=2),
    SegmentRule("lost", DORMANT),
)
# No order in the window: lapsed buyers are lost; members who never ordered are prospects.
LAPSED = ("lost", DORMANT)
PROSPECT = ("prospect", POTENTIAL_NURTURE)


def score(value: int | float, cuts: Sequence[int | float]) -> int:
    return 1 + sum(1 for c in cuts if c < value)


def classify(r: int, f: int, m: int, orders: int) -> tuple[str, str]:
    fm = (f + m + 1) // 2
    for rule in SEGMENT_RULES:
        if (
            rule.r_min <= r <= rule.r_max
            and rule.fm_min <= fm <= rule.fm_max
            and (not rule.single_order or orders == 1)
        ):
            return rule.name, rule.group
    return LAPSED


def segment_sql(r: str, f: str, m: str, orders: str, column: str = "name") -> str:
    """CASE expression over score columns giving the segment name (or group)."""
    fm = f"(({f} + {m} + 1) / 2)"
    whens = []
    for rule in SEGMENT_RULES:
        cond = [f"{r} BETWEEN {rule.r_min} AND {rule.r_max}",
                f"{fm} BETWEEN {rule.fm_min} AND {rule.fm_max}"]  # fmt: skip
        if rule.single_order:
            cond.append(f"{orders} = 1")
        value = rule.name if column == "name" else rule.group
        whens.append(f"WHEN {' AND '.join(cond)} THEN '{value}'")
    fallback = LAPSED[0] if column == "name" else LAPSED[1]
    return f"CASE {' '.join(whens)} ELSE '{fallback}' END"


def stage(
    rules: SegmentRules, days_since_registered: int | None, days_since_order: int | None
) -> str:
    """Lifecycle stage from local-day distances (None: never registered/ordered)."""
    if days_since_registered is not None and days_since_registered < rules.new_days:
        return "new"
    if days_since_registered is not None and days_since_registered < rules.growing_days:
        return "growing"
    if days_since_order is not None and days_since_order < rules.silent_days:
        return "active"
    quiet = days_since_order if days_since_order is not None else days_since_registered
    if quiet is not None and quiet < rules.churned_days:
        return "silent"
    return "churned"


def stage_sql(rules: SegmentRules, d_reg: str, d_order: str) -> str:
    return (
        f"CASE WHEN {d_reg} < {rules.new_days} THEN 'new'"
        f" WHEN {d_reg} < {rules.growing_days} THEN 'growing'"
        f" WHEN {d_order} < {rules.silent_days} THEN 'active'"
        f" WHEN coalesce({d_order}, {d_reg}) < {rules.churned_days} THEN 'silent'"
        " ELSE 'churned' END"
    )
