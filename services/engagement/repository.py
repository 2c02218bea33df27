"""SQL of the engagement service (asyncpg; statements are schema-qualified).

The scheduler's statements are set-based (unnest arrays): one claim, one cap
reservation, one send insert and one timer/enrollment update per batch, so a
batch of a thousand due steps costs a handful of round trips.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from servicekit.db import Connection

from .domain import DEFAULT_TZ, MemberFacts

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


async def entry_journeys(conn: Connection, event: str) -> list[tuple[str, int]]:
    rows = await conn.fetch(
        "SELECT journey_id, live_version FROM engagement.journey_state"
        " WHERE entry_event = $1 AND status = 'active'",
        event,
    )
    return [(r["journey_id"], r["live_version"]) for r in rows]


# ---- member facts, consent, addresses ------------------------------------------


async def member_known(conn: Connection, member_id: uuid.UUID) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT true FROM engagement.member_facts WHERE member_id = $1", member_id
        )
    )


async def ensure_member(conn: Connection, member_id: uuid.UUID) -> None:
    await conn.execute(
        "INSERT INTO engagement.member_facts (member_id) VALUES ($1) ON CONFLICT DO NOTHING",
        member_id,
    )


async def set_fact(conn: Connection, member_id: uuid.UUID, fact: str, value: str) -> None:
    assert fact in ("tier", "segment", "stage")
    await conn.execute(
        f"INSERT INTO engagement.member_facts (member_id, {fact}) VALUES ($1, $2)"
        f" ON CONFLICT (member_id) DO UPDATE SET {fact} = excluded.{fact}, updated_at = now()",
        member_id,
        value,
    )


async def count_order(conn: Connection, member_id: uuid.UUID) -> int:
    """Count one order (the consumer's processed_events makes redelivery harmless);
    returns the member's order count after it."""
    return int(
        await conn.fetchval(
            "INSERT INTO engagement.member_facts AS f (member_id, order_count) VALUES ($1, 1)"
            " ON CONFLICT (member_id) DO UPDATE"
            " SET order_count = f.order_count + 1, updated_at = now()"
            " RETURNING order_count",
            member_id,
        )
    )


async def load_facts(conn: Connection, member_ids: list[uuid.UUID]) -> dict[str, MemberFacts]:
    """Facts, tags, consent and the non-personalised choice of many members:
    three index scans, whatever the batch size."""
    rows = await conn.fetch(
        "SELECT f.member_id, f.tz, f.tier, f.segment, f.stage, f.order_count,"
        " coalesce(p.non_personalised, false) AS np"
        " FROM engagement.member_facts f"
        " LEFT JOIN engagement.preferences p ON p.member_id = f.member_id"
        " WHERE f.member_id = ANY($1::uuid[])",
        member_ids,
    )
    consents: dict[str, dict[str, bool]] = {}
    for r in await conn.fetch(
        "SELECT member_id, channel, granted FROM engagement.consents"
        " WHERE member_id = ANY($1::uuid[])",
        member_ids,
    ):
        consents.setdefault(str(r["member_id"]), {})[r["channel"]] = r["granted"]
    tags: dict[str, set[str]] = {}
    for r in await conn.fetch(
        "SELECT member_id, tag FROM engagement.member_tags WHERE member_id = ANY($1::uuid[])",
        member_ids,
    ):
        tags.setdefault(str(r["member_id"]), set()).add(r["tag"])
    out: dict[str, MemberFacts] = {}
    for r in rows:
        mid = str(r["member_id"])
        out[mid] = MemberFacts(
            member_id=mid,
            tz=r["tz"] or DEFAULT_TZ,
            tier=r["tier"],
            segment=r["segment"],
            stage=r["stage"],
            order_count=r["order_count"],
            non_personalised=r["np"],
            tags=frozenset(tags.get(mid, ())),
            consents=consents.get(mid, {}),
        )
    return out


async def set_consent(
    conn: Connection,
    member_id: uuid.UUID,
    channels: list[str],
    granted: bool,
    source: str,
    at: datetime,
) -> None:
    await conn.executemany(
        "INSERT INTO engagement.consents (member_id, channel, granted, source, updated_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (member_id, channel) DO UPDATE SET"
        " granted = excluded.granted, source = excluded.source, updated_at = excluded.updated_at",
        [(member_id, c, granted, source, at) for c in channels],
    )


async def apply_consent(
    conn: Connection,
    member_id: uuid.UUID,
    channels: list[str],
    granted: bool,
    source: str,
    at: datetime,
) -> None:
    """A choice recorded elsewhere at `at`: last write wins, so an older one
    arriving late never overwrites a newer choice; at the same instant a
    refusal wins. Replaying the same choice changes nothing."""
    await conn.executemany(
        "INSERT INTO engagement.consents AS c (member_id, channel, granted, source, updated_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (member_id, channel) DO UPDATE SET"
        " granted = excluded.granted, source = excluded.source, updated_at = excluded.updated_at"
        " WHERE c.updated_at < excluded.updated_at"
        " OR (c.updated_at = excluded.updated_at AND NOT excluded.granted)",
        [(member_id, c, granted, source, at) for c in channels],
    )


async def apply_non_personalised(
    conn: Connection, member_id: uuid.UUID, value: bool, at: datetime
) -> None:
    """Last write wins by `at`, as apply_consent; at the same instant the
    refusal of personalisation wins."""
    await conn.execute(
        "INSERT INTO engagement.preferences AS p (member_id, non_personalised, updated_at)"
        " VALUES ($1, $2, $3) ON CONFLICT (member_id) DO UPDATE SET"
        " non_personalised = excluded.non_personalised, updated_at = excluded.updated_at"
        " WHERE p.updated_at < excluded.updated_at"
        " OR (p.updated_at = excluded.updated_at AND excluded.non_personalised)",
        member_id,
        value,
        at,
    )


async def set_non_personalised(
    conn: Connection, member_id: uuid.UUID, value: bool, at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO engagement.preferences (member_id, non_personalised, updated_at)"
        " VALUES ($1, $2, $3) ON CONFLICT (member_id) DO UPDATE SET"
        " non_personalised = excluded.non_personalised, updated_at = excluded.updated_at",
        member_id,
        value,
        at,
    )


async def add_subscription_credit(conn: Connection, member_id: uuid.UUID, template: str) -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO engagement.subscription_credits AS s (member_id, template, credits)"
            " VALUES ($1, $2, 1) ON CONFLICT (member_id, template)"
            " DO UPDATE SET credits = s.credits + 1 RETURNING credits",
            member_id,
            template,
        )
    )


