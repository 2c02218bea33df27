"""The store POS API (loyalty.pos.v1.PosService): validate what is cheap,
then orchestrate the domain services. No business rules live here: phone
rules belong to member, amounts, stores and idempotency to rewards.

Errors: local validation raises servicekit InvalidArgument; downstream failures
arrive as DownstreamError (gateway/clients.py). Both are DomainErrors, so the
server's DomainErrorInterceptor turns them into a status + ErrorInfo.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from loyalty.common.v1 import common_pb2
from loyalty.member.v1 import member_pb2
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2
from servicekit.errors import InvalidArgument, NotFound

from . import offline
from .clients import STORE_OPEN, Downstreams
from .errors import DownstreamError
from .known_members import KnownMembers
from .member_views import IDENTIFY, GatewayViews, Miss, decode_identify, encode_identify
from .wrapped import WrappedHandlers

log = logging.getLogger(__name__)


class _TooLarge:
    """What the deserializer hands on instead of a message over the limit."""

    def __init__(self, size: int) -> None:
        self.size = size


class MessageSizeInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a request message over `limit` bytes as INVALID_ARGUMENT
    MESSAGE_TOO_LARGE (not retryable; docs/api.md), before any other check.
    The server's own receive limit (a multiple of this) stays the last guard:
    past it gRPC answers RESOURCE_EXHAUSTED without a reason."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return self._wrapped.get(str(handler_call_details.method), handler, self._wrap)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner, parse = handler.unary_unary, handler.request_deserializer
        assert inner is not None
        limit = self._limit

        def deserialize(data: bytes) -> Any:
            if len(data) > limit:
                return _TooLarge(len(data))
            return parse(data) if parse is not None else data

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _TooLarge):
                raise InvalidArgument(
                    f"the request message is {request.size} bytes; at most {limit} are accepted"
                    " (send fewer orders per call)",
                    code="MESSAGE_TOO_LARGE",
                )
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


def _required(value: str, field: str) -> None:
    """Presence only, with the codes rewards uses for the same mistake; lengths
    and formats are the owning service's rules."""
    if not value.strip():
        raise InvalidArgument(f"{field} is required", code=f"{field.upper()}_REQUIRED", field=field)


def _lines(lines: Iterable[pos_pb2.OrderLine]) -> list[rewards_pb2.OrderLine]:
    return [
        rewards_pb2.OrderLine(
            sku=line.sku,
            name=line.name,
            category=line.category,
            quantity=line.quantity,
            paid_amount_fen=line.paid_amount_fen,
        )
        for line in lines
    ]


def _coupon_lock(reply: rewards_pb2.Coupon) -> pos_pb2.CouponLock:
    lock = pos_pb2.CouponLock(code=reply.code, status=reply.status)
    if reply.HasField("locked_until"):
        lock.locked_until.CopyFrom(reply.locked_until)
    return lock


