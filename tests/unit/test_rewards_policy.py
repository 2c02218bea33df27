"""Pure ledger rules: expiry policies, soonest-expiring allocation, refund
proportions, earning rules (multipliers, campaigns, exclusions, actions)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from servicekit.errors import InvalidArgument
from services.rewards.kernel import Channel, OrderLine, OrderRequest
from services.rewards.points.domain import (
    BUSINESS_TZ,
    ExpiryKind,
    ExpiryPolicy,
    Lot,
    allocate,
    check_points,
    due_for_activation,
    due_for_expiry,
    refund_points_due,
    request_hash,
)
from services.rewards.points.earning import (
    Campaign,
    EarningRules,
    Period,
    parse_rules,
    period_start,
)

NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)


def lot(remaining: int, expires_in_days: int, status: str = "active", n: int = 0) -> Lot:
    return Lot(
        uuid.UUID(int=n),
        remaining,
        status,
        NOW + timedelta(days=expires_in_days),
        earned_at=NOW - timedelta(days=n),
    )


@pytest.mark.parametrize(
    ("policy", "earned", "expected"),
    [
        # 31 Dec 23:00 UTC is already 1 Jan in Shanghai: the next year counts.
        ("end_of_year:1", datetime(2025, 12, 31, 17, tzinfo=UTC), datetime(2028, 1, 1)),
        ("end_of_year:1", datetime(2025, 12, 31, 15, tzinfo=UTC), datetime(2027, 1, 1)),
        ("end_of_year:0", datetime(2025, 3, 1, tzinfo=UTC), datetime(2026, 1, 1)),
        ("end_of_month:1", datetime(2025, 11, 20, tzinfo=UTC), datetime(2026, 1, 1)),
        ("end_of_month:12", datetime(2025, 1, 5, tzinfo=UTC), datetime(2026, 2, 1)),
    ],
)
def test_calendar_expiry_is_in_business_time(
    policy: str, earned: datetime, expected: datetime
) -> None:
    assert ExpiryPolicy.parse(policy).expires_at(earned) == expected.replace(tzinfo=BUSINESS_TZ)


def test_day_expiry_and_bad_policies() -> None:
    assert ExpiryPolicy(ExpiryKind.DAYS, 30).expires_at(NOW) == NOW + timedelta(days=30)
    for text in ("days:0", "weeks:2", "end_of_year:x"):
        with pytest.raises(ValueError):
            ExpiryPolicy.parse(text)


def test_allocation_takes_soonest_expiring_first() -> None:
    lots = [lot(50, 300, n=1), lot(30, 10, n=2), lot(40, 100, n=3)]
    takes = allocate(lots, 60, NOW)
    assert takes is not None
    assert [(t.lot_id.int, t.points) for t in takes] == [(2, 30), (3, 30)]
    assert allocate(lots, 121, NOW) is None
    assert [t.points for t in allocate(lots, 120, NOW) or []] == [30, 40, 50]


def test_allocation_skips_expired_pending_and_empty_lots() -> None:
    lots = [lot(50, -1, n=1), lot(30, 10, "pending", n=2), lot(0, 5, n=3), lot(20, 50, n=4)]
    assert [(t.lot_id.int, t.points) for t in allocate(lots, 20, NOW) or []] == [(4, 20)]
    assert allocate(lots, 21, NOW) is None
    assert [x.lot_id.int for x in due_for_expiry(lots, NOW)] == [1]


def test_activation_due() -> None:
    pending = Lot(
        uuid.UUID(int=1), 10, "pending", NOW + timedelta(days=9), NOW - timedelta(hours=1)
    )
    waiting = Lot(
        uuid.UUID(int=2), 10, "pending", NOW + timedelta(days=9), NOW + timedelta(hours=1)
    )
    assert due_for_activation([pending, waiting], NOW) == [pending]


def test_refund_points_are_proportional_and_never_exceed_the_order() -> None:
    # 99 points on ¥99: three thirds reverse 33 each, never 34 in total drift.
    due = [refund_points_due(99, 9_900, i * 3_300, 3_300, i * 33) for i in range(3)]
    assert due == [33, 33, 33]
    # Uneven splits: the last refund takes exactly what remains.
    first = refund_points_due(10, 1_000, 0, 333, 0)
    second = refund_points_due(10, 1_000, 333, 333, first)
    third = refund_points_due(10, 1_000, 666, 334, first + second)
    assert first + second + third == 10
    assert refund_points_due(0, 0, 0, 100, 0) == 0


@pytest.mark.parametrize(
    ("value", "code"), [(0, "INVALID_POINTS"), (-1, "INVALID_POINTS"), (10**9, "POINTS_TOO_LARGE")]
)
def test_points_must_be_positive_and_bounded(value: int, code: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_points(value, "points")
    assert (caught.value.code, caught.value.field) == (code, "points")


def test_request_hash_is_canonical() -> None:
    assert request_hash("redeem", {"a": 1, "b": "x"}) == request_hash("redeem", {"b": "x", "a": 1})
    assert request_hash("redeem", {"a": 1}) != request_hash("hold", {"a": 1})


def order(
    channel: Channel = Channel.STORE, lines: tuple[OrderLine, ...] = (), paid: int = 2_850
) -> OrderRequest:
    return OrderRequest("SH001", "T1", str(uuid.uuid4()), channel, paid, lines=lines)


def test_channel_and_tier_multipliers_compose() -> None:
    rules = EarningRules(tier_multiplier_bp={"gold": 15_000})
    assert rules.order_points(order(), NOW, None).points == 28
    assert rules.order_points(order(Channel.MINI_PROGRAM), NOW, None).points == 56
    priced = rules.order_points(order(Channel.MINI_PROGRAM), NOW, "gold")
    assert priced.points == 84
    assert priced.rule["tier"] == "gold" and priced.rule["channel_bp"] == 20_000
    assert rules.order_points(order(), NOW, "unknown").points == 28


def test_tier_multiplier_from_tiering_wins_over_the_configured_one() -> None:
    rules = EarningRules(tier_multiplier_bp={"gold": 12_000})
    # 28.50 yuan -> 28 base points (floor) -> x1.5 = 42; x1.2 from config = 33 (33.6 floored).
    from_event = rules.order_points(order(), NOW, "gold", 15_000)
    assert from_event.points == 42
    assert from_event.rule["tier_bp"] == 15_000 and from_event.rule["tier_bp_source"] == "tiering"
    fallback = rules.order_points(order(), NOW, "gold", None)
    assert fallback.points == 33
    assert fallback.rule["tier_bp"] == 12_000 and fallback.rule["tier_bp_source"] == "config"
    # An event multiplier applies even to a tier code the configuration does not know.
    assert EarningRules().order_points(order(), NOW, "jade", 15_000).points == 42
    # 25 base points x1.5 = 37.5 -> 37: the product is floored once, after both multipliers.
    assert rules.order_points(order(paid=2_599), NOW, "gold", 15_000).points == 37
    assert (
        rules.order_points(order(Channel.MINI_PROGRAM, paid=2_599), NOW, "gold", 15_000).points
        == 75
    )


def test_excluded_categories_and_campaigns() -> None:
    lines = (
        OrderLine("T", "tea", "tea", 1, 2_000),
        OrderLine("B", "bread", "bakery", 1, 1_000),
        OrderLine("D", "delivery", "delivery_fee", 1, 500),
    )
    rules = EarningRules(
        excluded_categories=frozenset({"delivery_fee"}),
        campaigns=(
            Campaign(
                "tea-week",
                NOW - timedelta(days=1),
                NOW + timedelta(days=1),
                30_000,
                stores=frozenset({"SH001"}),
                categories=frozenset({"tea"}),
            ),
            Campaign("over", NOW - timedelta(days=9), NOW - timedelta(days=1), 50_000),
        ),
    )
    priced = rules.order_points(order(lines=lines, paid=3_500), NOW, None)
    # 30 base (delivery excluded) + 2 x 20 bonus on the tea line.
    assert priced.points == 70
    assert priced.rule["excluded_fen"] == 500
    assert priced.rule["campaigns"] == [{"campaign": "tea-week", "bonus": 40}]


def test_rules_from_configuration() -> None:
    rules = parse_rules(
        '{"points_per_yuan": 2, "rounding": "half_up", "channel_multiplier_bp": {},'
        ' "daily_cap": 100, "actions": {"check_in": {"points": 3, "period": "week"}}}'
    )
    assert rules.order_points(order(paid=950), NOW, None).points == 20
    assert rules.daily_cap == 100 and rules.action("check_in").period is Period.WEEK
    with pytest.raises(InvalidArgument) as caught:
        rules.action("dance")
    assert caught.value.code == "UNKNOWN_ACTION"
    assert parse_rules("") == EarningRules()


def test_periods_start_at_business_midnight() -> None:
    at = datetime(2026, 6, 17, 18, tzinfo=UTC)  # Thursday 02:00 in Shanghai
    assert period_start(Period.DAY, at) == datetime(2026, 6, 18, tzinfo=BUSINESS_TZ)
    assert period_start(Period.WEEK, at) == datetime(2026, 6, 15, tzinfo=BUSINESS_TZ)
    assert period_start(Period.MONTH, at) == datetime(2026, 6, 1, tzinfo=BUSINESS_TZ)
