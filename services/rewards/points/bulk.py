"""Bulk earn (issue 19): many explicit point credits (offline uploads, imports,
batch campaigns) posted set-based, with the single earn's guarantees line by
line.

A batch is 1..MAX_BATCH lines of (member id, points, reason, idempotency key,
occurred_at), posted in one transaction with a fixed number of statements
whatever its size: claim every key (ledger_requests, one INSERT ... ON CONFLICT
DO NOTHING), lock every member's balance row (sorted, so batches never
deadlock each other), bring the few members with due lots up to date (the
single path's lazy expiry and activation), then one statement writes every
line's journal transaction, its entries (each transaction sums to zero: the
deferred constraint trigger checks it at commit), its lot, each member's
balance once and each key's stored outcome.

Each line is `applied`, `replayed` (its key was applied before with the same
line: the stored result) or `refused` with a code (a malformed line, an erased
member, a key used for another line); a refused line writes nothing. An
absorbed (merged) member id is credited to its survivor, as checkout does.
Single earns (RecordAction, AdjustPoints) emit no event; neither does this.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from servicekit.db import Connection
from servicekit.errors import DomainError, InvalidArgument

from .. import members, merges
from ..kernel import parse_member_id
from . import repository as ledger
from .domain import check_key, check_points, check_text, request_hash
from .handlers import PointsLedger

MAX_BATCH = 1_000
OPERATION = "bulk_earn"
# Offline tills' clocks run a little ahead; an earn further in the future is a bug.
MAX_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class EarnLine:
    member_id: str
    points: int
    reason: str
    idempotency_key: str
    occurred_at: datetime | None  # None: now


@dataclass(frozen=True)
class LineResult:
    outcome: str  # applied | replayed | refused
    transaction_id: str = ""
    member_id: str = ""  # the member credited (the survivor of a merge)
    points: int = 0
    available: int = 0  # the member's available points right after this line
    code: str = ""
    message: str = ""

    def doc(self) -> dict[str, Any]:
        return {
            "transaction_id": self.transaction_id,
            "member_id": self.member_id,
            "points": self.points,
            "available": self.available,
        }


@dataclass(frozen=True)
class _Parsed:
    index: int
    member: uuid.UUID
    points: int
    reason: str
    key: str  # namespaced, as stored in ledger_requests and the journal
    occurred_at: datetime
    digest: bytes


def _refused(error: DomainError) -> LineResult:
    return LineResult("refused", code=error.code, message=error.message)


def check_batch_size(size: int) -> None:
    if not 1 <= size <= MAX_BATCH:
        raise InvalidArgument(
            f"a batch holds 1 to {MAX_BATCH} lines, not {size}",
            code="INVALID_BATCH_SIZE",
            field="lines",
        )


def check_batch(lines: Sequence[EarnLine]) -> None:
    """Whole-call errors, before anything is read or written."""
    check_batch_size(len(lines))
    seen: dict[str, int] = {}
    for n, line in enumerate(lines):
        if line.idempotency_key in seen:
            raise InvalidArgument(
                f"lines[{n}] repeats the idempotency key of lines[{seen[line.idempotency_key]}]",
                code="DUPLICATE_IDEMPOTENCY_KEY",
                field=f"lines[{n}].idempotency_key",
            )
        seen[line.idempotency_key] = n


def _parse(n: int, line: EarnLine, operator_id: str, now: datetime, ledger_: PointsLedger) -> Any:
    """A line ready to post, or the refusal naming what is wrong with it."""
    try:
        member = uuid.UUID(parse_member_id(line.member_id, "member_id"))
        points = check_points(line.points, "points")
        reason = check_text(line.reason, "reason", "REASON", required=True)
        key = f"{OPERATION}:{check_key(line.idempotency_key)}"
        at = line.occurred_at or now
        if at.tzinfo is None:
            raise InvalidArgument(
                "occurred_at needs a time zone", code="INVALID_OCCURRED_AT", field="occurred_at"
            )
        if at > now + MAX_CLOCK_SKEW:
            raise InvalidArgument(
                f"occurred_at {at.isoformat()} is in the future",
                code="INVALID_OCCURRED_AT",
                field="occurred_at",
            )
        if ledger_.policy.expiry.expires_at(at) <= now:
            # Its lot would lapse at once: nothing the member could ever spend.
            raise InvalidArgument(
                f"points earned at {at.isoformat()} have already expired",
                code="EARN_ALREADY_EXPIRED",
                field="occurred_at",
            )
    except DomainError as error:
        return _refused(error)
    body: dict[str, object] = {
        "member_id": str(member),
        "points": points,
        "reason": reason,
        # As sent: a line without a time means "now", and its retry later is
        # the same line.
        "occurred_at": line.occurred_at.isoformat() if line.occurred_at else None,
        "operator": operator_id,
    }
    return _Parsed(n, member, points, reason, key, at, request_hash(OPERATION, body))


RESOLVE_SQL = f"""
SELECT i.m AS member_id, h.holder,
       EXISTS (SELECT 1 FROM rewards.erased_members e
               WHERE e.member_id = i.m OR e.member_id = h.holder) AS erased
