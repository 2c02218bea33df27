"""Journey definitions: validation on save, and the pure step rules."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from servicekit.errors import InvalidArgument
from services.engagement.domain import (
    MemberFacts,
    QuietHours,
    SendIntent,
    bounding_box,
    bucket,
    haversine_m,
    lift,
    local_day,
    parse_coordinates,
    run,
)
from services.engagement.journey import parse_journey

CART: dict[str, Any] = {
    "id": "cart-abandoned",
    "priority": 60,
    "entry": {"event": "cart_abandoned"},
    "goal": {"event": "order_completed", "within_days": 1},
    "start": "wait",
    "steps": {
        "wait": {"type": "wait", "duration": "2h", "next": "remind"},
        "remind": {
            "type": "send",
            "channel": "wecom",
            "template": "cart-reminder",
            "text": "Your cart is waiting",
            "class": "targeted",
            "drop_if_late": "6h",
            "next": "done",
        },
        "done": {"type": "exit"},
    },
}


def rejected(doc: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_journey(doc)
    return info.value


def test_a_valid_journey_parses() -> None:
    j = parse_journey(CART)
    assert j.entry_event == "cart_abandoned"
    assert j.step("wait").duration == timedelta(hours=2)
    assert j.step("remind").drop_if_late == timedelta(hours=6)
    assert j.goal_event == "order_completed"


def test_unreachable_step_is_rejected_with_its_name() -> None:
    doc = copy.deepcopy(CART)
    doc["steps"]["orphan"] = {"type": "exit"}
    err = rejected(doc)
    assert err.code == "UNREACHABLE_STEP"
    assert err.field == "definition.steps.orphan"
    assert "orphan is unreachable" in str(err)


def test_cycle_without_a_wait_is_rejected() -> None:
    doc = copy.deepcopy(CART)
    doc["start"] = "remind"
    doc["steps"]["remind"]["next"] = "tag"
    doc["steps"]["tag"] = {"type": "tag", "tag": "x", "next": "remind"}
    del doc["steps"]["wait"], doc["steps"]["done"]
    err = rejected(doc)
    assert err.code == "CYCLE_WITHOUT_WAIT"
    assert "loops without a wait" in str(err)


def test_a_cycle_through_a_wait_is_fine() -> None:
    doc = copy.deepcopy(CART)
    doc["steps"]["remind"]["next"] = "wait"
    del doc["steps"]["done"]
    assert parse_journey(doc).step("remind").next == "wait"


def test_unknown_event_and_unknown_channel_are_both_reported() -> None:
    doc = copy.deepcopy(CART)
    doc["entry"]["event"] = "cart_abandonned"
    doc["steps"]["remind"]["channel"] = "fax"
    err = rejected(doc)
    assert err.code == "UNKNOWN_EVENT"
    assert err.field == "definition.entry.event"
    assert "unknown channel 'fax'" in str(err)


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"start": "nowhere"}, "UNKNOWN_STEP"),
        ({"reentry": {"policy": "sometimes"}}, "INVALID_REENTRY"),
        ({"holdout_percent": 90}, "INVALID_HOLDOUT"),
        ({"steps": {}}, "NO_STEPS"),
    ],
)
def test_bad_fields_are_named(patch: dict[str, Any], code: str) -> None:
    doc = {**copy.deepcopy(CART), **patch}
    assert rejected(doc).code == code


def test_split_percents_must_add_up() -> None:
    doc = copy.deepcopy(CART)
    doc["steps"]["wait"]["next"] = "ab"
    doc["steps"]["ab"] = {
        "type": "split",
        "branches": [
            {"name": "A", "percent": 50, "next": "remind"},
            {"name": "B", "percent": 40, "next": "done"},
        ],
    }
    assert rejected(doc).code == "INVALID_SPLIT"


NOON = datetime(2030, 3, 4, 4, 0, tzinfo=UTC)  # 12:00 in Shanghai
QUIET = QuietHours()


def test_quiet_hours_hold_a_marketing_send_until_morning_with_jitter() -> None:
    j = parse_journey(CART)
    late = datetime(2030, 3, 4, 14, 0, tzinfo=UTC)  # 22:00 in Shanghai
    facts = MemberFacts("m1")
    result = run(j, "remind", seq=1, now=late, due_at=late, facts=facts, quiet=QUIET)
    assert result.intents == [] and result.next_step == "remind"
    assert result.due_at is not None
    morning = datetime(2030, 3, 5, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai
    assert morning <= result.due_at < morning + timedelta(minutes=30)
    # Released at the same instant for every held step of this member.
    again = run(j, "remind", seq=1, now=late, due_at=late, facts=facts, quiet=QUIET)
    assert again.due_at == result.due_at


def test_a_wait_that_ends_in_quiet_hours_is_scheduled_for_the_release() -> None:
    j = parse_journey(CART)
    evening = datetime(2030, 3, 4, 12, 0, tzinfo=UTC)  # 20:00 -> the wait ends at 22:00
    result = run(j, "wait", seq=0, now=evening, due_at=evening, facts=MemberFacts("m"), quiet=QUIET)
    assert result.next_step == "remind"
    assert result.due_at is not None and result.due_at >= datetime(2030, 3, 5, 1, 0, tzinfo=UTC)


def test_a_stale_step_is_dropped_not_sent() -> None:
    j = parse_journey(CART)
    now = NOON + timedelta(days=2)
    result = run(j, "remind", seq=3, now=now, due_at=NOON, facts=MemberFacts("m"), quiet=QUIET)
    assert [type(i).__name__ for i in result.intents] == ["DroppedIntent"]
    assert result.completed


@pytest.mark.parametrize("via", ["branch", "tag", "issue_coupon", "award_points"])
def test_a_stale_send_reached_through_another_step_is_dropped_too(via: str) -> None:
    """drop_if_late holds for every send of a late run, not only its first step
    (a resumed journey whose timer points at a branch, tag or reward step)."""
    doc = copy.deepcopy(CART)
    before: dict[str, Any] = {"type": via, "next": "remind"}
    if via == "branch":
        before["cases"] = [{"if": {"fact": "tier", "op": "eq", "value": "SVIP"}, "next": "remind"}]
    elif via == "tag":
        before["tag"] = "saw-cart"
    elif via == "issue_coupon":
        before["coupon"] = "CART-5"
    else:
        before["points"] = 10
    doc["steps"]["wait"]["next"] = "before"
    doc["steps"]["before"] = before
    j = parse_journey(doc)
    late = run(
        j,
        "before",
        seq=3,
        now=NOON + timedelta(days=2),
        due_at=NOON,
        facts=MemberFacts("m"),
        quiet=QUIET,
    )
    assert [i for i in late.intents if isinstance(i, SendIntent)] == []
    assert [type(i).__name__ for i in late.intents][-1] == "DroppedIntent"
    # On time, the same path sends.
    on_time = run(j, "before", seq=3, now=NOON, due_at=NOON, facts=MemberFacts("m"), quiet=QUIET)
    assert [i.template for i in on_time.intents if isinstance(i, SendIntent)] == ["cart-reminder"]


def test_non_personalised_members_get_the_fallback_or_nothing() -> None:
    doc = copy.deepcopy(CART)
    doc["steps"]["remind"].update(personalised=True, fallback_template="generic")
    j = parse_journey(doc)
    facts = MemberFacts("m", non_personalised=True)
    result = run(j, "remind", seq=0, now=NOON, due_at=NOON, facts=facts, quiet=QUIET)
    assert result.intents == [SendIntent("remind", 1, "wecom", "generic", "targeted")]


def test_local_day_turns_at_local_midnight() -> None:
    before = datetime(2030, 3, 4, 15, 59, tzinfo=UTC)  # 23:59 Shanghai
    assert local_day(before, "Asia/Shanghai").day == 4
    assert local_day(before + timedelta(minutes=2), "Asia/Shanghai").day == 5


def test_buckets_are_the_same_in_another_process() -> None:
    """Holdout and A/B groups must survive a restart and agree across pods: a
    bucket computed by a fresh interpreter (another hash seed) is the same."""
    members = [str(uuid.UUID(int=n * 7919 + 1)) for n in range(50)]
    here = [bucket(m, "holdout:j") for m in members]
    code = (
        "import json, sys\n"
        "from services.engagement.domain import bucket\n"
        "print(json.dumps([bucket(m, 'holdout:j') for m in json.loads(sys.argv[1])]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(members)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(out.stdout) == here
    # The salt matters: another journey splits its members independently.
    assert [bucket(m, "holdout:k") for m in members] != here


def test_buckets_spread_members_evenly() -> None:
    """A 10% holdout takes about 10% of members (binomial, 4 sigma: 20,000
    members -> 1,830..2,170), and every decile gets its share."""
    buckets = [bucket(str(uuid.UUID(int=n)), "holdout:cart") for n in range(20_000)]
    assert all(0 <= b < 10_000 for b in buckets)
    deciles = [sum(1 for b in buckets if lo * 1000 <= b < (lo + 1) * 1000) for lo in range(10)]
    assert all(1_830 <= n <= 2_170 for n in deciles), deciles


def test_lift_interval_contains_the_difference() -> None:
    result = lift(30, 100, 10, 100)
    assert result is not None
    assert result.lift == pytest.approx(0.2)
    assert result.ci_low < 0.2 < result.ci_high
    assert result.ci_low > 0  # 30% vs 10% on 100 each is significant
    assert lift(3, 10, 0, 0) is None


def test_quiet_window_that_does_not_wrap() -> None:
    q = QuietHours(time(1, 0), time(5, 0))
    assert q.is_quiet(datetime(2030, 3, 4, 19, 30, tzinfo=UTC), "Asia/Shanghai")  # 03:30
    assert not q.is_quiet(NOON, "Asia/Shanghai")


def test_haversine_and_the_bounding_box_agree() -> None:
    jingan = (31.2232, 121.4469)
    lujiazui = (31.2363, 121.5010)  # about 5.4 km east
    d = haversine_m(*jingan, *lujiazui)
    assert 5_000 < d < 5_800
    assert haversine_m(*jingan, *jingan) == 0
    lat_lo, lat_hi, lon_lo, lon_hi = bounding_box(*jingan, 3_000)
    # A point 3 km due north / east sits on the box's edge.
    assert haversine_m(*jingan, lat_hi, jingan[1]) == pytest.approx(3_000, rel=1e-3)
    assert haversine_m(*jingan, jingan[0], lon_hi) == pytest.approx(3_000, rel=1e-2)
    assert lat_lo < jingan[0] < lat_hi and lon_lo < jingan[1] < lon_hi


@pytest.mark.parametrize(
    ("lat", "lon", "ok"),
    [
        ("31.2", "121.4", True),
        ("91", "0", False),
        ("0", "181", False),
        ("nan", "0", False),
        ("x", "1", False),
    ],
)
def test_coordinates_are_validated(lat: str, lon: str, ok: bool) -> None:
    assert (parse_coordinates(lat, lon) is not None) == ok
