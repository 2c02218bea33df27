"""Points mall rules: item validation, status moves, refusal reasons, stock resizing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servicekit.errors import FailedPrecondition, InvalidArgument, NotFound
from services.rewards.mall.domain import (
    TRANSITIONS,
    ItemKind,
    ItemSpec,
    ItemState,
    ItemStatus,
    check_item,
    check_transition,
    exchange_refusal,
    parse_item_id,
    stock_after_resize,
)

NOW = datetime(2026, 5, 1, 4, 0, tzinfo=UTC)
GOODS = ItemSpec("Tote bag", ItemKind.GOODS, 500, 0, 100, 1, sku="TOTE-01")
COUPON = ItemSpec("20 off", ItemKind.COUPON, 800, 990, 50, 2, coupon_template_id="T-20")


def test_valid_items_pass() -> None:
    assert check_item(GOODS) is GOODS
    assert check_item(COUPON) is COUPON


@pytest.mark.parametrize(
    ("spec", "code", "field"),
    [
        (replace(GOODS, points_price=0), "INVALID_POINTS_PRICE", "points_price"),
        (replace(GOODS, cash_fen=-1), "INVALID_CASH_FEN", "cash_fen"),
        (replace(GOODS, stock_total=-5), "INVALID_STOCK", "stock_total"),
        (replace(GOODS, per_member_limit=-1), "INVALID_PER_MEMBER_LIMIT", "per_member_limit"),
        (replace(GOODS, sku=""), "SKU_REQUIRED", "sku"),
        (
            replace(GOODS, coupon_template_id="T"),
            "COUPON_TEMPLATE_NOT_ALLOWED",
            "coupon_template_id",
        ),
        (
            replace(COUPON, coupon_template_id=""),
            "COUPON_TEMPLATE_ID_REQUIRED",
            "coupon_template_id",
        ),
        (replace(COUPON, sku="X"), "SKU_NOT_ALLOWED", "sku"),
        (replace(GOODS, name=""), "NAME_REQUIRED", "name"),
        (
            replace(GOODS, starts_at=NOW, ends_at=NOW - timedelta(seconds=1)),
            "INVALID_WINDOW",
            "ends_at",
        ),
    ],
)
def test_bad_items_name_the_field(spec: ItemSpec, code: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_item(spec)
    assert (caught.value.code, caught.value.field) == (code, field)


def test_ended_is_final_and_draft_cannot_pause() -> None:
    for status in ItemStatus:
        if status is not ItemStatus.ENDED:
            with pytest.raises(FailedPrecondition):
                check_transition(ItemStatus.ENDED, status)
    with pytest.raises(FailedPrecondition):
        check_transition(ItemStatus.DRAFT, ItemStatus.PAUSED)
    check_transition(ItemStatus.PAUSED, ItemStatus.ACTIVE)
    check_transition(ItemStatus.ACTIVE, ItemStatus.ACTIVE)  # no move is no error
    assert all(
        ItemStatus.ENDED in targets
        for s, targets in TRANSITIONS.items()
        if s is not ItemStatus.ENDED
    )


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (None, "UNKNOWN_MALL_ITEM"),
        (ItemState(ItemStatus.PAUSED, 5, None, None), "MALL_ITEM_NOT_ACTIVE"),
        (
            ItemState(ItemStatus.ACTIVE, 5, NOW + timedelta(hours=1), None),
            "MALL_ITEM_OUT_OF_WINDOW",
        ),
        (ItemState(ItemStatus.ACTIVE, 5, None, NOW), "MALL_ITEM_OUT_OF_WINDOW"),
        (ItemState(ItemStatus.ACTIVE, 0, None, None), "MALL_ITEM_OUT_OF_STOCK"),
    ],
)
def test_exchange_refusals_say_why(state: ItemState | None, code: str) -> None:
    error = exchange_refusal(state, "i-1", NOW)
    assert isinstance(error, NotFound | FailedPrecondition)
    assert error.code == code and error.field == "item_id"


@given(
    total=st.integers(0, 10_000),
    data=st.data(),
)
def test_resizing_never_unsells(total: int, data: st.DataObject) -> None:
    remaining = data.draw(st.integers(0, total))
    new_total = data.draw(st.integers(0, 20_000))
    sold = total - remaining
    if new_total < sold:
        with pytest.raises(FailedPrecondition):
            stock_after_resize(total, remaining, new_total)
    else:
        after = stock_after_resize(total, remaining, new_total)
        assert 0 <= after <= new_total and new_total - after == sold


def test_item_ids_are_uuids() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_item_id("nope")
    assert caught.value.code == "INVALID_ITEM_ID"
    with pytest.raises(InvalidArgument):
        parse_item_id(" ")
