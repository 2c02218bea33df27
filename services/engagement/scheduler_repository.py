"""SQL of the scheduler (asyncpg; schema-qualified): claiming due steps,
reserving frequency caps, writing sends, reward requests and timer moves, and
the dispatch leases of pending sends and reward requests.

The statements are set-based (unnest arrays): one claim, one cap reservation,
one send insert and one timer/enrollment update per batch, so a batch of a
thousand due steps costs a handful of round trips.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

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
    # The entering event's attributes (template variables).
    entry_attributes: dict[str, str] = field(default_factory=dict)


async def claim_due(conn: Connection, now: datetime, limit: int) -> list[DueStep]:
    """Due, unpaused timers, oldest first and, among steps due together, the most
    valuable first; rows other sweepers hold are skipped."""
    rows = await conn.fetch(
        "SELECT t.enrollment_id, t.step_id, t.due_at, t.attempts, e.journey_id, e.version,"
        " e.member_id, e.seq, e.variant, e.grp, e.entry_attributes::text AS attrs"
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
            json.loads(r["attrs"] or "{}"),
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
    since, until = local_days_bounds([c[1] for c in contests])
    rows = await conn.fetch(
        "UPDATE engagement.sends s SET status = 'capped', reason = 'PREEMPTED',"
        " next_attempt_at = NULL, updated_at = $5"
        " FROM (SELECT h.send_key, h.created_at"
        "  FROM unnest($1::uuid[], $2::date[], $3::text[], $4::int[]) AS r(m, d, k, p),"
        "  LATERAL (SELECT send_key, created_at FROM engagement.sends"
        "   WHERE member_id = r.m AND local_day = r.d AND message_class = r.k"
        "   AND status = 'pending' AND attempts = 0 AND priority < r.p"
        "   AND created_at >= $6 AND created_at < $7"
        "   ORDER BY priority LIMIT 1 FOR UPDATE SKIP LOCKED) h) v"
        " WHERE s.send_key = v.send_key AND s.created_at = v.created_at"
        " AND s.created_at >= $6 AND s.created_at < $7"
        " RETURNING s.member_id, s.local_day, s.message_class",
        [c[0] for c in contests],
        [c[1] for c in contests],
        [c[2] for c in contests],
        [c[3] for c in contests],
        now,
        since,
        until,
    )
    return {(str(r["member_id"]), r["local_day"], r["message_class"]) for r in rows}


# A send's local_day is its member's local day at created_at (scheduler.py);
# zones are UTC-12..UTC+14, so created_at lies within a day either side of it.
def local_days_bounds(days: list[date]) -> tuple[datetime, datetime]:
    """The created_at range holding every send of these local days: the cap
    holder's lookup reads the one or two partitions it covers."""
    first = datetime.combine(min(days), time(), UTC) - timedelta(days=1)
    last = datetime.combine(max(days), time(), UTC) + timedelta(days=2)
    return first, last


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
    # The rendered provider content (templates.render); empty for sends that never go.
    payload: dict[str, object] = field(default_factory=dict)
    # The reason's machine code when a send is written already failed (a template
    # that cannot be filled for this member).
    error_code: str = ""
    # A mini-program send: the epoch of the subscription credit it took.
    credit_epoch: int | None = None


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
                    json.dumps(s.payload, ensure_ascii=False),
                    s.error_code,
                    s.credit_epoch,
                )
                for s in sends
            ],
            strict=True,
        )
    )
    await conn.execute(
        "INSERT INTO engagement.sends (send_key, enrollment_id, journey_id, version, step_id,"
        " member_id, channel, template, message_class, priority, local_day, status, reason,"
        " variant, created_at, updated_at, next_attempt_at, payload, error_code, credit_epoch)"
        " SELECT k, e, j, v, s, m, ch, t, mc, p, d, st, r, va, c, c,"
        "  CASE WHEN st = 'pending' THEN c END, pl::jsonb, ec, ce"
        " FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::uuid[],"
        "  $7::text[], $8::text[], $9::text[], $10::int[], $11::date[], $12::text[], $13::text[],"
        "  $14::text[], $15::timestamptz[], $16::text[], $17::text[], $18::int[])"
        "  AS u(k, e, j, v, s, m, ch, t, mc, p, d, st, r, va, c, pl, ec, ce)"
        # A key written before, in any month, is skipped by the claim_send_keys
        # trigger (send_keys); the primary key (send_key, created_at) by this.
        " ON CONFLICT DO NOTHING",
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
    payload: dict[str, object] = field(default_factory=dict)
    credit_epoch: int | None = None


# The reasons of a send left `sending` on purpose after the provider call.
ACCEPTED = "ACCEPTED"  # an SMS the provider took: its delivery report settles it
TASK_CREATED = "TASK_CREATED"  # a WeCom task: the staff member's send settles it


async def expire_in_flight(
    conn: Connection, now: datetime, resend_channels: list[str], limit: int
) -> int:
    """Sends whose dispatcher died during the provider call (their lease ran out
    while `sending`, no provider answer recorded): nobody knows whether the
    provider took them, and providers have no idempotency key, so they become
    `unknown` and are not sent again; on a channel configured to resend
    uncertain outcomes they go back to `pending`.

    An accepted SMS waits for its delivery report until its receipt cut-off
    (next_attempt_at): past it, it is `unknown` (NO_RECEIPT) on every channel,
    since the provider did take it (a late report still settles it). A WeCom
    task (TASK_CREATED) is left to the task results job."""
    rows = await conn.fetch(
        "UPDATE engagement.sends s SET"
        " status = CASE WHEN s.reason <> $4 AND s.channel = ANY($2::text[])"
        "  THEN 'pending' ELSE 'unknown' END,"
        " reason = CASE WHEN s.reason = $4 THEN 'NO_RECEIPT' ELSE 'LEASE_EXPIRED' END,"
        " updated_at = $1,"
        " next_attempt_at = CASE WHEN s.reason <> $4 AND s.channel = ANY($2::text[])"
        "  THEN $1 END"
        " WHERE (s.send_key, s.created_at) IN (SELECT send_key, created_at FROM engagement.sends"
        "  WHERE status = 'sending' AND next_attempt_at <= $1 AND reason <> $5"
        "  ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING s.send_key",
        now,
        resend_channels,
        limit,
        ACCEPTED,
        TASK_CREATED,
    )
    return len(rows)


async def lease_pending_sends(
    conn: Connection, now: datetime, lease_until: datetime, limit: int
) -> list[OutboundRow]:
    """Move due pending sends to `sending` for one provider call each; the
    lease (next_attempt_at) is how a dead dispatcher's calls are found."""
    rows = await conn.fetch(
        "UPDATE engagement.sends s SET status = 'sending', attempts = s.attempts + 1,"
        " next_attempt_at = $2, updated_at = $1"
        " WHERE (s.send_key, s.created_at) IN (SELECT send_key, created_at FROM engagement.sends"
        "  WHERE status = 'pending' AND next_attempt_at <= $1"
        "  ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING s.send_key, s.member_id, s.channel, s.template, s.attempts,"
        " s.message_class, s.local_day, s.payload::text AS payload, s.credit_epoch",
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
            json.loads(r["payload"] or "{}"),
            r["credit_epoch"],
        )
        for r in rows
    ]


