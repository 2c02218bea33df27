"""Orders and their attribution to a guide, given a unit of work: the signed
guide link, a consumed order attributed by the rules (guide link, staff code,
binding) within the window, refunds, registrations, one order's attribution,
the daily report and the funnel report.
"""

from __future__ import annotations

import logging
import uuid
from datetime import date, datetime, timedelta
from typing import Any

from loyalty.common.v1 import common_pb2
from loyalty.events.v1 import events_pb2
from servicekit.db import UnitOfWork
from servicekit.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from servicekit.events import ReceivedEvent
from servicekit.protos import to_datetime

from . import attribution_repository as attribution_repo
from . import binding_repository as binding_repo
from . import domain
from . import repository as repo
from .domain import AttributionRule, Candidate
from .handlers_common import parse_day
from .staff_handlers import StaffHandlers
from .tag_handlers import TagHandlers

log = logging.getLogger(__name__)


CHANNEL_NAMES = {
    common_pb2.CHANNEL_STORE: "store",
    common_pb2.CHANNEL_MINI_PROGRAM: "mini_program",
    common_pb2.CHANNEL_DELIVERY: "delivery",
}


class AttributionHandlers(StaffHandlers, TagHandlers):
    """Which guide an order counts for, and the reports built on it."""

    async def sign_link(self, uow: UnitOfWork, staff_id: str) -> str:
        staff = await self.get_staff(uow, staff_id)
        if staff.status != "active":
            raise FailedPrecondition(
                f"staff {staff_id} has resigned", code="STAFF_RESIGNED", field="staff_id"
            )
        return domain.sign_guide_ref(self.link_secret, staff.staff_id, self.clock())

    async def _candidates(
        self,
        uow: UnitOfWork,
        p: events_pb2.OrderCompleted,
        binding: binding_repo.BindingRow | None,
        at: datetime,
    ) -> list[Candidate]:
        out: list[Candidate] = []
        if p.guide_ref:
            ref = domain.verify_guide_ref(self.link_secret, p.guide_ref, self.tz)
            staff = await repo.get_staff(uow.conn, ref.staff_id) if ref else None
            if ref and staff and staff.status == "active":
                out.append(
                    Candidate(
                        AttributionRule.GUIDE_LINK, staff.staff_id, staff.store_id, ref.issued_at
                    )
                )
            else:
                log.info("order %s: guide link not honoured", p.order_id)
        if p.staff_code:
            staff = await repo.staff_by_code(uow.conn, p.staff_code)
            if staff and staff.status == "active":
                out.append(
                    Candidate(AttributionRule.STAFF_CODE, staff.staff_id, staff.store_id, at)
                )
        if binding is not None:
            out.append(
                Candidate(
                    AttributionRule.BINDING, binding.staff_id, binding.store_id, binding.bound_at
                )
            )
        return out

    async def on_order_completed(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.OrderCompleted)
        if not p.member_id:
            return
        member_id = uuid.UUID(p.member_id)
        at = to_datetime(p.ordered_at) or self.clock()
        # The member's lock first (the rule-tag refresh below needs it), with the binding.
        binding = await binding_repo.lock_member_binding(uow.conn, member_id)
        chosen = domain.attribute(
            await self._candidates(uow, p, binding, at), self.rules, at, self.window
        )
        inserted = await attribution_repo.insert_order(
            uow.conn, *self._order_row(p, member_id, at, chosen)
        )
        if inserted:  # the funnel was advanced by the same statement
            await self.refresh_rule_tags(uow, member_id, locked=True)

    async def on_orders_completed(self, uow: UnitOfWork, events: list[ReceivedEvent]) -> None:
        """on_order_completed for a read's run of orders of distinct members
        (the consumer's batch handler): their locks and bindings in one
        statement, the orders and funnel steps in one, the new orders'
        members' window and tags in one; the rule tags then per member."""
        orders = []
        for event in events:
            p = event.payload
            assert isinstance(p, events_pb2.OrderCompleted)
            if p.member_id:
                orders.append(
                    (p, uuid.UUID(p.member_id), to_datetime(p.ordered_at) or self.clock())
                )
        members = [m for _, m, _ in orders]
        if len(set(members)) < len(members):
            raise ValueError("a batch of OrderCompleted names a member twice")
        if not orders:
            return
        bindings = await binding_repo.lock_member_bindings(uow.conn, members)
        rows = []
        for p, member_id, at in orders:
            chosen = domain.attribute(
                await self._candidates(uow, p, bindings.get(member_id), at),
                self.rules,
                at,
                self.window,
            )
            rows.append(self._order_row(p, member_id, at, chosen))
        inserted = await attribution_repo.insert_orders(uow.conn, rows)
        new = [m for m in members if m in inserted]
        if new:
            await self.refresh_rule_tags_of(uow, new)

    def _order_row(
        self, p: events_pb2.OrderCompleted, member_id: uuid.UUID, at: datetime, chosen: Any
    ) -> tuple[Any, ...]:
        """insert_order's arguments after the connection."""
        categories: dict[str, int] = {}
        for line in p.lines:
            if line.category:
                categories[line.category] = categories.get(line.category, 0) + line.quantity
        return (
            uuid.UUID(p.order_id),
            member_id,
            p.store_id,
            CHANNEL_NAMES.get(p.channel, "store"),
            p.paid_amount_fen,
            at,
            sorted(categories.items()),
            chosen.staff_id if chosen else "",
            chosen.store_id if chosen else "",
            chosen.rule.value if chosen else "",
            date.fromisoformat(domain.local_day(at, self.tz)),
        )

    async def on_order_refunded(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.OrderRefunded)
        at = to_datetime(p.refunded_at) or self.clock()
        if (
            await attribution_repo.apply_refund(
                uow.conn, uuid.UUID(p.refund_id), uuid.UUID(p.order_id), p.refunded_amount_fen, at
            )
            and p.member_id
        ):
            await self.refresh_rule_tags(uow, uuid.UUID(p.member_id))

    async def on_member_registered(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        p = event.payload
        assert isinstance(p, events_pb2.MemberRegistered)
        at = to_datetime(p.registered_at) or self.clock()
        await attribution_repo.funnel_registered(uow.conn, uuid.UUID(p.member_id), at, p.source)

    async def order_attribution(self, uow: UnitOfWork, order_id: str) -> Any:
        try:
            oid = uuid.UUID(order_id)
        except ValueError:
            raise InvalidArgument(
                "order_id is not an order id", code="INVALID_ORDER_ID", field="order_id"
            ) from None
        row = await attribution_repo.get_order(uow.conn, oid)
        if row is None:
            raise NotFound(f"no order {order_id} seen yet", code="UNKNOWN_ORDER", field="order_id")
        return row

    async def daily_report(
        self, uow: UnitOfWork, from_day: str, to_day: str, store_id: str, staff_id: str
    ) -> list[Any]:
        start, end = parse_day(from_day, "from_day"), parse_day(to_day, "to_day")
        if end < start or (end - start).days > 366:
            raise InvalidArgument(
                "to_day must be on or after from_day, at most 366 days later",
                code="INVALID_RANGE",
                field="to_day",
            )
        return await attribution_repo.daily_report(uow.conn, start, end, store_id, staff_id)

    async def funnel_report(
        self, uow: UnitOfWork, from_day: str, to_day: str, group_by: str
    ) -> list[Any]:
        start, end = parse_day(from_day, "from_day"), parse_day(to_day, "to_day")
        if end < start:
            raise InvalidArgument("to_day is before from_day", code="INVALID_RANGE", field="to_day")
        group = group_by or "store"
        if group not in ("store", "guide", "channel"):
            raise InvalidArgument(
                "group_by must be store, guide or channel",
                code="INVALID_GROUP_BY",
                field="group_by",
            )
        lo = datetime.combine(start, datetime.min.time(), self.tz)
        hi = datetime.combine(end + timedelta(days=1), datetime.min.time(), self.tz)
        return await attribution_repo.funnel_report(uow.conn, group, lo, hi)
