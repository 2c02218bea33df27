"""Engagement rules, free of I/O: the clock, caps, quiet hours, assignment to
holdout and A/B branches, branch conditions, the step interpreter and lift.

The interpreter runs a member's journey from one step until it must wait (a
wait step, quiet hours) or ends, and returns what should happen as *intents*;
the scheduler turns them into rows in one transaction (caps, sends, timers).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from .journey import Condition, Journey, Step

DEFAULT_TZ = "Asia/Shanghai"
# "1+1+N": per member per local day; transactional and replies are uncapped.
DAILY_CAPS = {"targeted": 1, "general": 1}
# Quiet hours hold back marketing only; a receipt is not marketing.
QUIET_CLASSES = frozenset({"targeted", "general"})
MARKETING = QUIET_CLASSES
MAX_STEPS_PER_RUN = 50


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        self._now += delta
        return self._now

    def set(self, value: datetime) -> None:
        self._now = value


def is_zone(name: str) -> bool:
    """An IANA zone name the standard library knows."""
    try:
        ZoneInfo(name)
    except (KeyError, ValueError):
        return False
    return True


def zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or DEFAULT_TZ)
    except (KeyError, ValueError):
        return ZoneInfo(DEFAULT_TZ)


def local_day(at: datetime, tz: str | None) -> date:
    return at.astimezone(zone(tz)).date()


def birthday_month_key(day: date) -> int:
    """The month `day` falls in as one increasing number (year * 12 + month - 1):
    the birthday month a member last entered for is kept as this."""
    return day.year * 12 + day.month - 1


def bucket(member_id: str, salt: str) -> int:
    """A stable 0..9999 bucket: the same member lands in the same group every time."""
    digest = hashlib.blake2b(f"{salt}:{member_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000


@dataclass(frozen=True)
class QuietHours:
    start: time = time(21, 0)
    end: time = time(9, 0)
    # The morning backlog is spread over this window, per member.
    jitter: timedelta = timedelta(minutes=30)

    def is_quiet(self, at: datetime, tz: str | None) -> bool:
        t = at.astimezone(zone(tz)).time()
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def release_at(self, at: datetime, tz: str | None, member_id: str) -> datetime:
        """When a step held by quiet hours may go: the end of quiet hours plus a
        per-member jitter (all of one member's held steps release together, so
        the day's cap goes to the most valuable of them)."""
        local = at.astimezone(zone(tz))
        end = datetime.combine(local.date(), self.end, tzinfo=local.tzinfo)
        if end <= local:
            end += timedelta(days=1)
        spread = int(self.jitter.total_seconds())
        offset = (
            timedelta(seconds=bucket(member_id, "quiet") * spread // 10_000)
            if spread
            else timedelta(0)
        )
        return (end + offset).astimezone(UTC)


def next_local_time(at: datetime, tz: str | None, wanted: time) -> datetime:
    local = at.astimezone(zone(tz))
    target = datetime.combine(local.date(), wanted, tzinfo=local.tzinfo)
    if target <= local:
        target = datetime.combine(local.date() + timedelta(days=1), wanted, tzinfo=local.tzinfo)
    return target.astimezone(UTC)


@dataclass(frozen=True)
class MemberFacts:
    member_id: str
    tz: str = DEFAULT_TZ
    tier: str = ""
    segment: str = ""
    stage: str = ""
    order_count: int = 0
    non_personalised: bool = False
    tags: frozenset[str] = frozenset()
    # channel -> marketing consent, as known at send time.
    consents: dict[str, bool] = field(default_factory=dict)
    # The profile's nickname (`{nickname}`); "" when none.
    nickname: str = ""
    # The exclusive guide's WeCom userid (the sender of 1-to-1 WeCom messages).
    guide_userid: str = ""


def holds(cond: Condition, facts: MemberFacts) -> bool:
    value: object
    if cond.fact == "tag":
        return (cond.value in facts.tags) == (cond.op != "ne")
    if cond.fact == "consent":
        value = facts.consents.get(cond.channel, False)
    else:
        value = getattr(facts, cond.fact)
    if cond.op == "eq":
        return value == cond.value
    if cond.op == "ne":
        return value != cond.value
    if cond.op == "in":
        return isinstance(cond.value, list) and value in cond.value
    if cond.op == "has":
        return bool(value)
    if not isinstance(value, int) or not isinstance(cond.value, int):
        return False
    return value >= cond.value if cond.op == "gte" else value <= cond.value


def consent_refusal(channel: str, message_class: str, consent: bool | None) -> str | None:
    """Why a message may not go given the member's consent on its channel as
    known now (None: it may). Asked when the send is written and again when it
    is delivered. An explicit refusal (unsubscribe) stops every class; marketing
    needs an explicit grant, except a mini-program subscription message, whose
    consent is the member's tap (a credit)."""
    if consent is False:
        return "NO_CONSENT"
    if consent is None and message_class in MARKETING and channel != "miniprogram":
        return "NO_CONSENT"
    return None


# ---- intents: what a run of the interpreter asks for ----------------------


@dataclass(frozen=True)
class SendIntent:
    step_id: str
    seq: int
    channel: str
    template: str
    message_class: str


@dataclass(frozen=True)
class RewardIntent:
    step_id: str
    seq: int
    kind: str  # "coupon" | "points"
    coupon: str = ""
    points: int = 0


@dataclass(frozen=True)
class TagIntent:
    tag: str


@dataclass(frozen=True)
class GuideTaskIntent:
    step_id: str
    title: str
    script: str


@dataclass(frozen=True)
class DroppedIntent:
    step_id: str
    seq: int


Intent = SendIntent | RewardIntent | TagIntent | GuideTaskIntent | DroppedIntent


@dataclass
class RunResult:
    intents: list[Intent]
    seq: int
    # Where the member waits next (a timer), or None when the journey ended.
    next_step: str | None = None
    due_at: datetime | None = None
    # A wait for an event: the wait step's id (its on_event is the way out).
    waiting_step: str | None = None
    variant: str | None = None
    completed: bool = False


def run(
    journey: Journey,
    step_id: str,
    *,
    seq: int,
    now: datetime,
    due_at: datetime,
    facts: MemberFacts,
    quiet: QuietHours,
    variant: str | None = None,
) -> RunResult:
    """Run steps from `step_id` until a wait, quiet hours, or the end."""
    result = RunResult([], seq, variant=variant)
    current: str | None = step_id
    # Every step of this run is as late as the timer that started it: a send
    # reached through a branch, tag or reward step is as stale as a first one.
    late_by = now - due_at
    for _ in range(MAX_STEPS_PER_RUN):
        if current is None:
            result.completed = True
            return result
        step = journey.step(current)
        if step.type == "send":
            if step.drop_if_late is not None and late_by > step.drop_if_late:
                # Stale (e.g. the journey was paused): skip it, never flood.
                result.seq += 1
                result.intents.append(DroppedIntent(step.id, result.seq))
                current = step.next
                continue
            if step.message_class in QUIET_CLASSES and quiet.is_quiet(now, facts.tz):
                result.next_step = step.id
                result.due_at = quiet.release_at(now, facts.tz, facts.member_id)
                return result
            result.seq += 1
            template = step.template
            if step.personalised and facts.non_personalised:
                template = step.fallback_template
            # An empty template: personalised, refused, no fallback (recorded as suppressed).
            result.intents.append(
                SendIntent(step.id, result.seq, step.channel, template, step.message_class)
            )
            current = step.next
        elif step.type == "wait":
            result.seq += 1
            # Anchored at the due time, so a sweeper's lag does not stretch waits.
            return _schedule_wait(journey, step, min(now, due_at), facts, quiet, result)
        elif step.type == "branch":
            result.seq += 1
            current = step.next
            for cond, target in step.cases:
                if holds(cond, facts):
                    current = target
                    break
        elif step.type == "split":
            result.seq += 1
            b = bucket(facts.member_id, f"{journey.journey_id}:{step.id}")
            acc = 0
            for name, percent, target in step.branches:
                acc += percent * 100
                if b < acc:
                    current = target
                    result.variant = result.variant or name
                    break
        elif step.type in ("issue_coupon", "award_points"):
            result.seq += 1
            kind = "coupon" if step.type == "issue_coupon" else "points"
            result.intents.append(
                RewardIntent(step.id, result.seq, kind, coupon=step.coupon, points=step.points)
            )
            current = step.next
        elif step.type == "tag":
            result.seq += 1
            result.intents.append(TagIntent(step.tag))
            current = step.next
        elif step.type == "guide_task":
            result.seq += 1
            result.intents.append(GuideTaskIntent(step.id, step.task_title, step.script))
            current = step.next
        else:  # exit
            result.seq += 1
            result.completed = True
            return result
    # Validation forbids cycles without a wait; this is a safety net only.
    raise RuntimeError(f"journey {journey.journey_id} ran {MAX_STEPS_PER_RUN} steps without a wait")


def _schedule_wait(
    journey: Journey,
    step: Step,
    now: datetime,
    facts: MemberFacts,
    quiet: QuietHours,
    result: RunResult,
) -> RunResult:
    if step.event is not None:
        assert step.timeout is not None
        result.waiting_step = step.id
        due = now + step.timeout
    elif step.until_local_time is not None:
        due = next_local_time(now, facts.tz, step.until_local_time)
    else:
        assert step.duration is not None
        due = now + step.duration
    result.next_step = step.next
    result.due_at = schedule_time(journey, step.next, due, facts, quiet)
    return result


def schedule_time(
    journey: Journey, step_id: str | None, due: datetime, facts: MemberFacts, quiet: QuietHours
) -> datetime:
    """Checked when scheduling: a marketing send due in quiet hours moves to the release."""
    if step_id is None:
        return due
    step = journey.step(step_id)
    if (
        step.type == "send"
        and step.message_class in QUIET_CLASSES
        and quiet.is_quiet(due, facts.tz)
    ):
        return quiet.release_at(due, facts.tz, facts.member_id)
    return due


# ---- location -----------------------------------------------------------

EARTH_RADIUS_M = 6_371_000
DEFAULT_RADIUS_M = 3_000


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (WGS-84 degrees in)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(a))


def bounding_box(lat: float, lon: float, radius_m: float) -> tuple[float, float, float, float]:
    """(min_lat, max_lat, min_lon, max_lon) enclosing the circle: an index range
    first, the exact distance after."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M)
    dlon = math.degrees(radius_m / (EARTH_RADIUS_M * max(math.cos(math.radians(lat)), 1e-6)))
    return lat - dlat, lat + dlat, lon - dlon, lon + dlon


def parse_coordinates(latitude: str, longitude: str) -> tuple[float, float] | None:
    try:
        lat, lon = float(latitude), float(longitude)
    except ValueError:
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180) or math.isnan(lat) or math.isnan(lon):
        return None
    return lat, lon


# ---- measurement ----------------------------------------------------------


@dataclass(frozen=True)
class Lift:
    treated_rate: float
    holdout_rate: float
    lift: float
    ci_low: float
    ci_high: float


def lift(
    treated_conv: int, treated_n: int, holdout_conv: int, holdout_n: int, z: float = 1.96
) -> Lift | None:
    """Difference of conversion rates (treated - holdout) with a Wald 95% interval.
    None until both groups have members."""
    if treated_n == 0 or holdout_n == 0:
        return None
    p1 = treated_conv / treated_n
    p0 = holdout_conv / holdout_n
    se = math.sqrt(p1 * (1 - p1) / treated_n + p0 * (1 - p0) / holdout_n)
    diff = p1 - p0
    return Lift(p1, p0, diff, diff - z * se, diff + z * se)
