"""`python -m bench faults` (or `make faults`): the platform under steady POS
checkout load while its parts are killed and restarted, checked with SQL after
every fault (docs/operations.md, "Fault suite").

1. Starts its own PostgreSQL (embedded pgserver, under .data/faults, fresh
   each run) and its own Redis (a `redis-server` on a free loopback port,
   without persistence, like a default deployment: a restart comes back
   empty), migrates, seeds, registers a POS key, then the five services and
   the gateway as real processes (devtools/supervisor.py), each on a free port.
2. Drives CompleteOrder at --rate per second through the gateway with a
   retrying client: UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are
   retried with the same pos_transaction_id (as a till does) until they
   succeed; any other status is final and counted.
3. Injects, one after the other: kill -9 of each service and of the gateway
   (then a restart); tiering stopped (SIGSTOP) so its consumer lags, then
   Redis stopped for --redis-outage seconds and restarted empty, then tiering
   resumed; PostgreSQL restarted (pg_ctl restart -m fast); SIGTERM to the
   gateway during a burst of --burst calls (then a restart).
4. After each: every acknowledged order exists exactly once in rewards; the
   ledger audit passes (`python -m services.rewards audit`); tiering's and
   engagement's per-member order counts (and tiering's spend) count every
   order rewards had settled a look earlier and none it has not settled now
   (`projection_gaps`: the load goes on, so some order is always on its way;
   waited for, up to --settle-timeout: what is still missing then counts as
   lost); no dead-lettered event; every process ready again.
5. Prints a table (attempts and their error rate while the fault lasted,
   CANCELLED and INTERNAL answers, seconds to recovery, the checks) and
   writes JSON to bench/results/; --write-docs replaces the table in
   docs/operations.md.

Only loopback addresses; it stops only the processes it started, by pid.
`--quick` is the reduced run the test suite uses (tests/faults/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from devtools import devrun, embedded, supervisor
from servicekit.db import asyncpg_dsn

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DATA = embedded.DATA_DIR / "faults"
DOC = ROOT / "docs" / "operations.md"
DOC_BEGIN = "<!-- fault-suite:begin -->"
DOC_END = "<!-- fault-suite:end -->"
STORE = devrun.DEMO_STORE
PAID_FEN = 1800
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})
CALL_TIMEOUT = 3.0
# A till gives up on an order after this long (the order is then "not acknowledged").
GIVE_UP_SECONDS = 90.0
UNLIMITED_RATE = 1_000_000.0


def say(message: str) -> None:
    print(f"faults | {message}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=20.0, help="orders per second (default 20)")
    p.add_argument("--members", type=int, default=40, help="members the orders spread over")
    p.add_argument("--redis-outage", type=float, default=15.0, help="seconds Redis is down")
    p.add_argument("--lag", type=float, default=10.0, help="seconds tiering is stopped before")
    p.add_argument("--burst", type=int, default=150, help="calls in flight at the gateway SIGTERM")
    p.add_argument("--settle-timeout", type=float, default=90.0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced run: kill -9 rewards, the Redis wipe with a lagging consumer (5 s),"
        " a PostgreSQL restart and the SIGTERM burst (60 calls)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest run (the test suite's): the Redis wipe with a lagging consumer (3 s),"
        " a PostgreSQL restart and the SIGTERM burst (60 calls), no kills",
    )
    p.add_argument("--data-dir", type=Path, default=DATA, help="where PostgreSQL and logs live")
    p.add_argument("--write-docs", action="store_true", help="put the table in docs/operations.md")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    return p.parse_args(argv)


# ------------------------------------------------------------------ infrastructure


def without_faketime(env: Mapping[str, str]) -> dict[str, str]:
    """redis-server cannot run under libfaketime (the test suite may run under
    `faketime '+365d'`): it fails on its own clock calls."""
    return {k: v for k, v in env.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")}


class OwnRedis:
    """A redis-server this run started on a free loopback port, without
    persistence: a restart comes back empty, as the issue's deployment did."""

    def __init__(self, workdir: Path) -> None:
        self.port = supervisor.free_port()
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://{supervisor.LOOPBACK}:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise supervisor.DevrunError("the fault suite needs redis-server on PATH")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            *(binary, "--bind", supervisor.LOOPBACK, "--port", str(self.port), "--save", ""),
            *("--appendonly", "no", "--dir", str(self.workdir)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=without_faketime(os.environ),
        )
        from redis.asyncio import Redis

        client = Redis.from_url(self.url)
        try:
            for _ in range(250):
                with contextlib.suppress(Exception):
                    await client.ping()
                    return
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        raise supervisor.DevrunError("redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()  # by pid: only the server this run started
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None


class OwnPostgres:
    """Embedded PostgreSQL (pgserver) under .data/faults/pg, fresh each run."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: Any = None
        self.url = ""

    def start(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.url, self.server = embedded.start_postgres(self.data_dir)

    def restart(self) -> None:
        """pg_ctl restart -m fast: every connection is closed by the server."""
        self.pg_ctl("restart")

    def pg_ctl(self, action: str) -> None:
        from pgserver import _commands

        # pgserver's own pg_ctl (made at import), run as the user it runs postgres as.
        pg_ctl = _commands.__dict__["pg_ctl"]
        pg_ctl(
            ["-w", "-m", "fast", action],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=60,
        )

    def stop(self) -> None:
        if self.server is not None:
            # pg_ctl itself: pgserver's cleanup stops only the postmaster it
            # started, and a restart replaced it.
            with contextlib.suppress(Exception):
                self.pg_ctl("stop")
            with contextlib.suppress(Exception):
                self.server.cleanup()
            self.server = None


# ------------------------------------------------------------------------- load


@dataclass
class Attempt:
    at: float
    code: str  # OK or a gRPC status name
    txn: str
    burst: bool = False


@dataclass
class Load:
    """Orders on a fixed schedule; each retried until acknowledged or final."""

    stub: Any
    members: list[str]
    rate: float
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    attempts: list[Attempt] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)  # txn -> member
    final_failures: Counter[str] = field(default_factory=Counter)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _n: int = 0

    def _request(self, txn: str, member: str) -> Any:
        from loyalty.common.v1 import common_pb2
        from loyalty.pos.v1 import pos_pb2

        return pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=txn,
            member_id=member,
            paid_amount_fen=PAID_FEN,
            gross_amount_fen=PAID_FEN,
            lines=[
                pos_pb2.OrderLine(
                    sku="MT-001",
                    name="Jasmine milk tea",
                    category="milk_tea",
                    quantity=1,
                    paid_amount_fen=PAID_FEN,
                )
            ],
            channel=common_pb2.CHANNEL_STORE,
        )

    async def order(self, burst: bool = False) -> None:
        self._n += 1
        txn = f"F{self.tag}-{self._n}"
        member = self.members[self._n % len(self.members)]
        request = self._request(txn, member)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + GIVE_UP_SECONDS
        backoff = 0.1
        while True:
            try:
                await self.stub.CompleteOrder(request, timeout=CALL_TIMEOUT)
                self.attempts.append(Attempt(loop.time(), "OK", txn, burst))
                self.acked[txn] = member
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                self.attempts.append(Attempt(loop.time(), code, txn, burst))
                if code not in RETRYABLE or loop.time() > give_up:
                    self.final_failures[code] += 1
                    return
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)

    def spawn(self, burst: bool = False) -> None:
        task = asyncio.create_task(self.order(burst))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        i = 0
        while not stop.is_set():
            due = start + i / self.rate
            delay = due - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            self.spawn()
            i += 1

    async def settle(self) -> None:
        """Wait for every order in progress to be acknowledged or given up."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))


# ----------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Figures:
    """A member's orders as one side counts them: how many, and the paid sum
    (None where the side keeps no sum: engagement)."""

    orders: int
    paid: int | None


@dataclass(frozen=True)
class ProjectionGaps:
    tiering: int  # members whose tiering figures are out of bounds
    engagement: int  # members whose engagement count is out of bounds
    lost: int  # orders settled by `before` that a projection does not count

    @property
    def equal(self) -> bool:
        return self.tiering == self.engagement == 0


def projection_gaps(
    before: Mapping[str, Figures],
    now: Mapping[str, Figures],
    tiering: Mapping[str, Figures],
    engagement: Mapping[str, Figures],
) -> ProjectionGaps:
    """Compare the projections, read at one instant, with rewards' settled
    orders at an earlier look (`before`: each of them must be counted by now)
    and at that same instant (`now`: nothing may be counted beyond it).

    Under steady load an order is nearly always between rewards' commit and
    the projections' (relay, consumer read and linger, the consumer's commit:
    ~50 ms), so "equal at one instant" never holds when orders come closer
    together than that (20/s: every 50 ms). A lost event stays below
    `before`; an event counted twice goes above `now`. With no load, before
    equals now and the check is exact equality."""
    zero = Figures(0, 0)
    off_tiering = off_engagement = lost = 0
    for member, high in now.items():
        low = before.get(member, zero)
        t = tiering.get(member, zero)
        e = engagement.get(member, zero)
        if not (
            low.orders <= t.orders <= high.orders
            and (low.paid or 0) <= (t.paid or 0) <= (high.paid or 0)
        ):
            off_tiering += 1
        if not low.orders <= e.orders <= high.orders:
            off_engagement += 1
        lost += max(0, low.orders - t.orders) + max(0, low.orders - e.orders)
    return ProjectionGaps(off_tiering, off_engagement, lost)


@dataclass
class Checks:
    acked: int = 0
    acked_missing: int = 0
    audit_ok: bool = False
    tiering_mismatches: int = 0
    engagement_mismatches: int = 0
    lost_events: int = 0
    dead_letters: int = 0
    ready: bool = False
    settle_seconds: float = 0.0
    # Diagnostics of the settle loop: how many times it looked, and how often
    # the projections equalled rewards' orders of that same instant (under
    # load, rarely: an order is almost always on its way).
    samples: int = 0
    samples_exactly_equal: int = 0

    @property
    def passed(self) -> bool:
        return (
            self.acked_missing == 0
            and self.audit_ok
            and self.tiering_mismatches == 0
            and self.engagement_mismatches == 0
            and self.dead_letters == 0
            and self.ready
        )


@dataclass
class FaultResult:
    fault: str
    orders: int  # orders with an attempt while the fault lasted
    orders_retried: int  # of which at least one attempt failed
    attempts: int
    failed: int
    error_rate: float
    codes: dict[str, int]
    cancelled: int
    internal: int
    recovery_seconds: float
    checks: Checks


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pg = OwnPostgres(args.data_dir / "pg")
        self.redis = OwnRedis(args.data_dir / "redis")
        self.namespace = f"faults-{uuid.uuid4().hex[:8]}"
        self.ports = supervisor.free_ports()
        self.platform: supervisor.Platform | None = None
        self.children: dict[str, supervisor.Child] = {}
        self.results: list[FaultResult] = []
        self.log_dir = args.data_dir / "logs"

    def env(self) -> dict[str, str]:
        return supervisor.child_env(
            os.environ,
            DATABASE_URL=self.pg.url,
            REDIS_URL=self.redis.url,
            REDIS_NAMESPACE=self.namespace,
            STORE_RATE_PER_SECOND=str(UNLIMITED_RATE),
            STORE_BURST=str(int(UNLIMITED_RATE)),
            SHUTDOWN_DELAY_SECONDS="0",
            SHUTDOWN_GRACE_SECONDS="10",
            EVENT_GAP_GRACE_SECONDS="2",
            LOG_JSON="true",
        )

    # ---- platform

    async def start(self) -> str:
        say(
            f"starting PostgreSQL (embedded, {DATA / 'pg'}) and redis-server on port {self.redis.port}"
        )
        await asyncio.to_thread(self.pg.start)
        await self.redis.start()
        await asyncio.to_thread(devrun.migrate, self.pg.url)
        await devrun.seed(self.pg.url)
        api_key = await self._pos_key()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        children = supervisor.platform_children(self.ports, self.env())
        self.children = {c.name: c for c in children}
        self.platform = supervisor.Platform(children, log_dir=self.log_dir)
        await self.platform.spawn()
        took = await self.platform.wait_ready(120)
        say(f"platform ready in {took:.1f}s (logs: {self.log_dir})")
        return api_key

    async def _pos_key(self) -> str:
        from gateway.auth.admin import ClientAdmin
        from gateway.auth.crypto import SecretBox
        from gateway.auth.model import ClientKind
        from gateway.settings import GatewaySettings
        from servicekit.db import create_pool
        from servicekit.redis_client import create_redis

        pool = await create_pool(self.pg.url, min_size=1, max_size=1)
        redis = create_redis(self.redis.url)
        try:
            issued = await ClientAdmin(
                pool, redis, SecretBox(GatewaySettings().auth_secret_key), self.namespace
            ).create(
                ClientKind.POS,
                f"fault suite till {STORE}",
                store_id=STORE,
                rate_per_second=UNLIMITED_RATE,
                burst=int(UNLIMITED_RATE),
            )
        finally:
            await redis.aclose()
            await pool.close()
        return issued.api_key

    async def respawn(self, name: str) -> None:
        child = self.children[name]
        if child.log_file is not None:
            child.log_file.close()
        await supervisor.Platform([child], log_dir=self.log_dir).spawn()

    def signal_child(self, name: str, sig: int) -> None:
        proc = self.children[name].proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)  # by pid: a process this run started

    async def wait_exit(self, name: str) -> None:
        proc = self.children[name].proc
        assert proc is not None
        await proc.wait()

    async def all_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = await asyncio.gather(
                *(supervisor.child_ready(c) for c in self.children.values())
            )
            if all(ready):
                return True
            await asyncio.sleep(0.3)
        return False

    async def stop(self) -> None:
        if self.platform is not None:
            # Resume a child left stopped by a failed run before signalling it.
            for name in self.children:
                with contextlib.suppress(Exception):
                    self.signal_child(name, signal.SIGCONT)
            await self.platform.stop()
        await self.redis.stop()
        await asyncio.to_thread(self.pg.stop)

    # ---- checks

    async def check(self, load: Load) -> Checks:
        acked = list(load.acked)  # a snapshot: orders keep being acknowledged meanwhile
        checks = Checks(acked=len(acked))
        checks.ready = await self.all_ready()
        conn = await asyncpg.connect(asyncpg_dsn(self.pg.url))
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM rewards.orders WHERE store_id = $1"
                " AND pos_transaction_id = ANY($2::text[])",
                STORE,
                acked,
            )
            checks.acked_missing = len(acked) - int(found)
            started = time.monotonic()
            # The load goes on meanwhile, so the projections are compared with
            # rewards' orders of the previous look (settled at least a second
            # ago: all of them must be there) and of now (nothing beyond).
            before, _, _ = await self._counts(conn)
            while True:
                await asyncio.sleep(1.0)
                settled_now, tiering_seen, engagement_seen = await self._counts(conn)
                gaps = projection_gaps(before, settled_now, tiering_seen, engagement_seen)
                exact = projection_gaps(settled_now, settled_now, tiering_seen, engagement_seen)
                checks.samples += 1
                checks.samples_exactly_equal += exact.equal
                if gaps.equal or time.monotonic() - started > self.args.settle_timeout:
                    break
                before = settled_now
            checks.settle_seconds = round(time.monotonic() - started, 1)
            checks.tiering_mismatches = gaps.tiering
            checks.engagement_mismatches = gaps.engagement
            checks.lost_events = gaps.lost
        finally:
            await conn.close()
        checks.audit_ok = await self._audit()
        checks.dead_letters = await self._dead_letters()
        return checks

    async def _counts(
        self, conn: asyncpg.Connection
    ) -> tuple[dict[str, Figures], dict[str, Figures], dict[str, Figures]]:
        """Per member, in one snapshot: rewards' settled orders (count, paid),
        tiering's member_spend (count, paid), engagement's member_facts (count)."""
        rows = await conn.fetch(
            "SELECT r.member_id, r.n, r.paid,"
            " coalesce(t.order_count, 0) AS t_n, coalesce(t.total_paid_fen, 0) AS t_paid,"
            " coalesce(e.order_count, 0) AS e_n"
            " FROM (SELECT member_id, count(*) AS n, sum(paid_amount_fen) AS paid"
            "       FROM rewards.orders WHERE status = 'settled' GROUP BY member_id) r"
            " LEFT JOIN tiering.member_spend t USING (member_id)"
            " LEFT JOIN engagement.member_facts e USING (member_id)"
        )
        settled: dict[str, Figures] = {}
        tiering: dict[str, Figures] = {}
        engagement: dict[str, Figures] = {}
        for r in rows:
            member = str(r["member_id"])
            settled[member] = Figures(r["n"], r["paid"])
            tiering[member] = Figures(r["t_n"], r["t_paid"])
            engagement[member] = Figures(r["e_n"], None)
        return settled, tiering, engagement

    async def _audit(self) -> bool:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.rewards",
            "audit",
            cwd=ROOT,
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            say(f"audit failed: {output.decode(errors='replace')[-2000:]}")
        return proc.returncode == 0

    async def _dead_letters(self) -> int:
        from redis.asyncio import Redis

        client = Redis.from_url(self.redis.url)
        try:
            total = 0
            async for key in client.scan_iter(match=f"{{{self.namespace}:events:*}}:dlq:*"):
                total += int(await client.xlen(key))
            return total
        finally:
            await client.aclose()

    # ---- faults

    async def phase(
        self, load: Load, name: str, inject: Callable[[], Awaitable[float]]
    ) -> FaultResult:
        """Run `inject` under load; it returns the loop time the fault was repaired."""
        loop = asyncio.get_running_loop()
        say(f"fault: {name}")
        await asyncio.sleep(2.0)  # steady load first
        began = loop.time()
        first = len(load.attempts)
        repaired = await inject()
        await asyncio.sleep(3.0)  # load after the repair
        window = [a for a in load.attempts[first:] if a.at >= began]
        failed = [a for a in window if a.code != "OK"]
        last_failure = max((a.at for a in failed), default=repaired)
        codes = Counter(a.code for a in window)
        checks = await self.check(load)
        result = FaultResult(
            fault=name,
            orders=len({a.txn for a in window}),
            orders_retried=len({a.txn for a in failed}),
            attempts=len(window),
            failed=len(failed),
            error_rate=round(len(failed) / len(window), 4) if window else 0.0,
            codes=dict(codes),
            cancelled=codes.get("CANCELLED", 0),
            internal=codes.get("INTERNAL", 0),
            recovery_seconds=round(max(0.0, last_failure - repaired), 2),
            checks=checks,
        )
        say(
            f"  {result.attempts} attempts, {result.failed} failed {dict(codes)};"
            f" recovered {result.recovery_seconds}s after the repair;"
            f" checks {'pass' if checks.passed else 'FAIL'} {asdict(checks)}"
        )
        self.results.append(result)
        return result

    def kill9(self, name: str) -> Callable[[], Awaitable[float]]:
        async def inject() -> float:
            self.signal_child(name, signal.SIGKILL)
            await self.wait_exit(name)
            await asyncio.sleep(1.0)
            await self.respawn(name)
            await self.all_ready(60)
            return asyncio.get_running_loop().time()

        return inject

    def redis_wipe_with_lag(self) -> Callable[[], Awaitable[float]]:
        async def inject() -> float:
            self.signal_child("tiering", signal.SIGSTOP)  # its consumer lags
            await asyncio.sleep(self.args.lag)
            await self.redis.stop()
            await asyncio.sleep(self.args.redis_outage)
            await self.redis.start()  # empty: no persistence
            self.signal_child("tiering", signal.SIGCONT)
            return asyncio.get_running_loop().time()

        return inject

    def postgres_restart(self) -> Callable[[], Awaitable[float]]:
        async def inject() -> float:
            await asyncio.to_thread(self.pg.restart)
            return asyncio.get_running_loop().time()

        return inject

    def sigterm_burst(self, load: Load) -> Callable[[], Awaitable[float]]:
        async def inject() -> float:
            for _ in range(self.args.burst):
                load.spawn(burst=True)
            await asyncio.sleep(0.05)  # the burst is in flight
            self.signal_child("gateway", signal.SIGTERM)
            await self.wait_exit("gateway")
            await self.respawn("gateway")
            await self.all_ready(60)
            return asyncio.get_running_loop().time()

        return inject


