"""CPU milliseconds per call, per process, during a measured run.

Latency on a 2-core machine depends on whatever else the machine is doing;
the CPU time each process spends per call barely does. It is also the figure
that says how many cores a target rate needs: at `c` ms of CPU per call, one
core serves at most 1000 / c calls per second. Counted from /proc (user +
system time of every thread) for the platform's processes and this database's
PostgreSQL backends (the bench only runs against a local server), from
`INFO cpu` for Redis, and from getrusage for the load generator itself.

Idle work (consumers' blocking reads, relays, metrics sampling) is charged
to the calls of a run too, which at low rates dominates; `CpuMeter.idle`
measures each process's CPU per second with nothing offered, and
`marginal` subtracts it over a run's seconds: the marginal CPU per call,
the figure that adds up when processes are added (bench/scaleout.py).

Not counted: PostgreSQL's shared background processes (WAL writer,
checkpointer), whose work is shared by every database on the server. Redis's
figure is the whole server's: on a Redis shared with other work, it includes
that work.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis

from servicekit.db import asyncpg_dsn

from .profile import Profiler, wanted

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOAD_GENERATOR = "loadgen"
POSTGRES = "pg backends"
REDIS = "redis"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: split after its closing
            # parenthesis; utime and stime are then the 12th and 13th fields.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuSnapshot:
    processes: dict[str, float]
    backends: dict[int, float] | None  # None: the database is not metered
    redis: float | None
    load_generator: float
    at: float = field(default_factory=time.monotonic)  # when it was read


def marginal(
    ms_per_call: Mapping[str, float], idle_per_s: Mapping[str, float], seconds: float, calls: int
) -> dict[str, float]:
    """A run's CPU ms per call (`per_call`) less each process's idle CPU per
    second (`idle`) over the run's `seconds`, never below zero: what one more
    call costs, the figure that adds up when processes are added."""
    per = max(calls, 1)
    out = {
        name: round(max(ms - 1000.0 * idle_per_s.get(name, 0.0) * seconds / per, 0.0), 3)
        for name, ms in ms_per_call.items()
        if name != "total"
    }
    out["total"] = round(sum(out.values()), 3)
    return out


@dataclass
class CpuMeter:
    """Open with `await CpuMeter.open(...)`; close when done. Without a
    database or Redis URL, those are not counted."""

    processes: dict[str, int]  # name -> pid
    monitor: asyncpg.Connection | None = None
    redis: Redis | None = None
    # `make profile` (bench/profile.py): samples the measured run's processes.
    profiler: Profiler | None = None

    @classmethod
    async def open(
        cls,
        processes: Mapping[str, int],
        database_url: str | None = None,
        redis_url: str | None = None,
    ) -> CpuMeter:
        monitor = await asyncpg.connect(asyncpg_dsn(database_url)) if database_url else None
        targets = wanted(processes)
        return cls(
            dict(processes),
            monitor,
            Redis.from_url(redis_url) if redis_url else None,
            Profiler(targets) if targets else None,
        )

    async def close(self) -> None:
        if self.profiler is not None:
            # py-spy writes its file as it stops: not on the event loop.
            await asyncio.to_thread(self.profiler.stop)
        if self.monitor is not None:
            await self.monitor.close()
            self.monitor = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def snapshot(self) -> CpuSnapshot:
        """The counters now: the start of a measured run (profiling, if asked, starts here)."""
        taken = await self._read()
        if self.profiler is not None:
            self.profiler.start()
        return taken

    async def _read(self) -> CpuSnapshot:
        backends: dict[int, float] | None = None
        if self.monitor is not None:
            rows = await self.monitor.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            backends = {r["pid"]: process_cpu_seconds(r["pid"]) for r in rows}
        redis = None
        if self.redis is not None:
            info = await self.redis.info("cpu")
            redis = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return CpuSnapshot(
            processes={name: process_cpu_seconds(pid) for name, pid in self.processes.items()},
            backends=backends,
            redis=redis,
            load_generator=own_cpu_seconds(),
        )

    async def idle(self, seconds: float) -> dict[str, float]:
        """CPU seconds per wall second by process over `seconds` with nothing
        offered: each process's idle work, for `marginal`."""
        before = await self._read()
        await asyncio.sleep(seconds)
        after = await self._read()
        elapsed = max(after.at - before.at, 1e-9)
        return {name: round(max(s, 0.0) / elapsed, 6) for name, s in _used(before, after).items()}

    async def per_call(self, before: CpuSnapshot, calls: int) -> dict[str, float]:
        """CPU ms per completed call since `before`, by process, with a total."""
        after = await self._read()
        if self.profiler is not None:
            # py-spy writes its file as it stops: not on the event loop.
            await asyncio.to_thread(self.profiler.stop)
        used = _used(before, after)
        per = max(calls, 1)
        out = {name: round(1000.0 * max(seconds, 0.0) / per, 3) for name, seconds in used.items()}
        out["total"] = round(sum(out.values()), 3)
        return out


def _used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds by process (PostgreSQL backends, Redis and the load
    generator as one entry each) between two readings."""
    used = {name: t - before.processes.get(name, 0.0) for name, t in after.processes.items()}
    # A backend opened during the run counts from zero; one closed during
    # the run is lost (pools keep theirs open, so this is rare).
    if after.backends is not None and before.backends is not None:
        used[POSTGRES] = sum(t - before.backends.get(pid, 0.0) for pid, t in after.backends.items())
    if after.redis is not None and before.redis is not None:
        used[REDIS] = after.redis - before.redis
    used[LOAD_GENERATOR] = after.load_generator - before.load_generator
    return used


def cpu_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Rows of (run name, ms per call by process) as a text table; only the
    processes that did measurable work in some run get a column."""
    if not rows:
        return ""
    names: list[str] = []
    for _, cpu in rows:
        for name, ms in cpu.items():
            if name != "total" and ms >= 0.01 and name not in names:
                names.append(name)
    names.append("total")
    widths = [max(7, len(n)) for n in names]
    head = f"{'CPU ms per call':34}" + "".join(
        f" {n:>{w}}" for n, w in zip(names, widths, strict=True)
    )
    lines = [head, "-" * len(head)]
    for run_name, cpu in rows:
        lines.append(
            f"{run_name[:34]:34}"
            + "".join(f" {cpu.get(n, 0.0):>{w}.3f}" for n, w in zip(names, widths, strict=True))
        )
    return "\n".join(lines)
