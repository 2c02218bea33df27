"""gRPC servicer: protobuf <-> domain mapping only."""

from __future__ import annotations

import grpc

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.db import Database
from servicekit.errors import InvalidArgument
from servicekit.protos import timestamp

from .domain import IdType, normalise
from .handlers import MemberHandlers
from .repository import MemberRecord

ID_TYPES = {
    member_pb2.IDENTIFIER_TYPE_PHONE: IdType.PHONE,
    member_pb2.IDENTIFIER_TYPE_WECHAT_UNIONID: IdType.WECHAT_UNIONID,
    member_pb2.IDENTIFIER_TYPE_WECHAT_OPENID: IdType.WECHAT_OPENID,
    member_pb2.IDENTIFIER_TYPE_WECOM_EXTERNAL_USERID: IdType.WECOM_EXTERNAL_USERID,
    member_pb2.IDENTIFIER_TYPE_POS_CARD: IdType.POS_CARD,
    member_pb2.IDENTIFIER_TYPE_DELIVERY_PLATFORM_ID: IdType.DELIVERY_PLATFORM_ID,
    member_pb2.IDENTIFIER_TYPE_MEMBER_NUMBER: IdType.MEMBER_NUMBER,
}


def member_message(member: MemberRecord) -> member_pb2.Member:
    return member_pb2.Member(
        member_id=member.member_id,
        member_number=member.member_number,
        phone_masked=member.phone_masked,
        registered_at=timestamp(member.registered_at),
    )


class MemberServicer(member_pb2_grpc.MemberServiceServicer):
    def __init__(self, db: Database, handlers: MemberHandlers) -> None:
        self._db = db
        self._handlers = handlers

    async def IdentifyMember(
        self, request: member_pb2.IdentifyMemberRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.IdentifyMemberResponse:
        observed = []
        for n, ident in enumerate(request.identifiers):
            field = f"identifiers[{n}]"
            id_type = ID_TYPES.get(ident.type)
            if id_type is None:
                raise InvalidArgument(
                    f"{field}.type is missing or unknown",
                    code="UNKNOWN_IDENTIFIER_TYPE",
                    field=f"{field}.type",
                )
            observed.append(
                normalise(id_type, ident.value, ident.namespace, ident.verified, f"{field}.value")
            )
        source = request.source.strip() or "unknown"
        async with self._db.unit_of_work() as uow:
            result = await self._handlers.identify(uow, observed, source)
        return member_pb2.IdentifyMemberResponse(
            member=member_message(result.member), created=result.created
        )

    async def GetMember(
        self, request: member_pb2.GetMemberRequest, context: grpc.aio.ServicerContext
    ) -> member_pb2.Member:
        async with self._db.unit_of_work() as uow:
            member = await self._handlers.get(uow, request.member_id)
        return member_message(member)
