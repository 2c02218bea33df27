"""A dashboard's aggregate may take longer than the usual downstream deadline
(a year of history at scale): the gateway's analytics calls wait
ANALYTICS_DEADLINE_FACTOR times as long, any other call does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gateway.clients import ANALYTICS_DEADLINE_FACTOR, RewardsClient
from gateway.errors import DownstreamError
from loyalty.common.v1 import common_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc

DEADLINE = 0.2
# Past the usual deadline, well within the analytics one.
SLOW = DEADLINE * 2


class SlowRewards(rewards_pb2_grpc.RewardsServiceServicer):
    async def GetOrderAnalytics(
        self, request: common_pb2.AnalyticsFilter, context: grpc.aio.ServicerContext
    ) -> rewards_pb2.OrderAnalytics:
        await asyncio.sleep(SLOW)
        return rewards_pb2.OrderAnalytics(orders=7)


@pytest.fixture
async def rewards() -> AsyncIterator[RewardsClient]:
    server = grpc.aio.server()
    rewards_pb2_grpc.add_RewardsServiceServicer_to_server(SlowRewards(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = RewardsClient(f"127.0.0.1:{port}", DEADLINE)
    yield client
    await client.close()
    await server.stop(0)


async def test_analytics_calls_get_the_longer_deadline(rewards: RewardsClient) -> None:
    assert SLOW * 2 < DEADLINE * ANALYTICS_DEADLINE_FACTOR
    request = common_pb2.AnalyticsFilter(from_day="2026-01-01", to_day="2026-01-31")
    reply = await rewards.analytics("GetOrderAnalytics", request)
    assert reply.orders == 7
    with pytest.raises(DownstreamError) as cut_off:
        await rewards.call("GetOrderAnalytics", request)
    assert cut_off.value.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
