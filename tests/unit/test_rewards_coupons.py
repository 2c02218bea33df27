"""Pure coupon rules: discount arithmetic on edge cases and as invariants
(hypothesis), term validation naming the field, status transitions, codes,
stock sharding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servicekit.errors import InvalidArgument
from services.rewards.coupons.domain import (
    CODE_ALPHABET,
    CODE_LENGTH,
    Cart,
    CartLine,
    ChannelGroup,
    Kind,
    Limits,
    Status,
    Terms,
    best,
    check_transition,
    combine,
    discount,
    new_code,
    normalize_code,
    shard_stock,
    spread,
    validate_limits,
    validate_terms,
)

T0 = datetime(2026, 3, 1, 4, 0, tzinfo=UTC)


def cart(
    *lines: tuple[str, str, int, int],
    channel: str = "store",
    first: bool = False,
    tier: str | None = None,
) -> Cart:
    return Cart(
        "SH001", channel, tuple(CartLine(*line) for line in lines), tier=tier, first_order=first
    )


MJ = Terms(
    name="满99减30", kind=Kind.AMOUNT_OFF, threshold_fen=9900, discount_fen=3000, valid_days=30
)


@pytest.mark.parametrize(
    ("amount", "off", "reason"),
    [(9900, 3000, ""), (9899, 0, "BELOW_THRESHOLD"), (20000, 3000, "")],
)
def test_amount_off_threshold_exactly_met(amount: int, off: int, reason: str) -> None:
    v = discount(MJ, cart(("A", "tea", 1, amount)))
    assert (v.discount_fen, v.reason) == (off, reason)


def test_percent_off_rounds_down_to_the_fen_and_respects_the_cap() -> None:
    pct = Terms(name="85折", kind=Kind.PERCENT_OFF, percent=15, valid_days=1)
    # 15% of 999 fen is 149.85: 149.
    assert discount(pct, cart(("A", "tea", 1, 999))).discount_fen == 149
    capped = Terms(name="8折", kind=Kind.PERCENT_OFF, percent=20, cap_fen=1500, valid_days=1)
    assert discount(capped, cart(("A", "tea", 1, 7500))).discount_fen == 1500
    assert discount(capped, cart(("A", "tea", 1, 7499))).discount_fen == 1499


def test_free_item_is_the_cheapest_matching_unit() -> None:
    free = Terms(name="免费小料", kind=Kind.FREE_ITEM, categories=("tea",), valid_days=1)
    c = cart(("MILK", "tea", 2, 3000), ("FRUIT", "tea", 1, 1200), ("CAKE", "food", 1, 500))
    # The cake is cheaper but not a tea; the cheapest tea unit is 1200.
    assert discount(free, c).discount_fen == 1200
    capped = Terms(
        name="免费", kind=Kind.FREE_ITEM, categories=("tea",), max_price_fen=1000, valid_days=1
    )
    assert discount(capped, c).discount_fen == 1000
    # Units of a line: 1001 fen for 2 cups are 500 + 501.
    assert discount(free, cart(("M", "tea", 2, 1001))).discount_fen == 500


def test_fixed_price_and_first_order_price() -> None:
    fixed = Terms(name="9.9元", kind=Kind.FIXED_PRICE, skus=("MILK",), price_fen=990, valid_days=1)
    assert discount(fixed, cart(("MILK", "tea", 1, 1800))).discount_fen == 810
    assert discount(fixed, cart(("MILK", "tea", 1, 900))).reason == "NO_SAVING"
    first = Terms(
        name="首杯半价", kind=Kind.FIRST_ORDER_PRICE, percent=50, cap_fen=1500, valid_days=3
    )
    c = (("MILK", "tea", 1, 1800), ("FRUIT", "tea", 1, 3400))
    assert discount(first, cart(*c, first=True)).discount_fen == 1500
    assert discount(first, cart(*c)).reason == "NOT_FIRST_ORDER"


def test_applicability_by_store_channel_tier() -> None:
    t = Terms(name="x", kind=Kind.AMOUNT_OFF, discount_fen=100, valid_days=1, store_ids=("SH002",))
    assert discount(t, cart(("A", "t", 1, 500))).reason == "STORE_NOT_ELIGIBLE"
    t = Terms(
        name="x",
        kind=Kind.AMOUNT_OFF,
        discount_fen=100,
        valid_days=1,
        channels=(ChannelGroup.ONLINE,),
    )
    assert discount(t, cart(("A", "t", 1, 500))).reason == "CHANNEL_NOT_ELIGIBLE"
    assert discount(t, cart(("A", "t", 1, 500), channel="delivery")).discount_fen == 100
    t = Terms(name="x", kind=Kind.AMOUNT_OFF, discount_fen=100, valid_days=1, tiers=("gold",))
    assert discount(t, cart(("A", "t", 1, 500), tier="silver")).reason == "TIER_NOT_ELIGIBLE"
    assert discount(t, cart(("A", "t", 1, 500), tier="gold")).applicable


def test_one_coupon_per_order_unless_stackable_and_never_beyond_the_cart() -> None:
    a = Terms(name="a", kind=Kind.AMOUNT_OFF, discount_fen=300, valid_days=1)
    b = Terms(name="b", kind=Kind.AMOUNT_OFF, discount_fen=300, valid_days=1, stackable=True)
    c = cart(("A", "t", 1, 500))
    total, verdicts = combine([a, b], c)
    assert [v.reason for v in verdicts] == ["NOT_STACKABLE", ""]
    assert total == 300
    total, _ = combine([b, b], c)
    assert total == 500


def test_best_prefers_the_largest_then_the_first() -> None:
    from services.rewards.coupons.domain import Verdict

    assert best({"A": Verdict(100), "B": Verdict(300), "C": Verdict(300)}) == "B"
    assert best({"A": Verdict(0, "BELOW_THRESHOLD")}) == ""


lines_st = st.lists(
    st.tuples(
        st.sampled_from(["MILK", "FRUIT", "CAKE"]),
        st.sampled_from(["tea", "food"]),
        st.integers(1, 5),
        st.integers(0, 50_000),
    ),
    min_size=1,
    max_size=6,
)
terms_st = st.builds(
    Terms,
    name=st.just("t"),
    kind=st.sampled_from(list(Kind)),
    threshold_fen=st.integers(0, 20_000),
    discount_fen=st.integers(1, 20_000),
    percent=st.integers(1, 100),
    cap_fen=st.integers(0, 5_000),
    max_price_fen=st.integers(0, 5_000),
    price_fen=st.integers(0, 5_000),
    categories=st.sampled_from([(), ("tea",), ("food",)]),
    stackable=st.booleans(),
    valid_days=st.just(1),
)


@given(terms_st, lines_st, st.booleans())
def test_discount_is_between_zero_and_the_eligible_amount(
    t: Terms, lines: list[tuple[str, str, int, int]], first: bool
) -> None:
    c = cart(*lines, first=first)
    v = discount(t, c)
    eligible = sum(
        line.amount_fen for line in c.lines if not t.categories or line.category in t.categories
    )
    assert 0 <= v.discount_fen <= eligible
    assert v.applicable or v.discount_fen == 0
    if t.cap_fen and t.kind in (Kind.PERCENT_OFF, Kind.FIRST_ORDER_PRICE):
        assert v.discount_fen <= t.cap_fen


@given(st.lists(terms_st, min_size=1, max_size=4), lines_st)
def test_combined_discount_never_makes_payable_negative(
    ts: list[Terms], lines: list[tuple[str, str, int, int]]
) -> None:
    c = cart(*lines)
    total, _ = combine(ts, c)
    assert 0 <= total <= c.gross_fen


@given(st.lists(st.integers(0, 100_000), min_size=1, max_size=8), st.data())
def test_spread_takes_exactly_the_discount_and_no_line_goes_negative(
    amounts: list[int], data: st.DataObject
) -> None:
    off = data.draw(st.integers(0, sum(amounts)))
    after = spread(amounts, off)
    assert sum(after) == sum(amounts) - off
    assert all(0 <= a <= b for a, b in zip(after, amounts, strict=True))


@pytest.mark.parametrize(
    ("terms", "field", "code"),
    [
        (
            Terms(name="", kind=Kind.AMOUNT_OFF, discount_fen=1, valid_days=1),
            "name",
            "INVALID_NAME",
        ),
        (Terms(name="x", kind=Kind.AMOUNT_OFF, valid_days=1), "discount_fen", "INVALID_AMOUNT"),
        (
            Terms(name="x", kind=Kind.AMOUNT_OFF, discount_fen=-1, valid_days=1),
            "discount_fen",
            "INVALID_AMOUNT",
        ),
        (
            Terms(
                name="x", kind=Kind.AMOUNT_OFF, threshold_fen=100, discount_fen=200, valid_days=1
            ),
            "discount_fen",
            "DISCOUNT_ABOVE_THRESHOLD",
        ),
        (Terms(name="x", kind=Kind.PERCENT_OFF, valid_days=1), "percent", "INVALID_PERCENT"),
        (
            Terms(name="x", kind=Kind.PERCENT_OFF, percent=101, valid_days=1),
            "percent",
            "INVALID_PERCENT",
        ),
        (Terms(name="x", kind=Kind.FREE_ITEM, valid_days=1), "skus", "ITEM_REQUIRED"),
        (Terms(name="x", kind=Kind.AMOUNT_OFF, discount_fen=1), "valid_until", "VALIDITY_REQUIRED"),
        (
            Terms(name="x", kind=Kind.AMOUNT_OFF, discount_fen=1, valid_from=T0, valid_until=T0),
            "valid_until",
            "INVALID_VALIDITY",
        ),
        (
            Terms(name="x", kind=Kind.AMOUNT_OFF, discount_fen=1, valid_until=datetime(2026, 1, 1)),
            "valid_until",
            "TIME_WITHOUT_OFFSET",
        ),
        (
            Terms(name="x", kind=Kind.AMOUNT_OFF, discount_fen=1, valid_days=1, store_ids=("",)),
            "store_ids[0]",
            "INVALID_ITEM",
        ),
    ],
)
def test_bad_terms_name_the_field(terms: Terms, field: str, code: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_terms(terms)
    assert (err.value.field, err.value.code) == (field, code)


def test_validity_takes_the_earlier_end() -> None:
    t = Terms(
        name="x",
        kind=Kind.AMOUNT_OFF,
        discount_fen=1,
        valid_days=3,
        valid_until=T0 + timedelta(days=1),
    )
    assert t.expires_at(T0) == T0 + timedelta(days=1)
    assert t.expires_at(T0 - timedelta(days=10)) == T0 - timedelta(days=7)
    assert Terms.from_doc(t.doc()) == t


def test_limits_and_transitions() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_limits(Limits(total_stock=0))
    assert err.value.field == "total_stock"
    check_transition(Status.DRAFT, Status.ACTIVE)
    check_transition(Status.PAUSED, Status.ACTIVE)
    for frm, to in [(Status.ENDED, Status.ACTIVE), (Status.ACTIVE, Status.DRAFT)]:
        with pytest.raises(InvalidArgument):
            check_transition(frm, to)


def test_codes_are_typable_and_normalized() -> None:
    code = new_code()
    assert len(code) == CODE_LENGTH and set(code) <= set(CODE_ALPHABET)
    assert normalize_code(" abcd-efgh-o1il ") == "ABCDEFGH0111"


@given(st.integers(1, 10_000), st.integers(1, 64))
def test_stock_shards_add_up(total: int, shards: int) -> None:
    parts = shard_stock(total, shards)
    assert sum(parts) == total and all(p > 0 for p in parts) and len(parts) <= shards
