"""Points routes (rewards service): the member's balance, history and
expiring points for the mini-program; adjustments and liability for operators."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loyalty.rewards.v1 import rewards_pb2

from ..clients import Downstreams
from ..principal import principal
from .common import (
    MEMBER_ERRORS,
    MEMBER_ID_EXAMPLE,
    MemberId,
    downstreams,
    problem_response,
    utc,
)

router = APIRouter()


class ExpiringBatch(BaseModel):
    points: int
    expires_at: datetime


class PointsBalance(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"member_id": MEMBER_ID_EXAMPLE, "available": 32, "lifetime_earned": 120}]
        }
    )

    member_id: str
    available: int = Field(description="Points the member can spend now")
    lifetime_earned: int = Field(description="All points ever earned")


POINTS_SUMMARY_EXAMPLE: JsonDict = {
    "member_id": MEMBER_ID_EXAMPLE,
    "available": 320,
    "lifetime_earned": 1280,
    "pending": 18,
    "held": 0,
    "debt": 0,
    "expiring_soon": [{"points": 40, "expires_at": "2026-12-31T15:59:59Z"}],
}


class PointsSummary(PointsBalance):
    """The member centre's view: every part of the balance, and what lapses soon."""

    model_config = ConfigDict(json_schema_extra={"examples": [POINTS_SUMMARY_EXAMPLE]})

    pending: int = Field(description="Earned, spendable once the refund window ends")
    held: int = Field(description="Reserved by an open checkout")
    debt: int = Field(description="Owed after a refund of spent points; earns repay it")
    expiring_soon: list[ExpiringBatch] = Field(description="Within the announcement horizon")


class LotTouched(BaseModel):
    lot_id: str
    points: int = Field(description="Signed change of the lot (0: the lot was created)")


class HistoryLine(BaseModel):
    transaction_id: str
    kind: str = Field(examples=["earn"])
    amount: int = Field(description="Change of available points (signed)")
    balance_after: int
    operation_points: int = Field(description="Size of the whole operation")
    lots: list[LotTouched]
    order_id: str | None
    reference: str | None
    reason: str | None
    operator_id: str | None
    created_at: datetime


class PointsHistory(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "lines": [
                        {
                            "transaction_id": "7d4e2f0a-1b3c-4d5e-8f90-a1b2c3d4e5f6",
                            "kind": "earn",
                            "amount": 18,
                            "balance_after": 320,
                            "operation_points": 18,
                            "lots": [
                                {"lot_id": "5c1d9e7f-2a3b-4c4d-9e5f-6a7b8c9d0e1f", "points": 18}
                            ],
                            "order_id": "c0ffee00-1234-4abc-8def-0123456789ab",
                            "reference": None,
                            "reason": None,
                            "operator_id": None,
                            "created_at": "2026-11-25T04:12:30Z",
                        }
                    ],
                    "next_cursor": "48213",
                }
            ]
        }
    )

    lines: list[HistoryLine]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class ExpiringPoints(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "member_id": MEMBER_ID_EXAMPLE,
                    "batches": [{"points": 40, "expires_at": "2026-12-31T15:59:59Z"}],
                }
            ]
        }
    )

    member_id: str
    batches: list[ExpiringBatch]


class Adjustment(BaseModel):
    points: int = Field(description="Positive credits, negative debits; never 0")
    reason: str = Field(
        min_length=1,
        max_length=256,
        description="Free text; who acted is the authenticated client (and X-Operator-User)",
    )
    idempotency_key: str = Field(min_length=1, max_length=128)


class AdjustmentResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                # A goodwill credit of 15 to PointsBalance's member (32 before).
                {
                    "transaction_id": "7d6c5b4a-3f2e-4d1c-8b0a-9f8e7d6c5b4a",
                    "member_id": MEMBER_ID_EXAMPLE,
                    "points": 15,
                    "available": 47,
                    "replayed": False,
                },
                # A debit; a retry with its idempotency_key answers the same, replayed.
                {
                    "transaction_id": "0e1d2c3b-4a59-4687-9a5b-4c3d2e1f0a9b",
                    "member_id": MEMBER_ID_EXAMPLE,
                    "points": -20,
                    "available": 27,
                    "replayed": True,
                },
            ]
        }
    )

    transaction_id: str
    member_id: str
    points: int
    available: int
    replayed: bool


class Liability(BaseModel):
    # The journal sums to zero: available + pending + held - debt
    # = issued - redeemed - expired + adjusted (35,022,000 here).
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "available": 33500000,
                    "pending": 1480000,
                    "held": 62000,
                    "debt": 20000,
                    "members_with_points": 184230,
                    "expiring_soon": 910000,
                    "issued": 48210500,
                    "redeemed": 12004300,
                    "expired": 1200000,
                    "adjusted": 15800,
                }
            ]
        }
    )

    available: int
    pending: int
    held: int
    debt: int
    members_with_points: int
    expiring_soon: int
    issued: int
    redeemed: int
    expired: int
    adjusted: int


def _batches(batches: Iterable[rewards_pb2.ExpiringBatch]) -> list[ExpiringBatch]:
    return [ExpiringBatch(points=b.points, expires_at=utc(b.expires_at)) for b in batches]


@router.get(
    "/v1/members/{member_id}/points",
    response_model=PointsBalance,
    tags=["points"],
    summary="A member's points balance",
    responses=MEMBER_ERRORS,
)
async def get_points(member_id: MemberId, request: Request) -> PointsBalance:
    reply = await downstreams(request).rewards.get_points_balance(str(member_id))
    return PointsBalance(
        member_id=reply.member_id or str(member_id),
        available=reply.available,
        lifetime_earned=reply.lifetime_earned,
    )


@router.get(
    "/v1/members/{member_id}/points/summary",
    response_model=PointsSummary,
    tags=["points"],
    summary="A member's points: available, pending, held, debt and expiring soon",
    responses=MEMBER_ERRORS,
)
async def get_points_summary(member_id: MemberId, request: Request) -> PointsSummary:
    return await points_summary(downstreams(request), str(member_id))


async def points_summary(down: Downstreams, member_id: str) -> PointsSummary:
    """The summary from rewards (also one half of the member centre, api/centre.py)."""
    summary = await down.rewards.get_points_summary(member_id, 0)
    reply = summary.balance
    return PointsSummary(
        member_id=reply.member_id or member_id,
        available=reply.available,
        lifetime_earned=reply.lifetime_earned,
        pending=reply.pending,
        held=reply.held,
        debt=reply.debt,
        expiring_soon=_batches(summary.expiring_soon),
    )


@router.get(
    "/v1/members/{member_id}/points/history",
    response_model=PointsHistory,
    tags=["points"],
    summary="A member's points statement, newest first",
    responses=MEMBER_ERRORS,
)
async def get_history(
    member_id: MemberId,
    request: Request,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str, Query(max_length=20)] = "",
) -> PointsHistory:
    reply = await downstreams(request).rewards.get_points_history(str(member_id), page_size, cursor)
    return PointsHistory(
        lines=[
            HistoryLine(
                transaction_id=line.transaction_id,
                kind=line.kind,
                amount=line.amount,
                balance_after=line.balance_after,
                operation_points=line.operation_points,
                lots=[LotTouched(lot_id=lot.lot_id, points=lot.points) for lot in line.lots],
                order_id=line.order_id or None,
                reference=line.reference or None,
                reason=line.reason or None,
                operator_id=line.operator_id or None,
                created_at=utc(line.created_at),
            )
            for line in reply.lines
        ],
        next_cursor=reply.next_cursor or None,
    )