async def take_subscription_credit(conn: Connection, member_id: uuid.UUID, template: str) -> bool:
    """Atomic: a credit is spent by at most one send."""
    return bool(
        await conn.fetchval(
            "UPDATE engagement.subscription_credits SET credits = credits - 1"
            " WHERE member_id = $1 AND template = $2 AND credits > 0 RETURNING true",
            member_id,
            template,
        )
    )


async def set_address(conn: Connection, member_id: uuid.UUID, channel: str, address: str) -> None:
    await conn.execute(
        "INSERT INTO engagement.channel_addresses (member_id, channel, address)"
        " VALUES ($1, $2, $3) ON CONFLICT (member_id, channel) DO UPDATE SET"
        " address = excluded.address",
        member_id,
        channel,
        address,
    )


async def addresses(conn: Connection, member_ids: list[uuid.UUID]) -> dict[tuple[str, str], str]:
    rows = await conn.fetch(
        "SELECT member_id, channel, address FROM engagement.channel_addresses"
        " WHERE member_id = ANY($1::uuid[])",
        member_ids,
    )
    return {(str(r["member_id"]), r["channel"]): r["address"] for r in rows}


async def set_birthday(conn: Connection, member_id: uuid.UUID, month: int, day: int) -> None:
    """Month and day only; month 0 forgets the birthday. Changing it keeps
    `entered_for`, so a member does not enter twice for the same month."""
    if month == 0:
        await conn.execute(
            "DELETE FROM engagement.member_birthdays WHERE member_id = $1", member_id
        )
        return
    await conn.execute(
        "INSERT INTO engagement.member_birthdays (member_id, month, day) VALUES ($1, $2, $3)"
        " ON CONFLICT (member_id) DO UPDATE SET month = excluded.month, day = excluded.day",
        member_id,
        month,
        day,
    )


