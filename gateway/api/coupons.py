"""Coupon routes (rewards service): the member's wallet and claims for the
mini-program; template management, reports and grants for operators.
Kinds, guarantees and the POS flow: docs/coupons.md."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.rewards.v1 import rewards_pb2

from ..principal import principal
from .common import (
    MEMBER_ERRORS,
    MEMBER_ID_EXAMPLE,
    MemberId,
    downstreams,
    optional_timestamp,
    optional_utc,
    problem_response,
    utc,
)

router = APIRouter()

TEMPLATE_ID_EXAMPLE = "MJ99-30"
TemplateId = Annotated[
    str,
    Path(min_length=1, max_length=64, description="The template's id", examples=["MJ99-30"]),
]
CLAIM_ERRORS = MEMBER_ERRORS | {
    409: problem_response(
        "Refused, nothing written: OUT_OF_STOCK, MEMBER_LIMIT_REACHED, DAILY_BUDGET_EXHAUSTED,"
        " NOT_CLAIMABLE, TEMPLATE_PAUSED / TEMPLATE_ENDED / TEMPLATE_DRAFT, TEMPLATE_EXPIRED,"
        " NOT_A_NEW_MEMBER, IDEMPOTENCY_KEY_REUSED"
    ),
}
TEMPLATE_ERRORS: dict[int | str, dict[str, object]] = {
    422: problem_response("Malformed terms; `field` names the culprit"),
    404: problem_response("No such template (UNKNOWN_TEMPLATE)"),
    409: problem_response(
        "TEMPLATE_EXISTS, ILLEGAL_STATUS_TRANSITION, VERSION_MISMATCH, TEMPLATE_ENDED"
    ),
}
# The key namespace of operator grants: a batch item and a single grant with
# the same key, member and reason are the same coupon.
GRANT_KEY_PREFIX = "grant:"
# Rewards takes issue keys of up to 128 characters; the gateway namespaces a
# caller's key ("grant:<key>", "claim:<member uuid>:<key>"), so it accepts
# only what still fits: a longer key is a 422 naming `issue_key` here, not a
# refusal from rewards after the prefix.
REWARDS_KEY_MAX = 128
GRANT_KEY_MAX = 120  # <= 128 - len("grant:")
CLAIM_KEY_MAX = REWARDS_KEY_MAX - len("claim:") - 36 - 1
# The service's own bounds (services/rewards/coupons/domain.py), so an absurd number
# is a 422 here rather than an overflow on the way.
MAX_FEN = 1_000_000
MAX_COUNT = 100_000_000
Item = Annotated[str, Field(min_length=1, max_length=64)]
Kind = Literal["amount_off", "percent_off", "free_item", "fixed_price", "first_order_price"]
WalletStatus = Literal["available", "locked", "used", "expired"]


class CouponTerms(BaseModel):
    """What a template version promises. Money in fen."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "满99减30",
                    "kind": "amount_off",
                    "threshold_fen": 9900,
                    "discount_fen": 3000,
                    "valid_days": 30,
                    "claimable": True,
                },
                {
                    "name": "8折 最高减15",
                    "kind": "percent_off",
                    "percent": 20,
                    "cap_fen": 1500,
                    "channels": ["online"],
                    "valid_until": "2026-06-30T23:59:59+08:00",
                },
            ]
        },
    )

    name: str = Field(min_length=1, max_length=64)
    kind: Kind
    threshold_fen: int = Field(
        default=0, ge=0, le=MAX_FEN, description="Eligible amount needed (0: none)"
    )
    discount_fen: int = Field(default=0, ge=0, le=MAX_FEN, description="amount_off: fen off")
    percent: int = Field(default=0, ge=0, le=100, description="percent_off / first_order_price")
    cap_fen: int = Field(default=0, ge=0, le=MAX_FEN, description="Most fen off (0: no cap)")
    max_price_fen: int = Field(default=0, ge=0, le=MAX_FEN, description="free_item: worth at most")
    price_fen: int = Field(default=0, ge=0, le=MAX_FEN, description="fixed_price: the item's price")
    skus: list[Item] = Field(
        default_factory=list, max_length=200, description="Lines it applies to (empty: all)"
    )
    categories: list[Item] = Field(default_factory=list, max_length=200)
    store_ids: list[Item] = Field(
        default_factory=list, max_length=200, description="Empty: every store"
    )
    channels: list[Literal["online", "offline"]] = Field(default_factory=list, max_length=2)
    tiers: list[Item] = Field(default_factory=list, max_length=200, description="Empty: every tier")
    new_members_only: bool = False
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    valid_days: int = Field(
        default=0, ge=0, le=3660, description="Validity from issue (with hours)"
    )
    valid_hours: int = Field(default=0, ge=0, le=87_840)
    stackable: bool = Field(default=False, description="Default: one coupon per order")
    restore_on_refund: bool = False
    claimable: bool = Field(default=False, description="Members may claim it themselves")


class CouponLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    total_stock: int = Field(default=0, ge=0, le=MAX_COUNT, description="0: unlimited")
    per_member_limit: int = Field(default=0, ge=0, le=MAX_COUNT, description="0: unlimited")
    daily_budget: int = Field(
        default=0, ge=0, le=MAX_COUNT, description="Coupons per day (0: unlimited)"
    )
    stock_shards: int = Field(
        default=1, ge=1, le=64, description="Stock counter rows; 8+ for flash claims"
    )


class NewTemplate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "template_id": "MJ99-30",
                    "terms": {
                        "name": "满99减30",
                        "kind": "amount_off",
                        "threshold_fen": 9900,
                        "discount_fen": 3000,
                        "valid_days": 30,
                    },
                    "limits": {"total_stock": 100000, "per_member_limit": 1, "stock_shards": 8},
                    "status": "active",
                }
            ]
        },
    )

    template_id: str = Field(min_length=1, max_length=64)
    terms: CouponTerms
    limits: CouponLimits = Field(default_factory=CouponLimits)
    status: Literal["draft", "active"] = "draft"


class NewVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    terms: CouponTerms
    expected_version: int = Field(
        default=0, ge=0, le=2**31 - 1, description="0: any; else must match"
    )


class TemplateStatus(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"status": "paused"}]}
    )

    status: Literal["draft", "active", "paused", "ended"]


# Examples of what the API answers: terms and limits come back whole (every
# field, defaults included; unset times are null), server times in UTC.
MJ99_TERMS_EXAMPLE: JsonDict = {
    "name": "满99减30",
    "kind": "amount_off",
    "threshold_fen": 9900,
    "discount_fen": 3000,
    "percent": 0,
    "cap_fen": 0,
    "max_price_fen": 0,
    "price_fen": 0,
    "skus": [],
    "categories": [],
    "store_ids": [],
    "channels": [],
    "tiers": [],
    "new_members_only": False,
    "valid_from": None,
    "valid_until": None,
    "valid_days": 30,
    "valid_hours": 0,
    "stackable": False,
    "restore_on_refund": True,
    "claimable": True,
}
MJ99_TEMPLATE_EXAMPLE: JsonDict = {
    "template_id": TEMPLATE_ID_EXAMPLE,
    "version": 2,
    "status": "active",
    "terms": MJ99_TERMS_EXAMPLE,
    "limits": {"total_stock": 100000, "per_member_limit": 1, "daily_budget": 0, "stock_shards": 8},
    "remaining_stock": 98800,
    "created_at": "2026-04-20T02:00:00Z",
    "updated_at": "2026-04-28T07:30:12Z",
}
P80_TEMPLATE_EXAMPLE: JsonDict = {
    "template_id": "P80-CAP15",
    "version": 1,
    "status": "draft",
    "terms": {
        **MJ99_TERMS_EXAMPLE,
        "name": "8折 最高减15",
        "kind": "percent_off",
        "threshold_fen": 0,
        "discount_fen": 0,
        "percent": 20,
        "cap_fen": 1500,
        "channels": ["online"],
        "valid_until": "2026-06-30T15:59:59Z",
        "valid_days": 0,
        "restore_on_refund": False,
        "claimable": False,
    },
    # 0: no stock limit, so no remaining stock either.
    "limits": {"total_stock": 0, "per_member_limit": 0, "daily_budget": 0, "stock_shards": 1},
    "remaining_stock": None,
    "created_at": "2026-05-06T08:12:40Z",
    "updated_at": "2026-05-06T08:12:40Z",
}