class PosServicer(pos_pb2_grpc.PosServiceServicer):
    def __init__(
        self,
        downstreams: Downstreams,
        offline_policy: offline.OfflinePolicy | None = None,
        known_members: KnownMembers | None = None,
        member_views: GatewayViews | None = None,
    ) -> None:
        self._down = downstreams
        self._offline = offline_policy or offline.OfflinePolicy()
        # Without one (no Redis to read the identity epoch from), every order asks member.
        self._known = known_members or KnownMembers(None, "")
        # Identify's balance and tier from Redis (gateway/member_views.py); None: off.
        self._views = member_views

    async def IdentifyMember(
        self, request: pos_pb2.IdentifyMemberRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.IdentifyMemberResponse:
        _required(request.store_id, "store_id")
        key = request.WhichOneof("key")
        if key is None:
            # PHONE_REQUIRED kept from before codes and cards: POS clients switch on it.
            raise InvalidArgument(
                "a member key is required: phone, member_code or card",
                code="PHONE_REQUIRED",
                field="phone",
            )
        store_id = request.store_id
        # The store first: an unknown or closed store enrols nobody. The
        # identity epoch alongside, before member is asked (gateway/known_members.py).
        store, epoch = await asyncio.gather(
            self._down.rewards.get_store(store_id), self._known.epoch()
        )
        if store.status != STORE_OPEN:
            # The same answer rewards gives a closed store at checkout.
            raise NotFound(f"store {store_id} is closed", code="UNKNOWN_STORE", field="store_id")
        source = f"pos:{store_id}"
        created = False
        if key == "member_code":
            # Resolves once; never enrols (the code names an existing member).
            member = await self._down.member.redeem_member_code(
                request.member_code, source, code_field="member_code"
            )
        else:
            # A known member is one cached read; an unknown one is enrolled.
            # A phone typed at the till is never proof of ownership: unverified.
            ident = (
                member_pb2.Identifier(type=member_pb2.IDENTIFIER_TYPE_POS_CARD, value=request.card)
                if key == "card"
                else member_pb2.Identifier(
                    type=member_pb2.IDENTIFIER_TYPE_PHONE, value=request.phone, verified=False
                )
            )
            # The store goes along: member counts the stores each identifier is
            # presented at (velocity flag).
            identified = await self._down.member.find_or_enrol(ident, source, key, store_id)
            # One identifier links at most one member: a POS identify never merges.
            member, created = identified.member, identified.created
        # The order that follows for this member needs no member call.
        self._known.remember(epoch, member.member_id)
        points, tier_code, tier_name = await self._balance_and_tier(member.member_id, epoch)
        return pos_pb2.IdentifyMemberResponse(
            member_id=member.member_id,
            member_number=member.member_number,
            phone_masked=member.phone_masked,
            created=created,
            points_available=points,
            tier_code=tier_code,
            tier_name=tier_name,
            degraded=self._down.degraded(),
        )

    async def _balance_and_tier(self, member_id: str, epoch: bytes | None) -> tuple[int, str, str]:
        """The member's available points and tier (code, name): from the
        member's cached view when it stands, else asked side by side (the tier
        best effort) and the view stored under the version read before."""
        views = self._views
        miss: Miss | None = None
        if views is not None:
            cached = await views.read(member_id, IDENTIFY, epoch)
            if not isinstance(cached, Miss):
                return decode_identify(cached)
            miss = cached
            read_at = views.now()
        balance, tier = await asyncio.gather(
            self._down.rewards.get_points_balance(member_id), self._member_tier(member_id)
        )
        if views is not None and miss is not None and tier is not None:
            body = encode_identify(balance.available, *tier)
            await views.fill(member_id, IDENTIFY, miss, epoch, body, read_at)
        code, name = tier or ("", "")
        return balance.available, code, name

    async def _member_tier(self, member_id: str) -> tuple[str, str] | None:
        """(code, name) of the member's tier; None when tiering cannot say.
        The badge, not the member centre's full view: the till shows only the
        tier, and the badge skips the projection and (mostly) the facts."""
        try:
            reply = await self._down.tiering.get_member_tier_badge(member_id)
        except DownstreamError as exc:
            log.warning("identify: no tier for %s (%s)", member_id, exc.code)
            return None
        return reply.tier_code, reply.tier_name

    async def _bump(self, member_id: str) -> None:
        """After a write for the member: its next identify or centre read asks
        the services (read-your-writes through the gateway)."""
        if self._views is not None:
            await self._views.bump(member_id)

    async def CompleteOrder(
        self, request: pos_pb2.CompleteOrderRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.CompleteOrderResponse:
        return await self._complete(request)

    async def _known_member(self, member_id: str) -> bool:
        """Refuse an order for a member id member does not know (NOT_FOUND
        UNKNOWN_MEMBER) or erased (NOT_FOUND MEMBER_ERASED) before anything is
        written. An absorbed id is fine: rewards credits its survivor (it
        follows merges itself, so the request and its idempotency hash stay
        what the till sent). An id member confirmed under the current
        identity epoch (an identify, an earlier order) is not asked again
        (gateway/known_members.py). With member unreachable the till still
        sells: rewards settles on what it knows (it refuses erased members
        itself); False then, and the reply's `degraded` list names member."""
        epoch = await self._known.epoch()
        if self._known.confirmed(epoch, member_id):
            return True
        try:
            await self._down.member.get_member(member_id)
        except DownstreamError as exc:
            if exc.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                log.warning("complete order: member unreachable, %s not checked", member_id)
                return False
            raise
        self._known.remember(epoch, member_id)
        return True

    async def UploadOfflineOrders(
        self, request: pos_pb2.UploadOfflineOrdersRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.UploadOfflineOrdersResponse:
        return await offline.upload(request, self._complete, self._offline)

    async def _complete(
        self, request: pos_pb2.CompleteOrderRequest
    ) -> pos_pb2.CompleteOrderResponse:
        """One order, as CompleteOrder and each order of an offline upload settle it."""
        # (store_id, pos_transaction_id) is the idempotency key: both must be
        # present, and both are passed through unchanged so a POS retry matches.
        _required(request.store_id, "store_id")
        _required(request.pos_transaction_id, "pos_transaction_id")
        _required(request.member_id, "member_id")
        member_checked = await self._known_member(request.member_id)
        downstream = rewards_pb2.CompleteOrderRequest(
            store_id=request.store_id,
            pos_transaction_id=request.pos_transaction_id,
            member_id=request.member_id,
            channel=request.channel or common_pb2.CHANNEL_STORE,
            paid_amount_fen=request.paid_amount_fen,
            gross_amount_fen=request.gross_amount_fen,
            points_to_redeem=request.points_to_redeem,
            lines=_lines(request.lines),
            coupon_codes=request.coupon_codes,
            staff_code=request.staff_code,
            guide_ref=request.guide_ref,
        )
        if request.HasField("ordered_at"):
            downstream.ordered_at.CopyFrom(request.ordered_at)
        try:
            reply = await self._down.rewards.complete_order(downstream)
        finally:
            # Also on a failure: a timed-out order may have committed.
            await self._bump(request.member_id)
        return pos_pb2.CompleteOrderResponse(
            order_id=reply.order_id,
            points_earned=reply.points_earned,
            points_balance=reply.points_balance,
            replayed=reply.replayed,
            # Rewards prices on its own tier projection, so a checkout never
            # waits on tiering; the till is told what may be stale, and that
            # the member check was skipped.
            degraded=(
                self._down.degraded()
                if member_checked
                else sorted(["member", *self._down.degraded()])
            ),
            coupon_discount_fen=reply.coupon_discount_fen,
        )

    async def PreviewCheckout(
        self, request: pos_pb2.PreviewCheckoutRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.PreviewCheckoutResponse:
        _required(request.store_id, "store_id")
        _required(request.member_id, "member_id")
        reply = await self._down.rewards.call(
            "PreviewCheckout",
            rewards_pb2.PreviewCheckoutRequest(
                store_id=request.store_id,
                member_id=request.member_id,
                channel=request.channel or common_pb2.CHANNEL_STORE,
                lines=_lines(request.lines),
                gross_amount_fen=request.gross_amount_fen,
                coupon_codes=request.coupon_codes,
                points_to_redeem=request.points_to_redeem,
            ),
        )
        return pos_pb2.PreviewCheckoutResponse(
            gross_amount_fen=reply.gross_amount_fen,
            coupons=[
                pos_pb2.CouponOffer(
                    code=o.code,
                    name=o.name,
                    applicable=o.applicable,
                    discount_fen=o.discount_fen,
                    reason=o.reason,
                    detail=o.detail,
                    expires_at=o.expires_at,
                )
                for o in reply.coupons
            ],
            best_code=reply.best_code,
            applied_codes=reply.applied_codes,
            coupon_discount_fen=reply.coupon_discount_fen,
            points_value_fen=reply.points_value_fen,
            payable_fen=reply.payable_fen,
            points_to_earn=reply.points_to_earn,
        )

    async def LockCoupon(
        self, request: pos_pb2.LockCouponRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.CouponLock:
        _required(request.store_id, "store_id")
        _required(request.pos_transaction_id, "pos_transaction_id")
        reply = await self._down.rewards.call(
            "LockCoupon",
            rewards_pb2.LockCouponRequest(
                code=request.code,
                member_id=request.member_id,
                store_id=request.store_id,
                pos_transaction_id=request.pos_transaction_id,
            ),
        )
        return _coupon_lock(reply)

    async def ReleaseCoupon(
        self, request: pos_pb2.ReleaseCouponRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.CouponLock:
        _required(request.store_id, "store_id")
        _required(request.pos_transaction_id, "pos_transaction_id")
        reply = await self._down.rewards.call(
            "ReleaseCoupon",
            rewards_pb2.ReleaseCouponRequest(
                code=request.code,
                store_id=request.store_id,
                pos_transaction_id=request.pos_transaction_id,
            ),
        )
        return _coupon_lock(reply)

    async def RefundOrder(
        self, request: pos_pb2.RefundOrderRequest, context: grpc.aio.ServicerContext
    ) -> pos_pb2.RefundOrderResponse:
        _required(request.store_id, "store_id")
        _required(request.pos_transaction_id, "pos_transaction_id")
        _required(request.refund_transaction_id, "refund_transaction_id")
        reply = await self._down.rewards.refund_order(
            rewards_pb2.RefundOrderRequest(
                store_id=request.store_id,
                pos_transaction_id=request.pos_transaction_id,
                refund_transaction_id=request.refund_transaction_id,
                refunded_amount_fen=request.refunded_amount_fen,
            )
        )
        await self._bump(reply.member_id)
        return pos_pb2.RefundOrderResponse(
            refund_id=reply.refund_id,
            order_id=reply.order_id,
            points_due=reply.points_due,
            points_reversed=reply.points_reversed,
            points_debt=reply.points_debt,
            points_shortfall=reply.points_shortfall,
            points_balance=reply.available,
            replayed=reply.replayed,
            points_restored=reply.points_restored,
            coupons=[
                pos_pb2.CouponRestoration(code=c.code, restored=c.restored, reason=c.reason)
                for c in reply.coupons
            ],
        )
