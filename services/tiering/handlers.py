"""Use cases of the tiering service, each given a unit of work."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from loyalty.events.v1 import events_pb2
from servicekit.db import UnitOfWork
from servicekit.errors import InvalidArgument
from servicekit.events import ReceivedEvent
from servicekit.protos import to_datetime

from . import repository as repo
from .domain import QualifyingMetric, Tier, TierProgramme
from .repository import SpendRecord

log = logging.getLogger(__name__)

# The programme every member is evaluated on until programmes per segment exist.
DEFAULT_PROGRAMME_ID = "default"


@dataclass(frozen=True)
class MemberSpendView:
    spend: SpendRecord
    # The tier the programme in force gives for the lifetime totals; None when
    # there is no programme or its metric is not held here yet.
    tier: Tier | None


def parse_member_id(value: str, field: str = "member_id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} is not a member id", code="INVALID_MEMBER_ID", field=field
        ) from None


def metric_value(programme: TierProgramme, spend: SpendRecord) -> int | None:
    if programme.qualifying_metric is QualifyingMetric.PAID_SPEND:
        return spend.total_paid_fen
    if programme.qualifying_metric is QualifyingMetric.ORDER_COUNT:
        return spend.order_count
    return None  # growth value arrives with the growth issue


class TieringHandlers:
    async def on_order_completed(self, uow: UnitOfWork, event: ReceivedEvent) -> None:
        """Fold one OrderCompleted into member_spend.

        Runs in the consumer's transaction that records the event id, so a
        redelivered event never counts twice. A malformed event raises: it is
        retried, then dead-lettered with the reason.
        """
        order = event.payload
        assert isinstance(order, events_pb2.OrderCompleted)
        if not order.member_id:
            log.debug("order %s has no member; nothing to track", order.order_id)
            return
        try:
            member_id = uuid.UUID(order.member_id)
        except ValueError:
            raise ValueError(
                f"OrderCompleted {order.order_id}: member_id {order.member_id!r} is not a UUID"
            ) from None
        if order.paid_amount_fen < 0:
            raise ValueError(
                f"OrderCompleted {order.order_id}: paid_amount_fen {order.paid_amount_fen} < 0"
            )
        ordered_at = (
            to_datetime(order.ordered_at)
            or to_datetime(event.envelope.occurred_at)
            or datetime.now(UTC)
        )
        await repo.add_order(uow.conn, member_id, order.paid_amount_fen, ordered_at)

    async def member_spend(self, uow: UnitOfWork, member_id: str) -> MemberSpendView:
        key = parse_member_id(member_id)
        spend = await repo.get_spend(uow.conn, key) or SpendRecord(str(key), 0, 0, None)
        programme = await repo.programme_at(uow.conn, DEFAULT_PROGRAMME_ID, datetime.now(UTC))
        tier = None
        if programme is not None:
            value = metric_value(programme, spend)
            tier = programme.ladder.tier_for(value) if value is not None else None
        return MemberSpendView(spend, tier)
