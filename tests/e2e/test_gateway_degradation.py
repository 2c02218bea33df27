"""Degradation: with tiering stopped the till still identifies and settles
(points at the rate rewards knows) and says what is missing; what needs the
stopped service fails fast with UNAVAILABLE / 503; a failure inside the gateway
itself is a bare INTERNAL / 500 problem+json that leaks nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from gateway.app import Gateway, build
from gateway.errors import PROBLEM_JSON
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info
from servicekit.server import ServiceApp

from .conftest import closed_port, gateway_settings
from .test_pos_slice import assert_problem, complete, identify, new_phone, points, rpc_error

pytestmark = pytest.mark.e2e

SECRET = "10.1.2.3:6543"  # an internal address a failure message might carry


@dataclass
class Doors:
    gateway: Gateway
    pos: pos_pb2_grpc.PosServiceStub
    http: httpx.AsyncClient


@pytest.fixture
async def without_tiering(
    member_app: ServiceApp, rewards_app: ServiceApp, demo_stores: list[str]
) -> AsyncIterator[Doors]:
    """A gateway in front of the real member and rewards, with tiering stopped
    (its address is a port nothing listens on)."""
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{closed_port()}",
        )
    )
    await gw.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gw.pos_grpc_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as http,
        ):
            yield Doors(gw, pos_pb2_grpc.PosServiceStub(channel), http)
    finally:
        await gw.stop()


async def test_checkout_completes_without_tiering_and_says_so(without_tiering: Doors) -> None:
    pos, http = without_tiering.pos, without_tiering.http
    member = await identify(pos, new_phone())
    assert member.member_id and member.created
    assert (member.tier_code, member.tier_name) == ("", "")
    assert list(member.degraded) == ["tiering"]

    order = await complete(pos, member.member_id, paid_fen=1800)
    # The base rate (1 point per yuan): rewards priced it on its own projection.
    assert (order.points_earned, order.points_balance) == (18, 18)
    assert list(order.degraded) == ["tiering"]
    assert (await points(http, member.member_id))["available"] == 18

    # What only tiering knows is unavailable, at once and without its address.
    reply = await http.get(f"/v1/members/{member.member_id}/tier")
    assert_problem(reply, 503, "DEPENDENCY_UNAVAILABLE")
    assert str(without_tiering.gateway.settings.tiering_addr) not in reply.text
    # Readiness names it but stays green: checkout works, so this gateway
    # must stay in the balancer (issue 14: 503 for 15 s while 300 of 300
    # checkouts succeeded would have removed every replica).
    ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["downstreams"]["tiering"] == "UNREACHABLE"
    detail = (await http.get("/readyz/detail")).json()
    assert detail["dependencies"]["tiering"] == "UNREACHABLE"


async def test_nothing_is_degraded_when_everyone_answers(pos: pos_pb2_grpc.PosServiceStub) -> None:
    member = await identify(pos, new_phone())
    assert list(member.degraded) == []
    order = await complete(pos, member.member_id, paid_fen=500)
    assert list(order.degraded) == []


async def test_a_stopped_member_service_fails_fast_while_rewards_answers(
    rewards_app: ServiceApp, demo_stores: list[str]
) -> None:
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{closed_port()}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{closed_port()}",
        )
    )
    await gw.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gw.pos_grpc_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as http,
        ):
            stub = pos_pb2_grpc.PosServiceStub(channel)
            # Identification needs member: UNAVAILABLE, not a hang (the call's
            # own 30 s deadline would turn a hang into DEADLINE_EXCEEDED).
            err = await rpc_error(
                stub.IdentifyMember(
                    pos_pb2.IdentifyMemberRequest(store_id="SH001", phone=new_phone()), timeout=30
                )
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(err) == ("DEPENDENCY_UNAVAILABLE", "")
            reply = await http.get(f"/v1/members/{uuid.uuid4()}")
            assert_problem(reply, 503, "DEPENDENCY_UNAVAILABLE")
            # Rewards alone still answers what is its own.
            assert (await http.get(f"/v1/members/{uuid.uuid4()}/points")).status_code == 200
            # The till still sells (rewards settles on what it knows), and the
            # reply says the member check was skipped.
            order = await complete(stub, str(uuid.uuid4()), paid_fen=1200)
            assert order.points_earned == 12
            assert list(order.degraded) == ["member", "tiering"]
    finally:
        await gw.stop()


async def test_a_bug_inside_the_gateway_is_a_bare_internal_error(
    without_tiering: Doors, monkeypatch: pytest.MonkeyPatch
) -> None:
    downstreams = without_tiering.gateway.downstreams
    assert downstreams is not None

    async def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError(f"pool to {SECRET} exhausted\n  File repository.py, line 42")

    monkeypatch.setattr(downstreams.rewards, "get_points_balance", broken)
    monkeypatch.setattr(downstreams.rewards, "get_store", broken)

    reply = await without_tiering.http.get(f"/v1/members/{uuid.uuid4()}/points")
    body = assert_problem(reply, 500, "INTERNAL")
    assert body["detail"] == "internal error"
    assert SECRET not in reply.text and "repository.py" not in reply.text

    err = await rpc_error(
        without_tiering.pos.IdentifyMember(
            pos_pb2.IdentifyMemberRequest(store_id="SH001", phone=new_phone()), timeout=10
        )
    )
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"
    assert error_info(err) == ("INTERNAL", "")


async def test_the_frameworks_own_errors_are_problems_too(without_tiering: Doors) -> None:
    http = without_tiering.http
    assert_problem(await http.get("/v1/no-such-route"), 404, "NOT_FOUND")
    assert_problem(await http.delete("/v1/members/identify"), 405, "METHOD_NOT_ALLOWED")
    reply = await http.post(
        "/v1/members/identify", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422
    assert reply.headers["content-type"] == PROBLEM_JSON
    assert reply.json()["code"] == "INVALID_ARGUMENT"
