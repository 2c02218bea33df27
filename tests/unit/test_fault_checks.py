"""The fault suite's projection check (bench/faults.py): under steady load an
order is nearly always between rewards' commit and the projections' commit, so
the check compares the projections with rewards' orders of an earlier look
(all of them must be counted) and of the same instant (nothing beyond)."""

from __future__ import annotations

from bench.faults import Figures, projection_gaps

A, B = "member-a", "member-b"


def test_orders_on_their_way_are_not_lost_events() -> None:
    # At 20 orders/s (one every 50 ms) with ~50 ms from rewards' commit to the
    # projections', one order or two are always in flight: at no instant do
    # the projections equal rewards' orders of that instant.
    before = {A: Figures(10, 18_000), B: Figures(9, 16_200)}
    now = {A: Figures(11, 19_800), B: Figures(10, 18_000)}
    tiering = {A: Figures(10, 18_000), B: Figures(10, 18_000)}
    engagement = {A: Figures(11, None), B: Figures(9, None)}
    assert projection_gaps(now, now, tiering, engagement).equal is False
    gaps = projection_gaps(before, now, tiering, engagement)
    assert gaps.equal and gaps.lost == 0


def test_an_event_missing_since_the_earlier_look_is_lost() -> None:
    before = {A: Figures(10, 18_000), B: Figures(9, 16_200)}
    now = {A: Figures(11, 19_800), B: Figures(10, 18_000)}
    tiering = {A: Figures(9, 16_200), B: Figures(10, 18_000)}
    engagement = {A: Figures(11, None), B: Figures(8, None)}
    gaps = projection_gaps(before, now, tiering, engagement)
    assert (gaps.tiering, gaps.engagement, gaps.lost) == (1, 1, 2)


def test_an_event_counted_twice_or_a_wrong_amount_is_a_mismatch() -> None:
    before = {A: Figures(10, 18_000)}
    now = {A: Figures(10, 18_000)}
    counted_twice = projection_gaps(before, now, {A: Figures(11, 19_800)}, {A: Figures(10, None)})
    assert (counted_twice.tiering, counted_twice.engagement, counted_twice.lost) == (1, 0, 0)
    gaps = projection_gaps(before, now, {A: Figures(10, 17_000)}, {A: Figures(11, None)})
    assert (gaps.tiering, gaps.engagement, gaps.lost) == (1, 1, 0)


def test_a_member_the_projections_never_saw_counts_from_zero() -> None:
    before = now = {A: Figures(2, 3_600)}
    gaps = projection_gaps(before, now, {}, {})
    assert (gaps.tiering, gaps.engagement, gaps.lost) == (1, 1, 4)


def test_without_load_the_check_is_exact_equality() -> None:
    settled = {A: Figures(3, 5_400), B: Figures(1, 1_800)}
    assert projection_gaps(
        settled, settled, dict(settled), {A: Figures(3, None), B: Figures(1, None)}
    ).equal
    assert not projection_gaps(
        settled, settled, dict(settled), {A: Figures(3, None), B: Figures(0, None)}
    ).equal
