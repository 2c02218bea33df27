"""Coupon codes are drawn as one 65-bit number, 5 bits per symbol: every
position must still range over the whole alphabet."""

from __future__ import annotations

from services.rewards.coupons.domain import CODE_ALPHABET, CODE_LENGTH, new_code


def test_every_position_takes_every_symbol() -> None:
    codes = [new_code() for _ in range(3000)]
    assert all(len(c) == CODE_LENGTH for c in codes)
    # A symbol missed at a position in 3,000 uniform draws: odds ~ 32 x (31/32)^3000.
    for n in range(CODE_LENGTH):
        assert {c[n] for c in codes} == set(CODE_ALPHABET), n
    assert len(set(codes)) == len(codes)
