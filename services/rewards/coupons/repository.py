"""SQL of the coupons (asyncpg, raw: issuance and redemption are hot paths).

Every counter that guards a promise (stock, per-member limit, daily budget) is
changed by one conditional statement that checks and writes at once, so two
concurrent claims can never both pass a check on a stale read.

coupons is partitioned by month of expires_at (migration 0017); id, code and
issue_key are unique in coupon_keys, which also holds each coupon's
expires_at: a lookup by code, issue key or id joins the key to the coupon on
(id, expires_at), so it reads the one partition that holds it (KEYED). Reads
of usable coupons carry `expires_at > now`, which prunes every past month.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from servicekit.db import Connection
from servicekit.errors import FailedPrecondition

from .. import merges
from ..members import MemberState
from .domain import Limits, Status, Terms, shard_stock

# Coupons found through their key (k): one partition read per coupon.
KEYED = (
    "rewards.coupon_keys k JOIN rewards.coupons c ON c.id = k.id AND c.expires_at = k.expires_at"
)

COUPON_COLUMNS = (
    "c.id, c.code, c.template_id, c.template_version, c.member_id, c.reason, c.issued_by,"
    " c.issue_key, c.request_hash, c.status, c.issued_at, c.valid_from, c.expires_at,"
    " c.lock_store_id, c.lock_pos_transaction_id, c.locked_until, c.order_id, c.redeemed_at,"
    " c.discount_fen, c.issued_to, c.seq"
)


@dataclass(frozen=True)
class TemplateRow:
    template_id: str
    version: int
    status: Status
    terms: Terms
    limits: Limits
    created_at: datetime
    updated_at: datetime
    # The row version's xmin, when read with it (issue_context): a cached
    # template is used only while the stored row still has this xmin (every
    # UPDATE writes a new row version with a new xmin).
    row_xmin: int | None = None


def _template(row: Any) -> TemplateRow:
    return TemplateRow(
        template_id=row["template_id"],
        version=row["version"],
        status=Status(row["status"]),
        terms=Terms.from_doc(json.loads(row["spec"])),
        limits=Limits(
            total_stock=row["total_stock"],
            per_member_limit=row["per_member_limit"],
            daily_budget=row["daily_budget"],
            stock_shards=row["stock_shards"],
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        row_xmin=row.get("row_xmin"),
    )


TEMPLATE_COLUMNS = (
    "template_id, version, status, spec, total_stock, per_member_limit, daily_budget,"
    " stock_shards, created_at, updated_at"
)


def _terms_json(terms: Terms) -> str:
    return json.dumps(terms.doc(), sort_keys=True, ensure_ascii=False)


async def insert_template(
    conn: Connection,
    template_id: str,
    terms: Terms,
    limits: Limits,
    status: Status,
    created_by: str,
    stock: Sequence[int],
) -> bool:
    """A new template at version 1 with its stock shards; False if the id exists."""
    inserted = await conn.fetchval(
        "INSERT INTO rewards.coupon_templates (template_id, name, kind, spec, total_stock,"
        " status, per_member_limit, daily_budget, stock_shards)"
        " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9)"
        " ON CONFLICT (template_id) DO NOTHING RETURNING true",
        template_id,
        terms.name,
        terms.kind.value,
        _terms_json(terms),
        limits.total_stock,
        status.value,
        limits.per_member_limit,
        limits.daily_budget,
        len(stock) or 1,
    )
    if not inserted:
        return False
    await conn.execute(
        "INSERT INTO rewards.coupon_template_versions (template_id, version, terms, created_by)"
        " VALUES ($1, 1, $2::jsonb, $3)",
        template_id,
        _terms_json(terms),
        created_by,
    )
    if stock:
        await conn.executemany(
            "INSERT INTO rewards.coupon_stock (template_id, shard, remaining) VALUES ($1, $2, $3)",
            [(template_id, n, remaining) for n, remaining in enumerate(stock)],
        )
    return True


async def get_template(
    conn: Connection, template_id: str, *, lock: bool = False
) -> TemplateRow | None:
    row = await conn.fetchrow(
        f"SELECT {TEMPLATE_COLUMNS} FROM rewards.coupon_templates WHERE template_id = $1"
        + (" FOR UPDATE" if lock else ""),
        template_id,
    )
    return _template(row) if row else None


async def list_templates(
    conn: Connection, status: str | None, after: str | None, limit: int
) -> list[TemplateRow]:
    rows = await conn.fetch(
        f"SELECT {TEMPLATE_COLUMNS} FROM rewards.coupon_templates"
        " WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR template_id > $2)"
        " ORDER BY template_id LIMIT $3",
        status,
        after,
        limit,
    )
    return [_template(r) for r in rows]


async def new_version(
    conn: Connection, template_id: str, version: int, terms: Terms, created_by: str
) -> None:
    await conn.execute(
        "INSERT INTO rewards.coupon_template_versions (template_id, version, terms, created_by)"
        " VALUES ($1, $2, $3::jsonb, $4)",
        template_id,
        version,
        _terms_json(terms),
        created_by,
    )
    await conn.execute(
        "UPDATE rewards.coupon_templates SET version = $2, name = $3, kind = $4, spec = $5::jsonb,"
        " updated_at = now() WHERE template_id = $1",
        template_id,
        version,
        terms.name,
        terms.kind.value,
        _terms_json(terms),
    )


async def set_status(conn: Connection, template_id: str, status: Status) -> None:
    await conn.execute(
        "UPDATE rewards.coupon_templates SET status = $2, updated_at = now() WHERE template_id = $1",
        template_id,
        status.value,
    )


async def version_terms(
    conn: Connection, pairs: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], Terms]:
    """The terms of each (template, version) asked for."""
    if not pairs:
        return {}
    rows = await conn.fetch(
        "SELECT v.template_id, v.version, v.terms FROM rewards.coupon_template_versions v"
        " JOIN unnest($1::text[], $2::int[]) AS p(t, n) ON v.template_id = p.t AND v.version = p.n",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    return {(r["template_id"], r["version"]): Terms.from_doc(json.loads(r["terms"])) for r in rows}


async def remaining_stock(conn: Connection, template_id: str) -> int | None:
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT sum(remaining)::bigint FROM rewards.coupon_stock WHERE template_id = $1",
        template_id,
    )


# ---- issuance -------------------------------------------------------------------


async def take_stock(conn: Connection, template_id: str, shards: int, skip: int = -1) -> bool:
    """Take one unit of stock after the shard tried first (`skip`) was empty:
    the fullest shard no one else holds, in one statement; only when all of
    those are empty, the others in turn, waiting for their holders; False when
    every shard is empty.

    Not waiting first matters: the shard found empty may still be locked by
    this transaction (an UPDATE that waited for a concurrent writer keeps the
    row locked even when its re-check fails), and a batch (IssueCoupons)
    holding the other shards may be waiting for that one: waiting for the
    batch then would be a deadlock. The waiting pass is left for the last
    units of a stock (PostgreSQL breaks such a deadlock; the RPCs retry).
    """
    taken = await conn.fetchval(
        "UPDATE rewards.coupon_stock s SET remaining = s.remaining - 1"
        " FROM (SELECT shard FROM rewards.coupon_stock WHERE template_id = $1"
        "  AND shard <> $2 AND remaining > 0 ORDER BY remaining DESC LIMIT 1"
        "  FOR UPDATE SKIP LOCKED) f"
        " WHERE s.template_id = $1 AND s.shard = f.shard RETURNING true",
        template_id,
        skip,
    )
    if taken:
        return True
    start = random.randrange(shards)
    others = [(start + n) % shards for n in range(shards) if (start + n) % shards != skip]
    # The shard tried first goes last, waiting too: it was found empty while
    # another claim held a unit of it, and that claim may have rolled back (a
    # deadlock retried, a refusal after the stock step), giving the unit back.
    # Waiting on a row this transaction already holds does not block.
    for shard in [*others, *([skip] if 0 <= skip < shards else [])]:
        taken = await conn.fetchval(
            "UPDATE rewards.coupon_stock SET remaining = remaining - 1"
            " WHERE template_id = $1 AND shard = $2 AND remaining > 0 RETURNING true",
            template_id,
            shard,
        )
        if taken:
            return True
    return False


async def has_settled_order(
    conn: Connection, member_id: uuid.UUID, exclude: uuid.UUID | None = None
) -> bool:
    """Whether the member has a settled order (other than `exclude`, the one
    being settled)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM rewards.orders WHERE member_id = $1"
            " AND status = 'settled' AND id IS DISTINCT FROM $2)",
            member_id,
            exclude,
        )
    )


