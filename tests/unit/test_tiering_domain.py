"""Tier ladders and programmes: parsing, validation and tier_for (no I/O)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tiering.domain import (
    Benefits,
    Ladder,
    LadderError,
    QualifyingMetric,
    Tier,
    TierProgramme,
    parse_ladder,
    parse_metric,
)
from services.tiering.seed import DEMO_PROGRAMME

LADDER_JSON: list[dict[str, Any]] = [
    {"code": "regular", "name": "普通会员", "threshold": 0},
    {
        "code": "svip",
        "name": "SVIP",
        "threshold": 50_000,
        "benefits": {"points_multiplier_bp": 12_000, "birthday_coupon_template": "bday"},
    },
    {
        "code": "vip",
        "name": "VIP",
        "threshold": 150_000,
        "benefits": {"points_multiplier_bp": 15_000, "free_delivery": True},
    },
]


def ladder_with(n: int, **changes: object) -> list[dict[str, Any]]:
    raw = copy.deepcopy(LADDER_JSON)
    raw[n].update(changes)
    return raw


def test_parses_ladder_with_default_benefits() -> None:
    ladder = parse_ladder(LADDER_JSON)
    assert [t.code for t in ladder.tiers] == ["regular", "svip", "vip"]
    assert ladder.tiers[0].benefits == Benefits(10_000, None, False)
    assert ladder.tiers[1].benefits == Benefits(12_000, "bday", False)
    assert ladder.tiers[2].benefits == Benefits(15_000, None, True)


def test_json_round_trip() -> None:
    ladder = parse_ladder(LADDER_JSON)
    assert parse_ladder(ladder.to_json()) == ladder
    assert parse_ladder(DEMO_PROGRAMME.ladder.to_json()) == DEMO_PROGRAMME.ladder


@pytest.mark.parametrize(
    ("value", "code"),
    [(0, "regular"), (49_999, "regular"), (50_000, "svip"), (149_999, "svip"), (150_000, "vip"),
     (10**12, "vip"), (-5, "regular")],
)  # fmt: skip
def test_tier_for_boundaries(value: int, code: str) -> None:
    assert parse_ladder(LADDER_JSON).tier_for(value).code == code


def test_demo_programme_is_the_documented_ladder() -> None:
    tiers = DEMO_PROGRAMME.ladder.tiers
    assert [(t.name, t.threshold) for t in tiers] == [
        ("普通会员", 0),
        ("SVIP", 50_000),
        ("VIP", 150_000),
    ]
    assert [t.benefits.points_multiplier_bp for t in tiers] == [10_000, 12_000, 15_000]
    assert DEMO_PROGRAMME.qualifying_metric is QualifyingMetric.PAID_SPEND
    assert DEMO_PROGRAMME.window_months == 12


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "ladder has no tiers"),
        ({"code": "x"}, "ladder must be a list"),
        (["regular"], r"ladder\[0\] must be an object"),
        (ladder_with(0, threshold=100), r"ladder\[0\] \(regular\) must have threshold 0"),
        (ladder_with(2, threshold=50_000), r"ladder\[2\]\.threshold 50000 must be above"),
        (ladder_with(2, threshold=10_000), r"ladder\[2\]\.threshold 10000 must be above"),
        (ladder_with(2, code="svip"), r"ladder\[2\]\.code 'svip' appears twice"),
        (ladder_with(1, threshold=500.0), r"ladder\[1\]\.threshold must be an integer"),
        (ladder_with(1, threshold="500"), r"ladder\[1\]\.threshold must be an integer"),
        (ladder_with(1, threshold=True), r"ladder\[1\]\.threshold must be an integer"),
        (ladder_with(1, threshold=-1), r"ladder\[1\]\.threshold must not be negative"),
        (ladder_with(1, code="S VIP"), r"ladder\[1\]\.code must be lower-case"),
        (ladder_with(1, name="  "), r"ladder\[1\]\.name must be a non-empty string"),
        (ladder_with(1, colour="gold"), r"ladder\[1\] has unknown keys \['colour'\]"),
        (
            ladder_with(1, benefits={"points_multiplier": 1.2}),
            r"ladder\[1\]\.benefits has unknown keys \['points_multiplier'\]",
        ),
        (
            ladder_with(1, benefits={"points_multiplier_bp": 1.2}),
            r"ladder\[1\]\.benefits\.points_multiplier_bp must be an integer",
        ),
        (
            ladder_with(1, benefits={"points_multiplier_bp": 5_000}),
            r"points_multiplier_bp must be between 10000",
        ),
        (
            ladder_with(1, benefits={"free_delivery": "yes"}),
            r"ladder\[1\]\.benefits\.free_delivery must be true or false",
        ),
        (
            ladder_with(1, benefits={"birthday_coupon_template": ""}),
            r"ladder\[1\]\.benefits\.birthday_coupon_template must be a non-empty string",
        ),
    ],
)
def test_bad_ladders_are_rejected_with_the_entry_named(raw: object, message: str) -> None:
    with pytest.raises(LadderError, match=message):
        parse_ladder(raw)


def test_missing_key_is_named() -> None:
    raw = copy.deepcopy(LADDER_JSON)
    del raw[1]["threshold"]
    with pytest.raises(LadderError, match=r"ladder\[1\]\.threshold is missing"):
        parse_ladder(raw)


def test_ladder_built_in_code_is_validated_too() -> None:
    base = Tier("regular", "普通会员", 0, Benefits())
    with pytest.raises(LadderError, match="ascending"):
        Ladder((base, Tier("b", "B", 10, Benefits()), Tier("c", "C", 10, Benefits())))


def test_programme_validation() -> None:
    ladder = parse_ladder(LADDER_JSON)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    ok = TierProgramme("default", 2, start, QualifyingMetric.ORDER_COUNT, 3, ladder)
    assert ok.version == 2
    with pytest.raises(LadderError, match="version must be 1 or more"):
        TierProgramme("default", 0, start, QualifyingMetric.PAID_SPEND, 12, ladder)
    with pytest.raises(LadderError, match="window_months must be between 1 and 36"):
        TierProgramme("default", 1, start, QualifyingMetric.PAID_SPEND, 0, ladder)
    with pytest.raises(LadderError, match="time zone"):
        TierProgramme("default", 1, datetime(2025, 1, 1), QualifyingMetric.PAID_SPEND, 12, ladder)
    with pytest.raises(LadderError, match="programme_id is empty"):
        TierProgramme(" ", 1, start, QualifyingMetric.PAID_SPEND, 12, ladder)
    with pytest.raises(LadderError, match="qualifying_metric 'spend' is not one of"):
        parse_metric("spend")


# Ladders of 1-8 tiers: a 0 base tier plus strictly ascending thresholds.
ladders = st.lists(
    st.integers(min_value=1, max_value=10**9), min_size=0, max_size=7, unique=True
).map(
    lambda ups: Ladder(
        tuple(
            Tier(f"t{n}", f"Tier {n}", threshold, Benefits())
            for n, threshold in enumerate([0, *sorted(ups)])
        )
    )
)
metric = st.integers(min_value=-(10**3), max_value=2 * 10**9)


@given(ladders, metric, metric)
def test_tier_for_is_monotonic(ladder: Ladder, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert ladder.rank(ladder.tier_for(low).code) <= ladder.rank(ladder.tier_for(high).code)


@given(ladders, st.integers(min_value=0, max_value=2 * 10**9))
def test_tier_for_is_the_highest_reached_threshold(ladder: Ladder, value: int) -> None:
    tier = ladder.tier_for(value)
    assert tier.threshold <= value
    above = ladder.tiers[ladder.rank(tier.code) + 1 :]
    assert all(t.threshold > value for t in above)
