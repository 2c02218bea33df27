"""Stepping an open-loop rate up to the knee, shared by the scenarios that
look for one (bench/scaleout.py, bench/knees.py, `make bench --probe`).

A step holds when its p99 is within the SLO, the run kept up with what was
offered (achieved >= (1 - tolerance) x offered) and errors stay within their
allowance (none, by default). The rate steps up until a rate does not hold
(optionally retried: a rate holds when one of its runs does); the knee is the
last rate that held before the first that did not. When the first rate
already fails, rates below it run (falling) until one holds: that is the knee.

`Step` and the functions on it are pure (no clock, no I/O), so the choice of
the knee and the rates is unit-tested without running anything;
`step_up` only sequences the runs a scenario gives it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .loadgen import RunResult


@dataclass(frozen=True)
class Criteria:
    """What a step must keep to hold."""

    slo_p99_ms: float
    # Achieved must be at least (1 - tolerance) x offered.
    achieved_tolerance: float = 0.02
    # Errors (any non-OK status) as a fraction of scheduled calls.
    max_error_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.slo_p99_ms <= 0:
            raise ValueError(f"the p99 SLO must be positive, got {self.slo_p99_ms} ms")
        if not 0 <= self.achieved_tolerance < 1:
            raise ValueError(
                f"the achieved-rate tolerance must be in [0, 1), got {self.achieved_tolerance}"
            )
        if not 0 <= self.max_error_fraction < 1:
            raise ValueError(
                f"the error allowance must be in [0, 1), got {self.max_error_fraction}"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "p99_ms_at_most": self.slo_p99_ms,
            "achieved_at_least": f"{100 * (1 - self.achieved_tolerance):g}% of offered",
            "errors_at_most": f"{100 * self.max_error_fraction:g}%",
        }


@dataclass(frozen=True)
class Step:
    """One measured step, as much of it as the verdict needs."""

    offered: float
    achieved: float
    p99_ms: float | None  # None: no call succeeded
    errors: int
    scheduled: int
    # The rate the schedule held: round(offered x duration) calls over the
    # duration. Short, slow steps round away up to half a call, which is not
    # a shortfall of the server's (2.6/s for 4 s schedules 10 calls, 2.5/s).
    due: float | None = None

    @property
    def expected(self) -> float:
        return self.offered if self.due is None else min(self.offered, self.due)

    @classmethod
    def of(cls, result: RunResult) -> Step:
        return cls(
            offered=result.offered_rate,
            achieved=result.achieved_rate,
            p99_ms=result.latency_ms()["p99"],
            errors=sum(result.errors.values()),
            scheduled=result.scheduled,
            due=result.scheduled / result.duration_s if result.duration_s > 0 else None,
        )


def holds(step: Step, criteria: Criteria) -> bool:
    return (
        step.p99_ms is not None
        and step.p99_ms <= criteria.slo_p99_ms
        and step.achieved >= (1 - criteria.achieved_tolerance) * step.expected
        and step.errors <= criteria.max_error_fraction * max(step.scheduled, 1)
    )


def why_not(step: Step, criteria: Criteria) -> str:
    """What a step that does not hold failed on ('' when it holds)."""
    reasons = []
    if step.p99_ms is None:
        reasons.append("no call succeeded")
    elif step.p99_ms > criteria.slo_p99_ms:
        reasons.append(f"p99 {round(step.p99_ms, 1):g} ms > {criteria.slo_p99_ms:g} ms")
    if step.achieved < (1 - criteria.achieved_tolerance) * step.expected:
        reasons.append(f"achieved {step.achieved:.1f}/s of {step.offered:g}/s")
    if step.errors > criteria.max_error_fraction * max(step.scheduled, 1):
        reasons.append(f"{step.errors} errors")
    return ", ".join(reasons)


def step_line(
    step: Step, criteria: Criteria, held: str = "held", failed: str = "past the knee"
) -> str:
    """One readable line per step for the progress log."""
    verdict = held if holds(step, criteria) else f"{failed} ({why_not(step, criteria)})"
    p99 = "-" if step.p99_ms is None else f"{step.p99_ms:.1f}"
    return (
        f"{step.offered:7.1f}/s: achieved {step.achieved:7.1f}/s, p99 {p99} ms,"
        f" errors {step.errors} -> {verdict}"
    )


def verdicts(steps: Iterable[Step], criteria: Criteria) -> dict[float, bool]:
    """Each offered rate that ran: whether it held in any of its runs (a rate
    and its retries)."""
    held: dict[float, bool] = {}
    for step in steps:
        held[step.offered] = held.get(step.offered, False) or holds(step, criteria)
    return held


def knee(steps: Iterable[Step], criteria: Criteria) -> float | None:
    """The highest offered rate that held (in any of its runs) with no lower
    rate failing in all of its runs; None when no rate held. Stepping up,
    that is the last rate before the first failure (a rate that holds again
    past a failure is luck on a noisy machine, not capacity); stepping down
    from a failed first rate, the first that holds."""
    held = verdicts(steps, criteria)
    best: float | None = None
    for rate in sorted(held):
        if not held[rate]:
            break
        best = rate
    return best


def falling_rates(start: float, factor: float, min_rate: float) -> list[float]:
    """start / factor, start / factor^2, ... down to min_rate (rounded to
    0.1/s): where to look when the first rate already fails."""
    if not factor > 1 or math.isinf(factor):
        raise ValueError(f"the step factor must be above 1, got {factor:g}")
    if min_rate <= 0:
        raise ValueError(f"the lowest rate must be positive, got {min_rate:g}")
    rates: list[float] = []
    rate = start / factor
    while rate >= min_rate * (1 - 1e-9):
        rounded = round(rate, 1)
        if not rates or rounded < rates[-1]:
            rates.append(rounded)
        rate /= factor
    return rates


def geometric_rates(start: float, factor: float, max_rate: float) -> list[float]:
    """start, start x factor, ... up to max_rate (rounded to 0.1/s; each
    higher than the one before)."""
    if start <= 0 or max_rate < start:
        raise ValueError(f"rates need 0 < start <= max, got start {start:g}, max {max_rate:g}")
    if not factor > 1 or math.isinf(factor):
        raise ValueError(f"the step factor must be above 1, got {factor:g}")
    rates: list[float] = []
    rate = start
    while rate <= max_rate * (1 + 1e-9):
        rounded = round(float(rate), 1)
        if not rates or rounded > rates[-1]:
            rates.append(rounded)
        rate *= factor
    return rates


@dataclass
class Stepped:
    """What `step_up` found: every step's summary and verdict, and the knee."""

    criteria: Criteria
    steps: list[Step] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def knee(self) -> float | None:
        return knee(self.steps, self.criteria)

    @property
    def stopped_by(self) -> str:
        """Why stepping ended: the lowest failed rate above the knee (its last
        run's reasons), or the last rate."""
        held = verdicts(self.steps, self.criteria)
        failed = sorted(rate for rate, ok in held.items() if not ok)
        if failed:
            rate = min(r for r in failed if self.knee is None or r > self.knee)
            runs = [step for step in self.steps if step.offered == rate]
            tries = f" ({len(runs)} runs)" if len(runs) > 1 else ""
            return f"{rate:g}/s{tries}: {why_not(runs[-1], self.criteria)}"
        if not self.steps:
            return "no step ran"
        return f"every rate held, up to {self.steps[-1].offered:g}/s: the knee is higher"


