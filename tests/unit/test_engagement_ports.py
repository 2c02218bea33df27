"""What a journey's reward request becomes in rewards' RPCs, and how rewards'
answers map to the request's fate (done / retried / failed with the code),
against a fake stub (no network)."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest

from loyalty.rewards.v1 import rewards_pb2
from servicekit.errors import to_rpc_status
from services.engagement.channels import Delivery
from services.engagement.ports import RewardsGrpc, classify_refusal
from services.engagement.scheduler_repository import RewardRequestRow

MEMBER = uuid.uuid4()


class Refused(grpc.aio.AioRpcError):
    """What a stub raises when rewards ends the call with a DomainError."""

    def __init__(self, status: grpc.StatusCode, code: str = "") -> None:
        trailers = grpc.aio.Metadata()
        if code:
            rich = to_rpc_status(status, "refused", code)
            trailers = grpc.aio.Metadata(*rich.trailing_metadata)
        super().__init__(status, grpc.aio.Metadata(), trailers, details="refused")


class FakeStub:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._error = error

    async def IssueCoupon(self, request: Any, timeout: float) -> Any:
        self.calls.append(("IssueCoupon", request))
        if self._error:
            raise self._error
        return rewards_pb2.Coupon(coupon_id="c-1", template_id=request.template_id)

    async def AdjustPoints(self, request: Any, timeout: float) -> Any:
        self.calls.append(("AdjustPoints", request))
        if self._error:
            raise self._error
        return rewards_pb2.PointsMovement(transaction_id="t-1")


def port_with(stub: FakeStub) -> RewardsGrpc:
    port = RewardsGrpc.__new__(RewardsGrpc)
    port._stub = stub  # type: ignore[assignment]
    port._timeout = 1.0
    return port


def coupon_request(key: str = "enr-1:3") -> RewardRequestRow:
    return RewardRequestRow(key, MEMBER, "coupon", "BIRTHDAY-DRINK", 0, 1)


async def test_a_coupon_step_is_issued_under_its_request_key() -> None:
    stub = FakeStub()
    outcome = await port_with(stub).fulfil(coupon_request())
    assert outcome == Delivery("delivered", provider_ref="c-1")
    [(rpc, request)] = stub.calls
    assert rpc == "IssueCoupon"
    assert (
        request.template_id,
        request.member_id,
        request.reason,
        request.issue_key,
        request.issued_by,
    ) == ("BIRTHDAY-DRINK", str(MEMBER), "journey", "enr-1:3", "engagement")


async def test_a_retried_step_carries_the_same_issue_key() -> None:
    stub = FakeStub()
    port = port_with(stub)
    await port.fulfil(coupon_request("enr-9:2"))
    await port.fulfil(coupon_request("enr-9:2"))
    assert [r.issue_key for _, r in stub.calls] == ["enr-9:2", "enr-9:2"]


async def test_points_go_through_adjust_points_with_the_key_as_idempotency_key() -> None:
    stub = FakeStub()
    row = RewardRequestRow("enr-2:4", MEMBER, "points", "", 100, 1)
    assert await port_with(stub).fulfil(row) == Delivery("delivered", provider_ref="t-1")
    [(rpc, request)] = stub.calls
    assert (rpc, request.points, request.idempotency_key) == ("AdjustPoints", 100, "enr-2:4")


async def test_an_erased_member_fails_without_a_call() -> None:
    stub = FakeStub()
    row = RewardRequestRow("enr-3:1", None, "coupon", "X", 0, 1)
    assert await port_with(stub).fulfil(row) == Delivery("failed", reason="MEMBER_ERASED")
    assert stub.calls == []


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        # Rewards' decisions: asking again would not change them.
        (grpc.StatusCode.FAILED_PRECONDITION, "OUT_OF_STOCK", Delivery("failed", reason="OUT_OF_STOCK")),
        (grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_LIMIT_REACHED", Delivery("failed", reason="MEMBER_LIMIT_REACHED")),
        (grpc.StatusCode.FAILED_PRECONDITION, "TEMPLATE_ENDED", Delivery("failed", reason="TEMPLATE_ENDED")),
        (grpc.StatusCode.FAILED_PRECONDITION, "MEMBER_ERASED", Delivery("failed", reason="MEMBER_ERASED")),
        (grpc.StatusCode.NOT_FOUND, "UNKNOWN_TEMPLATE", Delivery("failed", reason="UNKNOWN_TEMPLATE")),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ISSUE_KEY", Delivery("failed", reason="INVALID_ISSUE_KEY")),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_STOCK", Delivery("failed", reason="OUT_OF_STOCK")),
        # Transient: the transport, a deadline, a conflict, a bare limit.
        (grpc.StatusCode.UNAVAILABLE, "", Delivery("retry", reason="UNAVAILABLE")),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", Delivery("retry", reason="DEADLINE_EXCEEDED")),
        (grpc.StatusCode.ABORTED, "", Delivery("retry", reason="ABORTED")),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "", Delivery("retry", reason="RESOURCE_EXHAUSTED")),
    ],
)  # fmt: skip
async def test_rewards_refusals_fail_the_step_transient_errors_retry(
    status: grpc.StatusCode, code: str, expected: Delivery
) -> None:
    assert classify_refusal(status, code) == expected
    outcome = await port_with(FakeStub(Refused(status, code))).fulfil(coupon_request())
    assert outcome == expected