# Writes by send key read only the partitions holding those sends: send_keys
# holds each send's created_at, and the span of the batch's (scalar
# subqueries, run first) prunes the other partitions as the statement starts.
# ($1 is the keys' text[]; a join to send_keys would not prune, PostgreSQL 15
# prunes an UPDATE's partitions by parameters, not by a join's rows.)
KEYS_SPAN = (
    " AND s.created_at >= (SELECT min(created_at) FROM engagement.send_keys"
    "  WHERE send_key = ANY($1::text[]))"
    " AND s.created_at <= (SELECT max(created_at) FROM engagement.send_keys"
    "  WHERE send_key = ANY($1::text[]))"
)

SET_CREDIT_EPOCH_SQL = (
    "UPDATE engagement.sends SET credit_epoch = $2 WHERE send_key = $1"
    " AND created_at = (SELECT created_at FROM engagement.send_keys WHERE send_key = $1)"
)


async def set_credit_epoch(conn: Connection, send_key: str, epoch: int) -> None:
    """A send whose voided credit was replaced by a fresh one (a tap since)."""
    await conn.execute(SET_CREDIT_EPOCH_SQL, send_key, epoch)


@dataclass(frozen=True)
class Outcome:
    """What one dispatch attempt ended in, as recorded."""

    send_key: str
    status: str  # pending (retry) | sending (accepted, awaiting a receipt) | final statuses
    reason: str = ""
    provider_ref: str = ""
    error_code: str = ""
    next_attempt_at: datetime | None = None


async def record_outcomes(conn: Connection, results: list[Outcome], now: datetime) -> None:
    """Only a send still in flight (pending or sending) takes an outcome: a
    receipt or an operator that settled it first is never overwritten."""
    if results:
        await conn.execute(
            "UPDATE engagement.sends s SET status = u.st, reason = u.r,"
            " provider_ref = nullif(u.ref, ''), error_code = u.ec,"
            " next_attempt_at = u.nxt, updated_at = $7"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
            "  $6::timestamptz[]) AS u(k, st, r, ref, ec, nxt)"
            " WHERE s.send_key = u.k AND s.status IN ('pending', 'sending')" + KEYS_SPAN,
            [o.send_key for o in results],
            [o.status for o in results],
            [o.reason for o in results],
            [o.provider_ref for o in results],
            [o.error_code for o in results],
            [o.next_attempt_at for o in results],
            now,
        )


@dataclass(frozen=True)
class WeComTask:
    """A WeCom send whose task waits for the staff member."""

    send_key: str
    msgid: str
    # When the task was created (the send's updated_at, which waiting keeps).
    created_at: datetime


