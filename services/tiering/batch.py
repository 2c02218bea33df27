"""Batch recompute of tiers, RFM segments and lifecycle stages for every member.

Set-based and chunked (docs/tiers.md, "Batch recompute"):

1. One GROUP BY over the RFM window's orders into a temporary table, and the
   quintile cut points and spend ranks over it (one pass each).
2. Members in chunks of `chunk_size` by member_id (keyset), one short
   transaction per chunk, so no lock is held for long and checkout traffic
   interleaves:
   - tiers: one GROUP BY gives each member's metric now; only members with
     something due (a period end, a grace end, an override expiry, a new
     programme version, or a metric above their tier) are evaluated, by the same
     `evaluation.advance` the event path uses, with the metric at their period
     end aggregated in SQL for the whole chunk at once; base-tier members whose
     period simply rolls over are rolled by one UPDATE;
   - segments and stages: one UPDATE ... FROM the scores, touching only rows
     whose result differs (IS DISTINCT FROM), returning the old values;
   - TierChanged / SegmentChanged / LifecycleStageChanged for the rows that
     changed go to the outbox in the same transaction. A member's first
     classification is not an event (MemberRegistered already starts journeys).
3. A distribution report row (members per tier, segment, group, stage).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from loyalty.events.v1 import events_pb2
from servicekit.db import Database
from servicekit.events import make_envelope
from servicekit.protos import timestamp

from . import reports
from . import repository as repo
from .domain import DEFAULT_RULES, QualifyingMetric, TierProgramme
from .evaluation import (
    Change,
    TierState,
    add_months,
    advance,
    facts_metric,
    window_start,
)
from .handlers import DEFAULT_PROGRAMME_ID, tier_changed
from .segments import LAPSED, PROSPECT, segment_sql, stage_sql

log = logging.getLogger(__name__)

Progress = Callable[[int, int, "RunResult"], None]
MIN_UUID = uuid.UUID(int=0)
# Session setting of the batch connection only.
WORK_MEM = "256MB"


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
) -> RunResult:
    """`pause` seconds between chunks (after each commit) leaves the database to
    checkout traffic when the recompute competes with it (slower, gentler)."""
    now = now or datetime.now(UTC)
    started = time.perf_counter()
    result = RunResult()
    async with db.pool.acquire() as conn:
        result.run_id = await conn.fetchval(
            "INSERT INTO tiering.recompute_runs (as_of, started_at) VALUES ($1, now())"
            " RETURNING run_id",
            now,
        )
        programme = await repo.programme_at(conn, DEFAULT_PROGRAMME_ID, now)
        rules = programme.rules if programme else DEFAULT_RULES
        # A batch connection: enough memory to hash a million groups without
        # spilling, and no JIT (compiling the chunk statements cost more than
        # running them: measured 3 s of 5 s per chunk).
        await conn.execute(f"SET work_mem = '{WORK_MEM}'")
        await conn.execute("SET jit = off")
        try:
            # The work table lives in local buffers (8MB by default: a million
            # rows thrash). Settable only before a session's first temp table.
            await conn.execute(f"SET temp_buffers = '{WORK_MEM}'")
        except asyncpg.PostgresError:
            log.info("temp_buffers already fixed for this connection; keeping it")
        tick = time.perf_counter()
        # Everyone tiering knows gets a profile row (ordered, or tiered).
        for source in ("tiering.member_spend", "tiering.member_tiers"):
            await conn.execute(
                "INSERT INTO tiering.member_profiles (member_id) SELECT s.member_id"
                f" FROM {source} s WHERE NOT EXISTS (SELECT 1 FROM tiering.member_profiles p"
                " WHERE p.member_id = s.member_id) AND NOT EXISTS (SELECT 1 FROM"
                " tiering.erased_members e WHERE e.member_id = s.member_id)"
                " ON CONFLICT DO NOTHING"
            )
        total = await conn.fetchval("SELECT count(*) FROM tiering.member_profiles")
        cuts = await _work_table(conn, programme, rules.segments.rfm_window_months, now)
        result.phases["aggregate"] = time.perf_counter() - tick
        active = cuts.pop("n")
        top = math.ceil(active * rules.segments.relative_top_pct / 100)
        second = math.ceil(
            active * (rules.segments.relative_top_pct + rules.segments.relative_next_pct) / 100
        )
        profile_sql = _profile_update_sql(programme, rules.segments, top, second)
        tier_secs = profile_secs = 0.0
        last = MIN_UUID
        done = 0
        while True:
            # Keyset: the chunk's last id (uuid has no max() before PostgreSQL 16).
            bounds = await conn.fetchrow(
                "SELECT member_id AS hi, n FROM (SELECT member_id, count(*) OVER () AS n"
                " FROM (SELECT member_id FROM tiering.member_profiles WHERE member_id > $1"
                " ORDER BY member_id LIMIT $2) a) b ORDER BY member_id DESC LIMIT 1",
                last,
                chunk_size,
            )
            if bounds is None:
                break
            hi = bounds["hi"]
            outbox = _Outbox()
            async with conn.transaction():
                t0 = time.perf_counter()
                if programme is not None:
                    result.tier_changes += await _tiers_chunk(
                        conn, programme, last, hi, now, outbox
                    )
                t1 = time.perf_counter()
                seg, stg = await _profiles_chunk(conn, profile_sql, last, hi, now, cuts, outbox)
                result.segment_changes += seg
                result.stage_changes += stg
                await outbox.flush(conn)
                profile_secs += time.perf_counter() - t1
                tier_secs += t1 - t0
            done += bounds["n"]
            result.chunks += 1
            last = hi
            if progress:
                progress(done, total, result)
            if pause > 0:
                await asyncio.sleep(pause)
        db.outbox_wakeup.set()
        result.phases["tiers"] = tier_secs
        result.phases["segments_stages"] = profile_secs
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
        await conn.execute("DROP TABLE IF EXISTS pg_temp.batch_work")
        await conn.execute("RESET work_mem")
        await conn.execute("RESET jit")
    result.seconds = time.perf_counter() - started
    return result


# ---- RFM --------------------------------------------------------------------------------


async def _work_table(
    conn: asyncpg.Connection, programme: TierProgramme | None, months: int, now: datetime
) -> dict[str, Any]:
    """One pass over the orders: each member's tier metric over the programme's
    window and R/F/M inputs over the RFM window, with spend ranks; returns the
    quintile cut points (and n, the members with an order in the RFM window)."""
    rfm_lo = window_start(programme, now, months) if programme else add_months(now, -months)
    tier_lo = window_start(programme, now) if programme else rfm_lo
    metric = programme.qualifying_metric if programme else QualifyingMetric.PAID_SPEND
    live = "refunded_fen < paid_fen"
    if metric is QualifyingMetric.PAID_SPEND:
        tier_agg = "coalesce(sum(paid_fen - refunded_fen) FILTER (WHERE ordered_at > $1), 0)"
    elif metric is QualifyingMetric.ORDER_COUNT:
        tier_agg = f"count(*) FILTER (WHERE ordered_at > $1 AND {live})"
    else:
        tier_agg = "0"  # from the growth ledger below
    rfm_orders = f"count(*) FILTER (WHERE ordered_at > $2 AND {live})"
    rfm_spend = "sum(paid_fen - refunded_fen) FILTER (WHERE ordered_at > $2)"
    await conn.execute("DROP TABLE IF EXISTS pg_temp.batch_work")
    # CREATE TABLE AS may use a parallel plan (INSERT ... SELECT may not); it takes
    # no bind parameters, so the three instants are written as literals (our own
    # datetimes, rendered by isoformat).
    sql = (
        "CREATE TEMP TABLE batch_work AS"
        f" SELECT member_id, {tier_agg}::bigint AS metric,"
        f" max(ordered_at) FILTER (WHERE ordered_at > $2 AND {live}) AS last_at,"
        f" {rfm_orders} AS orders, {rfm_spend}::bigint AS spend,"
        f" CASE WHEN {rfm_orders} > 0 THEN row_number() OVER"
        f"  (PARTITION BY {rfm_orders} > 0 ORDER BY {rfm_spend} DESC, member_id) END"
        "  AS spend_rank"
        " FROM tiering.orders WHERE ordered_at > least($1, $2) AND ordered_at <= $3"
        " AND member_id IS NOT NULL GROUP BY member_id"
    )
    for n, instant in ((1, tier_lo), (2, rfm_lo), (3, now)):
        sql = sql.replace(f"${n}", f"'{instant.isoformat()}'::timestamptz")
    await conn.execute(sql)
    await conn.execute("ALTER TABLE batch_work ADD PRIMARY KEY (member_id)")
    if metric is QualifyingMetric.GROWTH_VALUE:
        await conn.execute(
            "INSERT INTO batch_work AS w (member_id, metric, orders)"
            " SELECT member_id, sum(points), 0 FROM tiering.growth_ledger"
            " WHERE occurred_at > $1 AND occurred_at <= $2 AND member_id IS NOT NULL"
            " GROUP BY member_id"
            " ON CONFLICT (member_id) DO UPDATE SET metric = excluded.metric",
            tier_lo,
            now,
        )
    await conn.execute("ANALYZE batch_work")
    row = await conn.fetchrow(
        "SELECT count(*) AS n,"
        " percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY last_at) AS r,"
        " percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY orders) AS f,"
        " percentile_disc(ARRAY[0.2, 0.4, 0.6, 0.8]) WITHIN GROUP (ORDER BY spend) AS m"
        " FROM batch_work WHERE orders > 0"
    )
    n = int(row["n"])
    far = datetime(1970, 1, 1, tzinfo=UTC)
    return {
        "n": n,
        "r": row["r"] or [far] * 4,
        "f": row["f"] or [0] * 4,
        "m": row["m"] or [0] * 4,
    }


def _score(column: str, cuts: str) -> str:
    """1 + the quintile cut points strictly below the value."""
    return "(1 + " + " + ".join(f"({column} > ({cuts})[{i}])::int" for i in range(1, 5)) + ")"


def _profile_update_sql(programme: TierProgramme | None, rules: Any, top: int, second: int) -> str:
    """The chunk's segments/stages UPDATE. Parameters: $1, $2 the member_id range,
    $3 now, $4-$6 the R/F/M quintile cut points. Writes only rows whose result
    differs and returns the old segment and stage (the self-join sees the row as
    it was when the statement started)."""
    codes = [t.code for t in programme.ladder.tiers] if programme else ["regular", "svip", "vip"]
    top_code, second_code, base_code = (
        codes[-1],
        codes[-2] if len(codes) > 1 else codes[-1],
        codes[0],
    )
    tz = programme.rules.timezone if programme else DEFAULT_RULES.timezone
    today = f"($3::timestamptz AT TIME ZONE '{tz}')::date"
    d_reg = f"({today} - (registered_at AT TIME ZONE '{tz}')::date)"
    d_order = f"({today} - (last_order_at AT TIME ZONE '{tz}')::date)"
    # Without an order in the window: lapsed buyers are lost, never-buyers prospects.
    no_order_seg = f"CASE WHEN last_order_at IS NULL THEN '{PROSPECT[0]}' ELSE '{LAPSED[0]}' END"
    no_order_grp = f"CASE WHEN last_order_at IS NULL THEN '{PROSPECT[1]}' ELSE '{LAPSED[1]}' END"
    fields = ("r_score", "f_score", "m_score", "segment", "segment_group", "stage", "relative_tier")
    columns = ", ".join(fields)
    # Every table is bounded to the chunk's key range (else the planner hashes
    # the chunk and probes the whole table: each chunk read every row, O(N^2)),
    # and the scores are MATERIALIZED so the long segment CASE reads computed
    # r/f/m instead of re-expanding them per comparison. The old values come
    # from the same read of the profile (the statement's snapshot), not from a
    # second scan of it.
    within = "BETWEEN $1 AND $2"
    return (
        "WITH scored AS MATERIALIZED (SELECT p.member_id, p.registered_at, sp.last_order_at,"
        " w.orders, w.spend_rank,"
        f" {', '.join(f'p.{c} AS old_{c}' for c in fields)},"
        f" CASE WHEN w.orders > 0 THEN {_score('w.last_at', '$4::timestamptz[]')} END AS r,"
        f" CASE WHEN w.orders > 0 THEN {_score('w.orders', '$5::bigint[]')} END AS f,"
        f" CASE WHEN w.orders > 0 THEN {_score('w.spend', '$6::bigint[]')} END AS m"
        " FROM tiering.member_profiles p"
        f" LEFT JOIN batch_work w ON w.member_id = p.member_id AND w.member_id {within}"
        " LEFT JOIN tiering.member_spend sp ON sp.member_id = p.member_id"
        f"  AND sp.member_id {within}"
        " WHERE p.member_id > $1 AND p.member_id <= $2),"
        " src AS MATERIALIZED (SELECT member_id,"
        f" {', '.join(f'old_{c}' for c in fields)}, r AS r_score, f AS f_score, m AS m_score,"
        f" CASE WHEN r IS NULL THEN {no_order_seg}"
        f"  ELSE {segment_sql('r', 'f', 'm', 'orders', 'name')} END AS segment,"
        f" CASE WHEN r IS NULL THEN {no_order_grp}"
        f"  ELSE {segment_sql('r', 'f', 'm', 'orders', 'group')} END AS segment_group,"
        f" {stage_sql(rules, d_reg, d_order)} AS stage,"
        f" CASE WHEN spend_rank <= {top} THEN '{top_code}'"
        f"  WHEN spend_rank <= {second} THEN '{second_code}' ELSE '{base_code}' END"
        "  AS relative_tier FROM scored)"
        f" UPDATE tiering.member_profiles p SET ({columns}, updated_at) ="
        f" (src.r_score, src.f_score, src.m_score, src.segment, src.segment_group, src.stage,"
        "  src.relative_tier, now())"
        " FROM src"
        " WHERE p.member_id = src.member_id AND p.member_id > $1 AND p.member_id <= $2"
        f" AND ({', '.join(f'src.old_{c}' for c in fields)}) IS DISTINCT FROM"
        f"  ({', '.join(f'src.{c}' for c in fields)})"
        " RETURNING p.member_id, src.old_segment, p.segment, src.old_stage, p.stage"
    )


async def _profiles_chunk(
    conn: asyncpg.Connection,
    sql: str,
    lo: uuid.UUID,
    hi: uuid.UUID,
    now: datetime,
    cuts: dict[str, Any],
    outbox: _Outbox,
) -> tuple[int, int]:
    segments = stages = 0
    changed_at = timestamp(now)
    for row in await conn.fetch(sql, lo, hi, now, cuts["r"], cuts["f"], cuts["m"]):
        member = str(row["member_id"])
        if row["old_segment"] is not None and row["old_segment"] != row["segment"]:
            segments += 1
            outbox.add(
                events_pb2.SegmentChanged(
                    member_id=member,
                    from_segment=row["old_segment"],
                    to_segment=row["segment"],
                    changed_at=changed_at,
                ),
                member,
            )
        if row["old_stage"] is not None and row["old_stage"] != row["stage"]:
            stages += 1
            outbox.add(
                events_pb2.LifecycleStageChanged(
                    member_id=member,
                    from_stage=row["old_stage"],
                    to_stage=row["stage"],
                    changed_at=changed_at,
                ),
                member,
            )
    return segments, stages


# ---- tiers -------------------------------------------------------------------------------


async def _tiers_chunk(
    conn: asyncpg.Connection,
    programme: TierProgramme,
    lo: uuid.UUID,
    hi: uuid.UUID,
    now: datetime,
    outbox: _Outbox,
) -> int:
    ladder = programme.ladder
    codes = [t.code for t in ladder.tiers]
    thresholds = [t.threshold for t in ladder.tiers]
    # Members with something due (metric now from the run's aggregate); the rest
    # are untouched. A base-tier member's period end changes nothing visible, so
    # it is not written here: the next event or evaluation rolls it (advance()).
    complex_rows = await conn.fetch(
        f"SELECT t.member_id, {repo.STATE_COLUMNS}, t.tier_code, t.evaluated_at,"
        " coalesce(w.metric, 0) AS metric FROM tiering.member_tiers t"
        " LEFT JOIN batch_work w ON w.member_id = t.member_id AND w.member_id BETWEEN $1 AND $2"
        " WHERE t.member_id > $1 AND t.member_id <= $2 AND ("
        "  (t.period_end <= $3 AND t.earned_tier <> $7) OR t.grace_until <= $3"
        "  OR t.override_until <= $3 OR t.programme_version <> $4"
        "  OR (SELECT count(*) FROM unnest($5::bigint[]) th WHERE th <= coalesce(w.metric, 0))"
        "   > array_position($6::text[], t.earned_tier))"
        # Locked: an erasure of one of these members waits for the chunk to commit.
        " FOR UPDATE OF t",
        lo,
        hi,
        now,
        programme.version,
        thresholds,
        codes,
        codes[0],
    )
    if not complex_rows:
        return 0
    points = await _boundary_metrics(conn, programme, complex_rows, now)
    changed = 0
    updates = []
    history: list[tuple[uuid.UUID, Change]] = []
    for row in complex_rows:
        member_id = row["member_id"]
        state = TierState(*(row[c.strip()] for c in repo.STATE_COLUMNS.split(",")))
        known = {now: row["metric"], **points.get(member_id, {})}
        at = max(now, row["evaluated_at"])

        def lookup(t: datetime, known: dict[datetime, int] = known) -> int:
            return known[t]

        try:
            ev = advance(programme, state, at, lookup)
        except KeyError:
            # More than one period passed since the last run: evaluate on the facts.
            orders, growth = await repo.load_facts(
                conn, member_id, window_start(programme, min(state.period_start, at))
            )
            ev = advance(
                programme,
                state,
                at,
                facts_metric(programme, orders, growth),
            )
        effective = ev.state.effective(programme, at)
        if ev.state != state or effective != row["tier_code"]:
            updates.append((member_id, ev.state, effective, at))
        for change in ev.changes:
            history.append((member_id, change))
            if change.moved:
                changed += 1
                outbox.add(tier_changed(member_id, programme, change), str(member_id))
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
            " WHERE t.member_id = u.member_id",
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
        )
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
