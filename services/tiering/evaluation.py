"""Tier evaluation: pure rules over a member's tier state and metric. No I/O.

The model (docs/tiers.md has a worked example):

- The metric M(t) is the qualifying figure over the rolling window (t - N months, t]
  (growth value, net paid spend in fen, or orders not wholly refunded). Refunds
  are dated at the order they undo, so they lower M retroactively.
- Periods are fixed by the programme (calendar blocks of months, or blocks of days
  from the programme's start), in the programme's local time zone, so a period end
  never depends on when the member happened to be evaluated.
- Within a period the member holds max(base, tier_for(peak)): `base` is what they
  held when the period began and `peak` the highest M seen in it. Upgrades are
  therefore immediate, nothing drops mid-period, and a refund that takes the
  peak back under the threshold undoes the upgrade it caused.
- At a period end b: M(b) >= the tier's retention bar keeps it (保级); otherwise a
  grace period (if any) keeps it until the bar is met or the grace ends; then it
  drops one level or to the level M supports, per the programme.
- An operator override is a floor until its expiry: effective = max(earned, override).
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any

from .domain import (
    DowngradeRule,
    PeriodUnit,
    QualifyingMetric,
    Tier,
    TierMode,
    TierProgramme,
)

MetricAt = Callable[[datetime], int]

# Reasons written to history; TierChanged carries the coarser EVENT_REASON.
EVENT_REASON = {
    "upgrade": "upgrade",
    "downgrade": "downgrade",
    "refund": "downgrade",
    "override": "override",
    "override_expired": "override",
    "programme_change": "programme_change",
    "merge": "merge",
    "unmerge": "merge",
    "relative_upgrade": "upgrade",
    "relative_downgrade": "downgrade",
}


def local_midnight(day: date, programme: TierProgramme) -> datetime:
    return datetime.combine(day, time(), programme.rules.tz)


def add_months(value: datetime, months: int) -> datetime:
    """Calendar month arithmetic in the value's own zone, clamping the day
    (31 Mar - 1 month = 29 Feb), as PostgreSQL's interval arithmetic does."""
    total = value.year * 12 + value.month - 1 + months
    year, month = divmod(total, 12)
    day = min(value.day, calendar.monthrange(year, month + 1)[1])
    return value.replace(year=year, month=month + 1, day=day)


def window_start(programme: TierProgramme, at: datetime, months: int | None = None) -> datetime:
    """Start (exclusive) of the rolling window ending at `at`, in local calendar months."""
    local = at.astimezone(programme.rules.tz)
    return add_months(local, -(months or programme.window_months))


