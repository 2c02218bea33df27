"""Points mall routes (rewards service): the catalogue, a member's exchanges;
item management for operators. Guarantees: docs/referral-and-mall.md."""

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

ITEM_ID_EXAMPLE = "5d1f6b2a-3c4e-4f70-8a9b-0c1d2e3f4a5b"
ItemId = Annotated[
    uuid.UUID,
    Path(description="The mall item's id (a UUID)", examples=[ITEM_ID_EXAMPLE]),
]
MALL_ERRORS = MEMBER_ERRORS | {
    409: problem_response(
        "Refused: INSUFFICIENT_POINTS, MALL_ITEM_OUT_OF_STOCK, MALL_MEMBER_LIMIT_REACHED,"
        " MALL_ITEM_NOT_ACTIVE, MALL_ITEM_OUT_OF_WINDOW, IDEMPOTENCY_KEY_REUSED, or the"
        " coupon could not be issued; nothing was written"
    ),
}
ITEM_ERRORS: dict[int | str, dict[str, object]] = {
    422: problem_response("Malformed item; `field` names the culprit"),
    404: problem_response("No such item"),
    409: problem_response("INVALID_STATUS_TRANSITION, STOCK_BELOW_EXCHANGED, MALL_ITEM_ENDED"),
}


class MallItemFields(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "¥20 off any drink",
                    "kind": "coupon",
                    "coupon_template_id": "INVITE-20",
                    "points_price": 800,
                    "cash_fen": 0,
                    "stock_total": 1000,
                    "per_member_limit": 2,
                    "starts_at": "2026-05-01T00:00:00+08:00",
                    "ends_at": "2026-06-01T00:00:00+08:00",
                },
                {
                    "name": "Brand tote bag",
                    "kind": "goods",
                    "sku": "TOTE-01",
                    "points_price": 1500,
                    "cash_fen": 990,
                    "stock_total": 200,
                    "per_member_limit": 1,
                },
            ]
        },
    )

    name: str = Field(min_length=1, max_length=256)
    kind: Literal["coupon", "goods"]
    coupon_template_id: str = Field(default="", max_length=64, description="For kind=coupon")
    sku: str = Field(default="", max_length=64, description="For kind=goods")
    points_price: int = Field(gt=0)
    cash_fen: int = Field(default=0, ge=0, description="Paid elsewhere; recorded on the exchange")
    stock_total: int = Field(ge=0)
    per_member_limit: int = Field(default=0, ge=0, description="0: no limit")
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None


class NewMallItem(MallItemFields):
    status: Literal["draft", "active"] = "draft"


class MallItemStatus(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"status": "paused"}]}
    )

    status: Literal["active", "paused", "ended"]


