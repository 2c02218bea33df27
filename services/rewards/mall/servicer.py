"""gRPC methods of the points mall: protobuf <-> domain mapping only.
RewardsServicer inherits them, so RewardsService stays one service."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from loyalty.rewards.v1 import rewards_pb2
from servicekit.db import Database
from servicekit.protos import timestamp

from ..wire import optional_time, page, set_time
from .domain import ItemSpec, ItemStatus, parse_item_id, parse_kind, parse_status
from .handlers import Exchange, PointsMall
from .repository import ItemRow


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
        hold_id=e.hold_id,
        payment_due_at=timestamp(e.payment_due_at) if e.payment_due_at else None,
        payment_reference=e.payment_reference,
        paid_at=timestamp(e.paid_at) if e.paid_at else None,
        released_at=timestamp(e.released_at) if e.released_at else None,
        reversed_at=timestamp(e.reversed_at) if e.reversed_at else None,
        reversed_by=e.reversed_by,
    )


class MallRpcs:
    _db: Database
    _mall: PointsMall

    async def CreateMallItem(
        self, request: rewards_pb2.CreateMallItemRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItem:
        status = parse_status(request.status) if request.status else ItemStatus.DRAFT
        async with self._db.unit_of_work() as uow:
            row = await self._mall.create_item(uow, item_spec(request.item), status)
        return item_message(row)

    async def UpdateMallItem(
        self, request: rewards_pb2.UpdateMallItemRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItem:
        item_id = parse_item_id(request.item_id)
        async with self._db.unit_of_work() as uow:
            row = await self._mall.update_item(uow, item_id, item_spec(request.item))
        return item_message(row)

    async def SetMallItemStatus(
        self, request: rewards_pb2.SetMallItemStatusRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItem:
        item_id, status = parse_item_id(request.item_id), parse_status(request.status)
        async with self._db.unit_of_work() as uow:
            row = await self._mall.set_status(uow, item_id, status)
        return item_message(row)

    async def ListMallItems(
        self, request: rewards_pb2.ListMallItemsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallItems:
        size, before = page(request.page_size, request.cursor)
        on_sale_at = None if request.include_off_sale else datetime.now(UTC)
        async with self._db.unit_of_work() as uow:
            rows = await self._mall.list_items(uow, before, size + 1, on_sale_at)
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
            done = await self._mall.exchange(
                uow, request.member_id, item_id, request.exchange_key, datetime.now(UTC)
            )
        return exchange_message(done)

    async def ListMallExchanges(
        self, request: rewards_pb2.ListMallExchangesRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallExchanges:
        size, before = page(request.page_size, request.cursor)
        async with self._db.unit_of_work() as uow:
            exchanges, next_seq = await self._mall.exchanges_of(
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
            shipped = await self._mall.ship(
                uow,
                request.exchange_id,
                request.carrier,
                request.tracking_number,
                datetime.now(UTC),
            )
        return exchange_message(shipped)

    async def ConfirmMallExchange(
        self, request: rewards_pb2.ConfirmMallExchangeRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallExchange:
        async with self._db.unit_of_work() as uow:
            done = await self._mall.confirm_payment(
                uow,
                request.exchange_id,
                request.payment_reference,
                datetime.now(UTC),
                member_id=request.member_id,
                paid_amount_fen=(
                    request.paid_amount_fen if request.HasField("paid_amount_fen") else None
                ),
            )
        return exchange_message(done)

    async def ReverseMallExchange(
        self, request: rewards_pb2.ReverseMallExchangeRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MallExchange:
        async with self._db.unit_of_work() as uow:
            done = await self._mall.reverse(
                uow, request.exchange_id, request.operator_id, request.reason, datetime.now(UTC)
            )
        return exchange_message(done)