FROM unnest($1::uuid[]) AS i(m)
CROSS JOIN LATERAL (
    WITH RECURSIVE up(member_id, depth) AS (
        SELECT i.m, 0
        UNION ALL
        SELECT s.survivor_id, up.depth + 1 FROM up CROSS JOIN LATERAL
          (SELECT survivor_id FROM rewards.member_merges
           WHERE absorbed_id = up.member_id AND unmerged_at IS NULL
           ORDER BY merged_at DESC LIMIT 1) s
        WHERE up.depth < {merges.MAX_MERGE_DEPTH})
    SELECT member_id AS holder FROM up ORDER BY depth DESC LIMIT 1
) h
"""

CLAIM_SQL = """
INSERT INTO rewards.ledger_requests (idempotency_key, operation, request_hash)
SELECT k, $3::text, h FROM unnest($1::text[], $2::bytea[]) AS c(k, h) ORDER BY k
ON CONFLICT DO NOTHING RETURNING idempotency_key
"""

ACCOUNTS_SQL = """
INSERT INTO rewards.points_balances (member_id)
SELECT m FROM unnest($1::uuid[]) AS m ORDER BY m ON CONFLICT DO NOTHING
"""

LOCKED_SQL = f"""
SELECT member_id, {ledger.BALANCE_COLUMNS} FROM rewards.points_balances
WHERE member_id = ANY($1::uuid[]) ORDER BY member_id FOR UPDATE
"""

DUE_SQL = """
SELECT DISTINCT member_id FROM rewards.points_lots
WHERE member_id = ANY($1::uuid[]) AND status IN ('active', 'pending') AND remaining > 0
  AND (expires_at <= $2 OR (status = 'pending' AND activates_at <= $2))