class CouponTemplate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [MJ99_TEMPLATE_EXAMPLE, P80_TEMPLATE_EXAMPLE]}
    )

    template_id: str
    version: int
    status: str = Field(examples=["active"])
    terms: CouponTerms
    limits: CouponLimits
    remaining_stock: int | None = Field(description="None: unlimited")
    created_at: datetime
    updated_at: datetime


class CouponTemplates(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                # Ordered by template id; the cursor is the page's last id.
                {
                    "templates": [MJ99_TEMPLATE_EXAMPLE, P80_TEMPLATE_EXAMPLE],
                    "next_cursor": "P80-CAP15",
                },
                {"templates": [], "next_cursor": None},
            ]
        }
    )

    templates: list[CouponTemplate]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class CouponReport(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "template_id": "MJ99-30",
                    "issued": 1200,
                    "redeemed": 480,
                    "expired": 100,
                    "redemption_rate": 0.4,
                    "discount_fen": 1440000,
                    "remaining_stock": 98800,
                }
            ]
        }
    )

    template_id: str
    issued: int
    redeemed: int
    expired: int
    redemption_rate: float = Field(description="redeemed / issued (4 decimals)")
    discount_fen: int = Field(description="Discount cost of the redeemed coupons")
    remaining_stock: int | None


CLAIMED_COUPON_EXAMPLE: JsonDict = {
    "coupon_id": "2b3c4d5e-6f70-4a8b-9c0d-1e2f3a4b5c6d",
    "code": "7KQ2M9X4T8B1C",
    "template_id": TEMPLATE_ID_EXAMPLE,
    "template_version": 2,
    "member_id": MEMBER_ID_EXAMPLE,
    "reason": "claim",
    "status": "available",
    # An issue answers without the terms; the wallet lists them.
    "name": None,
    "terms": None,
    "issued_at": "2026-05-01T04:00:00Z",
    "valid_from": "2026-05-01T04:00:00Z",
    "expires_at": "2026-05-31T04:00:00Z",
    "order_id": None,
    "discount_fen": None,
    "replayed": False,
}
USED_COUPON_EXAMPLE: JsonDict = {
    "coupon_id": "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9",
    "code": "Q4W8E2R6T0Y3U",
    "template_id": TEMPLATE_ID_EXAMPLE,
    "template_version": 1,
    "member_id": MEMBER_ID_EXAMPLE,
    "reason": "registration",
    "status": "used",
    "name": "满99减30",
    "terms": {**MJ99_TERMS_EXAMPLE, "claimable": False},
    "issued_at": "2026-04-21T10:15:03Z",
    "valid_from": "2026-04-21T10:15:03Z",
    "expires_at": "2026-05-21T10:15:03Z",
    "order_id": "c0ffee00-1234-4abc-8def-0123456789ab",
    "discount_fen": 3000,
    "replayed": False,
}


class Coupon(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [CLAIMED_COUPON_EXAMPLE]})

    coupon_id: str
    code: str = Field(description="What the member shows at the till")
    template_id: str
    template_version: int
    member_id: str
    reason: str
    status: str = Field(description="available, locked, used or expired")
    name: str | None
    terms: CouponTerms | None = None
    issued_at: datetime
    valid_from: datetime
    expires_at: datetime
    order_id: str | None
    discount_fen: int | None
    replayed: bool


class Wallet(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "coupons": [
                        {
                            **CLAIMED_COUPON_EXAMPLE,
                            "name": "满99减30",
                            "terms": MJ99_TERMS_EXAMPLE,
                        },
                        USED_COUPON_EXAMPLE,
                    ],
                    "next_cursor": "1042",
                }
            ]
        }
    )

    coupons: list[Coupon]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class Claim(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"template_id": "MJ99-30", "issue_key": "mp-7f3a-claim-0001"}]
        },
    )

    template_id: str = Field(min_length=1, max_length=64)
    issue_key: str = Field(
        min_length=1,
        max_length=CLAIM_KEY_MAX,
        description="Retry with the same key: the same coupon",
    )


