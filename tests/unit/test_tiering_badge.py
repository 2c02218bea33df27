"""The POS badge's fast path (evaluation.quiet_tier) against the full view:
whenever it answers from the persisted state and M(now), the answer is the
effective tier `advance_versions` reaches from the same state with every fact
(no I/O; the handler's SQL metric is the same definition, repository.metric_sql)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from hypothesis import event, given, settings
from hypothesis import strategies as st

from services.tiering.domain import (
    DowngradeRule,
    Ladder,
    PeriodUnit,
    QualifyingMetric,
    Tier,
    TierMode,
    TierProgramme,
)
from services.tiering.evaluation import (
    GrowthFact,
    OrderFact,
    TierState,
    advance,
    advance_versions,
    facts_metric,
    fresh_state,
    in_force,
    metric_from_facts,
    period_bounds,
    quiet_tier,
    replay,
    set_override,
)

from .test_tiering_evaluation import LADDER, SH, at, programme

START = datetime(2025, 1, 1, tzinfo=SH)
# Order-count and growth thresholds small enough for a short history to reach.
SMALL = Ladder(
    (
        replace(LADDER.tiers[0]),
        replace(LADDER.tiers[1], threshold=3, retention=2),
        replace(LADDER.tiers[2], threshold=6, retention=4),
    )
)


def full_tier(
    versions: list[TierProgramme],
    state: TierState,
    now: datetime,
    orders: list[OrderFact],
    growth: list[GrowthFact],
) -> Tier:
    """What handlers._tier_view answers for a persisted state: every version by
    `now`, advanced with the facts."""
    programme = in_force(versions, now)
    ev = advance_versions(versions, state, now, lambda p: facts_metric(p, orders, growth))
    return programme.tier(ev.state.effective(programme, now))


rules = st.builds(
    dict,
    downgrade=st.sampled_from(list(DowngradeRule)),
    grace_days=st.sampled_from([0, 10, 45]),
    period=st.sampled_from([(PeriodUnit.MONTH, 3), (PeriodUnit.MONTH, 12), (PeriodUnit.DAY, 30)]),
    metric=st.sampled_from(list(QualifyingMetric)),
    window=st.sampled_from([3, 12]),
    renamed=st.booleans(),
    relative=st.integers(0, 5),
)


def build(version: int, since: datetime, r: dict[str, object]) -> TierProgramme:
    metric = r["metric"]
    assert isinstance(metric, QualifyingMetric)
    unit, length = r["period"]  # type: ignore[misc]
    ladder = LADDER if metric is QualifyingMetric.PAID_SPEND else SMALL
    if r["renamed"]:
        ladder = Ladder((ladder.tiers[0], ladder.tiers[1], replace(ladder.tiers[2], code="black")))
    return replace(
        programme(
            downgrade=r["downgrade"],
            grace_days=r["grace_days"],
            period_unit=unit,
            period_length=length,
            tier_mode=TierMode.RELATIVE if r["relative"] == 0 else TierMode.THRESHOLD,
        ),
        version=version,
        effective_from=since,
        qualifying_metric=metric,
        window_months=r["window"],
        ladder=ladder,
    )


@settings(max_examples=6000, deadline=None)
@given(
    first=rules,
    later=st.lists(st.tuples(st.integers(0, 900), rules), max_size=2),
    orders=st.lists(
        st.tuples(st.integers(0, 24 * 900), st.integers(1, 80_000), st.integers(0, 3)),
        max_size=14,
    ),
    growth=st.lists(st.tuples(st.integers(0, 24 * 900), st.integers(-4, 9)), max_size=14),
    # Hours after START, or hours after the n-th period end (grace is short).
    evaluated=st.integers(0, 24 * 900) | st.tuples(st.integers(0, 3), st.integers(0, 24 * 50)),
    override=st.none() | st.tuples(st.integers(0, 2), st.integers(1, 400)),
    pick=st.integers(0, 40),
    delta=st.integers(-3 * 24, 24 * 500),
)
def test_the_fast_path_answers_what_the_full_view_answers(
    first: dict[str, object],
    later: list[tuple[int, dict[str, object]]],
    orders: list[tuple[int, int, int]],
    growth: list[tuple[int, int]],
    evaluated: int | tuple[int, int],
    override: tuple[int, int] | None,
    pick: int,
    delta: int,
) -> None:
    versions = [build(1, datetime(2024, 1, 1, tzinfo=SH), first)]
    versions += [
        build(n, START + timedelta(days=days), r) for n, (days, r) in enumerate(later, start=2)
    ]
    # Refunds: none, a part, all (dated at the order they undo).
    order_facts = [
        OrderFact(f"o{n}", START + timedelta(hours=h), fen, (0, fen // 3, fen, 0)[refund])
        for n, (h, fen, refund) in enumerate(orders)
    ]
    growth_facts = [GrowthFact(START + timedelta(hours=h), p) for h, p in growth]
    # The persisted state: evaluated at `e` under the versions by then (facts
    # dated later are in the tables but not yet evaluated: M(now) counts them).
    if isinstance(evaluated, int):
        e = START + timedelta(hours=evaluated)
    else:
        e = START
        for _ in range(evaluated[0] + 1):
            e = period_bounds(versions[0], e)[1]
        e += timedelta(hours=evaluated[1])
    by_e = [p for p in versions if p.effective_from <= e]
    state = replay(by_e, order_facts, growth_facts, e).state
    if override is not None:
        decided = in_force(by_e, e)
        code = decided.ladder.tiers[override[0]].code
        ev = set_override(decided, state, code, e + timedelta(days=override[1]), "ops", e)
        state = ev.state
    # "now": anywhere, or just before / at / after a boundary of the state.
    tick = timedelta(microseconds=1)
    marks = [e + timedelta(hours=delta), state.period_end, *(p.effective_from for p in versions)]
    marks += [state.grace_until] if state.grace_until else []
    marks += [state.override_until] if state.override_until else []
    now = marks[pick % len(marks)] + tick * ((pick // len(marks)) % 3 - 1)
    by_now = [p for p in versions if p.effective_from <= now]
    if not by_now:
        return  # no programme in force yet: both answer NOT_FOUND NO_PROGRAMME
    programme_now = in_force(by_now, now)
    metric_now = metric_from_facts(programme_now, order_facts, growth_facts, now)
    quick = quiet_tier(by_now, state, now, metric_now)
    event("fast path" if quick is not None else "full view")
    event(f"in grace: {state.grace_until is not None}")
    if quick is not None:
        assert quick == full_tier(by_now, state, now, order_facts, growth_facts)


@settings(max_examples=300, deadline=None)
@given(first=rules, later=st.lists(st.tuples(st.integers(0, 900), rules), max_size=2),
       hours=st.integers(-24 * 400, 24 * 1200))  # fmt: skip
def test_a_member_without_facts_is_the_fresh_state(
    first: dict[str, object], later: list[tuple[int, dict[str, object]]], hours: int
) -> None:
    """The badge of a member with no tier row and no facts: the fresh state
    advanced to now, which is what the full view's replay from no facts is."""
    versions = [build(1, datetime(2024, 1, 1, tzinfo=SH), first)]
    versions += [
        build(n, START + timedelta(days=days), r) for n, (days, r) in enumerate(later, start=2)
    ]
    now = START + timedelta(hours=hours)
    by_now = [p for p in versions if p.effective_from <= now]
    if not by_now:
        return
    programme_now = in_force(by_now, now)
    quick = quiet_tier(by_now, fresh_state(programme_now, now), now, 0)
    full = replay(by_now, [], [], now).state
    assert quick is not None
    assert quick == programme_now.tier(full.effective(programme_now, now))


