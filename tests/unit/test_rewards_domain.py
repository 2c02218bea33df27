"""Rewards domain rules: order validation, earning rule, request hash. No I/O."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servicekit.errors import InvalidArgument
from services.rewards.kernel import Channel, OrderLine, OrderRequest, parse_member_id
from services.rewards.orders.domain import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_PAID_AMOUNT_FEN,
    OrderLimits,
    canonical_request,
    plan_settlement,
    request_hash,
    validate_order,
)
from services.rewards.points.earning import BASE_EARNING_RULE, EarningRule, Rounding

MEMBER = "5b0c7c8e-1f4a-4c55-9a57-0f1f8f4a2b10"


def order(**changes: object) -> OrderRequest:
    base = OrderRequest(
        store_id="SH001",
        pos_transaction_id="T-0001",
        member_id=MEMBER,
        channel=Channel.STORE,
        paid_amount_fen=2_800,
        gross_amount_fen=3_200,
        lines=(
            OrderLine("MILK-TEA", "芝芝莓莓", "tea", 1, 1_900),
            OrderLine("TOPPING", "波波", "topping", 3, 900),
        ),
        ordered_at=datetime(2026, 5, 1, 12, 30, tzinfo=UTC),
    )
    return dataclasses.replace(base, **changes)


def refused(candidate: OrderRequest, limits: OrderLimits = DEFAULT_LIMITS) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_order(candidate, limits)
    return caught.value.code, caught.value.field


def test_valid_order_passes_unchanged() -> None:
    good = order()
    assert validate_order(good) == good


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"pos_transaction_id": ""}, "POS_TRANSACTION_ID_REQUIRED", "pos_transaction_id"),
        ({"pos_transaction_id": "   "}, "POS_TRANSACTION_ID_REQUIRED", "pos_transaction_id"),
        ({"pos_transaction_id": "T" * 65}, "POS_TRANSACTION_ID_TOO_LONG", "pos_transaction_id"),
        (
            {"pos_transaction_id": "T\x001"},
            "POS_TRANSACTION_ID_NOT_PRINTABLE",
            "pos_transaction_id",
        ),
        ({"pos_transaction_id": "T\n1"}, "POS_TRANSACTION_ID_NOT_PRINTABLE", "pos_transaction_id"),
        ({"store_id": ""}, "STORE_ID_REQUIRED", "store_id"),
        ({"store_id": "S" * 33}, "STORE_ID_TOO_LONG", "store_id"),
        ({"member_id": ""}, "MEMBER_ID_REQUIRED", "member_id"),
        ({"member_id": "not-a-uuid"}, "INVALID_MEMBER_ID", "member_id"),
        ({"member_id": "12345"}, "INVALID_MEMBER_ID", "member_id"),
        ({"channel": None}, "CHANNEL_REQUIRED", "channel"),
        ({"paid_amount_fen": -1, "lines": ()}, "NEGATIVE_AMOUNT", "paid_amount_fen"),
        (
            {
                "paid_amount_fen": DEFAULT_MAX_PAID_AMOUNT_FEN + 1,
                "gross_amount_fen": 0,
                "lines": (),
            },
            "ORDER_AMOUNT_TOO_LARGE",
            "paid_amount_fen",
        ),
        ({"gross_amount_fen": -5}, "NEGATIVE_AMOUNT", "gross_amount_fen"),
        ({"gross_amount_fen": 2_799}, "GROSS_BELOW_PAID", "gross_amount_fen"),
        (
            {"lines": (OrderLine("A", "a", "tea", 0, 2_800),)},
            "INVALID_QUANTITY",
            "lines[0].quantity",
        ),
        (
            {"lines": (OrderLine("A", "a", "tea", 1, 2_900), OrderLine("B", "b", "tea", 1, -100))},
            "NEGATIVE_AMOUNT",
            "lines[1].paid_amount_fen",
        ),
        (
            {"lines": (OrderLine("A", "a", "tea", 1, 2_000),)},
            "LINES_TOTAL_MISMATCH",
            "lines",
        ),
        (
            {"lines": (OrderLine("A" * 129, "a", "tea", 1, 2_800),)},
            "LINE_FIELD_TOO_LONG",
            "lines[0].sku",
        ),
        (
            {"lines": tuple(OrderLine("A", "a", "tea", 1, 1) for _ in range(201))},
            "TOO_MANY_LINES",
            "lines",
        ),
    ],
)
def test_invalid_orders_name_code_and_field(
    changes: dict[str, object], code: str, field: str
) -> None:
    assert refused(order(**changes)) == (code, field)


def test_amount_limit_is_configurable() -> None:
    small = OrderLimits(max_paid_amount_fen=2_000)
    assert refused(order(), small) == ("ORDER_AMOUNT_TOO_LARGE", "paid_amount_fen")
    assert validate_order(order(paid_amount_fen=2_000, gross_amount_fen=0, lines=()), small)


def test_exactly_the_limit_is_allowed_and_zero_amounts_are_fine() -> None:
    assert validate_order(
        order(paid_amount_fen=DEFAULT_MAX_PAID_AMOUNT_FEN, gross_amount_fen=0, lines=())
    )
    # A free drink: paid nothing, no list price given.
    assert validate_order(order(paid_amount_fen=0, gross_amount_fen=0, lines=()))


def test_member_id_is_made_canonical() -> None:
    shouting = MEMBER.upper()
    assert validate_order(order(member_id=shouting)).member_id == MEMBER
    assert parse_member_id(MEMBER.replace("-", "")) == MEMBER
    # The hash is of the canonical order, so both spellings are the same request.
    assert plan_settlement(order(member_id=shouting)).request_hash == request_hash(order())


@pytest.mark.parametrize(
    ("fen", "points"), [(0, 0), (99, 0), (100, 1), (199, 1), (2_800, 28), (999_999, 9_999)]
)
def test_base_rule_is_one_point_per_whole_yuan(fen: int, points: int) -> None:
    assert BASE_EARNING_RULE.points_for(fen) == points


def test_rule_rate_and_rounding() -> None:
    double = EarningRule(name="double", points_per_yuan=2)
    assert double.points_for(1_999) == 38  # whole yuan first, then the rate
    half_up = EarningRule(name="half_up", rounding=Rounding.HALF_UP)
    assert (half_up.points_for(149), half_up.points_for(150)) == (1, 2)
    assert double.describe() == {"name": "double", "points_per_yuan": 2, "rounding": "floor"}
    with pytest.raises(ValueError):
        BASE_EARNING_RULE.points_for(-1)
    with pytest.raises(ValueError):
        EarningRule(name="broken", points_per_yuan=-1)


def test_plan_settlement_prices_with_the_rule() -> None:
    settled = plan_settlement(order(), rule=EarningRule(name="triple", points_per_yuan=3))
    assert settled.points == 84
    assert settled.rule.name == "triple"
    assert len(settled.request_hash) == 32


def test_hash_ignores_representation_but_not_content() -> None:
    base = request_hash(order())
    # Same instant in another zone is the same request.
    shanghai = timezone(timedelta(hours=8))
    same_instant = order(ordered_at=datetime(2026, 5, 1, 20, 30, tzinfo=shanghai))
    assert request_hash(same_instant) == base
    assert request_hash(order(ordered_at=None)) != base
    assert request_hash(order(channel=Channel.MINI_PROGRAM)) != base
    assert request_hash(order(gross_amount_fen=0)) != base
    swapped = order(lines=tuple(reversed(order().lines)))
    assert request_hash(swapped) != base
    assert canonical_request(order()).startswith(b'{"channel":"store"')


amounts = st.integers(min_value=0, max_value=50_000)
texts = st.text(max_size=20)
lines_strategy = st.lists(
    st.builds(
        OrderLine,
        sku=texts,
        name=texts,
        category=texts,
        quantity=st.integers(min_value=1, max_value=20),
        paid_amount_fen=amounts,
    ),
    max_size=8,
)
printable_ids = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "Pd", "Pc")),
    min_size=1,
    max_size=64,
)


@st.composite
def valid_orders(draw: st.DrawFn) -> OrderRequest:
    lines = tuple(draw(lines_strategy))
    paid = sum(line.paid_amount_fen for line in lines) if lines else draw(amounts)
    gross = draw(
        st.one_of(st.just(0), st.integers(min_value=max(paid, 1), max_value=paid + 10_000))
    )
    return OrderRequest(
        store_id=draw(st.sampled_from(["SH001", "SH002", "HZ001"])),
        pos_transaction_id=draw(printable_ids),
        member_id=str(draw(st.uuids())),
        channel=draw(st.sampled_from(list(Channel))),
        paid_amount_fen=paid,
        gross_amount_fen=gross,
        lines=lines,
        ordered_at=draw(
            st.one_of(st.none(), st.datetimes(timezones=st.just(UTC), allow_imaginary=False))
        ),
    )


@given(valid_orders())
def test_property_valid_orders_settle_consistently(candidate: OrderRequest) -> None:
    settled = plan_settlement(candidate)
    assert settled.order == candidate
    assert settled.points == candidate.paid_amount_fen // 100
    assert 0 <= settled.points * 100 <= candidate.paid_amount_fen
    # Deterministic: the same body always hashes the same (retries match).
    assert plan_settlement(candidate).request_hash == settled.request_hash


@given(valid_orders(), st.integers(min_value=1, max_value=10_000))
def test_property_any_change_of_amount_changes_the_hash(
    candidate: OrderRequest, delta: int
) -> None:
    bumped = dataclasses.replace(
        candidate, paid_amount_fen=candidate.paid_amount_fen + delta, lines=(), gross_amount_fen=0
    )
    unbumped = dataclasses.replace(candidate, lines=(), gross_amount_fen=0)
    assert request_hash(bumped) != request_hash(unbumped)


@given(valid_orders(), st.integers(min_value=1, max_value=10_000))
def test_property_lines_off_by_any_amount_are_refused(candidate: OrderRequest, delta: int) -> None:
    if not candidate.lines:
        candidate = dataclasses.replace(
            candidate,
            lines=(OrderLine("A", "a", "tea", 1, candidate.paid_amount_fen),),
        )
    skewed = dataclasses.replace(
        candidate,
        paid_amount_fen=candidate.paid_amount_fen + delta,
        gross_amount_fen=0,
    )
    assert refused(skewed) == ("LINES_TOTAL_MISMATCH", "lines")


@given(st.uuids())
def test_property_member_ids_round_trip(member: uuid.UUID) -> None:
    assert parse_member_id(str(member).upper()) == str(member)