class Grant(Claim):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "template_id": "SORRY-20",
                    "member_id": MEMBER_ID_EXAMPLE,
                    "issue_key": "ticket-8812",
                }
            ]
        },
    )

    member_id: uuid.UUID
    issue_key: str = Field(
        min_length=1,
        max_length=GRANT_KEY_MAX,
        description="Retry with the same key: the same coupon",
    )


class IssueItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    member_id: uuid.UUID
    # "grant:" goes in front, as for one grant.
    issue_key: str = Field(
        min_length=1,
        max_length=GRANT_KEY_MAX,
        description="This member's coupon: sent again (a retried batch), the same coupon",
    )


# As rewards' IssueCoupons (services/rewards/coupons/handlers.MAX_BATCH).
MAX_BATCH = 1_000


class BulkIssue(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "reason": "registration",
                    "items": [
                        {
                            "member_id": MEMBER_ID_EXAMPLE,
                            "issue_key": "newpack-2026w18-9f1c0a7e",
                        },
                        {
                            "member_id": "5d2e1c4b-3a29-4f18-8e07-6d5c4b3a2918",
                            "issue_key": "newpack-2026w18-5d2e1c4b",
                        },
                    ],
                }
            ]
        },
    )

    items: list[IssueItem] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description="Served in this order (the first get the last stock); keys distinct",
    )
    reason: Literal["operator_grant", "registration", "tier_benefit", "journey"] = "operator_grant"


class IssueResult(BaseModel):
    member_id: str
    issue_key: str
    outcome: Literal["issued", "replayed", "refused"] = Field(
        description="replayed: this key issued the coupon before (a retry)"
    )
    coupon_id: str | None
    code: str | None = Field(description="The coupon's code when issued or replayed")
    expires_at: datetime | None
    refusal: str | None = Field(
        description="Why not: OUT_OF_STOCK, MEMBER_LIMIT_REACHED, DAILY_BUDGET_EXHAUSTED,"
        " MEMBER_ERASED, NOT_A_NEW_MEMBER, TEMPLATE_PAUSED / TEMPLATE_ENDED / TEMPLATE_DRAFT,"
        " TEMPLATE_EXPIRED, IDEMPOTENCY_KEY_REUSED"
    )
    detail: str | None


class BulkIssueReply(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "template_id": "NEW-PACK-3D",
                    "issued": 1,
                    "replayed": 0,
                    "refused": 1,
                    "results": [
                        {
                            "member_id": MEMBER_ID_EXAMPLE,
                            "issue_key": "newpack-2026w18-9f1c0a7e",
                            "outcome": "issued",
                            "coupon_id": "2b3c4d5e-6f70-4a8b-9c0d-1e2f3a4b5c6d",
                            "code": "7KQ2M9X4T8B1C",
                            "expires_at": "2026-05-04T12:00:00+08:00",
                            "refusal": None,
                            "detail": None,
                        },
                        {
                            "member_id": "5d2e1c4b-3a29-4f18-8e07-6d5c4b3a2918",
                            "issue_key": "newpack-2026w18-5d2e1c4b",
                            "outcome": "refused",
                            "coupon_id": None,
                            "code": None,
                            "expires_at": None,
                            "refusal": "NOT_A_NEW_MEMBER",
                            "detail": "this coupon is for new members only (no order yet)",
                        },
                    ],
                }
            ]
        }
    )

    template_id: str
    issued: int
    replayed: int
    refused: int
    results: list[IssueResult] = Field(description="One per item, in the order sent")


def stock_or_none(remaining: int) -> int | None:
    """The service's remaining stock; negative means unlimited (None)."""
    return None if remaining < 0 else remaining


def terms_message(t: CouponTerms) -> rewards_pb2.CouponTerms:
    return rewards_pb2.CouponTerms(
        **t.model_dump(exclude={"valid_from", "valid_until"}),
        valid_from=optional_timestamp(t.valid_from),
        valid_until=optional_timestamp(t.valid_until),
    )