# Examples of what the API answers (times come back in UTC): the two items of
# MallItemFields' examples once created, and exchanges of them.
GOODS_ITEM_ID_EXAMPLE = "7e6d5c4b-3a29-4817-b6f5-e4d3c2b1a097"
COUPON_ITEM_EXAMPLE: JsonDict = {
    "item_id": ITEM_ID_EXAMPLE,
    "name": "¥20 off any drink",
    "kind": "coupon",
    "coupon_template_id": "INVITE-20",
    "sku": None,
    "points_price": 800,
    "cash_fen": 0,
    "stock_total": 1000,
    "stock_remaining": 873,
    "per_member_limit": 2,
    "starts_at": "2026-04-30T16:00:00Z",
    "ends_at": "2026-05-31T16:00:00Z",
    "status": "active",
    "created_at": "2026-04-28T02:15:00Z",
    "updated_at": "2026-04-30T01:00:00Z",
}
GOODS_ITEM_EXAMPLE: JsonDict = {
    "item_id": GOODS_ITEM_ID_EXAMPLE,
    "name": "Brand tote bag",
    "kind": "goods",
    "coupon_template_id": None,
    "sku": "TOTE-01",
    "points_price": 1500,
    "cash_fen": 990,
    "stock_total": 200,
    "stock_remaining": 163,
    "per_member_limit": 1,
    "starts_at": None,
    "ends_at": None,
    "status": "active",
    "created_at": "2026-04-20T03:00:00Z",
    "updated_at": "2026-04-20T03:00:00Z",
}
COUPON_EXCHANGE_EXAMPLE: JsonDict = {
    "exchange_id": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
    "member_id": MEMBER_ID_EXAMPLE,
    "item_id": ITEM_ID_EXAMPLE,
    "exchange_key": "mp-7f3a-20260501-0001",
    "points": 800,
    "cash_fen": 0,
    "points_transaction_id": "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
    "coupon_id": "2b3c4d5e-6f70-4a8b-9c0d-1e2f3a4b5c6d",
    "sku": None,
    "fulfilment": "issued",
    "created_at": "2026-05-01T04:00:00Z",
    "replayed": False,
    "carrier": None,
    "tracking_number": None,
    "shipped_at": None,
}
SHIPPED_EXCHANGE_EXAMPLE: JsonDict = {
    "exchange_id": "4d3c2b1a-0f9e-4d8c-b7a6-958473625140",
    "member_id": MEMBER_ID_EXAMPLE,
    "item_id": GOODS_ITEM_ID_EXAMPLE,
    "exchange_key": "mp-7f3a-20260503-0002",
    "points": 1500,
    "cash_fen": 990,
    "points_transaction_id": "8e7f6a5b-4c3d-4e2f-9a1b-0c9d8e7f6a5b",
    "coupon_id": None,
    "sku": "TOTE-01",
    "fulfilment": "shipped",
    "created_at": "2026-05-03T11:20:05Z",
    "replayed": False,
    "carrier": "SF Express",
    "tracking_number": "SF1234567890",
    "shipped_at": "2026-05-04T06:02:44Z",
}


class MallItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [COUPON_ITEM_EXAMPLE, GOODS_ITEM_EXAMPLE]}
    )

    item_id: str
    name: str
    kind: str
    coupon_template_id: str | None
    sku: str | None
    points_price: int
    cash_fen: int
    stock_total: int
    stock_remaining: int
    per_member_limit: int
    starts_at: datetime | None
    ends_at: datetime | None
    status: str
    created_at: datetime
    updated_at: datetime


class MallItems(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"items": [COUPON_ITEM_EXAMPLE, GOODS_ITEM_EXAMPLE], "next_cursor": "1042"},
                {"items": [], "next_cursor": None},
            ]
        }
    )

    items: list[MallItem]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class ExchangeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"item_id": ITEM_ID_EXAMPLE, "exchange_key": "mp-7f3a-20260501-0001"}]
        },
    )

    item_id: uuid.UUID
    exchange_key: str = Field(
        min_length=1, max_length=128, description="Retry with the same key: the same exchange"
    )


class MallExchange(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [COUPON_EXCHANGE_EXAMPLE, SHIPPED_EXCHANGE_EXAMPLE]}
    )

    exchange_id: str
    member_id: str
    item_id: str
    exchange_key: str
    points: int
    cash_fen: int
    points_transaction_id: str
    coupon_id: str | None
    sku: str | None
    fulfilment: str = Field(
        description="issued (coupon), pending or shipped (goods); awaiting_payment (points"
        " plus cash, reserved), released (unpaid in time), reversed (taken back)"
    )
    created_at: datetime
    replayed: bool
    carrier: str | None = Field(None, description="Goods, once shipped")
    tracking_number: str | None = Field(None, description="Goods, once shipped")
    shipped_at: datetime | None = None
    hold_id: str | None = Field(None, description="Points plus cash: the points held")
    payment_due_at: datetime | None = Field(
        None, description="Points plus cash: confirm the payment before this, or it is released"
    )
    payment_reference: str | None = Field(None, description="Once the payment is confirmed")
    paid_at: datetime | None = None
    released_at: datetime | None = Field(None, description="Unpaid in time: points, stock back")
    reversed_at: datetime | None = Field(None, description="Taken back by an operator")
    reversed_by: str | None = None


