"""SQL of the tiering service (asyncpg; statements are schema-qualified)."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from servicekit.db import Connection

from .domain import (
    DEFAULT_RULES,
    QualifyingMetric,
    TierProgramme,
    parse_ladder,
    parse_metric,
    parse_rules,
)
from .evaluation import Change, GrowthFact, OrderFact, TierState


@dataclass(frozen=True)
class SpendRecord:
    member_id: str
    total_paid_fen: int
    order_count: int
    last_order_at: datetime | None


async def get_spend(conn: Connection, member_id: uuid.UUID) -> SpendRecord | None:
    row = await conn.fetchrow(
        "SELECT member_id, total_paid_fen, order_count, last_order_at"
        " FROM tiering.member_spend WHERE member_id = $1",
        member_id,
    )
    if row is None:
        return None
    return SpendRecord(
        str(row["member_id"]), row["total_paid_fen"], row["order_count"], row["last_order_at"]
    )


PROGRAMME_COLUMNS = (
    "programme_id, version, effective_from, qualifying_metric, window_months,"
    " ladder::text AS ladder, rules::text AS rules, note"
)


def _programme(row: asyncpg.Record) -> TierProgramme:
    return _parsed(
        row["programme_id"],
        row["version"],
        row["effective_from"],
        row["qualifying_metric"],
        row["window_months"],
        row["ladder"],
        row["rules"],
    )


@functools.lru_cache(maxsize=64)
def _parsed(
    programme_id: str,
    version: int,
    effective_from: datetime,
    qualifying_metric: str,
    window_months: int,
    ladder: str,
    rules_text: str,
) -> TierProgramme:
    """Parsed once per distinct row content: every event and every tier read
    loads the programme in force, and parsing its JSON was most of that cost.
    Keyed by the whole row, so a version rewritten in place (tests reseeding)
    is parsed afresh; TierProgramme is frozen, so sharing it is safe."""
    rules = json.loads(rules_text)
    return TierProgramme(
        programme_id=programme_id,
        version=version,
        effective_from=effective_from,
        qualifying_metric=parse_metric(qualifying_metric),
        window_months=window_months,
        ladder=parse_ladder(json.loads(ladder)),
        # '{}': a row written before programmes had rules runs on the defaults.
        rules=parse_rules(rules) if rules else DEFAULT_RULES,
    )


async def programme_at(conn: Connection, programme_id: str, at: datetime) -> TierProgramme | None:
    """The version of a programme in force at `at`: the latest effective_from not after it."""
    row = await conn.fetchrow(
        f"SELECT {PROGRAMME_COLUMNS} FROM tiering.tier_programmes"
        " WHERE programme_id = $1 AND effective_from <= $2"
        " ORDER BY effective_from DESC, version DESC LIMIT 1",
        programme_id,
        at,
    )
    return None if row is None else _programme(row)


async def programme_versions(
    conn: Connection, programme_id: str, at: datetime | None
) -> list[TierProgramme]:
    """Every version of a programme that took effect by `at` (None: all of
    them), oldest first: a member's periods are each decided under the
    version in force then."""
    rows = await conn.fetch(
        f"SELECT {PROGRAMME_COLUMNS} FROM tiering.tier_programmes"
        " WHERE programme_id = $1 AND ($2::timestamptz IS NULL OR effective_from <= $2)"
        " ORDER BY effective_from, version",
        programme_id,
        at,
    )
    return [_programme(r) for r in rows]


async def programme_version(
    conn: Connection, programme_id: str, version: int
) -> TierProgramme | None:
    row = await conn.fetchrow(
        f"SELECT {PROGRAMME_COLUMNS} FROM tiering.tier_programmes"
        " WHERE programme_id = $1 AND version = $2",
        programme_id,
        version,
    )
    return None if row is None else _programme(row)


async def programme_note(conn: Connection, programme_id: str, version: int) -> str:
    note = await conn.fetchval(
        "SELECT note FROM tiering.tier_programmes WHERE programme_id = $1 AND version = $2",
        programme_id,
        version,
    )
    return str(note or "")


async def latest_version(conn: Connection, programme_id: str, lock: bool = False) -> int:
    """Highest version stored (0 for none). With lock, serialises publishers of
    one programme on a transaction-scoped advisory lock."""
    if lock:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tiering.programme:' || $1))", programme_id
        )
    value = await conn.fetchval(
        "SELECT coalesce(max(version), 0) FROM tiering.tier_programmes WHERE programme_id = $1",
        programme_id,
    )
    return int(value)


async def insert_programme(conn: Connection, programme: TierProgramme, note: str = "") -> bool:
    """Store a programme version; False when that (programme_id, version) already exists.

    Versions are immutable once written: a change is a new version."""
    inserted = await conn.fetchval(
        "INSERT INTO tiering.tier_programmes"
        " (programme_id, version, effective_from, qualifying_metric, window_months, ladder,"
        "  rules, note)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8)"
        " ON CONFLICT (programme_id, version) DO NOTHING RETURNING true",
        programme.programme_id,
        programme.version,
        programme.effective_from,
        programme.qualifying_metric.value,
        programme.window_months,
        json.dumps(programme.ladder.to_json(), ensure_ascii=False),
        json.dumps(programme.rules.to_json(), ensure_ascii=False),
        note,
    )
    return bool(inserted)


# ---- facts: orders and the growth ledger ------------------------------------------


# A member's store for the dashboards (servicekit/metrics_definitions.py
# MEMBER_STORE), over a tiering.member_profiles row aliased p: the registration
# store, else the store of the latest order (migration 0012 keeps both).
MEMBER_STORE_SQL = "coalesce(p.registration_store_id, p.order_store_id)"


async def record_order(
    conn: Connection,
    order_id: str,
    member_id: uuid.UUID,
    at: datetime,
    paid_fen: int,
    growth: int,
    local_day: date,
    store_id: str = "",
) -> bool:
    """Count a completed order: its row, then, when it is new, the member's
    spend (last_order_at only moves forward: offline orders replayed late),
    its growth (kind 'order') and the store of the member's latest order on
    the profile (the dashboards' member store; it too only moves forward).
    One statement, one round trip per consumed order; the tables are
    distinct, so no part needs another's rows. False when the order is known
    already."""
    inserted = await conn.fetchval(
        "WITH o AS (INSERT INTO tiering.orders (order_id, member_id, ordered_at, paid_fen, growth)"
        "  VALUES ($1::text, $2::uuid, $3::timestamptz, $4::bigint, $5::bigint)"
        # An order id counted before, in any month, is skipped by the
        # claim_order_keys trigger (order_keys).
        "  ON CONFLICT DO NOTHING RETURNING member_id),"
        " s AS (INSERT INTO tiering.member_spend AS s"
        "  (member_id, total_paid_fen, order_count, last_order_at, updated_at)"
        "  SELECT member_id, $4, 1, $3, now() FROM o"
        "  ON CONFLICT (member_id) DO UPDATE SET"
        "   total_paid_fen = s.total_paid_fen + excluded.total_paid_fen,"
        "   order_count = s.order_count + 1,"
        "   last_order_at = greatest(s.last_order_at, excluded.last_order_at),"
        "   updated_at = now()),"
        " g AS (INSERT INTO tiering.growth_ledger"
        "  (member_id, kind, ref, points, occurred_at, local_day)"
        "  SELECT member_id, 'order', $1, $5, $3, $6::date FROM o"
        "  ON CONFLICT (kind, ref) DO NOTHING),"
        " p AS (INSERT INTO tiering.member_profiles AS p"
        "  (member_id, order_store_id, order_store_at)"
        "  SELECT member_id, $7::text, $3 FROM o WHERE $7::text <> ''"
        "  ON CONFLICT (member_id) DO UPDATE SET order_store_id = excluded.order_store_id,"
        "   order_store_at = excluded.order_store_at, updated_at = now()"
        "  WHERE p.order_store_at IS NULL OR p.order_store_at <= excluded.order_store_at)"
        " SELECT count(*) > 0 FROM o",
        order_id,
        member_id,
        at,
        paid_fen,
        growth,
        local_day,
        store_id,
    )
    return bool(inserted)


@dataclass(frozen=True)
class NewOrder:
    order_id: str
    member_id: uuid.UUID
    ordered_at: datetime
    paid_fen: int
    growth: int
    local_day: date
    store_id: str = ""


async def record_orders(conn: Connection, orders: list[NewOrder]) -> set[tuple[str, uuid.UUID]]:
    """`record_order` for orders of distinct members in one statement (a
    consumer's read); returns (order id, member) of the orders counted now
    (one id under two members: the first in the list counts, as one by one)."""
    if not orders:
        return set()
    if len(orders) == 1:
        o = orders[0]
        counted = await record_order(
            conn,
            o.order_id,
            o.member_id,
            o.ordered_at,
            o.paid_fen,
            o.growth,
            o.local_day,
            o.store_id,
        )
        return {(o.order_id, o.member_id)} if counted else set()
    rows = await conn.fetch(
        "WITH i AS (SELECT * FROM unnest($1::text[], $2::uuid[], $3::timestamptz[],"
        "  $4::bigint[], $5::bigint[], $6::date[], $7::text[])"
        "  AS t(order_id, member_id, ordered_at, paid_fen, growth, local_day, store_id)),"
        " o AS (INSERT INTO tiering.orders (order_id, member_id, ordered_at, paid_fen, growth)"
        "  SELECT order_id, member_id, ordered_at, paid_fen, growth FROM i"
        # As record_order: an id counted before is skipped (order_keys).
        "  ON CONFLICT DO NOTHING RETURNING order_id, member_id),"
        " n AS (SELECT i.* FROM i JOIN o USING (order_id, member_id)),"
        " s AS (INSERT INTO tiering.member_spend AS s"
        "  (member_id, total_paid_fen, order_count, last_order_at, updated_at)"
        "  SELECT member_id, paid_fen, 1, ordered_at, now() FROM n"
        "  ON CONFLICT (member_id) DO UPDATE SET"
        "   total_paid_fen = s.total_paid_fen + excluded.total_paid_fen,"
        "   order_count = s.order_count + 1,"
        "   last_order_at = greatest(s.last_order_at, excluded.last_order_at),"
        "   updated_at = now()),"
        " g AS (INSERT INTO tiering.growth_ledger"
        "  (member_id, kind, ref, points, occurred_at, local_day)"
        "  SELECT member_id, 'order', order_id, growth, ordered_at, local_day FROM n"
        "  ON CONFLICT (kind, ref) DO NOTHING),"
        " p AS (INSERT INTO tiering.member_profiles AS p"
        "  (member_id, order_store_id, order_store_at)"
        "  SELECT member_id, store_id, ordered_at FROM n WHERE store_id <> ''"
        "  ON CONFLICT (member_id) DO UPDATE SET order_store_id = excluded.order_store_id,"
        "   order_store_at = excluded.order_store_at, updated_at = now()"
        "  WHERE p.order_store_at IS NULL OR p.order_store_at <= excluded.order_store_at)"
        " SELECT order_id, member_id FROM o",
        [o.order_id for o in orders],
        [o.member_id for o in orders],
        [o.ordered_at for o in orders],
        [o.paid_fen for o in orders],
        [o.growth for o in orders],
        [o.local_day for o in orders],
        [o.store_id for o in orders],
    )
    return {(r["order_id"], r["member_id"]) for r in rows}


async def lock_members(conn: Connection, member_ids: Iterable[uuid.UUID]) -> None:
    """Serialise this transaction with an erasure of any of these members
    (transaction-scoped; in id order, so two callers never wait on each other
    in a cycle). One statement: volatile functions in the select list run
    after the ORDER BY."""
    members = sorted(set(member_ids))
    if len(members) == 1:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tiering.member:' || $1))", str(members[0])
        )
    elif members:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tiering.member:' || m::text))"
            " FROM unnest($1::uuid[]) AS m ORDER BY m",
            members,
        )


@dataclass(frozen=True)
class OrderRow:
    order_id: str
    # None once the member was erased.
    member_id: uuid.UUID | None
    ordered_at: datetime
    paid_fen: int
    refunded_fen: int
    growth: int


# A read or write by order id reads the order's one partition: order_keys
# holds its ordered_at (a scalar subquery, run first, prunes the others).
BY_ORDER_ID = (
    " WHERE order_id = $1"
    " AND ordered_at = (SELECT ordered_at FROM tiering.order_keys WHERE order_id = $1)"
)
LOCK_ORDER_SQL = (
    "SELECT order_id, member_id, ordered_at, paid_fen, refunded_fen, growth FROM tiering.orders"
    + BY_ORDER_ID
    + " FOR UPDATE"
)


async def lock_order(conn: Connection, order_id: str) -> OrderRow | None:
    """None also for an order whose month was archived (past the retention)."""
    row = await conn.fetchrow(LOCK_ORDER_SQL, order_id)
    return None if row is None else OrderRow(**dict(row))


async def set_order_refund(conn: Connection, order_id: str, refunded_fen: int, growth: int) -> None:
    await conn.execute(
        "UPDATE tiering.orders SET refunded_fen = $2, growth = $3" + BY_ORDER_ID,
        order_id,
        refunded_fen,
        growth,
    )


async def subtract_spend(conn: Connection, member_id: uuid.UUID, fen: int, orders: int) -> None:
    await conn.execute(
        "UPDATE tiering.member_spend SET total_paid_fen = greatest(total_paid_fen - $2, 0),"
        " order_count = greatest(order_count - $3, 0), updated_at = now() WHERE member_id = $1",
        member_id,
        fen,
        orders,
    )


async def insert_growth(
    conn: Connection,
    member_id: uuid.UUID,
    kind: str,
    ref: str,
    points: int,
    occurred_at: datetime,
    local_day: date,
) -> bool:
    inserted = await conn.fetchval(
        "INSERT INTO tiering.growth_ledger"
        " (member_id, kind, ref, points, occurred_at, local_day)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (kind, ref) DO NOTHING RETURNING true",
        member_id,
        kind,
        ref,
        points,
        occurred_at,
        local_day,
    )
    return bool(inserted)


async def growth_exists(conn: Connection, kind: str, ref: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT true FROM tiering.growth_ledger WHERE kind = $1 AND ref = $2", kind, ref
        )
    )


async def count_awards(
    conn: Connection, member_id: uuid.UUID, kind: str, first_day: date, last_day: date
) -> int:
    """Awards of `kind` (points > 0) on local days [first_day, last_day], for caps.
    Serialised per member by the caller's lock on the member's tier row."""
    value = await conn.fetchval(
        "SELECT count(*) FROM tiering.growth_ledger WHERE member_id = $1 AND kind = $2"
        " AND local_day BETWEEN $3 AND $4 AND points > 0",
        member_id,
        kind,
        first_day,
        last_day,
    )
    return int(value)


async def load_facts(
    conn: Connection, member_id: uuid.UUID, since: datetime | None = None
) -> tuple[list[OrderFact], list[GrowthFact]]:
    """A member's facts (all, or those after `since`) for evaluation in Python."""
    floor = since or datetime(1970, 1, 1, tzinfo=UTC)
    orders = await conn.fetch(
        "SELECT order_id, ordered_at, paid_fen, refunded_fen, growth FROM tiering.orders"
        " WHERE member_id = $1 AND ordered_at > $2",
        member_id,
        floor,
    )
    growth = await conn.fetch(
        "SELECT occurred_at, points FROM tiering.growth_ledger"
        " WHERE member_id = $1 AND occurred_at > $2",
        member_id,
        floor,
    )
    return (
        [
            OrderFact(r["order_id"], r["ordered_at"], r["paid_fen"], r["refunded_fen"], r["growth"])
            for r in orders
        ],
        [GrowthFact(r["occurred_at"], r["points"]) for r in growth],
    )


def metric_sql(metric: QualifyingMetric, alias: str = "") -> tuple[str, str]:
    """(table, aggregate) computing a metric; the same definition as
    evaluation.metric_from_facts."""
    p = f"{alias}." if alias else ""
    if metric is QualifyingMetric.GROWTH_VALUE:
        return "tiering.growth_ledger", f"coalesce(sum({p}points), 0)"
    if metric is QualifyingMetric.PAID_SPEND:
        return "tiering.orders", f"coalesce(sum({p}paid_fen - {p}refunded_fen), 0)"
    return "tiering.orders", f"count(*) FILTER (WHERE {p}refunded_fen < {p}paid_fen)"


def time_column(metric: QualifyingMetric) -> str:
    return "occurred_at" if metric is QualifyingMetric.GROWTH_VALUE else "ordered_at"


# ---- tier state and history --------------------------------------------------------


STATE_COLUMNS = (
    "programme_version, base_tier, earned_tier, period_start, period_end, peak, grace_until,"
    " override_tier, override_until, override_reason"
)


def _state(row: asyncpg.Record) -> TierState:
    return TierState(*(row[c.strip()] for c in STATE_COLUMNS.split(",")))


async def lock_tier_state(
    conn: Connection, member_id: uuid.UUID, programme_id: str | None = None
) -> tuple[TierState, datetime] | None:
    """The member's state and when it was last evaluated, locked for this
    transaction. With `programme_id`, a row decided under another programme
    (the brand switched programmes) is locked but answered as None."""
    row = await conn.fetchrow(
        f"SELECT {STATE_COLUMNS}, evaluated_at, programme_id FROM tiering.member_tiers"
        " WHERE member_id = $1 FOR UPDATE",
        member_id,
    )
    if row is None or (programme_id is not None and row["programme_id"] != programme_id):
        return None
    return _state(row), row["evaluated_at"]


async def tier_row(conn: Connection, member_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM tiering.member_tiers WHERE member_id = $1", member_id)
    return None if row is None else dict(row)


@dataclass(frozen=True)
class BadgeRow:
    latest_version: int | None  # the programme's newest stored version
    programme_id: str | None  # None: the member was never evaluated
    state: TierState | None
    metric: int
    # Without a tier row: whether the member has any order or growth at all.
    has_facts: bool


async def badge_row(
    conn: Connection,
    member_id: uuid.UUID,
    programme: TierProgramme,
    lo: datetime,
    now: datetime,
) -> BadgeRow:
    """One round trip for the POS badge: the member's tier row, M(now) under
    `programme` (the window (lo, now], metric_sql's definition), the
    programme's newest version (the caller's cache check) and, for a member
    without a row, whether any fact exists."""
    table, aggregate = metric_sql(programme.qualifying_metric)
    at = time_column(programme.qualifying_metric)
    row = await conn.fetchrow(
        f"SELECT (SELECT max(version) FROM tiering.tier_programmes WHERE programme_id = $2)"
        f" AS latest_version, t.programme_id, {STATE_COLUMNS},"
        f" (SELECT {aggregate} FROM {table} WHERE member_id = $1 AND {at} > $3 AND {at} <= $4)"
        " AS metric, t.member_id IS NULL AND ("
        "  EXISTS (SELECT 1 FROM tiering.orders WHERE member_id = $1)"
        "  OR EXISTS (SELECT 1 FROM tiering.growth_ledger WHERE member_id = $1)) AS has_facts"
        " FROM (VALUES (1)) one LEFT JOIN tiering.member_tiers t ON t.member_id = $1",
        member_id,
        programme.programme_id,
        lo,
        now,
    )
    assert row is not None  # the VALUES row is always there
    known = row["programme_id"] is not None
    return BadgeRow(
        row["latest_version"],
        row["programme_id"],
        _state(row) if known else None,
        int(row["metric"]),
        bool(row["has_facts"]),
    )


async def save_tier_state(
    conn: Connection,
    member_id: uuid.UUID,
    programme: TierProgramme,
    state: TierState,
    effective: str,
    evaluated_at: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO tiering.member_tiers AS t (member_id, programme_id, tier_code,"
        f" {STATE_COLUMNS}, evaluated_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, now())"
        " ON CONFLICT (member_id) DO UPDATE SET programme_id = excluded.programme_id,"
        " tier_code = excluded.tier_code, programme_version = excluded.programme_version,"
        " base_tier = excluded.base_tier, earned_tier = excluded.earned_tier,"
        " period_start = excluded.period_start, period_end = excluded.period_end,"
        " peak = excluded.peak, grace_until = excluded.grace_until,"
        " override_tier = excluded.override_tier, override_until = excluded.override_until,"
        " override_reason = excluded.override_reason, evaluated_at = excluded.evaluated_at,"
        " updated_at = now()",
        member_id,
        programme.programme_id,
        effective,
        state.programme_version,
        state.base_tier,
        state.earned_tier,
        state.period_start,
        state.period_end,
        state.peak,
        state.grace_until,
        state.override_tier,
        state.override_until,
        state.override_reason,
        evaluated_at,
    )


# tier_history columns in the order history_record fills them (the batch copies rows).
HISTORY_COLUMNS = (
    "member_id",
    "from_tier",
    "to_tier",
    "reason",
    "figures",
    "programme_id",
    "programme_version",
    "changed_at",
)


def history_record(
    member_id: uuid.UUID, programme: TierProgramme, change: Change
) -> tuple[Any, ...]:
    return (
        member_id,
        change.from_tier,
        change.to_tier,
        change.reason,
        json.dumps(change.figures, ensure_ascii=False, default=str),
        programme.programme_id,
        # The version that decided the change (an earlier one, replayed).
        change.version or programme.version,
        change.at,
    )


async def insert_history(
    conn: Connection,
    member_id: uuid.UUID,
    programme: TierProgramme,
    changes: list[Change],
) -> None:
    if not changes:
        return
    await conn.executemany(
        "INSERT INTO tiering.tier_history (member_id, from_tier, to_tier, reason, figures,"
        " programme_id, programme_version, changed_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)",
        [history_record(member_id, programme, c) for c in changes],
    )


@dataclass(frozen=True)
class HistoryRow:
    from_tier: str
    to_tier: str
    reason: str
    figures_json: str
    programme_version: int
    changed_at: datetime


async def history(conn: Connection, member_id: uuid.UUID, limit: int) -> list[HistoryRow]:
    rows = await conn.fetch(
        "SELECT from_tier, to_tier, reason, figures::text AS figures_json, programme_version,"
        " changed_at FROM tiering.tier_history WHERE member_id = $1"
        " ORDER BY changed_at DESC, entry_id DESC LIMIT $2",
        member_id,
        limit,
    )
    return [HistoryRow(**dict(r)) for r in rows]


async def simulate(
    conn: Connection, draft: TierProgramme, lo: datetime, now: datetime, base_code: str
) -> list[tuple[str, int, bool, int]]:
    """(current tier, draft rank by today's metric, metric >= the draft's retention
    bar of the current tier, members) for every member tiering knows."""
    table, aggregate = metric_sql(draft.qualifying_metric)
    column = time_column(draft.qualifying_metric)
    codes = [t.code for t in draft.ladder.tiers]
    thresholds = [t.threshold for t in draft.ladder.tiers]
    retention = [t.retention_bar for t in draft.ladder.tiers]
    rows = await conn.fetch(
        f"WITH m AS (SELECT member_id, {aggregate} AS metric FROM {table}"
        f"  WHERE {column} > $1 AND {column} <= $2 AND member_id IS NOT NULL"
        "  GROUP BY member_id),"
        " everyone AS (SELECT coalesce(t.member_id, m.member_id) AS member_id,"
        "  coalesce(t.tier_code, $3) AS current, coalesce(m.metric, 0) AS metric"
        "  FROM tiering.member_tiers t FULL JOIN m ON m.member_id = t.member_id),"
        " ranked AS (SELECT current, metric,"
        "  (SELECT count(*) FROM unnest($4::bigint[]) th WHERE th <= metric) - 1 AS draft_rank,"
        "  array_position($5::text[], current) AS cur_pos FROM everyone)"
        " SELECT current, draft_rank::int AS draft_rank,"
        "  coalesce(metric >= ($6::bigint[])[cur_pos], false) AS above_retention,"
        "  count(*) AS members FROM ranked GROUP BY 1, 2, 3",
        lo,
        now,
        base_code,
        thresholds,
        codes,
        retention,
    )
    return [
        (r["current"], max(r["draft_rank"], 0), r["above_retention"], r["members"]) for r in rows
    ]


# ---- merges --------------------------------------------------------------------------

MOVABLE = ("tiering.orders", "tiering.growth_ledger", "tiering.tier_history")


async def merge_exists(conn: Connection, merge_id: str) -> bool:
    return bool(
        await conn.fetchval("SELECT true FROM tiering.member_merges WHERE merge_id = $1", merge_id)
    )


async def member_snapshot(conn: Connection, member_id: uuid.UUID) -> dict[str, Any]:
    """What a merge changes for one member, as JSON-able values."""
    tier = await conn.fetchrow(
        "SELECT programme_id, tier_code, programme_version, base_tier, earned_tier,"
        " period_start, period_end, peak, grace_until, override_tier, override_until,"
        " override_reason, evaluated_at FROM tiering.member_tiers WHERE member_id = $1",
        member_id,
    )
    registered = await conn.fetchval(
        "SELECT registered_at FROM tiering.member_profiles WHERE member_id = $1", member_id
    )

    def js(value: Any) -> Any:
        return value.isoformat() if isinstance(value, datetime) else value

    return {
        "tier": {k: js(v) for k, v in dict(tier).items()} if tier else None,
        "registered_at": js(registered),
    }


async def insert_merge(
    conn: Connection,
    merge_id: str,
    survivor: uuid.UUID,
    absorbed: uuid.UUID,
    survivor_before: dict[str, Any],
    absorbed_before: dict[str, Any],
    merged_at: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO tiering.member_merges (merge_id, survivor_id, absorbed_id,"
        " survivor_before, absorbed_before, merged_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6)",
        merge_id,
        survivor,
        absorbed,
        json.dumps(survivor_before),
        json.dumps(absorbed_before),
        merged_at,
    )


async def lock_merge(conn: Connection, merge_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT merge_id, survivor_id, absorbed_id, survivor_before::text AS survivor_before,"
        " absorbed_before::text AS absorbed_before, unmerged_at FROM tiering.member_merges"
        " WHERE merge_id = $1 FOR UPDATE",
        merge_id,
    )
    if row is None:
        return None
    out = dict(row)
    out["survivor_before"] = json.loads(out["survivor_before"])
    out["absorbed_before"] = json.loads(out["absorbed_before"])
    return out


async def mark_unmerged(conn: Connection, merge_id: str, at: datetime) -> None:
    await conn.execute(
        "UPDATE tiering.member_merges SET unmerged_at = $2 WHERE merge_id = $1", merge_id, at
    )


async def move_facts(conn: Connection, source: uuid.UUID, target: uuid.UUID) -> None:
    """Everything `source` owns goes to `target`, remembering where it came from."""
    for table in MOVABLE:
        await conn.execute(
            f"UPDATE {table} SET member_id = $2, merged_from = $1 WHERE member_id = $1",
            source,
            target,
        )


async def move_facts_back(conn: Connection, survivor: uuid.UUID, restored: uuid.UUID) -> None:
    for table in MOVABLE:
        await conn.execute(
            f"UPDATE {table} SET member_id = $2, merged_from = NULL"
            " WHERE member_id = $1 AND merged_from = $2",
            survivor,
            restored,
        )


async def delete_member_rows(conn: Connection, member_id: uuid.UUID) -> None:
    for table in ("tiering.member_tiers", "tiering.member_profiles", "tiering.member_spend"):
        await conn.execute(f"DELETE FROM {table} WHERE member_id = $1", member_id)


async def rebuild_spend(conn: Connection, member_id: uuid.UUID) -> None:
    """member_spend from the member's orders (after facts moved between members)."""
    await conn.execute(
        "INSERT INTO tiering.member_spend AS s (member_id, total_paid_fen, order_count,"
        " last_order_at, updated_at)"
        " SELECT $1, coalesce(sum(paid_fen - refunded_fen), 0),"
        "  count(*) FILTER (WHERE refunded_fen < paid_fen), max(ordered_at), now()"
        " FROM tiering.orders WHERE member_id = $1"
        " ON CONFLICT (member_id) DO UPDATE SET total_paid_fen = excluded.total_paid_fen,"
        "  order_count = excluded.order_count, last_order_at = excluded.last_order_at,"
        "  updated_at = now()",
        member_id,
    )


async def set_registration_store(conn: Connection, member_id: uuid.UUID, store_id: str) -> None:
    """The member's registration store as member's MemberZoneSet states it
    (the effective value after the change; empty: none, the latest order's
    store stands in)."""
    await conn.execute(
        "INSERT INTO tiering.member_profiles AS p (member_id, registration_store_id)"
        " VALUES ($1, NULLIF($2::text, ''))"
        " ON CONFLICT (member_id) DO UPDATE SET"
        "  registration_store_id = excluded.registration_store_id, updated_at = now()"
        " WHERE p.registration_store_id IS DISTINCT FROM excluded.registration_store_id",
        member_id,
        store_id,
    )


async def set_registered(conn: Connection, member_id: uuid.UUID, at: datetime | None) -> None:
    await conn.execute(
        "INSERT INTO tiering.member_profiles AS p (member_id, registered_at) VALUES ($1, $2)"
        " ON CONFLICT (member_id) DO UPDATE SET registered_at ="
        "  coalesce(least(p.registered_at, excluded.registered_at), excluded.registered_at),"
        "  updated_at = now()",
        member_id,
        at,
    )


# ---- erasure ---------------------------------------------------------------------------


async def erased(conn: Connection, member_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    rows = await conn.fetch(
        "SELECT member_id FROM tiering.erased_members WHERE member_id = ANY($1::uuid[])",
        list(member_ids),
    )
    return {r["member_id"] for r in rows}


async def erase_members(conn: Connection, member_ids: list[uuid.UUID], at: datetime) -> int:
    """Remove what tiering holds per member and anonymise the facts, so totals
    (orders, spend, growth, tier changes per month) still add up; record the ids.
    Idempotent: a second run finds nothing left to change. Returns the members
    newly recorded as erased."""
    # Tier rows first: the batch locks the rows it evaluates, so a running chunk
    # commits (history included) before the anonymising below sees its rows.
    for table in ("tiering.member_tiers", "tiering.member_profiles", "tiering.member_spend"):
        await conn.execute(f"DELETE FROM {table} WHERE member_id = ANY($1::uuid[])", member_ids)
    # Benefit grants name the member: pending ones are never sent, issued ones
    # are rewards' records to anonymise (rewards follows MemberErased itself).
    await conn.execute(
        "DELETE FROM tiering.benefit_grants WHERE member_id = ANY($1::uuid[])", member_ids
    )
    # Merge snapshots hold each side's tier state and registration date.
    await conn.execute(
        "DELETE FROM tiering.member_merges"
        " WHERE survivor_id = ANY($1::uuid[]) OR absorbed_id = ANY($1::uuid[])",
        member_ids,
    )
    await conn.execute(
        "UPDATE tiering.orders SET member_id = CASE WHEN member_id = ANY($1::uuid[])"
        " THEN NULL ELSE member_id END, merged_from = NULL"
        " WHERE member_id = ANY($1::uuid[]) OR merged_from = ANY($1::uuid[])",
        member_ids,
    )
    # Action refs are scoped by member id ("<member>:<ref>"): replaced too.
    await conn.execute(
        "UPDATE tiering.growth_ledger SET member_id = CASE WHEN member_id = ANY($1::uuid[])"
        " THEN NULL ELSE member_id END, merged_from = NULL,"
        " ref = CASE WHEN member_id = ANY($1::uuid[]) AND kind NOT IN ('order', 'refund')"
        " THEN 'erased:' || entry_id ELSE ref END"
        " WHERE member_id = ANY($1::uuid[]) OR merged_from = ANY($1::uuid[])",
        member_ids,
    )
    # The figures name metrics, merges and members: emptied.
    await conn.execute(
        "UPDATE tiering.tier_history SET member_id = CASE WHEN member_id = ANY($1::uuid[])"
        " THEN NULL ELSE member_id END, merged_from = NULL,"
        " figures = CASE WHEN member_id = ANY($1::uuid[]) THEN '{}'::jsonb ELSE figures END"
        " WHERE member_id = ANY($1::uuid[]) OR merged_from = ANY($1::uuid[])",
        member_ids,
    )
    recorded = await conn.fetch(
        "INSERT INTO tiering.erased_members (member_id, erased_at)"
        " SELECT unnest($1::uuid[]), $2 ON CONFLICT (member_id) DO NOTHING RETURNING member_id",
        member_ids,
        at,
    )
    return len(recorded)
