"""Use cases of the coupons: templates, issuance, wallet, checkout, lifecycle.

`issue_coupon` runs inside the caller's open transaction (the points mall, the
referral rewards and the IssueCoupon RPC all call it) and writes under a
savepoint, so a refusal leaves nothing of it behind even if the caller goes on
(the RPC, whose transaction ends with the refusal anyway, skips the savepoint).
An issue is two round trips: one read (a coupon under the key, the erasure
mark, the template), then one statement that claims the issue key, takes the
member's count, the day's count and a stock shard, each a conditional write,
and inserts the coupon and its CouponIssued outbox row
(repository.ISSUE_SQL). A guard that does not pass raises, undoing the
statement as a whole.

The IssueCoupon RPC calls `issue_coupon_now`, which first tries the whole
issue as ONE statement outside a transaction (repository.ONE_STATEMENT_ISSUE_SQL:
no BEGIN, read or COMMIT round trip) with the template from an in-process
cache (`TemplateCache`), the statement checking that the stored template is
still the cached row version. Anything else than a clean issue (a replay, a
refusal, a template changed or not cached, a new-members-only template) writes
nothing there and takes `issue_coupon` in its own transaction.

`issue_coupons` issues one template to up to MAX_BATCH members (IssueCoupons,
campaigns) with the same guarantees item by item, in four round trips and
the caller's one commit; see its docstring and docs/coupons.md.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from cachetools import LRUCache
from google.protobuf.message import Message

from loyalty.events.v1 import events_pb2
from servicekit.db import Connection, Database, with_retries
from servicekit.errors import (
    PG_CONNECTION_ERRORS,
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from servicekit.events import make_envelope
from servicekit.protos import timestamp

from ..kernel import Channel, OrderLine, OrderRequest, parse_member_id, parse_store_id
from ..points.domain import BUSINESS_TZ, check_text
from ..points.earning import EarningRules
from . import repository as crepo
from .domain import (
    MAX_ID_LENGTH,
    Cart,
    CartLine,
    Limits,
    Reason,
    Status,
    Terms,
    Verdict,
    best,
    check_transition,
    combine,
    discount,
    issue_hash,
    new_code,
    normalize_code,
    shard_stock,
    spread,
    validate_limits,
    validate_terms,
)

PRODUCER = "rewards"
MAX_KEY_LENGTH = 128


@dataclass(frozen=True)
class IssuedCoupon:
    coupon_id: str
    code: str
    template_id: str
    template_version: int
    member_id: str
    reason: str
    issued_by: str
    status: str
    issued_at: datetime
    valid_from: datetime
    expires_at: datetime
    # True when the issue key had already issued this coupon (a retry).
    replayed: bool = False
    order_id: str = ""
    discount_fen: int = 0
    locked_until: datetime | None = None
    # Position in the member's wallet (the cursor of ListMemberCoupons).
    seq: int = 0


def issued(row: Any, *, replayed: bool = False, status: str | None = None) -> IssuedCoupon:
    return IssuedCoupon(
        coupon_id=str(row["id"]),
        code=row["code"],
        template_id=row["template_id"],
        template_version=row["template_version"],
        member_id=str(row["member_id"]),
        reason=row["reason"],
        issued_by=row["issued_by"],
        status=status or row["status"],
        issued_at=row["issued_at"],
        valid_from=row["valid_from"],
        expires_at=row["expires_at"],
        replayed=replayed,
        order_id=str(row["order_id"]) if row["order_id"] else "",
        discount_fen=row["discount_fen"] or 0,
        locked_until=row["locked_until"],
        seq=row["seq"],
    )


async def emit(conn: Connection, payload: Message, member_id: str) -> None:
    """An event into the rewards outbox, in the caller's transaction (the relay
    publishes it after commit)."""
    envelope = make_envelope(PRODUCER, payload, member_id)
    await conn.execute(
        "INSERT INTO rewards.outbox (event_id, event_type, envelope) VALUES ($1, $2, $3)",
        envelope.event_id,
        envelope.event_type,
        envelope.SerializeToString(),
    )


def check_template_id(raw: str, field: str = "template_id") -> str:
    if not raw.strip():
        raise InvalidArgument(f"{field} is required", code="TEMPLATE_ID_REQUIRED", field=field)
    if len(raw) > MAX_ID_LENGTH or not raw.isprintable() or raw != raw.strip():
        raise InvalidArgument(
            f"{field} must be 1 to {MAX_ID_LENGTH} printable characters",
            code="INVALID_TEMPLATE_ID",
            field=field,
        )
    return raw


def check_issue_key(raw: str) -> str:
    if not raw.strip():
        raise InvalidArgument("issue_key is required", code="ISSUE_KEY_REQUIRED", field="issue_key")
    if len(raw) > MAX_KEY_LENGTH or not raw.isprintable():
        raise InvalidArgument(
            f"issue_key must be 1 to {MAX_KEY_LENGTH} printable characters",
            code="INVALID_ISSUE_KEY",
            field="issue_key",
        )
    return raw


def check_reason(raw: str) -> Reason:
    try:
        return Reason(raw)
    except ValueError:
        raise InvalidArgument(
            f"reason {raw!r} is unknown; known: {', '.join(r.value for r in Reason)}",
            code="UNKNOWN_REASON",
            field="reason",
        ) from None


def unknown_template(template_id: str) -> NotFound:
    return NotFound(
        f"coupon template {template_id} does not exist",
        code="UNKNOWN_TEMPLATE",
        field="template_id",
    )


def _new_coupon(
    template: crepo.TemplateRow,
    member_id: uuid.UUID,
    why: Reason,
    issued_by: str,
    issue_key: str,
    now: datetime,
    request_hash: bytes,
) -> tuple[crepo.NewCoupon, tuple[str, str, bytes]]:
    """A new coupon's row and its CouponIssued outbox row (event id, type,
    envelope): built before the write, which puts both in with one statement."""
    terms = template.terms
    coupon_id, code = uuid.uuid4(), new_code()
    expires_at = terms.expires_at(now)
    envelope = make_envelope(
        PRODUCER,
        events_pb2.CouponIssued(
            coupon_id=str(coupon_id),
            code=code,
            member_id=str(member_id),
            template_id=template.template_id,
            template_version=template.version,
            reason=why.value,
            issued_at=timestamp(now),
            expires_at=timestamp(expires_at),
        ),
        str(member_id),
    )
    coupon = crepo.NewCoupon(
        id=coupon_id,
        code=code,
        template_id=template.template_id,
        template_version=template.version,
        member_id=member_id,
        reason=why.value,
        issued_by=issued_by,
        issue_key=issue_key,
        request_hash=request_hash,
        issued_at=now,
        valid_from=terms.starts_at(now),
        expires_at=expires_at,
    )
    return coupon, (envelope.event_id, envelope.event_type, envelope.SerializeToString())


async def issue_coupon(
    conn: Connection,
    *,
    template_id: str,
    member_id: uuid.UUID,
    reason: str,
    issue_key: str,
    now: datetime,
    issued_by: str = "",
    savepoint: bool = True,
    templates: TemplateCache | None = None,
) -> IssuedCoupon:
    """Issue one coupon of an active template to a member, once per issue key.

    Same key and body: the coupon issued the first time (replayed=True, even
    if the template was paused since); same key, other body: ABORTED
    IDEMPOTENCY_KEY_REUSED. Refusals (unknown, paused, ended or lapsed
    template, stock, per-member limit, daily budget, erased member) raise and
    leave nothing written: under a savepoint, unless the caller says its
    transaction ends with the refusal anyway (`savepoint=False`, the RPC: two
    round trips fewer). No commit of its own. The template read goes into
    `templates`, for `issue_coupon_now`'s next issue.
    """
    check_template_id(template_id)
    check_issue_key(issue_key)
    why = check_reason(reason)
    digest = issue_hash(template_id, str(member_id), why.value, issued_by)
    # One round trip: a coupon already under the key, the erasure mark, the template.
    existing, erased, template = await crepo.issue_context(conn, issue_key, member_id, template_id)
    if existing is not None:
        return _replay(existing, digest, issue_key)
    if erased:
        raise FailedPrecondition(
            f"member {member_id} was erased; no coupon can be issued",
            code="MEMBER_ERASED",
            field="member_id",
        )
    if template is None:
        raise unknown_template(template_id)
    if templates is not None:
        templates[template_id] = template
    blocked = _template_refusal(template, why, now)
    if blocked is not None:
        raise FailedPrecondition(blocked.detail, code=blocked.refusal, field="template_id")
    terms = template.terms
    if terms.new_members_only and await crepo.has_settled_order(conn, member_id):
        raise FailedPrecondition(
            "this coupon is for new members only (no order yet)",
            code="NOT_A_NEW_MEMBER",
            field="member_id",
        )
    coupon, event = _new_coupon(
        template, member_id, why, issued_by, issue_key, now, request_hash=digest
    )
    # Whatever refuses below undoes the coupon row, the counters and the event.
    async with conn.transaction() if savepoint else _same_transaction():
        done = await crepo.issue(
            conn, coupon, template.limits, now.astimezone(BUSINESS_TZ).date(), event
        )
        if done.row is None:
            # The same key was committed by a concurrent call while we checked.
            stored = await crepo.coupon_by_key(conn, issue_key)
            if stored is None:  # its partition was detached (archived) meanwhile
                raise crepo.archived(issue_key)
            return _replay(stored, digest, issue_key)
        await _check_limits(conn, template_id, template.limits, member_id, done)
    return issued(done.row)


class TemplateCache(LRUCache[str, crepo.TemplateRow]):
    """Templates as issue_coupon last read them (with their row's xmin), for
    issue_coupon_now. Never stale in effect: the one-statement issue writes
    only while the stored row is the cached version, and an issue that finds
    it changed re-reads it through issue_coupon."""

    def __init__(self, maxsize: int = 1024) -> None:
        super().__init__(maxsize)


async def issue_coupon_now(
    db: Database,
    templates: TemplateCache,
    *,
    template_id: str,
    member_id: uuid.UUID,
    reason: str,
    issue_key: str,
    now: datetime,
    issued_by: str = "",
) -> IssuedCoupon:
    """issue_coupon as a transaction of its own (the IssueCoupon RPC): one
    statement when the template is cached and the issue is clean, else
    issue_coupon in a unit of work (retried on deadlock, which a batch
    holding stock shards can cause at the end of a stock)."""
    done = await _issue_in_one_statement(
        db, templates, template_id, member_id, reason, issue_key, now, issued_by
    )
    if done is not None:
        return done

    async def attempt() -> IssuedCoupon:
        async with db.unit_of_work() as uow:
            return await issue_coupon(
                uow.conn,
                template_id=template_id,
                member_id=member_id,
                reason=reason,
                issue_key=issue_key,
                now=now,
                issued_by=issued_by,
                # The unit of work is this call's own: a refusal rolls it all back.
                savepoint=False,
                templates=templates,
            )

    return await with_retries(attempt)  # type: ignore[no-any-return]


async def _issue_in_one_statement(
    db: Database,
    templates: TemplateCache,
    template_id: str,
    member_id: uuid.UUID,
    reason: str,
    issue_key: str,
    now: datetime,
    issued_by: str,
) -> IssuedCoupon | None:
    """The issued coupon, or None when the transactional path must decide
    (nothing was written here then)."""
    check_template_id(template_id)
    check_issue_key(issue_key)
    why = check_reason(reason)
    template = templates.get(template_id)
    if (
        template is None
        or template.row_xmin is None
        # Its check reads orders: left to issue_coupon.
        or template.terms.new_members_only
        or _template_refusal(template, why, now) is not None
    ):
        return None
    coupon, event = _new_coupon(
        template,
        member_id,
        why,
        issued_by,
        issue_key,
        now,
        request_hash=issue_hash(template_id, str(member_id), why.value, issued_by),
    )
    try:
        async with db.pool.acquire() as conn:
            row = await crepo.issue_at_once(
                conn,
                coupon,
                template.limits,
                now.astimezone(BUSINESS_TZ).date(),
                event,
                template.row_xmin,
            )
    except asyncpg.RaiseError as exc:
        if exc.hint != crepo.ISSUE_REFUSED_HINT:
            raise
        return None  # a guard refused: issue_coupon names it (or finds another shard)
    except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
        return None
    except PG_CONNECTION_ERRORS:
        # Committed or not, unknown: issue_coupon replays it by its key if it was.
        return None
    return issued(row) if row is not None else None


# ---- bulk issuance ------------------------------------------------------------------

MAX_BATCH = 1_000


@dataclass(frozen=True)
class BulkItem:
    member_id: uuid.UUID
    issue_key: str


@dataclass(frozen=True)
class BulkResult:
    """One item of a batch: issued (a new coupon), replayed (its key issued this
    coupon before) or refused (`refusal` is the code, nothing written for it)."""

    outcome: str
    coupon: IssuedCoupon | None = None
    refusal: str = ""
    detail: str = ""


def _refused(code: str, detail: str) -> BulkResult:
    return BulkResult("refused", refusal=code, detail=detail)


def check_batch_size(count: int) -> None:
    if not count:
        raise InvalidArgument(
            "items must name at least one member", code="ITEMS_REQUIRED", field="items"
        )
    if count > MAX_BATCH:
        raise InvalidArgument(
            f"items holds {count} members; at most {MAX_BATCH} per call",
            code="BATCH_TOO_LARGE",
            field="items",
        )


def check_batch(items: Sequence[BulkItem]) -> None:
    check_batch_size(len(items))
    seen: dict[str, int] = {}
    for n, item in enumerate(items):
        try:
            check_issue_key(item.issue_key)
        except InvalidArgument as exc:
            raise InvalidArgument(str(exc), code=exc.code, field=f"items[{n}].issue_key") from None
        if item.issue_key in seen:
            raise InvalidArgument(
                f"items[{n}].issue_key repeats items[{seen[item.issue_key]}].issue_key;"
                " each coupon needs its own key",
                code="DUPLICATE_ISSUE_KEY",
                field=f"items[{n}].issue_key",
            )
        seen[item.issue_key] = n


def _template_refusal(template: crepo.TemplateRow, why: Reason, now: datetime) -> BulkResult | None:
    """Why the template issues nothing now: one refusal for a whole batch, the
    error issue_coupon raises."""
    if template.status is not Status.ACTIVE:
        return _refused(
            f"TEMPLATE_{template.status.value.upper()}",
            f"coupon template {template.template_id} is {template.status.value}, not active",
        )
    terms = template.terms
    if why is Reason.CLAIM and not terms.claimable:
        return _refused(
            "NOT_CLAIMABLE", f"coupon template {template.template_id} cannot be claimed by members"
        )
    if terms.valid_until is not None and terms.valid_until <= now:
        return _refused(
            "TEMPLATE_EXPIRED",
            f"coupon template {template.template_id} ended its validity at"
            f" {terms.valid_until.isoformat()}",
        )
    return None


def _replayed(row: Any, digest: bytes, issue_key: str) -> BulkResult:
    if bytes(row["request_hash"]) != digest:
        return _refused(
            "IDEMPOTENCY_KEY_REUSED",
            f"issue_key {issue_key} was already used to issue a different coupon",
        )
    return BulkResult("replayed", coupon=issued(row, replayed=True))


async def issue_coupons(
    conn: Connection,
    *,
    template_id: str,
    reason: str,
    items: Sequence[BulkItem],
    now: datetime,
    issued_by: str = "",
) -> list[BulkResult]:
    """Issue one template to many members (1..MAX_BATCH items), one result per
    item in their order, with issue_coupon's guarantees item by item.

    Four round trips inside the caller's transaction, whatever the batch size:
    one read (the template, taken keys, erased members, settled orders for a
    new-members-only template), one statement that locks and reads the
    counters the template limits (member rows, the day's row, every stock
    shard, in the order single issues take them), the arithmetic here, in the
    items' order (the first items get the last stock), then one statement that
    inserts the coupons, moves each counter by the coupons inserted and writes
    their CouponIssued rows. A refused item writes nothing; nothing is written
    half for an item. A key taken meanwhile by a concurrent call replays (one
    more read). Whole-call errors (malformed items, unknown template) raise
    before any write. No commit of its own.
    """
    check_template_id(template_id)
    why = check_reason(reason)
    check_batch(items)
    ctx = await crepo.bulk_context(
        conn, template_id, [i.member_id for i in items], [i.issue_key for i in items]
    )
    template = ctx.template
    if template is None:
        raise unknown_template(template_id)
    digests = [issue_hash(template_id, str(i.member_id), why.value, issued_by) for i in items]
    results: list[BulkResult | None] = [None] * len(items)
    if ctx.taken_keys:
        stored = await crepo.coupons_by_keys(conn, list(ctx.taken_keys))
        for n, item in enumerate(items):
            if item.issue_key in stored:
                results[n] = _replayed(stored[item.issue_key], digests[n], item.issue_key)
            elif item.issue_key in ctx.taken_keys:
                # Its coupon's partition was detached (archived): the key stays taken.
                gone = crepo.archived(item.issue_key)
                results[n] = _refused(gone.code, str(gone))
    blocked = _template_refusal(template, why, now)
    todo: list[int] = []
    for n, item in enumerate(items):
        if results[n] is not None:
            continue
        # In issue_coupon's order: the member's erasure, the template, new members.
        if item.member_id in ctx.erased:
            results[n] = _refused(
                "MEMBER_ERASED", f"member {item.member_id} was erased; no coupon can be issued"
            )
        elif blocked is not None:
            results[n] = blocked
        elif template.terms.new_members_only and item.member_id in ctx.settled:
            results[n] = _refused(
                "NOT_A_NEW_MEMBER", "this coupon is for new members only (no order yet)"
            )
        else:
            todo.append(n)
    if todo:
        await _issue_batch(conn, template, why, items, digests, todo, results, now, issued_by)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


async def _issue_batch(
    conn: Connection,
    template: crepo.TemplateRow,
    why: Reason,
    items: Sequence[BulkItem],
    digests: list[bytes],
    todo: list[int],
    results: list[BulkResult | None],
    now: datetime,
    issued_by: str,
) -> None:
    """Take the counters for the items in `todo` and insert what they allow.

    Each coupon (id, code, CouponIssued envelope) is built before the counters
    are locked: batches of one template queue on its stock shards, so the time
    between the lock and the commit is what bounds their throughput.
    """
    limits, template_id = template.limits, template.template_id
    day = now.astimezone(BUSINESS_TZ).date()
    terms = template.terms
    valid_from, expires_at = terms.starts_at(now), terms.expires_at(now)
    # One CouponIssued and one envelope (make_envelope's: producer, time,
    # trace context), refilled per coupon before it is serialized: a batch's
    # events differ only in their ids, code and member.
    event = events_pb2.CouponIssued(
        template_id=template_id,
        template_version=template.version,
        reason=why.value,
        issued_at=timestamp(now),
        expires_at=timestamp(expires_at),
    )
    envelope = make_envelope(PRODUCER, event)
    built: dict[int, crepo.BulkCoupon] = {}
    for n in todo:
        item = items[n]
        coupon_id, code, event_id = uuid.uuid4(), new_code(), uuid.uuid4()
        member = str(item.member_id)
        event.coupon_id, event.code, event.member_id = str(coupon_id), code, member
        envelope.event_id, envelope.member_id = str(event_id), member
        envelope.payload.Pack(event)
        built[n] = crepo.BulkCoupon(
            id=coupon_id,
            code=code,
            member_id=item.member_id,
            issue_key=item.issue_key,
            request_hash=digests[n],
            event_id=event_id,
            envelope=envelope.SerializeToString(),
        )

    counters = await crepo.lock_counters(
        conn, template_id, limits, [items[n].member_id for n in todo], day
    )
    member_left = (
        {m: limits.per_member_limit - k for m, k in counters.members.items()}
        if limits.per_member_limit is not None
        else {}
    )
    day_left = limits.daily_budget - counters.day if limits.daily_budget is not None else 0
    # The fullest shard first: the shards stay even, so single issues (a
    # random shard, then the others one by one) rarely meet an empty one.
    shards = [(-left, shard) for shard, left in counters.shards.items() if left > 0]
    heapq.heapify(shards)
    planned: list[tuple[int, crepo.BulkCoupon]] = []
    taken_shards: list[int] = []
    for n in todo:
        item = items[n]
        if limits.per_member_limit is not None and member_left[item.member_id] <= 0:
            results[n] = _refused(
                "MEMBER_LIMIT_REACHED",
                f"member {item.member_id} already holds the limit of {limits.per_member_limit}"
                f" coupon(s) of {template_id}",
            )
            continue
        if limits.daily_budget is not None and day_left <= 0:
            results[n] = _refused(
                "DAILY_BUDGET_EXHAUSTED",
                f"coupon template {template_id} issued its {limits.daily_budget} coupons for today",
            )
            continue
        shard = 0
        if limits.total_stock is not None:
            if not shards:
                results[n] = _refused(
                    "OUT_OF_STOCK", f"coupon template {template_id} is out of stock"
                )
                continue
            left, shard = heapq.heappop(shards)
            if left < -1:
                heapq.heappush(shards, (left + 1, shard))
        if limits.per_member_limit is not None:
            member_left[item.member_id] -= 1
        day_left -= 1
        planned.append((n, built[n]))
        taken_shards.append(shard)
    inserted = (
        await crepo.issue_bulk(
            conn,
            crepo.BulkIssue(
                template_id=template_id,
                template_version=template.version,
                reason=why.value,
                issued_by=issued_by,
                issued_at=now,
                valid_from=valid_from,
                expires_at=expires_at,
                event_type=envelope.event_type,
                coupons=[c for _, c in planned],
                shards=taken_shards,
            ),
            limits,
            day,
        )
        if planned
        else {}
    )
    # A key committed by a concurrent call after the read above (a retry of
    # this batch, which held the counters until then): its item did not insert,
    # or was refused on counts that include that very coupon. It replays. One
    # more read, only when some item lost its key or was refused by a counter.
    recheck = [items[n].issue_key for n in todo if results[n] is not None]
    recheck += [c.issue_key for _, c in planned if c.id not in inserted]
    stored = await crepo.coupons_by_keys(conn, recheck) if recheck else {}
    for n in todo:
        key = items[n].issue_key
        if results[n] is not None and key in stored:
            results[n] = _replayed(stored[key], digests[n], key)
    for n, c in planned:
        if c.id in inserted:
            results[n] = BulkResult(
                "issued",
                coupon=IssuedCoupon(
                    coupon_id=str(c.id),
                    code=c.code,
                    template_id=template_id,
                    template_version=template.version,
                    member_id=str(c.member_id),
                    reason=why.value,
                    issued_by=issued_by,
                    status="available",
                    issued_at=now,
                    valid_from=valid_from,
                    expires_at=expires_at,
                    seq=inserted[c.id],
                ),
            )
        else:
            # A concurrent call committed this key after the read above.
            results[n] = _replayed(stored[c.issue_key], digests[n], c.issue_key)


def _replay(row: Any, digest: bytes, issue_key: str) -> IssuedCoupon:
    if bytes(row["request_hash"]) != digest:
        raise Conflict(
            f"issue_key {issue_key} was already used to issue a different coupon",
            code="IDEMPOTENCY_KEY_REUSED",
            field="issue_key",
        )
    return issued(row, replayed=True)


@asynccontextmanager
async def _same_transaction() -> AsyncIterator[None]:
    yield


async def _check_limits(
    conn: Connection, template_id: str, limits: Limits, member_id: uuid.UUID, done: crepo.Issue
) -> None:
    """Raise for the first guard the issue statement did not pass (in the order
    a member, the day, the stock); an empty stock shard first tries the others."""
    if limits.per_member_limit is not None and not done.member_counted:
        raise FailedPrecondition(
            f"member {member_id} already holds the limit of {limits.per_member_limit}"
            f" coupon(s) of {template_id}",
            code="MEMBER_LIMIT_REACHED",
            field="member_id",
        )
    if limits.daily_budget is not None and not done.day_counted:
        raise FailedPrecondition(
            f"coupon template {template_id} issued its {limits.daily_budget} coupons for today",
            code="DAILY_BUDGET_EXHAUSTED",
            field="template_id",
        )
    if (
        limits.total_stock is not None
        and not done.stock_taken
        and not await crepo.take_stock(conn, template_id, limits.stock_shards, skip=done.shard)
    ):
        raise FailedPrecondition(
            f"coupon template {template_id} is out of stock",
            code="OUT_OF_STOCK",
            field="template_id",
        )


# ---- templates ----------------------------------------------------------------------


async def create_template(
    conn: Connection,
    template_id: str,
    terms: Terms,
    limits: Limits,
    status: Status,
    created_by: str,
) -> crepo.TemplateRow:
    check_template_id(template_id)
    terms, limits = validate_terms(terms), validate_limits(limits)
    if status not in (Status.DRAFT, Status.ACTIVE):
        raise InvalidArgument(
            "a template starts as draft or active", code="INVALID_STATUS", field="status"
        )
    stock = shard_stock(limits.total_stock, limits.stock_shards) if limits.total_stock else []
    if not await crepo.insert_template(conn, template_id, terms, limits, status, created_by, stock):
        raise Conflict(
            f"coupon template {template_id} already exists",
            code="TEMPLATE_EXISTS",
            field="template_id",
        )
    found = await crepo.get_template(conn, template_id)
    assert found is not None
    return found


async def new_template_version(
    conn: Connection, template_id: str, terms: Terms, created_by: str, expected_version: int = 0
) -> crepo.TemplateRow:
    """New terms for coupons issued from now on; issued ones keep theirs."""
    check_template_id(template_id)
    terms = validate_terms(terms)
    current = await crepo.get_template(conn, template_id, lock=True)
    if current is None:
        raise unknown_template(template_id)
    if current.status is Status.ENDED:
        raise FailedPrecondition(
            f"coupon template {template_id} has ended", code="TEMPLATE_ENDED", field="template_id"
        )
    if expected_version and expected_version != current.version:
        raise Conflict(
            f"coupon template {template_id} is at version {current.version}, not"
            f" {expected_version}",
            code="VERSION_MISMATCH",
            field="expected_version",
        )
    if terms.kind is not current.terms.kind:
        raise InvalidArgument(
            "a new version keeps the kind; create another template instead",
            code="KIND_CHANGED",
            field="kind",
        )
    await crepo.new_version(conn, template_id, current.version + 1, terms, created_by)
    found = await crepo.get_template(conn, template_id)
    assert found is not None
    return found


async def set_template_status(
    conn: Connection, template_id: str, status: Status
) -> crepo.TemplateRow:
    check_template_id(template_id)
    current = await crepo.get_template(conn, template_id, lock=True)
    if current is None:
        raise unknown_template(template_id)
    if current.status is not status:
        check_transition(current.status, status)
        await crepo.set_status(conn, template_id, status)
    found = await crepo.get_template(conn, template_id)
    assert found is not None
    return found


async def set_template_limits(
    conn: Connection, template_id: str, limits: Limits
) -> crepo.TemplateRow:
    """New stock, per-member limit, daily budget and shards for a template.
    The stock never goes below what was issued (STOCK_BELOW_ISSUED): the
    counters then hold the new total minus the issued coupons. Issues wait
    on the template's stock counters while this runs."""
    check_template_id(template_id)
    limits = validate_limits(limits)
    current = await crepo.get_template(conn, template_id, lock=True)
    if current is None:
        raise unknown_template(template_id)
    if current.status is Status.ENDED:
        raise FailedPrecondition(
            f"coupon template {template_id} has ended", code="TEMPLATE_ENDED", field="template_id"
        )
    await crepo.lock_stock(conn, template_id)
    issued = await crepo.issued_count(conn, template_id)
    if limits.total_stock is not None and limits.total_stock < issued:
        raise FailedPrecondition(
            f"{issued} coupons were issued; total_stock cannot go below that",
            code="STOCK_BELOW_ISSUED",
            field="total_stock",
        )
    await crepo.set_limits(conn, template_id, limits, issued)
    found = await crepo.get_template(conn, template_id)
    assert found is not None
    return found


async def revoke_coupon(
    conn: Connection, code: str, operator_id: str, reason: str, now: datetime
) -> IssuedCoupon:
    """An operator takes an issued coupon back: available -> revoked, once (a
    second revocation replays). A coupon at a till (locked), used or expired
    is refused with its status."""
    (normalized,) = normalize_codes([code], "code")
    for value, name in ((operator_id, "operator_id"), (reason, "reason")):
        if not value.strip() or len(value) > 256 or not value.isprintable():
            raise InvalidArgument(
                f"{name} is required (at most 256 printable characters)",
                code=f"INVALID_{name.upper()}",
                field=name,
            )
    row = await crepo.coupon_by_code(conn, normalized, lock=True)
    if row is None:
        raise NotFound(f"coupon {code} does not exist", code="UNKNOWN_COUPON", field="code")
    if row["status"] == "revoked":
        return issued(row, replayed=True)
    status = await crepo.revoke_coupon(conn, row["id"], now, operator_id, reason)
    if status != "revoked":
        codes = {"used": "COUPON_ALREADY_USED", "locked": "COUPON_LOCKED"}
        raise FailedPrecondition(
            f"coupon {code} is {status}: only an available coupon can be revoked",
            code=codes.get(str(status), "COUPON_EXPIRED"),
            field="code",
        )
    found = await crepo.coupon_by_code(conn, normalized)
    return issued(found)


async def get_template(conn: Connection, template_id: str) -> crepo.TemplateRow:
    check_template_id(template_id)
    found = await crepo.get_template(conn, template_id)
    if found is None:
        raise unknown_template(template_id)
    return found


def parse_member(raw: str, field: str = "member_id") -> uuid.UUID:
    return uuid.UUID(parse_member_id(raw, field))


# ---- wallet -------------------------------------------------------------------------

WALLET_STATUSES = ("available", "locked", "used", "expired")


@dataclass(frozen=True)
class CouponPolicy:
    """Coupon settings (REWARDS_* in server.py)."""

    lock_ttl: timedelta = field(default_factory=lambda: timedelta(minutes=15))
    # What one point is worth at the till, in fen (the points value of an order).
    fen_per_point: int = 1
    expiring_soon_days: int = 3


@dataclass(frozen=True)
class WalletEntry:
    coupon: IssuedCoupon
    terms: Terms


async def with_terms(conn: Connection, rows: list[Any]) -> dict[tuple[str, int], Terms]:
    return await crepo.version_terms(
        conn, sorted({(r["template_id"], r["template_version"]) for r in rows})
    )


async def list_member_coupons(
    conn: Connection,
    member_id: uuid.UUID,
    statuses: list[str],
    after_seq: int | None,
    limit: int,
    now: datetime,
) -> list[WalletEntry]:
    """The wallet, newest first. Expiry is applied as it is read (a coupon past
    its end reads expired even before the job marks it; a lapsed lock reads
    available)."""
    for n, s in enumerate(statuses):
        if s not in WALLET_STATUSES:
            raise InvalidArgument(
                f"status {s!r} is unknown; known: {', '.join(WALLET_STATUSES)}",
                code="UNKNOWN_STATUS",
                field=f"statuses[{n}]",
            )
    rows = await crepo.member_coupons(conn, member_id, statuses, now, after_seq, limit)
    terms = await with_terms(conn, rows)
    return [
        WalletEntry(
            issued(r, status=r["effective_status"]),
            terms[(r["template_id"], r["template_version"])],
        )
        for r in rows
    ]


# ---- checkout -----------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    code: str
    template_id: str
    terms: Terms
    expires_at: datetime
    verdict: Verdict


@dataclass(frozen=True)
class Preview:
    gross_fen: int
    offers: list[Offer]
    best_code: str
    applied: list[str]
    coupon_discount_fen: int
    points_value_fen: int
    payable_fen: int
    points_to_earn: int


def validate_cart_lines(lines: tuple[OrderLine, ...], gross_fen: int) -> tuple[CartLine, ...]:
    if not lines:
        raise InvalidArgument("a cart needs at least one line", code="CART_EMPTY", field="lines")
    cart = []
    for n, line in enumerate(lines):
        if line.quantity < 1:
            raise InvalidArgument(
                f"lines[{n}].quantity must be at least 1",
                code="INVALID_QUANTITY",
                field=f"lines[{n}].quantity",
            )
        if line.paid_amount_fen < 0:
            raise InvalidArgument(
                f"lines[{n}].paid_amount_fen must not be negative",
                code="NEGATIVE_AMOUNT",
                field=f"lines[{n}].paid_amount_fen",
            )
        cart.append(CartLine(line.sku, line.category, line.quantity, line.paid_amount_fen))
    total = sum(line.amount_fen for line in cart)
    if total != gross_fen:
        raise InvalidArgument(
            f"lines add up to {total} fen but gross_amount_fen is {gross_fen}",
            code="CART_TOTAL_MISMATCH",
            field="gross_amount_fen",
        )
    return tuple(cart)


def _status_verdict(row: Any, now: datetime, store_id: str, pos_transaction_id: str) -> Verdict:
    """Why a coupon row cannot be used now ('' reason when it can)."""
    status = row["status"]
    if status == "used":
        return Verdict(0, "COUPON_ALREADY_USED", "the coupon was already used")
    if status == "expired" or row["expires_at"] <= now:
        return Verdict(0, "COUPON_EXPIRED", f"expired at {row['expires_at'].isoformat()}")
    if row["valid_from"] > now:
        return Verdict(0, "COUPON_NOT_YET_VALID", f"valid from {row['valid_from'].isoformat()}")
    if (
        status == "locked"
        and row["locked_until"] > now
        and (row["lock_store_id"], row["lock_pos_transaction_id"]) != (store_id, pos_transaction_id)
    ):
        return Verdict(0, "COUPON_LOCKED", "the coupon is locked to another order")
    return Verdict()


def normalize_codes(raw: list[str] | tuple[str, ...], field: str = "coupon_codes") -> list[str]:
    codes = []
    for n, c in enumerate(raw):
        code = normalize_code(c)
        if not code or len(code) > 32 or not code.isalnum():
            raise InvalidArgument(
                f"{field}[{n}] is not a coupon code",
                code="INVALID_COUPON_CODE",
                field=f"{field}[{n}]",
            )
        codes.append(code)
    if len(set(codes)) != len(codes):
        raise InvalidArgument(
            f"{field} names a coupon twice", code="DUPLICATE_COUPON_CODE", field=field
        )
    return codes


def _own(
    rows: list[Any], member_id: uuid.UUID, codes: list[str], field: str = "coupon_codes"
) -> list[Any]:
    """The rows of the member's coupons, in the order of `codes`; another
    member's code (or an unknown one) is NOT_FOUND, without telling which."""
    by_code = {r["code"]: r for r in rows}
    out = []
    for n, code in enumerate(codes):
        row = by_code.get(code)
        if row is None or row["member_id"] != member_id:
            raise NotFound(
                f"member {member_id} has no coupon {code}",
                code="UNKNOWN_COUPON",
                field=f"{field}[{n}]",
            )
        out.append(row)
    return out


async def _own_rows(
    conn: Connection, member_id: uuid.UUID, codes: list[str], field: str = "coupon_codes"
) -> list[Any]:
    return _own(await crepo.coupons_by_codes(conn, codes), member_id, codes, field)


def _cart(
    ctx: crepo.CheckoutContext, store_id: str, channel: str, lines: tuple[CartLine, ...]
) -> Cart:
    return Cart(
        store_id,
        channel,
        lines,
        tier=ctx.state.tier_code,
        first_order=not ctx.has_settled_order,
    )


async def preview_checkout(
    conn: Connection,
    *,
    member_id: uuid.UUID,
    store_id: str,
    channel: Channel,
    lines: tuple[OrderLine, ...],
    gross_fen: int,
    codes: list[str],
    points_to_redeem: int,
    rules: EarningRules,
    policy: CouponPolicy,
    now: datetime,
) -> Preview:
    cart_lines = validate_cart_lines(lines, gross_fen)
    codes = normalize_codes(codes)
    if points_to_redeem < 0:
        raise InvalidArgument(
            "points_to_redeem must not be negative",
            code="INVALID_POINTS",
            field="points_to_redeem",
        )
    # One round trip: the member, the chosen coupons, the other usable ones, their terms.
    ctx = await crepo.checkout_context(conn, member_id, codes, now, usable=True)
    rows = _own(ctx.chosen, member_id, codes) + ctx.usable
    terms, state = ctx.terms, ctx.state
    cart = _cart(ctx, store_id, channel.value, cart_lines)
    offers = []
    for r in rows:
        t = terms[(r["template_id"], r["template_version"])]
        verdict = _status_verdict(r, now, "", "")
        if verdict.applicable:
            verdict = discount(t, cart)
        offers.append(Offer(r["code"], r["template_id"], t, r["expires_at"], verdict))
    best_code = best({o.code: o.verdict for o in offers})
    applied = codes or ([best_code] if best_code else [])
    by_code = {o.code: o for o in offers}
    off, verdicts = combine([by_code[c].terms for c in applied], cart)
    if codes:
        # The chosen coupons as they combine (NOT_STACKABLE shows here).
        for c, v in zip(codes, verdicts, strict=True):
            status = by_code[c].verdict
            by_code[c] = replace(by_code[c], verdict=status if not status.applicable else v)
        off = sum(by_code[c].verdict.discount_fen for c in codes)
        off = min(off, cart.gross_fen)
    offers = sorted(
        by_code.values(),
        key=lambda o: (not o.verdict.applicable, -o.verdict.discount_fen, o.expires_at),
    )
    points_value = points_to_redeem * policy.fen_per_point
    payable = max(gross_fen - off - points_value, 0)
    earn_lines = spread([line.paid_amount_fen for line in lines], gross_fen - payable)
    priced = rules.order_points(
        OrderRequest(
            store_id=store_id,
            pos_transaction_id="preview",
            member_id=str(member_id),
            channel=channel,
            paid_amount_fen=payable,
            lines=tuple(
                replace(line, paid_amount_fen=fen)
                for line, fen in zip(lines, earn_lines, strict=True)
            ),
        ),
        now,
        cart.tier,
        state.multiplier_bp,
    )
    return Preview(
        gross_fen=gross_fen,
        offers=offers,
        best_code=best_code,
        applied=applied,
        coupon_discount_fen=off,
        points_value_fen=points_value,
        payable_fen=payable,
        points_to_earn=priced.points,
    )


# ---- lock, release, redeem, restore -------------------------------------------------


def _refusal(row: Any, verdict: Verdict, field: str) -> DomainError:
    if verdict.reason in ("COUPON_ALREADY_USED", "COUPON_LOCKED"):
        return Conflict(f"coupon {row['code']}: {verdict.detail}", code=verdict.reason, field=field)
    return FailedPrecondition(
        f"coupon {row['code']}: {verdict.detail}", code=verdict.reason, field=field
    )


async def lock_coupon(
    conn: Connection,
    *,
    code: str,
    member_id: uuid.UUID,
    store_id: str,
    pos_transaction_id: str,
    policy: CouponPolicy,
    now: datetime,
) -> IssuedCoupon:
    """Lock to one order; a repeat by the same order extends the lock. One
    conditional UPDATE decides, so of racing orders exactly one wins."""
    parse_store_id(store_id)
    check_text(pos_transaction_id, "pos_transaction_id", "POS_TRANSACTION_ID", required=True)
    (code,) = normalize_codes([code], "code") if code.strip() else [""]
    if not code:
        raise InvalidArgument("code is required", code="COUPON_CODE_REQUIRED", field="code")
    row = await crepo.lock_coupon(
        conn, code, member_id, store_id, pos_transaction_id, now, now + policy.lock_ttl
    )
    if row is not None:
        return issued(row)
    (found,) = await _own_rows(conn, member_id, [code], "code")
    verdict = _status_verdict(found, now, store_id, pos_transaction_id)
    raise _refusal(
        found,
        verdict
        if not verdict.applicable
        else Verdict(0, "COUPON_LOCKED", "the coupon is locked to another order"),
        "code",
    )


async def release_coupon(
    conn: Connection, *, code: str, store_id: str, pos_transaction_id: str
) -> IssuedCoupon:
    """Cancel: the order's lock goes; releasing what this order does not hold
    (already released, lapsed, used) returns the coupon as it is."""
    parse_store_id(store_id)
    check_text(pos_transaction_id, "pos_transaction_id", "POS_TRANSACTION_ID", required=True)
    (code,) = normalize_codes([code], "code")
    row = await crepo.release_coupon(conn, code, store_id, pos_transaction_id)
    if row is None:
        row = await crepo.coupon_by_code(conn, code)
        if row is None:
            raise NotFound(f"no coupon {code}", code="UNKNOWN_COUPON", field="code")
    return issued(row)


async def redeem_for_order(
    conn: Connection,
    *,
    order_id: uuid.UUID,
    order: OrderRequest,
    policy: CouponPolicy,
    now: datetime,
) -> int:
    """Use the order's coupons, in the order's transaction; the discount in fen.

    Rewards computes the discount from the coupons' own terms and the lines
    (amounts before coupons); the till's paid amount must agree. A coupon used
    or locked by another order refuses the whole order (ABORTED), nothing written.
    """
    member_id = uuid.UUID(order.member_id)
    assert order.channel is not None
    codes = normalize_codes(list(order.coupon_codes))
    lines = validate_cart_lines(order.lines, order.gross_amount_fen)
    # One round trip: the member (tier, first order besides this one), the coupons, their terms.
    ctx = await crepo.checkout_context(
        conn, member_id, codes, now, usable=False, exclude_order=order_id
    )
    rows, terms = _own(ctx.chosen, member_id, codes), ctx.terms
    cart = _cart(ctx, order.store_id, order.channel.value, lines)
    for n, row in enumerate(rows):
        status = _status_verdict(row, now, order.store_id, order.pos_transaction_id)
        if not status.applicable:
            raise _refusal(row, status, f"coupon_codes[{n}]")
    off, verdicts = combine([terms[(r["template_id"], r["template_version"])] for r in rows], cart)
    for n, (row, v) in enumerate(zip(rows, verdicts, strict=True)):
        if not v.applicable:
            raise FailedPrecondition(
                f"coupon {row['code']} does not apply: {v.detail}",
                code=v.reason,
                field=f"coupon_codes[{n}]",
            )
    expected = order.gross_amount_fen - off - order.points_to_redeem * policy.fen_per_point
    if order.paid_amount_fen != expected:
        raise FailedPrecondition(
            f"paid_amount_fen is {order.paid_amount_fen} but gross {order.gross_amount_fen}"
            f" - coupons {off} - points value"
            f" {order.points_to_redeem * policy.fen_per_point} = {expected}",
            code="PAID_AMOUNT_MISMATCH",
            field="paid_amount_fen",
        )
    # Each coupon's share of a total capped at the cart (stacked coupons).
    shares = spread([v.discount_fen for v in verdicts], sum(v.discount_fen for v in verdicts) - off)
    redemptions = []
    for row, share in zip(rows, shares, strict=True):
        envelope = make_envelope(
            PRODUCER,
            events_pb2.CouponRedeemed(
                coupon_id=str(row["id"]),
                member_id=order.member_id,
                template_id=row["template_id"],
                order_id=str(order_id),
                discount_fen=share,
                redeemed_at=timestamp(now),
            ),
            order.member_id,
        )
        redemptions.append(
            crepo.Redemption(
                row["id"],
                share,
                (envelope.event_id, envelope.event_type, envelope.SerializeToString()),
            )
        )
    used = await crepo.redeem_coupons(
        conn, order_id, order.store_id, order.pos_transaction_id, redemptions, off, now
    )
    for n, row in enumerate(rows):
        if row["id"] not in used:
            # Lost a race after the read above: the row now says why (the
            # caller's transaction undoes what the statement did write).
            fresh = await crepo.coupon_by_code(conn, row["code"])
            verdict = _status_verdict(fresh, now, order.store_id, order.pos_transaction_id)
            raise _refusal(
                fresh,
                verdict
                if not verdict.applicable
                else Verdict(0, "COUPON_LOCKED", "the coupon is locked to another order"),
                f"coupon_codes[{n}]",
            )
    return off


@dataclass(frozen=True)
class Restoration:
    code: str
    restored: bool
    reason: str = ""


async def restore_for_refund(
    conn: Connection,
    order_id: uuid.UUID,
    paid_amount_fen: int,
    refunded_fen: int,
    now: datetime,
) -> list[Restoration]:
    """After a refund: once the order is refunded in full, its coupons come back
    when their template allows and they are still valid. Idempotent: a coupon
    already given back reads restored."""
    out = []
    rows = await crepo.order_coupons(conn, order_id)
    terms = await with_terms(conn, rows)
    for row in rows:
        if row["status"] != "used":
            out.append(Restoration(row["code"], True))
            continue
        t = terms[(row["template_id"], row["template_version"])]
        if not t.restore_on_refund:
            out.append(Restoration(row["code"], False, "NOT_RESTORABLE"))
        elif row["expires_at"] <= now:
            out.append(Restoration(row["code"], False, "EXPIRED"))
        elif refunded_fen < paid_amount_fen:
            out.append(Restoration(row["code"], False, "PARTIAL_REFUND"))
        else:
            await crepo.restore_coupon(conn, row["id"], row["expires_at"])
            out.append(Restoration(row["code"], True))
    return out


# ---- reports, lifecycle, merges ------------------------------------------------------


@dataclass(frozen=True)
class Report:
    template_id: str
    issued: int
    redeemed: int
    expired: int
    redemption_rate_bp: int
    discount_fen: int
    remaining_stock: int | None


async def report(conn: Connection, template_id: str) -> Report:
    template = await get_template(conn, template_id)
    row = await crepo.report(conn, template_id)
    issued_n, redeemed = int(row["issued"]), int(row["redeemed"])
    remaining = (
        await crepo.remaining_stock(conn, template_id)
        if template.limits.total_stock is not None
        else None
    )
    return Report(
        template_id=template_id,
        issued=issued_n,
        redeemed=redeemed,
        expired=int(row["expired"]),
        redemption_rate_bp=redeemed * 10_000 // issued_n if issued_n else 0,
        discount_fen=int(row["discount_fen"]),
        remaining_stock=remaining,
    )


async def expire_batch(conn: Connection, now: datetime, limit: int) -> int:
    return await crepo.expire_due(conn, now, limit)


async def announce_expiring(
    conn: Connection, now: datetime, policy: CouponPolicy, limit: int
) -> int:
    """CouponExpiringSoon once per coupon, `expiring_soon_days` ahead."""
    rows = await crepo.claim_expiring_soon(
        conn, now, now + timedelta(days=policy.expiring_soon_days), limit
    )
    terms = await with_terms(conn, rows)
    for r in rows:
        await emit(
            conn,
            events_pb2.CouponExpiringSoon(
                coupon_id=str(r["id"]),
                member_id=str(r["member_id"]),
                template_id=r["template_id"],
                name=terms[(r["template_id"], r["template_version"])].name,
                expires_at=timestamp(r["expires_at"]),
            ),
            str(r["member_id"]),
        )
    return len(rows)


async def merge(conn: Connection, merge_id: str, survivor: str, absorbed: str) -> int:
    """MemberMerged: the absorbed member's coupons go to the survivor (idempotent)."""
    return await crepo.move_coupons(conn, merge_id, parse_member(absorbed), parse_member(survivor))


async def unmerge(conn: Connection, survivor: str, restored: str) -> int:
    """MemberUnmerged: coupons of the restored member's person go back (idempotent)."""
    parse_member(survivor)
    return await crepo.move_back(conn, parse_member(restored))
