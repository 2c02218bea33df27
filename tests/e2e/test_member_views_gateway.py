"""The identify's and the member centre's per-member views through the gateway
(gateway/member_views.py): a repeat read asks neither tiering nor rewards; the
member's own write through the gateway shows on the very next read; a change
made elsewhere (an order straight to rewards, the tier tiering derives from
it) shows once relayed; an erasure is never answered from the views."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from redis.asyncio import Redis

from bench.cli import events_behind
from loyalty.common.v1 import common_pb2
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from servicekit.db import asyncpg_dsn
from servicekit.server import ServiceApp
from services.tiering.seed import seed_demo
from tests.harness import Infra, eventually

from .test_pos_slice import STORE, Pos, complete, identify, new_phone, new_txn

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
async def seeded(infra: Infra) -> AsyncIterator[None]:
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        await seed_demo(conn)
    finally:
        await conn.close()
    yield


def handled(app: ServiceApp, service: str, method: str) -> float:
    """Calls of `method` the service has answered, whatever their outcome."""
    registry = app.metrics.registry
    return sum(
        registry.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_service": service, "grpc_method": method, "grpc_code": code.name},
        )
        or 0.0
        for code in grpc.StatusCode
    )


REWARDS = "loyalty.rewards.v1.RewardsService"
TIERING = "loyalty.tiering.v1.TieringService"


class Downstream:
    """What tiering and rewards answered for the identify and the centre."""

    def __init__(self, rewards: ServiceApp, tiering: ServiceApp) -> None:
        self.rewards, self.tiering = rewards, tiering

    def calls(self) -> tuple[float, ...]:
        return (
            handled(self.rewards, REWARDS, "GetPointsBalance"),
            handled(self.tiering, TIERING, "GetMemberTierBadge"),
            handled(self.rewards, REWARDS, "GetPointsSummary"),
            handled(self.tiering, TIERING, "GetMemberTier"),
        )


@pytest.fixture
def downstream(rewards_app: ServiceApp, tiering_app: ServiceApp) -> Downstream:
    return Downstream(rewards_app, tiering_app)


async def events_quiet(infra: Infra, apps: tuple[ServiceApp, ...]) -> None:
    """Until every event of member, tiering and rewards so far is published and
    consumed by `apps`' consumers: the relays' and consumers' bumps of a
    member's views land after their event's commit, so a read served from the
    views stays so only once none is on its way."""
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    redis = Redis.from_url(infra.redis_url)
    groups = {consumer.group for app in apps for consumer in app.consumers}
    assert groups, "the apps run no consumer: nothing to wait for"
    try:

        async def quiet() -> bool:
            behind = await events_behind(
                conn, redis, infra.namespace, ("member", "tiering", "rewards"), groups
            )
            return behind == 0

        await eventually(quiet, timeout=20)
    finally:
        await redis.aclose()
        await conn.close()


async def served_from_views(downstream: Downstream, read: object, timeout: float = 15.0) -> object:
    """Read until one read asks neither service: enrolling leaves events whose
    relaying bumps the member's views for a moment; returns that read's reply."""

    async def attempt() -> Any:
        before = downstream.calls()
        reply = await read()
        return reply if downstream.calls() == before else None

    return await eventually(attempt, timeout=timeout, interval=0.1)


async def test_a_repeat_identify_asks_neither_tiering_nor_rewards(
    pos: Pos, downstream: Downstream, infra: Infra
) -> None:
    phone = new_phone()
    first = await identify(pos, phone)
    # Enrolling published events whose consumers bump the views after the
    # fact: a read served between two bumps would be followed by a miss.
    await events_quiet(infra, (downstream.rewards, downstream.tiering))
    hit = await served_from_views(downstream, lambda: identify(pos, phone))
    before = downstream.calls()
    again = await identify(pos, phone)
    assert downstream.calls() == before
    for reply in (hit, again):
        assert (reply.member_id, reply.points_available) == (first.member_id, 0)
        assert (reply.tier_code, reply.tier_name) == ("regular", "普通会员")
        assert reply.phone_masked == first.phone_masked


async def test_an_order_through_the_gateway_shows_on_the_next_identify_and_centre(
    pos: Pos, http: httpx.AsyncClient, downstream: Downstream
) -> None:
    phone = new_phone()
    member = await identify(pos, phone)
    centre = f"/v1/members/{member.member_id}/centre"
    await served_from_views(downstream, lambda: identify(pos, phone))
    await served_from_views(downstream, lambda: http.get(centre))
    order = await complete(pos, member.member_id, paid_fen=3_200)
    assert order.points_balance > 0
    # At once, no waiting for any relay: the gateway bumped before it replied.
    assert (await identify(pos, phone)).points_available == order.points_balance
    page = (await http.get(centre)).json()
    assert page["points"]["available"] == order.points_balance


async def test_a_tier_change_made_elsewhere_shows_once_relayed(
    pos: Pos, http: httpx.AsyncClient, rewards_app: ServiceApp, downstream: Downstream
) -> None:
    phone = new_phone()
    member = await identify(pos, phone)
    centre = f"/v1/members/{member.member_id}/centre"
    page = await served_from_views(downstream, lambda: http.get(centre))
    assert page.json()["tier"]["tier"]["code"] == "regular"
    # Straight to rewards, not through the gateway: only the relays and
    # tiering's consumer can tell the views.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rewards_app.port}") as channel:
        await rewards_pb2_grpc.RewardsServiceStub(channel).CompleteOrder(
            rewards_pb2.CompleteOrderRequest(
                store_id=STORE,
                pos_transaction_id=new_txn(),
                member_id=member.member_id,
                channel=common_pb2.CHANNEL_STORE,
                paid_amount_fen=52_000,
                gross_amount_fen=52_000,
            ),
            timeout=10,
        )

    async def upgraded() -> dict | None:
        body = (await http.get(centre)).json()
        return body if body["tier"]["tier"]["code"] == "svip" else None

    body = await eventually(upgraded, timeout=20, interval=0.1)
    assert body["tier"]["metric_value"] == 52_000
    assert body["points"]["lifetime_earned"] > 0
    assert (await identify(pos, phone)).tier_code == "svip"


async def test_an_erased_member_is_never_answered_from_the_views(
    pos: Pos, http: httpx.AsyncClient, member_app: ServiceApp, downstream: Downstream
) -> None:
    phone = new_phone()
    member = await identify(pos, phone)
    centre = f"/v1/members/{member.member_id}/centre"
    await served_from_views(downstream, lambda: http.get(centre))
    # Erased at member, not through the gateway: member's identity epoch
    # moves with the commit, before any relay publishes the erasure.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{member_app.port}") as channel:
        await member_pb2_grpc.MemberServiceStub(channel).EraseMember(
            member_pb2.EraseMemberRequest(
                member_id=member.member_id, operator="e2e", reason="PIPL"
            ),
            timeout=10,
        )
    before = downstream.calls()
    await http.get(centre)
    assert downstream.calls() != before  # asked the services, not the views
    # Nor the identify: the phone names nobody now (member refuses to enrol it
    # again without the person's consent).
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await identify(pos, phone)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_bulk_earn_through_the_gateway_shows_on_the_next_identify(
    pos: Pos, http: httpx.AsyncClient, downstream: Downstream
) -> None:
    """Bulk earns publish no event: only the gateway's own bump can tell."""
    phone = new_phone()
    member = await identify(pos, phone)
    await served_from_views(downstream, lambda: identify(pos, phone))
    reply = await http.post(
        "/v1/admin/points/earns",
        json={
            "lines": [
                {
                    "member_id": member.member_id,
                    "points": 40,
                    "reason": "e2e import",
                    "idempotency_key": f"mv-{new_txn()}",
                }
            ]
        },
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["applied"] == 1
    assert (await identify(pos, phone)).points_available == 40