def test_mid_period_answers_from_the_state_and_the_metric() -> None:
    prog = programme()
    state = replay(prog, [OrderFact("o1", at(2025, 3, 1), 60_000)], [], at(2025, 3, 1)).state
    tier = quiet_tier([prog], state, at(2025, 6, 1), 60_000)
    assert tier is not None and tier.code == "svip"
    # An order not yet evaluated (M(now) above the peak) upgrades at once.
    tier = quiet_tier([prog], state, at(2025, 6, 1), 160_000)
    assert tier is not None and tier.code == "vip"


def test_a_passed_boundary_sends_the_caller_to_the_facts() -> None:
    prog = programme(grace_days=10)
    state = replay(prog, [OrderFact("o1", at(2025, 3, 1), 60_000)], [], at(2025, 3, 1)).state
    # The period ended (1 Jan, Shanghai): retention is judged on M at the end.
    assert quiet_tier([prog], state, state.period_end, 60_000) is None
    # Grace run out.
    graced = replace(state, grace_until=at(2025, 5, 1))
    assert quiet_tier([prog], graced, at(2025, 5, 2), 0) is None
    assert quiet_tier([prog], graced, at(2025, 4, 30), 0) is not None
    # A later version took over.
    v2 = replace(prog, version=2, effective_from=at(2025, 7, 1))
    assert quiet_tier([prog, v2], state, at(2025, 7, 2), 60_000) is None
    # A state decided under a version no longer stored.
    assert quiet_tier([v2], state, at(2025, 7, 2), 60_000) is None


def test_an_expired_override_is_not_the_answer() -> None:
    prog = programme()
    state = advance(prog, replay(prog, [], [], at(2025, 3, 1)).state, at(2025, 3, 1), lambda t: 0)
    floor = set_override(prog, state.state, "vip", at(2025, 4, 1), "ops", at(2025, 3, 1)).state
    before = quiet_tier([prog], floor, at(2025, 3, 31), 0)
    after = quiet_tier([prog], floor, at(2025, 4, 1), 0)
    assert before is not None and before.code == "vip"
    assert after is not None and after.code == "regular"
