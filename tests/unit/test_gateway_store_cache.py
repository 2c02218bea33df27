"""The gateway remembers open stores only: new and closed stores are always asked."""

from __future__ import annotations

from typing import Any

from gateway.clients import OPEN_STORE_TTL_SECONDS, RewardsClient
from loyalty.rewards.v1 import rewards_pb2


class CountingStub:
    def __init__(self, stores: dict[str, str]) -> None:
        self.stores = stores
        self.calls: list[str] = []

    async def GetStore(self, request: rewards_pb2.GetStoreRequest, timeout: float) -> Any:
        self.calls.append(request.store_id)
        return rewards_pb2.Store(store_id=request.store_id, status=self.stores[request.store_id])


async def test_open_stores_are_cached_closed_ones_are_not() -> None:
    client = RewardsClient("127.0.0.1:1", timeout=1.0)
    stub = CountingStub({"SH001": "active", "SH009": "closed"})
    client._stub = stub  # type: ignore[assignment]
    try:
        for _ in range(3):
            assert (await client.get_store("SH001")).status == "active"
            assert (await client.get_store("SH009")).status == "closed"
        assert stub.calls.count("SH001") == 1
        assert stub.calls.count("SH009") == 3
        # A store that closes stops being remembered once its entry expires
        # (expired as of the TTL from now, rather than cleared by hand).
        client._open_stores.expire(client._open_stores.timer() + OPEN_STORE_TTL_SECONDS + 1)
        stub.stores["SH001"] = "closed"
        assert (await client.get_store("SH001")).status == "closed"
    finally:
        await client.channel.close()