def terms_model(m: rewards_pb2.CouponTerms) -> CouponTerms:
    return CouponTerms.model_construct(
        name=m.name,
        kind=m.kind,  # type: ignore[arg-type]
        threshold_fen=m.threshold_fen,
        discount_fen=m.discount_fen,
        percent=m.percent,
        cap_fen=m.cap_fen,
        max_price_fen=m.max_price_fen,
        price_fen=m.price_fen,
        skus=list(m.skus),
        categories=list(m.categories),
        store_ids=list(m.store_ids),
        channels=list(m.channels),
        tiers=list(m.tiers),
        new_members_only=m.new_members_only,
        valid_from=optional_utc(m, "valid_from"),
        valid_until=optional_utc(m, "valid_until"),
        valid_days=m.valid_days,
        valid_hours=m.valid_hours,
        stackable=m.stackable,
        restore_on_refund=m.restore_on_refund,
        claimable=m.claimable,
    )


def template_model(m: rewards_pb2.CouponTemplate) -> CouponTemplate:
    return CouponTemplate(
        template_id=m.template_id,
        version=m.version,
        status=m.status,
        terms=terms_model(m.terms),
        limits=CouponLimits(
            total_stock=m.limits.total_stock,
            per_member_limit=m.limits.per_member_limit,
            daily_budget=m.limits.daily_budget,
            stock_shards=m.limits.stock_shards or 1,
        ),
        remaining_stock=stock_or_none(m.remaining_stock),
        created_at=utc(m.created_at),
        updated_at=utc(m.updated_at),
    )


def coupon_model(m: rewards_pb2.Coupon) -> Coupon:
    has_terms = m.HasField("terms")
    return Coupon(
        coupon_id=m.coupon_id,
        code=m.code,
        template_id=m.template_id,
        template_version=m.template_version,
        member_id=m.member_id,
        reason=m.reason,
        status=m.status,
        name=m.terms.name if has_terms else None,
        terms=terms_model(m.terms) if has_terms else None,
        issued_at=utc(m.issued_at),
        valid_from=utc(m.valid_from),
        expires_at=utc(m.expires_at),
        order_id=m.order_id or None,
        discount_fen=m.discount_fen if m.status == "used" else None,
        replayed=m.replayed,
    )


# ---- mini-program -----------------------------------------------------------------


