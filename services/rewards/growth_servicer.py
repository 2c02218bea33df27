"""gRPC methods of referral and the points mall: protobuf <-> domain mapping
only. RewardsServicer inherits them, so RewardsService stays one service."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from loyalty.rewards.v1 import rewards_pb2
from servicekit.db import Database
from servicekit.errors import InvalidArgument
from servicekit.protos import timestamp, to_datetime

from .growth_repository import ItemRow
from .mall import ItemSpec, ItemStatus, parse_item_id, parse_kind, parse_status
from .mall_service import Exchange, PointsMall
from .referral_service import Referrals, ReferralView

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class Growth:
    """The use cases these RPCs call."""

    referrals: Referrals
    mall: PointsMall


def page(size: int, cursor: str) -> tuple[int, int | None]:
    size = size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be between 1 and {MAX_PAGE_SIZE}",
            code="INVALID_PAGE_SIZE",
            field="page_size",
        )
    if not cursor:
        return size, None
    if not cursor.isdigit() or len(cursor) > 18:
        raise InvalidArgument(
            "cursor is not one this API returned", code="INVALID_CURSOR", field="cursor"
        )
    return size, int(cursor)


def optional_time(message: Any, field: str) -> datetime | None:
    return to_datetime(getattr(message, field)) if message.HasField(field) else None


def set_time(message: Any, field: str, value: datetime | None) -> None:
    """Set a Timestamp field only when there is a value (unset stays unset)."""
    if value is not None:
        getattr(message, field).CopyFrom(timestamp(value))


def referral_message(view: ReferralView) -> rewards_pb2.Referral:
    reply = rewards_pb2.Referral(
        referral_id=view.referral_id,
        inviter_member_id=view.inviter_id,
        invitee_member_id=view.invitee_id,
        accepted_at=timestamp(view.accepted_at),
        replayed=view.replayed,
        rewards=[
            rewards_pb2.ReferralReward(
                step=r.step,
                role=r.role,
                member_id=r.member_id,
                status=r.status,
                coupon_id=r.coupon_id,
                points=r.points,
                refusal_codes=[x["code"] for x in r.refusals],
            )
            for r in view.rewards
        ],
    )
    set_time(reply, "first_order_at", view.first_order_at)
    return reply


def item_spec(message: rewards_pb2.MallItemInput) -> ItemSpec:
    return ItemSpec(
        name=message.name,
        kind=parse_kind(message.kind),
        points_price=message.points_price,
        cash_fen=message.cash_fen,
        stock_total=message.stock_total,
        per_member_limit=message.per_member_limit,
        coupon_template_id=message.coupon_template_id,
        sku=message.sku,
        starts_at=optional_time(message, "starts_at"),
        ends_at=optional_time(message, "ends_at"),
    )


def item_message(row: ItemRow) -> rewards_pb2.MallItem:
    spec = row.spec
    item = rewards_pb2.MallItemInput(
        name=spec.name,
        kind=spec.kind.value,
        coupon_template_id=spec.coupon_template_id,
        sku=spec.sku,
        points_price=spec.points_price,
        cash_fen=spec.cash_fen,
        stock_total=spec.stock_total,
        per_member_limit=spec.per_member_limit,
    )
    set_time(item, "starts_at", spec.starts_at)
    set_time(item, "ends_at", spec.ends_at)
    return rewards_pb2.MallItem(
        item_id=str(row.item_id),
        item=item,
        stock_remaining=row.stock_remaining,
        status=row.status.value,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def exchange_message(e: Exchange) -> rewards_pb2.MallExchange:
    return rewards_pb2.MallExchange(
        exchange_id=e.exchange_id,
        member_id=e.member_id,
        item_id=e.item_id,
        exchange_key=e.exchange_key,
        points=e.points,
        cash_fen=e.cash_fen,
        points_transaction_id=e.points_transaction_id,
        coupon_id=e.coupon_id,
        sku=e.sku,
        fulfilment=e.fulfilment,
        created_at=timestamp(e.created_at),
        replayed=e.replayed,
        carrier=e.carrier,
        tracking_number=e.tracking_number,
        shipped_at=timestamp(e.shipped_at) if e.shipped_at else None,
    )


class GrowthRpcs:
    _db: Database
    _growth: Growth

    async def GetInviteCode(
        self, request: rewards_pb2.GetInviteCodeRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.InviteCode:
        async with self._db.unit_of_work() as uow:
            code = await self._growth.referrals.invite_code(
                uow, request.member_id, request.device_id
            )
        return rewards_pb2.InviteCode(
            member_id=code.member_id, code=code.code, created_at=timestamp(code.created_at)
        )

    async def AcceptReferral(
        self, request: rewards_pb2.AcceptReferralRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Referral:
        async with self._db.unit_of_work() as uow:
            view = await self._growth.referrals.accept(
                uow,
                request.invitee_member_id,
                request.invite_code,
                invitee_registered_at=optional_time(request, "invitee_registered_at"),
                device_id=request.device_id,
                identifier_hashes=list(request.identifier_hashes),
                now=datetime.now(UTC),
            )
        return referral_message(view)

    async def ListReferrals(
        self, request: rewards_pb2.ListReferralsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Referrals:
        size, before = page(request.page_size, request.cursor)
        async with self._db.unit_of_work() as uow:
            views, next_seq = await self._growth.referrals.list_of_inviter(
                uow, request.inviter_member_id, before, size
            )
        return rewards_pb2.Referrals(
            referrals=[referral_message(v) for v in views],
            next_cursor=str(next_seq) if next_seq is not None else "",
        )

    async def GetFissionReport(
        self, request: rewards_pb2.GetFissionReportRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.FissionReport:
        start, end = optional_time(request, "from"), optional_time(request, "to")
        if start is None or end is None:
            raise InvalidArgument(
                "from and to are required",
                code="PERIOD_REQUIRED",
                field="from" if start is None else "to",
            )
        async with self._db.unit_of_work() as uow:
            fission = await self._growth.referrals.fission(uow, start, end)
        reply = rewards_pb2.FissionReport(
            inviters=fission.inviters,
            invitees=fission.invitees,
            fission_coefficient=fission.coefficient,
            second_generation_invitees=fission.second_generation,
            second_generation_spread=fission.second_generation_spread,
            seed_inviters=fission.seed_inviters,
            seed_invitees=fission.seed_invitees,
        )
        getattr(reply, "from").CopyFrom(timestamp(start))
        reply.to.CopyFrom(timestamp(end))
        return reply

    async def CreateMallItem(
        self, request: rewards_pb2.CreateMallItemRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItem:
        status = parse_status(request.status) if request.status else ItemStatus.DRAFT
        async with self._db.unit_of_work() as uow:
            row = await self._growth.mall.create_item(uow, item_spec(request.item), status)
        return item_message(row)

    async def UpdateMallItem(
        self, request: rewards_pb2.UpdateMallItemRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItem:
        item_id = parse_item_id(request.item_id)
        async with self._db.unit_of_work() as uow:
            row = await self._growth.mall.update_item(uow, item_id, item_spec(request.item))
        return item_message(row)

    async def SetMallItemStatus(
        self, request: rewards_pb2.SetMallItemStatusRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItem:
        item_id, status = parse_item_id(request.item_id), parse_status(request.status)
        async with self._db.unit_of_work() as uow:
            row = await self._growth.mall.set_status(uow, item_id, status)
        return item_message(row)

    async def ListMallItems(
        self, request: rewards_pb2.ListMallItemsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItems:
        size, before = page(request.page_size, request.cursor)
        on_sale_at = None if request.include_off_sale else datetime.now(UTC)
        async with self._db.unit_of_work() as uow:
            rows = await self._growth.mall.list_items(uow, before, size + 1, on_sale_at)
        more = len(rows) > size
        rows = rows[:size]
        return rewards_pb2.MallItems(
            items=[item_message(r) for r in rows],
            next_cursor=str(rows[-1].seq) if more else "",
        )

    async def ExchangeMallItem(
        self, request: rewards_pb2.ExchangeMallItemRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallExchange:
        item_id = parse_item_id(request.item_id)
        async with self._db.unit_of_work() as uow:
            done = await self._growth.mall.exchange(
                uow, request.member_id, item_id, request.exchange_key, datetime.now(UTC)
            )
        return exchange_message(done)

    async def ListMallExchanges(
        self, request: rewards_pb2.ListMallExchangesRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallExchanges:
        size, before = page(request.page_size, request.cursor)
        async with self._db.unit_of_work() as uow:
            exchanges, next_seq = await self._growth.mall.exchanges_of(
                uow, request.member_id, before, size, request.fulfilment
            )
        return rewards_pb2.MallExchanges(
            exchanges=[exchange_message(e) for e in exchanges],
            next_cursor=str(next_seq) if next_seq is not None else "",
        )

    async def ShipMallExchange(
        self, request: rewards_pb2.ShipMallExchangeRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallExchange:
        async with self._db.unit_of_work() as uow:
            shipped = await self._growth.mall.ship(
                uow,
                request.exchange_id,
                request.carrier,
                request.tracking_number,
                datetime.now(UTC),
            )
        return exchange_message(shipped)