@dataclass(frozen=True)
class NewCoupon:
    id: uuid.UUID
    code: str
    template_id: str
    template_version: int
    member_id: uuid.UUID
    reason: str
    issued_by: str
    issue_key: str
    request_hash: bytes
    issued_at: datetime
    valid_from: datetime
    expires_at: datetime


# One round trip for the whole issue. The coupon's key row claims the issue key
# (and the code) first: on a taken key (a retry, or a concurrent call with the
# same key, which waits here for the first one's commit) it inserts nothing and
# every later part, the coupon row included, gated on it, does nothing either. Otherwise each guard is one conditional
# write (the member's count, the day's count, one stock shard) and the outbox
# row goes in with the coupon. A guard that refuses still leaves the other
# parts written: the caller raises, which rolls the statement back as a whole.
# Every write of an issue after the key's claim (`claim`, which RETURNS the id).
_ISSUE_WRITES = (
    " coupon AS ("
    " INSERT INTO rewards.coupons AS c (id, code, template_id, template_version, member_id,"
    " reason, issued_by, issue_key, request_hash, issued_at, valid_from, expires_at, issued_to)"
    " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $5 FROM claim"
    f" RETURNING {COUPON_COLUMNS}),"
    " member_count AS ("
    " INSERT INTO rewards.coupon_member_counts AS m (template_id, member_id, issued)"
    " SELECT $3, $5, 1 FROM coupon WHERE $13::bigint IS NOT NULL"
    " ON CONFLICT (template_id, member_id) DO UPDATE SET issued = m.issued + 1"
    " WHERE m.issued < $13 RETURNING 1),"
    " day_count AS ("
    " INSERT INTO rewards.coupon_daily_counts AS d (template_id, day, issued)"
    " SELECT $3, $14, 1 FROM coupon WHERE $15::bigint IS NOT NULL"
    " ON CONFLICT (template_id, day) DO UPDATE SET issued = d.issued + 1"
    " WHERE d.issued < $15 RETURNING 1),"
    " stock AS ("
    " UPDATE rewards.coupon_stock SET remaining = remaining - 1"
    " WHERE template_id = $3 AND shard = $16 AND remaining > 0"
    " AND EXISTS (SELECT 1 FROM coupon) RETURNING 1),"
    " outbox AS ("
    " INSERT INTO rewards.outbox (event_id, event_type, envelope) SELECT $17, $18, $19 FROM coupon)"
)
ISSUE_SQL = (
    "WITH claim AS ("
    " INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
    " VALUES ($1, $2, $8, $12) ON CONFLICT (issue_key) DO NOTHING RETURNING id),"
    + _ISSUE_WRITES
    + " SELECT k.*, EXISTS (SELECT 1 FROM member_count) AS member_counted,"
    " EXISTS (SELECT 1 FROM day_count) AS day_counted,"
    " EXISTS (SELECT 1 FROM stock) AS stock_taken"
    " FROM (SELECT 1) one LEFT JOIN coupon k ON true"
)


@dataclass(frozen=True)
class Issue:
    """What the issue statement did."""

    # The new coupon's row; None when the issue key was taken (nothing written).
    row: Any
    member_counted: bool
    day_counted: bool
    # From the one shard tried (`shard`); the others are the caller's to try.
    stock_taken: bool
    shard: int


