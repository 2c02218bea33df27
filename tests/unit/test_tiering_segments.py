"""RFM segments and lifecycle stages (no I/O)."""

from __future__ import annotations

import pytest

from services.tiering.domain import LadderError, SegmentRules, parse_rules
from services.tiering.segments import GROUP_LABELS, SEGMENT_RULES, classify, score, stage


@pytest.mark.parametrize(
    ("r", "f", "m", "orders", "segment", "group"),
    [
        (5, 5, 5, 9, "champions", "high_value_core"),
        (4, 1, 2, 1, "new", "potential_nurture"),
        (3, 3, 4, 4, "loyal", "high_value_core"),
        (3, 1, 2, 2, "potential", "potential_nurture"),
        (1, 5, 4, 8, "cant_lose", "high_value_core"),
        (2, 3, 3, 3, "at_risk", "potential_nurture"),
        (2, 1, 1, 1, "hibernating", "dormant"),
        (1, 1, 2, 1, "lost", "dormant"),
    ],
)  # fmt: skip
def test_segments_read_off_r_and_fm(
    r: int, f: int, m: int, orders: int, segment: str, group: str
) -> None:
    assert classify(r, f, m, orders) == (segment, group)


def test_every_score_combination_has_a_segment_in_a_named_group() -> None:
    seen = {
        classify(r, f, m, n)
        for r in range(1, 6)
        for f in range(1, 6)
        for m in range(1, 6)
        for n in (1, 2)
    }
    assert {name for name, _ in seen} == {rule.name for rule in SEGMENT_RULES}
    assert {group for _, group in seen} <= set(GROUP_LABELS)
    assert GROUP_LABELS["high_value_core"] == "高价值核心"


def test_quintile_score_counts_cut_points_below() -> None:
    cuts = [10, 20, 30, 40]
    assert [score(v, cuts) for v in (5, 10, 11, 25, 40, 41)] == [1, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("registered", "ordered", "expected"),
    [
        (0, None, "new"),
        (6, None, "new"),
        (7, None, "growing"),
        (29, 1, "growing"),
        (30, 29, "active"),
        (200, 30, "silent"),
        (200, 89, "silent"),
        (200, 90, "churned"),
        (60, None, "silent"),  # never ordered, registered 60 days ago
        (None, None, "churned"),
    ],
)  # fmt: skip
def test_lifecycle_stages_on_local_day_distances(
    registered: int | None, ordered: int | None, expected: str
) -> None:
    assert stage(SegmentRules(), registered, ordered) == expected


def test_stage_thresholds_are_configurable_and_validated() -> None:
    rules = parse_rules(
        {"period": {"unit": "month", "length": 12}, "segments": {"silent_days": 14}}
    )
    assert stage(rules.segments, 100, 14) == "silent"
    with pytest.raises(LadderError, match="silent_days must be at least 1 and below churned"):
        parse_rules({"period": {"unit": "month", "length": 1}, "segments": {"silent_days": 99}})
    with pytest.raises(LadderError, match="relative_top_pct"):
        parse_rules(
            {"period": {"unit": "month", "length": 1},
             "segments": {"relative_top_pct": 80, "relative_next_pct": 30}}
        )  # fmt: skip
