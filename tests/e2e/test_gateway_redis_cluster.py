"""The gateway's door on a Redis Cluster (three local nodes, tests/redis_servers.py):
nonces, client and store buckets, the revocation epoch and the nonce store's
loss, through real gateways whose REDIS_URL is `redis+cluster://...`. The
door's single-Redis suite is tests/e2e/test_gateway_door.py; here every
script and MULTI must stay in one slot, or the cluster refuses it (CROSSSLOT).
"""

from __future__ import annotations

import time
import uuid

import grpc
import httpx
import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.auth.client import HmacAuth, StoreKeyInterceptor
from gateway.auth.model import ADMIN_REWARDS, MEMBER_ANY, ClientKind
from gateway.ratelimit import nonce_epoch_key
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.redis_client import create_redis

from ..redis_servers import RedisClusterServers
from .test_gateway_door import STORE, MakeDoor, make_door, rpc_error
from .test_gateway_security import adjustment, assert_problem, available, new_member, signed_headers

pytestmark = pytest.mark.e2e

__all__ = ["make_door"]  # the fixture, used here


async def test_signed_calls_check_nonces_limits_and_revocation_on_a_cluster(
    make_door: MakeDoor, redis_cluster: RedisClusterServers
) -> None:
    door = await make_door(redis_cluster.url)
    operator = await door.admin.create(
        ClientKind.OPERATOR_CONSOLE, "cluster operator", rate_per_second=0.001, burst=3
    )
    path = "/v1/admin/points/liability"
    captured = signed_headers(operator, "GET", path, b"")
    async with httpx.AsyncClient(base_url=door.url, timeout=10) as raw:
        assert (await raw.get(path, headers=captured)).status_code == 200
        # The same nonce again: refused, and no token spent on it.
        assert_problem(await raw.get(path, headers=captured), 401, "NONCE_REPLAYED")
    async with httpx.AsyncClient(
        base_url=door.url, timeout=10, auth=HmacAuth(operator.key_id, operator.secret)
    ) as signed:
        replies = [await signed.get(path) for _ in range(3)]
        assert [r.status_code for r in replies[:2]] == [200, 200]
        assert_problem(replies[2], 429, "RATE_LIMITED")
        # A revocation moves the epoch (its own slot); the next call sees it.
        await door.admin.revoke_key(operator.key_id)
        assert_problem(await signed.get(path), 401, "KEY_REVOKED")


async def test_two_tills_of_one_store_share_its_bucket_on_a_cluster(
    make_door: MakeDoor, redis_cluster: RedisClusterServers
) -> None:
    """POS calls are tagged by store: both tills' buckets and the store's
    bucket are in one slot, so the store's budget is one, whoever spends it."""
    door = await make_door(redis_cluster.url, store_rate_per_second=0.001, store_burst=2)
    tills = [await door.admin.create(ClientKind.POS, f"till {i}", store_id=STORE) for i in range(2)]
    request = pos_pb2.IdentifyMemberRequest(store_id=STORE, member_code="000000")
    codes = []
    for till in (*tills, tills[0]):
        async with grpc.aio.insecure_channel(
            door.pos_target, interceptors=[StoreKeyInterceptor(STORE, till.api_key)]
        ) as channel:
            err = await rpc_error(
                pos_pb2_grpc.PosServiceStub(channel).IdentifyMember(request, timeout=10)
            )
            codes.append(err.code())
    assert codes[0] != grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes[1] != grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes[2] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_node_losing_its_data_replays_nothing_on_a_cluster(
    make_door: MakeDoor, redis_cluster: RedisClusterServers, http: httpx.AsyncClient
) -> None:
    """The node holding a client's nonces loses its data (a master failing
    over to an empty replica): the client's nonce-store epoch went with them,
    so a captured request is refused, and the retry with its Idempotency-Key
    gets the first answer (records in PostgreSQL)."""
    door = await make_door(redis_cluster.url)
    operator = await door.admin.create(
        ClientKind.OPERATOR_CONSOLE, "cluster operator", scopes=[MEMBER_ANY, ADMIN_REWARDS]
    )
    member_id, _ = await new_member(http)
    target = f"/v1/admin/members/{member_id}/points/adjustments"
    body = adjustment(5)
    key = str(uuid.uuid4())
    captured = signed_headers(operator, "POST", target, body, idempotency_key=key)
    client = create_redis(redis_cluster.url)
    assert isinstance(client, RedisCluster)
    try:
        await client.initialize()
        holder = client.get_node_from_key(nonce_epoch_key(door.namespace, operator.client_id))
    finally:
        await client.aclose()
    (node,) = [n for n in redis_cluster.nodes if n.port == holder.port]
    async with httpx.AsyncClient(base_url=door.url, timeout=10) as raw:
        first = await raw.post(target, content=body, headers=captured)
        assert first.status_code == 200, first.text
        await node.flushall()
        assert_problem(
            await raw.post(target, content=body, headers=captured), 401, "NONCE_STORE_RESET"
        )
        retry_headers = signed_headers(
            operator, "POST", target, body, idempotency_key=key, timestamp=int(time.time()) + 1
        )
        retry = await raw.post(target, content=body, headers=retry_headers)
        assert retry.status_code == 200, retry.text
        assert retry.headers.get("Idempotent-Replayed") == "true"
    assert await available(http, member_id) == 5
