"""Use cases of the coupons: templates, issuance, wallet, checkout, lifecycle.

`issue_coupon` runs inside the caller's open transaction (the points mall, the
referral rewards and the IssueCoupon RPC all call it) and writes under a
savepoint, so a refusal leaves nothing of it behind even if the caller goes on.
Order of an issue: claim the issue key (insert the coupon; a concurrent claim
of the same key waits for the first commit, then replays), then take stock,
the member's count and the day's count, each with one conditional statement.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.message import Message

from loyalty.events.v1 import events_pb2
from servicekit.db import Connection
from servicekit.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from servicekit.events import make_envelope
from servicekit.protos import timestamp

from . import coupon_repository as crepo
from . import repository as repo
from .coupons import (
    MAX_ID_LENGTH,
    Limits,
    Reason,
    Status,
    Terms,
    check_transition,
    issue_hash,
    new_code,
    shard_stock,
    validate_limits,
    validate_terms,
)
from .domain import parse_member_id
from .policy import BUSINESS_TZ

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


async def issue_coupon(
    conn: Connection,
    *,
    template_id: str,
    member_id: uuid.UUID,
    reason: str,
    issue_key: str,
    now: datetime,
    issued_by: str = "",
) -> IssuedCoupon:
    """Issue one coupon of an active template to a member, once per issue key.

    Same key and body: the coupon issued the first time (replayed=True); same
    key, other body: ABORTED IDEMPOTENCY_KEY_REUSED. Refusals (unknown, paused,
    ended or lapsed template, stock, per-member limit, daily budget, erased
    member) raise and leave nothing written. No commit of its own.
    """
    check_template_id(template_id)
    check_issue_key(issue_key)
    why = check_reason(reason)
    digest = issue_hash(template_id, str(member_id), why.value)
    existing = await crepo.coupon_by_key(conn, issue_key)
    if existing is not None:
        return _replay(existing, digest, issue_key)
    if await repo.is_erased(conn, member_id):
        raise FailedPrecondition(
            f"member {member_id} was erased; no coupon can be issued",
            code="MEMBER_ERASED",
            field="member_id",
        )
    template = await crepo.get_template(conn, template_id)
    if template is None:
        raise unknown_template(template_id)
    if template.status is not Status.ACTIVE:
        raise FailedPrecondition(
            f"coupon template {template_id} is {template.status.value}, not active",
            code=f"TEMPLATE_{template.status.value.upper()}",
            field="template_id",
        )
    terms = template.terms
    if terms.valid_until is not None and terms.valid_until <= now:
        raise FailedPrecondition(
            f"coupon template {template_id} ended its validity at {terms.valid_until.isoformat()}",
            code="TEMPLATE_EXPIRED",
            field="template_id",
        )
    if terms.new_members_only and await crepo.has_settled_order(conn, member_id):
        raise FailedPrecondition(
            "this coupon is for new members only (no order yet)",
            code="NOT_A_NEW_MEMBER",
            field="member_id",
        )
    # A savepoint: whatever refuses below undoes the coupon row and the counters.
    async with conn.transaction():
        row = await crepo.insert_coupon(
            conn,
            crepo.NewCoupon(
                id=uuid.uuid4(),
                code=new_code(),
                template_id=template_id,
                template_version=template.version,
                member_id=member_id,
                reason=why.value,
                issued_by=issued_by,
                issue_key=issue_key,
                request_hash=digest,
                issued_at=now,
                valid_from=terms.starts_at(now),
                expires_at=terms.expires_at(now),
            ),
        )
        if row is None:
            # The same key was committed by a concurrent call while we checked.
            stored = await crepo.coupon_by_key(conn, issue_key)
            assert stored is not None, "a conflicting key is committed"
            return _replay(stored, digest, issue_key)
        await _take_limits(conn, template_id, template.limits, member_id, now)
    coupon = issued(row)
    await emit(
        conn,
        events_pb2.CouponIssued(
            coupon_id=coupon.coupon_id,
            code=coupon.code,
            member_id=coupon.member_id,
            template_id=template_id,
            template_version=template.version,
            reason=why.value,
            issued_at=timestamp(now),
            expires_at=timestamp(coupon.expires_at),
        ),
        coupon.member_id,
    )
    return coupon


def _replay(row: Any, digest: bytes, issue_key: str) -> IssuedCoupon:
    if bytes(row["request_hash"]) != digest:
        raise Conflict(
            f"issue_key {issue_key} was already used to issue a different coupon",
            code="IDEMPOTENCY_KEY_REUSED",
            field="issue_key",
        )
    return issued(row, replayed=True)


async def _take_limits(
    conn: Connection, template_id: str, limits: Limits, member_id: uuid.UUID, now: datetime
) -> None:
    # The member's count first: it is the narrowest row, so a member hammering
    # one template queues on its own row, not on the shared stock.
    if limits.per_member_limit is not None and not await crepo.count_for_member(
        conn, template_id, member_id, limits.per_member_limit
    ):
        raise FailedPrecondition(
            f"member {member_id} already holds the limit of {limits.per_member_limit}"
            f" coupon(s) of {template_id}",
            code="MEMBER_LIMIT_REACHED",
            field="member_id",
        )
    if limits.daily_budget is not None and not await crepo.count_for_day(
        conn, template_id, now.astimezone(BUSINESS_TZ).date(), limits.daily_budget
    ):
        raise FailedPrecondition(
            f"coupon template {template_id} issued its {limits.daily_budget} coupons for today",
            code="DAILY_BUDGET_EXHAUSTED",
            field="template_id",
        )
    if limits.total_stock is not None and not await crepo.take_stock(
        conn, template_id, limits.stock_shards
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


async def get_template(conn: Connection, template_id: str) -> crepo.TemplateRow:
    check_template_id(template_id)
    found = await crepo.get_template(conn, template_id)
    if found is None:
        raise unknown_template(template_id)
    return found


def parse_member(raw: str, field: str = "member_id") -> uuid.UUID:
    return uuid.UUID(parse_member_id(raw, field))
