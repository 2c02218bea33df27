"""Open-loop load: requests start on a fixed schedule, whatever the server does.

Request i is due at start + i / rate. The scheduler launches every request that
is due, without waiting for earlier ones to finish, and a request's latency runs
from its *scheduled* time, not from when it was actually sent. A stalled server
(or a stalled client) therefore shows up as latency for every request that
should have gone out meanwhile: no coordinated omission, unlike a closed loop of
"send, wait, send" that quietly slows down with the server.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

# A request is given this long before it counts as an error; the run never
# waits longer than this for stragglers once the schedule is done.
DEFAULT_TIMEOUT_S = 5.0
# Past this many requests in flight the client itself would become the
# bottleneck (and memory grows without bound): count further arrivals as
# dropped instead of sending them.
DEFAULT_MAX_IN_FLIGHT = 5_000
OK = "OK"
DROPPED = "CLIENT_DROPPED_OVERLOAD"
TIMEOUT = "CLIENT_TIMEOUT"


def status_of(exc: BaseException) -> str:
    """A short, stable label for a failed request: the gRPC status or the error type."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return f"SQLSTATE_{sqlstate}"
    return type(exc).__name__


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


@dataclass
class RunResult:
    name: str
    offered_rate: float
    duration_s: float
    scheduled: int = 0
    # Seconds from a request's scheduled start to its completion, successes only;
    # failures are counted by status in `statuses`.
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    # How far behind schedule the generator itself launched each request
    # (seconds): timer granularity (~1 ms) and, when large, a client that is
    # the bottleneck. It is part of every latency, baselines included.
    send_lags: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    # CPU ms per successful call by process (bench.cpu), when the run was metered.
    cpu_ms_per_call: dict[str, float] | None = None

    @property
    def ok(self) -> int:
        return self.statuses.get(OK, 0)

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.statuses.items()) if k != OK}

    @property
    def achieved_rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        ordered = sorted(self.latencies)
        ms = _ms
        return {
            "p50": ms(percentile(ordered, 50)),
            "p90": ms(percentile(ordered, 90)),
            "p99": ms(percentile(ordered, 99)),
            "p99.9": ms(percentile(ordered, 99.9)),
            "max": ms(ordered[-1] if ordered else None),
            "mean": ms(sum(ordered) / len(ordered) if ordered else None),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offered_rate_per_s": self.offered_rate,
            "duration_s": self.duration_s,
            "scheduled": self.scheduled,
            "ok": self.ok,
            "errors_by_status": self.errors,
            "achieved_rate_per_s": round(self.achieved_rate, 2),
            "elapsed_s": round(self.elapsed_s, 3),
            "latency_ms": self.latency_ms(),
            "send_lag_ms": {
                "p50": _ms(percentile(sorted(self.send_lags), 50)),
                "p99": _ms(percentile(sorted(self.send_lags), 99)),
                "max": _ms(max(self.send_lags, default=None)),
            },
            **({} if self.cpu_ms_per_call is None else {"cpu_ms_per_call": self.cpu_ms_per_call}),
        }


async def open_loop(
    name: str,
    call: Callable[[int], Awaitable[object]],
    rate: float,
    duration: float,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> RunResult:
    """Run `call(i)` for i in 0..rate*duration at fixed arrival times.

    `call` should carry its own deadline (a gRPC timeout); `timeout` here is
    the backstop after which an unfinished request is cancelled and counted.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    # perf_counter, not loop.time(): uvloop's clock is cached per iteration
    # and has millisecond resolution, too coarse for sub-millisecond calls.
    clock = time.perf_counter
    loop = asyncio.get_running_loop()
    result = RunResult(name, rate, duration)
    total = max(1, round(rate * duration))
    interval = 1.0 / rate
    in_flight: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await call(i)
        except Exception as exc:
            result.statuses[status_of(exc)] += 1
        else:
            result.latencies.append(clock() - due)
            result.statuses[OK] += 1

    start = clock() + 0.01
    i = 0
    while i < total:
        now = clock()
        due = start + i * interval
        if due > now:
            await asyncio.sleep(due - now)
            continue
        # Launch everything that is due, late or not, each with its own due time.
        while i < total and start + i * interval <= now:
            due = start + i * interval
            result.send_lags.append(now - due)
            if len(in_flight) >= max_in_flight:
                result.statuses[DROPPED] += 1
            else:
                task = loop.create_task(one(i, due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            i += 1
    result.scheduled = total
    if in_flight:
        # Each request has its own deadline, so this ends within `timeout`.
        _, stuck = await asyncio.wait(set(in_flight), timeout=timeout + 1.0)
        for task in stuck:
            task.cancel()
    result.elapsed_s = max(duration, clock() - start)
    return result
