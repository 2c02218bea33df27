"""Stepping to the knee (bench/stepping.py) and the knees scenario's pure parts
(bench/knees.py): verdicts, knee choice, rates and arguments, without running
any load."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from bench import knees
from bench.loadgen import OK, RunResult
from bench.stepping import (
    Criteria,
    Step,
    Stepped,
    falling_rates,
    geometric_rates,
    holds,
    knee,
    step_up,
    why_not,
)

SLO = Criteria(slo_p99_ms=30.0, achieved_tolerance=0.02)


def step(
    offered: float, p99: float | None = 10.0, achieved: float | None = None, errors: int = 0
) -> Step:
    return Step(
        offered=offered,
        achieved=offered if achieved is None else achieved,
        p99_ms=p99,
        errors=errors,
        scheduled=int(offered * 5),
    )


def test_a_step_holds_only_within_the_slo_without_errors_and_keeping_up() -> None:
    assert holds(step(100, p99=30.0), SLO)
    assert not holds(step(100, p99=30.1), SLO)
    assert not holds(step(100, p99=None), SLO)  # nothing succeeded
    assert not holds(step(100, errors=1), SLO)
    assert holds(step(100, achieved=98.0), SLO)  # within 2%
    assert not holds(step(100, achieved=97.9), SLO)
    assert why_not(step(100, p99=41.0, achieved=90.0, errors=3), SLO) == (
        "p99 41 ms > 30 ms, achieved 90.0/s of 100/s, 3 errors"
    )
    assert why_not(step(100), SLO) == ""


def test_an_error_allowance_lets_a_few_errors_through() -> None:
    lenient = Criteria(30.0, achieved_tolerance=0.05, max_error_fraction=0.005)
    assert holds(step(100, errors=2), lenient)  # 2 of 500 scheduled
    assert not holds(step(100, errors=3), lenient)


def test_the_knee_is_the_last_rate_that_held_before_the_first_that_did_not() -> None:
    steps = [step(20), step(25), step(31.2, p99=45.0), step(39.1)]
    # The step that held again past the failure is luck, not capacity.
    assert knee(steps, SLO) == 25
    assert knee([step(20, errors=1), step(25)], SLO) is None
    assert knee([step(20), step(25)], SLO) == 25
    assert knee([], SLO) is None


def test_criteria_refuse_nonsense_with_the_value_named() -> None:
    with pytest.raises(ValueError, match="SLO must be positive, got 0"):
        Criteria(0)
    with pytest.raises(ValueError, match="tolerance must be in"):
        Criteria(30, achieved_tolerance=1.0)


def test_rates_step_geometrically_up_to_the_maximum() -> None:
    assert geometric_rates(20, 1.25, 100) == [20.0, 25.0, 31.2, 39.1, 48.8, 61.0, 76.3, 95.4]
    assert geometric_rates(10, 2, 40) == [10.0, 20.0, 40.0]  # the maximum itself included
    assert geometric_rates(5, 3, 5) == [5.0]
    # Tiny factors never repeat a rounded rate.
    rates = geometric_rates(1, 1.001, 2)
    assert rates == sorted(set(rates))
    for start, factor, top in ((0, 2, 10), (10, 1, 100), (10, 2, 5)):
        with pytest.raises(ValueError):
            geometric_rates(start, factor, top)


def result(rate: float, p99_ms: float, errors: int = 0) -> RunResult:
    """A finished 1 s run at `rate` whose every latency is `p99_ms`."""
    r = RunResult("fake", rate, 1.0)
    ok = int(rate) - errors
    r.scheduled = int(rate)
    r.latencies = [p99_ms / 1000.0] * ok
    r.statuses = Counter({OK: ok, **({"UNAVAILABLE": errors} if errors else {})})
    r.elapsed_s = 1.0
    return r


async def test_step_up_stops_at_the_first_step_that_does_not_hold() -> None:
    latencies = {20.0: 5.0, 40.0: 12.0, 80.0: 55.0, 160.0: 4.0}
    ran: list[tuple[int, float]] = []
    drained: list[int] = []
    seen: list[bool] = []

    async def run_step(n: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
        ran.append((n, rate))
        return result(rate, latencies[rate]), {"rate": rate}

    async def between() -> None:
        drained.append(len(ran))

    found = await step_up(
        [20.0, 40.0, 80.0, 160.0],
        run_step,
        SLO,
        on_step=lambda _, held: seen.append(held),
        between=between,
    )
    assert ran == [(0, 20.0), (1, 40.0), (2, 80.0)]
    assert drained == [1, 2]  # after each step that held, not after the failure
    assert seen == [True, True, False]
    assert [s["held"] for s in found.summaries] == [True, True, False]
    assert found.knee == 40.0
    assert found.stopped_by == "80/s: p99 55 ms > 30 ms"


async def test_step_up_reports_every_rate_holding_and_the_first_failing() -> None:
    async def fine(n: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
        return result(rate, 1.0), {}

    found = await step_up([10.0, 20.0], fine, SLO)
    assert (found.knee, found.stopped_by) == (
        20.0,
        "every rate held, up to 20/s: the knee is higher",
    )

    async def failing(n: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
        return result(rate, 1.0, errors=2), {}

    found = await step_up([10.0, 20.0], failing, SLO)
    assert (found.knee, len(found.steps)) == (None, 1)
    assert found.stopped_by == "10/s: achieved 8.0/s of 10/s, 2 errors"


def test_knees_paths_are_chosen_by_name_in_the_order_given() -> None:
    assert knees.parse_paths("all") == list(knees.PATHS)  # the floor only when named
    assert knees.parse_paths("empty_grpc,all") == [knees.EMPTY, *knees.PATHS]
    assert knees.parse_paths("identify, member_centre,identify") == ["identify", "member-centre"]
    with pytest.raises(
        ValueError, match=re.escape("unknown path(s) checkuot; choose from checkout")
    ):
        knees.parse_paths("checkuot")
    with pytest.raises(ValueError, match="none given"):
        knees.parse_paths(",")


def test_knees_arguments_name_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    args = knees.parse_args(
        ["--paths", "coupon-issue", "--start-rate", "10", "--max-rate", "40", "--factor", "2"]
    )
    assert args.path_names == ["coupon-issue"] and args.rates == [10.0, 20.0, 40.0]
    assert knees.parse_args([]).rates_below == [16.0, 10.2, 6.6]  # x 1/1.25^2 down to 5
    for argv, message in (
        (["--paths", "nope"], "--paths: unknown path(s) nope"),
        (["--factor", "1"], "--factor must be above 1"),
        (["--max-rate", "5"], "--max-rate (5) is below --start-rate (25)"),
        (["--check-fraction", "1.5"], "--check-fraction must be in (0, 1]"),
        (["--step-seconds", "0"], "--step-seconds must be positive"),
        (["--min-rate", "30"], "--min-rate must be in (0, --start-rate], got 30"),
    ):
        with pytest.raises(SystemExit):
            knees.parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_check_runs_at_the_fraction_of_the_knee() -> None:
    assert knees.check_rate(95.4, 0.7) == 66.8
    assert knees.check_rate(0.1, 0.7) == 0.1  # never a zero rate
    assert knees.check_rate(None, 0.7) is None


def test_the_knees_table_says_met_or_not_per_path() -> None:
    check = result(70.0, 12.0).summary()
    check["cpu_ms_per_call"] = {"gateway": 2.0, "total": 2.0}
    check["cpu_ms_per_call_marginal"] = {"gateway": 1.5, "total": 1.5}
    paths = [
        {
            "path": "identify",
            "knee_per_s": 100.0,
            "steps": [{}, {}],
            "check_rate_per_s": 70.0,
            "check": check,
            "target_met": True,
            "knee_over_empty_grpc": 0.05,
            "stopped_by": "125/s: p99 41 ms > 30 ms",
        },
        {
            "path": "checkout",
            "knee_per_s": None,
            "steps": [{}],
            "check_rate_per_s": None,
            "check": None,
            "target_met": False,
            "stopped_by": "25/s: 1 errors",
        },
    ]
    text = knees.knees_table(paths, 30.0, 0.7)
    identify, checkout = (
        line
        for line in text.split("\n\n")[0].splitlines()
        if line.startswith(("identify ", "checkout "))
    )
    assert identify.split()[:3] == ["identify", "100.0", "2"] and identify.endswith(" met")
    assert "0.050" in identify.split()  # its knee over the empty call's
    assert checkout.endswith("NOT met") and "-" in checkout.split()
    assert "identify at 70/s" in text and "identify marginal" in text


def test_a_rate_holds_when_one_of_its_runs_does() -> None:
    # 25/s failed once (someone else's burst) and held on the retry; 31.2/s failed twice.
    steps = [step(20), step(25, p99=45.0), step(25), step(31.2, p99=50.0), step(31.2, errors=2)]
    assert knee(steps, SLO) == 25
    stepped = Stepped(SLO, steps)
    assert stepped.knee == 25
    assert stepped.stopped_by == "31.2/s (2 runs): 2 errors"


async def test_step_up_retries_a_failed_rate_with_fresh_keys_after_draining() -> None:
    outcomes = iter([5.0, 45.0, 12.0, 50.0, 55.0])  # p99 of each run, in order
    ran: list[tuple[int, float]] = []
    drained: list[int] = []

    async def run_step(k: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
        ran.append((k, rate))
        return result(rate, next(outcomes)), {}

    async def between() -> None:
        drained.append(len(ran))

    found = await step_up([20.0, 40.0, 80.0, 160.0], run_step, SLO, retries=1, between=between)
    # k counts runs (unique keys per run), the retry runs at the same rate.
    assert ran == [(0, 20.0), (1, 40.0), (2, 40.0), (3, 80.0), (4, 80.0)]
    assert drained == [1, 2, 3, 4]  # after every run but the last
    assert [(s["held"], s["attempt"]) for s in found.summaries] == [
        (True, 1),
        (False, 1),
        (True, 2),
        (False, 1),
        (False, 2),
    ]
    assert found.knee == 40.0
    with pytest.raises(ValueError, match="retries must not be negative"):
        await step_up([20.0], run_step, SLO, retries=-1)


def test_the_knee_ignores_order_and_stops_at_the_lowest_rate_that_failed() -> None:
    # Stepping down from a failed first rate: the first rate that holds.
    assert knee([step(25, p99=40.0), step(16, p99=35.0), step(10.2)], SLO) == 10.2
    assert knee([step(25, p99=40.0), step(16, p99=35.0)], SLO) is None
    # A rate above a failed one does not count, whatever order they ran in.
    assert knee([step(16), step(20, errors=1), step(25)], SLO) == 16


def test_rates_fall_geometrically_to_the_minimum() -> None:
    assert falling_rates(25, 1.5625, 5) == [16.0, 10.2, 6.6]
    assert falling_rates(10, 2, 5) == [5.0]  # the minimum itself included
    assert falling_rates(5, 2, 5) == []
    for start, factor, floor in ((10, 1, 1), (10, 2, 0)):
        with pytest.raises(ValueError):
            falling_rates(start, factor, floor)


async def test_step_up_steps_down_when_the_first_rate_fails() -> None:
    p99s = {25.0: 40.0, 16.0: 35.0, 10.2: 9.0, 6.6: 5.0}
    ran: list[float] = []

    async def run_step(k: int, rate: float) -> tuple[RunResult, dict[str, Any]]:
        ran.append(rate)
        return result(rate, p99s[rate]), {}

    found = await step_up([25.0, 31.2], run_step, SLO, below=[16.0, 10.2, 6.6])
    assert ran == [25.0, 16.0, 10.2]  # stops at the first that holds, never back up
    assert found.knee == 10.2
    assert found.stopped_by == "16/s: p99 35 ms > 30 ms"
    # Below is only for a failed first rate.
    ran.clear()
    p99s[31.2] = 50.0
    p99s[25.0] = 5.0
    found = await step_up([25.0, 31.2], run_step, SLO, below=[16.0])
    assert (ran, found.knee) == ([25.0, 31.2], 25.0)


def test_a_short_low_rate_step_is_judged_against_the_calls_it_scheduled() -> None:
    # 2.6/s for 4 s schedules round(10.4) = 10 calls: all 10 answered within
    # the 4 s is 2.5/s achieved, everything offered, not 96% of it.
    r = RunResult("low", 2.6, 4.0)
    r.scheduled = 10
    r.latencies = [0.005] * 10
    r.statuses = Counter({OK: 10})
    r.elapsed_s = 4.0
    assert holds(Step.of(r), SLO)
    r.statuses = Counter({OK: 9})  # one call short of the schedule is not kept up
    r.latencies = [0.005] * 9
    assert why_not(Step.of(r), SLO) == "achieved 2.2/s of 2.6/s"