async def claim_birthdays(
    conn: Connection, month: int, entered_for: int, limit: int
) -> list[tuple[uuid.UUID, int]]:
    """Members born in `month` not yet entered for it, marked entered (the
    caller enrolls them in the same transaction). Reads only the index range
    of the not-yet-entered: the daily difference, not a rescan."""
    rows = await conn.fetch(
        "UPDATE engagement.member_birthdays b SET entered_for = $2"
        " WHERE b.member_id IN (SELECT member_id FROM engagement.member_birthdays"
        "  WHERE month = $1 AND entered_for < $2 LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING b.member_id, b.day",
        month,
        entered_for,
        limit,
    )
    return [(r["member_id"], r["day"]) for r in rows]


async def set_location(
    conn: Connection, member_id: uuid.UUID, lat: float, lon: float, at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO engagement.member_locations (member_id, latitude, longitude, reported_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (member_id) DO UPDATE SET"
        " latitude = excluded.latitude, longitude = excluded.longitude,"
        " reported_at = excluded.reported_at",
        member_id,
        lat,
        lon,
        at,
    )


async def clear_location(conn: Connection, member_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM engagement.member_locations WHERE member_id = $1", member_id)


async def members_near(
    conn: Connection,
    box: tuple[float, float, float, float],
    lat: float,
    lon: float,
    radius_m: float,
    since: datetime,
) -> list[uuid.UUID]:
    """Members whose last-known location (reported since `since`) is within
    `radius_m`: the bounding box uses the index, the haversine decides."""
    rows = await conn.fetch(
        "SELECT member_id FROM engagement.member_locations"
        " WHERE latitude BETWEEN $1 AND $2 AND longitude BETWEEN $3 AND $4"
        " AND reported_at >= $8"
        " AND 2 * 6371000 * asin(sqrt(power(sin(radians(latitude - $5) / 2), 2)"
        "  + cos(radians($5)) * cos(radians(latitude))"
        "  * power(sin(radians(longitude - $6) / 2), 2))) <= $7"
        " ORDER BY member_id",
        *box,
        lat,
        lon,
        radius_m,
        since,
    )
    return [r["member_id"] for r in rows]


async def add_tags(conn: Connection, pairs: list[tuple[uuid.UUID, str]]) -> None:
    if pairs:
        await conn.execute(
            "INSERT INTO engagement.member_tags (member_id, tag)"
            " SELECT * FROM unnest($1::uuid[], $2::text[]) ON CONFLICT DO NOTHING",
            [p[0] for p in pairs],
            [p[1] for p in pairs],
        )


async def park_event(
    conn: Connection,
    member_id: uuid.UUID,
    event: str,
    attributes: dict[str, str],
    occurred_at: datetime,
    reason: str,
) -> None:
    await conn.execute(
        "INSERT INTO engagement.parked_events (member_id, event, attributes, occurred_at, reason)"
        " VALUES ($1, $2, $3::jsonb, $4, $5)",
        member_id,
        event,
        json.dumps(attributes),
        occurred_at,
        reason,
    )


async def take_parked(
    conn: Connection, member_id: uuid.UUID
) -> list[tuple[str, dict[str, str], datetime]]:
    rows = await conn.fetch(
        "DELETE FROM engagement.parked_events WHERE member_id = $1"
        " RETURNING event, attributes::text AS attributes, occurred_at, id",
        member_id,
    )
    rows = sorted(rows, key=lambda r: r["id"])
    return [(r["event"], json.loads(r["attributes"]), r["occurred_at"]) for r in rows]


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
) -> bool:
    """False when the member already has a live enrollment in this journey."""
    inserted = await conn.fetchval(
        "INSERT INTO engagement.enrollments (enrollment_id, journey_id, version, member_id,"
        " status, grp, conversion_days, entered_at, ended_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $5::text = 'active' THEN NULL ELSE $8::timestamptz END)"
        " ON CONFLICT (journey_id, member_id) WHERE status = 'active' DO NOTHING RETURNING true",
        enrollment_id,
        journey_id,
        version,
        member_id,
        status,
        grp,
        conversion_days,
        entered_at,
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


# ---- the sweeper's batch statements ----------------------------------------------


@dataclass(frozen=True)
class DueStep:
    enrollment_id: uuid.UUID
    step_id: str
    due_at: datetime
    attempts: int
    journey_id: str
    version: int
    member_id: uuid.UUID
    seq: int
    variant: str | None


async def claim_due(conn: Connection, now: datetime, limit: int) -> list[DueStep]:
    """Due, unpaused timers, oldest first and, among steps due together, the most
    valuable first; rows other sweepers hold are skipped."""
    rows = await conn.fetch(
        "SELECT t.enrollment_id, t.step_id, t.due_at, t.attempts, e.journey_id, e.version,"
        " e.member_id, e.seq, e.variant"
        " FROM engagement.timers t JOIN engagement.enrollments e USING (enrollment_id)"
        " WHERE t.due_at <= $1 AND NOT t.paused"
        " ORDER BY t.due_at, t.priority DESC LIMIT $2"
        " FOR UPDATE OF t SKIP LOCKED",
        now,
        limit,
    )
    return [
        DueStep(
            r["enrollment_id"],
            r["step_id"],
            r["due_at"],
            r["attempts"],
            r["journey_id"],
            r["version"],
            r["member_id"],
            r["seq"],
            r["variant"],
        )
        for r in rows
    ]


async def reserve_caps(
    conn: Connection, wants: list[tuple[uuid.UUID, date, str, int, int]]
) -> dict[tuple[str, date, str], int]:
    """Reserve up to `want` slots of each (member, day, class) budget in ONE
    statement: the conditional upsert reads and raises `used` under the row
    lock, so two sweepers can never both take the last slot. Rows are locked
    in key order, so concurrent batches do not deadlock. Returns slots granted."""
    if not wants:
        return {}
    wants = sorted(wants)
    rows = await conn.fetch(
        "INSERT INTO engagement.cap_usage AS c"
        " (member_id, local_day, message_class, used, cap_limit, last_grant)"
        " SELECT m, d, k, least(w, l), l, least(w, l)"
        " FROM unnest($1::uuid[], $2::date[], $3::text[], $4::int[], $5::int[]) AS r(m, d, k, w, l)"
        " ORDER BY m, d, k"
        " ON CONFLICT (member_id, local_day, message_class) DO UPDATE SET"
        "  used = c.used + greatest(0, least(c.cap_limit - c.used, excluded.last_grant)),"
        "  last_grant = greatest(0, least(c.cap_limit - c.used, excluded.last_grant))"
        " RETURNING member_id, local_day, message_class, last_grant",
        [w[0] for w in wants],
        [w[1] for w in wants],
        [w[2] for w in wants],
        [w[3] for w in wants],
        [w[4] for w in wants],
    )
    return {
        (str(r["member_id"]), r["local_day"], r["message_class"]): r["last_grant"] for r in rows
    }


async def release_cap(conn: Connection, member_id: uuid.UUID, day: date, cls: str) -> None:
    """Give back a slot reserved in this transaction for a send that cannot go."""
    await conn.execute(
        "UPDATE engagement.cap_usage SET used = used - 1"
        " WHERE member_id = $1 AND local_day = $2 AND message_class = $3 AND used > 0",
        member_id,
        day,
        cls,
    )


async def preempt_holders(
    conn: Connection, contests: list[tuple[uuid.UUID, date, str, int]], now: datetime
) -> set[tuple[str, date, str]]:
    """For each (member, day, class, priority) whose budget is spent: take the
    slot from a less valuable send that holds it and has not gone to a provider
    yet (status pending, never leased; the row lock keeps the dispatcher out).
    Returns the budgets a slot was freed in."""
    if not contests:
        return set()
    contests = sorted(contests)
    rows = await conn.fetch(
        "UPDATE engagement.sends s SET status = 'capped', reason = 'PREEMPTED',"
        " next_attempt_at = NULL, updated_at = $5"
        " FROM (SELECT h.send_key FROM unnest($1::uuid[], $2::date[], $3::text[], $4::int[])"
        "   AS r(m, d, k, p),"
        "  LATERAL (SELECT send_key FROM engagement.sends"
        "   WHERE member_id = r.m AND local_day = r.d AND message_class = r.k"
        "   AND status = 'pending' AND attempts = 0 AND priority < r.p"
        "   ORDER BY priority LIMIT 1 FOR UPDATE SKIP LOCKED) h) v"
        " WHERE s.send_key = v.send_key"
        " RETURNING s.member_id, s.local_day, s.message_class",
        [c[0] for c in contests],
        [c[1] for c in contests],
        [c[2] for c in contests],
        [c[3] for c in contests],
        now,
    )
    return {(str(r["member_id"]), r["local_day"], r["message_class"]) for r in rows}


@dataclass(frozen=True)
class SendRow:
    send_key: str
    enrollment_id: uuid.UUID
    journey_id: str
    version: int
    step_id: str
    member_id: uuid.UUID
    channel: str
    template: str
    message_class: str
    priority: int
    local_day: date
    status: str
    reason: str
    variant: str | None
    created_at: datetime


async def insert_sends(conn: Connection, sends: list[SendRow]) -> None:
    if not sends:
        return
    cols = list(
        zip(
            *[
                (
                    s.send_key,
                    s.enrollment_id,
                    s.journey_id,
                    s.version,
                    s.step_id,
                    s.member_id,
                    s.channel,
                    s.template,
                    s.message_class,
                    s.priority,
                    s.local_day,
                    s.status,
                    s.reason,
                    s.variant,
                    s.created_at,
                )
                for s in sends
            ],
            strict=True,
        )
    )
    await conn.execute(
        "INSERT INTO engagement.sends (send_key, enrollment_id, journey_id, version, step_id,"
        " member_id, channel, template, message_class, priority, local_day, status, reason,"
        " variant, created_at, updated_at, next_attempt_at)"
        " SELECT k, e, j, v, s, m, ch, t, mc, p, d, st, r, va, c, c,"
        "  CASE WHEN st = 'pending' THEN c END"
        " FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::uuid[],"
        "  $7::text[], $8::text[], $9::text[], $10::int[], $11::date[], $12::text[], $13::text[],"
        "  $14::text[], $15::timestamptz[])"
        "  AS u(k, e, j, v, s, m, ch, t, mc, p, d, st, r, va, c)"
        " ON CONFLICT (send_key) DO NOTHING",
        *[list(c) for c in cols],
    )


async def insert_reward_requests(
    conn: Connection,
    rows: list[tuple[str, uuid.UUID, uuid.UUID, str, str, int, datetime]],
) -> None:
    if rows:
        cols = [list(c) for c in zip(*rows, strict=True)]
        await conn.execute(
            "INSERT INTO engagement.reward_requests (request_key, enrollment_id, member_id,"
            " kind, coupon, points, status, created_at, next_attempt_at)"
            " SELECT k, e, m, kd, c, p, 'pending', t, t FROM unnest($1::text[], $2::uuid[],"
            "  $3::uuid[], $4::text[], $5::text[], $6::int[], $7::timestamptz[])"
            "  AS u(k, e, m, kd, c, p, t)"
            " ON CONFLICT (request_key) DO NOTHING",
            *cols,
        )


async def move_timers(conn: Connection, moves: list[tuple[uuid.UUID, str, datetime]]) -> None:
    if moves:
        await conn.execute(
            "UPDATE engagement.timers t SET step_id = u.s, due_at = u.d, attempts = 0"
            " FROM unnest($1::uuid[], $2::text[], $3::timestamptz[]) AS u(e, s, d)"
            " WHERE t.enrollment_id = u.e",
            [m[0] for m in moves],
            [m[1] for m in moves],
            [m[2] for m in moves],
        )


async def delete_timers(conn: Connection, enrollment_ids: list[uuid.UUID]) -> None:
    if enrollment_ids:
        await conn.execute(
            "DELETE FROM engagement.timers WHERE enrollment_id = ANY($1::uuid[])", enrollment_ids
        )


async def update_enrollments(
    conn: Connection,
    rows: list[tuple[uuid.UUID, int, str | None, str | None, str, datetime | None]],
) -> None:
    """(enrollment_id, seq, variant, waiting_step, status, ended_at) for each."""
    if rows:
        cols = [list(c) for c in zip(*rows, strict=True)]
        await conn.execute(
            "UPDATE engagement.enrollments e SET seq = u.seq, variant = u.variant,"
            " waiting_step = u.waiting, status = u.status, ended_at = u.ended"
            " FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[],"
            "  $6::timestamptz[]) AS u(id, seq, variant, waiting, status, ended)"
            " WHERE e.enrollment_id = u.id",
            *cols,
        )


async def postpone_timer(conn: Connection, step: DueStep, due_at: datetime) -> int:
    """Postpone a failing step, unless the timer moved on meanwhile (0 then)."""
    return int(
        await conn.fetchval(
            "UPDATE engagement.timers SET due_at = $2, attempts = attempts + 1"
            " WHERE enrollment_id = $1 AND step_id = $3 AND due_at = $4 RETURNING attempts",
            step.enrollment_id,
            due_at,
            step.step_id,
            step.due_at,
        )
        or 0
    )


# ---- dispatch ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboundRow:
    send_key: str
    member_id: uuid.UUID | None
    channel: str
    template: str
    attempts: int


async def lease_pending_sends(
    conn: Connection, now: datetime, lease_until: datetime, limit: int
) -> list[OutboundRow]:
    """Take due pending sends for delivery; the lease (next_attempt_at) lets a
    crashed dispatcher's sends be retried, with the same idempotency key."""
    rows = await conn.fetch(
        "UPDATE engagement.sends s SET attempts = s.attempts + 1, next_attempt_at = $2,"
        " updated_at = $1"
        " WHERE s.send_key IN (SELECT send_key FROM engagement.sends"
        "  WHERE status = 'pending' AND next_attempt_at <= $1"
        "  ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING s.send_key, s.member_id, s.channel, s.template, s.attempts",
        now,
        lease_until,
        limit,
    )
    return [
        OutboundRow(r["send_key"], r["member_id"], r["channel"], r["template"], r["attempts"])
        for r in rows
    ]


async def record_deliveries(
    conn: Connection, results: list[tuple[str, str, str, str, datetime | None]], now: datetime
) -> None:
    """(send_key, status, reason, provider_ref, next_attempt_at) for each."""
    if results:
        cols = [list(c) for c in zip(*results, strict=True)]
        await conn.execute(
            "UPDATE engagement.sends s SET status = u.st, reason = u.r, provider_ref = u.ref,"
            " next_attempt_at = u.nxt, updated_at = $6"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])"
            "  AS u(k, st, r, ref, nxt)"
            " WHERE s.send_key = u.k AND s.status = 'pending'",
            *cols,
            now,
        )


