"""gRPC methods of stores and orders (checkout, refund, store lookup):
protobuf <-> domain mapping only. RewardsServicer inherits them, so
RewardsService stays one service."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import grpc

from loyalty.common.v1 import common_pb2
from loyalty.rewards.v1 import rewards_pb2
from servicekit.db import Database, with_retries
from servicekit.errors import InvalidArgument
from servicekit.protos import to_datetime

from ..coupons.handlers import Restoration
from ..coupons.servicer import restorations
from ..kernel import Channel, OrderLine, OrderRequest
from ..points.handlers import Outcome, Refund
from .handlers import OrderResult, RewardsHandlers
from .repository import StoreRecord

CHANNELS = {
    common_pb2.CHANNEL_STORE: Channel.STORE,
    common_pb2.CHANNEL_MINI_PROGRAM: Channel.MINI_PROGRAM,
    common_pb2.CHANNEL_DELIVERY: Channel.DELIVERY,
}


def order_request(request: rewards_pb2.CompleteOrderRequest) -> OrderRequest:
    channel = None
    if request.channel != common_pb2.CHANNEL_UNSPECIFIED:
        channel = CHANNELS.get(request.channel)
        if channel is None:
            raise InvalidArgument(
                f"channel {request.channel} is unknown", code="UNKNOWN_CHANNEL", field="channel"
            )
    return OrderRequest(
        store_id=request.store_id,
        pos_transaction_id=request.pos_transaction_id,
        member_id=request.member_id,
        channel=channel,
        paid_amount_fen=request.paid_amount_fen,
        gross_amount_fen=request.gross_amount_fen,
        lines=tuple(
            OrderLine(
                sku=line.sku,
                name=line.name,
                category=line.category,
                quantity=line.quantity,
                paid_amount_fen=line.paid_amount_fen,
            )
            for line in request.lines
        ),
        ordered_at=to_datetime(request.ordered_at),
        points_to_redeem=request.points_to_redeem,
        coupon_codes=tuple(request.coupon_codes),
        staff_code=request.staff_code,
        guide_ref=request.guide_ref,
    )


def order_response(result: OrderResult) -> rewards_pb2.CompleteOrderResponse:
    return rewards_pb2.CompleteOrderResponse(
        order_id=result.order_id,
        points_earned=result.points_earned,
        points_balance=result.points_balance,
        replayed=result.replayed,
        points_redeemed=result.points_redeemed,
        coupon_discount_fen=result.coupon_discount_fen,
    )


def store_message(store: StoreRecord) -> rewards_pb2.Store:
    return rewards_pb2.Store(
        store_id=store.store_id,
        name=store.name,
        city=store.city,
        address=store.address,
        latitude=float(store.latitude),
        longitude=float(store.longitude),
        status=store.status,
        time_zone=store.time_zone,
    )


class OrderRpcs:
    _db: Database
    _handlers: RewardsHandlers

    async def CompleteOrder(
        self, request: rewards_pb2.CompleteOrderRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.CompleteOrderResponse:
        settlement = self._handlers.prepare_order(order_request(request))
        # A plain order (no points or coupons spent) first as one statement
        # without BEGIN and COMMIT; anything else, or anything but a clean
        # settlement, in a transaction (nothing was written by the first).
        outcome = await self._handlers.complete_order_now(self._db, settlement)
        if outcome is None:
            async with self._db.unit_of_work() as uow:
                outcome = await self._handlers.complete_order(uow, settlement)
        # OrderCompleted was written by the earning's statement, not uow.emit.
        self._db.outbox_wakeup.set()
        # Raised after the commit: a refusal is stored for retries to replay.
        return order_response(outcome.unwrap())

    async def RefundOrder(
        self, request: rewards_pb2.RefundOrderRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.RefundOrderResponse:
        async def attempt() -> tuple[Outcome[Refund], list[Restoration]]:
            async with self._db.unit_of_work() as uow:
                return await self._handlers.refund_order(
                    uow,
                    request.store_id,
                    request.pos_transaction_id,
                    request.refund_transaction_id,
                    request.refunded_amount_fen,
                    datetime.now(UTC),
                )

        # A refund racing a merge of the same member may lose a deadlock: the
        # whole transaction is retried (it is idempotent on its key).
        outcome, coupons = await with_retries(attempt)
        r = outcome.unwrap()
        return rewards_pb2.RefundOrderResponse(
            refund_id=r.refund_id,
            order_id=r.order_id,
            member_id=r.member_id,
            refunded_amount_fen=r.refunded_amount_fen,
            points_due=r.points_due,
            points_reversed=r.points_reversed,
            points_debt=r.points_debt,
            points_shortfall=r.points_shortfall,
            available=r.available,
            replayed=r.replayed,
            points_restored=r.points_restored,
            coupons=restorations(coupons),
        )

    async def PutStore(
        self, request: rewards_pb2.PutStoreRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Store:
        m = request.store
        record = StoreRecord(
            store_id=m.store_id,
            name=m.name,
            city=m.city,
            address=m.address,
            latitude=Decimal(str(m.latitude)),
            longitude=Decimal(str(m.longitude)),
            status=m.status or "active",
            time_zone=m.time_zone or "Asia/Shanghai",
        )
        async with self._db.unit_of_work() as uow:
            store = await self._handlers.put_store(uow, record)
        return store_message(store)

    async def SetStoreStatus(
        self, request: rewards_pb2.SetStoreStatusRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Store:
        async with self._db.unit_of_work() as uow:
            store = await self._handlers.set_store_status(uow, request.store_id, request.status)
        return store_message(store)

    async def ListStores(
        self, request: rewards_pb2.ListStoresRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Stores:
        async with self._db.unit_of_work() as uow:
            stores = await self._handlers.list_stores(uow)
        return rewards_pb2.Stores(stores=[store_message(s) for s in stores])

    async def GetStore(
        self, request: rewards_pb2.GetStoreRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Store:
        async with self._db.unit_of_work() as uow:
            store = await self._handlers.get_store(uow, request.store_id)
        return store_message(store)