def _issue_arguments(
    c: NewCoupon, limits: Limits, day: date, shard: int, event: tuple[str, str, bytes]
) -> tuple[Any, ...]:
    """$1-$19 of ISSUE_SQL and ONE_STATEMENT_ISSUE_SQL."""
    return (
        c.id,
        c.code,
        c.template_id,
        c.template_version,
        c.member_id,
        c.reason,
        c.issued_by,
        c.issue_key,
        c.request_hash,
        c.issued_at,
        c.valid_from,
        c.expires_at,
        limits.per_member_limit,
        day,
        limits.daily_budget,
        shard,
        *event,
    )


async def issue(
    conn: Connection,
    c: NewCoupon,
    limits: Limits,
    day: date,
    event: tuple[str, str, bytes],
) -> Issue:
    """Insert the coupon and its outbox row and take its limits, in one statement
    (see ISSUE_SQL). A guard that did not pass reads False; the caller must then
    undo the statement (raise in its transaction or savepoint)."""
    shard = random.randrange(limits.stock_shards) if limits.total_stock is not None else 0
    row = await conn.fetchrow(
        ISSUE_SQL,
        *_issue_arguments(c, limits, day, shard, event),
    )
    assert row is not None
    return Issue(
        row=row if row["id"] is not None else None,
        member_counted=row["member_counted"],
        day_counted=row["day_counted"],
        stock_taken=row["stock_taken"],
        shard=shard,
    )


# ISSUE_SQL as the whole issue, run outside a transaction (one round trip
# instead of BEGIN, read, write, COMMIT), for a template the caller holds
# (cached) and checks as it writes: the key is claimed only while the stored
# template row is the very version the caller holds ($21, its xmin) and the
# member is not erased. Nothing claimed (a replay, a stale template, an erased
# member) writes nothing and returns a row without an id. A guard that does
# not pass calls rewards.coupon_issue_refused (migration 0021), whose error
# rolls the statement back whole. Either way the caller then takes the
# transactional path (issue_context, ISSUE_SQL), which replays or names the
# refusal.
ONE_STATEMENT_ISSUE_SQL = (
    "WITH claim AS ("
    " INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
    " SELECT $1, $2, $8, $12 FROM rewards.coupon_templates"
    " WHERE template_id = $3 AND xmin = $21::xid"
    " AND NOT EXISTS (SELECT 1 FROM rewards.erased_members WHERE member_id = $5)"
    " ON CONFLICT (issue_key) DO NOTHING RETURNING id),"
    + _ISSUE_WRITES
    + " SELECT k.*, CASE WHEN k.id IS NOT NULL AND NOT ("
    "($13::bigint IS NULL OR EXISTS (SELECT 1 FROM member_count))"
    " AND ($15::bigint IS NULL OR EXISTS (SELECT 1 FROM day_count))"
    " AND (NOT $20::boolean OR EXISTS (SELECT 1 FROM stock)))"
    " THEN rewards.coupon_issue_refused('member, day or stock') END AS refused"
    " FROM (SELECT 1) one LEFT JOIN coupon k ON true"
)

# The hint rewards.coupon_issue_refused raises with.
ISSUE_REFUSED_HINT = "coupon_issue_refused"


async def issue_at_once(
    conn: Connection,
    c: NewCoupon,
    limits: Limits,
    day: date,
    event: tuple[str, str, bytes],
    template_xmin: int,
) -> Any:
    """ONE_STATEMENT_ISSUE_SQL on a connection outside any transaction: the new
    coupon's row, or None when nothing was written (a taken key, a template
    changed since `template_xmin`, an erased member). A guard that does not
    pass raises asyncpg.RaiseError with ISSUE_REFUSED_HINT, nothing written."""
    limited = limits.total_stock is not None
    shard = random.randrange(limits.stock_shards) if limited else 0
    row = await conn.fetchrow(
        ONE_STATEMENT_ISSUE_SQL,
        *_issue_arguments(c, limits, day, shard, event),
        limited,
        template_xmin,
    )
    assert row is not None
    return row if row["id"] is not None else None


async def issue_context(
    conn: Connection, issue_key: str, member_id: uuid.UUID, template_id: str
) -> tuple[Any, bool, TemplateRow | None]:
    """What an issue needs, in one round trip: the coupon already issued under
    the key (or None), whether the member was erased, the template (or None)."""
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM rewards.coupon_keys WHERE issue_key = $1) AS replay,"
        " EXISTS (SELECT 1 FROM rewards.erased_members WHERE member_id = $2) AS erased,"
        f" t.* FROM (SELECT 1) one LEFT JOIN (SELECT {TEMPLATE_COLUMNS}, xmin AS row_xmin"
        "  FROM rewards.coupon_templates WHERE template_id = $3) t ON true",
        issue_key,
        member_id,
        template_id,
    )
    assert row is not None
    template = _template(row) if row["template_id"] is not None else None
    # A replay (rare) reads the stored coupon in a second round trip.
    existing = await coupon_by_key(conn, issue_key) if row["replay"] else None
    if row["replay"] and existing is None:
        raise archived(issue_key)
    return existing, bool(row["erased"]), template


# ---- bulk issuance (IssueCoupons) -----------------------------------------------


@dataclass(frozen=True)
class BulkContext:
    template: TemplateRow | None
    # Issue keys of the batch that already issued a coupon (replays).
    taken_keys: frozenset[str]
    erased: frozenset[uuid.UUID]
    # Members with a settled order: read only for a new-members-only template.
    settled: frozenset[uuid.UUID]