async def lease_wecom_tasks(
    conn: Connection, now: datetime, lease_until: datetime, limit: int
) -> list[WeComTask]:
    """Due waiting WeCom tasks, leased to one results reader for a while (a
    reader that dies leaves them to be read again: reading changes nothing).
    updated_at is left alone: it is when the task was created."""
    rows = await conn.fetch(
        "UPDATE engagement.sends s SET next_attempt_at = $2"
        " WHERE (s.send_key, s.created_at) IN (SELECT send_key, created_at FROM engagement.sends"
        "  WHERE status = 'sending' AND next_attempt_at <= $1 AND reason = $4"
        "  ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
        " RETURNING s.send_key, s.provider_ref, s.updated_at",
        now,
        lease_until,
        limit,
        TASK_CREATED,
    )
    return [WeComTask(r["send_key"], r["provider_ref"] or "", r["updated_at"]) for r in rows]


async def postpone_wecom_tasks(conn: Connection, keys: list[str], at: datetime) -> None:
    """Tasks the staff member has not sent yet: look again at `at`."""
    if keys:
        await conn.execute(
            "UPDATE engagement.sends s SET next_attempt_at = $2"
            " WHERE s.send_key = ANY($1::text[]) AND s.status = 'sending' AND s.reason = $3"
            + KEYS_SPAN,
            keys,
            at,
            TASK_CREATED,
        )


@dataclass(frozen=True)
class Receipt:
    """A provider's delivery report of one SMS (Aliyun SmsReport)."""

    send_key: str  # the OutId we sent
    provider_ref: str  # the BizId the provider answered
    delivered: bool
    error_code: str = ""
    reported_at: datetime | None = None


APPLY_RECEIPTS_SQL = (
    "UPDATE engagement.sends s SET"
    " status = CASE WHEN u.ok THEN 'delivered' ELSE 'failed' END,"
    " error_code = CASE WHEN u.ok THEN '' ELSE u.ec END,"
    " reason = CASE WHEN u.ok THEN 'RECEIPT' ELSE 'RECEIPT: ' || u.ec END,"
    " provider_ref = u.ref, receipt_at = coalesce(u.at, $6), next_attempt_at = NULL,"
    " updated_at = $6"
    " FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::timestamptz[])"
    "  AS u(k, ref, ok, ec, at)"
    " WHERE s.send_key = u.k AND s.channel = 'sms' AND s.status IN ('sending', 'unknown')"
    " AND (s.provider_ref IS NULL OR s.provider_ref = u.ref)" + KEYS_SPAN + " RETURNING s.send_key"
    # Reports days after the send read the partitions of their sends only.
)


async def apply_receipts(conn: Connection, receipts: list[Receipt], now: datetime) -> int:
    """Settle SMS sends from their delivery reports, once: a report applies to
    a send still `sending` (accepted) or `unknown` (the call's answer was lost,
    the report says what happened) whose provider reference matches; a
    repeated report finds it settled and changes nothing. Returns how many applied."""
    if not receipts:
        return 0
    rows = await conn.fetch(
        APPLY_RECEIPTS_SQL,
        [r.send_key for r in receipts],
        [r.provider_ref for r in receipts],
        [r.delivered for r in receipts],
        [r.error_code for r in receipts],
        [r.reported_at for r in receipts],
        now,
    )
    return len(rows)


@dataclass(frozen=True)
class SendCount:
    step_id: str
    channel: str
    status: str
    error_code: str
    count: int


async def send_counts(conn: Connection, journey_id: str) -> list[SendCount]:
    """Sends of a journey by step, channel, status and provider error code."""
    rows = await conn.fetch(
        "SELECT step_id, channel, status, error_code, count(*) AS n FROM engagement.sends"
        " WHERE journey_id = $1 GROUP BY step_id, channel, status, error_code"
        " ORDER BY step_id, channel, status, error_code",
        journey_id,
    )
    return [
        SendCount(r["step_id"], r["channel"], r["status"], r["error_code"], r["n"]) for r in rows
    ]


@dataclass(frozen=True)
class UnknownSend:
    send_key: str
    step_id: str
    channel: str
    member_id: uuid.UUID | None
    reason: str
    attempts: int
    updated_at: datetime


async def unknown_sends(
    conn: Connection, journey_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[UnknownSend]:
    """A journey's sends whose outcome is unknown, oldest first; `after` is the
    last row of the previous page (updated_at, send_key)."""
    rows = await conn.fetch(
        "SELECT send_key, step_id, channel, member_id, reason, attempts, updated_at"
        " FROM engagement.sends WHERE journey_id = $1 AND status = 'unknown'"
        " AND ($2::timestamptz IS NULL OR (updated_at, send_key) > ($2, $3))"
        " ORDER BY updated_at, send_key LIMIT $4",
        journey_id,
        after[0] if after else None,
        after[1] if after else "",
        limit,
    )
    return [
        UnknownSend(
            r["send_key"],
            r["step_id"],
            r["channel"],
            r["member_id"],
            r["reason"],
            r["attempts"],
            r["updated_at"],
        )
        for r in rows
    ]


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
