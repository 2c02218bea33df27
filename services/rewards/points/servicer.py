"""gRPC methods of the points ledger (balance, redeem, holds, adjustments,
history, expiring points, liability, non-order actions): protobuf <-> domain
mapping only. RewardsServicer inherits them, so RewardsService stays one
service."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from loyalty.rewards.v1 import rewards_pb2
from servicekit.db import Database, with_retries
from servicekit.errors import InvalidArgument
from servicekit.protos import timestamp

from ..kernel import parse_member_id
from ..wire import page
from . import bulk
from . import repository as ledger
from .handlers import Adjustment, PointsLedger, Spend
from .repository import Balance

# A checkout hold longer than a day is a bug in the caller.
MAX_HOLD_SECONDS = 86_400


def balance_message(member_id: str, balance: Balance) -> rewards_pb2.PointsBalance:
    return rewards_pb2.PointsBalance(
        member_id=member_id,
        available=balance.available,
        lifetime_earned=balance.lifetime_earned,
        pending=balance.pending,
        held=balance.held,
        debt=balance.debt,
    )


def expiring_batches(rows: list[Any]) -> list[rewards_pb2.ExpiringBatch]:
    return [
        rewards_pb2.ExpiringBatch(points=r["points"], expires_at=timestamp(r["expires_at"]))
        for r in rows
    ]


def movement(spend: Spend) -> rewards_pb2.PointsMovement:
    sign = 1 if spend.hold_status in ("voided", "expired") else -1
    reply = rewards_pb2.PointsMovement(
        transaction_id=spend.transaction_id,
        member_id=spend.member_id,
        points=spend.points,
        available=spend.available,
        # A void or time-out gives the points back to the lots; anything else takes them.
        lots=[rewards_pb2.LotTouched(lot_id=lot, points=sign * n) for lot, n in spend.lots],
        hold_id=spend.hold_id,
        hold_status=spend.hold_status,
        replayed=spend.replayed,
    )
    if spend.expires_at:
        reply.hold_expires_at.CopyFrom(timestamp(datetime.fromisoformat(spend.expires_at)))
    return reply


def adjustment_movement(a: Adjustment) -> rewards_pb2.PointsMovement:
    return rewards_pb2.PointsMovement(
        transaction_id=a.transaction_id,
        member_id=a.member_id,
        points=a.points,
        available=a.available,
        replayed=a.replayed,
    )


def history_line(row: Any) -> rewards_pb2.PointsHistoryLine:
    lots = [rewards_pb2.LotTouched(lot_id=lot, points=n) for lot, n in json.loads(row["lots"])]
    lots += [
        rewards_pb2.LotTouched(lot_id=lot, points=0) for lot in json.loads(row["created_lots"])
    ]
    return rewards_pb2.PointsHistoryLine(
        transaction_id=str(row["id"]),
        kind=row["kind"],
        amount=row["delta"],
        balance_after=row["balance_after"],
        lots=lots,
        order_id=str(row["order_id"] or ""),
        reference=row["reference"] or "",
        reason=row["reason"] or "",
        operator_id=row["operator_id"] or "",
        created_at=timestamp(row["created_at"]),
        operation_points=row["amount"],
    )


class PointsRpcs:
    _db: Database
    _points: PointsLedger

    async def GetPointsBalance(
        self, request: rewards_pb2.GetPointsBalanceRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsBalance:
        member = parse_member_id(request.member_id)
        async with self._db.reading() as uow:
            balance = await ledger.read_balance(uow.conn, uuid.UUID(member))
        return balance_message(member, balance or Balance())

    async def RedeemPoints(
        self, request: rewards_pb2.RedeemPointsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsMovement:
        async with self._db.unit_of_work() as uow:
            outcome = await self._points.redeem(
                uow,
                request.member_id,
                request.points,
                request.idempotency_key,
                request.reference,
                datetime.now(UTC),
            )
        return movement(outcome.unwrap())

    async def HoldPoints(
        self, request: rewards_pb2.HoldPointsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsMovement:
        if request.ttl_seconds < 0 or request.ttl_seconds > MAX_HOLD_SECONDS:
            raise InvalidArgument(
                f"ttl_seconds must be between 0 and {MAX_HOLD_SECONDS}",
                code="INVALID_TTL",
                field="ttl_seconds",
            )
        ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
        async with self._db.unit_of_work() as uow:
            outcome = await self._points.hold(
                uow,
                request.member_id,
                request.points,
                request.idempotency_key,
                request.reference,
                datetime.now(UTC),
                ttl,
            )
        return movement(outcome.unwrap())

    async def PostHold(
        self, request: rewards_pb2.HoldRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsMovement:
        async with self._db.unit_of_work() as uow:
            outcome = await self._points.post_hold(
                uow, request.hold_id, datetime.now(UTC), request.member_id
            )
        return movement(outcome.unwrap())

    async def VoidHold(
        self, request: rewards_pb2.HoldRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsMovement:
        async with self._db.unit_of_work() as uow:
            outcome = await self._points.void_hold(
                uow, request.hold_id, datetime.now(UTC), member_id=request.member_id
            )
        return movement(outcome.unwrap())

    async def AdjustPoints(
        self, request: rewards_pb2.AdjustPointsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsMovement:
        async with self._db.unit_of_work() as uow:
            outcome = await self._points.adjust(
                uow,
                request.member_id,
                request.points,
                request.operator_id,
                request.reason,
                request.idempotency_key,
                datetime.now(UTC),
            )
        return adjustment_movement(outcome.unwrap())

    async def GetPointsHistory(
        self, request: rewards_pb2.GetPointsHistoryRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsHistory:
        member = uuid.UUID(parse_member_id(request.member_id))
        size, before = page(request.page_size, request.cursor)
        async with self._db.unit_of_work() as uow:
            rows = await ledger.history(uow.conn, member, before, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return rewards_pb2.PointsHistory(
            lines=[history_line(r) for r in rows],
            next_cursor=str(rows[-1]["seq"]) if more else "",
        )

    async def GetExpiringPoints(
        self, request: rewards_pb2.GetExpiringPointsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.ExpiringPoints:
        member = parse_member_id(request.member_id)
        days = self._horizon_days(request.days, "days")
        now = datetime.now(UTC)
        async with self._db.reading() as uow:
            rows = await ledger.expiring_lots(
                uow.conn, uuid.UUID(member), now, now + timedelta(days=days)
            )
        return rewards_pb2.ExpiringPoints(member_id=member, batches=expiring_batches(rows))

    async def GetPointsSummary(
        self, request: rewards_pb2.GetExpiringPointsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsSummary:
        member = parse_member_id(request.member_id)
        days = self._horizon_days(request.days, "days")
        now = datetime.now(UTC)
        async with self._db.reading() as uow:
            balance = await ledger.read_balance(uow.conn, uuid.UUID(member))
            rows = await ledger.expiring_lots(
                uow.conn, uuid.UUID(member), now, now + timedelta(days=days)
            )
        return rewards_pb2.PointsSummary(
            balance=balance_message(member, balance or Balance()),
            expiring_soon=expiring_batches(rows),
        )

    async def GetPointsLiability(
        self, request: rewards_pb2.GetPointsLiabilityRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsLiability:
        days = self._horizon_days(request.expiring_within_days, "expiring_within_days")
        now = datetime.now(UTC)
        async with self._db.unit_of_work() as uow:
            totals = await ledger.liability(uow.conn, now, now + timedelta(days=days))
        return rewards_pb2.PointsLiability(**totals)

    async def RecordAction(
        self, request: rewards_pb2.RecordActionRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.PointsMovement:
        async with self._db.unit_of_work() as uow:
            outcome = await self._points.record_action(
                uow, request.member_id, request.action, request.idempotency_key, datetime.now(UTC)
            )
        return adjustment_movement(outcome.unwrap())

    async def BulkEarnPoints(
        self, request: rewards_pb2.BulkEarnPointsRequest, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.BulkEarnPointsResponse:
        # Before converting the lines of a batch refused anyway.
        bulk.check_batch_size(len(request.lines))
        lines = [
            bulk.EarnLine(
                member_id=line.member_id,
                points=line.points,
                reason=line.reason,
                idempotency_key=line.idempotency_key,
                occurred_at=line.occurred_at.ToDatetime(tzinfo=UTC)
                if line.HasField("occurred_at")
                else None,
            )
            for line in request.lines
        ]

        async def attempt() -> list[bulk.LineResult]:
            async with self._db.unit_of_work() as uow:
                return await bulk.bulk_earn(
                    uow.conn, self._points, lines, request.operator_id, datetime.now(UTC)
                )

        # A deadlock with a concurrent writer ends one of them; the batch runs
        # again (its keys that the other applied meanwhile replay).
        results: list[bulk.LineResult] = await with_retries(attempt)
        counts = {
            o: sum(r.outcome == o for r in results) for o in ("applied", "replayed", "refused")
        }
        return rewards_pb2.BulkEarnPointsResponse(
            results=[
                rewards_pb2.BulkEarnResult(
                    outcome=r.outcome,
                    transaction_id=r.transaction_id,
                    member_id=r.member_id,
                    points=r.points,
                    available=r.available,
                    refusal=r.code,
                    detail=r.message,
                )
                for r in results
            ],
            applied=counts["applied"],
            replayed=counts["replayed"],
            refused=counts["refused"],
        )

    def _horizon_days(self, days: int, field: str) -> int:
        if days < 0 or days > 3660:
            raise InvalidArgument(
                f"{field} must be between 0 and 3660", code="INVALID_DAYS", field=field
            )
        return days or self._points.policy.expiring_soon_days
