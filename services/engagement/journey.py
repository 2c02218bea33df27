"""Journey definitions: a declarative JSON document, parsed and validated on save.

A journey is a small graph of steps keyed by id. Parsing is strict: every
problem is collected with the path of the offending field, so an operator sees
all of them at once (unreachable step, cycle without a wait, unknown event,
unknown channel, ...). The parsed `Journey` is immutable; a published version
never changes, so members in flight keep running the version they entered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import time, timedelta
from typing import Any

from servicekit.errors import InvalidArgument

from .templates import check_content, check_supplied

# Events a journey can be entered by, wait for, or exit on (a goal).
EVENTS = frozenset(
    {
        "member_registered",
        "first_order",
        "order_completed",
        "tier_changed",
        "segment_changed",
        "lifecycle_stage_changed",
        "cart_abandoned",
        "page_view",
        "check_in",
        "subscription_tap",
        "points_expiring_soon",
        "coupon_expiring_soon",
        "birthday_month",
        # The member shared a location (attributes latitude, longitude, consent).
        "location_reported",
        # Operator launch: members with a consented location near a store.
        "near_store",
        # guides' CommunityJoined / CommunityLeft: the member joined or left one
        # of the brand's WeCom customer groups (attributes chat_id, store_id,
        # audience: the group's tier, e.g. vip / growth / general).
        "community_joined",
        "community_left",
    }
)
CHANNELS = frozenset({"wecom", "sms", "miniprogram", "app_push"})
# "1+1+N": targeted and general are capped per local day; the rest are not.
MESSAGE_CLASSES = frozenset({"targeted", "general", "transactional", "reply"})
# Facts a branch can test (kept by the engagement service from events).
FACTS = frozenset({"tier", "segment", "stage", "order_count", "non_personalised", "tag", "consent"})
OPERATORS = frozenset({"eq", "ne", "in", "gte", "lte", "has"})
REENTRY = frozenset({"never", "after_exit", "after_days"})
STEP_TYPES = frozenset(
    {"wait", "branch", "send", "issue_coupon", "award_points", "tag", "guide_task", "split", "exit"}
)

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
JOURNEY_ID = _ID  # what a journey id looks like (a list's page token is one)
MAX_STEPS = 100


def parse_duration(value: object) -> timedelta | None:
    """ "90s", "30m", "2h", "3d" -> timedelta; None when malformed."""
    if not isinstance(value, str):
        return None
    m = _DURATION.match(value.strip())
    if m is None:
        return None
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def parse_local_time(value: object) -> time | None:
    if not isinstance(value, str) or not re.match(r"^\d{2}:\d{2}$", value):
        return None
    hh, mm = int(value[:2]), int(value[3:])
    if hh > 23 or mm > 59:
        return None
    return time(hh, mm)


@dataclass(frozen=True)
class Condition:
    fact: str
    op: str
    value: Any
    # For fact "consent": the channel asked about.
    channel: str = ""


@dataclass(frozen=True)
class Step:
    """One step. Only the attributes of its `type` are meaningful."""

    id: str
    type: str
    next: str | None = None
    # wait
    duration: timedelta | None = None
    until_local_time: time | None = None
    event: str | None = None
    timeout: timedelta | None = None
    on_event: str | None = None
    # send
    channel: str = ""
    template: str = ""
    message_class: str = "targeted"
    personalised: bool = False
    fallback_template: str = ""
    drop_if_late: timedelta | None = None
    # The provider content with its {variables} (templates.py), checked on publish.
    content: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # issue_coupon / award_points / tag
    coupon: str = ""
    points: int = 0
    tag: str = ""
    # guide_task: a task for the member's guide (services/guides), sent through WeCom
    task_title: str = ""
    script: str = ""
    # branch: (condition, next) in order, then `next` as the default
    cases: tuple[tuple[Condition, str], ...] = ()
    # split: (name, percent, next)
    branches: tuple[tuple[str, int, str], ...] = ()

    def targets(self) -> list[str]:
        out = [t for t in (self.next, self.on_event) if t]
        out += [t for _, t in self.cases]
        out += [t for _, _, t in self.branches]
        return out

    @property
    def is_wait(self) -> bool:
        return self.type == "wait"


@dataclass(frozen=True)
class Journey:
    journey_id: str
    name: str
    priority: int
    entry_event: str
    entry_where: dict[str, str]
    reentry: str
    reentry_days: int
    goal_event: str | None
    conversion_days: int
    holdout_percent: int
    start: str
    steps: dict[str, Step] = field(default_factory=dict)

    def step(self, step_id: str) -> Step:
        return self.steps[step_id]


@dataclass
class _Errors:
    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, path: str, code: str, message: str) -> None:
        self.items.append((path, code, message))


def parse_journey(doc: object) -> Journey:
    """Parse and validate a journey document; raise InvalidArgument listing every problem."""
    errors = _Errors()
    if not isinstance(doc, dict):
        raise InvalidArgument(
            "a journey definition is a JSON object", code="INVALID_JOURNEY", field="definition"
        )
    journey_id = doc.get("id")
    if not isinstance(journey_id, str) or not _ID.match(journey_id):
        errors.add("id", "INVALID_JOURNEY_ID", "id: lowercase letters, digits, '-' or '_'")
        journey_id = ""
    name = doc.get("name", journey_id)
    priority = doc.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 1000:
        errors.add("priority", "INVALID_PRIORITY", "priority: an integer 0..1000")
        priority = 0

    entry = doc.get("entry")
    entry_event, entry_where = "", {}
    if not isinstance(entry, dict) or not isinstance(entry.get("event"), str):
        errors.add("entry.event", "MISSING_ENTRY", "entry.event is required")
    else:
        entry_event = entry["event"]
        if entry_event not in EVENTS:
            errors.add("entry.event", "UNKNOWN_EVENT", f"unknown event {entry_event!r}")
        where = entry.get("where", {})
        if not isinstance(where, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in where.items()
        ):
            errors.add("entry.where", "INVALID_WHERE", "entry.where maps attribute -> string")
        else:
            entry_where = dict(where)

    reentry_doc = doc.get("reentry", {"policy": "never"})
    reentry, reentry_days = "never", 0
    if not isinstance(reentry_doc, dict) or reentry_doc.get("policy") not in REENTRY:
        errors.add("reentry.policy", "INVALID_REENTRY", f"reentry.policy: one of {sorted(REENTRY)}")
    else:
        reentry = reentry_doc["policy"]
        if reentry == "after_days":
            days = reentry_doc.get("days")
            if not isinstance(days, int) or days < 1:
                errors.add("reentry.days", "INVALID_REENTRY", "reentry.days: a positive integer")
            else:
                reentry_days = days

    goal_event = None
    conversion_days = 7
    goal = doc.get("goal")
    if goal is not None:
        if not isinstance(goal, dict) or not isinstance(goal.get("event"), str):
            errors.add("goal.event", "INVALID_GOAL", "goal.event is required when goal is given")
        else:
            goal_event = goal["event"]
            if goal_event not in EVENTS:
                errors.add("goal.event", "UNKNOWN_EVENT", f"unknown event {goal_event!r}")
            conversion_days = goal.get("within_days", 7)
            if not isinstance(conversion_days, int) or conversion_days < 1:
                errors.add("goal.within_days", "INVALID_GOAL", "goal.within_days: positive int")
                conversion_days = 7

    holdout = doc.get("holdout_percent", 0)
    if not isinstance(holdout, int) or isinstance(holdout, bool) or not 0 <= holdout <= 50:
        errors.add("holdout_percent", "INVALID_HOLDOUT", "holdout_percent: an integer 0..50")
        holdout = 0

    steps_doc = doc.get("steps")
    steps: dict[str, Step] = {}
    if not isinstance(steps_doc, dict) or not steps_doc:
        errors.add("steps", "NO_STEPS", "steps: an object of step id -> step")
        steps_doc = {}
    if len(steps_doc) > MAX_STEPS:
        errors.add("steps", "TOO_MANY_STEPS", f"at most {MAX_STEPS} steps")
    for step_id, raw in steps_doc.items():
        path = f"steps.{step_id}"
        if not _ID.match(step_id):
            errors.add(path, "INVALID_STEP_ID", f"step id {step_id!r} is not a valid id")
            continue
        step = _parse_step(step_id, raw, path, errors)
        if step is not None:
            steps[step_id] = step

    if entry_event in EVENTS:
        # A variable the entry event and the member's facts never supply would
        # fail every send: refused here, naming the step's field and the variable.
        for step in steps.values():
            if step.type == "send" and step.content:
                check_supplied(entry_event, step.content, f"steps.{step.id}", errors)

    start = doc.get("start")
    if not isinstance(start, str) or start not in steps_doc:
        errors.add("start", "UNKNOWN_STEP", f"start {start!r} is not a step")
        start = ""

    for step in steps.values():
        for target in step.targets():
            if target not in steps_doc:
                errors.add(
                    f"steps.{step.id}", "UNKNOWN_STEP", f"step {step.id} goes to unknown {target!r}"
                )
    if start and not errors.items:
        _check_graph(start, steps, errors)

    if errors.items:
        path, code, _ = errors.items[0]
        message = "; ".join(f"{p}: {m}" for p, _, m in errors.items)
        raise InvalidArgument(f"invalid journey: {message}", code=code, field=f"definition.{path}")
    return Journey(
        journey_id=str(journey_id),
        name=str(name),
        priority=priority,
        entry_event=entry_event,
        entry_where=entry_where,
        reentry=reentry,
        reentry_days=reentry_days,
        goal_event=goal_event,
        conversion_days=conversion_days,
        holdout_percent=holdout,
        start=start,
        steps=steps,
    )


def _parse_step(step_id: str, raw: object, path: str, errors: _Errors) -> Step | None:
    if not isinstance(raw, dict):
        errors.add(path, "INVALID_STEP", "a step is an object")
        return None
    kind = raw.get("type")
    if kind not in STEP_TYPES:
        errors.add(f"{path}.type", "UNKNOWN_STEP_TYPE", f"unknown step type {kind!r}")
        return None
    nxt = raw.get("next")
    if nxt is not None and not isinstance(nxt, str):
        errors.add(f"{path}.next", "INVALID_STEP", "next: a step id")
        nxt = None
    if kind not in ("exit", "branch", "split") and nxt is None:
        errors.add(f"{path}.next", "MISSING_NEXT", f"a {kind} step needs next (or an exit step)")
    if kind == "exit":
        return Step(step_id, "exit")
    if kind == "wait":
        return _parse_wait(step_id, raw, nxt, path, errors)
    if kind == "send":
        channel = raw.get("channel")
        if channel not in CHANNELS:
            errors.add(f"{path}.channel", "UNKNOWN_CHANNEL", f"unknown channel {channel!r}")
        template = raw.get("template")
        if not isinstance(template, str) or not template:
            errors.add(f"{path}.template", "MISSING_TEMPLATE", "template is required")
        cls = raw.get("class", "targeted")
        if cls not in MESSAGE_CLASSES:
            errors.add(f"{path}.class", "UNKNOWN_MESSAGE_CLASS", f"unknown class {cls!r}")
        content = check_content(str(channel), raw, path, errors) if channel in CHANNELS else {}
        drop = raw.get("drop_if_late")
        drop_td = parse_duration(drop) if drop is not None else None
        if drop is not None and drop_td is None:
            errors.add(f"{path}.drop_if_late", "INVALID_DURATION", "drop_if_late: like '6h'")
        return Step(
            step_id,
            "send",
            nxt,
            channel=str(channel),
            template=str(template),
            message_class=str(cls),
            personalised=bool(raw.get("personalised", False)),
            fallback_template=str(raw.get("fallback_template", "")),
            drop_if_late=drop_td,
            content=content,
        )
    if kind == "issue_coupon":
        coupon = raw.get("coupon")
        if not isinstance(coupon, str) or not coupon:
            errors.add(f"{path}.coupon", "MISSING_COUPON", "coupon: the coupon definition id")
        return Step(step_id, kind, nxt, coupon=str(coupon))
    if kind == "award_points":
        points = raw.get("points")
        if not isinstance(points, int) or isinstance(points, bool) or not 0 < points <= 100_000:
            errors.add(f"{path}.points", "INVALID_POINTS", "points: an integer 1..100000")
            points = 0
        return Step(step_id, kind, nxt, points=points)
    if kind == "tag":
        tag = raw.get("tag")
        if not isinstance(tag, str) or not tag:
            errors.add(f"{path}.tag", "MISSING_TAG", "tag is required")
        return Step(step_id, kind, nxt, tag=str(tag))
    if kind == "guide_task":
        title, script = raw.get("title"), raw.get("script")
        if not isinstance(title, str) or not 0 < len(title) <= 64:
            errors.add(f"{path}.title", "INVALID_TASK", "title: 1-64 characters")
        if not isinstance(script, str) or not 0 < len(script) <= 1000:
            errors.add(f"{path}.script", "INVALID_TASK", "script: the message, 1-1000 characters")
        return Step(step_id, kind, nxt, task_title=str(title or ""), script=str(script or ""))
    if kind == "branch":
        return _parse_branch(step_id, raw, nxt, path, errors)
    return _parse_split(step_id, raw, path, errors)


def _parse_wait(
    step_id: str, raw: dict[str, Any], nxt: str | None, path: str, errors: _Errors
) -> Step:
    given = [k for k in ("duration", "until_local_time", "event") if k in raw]
    if len(given) != 1:
        errors.add(
            path, "INVALID_WAIT", "a wait has exactly one of duration, until_local_time, event"
        )
        return Step(step_id, "wait", nxt)
    if "duration" in raw:
        d = parse_duration(raw["duration"])
        if d is None or d <= timedelta(0):
            errors.add(f"{path}.duration", "INVALID_DURATION", "duration: like '2h' or '3d'")
        return Step(step_id, "wait", nxt, duration=d)
    if "until_local_time" in raw:
        t = parse_local_time(raw["until_local_time"])
        if t is None:
            errors.add(f"{path}.until_local_time", "INVALID_TIME", "until_local_time: 'HH:MM'")
        return Step(step_id, "wait", nxt, until_local_time=t)
    event = raw["event"]
    if event not in EVENTS:
        errors.add(f"{path}.event", "UNKNOWN_EVENT", f"unknown event {event!r}")
    timeout = parse_duration(raw.get("timeout"))
    if timeout is None:
        errors.add(f"{path}.timeout", "INVALID_DURATION", "a wait for an event needs a timeout")
    on_event = raw.get("on_event")
    if not isinstance(on_event, str):
        errors.add(f"{path}.on_event", "MISSING_NEXT", "on_event: the step after the event")
        on_event = None
    return Step(step_id, "wait", nxt, event=str(event), timeout=timeout, on_event=on_event)


def _parse_condition(raw: object, path: str, errors: _Errors) -> Condition | None:
    if not isinstance(raw, dict):
        errors.add(path, "INVALID_CONDITION", "a condition is {fact, op, value}")
        return None
    fact, op = raw.get("fact"), raw.get("op", "eq")
    if fact not in FACTS:
        errors.add(f"{path}.fact", "UNKNOWN_FACT", f"unknown fact {fact!r}")
        return None
    if op not in OPERATORS:
        errors.add(f"{path}.op", "UNKNOWN_OPERATOR", f"unknown operator {op!r}")
        return None
    channel = raw.get("channel", "")
    if fact == "consent" and channel not in CHANNELS:
        errors.add(f"{path}.channel", "UNKNOWN_CHANNEL", f"unknown channel {channel!r}")
    return Condition(str(fact), str(op), raw.get("value"), str(channel))


def _parse_branch(
    step_id: str, raw: dict[str, Any], nxt: str | None, path: str, errors: _Errors
) -> Step:
    cases_raw = raw.get("cases")
    cases: list[tuple[Condition, str]] = []
    if not isinstance(cases_raw, list) or not cases_raw:
        errors.add(f"{path}.cases", "INVALID_BRANCH", "cases: a non-empty list")
        cases_raw = []
    for n, case in enumerate(cases_raw):
        cpath = f"{path}.cases[{n}]"
        if not isinstance(case, dict) or not isinstance(case.get("next"), str):
            errors.add(cpath, "INVALID_BRANCH", "each case is {if: condition, next: step}")
            continue
        cond = _parse_condition(case.get("if"), f"{cpath}.if", errors)
        if cond is not None:
            cases.append((cond, case["next"]))
    if nxt is None:
        errors.add(f"{path}.next", "MISSING_NEXT", "a branch needs next (the default)")
    return Step(step_id, "branch", nxt, cases=tuple(cases))


def _parse_split(step_id: str, raw: dict[str, Any], path: str, errors: _Errors) -> Step:
    branches_raw = raw.get("branches")
    branches: list[tuple[str, int, str]] = []
    if not isinstance(branches_raw, list) or len(branches_raw) < 2:
        errors.add(f"{path}.branches", "INVALID_SPLIT", "branches: at least two")
        branches_raw = []
    for n, b in enumerate(branches_raw):
        bpath = f"{path}.branches[{n}]"
        ok = (
            isinstance(b, dict)
            and isinstance(b.get("name"), str)
            and isinstance(b.get("percent"), int)
            and isinstance(b.get("next"), str)
            and 0 < b["percent"] <= 100
        )
        if not ok:
            errors.add(bpath, "INVALID_SPLIT", "each branch is {name, percent 1..100, next}")
            continue
        branches.append((b["name"], b["percent"], b["next"]))
    if branches and sum(p for _, p, _ in branches) != 100:
        errors.add(f"{path}.branches", "INVALID_SPLIT", "branch percents must add up to 100")
    return Step(step_id, "split", None, branches=tuple(branches))


def _check_graph(start: str, steps: dict[str, Step], errors: _Errors) -> None:
    seen = {start}
    frontier = [start]
    while frontier:
        for target in steps[frontier.pop()].targets():
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    for step_id in steps:
        if step_id not in seen:
            errors.add(f"steps.{step_id}", "UNREACHABLE_STEP", f"step {step_id} is unreachable")
    # A cycle must pass through a wait, or one member would spin forever:
    # look for a cycle in the graph with the wait steps removed.
    colour: dict[str, int] = {}

    def visit(node: str) -> str | None:
        colour[node] = 1
        for target in steps[node].targets():
            if steps[target].is_wait:
                continue
            if colour.get(target) == 1:
                return target
            if colour.get(target) is None:
                found = visit(target)
                if found:
                    return found
        colour[node] = 2
        return None

    for step_id, step in steps.items():
        if not step.is_wait and step_id not in colour:
            found = visit(step_id)
            if found:
                errors.add(
                    f"steps.{found}", "CYCLE_WITHOUT_WAIT", f"step {found} loops without a wait"
                )
                return