@router.get(
    "/v1/members/{member_id}/points/expiring",
    response_model=ExpiringPoints,
    tags=["points"],
    summary="Points lapsing soon, by date",
    responses=MEMBER_ERRORS,
)
async def get_expiring(
    member_id: MemberId,
    request: Request,
    days: Annotated[int, Query(ge=0, le=3660, description="0: the service default")] = 0,
) -> ExpiringPoints:
    reply = await downstreams(request).rewards.get_expiring_points(str(member_id), days)
    return ExpiringPoints(
        member_id=reply.member_id,
        batches=_batches(reply.batches),
    )


@router.post(
    "/v1/admin/members/{member_id}/points/adjustments",
    response_model=AdjustmentResult,
    tags=["admin"],
    summary="Credit or debit a member's points, with a reason; the caller is audited",
    responses=MEMBER_ERRORS,
)
async def adjust(member_id: MemberId, body: Adjustment, request: Request) -> AdjustmentResult:
    reply = await downstreams(request).rewards.adjust_points(
        rewards_pb2.AdjustPointsRequest(
            member_id=str(member_id),
            points=body.points,
            operator_id=principal(request),
            reason=body.reason,
            idempotency_key=body.idempotency_key,
        )
    )
    return AdjustmentResult(
        transaction_id=reply.transaction_id,
        member_id=reply.member_id,
        points=reply.points,
        available=reply.available,
        replayed=reply.replayed,
    )


@router.get(
    "/v1/admin/points/liability",
    response_model=Liability,
    tags=["admin"],
    summary="Points the brand owes members",
)
async def liability(
    request: Request,
    expiring_within_days: Annotated[int, Query(ge=0, le=3660)] = 0,
) -> Liability:
    reply = await downstreams(request).rewards.get_points_liability(expiring_within_days)
    return Liability(
        available=reply.available,
        pending=reply.pending,
        held=reply.held,
        debt=reply.debt,
        members_with_points=reply.members_with_points,
        expiring_soon=reply.expiring_soon,
        issued=reply.issued,
        redeemed=reply.redeemed,
        expired=reply.expired,
        adjusted=reply.adjusted,
    )


class Action(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"action": "check_in", "idempotency_key": "ci-20260501"}]},
    )

    # Referral points are granted by the referral programme, never claimed.
    action: Literal["check_in", "review", "tea_residue"]
    idempotency_key: str = Field(min_length=1, max_length=128)