def table(results: list[FaultResult]) -> str:
    head = (
        "| fault | orders during | retried | attempts | failed | error rate | CANCELLED | INTERNAL"
        " | recovery s | acked orders missing | lost events | audit | projections"
        " | dead letters | ready |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|"
    )
    rows = [head]
    for r in results:
        c = r.checks
        projections = (
            "equal"
            if c.tiering_mismatches == c.engagement_mismatches == 0
            else f"{c.tiering_mismatches} tiering / {c.engagement_mismatches} engagement members differ"
        )
        rows.append(
            f"| {r.fault} | {r.orders} | {r.orders_retried} | {r.attempts} | {r.failed} | {r.error_rate:.1%} | {r.cancelled}"
            f" | {r.internal} | {r.recovery_seconds} | {c.acked_missing} | {c.lost_events}"
            f" | {'pass' if c.audit_ok else 'FAIL'} | {projections} | {c.dead_letters}"
            f" | {'yes' if c.ready else 'NO'} |"
        )
    return "\n".join(rows)


def write_docs(text: str) -> None:
    doc = DOC.read_text()
    if DOC_BEGIN not in doc or DOC_END not in doc:
        raise supervisor.DevrunError(f"{DOC} has no {DOC_BEGIN} ... {DOC_END} section")
    before, rest = doc.split(DOC_BEGIN, 1)
    _, after = rest.split(DOC_END, 1)
    DOC.write_text(f"{before}{DOC_BEGIN}\n{text}\n{DOC_END}{after}")