def period_bounds(programme: TierProgramme, at: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the period containing `at`, both at local midnight."""
    rules = programme.rules
    local = at.astimezone(rules.tz)
    if rules.period_unit is PeriodUnit.MONTH:
        first = ((local.month - 1) // rules.period_length) * rules.period_length + 1
        start = datetime(local.year, first, 1, tzinfo=rules.tz)
        return start, add_months(start, rules.period_length)
    anchor = programme.effective_from.astimezone(rules.tz).date()
    k = (local.date() - anchor).days // rules.period_length
    start_day = anchor + timedelta(days=k * rules.period_length)
    return (
        local_midnight(start_day, programme),
        local_midnight(start_day + timedelta(days=rules.period_length), programme),
    )


def last_local_day(boundary: datetime, programme: TierProgramme) -> date:
    """The last local day inside a period whose exclusive end is `boundary`."""
    return (boundary.astimezone(programme.rules.tz) - timedelta(days=1)).date()


@dataclass(frozen=True)
class TierState:
    programme_version: int
    base_tier: str
    earned_tier: str
    period_start: datetime
    period_end: datetime
    peak: int
    grace_until: datetime | None = None
    override_tier: str | None = None
    override_until: datetime | None = None
    override_reason: str | None = None

    def effective(self, programme: TierProgramme, at: datetime) -> str:
        if self.override_tier and self.override_until and self.override_until > at:
            ladder = programme.ladder
            if ladder.rank(self.override_tier) > ladder.rank(self.earned_tier):
                return self.override_tier
        return self.earned_tier


@dataclass(frozen=True)
class Change:
    from_tier: str
    to_tier: str
    reason: str
    at: datetime
    figures: dict[str, Any] = field(default_factory=dict)
    # The programme version that decided it (0: the caller's programme).
    version: int = 0

    @property
    def moved(self) -> bool:
        return self.from_tier != self.to_tier


@dataclass(frozen=True)
class Evaluation:
    state: TierState
    changes: list[Change]

    @property
    def moved(self) -> list[Change]:
        return [c for c in self.changes if c.moved]


def fresh_state(programme: TierProgramme, at: datetime) -> TierState:
    """A member tiering has not evaluated yet: the base tier, in the period containing `at`."""
    start, end = period_bounds(programme, at)
    base = programme.ladder.tiers[0].code
    return TierState(programme.version, base, base, start, end, 0)


def downgrade_target(programme: TierProgramme, current: str, metric: int) -> str:
    ladder = programme.ladder
    rank = ladder.rank(current)
    if programme.rules.downgrade is DowngradeRule.TO_METRIC:
        target = min(ladder.rank(ladder.tier_for(metric).code), rank - 1)
    else:
        target = rank - 1
    return ladder.tiers[max(target, 0)].code


def advance(
    programme: TierProgramme,
    state: TierState,
    now: datetime,
    metric_at: MetricAt,
    peak: int | None = None,
) -> Evaluation:
    """Bring a member's state up to `now`: programme change, period ends and
    grace (in time order), upgrades or refund reversals, override expiry.

    `peak`, when given, replaces the stored peak (recomputed after a refund);
    otherwise the peak only grows with M(now).
    """
    ladder = programme.ladder
    changes: list[Change] = []
    st = state

    def move(new: TierState, reason: str, at: datetime, figures: dict[str, Any]) -> None:
        nonlocal st
        before, after = st.effective(programme, at), new.effective(programme, at)
        if before != after or new.earned_tier != st.earned_tier or reason in ("retained", "grace"):
            changes.append(
                Change(before, after, reason, at, {**figures, "earned_tier": new.earned_tier})
            )
        st = new

    relative = programme.rules.tier_mode is TierMode.RELATIVE
    if st.programme_version != programme.version:
        # No record of the version the state was decided under: switch now.
        st, switched = change_programme(programme, st, now, metric_at)
        changes.extend(switched)

    while True:
        if st.grace_until is not None and st.grace_until <= now:
            g = st.grace_until
            tier = programme.tier(st.earned_tier)
            m = metric_at(g)
            target = downgrade_target(programme, tier.code, m)
            move(
                replace(st, base_tier=target, earned_tier=target, grace_until=None),
                "downgrade",
                g,
                {"metric": m, "retention_bar": tier.retention_bar, "grace_until": g.isoformat()},
            )
            continue
        if st.period_end <= now:
            b = st.period_end
            tier = programme.tier(st.earned_tier)
            m = metric_at(b)
            start, end = period_bounds(programme, b)
            rolled = replace(st, period_start=start, period_end=end, peak=m)
            figures = {
                "metric": m,
                "retention_bar": tier.retention_bar,
                "period_end": last_local_day(b, programme).isoformat(),
            }
            if ladder.rank(tier.code) == 0 or relative:
                # Relative mode: the rank decides (assign_relative), not the bars.
                st = replace(rolled, base_tier=tier.code)
            elif m >= tier.retention_bar:
                move(replace(rolled, base_tier=tier.code), "retained", b, figures)
            elif programme.rules.grace_days:
                g = local_midnight(
                    b.astimezone(programme.rules.tz).date()
                    + timedelta(days=programme.rules.grace_days),
                    programme,
                )
                move(replace(rolled, base_tier=tier.code, grace_until=g), "grace", b, figures)
            else:
                target = downgrade_target(programme, tier.code, m)
                move(replace(rolled, base_tier=target, earned_tier=target), "downgrade", b, figures)
            continue
        break

    m_now = metric_at(now)
    new_peak = max(st.peak, m_now) if peak is None else peak
    st = replace(st, peak=new_peak)
    if st.grace_until is not None:
        tier = programme.tier(st.earned_tier)
        if new_peak >= tier.retention_bar:
            move(
                replace(st, grace_until=None),
                "retained",
                now,
                {"metric": new_peak, "retention_bar": tier.retention_bar, "in_grace": True},
            )

    held_rank = max(ladder.rank(st.base_tier), ladder.rank(ladder.tier_for(new_peak).code))
    earned_rank = ladder.rank(st.earned_tier)
    if held_rank != earned_rank and not relative:
        reached = ladder.tiers[max(held_rank, earned_rank)]
        move(
            replace(st, earned_tier=ladder.tiers[held_rank].code),
            "upgrade" if held_rank > earned_rank else "refund",
            now,
            {"metric": new_peak, "threshold": reached.threshold},
        )

    if st.override_until is not None and st.override_until <= now:
        # At the expiry instant the floor is already gone: compare with just before.
        before = st.effective(programme, st.override_until - timedelta(microseconds=1))
        expired = st.override_until
        reason = st.override_reason or ""
        st = replace(st, override_tier=None, override_until=None, override_reason=None)
        if before != st.earned_tier:
            changes.append(
                Change(
                    before,
                    st.earned_tier,
                    "override_expired",
                    expired,
                    {"override_reason": reason, "earned_tier": st.earned_tier},
                )
            )
    return Evaluation(st, changes)


def change_programme(
    programme: TierProgramme,
    state: TierState,
    at: datetime,
    metric_at: MetricAt,
    previous: TierProgramme | None = None,
) -> tuple[TierState, list[Change]]:
    """A new programme version takes over at `at`: a tier code the new ladder
    keeps stays (and becomes the base of the new period), a code it lacks is
    re-evaluated on the metric; an override on a kept code stays. `previous`,
    the version the state was decided under, ranks the tier held before."""
    ladder = programme.ladder
    st = state
    m = metric_at(at)
    codes = {t.code for t in ladder.tiers}
    earned = st.earned_tier if st.earned_tier in codes else ladder.tier_for(m).code
    start, end = period_bounds(programme, at)
    override_ok = st.override_tier in codes
    # Compare under the old codes: a tier the new ladder lacks is a change.
    if previous is not None:
        before = st.effective(previous, at)
    elif st.earned_tier not in codes:
        before = st.earned_tier
    elif st.override_tier and not override_ok and st.override_until and st.override_until > at:
        before = st.override_tier  # a floor the new ladder cannot rank
    else:
        before = st.effective(programme, at)
    st = replace(
        st,
        programme_version=programme.version,
        base_tier=earned,
        earned_tier=earned,
        period_start=start,
        period_end=end,
        peak=m,
        grace_until=None,
        override_tier=st.override_tier if override_ok else None,
        override_until=st.override_until if override_ok else None,
        override_reason=st.override_reason if override_ok else None,
    )
    after = st.effective(programme, at)
    changes = []
    if before != after:
        changes.append(
            Change(
                before, after, "programme_change", at, {"metric": m, "version": programme.version}
            )
        )
    return st, changes


# ---- programme versions ------------------------------------------------------------

# Every stored version of one programme, or just one (the single-version callers).
Versions = TierProgramme | Sequence[TierProgramme]


def timeline(versions: Versions) -> tuple[TierProgramme, ...]:
    """The versions in the order they take over: by effective_from, then version;
    a version another replaces at the same instant never is in force."""
    if isinstance(versions, TierProgramme):
        return (versions,)
    ordered = sorted(versions, key=lambda p: (p.effective_from, p.version))
    return tuple(
        p
        for n, p in enumerate(ordered)
        if n + 1 == len(ordered) or ordered[n + 1].effective_from != p.effective_from
    )


def in_force(versions: Versions, at: datetime) -> TierProgramme:
    """The version in force at `at` (the earliest when `at` precedes them all:
    facts older than the programme are judged by its first version)."""
    line = timeline(versions)
    found = line[0]
    for p in line:
        if p.effective_from <= at:
            found = p
    return found


def advance_versions(
    versions: Versions,
    state: TierState,
    now: datetime,
    metric_for: Callable[[TierProgramme], MetricAt],
) -> Evaluation:
    """`advance` across programme versions: each period is decided under the
    version in force then. The state is brought up to each later version's
    effective_from under its own version (period ends, grace, upgrades), the
    next version takes over at that instant, and so on up to `now`. So a
    refund or a late order after a version change, replayed from the facts,
    decides the past exactly as it was decided then."""
    line = timeline(versions)
    current = next((p for p in line if p.version == state.programme_version), None)
    if current is None:
        # A version no longer stored (or never in force): switch at `now`.
        latest = in_force(line, now)
        return advance(latest, state, now, metric_for(latest))
    changes: list[Change] = []
    st = state

    def decided_by(programme: TierProgramme, made: list[Change]) -> list[Change]:
        return [replace(c, version=c.version or programme.version) for c in made]

    for nxt in line[line.index(current) + 1 :]:
        if nxt.effective_from > now:
            break
        ev = advance(current, st, nxt.effective_from, metric_for(current))
        changes.extend(decided_by(current, ev.changes))
        st, switched = change_programme(
            nxt, ev.state, nxt.effective_from, metric_for(nxt), previous=current
        )
        changes.extend(decided_by(nxt, switched))
        current = nxt
    ev = advance(current, st, now, metric_for(current))
    return Evaluation(ev.state, changes + decided_by(current, ev.changes))


def quiet_tier(versions: Versions, state: TierState, now: datetime, metric_now: int) -> Tier | None:
    """The effective tier at `now` from a persisted state and M(now) alone, or
    None when that is not enough (the caller computes from the facts).

    Enough when no boundary has passed since the state was persisted: the
    version it was decided under is the one in force at `now` (no later
    version has taken over), its period has not ended and its grace (if any)
    has not run out. `advance_versions` then reads the metric at `now` only
    (the peak, a grace met early, an upgrade or refund reversal, an override's
    expiry), so this is `advance` itself with that one figure: the same answer,
    whatever the facts say at other times."""
    line = timeline(versions)
    programme = in_force(line, now)
    if programme.version != state.programme_version or programme.effective_from > now:
        return None
    if state.period_end <= now or (state.grace_until is not None and state.grace_until <= now):
        return None

    def only_now(t: datetime) -> int:
        if t != now:
            raise ValueError(f"quiet_tier: the metric was asked at {t}, not at {now}")
        return metric_now

    st = advance(programme, state, now, only_now).state
    return programme.tier(st.effective(programme, now))


def relative_ranks(metrics: Mapping[Any, int], top_pct: int, next_pct: int) -> dict[Any, int]:
    """Relative VIP: 2 for the top share of members by metric, 1 for the next
    share, 0 for the rest; members with no metric (0) are not ranked.

    Ties share one fate: a member is in the top share when the members whose
    metric is at least theirs (themselves and their ties included) are at most
    top_pct% of the ranked members, so the share is never exceeded and two
    members with the same figure never land in different tiers. Integer
    arithmetic: count * 100 <= ranked * pct."""
    ranked = sorted((m for m in metrics.values() if m > 0), reverse=True)
    n = len(ranked)
    at_least: dict[int, int] = {}
    for position, value in enumerate(ranked, start=1):
        at_least[value] = position  # the last position of a tie: the count >= value
    out = {}
    for member, value in metrics.items():
        count = at_least.get(value, 0) if value > 0 else 0
        if count and count * 100 <= n * top_pct:
            out[member] = 2
        elif count and count * 100 <= n * (top_pct + next_pct):
            out[member] = 1
        else:
            out[member] = 0
    return out


def assign_relative(
    programme: TierProgramme, state: TierState, rank: int, at: datetime, figures: dict[str, Any]
) -> Evaluation:
    """Relative mode: the tier the ranking gives (rank 2 top, 1 second, 0 base)."""
    tiers = programme.ladder.tiers
    code = tiers[len(tiers) - 1 - (2 - rank)].code if rank else tiers[0].code
    if code == state.earned_tier:
        return Evaluation(state, [])
    new = replace(state, base_tier=code, earned_tier=code, grace_until=None)
    before, after = state.effective(programme, at), new.effective(programme, at)
    up = programme.ladder.rank(code) > programme.ladder.rank(state.earned_tier)
    change = Change(
        before,
        after,
        "relative_upgrade" if up else "relative_downgrade",
        at,
        {**figures, "earned_tier": code},
    )
    return Evaluation(new, [change])


def set_override(
    programme: TierProgramme,
    state: TierState,
    tier_code: str | None,
    until: datetime | None,
    reason: str,
    now: datetime,
) -> Evaluation:
    """Put (or, with tier_code None, lift) an operator floor."""
    changes: list[Change] = []
    before = state.effective(programme, now)
    if tier_code is None:
        new = replace(state, override_tier=None, override_until=None, override_reason=None)
    else:
        programme.ladder.rank(tier_code)  # KeyError for an unknown code
        new = replace(state, override_tier=tier_code, override_until=until, override_reason=reason)
    after = new.effective(programme, now)
    changes.append(
        Change(
            before,
            after,
            "override",
            now,
            {
                "override_tier": tier_code or "",
                "until": until.isoformat() if until else "",
                "override_reason": reason,
                "earned_tier": new.earned_tier,
            },
        )
    )
    return Evaluation(new, changes)


# ---- facts and the reference recompute ----------------------------------------


@dataclass(frozen=True)
class OrderFact:
    order_id: str
    at: datetime
    paid_fen: int
    refunded_fen: int = 0
    growth: int = 0  # growth value the order still carries after refunds

    @property
    def net_fen(self) -> int:
        return self.paid_fen - self.refunded_fen

    @property
    def counts(self) -> bool:
        return self.refunded_fen < self.paid_fen


@dataclass(frozen=True)
class GrowthFact:
    at: datetime
    points: int


def metric_from_facts(
    programme: TierProgramme,
    orders: Iterable[OrderFact],
    growth: Iterable[GrowthFact],
    at: datetime,
) -> int:
    """M(at) from raw facts: the definition the SQL aggregates implement."""
    lo = window_start(programme, at)
    metric = programme.qualifying_metric
    if metric is QualifyingMetric.GROWTH_VALUE:
        return sum(g.points for g in growth if lo < g.at <= at)
    inside = [o for o in orders if lo < o.at <= at]
    if metric is QualifyingMetric.PAID_SPEND:
        return sum(o.net_fen for o in inside)
    return sum(1 for o in inside if o.counts)


def facts_metric(
    programme: TierProgramme, orders: list[OrderFact], growth: list[GrowthFact]
) -> MetricAt:
    """M(t) over a member's loaded facts."""

    def metric(t: datetime) -> int:
        return metric_from_facts(programme, orders, growth, t)

    return metric


def facts_for(
    orders: list[OrderFact], growth: list[GrowthFact], programme: TierProgramme
) -> MetricAt:
    """facts_metric with the facts first: M(t) under whichever version asks."""
    return facts_metric(programme, orders, growth)


def order_growth(programme: TierProgramme, net_fen: int) -> int:
    """Growth value an order of `net_fen` earns (1 per yuan by default, capped)."""
    points = max(net_fen, 0) // programme.rules.order_fen_per_point
    cap = programme.rules.order_cap
    return min(points, cap) if cap else points


# ---- projection for the member centre -------------------------------------------


@dataclass(frozen=True)
class Projection:
    tier: Tier
    metric: int
    period_last_day: date
    # What the member still needs by keep_by to keep the tier (0: kept
    # already, or the base tier, which cannot be lost).
    keep_needed: int
    # Figures already counted that will still be in the window at keep_by.
    kept_by_period_end: int
    next_tier: Tier | None
    next_needed: int
    message: str
    # The last local day to keep the tier: the period's last day, or in grace
    # the grace's last day (the period that was missed has ended already).
    keep_by: date | None = None


def keep_deadline(state: TierState) -> datetime:
    """When the tier is next judged: the grace's end while in grace (the bar
    met before it keeps the tier), else the period end."""
    return state.grace_until if state.grace_until is not None else state.period_end


def metric_text(programme: TierProgramme, amount: int) -> str:
    metric = programme.qualifying_metric
    if metric is QualifyingMetric.PAID_SPEND:
        yuan, fen = divmod(amount, 100)
        return f"¥{yuan}" if fen == 0 else f"¥{yuan}.{fen:02d}"
    if metric is QualifyingMetric.ORDER_COUNT:
        return f"{amount} order" + ("" if amount == 1 else "s")
    return f"{amount} growth"


def project(
    programme: TierProgramme,
    state: TierState,
    metric_now: int,
    kept_by_period_end: int,
    now: datetime,
) -> Projection:
    """ "¥120 more by 31 Dec keeps SVIP": what keeps the tier at the period end and
    what reaches the next one (upgrades are immediate, so that figure is for now)."""
    ladder = programme.ladder
    tier = programme.tier(state.effective(programme, now))
    rank = ladder.rank(tier.code)
    last_day = last_local_day(state.period_end, programme)
    keep_by = last_local_day(keep_deadline(state), programme)
    # In grace the bar is the earned tier's (an override above it is not at stake).
    at_stake = programme.tier(state.earned_tier) if state.grace_until is not None else tier
    keep = 0 if rank == 0 else max(at_stake.retention_bar - kept_by_period_end, 0)
    next_tier = ladder.tiers[rank + 1] if rank + 1 < len(ladder.tiers) else None
    next_needed = max(next_tier.threshold - metric_now, 0) if next_tier else 0
    if programme.rules.tier_mode is TierMode.RELATIVE:
        # Held by rank, not by a figure: no "more by" to promise.
        seg = programme.rules.segments
        top, second = ladder.tiers[-1], ladder.tiers[-2]
        message = (
            f"{tier.name}: tiers go by rank at each nightly ranking (top {seg.relative_top_pct}%"
            f" {top.name}, next {seg.relative_next_pct}% {second.name})"
        )
        return Projection(tier, metric_now, last_day, 0, kept_by_period_end, None, 0, message, None)
    parts = []
    day = f"{keep_by.day} {keep_by.strftime('%b')}"
    if rank:
        parts.append(
            f"{metric_text(programme, keep)} more by {day} keeps {tier.name}"
            if keep
            else f"{tier.name} is kept through {day}"
        )
    if next_tier:
        parts.append(f"{metric_text(programme, next_needed)} more reaches {next_tier.name}")
    return Projection(
        tier,
        metric_now,
        last_day,
        keep,
        kept_by_period_end,
        next_tier,
        next_needed,
        "; ".join(parts),
        keep_by,
    )


# ---- the reference recompute and the incremental step ---------------------------


def replay(
    versions: Versions,
    orders: list[OrderFact],
    growth: list[GrowthFact],
    until: datetime,
    keep: TierState | None = None,
) -> Evaluation:
    """Recompute a member from facts alone: evaluate at every fact time in order,
    then at `until`, each moment under the programme version in force then.
    Used when a late fact (an offline order replayed into the past, a refund)
    changes the past, and as the definition the incremental path must agree
    with."""
    times = sorted(
        {o.at for o in orders if o.at <= until} | {g.at for g in growth if g.at <= until}
    )
    first = times[0] if times else until
    st = fresh_state(in_force(versions, first), first)
    if keep is not None:
        st = replace(
            st,
            override_tier=keep.override_tier,
            override_until=keep.override_until,
            override_reason=keep.override_reason,
        )

    def metric_for(programme: TierProgramme) -> MetricAt:
        return facts_metric(programme, orders, growth)

    changes: list[Change] = []
    for t in [*times, until]:
        ev = advance_versions(versions, st, t, metric_for)
        st = ev.state
        changes.extend(ev.changes)
    return Evaluation(st, changes)


def needs_replay(state: TierState | None, fact_at: datetime, evaluated_at: datetime | None) -> bool:
    """A fact dated before the last evaluation rewrites the past: replay the member."""
    return state is not None and evaluated_at is not None and fact_at < evaluated_at


def reconcile(
    versions: Versions,
    old: TierState,
    orders: list[OrderFact],
    growth: list[GrowthFact],
    now: datetime,
    reason: str,
) -> Evaluation:
    """Replay a member after a late fact and describe the net movement as one
    change (`reason`: "refund", "late_order"), keeping the operator's override.
    Each period is replayed under the version in force then, so a fact after a
    version change does not re-decide earlier periods under today's rules."""
    programme = in_force(versions, now)
    ev = replay(versions, orders, growth, now, keep=old)
    decided = next((p for p in timeline(versions) if p.version == old.programme_version), None)
    before = old.effective(decided, now) if decided is not None else None
    after = ev.state.effective(programme, now)
    changes = []
    if before is not None and before != after:
        reached = programme.tier(after)
        changes.append(
            Change(
                before,
                after,
                reason,
                now,
                {
                    "metric": ev.state.peak,
                    "threshold": reached.threshold,
                    "earned_tier": ev.state.earned_tier,
                },
            )
        )
    return Evaluation(ev.state, changes)
