"""Tier evaluation rules on a table of cases, and the property that the
incremental path agrees with a full recompute from the same facts (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tiering.domain import (
    Benefits,
    DowngradeRule,
    Ladder,
    PeriodUnit,
    ProgrammeRules,
    QualifyingMetric,
    Tier,
    TierProgramme,
)
from services.tiering.evaluation import (
    Evaluation,
    GrowthFact,
    OrderFact,
    TierState,
    advance,
    fresh_state,
    metric_from_facts,
    needs_replay,
    period_bounds,
    project,
    reconcile,
    relative_ranks,
    replay,
    set_override,
)

SH = ZoneInfo("Asia/Shanghai")
LADDER = Ladder(
    (
        Tier("regular", "普通会员", 0, Benefits()),
        Tier("svip", "SVIP", 50_000, Benefits(12_000), retention=30_000),
        Tier("vip", "VIP", 150_000, Benefits(15_000), retention=100_000),
    )
)


def programme(**rules: object) -> TierProgramme:
    return TierProgramme(
        "default",
        1,
        datetime(2024, 1, 1, tzinfo=SH),
        QualifyingMetric.PAID_SPEND,
        12,
        LADDER,
        ProgrammeRules(**rules),  # type: ignore[arg-type]
    )


def at(y: int, m: int, d: int, h: int = 12) -> datetime:
    return datetime(y, m, d, h, tzinfo=SH)


@dataclass
class Member:
    """Feeds facts one at a time, as the consumer does, keeping the history."""

    prog: TierProgramme
    orders: list[OrderFact] = field(default_factory=list)
    growth: list[GrowthFact] = field(default_factory=list)
    state: TierState | None = None
    evaluated_at: datetime | None = None
    history: list[tuple[str, str, str]] = field(default_factory=list)

    def _metric(self, t: datetime) -> int:
        return metric_from_facts(self.prog, self.orders, self.growth, t)

    def _take(self, ev: Evaluation, now: datetime) -> None:
        self.state = ev.state
        self.evaluated_at = max(now, self.evaluated_at or now)
        self.history += [(c.from_tier, c.to_tier, c.reason) for c in ev.changes]

    def evaluate(self, now: datetime) -> str:
        state = self.state or fresh_state(self.prog, now)
        self._take(advance(self.prog, state, now, self._metric), now)
        return self.tier(now)

    def order(self, order_id: str, when: datetime, fen: int) -> str:
        if any(o.order_id == order_id for o in self.orders):
            return self.tier(when)  # redelivery
        self.orders.append(OrderFact(order_id, when, fen))
        if needs_replay(self.state, when, self.evaluated_at):
            assert self.state is not None and self.evaluated_at is not None
            now = self.evaluated_at
            ev = reconcile(self.prog, self.state, self.orders, self.growth, now, "late_order")
            self._take(ev, now)
            return self.tier(now)
        return self.evaluate(when)

    def refund(self, order_id: str, fen: int, when: datetime) -> str:
        self.orders = [
            replace(o, refunded_fen=min(o.paid_fen, o.refunded_fen + fen))
            if o.order_id == order_id
            else o
            for o in self.orders
        ]
        assert self.state is not None
        now = max(when, self.evaluated_at or when)
        self._take(reconcile(self.prog, self.state, self.orders, self.growth, now, "refund"), now)
        return self.tier(now)

    def tier(self, now: datetime) -> str:
        assert self.state is not None
        return self.state.effective(self.prog, now)


# ---- the Proof's table of cases ---------------------------------------------------


def test_upgrade_on_the_crossing_order() -> None:
    m = Member(programme())
    assert m.order("o1", at(2025, 3, 1), 30_000) == "regular"
    assert m.order("o2", at(2025, 3, 5), 19_999) == "regular"
    assert m.order("o3", at(2025, 3, 6), 1) == "svip"
    assert m.history == [("regular", "svip", "upgrade")]
    # Straight past two thresholds in one order: one change, to the top.
    m2 = Member(programme())
    assert m2.order("o1", at(2025, 3, 1), 150_000) == "vip"
    assert m2.history == [("regular", "vip", "upgrade")]


def test_no_downgrade_mid_period() -> None:
    m = Member(programme())
    m.order("o1", at(2025, 3, 1), 50_000)
    # Retained at 1 Jan 2026 (M = 50,000 >= 30,000), then the order leaves the
    # 12-month window on 1 Mar 2026: M = 0, but the period runs to 31 Dec.
    assert m.evaluate(at(2026, 1, 1, 0)) == "svip"
    assert m.evaluate(at(2026, 6, 30)) == "svip"
    assert m.evaluate(at(2026, 12, 31, 23)) == "svip"
    assert m.evaluate(at(2027, 1, 1, 0)) == "regular"
    assert [h[2] for h in m.history] == ["upgrade", "retained", "downgrade"]


@pytest.mark.parametrize(("kept_fen", "tier"), [(30_000, "svip"), (29_999, "regular")])
def test_retention_kept_at_exactly_the_bar(kept_fen: int, tier: str) -> None:
    m = Member(programme())
    m.order("o1", at(2024, 12, 20), 50_000)  # svip; out of the window by 1 Jan 2026
    assert m.evaluate(at(2025, 1, 1, 0)) == "svip"  # retained for 2025 on o1
    m.order("o2", at(2025, 6, 1), kept_fen)  # all that counts at the 2025 period end
    assert m.evaluate(at(2026, 2, 1)) == tier


def test_grace_keeps_the_tier_until_the_bar_is_met_or_grace_ends() -> None:
    prog = programme(grace_days=14)
    m = Member(prog)
    m.order("o1", at(2025, 1, 10), 50_000)
    assert m.evaluate(at(2026, 1, 1, 0)) == "svip"  # M = 50,000: retained
    assert m.evaluate(at(2027, 1, 1, 0)) == "svip"  # M = 0: grace starts
    assert m.state is not None and m.state.grace_until == datetime(2027, 1, 15, tzinfo=SH)
    assert m.evaluate(at(2027, 1, 14, 23)) == "svip"
    assert m.evaluate(at(2027, 1, 15, 0)) == "regular"  # grace over, bar not met
    assert [h[2] for h in m.history] == ["upgrade", "retained", "grace", "downgrade"]

    # Meeting the bar within the grace keeps the tier.
    m = Member(prog)
    m.order("o1", at(2025, 1, 10), 50_000)
    m.evaluate(at(2027, 1, 1, 0))
    assert m.order("o2", at(2027, 1, 10), 30_000) == "svip"
    assert m.state is not None and m.state.grace_until is None
    assert m.evaluate(at(2027, 6, 1)) == "svip"


def test_override_is_a_floor_until_it_expires() -> None:
    prog = programme()
    m = Member(prog)
    m.order("o1", at(2025, 3, 1), 10_000)
    assert m.state is not None
    until = at(2025, 6, 1, 0)
    ev = set_override(prog, m.state, "vip", until, "store opening VIP", at(2025, 3, 2))
    assert [(c.from_tier, c.to_tier, c.reason) for c in ev.changes] == [
        ("regular", "vip", "override")
    ]
    m.state = ev.state
    # Earning svip under the floor shows nothing to the member: still vip.
    assert m.order("o2", at(2025, 4, 1), 40_000) == "vip"
    assert m.state.earned_tier == "svip"
    assert m.evaluate(at(2025, 6, 1, 1)) == "svip"
    assert m.history[-1] == ("vip", "svip", "override_expired")
    # A floor under the earned tier changes nothing.
    ev = set_override(prog, m.state, "regular", at(2025, 9, 1), "mistake", at(2025, 6, 2))
    assert ev.state.effective(prog, at(2025, 6, 2)) == "svip"


def test_refund_that_undoes_an_upgrade() -> None:
    m = Member(programme())
    m.order("o1", at(2025, 3, 1), 40_000)
    assert m.order("o2", at(2025, 3, 2), 10_000) == "svip"
    assert m.refund("o2", 2_000, at(2025, 3, 3)) == "regular"
    assert m.history[-1] == ("svip", "regular", "refund")
    # A refund that leaves the metric above the bar changes nothing.
    m = Member(programme())
    m.order("o1", at(2025, 3, 1), 60_000)
    assert m.refund("o1", 5_000, at(2025, 3, 3)) == "svip"
    assert m.history == [("regular", "svip", "upgrade")]


def test_version_change_mid_year() -> None:
    v1 = programme()
    renamed = Ladder((LADDER.tiers[0], LADDER.tiers[1], replace(LADDER.tiers[2], code="black")))
    v2 = TierProgramme(
        "default",
        2,
        datetime(2025, 7, 1, tzinfo=SH),
        QualifyingMetric.PAID_SPEND,
        12,
        renamed,
        ProgrammeRules(),
    )
    svip = Member(v1)
    svip.order("o1", at(2025, 3, 1), 60_000)
    vip = Member(v1)
    vip.order("o1", at(2025, 3, 1), 160_000)
    # From 1 July the new version applies: a code it keeps stays, a code it
    # dropped is re-evaluated on the metric; history before stays as written.
    svip.prog = vip.prog = v2
    assert svip.evaluate(at(2025, 7, 2)) == "svip"
    assert vip.evaluate(at(2025, 7, 2)) == "black"
    assert vip.history == [("regular", "vip", "upgrade"), ("vip", "black", "programme_change")]
    assert svip.state is not None and svip.state.programme_version == 2


def test_refund_after_a_version_change_is_replayed_under_the_versions_in_force() -> None:
    # v2 (from 1 July 2025) raises SVIP to ¥800: the ¥600 member kept SVIP at the
    # change; a ¥10 refund in August must not re-decide March under v2.
    v1 = programme()
    raised = Ladder(
        (
            LADDER.tiers[0],
            replace(LADDER.tiers[1], threshold=80_000, retention=60_000),
            replace(LADDER.tiers[2], threshold=200_000, retention=150_000),
        )
    )
    v2 = replace(v1, version=2, effective_from=at(2025, 7, 1, 0), ladder=raised)
    orders = [OrderFact("o1", at(2025, 3, 1), 60_000)]
    kept = replay([v1, v2], orders, [], at(2025, 7, 2))
    assert (kept.state.effective(v2, at(2025, 7, 2)), kept.state.programme_version) == ("svip", 2)
    refunded = [replace(orders[0], refunded_fen=1_000)]
    ev = reconcile([v1, v2], kept.state, refunded, [], at(2025, 8, 1), "refund")
    assert ev.state.effective(v2, at(2025, 8, 1)) == "svip" and ev.changes == []
    # Under v2 alone (what the refund did before) the member lost SVIP.
    assert replay(v2, refunded, [], at(2025, 8, 1)).state.earned_tier == "regular"


@pytest.mark.parametrize(
    ("rule", "after"), [(DowngradeRule.ONE_LEVEL, "svip"), (DowngradeRule.TO_METRIC, "regular")]
)
def test_downgrade_rule_one_level_or_to_metric(rule: DowngradeRule, after: str) -> None:
    m = Member(programme(downgrade=rule))
    m.order("o1", at(2025, 3, 1), 150_000)
    assert m.evaluate(at(2027, 1, 1, 0)) in (after, "regular")
    m = Member(programme(downgrade=rule))
    m.order("o1", at(2025, 3, 1), 150_000)
    # Retained for 2026 (M = 150,000), then nothing: one period end with M = 0.
    assert m.evaluate(at(2026, 1, 2)) == "vip"
    assert m.evaluate(at(2027, 1, 1, 0)) == after


def test_plans_30_day_tracking_drops_a_level_without_a_monthly_order() -> None:
    # The plan: upgrades immediate; ordering less than once in a 30-day window
    # drops one level.
    ladder = Ladder(
        (
            Tier("explorer", "探索者", 0, Benefits()),
            Tier("advanced", "进阶者", 4, Benefits(), retention=1),
            Tier("expert", "达人", 8, Benefits(free_delivery=True), retention=1),
        )
    )
    prog = TierProgramme(
        "plan",
        1,
        datetime(2025, 1, 1, tzinfo=SH),
        QualifyingMetric.ORDER_COUNT,
        1,
        ladder,
        ProgrammeRules(period_unit=PeriodUnit.DAY, period_length=30),
    )
    m = Member(prog)
    for n in range(8):
        m.order(f"o{n}", at(2025, 1, 2 + n), 1_500)
    assert m.tier(at(2025, 1, 10)) == "expert"
    m.order("o9", at(2025, 1, 28), 1_500)
    assert m.evaluate(at(2025, 2, 1)) == "expert"  # 31 Jan ended the period with orders
    assert m.evaluate(at(2025, 3, 2)) == "advanced"  # no order in the next 30 days
    assert m.evaluate(at(2025, 4, 1)) == "explorer"


def test_period_ends_on_the_local_day() -> None:
    prog = programme()
    # 31 Dec 23:30 in Shanghai is 15:30 UTC: still the old year.
    start, end = period_bounds(prog, datetime(2025, 12, 31, 15, 30, tzinfo=UTC))
    assert (start, end) == (datetime(2025, 1, 1, tzinfo=SH), datetime(2026, 1, 1, tzinfo=SH))
    start, _ = period_bounds(prog, datetime(2025, 12, 31, 16, 0, tzinfo=UTC))
    assert start == datetime(2026, 1, 1, tzinfo=SH)


def test_projection_names_what_keeps_the_tier_and_what_reaches_the_next() -> None:
    prog = programme()
    m = Member(prog)
    m.order("o1", at(2025, 1, 5), 40_000)  # out of the window by 31 Dec
    m.order("o2", at(2025, 3, 1), 18_000)  # still in
    assert m.state is not None
    p = project(prog, m.state, 58_000, 18_000, at(2025, 3, 2))
    assert (p.tier.code, p.keep_needed, p.next_needed) == ("svip", 12_000, 92_000)
    assert p.period_last_day == date(2025, 12, 31)
    assert p.message == "¥120 more by 31 Dec keeps SVIP; ¥920 more reaches VIP"


# ---- property: incremental == full recompute from the same facts --------------------

START = datetime(2025, 1, 1, tzinfo=SH)
event = st.one_of(
    st.tuples(st.just("order"), st.integers(0, 900), st.integers(0, 80_000)),
    st.tuples(st.just("late"), st.integers(0, 900), st.integers(0, 80_000)),
    st.tuples(st.just("refund"), st.integers(0, 20), st.integers(1, 80_000)),
    st.tuples(st.just("redeliver"), st.integers(0, 20), st.just(0)),
    st.tuples(st.just("tick"), st.integers(0, 200), st.just(0)),
)


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(event, max_size=25),
    rule=st.sampled_from(list(DowngradeRule)),
    grace=st.sampled_from([0, 10]),
    unit=st.sampled_from([(PeriodUnit.MONTH, 3), (PeriodUnit.MONTH, 12), (PeriodUnit.DAY, 30)]),
)
def test_incremental_equals_full_recompute(
    events: list[tuple[str, int, int]],
    rule: DowngradeRule,
    grace: int,
    unit: tuple[PeriodUnit, int],
) -> None:
    prog = programme(downgrade=rule, grace_days=grace, period_unit=unit[0], period_length=unit[1])
    m = Member(prog)
    clock = START
    ids: list[str] = []
    for kind, a, b in events:
        if kind == "order":
            clock += timedelta(hours=a)
            ids.append(f"o{len(ids)}")
            m.order(ids[-1], clock, b)
        elif kind == "late" and m.state is not None:
            # An offline order replayed up to ~37 days into the past.
            ids.append(f"o{len(ids)}")
            m.order(ids[-1], clock - timedelta(hours=a), b)
        elif kind == "refund" and ids:
            m.refund(ids[a % len(ids)], b, clock)
        elif kind == "redeliver" and ids:
            order = next(o for o in m.orders if o.order_id == ids[a % len(ids)])
            m.order(order.order_id, order.at, order.paid_fen)
        elif kind == "tick" and m.state is not None:
            clock += timedelta(days=a)
            m.evaluate(clock)
    if m.state is None:
        return
    end = clock + timedelta(days=1)
    m.evaluate(end)
    batch = replay(prog, m.orders, m.growth, end, keep=m.state)
    assert m.state == batch.state


def test_the_worked_example_in_the_docs() -> None:
    # docs/tiers.md, "Worked example": the demo programme, no grace.
    prog = programme()
    m = Member(prog)
    assert m.order("o1", at(2024, 12, 20), 40_000) == "regular"
    assert m.order("o2", at(2025, 6, 1), 12_000) == "svip"
    assert m.state is not None
    p = project(prog, m.state, 52_000, 12_000, at(2025, 6, 2))
    assert p.message == "¥180 more by 31 Dec keeps SVIP; ¥980 more reaches VIP"
    assert m.evaluate(at(2026, 1, 1, 0)) == "regular"
    assert m.history[-1] == ("svip", "regular", "downgrade")
    graced = Member(programme(grace_days=14))
    graced.order("o1", at(2024, 12, 20), 40_000)
    graced.order("o2", at(2025, 6, 1), 12_000)
    assert graced.evaluate(at(2026, 1, 14)) == "svip"
    assert graced.order("o3", at(2026, 1, 14, 13), 18_000) == "svip"
    assert graced.evaluate(at(2026, 6, 1)) == "svip"
    refunded = Member(prog)
    refunded.order("o1", at(2024, 12, 20), 40_000)
    refunded.order("o2", at(2025, 6, 1), 12_000)
    assert refunded.refund("o2", 12_000, at(2025, 6, 3)) == "regular"


# ---- relative VIP ranks ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    metrics=st.lists(st.integers(0, 12), max_size=60),
    top=st.integers(0, 60),
    following=st.integers(0, 40),
)
def test_relative_ranks_are_the_largest_tie_closed_shares(
    metrics: list[int], top: int, following: int
) -> None:
    """An independent statement of the rule: each share is the largest set of
    the best members, closed under ties, holding at most its percentage of the
    ranked (metric > 0) members."""
    ranks = relative_ranks(dict(enumerate(metrics)), top, following)
    ranked = [m for m in metrics if m > 0]
    n = len(ranked)
    for share, pct in ((2, top), (1, top + following)):
        inside = [metrics[k] for k, r in ranks.items() if r >= share]
        assert len(inside) * 100 <= n * pct
        assert all(m > 0 for m in inside)
        # Closed under ties and at the top: everyone better or equal is inside.
        if inside:
            assert sorted(inside, reverse=True) == sorted(
                (m for m in ranked if m >= min(inside)), reverse=True
            )
        # Largest: the next tie group would not fit.
        outside = [m for m in ranked if not inside or m < min(inside)]
        if outside:
            nxt = max(outside)
            assert (len(inside) + metrics.count(nxt)) * 100 > n * pct
    assert all(ranks[k] == 0 for k, m in enumerate(metrics) if m == 0)