class Shipment(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"carrier": "SF Express", "tracking_number": "SF1234567890"}]
        },
    )

    carrier: str = Field(min_length=1, max_length=200)
    tracking_number: str = Field(min_length=1, max_length=200)


class MallExchanges(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "exchanges": [SHIPPED_EXCHANGE_EXAMPLE, COUPON_EXCHANGE_EXAMPLE],
                    "next_cursor": "5310",
                }
            ]
        }
    )

    exchanges: list[MallExchange]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


def item_input(body: MallItemFields) -> rewards_pb2.MallItemInput:
    return rewards_pb2.MallItemInput(
        name=body.name,
        kind=body.kind,
        coupon_template_id=body.coupon_template_id,
        sku=body.sku,
        points_price=body.points_price,
        cash_fen=body.cash_fen,
        stock_total=body.stock_total,
        per_member_limit=body.per_member_limit,
        starts_at=optional_timestamp(body.starts_at),
        ends_at=optional_timestamp(body.ends_at),
    )


def item_model(reply: rewards_pb2.MallItem) -> MallItem:
    i = reply.item
    return MallItem(
        item_id=reply.item_id,
        name=i.name,
        kind=i.kind,
        coupon_template_id=i.coupon_template_id or None,
        sku=i.sku or None,
        points_price=i.points_price,
        cash_fen=i.cash_fen,
        stock_total=i.stock_total,
        stock_remaining=reply.stock_remaining,
        per_member_limit=i.per_member_limit,
        starts_at=optional_utc(i, "starts_at"),
        ends_at=optional_utc(i, "ends_at"),
        status=reply.status,
        created_at=utc(reply.created_at),
        updated_at=utc(reply.updated_at),
    )


def exchange_model(e: rewards_pb2.MallExchange) -> MallExchange:
    return MallExchange(
        exchange_id=e.exchange_id,
        member_id=e.member_id,
        item_id=e.item_id,
        exchange_key=e.exchange_key,
        points=e.points,
        cash_fen=e.cash_fen,
        points_transaction_id=e.points_transaction_id,
        coupon_id=e.coupon_id or None,
        sku=e.sku or None,
        fulfilment=e.fulfilment,
        created_at=utc(e.created_at),
        replayed=e.replayed,
        carrier=e.carrier or None,
        tracking_number=e.tracking_number or None,
        shipped_at=optional_utc(e, "shipped_at"),
        hold_id=e.hold_id or None,
        payment_due_at=optional_utc(e, "payment_due_at"),
        payment_reference=e.payment_reference or None,
        paid_at=optional_utc(e, "paid_at"),
        released_at=optional_utc(e, "released_at"),
        reversed_at=optional_utc(e, "reversed_at"),
        reversed_by=e.reversed_by or None,
    )


def exchanges_model(reply: rewards_pb2.MallExchanges) -> MallExchanges:
    return MallExchanges(
        exchanges=[exchange_model(e) for e in reply.exchanges],
        next_cursor=reply.next_cursor or None,
    )


async def _items(request: Request, page_size: int, cursor: str, off_sale: bool) -> MallItems:
    reply = await downstreams(request).rewards.call(
        "ListMallItems",
        rewards_pb2.ListMallItemsRequest(
            page_size=page_size, cursor=cursor, include_off_sale=off_sale
        ),
    )
    return MallItems(
        items=[item_model(i) for i in reply.items], next_cursor=reply.next_cursor or None
    )


@router.get(
    "/v1/mall/items",
    response_model=MallItems,
    tags=["mall"],
    summary="Items on sale now, newest first",
    responses={422: problem_response("Malformed cursor or page size")},
)
async def list_items(
    request: Request,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str, Query(max_length=20)] = "",
) -> MallItems:
    return await _items(request, page_size, cursor, False)


