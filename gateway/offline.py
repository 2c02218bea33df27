"""UploadOfflineOrders: a store that was offline settles its till's orders.

Each order goes through the same path as CompleteOrder (rewards is idempotent
on store_id + pos_transaction_id), one after another in the order sent, because
a later order may spend points an earlier one earned. So a batch uploaded again
after a partial upload (a crash, a lost reply, a cancelled call) replays the
orders already settled and applies only the rest: no double points.

Per order: APPLIED, REPLAYED, or REJECTED with the stable code, message and
field the error model gives (one bad order does not stop the batch). When a
backing service is unavailable the batch stops there and the rest are
NOT_ATTEMPTED: the POS uploads again later.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc

from loyalty.pos.v1 import pos_pb2
from servicekit.errors import DomainError, InvalidArgument
from servicekit.protos import to_datetime

log = logging.getLogger(__name__)

Complete = Callable[[pos_pb2.CompleteOrderRequest], Awaitable[pos_pb2.CompleteOrderResponse]]

# A till clock a little ahead of ours is normal; more is a wrong clock.
CLOCK_SKEW = timedelta(minutes=5)

APPLIED = pos_pb2.OFFLINE_ORDER_OUTCOME_APPLIED
REPLAYED = pos_pb2.OFFLINE_ORDER_OUTCOME_REPLAYED
REJECTED = pos_pb2.OFFLINE_ORDER_OUTCOME_REJECTED
NOT_ATTEMPTED = pos_pb2.OFFLINE_ORDER_OUTCOME_NOT_ATTEMPTED

# Failures of the platform, not of the order: retrying later may succeed.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class OfflinePolicy:
    max_batch: int = 500
    max_age_hours: float = 72.0


def check_batch(request: pos_pb2.UploadOfflineOrdersRequest, policy: OfflinePolicy) -> None:
    """Refuse the whole call before anything is applied."""
    if not request.store_id.strip():
        raise InvalidArgument("store_id is required", code="STORE_ID_REQUIRED", field="store_id")
    if not request.orders:
        raise InvalidArgument("orders is empty", code="ORDERS_REQUIRED", field="orders")
    if len(request.orders) > policy.max_batch:
        raise InvalidArgument(
            f"at most {policy.max_batch} orders per upload, got {len(request.orders)}",
            code="BATCH_TOO_LARGE",
            field="orders",
        )


def check_order(
    order: pos_pb2.CompleteOrderRequest, store_id: str, policy: OfflinePolicy, now: datetime
) -> None:
    """What only an offline upload asks of an order (CompleteOrder's own rules
    are rewards'): the uploading store's, with an ordered_at inside the window."""
    if order.store_id and order.store_id != store_id:
        raise InvalidArgument(
            f"order belongs to store {order.store_id}, not to the uploading store {store_id}",
            code="STORE_MISMATCH",
            field="store_id",
        )
    ordered_at = to_datetime(order.ordered_at) if order.HasField("ordered_at") else None
    if ordered_at is None:
        raise InvalidArgument(
            "ordered_at is required for an offline order",
            code="ORDERED_AT_REQUIRED",
            field="ordered_at",
        )
    oldest = now - timedelta(hours=policy.max_age_hours)
    if ordered_at < oldest:
        raise InvalidArgument(
            f"ordered_at {ordered_at.isoformat()} is older than the "
            f"{policy.max_age_hours:g} h offline window",
            code="ORDER_TOO_OLD",
            field="ordered_at",
        )
    if ordered_at > now + CLOCK_SKEW:
        raise InvalidArgument(
            f"ordered_at {ordered_at.isoformat()} is in the future",
            code="ORDERED_AT_IN_FUTURE",
            field="ordered_at",
        )


def _result_of_error(
    index: int, txn: str, exc: DomainError, outcome: int
) -> pos_pb2.OfflineOrderResult:
    field = f"orders[{index}].order.{exc.field}" if exc.field else f"orders[{index}]"
    return pos_pb2.OfflineOrderResult(
        pos_transaction_id=txn,
        outcome=outcome,  # type: ignore[arg-type]
        code=exc.code,
        message=exc.message,
        field=field,
    )


async def upload(
    request: pos_pb2.UploadOfflineOrdersRequest,
    complete: Complete,
    policy: OfflinePolicy,
    now: datetime | None = None,
) -> pos_pb2.UploadOfflineOrdersResponse:
    check_batch(request, policy)
    now = now or datetime.now(UTC)
    store_id = request.store_id
    results: list[pos_pb2.OfflineOrderResult] = []
    stopped: DomainError | None = None
    for index, item in enumerate(request.orders):
        order = pos_pb2.CompleteOrderRequest()
        order.CopyFrom(item.order)
        txn = order.pos_transaction_id
        if stopped is not None:
            results.append(_result_of_error(index, txn, stopped, NOT_ATTEMPTED))
            continue
        try:
            check_order(order, store_id, policy, now)
            order.store_id = store_id
            reply = await complete(order)
        except DomainError as exc:
            if getattr(exc, "status", None) in _RETRYABLE:
                log.warning(
                    "offline upload for %s stopped at order %d: %s", store_id, index, exc.code
                )
                stopped = exc
                results.append(_result_of_error(index, txn, exc, NOT_ATTEMPTED))
            else:
                results.append(_result_of_error(index, txn, exc, REJECTED))
            continue
        results.append(
            pos_pb2.OfflineOrderResult(
                pos_transaction_id=txn,
                outcome=REPLAYED if reply.replayed else APPLIED,
                order_id=reply.order_id,
                points_earned=reply.points_earned,
                points_balance=reply.points_balance,
            )
        )
    outcomes = [r.outcome for r in results]
    return pos_pb2.UploadOfflineOrdersResponse(
        results=results,
        applied=outcomes.count(APPLIED),
        replayed=outcomes.count(REPLAYED),
        rejected=outcomes.count(REJECTED),
        not_attempted=outcomes.count(NOT_ATTEMPTED),
    )