@dataclass(frozen=True)
class RewardRequestRow:
    request_key: str
    member_id: uuid.UUID | None
    kind: str
    coupon: str
    points: int
    attempts: int


async def lease_reward_requests(
    conn: Connection, now: datetime, lease_until: datetime, limit: int
) -> list[RewardRequestRow]:
    rows = await conn.fetch(
        "UPDATE engagement.reward_requests r SET attempts = r.attempts + 1,"
        " next_attempt_at = $2"
        " WHERE r.request_key IN (SELECT request_key FROM engagement.reward_requests"
        "  WHERE status = 'pending' AND next_attempt_at <= $1"
        "  ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING r.request_key, r.member_id, r.kind, r.coupon, r.points, r.attempts",
        now,
        lease_until,
        limit,
    )
    return [
        RewardRequestRow(
            r["request_key"], r["member_id"], r["kind"], r["coupon"], r["points"], r["attempts"]
        )
        for r in rows
    ]


async def record_reward_results(
    conn: Connection, results: list[tuple[str, str, str, datetime | None]]
) -> None:
    """(request_key, status, reason, next_attempt_at) for each."""
    if results:
        cols = [list(c) for c in zip(*results, strict=True)]
        await conn.execute(
            "UPDATE engagement.reward_requests r SET status = u.st, reason = u.r,"
            " next_attempt_at = u.nxt"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])"
            "  AS u(k, st, r, nxt)"
            " WHERE r.request_key = u.k AND r.status = 'pending'",
            *cols,
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
    # Undelivered sends will never go; delivered ones keep no link to the person.
    await conn.execute(
        "UPDATE engagement.sends SET status = CASE WHEN status = 'pending' THEN 'suppressed'"
        " ELSE status END, reason = CASE WHEN status = 'pending' THEN 'erased' ELSE reason END,"
        " member_id = NULL WHERE member_id = $1",
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