@router.post(
    "/v1/members/{member_id}/mall/exchanges",
    response_model=MallExchange,
    tags=["mall"],
    summary="Exchange points for an item: debit and issue in one transaction, or nothing",
    responses=MALL_ERRORS,
)
async def exchange(member_id: MemberId, body: ExchangeRequest, request: Request) -> MallExchange:
    reply = await downstreams(request).rewards.call(
        "ExchangeMallItem",
        rewards_pb2.ExchangeMallItemRequest(
            member_id=str(member_id), item_id=str(body.item_id), exchange_key=body.exchange_key
        ),
    )
    return exchange_model(reply)


@router.get(
    "/v1/members/{member_id}/mall/exchanges",
    response_model=MallExchanges,
    tags=["mall"],
    summary="The member's exchanges, newest first",
    responses=MEMBER_ERRORS,
)
async def list_exchanges(
    member_id: MemberId,
    request: Request,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str, Query(max_length=20)] = "",
) -> MallExchanges:
    reply = await downstreams(request).rewards.call(
        "ListMallExchanges",
        rewards_pb2.ListMallExchangesRequest(
            member_id=str(member_id), page_size=page_size, cursor=cursor
        ),
    )
    return exchanges_model(reply)


ExchangeId = Annotated[
    uuid.UUID,
    Path(
        description="The exchange's id (a UUID)",
        examples=["9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"],
    ),
]


@router.get(
    "/v1/admin/mall/exchanges",
    response_model=MallExchanges,
    tags=["admin"],
    summary="Every member's exchanges, newest first: `fulfilment=pending` is the shipping queue",
    responses={422: problem_response("Malformed cursor, page size or fulfilment")},
)
async def admin_list_exchanges(
    request: Request,
    fulfilment: Annotated[
        Literal["issued", "pending", "shipped", "awaiting_payment", "released", "reversed"] | None,
        Query(),
    ] = None,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str, Query(max_length=20)] = "",
) -> MallExchanges:
    reply = await downstreams(request).rewards.call(
        "ListMallExchanges",
        rewards_pb2.ListMallExchangesRequest(
            page_size=page_size, cursor=cursor, fulfilment=fulfilment or ""
        ),
    )
    return exchanges_model(reply)


@router.post(
    "/v1/admin/mall/exchanges/{exchange_id}/ship",
    response_model=MallExchange,
    tags=["admin"],
    summary="Goods handed to a carrier: pending -> shipped, once",
    responses={
        404: problem_response("UNKNOWN_MALL_EXCHANGE"),
        409: problem_response(
            "NOT_GOODS (a coupon exchange: nothing ships), or ALREADY_SHIPPED with another"
            " tracking number; the same shipment again replays it"
        ),
        422: problem_response("Malformed shipment; `field` names the culprit"),
    },
)
async def ship_exchange(exchange_id: ExchangeId, body: Shipment, request: Request) -> MallExchange:
    reply = await downstreams(request).rewards.call(
        "ShipMallExchange",
        rewards_pb2.ShipMallExchangeRequest(
            exchange_id=str(exchange_id),
            carrier=body.carrier,
            tracking_number=body.tracking_number,
        ),
    )
    return exchange_model(reply)


@router.get(
    "/v1/admin/mall/items",
    response_model=MallItems,
    tags=["admin"],
    summary="Every mall item, whatever its status and window",
)
async def admin_list_items(
    request: Request,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str, Query(max_length=20)] = "",
) -> MallItems:
    return await _items(request, page_size, cursor, True)


@router.post(
    "/v1/admin/mall/items",
    response_model=MallItem,
    status_code=201,
    tags=["admin"],
    summary="Create a mall item (draft unless status is active)",
    responses=ITEM_ERRORS,
)
async def create_item(body: NewMallItem, request: Request) -> MallItem:
    reply = await downstreams(request).rewards.call(
        "CreateMallItem",
        rewards_pb2.CreateMallItemRequest(item=item_input(body), status=body.status),
    )
    return item_model(reply)


