"""The gateway's own contract, in front of scripted downstream services:
error translation (codes, fields, nothing internal leaking), deadlines,
readiness, pass-through of the idempotency key, graceful stop and the POS CLI.

No database: the downstreams are fakes whose replies each test scripts, so the
failure modes real services rarely produce on demand (a hang, a raw INTERNAL
with an address in it, NOT_SERVING) are exercised deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway import pos_cli
from gateway.app import Gateway, build
from gateway.errors import PROBLEM_JSON
from loyalty.common.v1 import common_pb2
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from loyalty.tiering.v1 import tiering_pb2, tiering_pb2_grpc
from servicekit.errors import InvalidArgument, NotFound, error_info
from servicekit.interceptors import DomainErrorInterceptor

from .conftest import gateway_settings

pytestmark = pytest.mark.e2e

MEMBER_ID = "5f0c2c0e-3b1a-4c7e-9d2f-8a6b4e1c3d5f"
SECRET = "10.9.8.7:5432"  # an internal address that must never reach a caller

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def reply_with(message: Any) -> Behaviour:
    async def behave(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return message

    return behave


def raise_(exc: Exception) -> Behaviour:
    async def behave(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise exc

    return behave


def abort_raw(status: grpc.StatusCode, message: str) -> Behaviour:
    """A failure without our ErrorInfo, as a proxy or a crashed handler produces."""

    async def behave(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(status, message)

    return behave


def hang(seconds: float = 30) -> Behaviour:
    async def behave(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.sleep(seconds)

    return behave


def delayed(seconds: float, message: Any) -> Behaviour:
    async def behave(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.sleep(seconds)
        return message

    return behave


OPEN_STORE = rewards_pb2.Store(store_id="SH001", name="静安寺店", status="active")
MEMBER = member_pb2.Member(
    member_id=MEMBER_ID,
    member_number="M00000042",
    phone_masked="139****5678",
    registered_at=timestamp_pb2.Timestamp(seconds=1_741_415_400),
)


@dataclass
class Script:
    """What each fake RPC does, and the requests it received."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    requests: dict[str, list[Any]] = field(default_factory=dict)

    async def run(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.requests.setdefault(name, []).append(request)
        behave = self.behaviours.get(name)
        if behave is None:
            raise AssertionError(f"unexpected call {name}")
        return await behave(request, context)


class FakeMember(member_pb2_grpc.MemberServiceServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    async def IdentifyMember(self, request: Any, context: Any) -> Any:
        return await self.s.run("member.IdentifyMember", request, context)

    async def ResolveMember(self, request: Any, context: Any) -> Any:
        return await self.s.run("member.ResolveMember", request, context)

    async def GetMember(self, request: Any, context: Any) -> Any:
        return await self.s.run("member.GetMember", request, context)


class FakeRewards(rewards_pb2_grpc.RewardsServiceServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    async def CompleteOrder(self, request: Any, context: Any) -> Any:
        return await self.s.run("rewards.CompleteOrder", request, context)

    async def GetPointsBalance(self, request: Any, context: Any) -> Any:
        return await self.s.run("rewards.GetPointsBalance", request, context)

    async def GetStore(self, request: Any, context: Any) -> Any:
        return await self.s.run("rewards.GetStore", request, context)


class FakeTiering(tiering_pb2_grpc.TieringServiceServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    async def GetMemberSpend(self, request: Any, context: Any) -> Any:
        return await self.s.run("tiering.GetMemberSpend", request, context)


@dataclass
class Downstream:
    """One fake process serving member, rewards and tiering, like the real ones
    (DomainErrorInterceptor, library health servicer)."""

    script: Script
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    target: str


@pytest.fixture
async def downstream() -> AsyncIterator[Downstream]:
    script = Script()
    # A checkout first asks member whether the id is a live member (gateway/pos.py).
    script.behaviours["member.GetMember"] = reply_with(MEMBER)
    server = grpc.aio.server(interceptors=[DomainErrorInterceptor()])
    member_pb2_grpc.add_MemberServiceServicer_to_server(FakeMember(script), server)
    rewards_pb2_grpc.add_RewardsServiceServicer_to_server(FakeRewards(script), server)
    tiering_pb2_grpc.add_TieringServiceServicer_to_server(FakeTiering(script), server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Downstream(script, server, servicer, f"127.0.0.1:{port}")
    await server.stop(0)


@dataclass
class Doors:
    gateway: Gateway
    pos: pos_pb2_grpc.PosServiceStub
    http: httpx.AsyncClient


@contextlib.asynccontextmanager
async def open_gateway(downstream: Downstream, **overrides: object) -> AsyncIterator[Doors]:
    addresses = dict.fromkeys(("member_addr", "rewards_addr", "tiering_addr"), downstream.target)
    settings = gateway_settings(**{**addresses, **overrides})
    gw = build(settings)
    await gw.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gw.pos_grpc_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as http,
        ):
            yield Doors(gw, pos_pb2_grpc.PosServiceStub(channel), http)
    finally:
        await gw.stop()


@pytest.fixture
async def doors(downstream: Downstream) -> AsyncIterator[Doors]:
    async with open_gateway(downstream, downstream_timeout_seconds=0.5) as d:
        yield d


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def identify_request(phone: str = "13912345678") -> pos_pb2.IdentifyMemberRequest:
    return pos_pb2.IdentifyMemberRequest(store_id="SH001", phone=phone)


async def test_both_servers_bind_port_zero(doors: Doors) -> None:
    gw = doors.gateway
    assert gw.http_port > 0 and gw.pos_grpc_port > 0
    assert gw.http_port != gw.pos_grpc_port
    assert (await doors.http.get("/healthz")).status_code == 200


# What member answers ResolveMember for an identifier nobody owns.
UNKNOWN_IDENTIFIER = NotFound(
    "no member owns this identifier", code="UNKNOWN_IDENTIFIER", field="identifier"
)


async def test_identify_orchestrates_store_member_points(
    doors: Doors, downstream: Downstream
) -> None:
    script = downstream.script
    script.behaviours.update(
        {
            "rewards.GetStore": reply_with(OPEN_STORE),
            "member.ResolveMember": raise_(UNKNOWN_IDENTIFIER),
            "member.IdentifyMember": reply_with(
                member_pb2.IdentifyMemberResponse(member=MEMBER, created=True)
            ),
            "rewards.GetPointsBalance": reply_with(
                rewards_pb2.PointsBalance(member_id=MEMBER_ID, available=77, lifetime_earned=90)
            ),
        }
    )
    reply = await doors.pos.IdentifyMember(identify_request(), timeout=5)
    assert reply == pos_pb2.IdentifyMemberResponse(
        member_id=MEMBER_ID,
        member_number="M00000042",
        phone_masked="139****5678",
        created=True,
        points_available=77,
    )
    (sent,) = script.requests["member.IdentifyMember"]
    assert sent.source == "pos:SH001"
    (ident,) = sent.identifiers
    assert ident.type == member_pb2.IDENTIFIER_TYPE_PHONE
    assert ident.value == "13912345678"
    assert not ident.verified  # typed at a till: never proof of ownership
    # Looked up first, the same identifier; unknown, so enrolled.
    (looked_up,) = script.requests["member.ResolveMember"]
    assert looked_up.identifier == ident
    assert script.requests["rewards.GetStore"][0].store_id == "SH001"
    assert script.requests["rewards.GetPointsBalance"][0].member_id == MEMBER_ID


async def test_identify_of_a_known_member_is_one_resolve(
    doors: Doors, downstream: Downstream
) -> None:
    script = downstream.script
    script.behaviours.update(
        {
            "rewards.GetStore": reply_with(OPEN_STORE),
            "member.ResolveMember": reply_with(MEMBER),
            "rewards.GetPointsBalance": reply_with(
                rewards_pb2.PointsBalance(member_id=MEMBER_ID, available=5, lifetime_earned=9)
            ),
        }
    )
    reply = await doors.pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id="SH001", card="CARD-7"), timeout=5
    )
    assert reply == pos_pb2.IdentifyMemberResponse(
        member_id=MEMBER_ID,
        member_number="M00000042",
        phone_masked="139****5678",
        created=False,
        points_available=5,
    )
    (looked_up,) = script.requests["member.ResolveMember"]
    assert looked_up.identifier.type == member_pb2.IDENTIFIER_TYPE_POS_CARD
    assert looked_up.identifier.value == "CARD-7"
    assert "member.IdentifyMember" not in script.requests


async def test_downstream_error_keeps_status_code_and_names_the_callers_field(
    doors: Doors, downstream: Downstream
) -> None:
    downstream.script.behaviours.update(
        {
            "rewards.GetStore": reply_with(OPEN_STORE),
            "member.ResolveMember": raise_(
                InvalidArgument(
                    "identifier.value is not a valid phone number",
                    code="INVALID_PHONE",
                    field="identifier.value",
                )
            ),
        }
    )
    err = await rpc_error(doors.pos.IdentifyMember(identify_request("123"), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("INVALID_PHONE", "phone")
    # The message speaks of the caller's field too, not the member service's request.
    assert err.details() == "phone is not a valid phone number"
    assert "rewards.GetPointsBalance" not in downstream.script.requests
    # The same from IdentifyMember (an identifier ResolveMember found nobody for).
    downstream.script.behaviours.update(
        {
            "member.ResolveMember": raise_(UNKNOWN_IDENTIFIER),
            "member.IdentifyMember": raise_(
                InvalidArgument(
                    "identifiers[0].value is a placeholder or test value, never an identifier",
                    code="JUNK_IDENTIFIER",
                    field="identifiers[0].value",
                )
            ),
        }
    )
    err = await rpc_error(doors.pos.IdentifyMember(identify_request("13800000000"), timeout=5))
    assert error_info(err) == ("JUNK_IDENTIFIER", "phone")
    assert err.details() == "phone is a placeholder or test value, never an identifier"


async def test_closed_store_is_refused_before_anyone_is_enrolled(
    doors: Doors, downstream: Downstream
) -> None:
    closed = rewards_pb2.Store(store_id="SH001", status="closed")
    downstream.script.behaviours["rewards.GetStore"] = reply_with(closed)
    err = await rpc_error(doors.pos.IdentifyMember(identify_request(), timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err) == ("UNKNOWN_STORE", "store_id")
    assert "member.IdentifyMember" not in downstream.script.requests


async def test_internal_failures_leak_nothing(doors: Doors, downstream: Downstream) -> None:
    leak = f"Traceback: connection to {SECRET} lost in repository.py line 42"
    downstream.script.behaviours.update(
        {
            "rewards.GetStore": abort_raw(grpc.StatusCode.INTERNAL, leak),
            "member.GetMember": abort_raw(grpc.StatusCode.INTERNAL, leak),
            # A status a service would use, but without our ErrorInfo: not trusted.
            "tiering.GetMemberSpend": abort_raw(grpc.StatusCode.NOT_FOUND, leak),
        }
    )
    err = await rpc_error(doors.pos.IdentifyMember(identify_request(), timeout=5))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"
    assert error_info(err) == ("INTERNAL", "")

    for path in (f"/v1/members/{MEMBER_ID}", f"/v1/members/{MEMBER_ID}/spend"):
        reply = await doors.http.get(path)
        assert reply.status_code == 500
        assert reply.headers["content-type"] == PROBLEM_JSON
        assert reply.json()["detail"] == "internal error"
        assert SECRET not in reply.text and "Traceback" not in reply.text


async def test_a_hanging_downstream_is_unavailable_after_the_deadline(
    doors: Doors, downstream: Downstream
) -> None:
    downstream.script.behaviours.update(
        {
            "rewards.GetStore": hang(),
            "rewards.GetPointsBalance": hang(),
            "rewards.CompleteOrder": hang(),
        }
    )
    # The gateway's own downstream deadline (0.5 s) ends the call: had it not, the
    # till's 10 s would, as DEADLINE_EXCEEDED. (No timing assertion: the code says it.)
    err = await rpc_error(doors.pos.IdentifyMember(identify_request(), timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(err) == ("DEPENDENCY_UNAVAILABLE", "")

    order = pos_pb2.CompleteOrderRequest(
        store_id="SH001", pos_transaction_id="T1", member_id=MEMBER_ID, paid_amount_fen=100
    )
    err = await rpc_error(doors.pos.CompleteOrder(order, timeout=10))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    reply = await doors.http.get(f"/v1/members/{MEMBER_ID}/points")
    assert reply.status_code == 503
    assert reply.json()["code"] == "DEPENDENCY_UNAVAILABLE"


async def test_complete_order_passes_the_key_through_and_defaults_the_channel(
    doors: Doors, downstream: Downstream
) -> None:
    downstream.script.behaviours["rewards.CompleteOrder"] = reply_with(
        rewards_pb2.CompleteOrderResponse(
            order_id="o-1", points_earned=32, points_balance=132, replayed=True
        )
    )
    ordered_at = timestamp_pb2.Timestamp(seconds=1_741_415_400)
    line = pos_pb2.OrderLine(
        sku="TEA-01", name="多肉葡萄", category="fruit", quantity=2, paid_amount_fen=3200
    )
    request = pos_pb2.CompleteOrderRequest(
        store_id="SH001",
        pos_transaction_id="T1001",
        member_id=MEMBER_ID,
        paid_amount_fen=3200,
        gross_amount_fen=3800,
        lines=[line],
        ordered_at=ordered_at,
    )
    reply = await doors.pos.CompleteOrder(request, timeout=5)
    assert reply == pos_pb2.CompleteOrderResponse(
        order_id="o-1", points_earned=32, points_balance=132, replayed=True
    )
    explicit = pos_pb2.CompleteOrderRequest()
    explicit.CopyFrom(request)
    explicit.channel = common_pb2.CHANNEL_DELIVERY
    await doors.pos.CompleteOrder(explicit, timeout=5)

    first, second = downstream.script.requests["rewards.CompleteOrder"]
    assert (first.store_id, first.pos_transaction_id, first.member_id) == (
        "SH001",
        "T1001",
        MEMBER_ID,
    )
    assert first.channel == common_pb2.CHANNEL_STORE
    assert (first.paid_amount_fen, first.gross_amount_fen) == (3200, 3800)
    assert first.ordered_at == ordered_at
    assert [(x.sku, x.name, x.category, x.quantity, x.paid_amount_fen) for x in first.lines] == [
        ("TEA-01", "多肉葡萄", "fruit", 2, 3200)
    ]
    assert second.channel == common_pb2.CHANNEL_DELIVERY


async def test_missing_key_is_refused_without_calling_anyone(
    doors: Doors, downstream: Downstream
) -> None:
    cases = {
        "store_id": pos_pb2.CompleteOrderRequest(pos_transaction_id="T1", member_id=MEMBER_ID),
        "pos_transaction_id": pos_pb2.CompleteOrderRequest(store_id="SH001", member_id=MEMBER_ID),
        "member_id": pos_pb2.CompleteOrderRequest(store_id="SH001", pos_transaction_id="T1"),
    }
    for field_name, request in cases.items():
        err = await rpc_error(doors.pos.CompleteOrder(request, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err) == (f"{field_name.upper()}_REQUIRED", field_name)
    assert downstream.script.requests == {}


async def test_http_maps_statuses_and_keeps_integers_exact(
    doors: Doors, downstream: Downstream
) -> None:
    big = 2**53 + 1  # not representable as a float: must stay an exact JSON integer
    downstream.script.behaviours.update(
        {
            "member.GetMember": raise_(
                NotFound("member does not exist", code="UNKNOWN_MEMBER", field="member_id")
            ),
            "rewards.GetPointsBalance": reply_with(
                rewards_pb2.PointsBalance(member_id=MEMBER_ID, available=big, lifetime_earned=big)
            ),
            "tiering.GetMemberSpend": reply_with(
                tiering_pb2.MemberSpend(member_id=MEMBER_ID, total_paid_fen=0, order_count=0)
            ),
        }
    )
    reply = await doors.http.get(f"/v1/members/{MEMBER_ID}")
    assert reply.status_code == 404
    assert reply.headers["content-type"] == PROBLEM_JSON
    assert reply.json() == {
        "type": "urn:loyalty:problem:UNKNOWN_MEMBER",
        "title": "Not found",
        "status": 404,
        "code": "UNKNOWN_MEMBER",
        "detail": "member does not exist",
        "field": "member_id",
    }

    points = await doors.http.get(f"/v1/members/{MEMBER_ID.upper()}/points")
    assert points.status_code == 200
    assert f'"available":{big}' in points.text
    assert points.json() == {"member_id": MEMBER_ID, "available": big, "lifetime_earned": big}
    # The UUID path parameter canonicalises what the caller typed.
    assert downstream.script.requests["rewards.GetPointsBalance"][0].member_id == MEMBER_ID

    spend = (await doors.http.get(f"/v1/members/{MEMBER_ID}/spend")).json()
    assert spend == {
        "member_id": MEMBER_ID,
        "total_paid_fen": 0,
        "order_count": 0,
        "last_order_at": None,
        "tier_code": None,
        "tier_name": None,
    }


async def test_readyz_stays_ready_and_names_what_is_not_serving(
    doors: Doors, downstream: Downstream
) -> None:
    reply = await doors.http.get("/readyz")
    assert reply.status_code == 200, reply.text

    await downstream.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert doors.gateway.dependencies is not None
    await doors.gateway.dependencies.check()  # the periodic probe, now
    reply = await doors.http.get("/readyz")
    assert reply.status_code == 200, reply.text
    assert reply.json()["downstreams"] == {
        "member": "NOT_SERVING",
        "rewards": "NOT_SERVING",
        "tiering": "NOT_SERVING",
    }
    detail = await doors.http.get("/readyz/detail")
    assert detail.status_code == 200
    assert detail.json()["dependencies"] == {
        "member": "NOT_SERVING",
        "rewards": "NOT_SERVING",
        "tiering": "NOT_SERVING",
    }
    scraped = (await doors.http.get(f"http://127.0.0.1:{doors.gateway.metrics_port}/metrics")).text
    assert 'loyalty_dependency_up{dependency="member"} 0.0' in scraped


async def test_readyz_is_503_while_shutting_down(downstream: Downstream) -> None:
    async with open_gateway(downstream) as d:
        assert d.gateway.http_app is not None
        d.gateway.http_app.state.draining = True
        reply = await d.http.get("/readyz")
        assert reply.status_code == 503
        assert reply.json()["code"] == "SHUTTING_DOWN"


async def test_stop_drains_in_flight_calls(downstream: Downstream) -> None:
    downstream.script.behaviours["rewards.CompleteOrder"] = delayed(
        0.3, rewards_pb2.CompleteOrderResponse(order_id="o-slow", points_earned=1)
    )
    request = pos_pb2.CompleteOrderRequest(
        store_id="SH001", pos_transaction_id="T1", member_id=MEMBER_ID, paid_amount_fen=100
    )
    async with open_gateway(downstream, shutdown_grace_seconds=5.0) as d:
        in_flight = asyncio.ensure_future(d.pos.CompleteOrder(request, timeout=5))
        await asyncio.sleep(0.1)  # the call is now waiting on rewards
        await d.gateway.stop()
        assert (await in_flight).order_id == "o-slow"
        with pytest.raises(httpx.TransportError):
            await d.http.get("/healthz")


async def test_pos_cli_prints_replies_and_errors(
    doors: Doors, downstream: Downstream, capsys: pytest.CaptureFixture[str]
) -> None:
    downstream.script.behaviours.update(
        {
            "rewards.CompleteOrder": reply_with(
                rewards_pb2.CompleteOrderResponse(
                    order_id="o-9", points_earned=32, points_balance=32
                )
            ),
        }
    )
    target = f"127.0.0.1:{doors.gateway.pos_grpc_port}"
    args = [
        "--target",
        target,
        "complete-order",
        "--store-id",
        "SH001",
        "--pos-transaction-id",
        "T1001",
        "--member-id",
        MEMBER_ID,
        "--paid-fen",
        "3200",
    ]
    assert await asyncio.to_thread(pos_cli.main, args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "order_id": "o-9",
        "points_earned": "32",  # MessageToJson renders int64 as strings
        "points_balance": "32",
        "replayed": False,
        "degraded": [],
        "coupon_discount_fen": "0",
    }
    (sent,) = downstream.script.requests["rewards.CompleteOrder"]
    assert (sent.paid_amount_fen, sent.gross_amount_fen) == (3200, 3200)

    bad = ["--target", target, "identify", "--store-id", " ", "--phone", "13912345678"]
    assert await asyncio.to_thread(pos_cli.main, bad) == 1
    error = json.loads(capsys.readouterr().err)["error"]
    assert error == {
        "status": "INVALID_ARGUMENT",
        "code": "STORE_ID_REQUIRED",
        "message": "store_id is required",
        "field": "store_id",
    }


async def test_an_undeployed_service_is_ignored_by_readiness(downstream: Downstream) -> None:
    async with open_gateway(downstream, tiering_addr="") as d:
        body = (await d.http.get("/readyz")).json()
        assert body["downstreams"] == {"member": "SERVING", "rewards": "SERVING"}
        reply = await d.http.get(f"/v1/members/{uuid.uuid4()}/spend")
        assert reply.status_code == 503
        assert reply.json()["code"] == "SERVICE_NOT_DEPLOYED"


async def test_pos_health_watch_and_reflection(downstream: Downstream) -> None:
    async with open_gateway(downstream) as d:
        target = f"127.0.0.1:{d.gateway.pos_grpc_port}"
        async with grpc.aio.insecure_channel(target) as channel:
            reflection_stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            replies = [r async for r in reflection_stub.ServerReflectionInfo(iter([request]))]
            names = {s.name for s in replies[0].list_services_response.service}
            assert "loyalty.pos.v1.PosService" in names

            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="loyalty.pos.v1.PosService"), timeout=5
            )
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(d.gateway.stop())
            # Load balancers see NOT_SERVING as the drain begins.
            second = await watch.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await stopping


@pytest.mark.parametrize(
    ("target", "body", "field"),
    [
        ("/v1/admin/members/{member}/points/adjustments", {"points": 2**70}, "points"),
        ("/v1/admin/members/{member}/points/adjustments", {"points": -(2**70)}, "points"),
    ],
)
async def test_a_number_too_large_for_the_service_names_its_field(
    doors: Doors, downstream: Downstream, target: str, body: dict[str, Any], field: str
) -> None:
    # The route's model takes any integer; protobuf refuses it when the request
    # to rewards is built. The caller must learn which field, like any 422.
    reply = await doors.http.post(
        target.format(member=MEMBER_ID),
        json={"reason": "goodwill", "idempotency_key": str(uuid.uuid4()), **body},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert reply.status_code == 422, reply.text
    assert (reply.json()["code"], reply.json()["field"]) == ("OUT_OF_RANGE", field)
    assert "rewards.AdjustPoints" not in downstream.script.requests
