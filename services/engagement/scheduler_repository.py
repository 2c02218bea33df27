"""SQL of the scheduler (asyncpg; schema-qualified): claiming due steps,
reserving frequency caps, writing sends, reward requests and timer moves, and
the dispatch leases of pending sends and reward requests.

The statements are set-based (unnest arrays): one claim, one cap reservation,
one send insert and one timer/enrollment update per batch, so a batch of a
thousand due steps costs a handful of round trips.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime

from servicekit.db import Connection

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
    grp: str = "treatment"


async def claim_due(conn: Connection, now: datetime, limit: int) -> list[DueStep]:
    """Due, unpaused timers, oldest first and, among steps due together, the most
    valuable first; rows other sweepers hold are skipped."""
    rows = await conn.fetch(
        "SELECT t.enrollment_id, t.step_id, t.due_at, t.attempts, e.journey_id, e.version,"
        " e.member_id, e.seq, e.variant, e.grp"
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
            r["grp"],
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
    message_class: str = "transactional"
    local_day: date | None = None


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
        " RETURNING s.send_key, s.member_id, s.channel, s.template, s.attempts,"
        " s.message_class, s.local_day",
        now,
        lease_until,
        limit,
    )
    return [
        OutboundRow(
            r["send_key"],
            r["member_id"],
            r["channel"],
            r["template"],
            r["attempts"],
            r["message_class"],
            r["local_day"],
        )
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