async def bulk_context(
    conn: Connection, template_id: str, members: Sequence[uuid.UUID], keys: Sequence[str]
) -> BulkContext:
    """What a batch needs, in one round trip: the template, which of the keys
    are taken, which members were erased and, for a new-members-only template,
    which have a settled order. No locks: the write re-checks what can race."""
    row = await conn.fetchrow(
        "SELECT"
        " (SELECT array_agg(k.issue_key) FROM rewards.coupon_keys k"
        "  WHERE k.issue_key = ANY($3::text[])) AS taken,"
        " (SELECT array_agg(e.member_id) FROM rewards.erased_members e"
        "  WHERE e.member_id = ANY($2::uuid[])) AS erased,"
        " (SELECT array_agg(DISTINCT o.member_id) FROM rewards.orders o"
        "  WHERE (t.spec->>'new_members_only')::boolean"
        "  AND o.member_id = ANY($2::uuid[]) AND o.status = 'settled') AS settled,"
        f" t.* FROM (SELECT 1) one LEFT JOIN (SELECT {TEMPLATE_COLUMNS}"
        "  FROM rewards.coupon_templates WHERE template_id = $1) t ON true",
        template_id,
        list(members),
        list(keys),
    )
    assert row is not None
    return BulkContext(
        template=_template(row) if row["template_id"] is not None else None,
        taken_keys=frozenset(row["taken"] or ()),
        erased=frozenset(row["erased"] or ()),
        settled=frozenset(row["settled"] or ()),
    )


async def coupons_by_keys(conn: Connection, keys: Sequence[str]) -> dict[str, Any]:
    rows = await conn.fetch(
        f"SELECT {COUPON_COLUMNS} FROM {KEYED} WHERE k.issue_key = ANY($1::text[])",
        list(keys),
    )
    return {r["issue_key"]: r for r in rows}


# The counters a batch may take, locked and read in one statement, always in
# the order member rows (by member id), the day's row, the stock shards (by
# shard): the order the single issue statement takes them in too, so batches
# and single issues queue on each other rather than deadlock. A member or day
# without a row gets one at 0 (the no-op DO UPDATE locks an existing row and
# returns its latest committed count, READ COMMITTED). Held until commit, the
# counts cannot change under the batch's arithmetic.
BULK_LOCK_SQL = (
    "WITH m AS ("
    " INSERT INTO rewards.coupon_member_counts AS c (template_id, member_id, issued)"
    " SELECT $1, u.member_id, 0 FROM unnest($2::uuid[]) AS u(member_id)"
    " ORDER BY u.member_id"
    " ON CONFLICT (template_id, member_id) DO UPDATE SET issued = c.issued"
    " RETURNING c.member_id, c.issued),"
    " d AS ("
    " INSERT INTO rewards.coupon_daily_counts AS c (template_id, day, issued)"
    " SELECT $1, $3, 0 WHERE $4"
    " ON CONFLICT (template_id, day) DO UPDATE SET issued = c.issued RETURNING c.issued),"
    " s AS ("
    " SELECT shard, remaining FROM rewards.coupon_stock WHERE template_id = $1 AND $5"
    " ORDER BY shard FOR UPDATE)"
    " SELECT 'member' AS what, member_id, NULL::int AS shard, issued AS n FROM m"
    " UNION ALL SELECT 'day', NULL, NULL, issued FROM d"
    " UNION ALL SELECT 'stock', NULL, shard, remaining FROM s"
)


@dataclass(frozen=True)
class Counters:
    """The batch's counters as locked: issued per member, issued today, and
    remaining per stock shard (only those the template limits)."""

    members: dict[uuid.UUID, int]
    day: int
    shards: dict[int, int]


async def lock_counters(
    conn: Connection, template_id: str, limits: Limits, members: Sequence[uuid.UUID], day: date
) -> Counters:
    rows = await conn.fetch(
        BULK_LOCK_SQL,
        template_id,
        # Distinct (one row may be locked once per statement), sorted above.
        sorted(set(members)) if limits.per_member_limit is not None else [],
        day,
        limits.daily_budget is not None,
        limits.total_stock is not None,
    )
    return Counters(
        members={r["member_id"]: int(r["n"]) for r in rows if r["what"] == "member"},
        day=next((int(r["n"]) for r in rows if r["what"] == "day"), 0),
        shards={r["shard"]: int(r["n"]) for r in rows if r["what"] == "stock"},
    )


# A batch's coupons, counters and events in one statement. The coupons' key
# rows claim their issue keys (sorted, so two batches sharing keys queue rather
# than deadlock; a key committed since the batch's read inserts nothing, nor
# its coupon); then the
# counters move by exactly the coupons inserted (per member, the day, per
# shard) and the CouponIssued rows of those coupons go in. The counters were
# locked and checked by the caller (BULK_LOCK_SQL), so no guard can fail here;
# CHECK (remaining >= 0) still stands behind the stock.
BULK_ISSUE_SQL = (
    "WITH claim AS ("
    " INSERT INTO rewards.coupon_keys (id, code, issue_key, expires_at)"
    " SELECT i.id, i.code, i.issue_key, $7"
    " FROM unnest($8::uuid[], $9::text[], $11::text[]) AS i(id, code, issue_key)"
    " ORDER BY i.issue_key ON CONFLICT (issue_key) DO NOTHING RETURNING id),"
    " coupon AS ("
    " INSERT INTO rewards.coupons AS c (id, code, template_id, template_version, member_id,"
    " reason, issued_by, issue_key, request_hash, issued_at, valid_from, expires_at, issued_to)"
    " SELECT i.id, i.code, $1, $2, i.member_id, $3, $4, i.issue_key, i.request_hash,"
    " $5, $6, $7, i.member_id"
    " FROM unnest($8::uuid[], $9::text[], $10::uuid[], $11::text[], $12::bytea[])"
    " AS i(id, code, member_id, issue_key, request_hash) JOIN claim ON claim.id = i.id"
    " RETURNING c.id, c.member_id, c.seq),"
    " member_count AS ("
    " UPDATE rewards.coupon_member_counts m SET issued = m.issued + k.n"
    " FROM (SELECT member_id, count(*) AS n FROM coupon GROUP BY member_id) k"
    " WHERE $13 AND m.template_id = $1 AND m.member_id = k.member_id),"
    " day_count AS ("
    " UPDATE rewards.coupon_daily_counts d SET issued = d.issued + (SELECT count(*) FROM coupon)"
    " WHERE $14 AND d.template_id = $1 AND d.day = $15),"
    " stock AS ("
    " UPDATE rewards.coupon_stock s SET remaining = s.remaining - k.n"
    " FROM (SELECT a.shard, count(*) AS n FROM coupon"
    "  JOIN unnest($8::uuid[], $16::int[]) AS a(id, shard) ON a.id = coupon.id"
    "  GROUP BY a.shard) k"
    " WHERE $17 AND s.template_id = $1 AND s.shard = k.shard),"
    " outbox AS ("
    " INSERT INTO rewards.outbox (event_id, event_type, envelope)"
    " SELECT e.event_id, $18, e.envelope"
    " FROM unnest($8::uuid[], $19::uuid[], $20::bytea[]) AS e(id, event_id, envelope)"
    " JOIN coupon ON coupon.id = e.id)"
    " SELECT id, seq FROM coupon"
)