@router.put(
    "/v1/admin/mall/items/{item_id}",
    response_model=MallItem,
    tags=["admin"],
    summary="Rewrite a mall item; stock already exchanged stays exchanged",
    responses=ITEM_ERRORS,
)
async def update_item(item_id: ItemId, body: MallItemFields, request: Request) -> MallItem:
    reply = await downstreams(request).rewards.call(
        "UpdateMallItem",
        rewards_pb2.UpdateMallItemRequest(item_id=str(item_id), item=item_input(body)),
    )
    return item_model(reply)


@router.put(
    "/v1/admin/mall/items/{item_id}/status",
    response_model=MallItem,
    tags=["admin"],
    summary="Activate, pause or end a mall item (ended is final)",
    responses=ITEM_ERRORS,
)
async def set_item_status(item_id: ItemId, body: MallItemStatus, request: Request) -> MallItem:
    reply = await downstreams(request).rewards.call(
        "SetMallItemStatus",
        rewards_pb2.SetMallItemStatusRequest(item_id=str(item_id), status=body.status),
    )
    return item_model(reply)


class Payment(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"payment_reference": "wxpay-4200001234202605010001", "paid_amount_fen": 990}
            ]
        },
    )

    payment_reference: str = Field(
        min_length=1,
        max_length=256,
        description="The reference the backend's payment notification carried for the cash part",
    )
    paid_amount_fen: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description=(
            "The amount the payment notification says was paid, in fen. Always send it: when"
            " it is not the exchange's cash_fen the confirmation is refused"
            " (PAYMENT_AMOUNT_MISMATCH) and nothing changes"
        ),
    )


@router.post(
    "/v1/members/{member_id}/mall/exchanges/{exchange_id}/payment",
    response_model=MallExchange,
    tags=["mall"],
    summary="The cash part was paid: deliver the reserved exchange (once per payment)",
    responses=MEMBER_ERRORS
    | {
        404: problem_response("UNKNOWN_MALL_EXCHANGE (or another member's)"),
        409: problem_response(
            "PAYMENT_TIMED_OUT (released: refund the payment), NO_PAYMENT_DUE,"
            " PAYMENT_ALREADY_CONFIRMED (another reference), PAYMENT_REFERENCE_USED (the"
            " reference paid another exchange), PAYMENT_AMOUNT_MISMATCH (paid_amount_fen is"
            " not the exchange's cash_fen: nothing changed); the same reference again replays"
        ),
    },
)
async def confirm_payment(
    member_id: MemberId, exchange_id: ExchangeId, body: Payment, request: Request
) -> MallExchange:
    reply = await downstreams(request).rewards.call(
        "ConfirmMallExchange",
        rewards_pb2.ConfirmMallExchangeRequest(
            exchange_id=str(exchange_id),
            payment_reference=body.payment_reference,
            member_id=str(member_id),
            paid_amount_fen=body.paid_amount_fen,
        ),
    )
    return exchange_model(reply)


class Reversal(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"reason": "damaged parcel"}]},
    )

    reason: str = Field(min_length=1, max_length=256)


@router.post(
    "/v1/admin/mall/exchanges/{exchange_id}/reverse",
    response_model=MallExchange,
    tags=["admin"],
    summary="Take a completed exchange back, once: points, stock and count return",
    responses={
        404: problem_response("UNKNOWN_MALL_EXCHANGE"),
        409: problem_response(
            "EXCHANGE_NOT_COMPLETED (awaiting payment or released), COUPON_NOT_REVOCABLE"
            " (its coupon was used); a second reversal replays the first"
        ),
        422: problem_response("Malformed reversal; `field` names the culprit"),
    },
)
async def reverse_exchange(
    exchange_id: ExchangeId, body: Reversal, request: Request
) -> MallExchange:
    reply = await downstreams(request).rewards.call(
        "ReverseMallExchange",
        rewards_pb2.ReverseMallExchangeRequest(
            exchange_id=str(exchange_id),
            operator_id=principal(request),
            reason=body.reason,
        ),
    )
    return exchange_model(reply)
