"""Graceful shutdown of the gateway under a burst of POS calls: every call
accepted is answered (none CANCELLED), calls arriving during the drain are
refused with UNAVAILABLE (a POS retries those), and stop() waits for the
in-flight ones within the grace."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from loyalty.pos.v1 import pos_pb2
from loyalty.rewards.v1 import rewards_pb2

from .test_gateway_edges import MEMBER_ID, Downstream, delayed, downstream, open_gateway

__all__ = ["downstream"]  # the fixture, shared with test_gateway_edges


async def test_sigterm_during_a_burst_cancels_no_call(downstream: Downstream) -> None:
    downstream.script.behaviours["rewards.CompleteOrder"] = delayed(
        0.3, rewards_pb2.CompleteOrderResponse(order_id="o-burst", points_earned=1)
    )
    codes: Counter[str] = Counter()
    async with open_gateway(downstream, shutdown_grace_seconds=5.0) as d:

        async def one(i: int) -> None:
            await asyncio.sleep(0.002 * (i % 50))
            request = pos_pb2.CompleteOrderRequest(
                store_id="SH001",
                pos_transaction_id=f"T{i}",
                member_id=MEMBER_ID,
                paid_amount_fen=100,
            )
            try:
                await d.pos.CompleteOrder(request, timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1

        burst = [asyncio.create_task(one(i)) for i in range(150)]
        await asyncio.sleep(0.05)
        await d.gateway.stop()
        await asyncio.gather(*burst)
    assert codes["CANCELLED"] == 0, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] > 0, codes