@dataclass(frozen=True)
class BulkCoupon:
    """One coupon of a batch to insert, with its CouponIssued envelope."""

    id: uuid.UUID
    code: str
    member_id: uuid.UUID
    issue_key: str
    request_hash: bytes
    event_id: uuid.UUID
    envelope: bytes


@dataclass(frozen=True)
class BulkIssue:
    template_id: str
    template_version: int
    reason: str
    issued_by: str
    issued_at: datetime
    valid_from: datetime
    expires_at: datetime
    event_type: str
    coupons: Sequence[BulkCoupon]
    # The stock shard each coupon takes a unit from (0 when the stock is unlimited).
    shards: Sequence[int]


async def issue_bulk(
    conn: Connection, b: BulkIssue, limits: Limits, day: date
) -> dict[uuid.UUID, int]:
    """Insert a batch's coupons (BULK_ISSUE_SQL); the ids inserted, with their
    wallet seq. A coupon missing from the answer lost its key to a concurrent
    issue committed since the batch's read."""
    cs = b.coupons
    rows = await conn.fetch(
        BULK_ISSUE_SQL,
        b.template_id,
        b.template_version,
        b.reason,
        b.issued_by,
        b.issued_at,
        b.valid_from,
        b.expires_at,
        [c.id for c in cs],
        [c.code for c in cs],
        [c.member_id for c in cs],
        [c.issue_key for c in cs],
        [c.request_hash for c in cs],
        limits.per_member_limit is not None,
        limits.daily_budget is not None,
        day,
        list(b.shards),
        limits.total_stock is not None,
        b.event_type,
        [c.event_id for c in cs],
        [c.envelope for c in cs],
    )
    return {r["id"]: r["seq"] for r in rows}


def archived(issue_key: str) -> FailedPrecondition:
    """A key whose coupon is in a detached (archived) partition: its code and
    key stay taken, the coupon is no longer served."""
    return FailedPrecondition(
        f"the coupon issued under {issue_key!r} expired long ago and was archived",
        code="COUPON_ARCHIVED",
        field="issue_key",
    )


async def coupon_by_key(conn: Connection, issue_key: str) -> Any:
    return await conn.fetchrow(
        f"SELECT {COUPON_COLUMNS} FROM {KEYED} WHERE k.issue_key = $1", issue_key
    )


async def coupon_by_code(conn: Connection, code: str, *, lock: bool = False) -> Any:
    return await conn.fetchrow(
        f"SELECT {COUPON_COLUMNS} FROM {KEYED} WHERE k.code = $1"
        + (" FOR UPDATE OF c" if lock else ""),
        code,
    )


# ---- wallet and checkout -----------------------------------------------------------


def wallet_sql(usable_only: bool) -> str:
    """The wallet read ($1 member, $2 statuses, $3 now, $4 cursor, $5 limit);
    `usable_only` (statuses within available, locked) adds `expires_at > now`,
    which prunes every partition of coupons already expired."""
    return (
        f"SELECT * FROM (SELECT {COUPON_COLUMNS}, CASE WHEN c.status IN ('available', 'locked')"
        " AND c.expires_at <= $3 THEN 'expired' WHEN c.status = 'locked'"
        " AND c.locked_until <= $3 THEN 'available' ELSE c.status END AS effective_status"
        " FROM rewards.coupons c WHERE c.member_id = $1"
        + (" AND c.expires_at > $3" if usable_only else "")
        + " AND ($4::bigint IS NULL OR c.seq < $4)) w"
        " WHERE cardinality($2::text[]) = 0 OR w.effective_status = ANY($2::text[])"
        " ORDER BY w.seq DESC LIMIT $5"
    )


async def member_coupons(
    conn: Connection,
    member_id: uuid.UUID,
    statuses: Sequence[str],
    now: datetime,
    after_seq: int | None,
    limit: int,
) -> list[Any]:
    """A member's coupons, newest first. A lapsed lock reads as available.
    Asked for usable ones only (available, locked), it reads the partitions of
    coupons not yet expired (wallet_sql)."""
    usable_only = bool(statuses) and set(statuses) <= USABLE
    return list(
        await conn.fetch(wallet_sql(usable_only), member_id, list(statuses), now, after_seq, limit)
    )


# The wallet statuses a coupon has only before its expiry.
USABLE = frozenset({"available", "locked"})


