"""The journeys dashboard's aggregates (GetJourneyAnalytics), in one SQL
statement: per journey, the enrollments that entered within the range, by
group (treated / holdout) and converted; per step, the enrollments that
reached it, the messages it wrote by send status (every status listed, 0
included: no_credit and unknown too) and the enrollments among them that
converted. Holdout lift: domain.lift. With a store filter, only the
enrollments of members whose store (metrics_definitions.MEMBER_STORE:
MEMBER_STORE_SQL over member_facts) is one of the filter's stores.
Definitions: servicekit/metrics_definitions.py."""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg

from servicekit.analytics import DayRange

from .domain import Lift, lift

# Every status a send can end in, in funnel order; listed even when 0.
SEND_STATUSES = (
    "pending",
    "sending",
    "delivered",
    "failed",
    "capped",
    "suppressed",
    "dropped",
    "no_credit",
    "unknown",
)

# A member's store for the dashboards (metrics_definitions.MEMBER_STORE), over an
# engagement.member_facts row aliased f: the registration store (MemberZoneSet),
# else the latest order's (migration 0015).
MEMBER_STORE_SQL = "coalesce(NULLIF(f.store_id, ''), f.order_store_id)"

# $1 range start, $2 range end, $3 by store, $4 stores.
_SQL = f"""
WITH e AS (
    SELECT enrollment_id, journey_id, grp, converted_at IS NOT NULL AS converted
    FROM engagement.enrollments WHERE entered_at >= $1 AND entered_at < $2
      AND (NOT $3::boolean OR member_id IN (SELECT f.member_id FROM engagement.member_facts f
                                            WHERE {MEMBER_STORE_SQL} = ANY($4::text[])))
),
per_journey AS (
    SELECT journey_id, count(*) AS entered,
           count(*) FILTER (WHERE converted) AS converted,
           count(*) FILTER (WHERE grp = 'treatment') AS treated,
           count(*) FILTER (WHERE grp = 'holdout') AS holdout,
           count(*) FILTER (WHERE grp = 'treatment' AND converted) AS treated_converted,
           count(*) FILTER (WHERE grp = 'holdout' AND converted) AS holdout_converted
    FROM e GROUP BY journey_id
),
s AS (
    SELECT e.journey_id, s.step_id, s.status, s.enrollment_id, e.converted, s.created_at
    FROM engagement.sends s JOIN e ON e.enrollment_id = s.enrollment_id
    -- A send is written after its enrollment entered (both by the service
    -- clock; a day's margin for replicas' clocks): the partitions before the
    -- range are not read (sends are partitioned by created_at).
    WHERE s.created_at >= $1::timestamptz - interval '1 day'
),
by_status AS (
    SELECT journey_id, step_id, status, count(*) AS n FROM s GROUP BY 1, 2, 3
),
per_step AS (
    SELECT s.journey_id, s.step_id, min(s.created_at) AS first_at,
           count(DISTINCT s.enrollment_id) AS entered,
           count(DISTINCT s.enrollment_id) FILTER (WHERE s.converted) AS converted,
           (SELECT json_object_agg(b.status, b.n) FROM by_status b
             WHERE b.journey_id = s.journey_id AND b.step_id = s.step_id) AS sent
    FROM s GROUP BY s.journey_id, s.step_id
)
SELECT coalesce(json_agg(json_build_object(
    'journey_id', j.journey_id, 'status', coalesce(st.status, 'unknown'),
    'entered', j.entered, 'converted', j.converted, 'treated', j.treated,
    'holdout', j.holdout, 'treated_converted', j.treated_converted,
    'holdout_converted', j.holdout_converted,
    'steps', (SELECT coalesce(json_agg(json_build_object('step_id', p.step_id,
                  'entered', p.entered, 'converted', p.converted, 'sent', p.sent)
                  ORDER BY p.first_at, p.step_id), '[]')
              FROM per_step p WHERE p.journey_id = j.journey_id))
    ORDER BY j.journey_id), '[]')
FROM per_journey j LEFT JOIN engagement.journey_state st ON st.journey_id = j.journey_id
"""


@dataclass(frozen=True)
class StepFunnel:
    step_id: str
    entered: int
    sent: dict[str, int]
    converted: int


@dataclass(frozen=True)
class JourneyFunnel:
    journey_id: str
    status: str
    entered: int
    converted: int
    treated: int
    holdout: int
    treated_converted: int
    holdout_converted: int
    steps: list[StepFunnel]
    lift: Lift | None


def _sent(counts: dict[str, int] | None) -> dict[str, int]:
    counts = counts or {}
    # A status this list does not know yet still shows, after the known ones.
    return {k: int(counts.get(k, 0)) for k in SEND_STATUSES} | {
        k: int(v) for k, v in counts.items() if k not in SEND_STATUSES
    }


async def journey_funnels(conn: asyncpg.Connection, r: DayRange) -> list[JourneyFunnel]:
    rows = json.loads(await conn.fetchval(_SQL, r.start, r.end, r.by_store, r.store_ids or []))
    return [
        JourneyFunnel(
            journey_id=j["journey_id"],
            status=j["status"],
            entered=j["entered"],
            converted=j["converted"],
            treated=j["treated"],
            holdout=j["holdout"],
            treated_converted=j["treated_converted"],
            holdout_converted=j["holdout_converted"],
            steps=[
                StepFunnel(s["step_id"], s["entered"], _sent(s["sent"]), s["converted"])
                for s in j["steps"]
            ],
            lift=lift(j["treated_converted"], j["treated"], j["holdout_converted"], j["holdout"]),
        )
        for j in rows
    ]