class Movement(BaseModel):
    """Points moved by an action, a hold, a post or a void."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "transaction_id": "7d6c5b4a-3f2e-4d1c-8b0a-9f8e7d6c5b4a",
                    "member_id": MEMBER_ID_EXAMPLE,
                    "points": 30,
                    "available": 70,
                    "hold_id": "2b3c4d5e-6f70-4a8b-9c0d-1e2f3a4b5c6d",
                    "hold_status": "held",
                    "hold_expires_at": "2026-05-01T04:15:00Z",
                    "replayed": False,
                }
            ]
        }
    )

    transaction_id: str
    member_id: str
    points: int
    available: int = Field(description="Available right after (for a replay: now)")
    hold_id: str | None = None
    hold_status: str | None = Field(None, description="held, posted, voided, expired")
    hold_expires_at: datetime | None = None
    replayed: bool


def movement_model(m: rewards_pb2.PointsMovement) -> Movement:
    return Movement(
        transaction_id=m.transaction_id,
        member_id=m.member_id,
        points=m.points,
        available=m.available,
        hold_id=m.hold_id or None,
        hold_status=m.hold_status or None,
        hold_expires_at=utc(m.hold_expires_at) if m.HasField("hold_expires_at") else None,
        replayed=m.replayed,
    )


@router.post(
    "/v1/members/{member_id}/points/actions",
    response_model=Movement,
    tags=["points"],
    summary="Points for a check-in, a review or tea residue returned (per-period caps apply)",
    responses=MEMBER_ERRORS
    | {409: problem_response("ACTION_CAP_REACHED, MEMBER_ERASED, IDEMPOTENCY_KEY_REUSED")},
)
async def record_action(member_id: MemberId, body: Action, request: Request) -> Movement:
    reply = await downstreams(request).rewards.call(
        "RecordAction",
        rewards_pb2.RecordActionRequest(
            member_id=str(member_id), action=body.action, idempotency_key=body.idempotency_key
        ),
    )
    return movement_model(reply)


class HoldBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "points": 30,
                    "idempotency_key": "mp-cart-7f3a",
                    "reference": "mini-program order 7f3a",
                    "ttl_seconds": 900,
                }
            ]
        },
    )

    points: int = Field(ge=1, description="Points to reserve")
    idempotency_key: str = Field(min_length=1, max_length=128)
    reference: str = Field("", max_length=256)
    ttl_seconds: int = Field(0, ge=0, description="0: the service's default time-out")


@router.post(
    "/v1/members/{member_id}/points/holds",
    response_model=Movement,
    tags=["points"],
    summary="Reserve points for a mini-program checkout (then post or void it)",
    responses=MEMBER_ERRORS
    | {409: problem_response("INSUFFICIENT_POINTS, MEMBER_ERASED, IDEMPOTENCY_KEY_REUSED")},
)
async def hold(member_id: MemberId, body: HoldBody, request: Request) -> Movement:
    reply = await downstreams(request).rewards.call(
        "HoldPoints",
        rewards_pb2.HoldPointsRequest(
            member_id=str(member_id),
            points=body.points,
            idempotency_key=body.idempotency_key,
            reference=body.reference,
            ttl_seconds=body.ttl_seconds,
        ),
    )
    return movement_model(reply)


HoldId = Annotated[uuid.UUID, Path(description="The hold's id (a UUID)")]
HOLD_ERRORS = MEMBER_ERRORS | {
    404: problem_response("UNKNOWN_HOLD (or another member's)"),
    409: problem_response("HOLD_POSTED, HOLD_VOIDED, HOLD_EXPIRED; the same step again replays"),
}


@router.post(
    "/v1/members/{member_id}/points/holds/{hold_id}/post",
    response_model=Movement,
    tags=["points"],
    summary="Spend a reservation, once (the order was paid)",
    responses=HOLD_ERRORS,
)
async def post_hold(member_id: MemberId, hold_id: HoldId, request: Request) -> Movement:
    reply = await downstreams(request).rewards.call(
        "PostHold", rewards_pb2.HoldRequest(hold_id=str(hold_id), member_id=str(member_id))
    )
    return movement_model(reply)


@router.post(
    "/v1/members/{member_id}/points/holds/{hold_id}/void",
    response_model=Movement,
    tags=["points"],
    summary="Give a reservation back (the order was cancelled), once",
    responses=HOLD_ERRORS,
)
async def void_hold(member_id: MemberId, hold_id: HoldId, request: Request) -> Movement:
    reply = await downstreams(request).rewards.call(
        "VoidHold", rewards_pb2.HoldRequest(hold_id=str(hold_id), member_id=str(member_id))
    )
    return movement_model(reply)


# As BulkEarnPoints (services/rewards/points/bulk.py MAX_BATCH).
MAX_EARN_BATCH = 1_000


class EarnLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    member_id: uuid.UUID
    points: int = Field(gt=0, le=10_000_000)
    reason: str = Field(min_length=1, max_length=256, description="Campaign, import... no PII")
    idempotency_key: str = Field(
        min_length=1, max_length=128, description="This line's: sent again, applied once"
    )
    occurred_at: AwareDatetime | None = Field(
        default=None, description="When the member earned (expiry counts from it); default now"
    )


class BulkEarn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "lines": [
                        {
                            "member_id": MEMBER_ID_EXAMPLE,
                            "points": 120,
                            "reason": "offline-upload SH001 2026-05-03",
                            "idempotency_key": "SH001-20260503-000017",
                            "occurred_at": "2026-05-03T11:20:00+08:00",
                        }
                    ]
                }
            ]
        },
    )

    lines: list[EarnLine] = Field(
        min_length=1, max_length=MAX_EARN_BATCH, description="Idempotency keys distinct"
    )


class EarnResult(BaseModel):
    idempotency_key: str
    outcome: Literal["applied", "replayed", "refused"] = Field(
        description="replayed: this key was applied before (a retry); nothing applied twice"
    )
    transaction_id: str | None
    member_id: str | None = Field(description="The member credited (a merged id's survivor)")
    points: int | None
    available: int | None = Field(description="The member's available points after this line")
    refusal: str | None = Field(
        description="Why not: MEMBER_ERASED, IDEMPOTENCY_KEY_REUSED, INVALID_OCCURRED_AT,"
        " EARN_ALREADY_EXPIRED, INVALID_POINTS, REASON_REQUIRED, ..."
    )
    detail: str | None


class BulkEarnReply(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "applied": 1,
                    "replayed": 0,
                    "refused": 1,
                    "results": [
                        {
                            "idempotency_key": "SH001-20260503-000017",
                            "outcome": "applied",
                            "transaction_id": "2b3c4d5e-6f70-4a8b-9c0d-1e2f3a4b5c6d",
                            "member_id": MEMBER_ID_EXAMPLE,
                            "points": 120,
                            "available": 440,
                            "refusal": None,
                            "detail": None,
                        },
                        {
                            "idempotency_key": "SH001-20260503-000018",
                            "outcome": "refused",
                            "transaction_id": None,
                            "member_id": None,
                            "points": None,
                            "available": None,
                            "refusal": "MEMBER_ERASED",
                            "detail": "member 5d2e1c4b-3a29-4f18-8e07-6d5c4b3a2918 was erased;"
                            " no further points can be written",
                        },
                    ],
                }
            ]
        }
    )

    applied: int
    replayed: int
    refused: int
    results: list[EarnResult]


@router.post(
    "/v1/admin/points/earns",
    response_model=BulkEarnReply,
    tags=["admin"],
    summary="Credit up to 1,000 earns at once (offline uploads, imports, batch campaigns)",
    description="Each line is applied, replayed (its idempotency_key was applied before) or"
    " refused with a code; a refused line writes nothing. Sending the batch again is safe."
    " Merged member ids are credited to their survivor (docs/ledger.md, bulk earn).",
    responses={
        422: problem_response(
            "Malformed batch, nothing written: `field` names the line"
            " (DUPLICATE_IDEMPOTENCY_KEY on lines[3].idempotency_key, ...)"
        ),
    },
)
async def bulk_earn(body: BulkEarn, request: Request) -> BulkEarnReply:
    lines = []
    for line in body.lines:
        msg = rewards_pb2.BulkEarnLine(
            member_id=str(line.member_id),
            points=line.points,
            reason=line.reason,
            idempotency_key=line.idempotency_key,
        )
        if line.occurred_at is not None:
            msg.occurred_at.FromDatetime(line.occurred_at)
        lines.append(msg)
    reply = await downstreams(request).rewards.bulk_earn_points(
        rewards_pb2.BulkEarnPointsRequest(operator_id=principal(request), lines=lines)
    )
    # Bulk earns publish no event: the credited members' cached views go now.
    views = request.app.state.member_views
    if views is not None:
        await views.bump(*{r.member_id for r in reply.results if r.outcome == "applied"})
    return BulkEarnReply(
        applied=reply.applied,
        replayed=reply.replayed,
        refused=reply.refused,
        results=[
            EarnResult(
                idempotency_key=line.idempotency_key,
                outcome=r.outcome,  # type: ignore[arg-type]
                transaction_id=r.transaction_id or None,
                member_id=r.member_id or None,
                points=r.points if r.outcome != "refused" else None,
                available=r.available if r.outcome != "refused" else None,
                refusal=r.refusal or None,
                detail=r.detail or None,
            )
            for line, r in zip(body.lines, reply.results, strict=True)
        ],
    )