async def step_up(
    rates: Sequence[float],
    run_step: Callable[[int, float], Awaitable[tuple[RunResult, dict[str, Any]]]],
    criteria: Criteria,
    *,
    retries: int = 0,
    below: Sequence[float] = (),
    on_step: Callable[[Step, bool], None] | None = None,
    between: Callable[[], Awaitable[object]] | None = None,
) -> Stepped:
    """Run `run_step(k, rate)` (k counts runs from 0, for unique keys; it
    returns the result and its summary, which gets "held" and "attempt") for
    each rate in order, until a rate does not hold in 1 + `retries` runs (on
    a shared machine one run can fail on someone else's burst). When the
    first rate fails, the `below` rates (falling) run in order until one
    holds. `between` runs after each run but the last (e.g. let consumers
    drain)."""
    if retries < 0:
        raise ValueError(f"retries must not be negative, got {retries}")
    found = Stepped(criteria)

    async def rate_holds(rate: float) -> bool:
        for attempt in range(1 + retries):
            if found.steps and between is not None:
                await between()
            result, summary = await run_step(len(found.steps), rate)
            step = Step.of(result)
            held = holds(step, criteria)
            summary.update(held=held, attempt=attempt + 1)
            found.steps.append(step)
            found.summaries.append(summary)
            if on_step is not None:
                on_step(step, held)
            if held:
                return True
        return False

    for n, rate in enumerate(rates):
        if not await rate_holds(rate):
            if n == 0:
                for lower in below:
                    if await rate_holds(lower):
                        break
            break
    return found
