"""The door after its Redis restarted empty: connections the pool held from
before are stale, and none of them may fail a call once Redis answers again
(each such failure made the gatekeeper skip Redis for another moment, and a
signed HTTP request then got 503 NONCE_STORE_UNAVAILABLE for seconds after
the restart: tests/e2e/test_gateway_redis_outage.py saw it once)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.auth.door import door_redis
from gateway.ratelimit import Gatekeeper, Limit, Verdict
from tests.harness import Infra

from ..redis_servers import RedisServer
from .conftest import gateway_settings

pytestmark = pytest.mark.e2e

CONNECTIONS = 8


async def admit(gate: Gatekeeper, nonce: str) -> Verdict:
    # A timestamp far ahead of any nonce-store epoch (the gateway's clock, even shifted).
    return await gate.admit(
        "client", Limit(1000, 1000), nonce=nonce, nonce_ttl_ms=60_000, timestamp=4_000_000_000
    )


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.stop()


async def test_no_call_fails_on_a_stale_connection_once_redis_is_back(
    infra: Infra,  # the e2e modules' ledger audit reads it after the module
    redis_server: RedisServer,
) -> None:
    redis = door_redis(gateway_settings(redis_url=redis_server.url))
    gate = Gatekeeper(redis, f"restart-{uuid.uuid4().hex[:8]}")
    await gate.open_nonce_store(fresh_install=True, client_ids=["client"])
    try:
        # Calls at once: each takes a connection of its own, so the pool holds several.
        await asyncio.gather(*(admit(gate, f"before-{n}") for n in range(CONNECTIONS)))
        assert len(redis.connection_pool._available_connections) >= CONNECTIONS
        # Redis crashes and comes back empty on the same port.
        await redis_server.stop()
        await redis_server.start()
        # Every pooled connection is now stale; each call must still pass.
        for n in range(2 * CONNECTIONS):
            assert (await admit(gate, f"after-{n}")).allowed, n
    finally:
        await redis.aclose()