@router.get(
    "/v1/members/{member_id}/coupons",
    response_model=Wallet,
    tags=["coupons"],
    summary="A member's coupon wallet, newest first",
    responses=MEMBER_ERRORS,
)
async def list_coupons(
    member_id: MemberId,
    request: Request,
    status: Annotated[list[WalletStatus] | None, Query(description="Repeat to combine")] = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> Wallet:
    reply = await downstreams(request).rewards.call(
        "ListMemberCoupons",
        rewards_pb2.ListMemberCouponsRequest(
            member_id=str(member_id),
            statuses=status or [],
            page_size=page_size,
            cursor=cursor or "",
        ),
    )
    return Wallet(
        coupons=[coupon_model(c) for c in reply.coupons], next_cursor=reply.next_cursor or None
    )


@router.post(
    "/v1/members/{member_id}/coupons",
    response_model=Coupon,
    status_code=201,
    tags=["coupons"],
    summary="Claim a coupon of a claimable template (idempotent on issue_key)",
    responses=CLAIM_ERRORS,
)
async def claim_coupon(member_id: MemberId, body: Claim, request: Request) -> Coupon:
    reply = await downstreams(request).rewards.call(
        "IssueCoupon",
        rewards_pb2.IssueCouponRequest(
            template_id=body.template_id,
            member_id=str(member_id),
            reason="claim",
            issue_key=f"claim:{member_id}:{body.issue_key}",
            issued_by="member",
        ),
    )
    return coupon_model(reply)


# ---- operators ----------------------------------------------------------------------


@router.post(
    "/v1/admin/coupon-templates",
    response_model=CouponTemplate,
    status_code=201,
    tags=["admin"],
    summary="Create a coupon template (version 1)",
    responses=TEMPLATE_ERRORS,
)
async def create_template(body: NewTemplate, request: Request) -> CouponTemplate:
    reply = await downstreams(request).rewards.call(
        "CreateCouponTemplate",
        rewards_pb2.CreateCouponTemplateRequest(
            template_id=body.template_id,
            terms=terms_message(body.terms),
            limits=rewards_pb2.CouponLimits(**body.limits.model_dump()),
            status=body.status,
            created_by=principal(request),
        ),
    )
    return template_model(reply)


@router.get(
    "/v1/admin/coupon-templates",
    response_model=CouponTemplates,
    tags=["admin"],
    summary="Coupon templates by id",
)
async def list_templates(
    request: Request,
    status: Annotated[Literal["draft", "active", "paused", "ended"] | None, Query()] = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> CouponTemplates:
    reply = await downstreams(request).rewards.call(
        "ListCouponTemplates",
        rewards_pb2.ListCouponTemplatesRequest(
            status=status or "", page_size=page_size, cursor=cursor or ""
        ),
    )
    return CouponTemplates(
        templates=[template_model(t) for t in reply.templates],
        next_cursor=reply.next_cursor or None,
    )


@router.get(
    "/v1/admin/coupon-templates/{template_id}",
    response_model=CouponTemplate,
    tags=["admin"],
    summary="A coupon template's current version",
    responses=TEMPLATE_ERRORS,
)
async def get_template(template_id: TemplateId, request: Request) -> CouponTemplate:
    reply = await downstreams(request).rewards.call(
        "GetCouponTemplate", rewards_pb2.GetCouponTemplateRequest(template_id=template_id)
    )
    return template_model(reply)


@router.post(
    "/v1/admin/coupon-templates/{template_id}/versions",
    response_model=CouponTemplate,
    status_code=201,
    tags=["admin"],
    summary="New terms for coupons issued from now on (issued ones keep theirs)",
    responses=TEMPLATE_ERRORS,
)
async def new_version(
    template_id: TemplateId, body: NewVersion, request: Request
) -> CouponTemplate:
    reply = await downstreams(request).rewards.call(
        "NewCouponTemplateVersion",
        rewards_pb2.NewCouponTemplateVersionRequest(
            template_id=template_id,
            terms=terms_message(body.terms),
            expected_version=body.expected_version,
            created_by=principal(request),
        ),
    )
    return template_model(reply)


@router.put(
    "/v1/admin/coupon-templates/{template_id}/status",
    response_model=CouponTemplate,
    tags=["admin"],
    summary="Activate, pause or end a template",
    responses=TEMPLATE_ERRORS,
)
async def set_status(
    template_id: TemplateId, body: TemplateStatus, request: Request
) -> CouponTemplate:
    reply = await downstreams(request).rewards.call(
        "SetCouponTemplateStatus",
        rewards_pb2.SetCouponTemplateStatusRequest(template_id=template_id, status=body.status),
    )
    return template_model(reply)


@router.get(
    "/v1/admin/coupon-templates/{template_id}/report",
    response_model=CouponReport,
    tags=["admin"],
    summary="Issued, redeemed, redemption rate and discount cost of a template",
    responses=TEMPLATE_ERRORS,
)
async def report(template_id: TemplateId, request: Request) -> CouponReport:
    r = await downstreams(request).rewards.call(
        "GetCouponReport", rewards_pb2.GetCouponReportRequest(template_id=template_id)
    )
    return CouponReport(
        template_id=r.template_id,
        issued=r.issued,
        redeemed=r.redeemed,
        expired=r.expired,
        redemption_rate=round(r.redemption_rate_bp / 10_000, 4),
        discount_fen=r.discount_fen,
        remaining_stock=stock_or_none(r.remaining_stock),
    )


@router.post(
    "/v1/admin/coupons:issue",
    response_model=Coupon,
    status_code=201,
    tags=["admin"],
    summary="Grant a coupon to a member (operator_grant; idempotent on issue_key)",
    responses=CLAIM_ERRORS,
)
async def grant(body: Grant, request: Request) -> Coupon:
    reply = await downstreams(request).rewards.call(
        "IssueCoupon",
        rewards_pb2.IssueCouponRequest(
            template_id=body.template_id,
            member_id=str(body.member_id),
            reason="operator_grant",
            issue_key=GRANT_KEY_PREFIX + body.issue_key,
            issued_by=principal(request),
        ),
    )
    return coupon_model(reply)


@router.post(
    "/v1/admin/coupon-templates/{template_id}/issue",
    response_model=BulkIssueReply,
    tags=["admin"],
    summary="Issue a template to up to 1,000 members at once (a campaign to a list)",
    description="Each item is issued, replayed (its issue_key issued the coupon before) or"
    " refused with the code of the guard; a refused item writes nothing, the others are"
    " issued. Sending the whole batch again is safe: issued items replay with the same codes."
    " Stock, per-member limit, daily budget and template status hold exactly as for one"
    " issue (docs/coupons.md, bulk issuance).",
    responses={
        404: problem_response("No such template (UNKNOWN_TEMPLATE)"),
        422: problem_response(
            "Malformed batch, nothing written: `field` names the item"
            " (DUPLICATE_ISSUE_KEY on items[3].issue_key, ...)"
        ),
    },
)
async def issue_many(template_id: TemplateId, body: BulkIssue, request: Request) -> BulkIssueReply:
    reply = await downstreams(request).rewards.issue_coupons(
        rewards_pb2.IssueCouponsRequest(
            template_id=template_id,
            reason=body.reason,
            issued_by=principal(request),
            items=[
                rewards_pb2.IssueCouponsItem(
                    member_id=str(i.member_id), issue_key=GRANT_KEY_PREFIX + i.issue_key
                )
                for i in body.items
            ],
        ),
    )
    return BulkIssueReply(
        template_id=template_id,
        issued=reply.issued,
        replayed=reply.replayed,
        refused=reply.refused,
        results=[
            IssueResult(
                member_id=str(item.member_id),
                issue_key=item.issue_key,
                outcome=r.outcome,  # type: ignore[arg-type]
                coupon_id=r.coupon.coupon_id if r.HasField("coupon") else None,
                code=r.coupon.code if r.HasField("coupon") else None,
                expires_at=utc(r.coupon.expires_at) if r.HasField("coupon") else None,
                refusal=r.refusal or None,
                detail=r.detail or None,
            )
            for item, r in zip(body.items, reply.results, strict=True)
        ],
    )


@router.put(
    "/v1/admin/coupon-templates/{template_id}/limits",
    response_model=CouponTemplate,
    tags=["admin"],
    summary="Change a template's stock, per-member limit, daily budget or shards",
    responses=TEMPLATE_ERRORS
    | {
        409: problem_response(
            "STOCK_BELOW_ISSUED (total_stock below the coupons already issued), TEMPLATE_ENDED"
        )
    },
)
async def set_limits(
    template_id: TemplateId, body: CouponLimits, request: Request
) -> CouponTemplate:
    reply = await downstreams(request).rewards.call(
        "SetCouponTemplateLimits",
        rewards_pb2.SetCouponTemplateLimitsRequest(
            template_id=template_id, limits=rewards_pb2.CouponLimits(**body.model_dump())
        ),
        {"limits.total_stock": "total_stock", "limits.": ""},
    )
    return template_model(reply)


class Revocation(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"reason": "issued in error"}]},
    )

    reason: str = Field(min_length=1, max_length=256)


@router.post(
    "/v1/admin/coupons/{code}/revoke",
    response_model=Coupon,
    tags=["admin"],
    summary="Take an issued coupon back (available -> revoked), once",
    responses={
        404: problem_response("UNKNOWN_COUPON"),
        409: problem_response(
            "COUPON_LOCKED (at a till now), COUPON_ALREADY_USED, COUPON_EXPIRED;"
            " a second revocation replays the first"
        ),
        422: problem_response("Malformed code or revocation; `field` names the culprit"),
    },
)
async def revoke(
    code: Annotated[str, Path(min_length=1, max_length=64, description="The coupon's code")],
    body: Revocation,
    request: Request,
) -> Coupon:
    reply = await downstreams(request).rewards.call(
        "RevokeCoupon",
        rewards_pb2.RevokeCouponRequest(
            code=code, operator_id=principal(request), reason=body.reason
        ),
    )
    return coupon_model(reply)
