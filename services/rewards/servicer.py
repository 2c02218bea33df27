"""gRPC servicer: protobuf <-> domain mapping only."""

from __future__ import annotations

import grpc

from loyalty.common.v1 import common_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import Database
from servicekit.errors import InvalidArgument
from servicekit.protos import to_datetime

from .domain import Channel, OrderLine, OrderRequest
from .handlers import OrderResult, RewardsHandlers
from .repository import BalanceRecord, StoreRecord

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
    )


def order_response(result: OrderResult) -> rewards_pb2.CompleteOrderResponse:
    return rewards_pb2.CompleteOrderResponse(
        order_id=result.order_id,
        points_earned=result.points_earned,
        points_balance=result.points_balance,
        replayed=result.replayed,
    )


def balance_message(balance: BalanceRecord) -> rewards_pb2.PointsBalance:
    return rewards_pb2.PointsBalance(
        member_id=balance.member_id,
        available=balance.available,
        lifetime_earned=balance.lifetime_earned,
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
    )


class RewardsServicer(rewards_pb2_grpc.RewardsServiceServicer):
    def __init__(self, db: Database, handlers: RewardsHandlers) -> None:
        self._db = db
        self._handlers = handlers

    async def CompleteOrder(
        self, request: rewards_pb2.CompleteOrderRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.CompleteOrderResponse:
        settlement = self._handlers.prepare_order(order_request(request))
        async with self._db.unit_of_work() as uow:
            result = await self._handlers.complete_order(uow, settlement)
        return order_response(result)

    async def GetPointsBalance(
        self, request: rewards_pb2.GetPointsBalanceRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsBalance:
        async with self._db.unit_of_work() as uow:
            balance = await self._handlers.get_balance(uow, request.member_id)
        return balance_message(balance)

    async def GetStore(
        self, request: rewards_pb2.GetStoreRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Store:
        async with self._db.unit_of_work() as uow:
            store = await self._handlers.get_store(uow, request.store_id)
        return store_message(store)
