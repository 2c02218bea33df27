"""SQL of journeys and enrollments (asyncpg; statements are schema-qualified):
journey versions and status, enrollments and their timers, journey metrics, and
what a merge, unmerge or erasure does to them. What engagement knows of members
is in facts_repository.py; the scheduler's batch statements in
scheduler_repository.py.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from servicekit.db import Connection

# ---- journeys ---------------------------------------------------------------


async def next_version(conn: Connection, journey_id: str) -> int:
    # Serialise publishes of one journey so versions are dense.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('journey:' || $1))", journey_id)
    current = await conn.fetchval(
        "SELECT max(version) FROM engagement.journeys WHERE journey_id = $1", journey_id
    )
    return int(current or 0) + 1


async def insert_journey(
    conn: Connection, journey_id: str, version: int, doc: dict[str, Any], priority: int, entry: str
) -> None:
    await conn.execute(
        "INSERT INTO engagement.journeys (journey_id, version, definition, priority, entry_event)"
        " VALUES ($1, $2, $3::jsonb, $4, $5)",
        journey_id,
        version,
        json.dumps(doc),
        priority,
        entry,
    )
    await conn.execute(
        "INSERT INTO engagement.journey_state (journey_id, live_version, entry_event, status)"
        " VALUES ($1, $2, $3, 'active') ON CONFLICT (journey_id) DO UPDATE SET"
        " live_version = excluded.live_version, entry_event = excluded.entry_event,"
        " updated_at = now()",
        journey_id,
        version,
        entry,
    )


async def journey_doc(conn: Connection, journey_id: str, version: int) -> dict[str, Any] | None:
    raw = await conn.fetchval(
        "SELECT definition::text FROM engagement.journeys WHERE journey_id = $1 AND version = $2",
        journey_id,
        version,
    )
    return json.loads(raw) if raw is not None else None


@dataclass(frozen=True)
class JourneyState:
    journey_id: str
    live_version: int
    status: str


async def journey_state(
    conn: Connection, journey_id: str, lock: bool = False
) -> JourneyState | None:
    row = await conn.fetchrow(
        "SELECT journey_id, live_version, status FROM engagement.journey_state"
        " WHERE journey_id = $1" + (" FOR UPDATE" if lock else ""),
        journey_id,
    )
    return JourneyState(row["journey_id"], row["live_version"], row["status"]) if row else None


async def set_journey_status(conn: Connection, journey_id: str, status: str) -> None:
    await conn.execute(
        "UPDATE engagement.journey_state SET status = $2, updated_at = now() WHERE journey_id = $1",
        journey_id,
        status,
    )
    # Paused timers leave the working queue (the partial index skips them).
    await conn.execute(
        "UPDATE engagement.timers SET paused = $2 WHERE journey_id = $1 AND paused <> $2",
        journey_id,
        status == "paused",
    )


# The member fact an event sets (apply_event); other events only make the
# member known (an order counts instead).
_EVENT_FACT = {
    "tier_changed": "tier",
    "segment_changed": "segment",
    "lifecycle_stage_changed": "stage",
}


@dataclass(frozen=True)
class EventState:
    order_count: int | None  # after counting this order (order_completed only)
    enrolled: bool  # the member has an enrollment (live or ended): locks and updates to do
    entries: dict[str, list[tuple[str, int]]]  # event -> active journeys it enters
    parked: list[tuple[str, dict[str, str], datetime]]  # taken to replay (introduce)


async def apply_event(
    conn: Connection,
    member_id: uuid.UUID,
    event: str,
    value: str,
    events: list[str],
    introduce: bool = False,
    store_id: str = "",
) -> EventState:
    """One statement per consumed event instead of four to five (issue 19): the
    event's own member fact (an order counted; a tier, segment or stage set; or
    the member just known), whether the member has any enrollment at all (most
    members have none: no timers to lock, nothing to convert or move on), and
    the active journeys that `events` enter. Read per event, never cached, so a
    journey published or paused by another replica counts from its commit on.
    With `introduce` (an event from a service that knows the member) it also
    takes the events parked for the member (facts_repository.introduce),
    oldest first, for the caller to replay. An order's `store_id` becomes the
    member's latest order store (the dashboards' MEMBER_STORE fallback)."""
    fact = _EVENT_FACT.get(event)
    if event == "order_completed":
        upsert = (
            "INSERT INTO engagement.member_facts AS f (member_id, order_count, order_store_id)"
            " VALUES ($1, 1, NULLIF($3::text, ''))"
            " ON CONFLICT (member_id) DO UPDATE"
            " SET order_count = f.order_count + 1,"
            " order_store_id = coalesce(excluded.order_store_id, f.order_store_id),"
            " updated_at = now() RETURNING order_count"
        )
        args: tuple[Any, ...] = (member_id, events, store_id)
    elif fact is not None:
        upsert = (
            f"INSERT INTO engagement.member_facts (member_id, {fact}) VALUES ($1, $3)"
            f" ON CONFLICT (member_id) DO UPDATE SET {fact} = excluded.{fact}, updated_at = now()"
            " RETURNING NULL::int AS order_count"
        )
        args = (member_id, events, value)
    else:
        upsert = (
            "INSERT INTO engagement.member_facts (member_id) VALUES ($1) ON CONFLICT DO NOTHING"
            " RETURNING NULL::int AS order_count"
        )
        args = (member_id, events)
    parked = (
        ", p AS (DELETE FROM engagement.parked_events WHERE member_id = $1"
        " RETURNING id, event, attributes, occurred_at)"
        if introduce
        else ""
    )
    parked_json = (
        "(SELECT json_agg(json_build_object('event', event, 'attributes', attributes,"
        " 'at', occurred_at) ORDER BY id) FROM p)"
        if introduce
        else "NULL::json"
    )
    rows = await conn.fetch(
        f"WITH f AS ({upsert}){parked}"
        " SELECT c.order_count, c.enrolled, c.parked,"
        " j.entry_event, j.journey_id, j.live_version"
        " FROM (SELECT (SELECT order_count FROM f) AS order_count,"
        "  EXISTS (SELECT 1 FROM engagement.enrollments WHERE member_id = $1) AS enrolled,"
        f"  {parked_json}::text AS parked) c"
        " LEFT JOIN engagement.journey_state j"
        "  ON j.entry_event = ANY($2::text[]) AND j.status = 'active'"
        " ORDER BY j.journey_id",
        *args,
    )
    entries: dict[str, list[tuple[str, int]]] = {e: [] for e in events}
    for r in rows:
        if r["journey_id"] is not None:
            entries[r["entry_event"]].append((r["journey_id"], r["live_version"]))
    first = rows[0]
    taken = [
        (p["event"], p["attributes"], datetime.fromisoformat(p["at"]))
        for p in json.loads(first["parked"] or "[]")
    ]
    return EventState(first["order_count"], first["enrolled"], entries, taken)


@dataclass(frozen=True)
class JourneySummaryRow:
    journey_id: str
    name: str
    live_version: int
    status: str
    channels: list[str]
    entered: int
    active: int
    updated_at: datetime


async def list_journeys(conn: Connection, after_id: str, limit: int) -> list[JourneySummaryRow]:
    """Journeys by id after `after_id` (a keyset page), each with its live
    version's name and send channels; the counts use the enrolment indexes
    (journey_id, version) and the partial one on active enrolments."""
    rows = await conn.fetch(
        "SELECT s.journey_id, s.live_version, s.status, s.updated_at,"
        " COALESCE(j.definition->>'name', s.journey_id) AS name,"
        " ARRAY(SELECT DISTINCT st.value->>'channel'"
        "  FROM jsonb_each(CASE WHEN jsonb_typeof(j.definition->'steps') = 'object'"
        "   THEN j.definition->'steps' ELSE '{}'::jsonb END) st"
        "  WHERE st.value->>'type' = 'send' AND st.value->>'channel' IS NOT NULL"
        "  ORDER BY 1) AS channels,"
        " (SELECT count(*) FROM engagement.enrollments e"
        "   WHERE e.journey_id = s.journey_id) AS entered,"
        " (SELECT count(*) FROM engagement.enrollments e"
        "   WHERE e.journey_id = s.journey_id AND e.status = 'active') AS active"
        " FROM engagement.journey_state s"
        " JOIN engagement.journeys j ON j.journey_id = s.journey_id AND j.version = s.live_version"
        " WHERE s.journey_id > $1 ORDER BY s.journey_id LIMIT $2",
        after_id,
        limit,
    )
    return [
        JourneySummaryRow(
            journey_id=r["journey_id"],
            name=r["name"],
            live_version=r["live_version"],
            status=r["status"],
            channels=list(r["channels"]),
            entered=r["entered"],
            active=r["active"],
            updated_at=r["updated_at"],
        )
        for r in rows
    ]


# ---- enrollments -----------------------------------------------------------------


@dataclass(frozen=True)
class EnrollmentRow:
    enrollment_id: uuid.UUID
    journey_id: str
    version: int
    member_id: uuid.UUID | None
    status: str
    grp: str
    variant: str | None
    seq: int
    waiting_step: str | None
    entered_at: datetime
    ended_at: datetime | None


def _enrollment(r: Any) -> EnrollmentRow:
    return EnrollmentRow(
        r["enrollment_id"],
        r["journey_id"],
        r["version"],
        r["member_id"],
        r["status"],
        r["grp"],
        r["variant"],
        r["seq"],
        r["waiting_step"],
        r["entered_at"],
        r["ended_at"],
    )


_ENROLLMENT_COLS = (
    "enrollment_id, journey_id, version, member_id, status, grp, variant, seq, waiting_step,"
    " entered_at, ended_at"
)


async def last_enrollment(
    conn: Connection, journey_id: str, member_id: uuid.UUID
) -> EnrollmentRow | None:
    row = await conn.fetchrow(
        f"SELECT {_ENROLLMENT_COLS} FROM engagement.enrollments"
        " WHERE journey_id = $1 AND member_id = $2 ORDER BY entered_at DESC LIMIT 1",
        journey_id,
        member_id,
    )
    return _enrollment(row) if row else None


async def insert_enrollment(
    conn: Connection,
    enrollment_id: uuid.UUID,
    journey_id: str,
    version: int,
    member_id: uuid.UUID,
    status: str,
    grp: str,
    conversion_days: int,
    entered_at: datetime,
    entry_attributes: dict[str, str] | None = None,
) -> bool:
    """False when the member already has a live enrollment in this journey."""
    inserted = await conn.fetchval(
        "INSERT INTO engagement.enrollments (enrollment_id, journey_id, version, member_id,"
        " status, grp, conversion_days, entered_at, ended_at, entry_attributes)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $5::text = 'active' THEN NULL ELSE $8::timestamptz END,"
        " $9::jsonb)"
        " ON CONFLICT (journey_id, member_id) WHERE status = 'active' DO NOTHING RETURNING true",
        enrollment_id,
        journey_id,
        version,
        member_id,
        status,
        grp,
        conversion_days,
        entered_at,
        json.dumps(entry_attributes or {}),
    )
    return bool(inserted)


async def lock_member_timers(conn: Connection, member_ids: list[uuid.UUID]) -> None:
    """Take the members' timer locks before touching their enrollments: the
    sweeper locks timers first too (and skips locked ones), so an event and a
    sweep of the same member queue up instead of deadlocking."""
    await conn.execute(
        "SELECT 1 FROM engagement.timers t JOIN engagement.enrollments e USING (enrollment_id)"
        " WHERE e.member_id = ANY($1::uuid[]) ORDER BY t.enrollment_id FOR UPDATE OF t",
        member_ids,
    )


async def live_enrollments(conn: Connection, member_id: uuid.UUID) -> list[EnrollmentRow]:
    rows = await conn.fetch(
        f"SELECT {_ENROLLMENT_COLS} FROM engagement.enrollments"
        " WHERE member_id = $1 AND status = 'active' FOR UPDATE",
        member_id,
    )
    return [_enrollment(r) for r in rows]


async def end_enrollment(
    conn: Connection, enrollment_id: uuid.UUID, status: str, at: datetime
) -> None:
    await conn.execute(
        "UPDATE engagement.enrollments SET status = $2, ended_at = $3, waiting_step = NULL"
        " WHERE enrollment_id = $1",
        enrollment_id,
        status,
        at,
    )
    await conn.execute("DELETE FROM engagement.timers WHERE enrollment_id = $1", enrollment_id)


async def mark_converted(conn: Connection, member_id: uuid.UUID, at: datetime) -> None:
    """An order converts every enrollment (treated or holdout) entered within its window."""
    await conn.execute(
        "UPDATE engagement.enrollments SET converted_at = $2"
        " WHERE member_id = $1 AND converted_at IS NULL AND entered_at <= $2"
        " AND entered_at + make_interval(days => conversion_days) >= $2",
        member_id,
        at,
    )


async def upsert_timer(
    conn: Connection,
    enrollment_id: uuid.UUID,
    journey_id: str,
    step_id: str,
    due_at: datetime,
    paused: bool,
    priority: int,
) -> None:
    await conn.execute(
        "INSERT INTO engagement.timers"
        " (enrollment_id, journey_id, step_id, due_at, paused, priority)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (enrollment_id) DO UPDATE SET"
        " step_id = excluded.step_id, due_at = excluded.due_at, attempts = 0",
        enrollment_id,
        journey_id,
        step_id,
        due_at,
        paused,
        priority,
    )


async def set_waiting(conn: Connection, enrollment_id: uuid.UUID, waiting: str | None) -> None:
    await conn.execute(
        "UPDATE engagement.enrollments SET waiting_step = $2 WHERE enrollment_id = $1",
        enrollment_id,
        waiting,
    )


# ---- metrics -----------------------------------------------------------------------


async def journey_counts(conn: Connection, journey_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT count(*) AS entered,"
        " count(*) FILTER (WHERE grp = 'treatment') AS treated,"
        " count(*) FILTER (WHERE grp = 'holdout') AS holdout,"
        " count(*) FILTER (WHERE grp = 'treatment' AND converted_at IS NOT NULL) AS treated_conv,"
        " count(*) FILTER (WHERE grp = 'holdout' AND converted_at IS NOT NULL) AS holdout_conv,"
        " count(*) FILTER (WHERE status = 'active') AS active"
        " FROM engagement.enrollments WHERE journey_id = $1",
        journey_id,
    )
    variants = await conn.fetch(
        "SELECT variant, count(*) AS n, count(converted_at) AS conv FROM engagement.enrollments"
        " WHERE journey_id = $1 AND variant IS NOT NULL GROUP BY variant ORDER BY variant",
        journey_id,
    )
    steps = await conn.fetch(
        "SELECT step_id, status, count(*) AS n FROM engagement.sends WHERE journey_id = $1"
        " GROUP BY step_id, status ORDER BY step_id, status",
        journey_id,
    )
    return {
        "totals": dict(row) if row else {},
        "variants": [(r["variant"], r["n"], r["conv"]) for r in variants],
        "steps": [(r["step_id"], r["status"], r["n"]) for r in steps],
    }


# ---- merge, unmerge, erase -----------------------------------------------------------


async def merge_member(
    conn: Connection, merge_id: str, survivor: uuid.UUID, absorbed: uuid.UUID, at: datetime
) -> None:
    """Move the absorbed member's enrollments and send history to the survivor.
    A journey both are live in keeps the survivor's enrollment (one live per
    member per journey); the absorbed one ends as 'merged'. Today's cap usage
    is added to the survivor's, so the person still gets at most 1+1."""
    await lock_member_timers(conn, [survivor, absorbed])
    clash = await conn.fetch(
        "SELECT a.enrollment_id FROM engagement.enrollments a"
        " JOIN engagement.enrollments s ON s.journey_id = a.journey_id AND s.member_id = $2"
        "  AND s.status = 'active'"
        " WHERE a.member_id = $1 AND a.status = 'active'",
        absorbed,
        survivor,
    )
    for r in clash:
        await end_enrollment(conn, r["enrollment_id"], "merged", at)
    moved = await conn.fetch(
        "UPDATE engagement.enrollments SET member_id = $2 WHERE member_id = $1"
        " RETURNING enrollment_id",
        absorbed,
        survivor,
    )
    sends = await conn.fetch(
        "UPDATE engagement.sends SET member_id = $2 WHERE member_id = $1 RETURNING send_key",
        absorbed,
        survivor,
    )
    await conn.executemany(
        "INSERT INTO engagement.merge_moves (merge_id, kind, ref) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        [(merge_id, "enrollment", str(r["enrollment_id"])) for r in moved]
        + [(merge_id, "send", r["send_key"]) for r in sends],
    )
    await conn.execute(
        "INSERT INTO engagement.cap_usage AS c"
        " (member_id, local_day, message_class, used, cap_limit, last_grant)"
        " SELECT $2, local_day, message_class, used, cap_limit, 0 FROM engagement.cap_usage"
        " WHERE member_id = $1"
        " ON CONFLICT (member_id, local_day, message_class) DO UPDATE SET"
        " used = c.used + excluded.used",
        absorbed,
        survivor,
    )
    # The survivor keeps its own birthday; it takes the absorbed one's only when
    # it has none. The latest entered month is kept so nobody enters twice.
    await conn.execute(
        "INSERT INTO engagement.member_birthdays AS b (member_id, month, day, entered_for)"
        " SELECT $2, month, day, entered_for FROM engagement.member_birthdays"
        " WHERE member_id = $1"
        " ON CONFLICT (member_id) DO UPDATE SET"
        " entered_for = greatest(b.entered_for, excluded.entered_for)",
        absorbed,
        survivor,
    )
    await conn.execute("DELETE FROM engagement.member_birthdays WHERE member_id = $1", absorbed)