# Everything a checkout reads, in one round trip: the member's tier (and
# multiplier) and erasure mark, whether it has a settled order (other than $4,
# the one being settled), the coupons named by code (whoever holds them: the
# caller checks), then, when $5, the member's other usable coupons (lapsed
# locks included, soonest expiry first), each with its version's terms. The
# member's part comes once, on every row (a row of NULL coupon when none).
CHECKOUT_SQL = (
    "SELECT m.*, k.*, v.terms FROM (SELECT t.tier_code, t.points_multiplier_bp,"
    " EXISTS (SELECT 1 FROM rewards.erased_members e WHERE e.member_id = $1) AS erased,"
    " EXISTS (SELECT 1 FROM rewards.orders o WHERE o.member_id = $1 AND o.status = 'settled'"
    "  AND o.id IS DISTINCT FROM $4) AS has_settled_order"
    " FROM (SELECT 1) one LEFT JOIN rewards.member_tiers t ON t.member_id = $1) m"
    " LEFT JOIN ("
    f"(SELECT {COUPON_COLUMNS}, true AS chosen FROM {KEYED}"
    "  WHERE k.code = ANY($2::text[]))"
    " UNION ALL"
    f" (SELECT {COUPON_COLUMNS}, false FROM rewards.coupons c WHERE $5 AND c.member_id = $1"
    "  AND c.expires_at > $3 AND c.valid_from <= $3 AND (c.status = 'available'"
    "  OR (c.status = 'locked' AND c.locked_until <= $3)) AND c.code <> ALL($2::text[])"
    "  ORDER BY c.expires_at, c.seq LIMIT 200)"
    ") k ON true"
    " LEFT JOIN rewards.coupon_template_versions v"
    " ON v.template_id = k.template_id AND v.version = k.template_version"
    " ORDER BY k.chosen DESC, k.expires_at, k.seq"
)


@dataclass(frozen=True)
class CheckoutContext:
    state: MemberState
    has_settled_order: bool
    # Rows of the coupons named by code (any member's), and of the member's
    # other usable ones (soonest expiry first).
    chosen: list[Any]
    usable: list[Any]
    terms: dict[tuple[str, int], Terms]


async def checkout_context(
    conn: Connection,
    member_id: uuid.UUID,
    codes: Sequence[str],
    now: datetime,
    *,
    usable: bool,
    exclude_order: uuid.UUID | None = None,
) -> CheckoutContext:
    rows = await conn.fetch(CHECKOUT_SQL, member_id, list(codes), now, exclude_order, usable)
    first = rows[0]
    terms: dict[tuple[str, int], Terms] = {}
    coupons = [r for r in rows if r["id"] is not None]
    for r in coupons:
        key = (r["template_id"], r["template_version"])
        if key not in terms:
            terms[key] = Terms.from_doc(json.loads(r["terms"]))
    return CheckoutContext(
        state=MemberState(first["tier_code"], first["points_multiplier_bp"], first["erased"]),
        has_settled_order=first["has_settled_order"],
        chosen=[r for r in coupons if r["chosen"]],
        usable=[r for r in coupons if not r["chosen"]],
        terms=terms,
    )


async def coupons_by_codes(conn: Connection, codes: Sequence[str]) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {COUPON_COLUMNS} FROM {KEYED} WHERE k.code = ANY($1::text[])",
            list(codes),
        )
    )


async def lock_coupon(
    conn: Connection,
    code: str,
    member_id: uuid.UUID,
    store_id: str,
    pos_transaction_id: str,
    now: datetime,
    until: datetime,
) -> Any:
    """Lock a coupon to an order in one statement: free (or a lapsed lock, or
    already this order's: idempotent) and valid, else nothing changes."""
    return await conn.fetchrow(
        "UPDATE rewards.coupons c SET status = 'locked', lock_store_id = $3,"
        " lock_pos_transaction_id = $4, locked_until = $6 FROM rewards.coupon_keys k"
        " WHERE k.code = $1 AND c.id = k.id AND c.expires_at = k.expires_at"
        " AND c.member_id = $2 AND c.expires_at > $5 AND c.valid_from <= $5"
        " AND (c.status = 'available' OR (c.status = 'locked' AND (c.locked_until <= $5"
        " OR (c.lock_store_id = $3 AND c.lock_pos_transaction_id = $4))))"
        f" RETURNING {COUPON_COLUMNS}",
        code,
        member_id,
        store_id,
        pos_transaction_id,
        now,
        until,
    )


async def release_coupon(
    conn: Connection, code: str, store_id: str, pos_transaction_id: str
) -> Any:
    return await conn.fetchrow(
        "UPDATE rewards.coupons c SET status = 'available', lock_store_id = NULL,"
        " lock_pos_transaction_id = NULL, locked_until = NULL FROM rewards.coupon_keys k"
        " WHERE k.code = $1 AND c.id = k.id AND c.expires_at = k.expires_at"
        " AND c.status = 'locked' AND c.lock_store_id = $2"
        f" AND c.lock_pos_transaction_id = $3 RETURNING {COUPON_COLUMNS}",
        code,
        store_id,
        pos_transaction_id,
    )


# An order's coupons used in one statement: each marked used (only if free,
# lapsed-locked or locked by this very order, and still valid: of two racing
# orders one wins), a CouponRedeemed outbox row for each one marked, and the
# order's discount, only if every coupon was marked. Fewer rows back than
# coupons asked: the caller raises, undoing the statement with the order.
REDEEM_SQL = (
    "WITH used AS ("
    " UPDATE rewards.coupons c SET status = 'used', order_id = $2, redeemed_at = $5,"
    " discount_fen = u.share, lock_store_id = NULL, lock_pos_transaction_id = NULL,"
    " locked_until = NULL FROM unnest($1::uuid[], $6::bigint[]) AS u(id, share)"
    " JOIN rewards.coupon_keys k ON k.id = u.id"
    " WHERE c.id = u.id AND c.expires_at = k.expires_at AND c.expires_at > $5"
    " AND c.valid_from <= $5"
    " AND (c.status = 'available' OR (c.status = 'locked' AND (c.locked_until <= $5"
    " OR (c.lock_store_id = $3 AND c.lock_pos_transaction_id = $4)))) RETURNING c.id),"
    " events AS ("
    " INSERT INTO rewards.outbox (event_id, event_type, envelope)"
    " SELECT e.event_id, e.event_type, e.envelope"
    " FROM unnest($1::uuid[], $7::uuid[], $8::text[], $9::bytea[])"
    " AS e(coupon_id, event_id, event_type, envelope) JOIN used ON used.id = e.coupon_id),"
    " discount AS ("
    # The order this transaction claimed: its partition is this transaction's now().
    " UPDATE rewards.orders SET coupon_discount_fen = $10 WHERE id = $2 AND created_at = now()"
    " AND (SELECT count(*) FROM used) = cardinality($1::uuid[]))"
    " SELECT coalesce(array_agg(id), '{}') AS used FROM used"
)