"""

# Every applied line's transaction, entries and lot, each member's balance
# once, and each key's outcome, in one statement.
POST_SQL = """
WITH txn AS (
    INSERT INTO rewards.points_transactions
        (id, member_id, kind, idempotency_key, amount, rule, operator_id, reason)
    SELECT t.id, t.member_id, 'earn', t.key, t.amount, t.rule, $9::text, t.reason
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::jsonb[], $6::text[])
         AS t(id, member_id, key, amount, rule, reason)
    RETURNING id
), entries AS (
    INSERT INTO rewards.points_entries (transaction_id, account, member_id, amount)
    SELECT e.txn, e.account, e.member_id, e.amount
    FROM unnest($10::uuid[], $11::text[], $12::uuid[], $13::bigint[])
         AS e(txn, account, member_id, amount)
    WHERE EXISTS (SELECT 1 FROM txn)
), lots AS (
    INSERT INTO rewards.points_lots
        (id, member_id, transaction_id, root_lot_id, points, remaining, status,
         earned_at, expires_at)
    SELECT n.id, n.member_id, n.txn, n.id, n.points, n.points, 'active', n.earned_at,
           n.expires_at
    FROM unnest($14::uuid[], $15::uuid[], $16::uuid[], $17::bigint[], $18::timestamptz[],
                $19::timestamptz[]) AS n(id, member_id, txn, points, earned_at, expires_at)
    WHERE EXISTS (SELECT 1 FROM txn)
), balances AS (
    UPDATE rewards.points_balances b
    SET available = b.available + d.available, debt = b.debt - d.repaid,
        lifetime_earned = b.lifetime_earned + d.earned, updated_at = now()
    FROM unnest($20::uuid[], $21::bigint[], $22::bigint[], $23::bigint[])
         AS d(member_id, available, repaid, earned)
    WHERE b.member_id = d.member_id AND EXISTS (SELECT 1 FROM txn)
), outcomes AS (
    UPDATE rewards.ledger_requests r SET outcome = 'ok', response = o.response
    FROM unnest($3::text[], $7::jsonb[]) AS o(key, response)
    WHERE r.idempotency_key = o.key AND EXISTS (SELECT 1 FROM txn)
)
SELECT count(*) FROM txn WHERE $8::int >= 0
"""


async def bulk_earn(
    conn: Connection,
    points_ledger: PointsLedger,
    lines: Sequence[EarnLine],
    operator_id: str,
    now: datetime,
) -> list[LineResult]:
    """Post a batch of earns inside the caller's transaction (no commit of its
    own); one result per line, in their order."""
    check_batch(lines)
    check_text(operator_id, "operator_id", "OPERATOR_ID", required=True)
    results: list[LineResult | None] = [None] * len(lines)
    parsed: list[_Parsed] = []
    for n, line in enumerate(lines):
        p = _parse(n, line, operator_id, now, points_ledger)
        if isinstance(p, LineResult):
            results[n] = p
        else:
            parsed.append(p)
    if not parsed:
        return [r for r in results if r is not None]

    # Ids the member service does not know (or erased): refused before any lock.
    unknown = await points_ledger.member_refusals(p.member for p in parsed)
    known: list[_Parsed] = []
    for p in parsed:
        if p.member in unknown:
            results[p.index] = _refused(unknown[p.member])
        else:
            known.append(p)
    parsed = known
    if not parsed:
        return [r for r in results if r is not None]

    # Survivors of merges and erasures: one read, under the members' holds so
    # an erasure being recorded is waited for and seen (members.hold_members).
    sent = {p.member for p in parsed}
    await members.hold_members(conn, sent)
    resolved = {
        r["member_id"]: (r["holder"], r["erased"])
        for r in await conn.fetch(RESOLVE_SQL, list(sent))
    }
    survivors = {h for h, _ in resolved.values()} - sent
    if survivors:
        # Merged ids: their survivors too, then read again (rare).
        await members.hold_members(conn, survivors)
        resolved = {
            r["member_id"]: (r["holder"], r["erased"])
            for r in await conn.fetch(RESOLVE_SQL, list(sent))
        }
    live: list[_Parsed] = []
    for p in parsed:
        if resolved[p.member][1]:
            results[p.index] = LineResult(
                "refused",
                code="MEMBER_ERASED",
                message=f"member {p.member} was erased; no further points can be written",
            )
        else:
            live.append(p)

    # Claim the keys; a key claimed before replays (same line) or is refused.
    claimed = {
        r["idempotency_key"]
        for r in await conn.fetch(
            CLAIM_SQL, [p.key for p in live], [p.digest for p in live], OPERATION
        )
    }
    taken = [p for p in live if p.key not in claimed]
    if taken:
        stored = {
            r["idempotency_key"]: r
            for r in await conn.fetch(
                "SELECT idempotency_key, operation, request_hash, outcome, response"
                " FROM rewards.ledger_requests WHERE idempotency_key = ANY($1::text[])",
                [p.key for p in taken],
            )
        }
        for p in taken:
            row = stored[p.key]
            if row["operation"] != OPERATION or bytes(row["request_hash"]) != p.digest:
                results[p.index] = LineResult(
                    "refused",
                    code="IDEMPOTENCY_KEY_REUSED",
                    message=f"idempotency key {p.key.split(':', 1)[1]} was already used"
                    " for a different request",
                )
            else:
                doc = json.loads(row["response"])
                results[p.index] = LineResult("replayed", **doc)
    todo = [p for p in live if p.key in claimed]
    if todo:
        await _post(conn, points_ledger, todo, resolved, results, operator_id, now)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


async def _post(
    conn: Connection,
    points_ledger: PointsLedger,
    todo: list[_Parsed],
    resolved: dict[uuid.UUID, tuple[uuid.UUID, bool]],
    results: list[LineResult | None],
    operator_id: str,
    now: datetime,
) -> None:
    holders = sorted({resolved[p.member][0] for p in todo})
    await conn.execute(ACCOUNTS_SQL, holders)
    # The members' locks, in one order for every batch.
    rows = await conn.fetch(LOCKED_SQL, holders)
    available = {r["member_id"]: r["available"] for r in rows}
    debt = {r["member_id"]: r["debt"] for r in rows}
    # Lazy expiry and activation, as the single path does under the lock.
    for member in [r["member_id"] for r in await conn.fetch(DUE_SQL, holders, now)]:
        state = await points_ledger.maintain(conn, member, now)
        assert state is not None
        available[member], debt[member] = state.balance.available, state.balance.debt

    # Columns of the one posting statement.
    txn_ids: list[uuid.UUID] = []
    txn_members: list[uuid.UUID] = []
    keys: list[str] = []
    amounts: list[int] = []
    rules: list[str] = []
    reasons: list[str] = []
    responses: list[str] = []
    e_txn: list[uuid.UUID] = []
    e_account: list[str] = []
    e_member: list[uuid.UUID | None] = []
    e_amount: list[int] = []
    l_id: list[uuid.UUID] = []
    l_member: list[uuid.UUID] = []
    l_txn: list[uuid.UUID] = []
    l_points: list[int] = []
    l_earned: list[datetime] = []
    l_expires: list[datetime] = []
    delta: dict[uuid.UUID, list[int]] = {}  # member -> [available, repaid, earned]
    for p in todo:
        holder = resolved[p.member][0]
        txn = uuid.uuid4()
        # Every credit repays debt first (docs/ledger.md, "Debt").
        repay = min(debt[holder], p.points)
        debt[holder] -= repay
        credit = p.points - repay
        available[holder] += credit
        d = delta.setdefault(holder, [0, 0, 0])
        d[0], d[1], d[2] = d[0] + credit, d[1] + repay, d[2] + p.points
        rule = {"bulk": True, "points": p.points, "occurred_at": p.occurred_at.isoformat()}
        if holder != p.member:
            rule["sent_member_id"] = str(p.member)
        result = LineResult("applied", str(txn), str(holder), p.points, available[holder])
        results[p.index] = result
        txn_ids.append(txn)
        txn_members.append(holder)
        keys.append(p.key)
        amounts.append(p.points)
        rules.append(json.dumps(rule, sort_keys=True))
        reasons.append(p.reason)
        responses.append(json.dumps(result.doc(), sort_keys=True))
        e_txn.append(txn)
        e_account.append("issued_liability")
        e_member.append(None)
        e_amount.append(-p.points)
        if credit:
            e_txn.append(txn)
            e_account.append("member_wallet")
            e_member.append(holder)
            e_amount.append(credit)
            l_id.append(uuid.uuid4())
            l_member.append(holder)
            l_txn.append(txn)
            l_points.append(credit)
            l_earned.append(p.occurred_at)
            l_expires.append(points_ledger.policy.expiry.expires_at(p.occurred_at))
        if repay:
            e_txn.append(txn)
            e_account.append("member_debt")
            e_member.append(holder)
            e_amount.append(repay)
    credited = list(delta)
    written = await conn.fetchval(
        POST_SQL,
        txn_ids,
        txn_members,
        keys,
        amounts,
        rules,
        reasons,
        responses,
        len(todo),
        operator_id,
        e_txn,
        e_account,
        e_member,
        e_amount,
        l_id,
        l_member,
        l_txn,
        l_points,
        l_earned,
        l_expires,
        credited,
        [delta[m][0] for m in credited],
        [delta[m][1] for m in credited],
        [delta[m][2] for m in credited],
    )
    assert written == len(todo), "every claimed line is journalled"


# ---- CSV uploads (`python -m services.rewards bulk-earn FILE`) -------------------

CSV_COLUMNS = ("member_id", "points", "reason", "idempotency_key", "occurred_at")


@dataclass(frozen=True)
class CsvLine:
    """A CSV row as a line to post, or why it cannot be one (row = 1-based data row)."""

    row: int
    line: EarnLine | None
    refusal: LineResult | None = None


def read_csv(rows: Iterable[str]) -> Iterator[CsvLine]:
    """Rows of `member_id,points,reason,idempotency_key[,occurred_at]` (a header
    first; occurred_at ISO 8601 with an offset, empty: now)."""
    reader = csv.DictReader(rows)
    missing = [c for c in CSV_COLUMNS[:4] if c not in (reader.fieldnames or [])]
    if missing:
        raise InvalidArgument(
            f"the CSV header lacks {', '.join(missing)} (columns: {', '.join(CSV_COLUMNS)})",
            code="INVALID_CSV_HEADER",
            field="file",
        )
    for n, rec in enumerate(reader, start=1):
        try:
            points = int(rec["points"] or "")
        except ValueError:
            yield CsvLine(
                n,
                None,
                _refused(
                    InvalidArgument(
                        f"points {rec['points']!r} is not a whole number",
                        code="INVALID_POINTS",
                        field="points",
                    )
                ),
            )
            continue
        raw_at = (rec.get("occurred_at") or "").strip()
        try:
            at = datetime.fromisoformat(raw_at) if raw_at else None
        except ValueError:
            yield CsvLine(
                n,
                None,
                _refused(
                    InvalidArgument(
                        f"occurred_at {raw_at!r} is not an ISO 8601 time",
                        code="INVALID_OCCURRED_AT",
                        field="occurred_at",
                    )
                ),
            )
            continue
        yield CsvLine(
            n,
            EarnLine(
                rec["member_id"] or "",
                points,
                rec["reason"] or "",
                rec["idempotency_key"] or "",
                at,
            ),
        )
