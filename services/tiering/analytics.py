"""The tiers, segments and lifecycle dashboards' aggregates (GetTierAnalytics,
GetSegmentAnalytics), each in SQL over tiering's tables: tier distribution,
grace, movements since the last finished recompute, upgrades / downgrades per
day, what-it-takes projections; the RFM R x F heatmap with average spend in the
range, segments, stages and the stage transitions the recomputes recorded
(stage_transitions, written by the batch's profile statement). With a store
filter, every figure counts only the members whose store
(metrics_definitions.MEMBER_STORE: MEMBER_STORE_SQL over member_profiles) is
one of the filter's stores; lifecycle transitions by the store recorded with
them. Definitions: servicekit/metrics_definitions.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from servicekit.analytics import DayRange

from .domain import TierProgramme
from .repository import MEMBER_STORE_SQL, metric_sql, time_column

# A member is "near" the next tier within this share of its threshold.
NEAR_NEXT_SHARE = 0.2


def _in_scope(member: str, by_store: str, stores: str) -> str:
    """True when the filter takes every store, or the member's store is one of
    its stores (a member without a known store is in no store)."""
    return (
        f"(NOT {by_store}::boolean OR {member} IN (SELECT p.member_id"
        f" FROM tiering.member_profiles p WHERE {MEMBER_STORE_SQL} = ANY({stores}::text[])))"
    )


_DAYS = "(SELECT g::date AS day FROM generate_series({a}::date, {b}::date, '1 day') g)"


@dataclass(frozen=True)
class Ladder:
    """The programme's tier codes lowest first, with their bars (from the
    programme in force; without one, the codes members hold, sorted)."""

    codes: list[str]
    thresholds: list[int]
    retention: list[int]


def ladder_of(programme: TierProgramme | None, held: list[str]) -> Ladder:
    if programme is None:
        codes = sorted(held)
        return Ladder(codes, [0] * len(codes), [0] * len(codes))
    tiers = programme.ladder.tiers
    return Ladder(
        [t.code for t in tiers], [t.threshold for t in tiers], [t.retention_bar for t in tiers]
    )


async def _json(conn: asyncpg.Connection, sql: str, *args: Any) -> dict[str, Any]:
    return json.loads(await conn.fetchval(sql, *args))  # type: ignore[no-any-return]


# $1 programme id, $2 now, $3 ladder codes (rank = position), $4 range start,
# $5 range end, $6 zone, $7 first day, $8 last day, $9 by store, $10 stores.
_SCOPE_9 = _in_scope("{m}", "$9", "$10")
_TIERS = f"""
WITH last_run AS (
    SELECT as_of FROM tiering.recompute_runs WHERE finished_at IS NOT NULL
    ORDER BY run_id DESC LIMIT 1
),
since AS (
    SELECT DISTINCT ON (h.member_id) h.member_id,
           first_value(h.from_tier) OVER w AS from_tier, last_value(h.to_tier) OVER w AS to_tier
    FROM tiering.tier_history h, last_run
    WHERE h.changed_at >= last_run.as_of AND h.member_id IS NOT NULL
      AND h.from_tier <> h.to_tier AND h.programme_id = $1
      AND {_SCOPE_9.format(m="h.member_id")}
    WINDOW w AS (PARTITION BY h.member_id ORDER BY h.entry_id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
),
moved AS (
    SELECT from_tier, to_tier,
           sign(coalesce(array_position($3::text[], to_tier), 0)
                - coalesce(array_position($3::text[], from_tier), 0)) AS direction
    FROM since WHERE from_tier <> to_tier
),
held AS (
    SELECT tier_code, grace_until FROM tiering.member_tiers t
    WHERE programme_id = $1 AND {_SCOPE_9.format(m="t.member_id")}
),
daily AS (
    SELECT (changed_at AT TIME ZONE $6)::date AS day,
           sign(coalesce(array_position($3::text[], to_tier), 0)
                - coalesce(array_position($3::text[], from_tier), 0)) AS direction
    FROM tiering.tier_history h
    WHERE changed_at >= $4 AND changed_at < $5 AND programme_id = $1 AND from_tier <> to_tier
      AND {_SCOPE_9.format(m="h.member_id")}
),
per_day AS (
    SELECT d.day, count(x.day) FILTER (WHERE x.direction > 0) AS up,
           count(x.day) FILTER (WHERE x.direction < 0) AS down
    FROM {_DAYS.format(a="$7", b="$8")} d LEFT JOIN daily x ON x.day = d.day
    GROUP BY d.day
)
SELECT json_build_object(
    'distribution', (SELECT coalesce(json_object_agg(tier_code, n), '{{}}')
                     FROM (SELECT tier_code, count(*) AS n FROM held GROUP BY tier_code) d),
    'in_grace', (SELECT count(*) FROM held WHERE grace_until > $2),
    'since', (SELECT as_of FROM last_run),
    'up', (SELECT count(*) FROM moved WHERE direction > 0),
    'down', (SELECT count(*) FROM moved WHERE direction < 0),
    'members', (SELECT count(*) FROM held),
    'flows', (SELECT coalesce(json_agg(json_build_object('from_tier', from_tier,
                  'to_tier', to_tier, 'members', n) ORDER BY n DESC, from_tier, to_tier), '[]')
              FROM (SELECT from_tier, to_tier, count(*) AS n FROM moved
                    GROUP BY from_tier, to_tier) f),
    'by_day', (SELECT json_agg(json_build_object('day', day, 'up', up, 'down', down)
                               ORDER BY day) FROM per_day)
)
"""


def _projections_sql(table: str, aggregate: str, time_col: str) -> str:
    # $1 programme id, $2 now, $3 codes, $4 thresholds, $5 retention bars,
    # $6 window months, $7 near share, $8 by store, $9 stores. The metric is the programme's, over its
    # window ending now (the same definition as repository.metric_sql).
    return f"""
WITH metric AS (
    SELECT member_id, {aggregate} AS value FROM {table}
    WHERE {time_col} > $2::timestamptz - make_interval(months => $6) AND {time_col} <= $2
      AND member_id IS NOT NULL
    GROUP BY member_id
),
m AS (
    SELECT t.earned_tier AS tier, array_position($3::text[], t.earned_tier) AS rank,
           coalesce(metric.value, 0) AS value
    FROM tiering.member_tiers t LEFT JOIN metric ON metric.member_id = t.member_id
    WHERE t.programme_id = $1 AND {_in_scope("t.member_id", "$8", "$9")}
)
SELECT coalesce(json_agg(json_build_object('tier', tier, 'members', members,
           'at_risk', at_risk, 'near_next', near_next)), '[]')
FROM (
    SELECT tier, count(*) AS members,
           count(*) FILTER (WHERE value < ($5::bigint[])[rank]) AS at_risk,
           count(*) FILTER (WHERE rank < cardinality($3::text[])
                              AND value < ($4::bigint[])[rank + 1]
                              AND value >= ($4::bigint[])[rank + 1] * (1 - $7::float8)) AS near_next
    FROM m GROUP BY tier
) p
"""


@dataclass(frozen=True)
class TierFigures:
    distribution: list[tuple[str, int]]
    in_grace: int
    movements_since: datetime | None
    up: int
    down: int
    kept: int
    flows: list[dict[str, Any]]
    by_day: list[dict[str, Any]]
    projections: list[dict[str, Any]]


def _ranked(codes: list[str], key: str) -> tuple[int, str]:
    return (codes.index(key) if key in codes else len(codes), key)


async def tier_figures(
    conn: asyncpg.Connection,
    r: DayRange,
    programme_id: str,
    programme: TierProgramme | None,
    now: datetime,
) -> TierFigures:
    held = [
        row["tier_code"]
        for row in await conn.fetch(
            "SELECT DISTINCT tier_code FROM tiering.member_tiers WHERE programme_id = $1",
            programme_id,
        )
    ]
    ladder = ladder_of(programme, held)
    t = await _json(
        conn,
        _TIERS,
        programme_id,
        now,
        ladder.codes,
        r.start,
        r.end,
        r.time_zone,
        r.first,
        r.last,
        r.by_store,
        r.store_ids or [],
    )
    projections: list[dict[str, Any]] = []
    if programme is not None:
        table, aggregate = metric_sql(programme.qualifying_metric)
        projections = json.loads(
            await conn.fetchval(
                _projections_sql(table, aggregate, time_column(programme.qualifying_metric)),
                programme_id,
                now,
                ladder.codes,
                ladder.thresholds,
                ladder.retention,
                programme.window_months,
                NEAR_NEXT_SHARE,
                r.by_store,
                r.store_ids or [],
            )
        )
    codes = ladder.codes
    distribution = sorted(t["distribution"].items(), key=lambda kv: _ranked(codes, kv[0]))
    moved = t["up"] + t["down"]
    return TierFigures(
        distribution=[(k, int(v)) for k, v in distribution],
        in_grace=t["in_grace"],
        movements_since=datetime.fromisoformat(t["since"]) if t["since"] else None,
        up=t["up"],
        down=t["down"],
        kept=max(t["members"] - moved, 0),
        flows=t["flows"],
        by_day=t["by_day"] or [],
        projections=sorted(projections, key=lambda p: _ranked(codes, p["tier"])),
    )


# $1 range start, $2 range end, $3 zone, $4 by store, $5 stores.
_SEGMENTS = f"""
WITH scoped AS (
    SELECT * FROM tiering.member_profiles p
    WHERE NOT $4::boolean OR {MEMBER_STORE_SQL} = ANY($5::text[])
),
spend AS (
    SELECT member_id, sum(paid_fen - refunded_fen) AS fen FROM tiering.orders
    WHERE ordered_at >= $1 AND ordered_at < $2 AND member_id IS NOT NULL
    GROUP BY member_id
),
cells AS (
    SELECT p.r_score AS r, p.f_score AS f, count(*) AS members,
           round(avg(coalesce(spend.fen, 0)))::bigint AS avg_spend_fen
    FROM scoped p LEFT JOIN spend ON spend.member_id = p.member_id
    WHERE p.r_score IS NOT NULL AND p.f_score IS NOT NULL
    GROUP BY p.r_score, p.f_score
),
moves AS (
    SELECT (as_of AT TIME ZONE $3)::date AS day, from_stage, to_stage, sum(members) AS members
    FROM tiering.stage_transitions WHERE as_of >= $1 AND as_of < $2
      AND (NOT $4::boolean OR store_id = ANY($5::text[]))
    GROUP BY 1, 2, 3
)
SELECT json_build_object(
    'rfm', (SELECT coalesce(json_agg(json_build_object('r', r, 'f', f, 'members', members,
                'avg_spend_fen', avg_spend_fen) ORDER BY r DESC, f DESC), '[]') FROM cells),
    'segments', (SELECT coalesce(json_agg(json_build_object('key', segment, 'count', n)
                     ORDER BY n DESC, segment), '[]')
                 FROM (SELECT segment, count(*) AS n FROM scoped
                       WHERE segment IS NOT NULL GROUP BY segment) s),
    'stages', (SELECT coalesce(json_agg(json_build_object('key', stage, 'count', n)
                   ORDER BY n DESC, stage), '[]')
               FROM (SELECT stage, count(*) AS n FROM scoped
                     WHERE stage IS NOT NULL GROUP BY stage) s),
    'transitions', (SELECT coalesce(json_agg(json_build_object('day', day,
                        'from_stage', from_stage, 'to_stage', to_stage, 'members', members)
                        ORDER BY day, members DESC, from_stage, to_stage), '[]') FROM moves)
)
"""


async def segment_figures(conn: asyncpg.Connection, r: DayRange) -> dict[str, Any]:
    return await _json(conn, _SEGMENTS, r.start, r.end, r.time_zone, r.by_store, r.store_ids or [])