@dataclass(frozen=True)
class Redemption:
    coupon_id: uuid.UUID
    discount_fen: int
    # The CouponRedeemed outbox row: event id, type, serialized envelope.
    event: tuple[str, str, bytes]


async def redeem_coupons(
    conn: Connection,
    order_id: uuid.UUID,
    store_id: str,
    pos_transaction_id: str,
    redemptions: Sequence[Redemption],
    order_discount_fen: int,
    now: datetime,
) -> set[uuid.UUID]:
    """Use the order's coupons (REDEEM_SQL); the ids actually marked used."""
    used = await conn.fetchval(
        REDEEM_SQL,
        [r.coupon_id for r in redemptions],
        order_id,
        store_id,
        pos_transaction_id,
        now,
        [r.discount_fen for r in redemptions],
        [r.event[0] for r in redemptions],
        [r.event[1] for r in redemptions],
        [r.event[2] for r in redemptions],
        order_discount_fen,
    )
    return set(used)


async def order_paid_amount(conn: Connection, order_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            # Through the order's key: its created_at prunes the other partitions.
            "SELECT o.paid_amount_fen FROM rewards.order_keys k JOIN rewards.orders o"
            " ON o.id = k.id AND o.created_at = k.created_at WHERE k.id = $1",
            order_id,
        )
    )


async def order_coupon_discount(conn: Connection, order_id: uuid.UUID) -> int:
    return int(
        await conn.fetchval(
            "SELECT o.coupon_discount_fen FROM rewards.order_keys k JOIN rewards.orders o"
            " ON o.id = k.id AND o.created_at = k.created_at WHERE k.id = $1",
            order_id,
        )
        or 0
    )


async def order_coupons(conn: Connection, order_id: uuid.UUID) -> list[Any]:
    """An order's coupons, expired ones included (a refund reports them): no
    bound on expires_at is known, so one index probe per attached partition."""
    return list(
        await conn.fetch(
            f"SELECT {COUPON_COLUMNS} FROM rewards.coupons c WHERE c.order_id = $1 ORDER BY c.code",
            order_id,
        )
    )


async def restore_coupon(conn: Connection, coupon_id: uuid.UUID, expires_at: datetime) -> None:
    """Available again. The order it was used on stays recorded (order_id), so a
    replayed refund still finds it, until another order uses it."""
    await conn.execute(
        "UPDATE rewards.coupons SET status = 'available'"
        " WHERE id = $1 AND expires_at = $2 AND status = 'used'",
        coupon_id,
        expires_at,
    )


async def revoke_coupon(
    conn: Connection,
    coupon_id: uuid.UUID,
    at: datetime | None = None,
    operator: str | None = None,
    reason: str | None = None,
) -> str | None:
    """An issued coupon taken back: available -> revoked. The status it has
    afterwards ('revoked', or what stopped it), None when it does not exist."""
    row = await conn.fetchrow(
        "WITH r AS (UPDATE rewards.coupons c SET status = 'revoked',"
        "  revoked_at = coalesce($2, now()), revoked_by = $3, revoke_reason = $4"
        "  FROM rewards.coupon_keys k WHERE k.id = $1 AND c.id = k.id"
        "  AND c.expires_at = k.expires_at AND c.status = 'available' RETURNING c.status)"
        " SELECT status FROM r UNION ALL"
        f" SELECT c.status FROM {KEYED} WHERE k.id = $1 AND NOT EXISTS (SELECT 1 FROM r)",
        coupon_id,
        at,
        operator,
        reason,
    )
    return row["status"] if row else None


async def issued_count(conn: Connection, template_id: str) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM rewards.coupons WHERE template_id = $1", template_id
    )
    return int(value)


async def set_limits(conn: Connection, template_id: str, limits: Limits, issued: int) -> None:
    """New limits; the stock counters hold what is left of the new total
    (total - issued), spread over the shards (call with the stock rows locked)."""
    await conn.execute(
        "UPDATE rewards.coupon_templates SET total_stock = $2, per_member_limit = $3,"
        " daily_budget = $4, stock_shards = $5, updated_at = now() WHERE template_id = $1",
        template_id,
        limits.total_stock,
        limits.per_member_limit,
        limits.daily_budget,
        limits.stock_shards,
    )
    await conn.execute("DELETE FROM rewards.coupon_stock WHERE template_id = $1", template_id)
    if limits.total_stock is not None:
        left = limits.total_stock - issued
        await conn.executemany(
            "INSERT INTO rewards.coupon_stock (template_id, shard, remaining) VALUES ($1, $2, $3)",
            [
                (template_id, n, part)
                for n, part in enumerate(shard_stock(left, limits.stock_shards) if left else [0])
            ],
        )


async def lock_stock(conn: Connection, template_id: str) -> None:
    """Every stock counter of the template, in shard order (as issues take them)."""
    await conn.execute(
        "SELECT 1 FROM rewards.coupon_stock WHERE template_id = $1 ORDER BY shard FOR UPDATE",
        template_id,
    )


# ---- lifecycle --------------------------------------------------------------------