@contextlib.asynccontextmanager
async def running_load(load: Load) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task
        await load.settle()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.redis_outage, args.lag, args.burst = 5.0, 4.0, 60
    if args.smoke:
        args.redis_outage, args.lag, args.burst = 3.0, 3.0, 60
    suite = Suite(args)
    from bench.cli import identify_pool, pos_channel

    try:
        api_key = await suite.start()
        pos_target = f"{supervisor.LOOPBACK}:{suite.ports['pos']}"
        members = await identify_pool(pos_target, STORE, args.members, api_key)
        async with pos_channel(pos_target, STORE, api_key) as channel:
            from loyalty.pos.v1 import pos_pb2_grpc

            load = Load(pos_pb2_grpc.PosServiceStub(channel), members, args.rate)
            async with running_load(load):
                kills = (
                    []
                    if args.smoke
                    else ["rewards"]
                    if args.quick
                    else [*supervisor.SERVICES, "gateway"]
                )
                for name in kills:
                    await suite.phase(load, f"kill -9 {name}", suite.kill9(name))
                await suite.phase(
                    load,
                    f"Redis down {args.redis_outage:g}s, restarted empty,"
                    f" tiering lagging {args.lag:g}s",
                    suite.redis_wipe_with_lag(),
                )
                await suite.phase(load, "PostgreSQL restart (fast)", suite.postgres_restart())
                await suite.phase(
                    load,
                    f"gateway SIGTERM during a burst of {args.burst}",
                    suite.sigterm_burst(load),
                )
            final = await suite.check(load)
    finally:
        await suite.stop()
    burst_codes = Counter(a.code for a in load.attempts if a.burst)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "orders_acknowledged": len(load.acked),
        "final_failures": dict(load.final_failures),
        "burst_codes": dict(burst_codes),
        "final_checks": asdict(final),
        "faults": [asdict(r) for r in suite.results],
        "table": table(suite.results),
        "passed": final.passed and all(r.checks.passed for r in suite.results),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    report = asyncio.run(run(args))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = args.json or RESULTS_DIR / f"faults-{report['when'].replace(':', '')}.json"
    path.write_text(json.dumps(report, indent=2))
    print()
    print(report["table"])
    print()
    say(f"orders acknowledged {report['orders_acknowledged']}, given up {report['final_failures']}")
    say(f"results: {path}")
    if args.write_docs:
        write_docs(report["table"])
        say(f"table written to {DOC}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