async def unmerge_member(
    conn: Connection, merge_id: str, survivor: uuid.UUID, restored: uuid.UUID
) -> None:
    """Move back exactly what the merge moved (not what the survivor did since)."""
    await conn.execute(
        "UPDATE engagement.enrollments SET member_id = $3 WHERE member_id = $2"
        " AND enrollment_id::text IN (SELECT ref FROM engagement.merge_moves"
        "  WHERE merge_id = $1 AND kind = 'enrollment')",
        merge_id,
        survivor,
        restored,
    )
    await conn.execute(
        "UPDATE engagement.sends SET member_id = $3 WHERE member_id = $2"
        " AND (send_key IN (SELECT ref FROM engagement.merge_moves"
        "  WHERE merge_id = $1 AND kind = 'send')"
        " OR enrollment_id::text IN (SELECT ref FROM engagement.merge_moves"
        "  WHERE merge_id = $1 AND kind = 'enrollment'))",
        merge_id,
        survivor,
        restored,
    )


async def erase_member(conn: Connection, member_id: uuid.UUID, at: datetime) -> None:
    """Stop every journey and remove personal data; counts stay, anonymised."""
    await lock_member_timers(conn, [member_id])
    await conn.execute(
        "DELETE FROM engagement.timers WHERE enrollment_id IN"
        " (SELECT enrollment_id FROM engagement.enrollments WHERE member_id = $1)",
        member_id,
    )
    await conn.execute(
        "UPDATE engagement.enrollments SET status = CASE WHEN status = 'active' THEN 'erased'"
        " ELSE status END, ended_at = coalesce(ended_at, $2), member_id = NULL, waiting_step = NULL"
        " WHERE member_id = $1",
        member_id,
        at,
    )
    # Undelivered sends will never go; delivered ones keep no link to the person,
    # nor the content rendered for them (a nickname, a balance, a store).
    await conn.execute(
        "UPDATE engagement.sends SET status = CASE WHEN status = 'pending' THEN 'suppressed'"
        " ELSE status END, reason = CASE WHEN status = 'pending' THEN 'erased' ELSE reason END,"
        " member_id = NULL, payload = '{}'::jsonb WHERE member_id = $1",
        member_id,
    )
    for table in (
        "consents",
        "preferences",
        "subscription_credits",
        "channel_addresses",
        "member_tags",
        "member_locations",
        "member_birthdays",
        "cap_usage",
        "parked_events",
        "member_facts",
    ):
        await conn.execute(f"DELETE FROM engagement.{table} WHERE member_id = $1", member_id)
    await conn.execute(
        "UPDATE engagement.reward_requests SET member_id = NULL WHERE member_id = $1", member_id
    )