async def expire_due(conn: Connection, now: datetime, limit: int) -> int:
    """Expire one batch of lapsed coupons (SKIP LOCKED: a checkout holding one wins).
    Reads the partitions of months already begun (`expires_at <= now`)."""
    done = await conn.execute(
        "UPDATE rewards.coupons SET status = 'expired', locked_until = NULL,"
        " lock_store_id = NULL, lock_pos_transaction_id = NULL"
        " WHERE expires_at <= $1 AND (id, expires_at) IN (SELECT id, expires_at"
        " FROM rewards.coupons WHERE status IN ('available', 'locked')"
        " AND expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        now,
        limit,
    )
    return int(done.split()[-1])


async def claim_expiring_soon(
    conn: Connection, now: datetime, horizon: datetime, limit: int
) -> list[Any]:
    """Coupons lapsing before `horizon` not yet announced, marked announced now."""
    return list(
        await conn.fetch(
            "UPDATE rewards.coupons c SET expiry_notified_at = $1"
            " WHERE c.expires_at > $1 AND c.expires_at <= $2"
            " AND (c.id, c.expires_at) IN (SELECT id, expires_at FROM rewards.coupons"
            " WHERE status = 'available'"
            " AND expiry_notified_at IS NULL AND expires_at > $1 AND expires_at <= $2"
            " ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {COUPON_COLUMNS}",
            now,
            horizon,
            limit,
        )
    )


async def move_coupons(
    conn: Connection, merge_id: str, source: uuid.UUID, target: uuid.UUID
) -> int:
    """Merge: the absorbed member's coupons go to the survivor, marked with the merge."""
    done = await conn.execute(
        "UPDATE rewards.coupons SET member_id = $3, merge_id = $1 WHERE member_id = $2",
        merge_id,
        source,
        target,
    )
    return int(done.split()[-1])


async def move_back(conn: Connection, restored: uuid.UUID) -> int:
    """Unmerge: the coupons issued to the restored member, or to anyone merged
    into it (directly or through a chain, by the merges still in force), go
    back to it, wherever later merges took them."""
    done = await conn.execute(
        f"WITH RECURSIVE {merges.CLUSTER_CTE}"
        " UPDATE rewards.coupons c SET member_id = $1,"
        " merge_id = CASE WHEN c.issued_to = $1 THEN NULL ELSE c.merge_id END"
        " WHERE c.issued_to IN (SELECT member_id FROM down) AND c.member_id <> $1",
        restored,
    )
    return int(done.split()[-1])


async def report(conn: Connection, template_id: str) -> Any:
    return await conn.fetchrow(
        "SELECT count(*) AS issued, count(*) FILTER (WHERE status = 'used') AS redeemed,"
        " count(*) FILTER (WHERE status = 'expired') AS expired,"
        " coalesce(sum(discount_fen) FILTER (WHERE status = 'used'), 0)::bigint AS discount_fen"
        " FROM rewards.coupons WHERE template_id = $1",
        template_id,
    )


async def seed_templates(conn: Connection, templates: Sequence[tuple[str, Terms, Limits]]) -> None:
    """Demo templates: written when missing or when their seeded terms changed
    (then as the current version's terms), so a re-seed rewrites nothing."""
    for template_id, terms, limits in templates:
        stock = limits.total_stock
        await conn.execute(
            "INSERT INTO rewards.coupon_templates AS t (template_id, name, kind, spec,"
            " total_stock, status, per_member_limit, daily_budget, stock_shards)"
            " VALUES ($1, $2, $3, $4::jsonb, $5, 'active', $6, $7, $8)"
            " ON CONFLICT (template_id) DO UPDATE SET name = EXCLUDED.name,"
            " kind = EXCLUDED.kind, spec = EXCLUDED.spec"
            " WHERE (t.name, t.kind, t.spec) IS DISTINCT FROM"
            " (EXCLUDED.name, EXCLUDED.kind, EXCLUDED.spec)",
            template_id,
            terms.name,
            terms.kind.value,
            _terms_json(terms),
            stock,
            limits.per_member_limit,
            limits.daily_budget,
            limits.stock_shards,
        )
        await conn.execute(
            "INSERT INTO rewards.coupon_template_versions AS v (template_id, version, terms)"
            " SELECT template_id, version, spec FROM rewards.coupon_templates"
            " WHERE template_id = $1 ON CONFLICT (template_id, version) DO UPDATE"
            " SET terms = EXCLUDED.terms WHERE v.terms IS DISTINCT FROM EXCLUDED.terms",
            template_id,
        )
        if stock and not await reshard_stock(conn, template_id, limits.stock_shards):
            await conn.executemany(
                "INSERT INTO rewards.coupon_stock (template_id, shard, remaining)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                [
                    (template_id, n, part)
                    for n, part in enumerate(shard_stock(stock, limits.stock_shards))
                ],
            )


async def reshard_stock(conn: Connection, template_id: str, shards: int) -> bool:
    """Spread what is left of a template's stock over `shards` counters: the
    total remaining is kept exactly (a shard count change must never mint
    stock). False when the template has no stock rows yet. Locks every shard
    row, in shard order (as a batch issue does), so no issue runs meanwhile."""
    rows = await conn.fetch(
        "SELECT shard, remaining FROM rewards.coupon_stock WHERE template_id = $1"
        " ORDER BY shard FOR UPDATE",
        template_id,
    )
    if not rows:
        return False
    changed = await conn.fetchval(
        "UPDATE rewards.coupon_templates SET stock_shards = $2"
        " WHERE template_id = $1 AND stock_shards <> $2 RETURNING true",
        template_id,
        shards,
    )
    if not changed:
        return True  # the same shard count: the counters stay as they are
    total = sum(r["remaining"] for r in rows)
    parts = shard_stock(total, shards) if total else [0]
    await conn.execute("DELETE FROM rewards.coupon_stock WHERE template_id = $1", template_id)
    await conn.executemany(
        "INSERT INTO rewards.coupon_stock (template_id, shard, remaining) VALUES ($1, $2, $3)",
        [(template_id, n, part) for n, part in enumerate(parts)],
    )
    return True
