"""gRPC mapping of the coupon RPCs (protobuf <-> handlers.py), mixed into
RewardsServicer so the coupon surface lives beside its use cases."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from loyalty.common.v1 import common_pb2
from loyalty.rewards.v1 import rewards_pb2
from servicekit.db import Database, with_retries
from servicekit.errors import InvalidArgument
from servicekit.protos import timestamp

from ..kernel import Channel, OrderLine
from ..points.handlers import PointsLedger
from ..wire import optional_time, set_time
from ..wire import page as _page
from . import handlers as svc
from .domain import ChannelGroup, Kind, Limits, Status, Terms
from .repository import TemplateRow

CHANNELS = {
    common_pb2.CHANNEL_STORE: Channel.STORE,
    common_pb2.CHANNEL_MINI_PROGRAM: Channel.MINI_PROGRAM,
    common_pb2.CHANNEL_DELIVERY: Channel.DELIVERY,
}


E = TypeVar("E", bound=enum.StrEnum)


def _enum(cls: type[E], raw: str, field: str) -> E:
    try:
        return cls(raw)
    except ValueError:
        known = ", ".join(m.value for m in cls)
        raise InvalidArgument(
            f"{field} {raw!r} is unknown; known: {known}", code="UNKNOWN_VALUE", field=field
        ) from None


def terms_from(m: rewards_pb2.CouponTerms) -> Terms:
    kind = _enum(Kind, m.kind, "terms.kind")
    channels = tuple(
        _enum(ChannelGroup, c, f"terms.channels[{n}]") for n, c in enumerate(m.channels)
    )
    return Terms(
        name=m.name,
        kind=kind,
        threshold_fen=m.threshold_fen,
        discount_fen=m.discount_fen,
        percent=m.percent,
        cap_fen=m.cap_fen,
        max_price_fen=m.max_price_fen,
        price_fen=m.price_fen,
        skus=tuple(m.skus),
        categories=tuple(m.categories),
        store_ids=tuple(m.store_ids),
        channels=channels,
        tiers=tuple(m.tiers),
        new_members_only=m.new_members_only,
        valid_from=optional_time(m, "valid_from"),
        valid_until=optional_time(m, "valid_until"),
        valid_days=m.valid_days,
        valid_hours=m.valid_hours,
        stackable=m.stackable,
        restore_on_refund=m.restore_on_refund,
        claimable=m.claimable,
    )


def terms_message(t: Terms) -> rewards_pb2.CouponTerms:
    m = rewards_pb2.CouponTerms(
        name=t.name,
        kind=t.kind.value,
        threshold_fen=t.threshold_fen,
        discount_fen=t.discount_fen,
        percent=t.percent,
        cap_fen=t.cap_fen,
        max_price_fen=t.max_price_fen,
        price_fen=t.price_fen,
        skus=list(t.skus),
        categories=list(t.categories),
        store_ids=list(t.store_ids),
        channels=[c.value for c in t.channels],
        tiers=list(t.tiers),
        new_members_only=t.new_members_only,
        valid_days=t.valid_days,
        valid_hours=t.valid_hours,
        stackable=t.stackable,
        restore_on_refund=t.restore_on_refund,
        claimable=t.claimable,
    )
    set_time(m, "valid_from", t.valid_from)
    set_time(m, "valid_until", t.valid_until)
    return m


def limits_from(m: rewards_pb2.CouponLimits) -> Limits:
    return Limits(
        total_stock=m.total_stock or None,
        per_member_limit=m.per_member_limit or None,
        daily_budget=m.daily_budget or None,
        stock_shards=m.stock_shards or 1,
    )


def template_message(t: TemplateRow, remaining: int | None) -> rewards_pb2.CouponTemplate:
    return rewards_pb2.CouponTemplate(
        template_id=t.template_id,
        version=t.version,
        status=t.status.value,
        terms=terms_message(t.terms),
        limits=rewards_pb2.CouponLimits(
            total_stock=t.limits.total_stock or 0,
            per_member_limit=t.limits.per_member_limit or 0,
            daily_budget=t.limits.daily_budget or 0,
            stock_shards=t.limits.stock_shards,
        ),
        remaining_stock=-1 if remaining is None else remaining,
        created_at=timestamp(t.created_at),
        updated_at=timestamp(t.updated_at),
    )


def coupon_message(
    c: svc.IssuedCoupon,
    terms: Terms | None = None,
    stamp: Callable[[datetime], Timestamp] = timestamp,
) -> rewards_pb2.Coupon:
    m = rewards_pb2.Coupon(
        coupon_id=c.coupon_id,
        code=c.code,
        template_id=c.template_id,
        template_version=c.template_version,
        member_id=c.member_id,
        reason=c.reason,
        status=c.status,
        issued_at=stamp(c.issued_at),
        valid_from=stamp(c.valid_from),
        expires_at=stamp(c.expires_at),
        replayed=c.replayed,
        # Only a used coupon names its order (a restored one keeps it internally).
        order_id=c.order_id if c.status == "used" else "",
        discount_fen=c.discount_fen if c.status == "used" else 0,
    )
    if terms is not None:
        m.terms.CopyFrom(terms_message(terms))
    if c.locked_until is not None and c.status == "locked":
        m.locked_until.CopyFrom(timestamp(c.locked_until))
    return m


class CouponRpcs:
    """The coupon RPCs of RewardsService (mixed into RewardsServicer)."""

    _db: Database
    _points: PointsLedger
    _coupon_policy: svc.CouponPolicy
    # IssueCoupon's templates (handlers.issue_coupon_now), set by RewardsServicer.
    _issue_templates: svc.TemplateCache

    async def _template_reply(self, conn: Any, t: TemplateRow) -> rewards_pb2.CouponTemplate:
        remaining = None
        if t.limits.total_stock is not None:
            remaining = await svc.crepo.remaining_stock(conn, t.template_id)
        return template_message(t, remaining)

    async def CreateCouponTemplate(
        self, request: rewards_pb2.CreateCouponTemplateRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.CouponTemplate:
        terms, limits = terms_from(request.terms), limits_from(request.limits)
        status = _enum(Status, request.status or "draft", "status")
        async with self._db.unit_of_work() as uow:
            t = await svc.create_template(
                uow.conn,
                request.template_id,
                terms,
                limits,
                status,
                request.created_by,
            )
            return await self._template_reply(uow.conn, t)

    async def NewCouponTemplateVersion(
        self,
        request: rewards_pb2.NewCouponTemplateVersionRequest,
        context: grpc.aio.ServicerContext,
    ) -> rewards_pb2.CouponTemplate:
        terms = terms_from(request.terms)
        async with self._db.unit_of_work() as uow:
            t = await svc.new_template_version(
                uow.conn, request.template_id, terms, request.created_by, request.expected_version
            )
            return await self._template_reply(uow.conn, t)

    async def SetCouponTemplateStatus(
        self,
        request: rewards_pb2.SetCouponTemplateStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> rewards_pb2.CouponTemplate:
        status = _enum(Status, request.status, "status")
        async with self._db.unit_of_work() as uow:
            t = await svc.set_template_status(uow.conn, request.template_id, status)
            return await self._template_reply(uow.conn, t)

    async def SetCouponTemplateLimits(
        self,
        request: rewards_pb2.SetCouponTemplateLimitsRequest,
        context: grpc.aio.ServicerContext,
    ) -> rewards_pb2.CouponTemplate:
        limits = limits_from(request.limits)
        async with self._db.unit_of_work() as uow:
            t = await svc.set_template_limits(uow.conn, request.template_id, limits)
            return await self._template_reply(uow.conn, t)

    async def RevokeCoupon(
        self, request: rewards_pb2.RevokeCouponRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Coupon:
        async with self._db.unit_of_work() as uow:
            c = await svc.revoke_coupon(
                uow.conn, request.code, request.operator_id, request.reason, datetime.now(UTC)
            )
        return coupon_message(c)

    async def GetCouponTemplate(
        self, request: rewards_pb2.GetCouponTemplateRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.CouponTemplate:
        async with self._db.unit_of_work() as uow:
            t = await svc.get_template(uow.conn, request.template_id)
            return await self._template_reply(uow.conn, t)

    async def ListCouponTemplates(
        self, request: rewards_pb2.ListCouponTemplatesRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.CouponTemplates:
        # Template ids are the cursor here (ordered by id), not sequence numbers.
        size, _ = _page(request.page_size, "")
        status = _enum(Status, request.status, "status").value if request.status else None
        async with self._db.unit_of_work() as uow:
            rows = await svc.crepo.list_templates(
                uow.conn, status, request.cursor or None, size + 1
            )
            replies = [await self._template_reply(uow.conn, t) for t in rows[:size]]
        more = len(rows) > size
        return rewards_pb2.CouponTemplates(
            templates=replies, next_cursor=rows[size - 1].template_id if more else ""
        )

    async def GetCouponReport(
        self, request: rewards_pb2.GetCouponReportRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.CouponReport:
        async with self._db.unit_of_work() as uow:
            r = await svc.report(uow.conn, request.template_id)
        return rewards_pb2.CouponReport(
            template_id=r.template_id,
            issued=r.issued,
            redeemed=r.redeemed,
            expired=r.expired,
            redemption_rate_bp=r.redemption_rate_bp,
            discount_fen=r.discount_fen,
            remaining_stock=-1 if r.remaining_stock is None else r.remaining_stock,
        )

    async def IssueCoupon(
        self, request: rewards_pb2.IssueCouponRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Coupon:
        c = await svc.issue_coupon_now(
            self._db,
            self._issue_templates,
            template_id=request.template_id,
            member_id=svc.parse_member(request.member_id),
            reason=request.reason,
            issue_key=request.issue_key,
            now=datetime.now(UTC),
            issued_by=request.issued_by,
        )
        # The relay is not woken per issue: CouponIssued has no consumer that
        # waits for it, and a relay turn per issue costs one read and commit
        # in each of the four consumer groups of rewards' stream. It goes out
        # on the relay's next turn (another commit with events, or within
        # OUTBOX_POLL_INTERVAL_SECONDS): 2.2-2.5 against 3.7-4.7 ms of CPU per
        # issue, every process (docs/operations.md, "CPU per call (issue 19)").
        return coupon_message(c)

    async def IssueCoupons(
        self, request: rewards_pb2.IssueCouponsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.IssueCouponsResponse:
        # Before parsing the ids of a batch refused anyway.
        svc.check_batch_size(len(request.items))
        items = [
            svc.BulkItem(svc.parse_member(i.member_id, f"items[{n}].member_id"), i.issue_key)
            for n, i in enumerate(request.items)
        ]

        async def attempt() -> list[svc.BulkResult]:
            async with self._db.unit_of_work() as uow:
                return await svc.issue_coupons(
                    uow.conn,
                    template_id=request.template_id,
                    reason=request.reason,
                    items=items,
                    now=datetime.now(UTC),
                    issued_by=request.issued_by,
                )

        # A batch racing a single issue of one of its keys can deadlock with
        # it (each waits for the other's key or member row): PostgreSQL ends
        # one, and the batch runs again (replaying whatever the other issued).
        results: list[svc.BulkResult] = await with_retries(attempt)
        if any(r.outcome == "issued" for r in results):
            self._db.outbox_wakeup.set()
        # A batch's new coupons share their three times: each converted once.
        stamp = functools.cache(timestamp)
        reply = rewards_pb2.IssueCouponsResponse(
            results=[
                rewards_pb2.IssueCouponsResult(
                    outcome=r.outcome,
                    coupon=coupon_message(r.coupon, stamp=stamp) if r.coupon is not None else None,
                    refusal=r.refusal,
                    detail=r.detail,
                )
                for r in results
            ]
        )
        for r in results:
            if r.outcome == "issued":
                reply.issued += 1
            elif r.outcome == "replayed":
                reply.replayed += 1
            else:
                reply.refused += 1
        return reply

    async def ListMemberCoupons(
        self, request: rewards_pb2.ListMemberCouponsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.MemberCoupons:
        member = svc.parse_member(request.member_id)
        size, before = _page(request.page_size, request.cursor)
        async with self._db.unit_of_work() as uow:
            entries = await svc.list_member_coupons(
                uow.conn, member, list(request.statuses), before, size + 1, datetime.now(UTC)
            )
        more = len(entries) > size
        page = entries[:size]
        next_cursor = str(page[-1].coupon.seq) if more else ""
        return rewards_pb2.MemberCoupons(
            coupons=[coupon_message(e.coupon, e.terms) for e in page], next_cursor=next_cursor
        )

    async def PreviewCheckout(
        self, request: rewards_pb2.PreviewCheckoutRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PreviewCheckoutResponse:
        member = svc.parse_member(request.member_id)
        channel = CHANNELS.get(request.channel)
        if channel is None:
            raise InvalidArgument("channel is required", code="CHANNEL_REQUIRED", field="channel")
        lines = tuple(
            OrderLine(line.sku, line.name, line.category, line.quantity, line.paid_amount_fen)
            for line in request.lines
        )
        async with self._db.unit_of_work() as uow:
            p = await svc.preview_checkout(
                uow.conn,
                member_id=member,
                store_id=request.store_id,
                channel=channel,
                lines=lines,
                gross_fen=request.gross_amount_fen,
                codes=list(request.coupon_codes),
                points_to_redeem=request.points_to_redeem,
                rules=self._points.rules,
                policy=self._coupon_policy,
                now=datetime.now(UTC),
            )
        return rewards_pb2.PreviewCheckoutResponse(
            gross_amount_fen=p.gross_fen,
            coupons=[
                rewards_pb2.CouponOffer(
                    code=o.code,
                    template_id=o.template_id,
                    name=o.terms.name,
                    applicable=o.verdict.applicable,
                    discount_fen=o.verdict.discount_fen,
                    reason=o.verdict.reason,
                    detail=o.verdict.detail,
                    expires_at=timestamp(o.expires_at),
                    stackable=o.terms.stackable,
                )
                for o in p.offers
            ],
            best_code=p.best_code,
            applied_codes=p.applied,
            coupon_discount_fen=p.coupon_discount_fen,
            points_value_fen=p.points_value_fen,
            payable_fen=p.payable_fen,
            points_to_earn=p.points_to_earn,
        )

    async def LockCoupon(
        self, request: rewards_pb2.LockCouponRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Coupon:
        member = svc.parse_member(request.member_id)
        async with self._db.unit_of_work() as uow:
            c = await svc.lock_coupon(
                uow.conn,
                code=request.code,
                member_id=member,
                store_id=request.store_id,
                pos_transaction_id=request.pos_transaction_id,
                policy=self._coupon_policy,
                now=datetime.now(UTC),
            )
        return coupon_message(c)

    async def ReleaseCoupon(
        self, request: rewards_pb2.ReleaseCouponRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.Coupon:
        async with self._db.unit_of_work() as uow:
            c = await svc.release_coupon(
                uow.conn,
                code=request.code,
                store_id=request.store_id,
                pos_transaction_id=request.pos_transaction_id,
            )
        return coupon_message(c)


def restorations(items: list[svc.Restoration]) -> list[rewards_pb2.CouponRestoration]:
    return [
        rewards_pb2.CouponRestoration(code=r.code, restored=r.restored, reason=r.reason)
        for r in items
    ]
