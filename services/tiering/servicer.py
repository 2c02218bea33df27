"""gRPC servicer: protobuf <-> domain mapping only."""

from __future__ import annotations

import grpc

from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.db import Database
from servicekit.protos import timestamp

from .handlers import TieringHandlers


class TieringServicer(tiering_pb2_grpc.TieringServiceServicer):
    def __init__(self, db: Database, handlers: TieringHandlers) -> None:
        self._db = db
        self._handlers = handlers

    async def GetMemberSpend(
        self, request: tiering_pb2.GetMemberSpendRequest, context: grpc.aio.ServicerContext
    ) -> tiering_pb2.MemberSpend:
        async with self._db.unit_of_work() as uow:
            view = await self._handlers.member_spend(uow, request.member_id)
        reply = tiering_pb2.MemberSpend(
            member_id=view.spend.member_id,
            total_paid_fen=view.spend.total_paid_fen,
            order_count=view.spend.order_count,
        )
        if view.spend.last_order_at is not None:
            reply.last_order_at.CopyFrom(timestamp(view.spend.last_order_at))
        if view.tier is not None:
            reply.tier_code = view.tier.code
            reply.tier_name = view.tier.name
        return reply
