"""Stores are operator-managed data (issue 13, item 26), end to end: an
operator creates, updates, closes and reopens a store through the gateway
(bad input names its field and writes nothing), a closed store settles no
order, and a POS client is registered only for a store that exists and is
open."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import Gateway
from gateway.auth.admin import ClientAdmin, open_store_check
from gateway.auth.crypto import SecretBox
from gateway.auth.model import ClientKind
from gateway.clients import RewardsClient
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.db import create_pool
from servicekit.errors import NotFound, error_info
from servicekit.redis_client import create_redis
from servicekit.server import ServiceApp
from tests.harness import Infra

from .test_pos_slice import identify, new_phone, rpc_error

pytestmark = pytest.mark.e2e


@pytest.fixture
async def checked_admin(
    gateway: Gateway, infra: Infra, rewards_app: ServiceApp
) -> AsyncIterator[ClientAdmin]:
    """A client admin that asks rewards about stores, as `clients create` does."""
    pool = await create_pool(infra.database_url, min_size=1, max_size=2)
    redis = create_redis(infra.redis_url)
    rewards = RewardsClient(f"127.0.0.1:{rewards_app.port}", 5.0)
    box = SecretBox(gateway.settings.auth_secret_key)
    yield ClientAdmin(pool, redis, box, infra.namespace, open_store_check(rewards))
    await rewards.close()
    await redis.aclose()
    await pool.close()


async def test_operators_manage_stores_and_pos_clients_need_one(
    http: httpx.AsyncClient,
    pos: pos_pb2_grpc.PosServiceStub,
    checked_admin: ClientAdmin,
) -> None:
    store_id = f"GZ{random.randrange(10**6):06d}"
    path = f"/v1/admin/stores/{store_id}"
    body = {
        "name": "天河城店",
        "city": "广州",
        "address": "广州市天河区天河路208号",
        "time_zone": "Asia/Shanghai",
        "latitude": 23.1323,
        "longitude": 113.3253,
    }
    bad = await http.put(path, json=body | {"time_zone": "Mars/Olympus"})
    assert bad.status_code == 422 and bad.json()["code"] == "INVALID_TIME_ZONE"
    assert bad.json()["field"] == "time_zone"
    listed = (await http.get("/v1/admin/stores")).json()["stores"]
    assert store_id not in {s["store_id"] for s in listed}
    # No such store yet: no till can be registered for it.
    with pytest.raises(NotFound) as unknown:
        await checked_admin.create(ClientKind.POS, "till", store_id=store_id)
    assert (unknown.value.code, unknown.value.field) == ("UNKNOWN_STORE", "store_id")

    created = await http.put(path, json=body)
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "active" and created.json()["latitude"] == 23.1323
    moved = await http.put(path, json=body | {"address": "广州市天河区天河路218号"})
    assert moved.json()["address"] == "广州市天河区天河路218号"
    till = await checked_admin.create(ClientKind.POS, "till", store_id=store_id)
    assert till.api_key

    # Closed: orders there are refused, and no new till is registered.
    closed = await http.put(f"{path}/status", json={"status": "closed"})
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    with pytest.raises(NotFound):
        await checked_admin.create(ClientKind.POS, "till 2", store_id=store_id)
    err = await rpc_error(
        pos.CompleteOrder(
            pos_pb2.CompleteOrderRequest(
                store_id=store_id,
                pos_transaction_id=f"S-{uuid.uuid4().hex[:10]}",
                member_id=(await identify(pos, new_phone())).member_id,
                paid_amount_fen=100,
            ),
            timeout=10,
        )
    )
    assert error_info(err) == ("UNKNOWN_STORE", "store_id")
    reopened = await http.put(f"{path}/status", json={"status": "active"})
    assert reopened.json()["status"] == "active"
    missing = await http.put("/v1/admin/stores/NOPE-0/status", json={"status": "closed"})
    assert missing.status_code == 404 and missing.json()["code"] == "UNKNOWN_STORE"
