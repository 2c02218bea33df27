"""Downstream clients: one channel per service for the life of the process,
and a deadline on every call.

Every call goes through `_Client._call`, which applies the deadline and turns
a failed call into a `DownstreamError` (gateway/errors.py), so the POS
servicer and HTTP routes never handle raw gRPC errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.clients import create_channel

from .errors import UNAVAILABLE_MESSAGE, DownstreamError, from_rpc_error
from .settings import GatewaySettings

Reply = TypeVar("Reply")
_C = TypeVar("_C", bound="_Client")

SERVING = health_pb2.HealthCheckResponse.SERVING


class _Client:
    def __init__(self, name: str, target: str, timeout: float) -> None:
        self.name = name
        self.target = target
        self.timeout = timeout
        self.channel = create_channel(target)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _call(
        self,
        rpc: Callable[..., Awaitable[Reply]],
        request: Any,
        fields: Mapping[str, str] | None = None,
    ) -> Reply:
        try:
            return await rpc(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self.name, fields) from None

    async def health(self, timeout: float) -> str:
        """The service's overall health status name; UNREACHABLE when it did not answer."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=min(timeout, self.timeout)
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def close(self) -> None:
        await self.channel.close()


class MemberClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("member", target, timeout)
        self._stub = member_pb2_grpc.MemberServiceStub(self.channel)

    async def identify_by_phone(
        self, phone: str, source: str, *, phone_field: str = "phone"
    ) -> member_pb2.IdentifyMemberResponse:
        """Find or enrol the member owning a phone that was typed, not verified."""
        request = member_pb2.IdentifyMemberRequest(
            identifiers=[
                member_pb2.Identifier(
                    type=member_pb2.IDENTIFIER_TYPE_PHONE, value=phone, verified=False
                )
            ],
            source=source,
        )
        # The member service names its own request's fields; the caller sent "phone".
        fields = {"identifiers[0].value": phone_field, "identifiers[0]": phone_field}
        return await self._call(self._stub.IdentifyMember, request, fields)

    async def get_member(self, member_id: str) -> member_pb2.Member:
        return await self._call(
            self._stub.GetMember, member_pb2.GetMemberRequest(member_id=member_id)
        )


class RewardsClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("rewards", target, timeout)
        self._stub = rewards_pb2_grpc.RewardsServiceStub(self.channel)

    async def get_store(self, store_id: str) -> rewards_pb2.Store:
        return await self._call(self._stub.GetStore, rewards_pb2.GetStoreRequest(store_id=store_id))

    async def get_points_balance(self, member_id: str) -> rewards_pb2.PointsBalance:
        return await self._call(
            self._stub.GetPointsBalance, rewards_pb2.GetPointsBalanceRequest(member_id=member_id)
        )

    async def complete_order(
        self, request: rewards_pb2.CompleteOrderRequest
    ) -> rewards_pb2.CompleteOrderResponse:
        return await self._call(self._stub.CompleteOrder, request)


class TieringClient(_Client):
    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("tiering", target, timeout)
        self._stub = tiering_pb2_grpc.TieringServiceStub(self.channel)

    async def get_member_spend(self, member_id: str) -> tiering_pb2.MemberSpend:
        return await self._call(
            self._stub.GetMemberSpend, tiering_pb2.GetMemberSpendRequest(member_id=member_id)
        )


class EngagementClient(_Client):
    """Channel only for now: the foundation slice calls no engagement RPC yet,
    but readiness already waits for the service."""

    def __init__(self, target: str, timeout: float) -> None:
        super().__init__("engagement", target, timeout)


class Downstreams:
    """Every downstream client of the process. A service whose address is empty
    is not deployed: readiness ignores it and a call that needs it is UNAVAILABLE."""

    def __init__(self, settings: GatewaySettings) -> None:
        timeout = settings.downstream_timeout_seconds
        self.readiness_timeout = settings.readiness_timeout_seconds
        candidates: list[tuple[type[_Client], str]] = [
            (MemberClient, settings.member_addr),
            (TieringClient, settings.tiering_addr),
            (EngagementClient, settings.engagement_addr),
            (RewardsClient, settings.rewards_addr),
        ]
        self._clients: dict[type[_Client], _Client] = {
            cls: cls(target, timeout)  # type: ignore[call-arg]
            for cls, target in candidates
            if target.strip()
        }

    def _get(self, cls: type[_C]) -> _C:
        client = self._clients.get(cls)
        if client is None:
            raise DownstreamError(
                grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE, code="SERVICE_NOT_DEPLOYED"
            )
        return client  # type: ignore[return-value]

    @property
    def member(self) -> MemberClient:
        return self._get(MemberClient)

    @property
    def rewards(self) -> RewardsClient:
        return self._get(RewardsClient)

    @property
    def tiering(self) -> TieringClient:
        return self._get(TieringClient)

    @property
    def engagement(self) -> EngagementClient:
        return self._get(EngagementClient)

    async def health(self) -> dict[str, str]:
        """Each deployed downstream's health status, asked concurrently."""
        clients = list(self._clients.values())
        statuses = await asyncio.gather(*(c.health(self.readiness_timeout) for c in clients))
        return {c.name: s for c, s in zip(clients, statuses, strict=True)}

    async def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()
