"""Batch recompute of tiers, RFM segments and lifecycle stages for every member.

Set-based and chunked (docs/tiers.md, "Batch recompute"). The members are cut
into key ranges of `chunk_size` (one pass over the primary key); `workers`
connections (2: one per core) take the ranges side by side, in two passes:

1. Aggregate: per range, one GROUP BY over the range's orders, read from the
   covering index in member order, fills the UNLOGGED work table with each
   member's tier metric and R/F/M inputs; then the quintile cut points and the
   relative tiers' rank bounds over it (the two side by side).
2. Evaluate: per range, one short transaction, so no lock is held for long and
   checkout traffic interleaves:
   - tiers: only members with something due (a period end, a grace end, an
     override expiry, a new programme version, or a metric above their tier)
     are evaluated, by the same `evaluation.advance` the event path uses, with
     the metric at their period end aggregated in SQL for the whole chunk at
     once; their TierChanged events and history rows go with them;
   - segments and stages: one statement computes them, UPDATEs only the rows
     whose result differs (IS DISTINCT FROM) and writes SegmentChanged /
     LifecycleStageChanged for those rows to the outbox (envelopes built in
     SQL, outbox_sql.py). A member's first classification is not an event
     (MemberRegistered already starts journeys).
3. A distribution report row (members per tier, segment, group, stage).

One run at a time (an advisory lock); a rerun with nothing new writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from loyalty.events.v1 import events_pb2
from servicekit.db import Database, session_state_changed
from servicekit.events import make_envelope

from . import outbox_sql, reports
from . import repository as repo
from .benefits import insert_grants, upgrade_gift_rows
from .domain import DEFAULT_RULES, QualifyingMetric, TierMode, TierProgramme
from .evaluation import (
    Change,
    Evaluation,
    TierState,
    add_months,
    advance,
    advance_versions,
    assign_relative,
    facts_for,
    in_force,
    replay,
    window_start,
)
from .handlers import DEFAULT_PROGRAMME_ID, tier_changed
from .repository import MEMBER_STORE_SQL
from .segments import LAPSED, PROSPECT, segment_sql, stage_sql

log = logging.getLogger(__name__)

Progress = Callable[[int, int, "RunResult"], None]
MIN_UUID = uuid.UUID(int=0)
MAX_UUID = uuid.UUID(int=2**128 - 1)
# Session setting of the batch connections only.
WORK_MEM = "256MB"
# The run's per-member aggregates (migration 0005: UNLOGGED, no WAL; a regular
# table so that every worker connection sees it).
WORK = "tiering.recompute_work"
# Attempts of a chunk's transaction that a deadlock aborted.
CHUNK_ATTEMPTS = 5
# pg_advisory_lock key held by a running recompute (one run at a time).
LOCK_KEY = 0x7469_6572_0001  # "tier" 1


@dataclass
class RunResult:
    run_id: int = 0
    members: int = 0
    tier_changes: int = 0
    segment_changes: int = 0
    stage_changes: int = 0
    chunks: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    distribution: dict[str, dict[str, int]] = field(default_factory=dict)


class _Outbox:
    """Events of one chunk, written with the chunk's transaction.

    A period end writes an event for most members (~1M at 1M members), so the
    per-event cost matters: the envelope is made once per chunk by
    servicekit's make_envelope (producer, one instant and one trace context:
    one transaction) and only the id, member and payload change per event
    (measured ~50 -> ~10 us an event)."""

    def __init__(self) -> None:
        self.rows: list[tuple[uuid.UUID, str, bytes]] = []
        self._envelope = make_envelope("tiering", events_pb2.TierChanged())
        # Event ids need uniqueness, not secrecy: a PRNG seeded from the OS,
        # ~5x cheaper than uuid4's os.urandom per id.
        self._random = random.Random()

    def add(self, payload: Any, member_id: str) -> None:
        event_id = uuid.UUID(int=self._random.getrandbits(128), version=4)
        envelope = self._envelope
        envelope.event_id = str(event_id)
        envelope.event_type = payload.DESCRIPTOR.full_name
        envelope.member_id = member_id
        envelope.payload.Pack(payload)
        self.rows.append((event_id, envelope.event_type, envelope.SerializeToString()))

    async def flush(self, conn: asyncpg.Connection) -> None:
        if self.rows:
            await conn.copy_records_to_table(
                "outbox",
                schema_name="tiering",
                columns=["event_id", "event_type", "envelope"],
                records=self.rows,
            )
            self.rows = []


async def recompute(
    db: Database,
    now: datetime | None = None,
    chunk_size: int = 50_000,
    progress: Progress | None = None,
    pause: float = 0.0,
    workers: int = 2,
    programme_id: str = DEFAULT_PROGRAMME_ID,
    switch_programme: bool = False,
) -> RunResult:
    """`workers` connections take chunks side by side (2: one per core here;
    capped by the pool's size). `pause` seconds between chunks (after each
    commit, per worker) leaves the database to checkout traffic when the
    recompute competes with it (slower, gentler). Only rows of `programme_id`
    (the brand's) are evaluated; with `switch_programme`, rows decided under
    another programme are judged afresh from their facts under this one (run
    once after the brand switched programmes)."""
    if chunk_size < 1 or workers < 1 or pause < 0:
        raise ValueError("chunk_size and workers must be at least 1, pause not negative")
    now = now or datetime.now(UTC)
    started = time.perf_counter()
    result = RunResult()
    workers = min(workers, db.pool.get_max_size())
    async with db.pool.acquire() as conn, contextlib.AsyncExitStack() as stack:
        # One run at a time: two would both see a row as changed and both emit its event.
        # A session lock and session settings: the pool resets these connections on release.
        session_state_changed(conn)
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            raise RecomputeBusy(
                "another tiering recompute is running (it holds advisory lock"
                f" {LOCK_KEY}); wait for it to finish"
            )
        stack.push_async_callback(_quietly, conn, "SELECT pg_advisory_unlock($1)", LOCK_KEY)
        conns = [conn]
        for _ in range(workers - 1):
            conns.append(await stack.enter_async_context(db.pool.acquire()))
        for c in conns:
            session_state_changed(c)
            await _batch_session(c)
            stack.push_async_callback(
                _quietly, c, "RESET work_mem; RESET jit; RESET plan_cache_mode"
            )
        # The work table holds member ids: emptied when the run ends, as it starts.
        stack.push_async_callback(_quietly, conn, f"TRUNCATE {WORK}")
        result.run_id = await conn.fetchval(
            "INSERT INTO tiering.recompute_runs (as_of, started_at) VALUES ($1, now())"
            " RETURNING run_id",
            now,
        )
        # The brand's programme (TIERING_PROGRAMME_ID): only its members' rows
        # are evaluated; earlier versions decide the periods they were in force.
        versions = await repo.programme_versions(conn, programme_id, now)
        programme = in_force(versions, now) if versions else None
        rules = programme.rules if programme else DEFAULT_RULES
        tick = time.perf_counter()
        total, chunks = await _chunks(conn, chunk_size)
        result.phases["chunks"] = time.perf_counter() - tick

        tick = time.perf_counter()
        await conn.execute(f"TRUNCATE {WORK}")
        aggregate = _aggregate_sql(programme, rules.segments.rfm_window_months, now)
        added = 0

        async def aggregate_chunk(c: asyncpg.Connection, lo: uuid.UUID, hi: uuid.UUID) -> None:
            nonlocal added
            # Everyone tiering knows gets a profile row (ordered, or tiered):
            # per range, a small anti-join (one over the whole tables hashed a
            # million keys per source: ~5 s at 1M members on a loaded machine).
            for source in ("tiering.member_spend", "tiering.member_tiers"):
                status = await c.execute(
                    "INSERT INTO tiering.member_profiles (member_id) SELECT s.member_id"
                    f" FROM {source} s WHERE s.member_id > $1 AND s.member_id <= $2"
                    " AND NOT EXISTS (SELECT 1 FROM tiering.member_profiles p"
                    " WHERE p.member_id = s.member_id AND p.member_id > $1"
                    " AND p.member_id <= $2) AND NOT EXISTS (SELECT 1 FROM"
                    " tiering.erased_members e WHERE e.member_id = s.member_id)"
                    " ON CONFLICT DO NOTHING",
                    lo,
                    hi,
                )
                added += int(status.rsplit(" ", 1)[1])
            for sql, args in aggregate:
                await c.execute(sql, lo, hi, *args)

        await _in_parallel(conns, chunks, aggregate_chunk)
        if added:
            # New profiles (a first run, an import): cut the chunks again so no
            # transaction of the evaluate pass grows past --chunk-size. The work
            # table is keyed by member, not by chunk.
            total, chunks = await _chunks(conn, chunk_size)
        await conn.execute(f"ANALYZE {WORK}")
        active = await conn.fetchval(f"SELECT count(*) FROM {WORK} WHERE orders > 0")
        top = math.ceil(active * rules.segments.relative_top_pct / 100)
        second = math.ceil(
            active * (rules.segments.relative_top_pct + rules.segments.relative_next_pct) / 100
        )
        if len(conns) > 1:  # the two sorts side by side
            cuts, ranks = await asyncio.gather(_cuts(conns[0]), _rank_bounds(conns[1], top, second))
        else:
            cuts, ranks = await _cuts(conn), await _rank_bounds(conn, top, second)
        relative = (
            await _relative_bounds(conn, programme)
            if programme is not None and programme.rules.tier_mode is TierMode.RELATIVE
            else None
        )
        result.phases["aggregate"] = time.perf_counter() - tick

        profile_sql = _profile_update_sql(programme, rules.segments, top, second)
        kinds = (
            outbox_sql.change_kind(events_pb2.SegmentChanged, now),
            outbox_sql.change_kind(events_pb2.LifecycleStageChanged, now),
        )
        profile_args = (now, cuts["r"], cuts["f"], cuts["m"], *ranks)
        kind_args = _kind_args(kinds)
        phase = {"tiers": 0.0, "segments_stages": 0.0}
        # Members per chunk, for the progress bar (the last chunk has the rest).
        sizes = {hi: chunk_size for _, hi in chunks}
        sizes[MAX_UUID] = total - chunk_size * (len(chunks) - 1)
        done = 0

        async def evaluate_chunk(c: asyncpg.Connection, lo: uuid.UUID, hi: uuid.UUID) -> None:
            nonlocal done
            for attempt in itertools.count(1):
                try:
                    async with c.transaction():
                        t0 = time.perf_counter()
                        moved = 0
                        if programme is not None:
                            outbox = _Outbox()
                            moved = await _tiers_chunk(
                                c, versions, lo, hi, now, outbox, relative, switch_programme
                            )
                            await outbox.flush(c)
                        t1 = time.perf_counter()
                        counts = await c.fetchrow(
                            profile_sql, lo, hi, *profile_args, outbox_sql.id_prefix(), *kind_args
                        )
                        phase["tiers"] += t1 - t0
                        phase["segments_stages"] += time.perf_counter() - t1
                    break
                except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as e:
                    # The event consumers lock several members per transaction in
                    # event order; a cycle with this chunk's row locks aborts one of
                    # the two. The chunk's transaction is all or nothing, so it is
                    # simply run again.
                    if attempt >= CHUNK_ATTEMPTS:
                        raise
                    log.warning("chunk (%s, %s] attempt %d: %s; retrying", lo, hi, attempt, e)
                    await asyncio.sleep(0.05 * attempt)
            # Counted once committed (a retried attempt's counts were rolled back).
            result.tier_changes += moved
            result.segment_changes += counts["segments"]
            result.stage_changes += counts["stages"]
            result.chunks += 1
            done += sizes[hi]
            if progress:
                progress(done, total, result)
            db.outbox_wakeup.set()
            if pause > 0:
                await asyncio.sleep(pause)

        tick = time.perf_counter()
        await _in_parallel(conns, chunks, evaluate_chunk)
        result.phases["chunks_wall"] = time.perf_counter() - tick
        # Summed over the workers' transactions (more than the wall time when parallel).
        result.phases.update(phase)
        tick = time.perf_counter()
        result.members = total
        result.distribution = await reports.distribution(conn)
        result.phases["report"] = time.perf_counter() - tick
        await conn.execute(
            "UPDATE tiering.recompute_runs SET finished_at = now(), members = $2,"
            " tier_changes = $3, segment_changes = $4, stage_changes = $5,"
            " distribution = $6::jsonb WHERE run_id = $1",
            result.run_id,
            total,
            result.tier_changes,
            result.segment_changes,
            result.stage_changes,
            json.dumps(result.distribution, ensure_ascii=False),
        )
    result.seconds = time.perf_counter() - started
    return result


async def _quietly(conn: asyncpg.Connection, sql: str, *args: Any) -> None:
    """A clean-up statement that must not hide the error that ended the run (a
    connection a failure left busy or broken is reset by the pool on release,
    which also drops session settings and advisory locks)."""
    try:
        await conn.execute(sql, *args)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
        log.warning("recompute clean-up %r failed: %s", sql, e)


class RecomputeBusy(RuntimeError):
    """Another recompute holds the run lock."""


async def _batch_session(conn: asyncpg.Connection) -> None:
    """A batch connection: enough memory to hash a chunk's groups without
    spilling; no JIT (compiling the chunk statements cost more than running
    them: measured 3 s of 5 s per chunk); plans made for each chunk's actual
    range (a generic plan for a prepared statement cannot see how narrow the
    range is and may scan whole tables; planning costs ~1 ms a chunk)."""
    await conn.execute(
        f"SET work_mem = '{WORK_MEM}'; SET jit = off; SET plan_cache_mode = force_custom_plan"
    )


async def _chunks(
    conn: asyncpg.Connection, chunk_size: int
) -> tuple[int, list[tuple[uuid.UUID, uuid.UUID]]]:
    """The members and the chunks' (lo, hi] member_id ranges, each holding
    `chunk_size` members (the last what is left), the last open-ended so every
    order falls in one. One pass over the primary key."""
    total = await conn.fetchval("SELECT count(*) FROM tiering.member_profiles")
    bounds = [
        r["member_id"]
        for r in await conn.fetch(
            "SELECT member_id FROM (SELECT member_id, row_number() OVER (ORDER BY member_id)"
            " AS n FROM tiering.member_profiles) s WHERE n % $1 = 0 AND n < $2 ORDER BY n",
            chunk_size,
            total,
        )
    ]
    edges = [MIN_UUID, *bounds, MAX_UUID]
    return total, list(itertools.pairwise(edges))


async def _in_parallel(
    conns: list[asyncpg.Connection],
    chunks: list[tuple[uuid.UUID, uuid.UUID]],
    work: Callable[[asyncpg.Connection, uuid.UUID, uuid.UUID], Awaitable[None]],
) -> None:
    """Each connection takes the next chunk when it is done with its last (chunks
    are disjoint key ranges: no two transactions touch one row); the first
    failure cancels the others."""
    queue = iter(chunks)

    async def worker(conn: asyncpg.Connection) -> None:
        for lo, hi in queue:
            await work(conn, lo, hi)

    try:
        async with asyncio.TaskGroup() as group:
            for conn in conns:
                group.create_task(worker(conn))
    except ExceptionGroup as failed:
        # The first failure itself (the others were cancelled because of it).
        raise failed.exceptions[0] from None


# ---- RFM --------------------------------------------------------------------------------


def _aggregate_sql(
    programme: TierProgramme | None, months: int, now: datetime
) -> list[tuple[str, tuple[Any, ...]]]:
    """Statements filling the work table for one chunk ($1, $2: the member_id
    range): each member's tier metric over the programme's window and R/F/M
    inputs over the RFM window, in one pass over the chunk's orders. The range
    is the leading column of ix_orders_member_time_amounts, which carries the
    amounts: an index-only scan in member order, grouped as it streams (no
    hash table, no heap reads), ~5x faster than hashing a scan of the table."""
    rfm_lo = window_start(programme, now, months) if programme else add_months(now, -months)
    tier_lo = window_start(programme, now) if programme else rfm_lo
    metric = programme.qualifying_metric if programme else QualifyingMetric.PAID_SPEND
    live = "refunded_fen < paid_fen"
    if metric is QualifyingMetric.PAID_SPEND:
        tier_agg = "coalesce(sum(paid_fen - refunded_fen) FILTER (WHERE ordered_at > $3), 0)"
    elif metric is QualifyingMetric.ORDER_COUNT:
        tier_agg = f"count(*) FILTER (WHERE ordered_at > $3 AND {live})"
    else:
        tier_agg = "0"  # from the growth ledger below
    statements: list[tuple[str, tuple[Any, ...]]] = [
        (
            f"INSERT INTO {WORK} (member_id, metric, last_at, orders, spend)"
            f" SELECT member_id, {tier_agg},"
            f" max(ordered_at) FILTER (WHERE ordered_at > $4 AND {live}),"
            f" count(*) FILTER (WHERE ordered_at > $4 AND {live}),"
            " sum(paid_fen - refunded_fen) FILTER (WHERE ordered_at > $4)"
            " FROM tiering.orders WHERE member_id > $1 AND member_id <= $2"
            " AND ordered_at > least($3, $4) AND ordered_at <= $5 GROUP BY member_id",
            (tier_lo, rfm_lo, now),
        )
    ]
    if metric is QualifyingMetric.GROWTH_VALUE:
        statements.append(
            (
                f"INSERT INTO {WORK} AS w (member_id, metric, orders)"
                " SELECT member_id, sum(points), 0 FROM tiering.growth_ledger"
                " WHERE member_id > $1 AND member_id <= $2"
                " AND occurred_at > $3 AND occurred_at <= $4 GROUP BY member_id"
                " ON CONFLICT (member_id) DO UPDATE SET metric = excluded.metric",
                (tier_lo, now),
            )
        )
    return statements


async def _cuts(conn: asyncpg.Connection) -> dict[str, Any]:
    """The R/F/M quintile cut points over the members with an order in the window."""
    row = await conn.fetchrow(
        "SELECT percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY last_at) AS r,"
        " percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY orders) AS f,"
        " percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY spend) AS m"
        f" FROM {WORK} WHERE orders > 0"
    )
    far = datetime(1970, 1, 1, tzinfo=UTC)
    return {"r": row["r"] or [far] * 4, "f": row["f"] or [0] * 4, "m": row["m"] or [0] * 4}


async def _rank_bounds(conn: asyncpg.Connection, top: int, second: int) -> list[Any]:
    """Relative VIP mode ranks the members with an order in the window by spend
    (then member id): the (spend, member_id) at rank `top` and at rank `second`
    (NULLs when there is no such rank). A member is in the top group when it
    sorts at or before the first: the rank is a comparison, not a column."""
    rows = {
        r["n"]: r
        for r in await conn.fetch(
            "SELECT n, spend, member_id FROM (SELECT spend, member_id, row_number() OVER"
            f" (ORDER BY spend DESC, member_id) AS n FROM {WORK} WHERE orders > 0) s"
            " WHERE n = $1 OR n = $2",
            top,
            second,
        )
    }
    out: list[Any] = []
    for n in (top, second):
        row = rows.get(n)
        out += [row["spend"], row["member_id"]] if row else [None, None]
    return out


def _kind_args(kinds: tuple[outbox_sql.ChangeKind, ...]) -> list[Any]:
    out: list[Any] = []
    for k in kinds:
        out += [k.event_type, k.head, k.any_head, k.payload_tail]
    return out


def _score(column: str, cuts: str) -> str:
    """1 + the quintile cut points strictly below the value."""
    return "(1 + " + " + ".join(f"({column} > ({cuts})[{i}])::int" for i in range(1, 5)) + ")"


def _profile_update_sql(programme: TierProgramme | None, rules: Any, top: int, second: int) -> str:
    """The chunk's one segments/stages statement. Parameters: $1, $2 the
    member_id range, $3 now, $4-$6 the R/F/M quintile cut points, $7-$10 the
    relative tiers' (spend, member_id) bounds (_rank_bounds), $11 the chunk's
    event id prefix (outbox_sql.id_prefix), $12-$19 the two event kinds'
    constant parts (_kind_args). Writes only rows whose result
    differs, writes SegmentChanged / LifecycleStageChanged to the outbox for
    the rows whose segment / stage moved from a previous value (the old values
    come from the statement's snapshot of the row), and returns the counts."""
    codes = [t.code for t in programme.ladder.tiers] if programme else ["regular", "svip", "vip"]
    top_code, second_code, base_code = (
        codes[-1],
        codes[-2] if len(codes) > 1 else codes[-1],
        codes[0],
    )
    tz = programme.rules.timezone if programme else DEFAULT_RULES.timezone
    today = f"($3::timestamptz AT TIME ZONE '{tz}')::date"
    # Day distances once per row (stage_sql reads each up to three times).
    d_reg = f"({today} - (p.registered_at AT TIME ZONE '{tz}')::date)"
    d_order = f"({today} - (sp.last_order_at AT TIME ZONE '{tz}')::date)"
    # Without an order in the window: lapsed buyers are lost, never-buyers prospects.
    no_order_seg = f"CASE WHEN last_order_at IS NULL THEN '{PROSPECT[0]}' ELSE '{LAPSED[0]}' END"
    no_order_grp = f"CASE WHEN last_order_at IS NULL THEN '{PROSPECT[1]}' ELSE '{LAPSED[1]}' END"
    fields = ("r_score", "f_score", "m_score", "segment", "segment_group", "stage", "relative_tier")
    columns = ", ".join(fields)
    # Rank order is spend DESC, member_id: at or before the bound row.
    in_top = "(w.spend > $7::bigint OR (w.spend = $7::bigint AND w.member_id <= $8::uuid))"
    in_second = "(w.spend > $9::bigint OR (w.spend = $9::bigint AND w.member_id <= $10::uuid))"
    # Every table is bounded to the chunk's key range (else the planner hashes
    # the chunk and probes the whole table: each chunk read every row, O(N^2)),
    # and the scores are MATERIALIZED so the long segment CASE reads computed
    # r/f/m instead of re-expanding them per comparison. The old values come
    # from the same read of the profile (the statement's snapshot), not from a
    # second scan of it. Event ids are drawn once per event (a MATERIALIZED
    # CTE: a volatile function is not re-evaluated per reference).
    within = "BETWEEN $1 AND $2"
    before, after = outbox_sql.pair_sql("k.k_head", "k.k_any", "k.k_tail", "d.old", "d.new")
    event_id = "$11::text || lpad(to_hex(row_number() OVER ()), 12, '0')"
    return (
        "WITH scored AS MATERIALIZED (SELECT p.member_id, sp.last_order_at,"
        f" {d_reg} AS d_reg, {d_order} AS d_order, w.orders,"
        f" {', '.join(f'p.{c} AS old_{c}' for c in fields)},"
        f" CASE WHEN w.orders > 0 THEN {_score('w.last_at', '$4::timestamptz[]')} END AS r,"
        f" CASE WHEN w.orders > 0 THEN {_score('w.orders', '$5::bigint[]')} END AS f,"
        f" CASE WHEN w.orders > 0 THEN {_score('w.spend', '$6::bigint[]')} END AS m,"
        f" CASE WHEN w.orders > 0 AND {in_top} THEN '{top_code}'"
        f"  WHEN w.orders > 0 AND {in_second} THEN '{second_code}' ELSE '{base_code}' END"
        "  AS relative_tier"
        " FROM tiering.member_profiles p"
        f" LEFT JOIN {WORK} w ON w.member_id = p.member_id AND w.member_id {within}"
        " LEFT JOIN tiering.member_spend sp ON sp.member_id = p.member_id"
        f"  AND sp.member_id {within}"
        " WHERE p.member_id > $1 AND p.member_id <= $2),"
        " src AS MATERIALIZED (SELECT member_id,"
        f" {', '.join(f'old_{c}' for c in fields)}, r AS r_score, f AS f_score, m AS m_score,"
        f" CASE WHEN r IS NULL THEN {no_order_seg}"
        f"  ELSE {segment_sql('r', 'f', 'm', 'orders', 'name')} END AS segment,"
        f" CASE WHEN r IS NULL THEN {no_order_grp}"
        f"  ELSE {segment_sql('r', 'f', 'm', 'orders', 'group')} END AS segment_group,"
        f" {stage_sql(rules, 'd_reg', 'd_order')} AS stage, relative_tier FROM scored),"
        f" changed AS (UPDATE tiering.member_profiles p SET ({columns}, updated_at) ="
        f" (src.r_score, src.f_score, src.m_score, src.segment, src.segment_group, src.stage,"
        "  src.relative_tier, now())"
        " FROM src"
        " WHERE p.member_id = src.member_id AND p.member_id > $1 AND p.member_id <= $2"
        f" AND ({', '.join(f'src.old_{c}' for c in fields)}) IS DISTINCT FROM"
        f"  ({', '.join(f'src.{c}' for c in fields)})"
        " RETURNING p.member_id, src.old_segment, p.segment, src.old_stage, p.stage,"
        f" {MEMBER_STORE_SQL} AS store),"
        # A member's first classification (no old value) is not an event.
        " moved AS MATERIALIZED (SELECT c.member_id::text AS member, c.store, k.kind, k.old,"
        " k.new"
        " FROM changed c CROSS JOIN LATERAL (VALUES (1, c.old_segment, c.segment),"
        " (2, c.old_stage, c.stage)) AS k(kind, old, new)"
        " WHERE k.old IS NOT NULL AND k.old <> k.new),"
        " kinds AS (SELECT * FROM (VALUES (1, $12::text, $13::bytea, $14::bytea, $15::bytea),"
        " (2, $16::text, $17::bytea, $18::bytea, $19::bytea))"
        " AS v(kind, event_type, k_head, k_any, k_tail)),"
        # The envelope's constant parts, once per distinct (kind, old, new).
        f" pairs AS MATERIALIZED (SELECT d.kind, d.old, d.new, k.event_type, {before} AS before,"
        f" {after} AS after FROM (SELECT DISTINCT kind, old, new FROM moved) d"
        " JOIN kinds k USING (kind)),"
        f" events AS MATERIALIZED (SELECT {event_id} AS event_id, m.member, p.event_type,"
        " p.before, p.after FROM moved m JOIN pairs p USING (kind, old, new)),"
        # The stage moves, counted per store for the lifecycle dashboard (analytics.py).
        " transitions AS (INSERT INTO tiering.stage_transitions (as_of, from_stage, to_stage,"
        " store_id, members) SELECT $3, old, new, store, count(*) FROM moved WHERE kind = 2"
        " GROUP BY old, new, store),"
        " written AS (INSERT INTO tiering.outbox (event_id, event_type, envelope)"
        " SELECT event_id::uuid, event_type,"
        f" {outbox_sql.row_sql('before', 'event_id', 'member', 'after')}"
        " FROM events RETURNING event_type)"
        " SELECT count(*) FILTER (WHERE event_type = $12::text) AS segments,"
        " count(*) FILTER (WHERE event_type = $16::text) AS stages FROM written"
    )


# ---- tiers -------------------------------------------------------------------------------


def _relative_target_sql(metric: str) -> str:
    """The tier code the ranking gives ($10, $11: the lowest metric in the top
    and in the second share, NULL for an empty share; $12 the ladder's codes)."""
    return (
        f"(CASE WHEN {metric} > 0 AND {metric} >= $10::bigint THEN ($12::text[])[3]"
        f" WHEN {metric} > 0 AND {metric} >= $11::bigint THEN ($12::text[])[2]"
        " ELSE ($12::text[])[1] END)"
    )


async def _relative_bounds(
    conn: asyncpg.Connection, programme: TierProgramme
) -> tuple[int | None, int | None]:
    """Relative mode: the lowest metric inside the top share and inside the
    top + next share, over the programme's members with a metric (ties share
    one fate: a member is in a share when the members at or above its metric
    are at most that share; evaluation.relative_ranks is the same rule)."""
    seg = programme.rules.segments
    row = await conn.fetchrow(
        "WITH r AS (SELECT w.metric, count(*) OVER (ORDER BY w.metric DESC) AS at_least,"
        f" count(*) OVER () AS n FROM {WORK} w JOIN tiering.member_tiers t"
        " ON t.member_id = w.member_id AND t.programme_id = $1 WHERE w.metric > 0)"
        " SELECT min(metric) FILTER (WHERE at_least * 100 <= n * $2) AS top,"
        " min(metric) FILTER (WHERE at_least * 100 <= n * $3) AS second FROM r",
        programme.programme_id,
        seg.relative_top_pct,
        seg.relative_top_pct + seg.relative_next_pct,
    )
    return row["top"], row["second"]


async def _tiers_chunk(
    conn: asyncpg.Connection,
    versions: list[TierProgramme],
    lo: uuid.UUID,
    hi: uuid.UUID,
    now: datetime,
    outbox: _Outbox,
    relative: tuple[int | None, int | None] | None = None,
    switch: bool = False,
) -> int:
    programme = in_force(versions, now)
    ladder = programme.ladder
    codes = [t.code for t in ladder.tiers]
    thresholds = [t.threshold for t in ladder.tiers]
    # Members with something due (metric now from the run's aggregate); the rest
    # are untouched. A base-tier member's period end changes nothing visible, so
    # it is not written here: the next event or evaluation rolls it (advance()).
    complex_rows = await conn.fetch(
        f"SELECT t.member_id, {repo.STATE_COLUMNS}, t.tier_code, t.evaluated_at, t.programme_id,"
        " coalesce(w.metric, 0) AS metric FROM tiering.member_tiers t"
        f" LEFT JOIN {WORK} w ON w.member_id = t.member_id AND w.member_id BETWEEN $1 AND $2"
        " WHERE t.member_id > $1 AND t.member_id <= $2 AND (t.programme_id = $8 OR $13::bool)"
        " AND (t.programme_id <> $8 OR"
        "  (t.period_end <= $3 AND t.earned_tier <> $7) OR t.grace_until <= $3"
        "  OR t.override_until <= $3 OR t.programme_version <> $4"
        # Above their tier: at or over the next tier's threshold (NULL, so false,
        # for the top tier and for a code the ladder lacks).
        "  OR coalesce(w.metric, 0) >= ($6::bigint[])[array_position($5::text[], t.earned_tier)]"
        # Relative mode: the rank's tier differs from the one held.
        f"  OR ($9::bool AND t.earned_tier <> {_relative_target_sql('coalesce(w.metric, 0)')}))"
        # Locked (in member order): an erasure of one of these members waits for
        # the chunk to commit.
        " ORDER BY t.member_id FOR UPDATE OF t",
        lo,
        hi,
        now,
        programme.version,
        codes[:-1],
        thresholds[1:],
        codes[0],
        programme.programme_id,
        relative is not None,
        (relative or (None, None))[0],
        (relative or (None, None))[1],
        codes,
        switch,
    )
    if not complex_rows:
        return 0
    points = await _boundary_metrics(conn, programme, complex_rows, now)
    by_version = {p.version: p for p in versions}
    state_columns = [c.strip() for c in repo.STATE_COLUMNS.split(",")]
    changed = 0
    updates = []
    history: list[tuple[uuid.UUID, Change]] = []
    grants: list[tuple[str, uuid.UUID, str, str, str]] = []
    for row in complex_rows:
        member_id = row["member_id"]
        state = TierState(*(row[c] for c in state_columns))
        known = {now: row["metric"], **points.get(member_id, {})}
        at = max(now, row["evaluated_at"])

        def lookup(t: datetime, known: dict[datetime, int] = known) -> int:
            return known[t]

        if row["programme_id"] != programme.programme_id:
            # Decided under another programme (the brand switched): judged
            # afresh from the facts under this one; one change from the tier
            # held to the tier it gives.
            orders, growth = await repo.load_facts(conn, member_id)
            fresh = replay(versions, orders, growth, at)
            after = fresh.state.effective(programme, at)
            switched = Change(
                row["tier_code"],
                after,
                "programme_change",
                at,
                {"from_programme": row["programme_id"], "earned_tier": fresh.state.earned_tier},
            )
            updates.append((member_id, fresh.state, after, at))
            history.append((member_id, switched))
            if switched.moved:
                changed += 1
                outbox.add(tier_changed(member_id, programme, switched), str(member_id))
            continue
        try:
            if state.programme_version != programme.version:
                raise KeyError(state.programme_version)
            ev = advance(programme, state, at, lookup)
        except KeyError:
            # More than one period passed since the last run, or a version
            # change to cross (each period under the version in force then):
            # evaluate on the facts.
            pending = state.programme_version != programme.version
            since = None if pending else window_start(programme, min(state.period_start, at))
            orders, growth = await repo.load_facts(conn, member_id, since)
            ev = advance_versions(versions, state, at, functools.partial(facts_for, orders, growth))
        if relative is not None:
            top, second = relative
            metric = row["metric"]
            rank = (
                2
                if metric > 0 and top is not None and metric >= top
                else 1
                if metric > 0 and second is not None and metric >= second
                else 0
            )
            ranked = assign_relative(
                programme,
                ev.state,
                rank,
                at,
                {"metric": metric, "top_from": top, "second_from": second},
            )
            ev = Evaluation(ranked.state, ev.changes + ranked.changes)
        effective = ev.state.effective(programme, at)
        if ev.state != state or effective != row["tier_code"]:
            updates.append((member_id, ev.state, effective, at))
        grants += upgrade_gift_rows(
            member_id, programme, ev.changes, ev.state.period_start, by_version
        )
        for change in ev.changes:
            history.append((member_id, change))
            if change.moved:
                changed += 1
                decided = by_version.get(change.version, programme)
                outbox.add(tier_changed(member_id, decided, change), str(member_id))
    if updates:
        await conn.execute(
            "UPDATE tiering.member_tiers t SET programme_id = $2, tier_code = u.tier_code,"
            " programme_version = u.programme_version, base_tier = u.base_tier,"
            " earned_tier = u.earned_tier, period_start = u.period_start,"
            " period_end = u.period_end, peak = u.peak, grace_until = u.grace_until,"
            " override_tier = u.override_tier, override_until = u.override_until,"
            " override_reason = u.override_reason, evaluated_at = u.evaluated_at,"
            " updated_at = now()"
            " FROM unnest($1::uuid[], $3::text[], $4::int[], $5::text[], $6::text[],"
            "  $7::timestamptz[], $8::timestamptz[], $9::bigint[], $10::timestamptz[],"
            "  $11::text[], $12::timestamptz[], $13::text[], $14::timestamptz[])"
            "  AS u(member_id, tier_code, programme_version, base_tier, earned_tier,"
            "  period_start, period_end, peak, grace_until, override_tier, override_until,"
            "  override_reason, evaluated_at)"
            # Bounded to the chunk's range: else the planner hashed all of
            # member_tiers for a few thousand rows, in every chunk (O(N^2)).
            " WHERE t.member_id = u.member_id AND t.member_id > $15 AND t.member_id <= $16",
            [u[0] for u in updates],
            programme.programme_id,
            [u[2] for u in updates],
            [u[1].programme_version for u in updates],
            [u[1].base_tier for u in updates],
            [u[1].earned_tier for u in updates],
            [u[1].period_start for u in updates],
            [u[1].period_end for u in updates],
            [u[1].peak for u in updates],
            [u[1].grace_until for u in updates],
            [u[1].override_tier for u in updates],
            [u[1].override_until for u in updates],
            [u[1].override_reason for u in updates],
            [u[3] for u in updates],
            lo,
            hi,
        )
    # Upgrade gifts decided by this chunk, in one statement.
    await insert_grants(conn, grants)
    if history:
        await conn.copy_records_to_table(
            "tier_history",
            schema_name="tiering",
            columns=list(repo.HISTORY_COLUMNS),
            records=[repo.history_record(m, programme, c) for m, c in history],
        )
    return changed


async def _boundary_metrics(
    conn: asyncpg.Connection,
    programme: TierProgramme,
    rows: list[asyncpg.Record],
    now: datetime,
) -> dict[uuid.UUID, dict[datetime, int]]:
    """M(t) at each member's due period end and grace end, in one aggregate."""
    members, ats, los = [], [], []
    for row in rows:
        for t in (row["period_end"], row["grace_until"]):
            if t is not None and t <= now:
                members.append(row["member_id"])
                ats.append(t)
                los.append(window_start(programme, t))
    if not members:
        return {}
    table, aggregate = repo.metric_sql(programme.qualifying_metric, "x")
    column = repo.time_column(programme.qualifying_metric)
    found = await conn.fetch(
        "SELECT q.member_id, q.at, a.metric"
        " FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS q(member_id, at, lo)"
        f" CROSS JOIN LATERAL (SELECT {aggregate} AS metric FROM {table} x"
        f"  WHERE x.member_id = q.member_id AND x.{column} > q.lo AND x.{column} <= q.at) a",
        members,
        ats,
        los,
    )
    out: dict[uuid.UUID, dict[datetime, int]] = {}
    for r in found:
        out.setdefault(r["member_id"], {})[r["at"]] = int(r["metric"])
    return out


# ---- command line -------------------------------------------------------------------------


def bar(done: int, total: int, result: RunResult, width: int = 30) -> None:
    """A one-line progress bar on stderr."""
    share = done / total if total else 1.0
    filled = int(width * share)
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {share:6.1%} {done:,}/{total:,} members"
        f"  tiers {result.tier_changes:,} segments {result.segment_changes:,}"
        f" stages {result.stage_changes:,}"
    )
    sys.stderr.flush()
