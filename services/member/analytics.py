"""The overview dashboard's member counts (GetMemberAnalytics), computed in
one SQL statement: members registered by the range's end, those registered
within it per day, by acquisition channel and by registration store. A
member's channel and store are the effective profile values (the most recent
verified observation, else the most recent: domain.effective_profile), the
channel falling back to the registration source. Definitions:
servicekit/metrics_definitions.py."""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg

from servicekit.analytics import DayRange

_SQL = """
WITH live AS (
    SELECT id, registered_at, registration_source
    FROM member.members
    WHERE status = 'active' AND merged_into IS NULL AND registered_at < $2
),
latest AS (
    SELECT DISTINCT ON (o.member_id, o.field) o.member_id, o.field, o.value
    FROM member.profile_observations o
    JOIN live l ON l.id = o.member_id
    WHERE o.field IN ('registration_store_id', 'acquisition_channel')
    ORDER BY o.member_id, o.field, o.verified DESC, o.observed_at DESC, o.id DESC
),
scoped AS (
    SELECT l.registered_at,
           COALESCE(NULLIF(ch.value, ''), l.registration_source) AS channel,
           COALESCE(st.value, '') AS store_id
    FROM live l
    LEFT JOIN latest st ON st.member_id = l.id AND st.field = 'registration_store_id'
    LEFT JOIN latest ch ON ch.member_id = l.id AND ch.field = 'acquisition_channel'
),
filtered AS (
    SELECT * FROM scoped WHERE NOT $3::boolean OR store_id = ANY($4::text[])
),
fresh AS (
    SELECT channel, store_id, (registered_at AT TIME ZONE $5)::date AS day
    FROM filtered WHERE registered_at >= $1
)
SELECT
    (SELECT count(*) FROM filtered) AS total,
    (SELECT count(*) FROM fresh) AS new_members,
    (SELECT json_agg(json_build_array(d.day, COALESCE(n.count, 0)) ORDER BY d.day)
       FROM (SELECT g::date AS day FROM generate_series($6::date, $7::date, '1 day') g) d
       LEFT JOIN (SELECT day, count(*) AS count FROM fresh GROUP BY day) n ON n.day = d.day
    ) AS by_day,
    (SELECT json_agg(json_build_array(channel, count) ORDER BY count DESC, channel)
       FROM (SELECT channel, count(*) AS count FROM fresh GROUP BY channel) c) AS by_channel,
    (SELECT json_agg(json_build_array(store_id, count) ORDER BY count DESC, store_id)
       FROM (SELECT store_id, count(*) AS count FROM fresh GROUP BY store_id) s) AS by_store
"""


@dataclass(frozen=True)
class MemberCounts:
    total: int
    new_members: int
    new_by_day: list[tuple[str, int]]
    new_by_channel: list[tuple[str, int]]
    new_by_store: list[tuple[str, int]]


def _pairs(value: str | None) -> list[tuple[str, int]]:
    return [(str(k), int(v)) for k, v in json.loads(value or "[]")]


async def member_counts(conn: asyncpg.Connection, r: DayRange) -> MemberCounts:
    row = await conn.fetchrow(
        _SQL, r.start, r.end, r.by_store, r.store_ids or [], r.time_zone, r.first, r.last
    )
    assert row is not None
    return MemberCounts(
        total=row["total"],
        new_members=row["new_members"],
        new_by_day=_pairs(row["by_day"]),
        new_by_channel=_pairs(row["by_channel"]),
        new_by_store=_pairs(row["by_store"]),
    )
